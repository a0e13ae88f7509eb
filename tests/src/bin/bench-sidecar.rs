//! `bench-sidecar`: what one Meridian sidecar adds to a request, next to HAProxy doing the same
//! job, on loopback with the same backend and the same load generator.
//!
//! One run measures three paths to one backend (a minimal hyper HTTP/1.1 server in this process):
//! - **direct**: wrk -> backend;
//! - **sidecar**: wrk -> `meridian-sidecar` outbound listener (`Host: bench`) -> backend, the
//!   sidecar fed by a stand-in agent (a `LocalRoutingService` in this process) with a table of
//!   `--functions` functions (default 1,000), one of which is `bench`;
//! - **haproxy**: wrk -> HAProxy 2.6 (`nbthread 1`, HTTP mode, keep-alive both sides, the same
//!   Host routing and the same added response header) -> backend.
//!
//! For each path it prints:
//! - p50/p99 latency from `wrk -t1 -c1 --latency`: one connection, one request in flight, so
//!   the rate is fixed by the path itself and nothing queues (wrk2, which holds a fixed request
//!   rate and corrects for coordinated omission, is not packaged here; with one request in
//!   flight there is no queue to omit). "Added" is the proxy's figure minus direct's.
//! - max throughput: `wrk -t1 -c<connections>` with the proxy pinned to CPU 1 (`taskset`), wrk
//!   and the backend on CPU 0; the proxy's CPU use during the run says whether it was the
//!   bottleneck.
//! - CPU per request: the proxy's user+system CPU time (`/proc/<pid>/stat`) over the throughput
//!   run divided by the requests wrk completed.
//! - memory: the sidecar's RSS with the table loaded before any traffic, and its peak (VmHWM)
//!   after the runs; HAProxy's for comparison.
//!
//! With `--tracing` it measures, instead of HAProxy, what OpenTelemetry tracing costs the
//! sidecar: the same sidecar path with tracing off (no `OTEL_*` variable), at 1% and at 100%
//! sampling (`parentbased_traceidratio`; wrk sends no `traceparent`, so every request is a root
//! and the ratio decides). Spans go over OTLP/gRPC to a counting collector in this process (on
//! CPU 0 with wrk), which reports how many arrived.
//!
//! Usage: bench-sidecar [--duration SECS] [--connections N] [--functions N] [--skip-haproxy]
//! [--tracing] (deploy/bench/sidecar.sh installs wrk and haproxy, builds in release mode and
//! runs this).

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use clap::Parser;
use futures::Stream;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use meridian_proto::v1 as pb;
use meridian_tests::sidecar::{proc_cpu_time, proc_status_kib};
use meridian_tests::{free_port, Process};
use nix::sys::signal::Signal;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use pb::local_routing_service_server::{LocalRoutingService, LocalRoutingServiceServer};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

const REGION: &str = "us-east";

/// A count of at least 1.
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

/// What one hop through the sidecar costs, next to HAProxy (or, with --tracing, with tracing off,
/// at 1% and at 100% sampling).
#[derive(Debug, Parser)]
#[command(name = "bench-sidecar")]
struct Options {
    /// Seconds of each latency and throughput run.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    duration: u64,
    /// wrk connections of the throughput runs.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,
    /// Functions in the sidecar's table.
    #[arg(long, default_value_t = 1000, value_parser = at_least_one())]
    functions: usize,
    /// Leave HAProxy out.
    #[arg(long)]
    skip_haproxy: bool,
    /// Measure tracing's cost instead of HAProxy's figures.
    #[arg(long)]
    tracing: bool,
    /// Count the sidecar's instructions per request under valgrind (callgrind): exact and
    /// repeatable whatever else the machine does, where CPU time on a shared machine is not.
    /// With --tracing, in each tracing mode after the wall-clock runs; alone, only that count for
    /// the plain sidecar (no wrk runs, so wrk need not be installed).
    #[arg(long)]
    instructions: bool,
    /// Normal-request latency under attack instead: one request at a time for --duration
    /// seconds, without an attack and then under 500 slowloris and 500 idle connections that
    /// reconnect as the sidecar closes them (header-read timeout 2 s, idle 3 s, so that the
    /// attack churns during the run). No wrk needed.
    #[arg(long, conflicts_with_all = ["tracing", "instructions"])]
    attack: bool,
}

