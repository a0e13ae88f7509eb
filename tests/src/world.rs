//! A whole data-plane test world: etcd, a control plane, and per region an agent, a route tap
//! (which sends the region's cross-region traffic through the fault-injection [`Relay`]) and a
//! sidecar whose gateway is the address the agent reports.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use meridian_proto::v1::{Function, FunctionSpec};

use crate::http::Reply;
use crate::{
    apply, external_spec, free_port, function_tiers, poll_until, region_index, region_ip,
    AgentOpts, Mesh, Relay, RouteTap, SampleFunction, Sidecar, SidecarOpts, TierView,
};

/// The probe timeout the test sidecars run with. The sidecar's default (300 ms) leaves ap-south
/// (240 ms round trip through the relay) too little margin on a busy 2-core machine; 400 ms still
/// notices a dead link in under a second with the default 500 ms interval.
pub const TEST_PROBE_TIMEOUT_MS: u64 = 400;

/// Everything one data-plane test runs. Fields drop in order: sidecars, taps, relay, then the
/// control plane side.
pub struct World {
    /// One sidecar per region, in the order given to [`World::start`].
    pub sidecars: Vec<Sidecar>,
    /// One route tap per region, same order.
    pub taps: Vec<RouteTap>,
    /// The cross-region links.
    pub relay: Relay,
    /// etcd, the control plane, the agents (same order).
    pub mesh: Mesh,
}

impl World {
    /// The three regions with the default latencies (us-east↔eu-west 40 ms, us-east↔ap-south
    /// 120 ms, eu-west↔ap-south 100 ms one way) and default sidecars.
    pub async fn start() -> Result<World> {
        World::start_with(
            &crate::REGIONS,
            Relay::with_default_latencies(),
            SidecarOpts::default(),
        )
        .await
    }

    /// `regions` (known names), cross-region traffic through `relay`, each sidecar started with
    /// `template` (its addresses are chosen here; the probe timeout defaults to
    /// [`TEST_PROBE_TIMEOUT_MS`]).
    pub async fn start_with(
        regions: &[&str],
        relay: Relay,
        template: SidecarOpts,
    ) -> Result<World> {
        World::start_with_replicas(1, regions, relay, template).await
    }

    /// Like [`World::start_with`], with `replicas` control-plane replicas (`cp-0`, ...), every
    /// agent pointed at all of them.
    pub async fn start_with_replicas(
        replicas: usize,
        regions: &[&str],
        relay: Relay,
        template: SidecarOpts,
    ) -> Result<World> {
        World::start_mesh(replicas, regions, relay, template, |_, _| {
            AgentOpts::default()
        })
        .await
    }

    /// Like [`World::start_with`], with each agent's options from `agent_opts(index, region)`
    /// (its gateway is set here, to the region's sidecar).
    pub async fn start_with_agents(
        regions: &[&str],
        relay: Relay,
        template: SidecarOpts,
        agent_opts: impl Fn(usize, &str) -> AgentOpts,
    ) -> Result<World> {
        World::start_mesh(1, regions, relay, template, agent_opts).await
    }

