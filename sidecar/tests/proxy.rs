//! The sidecar in process, end to end over real sockets: a scripted agent serves its routing
//! table, small hyper servers play the function instances, and requests go through the
//! outbound and gateway listeners over HTTP/1.1, h2c and gRPC.
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
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meridian_proto::v1 as pb;
use meridian_proto::v1::local_routing_service_server::{
    LocalRoutingService, LocalRoutingServiceServer,
};
use meridian_sidecar::{Bound, Config};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tonic::Status;

/// Serves whatever table is in its watch channel and records reports.
#[derive(Clone)]
struct FakeAgent {
    tables: watch::Receiver<Option<pb::RoutingTable>>,
    reports: mpsc::UnboundedSender<pb::TableReport>,
}

#[tonic::async_trait]
impl LocalRoutingService for FakeAgent {
    type WatchStream =
        Pin<Box<dyn futures::Stream<Item = Result<pb::RoutingTable, Status>> + Send>>;

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
                    return Some((Ok(table), (rx, false)));
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn get(
        &self,
        _request: tonic::Request<pb::GetRoutesRequest>,
    ) -> Result<tonic::Response<pb::RoutingTable>, Status> {
        self.tables
            .borrow()
            .clone()
            .map(tonic::Response::new)
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

struct Agent {
    addr: SocketAddr,
    tables: watch::Sender<Option<pb::RoutingTable>>,
    reports: mpsc::UnboundedReceiver<pb::TableReport>,
}

async fn start_agent() -> Result<Agent> {
    let (tables, rx) = watch::channel(None);
    let (report_tx, reports) = mpsc::unbounded_channel();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let service = LocalRoutingServiceServer::new(FakeAgent {
        tables: rx,
        reports: report_tx,
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    Ok(Agent {
        addr,
        tables,
        reports,
    })
}

/// A function instance: answers `status` with a body naming itself, counts hits, keeps the
/// last request's headers. `POST /echo` streams the body back.
struct Backend {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    last_headers: Arc<Mutex<Option<http::HeaderMap>>>,
}

async fn start_backend(name: &'static str, status: u16) -> Result<Backend> {
    start_slow_backend(name, status, Duration::ZERO).await
}

async fn start_slow_backend(name: &'static str, status: u16, delay: Duration) -> Result<Backend> {
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

/// A grpc backend: the fake agent's own LocalRoutingService is a handy tonic service.
async fn start_grpc_backend() -> Result<(SocketAddr, watch::Sender<Option<pb::RoutingTable>>)> {
    let agent = start_agent().await?;
    Ok((agent.addr, agent.tables))
}

struct Sidecar {
    outbound: SocketAddr,
    gateway: SocketAddr,
    admin: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start_sidecar(region: &str, agent: SocketAddr) -> Result<Sidecar> {
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let config = Config {
        region: region.into(),
        agent: format!("http://{agent}"),
        outbound: any,
        gateway: any,
        admin: any,
        probe_interval: Duration::from_millis(100),
        probe_timeout: Duration::from_millis(100),
        client_id: format!("sidecar-{region}"),
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

fn endpoint(addr: SocketAddr) -> pb::Endpoint {
    pb::Endpoint {
        address: addr.to_string(),
        id: format!("i-{}", addr.port()),
        state: pb::EndpointState::Ready as i32,
        zone: "z".into(),
    }
}

fn local(region: &str, addrs: &[SocketAddr]) -> pb::Tier {
    pb::Tier {
        region: region.into(),
        local: true,
        endpoints: addrs.iter().map(|a| endpoint(*a)).collect(),
        order: pb::TierOrder::Local as i32,
        ready_instances: u32::try_from(addrs.len()).unwrap(),
    }
}

fn remote(region: &str, gateway: SocketAddr) -> pb::Tier {
    pb::Tier {
        region: region.into(),
        local: false,
        endpoints: vec![endpoint(gateway)],
        order: pb::TierOrder::Explicit as i32,
        ready_instances: 1,
    }
}

fn function(name: &str, tiers: Vec<pb::Tier>) -> pb::FunctionRoute {
    pb::FunctionRoute {
        cold_start_ms: 0,
        namespace: "default".into(),
        name: name.into(),
        function_version: 1,
        policy: None,
        tiers,
        workload: None,
    }
}

fn table(version: i64, region: &str, functions: Vec<pb::FunctionRoute>) -> pb::RoutingTable {
    pb::RoutingTable {
        local_generation: 0,
        version,
        region: region.into(),
        functions,
    }
}

/// A request body streamed in chunks.
type ChunkBody =
    StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

type H1 = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn h1() -> H1 {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn get(
    client: &H1,
    addr: SocketAddr,
    host: &str,
    path: &str,
) -> Result<(StatusCode, http::HeaderMap, String)> {
    send(client, Method::GET, addr, host, path, Bytes::new()).await
}

async fn send(
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
async fn wait_ready(client: &H1, sidecar: &Sidecar) -> Result<()> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_and_answers_errors_with_reasons() -> Result<()> {
    let client = h1();
    let agent = start_agent().await?;
    let backend = start_backend("a", 200).await?;
    let sidecar = start_sidecar("us-east", agent.addr).await?;

    // No table yet.
    let (status, headers, body) = get(&client, sidecar.outbound, "hello", "/").await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["meridian-error"], "no-table");
    assert_eq!(headers["meridian-region"], "us-east");
    assert!(body.starts_with("meridian: no-table: "), "{body}");

    agent.tables.send_replace(Some(table(
        1,
        "us-east",
        vec![function("hello", vec![local("us-east", &[backend.addr])])],
    )));
    wait_ready(&client, &sidecar).await?;

    for host in ["hello", "hello.default", "HELLO:15001"] {
        let (status, headers, body) = get(&client, sidecar.outbound, host, "/x?y=1").await?;
        assert_eq!(status, StatusCode::OK, "{host}");
        assert_eq!(body, "hello from a\n");
        assert_eq!(headers["meridian-region"], "us-east");
    }
    let seen = backend.last_headers.lock().unwrap().clone().unwrap();
    assert!(
        seen.get("meridian-hop").is_none(),
        "local calls carry no hop header"
    );

    let (status, headers, body) = get(&client, sidecar.outbound, "nope", "/").await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(headers["meridian-error"], "unknown-function");
    assert_eq!(headers["meridian-region"], "us-east");
    assert!(body.contains("nope"), "{body}");

    let (status, headers, _) = get(&client, sidecar.outbound, "bad host!", "/").await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers["meridian-error"], "bad-host");

    let big = "x".repeat(70 * 1024);
    let request = Request::get(format!("http://{}/", sidecar.outbound))
        .header("host", "hello")
        .header("x-big", big)
        .body(Full::new(Bytes::new()))?;
    let response = client.request(request).await?;
    assert_eq!(
        response.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    assert_eq!(response.headers()["meridian-error"], "headers-too-large");

    // Gateway health.
    let (status, headers, _) = get(&client, sidecar.gateway, "x", "/.meridian/health").await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["meridian-region"], "us-east");

    // Metrics and routes.
    let (_, _, metrics) = get(&client, sidecar.admin, "admin", "/metrics").await?;
    assert!(
        metrics
            .contains(r#"meridian_requests_total{function="hello",tier="us-east",status="200"} 3"#),
        "{metrics}"
    );
    let (_, _, routes) = get(&client, sidecar.admin, "admin", "/routes").await?;
    let routes: serde_json::Value = serde_json::from_str(&routes)?;
    assert_eq!(routes["functions"][0]["name"], "hello");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_table_is_reported_and_the_old_one_keeps_serving() -> Result<()> {
    let client = h1();
    let mut agent = start_agent().await?;
    let backend = start_backend("a", 200).await?;
    let sidecar = start_sidecar("us-east", agent.addr).await?;
    let good = table(
        1,
        "us-east",
        vec![function("hello", vec![local("us-east", &[backend.addr])])],
    );
    agent.tables.send_replace(Some(good.clone()));
    let report = agent.reports.recv().await.unwrap();
    assert!(report.accepted);
    assert_eq!(report.client, "sidecar-us-east");

    let mut bad = good;
    bad.version = 2;
    bad.functions[0].tiers[0].endpoints[0].address = "no-port".into();
    agent.tables.send_replace(Some(bad));
    let report = agent.reports.recv().await.unwrap();
    assert!(!report.accepted);
    assert_eq!(report.version, 2);
    assert!(
        report
            .reason
            .starts_with("functions[0].tiers[0].endpoints[0].address"),
        "{}",
        report.reason
    );
    let (status, _, _) = get(&client, sidecar.outbound, "hello", "/").await?;
    assert_eq!(status, StatusCode::OK);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_is_retried_elsewhere_post_is_not() -> Result<()> {
    let client = h1();
    let agent = start_agent().await?;
    let broken = start_backend("broken", 503).await?;
    let good = start_backend("good", 200).await?;
    // A port nothing listens on.
    let dead = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let sidecar = start_sidecar("us-east", agent.addr).await?;
    agent.tables.send_replace(Some(table(
        1,
        "us-east",
        vec![
            function("mixed", vec![local("us-east", &[broken.addr, good.addr])]),
            function("down", vec![local("us-east", &[dead, good.addr])]),
            function("failing", vec![local("us-east", &[broken.addr])]),
        ],
    )));
    wait_ready(&client, &sidecar).await?;

    for _ in 0..20 {
        let (status, _, body) = get(&client, sidecar.outbound, "mixed", "/").await?;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "hello from good\n");
        // Connection refused: retried for any method (nothing was sent).
        let (status, _, _) = send(
            &client,
            Method::POST,
            sidecar.outbound,
            "down",
            "/",
            Bytes::from_static(b"payload"),
        )
        .await?;
        assert_eq!(status, StatusCode::OK);
    }

    let before = broken.hits.load(Ordering::SeqCst);
    let (status, headers, _) = send(
        &client,
        Method::POST,
        sidecar.outbound,
        "failing",
        "/",
        Bytes::from_static(b"x"),
    )
    .await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["meridian-region"], "us-east");
    // At most once: never retried. (Zero when the loop above got `broken` ejected, which
    // depends on which endpoints power-of-two-choices happened to pick; the 503 is then
    // all-ejected instead of the instance's own.)
    let sent = broken.hits.load(Ordering::SeqCst) - before;
    assert!(sent <= 1, "POST sent {sent} times");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_through_the_remote_gateway() -> Result<()> {
    let client = h1();
    let east_agent = start_agent().await?;
    let west_agent = start_agent().await?;
    let west_backend = start_backend("west", 200).await?;
    let dead = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let west = start_sidecar("eu-west", west_agent.addr).await?;
    let east = start_sidecar("us-east", east_agent.addr).await?;
    west_agent.tables.send_replace(Some(table(
        1,
        "eu-west",
        vec![function(
            "hello",
            vec![local("eu-west", &[west_backend.addr])],
        )],
    )));
    east_agent.tables.send_replace(Some(table(
        1,
        "us-east",
        vec![function(
            "hello",
            vec![local("us-east", &[dead]), remote("eu-west", west.gateway)],
        )],
    )));
    wait_ready(&client, &west).await?;
    wait_ready(&client, &east).await?;

    for _ in 0..20 {
        let (status, headers, body) = get(&client, east.outbound, "hello", "/").await?;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(headers["meridian-region"], "eu-west");
        assert_eq!(body, "hello from west\n");
    }
    let seen = west_backend.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(seen["meridian-hop"], "us-east");
    assert_eq!(seen["host"], "hello");

    // The gateway never forwards to a third region: eu-west's gateway has only a remote tier.
    west_agent.tables.send_replace(Some(table(
        2,
        "eu-west",
        vec![function("hello", vec![remote("us-east", east.gateway)])],
    )));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, headers, _) = get(&client, west.gateway, "hello", "/").await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["meridian-error"], "no-endpoints");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_streams_bodies_and_grpc_works() -> Result<()> {
    let client = h1();
    let agent = start_agent().await?;
    let backend = start_backend("a", 200).await?;
    let (grpc_addr, grpc_tables) = start_grpc_backend().await?;
    grpc_tables.send_replace(Some(table(42, "zz", vec![])));
    let sidecar = start_sidecar("us-east", agent.addr).await?;
    agent.tables.send_replace(Some(table(
        1,
        "us-east",
        vec![
            function("hello", vec![local("us-east", &[backend.addr])]),
            function("grpc", vec![local("us-east", &[grpc_addr])]),
        ],
    )));
    wait_ready(&client, &sidecar).await?;

    // h2c with prior knowledge, a 10 MB body streamed both ways.
    let h2: Client<_, ChunkBody> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let chunk = Bytes::from(vec![7u8; 64 * 1024]);
    let frames: Vec<Result<Frame<Bytes>, Infallible>> =
        (0..160).map(|_| Ok(Frame::data(chunk.clone()))).collect();
    let request = Request::post("http://hello/echo")
        .version(http::Version::HTTP_2)
        .body(StreamBody::new(futures::stream::iter(frames)))?;
    // Send to the sidecar but with :authority "hello".
    let mut request = request;
    *request.uri_mut() = format!("http://{}/echo", sidecar.outbound).parse()?;
    request.headers_mut().insert("host", "hello".parse()?);
    let response = h2.request(request).await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["meridian-region"], "us-east");
    let mut body = response.into_body();
    let mut total = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            total += data.len();
        }
    }
    assert_eq!(total, 160 * 64 * 1024);

    // gRPC unary and server streaming through the sidecar, :authority = "grpc".
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", sidecar.outbound))?
        .origin("http://grpc".parse()?)
        .connect()
        .await?;
    let mut grpc =
        meridian_proto::v1::local_routing_service_client::LocalRoutingServiceClient::new(channel);
    let got = grpc.get(pb::GetRoutesRequest {}).await?;
    assert_eq!(got.metadata().get("meridian-region").unwrap(), "us-east");
    assert_eq!(got.into_inner().version, 42);
    let mut stream = grpc
        .watch(pb::WatchRoutesRequest { client: "t".into() })
        .await?
        .into_inner();
    assert_eq!(stream.message().await?.unwrap().version, 42);
    grpc_tables.send_replace(Some(table(43, "zz", vec![])));
    assert_eq!(stream.message().await?.unwrap().version, 43);
    Ok(())
}

fn with_policy(mut route: pb::FunctionRoute, policy: pb::RoutingPolicy) -> pb::FunctionRoute {
    route.policy = Some(policy);
    route
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_and_total_timeouts_answer_504() -> Result<()> {
    let client = h1();
    let agent = start_agent().await?;
    let slow_a = start_slow_backend("slow-a", 200, Duration::from_secs(3)).await?;
    let slow_b = start_slow_backend("slow-b", 200, Duration::from_secs(3)).await?;
    let sidecar = start_sidecar("us-east", agent.addr).await?;
    let policy = pb::RoutingPolicy {
        timeout_ms: Some(400),
        per_try_timeout_ms: Some(150),
        max_retries: Some(5),
        ..Default::default()
    };
    agent.tables.send_replace(Some(table(
        1,
        "us-east",
        vec![with_policy(
            function("slow", vec![local("us-east", &[slow_a.addr, slow_b.addr])]),
            policy,
        )],
    )));
    wait_ready(&client, &sidecar).await?;
    let started = std::time::Instant::now();
    let (status, headers, body) = get(&client, sidecar.outbound, "slow", "/").await?;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(headers["meridian-error"], "timeout");
    assert!(took < Duration::from_millis(900), "{took:?}");
    // Each endpoint tried once (retries go to a different endpoint), none a third time.
    assert_eq!(slow_a.hits.load(Ordering::SeqCst), 1);
    assert_eq!(slow_b.hits.load(Ordering::SeqCst), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_instances_get_few_extra_requests() -> Result<()> {
    let client = h1();
    let agent = start_agent().await?;
    let backends = [
        start_backend("f1", 503).await?,
        start_backend("f2", 503).await?,
        start_backend("f3", 503).await?,
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let sidecar = start_sidecar("us-east", agent.addr).await?;
    agent.tables.send_replace(Some(table(
        1,
        "us-east",
        vec![function("failing", vec![local("us-east", &addrs)])],
    )));
    wait_ready(&client, &sidecar).await?;
    let requests = 300;
    for _ in 0..requests {
        let (status, _, _) = get(&client, sidecar.outbound, "failing", "/").await?;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let hits: usize = backends.iter().map(|b| b.hits.load(Ordering::SeqCst)).sum();
    assert!(
        hits * 10 <= requests * 12,
        "{hits} instance requests for {requests}"
    );
    let (_, _, metrics) = get(&client, sidecar.admin, "admin", "/metrics").await?;
    assert!(metrics.contains("meridian_ejections_total 3"), "{metrics}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_fails_over_through_the_gateway() -> Result<()> {
    let client = h1();
    let east_agent = start_agent().await?;
    let west_agent = start_agent().await?;
    let (grpc_addr, grpc_tables) = start_grpc_backend().await?;
    grpc_tables.send_replace(Some(table(77, "zz", vec![])));
    let west = start_sidecar("eu-west", west_agent.addr).await?;
    let east = start_sidecar("us-east", east_agent.addr).await?;
    west_agent.tables.send_replace(Some(table(
        1,
        "eu-west",
        vec![function("grpc", vec![local("eu-west", &[grpc_addr])])],
    )));
    east_agent.tables.send_replace(Some(table(
        1,
        "us-east",
        vec![function(
            "grpc",
            vec![local("us-east", &[]), remote("eu-west", west.gateway)],
        )],
    )));
    wait_ready(&client, &west).await?;
    wait_ready(&client, &east).await?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", east.outbound))?
        .origin("http://grpc".parse()?)
        .connect()
        .await?;
    let mut grpc =
        meridian_proto::v1::local_routing_service_client::LocalRoutingServiceClient::new(channel);
    let got = grpc.get(pb::GetRoutesRequest {}).await?;
    assert_eq!(got.metadata().get("meridian-region").unwrap(), "eu-west");
    assert_eq!(got.into_inner().version, 77);
    let mut stream = grpc
        .watch(pb::WatchRoutesRequest { client: "t".into() })
        .await?
        .into_inner();
    assert_eq!(stream.message().await?.unwrap().version, 77);
    grpc_tables.send_replace(Some(table(78, "zz", vec![])));
    assert_eq!(stream.message().await?.unwrap().version, 78);
    Ok(())
}