fn main() -> Result<()> {
    let options = Options::parse();
    ensure!(
        std::thread::available_parallelism().map_or(1, usize::from) >= 2,
        "needs 2 CPUs: the proxy gets CPU 1, wrk and the backend CPU 0"
    );
    let tools: &[&str] = if options.attack {
        &["taskset"]
    } else if options.instructions && !options.tracing {
        &["valgrind", "taskset"]
    } else {
        &["wrk", "taskset"]
    };
    for &tool in tools {
        ensure!(
            which(tool).is_some(),
            "{tool} is not installed (deploy/bench/sidecar.sh installs it)"
        );
    }
    if !options.skip_haproxy && !options.tracing && !options.instructions && !options.attack {
        ensure!(
            which("haproxy").is_some(),
            "haproxy is not installed (deploy/bench/sidecar.sh installs it; or --skip-haproxy)"
        );
    }
    // This process (the backend, the stand-in agent) and wrk share CPU 0; the proxy gets CPU 1.
    run_quiet(
        "taskset",
        &["-a", "-cp", "0", &std::process::id().to_string()],
    )?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench(options))
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

fn run_quiet(program: &str, args: &[&str]) -> Result<()> {
    let status = std::process::Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("running {program}"))?;
    ensure!(status.success(), "{program} {args:?} failed: {status}");
    Ok(())
}

/// The backend: answers every request 200 with a small body, HTTP/1.1 keep-alive.
async fn backend(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_request| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                    Bytes::from_static(b"hello from the bench backend\n"),
                )))
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A stand-in agent: serves one fixed table, forever.
#[derive(Clone)]
struct FixedAgent {
    table: pb::RoutingTable,
}

#[tonic::async_trait]
impl LocalRoutingService for FixedAgent {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::RoutingUpdate, Status>> + Send>>;

    async fn watch(
        &self,
        _request: Request<pb::WatchRoutesRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let parts = meridian_proto::updates::split(
            meridian_proto::updates::full(&self.table),
            meridian_proto::updates::LOCAL_PART_LIMITS,
        );
        let first = futures::stream::iter(parts.into_iter().map(Ok));
        // Then nothing, without ending: the table never changes.
        let rest = futures::stream::pending();
        Ok(Response::new(Box::pin(futures::StreamExt::chain(
            first, rest,
        ))))
    }

    async fn get(
        &self,
        _request: Request<pb::GetRoutesRequest>,
    ) -> Result<Response<pb::RoutingTablePage>, Status> {
        Ok(Response::new(pb::RoutingTablePage {
            table: Some(self.table.clone()),
            next_page_token: String::new(),
        }))
    }

    async fn report_table(
        &self,
        request: Request<pb::TableReport>,
    ) -> Result<Response<pb::TableReportResponse>, Status> {
        let report = request.into_inner();
        if !report.accepted {
            eprintln!("the sidecar refused the bench table: {}", report.reason);
        }
        Ok(Response::new(pb::TableReportResponse {}))
    }
}

/// `functions` functions like the control plane would send a us-east agent: `bench` (local tier
/// only: the backend), and others with two local instances and the two other regions' gateways
/// as remote tiers (ordered by measured round trip).
fn bench_table(
    functions: usize,
    backend: SocketAddr,
    gateways: [SocketAddr; 2],
) -> pb::RoutingTable {
    let endpoint = |address: String, id: String| pb::Endpoint {
        address,
        id,
        state: pb::EndpointState::Ready as i32,
        zone: format!("{REGION}-a"),
    };
    let mut routes = vec![pb::FunctionRoute {
        cold_start_ms: Default::default(),
        local_failed_starts: Default::default(),
        local_restart_backoff: Default::default(),
        namespace: "default".to_string(),
        name: "bench".to_string(),
        function_version: 1,
        policy: Some(pb::RoutingPolicy::default()),
        tiers: vec![pb::Tier {
            region: REGION.to_string(),
            local: true,
            endpoints: vec![endpoint(backend.to_string(), "bench-1".to_string())],
            order: pb::TierOrder::Local as i32,
            ready_instances: 1,
        }],
        workload: None,
    }];
    for n in 1..functions {
        let local = pb::Tier {
            region: REGION.to_string(),
            local: true,
            endpoints: (0..2)
                .map(|i| {
                    endpoint(
                        format!("127.0.1.1:{}", 40000 + (n * 2 + i) % 20000),
                        format!("ext-{n:08x}{i:08x}"),
                    )
                })
                .collect(),
            order: pb::TierOrder::Local as i32,
            ready_instances: 2,
        };
        let remote = |region: &str, gateway: SocketAddr| pb::Tier {
            region: region.to_string(),
            local: false,
            endpoints: vec![endpoint(gateway.to_string(), format!("{region}-1"))],
            order: pb::TierOrder::Measured as i32,
            ready_instances: 2,
        };
        routes.push(pb::FunctionRoute {
            cold_start_ms: Default::default(),
            local_failed_starts: Default::default(),
            local_restart_backoff: Default::default(),
            namespace: "default".to_string(),
            name: format!("fn-{n:04}"),
            function_version: i64::try_from(n).unwrap_or(i64::MAX),
            policy: Some(pb::RoutingPolicy::default()),
            tiers: vec![
                local,
                remote("eu-west", gateways[0]),
                remote("ap-south", gateways[1]),
            ],
            workload: None,
        });
    }
    routes.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    pb::RoutingTable {
        local_generation: Default::default(),
        version: 1,
        region: REGION.to_string(),
        functions: routes,
    }
}

