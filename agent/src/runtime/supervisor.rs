//! The supervisor: one task that owns every function's instances. It turns `set`/`remove` into
//! spawns and drains, restarts crashed instances with backoff, and publishes a [`Snapshot`] and
//! the process records after every change. It never waits on a process or a file itself: each
//! instance has its own task (see `instance`), and the records are written by another.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meridian_proto::v1::ProcessRuntime;
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep_until, Instant};

use super::instance::{Directive, EventKind, InstanceEvent, InstanceTask};
use super::logs::LogRegistry;
use super::records::{kill_group, ProcessRecord};
use super::{
    CrashState, DrainGate, FunctionKey, FunctionRuntime, InstanceInfo, InstanceState,
    RuntimeConfig, Snapshot,
};

/// First restart delay after a failure; doubles per consecutive failure up to [`BACKOFF_CAP`].
pub const BACKOFF_BASE: Duration = Duration::from_millis(200);
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// An instance ready at least this long before it exits resets the backoff.
pub const BACKOFF_RESET_AFTER_READY: Duration = Duration::from_secs(10);
/// Failures before becoming ready, in a row, that make the function "CrashLoopBackOff".
pub const CRASH_LOOP_FAILURES: u32 = 3;
/// Lines of a failed instance kept in the status.
pub const LAST_LOG_LINES: usize = 10;
/// Weight of the newest cold start in the EWMA.
pub const COLD_START_ALPHA: f64 = 0.3;
/// On shutdown, how long past the stop grace the supervisor waits for instance tasks before it
/// SIGKILLs what is left itself.
const SHUTDOWN_SLACK: Duration = Duration::from_secs(5);

pub enum Command {
    Set {
        key: FunctionKey,
        process: ProcessRuntime,
        desired: u32,
    },
    Remove {
        key: FunctionKey,
    },
    Shutdown {
        done: oneshot::Sender<()>,
    },
}

/// The delay before the next start after `attempt` failures in a row (0: the first failure).
pub fn backoff_delay(attempt: u32) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX);
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_CAP)
}

/// EWMA of cold starts: the first sample as is, then `alpha * sample + (1 - alpha) * old`.
pub fn ewma(previous: Option<Duration>, sample: Duration) -> Duration {
    match previous {
        None => sample,
        Some(previous) => Duration::from_secs_f64(
            COLD_START_ALPHA * sample.as_secs_f64()
                + (1.0 - COLD_START_ALPHA) * previous.as_secs_f64(),
        ),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Starting,
    Ready,
    Draining,
}

struct Instance {
    spec_generation: u64,
    address: SocketAddr,
    phase: Phase,
    /// `None` until the task reports the spawn.
    pid: Option<u32>,
    start_time: Option<u64>,
    started: SystemTime,
    ready: Option<SystemTime>,
    ready_since: Option<Instant>,
    /// Whether sidecars may have seen it READY (then stopping it waits for the drain gate).
    published_ready: bool,
    restarts: u32,
    directive: watch::Sender<Directive>,
}

#[derive(Default)]
struct Function {
    /// `None` once removed: everything drains, then the function is forgotten.
    spec: Option<Arc<ProcessRuntime>>,
    /// Increases with every change of the spec; instances of older generations are replaced.
    spec_generation: u64,
    desired: u32,
    instances: BTreeMap<String, Instance>,
    /// Restart counts of crashed slots waiting for their replacement.
    pending_restarts: Vec<u32>,
    backoff_attempt: u32,
    /// No start before this (backoff after a failure).
    not_before: Option<Instant>,
    /// Failures (exit or spawn error) before becoming ready, in a row.
    consecutive_failures: u32,
    /// As of the last reconcile, for the snapshot.
    crash: CrashState,
    status: FunctionRuntime,
}

impl Function {
    fn is_current(&self, instance: &Instance) -> bool {
        self.spec.is_some() && instance.spec_generation == self.spec_generation
    }

    fn record_failure(&mut self, restarts: u32, current_generation: bool, now: Instant) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.not_before = Some(now + backoff_delay(self.backoff_attempt));
        self.backoff_attempt = self.backoff_attempt.saturating_add(1);
        if current_generation && self.spec.is_some() {
            self.pending_restarts.push(restarts.saturating_add(1));
        }
    }
}

