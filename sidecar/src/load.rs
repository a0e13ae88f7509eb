//! Load reporting to the local agent, the autoscaler's input: per process function, the
//! time-weighted average of (requests in flight to local instances + requests held) over each
//! window of about a second, the requests that arrived, the requests held now and the in-flight
//! count of each local instance, sent with `LoadService.ReportLoad`.
//!
//! The request path pays one relaxed `fetch_add` (arrivals); in-flight counts are the endpoint
//! counters load balancing already keeps, and held counts change only on the hold path. A
//! background sampler reads them every [`SAMPLE_INTERVAL`]: sampling instead of integrating
//! exactly on every start and end keeps the request path free of shared timestamps and locks,
//! and 100 samples a window estimate the average well for the autoscaler's purpose.
//!
//! A sidecar with nothing to report (a whole window without requests, nothing in flight or
//! held, nothing owed to the agent) does not keep waking every 10 ms: the sampler sleeps until
//! the first request of a process function ([`SamplerWake`]), a table swap, or shutdown.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use meridian_proto::v1 as pb;
use meridian_proto::v1::load_service_client::LoadServiceClient;
use tokio::sync::{watch, Notify};
use tokio::time::{Instant, MissedTickBehavior};
use tonic::transport::Channel;

use crate::metrics::GlobalStats;
use crate::routes::{FunctionRoute, RoutingState};

/// How often the sampler reads every process function's concurrency.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(10);
/// The report window the contract asks for ("about once a second").
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// A table swap closes the window early (so a draining instance's agent hears soon that this
/// sidecar has the new table), but never before the window is this long.
pub const MIN_EARLY_WINDOW: Duration = Duration::from_millis(100);
/// The agent counts a sidecar in its drain decisions while its last report is this recent;
/// early reports are only worth sending while that holds.
pub const REPORT_RELEVANCE: Duration = Duration::from_secs(3);
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the agent did not take the load report")]
    Rpc(#[source] tonic::Status),
    #[error("the agent did not answer the load report within {0:?}")]
    Timeout(Duration),
}

/// The sampler's idle sleep, and the wake-up the request path gives it. While the sampler runs
/// the request path pays one load of `sleeping` (false); only the first request after the
/// sampler fell asleep notifies.
#[derive(Debug, Default)]
pub struct SamplerWake {
    sleeping: AtomicBool,
    notify: Notify,
}

impl SamplerWake {
    /// A request of a process function arrived (called after its arrival was counted).
    /// Sequentially consistent with [`SamplerWake::try_sleep`] (free on x86: a plain load):
    /// either this sees the sampler asleep and wakes it, or the sampler sees the arrival.
    pub fn request_arrived(&self) {
        if self.sleeping.load(Ordering::SeqCst) && self.sleeping.swap(false, Ordering::SeqCst) {
            self.notify.notify_one();
        }
    }

    /// Announces the sleep, then asks `quiet` once more: an arrival before the announcement is
    /// seen there, one after it notifies. Returns whether to sleep.
    pub fn try_sleep(&self, quiet: impl FnOnce() -> bool) -> bool {
        self.sleeping.store(true, Ordering::SeqCst);
        if quiet() {
            return true;
        }
        self.sleeping.store(false, Ordering::SeqCst);
        false
    }

    /// Ends a sleep that something else (a swap, shutdown) interrupted.
    pub fn awake(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
    }

    pub fn is_sleeping(&self) -> bool {
        self.sleeping.load(Ordering::SeqCst)
    }

    /// Resolves on the first arrival after [`SamplerWake::try_sleep`] (or at once if it came
    /// already).
    pub async fn woken(&self) {
        self.notify.notified().await;
    }
}

