//! The activator: what happens to a request for a process function that has no READY local
//! instance (scaled to zero, or all instances still starting).
//!
//! - On the outbound listener, when a remote region has ready instances behind an available
//!   gateway whose measured RTT beats the function's expected cold start (or the cold start is
//!   unknown), the request is routed there at once by the normal plan, and the agent is asked
//!   to start an instance here.
//! - Otherwise (gateway listener, no warm remote region, or the remote is slower than a cold
//!   start) the request is HELD in a bounded per-function queue until a new routing state has a
//!   ready local instance, and the agent is asked to start one. Held requests wake on every
//!   state swap (a `watch` channel the table watcher bumps), then take the normal path; a
//!   request held too long gets 503 `cold-start-timeout`, one that finds the queue full 503
//!   `hold-queue-full`.
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
use crate::proxy::{available, Listener};
use crate::routes::{FunctionRoute, RoutingState};

/// Response header on every response to a request that was held: how long, in ms.
pub const MERIDIAN_HELD_MS: HeaderName = HeaderName::from_static("meridian-held-ms");
/// At most one Activate per function per this interval (per sidecar).
pub const ACTIVATION_INTERVAL: Duration = Duration::from_millis(250);
/// `--hold-queue` default: requests held per function at most.
pub const DEFAULT_HOLD_QUEUE: u32 = 1000;
/// `--hold-timeout-ms` default (the function's policy timeout caps it).
pub const DEFAULT_HOLD_TIMEOUT: Duration = Duration::from_secs(30);
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

/// Shared by every connection: decides, holds, and queues activations.
#[derive(Debug)]
pub struct Activator {
    state: Arc<ArcSwapOption<RoutingState>>,
    swaps: Arc<watch::Sender<u64>>,
    activations: mpsc::Sender<Arc<FunctionStats>>,
    hold_queue: u32,
    hold_timeout: Duration,
}

impl Activator {
    /// Returns the activator and the receiving end of its activations (for [`send_activations`]).
    pub fn new(
        state: Arc<ArcSwapOption<RoutingState>>,
        swaps: Arc<watch::Sender<u64>>,
        hold_queue: u32,
        hold_timeout: Duration,
    ) -> (Self, mpsc::Receiver<Arc<FunctionStats>>) {
        let (activations, receiver) = mpsc::channel(ACTIVATION_QUEUE);
        let activator = Self {
            state,
            swaps,
            activations,
            hold_queue,
            hold_timeout,
        };
        (activator, receiver)
    }

    pub fn hold_queue(&self) -> u32 {
        self.hold_queue
    }

    /// How long a request for `function` that arrived at `start` may be held: the hold timeout,
    /// capped by the function's own timeout.
    pub fn hold_deadline(&self, function: &FunctionRoute, start: Instant) -> Instant {
        start + self.hold_timeout.min(function.policy.timeout)
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
    /// on every state swap, at most until `deadline`. Asks for an instance again (deduplicated)
    /// after each swap that still has none ready.
    pub async fn hold(
        &self,
        label: &str,
        listener: Listener,
        deadline: Instant,
    ) -> Result<Released, HoldTimeout> {
        // Subscribe before looking at the state: a swap after the look is then never missed.
        let mut swaps = self.swaps.subscribe();
        loop {
            if let Some(state) = self.state.load_full() {
                let function = match state.lookup(label) {
                    Ok(function) => Arc::clone(function),
                    Err(_) => return Ok(Released::Gone),
                };
                let now = state.clock().now();
                if !function.needs_activation()
                    || (listener == Listener::Outbound && warm_remote(&function, now))
                {
                    return Ok(Released::Route(state, function));
                }
                self.activate(&function, now);
            }
            match tokio::time::timeout_at(deadline, swaps.changed()).await {
                Ok(Ok(())) => {}
                // No more swaps can come (shutting down): wait out the deadline.
                Ok(Err(_)) => {
                    tokio::time::sleep_until(deadline).await;
                    return Err(HoldTimeout);
                }
                Err(_) => return Err(HoldTimeout),
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

    struct Fixture {
        compiler: Compiler,
        state: Arc<ArcSwapOption<RoutingState>>,
        swaps: Arc<watch::Sender<u64>>,
        activator: Arc<Activator>,
        queued: mpsc::Receiver<Arc<FunctionStats>>,
    }

    fn fixture(table: &pb::RoutingTable) -> Fixture {
        let compiler = Compiler::new("us-east");
        let state = Arc::new(ArcSwapOption::from_pointee(
            compiler.compile(table).unwrap(),
        ));
        let swaps = Arc::new(watch::channel(0).0);
        let (activator, queued) = Activator::new(
            Arc::clone(&state),
            Arc::clone(&swaps),
            DEFAULT_HOLD_QUEUE,
            Duration::from_millis(500),
        );
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
            let deadline = Instant::now() + Duration::from_secs(5);
            tokio::spawn(async move { activator.hold("f", listener, deadline).await })
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
        let result = fx.activator.hold("f", Listener::Gateway, deadline).await;
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
}
