//! The region's autoscaler: one KPA-style [`Autoscaler`] per function (a stable and a panic
//! window over per-second concurrency, scale to zero after idle, activation from held requests),
//! and the [`Scaler`] loop that feeds it the sidecars' load and sets the runtime's instance
//! counts from the routing table's bounds.
//!
//! A function that stays in the table but is no longer placed in this region is kept running
//! for the region grace after a (re)connection to the control plane: a control plane that has
//! just recovered may not have seen this agent yet, and its first tables are not evidence that
//! the region should stop serving (Kuma's zones deleting resources after a disconnect). A
//! function deleted from the table is removed at once.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meridian_proto::v1::{
    local_workload, FunctionScale, ProcessRuntime, RegionScale, RoutingTable, ScaleBounds,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};

use crate::load::{LoadBook, Observation};
use crate::local_api::CurrentTable;
use crate::runtime::{FunctionKey, FunctionRuntime, Runtime, Snapshot};

/// Default length of the stable window (`--stable-window-secs`).
pub const DEFAULT_STABLE_WINDOW: Duration = Duration::from_secs(60);
/// Default length of the panic window (`--panic-window-secs`).
pub const DEFAULT_PANIC_WINDOW: Duration = Duration::from_secs(6);
/// Panic starts when the panic-window demand reaches this multiple of the ready capacity.
pub const PANIC_THRESHOLD: f64 = 2.0;

/// A point in time on both clocks: the monotonic one measures windows, the wall clock stamps
/// what operators read (`last_change_unix_ms`). Explicit so that tests choose both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moment {
    pub instant: Instant,
    pub wall: SystemTime,
}

impl Moment {
    pub fn now() -> Self {
        Self {
            instant: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    /// The same moment `by` later on both clocks.
    pub fn after(self, by: Duration) -> Self {
        Self {
            instant: self.instant + by,
            wall: self.wall + by,
        }
    }
}

/// Window lengths, from the agent's flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    pub stable: Duration,
    pub panic: Duration,
}

impl Default for Windows {
    fn default() -> Self {
        Self {
            stable: DEFAULT_STABLE_WINDOW,
            panic: DEFAULT_PANIC_WINDOW,
        }
    }
}

/// A function's scale bounds in this region, as the table sends them, made safe to compute
/// with: a target of 0 counts as 1 (the control plane never sends one), and a max below the min
/// counts as the min (the min is the promise made to the operator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub min: u32,
    pub max: u32,
    pub target_concurrency: u32,
    pub idle: Duration,
}

impl From<&ScaleBounds> for Bounds {
    fn from(bounds: &ScaleBounds) -> Self {
        Self {
            min: bounds.min_instances,
            max: bounds.max_instances.max(bounds.min_instances),
            target_concurrency: bounds.target_concurrency.max(1),
            idle: Duration::from_secs(u64::from(bounds.idle_seconds)),
        }
    }
}

/// What a [`Autoscaler::tick`] or [`Autoscaler::activate`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Instances the function should run.
    pub desired: u32,
    /// Why `desired` last changed (not necessarily in this call).
    pub reason: String,
    /// `desired` changed in this call.
    pub changed: bool,
}

/// The mean of per-second values over a sliding window. Seconds without an observation count as
/// 0, except that the mean is taken only over the seconds since the data began: after a whole
/// window without data the history starts afresh, so a burst from idle is seen at once instead
/// of being diluted by a window of zeros (Knative's `TimedFloat64Buckets` does the same).
#[derive(Debug, Clone)]
struct WindowAverage {
    /// Window length in whole seconds (at least 1).
    seconds: u64,
    /// Seconds with a value above zero, ascending, none older than the window.
    buckets: VecDeque<(u64, f64)>,
    /// First second of the current run of data.
    first: Option<u64>,
}

impl WindowAverage {
    fn new(window: Duration) -> Self {
        Self {
            seconds: window.as_secs().max(1),
            buckets: VecDeque::new(),
            first: None,
        }
    }

    /// Records `value` for `second`. Two values in one second (a late tick next to an on-time
    /// one) keep the larger: either is a fair sample of that second.
    fn record(&mut self, second: u64, value: f64) {
        if !(value.is_finite() && value > 0.0) {
            return;
        }
        let last = self.buckets.back().map(|&(s, _)| s);
        match last {
            Some(last) if last == second => {
                if let Some(bucket) = self.buckets.back_mut() {
                    bucket.1 = bucket.1.max(value);
                }
                return;
            }
            // Out of order: only possible if a caller mixes clocks. Fold it into the newest.
            Some(last) if last > second => {
                if let Some(bucket) = self.buckets.back_mut() {
                    bucket.1 = bucket.1.max(value);
                }
                return;
            }
            Some(last) if second - last < self.seconds => {}
            // No data for a whole window (or none ever): a new run starts here.
            _ => {
                self.buckets.clear();
                self.first = Some(second);
            }
        }
        self.buckets.push_back((second, value));
        self.prune(second);
    }

    fn prune(&mut self, now: u64) {
        while let Some(&(second, _)) = self.buckets.front() {
            if now.saturating_sub(second) >= self.seconds {
                self.buckets.pop_front();
            } else {
                break;
            }
        }
    }

    /// The mean over the window ending with second `now` (inclusive).
    fn average(&mut self, now: u64) -> f64 {
        self.prune(now);
        let Some(first) = self.first else {
            return 0.0;
        };
        if self.buckets.is_empty() {
            return 0.0;
        }
        let sum: f64 = self.buckets.iter().map(|&(_, value)| value).sum();
        let span = now
            .saturating_sub(first)
            .saturating_add(1)
            .min(self.seconds);
        // Seconds are few (a window), so the conversion is exact.
        sum / span as f64
    }
}

/// The autoscaler of one function in this region. Pure: every input carries its time, and the
/// caller applies the decisions.
#[derive(Debug, Clone)]
pub struct Autoscaler {
    bounds: Bounds,
    windows: Windows,
    /// Second 0 of the buckets. The loop puts it half a second before its ticks, so that a tick
    /// a little early or late still lands in its own second.
    epoch: Instant,
    stable: WindowAverage,
    panic: WindowAverage,
    desired: u32,
    reason: String,
    last_change: Option<SystemTime>,
    panicking: bool,
    /// Last tick at which the panic condition held.
    panic_condition_at: Option<Instant>,
    /// Last observation of requests, held requests or concurrency, or activation.
    last_activity: Option<Moment>,
    /// Second of the latest observation: ticks between observations (a new table, an instance
    /// ready) read the windows as of then, not a current second that has no sample yet and
    /// would read as a dip.
    observed_second: Option<u64>,
    stable_average: f64,
    panic_average: f64,
}

