//! Adoption: on start, the agent takes over the instances its predecessor recorded and left
//! running (it was killed, or stopped with `--keep-instances-on-exit`), so that a restart neither
//! kills what kept serving meanwhile nor churns. A record is adopted only when its process is
//! provably the one recorded, still as recorded, and ready; anything else is reaped if it is
//! ours and forgotten, never signalled, if it is not.
//!
//! - Not ours ([`Verdict::Forget`]): the record is from another boot, its pid is gone, or the pid
//!   now names a process that started at another time (the pid was reused).
//! - Ours but not to be kept ([`Verdict::Reap`]): pid and start time match (within this boot
//!   they name one process), but it was not READY when recorded (starting, draining, or
//!   recorded by an agent before adoption), left its process group, runs another command line
//!   than the one recorded, runs as another user than `--run-as`, or runs a program outside the
//!   allowed command roots. Its leader is killed through its pidfd, its group with `killpg`.
//! - Adopted: booked under its original id and address (see `supervisor`), watched through its
//!   pidfd ([`ExitWatch`]): it is not the agent's child, so `waitpid` cannot see its exit, whose
//!   code stays unknown ([`ADOPTED_EXIT`]). One that answers its readiness probe within
//!   [`FIRST_ROUND`] is booked READY before the agent serves anything; one that does not is
//!   booked STARTING (sidecars stop sending to it) and its task goes on probing until
//!   [`READY_WITHIN`] after the start, then kills it (reaped, not counted as a restart). The
//!   agent's start never waits on an unhealthy instance longer than the first round: it must
//!   reach its control plane before the agent lease runs out, or the scheduler would take the
//!   region's placements away.
//!
//! The pidfd is opened before the checks: it names one process for good, so checks that pass
//! afterwards are about the process that is then watched and signalled, whatever happens to its
//! pid later.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::{sleep, Instant};

use super::records::{self, Adoption, ProcessRecord, Stat};
use super::{readiness, FunctionKey};

/// How long a recorded instance gets to pass its readiness probe, from the agent's start, before
/// it is reaped.
pub const READY_WITHIN: Duration = Duration::from_secs(3);
/// How long the start waits for every recorded instance's first answer (in parallel): a healthy
/// one answers in milliseconds and is booked READY before anything reads the runtime (or the
/// autoscaler would start new ones, and sidecars would see it STARTING); the others are booked
/// STARTING and probed on.
pub const FIRST_ROUND: Duration = Duration::from_millis(500);
/// Between readiness probes of a recorded instance.
const PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// How often an adopted process is checked where pidfds are missing (Linux before 5.3).
const EXIT_POLL: Duration = Duration::from_millis(100);
/// How an adopted instance's exit is reported: the agent is not its parent.
pub const ADOPTED_EXIT: &str = "exited (adopted; code unknown)";

#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("pid {0} is not a valid process id")]
    BadPid(u32),
    #[error("process {0} is gone")]
    Gone(u32),
    #[error("cannot open a pidfd for process {pid}")]
    Pidfd {
        pid: u32,
        #[source]
        source: io::Error,
    },
}

/// Watches a process that is not the agent's child: its pidfd turns readable when it exits.
#[derive(Debug)]
pub struct ExitWatch {
    pid: u32,
    start_time: u64,
    /// `None` where the kernel has no pidfds: `/proc` is polled instead.
    pidfd: Option<AsyncFd<OwnedFd>>,
}

