//! End-to-end static stability: with the control plane and etcd both down, an agent keeps its
//! local watchers and its table, and a restarted agent serves the table it persisted.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use meridian_proto::v1::ListAgentsRequest;
use meridian_tests::{
    apply, external_spec, poll_until, route, Agent, AgentOpts, ControlPlane, ControlPlaneOpts, Etcd,
};

const SLOW: Duration = Duration::from_secs(10);
/// How long the agent must keep going on its own while everything above it is down.
const OUTAGE: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_serves_last_table_with_control_plane_and_etcd_down_and_after_restart() -> Result<()>
{
    let mut etcd = Etcd::start().await?;
    let mut cp = ControlPlane::start(&etcd.url(), ControlPlaneOpts::default()).await?;
    let mut agent = Agent::start(0, "us-east", &[cp.url()], AgentOpts::default()).await?;

    let stored = apply(
        &mut cp.functions().await?,
        external_spec("steady", &[("us-east", "http://127.0.1.1:9000")]),
    )
    .await?;
    // Settled: the agent holds steady with the endpoint it reported itself (the last change this
    // causes), and the control plane knows it acked exactly that table.
    let before = poll_until(
        SLOW,
        "the agent to settle on steady with its endpoint",
        || async {
            let table = agent.table().await?.context("no table")?;
            let steady = route(&table, "steady").context("steady not in the table")?;
            ensure!(
                steady.function_version == stored.version
                    && steady
                        .tiers
                        .iter()
                        .any(|t| t.endpoints.iter().any(|e| e.address == "127.0.1.1:9000")),
                "steady without its endpoint yet: {steady:?}"
            );
            let agents = cp
                .mesh()
                .await?
                .list_agents(ListAgentsRequest::default())
                .await?
                .into_inner()
                .agents;
            ensure!(
                agents.iter().any(|a| a.agent_id == agent.agent_id()
                    && a.acked_version == table.version
                    && a.in_sync),
                "control plane does not list the agent in sync at {}: {agents:?}",
                table.version
            );
            Ok(table)
        },
    )
    .await?;
    // Watching from here on: a watcher counts as a sidecar, and one that had not read the
    // settled table yet would keep the agent out of sync above.
    let mut watcher = agent.watch().await?;
    watcher
        .wait_for(SLOW, "the settled table", |t| t.version == before.version)
        .await?;

    // Everything above the agent goes away.
    cp.stop().await?;
    etcd.stop().await?;

    // The local stream stays open (the agent keeps retrying the control plane meanwhile) ...
    watcher
        .expect_open_for(OUTAGE)
        .await
        .context("the local Watch stream must survive a control-plane outage")?;
    ensure!(agent.is_running(), "the agent exited during the outage");
    if let Some(latest) = watcher.latest() {
        ensure!(
            latest.version == before.version,
            "the watcher got a different table during the outage: {} vs {}",
            latest.version,
            before.version
        );
    }
    // ... and Get still returns the last table.
    let during = agent.table().await?.context("no table during the outage")?;
    ensure!(
        during == before,
        "Get during the outage returned {during:?}, want {before:?}"
    );

    // An agent restarted while the control plane and etcd are still down serves its persisted
    // table.
    agent.kill();
    agent.restart().await?;
    let after = agent
        .table()
        .await?
        .context("the restarted agent has no table: it did not load the persisted one")?;
    ensure!(
        after.version == before.version && route(&after, "steady").is_some(),
        "restarted agent serves {after:?}, want {before:?}"
    );
    let mut watcher = agent.watch().await?;
    let first = watcher.next(SLOW).await?;
    ensure!(
        first.version == before.version,
        "the restarted agent's Watch starts with version {}, want {}",
        first.version,
        before.version
    );
    Ok(())
}
