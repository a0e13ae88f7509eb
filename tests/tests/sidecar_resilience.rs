//! Faults around a sidecar other than instance loss: a link that resets every connection (the
//! remote region is marked down at once and traffic moves to the next region with no failure;
//! healed, it comes back), and an agent restart (the sidecar keeps serving meanwhile, then
//! follows the restarted agent's tables).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Result};
use meridian_proto::v1::RoutingPolicy;
use meridian_tests::http::{Load, LoadReport, LoadSpec};
use meridian_tests::{
    backend_spec, free_port, poll_until, region_ip, sample_spec, start_samples, Relay, SidecarOpts,
    TestBackend, World,
};
use tokio::time::Instant;

/// Timing-sensitive: one test at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resetting_link_moves_traffic_to_the_next_region_without_failures() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    const RATE: u32 = 100;
    const RUN: Duration = Duration::from_secs(6);
    const RESET_AT: Duration = Duration::from_secs(1);
    const HEAL_AT: Duration = Duration::from_secs(3);
    let world = World::start().await?;
    let instances = start_samples(&[("eu-west", 1), ("ap-south", 1)]).await?;
    let mut spec = sample_spec("hello", &instances.iter().collect::<Vec<_>>());
    spec.routing = Some(RoutingPolicy {
        per_try_timeout_ms: Some(1000),
        ..Default::default()
    });
    world.apply(spec).await?;
    world
        .wait_remote_tiers_up(
            "us-east",
            "hello",
            &["eu-west", "ap-south"],
            Duration::from_secs(20),
        )
        .await?;
    world
        .wait_served("us-east", "hello", "eu-west", Duration::from_secs(10))
        .await?;

    let client = world.sidecar("us-east").client();
    let load = Load::start(&client, LoadSpec::get("hello", RATE, RUN));
    tokio::time::sleep_until(load.started() + RESET_AT).await;
    world.relay.reset("us-east", "eu-west");
    let reset = Instant::now();
    poll_until(Duration::from_secs(5), "eu-west marked down", || async {
        let state = world.probe_state("us-east", "hello", "eu-west").await?;
        ensure!(
            matches!(state.as_deref(), Some("down" | "unknown")),
            "{state:?}"
        );
        Ok(())
    })
    .await?;
    let detected = reset.elapsed();
    let detected_at = reset + detected - load.started();
    tokio::time::sleep_until(load.started() + HEAL_AT).await;
    world.relay.heal("us-east", "eu-west");
    let healed = Instant::now();
    poll_until(
        Duration::from_secs(5),
        "eu-west probed up again",
        || async {
            let state = world.probe_state("us-east", "hello", "eu-west").await?;
            ensure!(state.as_deref() == Some("up"), "{state:?}");
            Ok(())
        },
    )
    .await?;
    let recovered_at = healed.elapsed() + (healed - load.started());
    let report = load.finish().await?;
    eprintln!(
        "reset detected after {detected:?}; eu-west up again {:?} after the heal; load: {}",
        recovered_at - HEAL_AT,
        report.summary()
    );
    ensure!(
        detected < Duration::from_secs(1),
        "eu-west marked down only {detected:?} after its link started resetting"
    );
    ensure!(report.failures().is_empty(), "{}", report.summary());
    let during = LoadReport::served_by(
        &report.sent_between(detected_at + Duration::from_millis(100), HEAL_AT),
    );
    ensure!(
        during.len() == 1 && during[0].0 == "ap-south",
        "while eu-west's link resets, ap-south must serve: {during:?}"
    );
    let after =
        LoadReport::served_by(&report.sent_between(recovered_at + Duration::from_millis(500), RUN));
    ensure!(
        after.len() == 1 && after[0].0 == "eu-west",
        "healed, eu-west must serve again: {after:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_keeps_serving_through_an_agent_restart_then_follows_it() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut world = World::start_with(&["us-east"], Relay::new(), SidecarOpts::default()).await?;
    let ip = region_ip(0);
    let backend = TestBackend::start(SocketAddr::from((ip, free_port(ip)?)), "b").await?;
    world
        .apply(backend_spec("before", &[("us-east", backend.url())]))
        .await?;
    world
        .wait_served("us-east", "before", "us-east", Duration::from_secs(20))
        .await?;

    let client = world.sidecar("us-east").client();
    let load = Load::start(
        &client,
        LoadSpec::get("before", 100, Duration::from_secs(3)),
    );
    world.mesh.agents[0].kill();
    tokio::time::sleep_until(load.started() + Duration::from_secs(1)).await;
    world.mesh.agents[0].restart().await?;
    let report = load.finish().await?;
    eprintln!("through the agent restart: {}", report.summary());
    ensure!(report.failures().is_empty(), "{}", report.summary());

    // The sidecar re-subscribed: a change made now reaches it.
    world
        .apply(backend_spec("after", &[("us-east", backend.url())]))
        .await?;
    world
        .wait_served("us-east", "after", "us-east", Duration::from_secs(20))
        .await?;
    Ok(())
}
