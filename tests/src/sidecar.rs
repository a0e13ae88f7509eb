//! A real `meridian-sidecar` for one region, bound to the region's loopback address (outbound,
//! gateway and admin listeners on fresh ports), with helpers to read its admin API and its
//! resource use from `/proc`.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use tokio::net::TcpStream;

use crate::http::{MeshClient, Reply};
use crate::{bin, fatal, free_port, poll_until, region_ip, Process};

/// How long a sidecar gets to open its listeners after it starts.
const READY_WITHIN: Duration = Duration::from_secs(15);

/// Options of a sidecar.
#[derive(Clone, Debug, Default)]
pub struct SidecarOpts {
    /// `--gateway`; a fresh port of the region's address when `None`. Pass the address the
    /// region's agent reports (`AgentOpts::gateway`).
    pub gateway: Option<SocketAddr>,
    /// `--outbound`; a fresh port of the region's address when `None`.
    pub outbound: Option<SocketAddr>,
    /// `--admin`; a fresh port of the region's address when `None`.
    pub admin: Option<SocketAddr>,
    /// `--probe-interval-ms`; the binary's default when `None`.
    pub probe_interval_ms: Option<u64>,
    /// `--probe-timeout-ms`; the binary's default when `None`.
    pub probe_timeout_ms: Option<u64>,
    /// `--client-id`; the binary's default when `None`.
    pub client_id: Option<String>,
    /// Wait until `/ready` answers 200 (a table is loaded), not only until the listeners open.
    pub wait_for_table: bool,
    /// Appended to the command line.
    pub extra_args: Vec<String>,
    /// Extra environment variables (e.g. `OTEL_*`). With `OTEL_EXPORTER_OTLP_ENDPOINT` and no
    /// `OTEL_SERVICE_NAME`, the service name is `meridian-sidecar-<region>`.
    pub env: Vec<(String, String)>,
}

/// One sidecar.
pub struct Sidecar {
    process: Process,
    region: String,
    region_index: usize,
    outbound: SocketAddr,
    gateway: SocketAddr,
    admin: SocketAddr,
}

