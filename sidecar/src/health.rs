//! Endpoint health: passive outlier ejection from what requests see (consecutive connect
//! failures, timeouts or 5xx), and the active prober that asks every remote gateway
//! `GET /.meridian/health` so that a dead or partitioned region is noticed within one probe
//! interval and noticed again when it comes back.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};

use crate::endpoints::{EndpointState, ProbeState, FAILURE_THRESHOLD};
use crate::metrics::GlobalStats;
use crate::routes::{RoutingState, Tier};

/// The path every gateway answers with 200.
pub const HEALTH_PATH: &str = "/.meridian/health";
/// At most this share (permille) of a tier is ejected at once, unless all of it is failing.
pub const MAX_EJECTED_PERMILLE: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("invalid probe URI for gateway {address}")]
    Uri {
        address: String,
        #[source]
        source: http::Error,
    },
    #[error("probe request failed")]
    Request(#[source] hyper_util::client::legacy::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("answered {0}")]
    Status(http::StatusCode),
    #[error("reading the probe answer failed")]
    Body(#[source] hyper::Error),
}

/// Counts one failure of `endpoint` (which is in `tier`) and ejects it once its streak reaches
/// [`FAILURE_THRESHOLD`], unless that would eject more than half the tier while some of the
/// tier still works (a shared cause, like an overloaded dependency, should not empty a tier
/// that can still serve). When every endpoint of the tier is failing they all go: the tier is
/// down and traffic spills to the next. Returns the ejection time if it ejected.
pub fn record_failure(
    tier: &Tier,
    endpoint: &EndpointState,
    now: u64,
    global: &GlobalStats,
) -> Option<Duration> {
    let streak = endpoint.record_failure();
    judge(tier, endpoint, streak, now, global)
}

/// Like [`record_failure`] for a connection that could not be made at all: the endpoint is
/// ejected at once, by the same rule on how much of a tier may go
/// ([`EndpointState::record_unreachable`] says why).
pub fn record_unreachable(
    tier: &Tier,
    endpoint: &EndpointState,
    now: u64,
    global: &GlobalStats,
) -> Option<Duration> {
    let streak = endpoint.record_unreachable();
    judge(tier, endpoint, streak, now, global)
}

fn judge(
    tier: &Tier,
    endpoint: &EndpointState,
    streak: u32,
    now: u64,
    global: &GlobalStats,
) -> Option<Duration> {
    if streak < FAILURE_THRESHOLD || endpoint.is_ejected(now) {
        return None;
    }
    let total = tier.endpoints.len();
    let ejected = tier
        .endpoints
        .iter()
        .filter(|e| e.shared.is_ejected(now))
        .count();
    let over_limit =
        (ejected + 1).saturating_mul(1000) > total.saturating_mul(MAX_EJECTED_PERMILLE);
    if over_limit {
        let all_failing = tier.endpoints.iter().all(|e| {
            e.shared.is_ejected(now) || e.shared.consecutive_failures() >= FAILURE_THRESHOLD
        });
        if !all_failing {
            return None;
        }
    }
    let duration = endpoint.eject(now)?;
    global.ejections.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(
        endpoint = endpoint.address(),
        region = %tier.region,
        ejected_for = ?duration,
        "endpoint ejected after {streak} consecutive failures"
    );
    Some(duration)
}

/// Probes the remote gateways of the current routing state.
#[derive(Debug)]
pub struct Prober {
    client: Client<HttpConnector, Empty<Bytes>>,
    interval: Duration,
    timeout: Duration,
    state: Arc<ArcSwapOption<RoutingState>>,
    wake: Arc<Notify>,
}

impl Prober {
    /// `wake` is notified when a new table is swapped in, to probe its gateways at once.
    pub fn new(
        interval: Duration,
        timeout: Duration,
        state: Arc<ArcSwapOption<RoutingState>>,
        wake: Arc<Notify>,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1)
            .build(connector);
        Self {
            client,
            interval,
            timeout,
            state,
            wake,
        }
    }

    /// Probes every `interval` (and whenever woken) until `shutdown` resolves.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = self.wake.notified() => {}
                _ = &mut shutdown => return,
            }
            let Some(state) = self.state.load_full() else {
                continue;
            };
            let probes = state.gateways().iter().map(|gateway| self.probe(gateway));
            futures::future::join_all(probes).await;
        }
    }

    async fn probe(&self, gateway: &EndpointState) {
        let before = gateway.probe_state();
        let started = Instant::now();
        match self.check(gateway).await {
            Ok(()) => {
                let rtt = started.elapsed();
                gateway.probe_succeeded(rtt);
                if before != ProbeState::Up {
                    tracing::info!(gateway = gateway.address(), ?rtt, "gateway is up");
                }
            }
            Err(error) => {
                let why = crate::error_chain(&error);
                if before != ProbeState::Down {
                    tracing::warn!(gateway = gateway.address(), error = %why, "gateway is down");
                }
                gateway.probe_failed(why);
            }
        }
    }

    /// One `GET /.meridian/health`, answered 2xx and read to the end within the timeout.
    async fn check(&self, gateway: &EndpointState) -> Result<(), HealthError> {
        let uri = Uri::builder()
            .scheme("http")
            .authority(gateway.authority().clone())
            .path_and_query(HEALTH_PATH)
            .build()
            .map_err(|source| HealthError::Uri {
                address: gateway.address().to_owned(),
                source,
            })?;
        let request = Request::get(uri)
            .body(Empty::new())
            .map_err(|source| HealthError::Uri {
                address: gateway.address().to_owned(),
                source,
            })?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(HealthError::Request)?;
            let status = response.status();
            // Read the body so the connection goes back to the pool for the next probe.
            response
                .into_body()
                .collect()
                .await
                .map_err(HealthError::Body)?;
            if status.is_success() {
                Ok(())
            } else {
                Err(HealthError::Status(status))
            }
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| HealthError::Timeout(self.timeout))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoints::BASE_EJECTION;
    use crate::routes::tests::{route, table, tier};
    use crate::routes::Compiler;

    fn state(addresses: &[&str]) -> RoutingState {
        let t = table(vec![route(
            "default",
            "f",
            vec![tier("us-east", true, addresses)],
        )]);
        Compiler::new("us-east").compile(&t).unwrap()
    }

    fn fail(tier: &Tier, i: usize, times: u32, global: &GlobalStats, now: u64) -> bool {
        let mut ejected = false;
        for _ in 0..times {
            ejected |= record_failure(tier, &tier.endpoints[i].shared, now, global).is_some();
        }
        ejected
    }

    #[tokio::test(start_paused = true)]
    async fn five_failures_eject_with_backoff() {
        let state = state(&["127.0.0.1:1", "127.0.0.1:2"]);
        let tier = &state.lookup("f").unwrap().tiers[0];
        let global = GlobalStats::default();
        let clock = state.clock();
        let endpoint = &tier.endpoints[0].shared;

        assert!(!fail(tier, 0, 4, &global, clock.now()));
        assert!(fail(tier, 0, 1, &global, clock.now()));
        assert!(endpoint.is_ejected(clock.now()));
        assert_eq!(global.ejections.load(Ordering::Relaxed), 1);

        tokio::time::advance(BASE_EJECTION).await;
        assert!(!endpoint.is_ejected(clock.now()));
        // Back from ejection, one more failure ejects again, for twice as long.
        assert!(fail(tier, 0, 1, &global, clock.now()));
        assert_eq!(
            endpoint.ejected_for(clock.now()),
            Some(Duration::from_secs(2))
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!endpoint.is_ejected(clock.now()));
        // A success clears the streak.
        endpoint.record_success(clock.now());
        assert!(!fail(tier, 0, 4, &global, clock.now()));
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_half_a_tier_is_ejected_while_some_of_it_works() {
        let state = state(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"]);
        let tier = &state.lookup("f").unwrap().tiers[0];
        let global = GlobalStats::default();
        let now = state.clock().now();
        assert!(fail(tier, 0, 5, &global, now));
        assert!(fail(tier, 1, 5, &global, now));
        // A third would exceed 50% while endpoint 3 still works.
        assert!(!fail(tier, 2, 10, &global, now));
        assert!(!tier.endpoints[2].shared.is_ejected(now));
        // Once the last one fails too, the whole tier is failing: eject (tier down).
        assert!(fail(tier, 3, 5, &global, now));
        assert!(fail(tier, 2, 1, &global, now));
        assert!(tier.endpoints.iter().all(|e| e.shared.is_ejected(now)));
    }

    #[tokio::test(start_paused = true)]
    async fn single_endpoint_tier_is_ejected_when_failing() {
        let state = state(&["127.0.0.1:1"]);
        let tier = &state.lookup("f").unwrap().tiers[0];
        let global = GlobalStats::default();
        assert!(fail(tier, 0, 5, &global, state.clock().now()));
    }

    #[tokio::test]
    async fn prober_marks_unreachable_gateway_down_and_reachable_up() {
        // A port nothing listens on: connection refused.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = closed.local_addr().unwrap().to_string();
        drop(closed);
        // A tiny gateway that answers the health path.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let alive = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(Bytes::from_static(b"ok")),
                        ))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });

        let t = table(vec![route(
            "default",
            "f",
            vec![
                tier("eu-west", false, &[alive.as_str()]),
                tier("ap-south", false, &[dead.as_str()]),
            ],
        )]);
        let compiled = Compiler::new("us-east").compile(&t).unwrap();
        let state = Arc::new(ArcSwapOption::from_pointee(compiled));
        let prober = Prober::new(
            Duration::from_millis(50),
            Duration::from_millis(300),
            Arc::clone(&state),
            Arc::new(Notify::new()),
        );
        let loaded = state.load_full().unwrap();
        let gateways = loaded.gateways();
        assert_eq!(gateways[0].probe_state(), ProbeState::Unknown);
        prober.probe(&gateways[0]).await;
        prober.probe(&gateways[1]).await;
        assert_eq!(gateways[0].probe_state(), ProbeState::Up);
        assert!(gateways[0].rtt().is_some());
        assert_eq!(gateways[1].probe_state(), ProbeState::Down);
        let why = gateways[1].probe_error().expect("a down gateway says why");
        assert!(why.starts_with("probe request failed"), "{why}");
        assert!(gateways[0].probe_error().is_none());
    }
}
