//! Process functions in tests: specs that run the sample function under the agents, the scale
//! state the control plane reports (`ScaleService`), a closed-loop load generator, and the
//! function's instance processes as the operating system sees them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use meridian_proto::v1::scale_service_client::ScaleServiceClient;
use meridian_proto::v1::{
    function_spec, FunctionInstances, FunctionSpec, GetLeaderRequest, ListInstancesRequest,
    Placement, ProcessRuntime, RegionPlacement, RegionScale, Scaling,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::command_policy::sample_function_command;
use crate::http::MeshClient;
use crate::{connect, poll_until};

/// How a process function of the sample binary should run and scale.
#[derive(Clone, Debug)]
pub struct ProcessFunction {
    pub name: String,
    /// `(region, min instances)`; empty: every region with an agent.
    pub regions: Vec<(String, u32)>,
    pub min_instances: u32,
    pub max_instances: u32,
    pub target_concurrency: u32,
    pub idle_seconds: u32,
    /// `DELAY_MS` of the sample function: how long it holds every request.
    pub delay_ms: u32,
    /// Replaces the sample binary (bad-input tests). The agents run only commands under their
    /// allowed command roots (`AgentOpts::command_roots` adds to the harness's).
    pub command: Option<(String, Vec<String>)>,
}

impl ProcessFunction {
    /// The sample function in every region, 0..10 instances, 10 requests each, idle 300 s.
    pub fn sample(name: &str) -> ProcessFunction {
        ProcessFunction {
            name: name.to_string(),
            regions: Vec::new(),
            min_instances: 0,
            max_instances: 10,
            target_concurrency: 10,
            idle_seconds: 300,
            delay_ms: 0,
            command: None,
        }
    }

    /// Only in `regions`, each with its own minimum.
    pub fn in_regions(mut self, regions: &[(&str, u32)]) -> ProcessFunction {
        self.regions = regions.iter().map(|(r, m)| (r.to_string(), *m)).collect();
        self
    }

    /// The wire spec.
    pub fn spec(&self) -> Result<FunctionSpec> {
        let (command, args) = match &self.command {
            Some(command) => command.clone(),
            // The harness's copy, under the agents' allowed command root.
            None => (
                sample_function_command()?.to_string_lossy().into_owned(),
                Vec::new(),
            ),
        };
        let mut env = std::collections::HashMap::new();
        if self.delay_ms > 0 {
            env.insert("DELAY_MS".to_string(), self.delay_ms.to_string());
        }
        let placement = if self.regions.is_empty() {
            Placement {
                all_regions: true,
                regions: Vec::new(),
            }
        } else {
            Placement {
                all_regions: false,
                regions: self
                    .regions
                    .iter()
                    .map(|(region, min)| RegionPlacement {
                        region: region.clone(),
                        min_instances: Some(*min),
                        max_instances: None,
                    })
                    .collect(),
            }
        };
        Ok(FunctionSpec {
            name: self.name.clone(),
            runtime: Some(function_spec::Runtime::Process(ProcessRuntime {
                command,
                args,
                env,
                readiness_path: if self.command.is_some() {
                    String::new()
                } else {
                    "/healthz".to_string()
                },
            })),
            placement: Some(placement),
            scaling: Some(Scaling {
                min_instances: Some(self.min_instances),
                max_instances: Some(self.max_instances),
                target_concurrency: Some(self.target_concurrency),
                idle_seconds: Some(self.idle_seconds),
            }),
            ..Default::default()
        })
    }
}

/// A `ScaleService` client.
pub async fn scale_client(url: &str) -> Result<ScaleServiceClient<Channel>> {
    Ok(ScaleServiceClient::new(connect(url).await?))
}

/// The scale state of `name` (namespace `default`), if the control plane lists it.
pub async fn instances(cp_url: &str, name: &str) -> Result<Option<FunctionInstances>> {
    let response = scale_client(cp_url)
        .await?
        .list_instances(ListInstancesRequest {
            namespace: String::new(),
            all_namespaces: false,
            name: name.to_string(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(response.functions.into_iter().find(|f| f.name == name))
}

/// The reported scale of `name` in `region`.
pub async fn region_scale(cp_url: &str, name: &str, region: &str) -> Result<RegionScale> {
    instances(cp_url, name)
        .await?
        .and_then(|f| f.regions.into_iter().find(|r| r.region == region))
        .ok_or_else(|| anyhow!("no scale reported for {name} in {region} yet"))
}

/// Polls until `check` accepts the scale of `name` in `region`; returns it.
pub async fn wait_scale(
    cp_url: &str,
    name: &str,
    region: &str,
    within: Duration,
    what: &str,
    check: impl Fn(&RegionScale) -> bool,
) -> Result<RegionScale> {
    poll_until(within, what, || async {
        let scale = region_scale(cp_url, name, region).await?;
        if check(&scale) {
            Ok(scale)
        } else {
            Err(anyhow!("{}", describe_scale(&scale)))
        }
    })
    .await
}

/// One line for messages.
pub fn describe_scale(scale: &RegionScale) -> String {
    format!(
        "{}: desired {} ready {} starting {} draining {} (min {} max {}) reason {:?} \
         concurrency {:.1}/{:.1} panic {} cold start {} ms restarts {} last exit {:?} error {:?}",
        scale.region,
        scale.desired,
        scale.ready,
        scale.starting,
        scale.draining,
        scale.min_instances,
        scale.max_instances,
        scale.reason,
        scale.stable_concurrency,
        scale.panic_concurrency,
        scale.panic,
        scale.cold_start_ms,
        scale.restarts,
        scale.last_exit,
        scale.error
    )
}

/// The replica id of the scheduler leader, as `cp_url` sees it (empty: none).
pub async fn leader(cp_url: &str) -> Result<String> {
    Ok(scale_client(cp_url)
        .await?
        .get_leader(GetLeaderRequest {})
        .await?
        .into_inner()
        .leader)
}

/// Processes of this test process's agents whose environment says they are an instance of
/// `<namespace>/<name>`: pid → `INSTANCE_ID`. Read from `/proc`, so it sees orphans too.
pub fn instance_processes(namespace: &str, name: &str) -> BTreeMap<u32, String> {
    find_instance_processes(namespace, name, None)
}

/// [`instance_processes`] of the agent of `region` only (their `REGION`): the agents of a test
/// world all run on this machine.
pub fn region_instance_processes(
    namespace: &str,
    name: &str,
    region: &str,
) -> BTreeMap<u32, String> {
    find_instance_processes(namespace, name, Some(region))
}

fn find_instance_processes(
    namespace: &str,
    name: &str,
    region: Option<&str>,
) -> BTreeMap<u32, String> {
    let wanted = format!("MERIDIAN_FUNCTION={namespace}/{name}");
    let wanted_region = region.map(|region| format!("REGION={region}"));
    let mut found = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // Another test process's instances (a suite beside this one) are not ours to count.
        if !crate::agent::runs_under_our_agents(pid) {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        // A zombie keeps no environment; it is not running.
        let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        if !vars.contains(&wanted.as_bytes()) {
            continue;
        }
        if let Some(region) = &wanted_region {
            if !vars.contains(&region.as_bytes()) {
                continue;
            }
        }
        let instance = vars
            .iter()
            .find_map(|v| v.strip_prefix(b"INSTANCE_ID="))
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        found.insert(pid, instance);
    }
    found
}

/// [`instance_processes`] that lead their process group: the instances themselves, not what they
/// forked (an instance runs in a group of its own, its pid the group's id).
pub fn instance_leaders(namespace: &str, name: &str) -> BTreeMap<u32, String> {
    instance_processes(namespace, name)
        .into_iter()
        .filter(|(pid, _)| process_group(*pid) == Some(*pid))
        .collect()
}

/// Field 5 of `/proc/<pid>/stat`, the process group; `None` when the process is gone.
pub fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, after_name) = stat.rsplit_once(')')?;
    after_name.split_whitespace().nth(2)?.parse().ok()
}

/// Field 22 of `/proc/<pid>/stat`, the start time (clock ticks after boot).
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, after_name) = stat.rsplit_once(')')?;
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` runs and is not a zombie (exited, not reaped).
pub fn process_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, after_name) = stat.rsplit_once(')')?;
            after_name
                .split_whitespace()
                .next()
                .map(|s| s != "Z" && s != "X")
        })
        .unwrap_or(false)
}

/// What a closed-loop load run saw.
#[derive(Debug, Default)]
pub struct ClosedLoopReport {
    pub ok: u64,
    /// Every failed request: when (from the start) and why.
    pub failures: Vec<(Duration, String)>,
    /// Answers per `meridian-region`.
    pub regions: BTreeMap<String, u64>,
}

impl ClosedLoopReport {
    pub fn summary(&self) -> String {
        let mut first: Vec<String> = self
            .failures
            .iter()
            .take(5)
            .map(|(at, why)| format!("at {at:?}: {why}"))
            .collect();
        if self.failures.len() > 5 {
            first.push(format!("... {} more", self.failures.len() - 5));
        }
        format!(
            "{} ok, {} failed, by region {:?}; failures: {}",
            self.ok,
            self.failures.len(),
            self.regions,
            first.join("; ")
        )
    }
}

/// `concurrency` workers, each sending `GET http://<function>/` again as soon as the previous
/// answer arrived, until stopped.
pub struct ClosedLoop {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<ClosedLoopReport>>,
    started: Instant,
}

impl ClosedLoop {
    pub fn start(client: &MeshClient, function: &str, concurrency: usize) -> ClosedLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let workers = (0..concurrency)
            .map(|_| {
                let client = client.clone();
                let function = function.to_string();
                let stop = Arc::clone(&stop);
                tokio::spawn(async move {
                    let mut report = ClosedLoopReport::default();
                    while !stop.load(Ordering::Relaxed) {
                        match client.get(&function, "/").await {
                            Ok(reply) if reply.status == http::StatusCode::OK => {
                                report.ok += 1;
                                let region = reply.region().unwrap_or("?").to_string();
                                *report.regions.entry(region).or_default() += 1;
                            }
                            Ok(reply) => {
                                report.failures.push((started.elapsed(), reply.describe()))
                            }
                            Err(error) => report
                                .failures
                                .push((started.elapsed(), format!("{error:#}"))),
                        }
                    }
                    report
                })
            })
            .collect();
        ClosedLoop {
            stop,
            workers,
            started,
        }
    }

    /// When the run started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Stops every worker after its current request; merges what they saw.
    pub async fn finish(self) -> Result<ClosedLoopReport> {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = ClosedLoopReport::default();
        for worker in self.workers {
            let report = worker.await.context("load worker panicked")?;
            total.ok += report.ok;
            total.failures.extend(report.failures);
            for (region, n) in report.regions {
                *total.regions.entry(region).or_default() += n;
            }
        }
        total.failures.sort_by_key(|(at, _)| *at);
        Ok(total)
    }
}
