//! Recovery without churn: etcd and every control-plane replica go away for longer than the
//! agents' leases, so that etcd forgets every agent, and come back while a process function
//! serves steady load. The recovered scheduler must wait for the agents to reconnect (the
//! region grace) instead of unplacing their regions: no request fails and no instance is
//! stopped or replaced.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use meridian_tests::{
    describe_scale, instance_processes, region_scale, wait_scale, ClosedLoop, ProcessFunction,
    Relay, SidecarOpts, World, LEASE_TTL_SECS,
};
use tokio::time::Instant;

const REGIONS: [&str; 2] = ["us-east", "eu-west"];
/// Where the harness's replicas keep agent records (`--key-prefix` default).
const AGENTS_PREFIX: &str = "/meridian/v1/agents/";
/// How long the load keeps running after the mesh is whole again: longer than a scheduler pass,
/// a table push and an instance drain, so a recovery that unplaces regions shows here.
const AFTER_RECOVERY: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_and_replicas_back_after_the_leases_expired_stop_no_instance() -> Result<()> {
    let test_started = Instant::now();
    let mut world =
        World::start_with_replicas(2, &REGIONS, Relay::new(), SidecarOpts::default()).await?;
    let cp = world.mesh.cp().url();
    let function = ProcessFunction {
        min_instances: 1,
        max_instances: 1,
        delay_ms: 10,
        ..ProcessFunction::sample("steady")
    };
    world.apply(function.spec()?).await?;
    for region in REGIONS {
        wait_scale(
            &cp,
            "steady",
            region,
            Duration::from_secs(30),
            "one ready instance",
            |s| s.ready == 1,
        )
        .await?;
    }
    world
        .wait_served("us-east", "steady", "us-east", Duration::from_secs(15))
        .await?;
    let before = instance_processes("default", "steady");
    ensure!(
        before.len() == REGIONS.len(),
        "one instance per region expected: {before:?}"
    );

    // One client, 10 ms per request: about 100 requests a second.
    let load = ClosedLoop::start(&world.sidecar("us-east").client(), "steady", 1);

    // The control plane goes, and its leases with it: etcd deletes every agent record.
    for replica in &mut world.mesh.control_planes {
        replica.kill();
    }
    let etcd = &world.mesh.etcd;
    meridian_tests::poll_until(
        Duration::from_secs(LEASE_TTL_SECS * 5),
        "etcd to forget every agent (their replicas' leases expired)",
        || async {
            let keys = etcd.keys(AGENTS_PREFIX).await?;
            ensure!(keys.is_empty(), "agent records still there: {keys:?}");
            Ok(())
        },
    )
    .await?;
    world.mesh.etcd.stop().await?;
    // An outage longer than the lease, as in the finding (the records are gone already).
    tokio::time::sleep(Duration::from_secs(LEASE_TTL_SECS + 1)).await;

    world.mesh.etcd.restart().await?;
    for replica in &mut world.mesh.control_planes {
        replica.restart().await?;
    }
    let recovered_at = Instant::now();
    world
        .mesh
        .wait_agents_synced(Duration::from_secs(30))
        .await
        .context("agents must reconnect to the recovered control plane")?;
    tokio::time::sleep(AFTER_RECOVERY).await;
    let report = load.finish().await?;
    let after = instance_processes("default", "steady");

    let mut scales = Vec::new();
    for region in REGIONS {
        scales.push(region_scale(&cp, "steady", region).await?);
    }
    println!(
        "recovered {:?} ago; {}; instances before {before:?}, after {after:?}; {}; test took {:?}",
        recovered_at.elapsed(),
        report.summary(),
        scales
            .iter()
            .map(describe_scale)
            .collect::<Vec<_>>()
            .join("; "),
        test_started.elapsed()
    );
    ensure!(
        report.failures.is_empty(),
        "requests failed during or after the recovery: {}",
        report.summary()
    );
    ensure!(report.ok > 100, "too few requests: {}", report.summary());
    ensure!(
        after == before,
        "instances were stopped or replaced: before {before:?}, after {after:?}"
    );
    for scale in &scales {
        ensure!(
            scale.restarts == 0 && scale.ready == 1 && scale.draining == 0,
            "{} churned: {}",
            scale.region,
            describe_scale(scale)
        );
    }
    Ok(())
}
