//! The activator: what happens to a request for a process function that has no READY local
//! instance (scaled to zero, all instances still starting, or crashed).
//!
//! On the outbound listener ([`HoldRules::plan`], which `explain` calls too):
//! - When the local instances crash-loop (at least `--crash-loop-failed-starts` failed starts in
//!   a row, or the agent waits out a restart backoff: `FunctionRoute.local_failed_starts` and
//!   `local_restart_backoff`, set by the agent) and a healthy remote tier exists (ready
//!   instances behind a gateway that may take traffic), the request is routed there at once.
//! - When a remote region has ready instances behind an available gateway whose measured RTT
//!   beats the function's expected cold start (or the cold start is unknown), likewise.
//! - Otherwise the request is HELD; while a healthy remote tier exists, at most
//!   min(per-try timeout, that tier's measured RTT + `--hold-remote-margin-ms`) (the per-try
//!   timeout alone while the RTT is not measured yet), then it is routed to the remote tier
//!   instead (a "spill"). A hold timeout that comes first still ends the hold.
//!
//! On the gateway listener (a request from another region, which must stay here) and on the
//! outbound one without a healthy remote tier, the request is held in a bounded per-function
//! queue until a new routing state has a ready local instance, and the agent is asked to start
//! one. Held requests wake on every state swap (a `watch` channel the table watcher bumps), then
//! take the normal path; a request held too long gets 503 `cold-start-timeout`, one that finds
//! the queue full 503 `hold-queue-full`.
//!
//! `LoadService.Activate` is sent at most once per function per [`ACTIVATION_INTERVAL`] while
//! the condition lasts, from a background task: the request path only flips an atomic stamp.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::HeaderName;
use meridian_proto::v1 as pb;
use meridian_proto::v1::load_service_client::LoadServiceClient;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::endpoints::ProbeState;
use crate::metrics::FunctionStats;
use crate::priority::{self, MAX_TIERS};
use crate::proxy::{available, Listener};
use crate::routes::{FunctionRoute, RoutingState, Tier};

/// Response header on every response to a request that was held: how long, in ms.
pub const MERIDIAN_HELD_MS: HeaderName = HeaderName::from_static("meridian-held-ms");
/// At most one Activate per function per this interval (per sidecar).
pub const ACTIVATION_INTERVAL: Duration = Duration::from_millis(250);
/// `--hold-queue` default: requests held per function at most.
pub const DEFAULT_HOLD_QUEUE: u32 = 1000;
/// `--hold-timeout-ms` default (the function's policy timeout caps it).
pub const DEFAULT_HOLD_TIMEOUT: Duration = Duration::from_secs(30);
/// `--crash-loop-failed-starts` default: from this many failed starts in a row, the local
/// instances crash-loop and requests go to a healthy remote tier at once.
pub const DEFAULT_CRASH_LOOP_FAILED_STARTS: u32 = 2;
/// `--hold-remote-margin-ms` default: a hold lasts at most a healthy remote tier's round trip
/// plus this (and at most the per-try timeout).
pub const DEFAULT_HOLD_REMOTE_MARGIN: Duration = Duration::from_millis(50);
/// How often a held outbound request looks again while remote regions have ready instances but
/// none of their gateways may take traffic: probes bring a gateway back without a new table.
pub const HOLD_RECHECK_INTERVAL: Duration = Duration::from_millis(250);
pub const ACTIVATE_TIMEOUT: Duration = Duration::from_secs(2);
/// Activations waiting to be sent; beyond this the newest are dropped (and resent by the next
/// held request or load report, which also counts as activation at the agent).
const ACTIVATION_QUEUE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ActivatorError {
    #[error("the agent refused to activate {function}")]
    Rpc {
        function: String,
        #[source]
        source: tonic::Status,
    },
    #[error("the agent did not answer the activation of {function} within {after:?}")]
    Timeout { function: String, after: Duration },
}

/// Hold and activation counters of one function (part of its stats, so they survive swaps).
#[derive(Debug, Default)]
pub struct HoldStats {
    /// Requests that were held.
    pub holds: AtomicU64,
    /// Requests refused because the hold queue was full.
    pub queue_full: AtomicU64,
    /// Held requests answered 503 because no instance became ready in time.
    pub cold_start_timeouts: AtomicU64,
    /// Requests sent to a remote region at once (or released from a hold) because the local
    /// instances crash-loop.
    pub crash_loop_remote: AtomicU64,
    /// Held requests sent to a remote region when their hold reached its bound (RTT + margin,
    /// or the per-try timeout).
    pub spills: AtomicU64,
    /// Activate calls sent to the agent, and those that failed.
    pub activations: AtomicU64,
    pub activation_failures: AtomicU64,
    /// Clock nanos of the last activation (0: never): the dedup stamp.
    last_activation: AtomicU64,
}

