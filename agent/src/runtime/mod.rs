//! Runs the instances of `process` functions: spawn, readiness, restarts, drain, logs, and the
//! adoption of the instances a previous agent left running.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::Stream;
use meridian_proto::v1::{EndpointState, InstanceStatus, LogLine, ProcessRuntime};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

mod adopt;
mod instance;
mod log_files;
mod logs;
mod policy;
mod readiness;
mod records;
mod supervisor;
#[cfg(test)]
mod tests;

use crate::fs_modes;
pub use adopt::{ADOPTED_EXIT, READY_WITHIN as ADOPTION_READY_WITHIN};
use logs::LogRegistry;
pub use policy::{CommandPolicy, CommandRefused, PolicyError, RunAs};
use records::ProcessRecord;
pub use supervisor::ADOPTION_HOLD;
use supervisor::{Command, Inherited, Supervisor};

/// `<state-dir>/instances/<ns>/<name>/<id>`: each instance's working directory.
pub const INSTANCES_DIR: &str = "instances";
/// `<state-dir>/logs/<ns>/<name>/<id>.log`: each instance's output.
pub const LOGS_DIR: &str = "logs";

/// What the runtime needs from the agent's flags.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// `<state-dir>`: `instances.json`, `instances/` (working dirs) and `logs/` live here.
    pub state_dir: PathBuf,
    /// Which commands instances may run and as whom (`--allowed-command-root`, `--run-as`).
    pub policy: CommandPolicy,
    /// The address instances bind (`HOST`) and sidecars dial.
    pub instance_host: IpAddr,
    /// The agent's region (`REGION` for instances, `region` of log lines).
    pub region: String,
    /// Between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
    /// The longest a draining instance waits for the [`DrainGate`].
    pub drain_timeout: Duration,
    /// How long after the start adopted instances are kept whatever the desired count says
    /// ([`ADOPTION_HOLD`] in the agent).
    pub adoption_hold: Duration,
}

/// Identifies a function.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FunctionKey {
    pub namespace: String,
    pub name: String,
}

impl FunctionKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for FunctionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Everything the runtime runs, published on every change.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Increases by one with every published snapshot.
    pub version: u64,
    /// Functions that were `set` (and not yet fully removed), and functions still draining.
    pub functions: BTreeMap<FunctionKey, FunctionRuntime>,
    /// Functions of `functions` whose starts fail or wait out a restart backoff (absent: none
    /// of that), for sidecars to stop holding requests for a crash loop.
    pub crashes: BTreeMap<FunctionKey, CrashState>,
}

/// How a function's instances fail to come up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CrashState {
    /// Failed starts in a row: instances of the current spec that exited (or could not be
    /// spawned) before they became ready; 0 again once one is ready or the spec changes. An
    /// instance that dies after it was ready is no failed start (but see `restart_backoff`).
    pub failed_starts: u32,
    /// An instance is wanted but not started yet: the restart backoff after a crash (before or
    /// after ready, a kill by a signal included) has not run out.
    pub restart_backoff: bool,
}

/// The state of one function's instances.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FunctionRuntime {
    /// Live instances (starting, ready, draining), sorted by id.
    pub instances: Vec<InstanceInfo>,
    /// EWMA (alpha 0.3) of spawn → ready; `None` until one instance became ready.
    pub cold_start: Option<Duration>,
    /// Instances that became ready, ever.
    pub starts: u64,
    /// Unexpected exits since the runtime started the function.
    pub restarts: u32,
    /// e.g. "exit code 1", "killed by signal 9".
    pub last_exit: Option<String>,
    /// Last 10 lines of the last failed instance.
    pub last_log_lines: Vec<String>,
    /// "CrashLoopBackOff: exit code 1" / "cannot start: command \"x\": ...".
    pub error: Option<String>,
}

impl FunctionRuntime {
    fn count(&self, state: InstanceState) -> u32 {
        let count = self.instances.iter().filter(|i| i.state == state).count();
        u32::try_from(count).unwrap_or(u32::MAX)
    }

