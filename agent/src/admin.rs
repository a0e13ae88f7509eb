//! The agent's admin listener (plain HTTP/1.1, apart from the gRPC API so that scrapers and
//! load balancers need no gRPC): `/metrics` (Prometheus text) and `/ready` (200 while a routing
//! table is held: the agent can serve its sidecars).

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

use crate::local_api::CurrentTable;
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
    table: watch::Receiver<CurrentTable>,
}

impl Admin {
    pub fn new(registry: Registry, table: watch::Receiver<CurrentTable>) -> Self {
        Self { registry, table }
    }

    pub fn respond(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        if method != Method::GET && method != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
        }
        match path {
            "/ready" => match self.table.borrow().as_ref().map(|t| t.version) {
                Some(version) => text(StatusCode::OK, format!("ready (table {version})\n")),
                None => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: no routing table yet\n".into(),
                ),
            },
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
    use crate::metrics::AgentMetrics;
    use http_body_util::BodyExt;
    use meridian_proto::v1::{FunctionScale, RegionScale, RoutingTable};
    use std::time::{Duration, SystemTime};

    #[test]
    fn parses_none_and_addresses() {
        assert_eq!(parse_address("none").unwrap(), None);
        assert_eq!(
            parse_address("127.0.1.1:7190").unwrap(),
            Some("127.0.1.1:7190".parse().unwrap())
        );
        assert!(parse_address("x:1").is_err());
    }

    #[tokio::test]
    async fn ready_with_a_table_and_metrics() {
        let (table_tx, table) = watch::channel(None);
        let (_scale_tx, scale) = watch::channel(std::sync::Arc::new(vec![FunctionScale {
            namespace: "default".into(),
            name: "hello".into(),
            scale: Some(RegionScale {
                desired: 3,
                ready: 2,
                stable_concurrency: 1.5,
                ..Default::default()
            }),
        }]));
        let (_runtime_tx, runtime) = watch::channel(Default::default());
        let metrics = AgentMetrics::new("us-east");
        let registry = crate::metrics::registry(Arc::clone(&metrics), scale, runtime);
        let admin = Admin::new(registry, table);
        assert_eq!(
            admin.respond(&Method::GET, "/ready").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        table_tx.send_replace(Some(Arc::new(RoutingTable {
            version: 42,
            ..Default::default()
        })));
        metrics.table_accepted(42, SystemTime::now() - Duration::from_secs(5));
        metrics.cold_start(Duration::from_millis(30));
        assert_eq!(
            admin.respond(&Method::GET, "/ready").status(),
            StatusCode::OK
        );
        let body = admin
            .respond(&Method::GET, "/metrics")
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(body.contains("meridian_agent_table_version 42"), "{body}");
        assert!(
            body.contains("meridian_agent_table_age_seconds 5."),
            "{body}"
        );
        assert!(body.contains("meridian_agent_connected 0"), "{body}");
        assert!(
            body.contains(r#"meridian_autoscaler_desired_instances{namespace="default",function="hello",region="us-east"} 3"#),
            "{body}"
        );
        assert!(
            body.contains(r#"meridian_autoscaler_ready_instances{namespace="default",function="hello",region="us-east"} 2"#),
            "{body}"
        );
        assert!(
            body.contains(r#"meridian_autoscaler_concurrency{namespace="default",function="hello",region="us-east",window="stable"} 1.5"#),
            "{body}"
        );
        assert!(
            body.contains("meridian_instance_cold_start_seconds_count 1"),
            "{body}"
        );
        assert_eq!(
            admin.respond(&Method::GET, "/nope").status(),
            StatusCode::NOT_FOUND
        );
    }
}
