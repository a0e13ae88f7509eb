//! One instance's task: spawns the process in its own process group, pumps its output into the
//! (rotated) log file and the log registry, probes readiness, waits for the drain gate, stops the group
//! (SIGTERM, grace, SIGKILL) and reports every step to the supervisor.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use meridian_proto::v1::ProcessRuntime;
use nix::sys::signal::Signal;
use tokio::io::BufReader;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, timeout_at, Instant};

use super::log_files::{prune_exited, RotatingLog, EXITED_LOG_FILES_KEPT, LOG_FILE_MAX_BYTES};
use super::logs::{split_lines, LogRegistry, OutputStream};
use super::records::{group_alive, group_has_live_members, kill_group, process_start_time};
use super::{readiness, DrainGate, FunctionKey, RuntimeConfig, INSTANCES_DIR, LOGS_DIR};
use crate::fs_modes;

/// Variables of the agent's own environment an instance inherits (before the spec's env and the
/// runtime's variables). Everything else is left out so the agent's settings (RUST_LOG, secrets
/// in its unit file) do not leak into functions. `HOME` is then set to the instance's working
/// directory, and `USER` to the `--run-as` user when there is one.
const INHERITED_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER"];
/// How long the output of an exited instance may still arrive (pipes hold what it wrote last).
const OUTPUT_DRAIN: Duration = Duration::from_millis(200);
/// How often a stopping group is checked for members left after its leader exited.
const GROUP_POLL: Duration = Duration::from_millis(20);
/// The longest wait for a SIGKILLed group's members to die.
const GROUP_REAP_WAIT: Duration = Duration::from_millis(500);
/// Lines buffered between the pipe readers and the log writer.
const LINE_BUFFER: usize = 1024;

/// What the supervisor wants from an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Directive {
    Run,
    /// Wait for the drain gate (bounded by the drain timeout), then stop.
    Drain,
    /// Stop now: SIGTERM, grace, SIGKILL.
    Stop,
}

#[derive(Debug)]
pub struct InstanceEvent {
    pub key: FunctionKey,
    pub id: String,
    pub kind: EventKind,
}

#[derive(Debug)]
pub enum EventKind {
    /// The process runs.
    Spawned { pid: u32, start_time: Option<u64> },
    /// The process could not be started; nothing runs.
    SpawnFailed { error: String },
    /// The readiness probe passed `cold_start` after the spawn.
    Ready { cold_start: Duration },
    /// The process group is gone (or was never started because a stop came first).
    Exited { exit: String },
}

