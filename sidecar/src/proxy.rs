//! The request path: find the function by Host / :authority, pick a tier (priority load) and an
//! endpoint in it (P2C), forward with pooled hyper clients, retry elsewhere within the budget and
//! the timeouts, and answer every failure at once with a reason. No lock is taken: the routing
//! state is loaded from an `ArcSwap`, and everything that changes is an atomic. A process
//! function without a ready local instance goes through the activator first (`cold`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use crate::activator::{Activator, ColdPlan, GoRemote, HoldRules, Released, MERIDIAN_HELD_MS};
use crate::balance::{self, Tried};
use crate::body::{
    BodyLimits, BodyWatch, ClientBody, ClientBodyError, Replayable, RequestBody, ResponseBody,
};
use crate::endpoints::{InFlight, ProbeState};
use crate::errors::{ProxyError, MERIDIAN_HOP, MERIDIAN_PREFIX, MERIDIAN_REGION};
use crate::health::{self, HEALTH_PATH};
use crate::metrics::GlobalStats;
use crate::priority::{self, MAX_TIERS};
use crate::routes::{Endpoint, FunctionRoute, HostError, RoutingState, Tier};
use crate::spans::{RequestSpan, SpanFactory};

/// Request headers beyond this many bytes are refused with 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Bodies up to this size (with a known length) are kept to be replayed on a retry; larger or
/// unknown-length bodies are streamed through and never retried.
pub const MAX_REPLAY_BYTES: u64 = 64 * 1024;
/// Connection attempts give up after this (the per-try timeout may cut them shorter).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 header lists accepted from peers: above our own 64 KiB check, so that check answers.
pub const MAX_H2_HEADER_LIST: u32 = 256 * 1024;
/// How long a client may leave an unfinished request body without sending more, by default.
/// The function's per-try and total timeouts usually end a stalled request sooner; this one
/// also bounds a body still streaming after the function has answered.
pub const DEFAULT_REQUEST_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The default limits on a client's request body: the idle timeout above, and no size limit
/// (bodies are streamed, so size costs no memory).
pub const DEFAULT_BODY_LIMITS: BodyLimits = BodyLimits {
    idle_timeout: Some(DEFAULT_REQUEST_BODY_IDLE_TIMEOUT),
    max_bytes: None,
};

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// Applications of this region: any tier.
    Outbound,
    /// Other regions' sidecars: local instances only, so a request never travels to a third
    /// region (no loops).
    Gateway,
}

pub type HttpClient = Client<HttpConnector, RequestBody>;

/// Builds the pooled client: HTTP/1.1, or HTTP/2 with prior knowledge (h2c).
pub fn client(http2: bool) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90));
    if http2 {
        builder
            .http2_only(true)
            .http2_adaptive_window(true)
            .http2_max_header_list_size(MAX_H2_HEADER_LIST);
    }
    builder.build(connector)
}

/// The proxy shared by every connection of both listeners.
#[derive(Debug)]
pub struct Proxy {
    region: &'static str,
    region_header: HeaderValue,
    state: Arc<ArcSwapOption<RoutingState>>,
    http1: HttpClient,
    http2: HttpClient,
    global: Arc<GlobalStats>,
    activator: Arc<Activator>,
    body_limits: BodyLimits,
    /// `Some` only when span export is on (decided once, at start): with `None` the request
    /// path does no tracing work at all.
    spans: Option<SpanFactory>,
}

/// Where one attempt goes.
#[derive(Debug, Clone, Copy)]
pub struct Pick<'s> {
    /// Index of the tier in the function's `tiers`.
    pub index: usize,
    pub tier: &'s Tier,
    pub endpoint: &'s Endpoint,
}

/// Why no endpoint could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// The function has no endpoint that could take traffic at all.
    NoEndpoints,
    /// It has some, but every one is ejected, down or already tried.
    AllEjected,
}

/// The priority computation for one request: tiers in the order tried, their health and load.
#[derive(Debug)]
pub struct Plan {
    pub len: usize,
    /// Tier indices, in priority order.
    pub order: [usize; MAX_TIERS],
    /// Permille, by position in `order`.
    pub health: [u32; MAX_TIERS],
    pub load: [u32; MAX_TIERS],
    /// Endpoints that may take this request, by position in `order`.
    pub eligible: [usize; MAX_TIERS],
    /// Endpoints that could take traffic if healthy (allowed tiers, routable state).
    pub candidates: usize,
}

/// Whether `endpoint` of `tier` may be sent a request now (ignoring retries).
pub fn available(tier: &Tier, endpoint: &Endpoint, now: u64) -> bool {
    endpoint.routable
        && !endpoint.shared.is_ejected(now)
        && (tier.local || endpoint.shared.probe_state() != ProbeState::Down)
}

/// Computes the priority load of `function`'s tiers for one request. `avoid` is a bitmask of
/// tier indices that failed regionally for this request.
pub fn plan(
    function: &FunctionRoute,
    now: u64,
    local_only: bool,
    tried: &Tried,
    avoid: u32,
) -> Plan {
    let mut plan = Plan {
        len: 0,
        order: [0; MAX_TIERS],
        health: [0; MAX_TIERS],
        load: [0; MAX_TIERS],
        eligible: [0; MAX_TIERS],
        candidates: 0,
    };
    plan.len = priority::order(&function.tiers, &mut plan.order);
    for slot in 0..plan.len {
        let index = plan.order[slot];
        let Some(tier) = function.tiers.get(index) else {
            continue;
        };
        if local_only && !tier.local {
            continue;
        }
        // A remote region with no ready instance behind its gateways cannot serve.
        if !tier.local && tier.ready_instances == 0 {
            continue;
        }
        let avoided = index < 32 && avoid & (1 << index) != 0;
        let mut eligible = 0;
        for endpoint in &tier.endpoints {
            if !endpoint.routable {
                continue;
            }
            plan.candidates += 1;
            if !avoided && available(tier, endpoint, now) && !tried.contains(&endpoint.shared) {
                eligible += 1;
            }
        }
        plan.eligible[slot] = eligible;
        plan.health[slot] = priority::tier_health(eligible, tier.endpoints.len());
    }
    priority::priority_load(&plan.health[..plan.len], &mut plan.load[..plan.len]);
    plan
}