/// How a hold ended well.
#[derive(Debug)]
pub enum Released {
    /// Take the normal path with this state: the function has a ready local instance now (or
    /// a warm remote region qualifies, or it no longer needs activation at all).
    Route(Arc<RoutingState>, Arc<FunctionRoute>),
    /// The function left the table while the request was held.
    Gone,
}

/// No ready instance within the hold deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldTimeout;

/// Whether an outbound request for `function` (which has no ready local instance) should go to
/// a remote region now instead of waiting for a cold start: some remote tier has ready
/// instances behind a gateway that may take traffic, and either the cold start is unknown or
/// the gateway's measured round trip is shorter than it. A gateway not measured yet counts only
/// when the cold start is unknown.
pub fn warm_remote(function: &FunctionRoute, now: u64) -> bool {
    let cold_start = function.cold_start;
    function
        .tiers
        .iter()
        .filter(|tier| !tier.local && tier.ready_instances > 0)
        .any(|tier| {
            tier.endpoints.iter().any(|endpoint| {
                available(tier, endpoint, now)
                    && (cold_start.is_zero()
                        || (endpoint.shared.probe_state() == ProbeState::Up
                            && endpoint.shared.rtt().is_some_and(|rtt| rtt < cold_start)))
            })
        })
}

/// The first remote tier, in the order the normal plan tries tiers, that may take a request
/// now (ready instances behind a gateway that is routable, not ejected and not down), with the
/// best measured round trip of its available gateways (`None`: not measured yet).
pub fn healthy_remote(function: &FunctionRoute, now: u64) -> Option<(usize, Option<Duration>)> {
    let mut order = [0; MAX_TIERS];
    let len = priority::order(&function.tiers, &mut order);
    order[..len].iter().find_map(|&index| {
        let tier: &Tier = function.tiers.get(index)?;
        if tier.local || tier.ready_instances == 0 {
            return None;
        }
        let mut available_gateways = tier
            .endpoints
            .iter()
            .filter(|endpoint| available(tier, endpoint, now))
            .peekable();
        available_gateways.peek()?;
        Some((
            index,
            available_gateways.filter_map(|e| e.shared.rtt()).min(),
        ))
    })
}

/// Why a request with no ready local instance goes to a remote region at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoRemote {
    /// The local instances crash-loop, and a healthy remote tier exists.
    CrashLoop {
        failed_starts: u32,
        restart_backoff: bool,
    },
    /// A warm region is nearer than a cold start ([`warm_remote`]).
    Warm,
}

/// How long a hold may last before the request goes to a healthy remote tier instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spill {
    /// From the start of the hold.
    pub after: Duration,
    /// The healthy remote tier the bound comes from (index in the function's tiers): the first
    /// the normal plan tries.
    pub tier: usize,
    /// Its measured round trip; `None` (not measured yet): the per-try timeout is the bound.
    pub rtt: Option<Duration>,
}

/// What the activator does with a request for a function that needs activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColdPlan {
    /// Route it now by the normal plan (a remote region takes it).
    Remote(GoRemote),
    /// Hold it for a local instance; with a spill, at most that long.
    Hold(Option<Spill>),
}

/// The activator's settings (the sidecar's flags) and its rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldRules {
    /// Requests held per function at most (`--hold-queue`).
    pub queue: u32,
    /// The longest hold (`--hold-timeout-ms`; the function's timeout caps it).
    pub timeout: Duration,
    /// Failed starts in a row from which the local instances crash-loop
    /// (`--crash-loop-failed-starts`, at least 1).
    pub crash_loop_failed_starts: u32,
    /// Added to a healthy remote tier's round trip to bound a hold (`--hold-remote-margin-ms`).
    pub remote_margin: Duration,
}

impl Default for HoldRules {
    fn default() -> Self {
        Self {
            queue: DEFAULT_HOLD_QUEUE,
            timeout: DEFAULT_HOLD_TIMEOUT,
            crash_loop_failed_starts: DEFAULT_CRASH_LOOP_FAILED_STARTS,
            remote_margin: DEFAULT_HOLD_REMOTE_MARGIN,
        }
    }
}

