//! Test harness: starts real etcd and Meridian binaries on loopback addresses.
//!
//! Processes are real and are killed for real (SIGTERM, SIGKILL). Every test builds its own little world (an etcd, control-plane replicas, agents) on fresh ports,
//! so tests can run in parallel. Processes die with the values that own them; their logs go to a
//! file each, printed when the owner is dropped. libtest captures that output and shows it only
//! for failing tests, which is what makes a CI failure debuggable without re-running it.
//!
//! The data plane adds: real sidecars ([`Sidecar`]) and sample-function instances
//! ([`SampleFunction`]), backends served by the test process that count what reaches them
//! ([`TestBackend`]), HTTP clients and an open-loop load generator ([`http`]), and the
//! fault-injection [`Relay`] that every cross-region call crosses (latency per link, blackhole,
//! reset), wired in by a [`RouteTap`] between each agent and its sidecar. [`World`] starts all of
//! it for up to three regions.
//!
//! Agents run with the harness's command policy ([`command_policy`]): the sample function in a
//! directory any user reaches as the allowed command root, and `--run-as nobody` when the tests
//! run as root.
//!
//! Rule for tests: never sleep to wait for state; poll for it with a deadline ([`poll_until`],
//! [`RouteWatcher::wait_for`]). (Sleeping until a point of a load run's schedule, e.g. "kill at
//! t = 2 s", is timing the experiment, not waiting for state.)

pub mod agent;
pub mod backend;
pub mod client;
pub mod command_policy;
pub mod control_plane;
pub mod etcd;
pub mod http;
pub mod mesh;
pub mod otlp;
pub mod process;
pub mod relay;
pub mod route_tap;
pub mod sample;
pub mod scaling;
pub mod sidecar;
pub mod world;

pub use agent::{summarize, Agent, AgentOpts, RouteWatcher};
pub use backend::{Behavior, TestBackend, Tombstone};
pub use client::{
    agent_service_client, apply, connect, external_endpoint_id, external_spec, function_client,
    local_client, mesh_client, probe_hello, route, routing_table, RawAgent,
};
pub use control_plane::{ControlPlane, ControlPlaneOpts};
pub use etcd::Etcd;
pub use mesh::Mesh;
pub use process::Process;
pub use relay::{Link, LinkControl, LinkState, Relay};
pub use route_tap::RouteTap;
pub use sample::SampleFunction;
pub use scaling::{
    describe_scale, instance_leaders, instance_processes, instances, leader, process_group,
    process_running, process_start_time, region_instance_processes, region_scale, scale_client,
    wait_scale, ClosedLoop, ClosedLoopReport, ProcessFunction,
};
pub use sidecar::{function_tiers, metric_value, Sidecar, SidecarOpts, TierView};
pub use world::{backend_spec, sample_spec, start_samples, World};

use std::collections::HashSet;
use std::ffi::OsStr;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::time::Instant;

/// The regions of the one-machine layout, in region-index order (region i binds `127.0.<i+1>.1`).
pub const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];

/// The agent lease TTL every test control plane runs with, in seconds.
pub const LEASE_TTL_SECS: u64 = 2;

/// The loopback address of region `index`: `127.0.<index+1>.1`.
pub fn region_ip(index: usize) -> Ipv4Addr {
    let octet = u8::try_from(index + 1).unwrap_or(u8::MAX);
    Ipv4Addr::new(127, 0, octet, 1)
}

/// The index of a known region name (`us-east` = 0, `eu-west` = 1, `ap-south` = 2).
pub fn region_index(region: &str) -> Option<usize> {
    REGIONS.iter().position(|r| *r == region)
}

/// Ports handed out by this process, so that two parallel tests never get the same one even
/// before either has bound it.
static TAKEN_PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();

/// A port that is free on `ip` right now and that this process has not handed out before.
///
/// Ports come from 20000..32000, below Linux's ephemeral range (32768..), so that an outgoing
/// connection's source port cannot take one between this check and the child's bind.
pub fn free_port(ip: impl Into<IpAddr>) -> Result<u16> {
    let ip = ip.into();
    let taken = TAKEN_PORTS.get_or_init(|| Mutex::new(HashSet::new()));
    let mut rng = std::collections::hash_map::RandomState::new().build_hasher();
    for attempt in 0u64..2000 {
        rng.write_u64(attempt);
        let port = 20000 + u16::try_from(rng.finish() % 12000).unwrap_or(0);
        let mut taken = taken
            .lock()
            .map_err(|_| anyhow::anyhow!("port registry poisoned"))?;
        if taken.contains(&port) {
            continue;
        }
        if TcpListener::bind(SocketAddr::new(ip, port)).is_ok() {
            taken.insert(port);
            return Ok(port);
        }
    }
    bail!("no free port found on {ip}")
}

/// A free `ip:port` socket address (see [`free_port`]).
pub fn free_addr(ip: impl Into<IpAddr>) -> Result<SocketAddr> {
    let ip = ip.into();
    Ok(SocketAddr::new(ip, free_port(ip)?))
}

