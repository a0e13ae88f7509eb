//! One instance's task: spawns the process in its own process group with its log file as its
//! stdout and stderr (or takes over one a previous agent left running, see `adopt`), tails that
//! file into the log registry, probes readiness, waits for the drain gate, stops the group
//! (SIGTERM, grace, SIGKILL) and reports every step to the supervisor. Told to detach (the agent
//! stops with `--keep-instances-on-exit`), it leaves the process running for the next agent.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use meridian_proto::v1::ProcessRuntime;
use nix::sys::signal::Signal;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, timeout_at, Instant};

use super::adopt::{self, ExitWatch, ADOPTED_EXIT};
use super::log_files::{
    open_for_instance, prune_exited, LogTail, EXITED_LOG_FILES_KEPT, LOG_FILE_MAX_BYTES,
    TAIL_POLL_MAX, TAIL_POLL_MIN,
};
use super::logs::{LogRegistry, OutputStream, RING_BYTES};
use super::records::{
    group_alive, group_has_live_members, kill_group, process_start_time, read_cmdline, read_stat,
};
use super::{readiness, DrainGate, FunctionKey, RuntimeConfig, INSTANCES_DIR, LOGS_DIR};
use crate::fs_modes;

/// Variables of the agent's own environment an instance inherits (before the spec's env and the
/// runtime's variables). Everything else is left out so the agent's settings (RUST_LOG, secrets
/// in its unit file) do not leak into functions. `HOME` is then set to the instance's working
/// directory, and `USER` to the `--run-as` user when there is one.
const INHERITED_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER"];
/// How often a stopping group is checked for members left after its leader exited.
const GROUP_POLL: Duration = Duration::from_millis(20);
/// The longest wait for a SIGKILLed group's members to die.
const GROUP_REAP_WAIT: Duration = Duration::from_millis(500);
/// The longest wait for the log tail's last read once the instance is gone.
const TAIL_FINISH_WAIT: Duration = Duration::from_secs(2);
/// The longest wait, when an instance gets ready, for the log tail to have read what it wrote
/// so far (so that the Logs API shows its start-up lines once it is READY).
const TAIL_CATCH_UP_WAIT: Duration = Duration::from_millis(200);

/// What the supervisor wants from an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Directive {
    Run,
    /// Wait for the drain gate (bounded by the drain timeout), then stop.
    Drain,
    /// Stop now: SIGTERM, grace, SIGKILL.
    Stop,
    /// Stop watching and leave the process running (the agent exits, the next one adopts it).
    Detach,
}

#[derive(Debug)]
pub struct InstanceEvent {
    pub key: FunctionKey,
    pub id: String,
    pub kind: EventKind,
}

#[derive(Debug)]
pub enum EventKind {
    /// The process runs `program` (the canonical path executed).
    Spawned {
        pid: u32,
        start_time: Option<u64>,
        program: PathBuf,
    },
    /// The process could not be started; nothing runs.
    SpawnFailed { error: String },
    /// The readiness probe passed `cold_start` after the spawn (`None` for an adopted instance:
    /// not a cold start); `cmdline` is what `/proc/<pid>/cmdline` said then (what an adopting
    /// agent compares).
    Ready {
        cold_start: Option<Duration>,
        cmdline: Option<Vec<String>>,
    },
    /// The process group is gone (or was never started because a stop came first).
    Exited { exit: String },
    /// An adopted instance that did not pass its readiness probe in time: killed, with why.
    Reaped { reason: String },
    /// Left running on [`Directive::Detach`]; its working directory and log stay.
    Detached,
}

/// How an instance task begins.
pub enum Start {
    /// Spawns `process`, bound to `address`.
    Spawn {
        address: SocketAddr,
        process: Arc<ProcessRuntime>,
    },
    /// Takes over a running process, its group `pgid`: READY already, or to pass its readiness
    /// probe (`address`, path) by the instant given.
    Adopt {
        pgid: u32,
        exit: ExitWatch,
        ready_by: Option<(SocketAddr, String, Instant)>,
    },
}

/// Whether and how an instance task probes readiness.
enum Readiness {
    /// Adopted READY.
    Ready,
    /// Spawned at the instant given: probed until it passes.
    Spawned(Instant, SocketAddr, String),
    /// Adopted, not ready yet: probed until the deadline, then reaped.
    Adopting(SocketAddr, String, Instant),
}

