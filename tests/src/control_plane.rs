//! A real `meridian-control-plane` replica on 127.0.0.1, ready once grpc.health.v1 says SERVING,
//! with its admin listener (`/metrics`, `/ready`) on a fresh port of 127.0.0.1.

use std::ffi::{OsStr, OsString};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Output;
use std::time::Duration;

use anyhow::{ensure, Result};
use meridian_proto::v1::agent_service_client::AgentServiceClient;
use meridian_proto::v1::function_service_client::FunctionServiceClient;
use meridian_proto::v1::mesh_service_client::MeshServiceClient;
use meridian_proto::v1::{AgentStatus, ListAgentsRequest};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::http::{MeshClient, Reply};
use crate::{bin, connect, fatal, free_port, meridianctl, poll_until, Process, LEASE_TTL_SECS};

/// How long a replica gets to load its first etcd snapshot and report SERVING.
const READY_WITHIN: Duration = Duration::from_secs(20);

/// Options of a control-plane replica.
#[derive(Clone, Debug)]
pub struct ControlPlaneOpts {
    /// `--replica-id`; the binary's default (`cp-<port>`) when `None`.
    pub replica_id: Option<String>,
    /// `--agent-lease-ttl` in seconds.
    pub agent_lease_ttl_secs: u64,
    /// `--key-prefix`; the binary's default when `None`.
    pub key_prefix: Option<String>,
    /// Appended to the command line.
    pub extra_args: Vec<String>,
    /// Extra environment variables (e.g. `OTEL_*`).
    pub env: Vec<(String, String)>,
}

impl Default for ControlPlaneOpts {
    fn default() -> Self {
        ControlPlaneOpts {
            replica_id: None,
            agent_lease_ttl_secs: LEASE_TTL_SECS,
            key_prefix: None,
            extra_args: Vec::new(),
            env: Vec::new(),
        }
    }
}

impl ControlPlaneOpts {
    /// Default options with `--replica-id id`.
    pub fn replica(id: &str) -> Self {
        ControlPlaneOpts {
            replica_id: Some(id.to_string()),
            ..Default::default()
        }
    }
}

/// One control-plane replica.
pub struct ControlPlane {
    process: Process,
    addr: SocketAddr,
    /// `None` when the test passed its own `--admin`.
    admin: Option<SocketAddr>,
    replica_id: String,
}