    pub fn ready(&self) -> u32 {
        self.count(InstanceState::Ready)
    }

    pub fn starting(&self) -> u32 {
        self.count(InstanceState::Starting)
    }

    pub fn draining(&self) -> u32 {
        self.count(InstanceState::Draining)
    }

    /// `cold_start` in whole ms for the wire (0 = unknown).
    pub fn cold_start_ms(&self) -> u32 {
        self.cold_start
            .map(|d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1))
            .unwrap_or(0)
    }
}

/// One live instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceInfo {
    /// `<function-name>-<6 hex>`; also the local tier endpoint id.
    pub id: String,
    pub address: SocketAddr,
    pub state: InstanceState,
    pub pid: u32,
    pub started: SystemTime,
    pub ready: Option<SystemTime>,
    /// Restarts of the slot this instance runs in (crashes before it).
    pub restarts: u32,
    /// Taken over from a previous agent: it started long before this agent, so its `ready`
    /// minus `started` is not a cold start.
    pub adopted: bool,
}

impl InstanceInfo {
    /// As reported in `RegionScale.instances`.
    pub fn to_status(&self) -> InstanceStatus {
        InstanceStatus {
            id: self.id.clone(),
            address: self.address.to_string(),
            state: self.state.to_proto() as i32,
            pid: self.pid,
            started_unix_ms: unix_ms(self.started),
            ready_unix_ms: self.ready.map(unix_ms).unwrap_or(0),
            restarts: self.restarts,
        }
    }
}

fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InstanceState {
    /// Spawned, not ready yet.
    Starting,
    Ready,
    /// Takes no new requests; stopped once the drain gate opens.
    Draining,
}

impl InstanceState {
    pub fn to_proto(self) -> EndpointState {
        match self {
            InstanceState::Starting => EndpointState::Starting,
            InstanceState::Ready => EndpointState::Ready,
            InstanceState::Draining => EndpointState::Draining,
        }
    }
}

/// The runtime asks this before stopping a draining instance; the integration implements it
/// from sidecar load reports. The returned future resolves when no sidecar can still send to
/// `instance_id`. The runtime bounds the wait with `RuntimeConfig::drain_timeout`.
///
/// It is called right after the instance turns DRAINING, possibly before the snapshot saying so
/// has reached the overlay: an implementation must not take "not served as DRAINING yet" for
/// drained. Instances that were never READY in a snapshot are stopped without asking.
pub trait DrainGate: Send + Sync + 'static {
    fn drained(&self, instance_id: &str) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// A gate that is always open: for tests and for callers without sidecars.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoDrainGate;

impl DrainGate for NoDrainGate {
    fn drained(&self, _instance_id: &str) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(std::future::ready(()))
    }
}

