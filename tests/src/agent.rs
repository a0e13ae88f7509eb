//! A real `meridian-agent` for one region, bound to the region's loopback address, with a state
//! dir that survives restarts; and a watcher of its local routing API.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use meridian_proto::updates::TableReceiver;
use meridian_proto::v1::local_routing_service_client::LocalRoutingServiceClient;
use meridian_proto::v1::{
    GetRoutesRequest, RoutingTable, RoutingUpdate, TableReport, WatchRoutesRequest,
};
use tempfile::TempDir;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::command_policy::{policy_args, traversable_temp_dir};
use crate::http::{MeshClient, Reply};
use crate::{bin, connect, fatal, free_port, poll_until, region_ip, Process};

/// How long an agent gets to serve its local API after it starts.
const READY_WITHIN: Duration = Duration::from_secs(15);

/// Options of an agent.
#[derive(Clone, Debug, Default)]
pub struct AgentOpts {
    /// `--agent-id`; `<region>-1` when `None`.
    pub agent_id: Option<String>,
    /// `--zone`; the binary's default when `None`.
    pub zone: Option<String>,
    /// `--state-dir`; a temp dir owned by the [`Agent`] when `None` (where the instances' user
    /// can traverse to it).
    pub state_dir: Option<PathBuf>,
    /// `--allowed-command-root`s after the harness's functions dir (which holds the sample
    /// function), e.g. `/usr/bin` for a test that runs `sh`.
    pub command_roots: Vec<PathBuf>,
    /// `--gateway`: the address of this region's sidecar gateway, as the agent reports it to the
    /// control plane. A fresh port of the region's address when `None` (nothing listens there
    /// unless a test starts a sidecar on it).
    pub gateway: Option<SocketAddr>,
    /// Appended to the command line.
    pub extra_args: Vec<String>,
    /// Extra environment variables (e.g. `OTEL_*`).
    pub env: Vec<(String, String)>,
}

/// One agent.
pub struct Agent {
    process: Process,
    region: String,
    region_index: usize,
    agent_id: String,
    listen: SocketAddr,
    gateway: SocketAddr,
    /// `None` when the test passed its own `--admin`.
    admin: Option<SocketAddr>,
    state_dir: PathBuf,
    _state_tmp: Option<TempDir>,
}