impl Sidecar {
    /// Starts a sidecar of `region` (on the address of `region_index`) fed by the agent (or
    /// route tap) at `agent_url`; waits until its listeners accept (and, with
    /// `opts.wait_for_table`, until it is ready).
    pub async fn start(
        region_index: usize,
        region: &str,
        agent_url: &str,
        opts: SidecarOpts,
    ) -> Result<Sidecar> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut sidecar = Sidecar::spawn(region_index, region, agent_url, &opts)?;
            match sidecar.wait_ready(opts.wait_for_table).await {
                Ok(()) => return Ok(sidecar),
                // Ports the test chose itself cannot be changed; fresh ones can.
                Err(_)
                    if attempt < 3
                        && opts.gateway.is_none()
                        && opts.outbound.is_none()
                        && opts.admin.is_none()
                        && sidecar
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

    fn spawn(
        region_index: usize,
        region: &str,
        agent_url: &str,
        opts: &SidecarOpts,
    ) -> Result<Sidecar> {
        let ip = region_ip(region_index);
        let pick = |given: Option<SocketAddr>| -> Result<SocketAddr> {
            match given {
                Some(addr) => Ok(addr),
                None => Ok(SocketAddr::from((ip, free_port(ip)?))),
            }
        };
        let outbound = pick(opts.outbound)?;
        let gateway = pick(opts.gateway)?;
        let admin = pick(opts.admin)?;
        let mut args: Vec<OsString> = vec![
            "--region".into(),
            region.into(),
            "--agent".into(),
            agent_url.into(),
            "--outbound".into(),
            outbound.to_string().into(),
            "--gateway".into(),
            gateway.to_string().into(),
            "--admin".into(),
            admin.to_string().into(),
        ];
        if let Some(ms) = opts.probe_interval_ms {
            args.extend(["--probe-interval-ms".into(), ms.to_string().into()]);
        }
        if let Some(ms) = opts.probe_timeout_ms {
            args.extend(["--probe-timeout-ms".into(), ms.to_string().into()]);
        }
        if let Some(id) = &opts.client_id {
            args.extend(["--client-id".into(), id.into()]);
        }
        args.extend(opts.extra_args.iter().map(OsString::from));
        let mut env: Vec<(&str, String)> = opts
            .env
            .iter()
            .map(|(key, value)| (key.as_str(), value.clone()))
            .collect();
        let has = |key: &str| opts.env.iter().any(|(k, _)| k == key);
        if has("OTEL_EXPORTER_OTLP_ENDPOINT") && !has("OTEL_SERVICE_NAME") {
            env.push(("OTEL_SERVICE_NAME", format!("meridian-sidecar-{region}")));
        }
        let process = Process::spawn_with_env(
            &format!("sidecar-{region}"),
            &bin("meridian-sidecar")?,
            args,
            &env,
        )?;
        Ok(Sidecar {
            process,
            region: region.to_string(),
            region_index,
            outbound,
            gateway,
            admin,
        })
    }

    /// The region.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The region index.
    pub fn region_index(&self) -> usize {
        self.region_index
    }

    /// The outbound listener (applications call functions here).
    pub fn outbound(&self) -> SocketAddr {
        self.outbound
    }

    /// The gateway listener (other regions call here).
    pub fn gateway(&self) -> SocketAddr {
        self.gateway
    }

    /// The admin listener.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// An HTTP/1.1 client of the outbound listener.
    pub fn client(&self) -> MeshClient {
        MeshClient::http1(self.outbound)
    }

    /// An h2c client of the outbound listener.
    pub fn client_h2(&self) -> MeshClient {
        MeshClient::http2(self.outbound)
    }

    /// `GET <path>` on the admin listener.
    pub async fn admin_get(&self, path: &str) -> Result<Reply> {
        MeshClient::http1(self.admin)
            .get(&self.admin.to_string(), path)
            .await
    }

    /// Whether `/ready` answers 200.
    pub async fn is_ready(&self) -> Result<bool> {
        Ok(self.admin_get("/ready").await?.status == http::StatusCode::OK)
    }

    /// `/routes`, parsed.
    pub async fn routes(&self) -> Result<serde_json::Value> {
        let reply = self.admin_get("/routes").await?;
        ensure!(reply.status.is_success(), "/routes: {}", reply.describe());
        serde_json::from_slice(&reply.body)
            .with_context(|| format!("/routes is not JSON: {}", reply.text()))
    }

    /// `/metrics` (Prometheus text).
    pub async fn metrics(&self) -> Result<String> {
        let reply = self.admin_get("/metrics").await?;
        ensure!(reply.status.is_success(), "/metrics: {}", reply.describe());
        Ok(reply.text())
    }

    /// Waits until `/ready` answers 200.
    pub async fn wait_for_table(&mut self, within: Duration) -> Result<()> {
        let admin = self.admin;
        let process = &mut self.process;
        poll_until(within, "the sidecar to load a table (/ready 200)", || {
            let exited = process.try_exit().map(|s| process.exited_error(s));
            async move {
                if let Some(err) = exited {
                    return Err(fatal(err));
                }
                let reply = MeshClient::http1(admin)
                    .get(&admin.to_string(), "/ready")
                    .await?;
                ensure!(
                    reply.status == http::StatusCode::OK,
                    "/ready: {}",
                    reply.describe()
                );
                Ok(())
            }
        })
        .await
    }

    async fn wait_ready(&mut self, table: bool) -> Result<()> {
        let (outbound, gateway, admin) = (self.outbound, self.gateway, self.admin);
        let process = &mut self.process;
        poll_until(READY_WITHIN, "the sidecar's listeners to accept", || {
            let exited = process.try_exit().map(|s| process.exited_error(s));
            async move {
                if let Some(err) = exited {
                    return Err(fatal(err));
                }
                for addr in [outbound, gateway, admin] {
                    TcpStream::connect(addr)
                        .await
                        .with_context(|| format!("connecting to {addr}"))?;
                }
                let reply = MeshClient::http1(admin)
                    .get(&admin.to_string(), "/ready")
                    .await?;
                ensure!(
                    reply.status == http::StatusCode::OK
                        || reply.status == http::StatusCode::SERVICE_UNAVAILABLE,
                    "/ready answered {}",
                    reply.describe()
                );
                Ok(())
            }
        })
        .await?;
        if table {
            self.wait_for_table(READY_WITHIN).await?;
        }
        Ok(())
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

    /// Starts it again with the same flags; waits for its listeners.
    pub async fn restart(&mut self, wait_for_table: bool) -> Result<()> {
        if self.process.is_running() {
            self.stop().await?;
        }
        self.process.start()?;
        self.wait_ready(wait_for_table).await
    }

    /// Whether the process is alive.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// The process (for its log and pid).
    pub fn process(&self) -> &Process {
        &self.process
    }

    /// Resident memory now, in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> Result<u64> {
        proc_status_kib(self.pid()?, "VmRSS")
    }

    /// Peak resident memory so far, in KiB (`VmHWM`).
    pub fn peak_rss_kib(&self) -> Result<u64> {
        proc_status_kib(self.pid()?, "VmHWM")
    }

    /// CPU time used so far (user + system).
    pub fn cpu_time(&self) -> Result<Duration> {
        proc_cpu_time(self.pid()?)
    }

    fn pid(&self) -> Result<u32> {
        self.process
            .pid()
            .ok_or_else(|| anyhow!("{} is not running", self.process.name()))
    }
}

/// A `kB` field of `/proc/<pid>/status`.
pub fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
            let kib = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .with_context(|| format!("{field} in /proc/{pid}/status: {rest:?}"))?;
            return Ok(kib);
        }
    }
    bail!("no {field} in /proc/{pid}/status")
}