    async fn start_mesh(
        replicas: usize,
        regions: &[&str],
        relay: Relay,
        template: SidecarOpts,
        agent_opts: impl Fn(usize, &str) -> AgentOpts,
    ) -> Result<World> {
        let mut gateways: Vec<(String, SocketAddr)> = Vec::new();
        for region in regions {
            let index = region_index(region).ok_or_else(|| anyhow!("unknown region {region}"))?;
            let ip = region_ip(index);
            gateways.push((region.to_string(), SocketAddr::from((ip, free_port(ip)?))));
        }
        let mesh = Mesh::start_with(replicas, regions, |index, region| AgentOpts {
            gateway: gateways
                .iter()
                .find(|(r, _)| r == region)
                .map(|(_, addr)| *addr),
            ..agent_opts(index, region)
        })
        .await?;
        let mut taps = Vec::new();
        for agent in &mesh.agents {
            taps.push(
                RouteTap::start(
                    agent.region_index(),
                    agent.region(),
                    &agent.url(),
                    relay.clone(),
                )
                .await?,
            );
        }
        let tap_urls: Vec<String> = taps.iter().map(RouteTap::url).collect();
        let mut starts = Vec::new();
        for (agent, tap_url) in mesh.agents.iter().zip(&tap_urls) {
            let opts = SidecarOpts {
                gateway: Some(agent.gateway()),
                probe_timeout_ms: template.probe_timeout_ms.or(Some(TEST_PROBE_TIMEOUT_MS)),
                client_id: template
                    .client_id
                    .clone()
                    .or_else(|| Some(format!("sidecar-{}", agent.region()))),
                ..template.clone()
            };
            starts.push(Sidecar::start(
                agent.region_index(),
                agent.region(),
                tap_url,
                opts,
            ));
        }
        let sidecars = futures::future::try_join_all(starts).await?;
        Ok(World {
            sidecars,
            taps,
            relay,
            mesh,
        })
    }

    fn position(&self, region: &str) -> Result<usize> {
        self.sidecars
            .iter()
            .position(|s| s.region() == region)
            .ok_or_else(|| anyhow!("no sidecar in {region}"))
    }

    /// The sidecar of `region`.
    pub fn sidecar(&self, region: &str) -> &Sidecar {
        let index = self.position(region).unwrap_or(0);
        &self.sidecars[index]
    }

    /// The sidecar of `region`, mutable (to stop or restart it).
    pub fn sidecar_mut(&mut self, region: &str) -> &mut Sidecar {
        let index = self.position(region).unwrap_or(0);
        &mut self.sidecars[index]
    }

    /// The route tap of `region`.
    pub fn tap(&self, region: &str) -> &RouteTap {
        let index = self.position(region).unwrap_or(0);
        &self.taps[index]
    }

    /// Applies `spec` through the control plane; returns the stored function.
    pub async fn apply(&self, spec: FunctionSpec) -> Result<Function> {
        apply(&mut self.mesh.cp().functions().await?, spec).await
    }

    /// Polls `GET http://<function>/` through `region`'s outbound listener until it answers 200
    /// from `served_by`; returns that answer.
    pub async fn wait_served(
        &self,
        region: &str,
        function: &str,
        served_by: &str,
        within: Duration,
    ) -> Result<Reply> {
        let client = self.sidecar(region).client();
        let served = poll_until(
            within,
            &format!("{function} to be served from {served_by} via {region}"),
            || {
                let client = client.clone();
                async move {
                    let reply = client.get(function, "/").await?;
                    ensure!(
                        reply.status == http::StatusCode::OK && reply.region() == Some(served_by),
                        "{}",
                        reply.describe()
                    );
                    Ok(reply)
                }
            },
        )
        .await;
        match served {
            Ok(reply) => Ok(reply),
            Err(err) => Err(err.context(format!(
                "/routes of {region}: {}",
                self.routes_text(region).await
            ))),
        }
    }

    /// `/routes` of `region`'s sidecar as text, for messages (never fails).
    pub async fn routes_text(&self, region: &str) -> String {
        match self.sidecar(region).routes().await {
            Ok(routes) => routes.to_string(),
            Err(e) => format!("<{e:#}>"),
        }
    }
}

/// Starts `count` sample-function instances in each `(region, count)` of `layout`, on the
/// region's address, named `<region>-<n>`.
pub async fn start_samples(layout: &[(&str, usize)]) -> Result<Vec<SampleFunction>> {
    let mut instances = Vec::new();
    for (region, count) in layout {
        let index = region_index(region).ok_or_else(|| anyhow!("unknown region {region}"))?;
        for n in 1..=*count {
            instances.push((
                region_ip(index),
                region.to_string(),
                format!("{region}-{n}"),
            ));
        }
    }
    futures::future::try_join_all(
        instances
            .iter()
            .map(|(ip, region, name)| SampleFunction::start(*ip, region, name)),
    )
    .await
}