/// `ceil(value)` as an instance count (negative and NaN count as 0, huge values saturate).
fn ceil_count(value: f64) -> u32 {
    let ceiled = value.ceil();
    if ceiled.is_nan() || ceiled <= 0.0 {
        0
    } else if ceiled >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        // In range and integral: the cast is exact.
        ceiled as u32
    }
}

impl Autoscaler {
    pub fn new(bounds: Bounds, windows: Windows, epoch: Instant) -> Self {
        Self {
            bounds,
            windows,
            epoch,
            stable: WindowAverage::new(windows.stable),
            panic: WindowAverage::new(windows.panic),
            desired: 0,
            reason: String::new(),
            last_change: None,
            panicking: false,
            panic_condition_at: None,
            last_activity: None,
            observed_second: None,
            stable_average: 0.0,
            panic_average: 0.0,
        }
    }

    /// New bounds from a new table; they apply from the next tick.
    pub fn set_bounds(&mut self, bounds: Bounds) {
        self.bounds = bounds;
    }

    pub fn bounds(&self) -> Bounds {
        self.bounds
    }

    pub fn desired(&self) -> u32 {
        self.desired
    }

    /// Why `desired` last changed; empty before the first change.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    pub fn last_change(&self) -> Option<SystemTime> {
        self.last_change
    }

    pub fn panicking(&self) -> bool {
        self.panicking
    }

    /// Averages as of the last tick.
    pub fn stable_average(&self) -> f64 {
        self.stable_average
    }

    pub fn panic_average(&self) -> f64 {
        self.panic_average
    }

    /// Wall time of the last request (or held request, or in-flight work) seen.
    pub fn last_request(&self) -> Option<SystemTime> {
        self.last_activity.map(|m| m.wall)
    }

    fn second(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_secs()
    }

    /// One second's load: the sum over sidecars of their average concurrency, the requests that
    /// arrived since the previous observation, and the requests held now. In-flight work counts
    /// as activity like a request does, so a long request is never scaled away under itself.
    pub fn observe(&mut self, now: Moment, concurrency: f64, requests: u64, held: u32) {
        let second = self.second(now.instant);
        self.observed_second = Some(second);
        self.stable.record(second, concurrency);
        self.panic.record(second, concurrency);
        if requests > 0 || held > 0 || concurrency > 0.0 {
            self.last_activity = Some(now);
        }
    }

    /// A request is waiting for an instance: at least one, now rather than at the next tick.
    pub fn activate(&mut self, now: Moment) -> Decision {
        self.last_activity = Some(now);
        let wanted = self.desired.max(1).min(self.bounds.max);
        self.decide(now, wanted, "activation: request held".to_owned())
    }

    /// Recomputes the desired count from the windows, given the instances ready now.
    pub fn tick(&mut self, now: Moment, ready: u32) -> Decision {
        let current = self.second(now.instant);
        let second = self
            .observed_second
            .map_or(current, |seen| seen.min(current));
        let stable = self.stable.average(second);
        let panic = self.panic.average(second);
        self.stable_average = stable;
        self.panic_average = panic;
        let target = self.bounds.target_concurrency.max(1);
        let desired_stable = ceil_count(stable / f64::from(target));
        let desired_panic = ceil_count(panic / f64::from(target));
        let capacity = u64::from(ready) * u64::from(target);

        // With nothing ready any demand is more than the capacity; activation has usually
        // started an instance already, panic sizes the burst.
        let panic_condition = if ready == 0 {
            panic > 0.0
        } else {
            panic >= PANIC_THRESHOLD * capacity as f64
        };
        if panic_condition {
            self.panic_condition_at = Some(now.instant);
            self.panicking = true;
        } else if self.panicking {
            let calm_for = self.panic_condition_at.map_or(Duration::MAX, |at| {
                now.instant.saturating_duration_since(at)
            });
            if calm_for >= self.windows.stable {
                self.panicking = false;
            }
        }

        let (mut wanted, mut reason) = if self.panicking {
            // Never down while panicking: the burst may come back before the window shows it.
            let reason = if panic_condition {
                format!("panic: concurrency {panic:.1} >= 2x capacity {capacity}")
            } else {
                // Still in panic mode, which ends only after a calm stable window.
                format!(
                    "panic (until calm for {}s): concurrency {panic:.1}, capacity {capacity}",
                    self.windows.stable.as_secs()
                )
            };
            (self.desired.max(desired_panic).max(desired_stable), reason)
        } else {
            (
                desired_stable,
                format!("stable: concurrency {stable:.1} / target {target}"),
            )
        };

        let idle_for = self.last_activity.map_or(Duration::MAX, |at| {
            now.instant.saturating_duration_since(at.instant)
        });
        let idle_secs = self.bounds.idle.as_secs();
        if self.bounds.min == 0 && idle_for >= self.bounds.idle && idle_for > Duration::ZERO {
            wanted = 0;
            reason = format!("idle {idle_secs}s: scale to zero");
            self.panicking = false;
        } else if self.bounds.min == 0
            && self.last_activity.is_some()
            && idle_for < self.bounds.idle
            && wanted == 0
        {
            wanted = 1;
            reason = format!("requests within idle {idle_secs}s: keep 1");
        }

        if wanted < self.bounds.min {
            wanted = self.bounds.min;
            reason = format!("min instances {}", self.bounds.min);
        } else if wanted > self.bounds.max {
            wanted = self.bounds.max;
            reason = format!("max instances {} reached", self.bounds.max);
        }
        self.decide(now, wanted, reason)
    }

    fn decide(&mut self, now: Moment, wanted: u32, reason: String) -> Decision {
        let changed = wanted != self.desired;
        if changed {
            self.desired = wanted;
            self.reason = reason;
            self.last_change = Some(now.wall);
        }
        Decision {
            desired: self.desired,
            reason: self.reason.clone(),
            changed,
        }
    }
}

/// Unix milliseconds of `time` (0 before the epoch).
pub fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// How often the loop observes load and re-decides every function.
pub const TICK: Duration = Duration::from_secs(1);

/// The scale state of every process function this agent runs, as reported upstream.
pub type ScaleStatus = Arc<Vec<FunctionScale>>;

/// What the scaler drives: the runtime, or a recording fake in tests.
pub trait Workloads: Send + 'static {
    /// Run `desired` instances of `process` for `key`.
    fn set(&self, key: FunctionKey, process: ProcessRuntime, desired: u32);
    /// Drain and stop every instance of `key`.
    fn remove(&self, key: &FunctionKey);
}