/// Picks the tier by priority load and the endpoint in it by P2C.
pub fn choose<'f>(
    function: &'f FunctionRoute,
    now: u64,
    local_only: bool,
    tried: &Tried,
    avoid: u32,
) -> Result<Pick<'f>, Unavailable> {
    let plan = plan(function, now, local_only, tried, avoid);
    let total: u32 = plan.load[..plan.len].iter().sum();
    if total == 0 {
        return Err(if plan.candidates == 0 {
            Unavailable::NoEndpoints
        } else {
            Unavailable::AllEjected
        });
    }
    let roll = u32::try_from(balance::random() % u64::from(total)).unwrap_or(0);
    let slot = priority::pick(&plan.load[..plan.len], roll).ok_or(Unavailable::AllEjected)?;
    let index = plan.order[slot];
    let tier = function.tiers.get(index).ok_or(Unavailable::AllEjected)?;
    let endpoint = balance::p2c(&tier.endpoints, plan.eligible[slot], |e| {
        available(tier, e, now) && !tried.contains(&e.shared)
    })
    .ok_or(Unavailable::AllEjected)?;
    Ok(Pick {
        index,
        tier,
        endpoint,
    })
}

/// Counts a request whose client went away before it was answered: the server then drops the
/// request's future (an HTTP/2 stream reset, a closed connection) wherever it was, so nothing
/// else records it, and it must show as the client's doing, never an endpoint's.
struct Abandoned<'g> {
    global: &'g GlobalStats,
    armed: bool,
}

impl<'g> Abandoned<'g> {
    fn armed(global: &'g GlobalStats) -> Self {
        Self {
            global,
            armed: true,
        }
    }

    /// The request was answered (whatever the answer).
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.armed {
            let reason = crate::errors::Reason::ClientDisconnected;
            self.global.client_faults.record(reason);
            tracing::debug!(
                blame = "client",
                "the client went away before its request was answered"
            );
        }
    }
}

/// How one attempt ended: an answer, an upstream client error, or the per-try timeout.
type AttemptOutcome = Result<
    Result<Response<Incoming>, hyper_util::client::legacy::Error>,
    tokio::time::error::Elapsed,
>;

/// What went wrong with the last attempt, kept in case no retry follows.
enum Failure<'s> {
    /// An upstream 5xx: passed on as is if it is the final answer.
    Response {
        response: Response<Incoming>,
        in_flight: InFlight,
        tier: &'s Tier,
    },
    /// No response. `sent`: the request may have reached the endpoint (only idempotent
    /// methods may then be retried).
    Error {
        error: ProxyError,
        sent: bool,
        tier: &'s Tier,
    },
}

impl Failure<'_> {
    fn sent(&self) -> bool {
        match self {
            Failure::Response { .. } => true,
            Failure::Error { sent, .. } => *sent,
        }
    }

    fn describe(&self) -> String {
        match self {
            Failure::Response {
                response,
                in_flight,
                ..
            } => format!(
                "{} answered {}",
                in_flight.endpoint().address(),
                response.status()
            ),
            Failure::Error { error, .. } => crate::error_chain(error),
        }
    }

    fn tier(&self) -> &Tier {
        match self {
            Failure::Response { tier, .. } | Failure::Error { tier, .. } => tier,
        }
    }
}

impl Proxy {
    /// `region` must be a valid header value (a DNS label is).
    pub fn new(
        region: &str,
        state: Arc<ArcSwapOption<RoutingState>>,
        global: Arc<GlobalStats>,
        activator: Arc<Activator>,
    ) -> Result<Self, http::header::InvalidHeaderValue> {
        // Leaked once per proxy so every response's header is a static copy, not an allocation.
        let leaked: &'static str = Box::leak(region.to_owned().into_boxed_str());
        let region_header = HeaderValue::from_maybe_shared(Bytes::from_static(leaked.as_bytes()))?;
        Ok(Self {
            region: leaked,
            region_header,
            state,
            http1: client(false),
            http2: client(true),
            global,
            activator,
            body_limits: DEFAULT_BODY_LIMITS,
            spans: SpanFactory::when_enabled(),
        })
    }

    /// Replaces [`DEFAULT_BODY_LIMITS`].
    pub fn with_body_limits(mut self, limits: BodyLimits) -> Self {
        self.body_limits = limits;
        self
    }

    pub fn state(&self) -> &Arc<ArcSwapOption<RoutingState>> {
        &self.state
    }

