//! Process functions that scale with load: a burst from idle, scale to zero and the cold start
//! after it, a warm region hiding a cold start, and a crashed instance under load. Real etcd,
//! control plane, agents running the sample function as processes, and sidecars.

use std::time::Duration;

use anyhow::{ensure, Result};
use meridian_tests::{
    describe_scale, instance_processes, region_scale, wait_scale, ClosedLoop, ProcessFunction,
    Relay, SidecarOpts, World,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::time::Instant;

/// Header the sidecar sets on a response to a request it held for a cold start.
const HELD_HEADER: &str = "meridian-held-ms";

async fn one_region() -> Result<World> {
    World::start_with(&["us-east"], Relay::new(), SidecarOpts::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn burst_from_idle_reaches_ten_ready_instances_within_ten_seconds_without_failures(
) -> Result<()> {
    let world = one_region().await?;
    let cp = world.mesh.cp().url();
    // Each request takes 500 ms, so 100 clients keep 100 requests in flight (less the clients'
    // own time between requests, a few ms): ten instances' worth at a target of 10. With short
    // requests that gap matters: at 100 ms a busy machine measured 87 in flight, which is nine
    // instances' worth.
    let function = ProcessFunction {
        delay_ms: 500,
        max_instances: 20,
        ..ProcessFunction::sample("burst")
    };
    world.apply(function.spec()?).await?;
    wait_scale(
        &cp,
        "burst",
        "us-east",
        Duration::from_secs(20),
        "burst to be placed and idle at zero",
        |s| s.max_instances == 20 && s.desired == 0 && s.ready == 0,
    )
    .await?;

    let load = ClosedLoop::start(&world.sidecar("us-east").client(), "burst", 100);
    let started = load.started();
    let scaled = wait_scale(
        &cp,
        "burst",
        "us-east",
        Duration::from_secs(10),
        "at least 10 ready instances",
        |s| s.ready >= 10,
    )
    .await;
    let reached_after = started.elapsed();
    // Keep the load on a little longer: the new instances must serve without failures too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = load.finish().await?;
    let scale = scaled?;
    println!(
        "10 ready after {reached_after:?}; {}; {}",
        describe_scale(&scale),
        report.summary()
    );
    ensure!(
        report.failures.is_empty(),
        "requests failed: {}",
        report.summary()
    );
    ensure!(
        report.ok > 500,
        "too few requests served: {}",
        report.summary()
    );
    ensure!(
        scale.panic || scale.reason.contains("panic"),
        "a burst of 10x capacity must be met in panic mode: {}",
        describe_scale(&scale)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_function_scales_to_zero_and_its_next_request_is_held_for_a_recorded_cold_start(
) -> Result<()> {
    let world = one_region().await?;
    let cp = world.mesh.cp().url();
    let function = ProcessFunction {
        idle_seconds: 2,
        ..ProcessFunction::sample("sleepy")
    };
    world.apply(function.spec()?).await?;
    wait_scale(
        &cp,
        "sleepy",
        "us-east",
        Duration::from_secs(20),
        "sleepy to be placed",
        |s| s.max_instances == 10,
    )
    .await?;

    let client = world.sidecar("us-east").client();
    let first = client.get("sleepy", "/").await?;
    ensure!(first.status == 200, "first request: {}", first.describe());
    ensure!(
        first.headers.contains_key(HELD_HEADER),
        "the first request of a function at zero must be held: {:?}",
        first.headers
    );
    let running = wait_scale(
        &cp,
        "sleepy",
        "us-east",
        Duration::from_secs(10),
        "one ready instance with its cold start recorded",
        |s| s.ready == 1 && s.cold_start_ms > 0,
    )
    .await?;
    println!("after the first request: {}", describe_scale(&running));

    // No more requests: after idle_seconds the instance drains and stops.
    let idle_since = Instant::now();
    let zero = wait_scale(
        &cp,
        "sleepy",
        "us-east",
        Duration::from_secs(20),
        "scale to zero",
        |s| s.desired == 0 && s.ready == 0 && s.starting == 0 && s.draining == 0,
    )
    .await?;
    println!(
        "scaled to zero {:?} after the last request: {}",
        idle_since.elapsed(),
        describe_scale(&zero)
    );
    ensure!(
        zero.reason.contains("idle"),
        "the reason must say idle: {}",
        describe_scale(&zero)
    );
    meridian_tests::poll_until(
        Duration::from_secs(15),
        "the instance process to exit",
        || async {
            let left = instance_processes("default", "sleepy");
            ensure!(left.is_empty(), "still running: {left:?}");
            Ok(())
        },
    )
    .await?;

    let sent = Instant::now();
    let cold = client.get("sleepy", "/").await?;
    let took = sent.elapsed();
    ensure!(
        cold.status == 200,
        "request after idle: {}",
        cold.describe()
    );
    let held = cold
        .headers
        .get(HELD_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    ensure!(
        held.is_some(),
        "the request after scale to zero must be held: {:?}",
        cold.headers
    );
    let recorded = wait_scale(
        &cp,
        "sleepy",
        "us-east",
        Duration::from_secs(10),
        "the second cold start to be recorded",
        |s| s.ready == 1 && s.cold_start_ms > 0,
    )
    .await?;
    println!(
        "cold request took {took:?} (held {held:?} ms); {}",
        describe_scale(&recorded)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn first_request_goes_to_a_warm_region_instead_of_waiting_for_a_cold_start() -> Result<()> {
    let relay = Relay::new();
    // A short distance, so the warm region is clearly faster than any cold start.
    relay.set_latency("us-east", "eu-west", Duration::from_millis(2));
    let world = World::start_with(&["us-east", "eu-west"], relay, SidecarOpts::default()).await?;
    let cp = world.mesh.cp().url();
    let function = ProcessFunction::sample("warm").in_regions(&[("us-east", 0), ("eu-west", 1)]);
    world.apply(function.spec()?).await?;
    wait_scale(
        &cp,
        "warm",
        "eu-west",
        Duration::from_secs(20),
        "an instance ready in eu-west",
        |s| s.ready >= 1,
    )
    .await?;
    let us_east = wait_scale(
        &cp,
        "warm",
        "us-east",
        Duration::from_secs(10),
        "us-east placed and at zero",
        |s| s.max_instances > 0 && s.ready == 0,
    )
    .await?;
    println!("before: {}", describe_scale(&us_east));
    // us-east must know that eu-west has a ready instance before the request is sent.
    world
        .wait_remote_tiers_up("us-east", "warm", &["eu-west"], Duration::from_secs(10))
        .await?;

    let reply = world.sidecar("us-east").client().get("warm", "/").await?;
    ensure!(reply.status == 200, "first request: {}", reply.describe());
    ensure!(
        reply.region() == Some("eu-west"),
        "the first request must be served by the warm region: {}",
        reply.describe()
    );
    ensure!(
        !reply.headers.contains_key(HELD_HEADER),
        "the first request must not wait for a cold start: {:?}",
        reply.headers
    );
    // ...while us-east starts its own instance, and then serves locally.
    wait_scale(
        &cp,
        "warm",
        "us-east",
        Duration::from_secs(10),
        "us-east activated by the request",
        |s| s.ready >= 1,
    )
    .await?;
    world
        .wait_served("us-east", "warm", "us-east", Duration::from_secs(10))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instance_killed_under_load_is_restarted_without_failed_requests() -> Result<()> {
    let world = one_region().await?;
    let cp = world.mesh.cp().url();
    let function = ProcessFunction {
        min_instances: 2,
        delay_ms: 20,
        ..ProcessFunction::sample("sturdy")
    };
    world.apply(function.spec()?).await?;
    let before = wait_scale(
        &cp,
        "sturdy",
        "us-east",
        Duration::from_secs(20),
        "two ready instances",
        |s| s.ready == 2,
    )
    .await?;
    world
        .wait_served("us-east", "sturdy", "us-east", Duration::from_secs(10))
        .await?;

    let load = ClosedLoop::start(&world.sidecar("us-east").client(), "sturdy", 8);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let victim = before
        .instances
        .first()
        .map(|i| (i.pid, i.id.clone()))
        .ok_or_else(|| anyhow::anyhow!("no instance listed: {}", describe_scale(&before)))?;
    kill(Pid::from_raw(i32::try_from(victim.0)?), Signal::SIGKILL)?;
    let after = wait_scale(
        &cp,
        "sturdy",
        "us-east",
        Duration::from_secs(15),
        "the killed instance to be replaced",
        |s| {
            s.ready == 2
                && s.restarts >= 1
                && s.instances
                    .iter()
                    .all(|i| i.id != victim.1 && i.pid != victim.0)
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = load.finish().await?;
    println!("{}; {}", describe_scale(&after), report.summary());
    ensure!(
        after.last_exit.contains("signal 9") || after.last_exit.contains("SIGKILL"),
        "the last exit must name the signal: {}",
        describe_scale(&after)
    );
    ensure!(
        report.failures.is_empty(),
        "idempotent requests failed: {}",
        report.summary()
    );
    let processes = instance_processes("default", "sturdy");
    ensure!(
        processes.len() == 2,
        "exactly two instance processes must run: {processes:?}"
    );
    let _ = region_scale(&cp, "sturdy", "us-east").await?;
    Ok(())
}