pub struct Supervisor {
    config: Arc<RuntimeConfig>,
    drain: Arc<dyn DrainGate>,
    logs: Arc<LogRegistry>,
    commands: mpsc::UnboundedReceiver<Command>,
    events_tx: mpsc::UnboundedSender<InstanceEvent>,
    events: mpsc::UnboundedReceiver<InstanceEvent>,
    functions: BTreeMap<FunctionKey, Function>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    records: watch::Sender<Arc<Vec<ProcessRecord>>>,
    shutdown_waiters: Vec<oneshot::Sender<()>>,
    shutdown_deadline: Option<Instant>,
}

impl Supervisor {
    pub fn new(
        config: Arc<RuntimeConfig>,
        drain: Arc<dyn DrainGate>,
        logs: Arc<LogRegistry>,
        commands: mpsc::UnboundedReceiver<Command>,
        snapshot: watch::Sender<Arc<Snapshot>>,
        records: watch::Sender<Arc<Vec<ProcessRecord>>>,
    ) -> Self {
        let (events_tx, events) = mpsc::unbounded_channel();
        Self {
            config,
            drain,
            logs,
            commands,
            events_tx,
            events,
            functions: BTreeMap::new(),
            snapshot,
            records,
            shutdown_waiters: Vec::new(),
            shutdown_deadline: None,
        }
    }

    pub async fn run(mut self) {
        loop {
            let now = Instant::now();
            let wake = self.reconcile(now);
            self.publish();
            if let Some(deadline) = self.shutdown_deadline {
                if self.instance_count() == 0 {
                    break;
                }
                if now >= deadline {
                    self.kill_remaining();
                    break;
                }
            }
            let wake = match (wake, self.shutdown_deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                // The supervisor holds a sender itself, so this never yields None.
                Some(event) = self.events.recv() => self.handle_event(event),
                command = self.commands.recv(), if self.shutdown_deadline.is_none() => match command {
                    Some(command) => self.handle_command(command),
                    // Every handle is gone: nobody can stop the instances later.
                    None => self.begin_shutdown(None),
                },
                () = sleep_until(wake.unwrap_or(now)), if wake.is_some() => {}
            }
        }
        self.publish();
        // Dropping the records sender lets the recorder write the final (empty) list and end;
        // `Runtime::shutdown` waits for that.
        drop(self.records);
        for waiter in self.shutdown_waiters {
            let _ = waiter.send(());
        }
    }

    fn instance_count(&self) -> usize {
        self.functions.values().map(|f| f.instances.len()).sum()
    }

    fn handle_command(&mut self, command: Command) {
        match command {
            Command::Set {
                key,
                process,
                desired,
            } => {
                let function = self.functions.entry(key).or_default();
                if function.spec.as_deref() != Some(&process) {
                    // A new spec deserves a fresh start: no inherited backoff or error.
                    function.spec = Some(Arc::new(process));
                    function.spec_generation += 1;
                    function.pending_restarts.clear();
                    function.backoff_attempt = 0;
                    function.not_before = None;
                    function.consecutive_failures = 0;
                    function.status.error = None;
                }
                function.desired = desired;
            }
            Command::Remove { key } => {
                if let Some(function) = self.functions.get_mut(&key) {
                    function.spec = None;
                    function.desired = 0;
                    function.pending_restarts.clear();
                }
            }
            Command::Shutdown { done } => self.begin_shutdown(Some(done)),
        }
    }

    fn begin_shutdown(&mut self, done: Option<oneshot::Sender<()>>) {
        self.shutdown_waiters.extend(done);
        self.shutdown_deadline = Some(Instant::now() + self.config.stop_grace + SHUTDOWN_SLACK);
        for function in self.functions.values_mut() {
            function.spec = None;
            function.pending_restarts.clear();
            for instance in function.instances.values_mut() {
                instance.phase = Phase::Draining;
                instance.directive.send_replace(Directive::Stop);
            }
        }
    }