impl ExitWatch {
    /// Pins the process that has `pid` now. Must run inside the tokio runtime (the pidfd is
    /// registered with its reactor).
    pub fn open(pid: u32, start_time: u64) -> Result<ExitWatch, AdoptError> {
        let raw = i32::try_from(pid)
            .ok()
            .filter(|pid| *pid > 1)
            .and_then(Pid::from_raw)
            .ok_or(AdoptError::BadPid(pid))?;
        let pidfd = match pidfd_open(raw, PidfdFlags::NONBLOCK) {
            Ok(fd) => Some(register(fd).map_err(|source| AdoptError::Pidfd { pid, source })?),
            Err(rustix::io::Errno::SRCH) => return Err(AdoptError::Gone(pid)),
            Err(rustix::io::Errno::NOSYS) => None,
            Err(errno) => {
                return Err(AdoptError::Pidfd {
                    pid,
                    source: errno.into(),
                })
            }
        };
        Ok(ExitWatch {
            pid,
            start_time,
            pidfd,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process still runs (not exited, not a zombie).
    pub fn alive(&self) -> bool {
        records::process_alive(self.pid, self.start_time)
    }

    /// Resolves once the process has exited; at once if it has. Cancel safe.
    pub async fn exited(&self) {
        if let Some(pidfd) = &self.pidfd {
            // Readable means exited. An error (not expected for a pidfd) falls back to polling.
            if pidfd.readable().await.is_ok() {
                return;
            }
        }
        while self.alive() {
            sleep(EXIT_POLL).await;
        }
    }

    /// Signals the process itself (never another that took its pid). False when it is gone.
    pub fn signal(&self, signal: Signal) -> bool {
        match &self.pidfd {
            Some(pidfd) => pidfd_send_signal(pidfd.get_ref(), signal).is_ok(),
            // Without pidfds the start time is checked right before: the window is tiny.
            None => {
                self.alive()
                    && i32::try_from(self.pid).is_ok_and(|pid| {
                        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix_signal(signal))
                            .is_ok()
                    })
            }
        }
    }
}

/// Registers a pidfd with tokio's reactor. Tokio deprecated this safe constructor because an
/// arbitrary `T: AsRawFd` may answer another descriptor later, or close it, while registered; an
/// `OwnedFd` owned by the `AsyncFd` (never handed out mutably here) keeps its one descriptor
/// open until the `AsyncFd` drops, which is what the unsafe `register_with_interest` asks of its
/// caller. The workspace forbids `unsafe`, so this is the sound way in.
#[allow(deprecated)]
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    AsyncFd::with_interest(fd, Interest::READABLE)
}

fn nix_signal(signal: Signal) -> nix::sys::signal::Signal {
    if signal == Signal::TERM {
        nix::sys::signal::Signal::SIGTERM
    } else {
        nix::sys::signal::Signal::SIGKILL
    }
}

/// What the live system says about a pid, behind a trait so that the rules can be tested
/// without processes.
pub trait ProcessView {
    fn stat(&self, pid: u32) -> Option<Stat>;
    fn cmdline(&self, pid: u32) -> Option<Vec<String>>;
    fn uids(&self, pid: u32) -> Option<[u32; 4]>;
}

/// The real `/proc`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Procfs;

impl ProcessView for Procfs {
    fn stat(&self, pid: u32) -> Option<Stat> {
        records::read_stat(pid)
    }

    fn cmdline(&self, pid: u32) -> Option<Vec<String>> {
        records::read_cmdline(pid)
    }

    fn uids(&self, pid: u32) -> Option<[u32; 4]> {
        records::read_uids(pid)
    }
}

/// What an adopted instance must satisfy in this agent.
#[derive(Clone, Debug)]
pub struct Expectations {
    /// This boot's id; `None` if unreadable (then a record's boot is not checked).
    pub boot_id: Option<String>,
    /// The uid instances run as: `--run-as`, or the agent's own.
    pub uid: u32,
    /// The allowed command roots (canonical).
    pub roots: Vec<PathBuf>,
}

/// What to do with one record, before readiness.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Ours and as recorded: adopted if it passes readiness.
    Candidate,
    /// Ours, but not to be kept: kill its group.
    Reap(String),
    /// Not ours (any more): never signal it.
    Forget(String),
}

