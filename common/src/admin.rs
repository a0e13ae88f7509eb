//! The admin listener every server binary runs (plain HTTP/1.1, apart from the gRPC port so that
//! scrapers and load balancers need no gRPC): `/metrics` (Prometheus text from a registry) and
//! `/ready` (200 or 503 as the binary's own readiness check says), and `parse_address` for the
//! `--admin` flag. Served by the one accept/serve loop (`crate::serve`) with the admin limits.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::serve::{ListenerMetrics, ServeConfig, ServeLimits};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("invalid admin address {value:?}: expected host:port or \"none\"")]
    Address {
        value: String,
        #[source]
        source: std::net::AddrParseError,
    },
    #[error("cannot encode metrics")]
    Encode(#[source] fmt::Error),
}

/// Parses `--admin`: `none` (any case) disables the listener.
pub fn parse_address(value: &str) -> Result<Option<SocketAddr>, AdminError> {
    if value.trim().eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    value
        .trim()
        .parse()
        .map(Some)
        .map_err(|source| AdminError::Address {
            value: value.to_owned(),
            source,
        })
}

/// A binary's readiness rule: `Ok(body)` answers `/ready` with 200 and that body, `Err(reason)`
/// with 503 and that reason.
pub type Readiness = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// What the admin endpoints read.
pub struct Admin {
    registry: Registry,
    ready: Readiness,
}

impl fmt::Debug for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admin")
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

/// The registry in Prometheus text.
fn render(registry: &Registry) -> Result<String, AdminError> {
    let mut out = String::with_capacity(4096);
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
        .map_err(AdminError::Encode)?;
    Ok(out)
}

impl Admin {
    pub fn new(registry: Registry, ready: Readiness) -> Self {
        Self { registry, ready }
    }

    pub fn respond(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        if method != Method::GET && method != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
        }
        match path {
            "/ready" => match (self.ready)() {
                Ok(body) => text(StatusCode::OK, body),
                Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, reason),
            },
            "/metrics" => match render(&self.registry) {
                Ok(body) => {
                    let mut response = text(StatusCode::OK, body);
                    response.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    response
                }
                Err(error) => {
                    tracing::warn!(error = %crate::error_chain(&error), "cannot render metrics");
                    text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("{}\n", crate::error_chain(&error)),
                    )
                }
            },
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /ready or /metrics\n".into(),
            ),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// How long open admin connections may finish after shutdown before they are dropped (a scrape
/// cut short is retried by Prometheus).
pub const SHUTDOWN_GRACE: Duration = crate::serve::DEFAULT_SHUTDOWN_GRACE;

/// Serves `admin` on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, shutdown: impl Future<Output = ()>) {
    let handler = move |request: Request<Incoming>| {
        let response = admin.respond(request.method(), request.uri().path());
        async move { response }
    };
    serve_http(listener, handler, shutdown).await;
}

/// Serves HTTP/1.1 and h2c (so a gRPC service can share the port) on `listener`, every request
/// answered by `handler`, until `shutdown` resolves; open connections then get
/// [`SHUTDOWN_GRACE`] to finish. The admin limits ([`ServeLimits::admin`]) apply, through the one
/// serve loop of [`crate::serve`]; its connection metrics are registered nowhere (a binary that
/// wants them uses [`serve_http_with`]).
pub async fn serve_http<H, F, B>(
    listener: TcpListener,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let config = ServeConfig::new("admin", ServeLimits::admin(), ListenerMetrics::default());
    serve_http_with(listener, config, handler, shutdown).await;
}

/// [`serve_http`] with the caller's limits and metrics.
pub async fn serve_http_with<H, F, B>(
    listener: TcpListener,
    config: ServeConfig,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = auto::Builder::new(TokioExecutor::new());
    crate::serve::serve(listener, builder, config, handler, shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use prometheus_client::metrics::counter::Counter;
    use std::sync::atomic::{AtomicBool, Ordering};

    async fn body(response: Response<Full<Bytes>>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[test]
    fn parses_none_and_addresses() {
        assert_eq!(parse_address("none").unwrap(), None);
        assert_eq!(parse_address("NONE").unwrap(), None);
        assert_eq!(
            parse_address("127.0.0.1:7090").unwrap(),
            Some("127.0.0.1:7090".parse().unwrap())
        );
        assert_eq!(
            parse_address("127.0.1.1:7190").unwrap(),
            Some("127.0.1.1:7190".parse().unwrap())
        );
        assert!(parse_address("x:1").is_err());
        let error = parse_address("localhost").unwrap_err().to_string();
        assert!(error.contains("\"localhost\""), "{error}");
    }

    #[tokio::test]
    async fn ready_follows_the_check_and_metrics_render() {
        let flag = Arc::new(AtomicBool::new(false));
        let check = Arc::clone(&flag);
        let mut registry = Registry::default();
        let counter = Counter::<u64>::default();
        registry.register("meridian_test_things", "Things.", counter.clone());
        counter.inc_by(3);
        let admin = Admin::new(
            registry,
            Arc::new(move || {
                if check.load(Ordering::SeqCst) {
                    Ok("ready\n".into())
                } else {
                    Err("not ready: nope\n".into())
                }
            }),
        );
        let response = admin.respond(&Method::GET, "/ready");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body(response).await, "not ready: nope\n");
        flag.store(true, Ordering::SeqCst);
        let response = admin.respond(&Method::GET, "/ready");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body(response).await, "ready\n");
        let response = admin.respond(&Method::GET, "/metrics");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[CONTENT_TYPE],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let text = body(response).await;
        assert!(text.contains("meridian_test_things_total 3"), "{text}");
        assert_eq!(
            admin.respond(&Method::GET, "/nope").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            admin.respond(&Method::POST, "/metrics").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[tokio::test]
    async fn serves_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let admin = Arc::new(Admin::new(
            Registry::default(),
            Arc::new(|| Ok("ready\n".into())),
        ));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, admin, async {
            let _ = stopped.await;
        }));
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let _ = stop.send(());
        server.await.unwrap();
    }
}
