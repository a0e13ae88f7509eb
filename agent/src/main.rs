//! `meridian-agent`: flags, the start-up order that makes the agent statically stable (persisted
//! table, then the local API, then the control plane), and shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use meridian_agent::address::parse_host_port;
use meridian_agent::connector::{Connector, ConnectorError};
use meridian_agent::local_api;
use meridian_agent::session::{AgentState, GrpcDialer, Identity};
use meridian_agent::state::StateStore;
use meridian_common::backoff::Backoff;
use meridian_common::names::validate_dns_label;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

/// Exit code for bad flags and for a control plane that refuses this agent's identity.
const EXIT_USAGE: u8 = 2;
/// How long open local streams get to finish once shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Meridian's per-region agent: holds a stream to the control plane, persists the routing
/// table it accepts, and serves it to the region's sidecars.
#[derive(Debug, Parser)]
#[command(name = "meridian-agent", version, about)]
struct Args {
    /// Region this agent serves (DNS-1123 label).
    #[arg(long, env = "MERIDIAN_REGION")]
    region: String,
    /// Zone within the region [default: <region>-a].
    #[arg(long, env = "MERIDIAN_ZONE")]
    zone: Option<String>,
    /// Cloud (or provider) this agent runs in.
    #[arg(long, env = "MERIDIAN_CLOUD", default_value = "local")]
    cloud: String,
    /// Agent id, unique in the region (DNS-1123 label) [default: <region>-1].
    #[arg(long, env = "MERIDIAN_AGENT_ID")]
    agent_id: Option<String>,
    /// host:port of this region's sidecar gateway.
    #[arg(long, env = "MERIDIAN_GATEWAY", default_value = "127.0.0.1:15002")]
    gateway: String,
    /// Control-plane replicas, comma separated; tried in turn.
    #[arg(
        long,
        env = "MERIDIAN_CONTROL_PLANE",
        default_value = "http://127.0.0.1:7000",
        value_delimiter = ','
    )]
    control_plane: Vec<String>,
    /// Directory of the persisted routing table.
    #[arg(
        long,
        env = "MERIDIAN_STATE_DIR",
        default_value = "/var/lib/meridian/agent"
    )]
    state_dir: PathBuf,
    /// Address of the local routing API (LocalRoutingService) for sidecars.
    #[arg(long, env = "MERIDIAN_AGENT_LISTEN", default_value = "127.0.0.1:7100")]
    listen: SocketAddr,
    /// First reconnect delay ceiling, in milliseconds.
    #[arg(long, env = "MERIDIAN_RECONNECT_BASE_MS", default_value_t = 100)]
    reconnect_base_ms: u64,
    /// Largest reconnect delay, in milliseconds.
    #[arg(long, env = "MERIDIAN_RECONNECT_MAX_MS", default_value_t = 3000)]
    reconnect_max_ms: u64,
}

/// Flags after validation.
#[derive(Debug)]
struct Config {
    identity: Identity,
    control_plane: Vec<String>,
    state_dir: PathBuf,
    listen: SocketAddr,
    backoff: Backoff,
}

impl Config {
    /// Every check names the flag at fault.
    fn from_args(args: Args) -> Result<Self, String> {
        let Args {
            region,
            zone,
            cloud,
            agent_id,
            gateway,
            control_plane,
            state_dir,
            listen,
            reconnect_base_ms,
            reconnect_max_ms,
        } = args;
        validate_dns_label(&region).map_err(|e| format!("invalid --region {region:?}: {e}"))?;
        let agent_id = agent_id.unwrap_or_else(|| format!("{region}-1"));
        validate_dns_label(&agent_id)
            .map_err(|e| format!("invalid --agent-id {agent_id:?}: {e}"))?;
        let zone = zone.unwrap_or_else(|| format!("{region}-a"));
        if zone.is_empty() {
            return Err("invalid --zone: must not be empty".into());
        }
        if cloud.is_empty() {
            return Err("invalid --cloud: must not be empty".into());
        }
        parse_host_port(&gateway).map_err(|e| format!("invalid --gateway {gateway:?}: {e}"))?;
        let control_plane = control_plane_urls(&control_plane)?;
        if reconnect_base_ms == 0 {
            return Err("invalid --reconnect-base-ms: must be at least 1".into());
        }
        if reconnect_max_ms < reconnect_base_ms {
            return Err(format!(
                "invalid --reconnect-max-ms {reconnect_max_ms}: must be at least \
                 --reconnect-base-ms ({reconnect_base_ms})"
            ));
        }
        Ok(Self {
            identity: Identity {
                agent_id,
                region,
                zone,
                cloud,
                gateway,
            },
            control_plane,
            state_dir,
            listen,
            backoff: Backoff::new(
                Duration::from_millis(reconnect_base_ms),
                Duration::from_millis(reconnect_max_ms),
            ),
        })
    }
}

