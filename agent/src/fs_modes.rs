//! The modes of everything the agent keeps in its state directory, and the helpers that create
//! files and directories with them. Function instances run as another user (`--run-as`): they
//! may traverse the state directory to reach their own working directory, but can list nothing
//! in it and read no file of the agent's.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The state directory: traversable (instances reach `instances/<ns>/<name>/<id>` through it),
/// not listable.
pub const STATE_DIR_MODE: u32 = 0o711;
/// `instances/` and each function's directories under it: traversable, not listable.
pub const INSTANCES_DIR_MODE: u32 = 0o711;
/// An instance's working directory, owned by the user the instance runs as.
pub const WORK_DIR_MODE: u32 = 0o700;
/// `logs/` and everything under it: the agent's alone (operators read logs through the Logs
/// API, instances write their own through the descriptor the agent gives them).
pub const LOGS_DIR_MODE: u32 = 0o700;
/// Every file the agent writes: the persisted table, the instance records, the logs.
pub const FILE_MODE: u32 = 0o600;

/// The permission bits (with setuid, setgid and sticky) of a mode.
const PERMISSION_BITS: u32 = 0o7777;

/// Makes `dir` a directory of exactly `mode`, creating it if missing; missing parents are
/// created the same way (they are the agent's too, e.g. `/var/lib/meridian`).
///
/// The mode is set again when it differs from `mode`: the umask may have narrowed what mkdir
/// made (0711 under systemd's `UMask=0077` is 0700, which would lock instances out of their
/// working directories), and a directory made by an older agent keeps its old mode.
pub fn ensure_dir(dir: &Path, mode: u32) -> io::Result<()> {
    match DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) else {
                return Err(error);
            };
            ensure_dir(parent, mode)?;
            match DirBuilder::new().mode(mode).create(dir) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
                Err(error) => return Err(error),
            }
        }
        Err(error) => return Err(error),
    }
    let metadata = fs::metadata(dir)?;
    if !metadata.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a directory", dir.display()),
        ));
    }
    if metadata.permissions().mode() & PERMISSION_BITS != mode {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// [`ensure_dir`] for `base/<parts[0]>`, `base/<parts[0]>/<parts[1]>`, ...: every level gets
/// `mode`, including levels that already exist (an older agent made them with its umask's mode).
/// `base` must exist. Returns the deepest directory.
pub fn ensure_dir_chain(base: &Path, parts: &[&str], mode: u32) -> io::Result<std::path::PathBuf> {
    let mut dir = base.to_path_buf();
    for part in parts {
        dir.push(part);
        ensure_dir(&dir, mode)?;
    }
    Ok(dir)
}

/// Makes an instance's working directory: [`WORK_DIR_MODE`], owned by `owner` (uid, gid) when
/// the instance runs as another user than the agent. It is created by the agent with no access
/// for anyone else, so nobody sees it before it has its owner.
pub fn make_work_dir(dir: &Path, owner: Option<(u32, u32)>) -> io::Result<()> {
    ensure_dir(dir, WORK_DIR_MODE)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// Creates `path` afresh, [`FILE_MODE`], for writing. A file already at `path` (a temp file of an
/// interrupted write, maybe by an older agent with a wider mode) is removed first: `O_CREAT`
/// keeps an existing file's mode, and the mode must hold from the first byte written.
pub fn create_private_file(path: &Path) -> io::Result<File> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Narrows every regular file directly in `dir` that grants group or other users anything to
/// [`FILE_MODE`]; returns how many it changed. Files an agent wrote before the modes were fixed
/// (0644 under the usual umask) would stay readable by instances until rewritten, and a
/// persisted table is not rewritten while no control plane is reachable.
pub fn tighten_files(dir: &Path) -> io::Result<usize> {
    let mut changed = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        // Not following symlinks: a link is not the agent's file to change.
        let metadata = entry.metadata()?;
        if metadata.is_file() && metadata.permissions().mode() & 0o077 != 0 {
            fs::set_permissions(entry.path(), fs::Permissions::from_mode(FILE_MODE))?;
            changed += 1;
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & PERMISSION_BITS
    }

    #[test]
    fn directories_get_exactly_their_mode_whatever_the_umask_or_their_past() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/state");
        ensure_dir(&dir, STATE_DIR_MODE).unwrap();
        assert_eq!(mode(&dir), 0o711);
        // Missing parents are the agent's too.
        assert_eq!(mode(&tmp.path().join("a")), 0o711);
        assert_eq!(mode(&tmp.path().join("a/b")), 0o711);
        // A directory left with another mode (an older agent, another umask) is brought back.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_dir(&dir, STATE_DIR_MODE).unwrap();
        assert_eq!(mode(&dir), 0o711);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        ensure_dir(&dir, STATE_DIR_MODE).unwrap();
        assert_eq!(mode(&dir), 0o711);
        // A file in the way is an error, not a directory.
        let file = tmp.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(ensure_dir(&file, LOGS_DIR_MODE).is_err());
    }

    #[test]
    fn every_level_of_a_chain_gets_the_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path();
        fs::create_dir(base.join("default")).unwrap();
        fs::set_permissions(base.join("default"), fs::Permissions::from_mode(0o700)).unwrap();
        let deepest = ensure_dir_chain(base, &["default", "hello"], INSTANCES_DIR_MODE).unwrap();
        assert_eq!(deepest, base.join("default/hello"));
        assert_eq!(mode(&base.join("default")), 0o711);
        assert_eq!(mode(&deepest), 0o711);
    }

    #[test]
    fn private_files_are_0600_from_the_start_even_over_a_wider_leftover() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(".x.tmp");
        fs::write(&path, b"old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let mut file = create_private_file(&path).unwrap();
        file.write_all(b"new").unwrap();
        drop(file);
        assert_eq!(mode(&path), FILE_MODE);
        assert_eq!(fs::read(&path).unwrap(), b"new");
    }

    #[test]
    fn wide_files_are_tightened_and_others_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let wide = tmp.path().join("routing-table.pb");
        let narrow = tmp.path().join("instances.json");
        let sub = tmp.path().join("logs");
        fs::write(&wide, b"x").unwrap();
        fs::write(&narrow, b"x").unwrap();
        fs::create_dir(&sub).unwrap();
        fs::set_permissions(&wide, fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(&narrow, fs::Permissions::from_mode(0o600)).unwrap();
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(tighten_files(tmp.path()).unwrap(), 1);
        assert_eq!(mode(&wide), 0o600);
        assert_eq!(mode(&narrow), 0o600);
        // Directories have modes of their own (ensure_dir).
        assert_eq!(mode(&sub), 0o755);
    }

    #[test]
    fn a_work_dir_is_0700_and_owned_as_asked() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("hello-abcdef");
        let me = (
            fs::metadata(tmp.path()).unwrap().uid(),
            fs::metadata(tmp.path()).unwrap().gid(),
        );
        make_work_dir(&dir, Some(me)).unwrap();
        let metadata = fs::metadata(&dir).unwrap();
        assert_eq!(metadata.mode() & PERMISSION_BITS, WORK_DIR_MODE);
        assert_eq!((metadata.uid(), metadata.gid()), me);
        if nix::unistd::geteuid().is_root() {
            let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
            let theirs = tmp.path().join("hello-fedcba");
            make_work_dir(&theirs, Some((nobody.uid.as_raw(), nobody.gid.as_raw()))).unwrap();
            let metadata = fs::metadata(&theirs).unwrap();
            assert_eq!(metadata.uid(), nobody.uid.as_raw());
            assert_eq!(metadata.gid(), nobody.gid.as_raw());
            assert_eq!(metadata.mode() & PERMISSION_BITS, WORK_DIR_MODE);
        }
    }
}