    /// Serves one request; never fails (failures are responses).
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        listener: Listener,
    ) -> Response<ResponseBody> {
        // Probes are not traced: one every half second per peer would drown the requests.
        if listener == Listener::Gateway && request.uri().path() == HEALTH_PATH {
            return self.health();
        }
        let abandoned = Abandoned::armed(&self.global);
        let Some(spans) = &self.spans else {
            let response = self.serve(request, listener, None).await;
            abandoned.disarm();
            return response;
        };
        // A gateway request names the region it comes from in the hop header.
        let source = match listener {
            Listener::Gateway => request
                .headers()
                .get(MERIDIAN_HOP)
                .and_then(|value| value.to_str().ok())
                .unwrap_or(self.region),
            Listener::Outbound => self.region,
        };
        let span = spans.request(request.headers(), request.method(), source);
        let response = self.serve(request, listener, Some(&span)).await;
        abandoned.disarm();
        span.finish(response.status().as_u16());
        response
    }

    async fn serve(
        &self,
        request: Request<Incoming>,
        listener: Listener,
        trace: Option<&RequestSpan>,
    ) -> Response<ResponseBody> {
        let start = Instant::now();
        let size = header_bytes(request.headers());
        if size > MAX_HEADER_BYTES {
            return self.unrouted(ProxyError::HeadersTooLarge {
                size,
                limit: MAX_HEADER_BYTES,
            });
        }
        // Framing and size are the client's to get right, and are refused before anything is
        // routed: such a request never reaches an endpoint, so it cannot count against one.
        if let Err(error) = check_framing(request.headers()) {
            return self.unrouted(error);
        }
        if let (Some(limit), Some(length)) = (
            self.body_limits.max_bytes,
            request.body().size_hint().exact(),
        ) {
            if length > limit {
                return self.unrouted(ProxyError::DeclaredTooLarge { length, limit });
            }
        }
        let Some(state) = self.state.load_full() else {
            return self.unrouted(ProxyError::NoTable);
        };
        let function = match request_host(&request) {
            Err(error) => return self.unrouted(error),
            Ok(host) => match state.lookup(host) {
                Ok(function) => function,
                Err(HostError::Unknown) => {
                    let host = host.to_owned();
                    return self.unrouted(ProxyError::UnknownFunction { host });
                }
                Err(HostError::Malformed(why)) => {
                    let host = host.to_owned();
                    return self.unrouted(ProxyError::BadHost { host, why });
                }
            },
        };
        if let Some(span) = trace {
            span.function(&function.namespace, &function.name);
        }
        // External functions (and the benchmark) pay this one branch; process functions one
        // relaxed add for the load report, and a cold start detour when nothing is ready.
        if function.is_process() {
            function.stats().load.arrived();
            if function.needs_activation() {
                return self
                    .cold(&state, function, request, listener, start, trace)
                    .await;
            }
        }
        self.forward(&state, function, request, listener, start, trace)
            .await
    }

    /// A request for a process function with no ready local instance: ask the agent for one,
    /// and either route to a remote region at once (outbound only: the local instances
    /// crash-loop, or a warm region is nearer than a cold start) or hold the request until an
    /// instance is ready (or, outbound, until the hold's bound sends it to a healthy remote
    /// tier), then take the normal path.
    async fn cold(
        &self,
        state: &Arc<RoutingState>,
        function: &Arc<FunctionRoute>,
        request: Request<Incoming>,
        listener: Listener,
        start: Instant,
        trace: Option<&RequestSpan>,
    ) -> Response<ResponseBody> {
        let now = state.clock().now();
        self.activator.activate(function, now);
        if let ColdPlan::Remote(why) = self.activator.rules().plan(function, now, listener) {
            if matches!(why, GoRemote::CrashLoop { .. }) {
                let hold = &function.stats().hold;
                hold.crash_loop_remote.fetch_add(1, Ordering::Relaxed);
            }
            return self
                .forward(state, function, request, listener, start, trace)
                .await;
        }
        let stats = Arc::clone(function.stats());
        let limit = self.activator.hold_queue();
        let Some(place) = stats.load.try_hold(limit) else {
            stats.hold.queue_full.fetch_add(1, Ordering::Relaxed);
            let error = ProxyError::HoldQueueFull {
                function: function.label().to_owned(),
                limit,
            };
            return self.fail(function, None, error, start);
        };
        stats.hold.holds.fetch_add(1, Ordering::Relaxed);
        let held_since = Instant::now();
        let deadline = self.activator.hold_deadline(function, start);
        let outcome = self
            .activator
            .hold(function.label(), listener, held_since, deadline)
            .await;
        let held = held_since.elapsed();
        let millis = u64::try_from(held.as_millis()).unwrap_or(u64::MAX);
        if let Some(span) = trace {
            span.held(millis);
        }
        // From here on the request is in flight (or answered), no longer held.
        drop(place);
        let mut response = match outcome {
            Ok(Released::Route(state, function)) => {
                self.forward(&state, &function, request, listener, start, trace)
                    .await
            }
            Ok(Released::Gone) => self.unrouted(ProxyError::UnknownFunction {
                host: function.label().to_owned(),
            }),
            Err(_timeout) => {
                stats
                    .hold
                    .cold_start_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                let error = ProxyError::ColdStartTimeout {
                    function: function.label().to_owned(),
                    waited: held,
                };
                self.fail(function, None, error, start)
            }
        };
        response
            .headers_mut()
            .insert(MERIDIAN_HELD_MS, HeaderValue::from(millis));
        response
    }

    async fn forward(
        &self,
        state: &RoutingState,
        function: &FunctionRoute,
        request: Request<Incoming>,
        listener: Listener,
        start: Instant,
        trace: Option<&RequestSpan>,
    ) -> Response<ResponseBody> {
        let policy = &function.policy;
        let deadline = start + policy.timeout;
        function.budget().deposit();
        let local_only = listener == Listener::Gateway;
        let (mut parts, body) = request.into_parts();
        let method_retryable = policy.retryable(&parts.method);
        strip_hop_by_hop(&mut parts.headers);
        strip_internal(&mut parts.headers, listener);
        // The function name travels in Host: the legacy client puts the endpoint's address in
        // the URI (and, for HTTP/2, in :authority), and a remote gateway routes by Host. The
        // request was routed by an HTTP/1.x absolute-form target's authority when it had one,
        // so Host must say the same.
        let routed_by_uri = parts.version < http::Version::HTTP_2;
        if routed_by_uri || !parts.headers.contains_key(HOST) {
            if let Some(value) = parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                parts.headers.insert(HOST, value);
            }
        }

        // A small body of known length is kept so a retry can send it again; anything else
        // streams through once, watched so that its failures are blamed on the client. (An
        // empty body is never wrapped: most requests pay nothing for this.)
        let mut stream = None;
        let mut watch: Option<Arc<BodyWatch>> = None;
        let replay = if body.is_end_stream() {
            Some(Replayable::default())
        } else if policy.max_retries > 0
            && body
                .size_hint()
                .exact()
                .is_some_and(|n| n <= MAX_REPLAY_BYTES)
        {
            let body = ClientBody::new(body, self.body_limits);
            match tokio::time::timeout_at(deadline, body.collect()).await {
                Ok(Ok(collected)) => {
                    let trailers = collected.trailers().cloned();
                    Some(Replayable::new(collected.to_bytes(), trailers))
                }
                Ok(Err(error)) => {
                    return self.fail(function, None, ProxyError::ClientBody(error), start)
                }
                Err(_) => {
                    let error = ClientBodyError::Unfinished(policy.timeout);
                    return self.fail(function, None, ProxyError::ClientBody(error), start);
                }
            }
        } else {
            let body = ClientBody::new(body, self.body_limits);
            watch = Some(Arc::clone(body.watch()));
            stream = Some(body);
            None
        };

        let http2 = parts.version == Version::HTTP_2;
        let client = if http2 { &self.http2 } else { &self.http1 };
        if !http2 {
            // HTTP/1.0 clients still get pooled keep-alive connections upstream.
            parts.version = Version::HTTP_11;
        }
        let max_attempts = policy.max_retries.saturating_add(1);
        let mut headers = Some(std::mem::take(&mut parts.headers));
        let mut tried = Tried::default();
        let mut avoid: u32 = 0;
        let mut last: Option<Failure<'_>> = None;

        for attempt in 0..max_attempts {
            if let Some(failure) = &last {
                // Only a replayable body can be sent again, and only a request that did not
                // reach anyone, or that is safe to repeat.
                if replay.is_none() || (failure.sent() && !method_retryable) {
                    break;
                }
                if Instant::now() >= deadline {
                    break;
                }
            }
            let now = state.clock().now();
            let pick = match choose(function, now, local_only, &tried, avoid) {
                Ok(pick) => pick,
                Err(unavailable) if last.is_none() => {
                    let error = match unavailable {
                        Unavailable::NoEndpoints => ProxyError::NoEndpoints {
                            function: function.label().to_owned(),
                            where_: if local_only { " in this region" } else { "" },
                        },
                        Unavailable::AllEjected => ProxyError::AllEjected {
                            function: function.label().to_owned(),
                        },
                    };
                    return self.fail(function, None, error, start);
                }
                // Nowhere else to go: answer with what the last attempt got.
                Err(_) => break,
            };
            if let Some(failure) = &last {
                if !function.budget().withdraw() {
                    self.global.budget_exhausted.fetch_add(1, Ordering::Relaxed);
                    if let Some(span) = trace {
                        span.reason("budget-exhausted");
                    }
                    let error = ProxyError::BudgetExhausted {
                        last: failure.describe(),
                    };
                    return self.fail(function, Some(failure.tier()), error, start);
                }
                function.stats().retries.fetch_add(1, Ordering::Relaxed);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            let per_try = policy.per_try_timeout.min(remaining);
            let endpoint = &pick.endpoint.shared;
            tried.insert(endpoint);

            let final_attempt = replay.is_none() || attempt + 1 >= max_attempts;
            let attempt_headers = if final_attempt {
                headers.take()
            } else {
                headers.clone()
            };
            let body = match (&replay, stream.take()) {
                (Some(replay), _) => replay.body(),
                (None, Some(stream)) => RequestBody::Stream(stream),
                (None, None) => break,
            };
            let Some(mut attempt_headers) = attempt_headers else {
                break;
            };
            let attempt_span = match (trace, &self.spans) {
                (Some(request_span), Some(spans)) => {
                    let span = spans.attempt(
                        request_span,
                        attempt.saturating_add(1),
                        &pick.tier.region,
                        pick.tier.local,
                        endpoint.address(),
                        || {
                            let rules = self.activator.rules();
                            attempt_reason(last.as_ref(), pick, function, rules, local_only, now)
                        },
                    );
                    span.inject(&mut attempt_headers);
                    Some(span)
                }
                _ => None,
            };
            let hop = (!pick.tier.local).then_some(&self.region_header);
            let upstream = match build_request(&parts, attempt_headers, body, pick, hop) {
                Ok(upstream) => upstream,
                Err(error) => return self.fail(function, Some(pick.tier), error, start),
            };

            let in_flight = endpoint.start_request();
            let sent_at = Instant::now();
            let outcome: AttemptOutcome =
                tokio::time::timeout(per_try, client.request(upstream)).await;
            if let Some(span) = attempt_span {
                match &outcome {
                    Ok(Ok(response)) => span.answered(response.status().as_u16()),
                    Ok(Err(error)) => span.failed(crate::error_chain(error)),
                    Err(_) => span.failed(format!("no response within {per_try:?}")),
                }
            }
            // A failure the client caused ends the request here: the endpoint is not blamed
            // (no failure streak, no ejection, no region marked down), nothing is retried, and
            // the client is told what it did.
            if let Some(error) = watch.as_deref().and_then(|watch| {
                let timeout = if Instant::now() >= deadline {
                    policy.timeout
                } else {
                    per_try
                };
                Self::client_fault(watch, &outcome, timeout)
            }) {
                drop(in_flight);
                return self.fail(
                    function,
                    Some(pick.tier),
                    ProxyError::ClientBody(error),
                    start,
                );
            }
            let now = state.clock().now();
            match outcome {
                Ok(Ok(response)) => {
                    endpoint.observe_latency(now, sent_at.elapsed());
                    if response.status().is_server_error() {
                        // A remote gateway's 5xx is the remote region's answer (its own
                        // sidecar already ejects its instances): retried, not held against
                        // the gateway, which serves every other function too.
                        if pick.tier.local {
                            health::record_failure(pick.tier, endpoint, now, &self.global);
                        }
                        last = Some(Failure::Response {
                            response,
                            in_flight,
                            tier: pick.tier,
                        });
                        continue;
                    }
                    endpoint.record_success(now);
                    return self.respond(function, pick.tier, response, in_flight, start);
                }
                Ok(Err(source)) => {
                    drop(in_flight);
                    let connect = source.is_connect();
                    if pick.tier.local && connect {
                        health::record_unreachable(pick.tier, endpoint, now, &self.global);
                    } else if pick.tier.local {
                        health::record_failure(pick.tier, endpoint, now, &self.global);
                    } else {
                        // A gateway we cannot connect to: its region looks gone. Stop sending
                        // there until a probe says otherwise, and retry in another region.
                        if connect {
                            endpoint.mark_down();
                        }
                        avoid |= tier_bit(pick.index);
                    }
                    tracing::debug!(endpoint = endpoint.address(), error = %crate::error_chain(&source), "attempt failed");
                    last = Some(Failure::Error {
                        error: ProxyError::Upstream {
                            endpoint: endpoint.address().to_owned(),
                            source,
                        },
                        sent: !connect,
                        tier: pick.tier,
                    });
                }
                Err(_elapsed) => {
                    drop(in_flight);
                    if pick.tier.local {
                        health::record_failure(pick.tier, endpoint, now, &self.global);
                    } else {
                        avoid |= tier_bit(pick.index);
                    }
                    let error = if Instant::now() >= deadline {
                        ProxyError::Timeout(policy.timeout)
                    } else {
                        ProxyError::TryTimeout {
                            endpoint: endpoint.address().to_owned(),
                            after: per_try,
                        }
                    };
                    last = Some(Failure::Error {
                        error,
                        sent: true,
                        tier: pick.tier,
                    });
                }
            }
        }

        match last {
            Some(Failure::Response {
                response,
                in_flight,
                tier,
            }) => self.respond(function, tier, response, in_flight, start),
            Some(Failure::Error { error, tier, .. }) => {
                let error = if Instant::now() >= deadline {
                    ProxyError::Timeout(policy.timeout)
                } else {
                    error
                };
                self.fail(function, Some(tier), error, start)
            }
            None => self.fail(function, None, ProxyError::Timeout(policy.timeout), start),
        }
    }

    /// Whether an attempt that streamed the client's body failed through the client's fault:
    /// the body failed (whatever the upstream client then reported, or a 5xx the endpoint
    /// answered to a cut-off body), or a timeout passed while the proxy was waiting for the
    /// client's next bytes. A successful answer is the endpoint's, whatever the body did later.
    /// `timeout` is the one that ends the attempt if it timed out.
    fn client_fault(
        watch: &BodyWatch,
        outcome: &AttemptOutcome,
        timeout: Duration,
    ) -> Option<ClientBodyError> {
        match outcome {
            Ok(Ok(response)) if !response.status().is_server_error() => None,
            Ok(_) => watch.client_fault(None),
            Err(_elapsed) => watch.client_fault(Some(timeout)),
        }
    }

    /// Passes an upstream response on, with `meridian-region` set: this region for local
    /// instances; for a remote tier the remote gateway's own header (added if missing).
    fn respond(
        &self,
        function: &FunctionRoute,
        tier: &Tier,
        response: Response<Incoming>,
        in_flight: InFlight,
        start: Instant,
    ) -> Response<ResponseBody> {
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if tier.local {
            parts
                .headers
                .insert(MERIDIAN_REGION, self.region_header.clone());
        } else if !parts.headers.contains_key(MERIDIAN_REGION) {
            parts
                .headers
                .insert(MERIDIAN_REGION, tier.region_header.clone());
        }
        tier.stats.responses.record(parts.status.as_u16());
        function.stats().latency.observe(start.elapsed());
        Response::from_parts(parts, ResponseBody::Upstream { body, in_flight })
    }

    fn fail(
        &self,
        function: &FunctionRoute,
        tier: Option<&Tier>,
        error: ProxyError,
        start: Instant,
    ) -> Response<ResponseBody> {
        let reason = error.reason();
        if reason.is_client_fault() {
            self.global.client_faults.record(reason);
            tracing::debug!(function = function.label(), blame = "client", error = %crate::error_chain(&error), "request failed by its client; no endpoint is blamed");
        } else {
            tracing::debug!(function = function.label(), error = %crate::error_chain(&error), "request failed");
        }
        let response = error.to_response(&self.region_header);
        let status = response.status().as_u16();
        match tier {
            Some(tier) => tier.stats.responses.record(status),
            None => function.stats().untiered.record(status),
        }
        function.stats().latency.observe(start.elapsed());
        response
    }

    fn unrouted(&self, error: ProxyError) -> Response<ResponseBody> {
        let reason = error.reason();
        if reason.is_client_fault() {
            self.global.client_faults.record(reason);
            tracing::debug!(blame = "client", error = %crate::error_chain(&error), "request refused");
        }
        let response = error.to_response(&self.region_header);
        self.global.unrouted.record(response.status().as_u16());
        response
    }

    fn health(&self) -> Response<ResponseBody> {
        let mut response = Response::new(ResponseBody::full(Bytes::from_static(b"ok\n")));
        *response.status_mut() = StatusCode::OK;
        response
            .headers_mut()
            .insert(MERIDIAN_REGION, self.region_header.clone());
        response
    }
}