/// The rules, in order: identity first (a stranger must never be signalled), then whether what
/// runs is what was recorded and what this agent allows.
pub fn judge(record: &ProcessRecord, view: &dyn ProcessView, expect: &Expectations) -> Verdict {
    if let (Some(recorded), Some(now)) = (&record.boot_id, &expect.boot_id) {
        if recorded != now {
            return Verdict::Forget(format!("recorded in another boot ({recorded})"));
        }
    }
    let Some(stat) = view.stat(record.pid) else {
        return Verdict::Forget("its process is gone".into());
    };
    if stat.start_time != record.start_time {
        return Verdict::Forget(format!(
            "pid {} now names another process (started at {}, recorded {})",
            record.pid, stat.start_time, record.start_time
        ));
    }
    if stat.exited() {
        return Verdict::Reap("it has exited (its group may still hold processes)".into());
    }
    let Some(adoption) = &record.adoption else {
        return Verdict::Reap(
            "it was not ready when recorded (starting or draining, or recorded by an agent \
             that did not adopt)"
                .into(),
        );
    };
    if stat.pgid != record.pgid {
        return Verdict::Reap(format!(
            "it left its process group {} (now {})",
            record.pgid, stat.pgid
        ));
    }
    match view.cmdline(record.pid) {
        Some(cmdline) if cmdline == adoption.cmdline => {}
        Some(cmdline) => {
            return Verdict::Reap(format!(
                "its command line {cmdline:?} is not the recorded {:?}",
                adoption.cmdline
            ))
        }
        None => return Verdict::Reap("its command line cannot be read".into()),
    }
    match view.uids(record.pid) {
        Some(uids) if uids.iter().all(|uid| *uid == expect.uid) => {}
        Some(uids) => {
            return Verdict::Reap(format!(
                "it runs as uid {} (ids {uids:?}), not {} (--run-as)",
                uids[1], expect.uid
            ))
        }
        None => return Verdict::Reap("its user cannot be read".into()),
    }
    if !expect
        .roots
        .iter()
        .any(|root| adoption.program.starts_with(root))
    {
        return Verdict::Reap(format!(
            "its program {} is outside the allowed command roots",
            adoption.program.display()
        ));
    }
    if parse_function(&record.function).is_none() {
        return Verdict::Reap(format!("unknown function {:?}", record.function));
    }
    Verdict::Candidate
}

/// `<namespace>/<name>` back into a key.
pub fn parse_function(function: &str) -> Option<FunctionKey> {
    let (namespace, name) = function.split_once('/')?;
    (!namespace.is_empty() && !name.is_empty() && !name.contains('/'))
        .then(|| FunctionKey::new(namespace, name))
}

/// An instance taken over from a previous agent.
#[derive(Debug)]
pub struct Adopted {
    pub key: FunctionKey,
    pub record: ProcessRecord,
    pub adoption: Adoption,
    pub exit: ExitWatch,
    /// `None`: it passed its readiness probe (READY). Else it must pass by then, or be reaped.
    pub ready_by: Option<Instant>,
}

/// What became of the records of a previous agent.
#[derive(Debug, Default)]
pub struct TakeOver {
    pub adopted: Vec<Adopted>,
    /// Killed: ours, but not adoptable (why).
    pub reaped: Vec<(ProcessRecord, String)>,
    /// Left alone: not ours, or gone (why).
    pub forgotten: Vec<(ProcessRecord, String)>,
}

/// Judges every record, reaps what is ours and not adoptable, probes the candidates' readiness
/// in parallel for at most [`FIRST_ROUND`], and returns them: READY, or to be probed on until
/// [`READY_WITHIN`] after now.
pub async fn take_over(records: Vec<ProcessRecord>, expect: &Expectations) -> TakeOver {
    let started = Instant::now();
    let mut outcome = TakeOver::default();
    let mut candidates = Vec::new();
    for record in records {
        let exit = match ExitWatch::open(record.pid, record.start_time) {
            Ok(exit) => Some(exit),
            Err(AdoptError::Gone(_) | AdoptError::BadPid(_)) => {
                outcome
                    .forgotten
                    .push((record, "its process is gone".into()));
                continue;
            }
            // No watch, so no adoption; the verdict still says whether it may be signalled.
            Err(error) => {
                tracing::warn!(error = %crate::error_chain(&error), "cannot watch a recorded instance");
                None
            }
        };
        match (judge(&record, &Procfs, expect), exit) {
            (Verdict::Forget(reason), _) => outcome.forgotten.push((record, reason)),
            (Verdict::Reap(reason), exit) => {
                reap(&record, exit.as_ref());
                outcome.reaped.push((record, reason));
            }
            (Verdict::Candidate, None) => {
                reap(&record, None);
                outcome
                    .reaped
                    .push((record, "its exit cannot be watched".into()));
            }
            (Verdict::Candidate, Some(exit)) => candidates.push((record, exit)),
        }
    }
    let first_round = Instant::now() + FIRST_ROUND;
    let probed =
        futures::future::join_all(candidates.into_iter().map(|(record, exit)| async move {
            let ready = match &record.adoption {
                Some(adoption) => {
                    ready_by(adoption.address, &adoption.readiness_path, first_round).await
                }
                None => false,
            };
            (record, exit, ready)
        }))
        .await;
    for (record, exit, ready) in probed {
        let (Some(key), Some(adoption)) =
            (parse_function(&record.function), record.adoption.clone())
        else {
            // judge() checked both; unreachable in practice, and never signalled blindly.
            reap(&record, Some(&exit));
            outcome.reaped.push((record, "unreadable record".into()));
            continue;
        };
        if !exit.alive() {
            // Exited while probed: whatever is left of its group goes.
            reap(&record, Some(&exit));
            outcome
                .reaped
                .push((record, "it exited while being adopted".into()));
        } else {
            outcome.adopted.push(Adopted {
                key,
                record,
                adoption,
                exit,
                ready_by: (!ready).then_some(started + READY_WITHIN),
            });
        }
    }
    outcome
}