/// One function's load counters; part of its [`crate::metrics::FunctionStats`], so they survive
/// table swaps.
#[derive(Debug, Default)]
pub struct FunctionLoad {
    /// Requests that arrived since the last report (routed anywhere, or held). The request path
    /// adds; the reporter takes.
    requests: AtomicU64,
    /// Requests held now, waiting for a local instance.
    held: AtomicU32,
    /// Sum of the concurrency samples taken since the last report (sampler only).
    samples: AtomicU64,
    /// Whether the last report named this function, so that one entry with zeros follows the
    /// end of its activity (sampler only).
    reported: AtomicBool,
    /// The sampler this function's requests wake (shared by every function of the sidecar).
    wake: Arc<SamplerWake>,
}

impl FunctionLoad {
    /// Counters whose arrivals wake `wake`'s sampler.
    pub fn new(wake: Arc<SamplerWake>) -> Self {
        Self {
            wake,
            ..Self::default()
        }
    }

    /// A request for the function arrived. On every request's path: one add and one load.
    pub fn arrived(&self) {
        // SeqCst pairs with the sampler's check in `SamplerWake::try_sleep`; on x86 it costs
        // what a relaxed add does (both are one locked instruction).
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.wake.request_arrived();
    }

    pub fn held(&self) -> u32 {
        self.held.load(Ordering::Relaxed)
    }

    /// Takes a place in the function's hold queue, unless `limit` requests are held already.
    /// The place is given back when the guard is dropped (released, timed out, or the client
    /// went away).
    pub fn try_hold(&self, limit: u32) -> Option<HeldGuard<'_>> {
        let before = self.held.fetch_add(1, Ordering::Relaxed);
        if before >= limit {
            self.held.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(HeldGuard { load: self })
    }
}

/// A request's place in a hold queue.
#[derive(Debug)]
pub struct HeldGuard<'l> {
    load: &'l FunctionLoad,
}