/// Why an attempt goes where it goes, for its span: the failure it retries (`region-down` when a
/// remote gateway could not be reached, else `retry: <status or error>`), or for a first attempt
/// that leaves the region although it has a local tier, why the local tier was passed over
/// (`crash-loop` by the activator's `rules`, `cold-start`, `ejected`, else `spill`: priority
/// load moved to the next tier). Only called when tracing is on.
fn attempt_reason(
    last: Option<&Failure<'_>>,
    pick: Pick<'_>,
    function: &FunctionRoute,
    rules: &HoldRules,
    local_only: bool,
    now: u64,
) -> Option<String> {
    match last {
        Some(Failure::Error {
            error: ProxyError::Upstream { source, .. },
            tier,
            ..
        }) if !tier.local && source.is_connect() => Some("region-down".to_owned()),
        Some(Failure::Response { response, .. }) => {
            Some(format!("retry: {}", response.status().as_u16()))
        }
        Some(Failure::Error { error, .. }) => Some(format!("retry: {}", crate::error_chain(error))),
        None if pick.tier.local || local_only => None,
        None => {
            let local = function.local_tier()?;
            let reason = if function.needs_activation() && rules.crash_looping(function) {
                "crash-loop"
            } else if function.is_process() && !function.local_ready {
                "cold-start"
            } else if local.endpoints.iter().any(|e| e.shared.is_ejected(now)) {
                "ejected"
            } else {
                "spill"
            };
            Some(reason.to_owned())
        }
    }
}