/// What wrk printed, parsed.
#[derive(Debug, Default)]
struct WrkResult {
    p50: Duration,
    p99: Duration,
    requests: u64,
    rps: f64,
    errors: String,
}

fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let micros = match unit {
        "us" => number,
        "ms" => number * 1e3,
        "s" => number * 1e6,
        "m" => number * 60e6,
        _ => return None,
    };
    Some(Duration::from_nanos((micros * 1e3) as u64))
}

fn parse_wrk(output: &str) -> Result<WrkResult> {
    let mut result = WrkResult::default();
    for line in output.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", d] => result.p50 = parse_duration(d).context("50% line")?,
            ["99%", d] => result.p99 = parse_duration(d).context("99% line")?,
            [n, "requests", "in", ..] => result.requests = n.parse().context("requests line")?,
            ["Requests/sec:", r] => result.rps = r.parse().context("Requests/sec line")?,
            ["Non-2xx" | "Socket", ..] => {
                let _ = writeln!(result.errors, "{}", line.trim());
            }
            _ => {}
        }
    }
    ensure!(result.requests > 0, "wrk completed no request:\n{output}");
    Ok(result)
}

/// Runs wrk pinned to CPU 0 against `url` with `Host: bench`.
async fn wrk(url: &str, connections: u32, seconds: u64, latency: bool) -> Result<WrkResult> {
    let mut cmd = tokio::process::Command::new("taskset");
    cmd.args(["-c", "0", "wrk", "-t1"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .args(["-H", "Host: bench"]);
    if latency {
        cmd.arg("--latency");
    }
    cmd.arg(url).stdin(Stdio::null()).kill_on_drop(true);
    let output = cmd.output().await.context("running wrk")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    ensure!(
        output.status.success(),
        "wrk failed ({}): {text}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    parse_wrk(&text)
}

/// One path's figures.
#[derive(Debug, Default)]
struct Figures {
    name: &'static str,
    p50: Duration,
    p99: Duration,
    max_rps: f64,
    cpu_per_request: Option<Duration>,
    cpu_busy: Option<f64>,
    rss_idle_kib: Option<u64>,
    rss_peak_kib: Option<u64>,
    /// Every request wrk completed on this path: warm-up, latency and throughput runs.
    requests: u64,
    errors: String,
}

/// Latency run, then throughput run; CPU of `pid` (the proxy) over the throughput run.
async fn measure(
    name: &'static str,
    url: &str,
    pid: Option<u32>,
    options: &Options,
) -> Result<Figures> {
    eprintln!("{name}: warming up");
    let warmup = wrk(url, options.connections, 2, false).await?;
    eprintln!("{name}: latency, 1 connection, {} s", options.duration);
    let latency = wrk(url, 1, options.duration, true).await?;
    let rss_idle_kib = pid.map(|p| proc_status_kib(p, "VmRSS")).transpose()?;
    eprintln!(
        "{name}: throughput, {} connections, {} s",
        options.connections, options.duration
    );
    let cpu_before = pid.map(proc_cpu_time).transpose()?;
    let started = Instant::now();
    let throughput = wrk(url, options.connections, options.duration, false).await?;
    let wall = started.elapsed();
    let cpu = match (pid, cpu_before) {
        (Some(p), Some(before)) => Some(proc_cpu_time(p)?.saturating_sub(before)),
        _ => None,
    };
    Ok(Figures {
        name,
        p50: latency.p50,
        p99: latency.p99,
        max_rps: throughput.rps,
        cpu_per_request: cpu.map(|c| c / u32::try_from(throughput.requests).unwrap_or(u32::MAX)),
        cpu_busy: cpu.map(|c| c.as_secs_f64() / wall.as_secs_f64()),
        rss_idle_kib,
        rss_peak_kib: pid.map(|p| proc_status_kib(p, "VmHWM")).transpose()?,
        requests: warmup.requests + latency.requests + throughput.requests,
        errors: format!("{}{}", latency.errors, throughput.errors),
    })
}

fn haproxy_config(listen: SocketAddr, backend: SocketAddr) -> String {
    format!(
        "# What the sidecar does on this path: route by Host, keep-alive both sides, add the
# region header; one thread (the sidecar gets one CPU too).
global
    nbthread 1
    maxconn 4000

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
    http-reuse always

frontend outbound
    bind {listen}
    acl bench hdr(host) -i bench
    http-request return status 404 unless bench
    use_backend bench if bench

backend bench
    http-response set-header meridian-region {REGION}
    server b1 {backend}
"
    )
}

async fn wait_http(addr: SocketAddr, host: &str, what: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let client = meridian_tests::http::MeshClient::http1(addr);
        match client.get(host, "/").await {
            Ok(reply) if reply.status.is_success() => return Ok(()),
            Ok(reply) if Instant::now() >= deadline => {
                bail!("{what} answers {}", reply.describe())
            }
            Err(e) if Instant::now() >= deadline => return Err(e.context(what.to_string())),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn micros(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn added(proxy: Duration, direct: Duration) -> String {
    let delta = proxy.as_secs_f64() - direct.as_secs_f64();
    format!("{:+.0} µs", delta * 1e6)
}

async fn bench(options: Options) -> Result<()> {
    let ip = Ipv4Addr::LOCALHOST;
    let backend_listener = TcpListener::bind((ip, free_port(ip)?)).await?;
    let backend_addr = backend_listener.local_addr()?;
    tokio::spawn(backend(backend_listener));

    // The stand-in agent with the table; the gateways of the remote tiers are the backend too
    // (it answers the sidecar's probes), so that every tier looks healthy.
    let table = bench_table(
        options.functions,
        backend_addr,
        [backend_addr, backend_addr],
    );
    let agent_listener = TcpListener::bind((ip, free_port(ip)?)).await?;
    let agent_addr = agent_listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(LocalRoutingServiceServer::new(FixedAgent { table }))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(agent_listener)),
    );

    if options.attack {
        return bench_attack(&options, agent_addr).await;
    }
    if options.instructions && !options.tracing {
        let per_request = instructions_per_request(&options, agent_addr, &[]).await?;
        println!(
            "instructions per request (callgrind, the whole sidecar process: the difference of the \
             totals after {} and {} requests, one in flight, divided by the difference): {per_request:.0}",
            INSTRUCTION_RUNS[0], INSTRUCTION_RUNS[1]
        );
        return Ok(());
    }
    let mut results = Vec::new();
    results.push(measure("direct", &format!("http://{backend_addr}/"), None, &options).await?);
    if options.tracing {
        return bench_tracing(&options, agent_addr, results).await;
    }
    let mut sidecar = Sidecar::start(agent_addr, &[], &options, Launch::Pinned).await?;
    let sidecar_table_rss = proc_status_kib(sidecar.pid, "VmRSS")?;
    results.push(
        measure(
            "meridian-sidecar",
            &format!("http://{}/", sidecar.outbound),
            Some(sidecar.pid),
            &options,
        )
        .await?,
    );
    sidecar.check_alive()?;
    let mut haproxy_version = String::new();
    if !options.skip_haproxy {
        let version = std::process::Command::new("haproxy").arg("-v").output()?;
        haproxy_version = String::from_utf8_lossy(&version.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        let listen = SocketAddr::from((ip, free_port(ip)?));
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("haproxy.cfg");
        std::fs::write(&config, haproxy_config(listen, backend_addr))?;
        let haproxy = Process::spawn(
            "haproxy",
            &PathBuf::from("taskset"),
            vec![
                "-c".into(),
                "1".into(),
                "haproxy".into(),
                "-db".into(),
                "-f".into(),
                config.into_os_string(),
            ],
        )?;
        wait_http(listen, "bench", "haproxy (Host: bench)", STARTUP).await?;
        let pid = haproxy.pid().context("haproxy exited")?;
        results.push(measure("haproxy", &format!("http://{listen}/"), Some(pid), &options).await?);
        drop(haproxy);
    }
    drop(sidecar);

    print_report(&options, &results, sidecar_table_rss, &haproxy_version);
    Ok(())
}

/// A `meridian-sidecar` on CPU 1, fed by the stand-in agent, with its table loaded.
struct Sidecar {
    process: Process,
    pid: u32,
    outbound: SocketAddr,
}

/// How the sidecar process is started.
#[derive(Debug, Clone)]
enum Launch {
    /// On CPU 1 (`taskset`), for wall-clock figures.
    Pinned,
    /// Under `valgrind --tool=callgrind` writing to this file, for instruction counts.
    Callgrind(PathBuf),
}

/// How long a sidecar may take to serve its table; valgrind runs it about 50 times slower.
const STARTUP: Duration = Duration::from_secs(15);
const STARTUP_UNDER_VALGRIND: Duration = Duration::from_secs(180);

impl Sidecar {
    async fn start(
        agent: SocketAddr,
        env: &[(&str, String)],
        options: &Options,
        launch: Launch,
    ) -> Result<Sidecar> {
        let ip = Ipv4Addr::LOCALHOST;
        let outbound = SocketAddr::from((ip, free_port(ip)?));
        let gateway = SocketAddr::from((ip, free_port(ip)?));
        let admin = SocketAddr::from((ip, free_port(ip)?));
        // The sidecar built with this binary's profile (release from deploy/bench/sidecar.sh).
        let sidecar_bin = std::env::current_exe()?
            .parent()
            .context("the benchmark binary has no directory")?
            .join("meridian-sidecar");
        ensure!(
            sidecar_bin.is_file(),
            "{} does not exist: cargo build --release -p meridian-sidecar",
            sidecar_bin.display()
        );
        // Per-request logging would measure the terminal, not the proxy.
        let mut env_all = vec![("RUST_LOG", "warn".to_string())];
        env_all.extend(env.iter().cloned());
        let (launcher, mut args, startup): (&str, Vec<std::ffi::OsString>, Duration) = match &launch
        {
            Launch::Pinned => ("taskset", vec!["-c".into(), "1".into()], STARTUP),
            Launch::Callgrind(out) => {
                let mut out_flag = std::ffi::OsString::from("--callgrind-out-file=");
                out_flag.push(out);
                (
                    "valgrind",
                    vec!["--tool=callgrind".into(), out_flag],
                    STARTUP_UNDER_VALGRIND,
                )
            }
        };
        args.extend([
            sidecar_bin.into_os_string(),
            "--region".into(),
            REGION.into(),
            "--agent".into(),
            format!("http://{agent}").into(),
            "--outbound".into(),
            outbound.to_string().into(),
            "--gateway".into(),
            gateway.to_string().into(),
            "--admin".into(),
            admin.to_string().into(),
        ]);
        let process = Process::spawn_with_env("sidecar", &PathBuf::from(launcher), args, &env_all)?;
        wait_http(outbound, "bench", "the sidecar (Host: bench)", startup).await?;
        let pid = process.pid().context("the sidecar exited")?;
        let routes = meridian_tests::http::MeshClient::http1(admin)
            .get(&admin.to_string(), "/routes")
            .await?;
        let loaded: serde_json::Value = serde_json::from_slice(&routes.body)?;
        let function_count = loaded["functions"].as_array().map_or(0, Vec::len);
        ensure!(
            function_count == options.functions,
            "the sidecar holds {function_count} functions, expected {}",
            options.functions
        );
        Ok(Sidecar {
            process,
            pid,
            outbound,
        })
    }

    /// SIGTERM, then waits for the exit: a graceful stop flushes the batch span exporter, so
    /// the spans counted afterwards are all that arrived.
    async fn stop(&mut self) -> Result<()> {
        self.stop_within(Duration::from_secs(15)).await
    }

    async fn stop_within(&mut self, within: Duration) -> Result<()> {
        self.process.signal(Signal::SIGTERM)?;
        let deadline = Instant::now() + within;
        while self.process.try_exit().is_none() {
            ensure!(
                Instant::now() < deadline,
                "the sidecar did not exit within {within:?} of SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn check_alive(&mut self) -> Result<()> {
        ensure!(
            self.process.is_running(),
            "the sidecar died during the benchmark:\n{}",
            self.process.log_tail(40)
        );
        Ok(())
    }
}

/// An OTLP/gRPC trace collector that counts the spans it is sent and keeps nothing.
#[derive(Clone, Default)]
struct CountingCollector {
    spans: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for CountingCollector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let count: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(count as u64, Ordering::Relaxed);
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The three tracing settings measured, with the environment each sidecar gets.
type Mode = (&'static str, Vec<(&'static str, String)>);

fn modes(collector: SocketAddr) -> [Mode; 3] {
    let traced = |ratio: &str| {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}")),
            (
                "OTEL_TRACES_SAMPLER",
                "parentbased_traceidratio".to_string(),
            ),
            ("OTEL_TRACES_SAMPLER_ARG", ratio.to_string()),
            ("OTEL_SERVICE_NAME", "bench-sidecar".to_string()),
        ]
    };
    [
        ("tracing off", Vec::new()),
        ("sampled 1%", traced("0.01")),
        ("sampled 100%", traced("1.0")),
    ]
}

/// The sidecar with tracing off, at 1% and at 100% sampling, each a fresh process.
async fn bench_tracing(
    options: &Options,
    agent: SocketAddr,
    mut results: Vec<Figures>,
) -> Result<()> {
    let ip = Ipv4Addr::LOCALHOST;
    let collector = CountingCollector::default();
    let collector_listener = TcpListener::bind((ip, free_port(ip)?)).await?;
    let collector_addr = collector_listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(
                collector_listener,
            )),
    );
    let mut spans = Vec::new();
    for (name, env) in modes(collector_addr) {
        let mut sidecar = Sidecar::start(agent, &env, options, Launch::Pinned).await?;
        let before = collector.spans.load(Ordering::Relaxed);
        results.push(
            measure(
                name,
                &format!("http://{}/", sidecar.outbound),
                Some(sidecar.pid),
                options,
            )
            .await?,
        );
        sidecar.check_alive()?;
        sidecar.stop().await?;
        spans.push(collector.spans.load(Ordering::Relaxed) - before);
    }
    print_tracing_report(options, &results, &spans);
    if options.instructions {
        println!();
        println!(
            "instructions per request (callgrind, the whole sidecar process: the difference of the \
             totals after {} and {} requests, one in flight, divided by the difference):",
            INSTRUCTION_RUNS[0], INSTRUCTION_RUNS[1]
        );
        println!();
        println!("| sidecar | instructions per request | vs off |");
        println!("|---|---|---|");
        let mut off = None;
        for (name, env) in modes(collector_addr) {
            let per_request = instructions_per_request(options, agent, &env).await?;
            let base = *off.get_or_insert(per_request);
            println!(
                "| {name} | {per_request:.0} | {:+.0} ({:+.1}%) |",
                per_request - base,
                (per_request / base - 1.0) * 100.0
            );
        }
    }
    Ok(())
}

/// Requests sent in the two runs whose difference gives instructions per request (start-up,
/// table load and shutdown cancel out).
const INSTRUCTION_RUNS: [u64; 2] = [1000, 4000];

/// The sidecar's instructions per request with `env`, from two callgrind runs.
async fn instructions_per_request(
    options: &Options,
    agent: SocketAddr,
    env: &[(&'static str, String)],
) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let mut totals = Vec::new();
    for (index, requests) in INSTRUCTION_RUNS.iter().enumerate() {
        let out = dir.path().join(format!("callgrind.{index}"));
        let mut sidecar =
            Sidecar::start(agent, env, options, Launch::Callgrind(out.clone())).await?;
        let client = meridian_tests::http::MeshClient::http1(sidecar.outbound);
        for _ in 0..*requests {
            let reply = client.get("bench", "/").await?;
            ensure!(
                reply.status.is_success(),
                "bench answered {}",
                reply.describe()
            );
        }
        sidecar.stop_within(STARTUP_UNDER_VALGRIND).await?;
        totals.push(callgrind_total(&out)?);
    }
    let extra = INSTRUCTION_RUNS[1] - INSTRUCTION_RUNS[0];
    Ok(totals[1].saturating_sub(totals[0]) as f64 / extra as f64)
}

/// The total instruction count (`summary:` or `totals:` line) of a callgrind output file.
fn callgrind_total(path: &std::path::Path) -> Result<u64> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|line| {
            line.strip_prefix("summary:")
                .or_else(|| line.strip_prefix("totals:"))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .with_context(|| format!("no instruction total in {}", path.display()))
}

fn print_tracing_report(options: &Options, results: &[Figures], spans: &[u64]) {
    let direct = &results[0];
    let off = &results[1];
    println!();
    println!(
        "bench-sidecar --tracing: {} functions in the table, wrk -t1, latency with 1 connection, \
         throughput with {} connections, {} s each; sidecar on CPU 1, wrk, backend and OTLP \
         collector on CPU 0",
        options.functions, options.connections, options.duration
    );
    println!();
    println!(
        "| sidecar | p50 | p99 | added p99 (vs direct) | p99 vs off | max req/s | CPU/request | CPU/request vs off | spans received per request |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (f, spans) in results[1..].iter().zip(spans) {
        let cpu = f.cpu_per_request.unwrap_or_default();
        let cpu_off = off.cpu_per_request.unwrap_or_default();
        println!(
            "| {} | {} | {} | {} | {} | {:.0} | {:.1} µs | {:+.1} µs | {:.3} ({spans} of {}) |",
            f.name,
            micros(f.p50),
            micros(f.p99),
            added(f.p99, direct.p99),
            added(f.p99, off.p99),
            f.max_rps,
            cpu.as_secs_f64() * 1e6,
            (cpu.as_secs_f64() - cpu_off.as_secs_f64()) * 1e6,
            *spans as f64 / f.requests.max(1) as f64,
            f.requests,
        );
    }
    for f in results.iter().filter(|f| !f.errors.is_empty()) {
        println!("\n{} errors reported by wrk:\n{}", f.name, f.errors);
    }
}

fn print_report(options: &Options, results: &[Figures], table_rss_kib: u64, haproxy: &str) {
    let direct = &results[0];
    println!();
    println!(
        "bench-sidecar: {} functions in the table, wrk -t1, latency with 1 connection, throughput \
         with {} connections, {} s each; proxy on CPU 1, wrk and backend on CPU 0",
        options.functions, options.connections, options.duration
    );
    if !haproxy.is_empty() {
        println!("{haproxy}");
    }
    println!();
    println!(
        "| path | p50 | p99 | added p50 | added p99 | max req/s | proxy CPU busy | CPU/request | RSS idle | RSS peak |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for f in results {
        let (added50, added99) = if f.name == "direct" {
            ("-".to_string(), "-".to_string())
        } else {
            (added(f.p50, direct.p50), added(f.p99, direct.p99))
        };
        println!(
            "| {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {} |",
            f.name,
            micros(f.p50),
            micros(f.p99),
            added50,
            added99,
            f.max_rps,
            f.cpu_busy
                .map_or("-".to_string(), |b| format!("{:.0}%", b * 100.0)),
            f.cpu_per_request.map_or("-".to_string(), |c| format!(
                "{:.1} µs",
                c.as_secs_f64() * 1e6
            )),
            f.rss_idle_kib
                .map_or("-".to_string(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
            f.rss_peak_kib
                .map_or("-".to_string(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
        );
    }
    for f in results.iter().filter(|f| !f.errors.is_empty()) {
        println!("\n{} errors reported by wrk:\n{}", f.name, f.errors);
    }
    println!();
    println!(
        "sidecar RSS with the {}-function table loaded, before any traffic: {:.1} MiB",
        options.functions,
        table_rss_kib as f64 / 1024.0
    );
    let sidecar = results.iter().find(|f| f.name == "meridian-sidecar");
    let haproxy = results.iter().find(|f| f.name == "haproxy");
    if let (Some(s), Some(h)) = (sidecar, haproxy) {
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::INFINITY };
        let added50 = ratio(
            s.p50.as_secs_f64() - direct.p50.as_secs_f64(),
            h.p50.as_secs_f64() - direct.p50.as_secs_f64(),
        );
        let added99 = ratio(
            s.p99.as_secs_f64() - direct.p99.as_secs_f64(),
            h.p99.as_secs_f64() - direct.p99.as_secs_f64(),
        );
        let cpu = match (s.cpu_per_request, h.cpu_per_request) {
            (Some(a), Some(b)) => ratio(a.as_secs_f64(), b.as_secs_f64()),
            _ => f64::NAN,
        };
        let verdict = |x: f64, target: f64| if x <= target { "met" } else { "MISSED" };
        println!(
            "targets: added p50 x{added50:.2} of HAProxy's ({}), added p99 x{added99:.2} ({}), \
             CPU/request x{cpu:.2} ({}) [target <= 1.3]; RSS {:.1} MiB ({}) [target <= 20 MiB]",
            verdict(added50, 1.3),
            verdict(added99, 1.3),
            verdict(cpu, 1.3),
            s.rss_peak_kib.unwrap_or(table_rss_kib) as f64 / 1024.0,
            verdict(
                s.rss_peak_kib.unwrap_or(table_rss_kib) as f64 / 1024.0,
                20.0
            ),
        );
    }
}

/// Sequential `GET bench/` through `outbound` for `duration`: the latencies of the answers and
/// the number of failures.
async fn sequential(outbound: SocketAddr, duration: Duration) -> (Vec<Duration>, usize) {
    let client = meridian_tests::http::MeshClient::http1(outbound);
    let until = Instant::now() + duration;
    let (mut latencies, mut failures) = (Vec::new(), 0);
    while Instant::now() < until {
        let started = Instant::now();
        match client.get("bench", "/").await {
            Ok(reply) if reply.status.is_success() => latencies.push(started.elapsed()),
            _ => failures += 1,
        }
    }
    latencies.sort();
    (latencies, failures)
}

/// One attacker connection after another until `stop`: a slowloris (a header byte every
/// 500 ms) or an idle connection; counts the connections the sidecar closed.
async fn attacker(
    outbound: SocketAddr,
    slow: bool,
    stop: Arc<std::sync::atomic::AtomicBool>,
    closed: Arc<AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut stream) = tokio::net::TcpStream::connect(outbound).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if slow
            && stream
                .write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nx: ")
                .await
                .is_err()
        {
            continue;
        }
        let mut buf = [0u8; 256];
        while !stop.load(Ordering::Relaxed) {
            tokio::select! {
                read = stream.read(&mut buf) => {
                    if matches!(read, Ok(0) | Err(_)) {
                        closed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    if slow && stream.write_all(b"x").await.is_err() {
                        closed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
    }
}

/// Normal-request latency without and under a slowloris and idle-connection attack.
async fn bench_attack(options: &Options, agent: SocketAddr) -> Result<()> {
    let env = [
        ("MERIDIAN_HEADER_READ_TIMEOUT_MS", "2000".to_string()),
        ("MERIDIAN_IDLE_TIMEOUT_MS", "3000".to_string()),
    ];
    let mut sidecar = Sidecar::start(agent, &env, options, Launch::Pinned).await?;
    let duration = Duration::from_secs(options.duration);
    let quiet = sequential(sidecar.outbound, duration).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let closed = Arc::new(AtomicU64::new(0));
    let attackers: Vec<_> = (0..1000)
        .map(|i| {
            tokio::spawn(attacker(
                sidecar.outbound,
                i % 2 == 0,
                Arc::clone(&stop),
                Arc::clone(&closed),
            ))
        })
        .collect();
    let attacked = sequential(sidecar.outbound, duration).await;
    stop.store(true, Ordering::Relaxed);
    for task in attackers {
        task.abort();
    }
    sidecar.check_alive()?;
    sidecar.stop().await?;
    let at = |latencies: &[Duration], p: f64| -> String {
        if latencies.is_empty() {
            return "-".into();
        }
        let index = ((latencies.len() - 1) as f64 * p / 100.0).round() as usize;
        micros(latencies[index])
    };
    println!();
    println!(
        "bench-sidecar --attack: one request at a time for {} s each; sidecar on CPU 1, client, \
         attackers and backend on CPU 0; header-read timeout 2 s, idle timeout 3 s",
        options.duration
    );
    println!();
    println!(
        "| | requests | failed | p50 | p99 | max | attacker connections closed by the sidecar |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, (latencies, failures), closes) in [
        ("no attack", &quiet, 0),
        (
            "500 slowloris + 500 idle",
            &attacked,
            closed.load(Ordering::Relaxed),
        ),
    ] {
        println!(
            "| {name} | {} | {failures} | {} | {} | {} | {closes} |",
            latencies.len() + failures,
            at(latencies, 50.0),
            at(latencies, 99.0),
            at(latencies, 100.0),
        );
    }
    Ok(())
}