pub struct InstanceTask {
    pub key: FunctionKey,
    pub id: String,
    pub config: Arc<RuntimeConfig>,
    pub drain: Arc<dyn DrainGate>,
    pub logs: Arc<LogRegistry>,
    pub events: mpsc::UnboundedSender<InstanceEvent>,
    pub directive: watch::Receiver<Directive>,
}

/// The process an instance task watches.
enum Running {
    /// Spawned by this agent: `waitpid` tells the exit and its code.
    Child(Child),
    /// Adopted: not our child; its pidfd tells the exit, not the code.
    Adopted(ExitWatch),
}

impl Running {
    /// How it ended, once it has. Cancel safe.
    async fn wait(&mut self) -> String {
        match self {
            Running::Child(child) => describe(child.wait().await),
            Running::Adopted(exit) => {
                exit.exited().await;
                ADOPTED_EXIT.to_owned()
            }
        }
    }

    /// Signals the instance's group, once it is sure the group is still the instance's.
    async fn signal_group(&self, pgid: u32, signal: Signal) {
        match self {
            Running::Child(_) => {
                kill_group(pgid, signal);
            }
            Running::Adopted(exit) => {
                if exit.alive() {
                    // The leader runs under its recorded pid, which is the group's id: unless it
                    // moved to another group, the group is the instance's.
                    if read_stat(exit.pid()).is_some_and(|stat| stat.pgid == pgid) {
                        kill_group(pgid, signal);
                    } else {
                        exit.signal(rustix_signal(signal));
                    }
                } else if group_running(pgid).await {
                    // Leader gone, members left: no new process can be given the group's id
                    // while the group has members, so it is still the instance's.
                    kill_group(pgid, signal);
                }
            }
        }
    }
}

fn rustix_signal(signal: Signal) -> rustix::process::Signal {
    if signal == Signal::SIGTERM {
        rustix::process::Signal::TERM
    } else {
        rustix::process::Signal::KILL
    }
}

/// How supervising ended.
enum Outcome {
    Exited(String),
    Detached,
    /// Adopted, and not ready by its deadline: why.
    Unready(String),
}

impl InstanceTask {
    fn send(&self, kind: EventKind) {
        // The supervisor only goes away after every instance has reported its exit.
        let _ = self.events.send(InstanceEvent {
            key: self.key.clone(),
            id: self.id.clone(),
            kind,
        });
    }

    fn work_dir(&self) -> PathBuf {
        self.config
            .state_dir
            .join(INSTANCES_DIR)
            .join(&self.key.namespace)
            .join(&self.key.name)
            .join(&self.id)
    }

    fn log_path(&self) -> PathBuf {
        log_path(&self.config.state_dir, &self.key, &self.id)
    }