/// Normalizes the replica list: blanks dropped, bare `host:port` taken as `http://host:port`.
fn control_plane_urls(values: &[String]) -> Result<Vec<String>, String> {
    let mut urls = Vec::new();
    for value in values.iter().map(|v| v.trim()).filter(|v| !v.is_empty()) {
        let url = if value.contains("://") {
            value.to_owned()
        } else {
            format!("http://{value}")
        };
        tonic::transport::Endpoint::from_shared(url.clone())
            .map_err(|e| format!("invalid --control-plane URL {value:?}: {e}"))?;
        urls.push(url);
    }
    if urls.is_empty() {
        return Err("invalid --control-plane: no address given".into());
    }
    Ok(urls)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    meridian_common::telemetry::init("info");
    let config = match Config::from_args(args) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match run(config).await {
        Ok(code) => code,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<ExitCode> {
    let Config {
        identity,
        control_plane,
        state_dir,
        listen,
        backoff,
    } = config;

    // 1. The persisted table, before anything else: it is what we serve without a control plane.
    let store = StateStore::open(&state_dir).context("cannot open the state directory")?;
    let held = store
        .load(&identity.region)
        .context("cannot load the persisted routing table")?;
    match &held {
        Some(table) => tracing::info!(
            version = table.version(),
            functions = table.functions().len(),
            "loaded persisted routing table"
        ),
        None => tracing::info!(dir = %state_dir.display(), "no persisted routing table"),
    }
    let (publisher, routes) = watch::channel(None);
    let state = AgentState::new(identity, store, publisher, held);

    // 2. The local API, serving that table.
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let local_addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    let (stop_server, server_stopped) = oneshot::channel::<()>();
    let (refusals, refused) = tokio::sync::mpsc::channel(64);
    let mut state = state.with_sidecar_refusals(refused);
    let api = local_api::LocalApi::new(routes).with_refusals(refusals);
    let mut server = tokio::spawn(local_api::serve(listener, api, async {
        let _ = server_stopped.await;
    }));
    tracing::info!("serving local routing API on {local_addr}");

    // 3. The control plane.
    let mut connector = Connector::new(control_plane, GrpcDialer::default(), backoff)?;
    let mut code = ExitCode::SUCCESS;
    tokio::select! {
        error = connector.run(&mut state) => {
            tracing::error!("{}", meridian_agent::error_chain(&error));
            if matches!(error, ConnectorError::Refused { .. }) {
                code = ExitCode::from(EXIT_USAGE);
            } else {
                code = ExitCode::FAILURE;
            }
        }
        () = meridian_common::shutdown::signal() => {}
        served = &mut server => {
            // The server only returns early when it fails.
            served.context("local routing API task failed")??;
            anyhow::bail!("local routing API stopped unexpectedly");
        }
    }

    // Dropping the state drops the table publisher, which ends every open Watch stream, so the
    // graceful shutdown below does not wait on sidecars.
    drop(state);
    let _ = stop_server.send(());
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(served) => served.context("local routing API task failed")??,
        Err(_) => tracing::warn!(
            "local API connections still open after {SHUTDOWN_GRACE:?}; exiting anyway"
        ),
    }
    tracing::info!("agent stopped");
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["meridian-agent", "--region", "us-east"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    #[test]
    fn defaults_derive_from_region() {
        let config = Config::from_args(args(&[])).unwrap();
        assert_eq!(config.identity.agent_id, "us-east-1");
        assert_eq!(config.identity.zone, "us-east-a");
        assert_eq!(config.identity.cloud, "local");
        assert_eq!(config.identity.gateway, "127.0.0.1:15002");
        assert_eq!(config.control_plane, ["http://127.0.0.1:7000"]);
        assert_eq!(config.listen, "127.0.0.1:7100".parse().unwrap());
    }

    #[test]
    fn control_plane_list_is_split_and_normalized() {
        let config = Config::from_args(args(&["--control-plane", "http://a:1, b:2,"])).unwrap();
        assert_eq!(config.control_plane, ["http://a:1", "http://b:2"]);
    }

    #[test]
    fn errors_name_the_flag() {
        let bad = |extra: &[&str]| Config::from_args(args(extra)).unwrap_err();
        let region = Args::try_parse_from(["a", "--region", "US_East"]).unwrap();
        assert!(Config::from_args(region)
            .unwrap_err()
            .starts_with("invalid --region"));
        assert!(bad(&["--agent-id=-x"]).starts_with("invalid --agent-id"));
        assert!(bad(&["--gateway", "127.0.0.1"]).starts_with("invalid --gateway"));
        assert!(bad(&["--control-plane", ","]).starts_with("invalid --control-plane"));
        assert!(bad(&["--reconnect-base-ms", "0"]).starts_with("invalid --reconnect-base-ms"));
        assert!(bad(&["--reconnect-max-ms", "10"]).starts_with("invalid --reconnect-max-ms"));
    }
}
