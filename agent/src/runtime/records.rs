//! `<state-dir>/instances.json`: the processes this agent started, so that the next agent can
//! adopt the ones that kept serving while no agent ran and reap what it cannot vouch for (see
//! `adopt`). Mode 0600: instances cannot read it. Also the `/proc` readers that tell a recorded
//! process from a later one with the same pid.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use meridian_proto::v1::ProcessRuntime;
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
    /// `/proc/sys/kernel/random/boot_id` when recorded: a pid and a start time name one process
    /// only within one boot. `None` in records of agents before adoption, and where unreadable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// What the next agent needs to adopt the instance; only while it is READY and not
    /// draining (a starting or draining instance is reaped by the next agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adoption: Option<Adoption>,
}

/// The part of a record that lets the next agent take the instance over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adoption {
    /// What it binds and sidecars dial.
    pub address: SocketAddr,
    /// `/proc/<pid>/cmdline` as read when it became ready: after a wrapper's `exec`, so that
    /// `sh -c 'exec ...'` is recorded as what it became.
    pub cmdline: Vec<String>,
    /// The canonical program the agent executed (checked against the allowed command roots of
    /// the adopting agent).
    pub program: PathBuf,
    /// [`spec_digest`] of the `ProcessRuntime` it runs: an instance of a spec changed since is
    /// adopted as an old one (replaced), never as current.
    pub spec_digest: String,
    /// The spec's readiness path (empty: TCP), probed before adopting.
    pub readiness_path: String,
    /// Restarts of its slot before it.
    pub restarts: u32,
    pub started_unix_ms: i64,
    pub ready_unix_ms: i64,
}

pub fn records_path(state_dir: &Path) -> PathBuf {
    state_dir.join(RECORDS_FILE)
}

/// The start time of a live process (`/proc/<pid>/stat` field 22), `None` when it is gone.
/// A tiny read from procfs (no disk), fine on an async thread.
pub fn process_start_time(pid: u32) -> Option<u64> {
    read_stat(pid).map(|stat| stat.start_time)
}

/// What `/proc/<pid>/stat` says about a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// Field 3: `R`, `S`, `Z` (exited, not yet reaped), ...
    pub state: char,
    /// Field 5.
    pub pgid: u32,
    /// Field 22.
    pub start_time: u64,
}

impl Stat {
    /// Exited (a zombie waiting to be reaped, or dead).
    pub fn exited(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// `/proc/<pid>/stat`, `None` when the process is gone. A tiny read from procfs.
pub fn read_stat(pid: u32) -> Option<Stat> {
    if pid == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

/// Whether `pid` is still the process that started at `start_time`, and has not exited.
pub fn process_alive(pid: u32, start_time: u64) -> bool {
    read_stat(pid).is_some_and(|stat| stat.start_time == start_time && !stat.exited())
}

/// Field 22 of a `/proc/<pid>/stat` line.
#[cfg(test)]
fn parse_start_time(stat: &str) -> Option<u64> {
    parse_stat(stat).map(|stat| stat.start_time)
}

/// Fields 3, 5 and 22 of a `/proc/<pid>/stat` line. The command name (field 2) is in
/// parentheses and may hold spaces and parentheses itself, so fields are counted after its
/// last `)`.
fn parse_stat(stat: &str) -> Option<Stat> {
    let (_, after_name) = stat.rsplit_once(')')?;
    // after_name starts at field 3 (state).
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let pgid = fields.get(2)?.parse().ok()?;
    // Field 22 is 19 after field 3.
    let start_time = fields.get(19)?.parse().ok()?;
    Some(Stat {
        state,
        pgid,
        start_time,
    })
}

/// `/proc/<pid>/cmdline`, one string per argument (invalid UTF-8 replaced); `None` when the
/// process is gone or has no command line (a zombie, a kernel thread). Readable for any user's
/// process, unlike `/proc/<pid>/exe`, which an agent without CAP_SYS_PTRACE cannot read for
/// instances of the `--run-as` user.
pub fn read_cmdline(pid: u32) -> Option<Vec<String>> {
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    parse_cmdline(&bytes)
}

fn parse_cmdline(bytes: &[u8]) -> Option<Vec<String>> {
    if bytes.is_empty() {
        return None;
    }
    let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    Some(
        bytes
            .split(|b| *b == 0)
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect(),
    )
}

/// The real, effective, saved and file-system uids of a process (`Uid:` of
/// `/proc/<pid>/status`).
pub fn read_uids(pid: u32) -> Option<[u32; 4]> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_uids(&status)
}

fn parse_uids(status: &str) -> Option<[u32; 4]> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let ids: Vec<u32> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    ids.try_into().ok()
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), `None` where unreadable.
pub fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_owned())
}