    pub async fn run(mut self, start: Start) {
        let work_dir = self.work_dir();
        let (mut running, pgid, started, readiness) = match start {
            Start::Spawn { address, process } => {
                match self.spawn(&work_dir, address, &process).await {
                    Ok(Some((child, spawned_at, program, log_start))) => {
                        // The leader of a new process group: its pid is the group id.
                        let pid = child.id().unwrap_or(0);
                        self.send(EventKind::Spawned {
                            pid,
                            start_time: process_start_time(pid),
                            program,
                        });
                        tracing::info!(function = %self.key, instance = %self.id, pid, %address, "instance spawned");
                        let readiness =
                            Readiness::Spawned(spawned_at, address, process.readiness_path.clone());
                        (Running::Child(child), pid, Some(log_start), readiness)
                    }
                    Ok(None) => {
                        self.send(EventKind::Exited {
                            exit: "stopped before start".into(),
                        });
                        return;
                    }
                    Err(error) => {
                        self.send(EventKind::SpawnFailed { error });
                        let _ = tokio::fs::remove_dir_all(&work_dir).await;
                        return;
                    }
                }
            }
            Start::Adopt {
                pgid,
                exit,
                ready_by,
            } => {
                let readiness = match ready_by {
                    None => Readiness::Ready,
                    Some((address, path, deadline)) => Readiness::Adopting(address, path, deadline),
                };
                (Running::Adopted(exit), pgid, None, readiness)
            }
        };
        // A spawned instance's lines from where its file was when it started; an adopted one's
        // from its recent lines, written before and while no agent ran.
        let tail_from = match started {
            Some(log_start) => TailFrom::Offset(log_start),
            None => TailFrom::Backlog(RING_BYTES as u64),
        };
        let tail = self.start_tail(tail_from).await;
        let outcome = self
            .supervise(&mut running, pgid, readiness, tail.as_ref())
            .await;
        match outcome {
            Outcome::Unready(reason) => {
                running.signal_group(pgid, Signal::SIGKILL).await;
                let _ = timeout(GROUP_REAP_WAIT, running.wait()).await;
                wait_group_gone(pgid).await;
                if let Some(tail) = tail {
                    tail.finish(true).await;
                }
                let _ = tokio::fs::remove_dir_all(&work_dir).await;
                tracing::warn!(function = %self.key, instance = %self.id, pid = pgid, "killed an instance left running by a previous agent: {reason}");
                self.send(EventKind::Reaped { reason });
            }
            Outcome::Detached => {
                if let Some(tail) = tail {
                    tail.finish(false).await;
                }
                tracing::info!(function = %self.key, instance = %self.id, pid = pgid, "instance left running for the next agent");
                self.send(EventKind::Detached);
            }
            Outcome::Exited(exit) => {
                // Whatever the group still holds goes now; the output it wrote last is read
                // before the exit is reported, so that status shows the last lines.
                running.signal_group(pgid, Signal::SIGKILL).await;
                wait_group_gone(pgid).await;
                if let Some(tail) = tail {
                    tail.finish(true).await;
                }
                let _ = tokio::fs::remove_dir_all(&work_dir).await;
                tracing::info!(function = %self.key, instance = %self.id, %exit, "instance exited");
                self.send(EventKind::Exited { exit });
            }
        }
    }

