//! `meridian-control-plane`: serves FunctionService, MeshService, ScaleService and AgentService
//! (plus gRPC health and reflection) from one port, with etcd as the only state; the replica
//! elected scheduler leader also writes placements.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use meridian_control_plane::admin;
use meridian_control_plane::api::{ControlPlaneApi, FunctionApi, MeshApi, ScaleApi};
use meridian_control_plane::cache::{self, CacheConfig};
use meridian_control_plane::election::{self, ElectionConfig, ElectionState};
use meridian_control_plane::metrics::{self, Metrics};
use meridian_control_plane::push::{self, AgentPush, PushConfig};
use meridian_control_plane::scheduler::{SchedulerConfig, SchedulerView};
use meridian_control_plane::spec::SpecLimits;
use meridian_control_plane::store::Store;
use meridian_control_plane::table::Tables;
use meridian_control_plane::trace::Tracing;
use meridian_proto::v1::agent_service_server::AgentServiceServer;
use meridian_proto::v1::control_plane_service_server::ControlPlaneServiceServer;
use meridian_proto::v1::function_service_server::FunctionServiceServer;
use meridian_proto::v1::mesh_service_server::MeshServiceServer;
use meridian_proto::v1::scale_service_server::ScaleServiceServer;
use tokio::sync::{mpsc, watch};

/// Meridian control plane: stores functions in etcd, pushes routing tables to agents, and (on
/// the replica elected leader) places process functions in regions.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to serve gRPC on (API, agent streams, health, reflection).
    #[arg(long, env = "MERIDIAN_LISTEN", default_value = "127.0.0.1:7000")]
    listen: std::net::SocketAddr,
    /// etcd client URLs, comma separated.
    #[arg(
        long,
        env = "MERIDIAN_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    etcd_endpoints: Vec<String>,
    /// Prefix of every key Meridian writes in etcd.
    #[arg(long, env = "MERIDIAN_KEY_PREFIX", default_value = "/meridian/v1/")]
    key_prefix: String,
    /// Name of this replica, shown in `meridianctl get agents` (default: cp-<listen port>).
    #[arg(long, env = "MERIDIAN_REPLICA_ID")]
    replica_id: Option<String>,
    /// Seconds an agent's records outlive its stream.
    #[arg(long, env = "MERIDIAN_AGENT_LEASE_TTL", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    agent_lease_ttl: u64,
    /// Seconds a region that is placed must be without agents, as seen by the scheduler leader
    /// while it reaches etcd, before its instances are unplaced; at least twice
    /// --agent-lease-ttl. A leader that comes back after losing etcd, or a new leader, waits
    /// this long before it concludes that a region is gone.
    #[arg(long, env = "MERIDIAN_REGION_GRACE", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    region_grace: u64,
    /// Milliseconds to wait for more changes before pushing a burst of them.
    #[arg(long, env = "MERIDIAN_COALESCE_MS", default_value_t = 10)]
    coalesce_ms: u64,
    /// Seconds between heartbeats on idle agent streams.
    #[arg(long, env = "MERIDIAN_HEARTBEAT_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    heartbeat_secs: u64,
    /// Seconds the scheduler leader's election key outlives a leader that stopped renewing it
    /// (renewed every third of it); a replica stopped cleanly resigns at once.
    #[arg(long, env = "MERIDIAN_LEADER_LEASE_TTL", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    leader_lease_ttl: u64,
    /// Address of the admin listener (HTTP: /metrics in Prometheus text, /ready), or `none`
    /// [default: 127.0.0.1:7090; if that is taken, e.g. by another replica on the host, the
    /// replica runs without one and says so].
    #[arg(long, env = "MERIDIAN_ADMIN")]
    admin: Option<String>,
    /// Largest function spec accepted, in encoded bytes (etcd refuses requests over 1.5 MiB).
    #[arg(long, env = "MERIDIAN_MAX_SPEC_BYTES", default_value_t = 256 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..=1024 * 1024))]
    max_spec_bytes: u64,
    /// Largest total of a process function's args, in bytes.
    #[arg(long, env = "MERIDIAN_MAX_ARGS_BYTES", default_value_t = 64 * 1024)]
    max_args_bytes: usize,
    /// Largest total of a process function's env names and values, in bytes.
    #[arg(long, env = "MERIDIAN_MAX_ENV_BYTES", default_value_t = 64 * 1024)]
    max_env_bytes: usize,
    /// Most labels on one function.
    #[arg(long, env = "MERIDIAN_MAX_LABELS", default_value_t = 64)]
    max_labels: usize,
    /// Longest URL of an external function, in bytes.
    #[arg(long, env = "MERIDIAN_MAX_URL_BYTES", default_value_t = 2048)]
    max_url_bytes: usize,
    /// Most functions one namespace may hold.
    #[arg(
        long,
        env = "MERIDIAN_MAX_FUNCTIONS_PER_NAMESPACE",
        default_value_t = 10_000
    )]
    max_functions_per_namespace: usize,
}