/// A stable digest of what an instance runs: FNV-1a (64 bits) over the command, arguments,
/// environment (sorted) and readiness path, each length-prefixed. It tells a spec from a
/// changed one across agent restarts (Rust's `Hash` is not stable across builds); it is not a
/// security check: whoever writes the spec chooses what runs anyway.
pub fn spec_digest(process: &ProcessRuntime) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    let mut feed = |bytes: &[u8]| {
        for byte in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(PRIME);
        }
    };
    feed(process.command.as_bytes());
    feed(&(process.args.len() as u64).to_le_bytes());
    for arg in &process.args {
        feed(arg.as_bytes());
    }
    let env: BTreeMap<&String, &String> = process.env.iter().collect();
    feed(&(env.len() as u64).to_le_bytes());
    for (name, value) in env {
        feed(name.as_bytes());
        feed(value.as_bytes());
    }
    feed(process.readiness_path.as_bytes());
    format!("fnv1a64:{hash:016x}")
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
            boot_id: Some("b".into()),
            adoption: Some(Adoption {
                address: "127.0.0.1:8080".parse().unwrap(),
                cmdline: vec!["/opt/f/hello".into()],
                program: "/opt/f/hello".into(),
                spec_digest: "fnv1a64:0000000000000001".into(),
                readiness_path: "/healthz".into(),
                restarts: 2,
                started_unix_ms: 1,
                ready_unix_ms: 2,
            }),
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
    fn stat_cmdline_and_uids_parse() {
        let stat = "1234 (we (ird) name) Z 1 77 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 12345 67 18446744073709551615";
        let parsed = parse_stat(stat).unwrap();
        assert_eq!(
            parsed,
            Stat {
                state: 'Z',
                pgid: 77,
                start_time: 987654
            }
        );
        assert!(parsed.exited());
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
        assert_eq!(
            parse_cmdline(b"/bin/sh\0-c\0echo hi\0"),
            Some(vec!["/bin/sh".to_string(), "-c".into(), "echo hi".into()])
        );
        assert_eq!(parse_cmdline(b""), None);
        assert_eq!(
            parse_uids("Name:\tx\nUid:\t65534\t65534\t65534\t65534\nGid:\t1\t1\t1\t1\n"),
            Some([65534; 4])
        );
        assert_eq!(parse_uids("Uid:\t1\t2\n"), None);
    }

    #[test]
    fn own_process_is_alive_with_its_cmdline_and_uids() {
        let pid = std::process::id();
        let start = process_start_time(pid).unwrap();
        assert!(process_alive(pid, start));
        assert!(!process_alive(pid, start + 1));
        assert!(read_cmdline(pid).is_some_and(|argv| !argv.is_empty()));
        let uid = nix::unistd::geteuid().as_raw();
        assert_eq!(read_uids(pid).map(|ids| ids[1]), Some(uid));
        assert!(boot_id().is_some_and(|id| id.len() >= 32));
    }

    #[test]
    fn spec_digest_is_stable_and_sees_every_field() {
        let spec = ProcessRuntime {
            command: "sample".into(),
            args: vec!["a".into(), "b".into()],
            env: [("X".to_string(), "1".to_string()), ("Y".into(), "2".into())].into(),
            readiness_path: "/healthz".into(),
        };
        let digest = spec_digest(&spec);
        assert!(
            digest.starts_with("fnv1a64:") && digest.len() == 8 + 16,
            "{digest}"
        );
        // Whatever order the map iterates in.
        let mut same = spec.clone();
        same.env = [("Y".to_string(), "2".to_string()), ("X".into(), "1".into())].into();
        assert_eq!(spec_digest(&same), digest);
        let changes: [fn(&mut ProcessRuntime); 5] = [
            |p| p.command.push('x'),
            |p| p.args = vec!["ab".into()],
            |p| {
                p.env.insert("X".into(), "2".into());
            },
            |p| p.readiness_path.clear(),
            // Length prefixes: moving a byte between fields changes the digest.
            |p| p.args = vec!["a".into(), "".into(), "b".into()],
        ];
        for change in changes {
            let mut other = spec.clone();
            change(&mut other);
            assert_ne!(spec_digest(&other), digest, "{other:?}");
        }
    }

    #[test]
    fn records_of_older_agents_still_parse() {
        let dir = tempfile::tempdir().unwrap();
        let path = records_path(dir.path());
        std::fs::write(
            &path,
            br#"[{"pid":10,"pgid":10,"start_time":5,"instance":"hello-abcdef","function":"default/hello"}]"#,
        )
        .unwrap();
        let records = read(&path).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].boot_id, None);
        assert_eq!(records[0].adoption, None);
    }
}