impl Workloads for Runtime {
    fn set(&self, key: FunctionKey, process: ProcessRuntime, desired: u32) {
        Runtime::set(self, key, process, desired);
    }

    fn remove(&self, key: &FunctionKey) {
        Runtime::remove(self, key);
    }
}

/// A sidecar holds a request for a function with no ready local instance (the `Activate` RPC,
/// or a load report with held requests).
#[derive(Debug)]
pub struct Activation {
    pub key: FunctionKey,
    /// Gets the instances ready or starting after the activation (0: not run here).
    pub reply: Option<oneshot::Sender<u32>>,
}

/// Who reports the scale state, and the window lengths.
#[derive(Debug, Clone)]
pub struct ScalerConfig {
    pub region: String,
    pub agent_id: String,
    pub windows: Windows,
    /// How long after a stream to the control plane opens an unplacement of a function with
    /// ready instances is put off (`--region-grace`).
    pub region_grace: Duration,
}

/// `--region-grace`'s default, the control plane's own.
pub const DEFAULT_REGION_GRACE: Duration = Duration::from_secs(60);

/// One process function with scale bounds in the table.
#[derive(Debug)]
struct Scaled {
    autoscaler: Autoscaler,
    process: ProcessRuntime,
    /// What the workloads were last told, so that an unchanged decision is not sent again.
    applied: Option<(ProcessRuntime, u32)>,
    /// Unplaced by a table that arrived within the region grace of a reconnection: removed at
    /// this instant unless placed again before.
    unplace_at: Option<Instant>,
}

/// The process functions of the table and what the autoscaler wants for them.
fn scaled_routes(table: Option<&RoutingTable>) -> BTreeMap<FunctionKey, (ProcessRuntime, Bounds)> {
    let mut routes = BTreeMap::new();
    for route in table.map(|t| t.functions.as_slice()).unwrap_or_default() {
        let Some(workload) = &route.workload else {
            continue;
        };
        // A process route without bounds is not placed here: nothing runs.
        let (Some(local_workload::Kind::Process(process)), Some(bounds)) =
            (&workload.kind, &workload.scale)
        else {
            continue;
        };
        let key = FunctionKey::new(route.namespace.clone(), route.name.clone());
        routes.insert(key, (process.clone(), Bounds::from(bounds)));
    }
    routes
}

