//! The sidecar in process, end to end over real sockets: a scripted agent serves its routing
//! table, small hyper servers play the function instances, and requests go through the
//! outbound and gateway listeners over HTTP/1.1, h2c and gRPC.
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use meridian_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// A grpc backend: the fake agent's own LocalRoutingService is a handy tonic service.
async fn start_grpc_backend() -> Result<(SocketAddr, watch::Sender<Option<pb::RoutingTable>>)> {
    let agent = start_agent().await?;
    Ok((agent.addr, agent.tables))
}

/// A request body streamed in chunks.
type ChunkBody =
    StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

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
    let got = grpc.get(pb::GetRoutesRequest::default()).await?;
    assert_eq!(got.metadata().get("meridian-region").unwrap(), "us-east");
    assert_eq!(got.into_inner().table.map(|t| t.version), Some(42));
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
    let got = grpc.get(pb::GetRoutesRequest::default()).await?;
    assert_eq!(got.metadata().get("meridian-region").unwrap(), "eu-west");
    assert_eq!(got.into_inner().table.map(|t| t.version), Some(77));
    let mut stream = grpc
        .watch(pb::WatchRoutesRequest { client: "t".into() })
        .await?
        .into_inner();
    assert_eq!(stream.message().await?.unwrap().version, 77);
    grpc_tables.send_replace(Some(table(78, "zz", vec![])));
    assert_eq!(stream.message().await?.unwrap().version, 78);
    Ok(())
}
