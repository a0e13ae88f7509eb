//! The admin listener: `/ready` (200 once a table is loaded), `/metrics` (Prometheus text) and
//! `/routes` (the compiled state as JSON, with live health, load, probe state and RTT).

use std::convert::Infallible;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::balance::Tried;
use crate::metrics::{self, GlobalStats};
use crate::proxy::{available, plan};
use crate::routes::{FunctionRoute, RoutingState, Workload};
use crate::watch::Refusal;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot render /routes")]
    Json(#[source] serde_json::Error),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
}

/// What the admin endpoints read.
#[derive(Debug)]
pub struct Admin {
    region: String,
    state: Arc<ArcSwapOption<RoutingState>>,
    refused: Arc<ArcSwapOption<Refusal>>,
    registry: Registry,
}

impl Admin {
    pub fn new(
        region: impl Into<String>,
        state: Arc<ArcSwapOption<RoutingState>>,
        refused: Arc<ArcSwapOption<Refusal>>,
        global: Arc<GlobalStats>,
    ) -> Self {
        let registry = metrics::registry(Arc::clone(&state), global);
        Self {
            region: region.into(),
            state,
            refused,
            registry,
        }
    }

    /// Adds the listeners' connection metrics to `/metrics`.
    pub fn register_connections(
        &mut self,
        connections: &meridian_common::serve::ConnectionMetrics,
    ) {
        connections.register(&mut self.registry);
    }

    pub async fn handle<B>(
        self: Arc<Self>,
        request: Request<B>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        Ok(self.respond(request.method(), request.uri().path()))
    }

