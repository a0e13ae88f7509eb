//! `meridian-sidecar`: flags, then the listeners, the agent watch, the prober, the load reporter
//! and the activator until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use meridian_common::names::validate_dns_label;
use meridian_sidecar::{Bound, Config};

/// Exit code for bad flags.
const EXIT_USAGE: u8 = 2;

/// Meridian's sidecar: routes applications' calls to functions (outbound listener) and serves
/// other regions' calls to this region's instances (gateway listener).
#[derive(Debug, Parser)]
#[command(name = "meridian-sidecar", version, about)]
struct Args {
    /// Region this sidecar runs in (DNS-1123 label).
    #[arg(long, env = "MERIDIAN_REGION")]
    region: String,
    /// URL of the local agent's routing API (LocalRoutingService).
    #[arg(long, env = "MERIDIAN_AGENT", default_value = "http://127.0.0.1:7100")]
    agent: String,
    /// Address applications call functions on.
    #[arg(long, env = "MERIDIAN_OUTBOUND", default_value = "127.0.0.1:15001")]
    outbound: SocketAddr,
    /// Address other regions' sidecars call this region on.
    #[arg(
        long,
        env = "MERIDIAN_GATEWAY_LISTEN",
        default_value = "127.0.0.1:15002"
    )]
    gateway: SocketAddr,
    /// Admin address: /ready, /metrics, /routes (HTTP/1.1), and SidecarAdminService.Explain
    /// (gRPC, h2c) for the agent; its Watch tells the agent this address.
    #[arg(long, env = "MERIDIAN_ADMIN", default_value = "127.0.0.1:15090")]
    admin: SocketAddr,
    /// Interval of the active probes of remote gateways, in milliseconds.
    #[arg(long, env = "MERIDIAN_PROBE_INTERVAL_MS", default_value_t = 500)]
    probe_interval_ms: u64,
    /// Timeout of one probe, in milliseconds.
    #[arg(long, env = "MERIDIAN_PROBE_TIMEOUT_MS", default_value_t = 300)]
    probe_timeout_ms: u64,
    /// Name reported to the agent [default: sidecar-<outbound port>].
    #[arg(long, env = "MERIDIAN_CLIENT_ID")]
    client_id: Option<String>,
    /// Requests held per function at most while no local instance is ready (beyond: 503
    /// hold-queue-full).
    #[arg(long, env = "MERIDIAN_HOLD_QUEUE", default_value_t = 1000)]
    hold_queue: u32,
    /// How long a request may wait for a local instance to start, in milliseconds (the
    /// function's timeout caps it; beyond: 503 cold-start-timeout).
    #[arg(long, env = "MERIDIAN_HOLD_TIMEOUT_MS", default_value_t = 30_000)]
    hold_timeout_ms: u64,
    /// Window of the load reports sent to the agent's autoscaler, in milliseconds.
    #[arg(long, env = "MERIDIAN_LOAD_REPORT_INTERVAL_MS", default_value_t = 1000)]
    load_report_interval_ms: u64,
}

impl Args {
    /// Every check names the flag at fault.
    fn into_config(self) -> Result<Config, String> {
        validate_dns_label(&self.region)
            .map_err(|e| format!("invalid --region {:?}: {e}", self.region))?;
        let agent = if self.agent.contains("://") {
            self.agent.clone()
        } else {
            format!("http://{}", self.agent)
        };
        tonic::transport::Endpoint::from_shared(agent.clone())
            .map_err(|e| format!("invalid --agent {:?}: {e}", self.agent))?;
        if self.probe_interval_ms == 0 {
            return Err("invalid --probe-interval-ms: must be at least 1".into());
        }
        if self.probe_timeout_ms == 0 {
            return Err("invalid --probe-timeout-ms: must be at least 1".into());
        }
        let client_id = self
            .client_id
            .unwrap_or_else(|| format!("sidecar-{}", self.outbound.port()));
        if client_id.is_empty() {
            return Err("invalid --client-id: must not be empty".into());
        }
        if self.hold_timeout_ms == 0 {
            return Err("invalid --hold-timeout-ms: must be at least 1".into());
        }
        if self.load_report_interval_ms < 10 {
            return Err("invalid --load-report-interval-ms: must be at least 10".into());
        }
        Ok(Config {
            region: self.region,
            agent,
            outbound: self.outbound,
            gateway: self.gateway,
            admin: self.admin,
            probe_interval: Duration::from_millis(self.probe_interval_ms),
            probe_timeout: Duration::from_millis(self.probe_timeout_ms),
            client_id,
            hold_queue: self.hold_queue,
            hold_timeout: Duration::from_millis(self.hold_timeout_ms),
            load_report_interval: Duration::from_millis(self.load_report_interval_ms),
        })
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    meridian_common::telemetry::init("info");
    let config = match args.into_config() {
        Ok(config) => config,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let code = match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    };
    // The last requests' spans are still queued in the batch exporter.
    meridian_common::telemetry::shutdown();
    code
}

async fn run(config: Config) -> anyhow::Result<()> {
    let bound = Bound::bind(&config).await?;
    tracing::info!(region = %config.region, agent = %config.agent, client = %config.client_id, "sidecar starting");
    meridian_sidecar::run(config, bound, meridian_common::shutdown::signal()).await?;
    Ok(())
}
