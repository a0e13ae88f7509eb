//! `<state-dir>/instances.json`: the processes this agent started, so that the next agent can
//! kill the ones a crashed agent left behind (no orphans). Mode 0600: instances cannot read it.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

pub const RECORDS_FILE: &str = "instances.json";

#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot parse {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One running process, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub pid: u32,
    pub pgid: u32,
    /// `/proc/<pid>/stat` field 22 (clock ticks after boot): tells our process from a later one
    /// that reuses its pid.
    pub start_time: u64,
    pub instance: String,
    /// `<namespace>/<name>`.
    pub function: String,
}

pub fn records_path(state_dir: &Path) -> PathBuf {
    state_dir.join(RECORDS_FILE)
}

/// The start time of a live process (`/proc/<pid>/stat` field 22), `None` when it is gone.
/// A tiny read from procfs (no disk), fine on an async thread.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Field 22 of a `/proc/<pid>/stat` line. The command name (field 2) is in parentheses and may
/// hold spaces and parentheses itself, so fields are counted after its last `)`.
fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, after_name) = stat.rsplit_once(')')?;
    // after_name starts at field 3 (state); field 22 is 19 further.
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// Reads the records a previous agent left; a missing file is no records.
pub fn read(path: &Path) -> Result<Vec<ProcessRecord>, RecordsError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(RecordsError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    serde_json::from_slice(&bytes).map_err(|source| RecordsError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Writes the records atomically: temp file, fsync, rename, fsync of the directory, so that a
/// crash leaves either the old list or the new one.
pub fn write(path: &Path, records: &[ProcessRecord]) -> Result<(), RecordsError> {
    let error = |source| RecordsError::Write {
        path: path.to_owned(),
        source,
    };
    // Serializing plain structs cannot fail; map it anyway rather than unwrap.
    let bytes = serde_json::to_vec_pretty(records).map_err(|e| error(io::Error::other(e)))?;
    let temp = path.with_extension("json.tmp");
    {
        let mut file = crate::fs_modes::create_private_file(&temp).map_err(error)?;
        file.write_all(&bytes).map_err(error)?;
        file.sync_all().map_err(error)?;
    }
    std::fs::rename(&temp, path).map_err(error)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|dir| dir.sync_all())
            .map_err(error)?;
    }
    Ok(())
}

/// SIGKILLs the process group of every record whose process still runs with the recorded start
/// time (a pid reused by an unrelated process is left alone). Returns the records killed.
pub fn kill_orphans(records: &[ProcessRecord]) -> Vec<ProcessRecord> {
    let mut killed = Vec::new();
    for record in records {
        if process_start_time(record.pid) != Some(record.start_time) {
            continue;
        }
        if kill_group(record.pgid, Signal::SIGKILL) {
            killed.push(record.clone());
        }
    }
    killed
}

/// Signals a process group; false when it does not exist. Refuses groups 0 and 1: `kill(0)`
/// would hit the agent's own group and `kill(-1)` every process we may signal.
pub fn kill_group(pgid: u32, signal: Signal) -> bool {
    match i32::try_from(pgid) {
        Ok(pgid) if pgid > 1 => killpg(Pid::from_raw(pgid), signal).is_ok(),
        _ => false,
    }
}

/// Whether any process of the group is still alive (signal 0).
pub fn group_alive(pgid: u32) -> bool {
    match i32::try_from(pgid) {
        Ok(pgid) if pgid > 1 => killpg(Pid::from_raw(pgid), None).is_ok(),
        _ => false,
    }
}

/// Whether the group has a member that is not a zombie. Members the group leader forked are
/// reparented to init when it dies, and init may reap them late (some container inits reap
/// lazily); a zombie holds nothing, so it does not count. Scans `/proc` only when the group
/// still exists at all: call it off the async threads.
pub fn group_has_live_members(pgid: u32) -> bool {
    if !group_alive(pgid) {
        return false;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        // Without procfs assume the worst: it lives.
        return true;
    };
    entries.flatten().any(|entry| {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            return false;
        };
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| parse_group_and_state(&stat))
            .is_some_and(|(group, state)| group == pgid && state != 'Z' && state != 'X')
    })
}

/// Fields 5 (process group) and 3 (state) of a `/proc/<pid>/stat` line.
fn parse_group_and_state(stat: &str) -> Option<(u32, char)> {
    let (_, after_name) = stat.rsplit_once(')')?;
    let mut fields = after_name.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Field 4 is the parent, field 5 the group.
    let group = fields.nth(1)?.parse().ok()?;
    Some((group, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_with_parentheses_in_the_name() {
        let stat = "1234 (we (ird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 12345 67 18446744073709551615";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("garbage"), None);
        assert_eq!(parse_start_time("1 (x) S 1 2"), None);
        assert_eq!(parse_group_and_state(stat), Some((1234, 'S')));
        assert_eq!(parse_group_and_state("5 (a b) Z 1 77 77"), Some((77, 'Z')));
    }

    #[test]
    fn own_process_has_a_start_time() {
        assert!(process_start_time(std::process::id()).is_some());
    }

    #[test]
    fn write_then_read_roundtrips_and_missing_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = records_path(dir.path());
        assert_eq!(read(&path).unwrap(), Vec::new());
        let records = vec![ProcessRecord {
            pid: 10,
            pgid: 10,
            start_time: 5,
            instance: "hello-abcdef".into(),
            function: "default/hello".into(),
        }];
        write(&path, &records).unwrap();
        assert_eq!(read(&path).unwrap(), records);
        assert!(!path.with_extension("json.tmp").exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o600);
    }

    #[test]
    fn corrupt_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = records_path(dir.path());
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(read(&path), Err(RecordsError::Parse { .. })));
    }

    #[test]
    fn dangerous_groups_are_never_signalled() {
        assert!(!kill_group(0, Signal::SIGKILL));
        assert!(!kill_group(1, Signal::SIGKILL));
        assert!(!group_alive(0));
        assert!(!group_alive(u32::MAX));
    }

    #[test]
    fn records_whose_start_time_differs_are_left_alone() {
        let record = ProcessRecord {
            pid: std::process::id(),
            pgid: std::process::id(),
            start_time: process_start_time(std::process::id()).unwrap() + 1,
            instance: "x-000000".into(),
            function: "default/x".into(),
        };
        assert!(kill_orphans(&[record]).is_empty());
    }
}