/// utime + stime of `/proc/<pid>/stat`.
pub fn proc_cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; fields after its closing parenthesis are
    // space separated: state is field 3, utime 14, stime 15.
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .context("malformed /proc/<pid>/stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |index: usize| -> Result<u64> {
        fields
            .get(index)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("field {} of /proc/{pid}/stat", index + 3))
    };
    let total = ticks(11)? + ticks(12)?;
    // USER_HZ is 100 on every Linux the tests run on.
    Ok(Duration::from_millis(total * 10))
}

/// One tier of a function as a sidecar's `/routes` shows it.
#[derive(Clone, Debug)]
pub struct TierView {
    pub region: String,
    pub local: bool,
    /// Probe state of the tier's gateway(s) (remote tiers): "up", "down" or "unknown", lower
    /// case; `None` when `/routes` has none (local tiers).
    pub probe: Option<String>,
    /// The last probe round trip, in milliseconds, if measured.
    pub rtt_ms: Option<f64>,
    /// Position in the sidecar's current priority order (`None`: not eligible).
    pub priority: Option<u64>,
    /// Share of new requests this tier gets now, in percent.
    pub load_percent: Option<f64>,
    /// The tier as `/routes` has it.
    pub raw: serde_json::Value,
}

/// The tiers of `function` (namespace "default") in `/routes`, in the sidecar's current priority
/// order (tiers not eligible last, in table order).
pub fn function_tiers(routes: &serde_json::Value, function: &str) -> Result<Vec<TierView>> {
    let route = find_function(routes, function)
        .with_context(|| format!("no function {function:?} in /routes: {routes}"))?;
    let tiers = route
        .get("tiers")
        .and_then(|t| t.as_array())
        .with_context(|| format!("no tiers array in {route}"))?;
    let mut tiers: Vec<TierView> = tiers.iter().map(tier_view).collect();
    tiers.sort_by_key(|t| t.priority.unwrap_or(u64::MAX));
    Ok(tiers)
}

fn find_function<'a>(
    value: &'a serde_json::Value,
    function: &str,
) -> Option<&'a serde_json::Value> {
    match value {
        serde_json::Value::Object(object) => {
            let named = object.get("name").and_then(|n| n.as_str()) == Some(function);
            let namespace_ok = object
                .get("namespace")
                .and_then(|n| n.as_str())
                .is_none_or(|ns| ns.is_empty() || ns == "default");
            if named && namespace_ok && object.contains_key("tiers") {
                return Some(value);
            }
            object.values().find_map(|v| find_function(v, function))
        }
        serde_json::Value::Array(items) => items.iter().find_map(|v| find_function(v, function)),
        _ => None,
    }
}

fn tier_view(tier: &serde_json::Value) -> TierView {
    fn walk<'a>(value: &'a serde_json::Value, out: &mut Vec<(&'a str, &'a serde_json::Value)>) {
        match value {
            serde_json::Value::Object(object) => {
                for (key, v) in object {
                    out.push((key.as_str(), v));
                    walk(v, out);
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut fields = Vec::new();
    walk(tier, &mut fields);
    let probe = fields
        .iter()
        .find(|(k, v)| k.to_lowercase().contains("probe") && v.is_string())
        .or_else(|| {
            fields.iter().find(|(k, v)| {
                k.to_lowercase().contains("state")
                    && v.as_str().is_some_and(|s| {
                        matches!(s.to_lowercase().as_str(), "up" | "down" | "unknown")
                    })
            })
        })
        .and_then(|(_, v)| v.as_str())
        .map(str::to_lowercase);
    let rtt_ms = fields
        .iter()
        .find(|(k, v)| k.to_lowercase().contains("rtt") && v.is_number())
        .and_then(|(k, v)| {
            let n = v.as_f64()?;
            let k = k.to_lowercase();
            Some(if k.contains("us") || k.contains("micro") {
                n / 1000.0
            } else if k.contains("ns") || k.contains("nano") {
                n / 1_000_000.0
            } else if k.ends_with("_s") || k.contains("sec") {
                n * 1000.0
            } else {
                n
            })
        });
    TierView {
        region: tier
            .get("region")
            .and_then(|r| r.as_str())
            .unwrap_or_default()
            .to_string(),
        local: tier.get("local").and_then(|l| l.as_bool()).unwrap_or(false),
        probe,
        rtt_ms,
        priority: tier.get("priority").and_then(|p| p.as_u64()),
        load_percent: tier.get("loadPercent").and_then(|p| p.as_f64()),
        raw: tier.clone(),
    }
}

/// The value of the sample `series` (name with its labels exactly as exposed, e.g.
/// `meridian_requests_total{function="hello",tier="us-east",status="200"}`) in Prometheus text.
pub fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}