impl HoldRules {
    /// The longest hold of a request for `function`: the hold timeout, capped by the function's
    /// own timeout.
    pub fn hold_limit(&self, function: &FunctionRoute) -> Duration {
        self.timeout.min(function.policy.timeout)
    }

    /// Whether the agent says the local instances crash-loop: it waits out a restart backoff
    /// (after any crash, before or after ready), or the last starts failed often enough.
    pub fn crash_looping(&self, function: &FunctionRoute) -> bool {
        function.local_restart_backoff
            || function.local_failed_starts >= self.crash_loop_failed_starts.max(1)
    }

    /// The activator's decision for a request on `listener` for `function`, which needs
    /// activation (no ready local instance). The request path and `explain` both call this.
    pub fn plan(&self, function: &FunctionRoute, now: u64, listener: Listener) -> ColdPlan {
        if listener != Listener::Outbound {
            // A gateway request must stay in this region.
            return ColdPlan::Hold(None);
        }
        let healthy = healthy_remote(function, now);
        if healthy.is_some() && self.crash_looping(function) {
            return ColdPlan::Remote(GoRemote::CrashLoop {
                failed_starts: function.local_failed_starts,
                restart_backoff: function.local_restart_backoff,
            });
        }
        if warm_remote(function, now) {
            return ColdPlan::Remote(GoRemote::Warm);
        }
        let Some((tier, rtt)) = healthy else {
            return ColdPlan::Hold(None);
        };
        let per_try = function.policy.per_try_timeout;
        let after = rtt.map_or(per_try, |rtt| {
            per_try.min(rtt.saturating_add(self.remote_margin))
        });
        if after >= self.hold_limit(function) {
            // The hold timeout ends the hold first.
            return ColdPlan::Hold(None);
        }
        ColdPlan::Hold(Some(Spill { after, tier, rtt }))
    }
}

/// Shared by every connection: decides, holds, and queues activations.
#[derive(Debug)]
pub struct Activator {
    state: Arc<ArcSwapOption<RoutingState>>,
    swaps: Arc<watch::Sender<u64>>,
    activations: mpsc::Sender<Arc<FunctionStats>>,
    rules: HoldRules,
}

impl Activator {
    /// Returns the activator and the receiving end of its activations (for [`send_activations`]).
    pub fn new(
        state: Arc<ArcSwapOption<RoutingState>>,
        swaps: Arc<watch::Sender<u64>>,
        rules: HoldRules,
    ) -> (Self, mpsc::Receiver<Arc<FunctionStats>>) {
        let (activations, receiver) = mpsc::channel(ACTIVATION_QUEUE);
        let activator = Self {
            state,
            swaps,
            activations,
            rules,
        };
        (activator, receiver)
    }

    pub fn rules(&self) -> &HoldRules {
        &self.rules
    }

    pub fn hold_queue(&self) -> u32 {
        self.rules.queue
    }

    /// How long a request for `function` that arrived at `start` may be held: the hold timeout,
    /// capped by the function's own timeout.
    pub fn hold_deadline(&self, function: &FunctionRoute, start: Instant) -> Instant {
        start + self.rules.hold_limit(function)
    }

    /// Asks the agent for an instance of `function`, unless this sidecar did so less than
    /// [`ACTIVATION_INTERVAL`] ago. Returns whether an activation was queued.
    pub fn activate(&self, function: &FunctionRoute, now: u64) -> bool {
        let hold = &function.stats().hold;
        let last = hold.last_activation.load(Ordering::Relaxed);
        let interval = u64::try_from(ACTIVATION_INTERVAL.as_nanos()).unwrap_or(u64::MAX);
        if last != 0 && now.saturating_sub(last) < interval {
            return false;
        }
        // Of concurrent requests, one wins the stamp and sends.
        if hold
            .last_activation
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        match self.activations.try_send(Arc::clone(function.stats())) {
            Ok(()) => {
                hold.activations.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
                tracing::debug!(
                    function = function.label(),
                    "activation queue full; dropped"
                );
                false
            }
        }
    }