    /// Last resort when instance tasks did not report in time.
    fn kill_remaining(&mut self) {
        for (key, function) in &mut self.functions {
            for (id, instance) in std::mem::take(&mut function.instances) {
                tracing::warn!(function = %key, instance = %id, "instance did not stop in time; killing its group");
                if let Some(pid) = instance.pid {
                    kill_group(pid, Signal::SIGKILL);
                }
            }
        }
    }

    fn handle_event(&mut self, event: InstanceEvent) {
        let now = Instant::now();
        let Some(function) = self.functions.get_mut(&event.key) else {
            return;
        };
        match event.kind {
            EventKind::Spawned { pid, start_time } => {
                if let Some(instance) = function.instances.get_mut(&event.id) {
                    instance.pid = Some(pid);
                    instance.start_time = start_time;
                }
            }
            EventKind::SpawnFailed { error } => {
                let Some(instance) = function.instances.remove(&event.id) else {
                    return;
                };
                self.logs.mark_exited(&event.key, &event.id, now);
                if instance.phase == Phase::Draining {
                    return;
                }
                tracing::warn!(function = %event.key, %error, "instance failed to start");
                let current = function.is_current(&instance);
                function.status.error = Some(error);
                function.record_failure(instance.restarts, current, now);
            }
            EventKind::Ready { cold_start } => {
                let Some(instance) = function.instances.get_mut(&event.id) else {
                    return;
                };
                function.status.cold_start = Some(ewma(function.status.cold_start, cold_start));
                function.status.starts += 1;
                if instance.phase != Phase::Starting {
                    // Told to stop before it got ready: sidecars never see it READY.
                    return;
                }
                tracing::info!(function = %event.key, instance = %event.id, cold_start_ms = cold_start.as_millis(), "instance ready");
                instance.phase = Phase::Ready;
                instance.ready = Some(SystemTime::now());
                instance.ready_since = Some(now);
                instance.published_ready = true;
                // An instance of the replaced spec says nothing about the current one.
                if instance.spec_generation == function.spec_generation {
                    function.consecutive_failures = 0;
                    function.status.error = None;
                }
            }
            EventKind::Exited { exit } => {
                let Some(instance) = function.instances.remove(&event.id) else {
                    return;
                };
                let last_lines = self.logs.last_lines(&event.key, &event.id, LAST_LOG_LINES);
                self.logs.mark_exited(&event.key, &event.id, now);
                if instance.phase == Phase::Draining {
                    return;
                }
                tracing::warn!(function = %event.key, instance = %event.id, %exit, "instance exited unexpectedly");
                let current = function.is_current(&instance);
                function.status.restarts = function.status.restarts.saturating_add(1);
                function.status.last_log_lines = last_lines;
                match instance.ready_since {
                    Some(since) => {
                        if now.saturating_duration_since(since) >= BACKOFF_RESET_AFTER_READY {
                            function.backoff_attempt = 0;
                        }
                        // It got ready: not a failure towards CrashLoopBackOff, but still
                        // restarted with backoff.
                        function.not_before = Some(now + backoff_delay(function.backoff_attempt));
                        function.backoff_attempt = function.backoff_attempt.saturating_add(1);
                        if current {
                            function
                                .pending_restarts
                                .push(instance.restarts.saturating_add(1));
                        }
                    }
                    None => {
                        function.record_failure(instance.restarts, current, now);
                        if function.consecutive_failures >= CRASH_LOOP_FAILURES {
                            function.status.error = Some(format!("CrashLoopBackOff: {exit}"));
                        }
                    }
                }
                function.status.last_exit = Some(exit);
            }
        }
    }

    /// Brings every function towards what was asked; returns when to look again (backoff).
    fn reconcile(&mut self, now: Instant) -> Option<Instant> {
        let mut wake: Option<Instant> = None;
        let keys: Vec<FunctionKey> = self.functions.keys().cloned().collect();
        for key in keys {
            if let Some(at) = self.reconcile_function(&key, now) {
                wake = Some(wake.map_or(at, |w| w.min(at)));
            }
        }
        // Removed functions are forgotten once their last instance is gone.
        self.functions
            .retain(|_, f| f.spec.is_some() || !f.instances.is_empty());
        wake
    }

