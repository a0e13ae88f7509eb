//! Shared set-up of the sidecar's integration tests: a scripted agent (LocalRoutingService
//! serving whatever table the test puts in its watch channel, LoadService recording load
//! reports and activations), small hyper servers playing function instances, and a sidecar
//! run in process on ephemeral ports.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Result};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meridian_proto::v1 as pb;
use meridian_proto::v1::load_service_server::{LoadService, LoadServiceServer};
use meridian_proto::v1::local_routing_service_server::{
    LocalRoutingService, LocalRoutingServiceServer,
};
use meridian_sidecar::{Bound, Config};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tonic::Status;

/// Serves whatever table is in its watch channel and records what sidecars tell it.
#[derive(Clone)]
pub struct FakeAgent {
    tables: watch::Receiver<Option<pb::RoutingTable>>,
    reports: mpsc::UnboundedSender<pb::TableReport>,
    loads: mpsc::UnboundedSender<pb::LoadReport>,
    activations: mpsc::UnboundedSender<pb::ActivateRequest>,
}

#[tonic::async_trait]
impl LocalRoutingService for FakeAgent {
    type WatchStream =
        Pin<Box<dyn futures::Stream<Item = Result<pb::RoutingUpdate, Status>> + Send>>;

    async fn watch(
        &self,
        _request: tonic::Request<pb::WatchRoutesRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, Status> {
        let rx = self.tables.clone();
        let stream = futures::stream::unfold((rx, true), |(mut rx, first)| async move {
            if !first && rx.changed().await.is_err() {
                return None;
            }
            loop {
                let current = rx.borrow_and_update().clone();
                if let Some(table) = current {
                    // Every table whole, in parts, as a real agent sends its first one.
                    let parts = meridian_proto::updates::split(
                        meridian_proto::updates::full(&table),
                        meridian_proto::updates::LOCAL_PART_LIMITS,
                    );
                    return Some((parts, (rx, false)));
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        });
        let stream = futures::StreamExt::flat_map(stream, |parts| {
            futures::stream::iter(parts.into_iter().map(Ok))
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn get(
        &self,
        _request: tonic::Request<pb::GetRoutesRequest>,
    ) -> Result<tonic::Response<pb::RoutingTablePage>, Status> {
        self.tables
            .borrow()
            .clone()
            .map(|table| {
                tonic::Response::new(pb::RoutingTablePage {
                    table: Some(table),
                    next_page_token: String::new(),
                })
            })
            .ok_or_else(|| Status::not_found("no table"))
    }

    async fn report_table(
        &self,
        request: tonic::Request<pb::TableReport>,
    ) -> Result<tonic::Response<pb::TableReportResponse>, Status> {
        let _ = self.reports.send(request.into_inner());
        Ok(tonic::Response::new(pb::TableReportResponse {}))
    }
}

#[tonic::async_trait]
impl LoadService for FakeAgent {
    async fn report_load(
        &self,
        request: tonic::Request<pb::LoadReport>,
    ) -> Result<tonic::Response<pb::LoadReportResponse>, Status> {
        let _ = self.loads.send(request.into_inner());
        Ok(tonic::Response::new(pb::LoadReportResponse {}))
    }

    async fn activate(
        &self,
        request: tonic::Request<pb::ActivateRequest>,
    ) -> Result<tonic::Response<pb::ActivateResponse>, Status> {
        let _ = self.activations.send(request.into_inner());
        Ok(tonic::Response::new(pb::ActivateResponse { instances: 1 }))
    }
}

pub struct Agent {
    pub addr: SocketAddr,
    pub tables: watch::Sender<Option<pb::RoutingTable>>,
    pub reports: mpsc::UnboundedReceiver<pb::TableReport>,
    pub loads: mpsc::UnboundedReceiver<pb::LoadReport>,
    pub activations: mpsc::UnboundedReceiver<pb::ActivateRequest>,
}

pub async fn start_agent() -> Result<Agent> {
    let (tables, rx) = watch::channel(None);
    let (report_tx, reports) = mpsc::unbounded_channel();
    let (load_tx, loads) = mpsc::unbounded_channel();
    let (activation_tx, activations) = mpsc::unbounded_channel();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let agent = FakeAgent {
        tables: rx,
        reports: report_tx,
        loads: load_tx,
        activations: activation_tx,
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(LocalRoutingServiceServer::new(agent.clone()))
            .add_service(LoadServiceServer::new(agent))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    Ok(Agent {
        addr,
        tables,
        reports,
        loads,
        activations,
    })
}

/// A function instance: answers `status` with a body naming itself, counts hits, keeps the
/// last request's headers. `POST /echo` streams the body back.
pub struct Backend {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub last_headers: Arc<Mutex<Option<http::HeaderMap>>>,
}

pub async fn start_backend(name: &'static str, status: u16) -> Result<Backend> {
    start_slow_backend(name, status, Duration::ZERO).await
}

pub async fn start_slow_backend(
    name: &'static str,
    status: u16,
    delay: Duration,
) -> Result<Backend> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let hits = Arc::new(AtomicUsize::new(0));
    let last_headers = Arc::new(Mutex::new(None));
    let (h, l) = (Arc::clone(&hits), Arc::clone(&last_headers));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (hits, last) = (Arc::clone(&h), Arc::clone(&l));
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                hits.fetch_add(1, Ordering::SeqCst);
                *last.lock().unwrap() = Some(request.headers().clone());
                async move {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let response: Response<
                        http_body_util::combinators::BoxBody<Bytes, hyper::Error>,
                    > = if request.method() == Method::POST && request.uri().path() == "/echo" {
                        Response::new(request.into_body().boxed())
                    } else {
                        let mut r = Response::new(
                            Full::new(Bytes::from(format!("hello from {name}\n")))
                                .map_err(|never| match never {})
                                .boxed(),
                        );
                        *r.status_mut() = StatusCode::from_u16(status).unwrap();
                        r
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(Backend {
        addr,
        hits,
        last_headers,
    })
}

pub struct Sidecar {
    pub outbound: SocketAddr,
    pub gateway: SocketAddr,
    pub admin: SocketAddr,
    pub _stop: tokio::sync::oneshot::Sender<()>,
}

/// What tests vary in a sidecar's configuration.
#[derive(Debug, Clone)]
pub struct Options {
    pub hold_queue: u32,
    pub hold_timeout: Duration,
    pub crash_loop_failed_starts: u32,
    pub hold_remote_margin: Duration,
    pub load_report_interval: Duration,
    pub probe_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            hold_queue: 1000,
            hold_timeout: Duration::from_secs(30),
            crash_loop_failed_starts: meridian_sidecar::activator::DEFAULT_CRASH_LOOP_FAILED_STARTS,
            hold_remote_margin: meridian_sidecar::activator::DEFAULT_HOLD_REMOTE_MARGIN,
            load_report_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_millis(100),
        }
    }
}

pub async fn start_sidecar(region: &str, agent: SocketAddr) -> Result<Sidecar> {
    start_sidecar_with(region, agent, Options::default()).await
}

pub async fn start_sidecar_with(
    region: &str,
    agent: SocketAddr,
    options: Options,
) -> Result<Sidecar> {
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let config = Config {
        region: region.into(),
        agent: format!("http://{agent}"),
        outbound: any,
        gateway: any,
        admin: any,
        probe_interval: Duration::from_millis(100),
        probe_timeout: options.probe_timeout,
        client_id: format!("sidecar-{region}"),
        hold_queue: options.hold_queue,
        hold_timeout: options.hold_timeout,
        crash_loop_failed_starts: options.crash_loop_failed_starts,
        hold_remote_margin: options.hold_remote_margin,
        load_report_interval: options.load_report_interval,
        proxy_limits: meridian_common::serve::ServeLimits::default(),
        admin_limits: meridian_common::serve::ServeLimits::admin(),
        body_limits: meridian_sidecar::proxy::DEFAULT_BODY_LIMITS,
    };
    let bound = Bound::bind(&config).await?;
    let (outbound, gateway, admin) = (
        bound.outbound_addr().unwrap(),
        bound.gateway_addr().unwrap(),
        bound.admin_addr().unwrap(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(meridian_sidecar::run(config, bound, async {
        let _ = stopped.await;
    }));
    Ok(Sidecar {
        outbound,
        gateway,
        admin,
        _stop: stop,
    })
}

pub fn endpoint(addr: SocketAddr) -> pb::Endpoint {
    pb::Endpoint {
        address: addr.to_string(),
        id: format!("i-{}", addr.port()),
        state: pb::EndpointState::Ready as i32,
        zone: "z".into(),
    }
}

pub fn local(region: &str, addrs: &[SocketAddr]) -> pb::Tier {
    pb::Tier {
        region: region.into(),
        local: true,
        endpoints: addrs.iter().map(|a| endpoint(*a)).collect(),
        order: pb::TierOrder::Local as i32,
        ready_instances: u32::try_from(addrs.len()).unwrap(),
    }
}

pub fn remote(region: &str, gateway: SocketAddr) -> pb::Tier {
    pb::Tier {
        region: region.into(),
        local: false,
        endpoints: vec![endpoint(gateway)],
        order: pb::TierOrder::Explicit as i32,
        ready_instances: 1,
    }
}

pub fn function(name: &str, tiers: Vec<pb::Tier>) -> pb::FunctionRoute {
    pb::FunctionRoute {
        cold_start_ms: 0,
        local_failed_starts: 0,
        local_restart_backoff: false,
        namespace: "default".into(),
        name: name.into(),
        function_version: 1,
        policy: None,
        tiers,
        workload: None,
    }
}

pub fn table(version: i64, region: &str, functions: Vec<pb::FunctionRoute>) -> pb::RoutingTable {
    pb::RoutingTable {
        local_generation: 0,
        version,
        region: region.into(),
        functions,
    }
}

pub type H1 = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn h1() -> H1 {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn get(
    client: &H1,
    addr: SocketAddr,
    host: &str,
    path: &str,
) -> Result<(StatusCode, http::HeaderMap, String)> {
    send(client, Method::GET, addr, host, path, Bytes::new()).await
}

pub async fn send(
    client: &H1,
    method: Method,
    addr: SocketAddr,
    host: &str,
    path: &str,
    body: Bytes,
) -> Result<(StatusCode, http::HeaderMap, String)> {
    let request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("host", host)
        .body(Full::new(body))?;
    let response = client.request(request).await?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
}

/// Polls `/ready` until the sidecar has a table.
pub async fn wait_ready(client: &H1, sidecar: &Sidecar) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((StatusCode::OK, _, _)) = get(client, sidecar.admin, "admin", "/ready").await {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("sidecar not ready");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