    /// Waits until the function (named by its `label`) can take the normal path, re-checking
    /// on every state swap, at most until `deadline`: until it has a ready local instance, or
    /// (outbound) the rules send it to a remote region, or the hold that began at `since`
    /// reached its bound while a healthy remote tier exists ([`HoldRules::plan`]). Asks for an
    /// instance again (deduplicated) after each look that still finds none ready.
    pub async fn hold(
        &self,
        label: &str,
        listener: Listener,
        since: Instant,
        deadline: Instant,
    ) -> Result<Released, HoldTimeout> {
        // Subscribe before looking at the state: a swap after the look is then never missed.
        let mut swaps = self.swaps.subscribe();
        loop {
            let mut wake = deadline;
            if let Some(state) = self.state.load_full() {
                let function = match state.lookup(label) {
                    Ok(function) => Arc::clone(function),
                    Err(_) => return Ok(Released::Gone),
                };
                if !function.needs_activation() {
                    return Ok(Released::Route(state, function));
                }
                let now = state.clock().now();
                match self.rules.plan(&function, now, listener) {
                    ColdPlan::Remote(why) => {
                        if matches!(why, GoRemote::CrashLoop { .. }) {
                            let hold = &function.stats().hold;
                            hold.crash_loop_remote.fetch_add(1, Ordering::Relaxed);
                        }
                        return Ok(Released::Route(state, function));
                    }
                    ColdPlan::Hold(Some(spill)) => {
                        let at = since + spill.after;
                        if Instant::now() >= at {
                            function.stats().hold.spills.fetch_add(1, Ordering::Relaxed);
                            return Ok(Released::Route(state, function));
                        }
                        wake = wake.min(at);
                    }
                    ColdPlan::Hold(None) => {
                        // A gateway that probes bring back changes no table: look again.
                        let may_recover = listener == Listener::Outbound
                            && function
                                .tiers
                                .iter()
                                .any(|tier| !tier.local && tier.ready_instances > 0);
                        if may_recover {
                            wake = wake.min(Instant::now() + HOLD_RECHECK_INTERVAL);
                        }
                    }
                }
                self.activate(&function, now);
            }
            match tokio::time::timeout_at(wake, swaps.changed()).await {
                Ok(Ok(())) => {}
                // No more swaps can come (shutting down): wait for the next look, or out the
                // deadline.
                Ok(Err(_)) => {
                    tokio::time::sleep_until(wake).await;
                    if wake >= deadline {
                        return Err(HoldTimeout);
                    }
                }
                Err(_) if wake >= deadline => return Err(HoldTimeout),
                Err(_) => {}
            }
        }
    }
}

