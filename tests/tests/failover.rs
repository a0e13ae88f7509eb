//! End-to-end failover: with two control-plane replicas, SIGKILL the one an agent is connected
//! to while functions change; the agent moves to the other replica, converges on the latest
//! version, and never sees a version go backwards.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use meridian_proto::v1::{ListAgentsRequest, RoutingPolicy};
use meridian_tests::{
    apply, external_spec, poll_until, route, Agent, AgentOpts, ControlPlane, ControlPlaneOpts, Etcd,
};

/// What the agent published locally: (table version, function_version of `seq` if present).
type Published = (i64, Option<i64>);

const SLOW: Duration = Duration::from_secs(10);
const UPDATES: u32 = 12;
/// The agent must hold the result of this many updates (from the victim) before the kill ...
const HELD_BEFORE_KILL: u32 = 3;
/// ... and these are applied (in flight) just before it.
const KILL_AFTER: u32 = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_fails_over_to_other_replica_and_versions_never_go_back() -> Result<()> {
    let etcd = Etcd::start().await?;
    let mut replicas = [
        ControlPlane::start(&etcd.url(), ControlPlaneOpts::replica("cp-a")).await?,
        ControlPlane::start(&etcd.url(), ControlPlaneOpts::replica("cp-b")).await?,
    ];
    let urls: Vec<String> = replicas.iter().map(ControlPlane::url).collect();
    let agent = Agent::start(0, "us-east", &urls, AgentOpts::default()).await?;

    // Which replica holds the agent's stream?
    let holder = poll_until(SLOW, "the agent to be listed with its replica", || async {
        let agents = replicas[0]
            .mesh()
            .await?
            .list_agents(ListAgentsRequest::default())
            .await?
            .into_inner()
            .agents;
        let status = agents
            .iter()
            .find(|a| a.agent_id == agent.agent_id())
            .ok_or_else(|| anyhow!("agent not listed: {agents:?}"))?;
        ensure!(status.acked_version > 0, "no ack yet: {status:?}");
        Ok(status.replica.clone())
    })
    .await?;
    let victim = replicas
        .iter()
        .position(|r| r.replica_id() == holder)
        .with_context(|| format!("ListAgents names replica {holder:?}, which is neither"))?;
    let survivor = 1 - victim;

    // Record every table the agent publishes locally: (table version, function version).
    let seen: Arc<Mutex<Vec<Published>>> = Arc::default();
    let mut watcher = agent.watch().await?;
    let recorder = {
        let seen = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok(table) = watcher.next(Duration::from_secs(60)).await {
                let fv = route(&table, "seq").map(|r| r.function_version);
                if let Ok(mut seen) = seen.lock() {
                    seen.push((table.version, fv));
                }
            }
        })
    };

    // A sequence of updates through the surviving replica, around the kill: the agent first
    // holds one it got from the victim, then more are in flight when the victim dies, then more
    // follow while the agent reconnects.
    let mut functions = replicas[survivor].functions().await?;
    let mut latest = 0;
    for i in 0..UPDATES {
        if i == HELD_BEFORE_KILL {
            let held = latest;
            poll_until(
                SLOW,
                "the agent to hold seq from the first replica",
                || async {
                    let table = agent.table().await?.context("no table")?;
                    let fv = route(&table, "seq").map(|r| r.function_version);
                    ensure!(fv == Some(held), "agent holds seq at {fv:?}, want {held}");
                    Ok(())
                },
            )
            .await?;
        }
        if i == KILL_AFTER {
            replicas[victim].kill();
        }
        let mut spec = external_spec("seq", &[("us-east", "http://127.0.1.1:9000")]);
        spec.routing = Some(RoutingPolicy {
            timeout_ms: Some(10_000 + i),
            ..Default::default()
        });
        let stored = apply(&mut functions, spec).await?;
        ensure!(
            stored.version > latest,
            "Apply #{i} returned version {} after {latest}",
            stored.version
        );
        latest = stored.version;
    }

    // The agent converges on the latest version, through the survivor.
    poll_until(
        SLOW,
        "the agent to hold the latest version of seq",
        || async {
            let table = agent.table().await?.context("no table")?;
            let fv = route(&table, "seq").map(|r| r.function_version);
            ensure!(
                fv == Some(latest),
                "agent holds seq at {fv:?}, latest is {latest}"
            );
            Ok(())
        },
    )
    .await?;
    let survivor_id = replicas[survivor].replica_id().to_string();
    let table_version = agent.table().await?.context("no table")?.version;
    let survivor_cp = &replicas[survivor];
    let agent = &agent;
    poll_until(
        SLOW,
        "the agent to be listed on the survivor, in sync",
        || {
            let survivor_id = survivor_id.clone();
            async move {
                let agents = survivor_cp
                    .mesh()
                    .await?
                    .list_agents(ListAgentsRequest::default())
                    .await?
                    .into_inner()
                    .agents;
                let status = agents
                    .iter()
                    .find(|a| a.agent_id == agent.agent_id())
                    .ok_or_else(|| anyhow!("agent not listed: {agents:?}"))?;
                ensure!(
                    status.replica == survivor_id && status.acked_version >= table_version,
                    "want replica {survivor_id} acked >= {table_version}: {status:?}"
                );
                Ok(())
            }
        },
    )
    .await?;

    // Nothing the agent published went backwards, and it ended at the latest.
    poll_until(SLOW, "the watcher to see the latest version", || {
        let seen = Arc::clone(&seen);
        async move {
            let seen = seen.lock().map_err(|_| anyhow!("poisoned"))?;
            ensure!(
                seen.last().and_then(|s| s.1) == Some(latest),
                "last published {:?}",
                seen.last()
            );
            Ok(())
        }
    })
    .await?;
    recorder.abort();
    let seen = seen.lock().map_err(|_| anyhow!("poisoned"))?.clone();
    for pair in seen.windows(2) {
        let (before, after) = (pair[0], pair[1]);
        ensure!(
            after.0 >= before.0,
            "table version went backwards: {before:?} then {after:?} in {seen:?}"
        );
        if let (Some(b), Some(a)) = (before.1, after.1) {
            ensure!(
                a >= b,
                "function_version went backwards: {b} then {a} in {seen:?}"
            );
        }
        ensure!(
            before.1.is_none() || after.1.is_some(),
            "seq vanished from the table after {before:?}: {seen:?}"
        );
    }
    Ok(())
}
