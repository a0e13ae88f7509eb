//! Partition: a function hosted in eu-west and ap-south only, called from us-east. Its traffic
//! goes to eu-west (nearest). The relay blackholes the us-east -> eu-west link: us-east's sidecar
//! must mark eu-west down (or unknown) in under a second, and traffic must go to ap-south with
//! no failed request (a GET stuck in the blackhole is retried in the other region after its
//! per-try timeout). Healed, eu-west comes back (probed up again) and gets the traffic back.

use std::time::Duration;

use anyhow::{ensure, Result};
use meridian_proto::v1::RoutingPolicy;
use meridian_tests::http::{Load, LoadReport, LoadSpec};
use meridian_tests::{poll_until, sample_spec, start_samples, World};
use tokio::time::Instant;

const RATE: u32 = 50;
const RUN: Duration = Duration::from_secs(9);
const BLACKHOLE_AT: Duration = Duration::from_secs(1);
const HEAL_AT: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_region_is_marked_down_quickly_and_comes_back_when_healed() -> Result<()> {
    let world = World::start().await?;
    let instances = start_samples(&[("eu-west", 1), ("ap-south", 1)]).await?;
    let mut spec = sample_spec("hello", &instances.iter().collect::<Vec<_>>());
    // A request caught in the blackhole is retried after 1 s, not the default 5 s.
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
    tokio::time::sleep_until(load.started() + BLACKHOLE_AT).await;
    world.relay.blackhole("us-east", "eu-west");
    let blackholed = Instant::now();
    let down_state = poll_until(
        Duration::from_secs(5),
        "us-east to mark eu-west down or unknown",
        || async {
            let state = world.probe_state("us-east", "hello", "eu-west").await?;
            ensure!(
                matches!(state.as_deref(), Some("down" | "unknown")),
                "eu-west is {state:?}"
            );
            Ok(state)
        },
    )
    .await?;
    let detected = blackholed.elapsed();
    let detected_at = blackholed + detected - load.started();
    eprintln!("eu-west marked {down_state:?} {detected:?} after the blackhole");

    tokio::time::sleep_until(load.started() + HEAL_AT).await;
    world.relay.heal("us-east", "eu-west");
    let healed = Instant::now();
    poll_until(
        Duration::from_secs(5),
        "us-east to probe eu-west up again",
        || async {
            let state = world.probe_state("us-east", "hello", "eu-west").await?;
            ensure!(state.as_deref() == Some("up"), "eu-west is {state:?}");
            Ok(())
        },
    )
    .await?;
    let recovered = healed.elapsed();
    let recovered_at = healed + recovered - load.started();
    eprintln!("eu-west probed up {recovered:?} after the heal");

    let report = load.finish().await?;
    eprintln!("load: {}", report.summary());
    ensure!(
        detected < Duration::from_secs(1),
        "eu-west was marked {down_state:?} only {detected:?} after the blackhole"
    );
    let failures = report.failures();
    ensure!(
        failures.is_empty(),
        "{} of {} requests failed:\n{}",
        failures.len(),
        report.outcomes.len(),
        report.summary()
    );
    let before = LoadReport::served_by(
        &report.sent_between(Duration::ZERO, BLACKHOLE_AT - Duration::from_millis(100)),
    );
    ensure!(
        before.len() == 1 && before[0].0 == "eu-west",
        "before the partition eu-west (nearest) must serve everything: {before:?}"
    );
    let during = LoadReport::served_by(
        &report.sent_between(detected_at + Duration::from_millis(100), HEAL_AT),
    );
    ensure!(
        during.len() == 1 && during[0].0 == "ap-south",
        "while eu-west is cut off, ap-south must serve everything: {during:?}"
    );
    let after =
        LoadReport::served_by(&report.sent_between(recovered_at + Duration::from_millis(500), RUN));
    ensure!(
        after.first().is_some_and(|(r, _)| r == "eu-west"),
        "after the heal eu-west must serve again: {after:?}"
    );
    ensure!(
        after.len() == 1,
        "after the heal everything must go back to eu-west: {after:?}"
    );
    Ok(())
}