/// Rounds to one decimal: what operators read, and it keeps sub-decimal noise from changing
/// the report every second.
fn one_decimal(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

/// The region's autoscaler loop: a tick every second (observe load, decide, apply), and an
/// immediate decision on every new table, runtime change and activation.
pub struct Scaler<W> {
    config: ScalerConfig,
    workloads: W,
    book: Arc<LoadBook>,
    /// Second 0 of every autoscaler's buckets: half a second before the first tick.
    epoch: Instant,
    functions: BTreeMap<FunctionKey, Scaled>,
    status: watch::Sender<ScaleStatus>,
    /// When the current (or last) stream to the control plane opened; `None`: never.
    session_opened: Option<watch::Receiver<Option<Instant>>>,
}

impl<W: Workloads> Scaler<W> {
    /// The scaler and the receiver of its status reports.
    pub fn new(
        config: ScalerConfig,
        workloads: W,
        book: Arc<LoadBook>,
    ) -> (Self, watch::Receiver<ScaleStatus>) {
        let (status, status_rx) = watch::channel(Arc::new(Vec::new()));
        let scaler = Self {
            config,
            workloads,
            book,
            epoch: Instant::now(),
            functions: BTreeMap::new(),
            status,
            session_opened: None,
        };
        (scaler, status_rx)
    }

    /// Unplacements within the region grace after a stream opens are put off (see the module).
    pub fn with_sessions(mut self, opened: watch::Receiver<Option<Instant>>) -> Self {
        self.session_opened = Some(opened);
        self
    }

    /// Runs until the table channel closes (agent shutdown). Functions still running then are
    /// left to the runtime's shutdown.
    pub async fn run(
        mut self,
        mut tables: watch::Receiver<CurrentTable>,
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
        mut activations: mpsc::Receiver<Activation>,
    ) {
        let start = Instant::now();
        self.epoch = start.checked_sub(TICK / 2).unwrap_or(start);
        let mut ticker = tokio::time::interval_at(start + TICK, TICK);
        // Keep the phase: a late tick must not push every later one off the half second.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut runtime_open = true;
        let mut activations_open = true;
        self.reconcile(Moment::now(), &tables, &snapshots, None);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let now = Moment::now();
                    let load = self.book.observe(now.instant);
                    self.reconcile(now, &tables, &snapshots, Some(&load));
                }
                changed = tables.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.reconcile(Moment::now(), &tables, &snapshots, None);
                }
                changed = snapshots.changed(), if runtime_open => {
                    runtime_open = changed.is_ok();
                    self.reconcile(Moment::now(), &tables, &snapshots, None);
                }
                activation = activations.recv(), if activations_open => match activation {
                    Some(activation) => self.activate(Moment::now(), activation, &tables, &snapshots),
                    None => activations_open = false,
                },
            }
        }
    }

    /// Brings the set of functions in line with the table: new ones get an autoscaler, gone
    /// ones (or ones without bounds any more) are removed from the runtime.
    fn sync(&mut self, table: Option<&RoutingTable>, snapshot: &Snapshot, now: Instant) {
        let routes = scaled_routes(table);
        let in_table: BTreeSet<FunctionKey> = table
            .map(|t| t.functions.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|r| FunctionKey::new(r.namespace.clone(), r.name.clone()))
            .collect();
        // Until this instant an unplacement is put off.
        let grace_ends = self
            .session_opened
            .as_ref()
            .and_then(|opened| *opened.borrow())
            .map(|opened| opened + self.config.region_grace);
        let gone: Vec<FunctionKey> = self
            .functions
            .keys()
            .filter(|key| !routes.contains_key(*key))
            .cloned()
            .collect();
        for key in gone {
            let ready = snapshot
                .functions
                .get(&key)
                .map_or(0, FunctionRuntime::ready);
            let scaled = self.functions.get_mut(&key);
            if let (Some(scaled), Some(grace_ends)) = (scaled, grace_ends) {
                let first = scaled.unplace_at.is_none();
                let unplace_at = *scaled.unplace_at.get_or_insert(grace_ends);
                if in_table.contains(&key) && ready > 0 && now < unplace_at {
                    if first {
                        tracing::info!(function = %key, ready, keep_for = ?unplace_at.duration_since(now), "unplaced here within the region grace of a reconnection; keeping its instances until the grace ends");
                    }
                    continue;
                }
            }
            tracing::info!(function = %key, "function no longer runs here; removing its instances");
            self.functions.remove(&key);
            self.workloads.remove(&key);
        }
        let windows = self.config.windows;
        let epoch = self.epoch;
        for (key, (process, bounds)) in routes {
            match self.functions.get_mut(&key) {
                Some(scaled) => {
                    scaled.autoscaler.set_bounds(bounds);
                    scaled.process = process;
                    scaled.unplace_at = None;
                }
                None => {
                    let scaled = Scaled {
                        autoscaler: Autoscaler::new(bounds, windows, epoch),
                        process,
                        applied: None,
                        unplace_at: None,
                    };
                    self.functions.insert(key, scaled);
                }
            }
        }
    }

    /// Observes `load` (on ticks), decides every function, applies what changed, and
    /// publishes the status.
    fn reconcile(
        &mut self,
        now: Moment,
        tables: &watch::Receiver<CurrentTable>,
        snapshots: &watch::Receiver<Arc<Snapshot>>,
        load: Option<&BTreeMap<FunctionKey, Observation>>,
    ) {
        let table = tables.borrow().clone();
        let snapshot = Arc::clone(&snapshots.borrow());
        self.sync(table.as_deref(), &snapshot, now.instant);
        for (key, scaled) in &mut self.functions {
            if let Some(load) = load {
                let seen = load.get(key).copied().unwrap_or_default();
                scaled
                    .autoscaler
                    .observe(now, seen.concurrency, seen.requests, seen.held);
            }
            let ready = snapshot
                .functions
                .get(key)
                .map_or(0, FunctionRuntime::ready);
            let decision = scaled.autoscaler.tick(now, ready);
            if decision.changed {
                tracing::info!(function = %key, desired = decision.desired, reason = %decision.reason, "scale changed");
            }
            apply(&self.workloads, key, scaled);
        }
        self.publish(&snapshot);
    }

    fn activate(
        &mut self,
        now: Moment,
        activation: Activation,
        tables: &watch::Receiver<CurrentTable>,
        snapshots: &watch::Receiver<Arc<Snapshot>>,
    ) {
        let table = tables.borrow().clone();
        let snapshot = Arc::clone(&snapshots.borrow());
        self.sync(table.as_deref(), &snapshot, now.instant);
        let Activation { key, reply } = activation;
        let instances = match self.functions.get_mut(&key) {
            Some(scaled) => {
                let decision = scaled.autoscaler.activate(now);
                if decision.changed {
                    tracing::info!(function = %key, desired = decision.desired, reason = %decision.reason, "scale changed");
                }
                apply(&self.workloads, &key, scaled);
                let live = snapshot
                    .functions
                    .get(&key)
                    .map_or(0, |f| f.ready().saturating_add(f.starting()));
                decision.desired.max(live)
            }
            None => {
                tracing::debug!(function = %key, "activation for a function not run here");
                0
            }
        };
        if let Some(reply) = reply {
            let _ = reply.send(instances);
        }
        self.publish(&snapshot);
    }

    fn publish(&self, snapshot: &Snapshot) {
        let empty = FunctionRuntime::default();
        let functions: Vec<FunctionScale> = self
            .functions
            .iter()
            .map(|(key, scaled)| {
                let runtime = snapshot.functions.get(key).unwrap_or(&empty);
                FunctionScale {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    scale: Some(self.region_scale(scaled, runtime)),
                }
            })
            .collect();
        self.status.send_if_modified(|current| {
            if **current == functions {
                return false;
            }
            *current = Arc::new(functions);
            true
        });
    }

    fn region_scale(&self, scaled: &Scaled, runtime: &FunctionRuntime) -> RegionScale {
        let autoscaler = &scaled.autoscaler;
        let bounds = autoscaler.bounds();
        RegionScale {
            region: self.config.region.clone(),
            agent_id: self.config.agent_id.clone(),
            desired: autoscaler.desired(),
            ready: runtime.ready(),
            starting: runtime.starting(),
            draining: runtime.draining(),
            min_instances: bounds.min,
            max_instances: bounds.max,
            reason: autoscaler.reason().to_owned(),
            last_change_unix_ms: autoscaler.last_change().map_or(0, unix_ms),
            stable_concurrency: one_decimal(autoscaler.stable_average()),
            panic_concurrency: one_decimal(autoscaler.panic_average()),
            panic: autoscaler.panicking(),
            cold_start_ms: runtime.cold_start_ms(),
            restarts: runtime.restarts,
            last_exit: runtime.last_exit.clone().unwrap_or_default(),
            last_log_lines: runtime.last_log_lines.clone(),
            error: runtime.error.clone().unwrap_or_default(),
            instances: runtime.instances.iter().map(|i| i.to_status()).collect(),
            last_request_unix_ms: autoscaler.last_request().map_or(0, unix_ms),
        }
    }
}

