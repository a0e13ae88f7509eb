//! Region loss: every us-east instance of a function is killed (SIGKILL) during a steady
//! 200 req/s GET load from a us-east client (HTTP/1.1, and again over HTTP/2). No request may fail; afterwards every request is
//! served by the nearest other region (eu-west, 40 ms away through the relay, against ap-south at
//! 120 ms: the failover order is the data plane's measured one); the local instances stop being
//! tried less than a second after the kill.

use std::time::Duration;

use anyhow::{ensure, Result};
use meridian_tests::http::{LoadReport, LoadSpec};
use meridian_tests::{start_samples, Tombstone, World};
use tokio::time::Instant;

const RATE: u32 = 200;
const RUN: Duration = Duration::from_secs(6);
const KILL_AT: Duration = Duration::from_secs(2);
/// A gap this long between two attempts on the dead instances ends the failover burst; what
/// comes later is the sidecar re-checking an endpoint whose ejection expired.
const BURST_GAP: Duration = Duration::from_millis(300);

/// The two tests are timing-sensitive: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_loss_fails_over_to_the_nearest_region_without_failures() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    region_loss(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_loss_over_http2_fails_over_without_failures() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    region_loss(true).await
}

async fn region_loss(http2: bool) -> Result<()> {
    let world = World::start().await?;
    let mut instances = start_samples(&[("us-east", 2), ("eu-west", 1), ("ap-south", 1)]).await?;
    // The failover order is measured: wait until both remote regions have a round trip, so
    // that the order is the measured one and not "unknown last".
    let tiers = world.serve_hello_in_us_east(&instances).await?;
    eprintln!("us-east tiers before the kill: {tiers:#?}");

    let client = if http2 {
        world.sidecar("us-east").client_h2()
    } else {
        world.sidecar("us-east").client()
    };
    let load = meridian_tests::http::Load::start(&client, LoadSpec::get("hello", RATE, RUN));
    // Waiting for a point of the load's schedule, not for state.
    tokio::time::sleep_until(load.started() + KILL_AT).await;
    let mut dead = Vec::new();
    for instance in instances.iter_mut().filter(|i| i.region() == "us-east") {
        instance.kill();
        dead.push(instance.addr());
    }
    let killed = Instant::now();
    let killed_at = killed - load.started();
    let mut tombstones = Vec::new();
    for addr in dead {
        tombstones.push(Tombstone::bind(addr).await?);
    }
    let report = load.finish().await?;
    eprintln!("load: {}", report.summary());

    let failures = report.failures();
    ensure!(
        failures.is_empty(),
        "{} of {} requests failed:\n{}",
        failures.len(),
        report.outcomes.len(),
        report.summary()
    );
    // A request sent just before the kill may still be in flight when it happens (and be
    // retried elsewhere): leave a margin.
    let before = report.sent_between(
        Duration::ZERO,
        killed_at.saturating_sub(Duration::from_millis(200)),
    );
    let before_regions = LoadReport::served_by(&before);
    ensure!(
        before_regions.len() == 1 && before_regions[0].0 == "us-east",
        "before the kill everything must be served locally: {before_regions:?}"
    );
    let after = report.sent_between(killed_at + Duration::from_secs(1), RUN);
    ensure!(!after.is_empty(), "no request after the failover window");
    let after_regions = LoadReport::served_by(&after);
    ensure!(
        after_regions.len() == 1 && after_regions[0].0 == "eu-west",
        "from 1 s after the kill everything must be served by eu-west: {after_regions:?}"
    );

    // Attempts on the dead instances (connections to their addresses after the kill).
    let mut attempts: Vec<Instant> = tombstones.iter().flat_map(Tombstone::attempts).collect();
    attempts.sort();
    let offsets: Vec<Duration> = attempts.iter().map(|a| *a - killed).collect();
    // The burst is what follows the kill without a gap; under load the tombstones may bind
    // after it (the first connection refused ejects at once), and the first attempts they see
    // are then already re-checks of an expired ejection.
    let mut burst_end = Duration::ZERO;
    for offset in &offsets {
        if *offset - burst_end > BURST_GAP {
            break;
        }
        burst_end = *offset;
    }
    let rechecks = offsets.iter().filter(|o| **o > burst_end).count();
    eprintln!(
        "attempts on dead us-east instances after the kill: {} (last of the failover burst \
         {burst_end:?} after the kill; {rechecks} later re-checks at {:?})",
        offsets.len(),
        offsets
            .iter()
            .filter(|o| **o > burst_end)
            .collect::<Vec<_>>()
    );
    ensure!(
        burst_end < Duration::from_secs(1),
        "the sidecar kept trying the dead local instances until {burst_end:?} after the kill: \
         {offsets:?}"
    );
    Ok(())
}
