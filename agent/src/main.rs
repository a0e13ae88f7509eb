//! `meridian-agent`: flags, the command policy (who instances run as, which commands they may
//! run) settled before anything starts, the start-up order that makes the agent statically
//! stable (persisted table, then the runtime with the instances it adopted from the previous
//! agent, then the autoscaler and the local API, then the control plane), and shutdown
//! (instances stopped before the agent exits, or left running for the next start with
//! `--keep-instances-on-exit`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::Parser;
use meridian_agent::admin;
use meridian_agent::autoscaler::{Scaler, ScalerConfig, Windows};
use meridian_agent::connector::{Connector, ConnectorError};
use meridian_agent::load::LoadBook;
use meridian_agent::local_api;
use meridian_agent::metrics::{self, AgentMetrics};
use meridian_agent::overlay::{self, Overlay};
use meridian_agent::runtime::{CommandPolicy, Runtime, RuntimeConfig, ADOPTION_HOLD};
use meridian_agent::session::{AgentState, GrpcDialer, Identity};
use meridian_agent::state::StateStore;
use meridian_common::address::parse_host_port;
use meridian_common::backoff::Backoff;
use meridian_common::names::validate_dns_label;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

/// Exit code for bad flags and for a control plane that refuses this agent's identity.
const EXIT_USAGE: u8 = 2;
/// How long open local streams get to finish once shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Activations queued for the autoscaler; more are dropped (the sidecar retries them).
const ACTIVATION_QUEUE: usize = 256;

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
    /// Directory of the persisted routing table, the instance records (instances.json), the
    /// instances' working directories (instances/) and their logs (logs/).
    #[arg(
        long,
        env = "MERIDIAN_STATE_DIR",
        default_value = "/var/lib/meridian/agent"
    )]
    state_dir: PathBuf,
    /// Address of the agent's API: LocalRoutingService and LoadService for sidecars,
    /// AgentApiService (logs) for operators.
    #[arg(long, env = "MERIDIAN_AGENT_LISTEN", default_value = "127.0.0.1:7100")]
    listen: SocketAddr,
    /// host:port of the agent's API as others should dial it (told to the control plane, for
    /// `meridianctl logs`) [default: the bound --listen address].
    #[arg(long, env = "MERIDIAN_API_ADDRESS")]
    api_address: Option<String>,
    /// IP address function instances bind (their HOST) and sidecars dial [default: the host of
    /// --gateway].
    #[arg(long, env = "MERIDIAN_INSTANCE_HOST")]
    instance_host: Option<IpAddr>,
    /// Autoscaler: seconds of concurrency averaged for the stable decision.
    #[arg(long, env = "MERIDIAN_STABLE_WINDOW_SECS", default_value_t = 60)]
    stable_window_secs: u64,
    /// Autoscaler: seconds of concurrency averaged to detect a burst (panic mode).
    #[arg(long, env = "MERIDIAN_PANIC_WINDOW_SECS", default_value_t = 6)]
    panic_window_secs: u64,
    /// Seconds after a stream to the control plane opens during which a table that no longer
    /// places a function here does not stop its ready instances (they stop when the grace
    /// ends, unless placed again): a recovering control plane may not have seen this agent
    /// yet. A function deleted from the table stops at once. Keep it equal to the control
    /// plane's --region-grace.
    #[arg(long, env = "MERIDIAN_REGION_GRACE", default_value_t = 60)]
    region_grace: u64,
    /// Longest wait, in seconds, for sidecars to stop using a draining instance before it is
    /// stopped.
    #[arg(long, env = "MERIDIAN_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    drain_timeout_secs: u64,
    /// Seconds between SIGTERM and SIGKILL when an instance is stopped.
    #[arg(long, env = "MERIDIAN_STOP_GRACE_SECS", default_value_t = 10)]
    stop_grace_secs: u64,
    /// First reconnect delay ceiling, in milliseconds.
    #[arg(long, env = "MERIDIAN_RECONNECT_BASE_MS", default_value_t = 100)]
    reconnect_base_ms: u64,
    /// Largest reconnect delay, in milliseconds.
    #[arg(long, env = "MERIDIAN_RECONNECT_MAX_MS", default_value_t = 3000)]
    reconnect_max_ms: u64,
    /// Address of the admin listener (HTTP: /metrics in Prometheus text, /ready), or `none`
    /// [default: the host of --listen, port 7190; if that is taken, the agent runs without one
    /// and says so].
    #[arg(long, env = "MERIDIAN_AGENT_ADMIN")]
    admin: Option<String>,
    /// User that function instances run as (a name, or a uid with a passwd entry): its uid and
    /// primary group, no supplementary groups. Required when the agent runs as root, and never
    /// root itself; an agent that is not root runs instances as itself.
    #[arg(long, env = "MERIDIAN_RUN_AS", value_name = "USER")]
    run_as: Option<String>,
    /// Directory whose executables function instances may run; repeat the flag (or separate
    /// with commas) for more. An absolute command must resolve (symlinks followed) under one; a
    /// relative one is looked up in them in order, not in PATH. None given: no instance starts.
    #[arg(
        long = "allowed-command-root",
        env = "MERIDIAN_ALLOWED_COMMAND_ROOTS",
        value_name = "DIR",
        value_delimiter = ','
    )]
    allowed_command_roots: Vec<PathBuf>,
    /// On SIGTERM or SIGINT, leave the ready function instances running (recorded in the state
    /// dir) for the next agent to adopt, instead of stopping them; starting and draining ones
    /// are stopped. For restarts that must not interrupt functions (the systemd unit sets it,
    /// with KillMode=process). An agent that exits for an error stops its instances either
    /// way; one killed outright always leaves them, and the next start adopts those whose pid,
    /// start time, command and readiness match, and kills the rest of its own.
    #[arg(long, env = "MERIDIAN_KEEP_INSTANCES_ON_EXIT")]
    keep_instances_on_exit: bool,
}