/// The largest gRPC message this server decodes: a spec at `--max-spec-bytes` (at most 1 MiB)
/// fits with room to spare, so an oversized spec is answered with the field and the limit
/// rather than a transport error. Agent messages are reports, far smaller.
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// The largest message it sends: answers are paged and table updates come in parts well under
/// this, so reaching it would be a bug, reported as an error rather than sent.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// Concurrent streams per HTTP/2 connection: an agent needs one, the CLI a few; a client
/// opening thousands is refused streams rather than served them all.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// Requests served at once per connection, beyond which they wait.
const CONCURRENCY_PER_CONNECTION: usize = 256;

/// Sets a generated service's message-size limits explicitly (tonic's defaults are 4 MiB in
/// and unlimited out).
macro_rules! limited {
    ($service:expr) => {
        $service
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_RESPONSE_BYTES)
    };
}

/// What the binary does instead of serving.
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Writes a new mesh CA into DIR: the trust bundle (ca.pem), an issuer (issuer.pem,
    /// issuer-key.pem) and a first admin credential (admin.pem, admin-key.pem). Keys are 0600;
    /// nothing that exists is overwritten. The trust anchor's own key is never written.
    Bootstrap {
        /// The mesh's trust domain: the authority of every identity (spiffe://DOMAIN/...).
        #[arg(long, default_value = "meridian.local")]
        trust_domain: String,
        /// Where to write the files (created 0700 if missing).
        #[arg(long)]
        dir: std::path::PathBuf,
        /// Lifetime of the admin credential (s, m, h or d).
        #[arg(long, default_value = "90d", value_parser = meridian_identity::ttl::parse)]
        admin_ttl: Duration,
    },
}

/// Writes a fresh CA and admin credential, and says what it wrote (never a key's contents).
fn bootstrap(trust_domain: &str, dir: &std::path::Path, admin_ttl: Duration) -> anyhow::Result<()> {
    let domain = meridian_identity::TrustDomain::new(trust_domain).context("--trust-domain")?;
    let set = meridian_identity::bootstrap(&domain, admin_ttl, std::time::SystemTime::now())
        .context("cannot make the CA")?;
    let written = meridian_identity::files::write_bootstrap(dir, &set)?;
    println!("wrote a CA for trust domain {domain}:");
    for path in written {
        println!("  {}", path.display());
    }
    Ok(())
}

