//! Key and certificate files: private keys readable by their owner only, nothing overwritten.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::ca::Bootstrap;

/// The trust bundle: anchors every component trusts.
pub const BUNDLE_FILE: &str = "ca.pem";
pub const ISSUER_FILE: &str = "issuer.pem";
pub const ISSUER_KEY_FILE: &str = "issuer-key.pem";
pub const ADMIN_FILE: &str = "admin.pem";
pub const ADMIN_KEY_FILE: &str = "admin-key.pem";

/// Why files could not be written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0} already exists; a bootstrap never overwrites a CA (remove it, or use another directory)")]
    Exists(PathBuf),
    #[error("cannot create directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Writes `contents` to a new file (never an existing one): mode 0600 when `private`, else
/// 0644. Synced before it returns.
pub fn write_new(path: &Path, contents: &str, private: bool) -> Result<(), FileError> {
    let mode = if private { 0o600 } else { 0o644 };
    let write = || -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()
    };
    write().map_err(|source| match source.kind() {
        io::ErrorKind::AlreadyExists => FileError::Exists(path.to_path_buf()),
        _ => FileError::Write {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// Writes a bootstrap set into `dir` (made 0700 if missing) and returns the files written.
/// If any of them exists, nothing is written.
pub fn write_bootstrap(dir: &Path, set: &Bootstrap) -> Result<Vec<PathBuf>, FileError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| FileError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
    let files = [
        (BUNDLE_FILE, set.anchor_pem.as_str(), false),
        (ISSUER_FILE, set.issuer_pem.as_str(), false),
        (ISSUER_KEY_FILE, set.issuer_key_pem.expose(), true),
        (ADMIN_FILE, set.admin.chain_pem.as_str(), false),
        (ADMIN_KEY_FILE, set.admin.key_pem.expose(), true),
    ];
    if let Some((name, _, _)) = files.iter().find(|(name, _, _)| dir.join(name).exists()) {
        return Err(FileError::Exists(dir.join(name)));
    }
    let mut written = Vec::new();
    for (name, contents, private) in files {
        let path = dir.join(name);
        write_new(&path, contents, private)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::id::TrustDomain;

    #[test]
    fn keys_are_private_and_nothing_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let domain = TrustDomain::new("meridian.test").unwrap();
        let set =
            crate::ca::bootstrap(&domain, Duration::from_secs(3600), SystemTime::now()).unwrap();
        let written = write_bootstrap(&ca, &set).unwrap();
        assert_eq!(written.len(), 5);
        let mode = |name: &str| fs::metadata(ca.join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(ISSUER_KEY_FILE), 0o600);
        assert_eq!(mode(ADMIN_KEY_FILE), 0o600);
        assert_eq!(mode(BUNDLE_FILE), 0o644);
        assert_eq!(
            fs::metadata(&ca).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // A second bootstrap into the same place changes nothing.
        let before = fs::read_to_string(ca.join(ISSUER_KEY_FILE)).unwrap();
        let again =
            crate::ca::bootstrap(&domain, Duration::from_secs(3600), SystemTime::now()).unwrap();
        let error = write_bootstrap(&ca, &again).unwrap_err().to_string();
        assert!(error.contains("ca.pem already exists"), "{error}");
        assert_eq!(
            fs::read_to_string(ca.join(ISSUER_KEY_FILE)).unwrap(),
            before
        );
    }
}