    pub fn respond(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        if method != Method::GET && method != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
        }
        match path {
            "/ready" => match self.state.load().as_ref() {
                Some(state) => text(
                    StatusCode::OK,
                    format!("ready (table {})\n", state.version()),
                ),
                None => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: no routing table yet\n".into(),
                ),
            },
            "/metrics" => match metrics::render(&self.registry) {
                Ok(body) => with_type(
                    StatusCode::OK,
                    body,
                    "text/plain; version=0.0.4; charset=utf-8",
                ),
                Err(error) => internal(&error.into()),
            },
            "/routes" => match self.routes_json() {
                Ok(body) => with_type(StatusCode::OK, body, "application/json"),
                Err(error) => internal(&error),
            },
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /ready, /metrics or /routes\n".into(),
            ),
        }
    }

    /// The compiled state with its live health, as JSON.
    pub fn routes_json(&self) -> Result<String, AdminError> {
        let state = self.state.load_full();
        let refused = self.refused.load_full();
        let view = RoutesView {
            region: &self.region,
            loaded: state.is_some(),
            version: state.as_ref().map(|s| s.version()),
            local_generation: state.as_ref().map(|s| s.local_generation()),
            refused: refused.as_deref().map(|r| RefusalView {
                version: r.version,
                reason: &r.reason,
            }),
            gateways: state
                .as_ref()
                .map(|s| {
                    s.gateways()
                        .iter()
                        .map(|g| GatewayView {
                            address: g.address(),
                            probe: g.probe_state().as_str(),
                            rtt_ms: g.rtt().map(|d| d.as_secs_f64() * 1e3),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            functions: state
                .as_ref()
                .map(|s| {
                    let now = s.clock().now();
                    s.functions().map(|f| function_view(f, now)).collect()
                })
                .unwrap_or_default(),
        };
        serde_json::to_string_pretty(&view).map_err(AdminError::Json)
    }
}

fn function_view(function: &FunctionRoute, now: u64) -> FunctionView<'_> {
    let plan = plan(function, now, false, &Tried::default(), 0);
    let mut health = vec![0u32; function.tiers.len()];
    let mut load = vec![0u32; function.tiers.len()];
    let mut priority = vec![None; function.tiers.len()];
    for slot in 0..plan.len {
        let index = plan.order[slot];
        if let (Some(h), Some(l), Some(p)) = (
            health.get_mut(index),
            load.get_mut(index),
            priority.get_mut(index),
        ) {
            *h = plan.health[slot];
            *l = plan.load[slot];
            *p = Some(slot);
        }
    }
    let policy = &function.policy;
    FunctionView {
        namespace: &function.namespace,
        name: &function.name,
        host: function.label(),
        version: function.version,
        workload: function.workload.as_str(),
        activatable: function.workload == (Workload::Process { activatable: true }),
        local_ready: function.local_ready,
        cold_start_ms: function.cold_start.as_millis(),
        local_failed_starts: function.local_failed_starts,
        local_restart_backoff: function.local_restart_backoff,
        held: function.stats().load.held(),
        policy: PolicyView {
            timeout_ms: policy.timeout.as_millis(),
            per_try_timeout_ms: policy.per_try_timeout.as_millis(),
            max_retries: policy.max_retries,
            retryable_methods: policy
                .retryable_methods
                .iter()
                .map(|m| m.as_str())
                .collect(),
        },
        tiers: function
            .tiers
            .iter()
            .enumerate()
            .map(|(i, tier)| TierView {
                region: &tier.region,
                local: tier.local,
                order: tier.order.as_str(),
                priority: priority.get(i).copied().flatten(),
                ready_instances: tier.ready_instances,
                health_percent: f64::from(health.get(i).copied().unwrap_or(0)) / 10.0,
                load_percent: f64::from(load.get(i).copied().unwrap_or(0)) / 10.0,
                endpoints: tier
                    .endpoints
                    .iter()
                    .map(|e| {
                        let shared = &e.shared;
                        EndpointView {
                            address: shared.address(),
                            id: &e.id,
                            zone: &e.zone,
                            state: e.state,
                            available: available(tier, e, now),
                            in_flight: shared.in_flight(),
                            ewma_ms: shared.ewma_ns() as f64 / 1e6,
                            consecutive_failures: shared.consecutive_failures(),
                            ejected: shared.is_ejected(now),
                            ejected_for_ms: shared.ejected_for(now).map(|d| d.as_millis()),
                            ejections: shared.ejections(),
                            probe: (!tier.local).then(|| shared.probe_state().as_str()),
                            rtt_ms: (!tier.local)
                                .then(|| shared.rtt().map(|d| d.as_secs_f64() * 1e3))
                                .flatten(),
                        }
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    with_type(status, body, "text/plain; charset=utf-8")
}

fn with_type(
    status: StatusCode,
    body: String,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn internal(error: &AdminError) -> Response<Full<Bytes>> {
    tracing::warn!(error = %crate::error_chain(error), "admin request failed");
    text(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("{}\n", crate::error_chain(error)),
    )
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RoutesView<'a> {
    region: &'a str,
    loaded: bool,
    version: Option<i64>,
    local_generation: Option<u64>,
    refused: Option<RefusalView<'a>>,
    gateways: Vec<GatewayView<'a>>,
    functions: Vec<FunctionView<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RefusalView<'a> {
    version: i64,
    reason: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GatewayView<'a> {
    address: &'a str,
    probe: &'static str,
    rtt_ms: Option<f64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FunctionView<'a> {
    namespace: &'a str,
    name: &'a str,
    host: &'a str,
    version: i64,
    /// "process" when the local agent runs the function's instances, else "none".
    workload: &'static str,
    /// A process function the agent may start here (scale bounds allow an instance).
    activatable: bool,
    /// The local tier has a READY instance.
    local_ready: bool,
    /// Expected cold start from the table (0: unknown).
    cold_start_ms: u128,
    /// The agent's word on the local instances: failed starts in a row, and a restart backoff.
    local_failed_starts: u32,
    local_restart_backoff: bool,
    /// Requests held now, waiting for a local instance.
    held: u32,
    policy: PolicyView<'a>,
    tiers: Vec<TierView<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PolicyView<'a> {
    timeout_ms: u128,
    per_try_timeout_ms: u128,
    max_retries: u32,
    retryable_methods: Vec<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TierView<'a> {
    region: &'a str,
    local: bool,
    order: &'static str,
    /// Position in the current priority order (None: not eligible from the outbound listener).
    priority: Option<usize>,
    ready_instances: u32,
    health_percent: f64,
    load_percent: f64,
    endpoints: Vec<EndpointView<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EndpointView<'a> {
    address: &'a str,
    id: &'a str,
    zone: &'a str,
    state: &'static str,
    available: bool,
    in_flight: usize,
    ewma_ms: f64,
    consecutive_failures: u32,
    ejected: bool,
    ejected_for_ms: Option<u128>,
    ejections: u64,
    probe: Option<&'static str>,
    rtt_ms: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::tests::{route, table, tier};
    use crate::routes::Compiler;
    use http_body_util::BodyExt;

    async fn body(response: Response<Full<Bytes>>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn ready_metrics_and_routes() {
        let state = Arc::new(ArcSwapOption::empty());
        let admin = Admin::new(
            "us-east",
            Arc::clone(&state),
            Arc::new(ArcSwapOption::empty()),
            Arc::new(GlobalStats::default()),
        );
        assert_eq!(
            admin.respond(&Method::GET, "/ready").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let compiled = Compiler::new("us-east")
            .compile(&table(vec![route(
                "default",
                "hello",
                vec![
                    tier("us-east", true, &["127.0.1.1:9000"]),
                    tier("eu-west", false, &["127.0.2.1:15002"]),
                ],
            )]))
            .unwrap();
        compiled.functions().next().unwrap().tiers[0]
            .stats
            .responses
            .record(200);
        state.store(Some(Arc::new(compiled)));
        assert_eq!(
            admin.respond(&Method::GET, "/ready").status(),
            StatusCode::OK
        );

        let metrics = body(admin.respond(&Method::GET, "/metrics")).await;
        assert!(
            metrics.contains(
                r#"meridian_requests_total{function="hello",tier="us-east",status="200"} 1"#
            ),
            "{metrics}"
        );
        assert!(metrics.contains(r#"meridian_retries_total{function="hello"} 0"#));

        let routes: serde_json::Value =
            serde_json::from_str(&body(admin.respond(&Method::GET, "/routes")).await).unwrap();
        assert_eq!(routes["version"], 7);
        assert_eq!(routes["localGeneration"], 0);
        assert_eq!(routes["functions"][0]["workload"], "none");
        assert_eq!(routes["functions"][0]["localReady"], true);
        assert_eq!(routes["functions"][0]["held"], 0);
        let tiers = &routes["functions"][0]["tiers"];
        assert_eq!(tiers[0]["healthPercent"], 100.0);
        assert_eq!(tiers[0]["loadPercent"], 100.0);
        assert_eq!(tiers[1]["endpoints"][0]["probe"], "unknown");
        assert_eq!(routes["gateways"][0]["address"], "127.0.2.1:15002");

        assert_eq!(
            admin.respond(&Method::GET, "/nope").status(),
            StatusCode::NOT_FOUND
        );
    }
}
