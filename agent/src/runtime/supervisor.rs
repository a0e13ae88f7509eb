//! The supervisor: one task that owns every function's instances. It turns `set`/`remove` into
//! spawns and drains, restarts crashed instances with backoff, and publishes a [`Snapshot`] and
//! the process records after every change. It never waits on a process or a file itself: each
//! instance has its own task (see `instance`), and the records are written by another.
//!
//! It starts with the instances adopted from a previous agent (see `adopt`) already booked as
//! READY, before it takes any command, so that the first `set` counts them instead of starting
//! new ones. An adopted instance is current once a `set` names the spec it was recorded with
//! (by digest); until then, and for [`ADOPTION_HOLD`] after the start, it is not stopped for a
//! missing or lower desired count.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meridian_proto::v1::ProcessRuntime;
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep_until, Instant};

use super::adopt::Adopted;
use super::instance::{Directive, EventKind, InstanceEvent, InstanceTask, Start};
use super::logs::LogRegistry;
use super::records::{kill_group, spec_digest, Adoption, ProcessRecord};
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
/// For this long after the agent's start, adopted instances are kept whatever the desired count
/// says: their function may not be `set` yet (the first table is on its way), and the
/// autoscaler starts without load history, so its first decisions would scale down instances
/// that are busy. A `remove` drains them at once; after the hold, they are counted like any
/// other (an adopted function never `set` is drained as removed).
pub const ADOPTION_HOLD: Duration = Duration::from_secs(10);

pub enum Command {
    Set {
        key: FunctionKey,
        process: ProcessRuntime,
        desired: u32,
    },
    Remove {
        key: FunctionKey,
    },
    /// Stops everything; with `keep`, READY instances are left running (and recorded) for the
    /// next agent to adopt instead.
    Shutdown {
        done: oneshot::Sender<()>,
        keep: bool,
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
    /// The canonical program run (from the spawn, or the record of an adopted instance).
    program: Option<PathBuf>,
    /// `/proc/<pid>/cmdline` when it became ready.
    cmdline: Option<Vec<String>>,
    /// `records::spec_digest` of the spec it runs.
    spec_digest: String,
    readiness_path: String,
    /// Taken over from a previous agent.
    adopted: bool,
}

impl Instance {
    /// What the next agent needs to adopt it: only while READY (a starting or draining instance
    /// is reaped by the next agent) and once its command line is known.
    fn adoption(&self) -> Option<Adoption> {
        if self.phase != Phase::Ready {
            return None;
        }
        Some(Adoption {
            address: self.address,
            cmdline: self.cmdline.clone()?,
            program: self.program.clone()?,
            spec_digest: self.spec_digest.clone(),
            readiness_path: self.readiness_path.clone(),
            restarts: self.restarts,
            started_unix_ms: unix_ms(self.started),
            ready_unix_ms: unix_ms(self.ready?),
        })
    }
}

fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn from_unix_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
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
    /// Until then, adopted instances are not stopped for a missing or lower desired count
    /// ([`ADOPTION_HOLD`]); cleared by a `remove`.
    adoption_hold: Option<Instant>,
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

/// What a supervisor starts from, besides its channels.
pub struct Inherited {
    /// This boot's id, for the records.
    pub boot_id: Option<String>,
    /// The instances taken over from the previous agent.
    pub adopted: Vec<Adopted>,
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
    /// This boot's id, in every record.
    boot_id: Option<String>,
    /// Records of instances detached on a keeping shutdown: still running, for the next agent.
    kept: Vec<ProcessRecord>,
}

impl Supervisor {
    pub fn new(
        config: Arc<RuntimeConfig>,
        drain: Arc<dyn DrainGate>,
        logs: Arc<LogRegistry>,
        commands: mpsc::UnboundedReceiver<Command>,
        snapshot: watch::Sender<Arc<Snapshot>>,
        records: watch::Sender<Arc<Vec<ProcessRecord>>>,
        inherited: Inherited,
    ) -> Self {
        let Inherited { boot_id, adopted } = inherited;
        let (events_tx, events) = mpsc::unbounded_channel();
        let mut supervisor = Self {
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
            boot_id,
            kept: Vec::new(),
        };
        let now = Instant::now();
        for instance in adopted {
            supervisor.adopt(instance, now);
        }
        // Published before anything reads the runtime: the first snapshot the overlay serves
        // and the autoscaler counts already holds the adopted instances.
        supervisor.publish();
        supervisor
    }