impl Drop for HeldGuard<'_> {
    fn drop(&mut self) {
        self.load.held.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Requests in flight from this sidecar to the function's local instances, plus those held.
pub fn concurrency(function: &FunctionRoute) -> u64 {
    let in_flight: usize = function
        .local_tier()
        .map(|tier| tier.endpoints.iter().map(|e| e.shared.in_flight()).sum())
        .unwrap_or(0);
    u64::try_from(in_flight)
        .unwrap_or(u64::MAX)
        .saturating_add(u64::from(function.stats().load.held()))
}

/// Turns samples into reports, one window at a time. Pure bookkeeping (no I/O) so the
/// averaging can be tested on a paused clock.
#[derive(Debug)]
pub struct LoadTracker {
    client: String,
    ticks: u64,
    window_start: Instant,
    /// When the last report was sent (None: never), and whether it named an active function.
    last_sent: Option<Instant>,
    last_active: bool,
}

impl LoadTracker {
    pub fn new(client: impl Into<String>, now: Instant) -> Self {
        Self {
            client: client.into(),
            ticks: 0,
            window_start: now,
            last_sent: None,
            last_active: false,
        }
    }

    /// Takes one concurrency sample of every process function of `state`.
    pub fn sample(&mut self, state: Option<&RoutingState>) {
        self.ticks += 1;
        let Some(state) = state else { return };
        for function in state.process_functions() {
            let current = concurrency(function);
            if current > 0 {
                function
                    .stats()
                    .load
                    .samples
                    .fetch_add(current, Ordering::Relaxed);
            }
        }
    }

    /// Starts a fresh window at `now` (after an idle sleep, whose time holds no samples).
    pub fn restart(&mut self, now: Instant) {
        self.ticks = 0;
        self.window_start = now;
    }

    /// Nothing happens now and nothing is owed to the agent: no process function has a request
    /// since the last report, one held or in flight, or an entry with zeros still to send.
    pub fn quiet(&self, state: Option<&RoutingState>) -> bool {
        if self.last_active {
            return false;
        }
        let Some(state) = state else { return true };
        state.process_functions().iter().all(|function| {
            let load = &function.stats().load;
            load.requests.load(Ordering::SeqCst) == 0
                && load.samples.load(Ordering::Relaxed) == 0
                && !load.reported.load(Ordering::Relaxed)
                && concurrency(function) == 0
        })
    }

    pub fn window_elapsed(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.window_start)
    }

    /// Whether the agent still counts this sidecar in its drain decisions (it reported within
    /// [`REPORT_RELEVANCE`]): then the agent waits to hear that this sidecar has each new
    /// table, and a swap is worth an early report.
    pub fn recently_reported(&self, now: Instant) -> bool {
        self.last_sent
            .is_some_and(|sent| now.saturating_duration_since(sent) < REPORT_RELEVANCE)
    }

    /// Closes the window: the report to send, or `None` when there is nothing to say and
    /// `force` is not set. Something to say: a function had requests, held requests or
    /// in-flight requests in this window; or one did in the previous window (it is named once
    /// more with zeros, so the agent sees the drop; if it left the table, the report is empty).
    pub fn finish(
        &mut self,
        state: Option<&RoutingState>,
        now: Instant,
        force: bool,
    ) -> Option<pb::LoadReport> {
        let window = self.window_elapsed(now);
        let ticks = self.ticks.max(1);
        self.ticks = 0;
        self.window_start = now;
        let state = state?;
        let mut functions = Vec::new();
        let mut any_active = false;
        for function in state.process_functions() {
            let load = &function.stats().load;
            let sum = load.samples.swap(0, Ordering::Relaxed);
            let requests = load.requests.swap(0, Ordering::Relaxed);
            let held = load.held();
            let endpoints: Vec<pb::EndpointLoad> = function
                .local_tier()
                .map(|tier| {
                    tier.endpoints
                        .iter()
                        .filter_map(|e| {
                            let in_flight = e.shared.in_flight();
                            (in_flight > 0).then(|| pb::EndpointLoad {
                                id: e.id.clone(),
                                in_flight: u32::try_from(in_flight).unwrap_or(u32::MAX),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            let active = sum > 0 || requests > 0 || held > 0 || !endpoints.is_empty();
            any_active |= active;
            let was_reported = load.reported.swap(active, Ordering::Relaxed);
            if active || was_reported {
                functions.push(pb::FunctionLoad {
                    namespace: function.namespace.clone(),
                    name: function.name.clone(),
                    average_concurrency: sum as f64 / ticks as f64,
                    requests,
                    held,
                    endpoints,
                });
            }
        }
        if functions.is_empty() && !self.last_active && !force {
            return None;
        }
        self.last_active = any_active;
        self.last_sent = Some(now);
        Some(pb::LoadReport {
            client: self.client.clone(),
            table_version: state.version(),
            local_generation: state.local_generation(),
            window_ms: u32::try_from(window.as_millis()).unwrap_or(u32::MAX),
            functions,
        })
    }
}

/// Samples and reports until shutdown.
#[derive(Debug)]
pub struct Reporter {
    tracker: LoadTracker,
    interval: Duration,
    state: Arc<ArcSwapOption<RoutingState>>,
    swaps: watch::Receiver<u64>,
    agent: Channel,
    global: Arc<GlobalStats>,
    wake: Arc<SamplerWake>,
}

impl Reporter {
    /// `swaps` changes on every table swap; `agent` is the (lazily connected) channel to the
    /// agent's LoadService; `wake` is the compiler's (see [`crate::routes::Compiler`]), which
    /// the requests of the functions it compiles notify.
    pub fn new(
        client: impl Into<String>,
        interval: Duration,
        state: Arc<ArcSwapOption<RoutingState>>,
        swaps: watch::Receiver<u64>,
        agent: Channel,
        global: Arc<GlobalStats>,
        wake: Arc<SamplerWake>,
    ) -> Self {
        Self {
            tracker: LoadTracker::new(client, Instant::now()),
            interval: interval.max(SAMPLE_INTERVAL),
            state,
            swaps,
            agent,
            global,
            wake,
        }
    }

    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let mut sampler = tokio::time::interval(SAMPLE_INTERVAL);
        sampler.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut swaps_open = true;
        // A swap happened that the agent should hear about before the window ends.
        let mut early = false;
        let mut asleep = false;
        tokio::pin!(shutdown);
        loop {
            if asleep {
                let swapped = tokio::select! {
                    _ = self.wake.woken() => false,
                    changed = self.swaps.changed(), if swaps_open => {
                        swaps_open = changed.is_ok();
                        changed.is_ok()
                    }
                    _ = &mut shutdown => return,
                };
                asleep = false;
                self.wake.awake();
                let now = Instant::now();
                // The sleep held no samples: a fresh window starts now.
                self.tracker.restart(now);
                sampler.reset_immediately();
                if swapped {
                    early |= self.tracker.recently_reported(now);
                }
                continue;
            }
            let swapped = tokio::select! {
                _ = sampler.tick() => false,
                changed = self.swaps.changed(), if swaps_open => {
                    if changed.is_err() {
                        // The watcher is gone (shutting down): just keep sampling.
                        swaps_open = false;
                        continue;
                    }
                    true
                }
                _ = &mut shutdown => return,
            };
            let now = Instant::now();
            let state = self.state.load_full();
            if swapped {
                early |= self.tracker.recently_reported(now);
            } else {
                self.tracker.sample(state.as_deref());
            }
            let elapsed = self.tracker.window_elapsed(now);
            if elapsed >= self.interval || (early && elapsed >= MIN_EARLY_WINDOW) {
                match self.tracker.finish(state.as_deref(), now, early) {
                    Some(report) => self.send(report),
                    None => {
                        let tracker = &self.tracker;
                        asleep = self.wake.try_sleep(|| tracker.quiet(state.as_deref()));
                    }
                }
                early = false;
            }
        }
    }

    /// Sends in the background: a slow agent must not stretch the sampling.
    fn send(&self, report: pb::LoadReport) {
        let mut client = LoadServiceClient::new(self.agent.clone());
        let global = Arc::clone(&self.global);
        tokio::spawn(async move {
            let result =
                match tokio::time::timeout(REPORT_TIMEOUT, client.report_load(report)).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(status)) => Err(LoadError::Rpc(status)),
                    Err(_) => Err(LoadError::Timeout(REPORT_TIMEOUT)),
                };
            match result {
                Ok(()) => {
                    global.load_reports.fetch_add(1, Ordering::Relaxed);
                    if global.load_reports_failing.swap(false, Ordering::Relaxed) {
                        tracing::info!("load reports reach the agent again");
                    }
                }
                Err(error) => {
                    global.load_report_failures.fetch_add(1, Ordering::Relaxed);
                    // Once per outage, not once a second.
                    if !global.load_reports_failing.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %crate::error_chain(&error), "cannot report load to the agent");
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::tests::{endpoint, route, table, tier};
    use crate::routes::Compiler;

    /// A process function `f` with two ready local instances.
    fn process_table(generation: u64) -> pb::RoutingTable {
        let mut f = route(
            "default",
            "f",
            vec![tier("us-east", true, &["127.0.1.1:1", "127.0.1.1:2"])],
        );
        f.workload = Some(pb::LocalWorkload {
            kind: Some(pb::local_workload::Kind::Process(
                pb::ProcessRuntime::default(),
            )),
            scale: Some(pb::ScaleBounds {
                min_instances: 0,
                max_instances: 3,
                target_concurrency: 1,
                idle_seconds: 30,
            }),
        });
        // An external function: never reported.
        let g = route(
            "default",
            "g",
            vec![tier("us-east", true, &["127.0.1.1:3"])],
        );
        let mut t = table(vec![f, g]);
        t.local_generation = generation;
        t
    }

    #[tokio::test(start_paused = true)]
    async fn averages_over_time_and_reports_the_drop_once() {
        let state = Compiler::new("us-east").compile(&process_table(4)).unwrap();
        let f = state.lookup("f").unwrap();
        let g = state.lookup("g").unwrap();
        let mut tracker = LoadTracker::new("sc", Instant::now());

        // Idle: nothing to say.
        for _ in 0..100 {
            tracker.sample(Some(&state));
            tokio::time::advance(SAMPLE_INTERVAL).await;
        }
        assert_eq!(tracker.finish(Some(&state), Instant::now(), false), None);

        // Two requests in flight on instance 1 for the whole window, one held for half of it,
        // three arrivals; the external function is busy too but never named.
        let a = f.tiers[0].endpoints[0].shared.start_request();
        let b = f.tiers[0].endpoints[0].shared.start_request();
        let _busy = g.tiers[0].endpoints[0].shared.start_request();
        g.stats().load.arrived();
        for _ in 0..3 {
            f.stats().load.arrived();
        }
        let mut held = f.stats().load.try_hold(10);
        assert!(held.is_some());
        for i in 0..100 {
            if i == 50 {
                held = None;
            }
            tracker.sample(Some(&state));
            tokio::time::advance(SAMPLE_INTERVAL).await;
        }
        assert!(held.is_none());
        let report = tracker.finish(Some(&state), Instant::now(), false).unwrap();
        assert_eq!(report.client, "sc");
        assert_eq!(report.table_version, 7);
        assert_eq!(report.local_generation, 4);
        assert_eq!(report.window_ms, 1000);
        assert_eq!(report.functions.len(), 1, "{report:?}");
        let load = &report.functions[0];
        assert_eq!(
            (load.namespace.as_str(), load.name.as_str()),
            ("default", "f")
        );
        assert!((load.average_concurrency - 2.5).abs() < 0.02, "{load:?}");
        assert_eq!(load.requests, 3);
        assert_eq!(load.held, 0);
        assert_eq!(
            load.endpoints,
            vec![pb::EndpointLoad {
                id: "id-127.0.1.1:1".into(),
                in_flight: 2
            }]
        );

        // Activity stops: one report with zeros, then silence.
        drop((a, b));
        for _ in 0..100 {
            tracker.sample(Some(&state));
            tokio::time::advance(SAMPLE_INTERVAL).await;
        }
        let report = tracker.finish(Some(&state), Instant::now(), false).unwrap();
        assert_eq!(report.functions.len(), 1);
        let load = &report.functions[0];
        assert_eq!(load.average_concurrency, 0.0);
        assert_eq!((load.requests, load.held), (0, 0));
        assert!(load.endpoints.is_empty());
        tracker.sample(Some(&state));
        assert_eq!(tracker.finish(Some(&state), Instant::now(), false), None);
    }

    #[tokio::test(start_paused = true)]
    async fn held_requests_count_and_the_queue_is_bounded() {
        let state = Compiler::new("us-east").compile(&process_table(1)).unwrap();
        let f = state.lookup("f").unwrap();
        let load = &f.stats().load;
        let one = load.try_hold(2).unwrap();
        let two = load.try_hold(2).unwrap();
        assert!(load.try_hold(2).is_none(), "queue of 2 is full");
        assert_eq!(load.held(), 2);
        assert_eq!(concurrency(f), 2);
        drop(one);
        assert_eq!(load.held(), 1);
        drop(two);
        assert_eq!(load.held(), 0);

        let mut tracker = LoadTracker::new("sc", Instant::now());
        let _held = load.try_hold(2).unwrap();
        load.arrived();
        for _ in 0..10 {
            tracker.sample(Some(&state));
            tokio::time::advance(SAMPLE_INTERVAL).await;
        }
        let report = tracker.finish(Some(&state), Instant::now(), false).unwrap();
        assert_eq!(report.functions[0].held, 1);
        assert!((report.functions[0].average_concurrency - 1.0).abs() < 1e-9);
        assert!(tracker.recently_reported(Instant::now()));
        tokio::time::advance(REPORT_RELEVANCE).await;
        assert!(!tracker.recently_reported(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_forced_report_says_which_table_even_when_idle() {
        let compiler = Compiler::new("us-east");
        let state = compiler.compile(&process_table(1)).unwrap();
        let mut tracker = LoadTracker::new("sc", Instant::now());
        assert_eq!(tracker.finish(Some(&state), Instant::now(), false), None);
        let next = compiler.compile(&process_table(2)).unwrap();
        let report = tracker.finish(Some(&next), Instant::now(), true).unwrap();
        assert!(report.functions.is_empty());
        assert_eq!(report.local_generation, 2);
        // Nothing was active: no follow-up.
        assert_eq!(tracker.finish(Some(&next), Instant::now(), false), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_function_gone_from_the_table_gets_one_empty_report() {
        let compiler = Compiler::new("us-east");
        let state = compiler.compile(&process_table(1)).unwrap();
        let mut tracker = LoadTracker::new("sc", Instant::now());
        state.lookup("f").unwrap().stats().load.arrived();
        tracker.sample(Some(&state));
        assert_eq!(
            tracker
                .finish(Some(&state), Instant::now(), false)
                .unwrap()
                .functions
                .len(),
            1
        );
        let mut emptied = table(vec![route(
            "default",
            "g",
            vec![tier("us-east", true, &[])],
        )]);
        emptied.functions[0].tiers[0]
            .endpoints
            .push(endpoint("127.0.1.1:3"));
        let next = compiler.compile(&emptied).unwrap();
        let report = tracker.finish(Some(&next), Instant::now(), false).unwrap();
        assert!(report.functions.is_empty());
        assert_eq!(tracker.finish(Some(&next), Instant::now(), false), None);
    }

    /// Polls `condition` every 10 ms of (paused) time, at most `within`.
    async fn eventually(within: Duration, condition: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if condition() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        condition()
    }

    #[tokio::test(start_paused = true)]
    async fn the_sampler_sleeps_while_idle_and_wakes_on_the_first_request() {
        let compiler = Compiler::new("us-east");
        let state = Arc::new(ArcSwapOption::from_pointee(
            compiler.compile(&process_table(1)).unwrap(),
        ));
        let (swaps, swaps_rx) = watch::channel(0u64);
        // Nothing listens there: reports are attempted and counted as failures.
        let agent = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let global = Arc::new(GlobalStats::default());
        let wake = Arc::clone(compiler.sampler_wake());
        let reporter = Reporter::new(
            "sc",
            Duration::from_secs(1),
            Arc::clone(&state),
            swaps_rx,
            agent,
            Arc::clone(&global),
            Arc::clone(&wake),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(reporter.run(async {
            let _ = stopped.await;
        }));
        let attempts = || {
            global.load_reports.load(Ordering::Relaxed)
                + global.load_report_failures.load(Ordering::Relaxed)
        };

        // One window without anything: asleep, and it stays asleep.
        assert!(eventually(Duration::from_secs(2), || wake.is_sleeping()).await);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(wake.is_sleeping());
        assert_eq!(attempts(), 0);

        // The first request wakes it; its load is reported.
        let f = Arc::clone(state.load().as_ref().unwrap().lookup("f").unwrap());
        f.stats().load.arrived();
        let in_flight = f.tiers[0].endpoints[0].shared.start_request();
        assert!(!wake.is_sleeping(), "the arrival itself ends the sleep");
        assert!(eventually(Duration::from_secs(2), || attempts() >= 1).await);
        assert!(!wake.is_sleeping(), "awake while a request is in flight");

        // Once it is over (a last report with zeros), asleep again.
        drop(in_flight);
        assert!(eventually(Duration::from_secs(4), || wake.is_sleeping()).await);
        let reported = attempts();
        assert!(reported >= 2, "the drop to zero was reported: {reported}");

        // A table swap wakes it too; long after the last report (the agent no longer counts
        // this sidecar in its drains) there is nothing to say, and it falls asleep again.
        tokio::time::sleep(REPORT_RELEVANCE).await;
        swaps.send_replace(1);
        assert!(eventually(Duration::from_millis(100), || !wake.is_sleeping()).await);
        assert!(eventually(Duration::from_secs(3), || wake.is_sleeping()).await);
        assert_eq!(attempts(), reported, "idle sidecars stay silent");

        let _ = stop.send(());
        task.await.unwrap();
    }
}