impl Agent {
    /// Starts an agent of `region` (bound to the loopback address of `region_index`) connected to
    /// `control_planes` (URLs), and waits until its local API answers.
    pub async fn start(
        region_index: usize,
        region: &str,
        control_planes: &[String],
        opts: AgentOpts,
    ) -> Result<Agent> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut agent = Agent::spawn(region_index, region, control_planes, opts.clone())?;
            match agent.wait_ready().await {
                Ok(()) => return Ok(agent),
                Err(_)
                    if attempt < 3
                        && agent
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

    /// Starts an agent without waiting for it (for agents expected to exit).
    pub fn spawn(
        region_index: usize,
        region: &str,
        control_planes: &[String],
        opts: AgentOpts,
    ) -> Result<Agent> {
        let ip = region_ip(region_index);
        let listen = SocketAddr::from((ip, free_port(ip)?));
        let gateway = match opts.gateway {
            Some(gateway) => gateway,
            None => SocketAddr::from((ip, free_port(ip)?)),
        };
        let agent_id = opts
            .agent_id
            .clone()
            .unwrap_or_else(|| format!("{region}-1"));
        let (state_dir, state_tmp) = match &opts.state_dir {
            Some(dir) => (dir.clone(), None),
            None => {
                // The agent makes it 0711; its parents must let the instances' user through too.
                let tmp = tempfile::Builder::new()
                    .prefix(&format!("meridian-agent-{region}-"))
                    .tempdir_in(traversable_temp_dir())
                    .context("creating the agent's state dir")?;
                (tmp.path().to_path_buf(), Some(tmp))
            }
        };
        remember_state_dir(&state_dir);
        let mut args: Vec<OsString> = vec![
            "--region".into(),
            region.into(),
            "--agent-id".into(),
            agent_id.clone().into(),
            "--gateway".into(),
            gateway.to_string().into(),
            "--control-plane".into(),
            control_planes.join(",").into(),
            "--state-dir".into(),
            state_dir.clone().into_os_string(),
            "--listen".into(),
            listen.to_string().into(),
            // Fast reconnects keep failover tests short.
            "--reconnect-base-ms".into(),
            "50".into(),
            "--reconnect-max-ms".into(),
            "500".into(),
        ];
        if let Some(zone) = &opts.zone {
            args.extend(["--zone".into(), zone.into()]);
        }
        args.extend(policy_args(&opts.command_roots)?);
        // The binary's default admin port is fixed; tests may run several agents per address.
        let admin = if opts.extra_args.iter().any(|a| a.starts_with("--admin")) {
            None
        } else {
            let admin = SocketAddr::from((ip, free_port(ip)?));
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
            &format!("agent-{agent_id}"),
            &bin("meridian-agent")?,
            args,
            &env,
        )?;
        Ok(Agent {
            process,
            region: region.to_string(),
            region_index,
            agent_id,
            listen,
            gateway,
            admin,
            state_dir,
            _state_tmp: state_tmp,
        })
    }

    /// The admin listener (`None` when the test gave its own `--admin`).
    pub fn admin(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// `GET <path>` on the admin listener.
    pub async fn admin_get(&self, path: &str) -> Result<Reply> {
        let admin = self
            .admin
            .ok_or_else(|| anyhow::anyhow!("this agent was started with its own --admin"))?;
        MeshClient::http1(admin).get(&admin.to_string(), path).await
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        let reply = self.admin_get("/metrics").await?;
        anyhow::ensure!(reply.status.is_success(), "/metrics: {}", reply.describe());
        Ok(reply.text())
    }

    /// The region it was started with.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The region index (which loopback address it binds).
    pub fn region_index(&self) -> usize {
        self.region_index
    }

    /// `--agent-id`.
    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// The local API address.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// `http://<listen>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// `--gateway`.
    pub fn gateway(&self) -> SocketAddr {
        self.gateway
    }

    /// `--state-dir`.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The log file of an instance: its stdout and stderr.
    pub fn instance_log(&self, namespace: &str, name: &str, instance: &str) -> PathBuf {
        self.state_dir
            .join("logs")
            .join(namespace)
            .join(name)
            .join(format!("{instance}.log"))
    }

    /// The agent's process records (`instances.json`), as JSON objects.
    pub fn instance_records(&self) -> Result<Vec<serde_json::Value>> {
        let path = self.state_dir.join("instances.json");
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
    }

    /// Replaces the agent's process records (while it is not running).
    pub fn write_instance_records(&self, records: &[serde_json::Value]) -> Result<()> {
        let path = self.state_dir.join("instances.json");
        let bytes = serde_json::to_vec_pretty(records)?;
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
    }

    /// A `LocalRoutingService` client.
    pub async fn local(&self) -> Result<LocalRoutingServiceClient<Channel>> {
        Ok(LocalRoutingServiceClient::new(connect(&self.url()).await?))
    }

    /// The agent's current table (`Get`, every page); `None` when it answers NOT_FOUND.
    pub async fn table(&self) -> Result<Option<RoutingTable>> {
        let mut client = self.local().await?;
        let mut table: Option<RoutingTable> = None;
        let mut page_token = String::new();
        loop {
            let request = GetRoutesRequest {
                page_size: 0,
                page_token: page_token.clone(),
            };
            let page = match client.get(request).await {
                Ok(page) => page.into_inner(),
                Err(status) if status.code() == Code::NotFound => return Ok(None),
                Err(status) => {
                    return Err(anyhow::Error::new(status).context("LocalRoutingService.Get"))
                }
            };
            let part = page.table.context("a page without its table")?;
            match &mut table {
                Some(table) => table.functions.extend(part.functions),
                None => table = Some(part),
            }
            if page.next_page_token.is_empty() {
                return Ok(table);
            }
            page_token = page.next_page_token;
        }
    }

    /// Opens a `Watch` stream on the local API.
    pub async fn watch(&self) -> Result<RouteWatcher> {
        let local = self.local().await?;
        let stream = local
            .clone()
            .watch(WatchRoutesRequest {
                client: WATCHER_CLIENT.to_string(),
            })
            .await
            .context("LocalRoutingService.Watch")?
            .into_inner();
        Ok(RouteWatcher {
            name: self.agent_id.clone(),
            local,
            stream,
            receiver: TableReceiver::default(),
            latest: None,
            received: 0,
        })
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

    /// Stops the agent if it runs, starts it again with the same flags and state dir, and waits
    /// until its local API answers.
    pub async fn restart(&mut self) -> Result<()> {
        if self.process.is_running() {
            self.stop().await?;
        }
        self.process.start()?;
        self.wait_ready().await
    }

    /// Waits up to `within` for the agent to exit on its own.
    pub async fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus> {
        self.process.wait_exit(within).await
    }

    /// Whether the process is alive.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// The process (for its log).
    pub fn process(&self) -> &Process {
        &self.process
    }

    /// Ready = the local API answers `Get` (with a table or NOT_FOUND).
    async fn wait_ready(&mut self) -> Result<()> {
        let url = self.url();
        let process = &mut self.process;
        poll_until(READY_WITHIN, "the agent's local API to answer", || {
            let exited = process.try_exit().map(|s| process.exited_error(s));
            let url = url.clone();
            async move {
                if let Some(err) = exited {
                    return Err(fatal(err));
                }
                let mut client = LocalRoutingServiceClient::new(connect(&url).await?);
                match client.get(GetRoutesRequest::default()).await {
                    Ok(_) => Ok(()),
                    Err(status) if status.code() == Code::NotFound => Ok(()),
                    Err(status) => Err(anyhow::Error::new(status)),
                }
            }
        })
        .await
    }
}

/// The client id a [`RouteWatcher`] watches and reports as.
const WATCHER_CLIENT: &str = "meridian-tests";

/// A `LocalRoutingService.Watch` stream and the last table it delivered. It reports every table
/// it receives as loaded, as a sidecar does: the agent counts its watchers as sidecars, and a
/// region is in sync only when they have all loaded the newest table.
pub struct RouteWatcher {
    name: String,
    local: LocalRoutingServiceClient<Channel>,
    stream: Streaming<RoutingUpdate>,
    receiver: TableReceiver,
    latest: Option<RoutingTable>,
    received: usize,
}

impl RouteWatcher {
    /// The last table received, if any.
    pub fn latest(&self) -> Option<&RoutingTable> {
        self.latest.as_ref()
    }

    /// How many tables the stream delivered so far.
    pub fn received(&self) -> usize {
        self.received
    }

    /// The next table (all its parts), at most `within`. Errors if the stream ends or fails.
    pub async fn next(&mut self, within: Duration) -> Result<RoutingTable> {
        let deadline = Instant::now() + within;
        loop {
            let part = match tokio::time::timeout_at(deadline, self.stream.message()).await {
                Err(_) => {
                    return Err(anyhow!(
                        "no table from {}'s Watch within {within:?}",
                        self.name
                    ))
                }
                Ok(Err(status)) => {
                    return Err(
                        anyhow::Error::new(status).context(format!("{}'s Watch failed", self.name))
                    )
                }
                Ok(Ok(None)) => bail!("{}'s Watch stream ended", self.name),
                Ok(Ok(Some(part))) => part,
            };
            let received = self
                .receiver
                .push(part)
                .with_context(|| format!("{}'s Watch broke the protocol", self.name))?;
            if let Some(table) = received {
                let table = table.clone();
                self.local
                    .report_table(TableReport {
                        client: WATCHER_CLIENT.to_string(),
                        version: table.version,
                        accepted: true,
                        reason: String::new(),
                        local_generation: table.local_generation,
                    })
                    .await
                    .with_context(|| format!("reporting a table to {}", self.name))?;
                self.received += 1;
                self.latest = Some(table.clone());
                return Ok(table);
            }
        }
    }

    /// Returns the first table (the latest one held, or one still to come within `within`) for
    /// which `accept` is true.
    pub async fn wait_for(
        &mut self,
        within: Duration,
        what: &str,
        accept: impl Fn(&RoutingTable) -> bool,
    ) -> Result<RoutingTable> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(table) = &self.latest {
                if accept(table) {
                    return Ok(table.clone());
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(err) = self.next(left).await {
                return Err(err.context(format!(
                    "waiting up to {within:?} on {} for {what}; last table: {}",
                    self.name,
                    self.latest
                        .as_ref()
                        .map_or_else(|| "none".to_string(), summarize)
                )));
            }
        }
    }

    /// Checks that the stream stays open and silent (or repeats nothing new) for `window`:
    /// an error or the end of the stream fails.
    pub async fn expect_open_for(&mut self, window: Duration) -> Result<()> {
        let deadline = Instant::now() + window;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.message()).await {
                Err(_) => return Ok(()),
                Ok(Ok(Some(part))) => {
                    let received = self
                        .receiver
                        .push(part)
                        .with_context(|| format!("{}'s Watch broke the protocol", self.name))?;
                    if let Some(table) = received {
                        self.received += 1;
                        self.latest = Some(table.clone());
                    }
                }
                Ok(Ok(None)) => bail!("{}'s Watch stream ended", self.name),
                Ok(Err(status)) => {
                    return Err(
                        anyhow::Error::new(status).context(format!("{}'s Watch failed", self.name))
                    )
                }
            }
        }
    }
}

/// A one-line description of a table for error messages.
pub fn summarize(table: &RoutingTable) -> String {
    let functions: Vec<String> = table
        .functions
        .iter()
        .map(|f| format!("{}/{}@{}", f.namespace, f.name, f.function_version))
        .collect();
    format!(
        "version {} region {} [{}]",
        table.version,
        table.region,
        functions.join(", ")
    )
}

impl Drop for Agent {
    /// The agent's instances run in their own process groups, so a SIGKILLed agent leaves them
    /// behind (its next start would adopt them). A test's agent never starts again: reap them
    /// here so that no test leaks processes.
    fn drop(&mut self) {
        self.process.kill();
        kill_processes_under(&self.state_dir);
    }
}

/// The state dirs of every agent this test process started: tests of several processes (or
/// checkouts) may run on one machine at once, and each must see only its own instances.
static STATE_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn remember_state_dir(dir: &Path) {
    let mut dirs = STATE_DIRS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !dirs.iter().any(|known| known == dir) {
        dirs.push(dir.to_path_buf());
    }
}

/// Whether `pid` works under the state dir of an agent this test process started (an
/// instance, or what it started, of one of our agents), even after that agent was killed.
pub fn runs_under_our_agents(pid: u32) -> bool {
    let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd")) else {
        return false;
    };
    STATE_DIRS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .iter()
        .any(|dir| cwd.starts_with(dir))
}

/// SIGKILLs every process whose working directory is under `dir` (an agent's instances work in
/// `<state-dir>/instances/...`).
pub fn kill_processes_under(dir: &Path) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cwd) = std::fs::read_link(entry.path().join("cwd")) else {
            continue;
        };
        if cwd.starts_with(dir) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
