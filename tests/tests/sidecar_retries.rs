//! Retries: within a budget, so that an outage is not multiplied (every instance answering 503
//! for 10 s must not receive more than 1.2x the requests clients sent), and only where safe (a
//! POST that reached an instance is never sent again; a GET is retried elsewhere).
//!
//! The instances are backends served by the test process on the region's address, so that the
//! test counts exactly what reaches them.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Result};
use meridian_tests::http::{Load, LoadSpec};
use meridian_tests::{
    backend_spec, free_port, metric_value, poll_until, region_ip, Behavior, Relay, SidecarOpts,
    TestBackend, World,
};

fn fresh_addr(region_index: usize) -> Result<SocketAddr> {
    let ip = region_ip(region_index);
    Ok(SocketAddr::from((ip, free_port(ip)?)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_keeps_an_outage_from_multiplying_requests() -> Result<()> {
    const RATE: u32 = 100;
    const OUTAGE: Duration = Duration::from_secs(10);
    let world = World::start_with(&["us-east"], Relay::new(), SidecarOpts::default()).await?;
    let mut backends = Vec::new();
    for n in 0..4 {
        backends.push(TestBackend::start(fresh_addr(0)?, &format!("flaky-{n}")).await?);
    }
    let urls: Vec<(&str, String)> = backends.iter().map(|b| ("us-east", b.url())).collect();
    world.apply(backend_spec("flaky", &urls)).await?;
    world
        .wait_served("us-east", "flaky", "us-east", Duration::from_secs(20))
        .await?;

    for backend in &backends {
        backend.set_behavior(Behavior::Status(503));
    }
    let reached_before: u64 = backends.iter().map(TestBackend::requests).sum();
    let client = world.sidecar("us-east").client();
    let report = Load::start(&client, LoadSpec::get("flaky", RATE, OUTAGE))
        .finish()
        .await?;
    let reached = backends.iter().map(TestBackend::requests).sum::<u64>() - reached_before;
    let sent = report.outcomes.len() as u64;
    let ratio = reached as f64 / sent as f64;
    let metrics = world.sidecar("us-east").metrics().await.unwrap_or_default();
    let interesting: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            !l.starts_with('#')
                && (l.contains("retr") || l.contains("eject") || l.contains("budget"))
        })
        .collect();
    eprintln!(
        "outage: {sent} client requests, {reached} reached the instances (x{ratio:.2}); \
         {}\nsidecar metrics:\n{}",
        report.summary(),
        interesting.join("\n")
    );
    // Every request got an answer (no hang, no transport error): the failure is reported.
    let unanswered: Vec<_> = report
        .outcomes
        .iter()
        .filter(|o| o.result.is_err())
        .collect();
    ensure!(
        unanswered.is_empty(),
        "{} requests got no HTTP answer, e.g. {}",
        unanswered.len(),
        unanswered[0].describe()
    );
    ensure!(
        ratio <= 1.2,
        "{reached} requests reached the instances for {sent} sent by clients (x{ratio:.2} > 1.2)"
    );

    // The outage over, the function serves again.
    for backend in &backends {
        backend.set_behavior(Behavior::Serve);
    }
    world
        .wait_served("us-east", "flaky", "us-east", Duration::from_secs(40))
        .await?;
    Ok(())
}

/// With every instance failing half its requests, never twice in a row, nothing gets ejected and
/// every failure could be retried: here the budget (20% of requests plus 10 per second, over
/// 10 s) is what bounds the retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_bounds_retries_when_failures_are_spread_out() -> Result<()> {
    const RATE: u32 = 200;
    const RUN: Duration = Duration::from_secs(5);
    let world = World::start_with(&["us-east"], Relay::new(), SidecarOpts::default()).await?;
    let mut backends = Vec::new();
    for n in 0..4 {
        backends.push(TestBackend::start(fresh_addr(0)?, &format!("half-{n}")).await?);
    }
    let urls: Vec<(&str, String)> = backends.iter().map(|b| ("us-east", b.url())).collect();
    world.apply(backend_spec("half", &urls)).await?;
    world
        .wait_served("us-east", "half", "us-east", Duration::from_secs(20))
        .await?;
    let metrics_before = world.sidecar("us-east").metrics().await?;
    for backend in &backends {
        backend.set_behavior(Behavior::EveryOther(503));
    }
    let reached_before: u64 = backends.iter().map(TestBackend::requests).sum();
    let client = world.sidecar("us-east").client();
    let report = Load::start(&client, LoadSpec::get("half", RATE, RUN))
        .finish()
        .await?;
    let reached = backends.iter().map(TestBackend::requests).sum::<u64>() - reached_before;
    let sent = report.outcomes.len() as u64;
    let metrics = world.sidecar("us-east").metrics().await?;
    let exhausted = metric_value(&metrics, "meridian_retry_budget_exhausted_total").unwrap_or(0.0)
        - metric_value(&metrics_before, "meridian_retry_budget_exhausted_total").unwrap_or(0.0);
    let retries = reached.saturating_sub(sent);
    // What the budget allows in a 10 s window: 20% of the requests plus a reserve of 10 per
    // second of the window (100), and a few in flight when the load ends.
    let allowed = sent / 5 + 100 + 10;
    eprintln!(
        "{sent} requests, {reached} reached the instances ({retries} retries, {allowed} allowed), \
         budget exhausted {exhausted} times; {}",
        report.summary().lines().next().unwrap_or_default()
    );
    ensure!(
        report.outcomes.iter().all(|o| o.result.is_ok()),
        "every request must get an HTTP answer: {}",
        report.summary()
    );
    ensure!(
        retries <= allowed,
        "{retries} retries for {sent} requests: more than the budget's {allowed}"
    );
    ensure!(
        exhausted > 0.0,
        "half the requests failed at first, yet the budget never ran out: were they retried? \
         ({retries} retries)"
    );
    ensure!(
        retries >= sent / 10,
        "only {retries} retries for {sent} requests of which half failed: the budget allows \
         20%"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_never_retried_once_sent_but_a_get_is() -> Result<()> {
    let world = World::start_with(
        &["us-east", "eu-west"],
        Relay::with_default_latencies(),
        SidecarOpts::default(),
    )
    .await?;
    // us-east's only instance will take requests and drop them unanswered; eu-west's serves.
    let local = TestBackend::start(fresh_addr(0)?, "local").await?;
    let remote = TestBackend::start(fresh_addr(1)?, "remote").await?;
    world
        .apply(backend_spec(
            "orders",
            &[("us-east", local.url()), ("eu-west", remote.url())],
        ))
        .await?;
    world
        .wait_served("us-east", "orders", "us-east", Duration::from_secs(20))
        .await?;
    world
        .wait_remote_tiers_up("us-east", "orders", &["eu-west"], Duration::from_secs(10))
        .await?;
    local.set_behavior(Behavior::Drop);
    let client = world.sidecar("us-east").client();

    // Two of each: fewer than the 5 consecutive failures that would eject the instance (then
    // requests would not reach it at all and nothing would be tested).
    for n in 0..2u64 {
        let reply = client.post("orders", "/", format!("order {n}")).await?;
        ensure!(
            reply.status.is_server_error(),
            "POST {n} reached an instance that dropped it, yet was answered {}: it was sent \
             again somewhere",
            reply.describe()
        );
        ensure!(
            local.requests_with("POST") == n + 1,
            "POST {n}: the local instance saw {} POSTs",
            local.requests_with("POST")
        );
        ensure!(
            remote.requests_with("POST") == 0,
            "POST {n} was retried in eu-west after it had been sent to us-east: {}",
            reply.describe()
        );
        eprintln!("POST {n}: {}", reply.describe());
    }
    for n in 0..2u64 {
        let reply = client.get("orders", "/").await?;
        ensure!(
            reply.status == http::StatusCode::OK && reply.region() == Some("eu-west"),
            "GET {n} should have been retried in eu-west: {}",
            reply.describe()
        );
        ensure!(
            local.requests_with("GET") > n,
            "GET {n} never reached the local instance ({} GETs there): nothing was retried",
            local.requests_with("GET")
        );
        eprintln!("GET {n}: {}", reply.describe());
    }
    ensure!(
        remote.requests_with("GET") >= 2,
        "eu-west saw {} GETs",
        remote.requests_with("GET")
    );

    // Sanity: the local instance serving again gets the traffic back.
    local.set_behavior(Behavior::Serve);
    poll_until(
        Duration::from_secs(20),
        "us-east to serve again",
        || async {
            let reply = client.get("orders", "/").await?;
            ensure!(reply.region() == Some("us-east"), "{}", reply.describe());
            Ok(())
        },
    )
    .await?;
    Ok(())
}