    /// Starts the process; `Ok(None)` when told to stop before it started. Returns the child,
    /// the instant taken just before the fork (cold starts include the exec), the program run
    /// and where its log file ended before it started.
    async fn spawn(
        &self,
        work_dir: &Path,
        address: SocketAddr,
        process: &ProcessRuntime,
    ) -> Result<Option<(Child, Instant, PathBuf, u64)>, String> {
        if *self.directive.borrow() != Directive::Run {
            return Ok(None);
        }
        let state_dir = self.config.state_dir.clone();
        let (namespace, name) = (self.key.namespace.clone(), self.key.name.clone());
        let dir = work_dir.to_path_buf();
        let owner = self.config.policy.run_as().map(|u| (u.uid(), u.gid()));
        tokio::task::spawn_blocking(move || {
            prepare_dirs(&state_dir, &namespace, &name, &dir, owner)
        })
        .await
        .map_err(|e| format!("cannot start: {e}"))?
        .map_err(|e| format!("cannot start: {e}"))?;
        let log_path = self.log_path();
        if let Some(dir) = log_path.parent() {
            let live = self.logs.live_instances(&self.key);
            match prune_exited(dir, &live, EXITED_LOG_FILES_KEPT).await {
                Ok(0) => {}
                Ok(removed) => {
                    tracing::debug!(function = %self.key, removed, "removed old instance logs")
                }
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "cannot prune old instance logs")
                }
            }
        }
        let open_path = log_path.clone();
        let (log_file, log_start) = tokio::task::spawn_blocking(move || {
            let file = open_for_instance(&open_path)?;
            let len = file.metadata()?.len();
            std::io::Result::Ok((file, len))
        })
        .await
        .map_err(|e| format!("cannot start: {e}"))?
        .map_err(|e| format!("cannot start: cannot open {}: {e}", log_path.display()))?;
        let log_copy = log_file
            .try_clone()
            .map_err(|e| format!("cannot start: cannot open {}: {e}", log_path.display()))?;

        // Resolved at every attempt, so a binary the operator installs later is picked up; the
        // canonical path is what runs, so a symlink swapped after the check changes nothing.
        let program = self
            .config
            .policy
            .resolve(&process.command)
            .map_err(|e| format!("cannot start: command \"{}\": {e}", process.command))?;
        let mut command = Command::new(&program);
        command
            // argv[0] as the spec wrote it: multi-call binaries dispatch on it.
            .arg0(&process.command)
            .args(&process.args)
            .current_dir(work_dir)
            .env_clear();
        for name in INHERITED_ENV {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        // The instance's home is its own working directory, never the agent's.
        command.env("HOME", work_dir);
        if let Some(user) = self.config.policy.run_as() {
            // std's uid() drops the supplementary groups (setgroups(0)) before setuid, in the
            // child between fork and exec; the agent's no_new_privs keeps setuid binaries from
            // regaining root.
            command
                .uid(user.uid())
                .gid(user.gid())
                .env("USER", user.name());
        }
        command
            .envs(&process.env)
            .env("PORT", address.port().to_string())
            .env("HOST", address.ip().to_string())
            .env("REGION", &self.config.region)
            .env("INSTANCE_ID", &self.id)
            .env("MERIDIAN_FUNCTION", self.key.to_string())
            .stdin(Stdio::null())
            // The log file itself, O_APPEND: the instance needs nothing of the agent's to keep
            // writing, so it outlives the agent with its output. The agent's copies close when
            // `command` is dropped below.
            .stdout(Stdio::from(log_file))
            .stderr(Stdio::from(log_copy))
            // Its own group, so that stopping it reaches whatever it forks and a signal to the
            // agent's group (Ctrl-C, kill -9 of the agent) does not; we kill the group
            // ourselves, including when this task is dropped (no kill_on_drop). No parent-death
            // signal either: an instance survives its agent until the next one adopts it.
            .process_group(0)
            .kill_on_drop(false);
        let spawned_at = Instant::now();
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start: command \"{}\": {e}", process.command))?;
        Ok(Some((child, spawned_at, program, log_start)))
    }

    /// Runs until the process exits, is stopped, detached or (adopted) found unready; returns
    /// how it ended.
    async fn supervise(
        &mut self,
        running: &mut Running,
        pgid: u32,
        readiness: Readiness,
        tail: Option<&TailHandle>,
    ) -> Outcome {
        let mut is_ready = matches!(readiness, Readiness::Ready);
        let spawned_at = match &readiness {
            Readiness::Spawned(at, _, _) => Some(*at),
            _ => None,
        };
        let ready = async {
            match readiness {
                Readiness::Spawned(spawned_at, address, path) => {
                    readiness::wait_ready(probe_address(address), &path, spawned_at).await;
                    Ok(())
                }
                Readiness::Adopting(address, path, deadline) => {
                    if adopt::ready_by(address, &path, deadline).await {
                        Ok(())
                    } else {
                        Err(format!(
                            "not ready within {:?} of the agent's start ({})",
                            adopt::READY_WITHIN,
                            adopt::probe_target(address, &path)
                        ))
                    }
                }
                Readiness::Ready => std::future::pending().await,
            }
        };
        tokio::pin!(ready);
        let drain = Arc::clone(&self.drain);
        let drain_timeout = self.config.drain_timeout;
        let id = self.id.clone();
        let mut drain_wait = None;
        // A directive sent before this task first looked counts too.
        let mut directive = *self.directive.borrow_and_update();
        loop {
            match directive {
                Directive::Run => {}
                Directive::Drain => {
                    if drain_wait.is_none() {
                        drain_wait = Some(Box::pin(timeout(drain_timeout, drain.drained(&id))));
                    }
                }
                Directive::Stop => break,
                Directive::Detach => return Outcome::Detached,
            }
            tokio::select! {
                exit = running.wait() => return Outcome::Exited(exit),
                passed = &mut ready, if !is_ready => {
                    if let Err(reason) = passed {
                        return Outcome::Unready(reason);
                    }
                    is_ready = true;
                    let cold_start = spawned_at.map(|at| at.elapsed());
                    // By now a wrapper has exec'd what it runs: that is what is recorded.
                    let cmdline = read_cmdline(pgid);
                    if let Some(tail) = tail {
                        tail.catch_up().await;
                    }
                    self.send(EventKind::Ready { cold_start, cmdline });
                }
                changed = self.directive.changed() => {
                    directive = match changed {
                        Ok(()) => *self.directive.borrow_and_update(),
                        // The supervisor is gone: nobody will ever tell us to stop.
                        Err(_) => Directive::Stop,
                    };
                }
                _ = async {
                    match drain_wait.as_mut() {
                        Some(wait) => wait.await,
                        None => std::future::pending().await,
                    }
                } => {
                    tracing::debug!(function = %self.key, instance = %self.id, "drained");
                    break;
                }
            }
        }
        Outcome::Exited(terminate(running, pgid, self.config.stop_grace).await)
    }

    /// Starts following the log file into the registry; `None` (and a warning) if it cannot be
    /// opened: the instance runs on, its lines reach the file but not the Logs API.
    async fn start_tail(&self, from: TailFrom) -> Option<TailHandle> {
        let path = self.log_path();
        let opened = tokio::task::spawn_blocking(move || match from {
            TailFrom::Offset(offset) => LogTail::open_at(path, LOG_FILE_MAX_BYTES, offset),
            TailFrom::Backlog(bytes) => LogTail::open_recent(path, LOG_FILE_MAX_BYTES, bytes),
        })
        .await;
        let tail = match opened {
            Ok(Ok(tail)) => tail,
            Ok(Err(error)) => {
                tracing::warn!(function = %self.key, instance = %self.id, %error, "cannot follow the instance's log file; its lines reach the file only");
                return None;
            }
            Err(error) => {
                tracing::warn!(function = %self.key, instance = %self.id, %error, "cannot follow the instance's log file");
                return None;
            }
        };
        let (stop, stopped) = oneshot::channel();
        let (catch_up, catch_up_rx) = mpsc::channel(4);
        let task = tokio::spawn(follow(
            tail,
            Arc::clone(&self.logs),
            self.key.clone(),
            self.id.clone(),
            stopped,
            catch_up_rx,
        ));
        Some(TailHandle {
            stop,
            catch_up,
            task,
        })
    }
}