    /// Books an adopted instance as READY under its recorded id and starts its task. Must run
    /// inside the tokio runtime.
    fn adopt(&mut self, adopted: Adopted, now: Instant) {
        let Adopted {
            key,
            record,
            adoption,
            exit,
            ready_by,
        } = adopted;
        let started = from_unix_ms(adoption.started_unix_ms);
        let ready = from_unix_ms(adoption.ready_unix_ms);
        let ready_for = SystemTime::now().duration_since(ready).unwrap_or_default();
        let function = self.functions.entry(key.clone()).or_default();
        function.adoption_hold = Some(now + self.config.adoption_hold);
        // The cold start the previous agent measured, so the overlay keeps telling sidecars.
        if let Ok(cold_start) = ready.duration_since(started) {
            function.status.cold_start = Some(ewma(function.status.cold_start, cold_start));
        }
        let is_ready = ready_by.is_none();
        let ready_by =
            ready_by.map(|deadline| (adoption.address, adoption.readiness_path.clone(), deadline));
        let (directive, directive_rx) = watch::channel(Directive::Run);
        function.instances.insert(
            record.instance.clone(),
            Instance {
                // Not current until a `set` names the spec it runs.
                spec_generation: 0,
                address: adoption.address,
                // Not answering yet: STARTING, so that sidecars stop sending to it.
                phase: if is_ready {
                    Phase::Ready
                } else {
                    Phase::Starting
                },
                pid: Some(record.pid),
                start_time: Some(record.start_time),
                started,
                ready: is_ready.then_some(ready),
                ready_since: is_ready.then(|| now.checked_sub(ready_for).unwrap_or(now)),
                // Sidecars have been sending to it all along (while it answered).
                published_ready: is_ready,
                restarts: adoption.restarts,
                directive,
                program: Some(adoption.program),
                cmdline: Some(adoption.cmdline),
                spec_digest: adoption.spec_digest,
                readiness_path: adoption.readiness_path,
                adopted: true,
            },
        );
        self.logs.register_instance(&key, &record.instance);
        if is_ready {
            tracing::info!(function = %key, instance = %record.instance, pid = record.pid, address = %adoption.address, "adopted an instance left running by the previous agent");
        } else {
            tracing::info!(function = %key, instance = %record.instance, pid = record.pid, address = %adoption.address, "adopted an instance left running by the previous agent; not ready yet, probing it on");
        }
        let task = InstanceTask {
            key,
            id: record.instance,
            config: Arc::clone(&self.config),
            drain: Arc::clone(&self.drain),
            logs: Arc::clone(&self.logs),
            events: self.events_tx.clone(),
            directive: directive_rx,
        };
        tokio::spawn(task.run(Start::Adopt {
            pgid: record.pgid,
            exit,
            ready_by,
        }));
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
                    None => self.begin_shutdown(None, false),
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
                    let digest = spec_digest(&process);
                    function.spec = Some(Arc::new(process));
                    function.spec_generation += 1;
                    // Adopted instances recorded with this very spec run it: they are current.
                    let generation = function.spec_generation;
                    for instance in function.instances.values_mut() {
                        if instance.adopted
                            && instance.phase != Phase::Draining
                            && instance.spec_digest == digest
                        {
                            instance.spec_generation = generation;
                        }
                    }
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
                    function.adoption_hold = None;
                }
            }
            Command::Shutdown { done, keep } => self.begin_shutdown(Some(done), keep),
        }
    }

    fn begin_shutdown(&mut self, done: Option<oneshot::Sender<()>>, keep: bool) {
        self.shutdown_waiters.extend(done);
        self.shutdown_deadline = Some(Instant::now() + self.config.stop_grace + SHUTDOWN_SLACK);
        for function in self.functions.values_mut() {
            function.spec = None;
            function.pending_restarts.clear();
            for instance in function.instances.values_mut() {
                let adoptable = instance.adoption().is_some()
                    && instance.pid.is_some()
                    && instance.start_time.is_some();
                if keep && adoptable {
                    instance.directive.send_replace(Directive::Detach);
                } else {
                    instance.phase = Phase::Draining;
                    instance.directive.send_replace(Directive::Stop);
                }
            }
        }
    }

    /// Last resort when instance tasks did not report in time; instances being detached are
    /// left running and recorded.
    fn kill_remaining(&mut self) {
        for (key, function) in &mut self.functions {
            for (id, instance) in std::mem::take(&mut function.instances) {
                if *instance.directive.borrow() == Directive::Detach {
                    self.kept
                        .extend(record_of(key, &id, &instance, &self.boot_id));
                    continue;
                }
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
            EventKind::Spawned {
                pid,
                start_time,
                program,
            } => {
                if let Some(instance) = function.instances.get_mut(&event.id) {
                    instance.pid = Some(pid);
                    instance.start_time = start_time;
                    instance.program = Some(program);
                }
            }
            EventKind::Reaped { reason } => {
                // Not a crash: it was the previous agent's, never READY here. A missing instance
                // is started as usual.
                if function.instances.remove(&event.id).is_some() {
                    self.logs.mark_exited(&event.key, &event.id, now);
                    function.status.last_exit = Some(format!("killed after adoption: {reason}"));
                }
            }
            EventKind::Detached => {
                if let Some(instance) = function.instances.remove(&event.id) {
                    self.kept
                        .extend(record_of(&event.key, &event.id, &instance, &self.boot_id));
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
            EventKind::Ready {
                cold_start,
                cmdline,
            } => {
                let Some(instance) = function.instances.get_mut(&event.id) else {
                    return;
                };
                if cmdline.is_some() {
                    instance.cmdline = cmdline;
                }
                if let Some(cold_start) = cold_start {
                    function.status.cold_start = Some(ewma(function.status.cold_start, cold_start));
                    function.status.starts += 1;
                }
                if instance.phase != Phase::Starting {
                    // Told to stop before it got ready: sidecars never see it READY.
                    return;
                }
                tracing::info!(function = %event.key, instance = %event.id, cold_start_ms = cold_start.map(|c| c.as_millis()), "instance ready");
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
        let hold = function.adoption_hold.filter(|until| *until > now);
        if hold.is_none() {
            function.adoption_hold = None;
        }
        if function.spec.is_none() {
            if let Some(until) = hold {
                // Adopted, not `set` yet: nothing is decided about it before the hold ends.
                return Some(until);
            }
        }
        let mut want = if function.spec.is_some() {
            usize::try_from(function.desired).unwrap_or(usize::MAX)
        } else {
            0
        };
        if hold.is_some() {
            let adopted = function
                .instances
                .values()
                .filter(|i| i.adopted && i.phase != Phase::Draining && function.is_current(i))
                .count();
            want = want.max(adopted);
        }
        let wake = self.reconcile_count(key, want, now);
        match (wake, hold) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Brings a function towards `want` current-spec instances: drains the excess and the
    /// old-spec ones no longer needed, starts what is missing; returns when to look again
    /// (backoff).
    fn reconcile_count(&mut self, key: &FunctionKey, want: usize, now: Instant) -> Option<Instant> {
        let function = self.functions.get_mut(key)?;
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
                program: None,
                cmdline: None,
                spec_digest: spec_digest(&process),
                readiness_path: process.readiness_path.clone(),
                adopted: false,
            },
        );
        self.logs.register_instance(key, &id);
        let task = InstanceTask {
            key: key.clone(),
            id,
            config: Arc::clone(&self.config),
            drain: Arc::clone(&self.drain),
            logs: Arc::clone(&self.logs),
            events: self.events_tx.clone(),
            directive: directive_rx,
        };
        tokio::spawn(task.run(Start::Spawn { address, process }));
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
                            adopted: instance.adopted,
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

        let boot_id = &self.boot_id;
        let mut records: Vec<ProcessRecord> = self
            .functions
            .iter()
            .flat_map(|(key, function)| {
                function
                    .instances
                    .iter()
                    .filter_map(move |(id, instance)| record_of(key, id, instance, boot_id))
            })
            .collect();
        records.extend(self.kept.iter().cloned());
        self.records.send_if_modified(|current| {
            if **current == records {
                return false;
            }
            *current = Arc::new(records);
            true
        });
    }
}

/// The record of a spawned (or adopted) instance: its process, and while READY what the next
/// agent needs to adopt it.
fn record_of(
    key: &FunctionKey,
    id: &str,
    instance: &Instance,
    boot_id: &Option<String>,
) -> Option<ProcessRecord> {
    Some(ProcessRecord {
        pid: instance.pid?,
        pgid: instance.pid?,
        start_time: instance.start_time?,
        instance: id.to_owned(),
        function: key.to_string(),
        boot_id: boot_id.clone(),
        adoption: instance.adoption(),
    })
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