/// The stream `Runtime::logs` returns.
pub type LogStream = Pin<Box<dyn Stream<Item = LogLine> + Send + 'static>>;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot create {path} (or give it its mode)")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("function {0} has no instances (current or exited in the last 10 minutes)")]
    UnknownFunction(String),
    #[error("function {function} has no instance {instance}")]
    UnknownInstance { function: String, instance: String },
    #[error("cannot record the running instances")]
    Records(#[from] records::RecordsError),
    #[error("the task reading the previous agent's records failed")]
    RecordsTask(#[source] tokio::task::JoinError),
    #[error("the state directory task failed")]
    StateDirTask(#[source] tokio::task::JoinError),
}

/// A cheap handle on the supervisor.
#[derive(Clone)]
pub struct Runtime {
    commands: mpsc::UnboundedSender<Command>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    logs: Arc<LogRegistry>,
    /// Ends after the supervisor has stopped everything and the final records are written.
    recorder: Arc<Mutex<Option<JoinHandle<()>>>>,
    config: Arc<RuntimeConfig>,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Adopts what a previous agent recorded and left running (see `adopt`: the instances whose
    /// pid, start time and command line match, READY if they answer their readiness probe within
    /// half a second, STARTING and probed on for up to 3 s if not; it reaps what is ours but not
    /// as recorded, and never signals a process that is not ours), then starts the supervisor
    /// with them booked. Returns only then, so that nothing can ask for instances before the
    /// adopted ones count.
    pub async fn start(
        config: RuntimeConfig,
        drain: Arc<dyn DrainGate>,
    ) -> Result<Runtime, RuntimeError> {
        let state_dir = config.state_dir.clone();
        tokio::task::spawn_blocking(move || prepare_state_dir(&state_dir))
            .await
            .map_err(RuntimeError::StateDirTask)??;
        let path = records::records_path(&config.state_dir);
        let read_path = path.clone();
        let previous = tokio::task::spawn_blocking(move || records::read(&read_path))
            .await
            .map_err(RuntimeError::RecordsTask)?;
        let previous = match previous {
            Ok(previous) => previous,
            // The agent must still start; the instances (if any) are reported, not fatal.
            Err(error) => {
                tracing::warn!(
                    error = %crate::error_chain(&error),
                    "cannot read the previous agent's process records; adopting and reaping nothing"
                );
                Vec::new()
            }
        };
        let boot_id = records::boot_id();
        let expect = adopt::Expectations {
            boot_id: boot_id.clone(),
            uid: config
                .policy
                .run_as()
                .map_or_else(|| nix::unistd::geteuid().as_raw(), |user| user.uid()),
            roots: config.policy.allowed_roots().to_vec(),
        };
        let take_over = adopt::take_over(previous, &expect).await;
        report_take_over(&take_over);
        let adopted = take_over.adopted;
        // What runs now, before anything else happens: a crash right after must not forget the
        // adopted instances, nor remember the reaped ones.
        let now_running: Vec<ProcessRecord> = adopted.iter().map(|a| a.record.clone()).collect();
        let write_path = path.clone();
        tokio::task::spawn_blocking(move || records::write(&write_path, &now_running))
            .await
            .map_err(RuntimeError::RecordsTask)??;

        let config = Arc::new(config);
        let logs = Arc::new(LogRegistry::new(config.region.clone()));
        for instance in &adopted {
            logs.register_function(&instance.key);
        }
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (snapshot_tx, snapshot) = watch::channel(Arc::new(Snapshot::default()));
        let (records_tx, records_rx) = watch::channel(Arc::new(Vec::new()));
        let supervisor = Supervisor::new(
            Arc::clone(&config),
            drain,
            Arc::clone(&logs),
            commands_rx,
            snapshot_tx,
            records_tx,
            Inherited { boot_id, adopted },
        );
        tokio::spawn(supervisor.run());
        let recorder = tokio::spawn(record_processes(path, records_rx));
        Ok(Runtime {
            commands,
            snapshot,
            logs,
            recorder: Arc::new(Mutex::new(Some(recorder))),
            config,
        })
    }

    /// Sets what a function should run: its process spec and the instance count. Idempotent.
    /// A changed `ProcessRuntime` replaces instances (start new, then drain old).
    pub fn set(&self, key: FunctionKey, process: ProcessRuntime, desired: u32) {
        self.logs.register_function(&key);
        // After shutdown nothing runs any more; the command is dropped on purpose.
        let _ = self.commands.send(Command::Set {
            key,
            process,
            desired,
        });
    }

    /// Drains and stops every instance of a function no longer in the table.
    pub fn remove(&self, key: &FunctionKey) {
        let _ = self.commands.send(Command::Remove { key: key.clone() });
    }

    /// Which commands instances may run and as whom: what the agent can announce.
    pub fn policy(&self) -> &CommandPolicy {
        &self.config.policy
    }

    /// Changes of any instance (spawned, ready, draining, exited, restarted, error).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.clone()
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snapshot.borrow())
    }

    /// Log lines of a function's instances (current and exited within the last 10 minutes):
    /// the last `tail` lines of each (at most the 1000 kept in memory), then, if `follow`, new
    /// lines as written, also of instances started later. A follow stream ends only when the
    /// caller drops it.
    pub fn logs(
        &self,
        key: &FunctionKey,
        instance: Option<String>,
        tail: usize,
        follow: bool,
    ) -> Result<LogStream, RuntimeError> {
        self.logs
            .stream(key, instance, tail, follow, tokio::time::Instant::now())
    }

    /// Drains nothing: SIGTERM to all, grace, SIGKILL; for agent shutdown. Returns once every
    /// instance is gone and `instances.json` says so. Later `set` calls are ignored.
    pub async fn shutdown(&self) {
        self.stop(false).await;
    }

    /// For an agent that stops with `--keep-instances-on-exit`: leaves every READY instance
    /// running, recorded in `instances.json` for the next agent to adopt, and stops the others
    /// (starting or draining ones) as [`Runtime::shutdown`] does. Later `set` calls are
    /// ignored.
    pub async fn release(&self) {
        self.stop(true).await;
    }

    async fn stop(&self, keep: bool) {
        let (done, done_rx) = oneshot::channel();
        if self.commands.send(Command::Shutdown { done, keep }).is_ok() {
            // An error means the supervisor already finished a shutdown.
            let _ = done_rx.await;
        }
        let recorder = self
            .recorder
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(recorder) = recorder {
            let _ = recorder.await;
        }
    }
}

/// Says in the log what became of every record of the previous agent.
fn report_take_over(take_over: &adopt::TakeOver) {
    for (record, reason) in &take_over.reaped {
        tracing::warn!(
            pid = record.pid,
            instance = %record.instance,
            function = %record.function,
            "killed an instance left running by a previous agent: {reason}"
        );
    }
    for (record, reason) in &take_over.forgotten {
        tracing::info!(
            pid = record.pid,
            instance = %record.instance,
            function = %record.function,
            "forgot a recorded instance without signalling it: {reason}"
        );
    }
    if !take_over.adopted.is_empty() || !take_over.reaped.is_empty() {
        tracing::info!(
            adopted = take_over.adopted.len(),
            reaped = take_over.reaped.len(),
            forgotten = take_over.forgotten.len(),
            "took over the previous agent's instances"
        );
    }
}

/// The state directory and its `logs/` and `instances/` with their modes (see `fs_modes`):
/// instances, which may run as another user, can reach their working directories and nothing
/// else.
fn prepare_state_dir(state_dir: &Path) -> Result<(), RuntimeError> {
    let dirs = [
        (state_dir.to_path_buf(), fs_modes::STATE_DIR_MODE),
        (state_dir.join(LOGS_DIR), fs_modes::LOGS_DIR_MODE),
        (state_dir.join(INSTANCES_DIR), fs_modes::INSTANCES_DIR_MODE),
    ];
    for (path, mode) in dirs {
        fs_modes::ensure_dir(&path, mode)
            .map_err(|source| RuntimeError::CreateDir { path, source })?;
    }
    Ok(())
}

/// Writes `instances.json` whenever the supervisor's list changes, off the async threads; the
/// last list is written once more after the supervisor drops its sender.
async fn record_processes(path: PathBuf, mut records: watch::Receiver<Arc<Vec<ProcessRecord>>>) {
    let mut written: Option<Arc<Vec<ProcessRecord>>> = None;
    loop {
        let changed = records.changed().await;
        let latest = Arc::clone(&records.borrow_and_update());
        if written.as_ref().is_none_or(|w| !Arc::ptr_eq(w, &latest)) {
            let target = path.clone();
            let list = Arc::clone(&latest);
            match tokio::task::spawn_blocking(move || records::write(&target, &list)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(
                    error = %crate::error_chain(&error),
                    "cannot record the running instances"
                ),
                Err(error) => tracing::warn!(%error, "cannot record the running instances"),
            }
            written = Some(latest);
        }
        if changed.is_err() {
            break;
        }
    }
}