pub struct InstanceTask {
    pub key: FunctionKey,
    pub id: String,
    /// What the process binds (`HOST`, `PORT`) and sidecars dial.
    pub address: SocketAddr,
    pub process: Arc<ProcessRuntime>,
    pub config: Arc<RuntimeConfig>,
    pub drain: Arc<dyn DrainGate>,
    pub logs: Arc<LogRegistry>,
    pub events: mpsc::UnboundedSender<InstanceEvent>,
    pub directive: watch::Receiver<Directive>,
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
        self.config
            .state_dir
            .join(LOGS_DIR)
            .join(&self.key.namespace)
            .join(&self.key.name)
            .join(format!("{}.log", self.id))
    }

    pub async fn run(mut self) {
        let work_dir = self.work_dir();
        let (mut child, log_file, spawned_at) = match self.spawn(&work_dir).await {
            Ok(Some(spawned)) => spawned,
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
        };
        // The leader of a new process group: its pid is the group id.
        let pid = child.id().unwrap_or(0);
        self.send(EventKind::Spawned {
            pid,
            start_time: process_start_time(pid),
        });
        tracing::info!(function = %self.key, instance = %self.id, pid, address = %self.address, "instance spawned");
        let output = self.pump_output(&mut child, log_file);

        let exit = self.supervise(&mut child, pid, spawned_at).await;
        // Whatever the group still holds goes now; the output it wrote last is read before
        // the exit is reported, so that status shows the last lines.
        kill_group(pid, Signal::SIGKILL);
        wait_group_gone(pid).await;
        output.finish().await;
        let _ = tokio::fs::remove_dir_all(&work_dir).await;
        tracing::info!(function = %self.key, instance = %self.id, %exit, "instance exited");
        self.send(EventKind::Exited { exit });
    }

    /// Starts the process; `Ok(None)` when told to stop before it started. The instant is taken
    /// just before the fork, so cold starts include the exec.
    async fn spawn(
        &self,
        work_dir: &PathBuf,
    ) -> Result<Option<(Child, RotatingLog, Instant)>, String> {
        if *self.directive.borrow() != Directive::Run {
            return Ok(None);
        }
        let state_dir = self.config.state_dir.clone();
        let (namespace, name) = (self.key.namespace.clone(), self.key.name.clone());
        let dir = work_dir.clone();
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
        let log_file = RotatingLog::open(log_path.clone(), LOG_FILE_MAX_BYTES)
            .await
            .map_err(|e| format!("cannot start: cannot open {}: {e}", log_path.display()))?;

        let process = &self.process;
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
            .env("PORT", self.address.port().to_string())
            .env("HOST", self.address.ip().to_string())
            .env("REGION", &self.config.region)
            .env("INSTANCE_ID", &self.id)
            .env("MERIDIAN_FUNCTION", self.key.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so that stopping it reaches whatever it forks; we kill the group
            // ourselves, including when this task is dropped (no kill_on_drop).
            .process_group(0)
            .kill_on_drop(false);
        let spawned_at = Instant::now();
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start: command \"{}\": {e}", process.command))?;
        Ok(Some((child, log_file, spawned_at)))
    }

    /// Runs until the process exits or is stopped; returns how it ended.
    async fn supervise(&mut self, child: &mut Child, pgid: u32, spawned_at: Instant) -> String {
        let probe_address = probe_address(self.address);
        let readiness_path = self.process.readiness_path.clone();
        let ready = readiness::wait_ready(probe_address, &readiness_path, spawned_at);
        tokio::pin!(ready);
        let mut is_ready = false;
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
            }
            tokio::select! {
                status = child.wait() => return describe(status),
                () = &mut ready, if !is_ready => {
                    is_ready = true;
                    self.send(EventKind::Ready { cold_start: spawned_at.elapsed() });
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
        terminate(child, pgid, self.config.stop_grace).await
    }

    /// Starts the pipe readers and the log writer.
    fn pump_output(&self, child: &mut Child, log_file: RotatingLog) -> OutputPump {
        let (lines_tx, mut lines_rx) = mpsc::channel::<(OutputStream, String)>(LINE_BUFFER);
        let mut readers = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            readers.push(spawn_reader(
                BufReader::new(stdout),
                OutputStream::Stdout,
                lines_tx.clone(),
            ));
        }
        if let Some(stderr) = child.stderr.take() {
            readers.push(spawn_reader(
                BufReader::new(stderr),
                OutputStream::Stderr,
                lines_tx,
            ));
        }
        let logs = Arc::clone(&self.logs);
        let key = self.key.clone();
        let id = self.id.clone();
        let path = self.log_path();
        let writer = tokio::spawn(async move {
            let mut file = log_file;
            let mut write_failed = false;
            while let Some((stream, line)) = lines_rx.recv().await {
                if !write_failed {
                    let result = async {
                        file.write_line(&line).await?;
                        // Flush when caught up: files stay current without a write per line
                        // under bursts.
                        if lines_rx.is_empty() {
                            file.flush().await?;
                        }
                        std::io::Result::Ok(())
                    }
                    .await;
                    if let Err(error) = result {
                        tracing::warn!(path = %path.display(), %error, "cannot write instance log; keeping lines in memory only");
                        write_failed = true;
                    }
                }
                logs.push(&key, &id, stream, line);
            }
            let _ = file.flush().await;
        });
        OutputPump { readers, writer }
    }
}

struct OutputPump {
    readers: Vec<JoinHandle<()>>,
    writer: JoinHandle<()>,
}

impl OutputPump {
    /// Waits briefly for the pipes to close; a process that escaped the group may hold them
    /// open forever, so the readers are abandoned after [`OUTPUT_DRAIN`].
    async fn finish(self) {
        let deadline = Instant::now() + OUTPUT_DRAIN;
        for mut reader in self.readers {
            if timeout_at(deadline, &mut reader).await.is_err() {
                reader.abort();
            }
        }
        // With the readers gone the channel closes and the writer flushes and ends.
        let _ = timeout(OUTPUT_DRAIN, self.writer).await;
    }
}

fn spawn_reader<R>(
    reader: R,
    stream: OutputStream,
    lines: mpsc::Sender<(OutputStream, String)>,
) -> JoinHandle<()>
where
    R: tokio::io::AsyncBufRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        split_lines(reader, |line| {
            let lines = lines.clone();
            async move {
                // The writer only ends after the readers; an error cannot happen in practice.
                let _ = lines.send((stream, line)).await;
            }
        })
        .await;
    })
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
async fn terminate(child: &mut Child, pgid: u32, grace: Duration) -> String {
    let deadline = Instant::now() + grace;
    kill_group(pgid, Signal::SIGTERM);
    let status = match timeout_at(deadline, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            kill_group(pgid, Signal::SIGKILL);
            child.wait().await
        }
    };
    // Members the leader forked got the SIGTERM too; they get the rest of the grace.
    while Instant::now() < deadline && group_running(pgid).await {
        sleep(GROUP_POLL).await;
    }
    describe(status)
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
fn probe_address(address: SocketAddr) -> SocketAddr {
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
