//! `bench-coldstart`: what scaling from zero costs, with the real binaries on loopback (one
//! region: etcd, a control plane, an agent running the sample function as processes, a
//! sidecar).
//!
//! It prints:
//! - **cold-start overhead Meridian adds**, p50/p99 over `--samples` functions each at zero:
//!   from the moment the request is sent to the sidecar until it reaches the new instance
//!   (`x-arrived-unix-us`), minus the instance's own start time (`x-ready-unix-us` -
//!   `x-start-unix-us`: from its `main` to listening). What remains is Meridian's part: the
//!   sidecar holding the request and asking the agent, the agent's spawn (fork/exec), the
//!   readiness poll, the table handed to the sidecar, and the forward. Requests are sent one at
//!   a time so starts do not compete.
//! - **instances started per second**: one function applied with `minInstances = --instances`;
//!   from the first instance spawned to the last ready.
//! - **time from a 10x burst to enough ready capacity**: a steady 10 concurrent requests (100 ms
//!   each, target concurrency 10: one instance) for one stable window, then 100; the time until
//!   10 are ready.
//!
//! Usage: bench-coldstart [--samples N] [--instances N]
//! (build first: cargo build --release --workspace --bins --examples).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Result};
use clap::Parser;
use meridian_tests::{
    describe_scale, region_scale, wait_scale, ClosedLoop, ProcessFunction, Relay, SidecarOpts,
    World,
};
use tokio::time::Instant;

/// Cold-start overhead, instances started per second, and a 10x burst.
#[derive(Debug, Parser)]
#[command(name = "bench-coldstart")]
struct Options {
    /// Cold starts measured.
    #[arg(long, default_value_t = 40)]
    samples: usize,
    /// Instances started at once for the rate figure.
    #[arg(long, default_value_t = 40)]
    instances: u32,
}

fn unix_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

fn header_us(reply: &meridian_tests::http::Reply, name: &str) -> Result<i64> {
    reply
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("response without {name}: {}", reply.describe()))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> Result<()> {
    let options = Options::parse();
    let world = World::start_with(&["us-east"], Relay::new(), SidecarOpts::default()).await?;
    let cp = world.mesh.cp().url();
    let client = world.sidecar("us-east").client();

    // 1. Cold-start overhead.
    for i in 0..options.samples {
        world
            .apply(ProcessFunction::sample(&format!("cold-{i}")).spec()?)
            .await?;
    }
    for i in 0..options.samples {
        wait_scale(
            &cp,
            &format!("cold-{i}"),
            "us-east",
            Duration::from_secs(30),
            "placed at zero",
            |s| s.max_instances > 0 && s.ready == 0,
        )
        .await?;
    }
    let mut overheads = Vec::new();
    let mut totals = Vec::new();
    let mut own = Vec::new();
    for i in 0..options.samples {
        let sent = unix_us();
        let reply = client.get(&format!("cold-{i}"), "/").await?;
        let total = unix_us() - sent;
        anyhow::ensure!(reply.status == 200, "cold-{i}: {}", reply.describe());
        let arrived = header_us(&reply, "x-arrived-unix-us")?;
        let start = header_us(&reply, "x-start-unix-us")?;
        let ready = header_us(&reply, "x-ready-unix-us")?;
        let instance_own = ready - start;
        overheads.push(((arrived - sent) - instance_own) as f64 / 1000.0);
        totals.push(total as f64 / 1000.0);
        own.push(instance_own as f64 / 1000.0);
    }
    for list in [&mut overheads, &mut totals, &mut own] {
        list.sort_by(f64::total_cmp);
    }
    println!("cold start, {} samples (ms):", options.samples);
    println!(
        "  overhead Meridian adds  p50 {:.2}  p99 {:.2}  max {:.2}",
        percentile(&overheads, 50.0),
        percentile(&overheads, 99.0),
        percentile(&overheads, 100.0)
    );
    println!(
        "  instance's own start    p50 {:.2}  p99 {:.2}",
        percentile(&own, 50.0),
        percentile(&own, 99.0)
    );
    println!(
        "  whole first request     p50 {:.2}  p99 {:.2}",
        percentile(&totals, 50.0),
        percentile(&totals, 99.0)
    );

    // 2. Instances started per second.
    let many = ProcessFunction {
        min_instances: options.instances,
        max_instances: options.instances,
        ..ProcessFunction::sample("many")
    };
    let applied = Instant::now();
    world.apply(many.spec()?).await?;
    let all = wait_scale(
        &cp,
        "many",
        "us-east",
        Duration::from_secs(120),
        "every instance ready",
        |s| s.ready == options.instances,
    )
    .await?;
    let elapsed = applied.elapsed();
    let first_spawn = all.instances.iter().map(|i| i.started_unix_ms).min();
    let last_ready = all.instances.iter().map(|i| i.ready_unix_ms).max();
    let span_ms = match (first_spawn, last_ready) {
        (Some(a), Some(b)) if b > a => (b - a) as f64,
        _ => elapsed.as_secs_f64() * 1000.0,
    };
    println!(
        "instances: {} ready {:.0} ms after the first spawn: {:.0} instances/s \
         ({:?} from Apply, including placement and the push)",
        options.instances,
        span_ms,
        f64::from(options.instances) / (span_ms / 1000.0),
        elapsed
    );
    world
        .apply(
            ProcessFunction {
                min_instances: 0,
                max_instances: options.instances,
                idle_seconds: 1,
                ..ProcessFunction::sample("many")
            }
            .spec()?,
        )
        .await?;

    // 3. A 10x burst.
    let burst = ProcessFunction {
        delay_ms: 100,
        max_instances: 20,
        ..ProcessFunction::sample("burst")
    };
    world.apply(burst.spec()?).await?;
    wait_scale(
        &cp,
        "burst",
        "us-east",
        Duration::from_secs(30),
        "burst placed",
        |s| s.max_instances == 20,
    )
    .await?;
    let steady = ClosedLoop::start(&client, "burst", 10);
    let one = wait_scale(
        &cp,
        "burst",
        "us-east",
        Duration::from_secs(30),
        "one ready instance under the steady load",
        |s| s.ready >= 1,
    )
    .await?;
    // Let the steady load fill one whole stable window (60 s), as a function that has been
    // serving a while would have; the surge then starts from a settled state.
    tokio::time::sleep(Duration::from_secs(62)).await;
    let before = region_scale(&cp, "burst", "us-east").await?;
    println!("steady 10 concurrent: {}", describe_scale(&before));
    let _ = one;
    let surge = ClosedLoop::start(&client, "burst", 90);
    let surge_at = Instant::now();
    let scaled = wait_scale(
        &cp,
        "burst",
        "us-east",
        Duration::from_secs(60),
        "10 ready instances after the burst",
        |s| s.ready >= 10,
    )
    .await?;
    let took = surge_at.elapsed();
    let surge_report = surge.finish().await?;
    let steady_report = steady.finish().await?;
    println!(
        "10x burst (10 -> 100 concurrent): 10 ready after {:.2} s; {}",
        took.as_secs_f64(),
        describe_scale(&scaled)
    );
    println!(
        "  during the burst: {} / steady clients: {}",
        surge_report.summary(),
        steady_report.summary()
    );
    Ok(())
}