/// What the readiness probe of an adopted instance asks, for messages.
pub fn probe_target(address: SocketAddr, path: &str) -> String {
    if path.is_empty() {
        format!("TCP {address}")
    } else {
        format!("GET {address}{path}")
    }
}

/// Whether the instance at `address` passes its readiness probe (`path`, or TCP) before
/// `deadline`.
pub async fn ready_by(address: SocketAddr, path: &str, deadline: Instant) -> bool {
    let address = super::instance::probe_address(address);
    loop {
        let probe = readiness::probe(address, path);
        if let Ok(true) = tokio::time::timeout_at(deadline, probe).await {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep_until((now + PROBE_INTERVAL).min(deadline)).await;
    }
}

/// SIGKILL to a recorded process that is ours: the leader through its pidfd when there is
/// one, then its group. Called only once pid and start time matched (or the pidfd pins it).
fn reap(record: &ProcessRecord, exit: Option<&ExitWatch>) {
    if let Some(exit) = exit {
        exit.signal(Signal::KILL);
    }
    // The group id is the leader's pid: while the leader or any member lives, no new process
    // can be given that number, so the group is still the instance's.
    if records::group_alive(record.pgid) {
        records::kill_group(record.pgid, nix::sys::signal::Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A scripted `/proc`.
    #[derive(Default)]
    struct FakeProcs {
        stats: HashMap<u32, Stat>,
        cmdlines: HashMap<u32, Vec<String>>,
        uids: HashMap<u32, [u32; 4]>,
    }

    impl ProcessView for FakeProcs {
        fn stat(&self, pid: u32) -> Option<Stat> {
            self.stats.get(&pid).copied()
        }
        fn cmdline(&self, pid: u32) -> Option<Vec<String>> {
            self.cmdlines.get(&pid).cloned()
        }
        fn uids(&self, pid: u32) -> Option<[u32; 4]> {
            self.uids.get(&pid).copied()
        }
    }

    fn expect() -> Expectations {
        Expectations {
            boot_id: Some("boot-a".into()),
            uid: 1000,
            roots: vec![PathBuf::from("/opt/functions")],
        }
    }

    fn record() -> ProcessRecord {
        ProcessRecord {
            pid: 4242,
            pgid: 4242,
            start_time: 777,
            instance: "hello-abcdef".into(),
            function: "default/hello".into(),
            boot_id: Some("boot-a".into()),
            adoption: Some(Adoption {
                address: "127.0.0.1:9000".parse().unwrap(),
                cmdline: vec!["/opt/functions/hello".into(), "--x".into()],
                program: PathBuf::from("/opt/functions/hello"),
                spec_digest: "fnv1a64:0000000000000001".into(),
                readiness_path: "/healthz".into(),
                restarts: 0,
                started_unix_ms: 1,
                ready_unix_ms: 2,
            }),
        }
    }

    /// The process the record describes, as it runs.
    fn procs() -> FakeProcs {
        let mut procs = FakeProcs::default();
        procs.stats.insert(
            4242,
            Stat {
                state: 'S',
                pgid: 4242,
                start_time: 777,
            },
        );
        procs
            .cmdlines
            .insert(4242, vec!["/opt/functions/hello".into(), "--x".into()]);
        procs.uids.insert(4242, [1000; 4]);
        procs
    }

    fn reaped(verdict: Verdict, needle: &str) {
        match verdict {
            Verdict::Reap(reason) => assert!(reason.contains(needle), "{reason}"),
            other => panic!("expected a reap for {needle:?}, got {other:?}"),
        }
    }

    fn forgotten(verdict: Verdict, needle: &str) {
        match verdict {
            Verdict::Forget(reason) => assert!(reason.contains(needle), "{reason}"),
            other => panic!("expected to forget ({needle:?}), got {other:?}"),
        }
    }

    #[test]
    fn the_recorded_process_as_recorded_is_a_candidate() {
        assert_eq!(judge(&record(), &procs(), &expect()), Verdict::Candidate);
        // An unreadable boot id (here or in the record) does not block it.
        let mut unknown = expect();
        unknown.boot_id = None;
        assert_eq!(judge(&record(), &procs(), &unknown), Verdict::Candidate);
    }

    #[test]
    fn strangers_are_forgotten_never_reaped() {
        let mut other_boot = record();
        other_boot.boot_id = Some("boot-b".into());
        forgotten(judge(&other_boot, &procs(), &expect()), "another boot");

        let mut gone = procs();
        gone.stats.clear();
        forgotten(judge(&record(), &gone, &expect()), "gone");

        // The pid now names another process: whatever its command line, it is not ours.
        let mut reused = procs();
        reused.stats.get_mut(&4242).unwrap().start_time = 900;
        reused.cmdlines.insert(4242, vec!["/usr/sbin/sshd".into()]);
        forgotten(judge(&record(), &reused, &expect()), "another process");
    }

    #[test]
    fn ours_but_not_as_recorded_is_reaped() {
        let mut exited = procs();
        exited.stats.get_mut(&4242).unwrap().state = 'Z';
        reaped(judge(&record(), &exited, &expect()), "exited");

        let mut not_ready = record();
        not_ready.adoption = None;
        reaped(judge(&not_ready, &procs(), &expect()), "not ready");

        let mut regrouped = procs();
        regrouped.stats.get_mut(&4242).unwrap().pgid = 1;
        reaped(judge(&record(), &regrouped, &expect()), "process group");

        let mut other_command = procs();
        other_command
            .cmdlines
            .insert(4242, vec!["/opt/functions/other".into()]);
        reaped(judge(&record(), &other_command, &expect()), "command line");

        let mut other_user = procs();
        other_user.uids.insert(4242, [1000, 0, 1000, 1000]);
        reaped(judge(&record(), &other_user, &expect()), "uid 0");

        let mut moved_roots = expect();
        moved_roots.roots = vec![PathBuf::from("/srv/functions")];
        reaped(judge(&record(), &procs(), &moved_roots), "outside");

        let mut bad_key = record();
        bad_key.function = "no-slash".into();
        reaped(judge(&bad_key, &procs(), &expect()), "unknown function");
    }

    #[test]
    fn function_names_parse_back() {
        assert_eq!(
            parse_function("default/hello"),
            Some(FunctionKey::new("default", "hello"))
        );
        assert_eq!(parse_function("hello"), None);
        assert_eq!(parse_function("/hello"), None);
        assert_eq!(parse_function("a/b/c"), None);
    }

    #[tokio::test]
    async fn an_exit_watch_sees_a_process_that_is_not_its_child_exit() {
        // `sh` forks `sleep` and exits at once: the sleep is reparented, never our child.
        let output = std::process::Command::new("sh")
            .args(["-c", "sleep 30 >/dev/null 2>&1 & echo $!"])
            .output()
            .unwrap();
        let pid: u32 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap();
        let start = records::process_start_time(pid).unwrap();
        let watch = ExitWatch::open(pid, start).unwrap();
        assert!(watch.alive());
        let exited = tokio::time::timeout(Duration::from_millis(100), watch.exited()).await;
        assert!(exited.is_err(), "it runs");
        assert!(watch.signal(Signal::KILL));
        tokio::time::timeout(Duration::from_secs(5), watch.exited())
            .await
            .expect("the exit is seen");
        // Seen again at once, and the pidfd refuses to signal a dead process.
        tokio::time::timeout(Duration::from_millis(100), watch.exited())
            .await
            .unwrap();
        assert!(!watch.alive());
        assert!(matches!(ExitWatch::open(0, 0), Err(AdoptError::BadPid(0))));
    }
}
