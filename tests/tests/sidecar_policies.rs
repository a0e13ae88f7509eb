//! The function's routing policy and the gateway's rules, end to end: timeouts answer 504 at
//! once (never a hang); a method the policy names is retried like an idempotent one; a body over
//! 64 KiB is never retried; a gateway serves only its own region's instances (never forwards to a
//! third region) and answers its health path; gRPC crosses regions through the gateways; a
//! sidecar without a table answers 503 `no-table`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use http::{Method, StatusCode};
use meridian_proto::v1::RoutingPolicy;
use meridian_tests::http::{empty, full, grpc_channel, raw_exchange, MeshClient};
use meridian_tests::{
    backend_spec, free_port, poll_until, region_ip, Behavior, Relay, Sidecar, SidecarOpts,
    TestBackend, World,
};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn fresh_addr(region_index: usize) -> Result<SocketAddr> {
    let ip = region_ip(region_index);
    Ok(SocketAddr::from((ip, free_port(ip)?)))
}

async fn two_regions() -> Result<World> {
    World::start_with(
        &["us-east", "eu-west"],
        Relay::with_default_latencies(),
        SidecarOpts::default(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_function_gets_504_timeout_at_the_policy_deadline() -> Result<()> {
    let world = World::start_with(&["us-east"], Relay::new(), SidecarOpts::default()).await?;
    let slow = TestBackend::start(fresh_addr(0)?, "slow").await?;
    let mut spec = backend_spec("slow", &[("us-east", slow.url())]);
    spec.routing = Some(RoutingPolicy {
        timeout_ms: Some(800),
        per_try_timeout_ms: Some(300),
        ..Default::default()
    });
    world.apply(spec).await?;
    world
        .wait_served("us-east", "slow", "us-east", Duration::from_secs(20))
        .await?;
    slow.set_behavior(Behavior::Delay(5_000));
    let client = world.sidecar("us-east").client();
    let started = Instant::now();
    let reply = client.get("slow", "/").await?;
    let took = started.elapsed();
    ensure!(
        reply.status == StatusCode::GATEWAY_TIMEOUT && reply.error() == Some("timeout"),
        "a function slower than its deadline: {}",
        reply.describe()
    );
    ensure!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(2_000),
        "answered after {took:?}; the policy says 300 ms per try, 800 ms in all"
    );
    // Retries of a timed-out GET stay within the total deadline: at most 800/300 + 1 tries.
    ensure!(
        slow.requests_with("GET") <= 1 + 3 + 1,
        "{} GETs reached the slow instance",
        slow.requests_with("GET")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_methods_and_the_64k_body_limit() -> Result<()> {
    let world = two_regions().await?;
    let local = TestBackend::start(fresh_addr(0)?, "local").await?;
    let remote = TestBackend::start(fresh_addr(1)?, "remote").await?;
    let mut spec = backend_spec(
        "payments",
        &[("us-east", local.url()), ("eu-west", remote.url())],
    );
    spec.routing = Some(RoutingPolicy {
        retryable_methods: vec!["POST".to_string()],
        ..Default::default()
    });
    world.apply(spec).await?;
    world
        .wait_served("us-east", "payments", "us-east", Duration::from_secs(20))
        .await?;
    world
        .wait_remote_tiers_up("us-east", "payments", &["eu-west"], Duration::from_secs(10))
        .await?;
    local.set_behavior(Behavior::Drop);
    let client = world.sidecar("us-east").client();

    // POST is retryable by this policy: a small one is retried in eu-west.
    let reply = client.post("payments", "/", "small").await?;
    ensure!(
        reply.status == StatusCode::OK && reply.region() == Some("eu-west"),
        "a POST the policy makes retryable must be retried: {}",
        reply.describe()
    );
    ensure!(local.requests_with("POST") == 1 && remote.requests_with("POST") == 1);

    // A PUT (idempotent) with a 100 KiB body is not retried: it cannot be replayed without
    // buffering it whole.
    let body = vec![b'p'; 100 * 1024];
    let reply = client
        .send(
            Method::PUT,
            "payments",
            "/",
            &[],
            full(body),
            Duration::from_secs(10),
        )
        .await?;
    ensure!(
        reply.status.is_server_error(),
        "a 100 KiB PUT to an instance that dropped it must fail, not be replayed: {}",
        reply.describe()
    );
    ensure!(
        local.requests_with("PUT") == 1 && remote.requests_with("PUT") == 0,
        "PUT with a 100 KiB body: local saw {}, eu-west saw {}",
        local.requests_with("PUT"),
        remote.requests_with("PUT")
    );
    // The same PUT with a small body is retried.
    let reply = client
        .send(
            Method::PUT,
            "payments",
            "/",
            &[],
            full(vec![b'p'; 1024]),
            Duration::from_secs(10),
        )
        .await?;
    ensure!(
        reply.status == StatusCode::OK && reply.region() == Some("eu-west"),
        "a 1 KiB PUT must be retried: {}",
        reply.describe()
    );
    ensure!(remote.requests_with("PUT") == 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_serves_only_its_own_region() -> Result<()> {
    let world = World::start().await?;
    // The function lives in us-east and ap-south, not in eu-west.
    let east = TestBackend::start(fresh_addr(0)?, "east").await?;
    let south = TestBackend::start(fresh_addr(2)?, "south").await?;
    world
        .apply(backend_spec(
            "fn-ab",
            &[("us-east", east.url()), ("ap-south", south.url())],
        ))
        .await?;
    world
        .wait_served("ap-south", "fn-ab", "ap-south", Duration::from_secs(20))
        .await?;
    world
        .wait_served("eu-west", "fn-ab", "us-east", Duration::from_secs(20))
        .await?;

    let gateway = world.sidecar("eu-west").gateway();
    let health = raw_exchange(
        gateway,
        b"GET /.meridian/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await?;
    ensure!(
        health.status == StatusCode::OK,
        "gateway health: {}",
        health.describe()
    );

    // Called at its gateway, eu-west has no instance: it must not pass the call on.
    let (east_before, south_before) = (east.requests(), south.requests());
    let client = MeshClient::http1(gateway);
    let reply = client
        .send(
            Method::GET,
            "fn-ab",
            "/",
            &[("meridian-hop", "us-east")],
            empty(),
            Duration::from_secs(10),
        )
        .await?;
    ensure!(
        reply.status.is_server_error() && reply.error().is_some(),
        "eu-west's gateway, which hosts no instance, answered {}",
        reply.describe()
    );
    ensure!(
        east.requests() == east_before && south.requests() == south_before,
        "eu-west's gateway forwarded the call to another region ({} / {} requests)",
        east.requests() - east_before,
        south.requests() - south_before
    );
    // The same without the hop header: still only local instances behind a gateway.
    let reply = client.get("fn-ab", "/").await?;
    ensure!(
        reply.status.is_server_error() && south.requests() == south_before,
        "gateway without hop header: {}",
        reply.describe()
    );
    // A gateway with an instance serves it, and says which region served.
    let reply = MeshClient::http1(world.sidecar("ap-south").gateway())
        .get("fn-ab", "/")
        .await?;
    ensure!(
        reply.status == StatusCode::OK && reply.region() == Some("ap-south"),
        "ap-south's gateway: {}",
        reply.describe()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_crosses_regions_through_the_gateways() -> Result<()> {
    let world = two_regions().await?;
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = TcpListener::bind(fresh_addr(1)?).await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    world
        .apply(backend_spec(
            "grpc-far",
            &[("eu-west", format!("http://{addr}"))],
        ))
        .await?;
    let outbound = world.sidecar("us-east").outbound();
    let response = poll_until(
        Duration::from_secs(20),
        "a gRPC call from us-east served in eu-west",
        || async {
            let mut client = HealthClient::new(grpc_channel(outbound, "grpc-far").await?);
            client
                .check(HealthCheckRequest::default())
                .await
                .context("Health.Check")
        },
    )
    .await?;
    ensure!(response.get_ref().status == ServingStatus::Serving as i32);
    let region = response
        .metadata()
        .get("meridian-region")
        .and_then(|v| v.to_str().ok());
    ensure!(
        region == Some("eu-west"),
        "served by {region:?}, expected eu-west: {:?}",
        response.metadata()
    );
    server.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_without_a_table_answers_503_no_table() -> Result<()> {
    // An agent nobody feeds: it answers its local API but never has a table.
    let unreachable = format!(
        "http://127.0.0.1:{}",
        free_port(std::net::Ipv4Addr::LOCALHOST)?
    );
    let agent = meridian_tests::Agent::start(
        0,
        "us-east",
        &[unreachable],
        meridian_tests::AgentOpts::default(),
    )
    .await?;
    let sidecar = Sidecar::start(0, "us-east", &agent.url(), SidecarOpts::default()).await?;
    ensure!(!sidecar.is_ready().await?, "ready without a table");
    let reply = sidecar.client().get("anything", "/").await?;
    ensure!(
        reply.status == StatusCode::SERVICE_UNAVAILABLE && reply.error() == Some("no-table"),
        "{}",
        reply.describe()
    );
    Ok(())
}
