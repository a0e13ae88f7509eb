//! The command policy test agents run with: the harness's functions directory (the sample
//! function, where any user can reach it) as the allowed command root, `--run-as nobody` when
//! the tests run as root (a root agent refuses to start without `--run-as`), and temp
//! directories whose parents that user can traverse.
//!
//! The checkout may live where `nobody` cannot go (`/root`, mode 0700, in CI), and `tempfile`'s
//! directories are 0700: what the agents' instances must reach lives under
//! [`traversable_temp_dir`] instead, in directories made 0755 (functions) or left to the agent
//! (state, which it makes 0711).

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result};

use crate::sample::sample_function_program;

/// The user test agents run instances as when the tests run as root.
pub const RUN_AS: &str = "nobody";

/// The sample function's file name in [`functions_dir`].
pub const SAMPLE_FUNCTION: &str = "sample_function";

/// Prefix of the [`functions_dir`]s, followed by the pid of the test process that made it.
const FUNCTIONS_PREFIX: &str = "meridian-test-functions-";

/// Whether the tests run as root (then agents run instances as [`RUN_AS`]).
pub fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `(uid, gid)` that test agents' instances run as: [`RUN_AS`]'s when the tests run as root,
/// else the test process's own.
pub fn instance_ids() -> Result<(u32, u32)> {
    if !running_as_root() {
        return Ok((
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        ));
    }
    let user = nix::unistd::User::from_name(RUN_AS)
        .with_context(|| format!("looking up {RUN_AS}"))?
        .with_context(|| format!("no user {RUN_AS}: the tests run as root and need one"))?;
    Ok((user.uid.as_raw(), user.gid.as_raw()))
}

/// A directory under which any user reaches what it is given: the temp dir when every
/// directory above it lets others through (a `TMPDIR` under `/root` does not), else `/tmp`.
pub fn traversable_temp_dir() -> PathBuf {
    let temp = std::env::temp_dir();
    if traversable(&temp) {
        temp
    } else {
        PathBuf::from("/tmp")
    }
}

/// Whether `dir` and every directory above it let other users through (`o+x`).
fn traversable(dir: &Path) -> bool {
    dir.ancestors()
        .all(|dir| std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

/// The agents' allowed command root: a directory (0755 all the way down) holding a hard link to
/// (or a copy of) the sample function built in the checkout. One per test process, kept for its
/// lifetime; those of finished processes are removed by the next one.
pub fn functions_dir() -> Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| make_functions_dir().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn make_functions_dir() -> Result<PathBuf> {
    let base = traversable_temp_dir();
    remove_stale_functions_dirs(&base);
    let dir = tempfile::Builder::new()
        .prefix(&format!("{FUNCTIONS_PREFIX}{}-", std::process::id()))
        .tempdir_in(&base)
        .with_context(|| format!("creating the functions dir in {}", base.display()))?
        .keep();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod 0755 {}", dir.display()))?;
    let program = sample_function_program()?;
    let target = dir.join(SAMPLE_FUNCTION);
    if std::fs::hard_link(&program, &target).is_err() {
        // Another file system: a copy, mode included.
        std::fs::copy(&program, &target)
            .with_context(|| format!("copying {} into {}", program.display(), dir.display()))?;
    }
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod 0755 {}", target.display()))?;
    Ok(dir)
}

/// Removes the functions dirs of test processes that are gone.
fn remove_stale_functions_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(FUNCTIONS_PREFIX))
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The sample function as process functions name it: its path in [`functions_dir`].
pub fn sample_function_command() -> Result<PathBuf> {
    Ok(functions_dir()?.join(SAMPLE_FUNCTION))
}

/// The policy flags of a test agent: [`functions_dir`], then `extra_roots`, as allowed command
/// roots; `--run-as nobody` when the tests run as root.
pub fn policy_args(extra_roots: &[PathBuf]) -> Result<Vec<OsString>> {
    let mut args: Vec<OsString> = vec!["--allowed-command-root".into(), functions_dir()?.into()];
    for root in extra_roots {
        args.extend(["--allowed-command-root".into(), root.into()]);
    }
    if running_as_root() {
        args.extend(["--run-as".into(), RUN_AS.into()]);
    }
    Ok(args)
}

/// A fresh temp dir that [`RUN_AS`] can traverse into (0711) and any user can write into when
/// `writable` (1777: e.g. for what a command would create if it ran).
pub fn open_temp_dir(prefix: &str, writable: bool) -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(traversable_temp_dir())
        .context("creating a temp dir")?;
    let mode = if writable { 0o1777 } else { 0o711 };
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", dir.path().display()))?;
    Ok(dir)
}
