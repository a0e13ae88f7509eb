//! The listeners (outbound and gateway: HTTP/1.1 and h2c on one port; admin: HTTP/1.1 for
//! `/ready`, `/metrics`, `/routes`, and gRPC over h2c for `SidecarAdminService.Explain`), each
//! served by `meridian_common::serve` with the limits of `Config`, and the start-up and shutdown of
//! the whole sidecar.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use meridian_common::serve::{ConnectionMetrics, ServeConfig, ServeLimits};
use meridian_proto::v1::sidecar_admin_service_server::SidecarAdminServiceServer;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tower::ServiceExt;

use crate::activator::{self, Activator, HoldRules};
use crate::admin::Admin;
use crate::body::BodyLimits;
use crate::explain::ExplainService;
use crate::health::Prober;
use crate::load::Reporter;
use crate::metrics::GlobalStats;
use crate::proxy::{Listener, Proxy, MAX_H2_HEADER_LIST};
use crate::routes::Compiler;
use crate::watch::Watcher;

/// How long open connections get to finish once shutdown starts.
pub const SHUTDOWN_GRACE: Duration = meridian_common::serve::DEFAULT_SHUTDOWN_GRACE;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr} ({what})")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid region {0:?} for a header value")]
    Region(String, #[source] http::header::InvalidHeaderValue),
    #[error("invalid agent URL {url:?}")]
    AgentUrl {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Everything the sidecar needs to run (the flags, validated).
#[derive(Debug, Clone)]
pub struct Config {
    pub region: String,
    /// URL of the agent's LocalRoutingService.
    pub agent: String,
    pub outbound: SocketAddr,
    pub gateway: SocketAddr,
    pub admin: SocketAddr,
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    /// The name this sidecar reports to the agent.
    pub client_id: String,
    /// Requests held per function at most, waiting for a local instance.
    pub hold_queue: u32,
    /// How long a request may be held (the function's timeout caps it).
    pub hold_timeout: Duration,
    /// Failed starts in a row from which local instances crash-loop: requests then go to a
    /// healthy remote tier at once instead of being held.
    pub crash_loop_failed_starts: u32,
    /// A hold lasts at most a healthy remote tier's round trip plus this (and at most the
    /// per-try timeout), then the request goes there.
    pub hold_remote_margin: Duration,
    /// The load report window.
    pub load_report_interval: Duration,
    /// Limits of each proxy listener (outbound and gateway, each its own connection cap).
    pub proxy_limits: ServeLimits,
    /// Limits of the admin listener.
    pub admin_limits: ServeLimits,
    /// Limits on the clients' request bodies.
    pub body_limits: BodyLimits,
}

/// Largest `SidecarAdminService` request decoded.
const EXPLAIN_REQUEST_BYTES: usize = 64 * 1024;
/// Largest `SidecarAdminService` answer sent.
const EXPLAIN_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// Bound listeners, before serving (so a caller knows the actual addresses).
#[derive(Debug)]
pub struct Bound {
    outbound: TcpListener,
    gateway: TcpListener,
    admin: TcpListener,
}

impl Bound {
    pub async fn bind(config: &Config) -> Result<Self, ServerError> {
        async fn one(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { what, addr, source })
        }
        Ok(Self {
            outbound: one("outbound", config.outbound).await?,
            gateway: one("gateway", config.gateway).await?,
            admin: one("admin", config.admin).await?,
        })
    }

    pub fn outbound_addr(&self) -> Option<SocketAddr> {
        self.outbound.local_addr().ok()
    }

    pub fn gateway_addr(&self) -> Option<SocketAddr> {
        self.gateway.local_addr().ok()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr().ok()
    }
}

/// Runs the sidecar on `bound` until `shutdown` resolves, then lets open connections finish
/// (at most [`SHUTDOWN_GRACE`]).
pub async fn run(
    config: Config,
    bound: Bound,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let state = Arc::new(ArcSwapOption::empty());
    let refused = Arc::new(ArcSwapOption::empty());
    let global = Arc::new(GlobalStats::default());
    let new_gateways = Arc::new(Notify::new());
    let swaps = Arc::new(watch::channel(0u64).0);
    // One lazily connected channel for load reports and activations: it dials the agent on
    // first use and again after failures, so a sidecar started before its agent just works.
    let agent_channel = tonic::transport::Endpoint::from_shared(config.agent.clone())
        .map_err(|source| ServerError::AgentUrl {
            url: config.agent.clone(),
            source,
        })?
        .connect_timeout(crate::watch::CONNECT_TIMEOUT)
        .connect_lazy();
    let rules = HoldRules {
        queue: config.hold_queue,
        timeout: config.hold_timeout,
        crash_loop_failed_starts: config.crash_loop_failed_starts,
        remote_margin: config.hold_remote_margin,
    };
    let (activator, activations) = Activator::new(Arc::clone(&state), Arc::clone(&swaps), rules);
    let proxy = Proxy::new(
        &config.region,
        Arc::clone(&state),
        Arc::clone(&global),
        Arc::new(activator),
    )
    .map_err(|e| ServerError::Region(config.region.clone(), e))?
    .with_body_limits(config.body_limits);
    let proxy = Arc::new(proxy);
    let connections = ConnectionMetrics::default();
    let mut admin = Admin::new(
        config.region.clone(),
        Arc::clone(&state),
        Arc::clone(&refused),
        Arc::clone(&global),
    );
    admin.register_connections(&connections);
    let admin = Arc::new(admin);
    let listener_config = |name: &str, limits: &ServeLimits| {
        ServeConfig::new(name, limits.clone(), connections.listener(name))
    };
    let compiler = Compiler::new(config.region.clone());
    let reporter = Reporter::new(
        config.client_id.clone(),
        config.load_report_interval,
        Arc::clone(&state),
        swaps.subscribe(),
        agent_channel.clone(),
        Arc::clone(&global),
        Arc::clone(compiler.sampler_wake()),
    );
    // Explicit gRPC limits: a request names one function, and an answer lists one function's
    // tiers and endpoints; connections, streams and timeouts are the admin listener's.
    let explainer = SidecarAdminServiceServer::new(ExplainService::new(Arc::clone(&state), rules))
        .max_decoding_message_size(EXPLAIN_REQUEST_BYTES)
        .max_encoding_message_size(EXPLAIN_RESPONSE_BYTES);
    let watcher = Watcher::new(
        config.agent.clone(),
        config.client_id.clone(),
        compiler,
        Arc::clone(&state),
        refused,
        Arc::clone(&new_gateways),
        swaps,
    )
    .with_stats(Arc::clone(&global))
    // The bound address, not the flag: a port 0 flag becomes a real port here.
    .with_admin_address(
        bound
            .admin_addr()
            .map(|addr| advertised(addr, config.outbound)),
    );
    let prober = Prober::new(
        config.probe_interval,
        config.probe_timeout,
        Arc::clone(&state),
        new_gateways,
    );

    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    log_listening("outbound", &bound.outbound);
    log_listening("gateway", &bound.gateway);
    log_listening("admin", &bound.admin);
    let tasks = [
        tokio::spawn(serve_proxy(
            bound.outbound,
            Arc::clone(&proxy),
            Listener::Outbound,
            listener_config("outbound", &config.proxy_limits),
            until_stopped(stopped.clone()),
        )),
        tokio::spawn(serve_proxy(
            bound.gateway,
            proxy,
            Listener::Gateway,
            listener_config("gateway", &config.proxy_limits),
            until_stopped(stopped.clone()),
        )),
        tokio::spawn(serve_admin(
            bound.admin,
            admin,
            explainer,
            listener_config("admin", &config.admin_limits),
            until_stopped(stopped.clone()),
        )),
        tokio::spawn(watcher.run(until_stopped(stopped.clone()))),
        tokio::spawn(prober.run(until_stopped(stopped.clone()))),
        tokio::spawn(reporter.run(until_stopped(stopped.clone()))),
        tokio::spawn(activator::send_activations(
            activations,
            agent_channel,
            config.client_id.clone(),
            until_stopped(stopped),
        )),
    ];
    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop.send(true);
    for task in tasks {
        let _ = task.await;
    }
    Ok(())
}

fn log_listening(what: &str, listener: &TcpListener) {
    match listener.local_addr() {
        Ok(addr) => tracing::info!("{what} listening on {addr}"),
        Err(error) => tracing::warn!(%error, "{what} listener has no local address"),
    }
}

/// The HTTP protocol settings of both proxy listeners; the limits (timeouts, connection cap,
/// HTTP/2 streams and resets) are the serve loop's, from `Config::proxy_limits`.
fn proxy_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // No hyper h1 timer: the serve loop's watchdog times heads and idle connections out, where
    // hyper's header-read timer would be armed for every request on the hot path (and would
    // also close idle keep-alive connections at the header-read timeout).
    builder.http1().keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_H2_HEADER_LIST)
        .adaptive_window(true);
    builder
}

