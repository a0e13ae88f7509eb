//! A crash loop must not hold requests while another region is healthy. us-east's instances of
//! `crashy` are killed (SIGKILL, found in `/proc`) again and again for 10 s, as soon as each
//! one appears, while eu-west (80 ms round trip away) serves normally and a us-east client sends
//! 100 GET/s through its sidecar. No request may be held for longer than 1 s (neither by the
//! `meridian-held-ms` the sidecar reports nor by the latency the client sees), and none may
//! fail. Real etcd, control plane, agents running the sample function, and sidecars.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use meridian_tests::http::{Load, LoadSpec, Outcome};
use meridian_tests::{
    describe_scale, region_instance_processes, region_scale, wait_scale, ProcessFunction, Relay,
    SidecarOpts, World,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::time::Instant;

/// The whole test's budget.
const BUDGET: Duration = Duration::from_secs(60);
/// How long us-east's instances are killed, and the load runs.
const CRASH_LOOP: Duration = Duration::from_secs(10);
const RATE: u32 = 100;
/// us-east ↔ eu-west, one way.
const ONE_WAY: Duration = Duration::from_millis(40);
/// Longest acceptable hold (and latency) while a healthy remote region exists.
const HELD_LIMIT: Duration = Duration::from_secs(1);
/// How often the killer looks for new us-east instances.
const KILL_EVERY: Duration = Duration::from_millis(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_loop_sends_requests_to_the_healthy_region_instead_of_holding_them() -> Result<()> {
    tokio::time::timeout(BUDGET, scenario())
        .await
        .with_context(|| format!("the test took more than its {BUDGET:?} budget"))?
}

async fn scenario() -> Result<()> {
    let test_started = Instant::now();
    let relay = Relay::new();
    relay.set_latency("us-east", "eu-west", ONE_WAY);
    let world = World::start_with(&["us-east", "eu-west"], relay, SidecarOpts::default()).await?;
    let cp = world.mesh.cp().url();
    let function = ProcessFunction {
        min_instances: 1,
        ..ProcessFunction::sample("crashy")
    }
    .in_regions(&[("us-east", 1), ("eu-west", 1)]);
    world.apply(function.spec()?).await?;
    for region in ["us-east", "eu-west"] {
        wait_scale(
            &cp,
            "crashy",
            region,
            Duration::from_secs(20),
            "a ready instance with its cold start recorded",
            |s| s.ready >= 1 && s.cold_start_ms > 0,
        )
        .await?;
    }
    world
        .wait_remote_tiers_up("us-east", "crashy", &["eu-west"], Duration::from_secs(10))
        .await?;
    world
        .wait_served("us-east", "crashy", "us-east", Duration::from_secs(10))
        .await?;
    let before = region_scale(&cp, "crashy", "us-east").await?;
    println!("before the crash loop: {}", describe_scale(&before));

    let load = Load::start(
        &world.sidecar("us-east").client(),
        LoadSpec {
            timeout: Duration::from_secs(5),
            ..LoadSpec::get("crashy", RATE, CRASH_LOOP)
        },
    );
    // The crash loop: every us-east instance dies as soon as it is seen, for the whole run.
    let until = load.started() + CRASH_LOOP;
    let mut killed: BTreeSet<String> = BTreeSet::new();
    let mut tick = tokio::time::interval(KILL_EVERY);
    while Instant::now() < until {
        tick.tick().await;
        for (pid, instance) in region_instance_processes("default", "crashy", "us-east") {
            // Gone already (it may have died on its own since the scan) is fine.
            let _ = kill(Pid::from_raw(i32::try_from(pid)?), Signal::SIGKILL);
            killed.insert(instance);
        }
    }
    let report = load.finish().await?;
    let after = region_scale(&cp, "crashy", "us-east").await?;

    let answered: Vec<&Outcome> = report.outcomes.iter().collect();
    let held: Vec<u64> = answered.iter().filter_map(|o| o.held_ms).collect();
    let max_held = held.iter().max().copied().unwrap_or(0);
    let limit_ms = u64::try_from(HELD_LIMIT.as_millis())?;
    let held_too_long = held.iter().filter(|ms| **ms > limit_ms).count();
    let slow = answered.iter().filter(|o| o.latency > HELD_LIMIT).count();
    let max_latency = answered.iter().map(|o| o.latency).max().unwrap_or_default();
    let failures = report.failures();
    println!(
        "crash loop of {CRASH_LOOP:?}: {} us-east instances killed; {} requests, {} failed, \
         served by {:?}; held: {} requests, max {max_held} ms, {held_too_long} over \
         {HELD_LIMIT:?}; latency p50 {:?} p99 {:?} max {max_latency:?}, {slow} over \
         {HELD_LIMIT:?}; us-east after: {}; test took {:?}",
        killed.len(),
        report.outcomes.len(),
        failures.len(),
        meridian_tests::http::LoadReport::served_by(&answered),
        held.len(),
        report.latency_percentile(50.0),
        report.latency_percentile(99.0),
        describe_scale(&after),
        test_started.elapsed(),
    );
    ensure!(
        killed.len() >= 3,
        "not a crash loop: only {} instances were killed ({killed:?})",
        killed.len()
    );
    ensure!(
        failures.is_empty(),
        "idempotent requests failed: {}",
        report.summary()
    );
    ensure!(
        held_too_long == 0,
        "{held_too_long} requests were held longer than {HELD_LIMIT:?} (max {max_held} ms) while \
         eu-west was healthy"
    );
    ensure!(
        slow == 0,
        "{slow} requests took longer than {HELD_LIMIT:?} (max {max_latency:?}) while eu-west was \
         healthy"
    );
    Ok(())
}