fn tier_bit(index: usize) -> u32 {
    u32::try_from(index)
        .ok()
        .and_then(|i| 1u32.checked_shl(i))
        .unwrap_or(0)
}

/// The host the request names. HTTP/1.x: an absolute-form target's authority wins over Host
/// (RFC 9112 §3.2.2). HTTP/2: Host when present (a sidecar forwarding to a gateway puts the
/// gateway's address in :authority and the function in Host), else :authority. Two Host headers
/// are refused (§3.2): they are how request smuggling and routing confusion start.
#[doc(hidden)] // pub for the fuzz harness (meridian-fuzz), not an API
pub fn request_host<B>(request: &Request<B>) -> Result<&str, ProxyError> {
    let mut hosts = request.headers().get_all(HOST).iter();
    if let (Some(first), Some(_)) = (hosts.next(), hosts.next()) {
        return Err(ProxyError::BadHost {
            host: String::from_utf8_lossy(first.as_bytes()).into_owned(),
            why: "the request has more than one Host header",
        });
    }
    if request.version() < http::Version::HTTP_2 {
        if let Some(authority) = request.uri().authority() {
            return Ok(authority.as_str());
        }
    }
    if let Some(value) = request.headers().get(HOST) {
        return value.to_str().map_err(|_| ProxyError::BadHost {
            host: String::from_utf8_lossy(value.as_bytes()).into_owned(),
            why: "the host is not visible ASCII",
        });
    }
    request
        .uri()
        .authority()
        .map(|authority| authority.as_str())
        .ok_or(ProxyError::MissingHost)
}