async fn serve_proxy(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    kind: Listener,
    config: ServeConfig,
    shutdown: impl Future<Output = ()>,
) {
    let handler = move |request: http::Request<Incoming>| {
        let proxy = Arc::clone(&proxy);
        async move { proxy.handle(request, kind).await }
    };
    meridian_common::serve::serve(listener, proxy_builder(), config, handler, shutdown).await;
}

/// The admin address the agent is told to dial: an unspecified bind address (`0.0.0.0`)
/// becomes the outbound listener's host when that one is specific, else loopback.
fn advertised(admin: SocketAddr, outbound: SocketAddr) -> String {
    let mut admin = admin;
    if admin.ip().is_unspecified() {
        let ip = if outbound.ip().is_unspecified() {
            match admin {
                SocketAddr::V4(_) => std::net::IpAddr::from([127, 0, 0, 1]),
                SocketAddr::V6(_) => std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            }
        } else {
            outbound.ip()
        };
        admin.set_ip(ip);
    }
    admin.to_string()
}

/// Whether a request on the admin listener is gRPC (the agent asking for an explanation).
fn is_grpc<B>(request: &http::Request<B>) -> bool {
    request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

async fn serve_admin(
    listener: TcpListener,
    admin: Arc<Admin>,
    explainer: SidecarAdminServiceServer<ExplainService>,
    config: ServeConfig,
    shutdown: impl Future<Output = ()>,
) {
    // HTTP/1.1 for people and Prometheus, h2c for the agent's gRPC calls.
    let handler = move |request: http::Request<Incoming>| {
        let admin = Arc::clone(&admin);
        let explainer = explainer.clone();
        async move {
            if is_grpc(&request) {
                match explainer.oneshot(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                }
            } else {
                match admin.handle(request).await {
                    Ok(response) => response.map(tonic::body::Body::new),
                    Err(never) => match never {},
                }
            }
        }
    };
    meridian_common::admin::serve_http_with(listener, config, handler, shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_admin_address_is_dialable() {
        let outbound: SocketAddr = "127.0.1.1:15001".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:15001".parse().unwrap();
        assert_eq!(
            advertised("127.0.2.1:15090".parse().unwrap(), outbound),
            "127.0.2.1:15090"
        );
        assert_eq!(
            advertised("0.0.0.0:15090".parse().unwrap(), outbound),
            "127.0.1.1:15090"
        );
        assert_eq!(
            advertised("0.0.0.0:15090".parse().unwrap(), any),
            "127.0.0.1:15090"
        );
    }
}