/// `<state-dir>/logs/<ns>/<name>/<id>.log`.
pub fn log_path(state_dir: &Path, key: &FunctionKey, id: &str) -> PathBuf {
    state_dir
        .join(LOGS_DIR)
        .join(&key.namespace)
        .join(&key.name)
        .join(format!("{id}.log"))
}

/// Where a tail starts.
#[derive(Clone, Copy, Debug)]
enum TailFrom {
    Offset(u64),
    Backlog(u64),
}

/// A running [`follow`] task.
struct TailHandle {
    /// `true`: also emit a last line without a newline (the instance is gone).
    stop: oneshot::Sender<bool>,
    /// Asks for a read now; answered once it is done.
    catch_up: mpsc::Sender<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl TailHandle {
    /// Returns once the tail has read the file as it is now (bounded by
    /// [`TAIL_CATCH_UP_WAIT`]).
    async fn catch_up(&self) {
        let (done, read) = oneshot::channel();
        if self.catch_up.try_send(done).is_ok() {
            let _ = timeout(TAIL_CATCH_UP_WAIT, read).await;
        }
    }

    /// Reads what is left and ends the task (bounded by [`TAIL_FINISH_WAIT`]).
    async fn finish(self, last_line: bool) {
        let _ = self.stop.send(last_line);
        let mut task = self.task;
        if timeout(TAIL_FINISH_WAIT, &mut task).await.is_err() {
            task.abort();
        }
    }
}

/// Reads the log file as it grows (soon again after it read something, backing off while it is
/// quiet, or at once when asked to catch up), pushing its lines into the registry, until told to
/// stop; then reads once more.
async fn follow(
    mut tail: LogTail,
    logs: Arc<LogRegistry>,
    key: FunctionKey,
    id: String,
    mut stop: oneshot::Receiver<bool>,
    mut catch_up: mpsc::Receiver<oneshot::Sender<()>>,
) {
    let mut interval = TAIL_POLL_MIN;
    let mut failing = false;
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    loop {
        let (returned, read) = read_once(tail).await;
        let Some(returned) = returned else { return };
        tail = returned;
        match read {
            Ok(lines) => {
                failing = false;
                interval = if lines.is_empty() {
                    (interval * 2).min(TAIL_POLL_MAX)
                } else {
                    TAIL_POLL_MIN
                };
                for line in lines {
                    logs.push(&key, &id, OutputStream::Output, line);
                }
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(function = %key, instance = %id, path = %tail.path().display(), %error, "cannot read or rotate the instance's log file");
                }
                failing = true;
                interval = TAIL_POLL_MAX;
            }
        }
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
        tokio::select! {
            last_line = &mut stop => {
                let (returned, read) = read_once(tail).await;
                let Some(mut tail) = returned else { return };
                for line in read.unwrap_or_default() {
                    logs.push(&key, &id, OutputStream::Output, line);
                }
                if last_line.unwrap_or(true) {
                    if let Some(line) = tail.finish() {
                        logs.push(&key, &id, OutputStream::Output, line);
                    }
                }
                return;
            }
            Some(done) = catch_up.recv() => {
                waiting.push(done);
                interval = TAIL_POLL_MIN;
            }
            () = sleep(interval) => {}
        }
    }
}

