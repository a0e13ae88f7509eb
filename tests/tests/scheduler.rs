//! The leader-elected scheduler: a killed leader is replaced within the election lease TTL, a
//! paused (deposed) leader's writes never land, and an impossible placement is reported.

use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use meridian_proto::v1::FunctionPlacement;
use meridian_tests::{
    apply, instances, leader, poll_until, wait_scale, ControlPlane, ControlPlaneOpts, Etcd,
    ProcessFunction, LEASE_TTL_SECS,
};
use nix::sys::signal::Signal;
use tokio::time::Instant;

/// Two replicas on one etcd; the harness gives them the test lease TTL for the election.
async fn replicas(etcd: &Etcd) -> Result<(ControlPlane, ControlPlane)> {
    let url = etcd.url();
    let start = |id: &str| ControlPlane::start(&url, ControlPlaneOpts::replica(id));
    let (a, b) = tokio::try_join!(start("cp-0"), start("cp-1"))?;
    Ok((a, b))
}

/// Waits until `cp` names a leader among `ids`; returns it.
async fn wait_leader(cp: &ControlPlane, ids: &[&str], within: Duration) -> Result<String> {
    let url = cp.url();
    poll_until(within, "a scheduler leader", || async {
        let leader = leader(&url).await?;
        ensure!(ids.contains(&leader.as_str()), "leader is {leader:?}");
        Ok(leader)
    })
    .await
}

/// The placement the control plane at `url` reports for `name`; an error while it has none.
async fn reported_placement(url: &str, name: &str) -> Result<FunctionPlacement> {
    instances(url, name)
        .await?
        .and_then(|f| f.placement)
        .ok_or_else(|| anyhow!("no placement of {name} yet"))
}

/// Fails unless `name`'s placement was written by `leader`: after a takeover, a placement by
/// anyone else is a write that should have been fenced.
async fn ensure_placed_by(url: &str, name: &str, leader: &str) -> Result<()> {
    let placement = reported_placement(url, name).await?;
    ensure!(
        placement.leader == leader,
        "{name} placed by {}, not {leader}",
        placement.leader
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leader_is_replaced_within_the_lease_ttl() -> Result<()> {
    let etcd = Etcd::start().await?;
    let (a, b) = replicas(&etcd).await?;
    let first = wait_leader(&a, &["cp-0", "cp-1"], Duration::from_secs(10)).await?;
    let (mut old, survivor) = if first == "cp-0" { (a, b) } else { (b, a) };
    ensure!(old.replica_id() == first);

    old.kill();
    let killed = Instant::now();
    let next = wait_leader(
        &survivor,
        &[survivor.replica_id()],
        Duration::from_secs(LEASE_TTL_SECS + 5),
    )
    .await?;
    let took = killed.elapsed();
    println!("{next} leads {took:?} after {first} was killed (lease TTL {LEASE_TTL_SECS} s)");
    // etcd expires leases on a 500 ms sweep, so the bound is the TTL plus that sweep.
    ensure!(
        took <= Duration::from_millis(LEASE_TTL_SECS * 1000 + 600),
        "takeover took {took:?}, more than the lease TTL of {LEASE_TTL_SECS} s"
    );

    // The new leader schedules: a new function gets a placement written by it.
    apply(
        &mut survivor.functions().await?,
        ProcessFunction::sample("after").spec()?,
    )
    .await?;
    let url = survivor.url();
    poll_until(
        Duration::from_secs(10),
        "a placement by the new leader",
        || ensure_placed_by(&url, "after", &next),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_leader_is_fenced_and_none_of_its_writes_land() -> Result<()> {
    let etcd = Etcd::start().await?;
    let (a, b) = replicas(&etcd).await?;
    let first = wait_leader(&a, &["cp-0", "cp-1"], Duration::from_secs(10)).await?;
    let (mut paused, other) = if first == "cp-0" { (a, b) } else { (b, a) };
    let other_url = other.url();

    // A function the paused leader placed, so it has state to reconcile when it wakes.
    apply(
        &mut other.functions().await?,
        ProcessFunction::sample("before").spec()?,
    )
    .await?;
    poll_until(Duration::from_secs(10), "placement of before", || async {
        reported_placement(&other_url, "before").await.map(|_| ())
    })
    .await?;

    paused.process_mut().signal(Signal::SIGSTOP)?;
    let next = wait_leader(
        &other,
        &[other.replica_id()],
        Duration::from_secs(LEASE_TTL_SECS + 5),
    )
    .await?;
    // Changes while the old leader sleeps: the new leader places them; the old one will see
    // them (and try to act on them) when it wakes up.
    let mut functions = other.functions().await?;
    apply(&mut functions, ProcessFunction::sample("during").spec()?).await?;
    apply(
        &mut functions,
        ProcessFunction {
            max_instances: 7,
            ..ProcessFunction::sample("before")
        }
        .spec()?,
    )
    .await?;
    poll_until(
        Duration::from_secs(10),
        "the new leader's placements",
        || async {
            for name in ["during", "before"] {
                ensure_placed_by(&other_url, name, &next).await?;
            }
            Ok(())
        },
    )
    .await?;

    paused.process_mut().signal(Signal::SIGCONT)?;
    // The woken replica notices it lost the lease (a fenced write or its keep-alive) and steps
    // down; from then on it campaigns as a follower.
    poll_until(
        Duration::from_secs(10),
        "the old leader to step down",
        || async {
            let log = paused.process().log();
            ensure!(
                log.contains("no longer leader") || log.contains("lost leadership"),
                "not yet"
            );
            Ok(())
        },
    )
    .await?;
    let fenced = paused.process().log().matches("write fenced").count();
    println!("{first} was paused; {next} took over; the old leader's fenced writes: {fenced}");
    for name in ["before", "during"] {
        ensure_placed_by(&other_url, name, &next).await?;
    }
    ensure!(
        leader(&paused.url()).await? == next,
        "both replicas must agree on {next}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_instances_in_a_region_without_an_agent_is_reported() -> Result<()> {
    let mesh = meridian_tests::Mesh::start(1, &["us-east"]).await?;
    let cp = mesh.cp().url();
    let function =
        ProcessFunction::sample("stranded").in_regions(&[("us-east", 1), ("ap-south", 2)]);
    apply(&mut mesh.cp().functions().await?, function.spec()?).await?;
    let placement = poll_until(
        Duration::from_secs(10),
        "a placement with a problem",
        || async {
            let placement = reported_placement(&cp, "stranded").await?;
            ensure!(
                !placement.problems.is_empty(),
                "no problem reported: {placement:?}"
            );
            Ok(placement)
        },
    )
    .await?;
    let problem = &placement.problems[0];
    ensure!(
        problem.region == "ap-south" && problem.reason.contains("no agent"),
        "problem must name ap-south and the missing agent: {problem:?}"
    );
    ensure!(
        placement
            .regions
            .iter()
            .any(|r| r.region == "us-east" && r.min_instances == 1),
        "us-east must still be placed: {placement:?}"
    );
    // The feasible part runs.
    wait_scale(
        &cp,
        "stranded",
        "us-east",
        Duration::from_secs(20),
        "us-east running",
        |s| s.ready == 1,
    )
    .await?;
    Ok(())
}
