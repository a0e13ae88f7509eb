//! `meridianctl status`: the whole mesh at a glance, from the RPCs that exist
//! (ScaleService.GetLeader, MeshService.ListAgents, ScaleService.ListInstances,
//! FunctionService.List). Pure like [`crate::output`]: the answers (or why each is missing) in,
//! a [`Status`] model out, rendered as text, JSON or YAML.

use std::collections::BTreeMap;

use meridian_proto::v1 as wire;
use serde::Serialize;

use crate::output::{or_dash, table, to_json, to_yaml, OutputError};

/// What the control plane answered to each call, or the server's error message.
pub struct StatusInput {
    /// The (normalized) address of the replica asked.
    pub address: String,
    pub leader: Result<wire::GetLeaderResponse, String>,
    /// The registered control-plane replicas (`ControlPlaneService.ListReplicas`).
    pub replicas: Result<Vec<wire::ReplicaInfo>, String>,
    /// Records in etcd the replica asked skipped (`ListReplicas`); empty when that call failed.
    pub skipped_records: Vec<wire::SkippedRecord>,
    pub agents: Result<Vec<wire::AgentStatus>, String>,
    pub instances: Result<Vec<wire::FunctionInstances>, String>,
    pub functions: Result<Vec<wire::Function>, String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub control_plane: ControlPlaneStatus,
    pub agents: AgentsStatus,
    pub functions: FunctionsStatus,
    /// One line per problem found; empty when healthy.
    pub problems: Vec<String>,
    /// "healthy" or "N problem(s): ...".
    pub verdict: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ControlPlaneStatus {
    pub address: String,
    /// Empty when there is no leader (or GetLeader failed).
    pub leader: String,
    pub elected_version: i64,
    /// Every registered replica and every replica holding agent streams, with how many agents
    /// each.
    pub replicas: Vec<ReplicaStreams>,
    /// Why the registered replicas are unknown (ListReplicas failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas_error: Option<String>,
    /// Records in etcd the replica could not read and serves without.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped_records: Vec<SkippedRecordView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SkippedRecordView {
    pub key: String,
    pub error: String,
    pub revision: i64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStreams {
    pub replica: String,
    /// Its gRPC address; empty when it holds streams but is not registered.
    pub address: String,
    pub leader: bool,
    pub agents: usize,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentsStatus {
    pub regions: Vec<RegionAgents>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegionAgents {
    pub region: String,
    pub agents: usize,
    pub in_sync: usize,
    /// Sidecars connected to the region's agents, and how many of them loaded the newest
    /// table.
    pub sidecars: usize,
    pub sidecars_in_sync: usize,
    /// Agents not in sync: id and how many versions behind.
    pub lagging: Vec<LaggingAgent>,
    /// Sidecars that failed to load a table or have not loaded the newest one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sidecar_problems: Vec<SidecarProblem>,
    /// The newest table version of the region on the replica asked.
    pub newest_version: i64,
    /// "agent: reason" of the last Nack in the region; empty when none.
    pub last_nack: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LaggingAgent {
    pub agent_id: String,
    pub acked_version: i64,
    pub behind: i64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarProblem {
    pub agent_id: String,
    pub sidecar: String,
    pub loaded_version: i64,
    /// Why it could not load a table; empty when it is only behind.
    pub error: String,
}

/// At most this many skipped records are listed one by one among the problems.
const LISTED_SKIPPED_RECORDS: usize = 5;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionsStatus {
    pub functions: Vec<FunctionStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionStatus {
    pub namespace: String,
    pub name: String,
    /// "process", "external" or "unknown".
    pub kind: String,
    pub regions: Vec<FunctionRegion>,
    /// A process function the scheduler has not placed yet (no placement, no report).
    pub unplaced: bool,
    /// Regions the spec asks for that the scheduler could not place.
    pub problems: Vec<PlacementProblemView>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionRegion {
    pub region: String,
    /// Sums over the region's agents; absent for external regions and placed regions no agent
    /// has reported about yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired: Option<u32>,
    /// Placed, but no agent of the region has reported about it yet.
    pub pending: bool,
    /// An agent's error (e.g. "CrashLoopBackOff: exit code 1"); empty when none.
    pub error: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlacementProblemView {
    pub region: String,
    pub reason: String,
}

const PENDING: &str = "Pending";

fn ns(namespace: &str) -> &str {
    if namespace.is_empty() {
        "default"
    } else {
        namespace
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("{n} {one}")
    } else {
        format!("{n} {many}")
    }
}

fn control_plane_status(input: &StatusInput, problems: &mut Vec<String>) -> ControlPlaneStatus {
    let (leader, elected_version, error) = match &input.leader {
        Ok(r) => (r.leader.clone(), r.elected_version, None),
        Err(e) => (String::new(), 0, Some(e.clone())),
    };
    let mut replicas: BTreeMap<&str, ReplicaStreams> = BTreeMap::new();
    match &input.replicas {
        Ok(registered) => {
            for replica in registered {
                replicas.insert(
                    replica.replica_id.as_str(),
                    ReplicaStreams {
                        replica: replica.replica_id.clone(),
                        address: replica.address.clone(),
                        leader: replica.leader,
                        agents: 0,
                    },
                );
            }
        }
        Err(e) => problems.push(format!("control-plane replicas unknown ({e})")),
    }
    let replicas_error = input.replicas.as_ref().err().cloned();
    if let Ok(agents) = &input.agents {
        for agent in agents {
            let entry = replicas
                .entry(agent.replica.as_str())
                .or_insert_with(|| ReplicaStreams {
                    replica: agent.replica.clone(),
                    address: String::new(),
                    leader: agent.replica == leader,
                    agents: 0,
                });
            entry.agents += 1;
        }
    }
    let replicas = replicas.into_values().collect();
    match &error {
        Some(e) => problems.push(format!("scheduler leader unknown ({e})")),
        None if leader.is_empty() => problems.push("no scheduler leader".to_string()),
        None => {}
    }
    ControlPlaneStatus {
        address: input.address.clone(),
        leader,
        elected_version,
        replicas,
        replicas_error,
        skipped_records: skipped_records(input, problems),
        error,
    }
}

fn skipped_records(input: &StatusInput, problems: &mut Vec<String>) -> Vec<SkippedRecordView> {
    let mut records: Vec<SkippedRecordView> = input
        .skipped_records
        .iter()
        .map(|r| SkippedRecordView {
            key: r.key.clone(),
            error: r.error.clone(),
            revision: r.revision,
        })
        .collect();
    records.sort_by(|a, b| a.key.cmp(&b.key));
    for record in records.iter().take(LISTED_SKIPPED_RECORDS) {
        problems.push(format!(
            "etcd record {} skipped (revision {}): {}",
            record.key,
            record.revision,
            or_dash(&record.error)
        ));
    }
    if records.len() > LISTED_SKIPPED_RECORDS {
        problems.push(format!(
            "{} more etcd records skipped",
            records.len() - LISTED_SKIPPED_RECORDS
        ));
    }
    records
}

/// The sidecars of `agent` that could not load a table, or (connected) have not loaded the
/// newest version although their agent has it (an agent behind is a problem of its own).
fn sidecar_problems(agent: &wire::AgentStatus) -> Vec<SidecarProblem> {
    let agent_has_newest = agent.acked_version >= agent.newest_version;
    agent
        .sidecars
        .iter()
        .filter(|s| {
            !s.error.is_empty()
                || (agent_has_newest && s.connected && s.loaded_version < agent.newest_version)
        })
        .map(|s| SidecarProblem {
            agent_id: agent.agent_id.clone(),
            sidecar: s.sidecar.clone(),
            loaded_version: s.loaded_version,
            error: s.error.clone(),
        })
        .collect()
}

fn agents_status(input: &StatusInput, problems: &mut Vec<String>) -> AgentsStatus {
    let agents = match &input.agents {
        Ok(agents) => agents,
        Err(e) => {
            problems.push(format!("agents unknown ({e})"));
            return AgentsStatus {
                regions: Vec::new(),
                error: Some(e.clone()),
            };
        }
    };
    if agents.is_empty() {
        problems.push("no agents connected".to_string());
    }
    let mut by_region: BTreeMap<&str, Vec<&wire::AgentStatus>> = BTreeMap::new();
    for agent in agents {
        by_region
            .entry(agent.region.as_str())
            .or_default()
            .push(agent);
    }
    let mut regions = Vec::new();
    for (region, mut agents) in by_region {
        agents.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        let lagging: Vec<LaggingAgent> = agents
            .iter()
            .filter(|a| !a.in_sync)
            .map(|a| LaggingAgent {
                agent_id: a.agent_id.clone(),
                acked_version: a.acked_version,
                behind: (a.newest_version - a.acked_version).max(0),
            })
            .collect();
        let sidecar_problems: Vec<SidecarProblem> =
            agents.iter().flat_map(|a| sidecar_problems(a)).collect();
        for lag in &lagging {
            let newest = agents
                .iter()
                .find(|a| a.agent_id == lag.agent_id)
                .map_or(0, |a| a.newest_version);
            if lag.acked_version > 0 && lag.behind == 0 {
                // The agent has the table; its sidecars are why it is not in sync.
                if !sidecar_problems.iter().any(|p| p.agent_id == lag.agent_id) {
                    problems.push(format!(
                        "agent {} ({region}): not every sidecar has loaded version {newest}",
                        lag.agent_id
                    ));
                }
                continue;
            }
            let how = if lag.acked_version == 0 {
                "has acked no table yet".to_string()
            } else {
                format!(
                    "lagging by {}",
                    plural(
                        usize::try_from(lag.behind).unwrap_or(0),
                        "version",
                        "versions"
                    )
                )
            };
            problems.push(format!("agent {} ({region}) {how}", lag.agent_id));
        }
        for p in &sidecar_problems {
            if p.error.is_empty() {
                problems.push(format!(
                    "sidecar {} of agent {} ({region}) has not loaded the newest table (holds version {})",
                    p.sidecar, p.agent_id, p.loaded_version
                ));
            } else {
                problems.push(format!(
                    "sidecar {} of agent {} ({region}) cannot load its table: {}",
                    p.sidecar, p.agent_id, p.error
                ));
            }
        }
        let last_nack = agents
            .iter()
            .rev()
            .find(|a| !a.last_nack.is_empty())
            .map(|a| format!("{}: {}", a.agent_id, a.last_nack))
            .unwrap_or_default();
        regions.push(RegionAgents {
            region: region.to_string(),
            agents: agents.len(),
            in_sync: agents.len() - lagging.len(),
            sidecars: agents
                .iter()
                .flat_map(|a| &a.sidecars)
                .filter(|s| s.connected)
                .count(),
            sidecars_in_sync: agents
                .iter()
                .map(|a| usize::try_from(a.sidecars_in_sync).unwrap_or(0))
                .sum(),
            lagging,
            sidecar_problems,
            newest_version: agents.iter().map(|a| a.newest_version).max().unwrap_or(0),
            last_nack,
        });
    }
    AgentsStatus {
        regions,
        error: None,
    }
}

fn kind_of(spec: &wire::FunctionSpec) -> &'static str {
    match &spec.runtime {
        Some(wire::function_spec::Runtime::Process(_)) => "process",
        Some(wire::function_spec::Runtime::External(_)) => "external",
        None => "unknown",
    }
}

/// One process function's regions: a report per region (agents summed), then placed regions
/// with no report yet.
fn process_regions(instances: &wire::FunctionInstances) -> Vec<FunctionRegion> {
    let mut by_region: BTreeMap<&str, FunctionRegion> = BTreeMap::new();
    for scale in &instances.regions {
        let entry = by_region
            .entry(scale.region.as_str())
            .or_insert_with(|| FunctionRegion {
                region: scale.region.clone(),
                ready: Some(0),
                desired: Some(0),
                pending: false,
                error: String::new(),
            });
        entry.ready = Some(entry.ready.unwrap_or(0).saturating_add(scale.ready));
        entry.desired = Some(entry.desired.unwrap_or(0).saturating_add(scale.desired));
        if entry.error.is_empty() && !scale.error.is_empty() {
            entry.error = or_dash(&scale.error);
        }
    }
    if let Some(placement) = &instances.placement {
        for bounds in &placement.regions {
            by_region
                .entry(bounds.region.as_str())
                .or_insert_with(|| FunctionRegion {
                    region: bounds.region.clone(),
                    ready: None,
                    desired: None,
                    pending: true,
                    error: String::new(),
                });
        }
    }
    by_region.into_values().collect()
}

fn functions_status(input: &StatusInput, problems: &mut Vec<String>) -> FunctionsStatus {
    // (namespace, name) -> (kind, external regions, instances)
    type Entry<'a> = (
        &'static str,
        Vec<String>,
        Option<&'a wire::FunctionInstances>,
    );
    let mut all: BTreeMap<(String, String), Entry> = BTreeMap::new();
    let mut errors = Vec::new();
    match &input.functions {
        Ok(functions) => {
            for spec in functions.iter().filter_map(|f| f.spec.as_ref()) {
                let external = match &spec.runtime {
                    Some(wire::function_spec::Runtime::External(e)) => {
                        let mut regions: Vec<String> =
                            e.regions.iter().map(|r| r.region.clone()).collect();
                        regions.sort();
                        regions.dedup();
                        regions
                    }
                    _ => Vec::new(),
                };
                all.insert(
                    (ns(&spec.namespace).to_string(), spec.name.clone()),
                    (kind_of(spec), external, None),
                );
            }
        }
        Err(e) => {
            problems.push(format!("functions unknown ({e})"));
            errors.push(e.clone());
        }
    }
    match &input.instances {
        Ok(instances) => {
            for f in instances {
                let entry = all
                    .entry((ns(&f.namespace).to_string(), f.name.clone()))
                    .or_insert(("process", Vec::new(), None));
                entry.0 = "process";
                entry.2 = Some(f);
            }
        }
        Err(e) => {
            problems.push(format!("scale state unknown ({e})"));
            if !errors.contains(e) {
                errors.push(e.clone());
            }
        }
    }
    let mut functions = Vec::new();
    for ((namespace, name), (kind, external, instances)) in all {
        let qualified = format!("{namespace}/{name}");
        let unplaced = kind == "process"
            && input.instances.is_ok()
            && instances.is_none_or(|i| i.placement.is_none() && i.regions.is_empty());
        let (regions, placement_problems) = match instances {
            Some(instances) => {
                let regions = process_regions(instances);
                let placement_problems: Vec<PlacementProblemView> = instances
                    .placement
                    .iter()
                    .flat_map(|p| &p.problems)
                    .map(|p| PlacementProblemView {
                        region: p.region.clone(),
                        reason: p.reason.clone(),
                    })
                    .collect();
                (regions, placement_problems)
            }
            None => {
                let regions = external
                    .into_iter()
                    .map(|region| FunctionRegion {
                        region,
                        ready: None,
                        desired: None,
                        pending: false,
                        error: String::new(),
                    })
                    .collect();
                (regions, Vec::new())
            }
        };
        for region in &regions {
            if !region.error.is_empty() {
                problems.push(format!(
                    "{qualified} in {}: {}",
                    region.region, region.error
                ));
            }
        }
        for p in &placement_problems {
            problems.push(format!(
                "{qualified} not placed in {}: {}",
                p.region, p.reason
            ));
        }
        functions.push(FunctionStatus {
            namespace,
            name,
            kind: kind.to_string(),
            regions,
            unplaced,
            problems: placement_problems,
        });
    }
    FunctionsStatus {
        functions,
        error: (!errors.is_empty()).then(|| errors.join("; ")),
    }
}

fn verdict(problems: &[String]) -> String {
    if problems.is_empty() {
        return "healthy".to_string();
    }
    format!(
        "{}: {}",
        plural(problems.len(), "problem", "problems"),
        problems.join("; ")
    )
}

/// Builds the model every format renders.
pub fn status(input: &StatusInput) -> Status {
    let mut problems = Vec::new();
    let control_plane = control_plane_status(input, &mut problems);
    let agents = agents_status(input, &mut problems);
    let functions = functions_status(input, &mut problems);
    let verdict = verdict(&problems);
    Status {
        control_plane,
        agents,
        functions,
        problems,
        verdict,
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

fn region_cell(region: &FunctionRegion) -> String {
    let mut cell = region.region.clone();
    if let (Some(ready), Some(desired)) = (region.ready, region.desired) {
        cell.push_str(&format!(" {ready}/{desired}"));
    }
    if region.pending {
        cell.push_str(&format!(" ({PENDING})"));
    }
    if !region.error.is_empty() {
        cell.push_str(&format!(" ({})", region.error));
    }
    cell
}

/// The text form: three blocks and a verdict line.
pub fn status_text(status: &Status) -> String {
    let mut out = String::new();
    let cp = &status.control_plane;
    out.push_str("Control plane:\n");
    out.push_str(&format!("  Replica asked:    {}\n", cp.address));
    let leader = match (&cp.error, cp.leader.is_empty()) {
        (Some(e), _) => format!("unknown ({})", or_dash(e)),
        (None, true) => "none".to_string(),
        (None, false) => format!("{} (since version {})", cp.leader, cp.elected_version),
    };
    out.push_str(&format!("  Scheduler leader: {leader}\n"));
    if let Some(e) = &cp.replicas_error {
        out.push_str(&format!("  Registered:       unknown ({})\n", or_dash(e)));
    }
    if cp.replicas.is_empty() {
        out.push_str("  Replicas:         -\n");
    }
    if !cp.skipped_records.is_empty() {
        out.push_str(&format!(
            "  Skipped records:  {} (unreadable in etcd, served without)\n",
            cp.skipped_records.len()
        ));
    }
    for (index, replica) in cp.replicas.iter().enumerate() {
        let label = if index == 0 { "Replicas:" } else { "" };
        let mut notes = vec![plural(replica.agents, "agent", "agents")];
        if replica.leader {
            notes.insert(0, "leader".to_string());
        }
        let address = if replica.address.is_empty() {
            "(not registered)"
        } else {
            replica.address.as_str()
        };
        out.push_str(&format!(
            "  {label:<17} {} {address} ({})\n",
            or_dash(&replica.replica),
            notes.join(", ")
        ));
    }

    out.push_str("\nAgents:\n");
    if let Some(e) = &status.agents.error {
        out.push_str(&format!("  unavailable: {}\n", or_dash(e)));
    } else if status.agents.regions.is_empty() {
        out.push_str("  no agents connected\n");
    } else {
        let rows: Vec<Vec<String>> = status
            .agents
            .regions
            .iter()
            .map(|r| {
                let sync = if r.lagging.is_empty() {
                    format!("in sync (version {})", r.newest_version)
                } else {
                    let (unacked, acked): (Vec<&LaggingAgent>, Vec<&LaggingAgent>) =
                        r.lagging.iter().partition(|l| l.acked_version == 0);
                    let (behind, waiting): (Vec<&LaggingAgent>, Vec<&LaggingAgent>) =
                        acked.into_iter().partition(|l| l.behind > 0);
                    let mut parts = Vec::new();
                    if !behind.is_empty() {
                        let worst = behind.iter().map(|l| l.behind).max().unwrap_or(0);
                        let by = if behind.len() == 1 { "by" } else { "by up to" };
                        parts.push(format!(
                            "{} lagging {by} {}",
                            behind.len(),
                            plural(usize::try_from(worst).unwrap_or(0), "version", "versions")
                        ));
                    }
                    if !unacked.is_empty() {
                        parts.push(format!("{} with no ack yet", unacked.len()));
                    }
                    if !waiting.is_empty() {
                        parts.push(format!("{} waiting for sidecars", waiting.len()));
                    }
                    format!("{} (newest {})", parts.join(", "), r.newest_version)
                };
                vec![
                    r.region.clone(),
                    r.agents.to_string(),
                    format!("{}/{}", r.in_sync, r.agents),
                    format!("{}/{}", r.sidecars_in_sync, r.sidecars),
                    sync,
                    or_dash(&r.last_nack),
                ]
            })
            .collect();
        out.push_str(&indent(&table(
            &[
                "REGION",
                "AGENTS",
                "IN-SYNC",
                "SIDECARS",
                "STATE",
                "LAST-NACK",
            ],
            &rows,
        )));
    }

    out.push_str("\nFunctions:\n");
    if let Some(e) = &status.functions.error {
        out.push_str(&format!("  unavailable: {}\n", or_dash(e)));
    }
    if status.functions.functions.is_empty() {
        if status.functions.error.is_none() {
            out.push_str("  no functions\n");
        }
    } else {
        let mut rows = Vec::new();
        for f in &status.functions.functions {
            let regions = if f.unplaced && f.regions.is_empty() {
                "waiting for the scheduler".to_string()
            } else if f.regions.is_empty() {
                "-".to_string()
            } else {
                f.regions
                    .iter()
                    .map(region_cell)
                    .collect::<Vec<_>>()
                    .join("  ")
            };
            rows.push(vec![
                format!("{}/{}", f.namespace, f.name),
                f.kind.clone(),
                regions,
            ]);
            for p in &f.problems {
                rows.push(vec![
                    String::new(),
                    String::new(),
                    format!("{} not placed: {}", p.region, or_dash(&p.reason)),
                ]);
            }
        }
        out.push_str(&indent(&table(
            &["FUNCTION", "KIND", "READY/DESIRED"],
            &rows,
        )));
    }
    out.push('\n');
    out.push_str(&or_dash(&status.verdict));
    out.push('\n');
    out
}

pub fn status_json(status: &Status) -> Result<String, OutputError> {
    to_json(status)
}

pub fn status_yaml(status: &Status) -> Result<String, OutputError> {
    to_yaml(status)
}