/// One [`LogTail::poll`] off the async threads; `None` if that task panicked.
async fn read_once(mut tail: LogTail) -> (Option<LogTail>, std::io::Result<Vec<String>>) {
    match tokio::task::spawn_blocking(move || {
        let read = tail.poll();
        (tail, read)
    })
    .await
    {
        Ok((tail, read)) => (Some(tail), read),
        Err(error) => (None, Err(std::io::Error::other(error))),
    }
}

/// The directories an instance needs, with their modes (see `fs_modes`): `instances/<ns>/<name>`
/// traversable, the working directory `work_dir` private to `owner` (the `--run-as` user, or
/// the agent when `None`), and `logs/<ns>/<name>` the agent's alone.
fn prepare_dirs(
    state_dir: &Path,
    namespace: &str,
    name: &str,
    work_dir: &Path,
    owner: Option<(u32, u32)>,
) -> Result<(), String> {
    fn created(dir: &Path) -> impl FnOnce(std::io::Error) -> String + '_ {
        move |e| format!("cannot create {}: {e}", dir.display())
    }
    let instances = state_dir.join(INSTANCES_DIR);
    fs_modes::ensure_dir_chain(&instances, &[namespace, name], fs_modes::INSTANCES_DIR_MODE)
        .map_err(created(&instances))?;
    fs_modes::make_work_dir(work_dir, owner).map_err(created(work_dir))?;
    let logs = state_dir.join(LOGS_DIR);
    fs_modes::ensure_dir_chain(&logs, &[namespace, name], fs_modes::LOGS_DIR_MODE)
        .map_err(created(&logs))?;
    Ok(())
}

/// SIGTERM to the group; SIGKILL when the grace is over (the leader, then any member left).
async fn terminate(running: &mut Running, pgid: u32, grace: Duration) -> String {
    let deadline = Instant::now() + grace;
    running.signal_group(pgid, Signal::SIGTERM).await;
    let status = match timeout_at(deadline, running.wait()).await {
        Ok(status) => status,
        Err(_) => {
            running.signal_group(pgid, Signal::SIGKILL).await;
            running.wait().await
        }
    };
    // Members the leader forked got the SIGTERM too; they get the rest of the grace.
    while Instant::now() < deadline && group_running(pgid).await {
        sleep(GROUP_POLL).await;
    }
    status
}

/// Waits (briefly) until the killed group's members are reaped, so that "exited" means gone.
/// Zombies waiting for init to reap them do not count.
async fn wait_group_gone(pgid: u32) {
    let deadline = Instant::now() + GROUP_REAP_WAIT;
    while group_running(pgid).await && Instant::now() < deadline {
        sleep(GROUP_POLL).await;
    }
}

/// Whether the group has a member that is not a zombie (a `/proc` scan, off the async threads).
async fn group_running(pgid: u32) -> bool {
    if !group_alive(pgid) {
        return false;
    }
    tokio::task::spawn_blocking(move || group_has_live_members(pgid))
        .await
        .unwrap_or(true)
}

/// "exit code 1", "killed by signal 9".
pub fn describe(status: std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            (None, None) => "exited".into(),
        },
        Err(error) => format!("cannot wait for the process: {error}"),
    }
}

/// An instance bound to the wildcard address is probed on loopback.
pub fn probe_address(address: SocketAddr) -> SocketAddr {
    match address.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), address.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), address.port())
        }
        _ => address,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_described_like_the_status_shows_them() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(describe(Ok(ExitStatus::from_raw(1 << 8))), "exit code 1");
        assert_eq!(describe(Ok(ExitStatus::from_raw(9))), "killed by signal 9");
    }

    #[test]
    fn wildcard_addresses_are_probed_on_loopback() {
        let wildcard: SocketAddr = "0.0.0.0:80".parse().unwrap();
        assert_eq!(probe_address(wildcard), "127.0.0.1:80".parse().unwrap());
        let v6: SocketAddr = "[::]:80".parse().unwrap();
        assert_eq!(probe_address(v6), "[::1]:80".parse().unwrap());
        let host: SocketAddr = "127.0.2.1:80".parse().unwrap();
        assert_eq!(probe_address(host), host);
    }
}