    fn reconcile_function(&mut self, key: &FunctionKey, now: Instant) -> Option<Instant> {
        if self.shutdown_deadline.is_some() {
            return None;
        }
        let function = self.functions.get_mut(key)?;
        let want = if function.spec.is_some() {
            usize::try_from(function.desired).unwrap_or(usize::MAX)
        } else {
            0
        };

        // Current-spec instances taking (or about to take) requests, the ones to give up
        // first at the front: not ready before ready, newest before oldest.
        let mut current: Vec<(String, bool, SystemTime)> = function
            .instances
            .iter()
            .filter(|(_, i)| i.phase != Phase::Draining && function.is_current(i))
            .map(|(id, i)| (id.clone(), i.phase == Phase::Ready, i.started))
            .collect();
        current.sort_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2)));
        let excess = current.len().saturating_sub(want);
        let surplus_restarts = (current.len() + function.pending_restarts.len())
            .saturating_sub(want)
            .min(function.pending_restarts.len());
        let keep_restarts = function.pending_restarts.len() - surplus_restarts;
        function.pending_restarts.truncate(keep_restarts);
        for (id, _, _) in current.iter().take(excess) {
            begin_drain(key, id, function);
        }
        let running = current.len() - excess;
        let ready_current = current
            .iter()
            .skip(excess)
            .filter(|(_, ready, _)| *ready)
            .count();

        // Older-spec instances serve until enough current ones are ready.
        let mut old: Vec<(String, bool, SystemTime)> = function
            .instances
            .iter()
            .filter(|(_, i)| i.phase != Phase::Draining && !function.is_current(i))
            .map(|(id, i)| (id.clone(), i.phase == Phase::Ready, i.started))
            .collect();
        // Keep ready ones, oldest first.
        old.sort_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)));
        let keep_old = want.saturating_sub(ready_current);
        for (id, _, _) in old.iter().skip(keep_old) {
            begin_drain(key, id, function);
        }

        let missing = want.saturating_sub(running);
        function.crash = CrashState {
            failed_starts: function.consecutive_failures,
            restart_backoff: missing > 0 && function.not_before.is_some_and(|at| at > now),
        };
        if missing == 0 {
            return None;
        }
        if let Some(not_before) = function.not_before {
            if not_before > now {
                return Some(not_before);
            }
        }
        // Crashed slots first (they keep their restart count), then new ones.
        let from_pending = missing.min(function.pending_restarts.len());
        let mut restart_counts: Vec<u32> =
            function.pending_restarts.drain(..from_pending).collect();
        restart_counts.resize(missing, 0);
        for restarts in restart_counts {
            self.spawn_instance(key, restarts, now);
        }
        None
    }

    fn spawn_instance(&mut self, key: &FunctionKey, restarts: u32, now: Instant) {
        let host = self.config.instance_host;
        let id = self.new_instance_id(key);
        let Some(function) = self.functions.get_mut(key) else {
            return;
        };
        let Some(process) = function.spec.clone() else {
            return;
        };
        // The port is free now; another process may take it before the instance binds it.
        // Binding here and handing the socket over would close that race, but instances are
        // ordinary programs that bind `PORT` themselves.
        let port = match std::net::TcpListener::bind((host, 0)).and_then(|l| l.local_addr()) {
            Ok(address) => address.port(),
            Err(error) => {
                function.status.error =
                    Some(format!("cannot start: no free port on {host}: {error}"));
                function.record_failure(restarts, true, now);
                return;
            }
        };
        let address = SocketAddr::new(host, port);
        let (directive, directive_rx) = watch::channel(Directive::Run);
        function.instances.insert(
            id.clone(),
            Instance {
                spec_generation: function.spec_generation,
                address,
                phase: Phase::Starting,
                pid: None,
                start_time: None,
                started: SystemTime::now(),
                ready: None,
                ready_since: None,
                published_ready: false,
                restarts,
                directive,
            },
        );
        self.logs.register_instance(key, &id);
        let task = InstanceTask {
            key: key.clone(),
            id,
            address,
            process,
            config: Arc::clone(&self.config),
            drain: Arc::clone(&self.drain),
            logs: Arc::clone(&self.logs),
            events: self.events_tx.clone(),
            directive: directive_rx,
        };
        tokio::spawn(task.run());
    }

    /// `<function-name>-<6 lowercase hex>`, not used by any live or recent instance.
    fn new_instance_id(&self, key: &FunctionKey) -> String {
        loop {
            let id = format!("{}-{:06x}", key.name, rand::random::<u32>() & 0x00ff_ffff);
            let live = self
                .functions
                .values()
                .any(|f| f.instances.contains_key(&id));
            if !live && !self.logs.knows_instance(&id) {
                return id;
            }
        }
    }

    fn publish(&mut self) {
        let functions: BTreeMap<FunctionKey, FunctionRuntime> = self
            .functions
            .iter()
            .map(|(key, function)| {
                let mut status = function.status.clone();
                status.instances = function
                    .instances
                    .iter()
                    .filter_map(|(id, instance)| {
                        Some(InstanceInfo {
                            id: id.clone(),
                            address: instance.address,
                            state: match instance.phase {
                                Phase::Starting => InstanceState::Starting,
                                Phase::Ready => InstanceState::Ready,
                                Phase::Draining => InstanceState::Draining,
                            },
                            pid: instance.pid?,
                            started: instance.started,
                            ready: instance.ready,
                            restarts: instance.restarts,
                        })
                    })
                    .collect();
                (key.clone(), status)
            })
            .collect();
        let crashes: BTreeMap<FunctionKey, CrashState> = self
            .functions
            .iter()
            .filter(|(_, function)| function.crash != CrashState::default())
            .map(|(key, function)| (key.clone(), function.crash))
            .collect();
        self.snapshot.send_if_modified(|snapshot| {
            if snapshot.functions == functions && snapshot.crashes == crashes {
                return false;
            }
            *snapshot = Arc::new(Snapshot {
                version: snapshot.version + 1,
                functions,
                crashes,
            });
            true
        });

        let records: Vec<ProcessRecord> = self
            .functions
            .iter()
            .flat_map(|(key, function)| {
                function.instances.iter().filter_map(move |(id, instance)| {
                    Some(ProcessRecord {
                        pid: instance.pid?,
                        pgid: instance.pid?,
                        start_time: instance.start_time?,
                        instance: id.clone(),
                        function: key.to_string(),
                    })
                })
            })
            .collect();
        self.records.send_if_modified(|current| {
            if **current == records {
                return false;
            }
            *current = Arc::new(records);
            true
        });
    }
}

/// Takes an instance out of service: one sidecars may have seen READY waits for the drain gate,
/// any other stops at once (no sidecar routes to a STARTING instance).
fn begin_drain(key: &FunctionKey, id: &str, function: &mut Function) {
    let Some(instance) = function.instances.get_mut(id) else {
        return;
    };
    instance.phase = Phase::Draining;
    let directive = if instance.published_ready {
        Directive::Drain
    } else {
        Directive::Stop
    };
    tracing::info!(function = %key, instance = %id, ?directive, "instance draining");
    instance.directive.send_replace(directive);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_200ms_to_a_30s_cap() {
        let delays: Vec<u128> = (0..10).map(|a| backoff_delay(a).as_millis()).collect();
        assert_eq!(
            delays,
            vec![200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]
        );
        assert_eq!(backoff_delay(u32::MAX), BACKOFF_CAP);
    }

    #[test]
    fn cold_start_ewma_takes_the_first_sample_as_is() {
        let first = ewma(None, Duration::from_millis(100));
        assert_eq!(first, Duration::from_millis(100));
        let second = ewma(Some(first), Duration::from_millis(200));
        assert_eq!(second.as_millis(), 130);
    }
}
