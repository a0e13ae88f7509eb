//! Protocols through a sidecar: HTTP/2 (h2c) end to end, gRPC unary and server streaming (a
//! tonic health service in the test process as the function), and a 10 MB body each way
//! streamed with bounded memory (the sidecar's peak RSS must not grow by the body's size).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use http::{Method, StatusCode};
use meridian_tests::http::{grpc_channel, streamed};
use meridian_tests::{backend_spec, free_port, region_ip, Relay, SidecarOpts, TestBackend, World};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const MB: u64 = 1024 * 1024;

fn fresh_addr() -> Result<SocketAddr> {
    let ip = region_ip(0);
    Ok(SocketAddr::from((ip, free_port(ip)?)))
}

async fn us_east() -> Result<World> {
    World::start_with(&["us-east"], Relay::new(), SidecarOpts::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_reaches_the_function_over_h2c() -> Result<()> {
    let world = us_east().await?;
    let backend = TestBackend::start(fresh_addr()?, "h2-backend").await?;
    world
        .apply(backend_spec("h2fn", &[("us-east", backend.url())]))
        .await?;
    world
        .wait_served("us-east", "h2fn", "us-east", Duration::from_secs(20))
        .await?;
    let client = world.sidecar("us-east").client_h2();
    for _ in 0..3 {
        let reply = client.get("h2fn", "/").await?;
        ensure!(
            reply.status == StatusCode::OK
                && reply.version == http::Version::HTTP_2
                && reply.region() == Some("us-east")
                && reply.text().trim() == "h2-backend",
            "HTTP/2 through the sidecar: {}",
            reply.describe()
        );
    }
    // A body both ways over HTTP/2.
    let reply = client
        .send(
            Method::POST,
            "h2fn",
            "/echo-size",
            &[("content-length", &MB.to_string())],
            streamed(MB),
            Duration::from_secs(20),
        )
        .await?;
    ensure!(
        reply.status == StatusCode::OK && reply.text().trim() == format!("received={MB}"),
        "POST 1 MB over HTTP/2: {}",
        reply.describe()
    );
    // An unknown function over HTTP/2 gets the same clear answer as over HTTP/1.1.
    let reply = client.get("nosuchfn", "/").await?;
    ensure!(
        reply.status == StatusCode::NOT_FOUND && reply.error() == Some("unknown-function"),
        "unknown function over HTTP/2: {}",
        reply.describe()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_server_streaming_go_through() -> Result<()> {
    let world = us_east().await?;
    // The function: grpc.health.v1 served by tonic in this process.
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(
            "meridian.test.Greeter",
            tonic_health::ServingStatus::Serving,
        )
        .await;
    let listener = TcpListener::bind(fresh_addr()?).await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    world
        .apply(backend_spec(
            "grpcfn",
            &[("us-east", format!("http://{addr}"))],
        ))
        .await?;
    // Ready when the function is in the table: poll the unary call itself.
    let outbound = world.sidecar("us-east").outbound();
    let response = meridian_tests::poll_until(
        Duration::from_secs(20),
        "a unary gRPC call through the sidecar",
        || async {
            let mut client = HealthClient::new(grpc_channel(outbound, "grpcfn").await?);
            let response = client
                .check(HealthCheckRequest {
                    service: "meridian.test.Greeter".to_string(),
                })
                .await
                .context("Health.Check")?;
            Ok(response)
        },
    )
    .await?;
    let region = response
        .metadata()
        .get("meridian-region")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    ensure!(
        response.get_ref().status == ServingStatus::Serving as i32,
        "unary: {:?}",
        response.get_ref()
    );
    ensure!(
        region.as_deref() == Some("us-east"),
        "unary gRPC answer without meridian-region us-east: {:?}",
        response.metadata()
    );

    // Server streaming: Watch sends the current status, then every change.
    let mut client = HealthClient::new(grpc_channel(outbound, "grpcfn").await?);
    let mut stream = client
        .watch(HealthCheckRequest {
            service: "meridian.test.Greeter".to_string(),
        })
        .await
        .context("Health.Watch")?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .context("no first streamed message within 5 s")??
        .context("stream ended before the first message")?;
    ensure!(
        first.status == ServingStatus::Serving as i32,
        "first: {first:?}"
    );
    for (status, set) in [
        (
            ServingStatus::NotServing,
            tonic_health::ServingStatus::NotServing,
        ),
        (ServingStatus::Serving, tonic_health::ServingStatus::Serving),
    ] {
        reporter
            .set_service_status("meridian.test.Greeter", set)
            .await;
        let next = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .with_context(|| format!("the change to {status:?} did not stream through in 5 s"))??
            .context("stream ended early")?;
        ensure!(
            next.status == status as i32,
            "streamed {next:?}, expected {status:?}"
        );
    }
    // A gRPC call to a function that does not exist fails cleanly, not with a hang.
    let mut missing = HealthClient::new(grpc_channel(outbound, "nosuchfn").await?);
    let err = missing
        .check(HealthCheckRequest::default())
        .await
        .err()
        .context("a call to an unknown function succeeded")?;
    eprintln!("gRPC to an unknown function: {err:?}");
    server.abort();
    Ok(())
}

/// A response produced slowly reaches the client as it is produced (each chunk, not the whole
/// body at the end), over HTTP/1.1 and HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_response_is_streamed_as_it_is_produced() -> Result<()> {
    const LINES: u64 = 5;
    const EVERY_MS: u64 = 300;
    let world = us_east().await?;
    let backend = TestBackend::start(fresh_addr()?, "drip").await?;
    world
        .apply(backend_spec("drip", &[("us-east", backend.url())]))
        .await?;
    world
        .wait_served("us-east", "drip", "us-east", Duration::from_secs(20))
        .await?;
    let sidecar = world.sidecar("us-east");
    for (name, client) in [
        ("HTTP/1.1", sidecar.client()),
        ("HTTP/2", sidecar.client_h2()),
    ] {
        let (status, chunks) = client
            .get_timed_chunks(
                "drip",
                &format!("/drip?n={LINES}&ms={EVERY_MS}"),
                Duration::from_secs(10),
            )
            .await?;
        let text: String = chunks
            .iter()
            .map(|(_, c)| String::from_utf8_lossy(c).into_owned())
            .collect();
        ensure!(
            status == StatusCode::OK && text.lines().count() == LINES as usize,
            "{name}: {status}, body {text:?}"
        );
        let first = chunks.first().map(|(t, _)| *t).unwrap_or_default();
        let last = chunks.last().map(|(t, _)| *t).unwrap_or_default();
        eprintln!("{name}: first chunk after {first:?}, last after {last:?}");
        ensure!(
            first < Duration::from_millis(EVERY_MS * (LINES - 1) / 2),
            "{name}: the first line took {first:?}: the response was held back, not streamed \
             (it ends after {last:?})"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabyte_bodies_stream_through_with_bounded_memory() -> Result<()> {
    const BODY: u64 = 10 * MB;
    const PARALLEL: usize = 5;
    const MAX_GROWTH_KIB: u64 = 20 * 1024;
    let world = us_east().await?;
    let backend = TestBackend::start(fresh_addr()?, "big").await?;
    world
        .apply(backend_spec("big", &[("us-east", backend.url())]))
        .await?;
    world
        .wait_served("us-east", "big", "us-east", Duration::from_secs(20))
        .await?;
    let sidecar = world.sidecar("us-east");
    let client = sidecar.client();
    let rss_before = sidecar.rss_kib()?;

    // Upload: the backend reads slower than the client sends, so a proxy that buffered the
    // body would hold most of it.
    let reply = client
        .send(
            Method::POST,
            "big",
            "/echo-size?slow=1",
            &[("content-length", &BODY.to_string())],
            streamed(BODY),
            Duration::from_secs(60),
        )
        .await?;
    ensure!(
        reply.status == StatusCode::OK && reply.text().trim() == format!("received={BODY}"),
        "10 MB upload: {}",
        reply.describe()
    );
    // Download.
    let reply = client
        .send(
            Method::GET,
            "big",
            &format!("/bytes?n={BODY}"),
            &[],
            meridian_tests::http::empty(),
            Duration::from_secs(60),
        )
        .await?;
    ensure!(
        reply.status == StatusCode::OK && reply.body.len() as u64 == BODY,
        "10 MB download: {} ({} bytes)",
        reply.status,
        reply.body.len()
    );
    let one = sidecar.peak_rss_kib()?.saturating_sub(rss_before);
    eprintln!(
        "sidecar RSS before {rss_before} KiB; peak growth with one 10 MB body each way: {one} KiB"
    );
    ensure!(
        one < MAX_GROWTH_KIB,
        "the sidecar's peak RSS grew by {one} KiB for one 10 MB body (limit {MAX_GROWTH_KIB})"
    );

    // Several at once (50 MB in flight): a proxy that buffers bodies grows by about that much;
    // one that streams does not.
    let uploads = (0..PARALLEL).map(|_| {
        let client = client.clone();
        async move {
            client
                .send(
                    Method::POST,
                    "big",
                    "/echo-size?slow=1",
                    &[],
                    streamed(BODY),
                    Duration::from_secs(120),
                )
                .await
        }
    });
    for reply in futures::future::try_join_all(uploads).await? {
        ensure!(
            reply.status == StatusCode::OK && reply.text().trim() == format!("received={BODY}"),
            "parallel chunked 10 MB upload: {}",
            reply.describe()
        );
    }
    let many = sidecar.peak_rss_kib()?.saturating_sub(rss_before);
    eprintln!(
        "peak growth with {PARALLEL} parallel 10 MB uploads: {many} KiB (backend read {} bytes)",
        backend.body_bytes()
    );
    ensure!(
        many < MAX_GROWTH_KIB,
        "the sidecar's peak RSS grew by {many} KiB with {PARALLEL} x 10 MB in flight: bodies are \
         buffered, not streamed"
    );
    Ok(())
}