/// Port of the admin listener when `--admin` is not given.
const DEFAULT_ADMIN_PORT: u16 = 7190;

/// Flags after validation.
#[derive(Debug)]
struct Config {
    identity: Identity,
    control_plane: Vec<String>,
    state_dir: PathBuf,
    listen: SocketAddr,
    api_address: Option<String>,
    instance_host: IpAddr,
    windows: Windows,
    region_grace: Duration,
    drain_timeout: Duration,
    stop_grace: Duration,
    backoff: Backoff,
    /// `None`: no admin listener.
    admin: Option<SocketAddr>,
    /// `--admin` was given: failing to listen there is fatal (the default is skipped instead).
    admin_given: bool,
    /// `--run-as`, checked against the agent's own user by [`CommandPolicy::for_agent`].
    run_as: Option<String>,
    allowed_command_roots: Vec<PathBuf>,
    /// `--keep-instances-on-exit`.
    keep_instances_on_exit: bool,
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
            api_address,
            instance_host,
            stable_window_secs,
            panic_window_secs,
            region_grace,
            drain_timeout_secs,
            stop_grace_secs,
            reconnect_base_ms,
            reconnect_max_ms,
            admin,
            run_as,
            allowed_command_roots,
            keep_instances_on_exit,
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
        let gateway_address =
            parse_host_port(&gateway).map_err(|e| format!("invalid --gateway {gateway:?}: {e}"))?;
        let instance_host = match instance_host {
            Some(host) => host,
            None => gateway_address.host.parse::<IpAddr>().map_err(|_| {
                format!(
                    "--gateway host {:?} is not an IP address: give --instance-host",
                    gateway_address.host
                )
            })?,
        };
        if let Some(api_address) = &api_address {
            parse_host_port(api_address)
                .map_err(|e| format!("invalid --api-address {api_address:?}: {e}"))?;
        }
        if stable_window_secs == 0 {
            return Err("invalid --stable-window-secs: must be at least 1".into());
        }
        if panic_window_secs == 0 || panic_window_secs > stable_window_secs {
            return Err(format!(
                "invalid --panic-window-secs {panic_window_secs}: must be between 1 and \
                 --stable-window-secs ({stable_window_secs})"
            ));
        }
        let control_plane = control_plane_urls(&control_plane)?;
        let admin_given = admin.is_some();
        let admin = match admin {
            Some(value) => meridian_agent::admin::parse_address(&value)
                .map_err(|e| format!("invalid --admin: {e}"))?,
            None => Some(SocketAddr::new(listen.ip(), DEFAULT_ADMIN_PORT)),
        };
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
            api_address,
            instance_host,
            windows: Windows {
                stable: Duration::from_secs(stable_window_secs),
                panic: Duration::from_secs(panic_window_secs),
            },
            region_grace: Duration::from_secs(region_grace),
            drain_timeout: Duration::from_secs(drain_timeout_secs),
            stop_grace: Duration::from_secs(stop_grace_secs),
            backoff: Backoff::new(
                Duration::from_millis(reconnect_base_ms),
                Duration::from_millis(reconnect_max_ms),
            ),
            admin,
            admin_given,
            run_as,
            allowed_command_roots,
            keep_instances_on_exit,
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

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::from_args(args) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Who instances run as and what they may run, settled before anything starts: an agent
    // that would run functions as root refuses to start at all (fail closed).
    let agent_uid = nix::unistd::geteuid().as_raw();
    let policy = match CommandPolicy::for_agent(
        config.run_as.as_deref(),
        &config.allowed_command_roots,
        agent_uid,
    ) {
        Ok(policy) => policy,
        Err(error) => {
            eprintln!("error: {}", meridian_agent::error_chain(&error));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if policy.run_as().is_some() {
        // Before the async runtime exists: no_new_privs is per thread and inherited only by
        // threads created afterwards, and instances are forked from the runtime's threads. With
        // it, a setuid binary an instance runs cannot give it back the root the agent has.
        if let Err(error) = nix::sys::prctl::set_no_new_privs() {
            eprintln!("error: cannot set no_new_privs, so instances could regain root: {error}");
            return ExitCode::FAILURE;
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        meridian_common::telemetry::init("info");
        let code = match run(config, policy).await {
            Ok(code) => code,
            Err(error) => {
                tracing::error!("{error:#}");
                ExitCode::FAILURE
            }
        };
        // The last spans (shutdown, instances stopped) are exported before the process ends.
        meridian_common::telemetry::shutdown();
        code
    })
}

async fn run(config: Config, policy: CommandPolicy) -> anyhow::Result<ExitCode> {
    let Config {
        identity,
        control_plane,
        state_dir,
        listen,
        api_address,
        instance_host,
        windows,
        region_grace,
        drain_timeout,
        stop_grace,
        backoff,
        admin,
        admin_given,
        run_as: _,
        allowed_command_roots: _,
        keep_instances_on_exit,
    } = config;
    announce(&policy);
    // Listening from the start: a SIGTERM while instances are being started must still stop
    // them, not kill the agent outright and leave them behind.
    let stop_signal = tokio::spawn(meridian_common::shutdown::signal());

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
    let metrics = AgentMetrics::new(identity.region.clone());
    if let Some(table) = &held {
        // A table from disk is as old as the file: that is how stale a restarted agent is.
        let at = metrics::persisted_at(&store.table_path()).unwrap_or_else(SystemTime::now);
        metrics.table_accepted(table.version(), at);
    }
    let (publisher, accepted) = watch::channel(None);
    let state = AgentState::new(identity.clone(), store, publisher, held)
        .with_connected(metrics.connected_flag());
    let (session_clock, session_opened) = watch::channel(None);
    let state = state.with_session_clock(session_clock);

    // 2. The runtime: first it adopts what a previous agent left running (and kills what of that
    //    it cannot vouch for), so that the autoscaler below, which sets the persisted table's
    //    functions at once, counts the adopted instances instead of starting new ones.
    let book = Arc::new(LoadBook::new());
    let runtime = Runtime::start(
        RuntimeConfig {
            state_dir: state_dir.clone(),
            policy,
            instance_host,
            region: identity.region.clone(),
            stop_grace,
            drain_timeout,
            adoption_hold: ADOPTION_HOLD,
        },
        Arc::clone(&book) as _,
    )
    .await
    .context("cannot start the process runtime")?;

    let served = serve(
        identity,
        state,
        accepted,
        &runtime,
        book,
        Serving {
            control_plane,
            listen,
            api_address,
            windows,
            region_grace,
            session_opened,
            backoff,
            stop_signal,
            admin,
            admin_given,
            metrics,
        },
    )
    .await;
    let (code, by_signal) = match served {
        Ok(ended) => ended,
        Err(error) => {
            tracing::error!("{error:#}");
            (ExitCode::FAILURE, false)
        }
    };

    if keep_instances_on_exit && by_signal {
        // The next start adopts them; until then they serve on, unsupervised.
        tracing::info!("leaving the ready function instances running for the next start to adopt (--keep-instances-on-exit)");
        runtime.release().await;
    } else {
        // An agent that stops (or fails) takes its instances with it.
        tracing::info!("stopping function instances");
        runtime.shutdown().await;
    }
    tracing::info!("agent stopped");
    Ok(code)
}

/// Says in the log who instances run as and from where, so an operator sees the policy in force.
fn announce(policy: &CommandPolicy) {
    let roots: Vec<String> = policy
        .allowed_roots()
        .iter()
        .map(|r| r.display().to_string())
        .collect();
    match policy.run_as() {
        Some(user) => tracing::info!(
            user = user.name(),
            uid = user.uid(),
            gid = user.gid(),
            "function instances run as {} (no supplementary groups, no_new_privs)",
            user.name()
        ),
        None => tracing::info!("function instances run as the agent's own user"),
    }
    if roots.is_empty() {
        tracing::warn!("no --allowed-command-root: no process function can start on this agent");
    } else {
        tracing::info!("allowed command roots: {}", roots.join(", "));
    }
}

/// The policy as told to the control plane in every Hello, so that its API refuses up front a
/// command that would never start here. An agent without `--run-as` names its own user.
fn announced_policy(policy: &CommandPolicy) -> meridian_proto::v1::CommandPolicy {
    let run_as = match policy.run_as_name() {
        Some(name) => name.to_owned(),
        None => {
            let uid = nix::unistd::geteuid();
            nix::unistd::User::from_uid(uid)
                .ok()
                .flatten()
                .map_or_else(|| uid.to_string(), |user| user.name)
        }
    };
    meridian_proto::v1::CommandPolicy {
        allowed_roots: policy
            .allowed_roots()
            .iter()
            .map(|root| root.display().to_string())
            .collect(),
        run_as,
    }
}

/// What `serve` needs besides the state and the runtime.
struct Serving {
    control_plane: Vec<String>,
    listen: SocketAddr,
    api_address: Option<String>,
    windows: Windows,
    region_grace: Duration,
    /// When each stream to a control plane opened (see `AgentState::with_session_clock`).
    session_opened: watch::Receiver<Option<tokio::time::Instant>>,
    backoff: Backoff,
    /// Resolves on SIGTERM or SIGINT.
    stop_signal: tokio::task::JoinHandle<()>,
    admin: Option<SocketAddr>,
    admin_given: bool,
    metrics: Arc<AgentMetrics>,
}

/// Runs the served table, the autoscaler, the local API and the control-plane connection until
/// a signal, a refusal or a failure; returns the exit code and whether a signal ended it. The
/// runtime is left running.
async fn serve(
    identity: Identity,
    state: AgentState,
    accepted: watch::Receiver<local_api::CurrentTable>,
    runtime: &Runtime,
    book: Arc<LoadBook>,
    serving: Serving,
) -> anyhow::Result<(ExitCode, bool)> {
    let Serving {
        control_plane,
        listen,
        api_address,
        windows,
        region_grace,
        session_opened,
        backoff,
        mut stop_signal,
        admin,
        admin_given,
        metrics,
    } = serving;

    // 3. The table sidecars are served: the accepted one with the instances overlaid. Its
    //    generations start at the wall clock (ms) so that they keep growing across restarts.
    let (served_publisher, served) = watch::channel(None);
    let first_generation = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let overlay_task = tokio::spawn(overlay::run(
        Overlay::new(identity.zone.clone(), first_generation),
        accepted.clone(),
        runtime.subscribe(),
        served_publisher,
        Arc::clone(&book),
    ));

    // 4. The autoscaler: runs the table's process functions from the persisted table already.
    let (activations, activations_rx) = mpsc::channel(ACTIVATION_QUEUE);
    let (scaler, scale_status) = Scaler::new(
        ScalerConfig {
            region: identity.region.clone(),
            agent_id: identity.agent_id.clone(),
            windows,
            region_grace,
        },
        runtime.clone(),
        Arc::clone(&book),
    );
    let scaler = scaler.with_sessions(session_opened);
    let admin_listener = match admin {
        Some(address) => match TcpListener::bind(address).await {
            Ok(listener) => Some(listener),
            // Only the default may be skipped: an address the operator gave must work.
            Err(error) if !admin_given => {
                tracing::warn!(%error, "cannot listen on the default admin address {address}; running without /metrics and /ready (give --admin)");
                None
            }
            Err(error) => {
                return Err(error).with_context(|| format!("cannot listen on --admin {address}"))
            }
        },
        None => None,
    };
    let admin_task = match admin_listener {
        Some(listener) => {
            let registry = metrics::registry(
                Arc::clone(&metrics),
                scale_status.clone(),
                runtime.subscribe(),
            );
            let admin = Arc::new(admin::new(registry, accepted.clone()));
            if let Ok(address) = listener.local_addr() {
                tracing::info!("admin listening on {address}");
            }
            Some(tokio::spawn(admin::serve(
                listener,
                admin,
                std::future::pending(),
            )))
        }
        None => None,
    };
    tokio::spawn(metrics::track_tables(
        Arc::clone(&metrics),
        accepted.clone(),
    ));
    tokio::spawn(metrics::track_cold_starts(metrics, runtime.subscribe()));
    let scaler_task = tokio::spawn(scaler.run(accepted, runtime.subscribe(), activations_rx));

    // 5. The local API, serving that table.
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let local_addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    let api_address = api_address.unwrap_or_else(|| {
        if local_addr.ip().is_unspecified() {
            tracing::warn!(
                "listening on {local_addr}: operators' tools cannot dial that; give --api-address"
            );
        }
        local_addr.to_string()
    });
    let (stop_server, server_stopped) = oneshot::channel::<()>();
    let (refusals, refused) = mpsc::channel(64);
    let state = state
        .with_sidecar_refusals(refused)
        .with_api_address(api_address.clone())
        .with_instances(runtime.subscribe())
        .with_scale_status(scale_status);
    let api = local_api::LocalApi::new(served)
        .with_refusals(refusals)
        .with_load(book, activations)
        .with_logs(Arc::new(runtime.clone()), identity.region.clone());
    let mut state = state
        .with_sidecar_statuses(api.sidecars().statuses())
        .with_command_policy(announced_policy(runtime.policy()));
    let mut server = tokio::spawn(local_api::serve(listener, api, async {
        let _ = server_stopped.await;
    }));
    // The address ends the line: tests and scripts read it from there.
    tracing::info!("advertising agent API as {api_address}");
    tracing::info!("serving local routing API on {local_addr}");

    // 6. The control plane.
    let mut connector = Connector::new(control_plane, GrpcDialer::default(), backoff)?;
    let mut code = ExitCode::SUCCESS;
    let mut by_signal = false;
    tokio::select! {
        error = connector.run(&mut state) => {
            tracing::error!("{}", meridian_agent::error_chain(&error));
            if matches!(error, ConnectorError::Refused { .. }) {
                code = ExitCode::from(EXIT_USAGE);
            } else {
                code = ExitCode::FAILURE;
            }
        }
        _ = &mut stop_signal => by_signal = true,
        served = &mut server => {
            // The server only returns early when it fails.
            served.context("local routing API task failed")??;
            anyhow::bail!("local routing API stopped unexpectedly");
        }
    }

    // Dropping the state drops the accepted-table publisher: the autoscaler stops (no more
    // instance changes), and the overlay stops, dropping the served-table publisher, which
    // ends every open Watch and followed Logs stream, so the graceful shutdown below does not
    // wait on sidecars.
    drop(state);
    if let Some(task) = admin_task {
        task.abort();
    }
    if let Err(error) = scaler_task.await {
        tracing::warn!(%error, "autoscaler task failed");
    }
    if let Err(error) = overlay_task.await {
        tracing::warn!(%error, "served-table task failed");
    }
    let _ = stop_server.send(());
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(served) => served.context("local routing API task failed")??,
        Err(_) => tracing::warn!(
            "local API connections still open after {SHUTDOWN_GRACE:?}; exiting anyway"
        ),
    }
    Ok((code, by_signal))
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
        assert_eq!(config.api_address, None);
        assert_eq!(config.instance_host, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(config.windows, Windows::default());
        assert_eq!(config.drain_timeout, Duration::from_secs(30));
        assert_eq!(config.stop_grace, Duration::from_secs(10));
        assert_eq!(config.admin, Some("127.0.0.1:7190".parse().unwrap()));
        assert_eq!(config.run_as, None);
        assert!(config.allowed_command_roots.is_empty());
        assert!(!config.keep_instances_on_exit);
    }

    #[test]
    fn instances_are_kept_on_exit_only_when_asked() {
        let config = Config::from_args(args(&["--keep-instances-on-exit"])).unwrap();
        assert!(config.keep_instances_on_exit);
    }

    #[test]
    fn command_roots_repeat_or_split_at_commas() {
        let config = Config::from_args(args(&[
            "--allowed-command-root",
            "/opt/a,/opt/b",
            "--allowed-command-root",
            "/opt/c",
            "--run-as",
            "meridian-fn",
        ]))
        .unwrap();
        let roots: Vec<&str> = config
            .allowed_command_roots
            .iter()
            .map(|r| r.to_str().unwrap())
            .collect();
        assert_eq!(roots, ["/opt/a", "/opt/b", "/opt/c"]);
        assert_eq!(config.run_as.as_deref(), Some("meridian-fn"));
    }

    #[test]
    fn admin_follows_the_listen_host_unless_given() {
        let config = Config::from_args(args(&["--listen", "127.0.2.1:7100"])).unwrap();
        assert_eq!(config.admin, Some("127.0.2.1:7190".parse().unwrap()));
        let config = Config::from_args(args(&["--admin", "none"])).unwrap();
        assert_eq!(config.admin, None);
        let config = Config::from_args(args(&["--admin", "0.0.0.0:9100"])).unwrap();
        assert_eq!(config.admin, Some("0.0.0.0:9100".parse().unwrap()));
        let error = Config::from_args(args(&["--admin", "nope"])).unwrap_err();
        assert!(error.starts_with("invalid --admin"), "{error}");
    }

    #[test]
    fn instance_host_follows_the_gateway_unless_given() {
        let config = Config::from_args(args(&["--gateway", "127.0.2.1:15002"])).unwrap();
        assert_eq!(config.instance_host, "127.0.2.1".parse::<IpAddr>().unwrap());
        let config = Config::from_args(args(&["--gateway", "[::1]:15002"])).unwrap();
        assert_eq!(config.instance_host, "::1".parse::<IpAddr>().unwrap());
        let config = Config::from_args(args(&[
            "--gateway",
            "gw.example:15002",
            "--instance-host",
            "10.0.0.5",
        ]))
        .unwrap();
        assert_eq!(config.instance_host, "10.0.0.5".parse::<IpAddr>().unwrap());
        let error = Config::from_args(args(&["--gateway", "gw.example:15002"])).unwrap_err();
        assert!(error.contains("--instance-host"), "{error}");
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
        assert!(bad(&["--api-address", "h"]).starts_with("invalid --api-address"));
        assert!(bad(&["--stable-window-secs", "0"]).starts_with("invalid --stable-window-secs"));
        assert!(bad(&["--panic-window-secs", "0"]).starts_with("invalid --panic-window-secs"));
        assert!(bad(&["--panic-window-secs", "61"]).starts_with("invalid --panic-window-secs"));
    }
}
