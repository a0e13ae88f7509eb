//! Partial loss: 2 of 4 us-east instances are killed during a steady GET load from a us-east
//! client. The local tier keeps half its capacity, so (Envoy-style priority levels, 1.4
//! overprovisioning: 2/4 * 1.4 = 70%) some traffic spills to the next region and the rest stays
//! local; no request fails. The two killed are the two the sidecar prefers at that moment: it
//! learns of a death only from the requests that meet it.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use meridian_tests::http::{Load, LoadReport, LoadSpec};
use meridian_tests::{start_samples, World};

const RATE: u32 = 200;
const RUN: Duration = Duration::from_secs(6);
const KILL_AT: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_half_the_local_instances_spills_some_traffic_without_failures() -> Result<()> {
    let world = World::start().await?;
    let mut instances = start_samples(&[("us-east", 4), ("eu-west", 1), ("ap-south", 1)]).await?;
    world.serve_hello_in_us_east(&instances).await?;

    let client = world.sidecar("us-east").client();
    // The sidecar learns that an instance died only from requests it sends there (passive
    // health; local instances are not probed), and its balancer steers around an instance whose
    // last answer was slow until it answers again. A killed instance the balancer is avoiding
    // therefore still counts as capacity, so the two killed are the two it prefers right then
    // (lowest latency estimate on its /routes): the next requests meet their deaths.
    let load = Load::start(&client, LoadSpec::get("hello", RATE, RUN));
    tokio::time::sleep_until(load.started() + KILL_AT).await;
    let routes = world.sidecar("us-east").routes().await?;
    let mut preferred: Vec<(f64, String)> = routes["functions"][0]["tiers"][0]["endpoints"]
        .as_array()
        .context("no local tier in /routes")?
        .iter()
        .filter_map(|e| Some((e["ewmaMs"].as_f64()?, e["address"].as_str()?.to_owned())))
        .collect();
    preferred.sort_by(|a, b| a.0.total_cmp(&b.0));
    eprintln!("local endpoints by latency estimate at the loss: {preferred:?}");
    for (_, address) in preferred.iter().take(2) {
        let instance = instances
            .iter_mut()
            .find(|i| i.addr().to_string() == *address)
            .with_context(|| format!("no instance at {address}"))?;
        instance.kill();
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
    let before = LoadReport::served_by(
        &report.sent_between(Duration::ZERO, KILL_AT - Duration::from_millis(200)),
    );
    ensure!(
        before.len() == 1 && before[0].0 == "us-east",
        "with 4 healthy local instances everything must be served locally: {before:?}"
    );
    let after = report.sent_between(KILL_AT + Duration::from_secs(1), RUN);
    let after_regions = LoadReport::served_by(&after);
    let count = |region: &str| {
        after_regions
            .iter()
            .find(|(r, _)| r == region)
            .map_or(0, |(_, n)| *n)
    };
    let (local, spilled) = (count("us-east"), count("eu-west"));
    eprintln!(
        "after the loss: {local} local, {spilled} spilled to eu-west, of {} ({after_regions:?})",
        after.len()
    );
    ensure!(
        local > 0,
        "the surviving local instances serve nothing: {after_regions:?}"
    );
    ensure!(
        spilled > 0,
        "nothing spilled to eu-west with half the local tier gone: {after_regions:?}"
    );
    ensure!(
        count("ap-south") == 0,
        "traffic skipped eu-west (the nearest) for ap-south: {after_regions:?}"
    );
    // 70% local by the priority rule; allow a wide band for ejection re-checks.
    let local_share = local as f64 / after.len() as f64;
    ensure!(
        (0.4..=0.95).contains(&local_share),
        "local share {local_share:.2} is far from the 70% the priority rule gives"
    );
    Ok(())
}