/// Tells the workloads what `scaled` wants, unless they were told exactly that already.
fn apply<W: Workloads>(workloads: &W, key: &FunctionKey, scaled: &mut Scaled) {
    let wanted = (scaled.process.clone(), scaled.autoscaler.desired());
    if scaled.applied.as_ref() != Some(&wanted) {
        workloads.set(key.clone(), wanted.0.clone(), wanted.1);
        scaled.applied = Some(wanted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(min: u32, max: u32, target: u32, idle_secs: u64) -> Bounds {
        Bounds {
            min,
            max,
            target_concurrency: target,
            idle: Duration::from_secs(idle_secs),
        }
    }

    /// An autoscaler and a clock that ticks in whole seconds, half a second past the epoch.
    struct Clock {
        start: Moment,
        epoch: Instant,
    }

    impl Clock {
        fn new() -> Self {
            let start = Moment {
                instant: Instant::now(),
                wall: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            };
            Self {
                epoch: start.instant - Duration::from_millis(500),
                start,
            }
        }

        fn at(&self, second: u64) -> Moment {
            self.start.after(Duration::from_secs(second))
        }

        fn scaler(&self, bounds: Bounds) -> Autoscaler {
            Autoscaler::new(bounds, Windows::default(), self.epoch)
        }
    }

    /// Observes `concurrency` (with as many requests) and ticks, at `second`.
    fn step(a: &mut Autoscaler, at: Moment, concurrency: f64, ready: u32) -> Decision {
        let requests = ceil_count(concurrency).into();
        a.observe(at, concurrency, requests, 0);
        a.tick(at, ready)
    }

    #[test]
    fn window_average_counts_gaps_as_zero_and_restarts_after_a_quiet_window() {
        let mut w = WindowAverage::new(Duration::from_secs(6));
        assert_eq!(w.average(0), 0.0);
        w.record(10, 60.0);
        assert_eq!(w.average(10), 60.0, "the first second is the whole history");
        assert_eq!(w.average(11), 30.0, "a second without data counts as 0");
        w.record(12, 30.0);
        assert_eq!(w.average(12), 30.0);
        assert_eq!(w.average(15), 90.0 / 6.0, "the window is full from here");
        assert_eq!(w.average(16), 30.0 / 6.0, "second 10 left the window");
        assert_eq!(w.average(18), 0.0);
        // Six quiet seconds: the next burst starts a new history.
        w.record(20, 12.0);
        assert_eq!(w.average(20), 12.0);
        // Two values in one second keep the larger; zero and NaN are not data.
        w.record(20, 18.0);
        w.record(20, 1.0);
        w.record(21, 0.0);
        w.record(21, f64::NAN);
        assert_eq!(w.average(21), 9.0);
    }

    #[test]
    fn bounds_from_the_wire_are_made_safe() {
        let b = Bounds::from(&ScaleBounds {
            min_instances: 3,
            max_instances: 1,
            target_concurrency: 0,
            idle_seconds: 30,
        });
        assert_eq!(b, bounds(3, 3, 1, 30));
    }

    #[test]
    fn burst_from_idle_reaches_ten_at_once() {
        let clock = Clock::new();
        let mut a = clock.scaler(bounds(0, 20, 10, 30));
        // Long idle: nothing observed, nothing wanted.
        for s in 0..100 {
            let d = step(&mut a, clock.at(s), 0.0, 0);
            assert_eq!(d.desired, 0);
            assert!(!d.changed);
        }
        assert!(a.last_change().is_none());
        // The sidecar holds the first requests and says so: one instance at once.
        let d = a.activate(clock.at(100));
        assert_eq!(
            d,
            Decision {
                desired: 1,
                reason: "activation: request held".into(),
                changed: true
            }
        );
        // The next tick sees 100 concurrent requests, nothing ready yet.
        let d = step(&mut a, clock.at(101), 100.0, 0);
        assert_eq!(d.desired, 10);
        assert!(d.changed);
        assert_eq!(d.reason, "panic: concurrency 100.0 >= 2x capacity 0");
        assert!(a.panicking());
        assert_eq!(a.last_change(), Some(clock.at(101).wall));
        assert_eq!(a.stable_average(), 100.0);
    }

    #[test]
    fn burst_on_a_warm_function_panics_within_two_ticks() {
        let clock = Clock::new();
        let mut a = clock.scaler(bounds(1, 50, 10, 300));
        // A minute at concurrency 5 on one instance.
        for s in 0..60 {
            let d = step(&mut a, clock.at(s), 5.0, 1);
            assert_eq!(d.desired, 1);
        }
        assert!(!a.panicking());
        // Jump to 100: the 6 s panic window averages (5*5 + 100) / 6 = 20.8 >= 2 x 10.
        let d = step(&mut a, clock.at(60), 100.0, 1);
        assert!(a.panicking());
        assert_eq!(d.desired, 3);
        assert_eq!(d.reason, "panic: concurrency 20.8 >= 2x capacity 10");
        let d = step(&mut a, clock.at(61), 100.0, 1);
        assert_eq!(d.desired, 4);
        // It keeps climbing as the window fills, to 10 once the window is all burst.
        let mut desired = d.desired;
        for s in 62..66 {
            let d = step(&mut a, clock.at(s), 100.0, 1);
            assert!(d.desired >= desired, "panic never decreases");
            desired = d.desired;
        }
        assert_eq!(desired, 10);
    }

    #[test]
    fn tenfold_surge_after_a_steady_minute_reaches_ten_within_seven_ticks() {
        // Instances start in milliseconds: every tick sees the previous decision ready.
        let clock = Clock::new();
        let mut a = clock.scaler(bounds(0, 20, 10, 300));
        let mut ready = 0;
        for s in 0..70 {
            ready = step(&mut a, clock.at(s), 9.8, ready).desired;
        }
        assert_eq!(ready, 1);
        // 10 -> 100 concurrent; the first report window straddles the surge.
        let reports = [24.5, 93.5, 100.0, 100.0, 100.0, 100.0, 100.0];
        let mut desired = Vec::new();
        for (n, concurrency) in reports.into_iter().enumerate() {
            ready = step(&mut a, clock.at(70 + n as u64), concurrency, ready).desired;
            desired.push(ready);
        }
        // Stable mode first (capacity keeps up with a diluted window), then panic from the
        // third second, climbing with the panic window.
        assert_eq!(desired, [2, 2, 5, 6, 8, 9, 10]);
        assert!(a.panicking());
    }

    #[test]
    fn panic_never_decreases_and_ends_after_a_calm_stable_window() {
        let clock = Clock::new();
        let mut a = clock.scaler(bounds(0, 20, 10, 300));
        a.activate(clock.at(0));
        let d = step(&mut a, clock.at(0), 100.0, 0);
        assert_eq!(d.desired, 10);
        // Load falls to 30 with 10 ready: capacity 100, no panic condition, but still panicking.
        for s in 1..60 {
            let d = step(&mut a, clock.at(s), 30.0, 10);
            assert_eq!(d.desired, 10, "second {s}");
            assert!(a.panicking(), "second {s}");
        }
        // A full stable window after the last panic condition (second 0): back to stable, where
        // the 60 s window is all 30 by now (second 0's 100 has just left it).
        let d = step(&mut a, clock.at(60), 30.0, 10);
        assert!(!a.panicking());
        assert_eq!(d.desired, 3);
        assert_eq!(d.reason, "stable: concurrency 30.0 / target 10");
        assert!(d.changed);
    }

    #[test]
    fn panic_grows_while_the_condition_holds() {
        let clock = Clock::new();
        let mut a = clock.scaler(bounds(0, 100, 10, 300));
        a.activate(clock.at(0));
        assert_eq!(step(&mut a, clock.at(0), 40.0, 0).desired, 4);
        // 4 ready, capacity 40: 200 is 5x, panic goes on and desired follows the panic window.
        let d = step(&mut a, clock.at(1), 200.0, 4);
        assert_eq!(d.desired, 12); // (40 + 200) / 2 = 120
        assert_eq!(d.reason, "panic: concurrency 120.0 >= 2x capacity 40");
    }

    #[test]
    fn stable_mode_follows_the_stable_window_both_ways() {
        let clock = Clock::new();
        let mut a = clock.scaler(bounds(1, 20, 10, 300));
        // Ramp gently so that the panic condition never holds: each step below 2x capacity.
        let mut ready = 1;
        for s in 0..120 {
            let d = step(&mut a, clock.at(s), 15.0, ready);
            ready = d.desired;
            assert!(!a.panicking(), "second {s}");
        }
        assert_eq!(a.desired(), 2);
        assert_eq!(a.reason(), "stable: concurrency 15.0 / target 10");
        // Load drops to 5: after 30 s at the new level the stable mean is (30*15 + 30*5) / 60
        // = 10, which one instance serves.
        let mut went_down_at = None;
        for s in 120..200 {
            let d = step(&mut a, clock.at(s), 5.0, ready);
            ready = d.desired;
            if d.changed && went_down_at.is_none() {
                went_down_at = Some(s);
            }
        }
        assert_eq!(went_down_at, Some(149));
        assert_eq!(a.desired(), 1);
    }

    #[test]
    fn scale_to_zero_after_idle_seconds_without_requests() {
        let clock = Clock::new();
        let mut a = clock.scaler(bounds(0, 5, 10, 30));
        a.activate(clock.at(0));
        assert_eq!(step(&mut a, clock.at(0), 1.0, 0).desired, 1);
        for s in 1..10 {
            assert_eq!(step(&mut a, clock.at(s), 1.0, 1).desired, 1);
        }
        // Last request at second 9: one instance for 30 s more, then none.
        for s in 10..39 {
            let d = step(&mut a, clock.at(s), 0.0, 1);
            assert_eq!(d.desired, 1, "second {s}");
        }
        let d = step(&mut a, clock.at(39), 0.0, 1);
        assert_eq!(
            d,
            Decision {
                desired: 0,
                reason: "idle 30s: scale to zero".into(),
                changed: true
            }
        );
        assert_eq!(a.last_request(), Some(clock.at(9).wall));
    }

    #[test]
    fn ticks_between_observations_do_not_see_a_dip() {
        let clock = Clock::new();
        let mut a = clock.scaler(bounds(1, 20, 10, 300));
        for s in 0..70 {
            step(&mut a, clock.at(s), 35.0, 4);
        }
        assert_eq!(a.desired(), 4);
        // An instance became ready 0.9 s after the last observation: the current second has
        // no sample yet, which must not read as a second of zero load.
        let between = clock.at(69).after(Duration::from_millis(900));
        let d = a.tick(between, 4);
        assert_eq!(d.desired, 4);
        assert_eq!(a.stable_average(), 35.0);
    }

    #[test]
    fn recent_requests_keep_one_instance_even_when_the_window_rounds_to_zero() {
        let clock = Clock::new();
        // Requests but no measurable concurrency (each shorter than a sample): the windows ask
        // for nothing, the requests for one instance.
        let mut a = clock.scaler(bounds(0, 5, 10, 30));
        a.observe(clock.at(0), 0.0, 3, 0);
        let d = a.tick(clock.at(0), 0);
        assert_eq!(d.desired, 1);
        assert_eq!(d.reason, "requests within idle 30s: keep 1");
    }

    #[test]
    fn min_and_max_clamp_with_their_reasons() {
        let clock = Clock::new();
        let mut a = clock.scaler(bounds(2, 5, 10, 30));
        let d = a.tick(clock.at(0), 0);
        assert_eq!(
            d,
            Decision {
                desired: 2,
                reason: "min instances 2".into(),
                changed: true
            }
        );
        // No scale to zero below the min, however idle.
        assert_eq!(a.tick(clock.at(1000), 2).desired, 2);
        let d = step(&mut a, clock.at(1001), 500.0, 2);
        assert_eq!(
            d,
            Decision {
                desired: 5,
                reason: "max instances 5 reached".into(),
                changed: true
            }
        );
        // Same desired next tick: not a change, the reason stays.
        let d = step(&mut a, clock.at(1002), 500.0, 5);
        assert!(!d.changed);
        assert_eq!(d.reason, "max instances 5 reached");
        // New bounds apply at the next tick.
        a.set_bounds(bounds(0, 3, 10, 30));
        let d = step(&mut a, clock.at(1003), 500.0, 5);
        assert_eq!(d.desired, 3);
        assert_eq!(d.reason, "max instances 3 reached");
    }

    #[test]
    fn activation_respects_max_and_does_not_lower() {
        let clock = Clock::new();
        let mut a = clock.scaler(bounds(0, 0, 10, 30));
        let d = a.activate(clock.at(0));
        assert_eq!(d.desired, 0);
        assert!(!d.changed);

        let mut a = clock.scaler(bounds(0, 10, 10, 30));
        a.activate(clock.at(0));
        step(&mut a, clock.at(0), 50.0, 0);
        assert_eq!(a.desired(), 5);
        let d = a.activate(clock.at(1));
        assert_eq!(d.desired, 5);
        assert!(!d.changed);
        assert_eq!(d.reason, "panic: concurrency 50.0 >= 2x capacity 0");
    }

    #[test]
    fn held_requests_count_as_activity() {
        let clock = Clock::new();
        let mut a = clock.scaler(bounds(0, 10, 10, 5));
        a.observe(clock.at(0), 0.0, 0, 4);
        assert_eq!(a.tick(clock.at(0), 0).desired, 1);
        assert_eq!(a.tick(clock.at(4), 0).desired, 1);
        assert_eq!(a.tick(clock.at(5), 1).desired, 0);
    }

    #[test]
    fn ceil_count_saturates() {
        assert_eq!(ceil_count(0.0), 0);
        assert_eq!(ceil_count(-3.0), 0);
        assert_eq!(ceil_count(f64::NAN), 0);
        assert_eq!(ceil_count(0.01), 1);
        assert_eq!(ceil_count(3.0), 3);
        assert_eq!(ceil_count(1e12), u32::MAX);
    }

    mod scaler {
        use super::*;
        use std::sync::Mutex;

        use meridian_proto::v1::{FunctionLoad, FunctionRoute, LoadReport, LocalWorkload};

        use crate::runtime::{InstanceInfo, InstanceState};

        #[derive(Debug, Clone, PartialEq, Eq)]
        enum Call {
            Set(String, u32),
            Remove(String),
        }

        #[derive(Clone, Default)]
        struct Recorder(Arc<Mutex<Vec<Call>>>);

        impl Recorder {
            fn take(&self) -> Vec<Call> {
                std::mem::take(&mut *self.0.lock().unwrap())
            }
        }

        impl Workloads for Recorder {
            fn set(&self, key: FunctionKey, process: ProcessRuntime, desired: u32) {
                assert_eq!(process.command, "sample");
                self.0.lock().unwrap().push(Call::Set(key.name, desired));
            }

            fn remove(&self, key: &FunctionKey) {
                self.0.lock().unwrap().push(Call::Remove(key.name.clone()));
            }
        }

        fn route(name: &str, scale: Option<ScaleBounds>) -> FunctionRoute {
            FunctionRoute {
                namespace: "default".into(),
                name: name.into(),
                workload: Some(LocalWorkload {
                    kind: Some(local_workload::Kind::Process(ProcessRuntime {
                        command: "sample".into(),
                        ..Default::default()
                    })),
                    scale,
                }),
                ..Default::default()
            }
        }

        fn scale(min: u32, max: u32) -> Option<ScaleBounds> {
            Some(ScaleBounds {
                min_instances: min,
                max_instances: max,
                target_concurrency: 10,
                idle_seconds: 30,
            })
        }

        fn table(functions: Vec<FunctionRoute>) -> CurrentTable {
            Some(Arc::new(RoutingTable {
                version: 1,
                region: "us-east".into(),
                functions,
                local_generation: 0,
            }))
        }

        struct Loop {
            calls: Recorder,
            book: Arc<LoadBook>,
            tables: watch::Sender<CurrentTable>,
            snapshots: watch::Sender<Arc<Snapshot>>,
            activations: mpsc::Sender<Activation>,
            status: watch::Receiver<ScaleStatus>,
            sessions: watch::Sender<Option<Instant>>,
            task: tokio::task::JoinHandle<()>,
        }

        fn start(initial: CurrentTable) -> Loop {
            let calls = Recorder::default();
            let book = Arc::new(LoadBook::new());
            let config = ScalerConfig {
                region: "us-east".into(),
                agent_id: "us-east-1".into(),
                windows: Windows::default(),
                region_grace: DEFAULT_REGION_GRACE,
            };
            let (scaler, status) = Scaler::new(config, calls.clone(), Arc::clone(&book));
            let (sessions, sessions_rx) = watch::channel(None);
            let scaler = scaler.with_sessions(sessions_rx);
            let (tables, tables_rx) = watch::channel(initial);
            let (snapshots, snapshots_rx) = watch::channel(Arc::new(Snapshot::default()));
            let (activations, activations_rx) = mpsc::channel(8);
            let task = tokio::spawn(scaler.run(tables_rx, snapshots_rx, activations_rx));
            Loop {
                calls,
                book,
                tables,
                snapshots,
                activations,
                status,
                sessions,
                task,
            }
        }

        fn ready_snapshot(name: &str) -> Arc<Snapshot> {
            let mut snapshot = Snapshot::default();
            snapshot.functions.insert(
                FunctionKey::new("default", name),
                FunctionRuntime {
                    instances: vec![InstanceInfo {
                        id: format!("{name}-abcdef"),
                        address: "127.0.1.1:4000".parse().unwrap(),
                        state: InstanceState::Ready,
                        pid: 42,
                        started: UNIX_EPOCH,
                        ready: Some(UNIX_EPOCH),
                        restarts: 0,
                        adopted: false,
                    }],
                    ..Default::default()
                },
            );
            Arc::new(snapshot)
        }

        #[tokio::test(start_paused = true)]
        async fn an_unplacement_soon_after_reconnecting_waits_for_the_region_grace() {
            let l = start(table(vec![
                route("f", scale(1, 5)),
                route("g", scale(1, 5)),
            ]));
            let calls = next_calls(&l.calls, Duration::from_millis(100)).await;
            assert_eq!(calls, [set("f", 1), set("g", 1)]);
            let mut snapshot = (*ready_snapshot("f")).clone();
            snapshot
                .functions
                .extend(ready_snapshot("g").functions.clone());
            l.snapshots.send_replace(Arc::new(snapshot));
            // The agent reconnects; the first table no longer places f here and deletes g.
            let opened = Instant::now();
            l.sessions.send_replace(Some(opened));
            l.tables.send_replace(table(vec![route("f", None)]));
            let calls = next_calls(&l.calls, Duration::from_millis(100)).await;
            assert_eq!(calls, [Call::Remove("g".into())], "a deletion is at once");
            let kept = next_calls(&l.calls, Duration::from_secs(58)).await;
            assert!(kept.is_empty(), "f stopped within the grace: {kept:?}");
            let calls = next_calls(&l.calls, Duration::from_secs(3)).await;
            assert_eq!(calls, [Call::Remove("f".into())]);
            assert!(opened.elapsed() >= DEFAULT_REGION_GRACE);
        }

        #[tokio::test(start_paused = true)]
        async fn placed_again_within_the_grace_keeps_running_untouched() {
            let l = start(table(vec![route("f", scale(1, 5))]));
            next_calls(&l.calls, Duration::from_millis(100)).await;
            l.snapshots.send_replace(ready_snapshot("f"));
            l.sessions.send_replace(Some(Instant::now()));
            l.tables.send_replace(table(vec![route("f", None)]));
            assert!(next_calls(&l.calls, Duration::from_secs(5))
                .await
                .is_empty());
            l.tables.send_replace(table(vec![route("f", scale(1, 5))]));
            // Placed again with the same bounds: nothing to tell the runtime, then or later.
            assert!(next_calls(&l.calls, Duration::from_secs(120))
                .await
                .is_empty());
        }

        #[tokio::test(start_paused = true)]
        async fn an_unplacement_long_after_connecting_or_without_ready_instances_is_at_once() {
            let l = start(table(vec![route("f", scale(1, 5))]));
            next_calls(&l.calls, Duration::from_millis(100)).await;
            l.sessions.send_replace(Some(Instant::now()));
            // Nothing ready: nothing to protect.
            l.tables.send_replace(table(vec![route("f", None)]));
            let calls = next_calls(&l.calls, Duration::from_millis(100)).await;
            assert_eq!(calls, [Call::Remove("f".into())]);

            l.tables.send_replace(table(vec![route("f", scale(1, 5))]));
            next_calls(&l.calls, Duration::from_millis(100)).await;
            l.snapshots.send_replace(ready_snapshot("f"));
            tokio::time::sleep(DEFAULT_REGION_GRACE).await;
            l.tables.send_replace(table(vec![route("f", None)]));
            let calls = next_calls(&l.calls, Duration::from_millis(100)).await;
            assert_eq!(calls, [Call::Remove("f".into())]);
        }

        /// Polls `calls` until it is not empty, for at most `within` of paused time.
        async fn next_calls(calls: &Recorder, within: Duration) -> Vec<Call> {
            let deadline = Instant::now() + within;
            loop {
                let got = calls.take();
                if !got.is_empty() || Instant::now() >= deadline {
                    return got;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        fn set(name: &str, desired: u32) -> Call {
            Call::Set(name.into(), desired)
        }

        #[tokio::test(start_paused = true)]
        async fn min_instances_run_at_once_and_removed_functions_are_removed() {
            let l = start(table(vec![route("f", scale(2, 5)), route("plain", None)]));
            let calls = next_calls(&l.calls, Duration::from_millis(100)).await;
            assert_eq!(calls, [set("f", 2)]);
            // Nothing new on later ticks: the same decision is not sent twice.
            assert!(next_calls(&l.calls, Duration::from_secs(3))
                .await
                .is_empty());
            // Bounds gone (not placed here any more): removed.
            l.tables.send_replace(table(vec![route("f", None)]));
            let calls = next_calls(&l.calls, Duration::from_millis(100)).await;
            assert_eq!(calls, [Call::Remove("f".into())]);
            drop(l.tables);
            l.task.await.unwrap();
        }

        #[tokio::test(start_paused = true)]
        async fn activation_starts_one_at_once_and_replies() {
            let l = start(table(vec![route("f", scale(0, 5))]));
            // The runtime learns of the function (and its process) with nothing to run.
            let calls = next_calls(&l.calls, Duration::from_millis(100)).await;
            assert_eq!(calls, [set("f", 0)]);
            let (reply, answer) = oneshot::channel();
            let started = Instant::now();
            l.activations
                .send(Activation {
                    key: FunctionKey::new("default", "f"),
                    reply: Some(reply),
                })
                .await
                .unwrap();
            assert_eq!(answer.await.unwrap(), 1);
            assert_eq!(l.calls.take(), [set("f", 1)]);
            assert!(
                started.elapsed() < Duration::from_millis(10),
                "not on a tick"
            );
            let status = l.status.borrow().clone();
            let region = status[0].scale.as_ref().unwrap();
            assert_eq!(region.desired, 1);
            assert_eq!(region.reason, "activation: request held");
            assert!(region.last_change_unix_ms > 0);

            // A function that does not run here: 0, nothing set.
            let (reply, answer) = oneshot::channel();
            l.activations
                .send(Activation {
                    key: FunctionKey::new("default", "other"),
                    reply: Some(reply),
                })
                .await
                .unwrap();
            assert_eq!(answer.await.unwrap(), 0);
            assert!(l.calls.take().is_empty());
        }

        #[tokio::test(start_paused = true)]
        async fn reported_load_scales_on_the_next_tick_and_idle_scales_to_zero() {
            let l = start(table(vec![route("f", scale(0, 20))]));
            let calls = next_calls(&l.calls, Duration::from_millis(100)).await;
            assert_eq!(calls, [set("f", 0)]);
            let report = |concurrency: f64, requests: u64| LoadReport {
                client: "sidecar-1".into(),
                functions: vec![FunctionLoad {
                    namespace: "default".into(),
                    name: "f".into(),
                    average_concurrency: concurrency,
                    requests,
                    ..Default::default()
                }],
                ..Default::default()
            };
            l.book.record(report(100.0, 500), Instant::now());
            let calls = next_calls(&l.calls, Duration::from_millis(1100)).await;
            assert_eq!(calls, [set("f", 10)]);
            // The sidecar's load drops to nothing; 30 s of idle later, zero.
            l.book.record(report(0.0, 0), Instant::now());
            let calls = next_calls(&l.calls, Duration::from_secs(40)).await;
            assert_eq!(calls, [set("f", 0)]);
            let status = l.status.borrow().clone();
            assert_eq!(
                status[0].scale.as_ref().unwrap().reason,
                "idle 30s: scale to zero"
            );
        }

        #[tokio::test(start_paused = true)]
        async fn status_carries_the_runtime_state() {
            let mut l = start(table(vec![route("f", scale(1, 3))]));
            next_calls(&l.calls, Duration::from_millis(100)).await;
            let mut snapshot = Snapshot::default();
            snapshot.functions.insert(
                FunctionKey::new("default", "f"),
                FunctionRuntime {
                    instances: vec![InstanceInfo {
                        id: "f-abcdef".into(),
                        address: "127.0.1.1:4000".parse().unwrap(),
                        state: InstanceState::Ready,
                        pid: 42,
                        started: UNIX_EPOCH + Duration::from_secs(10),
                        ready: Some(UNIX_EPOCH + Duration::from_secs(11)),
                        restarts: 1,
                        adopted: false,
                    }],
                    cold_start: Some(Duration::from_millis(35)),
                    starts: 2,
                    restarts: 1,
                    last_exit: Some("exit code 1".into()),
                    last_log_lines: vec!["boom".into()],
                    error: None,
                },
            );
            l.status.borrow_and_update();
            l.snapshots.send_replace(Arc::new(snapshot));
            l.status.changed().await.unwrap();
            let status = l.status.borrow().clone();
            assert_eq!(status.len(), 1);
            assert_eq!(status[0].namespace, "default");
            let region = status[0].scale.clone().unwrap();
            assert_eq!(
                region,
                RegionScale {
                    region: "us-east".into(),
                    agent_id: "us-east-1".into(),
                    desired: 1,
                    ready: 1,
                    starting: 0,
                    draining: 0,
                    min_instances: 1,
                    max_instances: 3,
                    reason: "min instances 1".into(),
                    last_change_unix_ms: region.last_change_unix_ms,
                    stable_concurrency: 0.0,
                    panic_concurrency: 0.0,
                    panic: false,
                    cold_start_ms: 35,
                    restarts: 1,
                    last_exit: "exit code 1".into(),
                    last_log_lines: vec!["boom".into()],
                    error: String::new(),
                    instances: vec![meridian_proto::v1::InstanceStatus {
                        id: "f-abcdef".into(),
                        address: "127.0.1.1:4000".into(),
                        state: meridian_proto::v1::EndpointState::Ready as i32,
                        pid: 42,
                        started_unix_ms: 10_000,
                        ready_unix_ms: 11_000,
                        restarts: 1,
                    }],
                    last_request_unix_ms: 0,
                }
            );
        }
    }
}