/// Size of the header section as sent on HTTP/1.1 (`name: value\r\n` each).
#[doc(hidden)] // pub for the fuzz harness
pub fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

/// Refuses a request whose body framing another hop could read differently (request
/// smuggling): hyper takes any Transfer-Encoding whose last coding is `chunked` (`identity,
/// chunked`, `gzip, chunked`, or several lines) and silently drops a Content-Length beside it.
/// Only a single `Transfer-Encoding: chunked` without Content-Length is let through.
#[doc(hidden)] // pub for the fuzz harness
pub fn check_framing(headers: &HeaderMap) -> Result<(), ProxyError> {
    let mut codings = headers.get_all(TRANSFER_ENCODING).iter();
    let Some(first) = codings.next() else {
        return Ok(());
    };
    let unambiguous = codings.next().is_none()
        && first
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"chunked")
        && !headers.contains_key(CONTENT_LENGTH);
    if unambiguous {
        return Ok(());
    }
    let mut value = headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect::<Vec<_>>()
        .join(", ");
    if headers.contains_key(CONTENT_LENGTH) {
        value.push_str(" (with Content-Length)");
    }
    Err(ProxyError::AmbiguousTransferEncoding { value })
}

/// Removes connection-scoped headers (RFC 9110 §7.6.1): they describe one hop, and forwarding
/// e.g. `Connection: close` would close the pooled upstream connection every time. Every
/// `Connection` line counts: a second one must not carry a header past. Transfer-Encoding is
/// this hop's framing (the upstream client frames the body itself). `Trailer` is kept: it is
/// end-to-end (RFC 9110 §6.6.2), and hyper sends only the trailer fields it announces.
#[doc(hidden)] // pub for the fuzz harness
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut lines = headers.get_all(CONNECTION).iter();
    if let (Some(_), Some(_)) = (lines.next(), lines.next()) {
        let lines: Vec<HeaderValue> = headers.get_all(CONNECTION).iter().cloned().collect();
        headers.remove(CONNECTION);
        for line in &lines {
            strip_named(headers, line);
        }
    } else if let Some(line) = headers.remove(CONNECTION) {
        strip_named(headers, &line);
    }
    headers.remove(KEEP_ALIVE);
    headers.remove(PROXY_CONNECTION);
    // The proxy performs no upgrades (it has no tunnel), so Upgrade never applies upstream.
    headers.remove(UPGRADE);
    headers.remove(TRANSFER_ENCODING);
    // gRPC needs `te: trailers` end to end; any other TE is hop-by-hop.
    if let Some(te) = headers.get(TE) {
        if te.as_bytes() != b"trailers" {
            headers.remove(TE);
        }
    }
}

/// Removes the headers one `Connection` line names. TE is decided by [`strip_hop_by_hop`] itself,
/// and Host is how the request is routed upstream: neither is the client's to drop.
fn strip_named(headers: &mut HeaderMap, line: &HeaderValue) {
    let Ok(list) = line.to_str() else {
        return;
    };
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        if name != TE && name != HOST {
            headers.remove(name);
        }
    }
}

/// Removes the mesh's own headers (`meridian-*`) from a request before it goes on, so that
/// nothing a client sets can pass for the mesh's word: a function, or another region's
/// gateway, must be able to trust them. The one header the mesh forwards on purpose is
/// `meridian-hop`, which a sidecar sets towards another region's gateway to name the region
/// the call comes from: the gateway listener keeps it (one valid region name, else it is
/// dropped) and passes it to the function; the outbound listener never lets a client's through
/// (a request leaving the region gets this sidecar's own in `build_request`).
#[doc(hidden)] // pub for the fuzz harness
pub fn strip_internal(headers: &mut HeaderMap, listener: Listener) {
    let keep_hop = listener == Listener::Gateway && valid_hop(headers);
    let internal = |name: &HeaderName| {
        name.as_str().starts_with(MERIDIAN_PREFIX) && !(keep_hop && *name == MERIDIAN_HOP)
    };
    // Almost every request has none: look before allocating.
    if !headers.keys().any(internal) {
        return;
    }
    let names: Vec<HeaderName> = headers.keys().filter(|n| internal(n)).cloned().collect();
    for name in names {
        headers.remove(name);
    }
}

/// Whether the request carries exactly one `meridian-hop`, and it is a region name.
fn valid_hop(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(MERIDIAN_HOP).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => value
            .to_str()
            .is_ok_and(|region| meridian_common::names::validate_dns_label(region).is_ok()),
        _ => false,
    }
}

fn build_request(
    parts: &http::request::Parts,
    headers: HeaderMap,
    body: RequestBody,
    pick: Pick<'_>,
    hop: Option<&HeaderValue>,
) -> Result<Request<RequestBody>, ProxyError> {
    let endpoint = &pick.endpoint.shared;
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(endpoint.authority().clone());
    uri.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    let uri = Uri::from_parts(uri).map_err(|source| ProxyError::BadUri {
        endpoint: endpoint.address().to_owned(),
        source,
    })?;
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = parts.version;
    *request.headers_mut() = headers;
    if let Some(hop) = hop {
        request.headers_mut().insert(MERIDIAN_HOP, hop.clone());
    }
    Ok(request)
}

/// The proxy as a tower `Service` for one listener (boxed future; the servers use
/// [`Proxy::handle`] directly, which needs no box).
#[derive(Debug, Clone)]
pub struct ProxyService {
    proxy: Arc<Proxy>,
    listener: Listener,
}

impl ProxyService {
    pub fn new(proxy: Arc<Proxy>, listener: Listener) -> Self {
        Self { proxy, listener }
    }
}

