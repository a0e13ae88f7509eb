//! End-to-end leases: a SIGKILLed agent's record and endpoints leave etcd once its lease expires,
//! and the other regions' tables stop routing to it.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use futures::future::try_join_all;
use meridian_proto::v1::{FunctionRoute, ListAgentsRequest, RoutingTable};
use meridian_tests::{
    apply, external_endpoint_id, external_spec, poll_until, route, routing_table, ControlPlane,
    Mesh, LEASE_TTL_SECS, REGIONS,
};
use tokio::time::Instant;

const SLOW: Duration = Duration::from_secs(10);
const US_EAST_URL: &str = "http://127.0.1.1:9000";

async fn region_table(cp: &ControlPlane, region: &str) -> Result<RoutingTable> {
    routing_table(&mut cp.mesh().await?, region).await
}

/// Whether `route` sends anything to us-east: an endpoint in a us-east tier, a ready instance
/// counted there, or any endpoint on us-east's loopback address.
fn routes_to_us_east(route: &FunctionRoute) -> bool {
    route.tiers.iter().any(|tier| {
        (tier.region == "us-east" && (!tier.endpoints.is_empty() || tier.ready_instances > 0))
            || tier
                .endpoints
                .iter()
                .any(|e| e.address.starts_with("127.0.1.1:"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_leaves_etcd_after_lease_ttl_and_other_tables_drop_it() -> Result<()> {
    let mut mesh = Mesh::start(1, &REGIONS).await?;
    mesh.wait_agents_synced(SLOW).await?;
    let cp = mesh.cp();
    apply(
        &mut cp.functions().await?,
        external_spec(
            "ext",
            &[
                ("us-east", US_EAST_URL),
                ("eu-west", "http://127.0.2.1:9000"),
                ("ap-south", "http://127.0.3.1:9000"),
            ],
        ),
    )
    .await?;

    // The us-east agent reports its external endpoint; us-east's table lists it locally ...
    let expected_id = external_endpoint_id(US_EAST_URL);
    poll_until(
        SLOW,
        "us-east's table to list the reported endpoint",
        || {
            let expected_id = expected_id.clone();
            async move {
                let table = region_table(cp, "us-east").await?;
                let ext = route(&table, "ext").context("ext not in us-east's table")?;
                let local = ext
                    .tiers
                    .iter()
                    .find(|t| t.region == "us-east")
                    .context("no us-east tier")?;
                ensure!(
                    local.local
                        && local
                            .endpoints
                            .iter()
                            .any(|e| e.address == "127.0.1.1:9000" && e.id == expected_id),
                    "us-east tier without the endpoint {expected_id} 127.0.1.1:9000: {local:?}"
                );
                Ok(())
            }
        },
    )
    .await?;
    // ... and the other regions' agents route to us-east through its gateway.
    let gateway = mesh.agents[0].gateway().to_string();
    let others = &mesh.agents[1..];
    try_join_all(others.iter().map(|agent| {
        let gateway = gateway.clone();
        poll_until(SLOW, "the other agents to route to us-east", move || {
            let gateway = gateway.clone();
            async move {
                let table = agent.table().await?.context("no table")?;
                let ext = route(&table, "ext").context("ext not in the table")?;
                let tier = ext
                    .tiers
                    .iter()
                    .find(|t| t.region == "us-east")
                    .context("no us-east tier")?;
                ensure!(
                    !tier.local && tier.endpoints.iter().any(|e| e.address == gateway),
                    "{}: us-east tier without gateway {gateway}: {tier:?}",
                    agent.agent_id()
                );
                Ok(())
            }
        })
    }))
    .await?;

    let killed_at = Instant::now();
    mesh.agents[0].kill();
    let cp = mesh.cp();
    let bound = Duration::from_secs(LEASE_TTL_SECS * 2 + 5);

    // The agent record goes (ListAgents reads agents/ and status/).
    poll_until(bound, "the killed agent to leave ListAgents", || async {
        let agents = cp
            .mesh()
            .await?
            .list_agents(ListAgentsRequest::default())
            .await?
            .into_inner()
            .agents;
        ensure!(
            agents.iter().all(|a| a.region != "us-east"),
            "still listed: {agents:?}"
        );
        Ok(())
    })
    .await?;
    // Its endpoints go: no region's table routes to us-east any more.
    poll_until(bound, "every region's table to drop us-east", || async {
        for region in REGIONS {
            let table = region_table(cp, region).await?;
            let ext = route(&table, "ext").context("ext vanished")?;
            ensure!(
                !routes_to_us_east(ext),
                "{region}'s table still routes to us-east: {ext:?}"
            );
        }
        Ok(())
    })
    .await?;
    let mesh = &mesh;
    try_join_all(mesh.agents[1..].iter().map(|agent| {
        poll_until(
            bound,
            "the other agents' tables to drop us-east",
            move || async move {
                let table = agent.table().await?.context("no table")?;
                let ext = route(&table, "ext").context("ext vanished")?;
                ensure!(
                    !routes_to_us_east(ext),
                    "{} still routes to us-east: {ext:?}",
                    agent.agent_id()
                );
                Ok(())
            },
        )
    }))
    .await?;
    eprintln!(
        "us-east's records were gone {:?} after the kill (lease TTL {LEASE_TTL_SECS} s)",
        killed_at.elapsed()
    );
    Ok(())
}