/// The admin listener's address when `--admin` is not given.
const DEFAULT_ADMIN: &str = "127.0.0.1:7090";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    meridian_common::telemetry::init("info");
    let result = run().await;
    // The last spans are exported before the process ends, whether it failed or not.
    meridian_common::telemetry::shutdown();
    result
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::Bootstrap {
        trust_domain,
        dir,
        admin_ttl,
    }) = &args.command
    {
        return bootstrap(trust_domain, dir, *admin_ttl);
    }
    let replica_id = args
        .replica_id
        .clone()
        .unwrap_or_else(|| format!("cp-{}", args.listen.port()));
    meridian_common::names::validate_dns_label(&replica_id)
        .map_err(|e| anyhow::anyhow!("--replica-id {replica_id:?} {e}"))?;
    if !args.key_prefix.starts_with('/') {
        anyhow::bail!("--key-prefix {:?} must start with '/'", args.key_prefix);
    }
    let admin_address = admin::parse_address(args.admin.as_deref().unwrap_or(DEFAULT_ADMIN))
        .context("invalid --admin")?;
    // Shorter, and an agent whose stream merely moved between replicas could be unplaced.
    if args.region_grace < args.agent_lease_ttl.saturating_mul(2) {
        anyhow::bail!(
            "--region-grace {} s must be at least twice --agent-lease-ttl ({} s)",
            args.region_grace,
            args.agent_lease_ttl
        );
    }

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let admin_listener = match admin_address {
        Some(address) => match tokio::net::TcpListener::bind(address).await {
            Ok(listener) => Some(listener),
            // Only the default may be skipped: a second replica on the host must not fail to
            // start for want of metrics, but an address the operator gave must work.
            Err(error) if args.admin.is_none() => {
                tracing::warn!(%error, "cannot listen on the default admin address {address}; running without /metrics and /ready (give --admin)");
                None
            }
            Err(error) => {
                return Err(error).with_context(|| format!("cannot listen on --admin {address}"))
            }
        },
        None => None,
    };
    let store = Store::connect(
        &args.etcd_endpoints,
        &args.key_prefix,
        Duration::from_secs(3),
    )
    .await
    .with_context(|| format!("cannot set up etcd client for {:?}", args.etcd_endpoints))?;

    let limits = SpecLimits {
        spec_bytes: usize::try_from(args.max_spec_bytes).unwrap_or(usize::MAX),
        args_bytes: args.max_args_bytes,
        env_bytes: args.max_env_bytes,
        labels: args.max_labels,
        url_bytes: args.max_url_bytes,
        functions_per_namespace: args.max_functions_per_namespace,
    };
    let (tables_tx, tables_rx) = watch::channel(Arc::new(Tables::default()));
    let (skipped_tx, skipped_rx) = watch::channel(Arc::new(Vec::new()));
    let (ready_tx, mut ready_rx) = watch::channel(false);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (status_tx, status_rx) = mpsc::channel(65_536);
    let (lease_tx, lease_rx) = watch::channel(None);
    // The registration lives on the replica lease: `replicas/<id>` is there while this
    // replica holds agents' records, and goes with it.
    let registration = meridian_proto::v1::ReplicaInfo {
        replica_id: replica_id.clone(),
        address: args.listen.to_string(),
        started_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        leader: false,
    };
    tokio::spawn(push::run_registered_replica_lease(
        store.clone(),
        Duration::from_secs(args.agent_lease_ttl),
        lease_tx,
        Some(registration),
    ));

    let metrics = Metrics::new();
    // Decided once: with export off no span is made and no change trace is written to etcd.
    let tracing = Tracing::when_enabled(&replica_id).map(Arc::new);
    let (views_tx, views_rx) = watch::channel(Arc::new(SchedulerView::default()));
    tokio::spawn(cache::run(
        store.clone(),
        CacheConfig {
            coalesce: Duration::from_millis(args.coalesce_ms),
            coalesce_max: Duration::from_millis(args.coalesce_ms.saturating_mul(10).max(50)),
        },
        cache::Outputs {
            tables: tables_tx,
            views: views_tx,
            ready: ready_tx,
            metrics: Some(Arc::clone(&metrics)),
            skipped: Some(skipped_tx),
        },
    ));
    tokio::spawn(push::run_status_writer(
        store.clone(),
        status_rx,
        Duration::from_millis(100),
    ));
    let election_state = ElectionState::new();
    let election = tokio::spawn(election::run(
        store.clone(),
        ElectionConfig {
            replica_id: replica_id.clone(),
            lease_ttl: Duration::from_secs(args.leader_lease_ttl),
            scheduler: SchedulerConfig::new(replica_id.clone())
                .with_tracing(tracing.clone())
                .with_region_grace(Duration::from_secs(args.region_grace)),
        },
        views_rx,
        shutdown_rx.clone(),
        Arc::clone(&election_state),
    ));
    if let Some(listener) = admin_listener {
        let mut registry = metrics::registry(
            Arc::clone(&metrics),
            tables_rx.clone(),
            Arc::clone(&election_state),
        );
        metrics::register_skipped(&mut registry, skipped_rx.clone());
        let admin = Arc::new(admin::new(registry, ready_rx.clone()));
        if let Ok(address) = listener.local_addr() {
            tracing::info!("admin listening on {address}");
        }
        let mut stopped = shutdown_rx.clone();
        tokio::spawn(admin::serve(listener, admin, async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }));
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    {
        let health = health.clone();
        tokio::spawn(async move {
            if ready_rx.wait_for(|ready| *ready).await.is_ok() {
                health
                    .set_service_status("", tonic_health::ServingStatus::Serving)
                    .await;
                health
                    .set_serving::<FunctionServiceServer<FunctionApi>>()
                    .await;
                health.set_serving::<MeshServiceServer<MeshApi>>().await;
                health.set_serving::<ScaleServiceServer<ScaleApi>>().await;
                health.set_serving::<AgentServiceServer<AgentPush>>().await;
                health
                    .set_serving::<ControlPlaneServiceServer<ControlPlaneApi>>()
                    .await;
            }
        });
    }

    // Both reflection versions: grpcurl still speaks v1alpha. The descriptor set also holds the
    // agent's local API, which this server does not serve, so the services are listed by name.
    let reflection = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(meridian_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        for service in [
            "meridian.v1.FunctionService",
            "meridian.v1.MeshService",
            "meridian.v1.ScaleService",
            "meridian.v1.AgentService",
            "meridian.v1.ControlPlaneService",
            "grpc.health.v1.Health",
        ] {
            builder = builder.with_service_name(service);
        }
        builder
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let push = AgentPush::new(
        store.clone(),
        tables_rx.clone(),
        PushConfig {
            replica_id: replica_id.clone(),
            lease_ttl: Duration::from_secs(args.agent_lease_ttl),
            heartbeat_interval: Duration::from_secs(args.heartbeat_secs),
            silence_timeout: Duration::from_secs(args.heartbeat_secs * 3),
            ..PushConfig::default()
        },
        status_tx,
        lease_rx,
        shutdown_rx,
    )
    .with_metrics(metrics)
    .with_tracing(tracing.clone());

    tracing::info!(replica = %replica_id, "listening on {}", args.listen);
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .concurrency_limit_per_connection(CONCURRENCY_PER_CONNECTION)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(limited!(FunctionServiceServer::new(
            FunctionApi::new(store.clone())
                .with_tracing(tracing)
                .with_limits(limits),
        )))
        .add_service(limited!(MeshServiceServer::new(MeshApi::new(
            store.clone(),
            tables_rx,
        ))))
        .add_service(limited!(ScaleServiceServer::new(ScaleApi::new(
            store.clone()
        ))))
        .add_service(limited!(ControlPlaneServiceServer::new(
            ControlPlaneApi::new(store.clone()).with_skipped(skipped_rx),
        )))
        .add_service(limited!(AgentServiceServer::new(push)))
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY a small push can wait ~40 ms on the agent's delayed ACK.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                meridian_common::shutdown::signal().await;
                // End agent streams so that the server's graceful shutdown can complete.
                let _ = shutdown_tx.send(true);
            },
        )
        .await
        .context("gRPC server failed")?;
    // Resigning lets another replica lead at once; it needs etcd, so it is bounded.
    if tokio::time::timeout(Duration::from_secs(5), election)
        .await
        .is_err()
    {
        tracing::warn!("gave up resigning from the scheduler election; the lease will expire");
    }
    // Leave the replica list at once rather than a lease TTL later (the agents' records stay:
    // they re-register elsewhere within the TTL).
    match tokio::time::timeout(
        Duration::from_secs(2),
        store.deregister_replica(&replica_id),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::warn!(%error, "cannot deregister this replica; its lease will expire")
        }
        Err(_) => tracing::warn!("gave up deregistering this replica; its lease will expire"),
    }
    tracing::info!("stopped");
    Ok(())
}