impl tower::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let proxy = Arc::clone(&self.proxy);
        let listener = self.listener;
        Box::pin(async move { Ok(proxy.handle(request, listener).await) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::tests::{route, table, tier};
    use crate::routes::Compiler;

    fn compile(tiers: Vec<meridian_proto::v1::Tier>) -> RoutingState {
        Compiler::new("us-east")
            .compile(&table(vec![route("default", "f", tiers)]))
            .unwrap()
    }

    fn share(state: &RoutingState, tries: usize) -> Vec<usize> {
        let function = state.lookup("f").unwrap();
        let mut counts = vec![0; function.tiers.len()];
        let now = state.clock().now();
        for _ in 0..tries {
            let pick = choose(function, now, false, &Tried::default(), 0).unwrap();
            counts[pick.index] += 1;
        }
        counts
    }

    const LOCAL4: [&str; 4] = ["127.0.1.1:1", "127.0.1.1:2", "127.0.1.1:3", "127.0.1.1:4"];

    #[tokio::test(start_paused = true)]
    async fn healthy_local_tier_takes_all() {
        let state = compile(vec![
            tier("us-east", true, &LOCAL4),
            tier("eu-west", false, &["127.0.2.1:15002"]),
        ]);
        assert_eq!(share(&state, 1000), vec![1000, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn half_ejected_local_tier_spills_thirty_percent() {
        let state = compile(vec![
            tier("us-east", true, &LOCAL4),
            tier("eu-west", false, &["127.0.2.1:15002"]),
        ]);
        let now = state.clock().now();
        let function = state.lookup("f").unwrap();
        function.tiers[0].endpoints[0].shared.eject(now);
        function.tiers[0].endpoints[1].shared.eject(now);
        let counts = share(&state, 10_000);
        assert!((6600..7400).contains(&counts[0]), "{counts:?}");
        // Never an ejected endpoint.
        for _ in 0..1000 {
            let pick = choose(function, now, false, &Tried::default(), 0).unwrap();
            assert!(!pick.endpoint.shared.is_ejected(now));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn down_gateway_gets_nothing_and_gateway_listener_stays_local() {
        let state = compile(vec![
            tier("us-east", true, &["127.0.1.1:1"]),
            tier("eu-west", false, &["127.0.2.1:15002"]),
            tier("ap-south", false, &["127.0.3.1:15002"]),
        ]);
        let function = state.lookup("f").unwrap();
        let now = state.clock().now();
        function.tiers[0].endpoints[0].shared.eject(now);
        function.tiers[1].endpoints[0].shared.mark_down();
        assert_eq!(share(&state, 200), vec![0, 0, 200]);
        assert_eq!(
            choose(function, now, true, &Tried::default(), 0).unwrap_err(),
            Unavailable::AllEjected
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_go_to_a_different_endpoint_then_tier() {
        let state = compile(vec![
            tier("us-east", true, &["127.0.1.1:1", "127.0.1.1:2"]),
            tier("eu-west", false, &["127.0.2.1:15002"]),
        ]);
        let function = state.lookup("f").unwrap();
        let now = state.clock().now();
        let mut tried = Tried::default();
        let first = choose(function, now, false, &tried, 0).unwrap();
        tried.insert(&first.endpoint.shared);
        // One of two local endpoints left: health 70%, the rest spills; never the tried one.
        for _ in 0..200 {
            let next = choose(function, now, false, &tried, 0).unwrap();
            assert!(!Arc::ptr_eq(&next.endpoint.shared, &first.endpoint.shared));
        }
        let second = function.tiers[0]
            .endpoints
            .iter()
            .find(|e| !Arc::ptr_eq(&e.shared, &first.endpoint.shared))
            .unwrap();
        tried.insert(&second.shared);
        let third = choose(function, now, false, &tried, 0).unwrap();
        assert_eq!(third.tier.region, "eu-west");
        tried.insert(&third.endpoint.shared);
        assert_eq!(
            choose(function, now, false, &tried, 0).unwrap_err(),
            Unavailable::AllEjected
        );
    }

    #[tokio::test(start_paused = true)]
    async fn avoided_region_is_skipped() {
        let state = compile(vec![
            tier("eu-west", false, &["127.0.2.1:15002"]),
            tier("ap-south", false, &["127.0.3.1:15002"]),
        ]);
        let function = state.lookup("f").unwrap();
        let now = state.clock().now();
        for _ in 0..100 {
            let pick = choose(function, now, false, &Tried::default(), tier_bit(0)).unwrap();
            assert_eq!(pick.tier.region, "ap-south");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_endpoints_vs_all_ejected() {
        let state = compile(vec![tier("us-east", true, &[])]);
        let function = state.lookup("f").unwrap();
        let now = state.clock().now();
        assert_eq!(
            choose(function, now, false, &Tried::default(), 0).unwrap_err(),
            Unavailable::NoEndpoints
        );
        // A remote region without ready instances is no candidate either.
        let mut remote = tier("eu-west", false, &["127.0.2.1:15002"]);
        remote.ready_instances = 0;
        let state = compile(vec![remote]);
        let function = state.lookup("f").unwrap();
        assert_eq!(
            choose(function, now, false, &Tried::default(), 0).unwrap_err(),
            Unavailable::NoEndpoints
        );
    }

    #[tokio::test(start_paused = true)]
    async fn measured_tiers_follow_probe_rtt() {
        let mut far = tier("ap-south", false, &["127.0.3.1:15002"]);
        far.order = meridian_proto::v1::TierOrder::Measured as i32;
        let mut near = tier("eu-west", false, &["127.0.2.1:15002"]);
        near.order = meridian_proto::v1::TierOrder::Measured as i32;
        let state = compile(vec![far, near]);
        let function = state.lookup("f").unwrap();
        let now = state.clock().now();
        // Both unknown: table order.
        let pick = choose(function, now, false, &Tried::default(), 0).unwrap();
        assert_eq!(pick.tier.region, "ap-south");
        function.tiers[0].endpoints[0]
            .shared
            .probe_succeeded(Duration::from_millis(240));
        function.tiers[1].endpoints[0]
            .shared
            .probe_succeeded(Duration::from_millis(80));
        let pick = choose(function, now, false, &Tried::default(), 0).unwrap();
        assert_eq!(pick.tier.region, "eu-west");
    }

    #[tokio::test(start_paused = true)]
    async fn first_attempt_reason_says_why_the_local_tier_was_passed_over() {
        let rules = HoldRules::default();
        let state = compile(vec![
            tier("us-east", true, &["127.0.1.1:1"]),
            tier("eu-west", false, &["127.0.2.1:15002"]),
        ]);
        let function = state.lookup("f").unwrap();
        let now = state.clock().now();
        let local = choose(function, now, false, &Tried::default(), 0).unwrap();
        assert_eq!(
            attempt_reason(None, local, function, &rules, false, now),
            None
        );
        function.tiers[0].endpoints[0].shared.eject(now);
        let remote = choose(function, now, false, &Tried::default(), 0).unwrap();
        assert_eq!(remote.tier.region, "eu-west");
        assert_eq!(
            attempt_reason(None, remote, function, &rules, false, now).as_deref(),
            Some("ejected")
        );
        // Without a local tier, a remote region is the normal route: no reason.
        let state = compile(vec![tier("eu-west", false, &["127.0.2.1:15002"])]);
        let function = state.lookup("f").unwrap();
        let pick = choose(function, now, false, &Tried::default(), 0).unwrap();
        assert_eq!(
            attempt_reason(None, pick, function, &rules, false, now),
            None
        );
        // A process function without a ready local instance: a cold start, or a crash loop.
        let mut f = crate::activator::tests::process(
            route(
                "default",
                "f",
                vec![
                    tier("us-east", true, &[]),
                    tier("eu-west", false, &["127.0.2.1:15002"]),
                ],
            ),
            10,
        );
        let reason = |f: &meridian_proto::v1::FunctionRoute| {
            let state = Compiler::new("us-east")
                .compile(&table(vec![f.clone()]))
                .unwrap();
            let function = state.lookup("f").unwrap();
            let pick = choose(function, now, false, &Tried::default(), 0).unwrap();
            attempt_reason(None, pick, function, &rules, false, now)
        };
        assert_eq!(reason(&f).as_deref(), Some("cold-start"));
        f.local_failed_starts = 2;
        assert_eq!(reason(&f).as_deref(), Some("crash-loop"));
    }

    #[test]
    fn strips_hop_by_hop_headers_but_keeps_te_trailers() {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, "close, x-private".parse().unwrap());
        headers.insert("x-private", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert(TE, "trailers".parse().unwrap());
        headers.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        let mut names: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, vec!["te", "x-kept"]);
        let mut headers = HeaderMap::new();
        headers.insert(TE, "gzip".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert!(headers.is_empty());
    }

    #[test]
    fn every_connection_line_counts_and_host_and_framing_are_handled() {
        let mut headers = HeaderMap::new();
        headers.append(CONNECTION, "keep-alive".parse().unwrap());
        headers.append(
            CONNECTION,
            "X-Secret, host, proxy-authenticate".parse().unwrap(),
        );
        headers.insert("x-secret", "1".parse().unwrap());
        headers.insert("proxy-authenticate", "x".parse().unwrap());
        headers.insert(HOST, "f".parse().unwrap());
        headers.insert(TRANSFER_ENCODING, "chunked".parse().unwrap());
        headers.insert(UPGRADE, "websocket".parse().unwrap());
        headers.insert("trailer", "x-checksum".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        let mut names: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        // Host routes the request upstream; Trailer is end-to-end.
        assert_eq!(names, vec!["host", "trailer"]);
    }

    #[test]
    fn clients_cannot_set_the_meshs_headers() {
        let client_headers = || {
            let mut headers = HeaderMap::new();
            headers.insert(MERIDIAN_HOP, "eu-west".parse().unwrap());
            headers.insert("meridian-region", "ap-south".parse().unwrap());
            headers.insert("meridian-anything", "1".parse().unwrap());
            headers.insert("x-kept", "1".parse().unwrap());
            headers
        };
        let mut outbound = client_headers();
        strip_internal(&mut outbound, Listener::Outbound);
        assert_eq!(outbound.keys().collect::<Vec<_>>(), vec!["x-kept"]);
        // On the gateway, the calling region's hop header is the mesh's, and goes on.
        let mut gateway = client_headers();
        strip_internal(&mut gateway, Listener::Gateway);
        let mut names: Vec<&str> = gateway.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, vec!["meridian-hop", "x-kept"]);
        // ...unless it is not one region name.
        for bad in [vec!["eu-west", "us-east"], vec!["not a region"]] {
            let mut headers = HeaderMap::new();
            for value in bad {
                headers.append(MERIDIAN_HOP, value.parse().unwrap());
            }
            strip_internal(&mut headers, Listener::Gateway);
            assert!(headers.is_empty(), "{headers:?}");
        }
    }

    #[test]
    fn a_request_dropped_before_its_answer_is_counted_as_the_clients() {
        use crate::errors::Reason;
        let global = GlobalStats::default();
        drop(Abandoned::armed(&global));
        assert_eq!(global.client_faults.get(Reason::ClientDisconnected), 1);
        Abandoned::armed(&global).disarm();
        assert_eq!(global.client_faults.get(Reason::ClientDisconnected), 1);
    }

    #[test]
    fn only_a_single_chunked_transfer_encoding_is_accepted() {
        let framing = |values: &[&str], content_length: bool| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(TRANSFER_ENCODING, value.parse().unwrap());
            }
            if content_length {
                headers.insert(CONTENT_LENGTH, "5".parse().unwrap());
            }
            check_framing(&headers).map_err(|e| e.reason())
        };
        assert_eq!(framing(&[], false), Ok(()));
        assert_eq!(framing(&[], true), Ok(()));
        assert_eq!(framing(&["chunked"], false), Ok(()));
        assert_eq!(framing(&[" Chunked "], false), Ok(()));
        let ambiguous = Err(crate::errors::Reason::AmbiguousTransferEncoding);
        assert_eq!(framing(&["identity, chunked"], false), ambiguous);
        assert_eq!(framing(&["gzip, chunked"], false), ambiguous);
        assert_eq!(framing(&["gzip", "chunked"], false), ambiguous);
        assert_eq!(framing(&["chunked", "chunked"], false), ambiguous);
        assert_eq!(framing(&["identity"], false), ambiguous);
        assert_eq!(framing(&["chunked"], true), ambiguous);
    }
}