impl ControlPlane {
    /// Starts a replica on a fresh port of 127.0.0.1 against `etcd_urls` (comma separated) and
    /// waits until its overall health is SERVING.
    pub async fn start(etcd_urls: &str, opts: ControlPlaneOpts) -> Result<ControlPlane> {
        let program = bin("meridian-control-plane")?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port(Ipv4Addr::LOCALHOST)?;
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let replica_id = opts
                .replica_id
                .clone()
                .unwrap_or_else(|| format!("cp-{port}"));
            let mut args: Vec<OsString> = vec![
                "--listen".into(),
                addr.to_string().into(),
                "--etcd-endpoints".into(),
                etcd_urls.into(),
                "--agent-lease-ttl".into(),
                opts.agent_lease_ttl_secs.to_string().into(),
                // The scheduler's election lease: as short as the agents' so failovers are quick.
                "--leader-lease-ttl".into(),
                opts.agent_lease_ttl_secs.to_string().into(),
            ];
            if let Some(id) = &opts.replica_id {
                args.extend(["--replica-id".into(), id.into()]);
            }
            if let Some(prefix) = &opts.key_prefix {
                args.extend(["--key-prefix".into(), prefix.into()]);
            }
            // The binary's default admin port is fixed; tests run many replicas at once.
            let admin = if opts.extra_args.iter().any(|a| a.starts_with("--admin")) {
                None
            } else {
                let admin =
                    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port(Ipv4Addr::LOCALHOST)?));
                args.extend(["--admin".into(), admin.to_string().into()]);
                Some(admin)
            };
            args.extend(opts.extra_args.iter().map(OsString::from));
            let env: Vec<(&str, String)> = opts
                .env
                .iter()
                .map(|(key, value)| (key.as_str(), value.clone()))
                .collect();
            let process = Process::spawn_with_env(
                &format!("control-plane-{replica_id}"),
                &program,
                args,
                &env,
            )?;
            let mut cp = ControlPlane {
                process,
                addr,
                admin,
                replica_id,
            };
            match cp.wait_ready().await {
                Ok(()) => return Ok(cp),
                Err(_)
                    if attempt < 3
                        && cp
                            .process
                            .log()
                            .to_lowercase()
                            .contains("address already in use") =>
                {
                    continue
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listen address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener (`None` when the test gave its own `--admin`).
    pub fn admin(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// `GET <path>` on the admin listener.
    pub async fn admin_get(&self, path: &str) -> Result<Reply> {
        let admin = self
            .admin
            .ok_or_else(|| anyhow::anyhow!("this replica was started with its own --admin"))?;
        MeshClient::http1(admin).get(&admin.to_string(), path).await
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        let reply = self.admin_get("/metrics").await?;
        ensure!(reply.status.is_success(), "/metrics: {}", reply.describe());
        Ok(reply.text())
    }

    /// The replica id it runs with (what `AgentStatus.replica` names).
    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    /// A new channel to this replica.
    pub async fn channel(&self) -> Result<Channel> {
        connect(&self.url()).await
    }

    /// A `FunctionService` client.
    pub async fn functions(&self) -> Result<FunctionServiceClient<Channel>> {
        Ok(FunctionServiceClient::new(self.channel().await?))
    }

    /// A `MeshService` client.
    pub async fn mesh(&self) -> Result<MeshServiceClient<Channel>> {
        Ok(MeshServiceClient::new(self.channel().await?))
    }

    /// `ListAgents` of every region, as this replica answers it.
    pub async fn agents(&self) -> Result<Vec<AgentStatus>> {
        Ok(self
            .mesh()
            .await?
            .list_agents(ListAgentsRequest::default())
            .await?
            .into_inner()
            .agents)
    }

    /// An `AgentService` client.
    pub async fn agent_service(&self) -> Result<AgentServiceClient<Channel>> {
        Ok(AgentServiceClient::new(self.channel().await?))
    }

    /// Runs `meridianctl --control-plane <this replica> args...`.
    pub async fn ctl<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut all: Vec<OsString> = vec!["--control-plane".into(), self.url().into()];
        all.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        meridianctl(all).await
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGTERM and wait for the exit.
    pub async fn stop(&mut self) -> Result<()> {
        self.process.stop(Duration::from_secs(10)).await?;
        Ok(())
    }

    /// Stops the replica if it runs, starts it again on the same port, waits until SERVING.
    pub async fn restart(&mut self) -> Result<()> {
        if self.process.is_running() {
            self.stop().await?;
        }
        self.process.start()?;
        self.wait_ready().await
    }

    /// Whether the process is alive.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// The process, to signal it (e.g. SIGSTOP).
    pub fn process_mut(&mut self) -> &mut Process {
        &mut self.process
    }

    /// The process (for its log).
    pub fn process(&self) -> &Process {
        &self.process
    }

    /// Whether grpc.health.v1 says the overall service is SERVING right now.
    pub async fn check_serving(&self) -> Result<()> {
        serving(&self.url()).await
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let url = self.url();
        let process = &mut self.process;
        poll_until(READY_WITHIN, "the control plane to report SERVING", || {
            let exited = process.try_exit().map(|s| process.exited_error(s));
            let url = url.clone();
            async move {
                if let Some(err) = exited {
                    return Err(fatal(err));
                }
                serving(&url).await
            }
        })
        .await
    }
}

async fn serving(url: &str) -> Result<()> {
    let mut health = HealthClient::new(connect(url).await?);
    let status = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner()
        .status;
    ensure!(
        status == ServingStatus::Serving as i32,
        "health status is {:?}",
        ServingStatus::try_from(status)
    );
    Ok(())
}