/// An error that makes [`poll_until`] give up at once instead of retrying (e.g. "the process
/// exited": waiting longer cannot help).
#[derive(Debug)]
pub struct Fatal(pub anyhow::Error);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for Fatal {}

/// Wraps `err` so that [`poll_until`] stops retrying.
pub fn fatal(err: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(Fatal(err.into()))
}

/// Calls `check` until it returns `Ok`, at most for `within`; returns its value.
///
/// `check` returning `Err` means "not yet" (the error says why, and is reported if the deadline
/// passes) unless the error is [`fatal`]. Each attempt is itself cut off at the deadline, so a
/// hanging call cannot stretch it.
pub async fn poll_until<T, F, Fut>(within: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let start = Instant::now();
    let deadline = start + within;
    let mut pause = Duration::from_millis(5);
    let mut last: Option<anyhow::Error> = None;
    loop {
        match tokio::time::timeout_at(deadline, check()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(err)) => {
                if err.downcast_ref::<Fatal>().is_some() {
                    return Err(err.context(format!("while waiting for {what}")));
                }
                last = Some(err);
            }
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            let why = last.map_or_else(
                || "the last attempt did not finish".to_string(),
                |e| format!("{e:#}"),
            );
            bail!("timed out after {within:?} waiting for {what}: {why}");
        }
        // A short pause between attempts, not a wait for state: the deadline bounds the loop.
        tokio::time::sleep_until((Instant::now() + pause).min(deadline)).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// The directory holding the Meridian binaries (`meridian-control-plane`, `meridian-agent`,
/// `meridianctl`), found once per test process.
pub fn bin_dir() -> Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| find_bin_dir().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn find_bin_dir() -> Result<PathBuf> {
    const MARKER: &str = "meridian-control-plane";
    let exe = std::env::current_exe().context("current_exe")?;
    // The test binary lives in <target>/<profile>/deps/; the binaries in <target>/<profile>/.
    let mut candidates: Vec<PathBuf> = exe.ancestors().skip(1).map(Path::to_path_buf).collect();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        let dir = if dir.is_relative() {
            workspace_root().join(dir)
        } else {
            dir
        };
        candidates.push(dir.join("debug"));
        candidates.push(dir.join("release"));
    }
    candidates.push(workspace_root().join("target").join("debug"));
    for dir in &candidates {
        if dir.join(MARKER).is_file() {
            return Ok(dir.clone());
        }
    }
    bail!(
        "cannot find {MARKER} in any of {candidates:?} (the test binary is {}): \
         build them first: cargo build --workspace --bins",
        exe.display()
    )
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The path of the Meridian binary `name`.
pub fn bin(name: &str) -> Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "{} does not exist: build them first: cargo build --workspace --bins",
            path.display()
        );
    }
    Ok(path)
}

/// Runs the real `meridianctl` with `args` (no stdin), at most 30 s; returns its output whatever
/// its exit status.
pub async fn meridianctl<I, S>(args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    meridianctl_with_env(args, &[]).await
}

/// [`meridianctl`] with `env` set after the hermetic clean-up (e.g. `OTEL_*` to export its span).
pub async fn meridianctl_with_env<I, S>(args: I, env: &[(String, String)]) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = tokio::process::Command::new(bin("meridianctl")?);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    process::hermetic_env(cmd.as_std_mut());
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let output = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .context("meridianctl did not finish within 30 s")?
        .context("running meridianctl")?;
    Ok(output)
}

/// stdout and stderr of a command, for messages and assertions.
pub fn output_text(output: &Output) -> String {
    format!(
        "exit: {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `(agent id, acked version)` of every agent in `meridianctl get agents -o json` output.
///
/// Accepts any shape that holds one object per agent with an id (`agentId`, `agent_id` or `id`)
/// and an acked version (`ackedVersion` or `acked_version`; a number, or a string as the
/// protobuf JSON mapping writes int64).
pub fn json_acked_versions(value: &serde_json::Value) -> Vec<(String, i64)> {
    fn field<'a>(
        object: &'a serde_json::Map<String, serde_json::Value>,
        names: &[&str],
    ) -> Option<&'a serde_json::Value> {
        names.iter().find_map(|n| object.get(*n))
    }
    let mut found = Vec::new();
    match value {
        serde_json::Value::Array(items) => {
            for item in items {
                found.extend(json_acked_versions(item));
            }
        }
        serde_json::Value::Object(object) => {
            let id = field(object, &["agentId", "agent_id", "id"]).and_then(|v| v.as_str());
            let acked = field(object, &["ackedVersion", "acked_version"]).and_then(|v| {
                v.as_i64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            });
            match (id, acked) {
                (Some(id), Some(acked)) => found.push((id.to_string(), acked)),
                _ => {
                    for item in object.values() {
                        found.extend(json_acked_versions(item));
                    }
                }
            }
        }
        _ => {}
    }
    found
}
