//! A sidecar in normal operation and on bad input: healthy local instances serve every request
//! of a us-east client; a request that cannot be routed gets a clear status and `meridian-error`
//! at once (unknown function 404, malformed Host 400, oversized headers 431).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Result};
use http::StatusCode;
use meridian_tests::http::{raw_exchange, Load, LoadReport, LoadSpec, Reply};
use meridian_tests::{
    backend_spec, free_port, metric_value, region_ip, start_samples, Relay, SidecarOpts,
    TestBackend, World,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_local_instances_serve_every_request() -> Result<()> {
    let world = World::start().await?;
    let instances = start_samples(&[("us-east", 2), ("eu-west", 1), ("ap-south", 1)]).await?;
    world.serve_hello_in_us_east(&instances).await?;
    let client = world.sidecar("us-east").client();
    let report = Load::start(&client, LoadSpec::get("hello", 100, Duration::from_secs(3)))
        .finish()
        .await?;
    eprintln!(
        "{}; p50 {:?} p99 {:?}",
        report.summary(),
        report.latency_percentile(50.0),
        report.latency_percentile(99.0)
    );
    ensure!(report.failures().is_empty(), "{}", report.summary());
    let all: Vec<_> = report.outcomes.iter().collect();
    let regions = LoadReport::served_by(&all);
    ensure!(
        regions.len() == 1 && regions[0].0 == "us-east" && regions[0].1 == all.len(),
        "healthy local instances must serve 100%: {regions:?}"
    );
    // Under concurrency both local instances take requests (power of two choices weighs the
    // requests in flight; with one request at a time it may rightly keep to the faster one).
    // The body names the instance.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..5 {
        let batch = (0..20).map(|_| client.get("hello", "/"));
        for reply in futures::future::try_join_all(batch).await? {
            for instance in ["us-east-1", "us-east-2"] {
                if reply.text().contains(&format!("{instance} ")) {
                    seen.insert(instance);
                }
            }
        }
    }
    ensure!(
        seen.len() == 2,
        "100 requests, 20 at a time, reached only {seen:?} of the two local instances"
    );
    // The sidecar's metrics count what it served, by function, tier and status.
    let metrics = world.sidecar("us-east").metrics().await?;
    let served = metric_value(
        &metrics,
        r#"meridian_requests_total{function="hello",tier="us-east",status="200"}"#,
    );
    ensure!(
        served.is_some_and(|n| n >= (all.len() + 100) as f64),
        "meridian_requests_total for hello/us-east/200 is {served:?}, expected >= {}:\n{metrics}",
        all.len() + 100
    );
    let timed = metric_value(
        &metrics,
        r#"meridian_request_duration_seconds_count{function="hello"}"#,
    );
    ensure!(
        timed.is_some_and(|n| n >= (all.len() + 100) as f64),
        "meridian_request_duration_seconds_count for hello is {timed:?}:\n{metrics}"
    );

    // The other regions serve their own clients locally too.
    for region in ["eu-west", "ap-south"] {
        let reply = world.sidecar(region).client().get("hello", "/").await?;
        ensure!(
            reply.status == StatusCode::OK && reply.region() == Some(region),
            "{region}'s client: {}",
            reply.describe()
        );
    }
    Ok(())
}

