//! The admin listener (plain HTTP/1.1, apart from the gRPC port so that scrapers and load
//! balancers need no gRPC): `/metrics` (Prometheus text) and `/ready` (200 once the cache has
//! loaded its first etcd snapshot).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("invalid admin address {value:?}: expected host:port or \"none\"")]
    Address {
        value: String,
        #[source]
        source: std::net::AddrParseError,
    },
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

/// What the admin endpoints read.
#[derive(Debug)]
pub struct Admin {
    registry: Registry,
    ready: watch::Receiver<bool>,
}

impl Admin {
    pub fn new(registry: Registry, ready: watch::Receiver<bool>) -> Self {
        Self { registry, ready }
    }

    pub fn respond(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        if method != Method::GET && method != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
        }
        match path {
            "/ready" if *self.ready.borrow() => text(StatusCode::OK, "ready\n".into()),
            "/ready" => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: state not loaded from etcd yet\n".into(),
            ),
            "/metrics" => match metrics::render(&self.registry) {
                Ok(body) => {
                    let mut response = text(StatusCode::OK, body);
                    response.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    response
                }
                Err(error) => {
                    tracing::warn!(error = %meridian_common::error_chain(&error), "cannot render metrics");
                    text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("{}\n", meridian_common::error_chain(&error)),
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

/// Serves `admin` on `listener` until `shutdown` resolves (open connections are dropped then:
/// a scrape cut short is retried by Prometheus).
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let admin = Arc::clone(&admin);
        let service = service_fn(move |request: Request<hyper::body::Incoming>| {
            let response = admin.respond(request.method(), request.uri().path());
            async move { Ok::<_, Infallible>(response) }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::election::ElectionState;
    use crate::metrics::Metrics;
    use crate::table::Tables;
    use http_body_util::BodyExt;

    #[test]
    fn parses_none_and_addresses() {
        assert_eq!(parse_address("none").unwrap(), None);
        assert_eq!(parse_address("NONE").unwrap(), None);
        assert_eq!(
            parse_address("127.0.0.1:7090").unwrap(),
            Some("127.0.0.1:7090".parse().unwrap())
        );
        let error = parse_address("localhost").unwrap_err().to_string();
        assert!(error.contains("\"localhost\""), "{error}");
    }

    #[tokio::test]
    async fn ready_after_load_and_metrics() {
        let (ready_tx, ready) = watch::channel(false);
        let (_tables_tx, tables) = watch::channel(Arc::new(Tables::default()));
        let registry = metrics::registry(Metrics::new(), tables, ElectionState::new());
        let admin = Admin::new(registry, ready);
        assert_eq!(
            admin.respond(&Method::GET, "/ready").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        ready_tx.send_replace(true);
        assert_eq!(
            admin.respond(&Method::GET, "/ready").status(),
            StatusCode::OK
        );
        let response = admin.respond(&Method::GET, "/metrics");
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(body.contains("meridian_agents_connected 0"), "{body}");
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
        let (_ready_tx, ready) = watch::channel(true);
        let admin = Arc::new(Admin::new(Registry::default(), ready));
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