/// Sends queued activations to the agent's `LoadService.Activate` until shutdown; each call in
/// its own task, so a slow agent delays no other function.
pub async fn send_activations(
    mut queue: mpsc::Receiver<Arc<FunctionStats>>,
    agent: Channel,
    client: String,
    shutdown: impl Future<Output = ()>,
) {
    let failing = Arc::new(AtomicBool::new(false));
    tokio::pin!(shutdown);
    loop {
        let stats = tokio::select! {
            next = queue.recv() => match next {
                Some(stats) => stats,
                None => return,
            },
            _ = &mut shutdown => return,
        };
        let mut service = LoadServiceClient::new(agent.clone());
        let request = pb::ActivateRequest {
            client: client.clone(),
            namespace: stats.namespace.clone(),
            name: stats.name.clone(),
        };
        let failing = Arc::clone(&failing);
        tokio::spawn(async move {
            let function = stats.label.clone();
            let result =
                match tokio::time::timeout(ACTIVATE_TIMEOUT, service.activate(request)).await {
                    Ok(Ok(response)) => Ok(response.into_inner().instances),
                    Ok(Err(source)) => Err(ActivatorError::Rpc {
                        function: function.clone(),
                        source,
                    }),
                    Err(_) => Err(ActivatorError::Timeout {
                        function: function.clone(),
                        after: ACTIVATE_TIMEOUT,
                    }),
                };
            match result {
                Ok(instances) => {
                    failing.store(false, Ordering::Relaxed);
                    tracing::debug!(%function, instances, "activation sent");
                }
                Err(error) => {
                    stats
                        .hold
                        .activation_failures
                        .fetch_add(1, Ordering::Relaxed);
                    // Warn once per outage; each further failure is counted in the metrics.
                    if !failing.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %crate::error_chain(&error), "activation failed");
                    }
                }
            }
        });
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::routes::tests::{route, table, tier};
    use crate::routes::Compiler;

    pub(crate) fn process(mut f: pb::FunctionRoute, cold_start_ms: u32) -> pb::FunctionRoute {
        f.workload = Some(pb::LocalWorkload {
            kind: Some(pb::local_workload::Kind::Process(
                pb::ProcessRuntime::default(),
            )),
            scale: Some(pb::ScaleBounds {
                min_instances: 0,
                max_instances: 2,
                target_concurrency: 1,
                idle_seconds: 30,
            }),
        });
        f.cold_start_ms = cold_start_ms;
        f
    }

    /// `f`: a process function whose local tier has one STARTING instance (`ready`: READY),
    /// and a remote region with one ready instance behind its gateway.
    fn f_table(ready: bool, cold_start_ms: u32, generation: u64) -> pb::RoutingTable {
        let mut local = tier("us-east", true, &["127.0.1.1:9000"]);
        if !ready {
            local.endpoints[0].state = pb::EndpointState::Starting as i32;
            local.ready_instances = 0;
        }
        let f = route(
            "default",
            "f",
            vec![local, tier("eu-west", false, &["127.0.2.1:15002"])],
        );
        let mut t = table(vec![process(f, cold_start_ms)]);
        t.local_generation = generation;
        t
    }

    /// [`f_table`] whose agent reports `failed_starts` failed starts in a row and, with
    /// `backoff`, a restart backoff.
    fn crashing(mut t: pb::RoutingTable, failed_starts: u32, backoff: bool) -> pb::RoutingTable {
        t.functions[0].local_failed_starts = failed_starts;
        t.functions[0].local_restart_backoff = backoff;
        t
    }

    struct Fixture {
        compiler: Compiler,
        state: Arc<ArcSwapOption<RoutingState>>,
        swaps: Arc<watch::Sender<u64>>,
        activator: Arc<Activator>,
        queued: mpsc::Receiver<Arc<FunctionStats>>,
    }

    fn fixture(table: &pb::RoutingTable) -> Fixture {
        fixture_with(
            table,
            HoldRules {
                timeout: Duration::from_millis(500),
                ..HoldRules::default()
            },
        )
    }

    fn fixture_with(table: &pb::RoutingTable, rules: HoldRules) -> Fixture {
        let compiler = Compiler::new("us-east");
        let state = Arc::new(ArcSwapOption::from_pointee(
            compiler.compile(table).unwrap(),
        ));
        let swaps = Arc::new(watch::channel(0).0);
        let (activator, queued) = Activator::new(Arc::clone(&state), Arc::clone(&swaps), rules);
        Fixture {
            compiler,
            state,
            swaps,
            activator: Arc::new(activator),
            queued,
        }
    }

    impl Fixture {
        fn swap(&self, table: &pb::RoutingTable) {
            self.state
                .store(Some(Arc::new(self.compiler.compile(table).unwrap())));
            self.swaps.send_modify(|n| *n += 1);
        }

        fn f(&self) -> Arc<FunctionRoute> {
            Arc::clone(self.state.load_full().unwrap().lookup("f").unwrap())
        }

        /// Holds a request for `f` in a task, with a deadline far enough off that only a swap
        /// ends the hold within a test.
        fn hold_in_task(
            &self,
            listener: Listener,
        ) -> tokio::task::JoinHandle<Result<Released, HoldTimeout>> {
            let activator = Arc::clone(&self.activator);
            let since = Instant::now();
            let deadline = since + Duration::from_secs(5);
            tokio::spawn(async move { activator.hold("f", listener, since, deadline).await })
        }
    }

    #[test]
    fn only_an_activatable_process_function_without_ready_instances_needs_activation() {
        let compiler = Compiler::new("us-east");
        let needs_activation = |t: &pb::RoutingTable| {
            let state = compiler.compile(t).unwrap();
            state.lookup("f").unwrap().needs_activation()
        };
        let state = compiler.compile(&f_table(false, 0, 1)).unwrap();
        let f = state.lookup("f").unwrap();
        assert!(f.needs_activation());
        assert_eq!(f.cold_start, Duration::ZERO);
        let state = compiler.compile(&f_table(true, 40, 1)).unwrap();
        let f = state.lookup("f").unwrap();
        assert!(!f.needs_activation());
        assert_eq!(f.cold_start, Duration::from_millis(40));
        // No scale bounds: not placed here, nothing to activate; same with max 0.
        let mut t = f_table(false, 0, 1);
        t.functions[0].workload.as_mut().unwrap().scale = None;
        let state = compiler.compile(&t).unwrap();
        assert!(state.lookup("f").unwrap().is_process());
        assert!(!state.lookup("f").unwrap().needs_activation());
        let mut t = f_table(false, 0, 1);
        t.functions[0]
            .workload
            .as_mut()
            .unwrap()
            .scale
            .as_mut()
            .unwrap()
            .max_instances = 0;
        assert!(!needs_activation(&t));
        // External functions never.
        let t = table(vec![route(
            "default",
            "f",
            vec![tier("us-east", true, &[])],
        )]);
        assert!(!needs_activation(&t));
    }

    #[tokio::test(start_paused = true)]
    async fn warm_remote_needs_a_gateway_faster_than_a_cold_start() {
        let compiler = Compiler::new("us-east");
        // Cold start unknown: any available gateway with ready instances will do.
        let state = compiler.compile(&f_table(false, 0, 1)).unwrap();
        let f = state.lookup("f").unwrap();
        let now = state.clock().now();
        assert!(warm_remote(f, now));
        // Known cold start: the gateway must be measured, and faster.
        let state = compiler.compile(&f_table(false, 50, 1)).unwrap();
        let f = state.lookup("f").unwrap();
        let gateway = &f.tiers[1].endpoints[0].shared;
        assert!(!warm_remote(f, now), "not measured yet");
        gateway.probe_succeeded(Duration::from_millis(80));
        assert!(!warm_remote(f, now), "slower than a cold start");
        gateway.probe_succeeded(Duration::from_millis(20));
        assert!(warm_remote(f, now));
        gateway.mark_down();
        assert!(!warm_remote(f, now), "down");
        // A remote region without ready instances is never warm.
        let mut t = f_table(false, 0, 1);
        t.functions[0].tiers[1].ready_instances = 0;
        let state = compiler.compile(&t).unwrap();
        assert!(!warm_remote(state.lookup("f").unwrap(), now));
    }

    #[tokio::test(start_paused = true)]
    async fn activations_are_deduplicated_per_function() {
        let mut fx = fixture(&f_table(false, 0, 1));
        let f = fx.f();
        let clock = fx.state.load_full().unwrap().clock();
        assert!(fx.activator.activate(&f, clock.now()));
        assert!(!fx.activator.activate(&f, clock.now()));
        tokio::time::advance(ACTIVATION_INTERVAL - Duration::from_millis(1)).await;
        assert!(!fx.activator.activate(&f, clock.now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(fx.activator.activate(&f, clock.now()));
        assert_eq!(f.stats().hold.activations.load(Ordering::Relaxed), 2);
        let sent = fx.queued.recv().await.unwrap();
        assert_eq!(
            (sent.namespace.as_str(), sent.name.as_str()),
            ("default", "f")
        );
        assert!(fx.queued.try_recv().is_ok());
        assert!(fx.queued.try_recv().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn hold_is_released_by_a_swap_with_a_ready_instance() {
        let mut fx = fixture(&f_table(false, 50, 1));
        let held = fx.hold_in_task(Listener::Gateway);
        // The hold asks for an instance at once.
        assert_eq!(fx.queued.recv().await.unwrap().name, "f");
        // A swap that changes nothing for `f` (same version, next generation) keeps it held.
        fx.swap(&f_table(false, 50, 2));
        tokio::time::advance(ACTIVATION_INTERVAL).await;
        tokio::task::yield_now().await;
        assert!(!held.is_finished());
        fx.swap(&f_table(true, 50, 3));
        let released = held.await.unwrap().map(|released| match released {
            Released::Route(state, f) => (state.local_generation(), f.local_ready),
            Released::Gone => (0, false),
        });
        assert_eq!(released, Ok((3, true)));
    }

    #[tokio::test(start_paused = true)]
    async fn hold_times_out_or_ends_when_the_function_goes() {
        let fx = fixture(&f_table(false, 50, 1));
        let start = Instant::now();
        let deadline = fx.activator.hold_deadline(&fx.f(), start);
        assert_eq!(deadline - start, Duration::from_millis(500));
        let result = fx
            .activator
            .hold("f", Listener::Gateway, start, deadline)
            .await;
        assert!(matches!(result, Err(HoldTimeout)));
        assert_eq!(Instant::now(), deadline);

        let held = fx.hold_in_task(Listener::Outbound);
        tokio::task::yield_now().await;
        fx.swap(&table(vec![]));
        assert!(matches!(held.await.unwrap(), Ok(Released::Gone)));
    }

    #[tokio::test(start_paused = true)]
    async fn outbound_hold_is_released_when_a_remote_becomes_warm() {
        let fx = fixture(&f_table(false, 50, 1));
        let held = fx.hold_in_task(Listener::Outbound);
        tokio::task::yield_now().await;
        assert!(!held.is_finished());
        // A probe measured the gateway fast; the next swap re-checks.
        fx.f().tiers[1].endpoints[0]
            .shared
            .probe_succeeded(Duration::from_millis(5));
        fx.swap(&f_table(false, 50, 2));
        assert!(matches!(
            held.await.unwrap(),
            Ok(Released::Route(_, ref f)) if !f.local_ready
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn hold_deadline_is_capped_by_the_policy_timeout() {
        let mut t = f_table(false, 0, 1);
        t.functions[0].policy = Some(pb::RoutingPolicy {
            timeout_ms: Some(200),
            ..Default::default()
        });
        let fx = fixture(&t);
        let start = Instant::now();
        assert_eq!(
            fx.activator.hold_deadline(&fx.f(), start) - start,
            Duration::from_millis(200)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_crash_loop_goes_to_a_healthy_remote_tier_at_once() {
        let compiler = Compiler::new("us-east");
        let rules = HoldRules::default();
        // Cold start 10 ms, eu-west 80 ms away: without a crash loop, a hold.
        let plan = |t: &pb::RoutingTable, rules: &HoldRules, listener: Listener| {
            let state = compiler.compile(t).unwrap();
            let f = state.lookup("f").unwrap();
            f.tiers[1].endpoints[0]
                .shared
                .probe_succeeded(Duration::from_millis(80));
            rules.plan(f, state.clock().now(), listener)
        };
        let calm = f_table(false, 10, 1);
        assert!(matches!(
            plan(&calm, &rules, Listener::Outbound),
            ColdPlan::Hold(Some(_))
        ));
        // One failed start is not a loop yet; two are (the default threshold).
        assert!(matches!(
            plan(
                &crashing(calm.clone(), 1, false),
                &rules,
                Listener::Outbound
            ),
            ColdPlan::Hold(Some(_))
        ));
        assert_eq!(
            plan(
                &crashing(calm.clone(), 2, false),
                &rules,
                Listener::Outbound
            ),
            ColdPlan::Remote(GoRemote::CrashLoop {
                failed_starts: 2,
                restart_backoff: false
            })
        );
        // A restart backoff alone (e.g. an instance killed after it was ready) is one too.
        assert_eq!(
            plan(&crashing(calm.clone(), 0, true), &rules, Listener::Outbound),
            ColdPlan::Remote(GoRemote::CrashLoop {
                failed_starts: 0,
                restart_backoff: true
            })
        );
        // The threshold is the sidecar's setting.
        let patient = HoldRules {
            crash_loop_failed_starts: 3,
            ..rules
        };
        assert!(matches!(
            plan(
                &crashing(calm.clone(), 2, false),
                &patient,
                Listener::Outbound
            ),
            ColdPlan::Hold(Some(_))
        ));
        // The gateway listener never sends a request on to a third region.
        assert_eq!(
            plan(&crashing(calm.clone(), 3, true), &rules, Listener::Gateway),
            ColdPlan::Hold(None)
        );
        // Without a healthy remote tier, a crash loop is held like any cold start.
        let mut no_ready = crashing(calm.clone(), 3, true);
        no_ready.functions[0].tiers[1].ready_instances = 0;
        assert_eq!(
            plan(&no_ready, &rules, Listener::Outbound),
            ColdPlan::Hold(None)
        );
        let state = compiler.compile(&crashing(calm, 3, true)).unwrap();
        let f = state.lookup("f").unwrap();
        f.tiers[1].endpoints[0].shared.mark_down();
        assert_eq!(
            rules.plan(f, state.clock().now(), Listener::Outbound),
            ColdPlan::Hold(None)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_ends_at_the_remote_round_trip_plus_the_margin_then_goes_there() {
        let mut fx = fixture_with(&f_table(false, 10, 1), HoldRules::default());
        let f = fx.f();
        f.tiers[1].endpoints[0]
            .shared
            .probe_succeeded(Duration::from_millis(80));
        let now = fx.state.load_full().unwrap().clock().now();
        assert_eq!(
            fx.activator.rules().plan(&f, now, Listener::Outbound),
            ColdPlan::Hold(Some(Spill {
                after: Duration::from_millis(130),
                tier: 1,
                rtt: Some(Duration::from_millis(80)),
            }))
        );
        let start = Instant::now();
        let held = fx.hold_in_task(Listener::Outbound);
        assert_eq!(fx.queued.recv().await.unwrap().name, "f");
        tokio::time::advance(Duration::from_millis(129)).await;
        tokio::task::yield_now().await;
        assert!(!held.is_finished(), "released before the bound");
        let released = held.await.unwrap();
        assert!(matches!(released, Ok(Released::Route(_, ref f)) if !f.local_ready));
        assert_eq!(Instant::now() - start, Duration::from_millis(130));
        assert_eq!(f.stats().hold.spills.load(Ordering::Relaxed), 1);

        // The gateway listener holds on: the request must stay in this region.
        let held = fx.hold_in_task(Listener::Gateway);
        tokio::time::advance(Duration::from_secs(1)).await;
        tokio::task::yield_now().await;
        assert!(!held.is_finished());
        held.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn the_hold_bound_is_at_most_the_per_try_timeout() {
        let mut t = f_table(false, 10, 1);
        t.functions[0].policy = Some(pb::RoutingPolicy {
            per_try_timeout_ms: Some(100),
            ..Default::default()
        });
        let fx = fixture_with(&t, HoldRules::default());
        let f = fx.f();
        let now = fx.state.load_full().unwrap().clock().now();
        // Not measured yet: the per-try timeout alone.
        assert_eq!(
            fx.activator.rules().plan(&f, now, Listener::Outbound),
            ColdPlan::Hold(Some(Spill {
                after: Duration::from_millis(100),
                tier: 1,
                rtt: None,
            }))
        );
        // Measured, but farther than the per-try timeout allows.
        f.tiers[1].endpoints[0]
            .shared
            .probe_succeeded(Duration::from_millis(80));
        let plan = fx.activator.rules().plan(&f, now, Listener::Outbound);
        assert!(
            matches!(plan, ColdPlan::Hold(Some(Spill { after, .. })) if after == Duration::from_millis(100)),
            "{plan:?}"
        );
        let start = Instant::now();
        let released = fx
            .activator
            .hold(
                "f",
                Listener::Outbound,
                start,
                start + Duration::from_secs(5),
            )
            .await;
        assert!(matches!(released, Ok(Released::Route(..))));
        assert_eq!(Instant::now() - start, Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_timeout_shorter_than_the_bound_still_ends_the_hold() {
        let rules = HoldRules {
            timeout: Duration::from_millis(100),
            ..HoldRules::default()
        };
        let fx = fixture_with(&f_table(false, 10, 1), rules);
        let f = fx.f();
        f.tiers[1].endpoints[0]
            .shared
            .probe_succeeded(Duration::from_millis(80));
        let now = fx.state.load_full().unwrap().clock().now();
        assert_eq!(
            fx.activator.rules().plan(&f, now, Listener::Outbound),
            ColdPlan::Hold(None)
        );
        let start = Instant::now();
        let deadline = fx.activator.hold_deadline(&f, start);
        let result = fx
            .activator
            .hold("f", Listener::Outbound, start, deadline)
            .await;
        assert!(matches!(result, Err(HoldTimeout)));
        assert_eq!(Instant::now() - start, Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_request_leaves_when_the_agent_reports_a_crash_loop() {
        // A margin that keeps the request held until the agent's word arrives.
        let rules = HoldRules {
            remote_margin: Duration::from_secs(10),
            ..HoldRules::default()
        };
        let fx = fixture_with(&f_table(false, 10, 1), rules);
        fx.f().tiers[1].endpoints[0]
            .shared
            .probe_succeeded(Duration::from_millis(80));
        let held = fx.hold_in_task(Listener::Outbound);
        tokio::time::advance(Duration::from_millis(300)).await;
        tokio::task::yield_now().await;
        assert!(!held.is_finished());
        let start = Instant::now();
        fx.swap(&crashing(f_table(false, 10, 2), 0, true));
        let released = held.await.unwrap();
        assert!(matches!(released, Ok(Released::Route(_, ref f)) if f.local_restart_backoff));
        assert_eq!(Instant::now(), start, "at once");
        assert_eq!(
            fx.f()
                .stats()
                .hold
                .crash_loop_remote
                .load(Ordering::Relaxed),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_looks_again_when_a_down_gateway_may_have_come_back() {
        let fx = fixture_with(&f_table(false, 10, 1), HoldRules::default());
        let gateway = Arc::clone(&fx.f().tiers[1].endpoints[0].shared);
        gateway.mark_down();
        let start = Instant::now();
        let held = fx.hold_in_task(Listener::Outbound);
        // The first look, at once.
        tokio::task::yield_now().await;
        tokio::time::advance(Duration::from_millis(100)).await;
        tokio::task::yield_now().await;
        assert!(!held.is_finished());
        // A probe brings it back (no new table); the next look bounds the hold from its start.
        gateway.probe_succeeded(Duration::from_millis(20));
        let released = held.await.unwrap();
        assert!(matches!(released, Ok(Released::Route(..))));
        assert_eq!(Instant::now() - start, HOLD_RECHECK_INTERVAL);
    }
}