fn expect_error(reply: &Reply, status: StatusCode, reason: &str, what: &str) -> Result<()> {
    ensure!(
        reply.status == status,
        "{what}: expected {status}, got {}",
        reply.describe()
    );
    ensure!(
        reply.error() == Some(reason),
        "{what}: expected meridian-error {reason:?}, got {}",
        reply.describe()
    );
    ensure!(
        reply.text().starts_with(&format!("meridian: {reason}")),
        "{what}: the body must start with \"meridian: {reason}\": {}",
        reply.describe()
    );
    ensure!(
        reply.region() == Some("us-east"),
        "{what}: an error answer carries the sidecar's region: {}",
        reply.describe()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_clear_status_and_reason() -> Result<()> {
    let world = World::start_with(&["us-east"], Relay::new(), SidecarOpts::default()).await?;
    let ip = region_ip(0);
    let backend = TestBackend::start(SocketAddr::from((ip, free_port(ip)?)), "known").await?;
    world
        .apply(backend_spec("known", &[("us-east", backend.url())]))
        .await?;
    world
        .wait_served("us-east", "known", "us-east", Duration::from_secs(20))
        .await?;
    let sidecar = world.sidecar("us-east");
    let client = sidecar.client();
    let outbound = sidecar.outbound();

    // Lookups that work: <fn>, <fn>.<ns>, any case, a port ignored.
    for host in [
        "known",
        "known.default",
        "KNOWN",
        "known:8080",
        "known.default:80",
    ] {
        let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let reply = raw_exchange(outbound, request.as_bytes()).await?;
        ensure!(
            reply.status == StatusCode::OK && reply.region() == Some("us-east"),
            "Host {host:?}: {}",
            reply.describe()
        );
    }

    let reply = client.get("nosuchfn", "/").await?;
    expect_error(
        &reply,
        StatusCode::NOT_FOUND,
        "unknown-function",
        "unknown function",
    )?;
    let reply = client.get("known.otherns", "/").await?;
    expect_error(
        &reply,
        StatusCode::NOT_FOUND,
        "unknown-function",
        "known name, unknown namespace",
    )?;

    for host in ["bad_host", "a.b.c", "-dash", "known..default", ""] {
        let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let reply = raw_exchange(outbound, request.as_bytes()).await?;
        expect_error(
            &reply,
            StatusCode::BAD_REQUEST,
            "bad-host",
            &format!("Host {host:?}"),
        )?;
    }
    let reply = raw_exchange(outbound, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await?;
    expect_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "bad-host",
        "no Host header",
    )?;

    // Headers: 32 KiB pass, 70 KiB (over the 64 KiB limit) get 431.
    let big = "v".repeat(32 * 1024);
    let request =
        format!("GET / HTTP/1.1\r\nHost: known\r\nx-big: {big}\r\nConnection: close\r\n\r\n");
    let reply = raw_exchange(outbound, request.as_bytes()).await?;
    ensure!(
        reply.status == StatusCode::OK,
        "32 KiB of headers must pass: {}",
        reply.describe()
    );
    let huge = "v".repeat(70 * 1024);
    let request =
        format!("GET / HTTP/1.1\r\nHost: known\r\nx-big: {huge}\r\nConnection: close\r\n\r\n");
    let reply = raw_exchange(outbound, request.as_bytes()).await?;
    ensure!(
        reply.status == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "70 KiB of headers: expected 431, got {}",
        reply.describe()
    );
    ensure!(
        reply.error() == Some("headers-too-large"),
        "431 without meridian-error: headers-too-large: {}",
        reply.describe()
    );
    // And the sidecar still serves afterwards.
    let reply = client.get("known", "/").await?;
    ensure!(reply.status == StatusCode::OK, "{}", reply.describe());
    Ok(())
}

/// RFC 9112 §3.2: a request with more than one Host header must be refused with 400 (two Hosts
/// are how request-smuggling and routing-confusion attacks start); §3.2.2: with an absolute-form
/// target, the target's authority wins over Host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_ambiguities_follow_rfc_9112() -> Result<()> {
    let world = World::start_with(&["us-east"], Relay::new(), SidecarOpts::default()).await?;
    let ip = region_ip(0);
    let backend = TestBackend::start(SocketAddr::from((ip, free_port(ip)?)), "known").await?;
    world
        .apply(backend_spec("known", &[("us-east", backend.url())]))
        .await?;
    world
        .wait_served("us-east", "known", "us-east", Duration::from_secs(20))
        .await?;
    let outbound = world.sidecar("us-east").outbound();
    let reply = raw_exchange(
        outbound,
        b"GET / HTTP/1.1\r\nHost: known\r\nHost: other\r\nConnection: close\r\n\r\n",
    )
    .await?;
    expect_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "bad-host",
        "two Host headers",
    )?;
    let reply = raw_exchange(
        outbound,
        b"GET http://known/ HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
    )
    .await?;
    ensure!(
        reply.status == StatusCode::OK,
        "absolute-form target http://known/ with Host: other must go to known: {}",
        reply.describe()
    );
    Ok(())
}