/// An `external` function `name` whose URLs are `instances` (each in its region).
pub fn sample_spec(name: &str, instances: &[&SampleFunction]) -> FunctionSpec {
    let urls: Vec<(String, String)> = instances
        .iter()
        .map(|i| (i.region().to_string(), i.url()))
        .collect();
    let pairs: Vec<(&str, &str)> = urls.iter().map(|(r, u)| (r.as_str(), u.as_str())).collect();
    external_spec(name, &pairs)
}

/// An `external` function `name` whose URLs are `(region, url)` pairs (e.g. of test backends).
pub fn backend_spec(name: &str, urls: &[(&str, String)]) -> FunctionSpec {
    let pairs: Vec<(&str, &str)> = urls.iter().map(|(r, u)| (*r, u.as_str())).collect();
    external_spec(name, &pairs)
}

impl World {
    /// The common start of the failover tests: applies `hello` over `instances`, waits until
    /// us-east serves it locally and has probed eu-west and ap-south up (so the failover order
    /// is the measured one); returns us-east's tiers.
    pub async fn serve_hello_in_us_east(
        &self,
        instances: &[SampleFunction],
    ) -> Result<Vec<TierView>> {
        self.apply(sample_spec("hello", &instances.iter().collect::<Vec<_>>()))
            .await?;
        self.wait_served("us-east", "hello", "us-east", Duration::from_secs(20))
            .await?;
        self.wait_remote_tiers_up(
            "us-east",
            "hello",
            &["eu-west", "ap-south"],
            Duration::from_secs(10),
        )
        .await
    }

    /// Waits until `region`'s sidecar lists `function` with the remote tiers `expected` (in this
    /// order, after any local tier), each probed up with a measured round trip and with ready
    /// instances in the table; returns the tiers.
    pub async fn wait_remote_tiers_up(
        &self,
        region: &str,
        function: &str,
        expected: &[&str],
        within: Duration,
    ) -> Result<Vec<TierView>> {
        let sidecar = self.sidecar(region);
        poll_until(
            within,
            &format!("{region}'s sidecar to probe {expected:?} up for {function}"),
            || async {
                let routes = sidecar.routes().await?;
                let tiers = function_tiers(&routes, function)?;
                let remote: Vec<&TierView> = tiers.iter().filter(|t| !t.local).collect();
                let order: Vec<&str> = remote.iter().map(|t| t.region.as_str()).collect();
                ensure!(order == expected, "remote tiers {order:?}: {tiers:#?}");
                for tier in &remote {
                    ensure!(
                        tier.probe.as_deref() == Some("up") && tier.rtt_ms.is_some(),
                        "{} not probed up yet: {:?}",
                        tier.region,
                        tier.raw
                    );
                    // A remote tier takes traffic only with ready instances behind its gateway,
                    // which the table says once that region's agent has reported them.
                    let ready = tier.raw.get("readyInstances").and_then(|v| v.as_u64());
                    ensure!(
                        ready.unwrap_or(0) > 0,
                        "{} has no ready instances in the table yet: {:?}",
                        tier.region,
                        tier.raw
                    );
                }
                Ok(tiers)
            },
        )
        .await
    }

    /// The probe state of `function`'s tier `tier_region` in `region`'s sidecar right now.
    pub async fn probe_state(
        &self,
        region: &str,
        function: &str,
        tier_region: &str,
    ) -> Result<Option<String>> {
        let routes = self.sidecar(region).routes().await?;
        let tiers = function_tiers(&routes, function)?;
        let tier = tiers
            .iter()
            .find(|t| t.region == tier_region)
            .with_context(|| format!("no tier {tier_region} for {function}: {tiers:#?}"))?;
        Ok(tier.probe.clone())
    }
}
