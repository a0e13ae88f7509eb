//! `meridian-sidecar`: flags, then the listeners, the agent watch, the prober, the load reporter
//! and the activator until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use meridian_common::names::validate_dns_label;
use meridian_common::serve::{self, ServeLimits};
use meridian_sidecar::body::BodyLimits;
use meridian_sidecar::{activator, proxy, Bound, Config};

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
    /// Failed starts in a row (local instances that exited before they became ready, as the
    /// agent counts them) from which the function crash-loops here: its requests then go to a
    /// healthy remote region at once instead of being held, as they do while the agent waits
    /// out a restart backoff.
    #[arg(long, env = "MERIDIAN_CRASH_LOOP_FAILED_STARTS", default_value_t = activator::DEFAULT_CRASH_LOOP_FAILED_STARTS)]
    crash_loop_failed_starts: u32,
    /// While a healthy remote region exists, a request is held for a local instance at most
    /// that region's measured round trip plus this many milliseconds (and at most the
    /// function's per-try timeout), then sent there.
    #[arg(long, env = "MERIDIAN_HOLD_REMOTE_MARGIN_MS", default_value_t = activator::DEFAULT_HOLD_REMOTE_MARGIN.as_millis() as u64)]
    hold_remote_margin_ms: u64,
    /// Window of the load reports sent to the agent's autoscaler, in milliseconds.
    #[arg(long, env = "MERIDIAN_LOAD_REPORT_INTERVAL_MS", default_value_t = 1000)]
    load_report_interval_ms: u64,
    /// Every listener: a request head must arrive within this many milliseconds of its first
    /// byte, else the connection is closed (slowloris).
    #[arg(long, env = "MERIDIAN_HEADER_READ_TIMEOUT_MS", default_value_t = serve::DEFAULT_HEADER_READ_TIMEOUT.as_millis() as u64)]
    header_read_timeout_ms: u64,
    /// Every listener: a connection with no request in flight for this many milliseconds is
    /// closed.
    #[arg(long, env = "MERIDIAN_IDLE_TIMEOUT_MS", default_value_t = serve::DEFAULT_IDLE_TIMEOUT.as_millis() as u64)]
    idle_timeout_ms: u64,
    /// Open connections at most on each proxy listener (outbound, gateway). At the cap a new
    /// connection evicts the oldest idle one; with none idle it gets 503 connection-limit.
    #[arg(long, env = "MERIDIAN_MAX_CONNECTIONS", default_value_t = serve::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Open connections at most on the admin listener.
    #[arg(long, env = "MERIDIAN_ADMIN_MAX_CONNECTIONS", default_value_t = serve::DEFAULT_ADMIN_MAX_CONNECTIONS)]
    admin_max_connections: usize,
    /// HTTP/2 streams in flight per connection at most.
    #[arg(long, env = "MERIDIAN_H2_MAX_CONCURRENT_STREAMS", default_value_t = serve::DEFAULT_H2_MAX_CONCURRENT_STREAMS)]
    h2_max_concurrent_streams: u32,
    /// HTTP/2 streams a client may reset before they are accepted, at most at a time; beyond,
    /// GOAWAY (rapid reset).
    #[arg(long, env = "MERIDIAN_H2_MAX_PENDING_RESETS", default_value_t = serve::DEFAULT_H2_MAX_PENDING_ACCEPT_RESET_STREAMS)]
    h2_max_pending_resets: usize,
    /// HTTP/2 streams reset for a client's protocol errors, at most per connection; beyond,
    /// GOAWAY.
    #[arg(long, env = "MERIDIAN_H2_MAX_LOCAL_ERROR_RESETS", default_value_t = serve::DEFAULT_H2_MAX_LOCAL_ERROR_RESET_STREAMS)]
    h2_max_local_error_resets: usize,
    /// Longest wait for more of an unfinished request body, in milliseconds (beyond: 408
    /// request-body-timeout, the client's fault); 0: only the function's timeouts apply.
    #[arg(long, env = "MERIDIAN_REQUEST_BODY_IDLE_TIMEOUT_MS", default_value_t = proxy::DEFAULT_REQUEST_BODY_IDLE_TIMEOUT.as_millis() as u64)]
    request_body_idle_timeout_ms: u64,
    /// Largest request body accepted, in bytes (beyond: 413 request-too-large); 0: no limit
    /// (bodies are streamed, so size costs no memory).
    #[arg(long, env = "MERIDIAN_MAX_REQUEST_BODY_BYTES", default_value_t = 0)]
    max_request_body_bytes: u64,
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
        if self.crash_loop_failed_starts == 0 {
            return Err("invalid --crash-loop-failed-starts: must be at least 1".into());
        }
        if self.load_report_interval_ms < 10 {
            return Err("invalid --load-report-interval-ms: must be at least 10".into());
        }
        for (flag, value) in [
            ("--header-read-timeout-ms", self.header_read_timeout_ms),
            ("--idle-timeout-ms", self.idle_timeout_ms),
        ] {
            if value < 100 {
                return Err(format!("invalid {flag}: must be at least 100"));
            }
        }
        for (flag, value) in [
            ("--max-connections", self.max_connections),
            ("--admin-max-connections", self.admin_max_connections),
            ("--h2-max-pending-resets", self.h2_max_pending_resets),
            (
                "--h2-max-local-error-resets",
                self.h2_max_local_error_resets,
            ),
        ] {
            if value == 0 {
                return Err(format!("invalid {flag}: must be at least 1"));
            }
        }
        if self.h2_max_concurrent_streams == 0 {
            return Err("invalid --h2-max-concurrent-streams: must be at least 1".into());
        }
        let proxy_limits = ServeLimits {
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            max_connections: self.max_connections,
            h2_max_concurrent_streams: self.h2_max_concurrent_streams,
            h2_max_pending_accept_reset_streams: self.h2_max_pending_resets,
            h2_max_local_error_reset_streams: self.h2_max_local_error_resets,
            ..ServeLimits::default()
        };
        let admin_limits = ServeLimits {
            max_connections: self.admin_max_connections,
            ..proxy_limits.clone()
        };
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
            crash_loop_failed_starts: self.crash_loop_failed_starts,
            hold_remote_margin: Duration::from_millis(self.hold_remote_margin_ms),
            load_report_interval: Duration::from_millis(self.load_report_interval_ms),
            proxy_limits,
            admin_limits,
            body_limits: BodyLimits {
                idle_timeout: (self.request_body_idle_timeout_ms > 0)
                    .then(|| Duration::from_millis(self.request_body_idle_timeout_ms)),
                max_bytes: (self.max_request_body_bytes > 0).then_some(self.max_request_body_bytes),
            },
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
