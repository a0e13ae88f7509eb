//! A whole test world: one etcd, N control-plane replicas, one agent per region, every agent
//! pointed at every replica.

use std::time::Duration;

use anyhow::{bail, ensure, Result};
use futures::future::try_join_all;
use meridian_proto::v1::{AgentStatus, ListAgentsRequest};

use crate::{poll_until, Agent, AgentOpts, ControlPlane, ControlPlaneOpts, Etcd};

/// etcd, replicas and agents. Fields drop in order: agents, then replicas, then etcd, so that
/// nothing logs spurious errors about a dependency that died first.
pub struct Mesh {
    /// One agent per region, in the order given to [`Mesh::start`].
    pub agents: Vec<Agent>,
    /// The replicas, `cp-0`, `cp-1`, ...
    pub control_planes: Vec<ControlPlane>,
    /// The etcd member.
    pub etcd: Etcd,
}

impl Mesh {
    /// Starts etcd, `replicas` control planes (ids `cp-0`...) and one agent per region of
    /// `regions` (each a known region name, bound to its loopback address).
    pub async fn start(replicas: usize, regions: &[&str]) -> Result<Mesh> {
        Mesh::start_with(replicas, regions, |_, _| AgentOpts::default()).await
    }

    /// Like [`Mesh::start`], with the options of each agent from `agent_opts(index, region)`.
    pub async fn start_with(
        replicas: usize,
        regions: &[&str],
        agent_opts: impl Fn(usize, &str) -> AgentOpts,
    ) -> Result<Mesh> {
        let etcd = Etcd::start().await?;
        let etcd_url = etcd.url();
        let control_planes = try_join_all((0..replicas).map(|i| {
            ControlPlane::start(&etcd_url, ControlPlaneOpts::replica(&format!("cp-{i}")))
        }))
        .await?;
        let urls: Vec<String> = control_planes.iter().map(ControlPlane::url).collect();
        let mut starts = Vec::new();
        for region in regions {
            let Some(index) = crate::region_index(region) else {
                bail!(
                    "unknown region {region}: the mesh knows {:?}",
                    crate::REGIONS
                );
            };
            starts.push(Agent::start(
                index,
                region,
                &urls,
                agent_opts(index, region),
            ));
        }
        let agents = try_join_all(starts).await?;
        Ok(Mesh {
            agents,
            control_planes,
            etcd,
        })
    }

    /// The first replica.
    pub fn cp(&self) -> &ControlPlane {
        &self.control_planes[0]
    }

    /// Every replica's URL.
    pub fn cp_urls(&self) -> Vec<String> {
        self.control_planes.iter().map(ControlPlane::url).collect()
    }

    /// Waits until `ListAgents` (asked of the first replica) lists every agent of the mesh with
    /// a non-zero acked version; returns the list.
    pub async fn wait_agents_synced(&self, within: Duration) -> Result<Vec<AgentStatus>> {
        let cp = self.cp();
        let ids: Vec<(String, String)> = self
            .agents
            .iter()
            .map(|a| (a.region().to_string(), a.agent_id().to_string()))
            .collect();
        poll_until(
            within,
            "every agent to be listed with an acked version",
            || {
                let ids = ids.clone();
                async move {
                    let agents = cp
                        .mesh()
                        .await?
                        .list_agents(ListAgentsRequest::default())
                        .await?
                        .into_inner()
                        .agents;
                    for (region, id) in &ids {
                        let found = agents
                            .iter()
                            .find(|a| &a.region == region && &a.agent_id == id);
                        ensure!(
                            found.is_some_and(|a| a.acked_version > 0),
                            "{region}/{id} not listed with an acked version yet: {agents:?}"
                        );
                    }
                    Ok(agents)
                }
            },
        )
        .await
    }
}
