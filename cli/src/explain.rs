//! `meridianctl explain --from REGION FUNCTION`: where the next request for a function from a
//! region would go, and why. The answer comes from the region's sidecars themselves (their live
//! routing state, through `AgentApiService.Explain` on each of the region's agents), never from
//! a model of routing in the CLI: this module only finds the agents and renders what they say.

use std::io::Write;

use meridian_proto::v1 as wire;
use meridian_proto::v1::agent_api_service_client::AgentApiServiceClient;
use serde::Serialize;
use thiserror::Error;
use tonic::Code;

use crate::args::ExplainArgs;
use crate::client::{dial, reason, ControlPlane};
use crate::commands::CommandError;
use crate::logs::{targets, AgentTarget};
use crate::output::{or_dash, table, to_json, to_yaml, Format, OutputError};

#[derive(Debug, Error)]
pub enum ExplainError {
    #[error("no agent is connected in region {region:?}{}", known_regions(.known))]
    UnknownRegion { region: String, known: Vec<String> },
    #[error(
        "none of the {count} agent(s) in region {region} advertises an API address (agent flag \
         --api-address), so none can be asked"
    )]
    NoApiAddress { count: usize, region: String },
    /// Rendered already; nothing could explain the function.
    #[error("no sidecar in region {region} could explain {namespace}/{name}")]
    NoExplanation {
        region: String,
        namespace: String,
        name: String,
    },
}

fn known_regions(known: &[String]) -> String {
    if known.is_empty() {
        " (no agent is connected at all)".to_owned()
    } else {
        format!(" (regions with agents: {})", known.join(", "))
    }
}

/// Everything `explain` shows: per agent of the region, per sidecar, the explanation or why
/// there is none.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub namespace: String,
    pub name: String,
    pub region: String,
    pub agents: Vec<AgentReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentReport {
    pub agent: String,
    pub address: String,
    /// Why the agent could not be asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub sidecars: Vec<SidecarReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarReport {
    pub sidecar: String,
    pub admin_address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explanation: Option<Explanation>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub table_version: i64,
    pub local_generation: u64,
    pub table_age_ms: u64,
    pub function_version: i64,
    pub workload: String,
    pub cold_start_ms: u64,
    pub held: u32,
    pub tiers: Vec<Tier>,
    pub next: Decision,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Tier {
    pub region: String,
    pub local: bool,
    pub order: String,
    pub priority: Option<u32>,
    pub ready_instances: u32,
    pub health_percent: f64,
    pub share_percent: f64,
    pub available: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub address: String,
    pub id: String,
    pub state: String,
    pub available: bool,
    pub ejected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ejected_for_ms: Option<u64>,
    pub consecutive_failures: u32,
    pub ejections: u64,
    pub in_flight: u64,
    pub ewma_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    pub action: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub region: String,
    pub local: bool,
    pub candidates: Vec<String>,
    pub reason: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

fn non_empty(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_owned())
}

impl From<&wire::Explanation> for Explanation {
    fn from(e: &wire::Explanation) -> Self {
        let decision = e.decision.clone().unwrap_or_default();
        Explanation {
            table_version: e.table_version,
            local_generation: e.local_generation,
            table_age_ms: e.table_age_ms,
            function_version: e.function_version,
            workload: e.workload.clone(),
            cold_start_ms: e.cold_start_ms,
            held: e.held,
            tiers: e
                .tiers
                .iter()
                .map(|t| Tier {
                    region: t.region.clone(),
                    local: t.local,
                    order: t.order.clone(),
                    priority: t.priority,
                    ready_instances: t.ready_instances,
                    health_percent: f64::from(t.health_permille) / 10.0,
                    share_percent: f64::from(t.load_permille) / 10.0,
                    available: t.available,
                    note: t.note.clone(),
                    endpoints: t
                        .endpoints
                        .iter()
                        .map(|p| Endpoint {
                            address: p.address.clone(),
                            id: p.id.clone(),
                            state: p.state.clone(),
                            available: p.available,
                            ejected: p.ejected,
                            ejected_for_ms: p.ejected.then_some(p.ejected_for_ms),
                            consecutive_failures: p.consecutive_failures,
                            ejections: p.ejections,
                            in_flight: p.in_flight,
                            ewma_ms: round2(p.ewma_ms),
                            probe: non_empty(&p.probe),
                            rtt_ms: p.rtt_ms.map(round2),
                            probe_error: non_empty(&p.probe_error),
                        })
                        .collect(),
                })
                .collect(),
            next: Decision {
                action: decision.action,
                region: decision.region,
                local: decision.local,
                candidates: decision.candidates,
                reason: decision.reason,
                error: decision.error,
            },
        }
    }
}

/// One agent's answer (or why there is none) as a report section.
pub fn agent_report(
    target: &AgentTarget,
    answer: Result<wire::ExplainResponse, String>,
) -> AgentReport {
    match answer {
        Ok(response) => AgentReport {
            agent: target.agent_id.clone(),
            address: target.address.clone(),
            error: None,
            sidecars: response
                .sidecars
                .iter()
                .map(|s| SidecarReport {
                    sidecar: s.sidecar.clone(),
                    admin_address: s.admin_address.clone(),
                    error: match (&s.explanation, s.error.is_empty()) {
                        (Some(_), _) => None,
                        (None, true) => Some("no explanation".to_owned()),
                        (None, false) => Some(s.error.clone()),
                    },
                    explanation: s.explanation.as_ref().map(Explanation::from),
                })
                .collect(),
        },
        Err(why) => AgentReport {
            agent: target.agent_id.clone(),
            address: target.address.clone(),
            error: Some(why),
            sidecars: Vec::new(),
        },
    }
}

impl Report {
    /// Whether any sidecar explained the function.
    pub fn explained(&self) -> bool {
        self.agents
            .iter()
            .flat_map(|a| &a.sidecars)
            .any(|s| s.explanation.is_some())
    }
}

fn percent(value: f64) -> String {
    format!("{value}%")
}

fn ms(value: f64) -> String {
    if value >= 1000.0 {
        format!("{:.1}s", value / 1000.0)
    } else if value >= 10.0 {
        format!("{value:.0}ms")
    } else {
        format!("{value:.1}ms")
    }
}

/// An endpoint's health in a few words: `ok`, `ejected 1.2s (5 failures)`, `down: why`.
fn endpoint_health(e: &Endpoint) -> String {
    if e.ejected {
        let left = e
            .ejected_for_ms
            .map_or(String::new(), |left| format!(" {}", ms(left as f64)));
        return format!("ejected{left} ({} ejections)", e.ejections);
    }
    if e.probe.as_deref() == Some("down") {
        return match &e.probe_error {
            Some(why) => format!("down: {why}"),
            None => "down".to_owned(),
        };
    }
    if !e.available {
        return format!("not routable ({})", e.state);
    }
    if e.consecutive_failures > 0 {
        return format!("ok ({} failures in a row)", e.consecutive_failures);
    }
    "ok".to_owned()
}

/// The text rendering: per sidecar, the tiers as a table, the endpoints as a table, and the
/// decision on a line of its own.
pub fn report_text(report: &Report) -> String {
    let mut out = format!(
        "Function {}/{} from region {}\n",
        report.namespace, report.name, report.region
    );
    for agent in &report.agents {
        if let Some(error) = &agent.error {
            out.push_str(&format!(
                "\nagent {} at {}: {error}\n",
                agent.agent, agent.address
            ));
            continue;
        }
        if agent.sidecars.is_empty() {
            out.push_str(&format!(
                "\nagent {} at {}: no sidecar is watching this agent, so none can explain\n",
                agent.agent, agent.address
            ));
            continue;
        }
        for sidecar in &agent.sidecars {
            out.push_str(&format!(
                "\nSidecar {} (admin {}) via agent {}",
                sidecar.sidecar, sidecar.admin_address, agent.agent
            ));
            let Some(e) = &sidecar.explanation else {
                out.push_str(&format!(
                    ": {}\n",
                    sidecar.error.as_deref().unwrap_or("no explanation")
                ));
                continue;
            };
            out.push_str(&format!(
                "\nTable version {} (local generation {}, applied {} ago); function version {}, \
                 workload {}, cold start {}, held now {}\n\n",
                e.table_version,
                e.local_generation,
                ms(e.table_age_ms as f64),
                e.function_version,
                e.workload,
                if e.cold_start_ms == 0 {
                    "unknown".to_owned()
                } else {
                    ms(e.cold_start_ms as f64)
                },
                e.held
            ));
            let mut tiers: Vec<&Tier> = e.tiers.iter().collect();
            tiers.sort_by_key(|t| t.priority.unwrap_or(u32::MAX));
            let rows: Vec<Vec<String>> = tiers
                .iter()
                .map(|t| {
                    vec![
                        t.priority.map_or("-".to_owned(), |p| p.to_string()),
                        t.region.clone(),
                        if t.local { "local" } else { "remote" }.to_owned(),
                        t.order.clone(),
                        format!("{}/{}", t.available, t.endpoints.len()),
                        t.ready_instances.to_string(),
                        percent(t.health_percent),
                        percent(t.share_percent),
                        or_dash(&t.note),
                    ]
                })
                .collect();
            out.push_str(&table(
                &[
                    "PRIORITY",
                    "TIER",
                    "KIND",
                    "ORDER",
                    "AVAILABLE",
                    "READY",
                    "HEALTH",
                    "SHARE",
                    "NOTE",
                ],
                &rows,
            ));
            out.push('\n');
            let rows: Vec<Vec<String>> = tiers
                .iter()
                .flat_map(|t| t.endpoints.iter().map(move |p| (t, p)))
                .map(|(t, p)| {
                    vec![
                        t.region.clone(),
                        p.address.clone(),
                        or_dash(&p.id),
                        p.state.clone(),
                        p.in_flight.to_string(),
                        ms(p.ewma_ms),
                        p.rtt_ms.map_or("-".to_owned(), ms),
                        or_dash(&endpoint_health(p)),
                    ]
                })
                .collect();
            out.push_str(&table(
                &[
                    "TIER",
                    "ENDPOINT",
                    "ID",
                    "STATE",
                    "IN-FLIGHT",
                    "EWMA",
                    "RTT",
                    "HEALTH",
                ],
                &rows,
            ));
            out.push('\n');
            out.push_str(&decision_line(&e.next));
        }
    }
    out
}

/// `Next request → eu-west (remote) because ...`, plus the candidates.
fn decision_line(d: &Decision) -> String {
    match d.action.as_str() {
        "route" => {
            let kind = if d.local { "local" } else { "remote" };
            let mut line = format!(
                "Next request → {} ({kind}) because {}\n",
                d.region, d.reason
            );
            if !d.candidates.is_empty() {
                line.push_str(&format!("  candidates: {}\n", d.candidates.join(", ")));
            }
            line
        }
        "hold" => format!("Next request → held here because {}\n", d.reason),
        "fail" => format!(
            "Next request → fails at once (503 {}) because {}\n",
            or_dash(&d.error),
            d.reason
        ),
        other => format!("Next request → {other} because {}\n", d.reason),
    }
}

pub fn report_json(report: &Report) -> Result<String, OutputError> {
    to_json(report)
}

pub fn report_yaml(report: &Report) -> Result<String, OutputError> {
    to_yaml(report)
}

/// Asks one agent; a failure is one line.
async fn ask(
    target: &AgentTarget,
    request: wire::ExplainRequest,
) -> Result<wire::ExplainResponse, String> {
    let channel = dial(&target.address)
        .await
        .map_err(|e| format!("unreachable: {e}"))?;
    AgentApiServiceClient::new(channel)
        .explain(request)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| match status.code() {
            Code::Unimplemented => {
                "this agent cannot explain (it predates AgentApiService.Explain)".to_owned()
            }
            code => format!("Error from agent ({}): {}", reason(code), status.message()),
        })
}

/// Runs `explain`: checks the function and the region with the control plane, asks each of the
/// region's agents, renders. Fails (exit 1) when no sidecar could explain.
pub async fn run(
    control_plane_address: &str,
    namespace: &str,
    args: &ExplainArgs,
    out: &mut dyn Write,
) -> Result<(), CommandError> {
    let control_plane = ControlPlane::connect(control_plane_address).await?;
    match control_plane.get_function(namespace, &args.name).await {
        Ok(_) => {}
        Err(error) if error.server_code() == Some(Code::NotFound) => {
            return Err(CommandError::NotFound {
                namespace: namespace.to_owned(),
                name: args.name.clone(),
            })
        }
        Err(error) => return Err(error.into()),
    }
    let agents = control_plane.list_agents(&args.from).await?.agents;
    if agents.is_empty() {
        let mut known: Vec<String> = control_plane
            .list_agents("")
            .await?
            .agents
            .into_iter()
            .map(|a| a.region)
            .collect();
        known.sort();
        known.dedup();
        return Err(ExplainError::UnknownRegion {
            region: args.from.clone(),
            known,
        }
        .into());
    }
    let targets = targets(&agents);
    if targets.is_empty() {
        return Err(ExplainError::NoApiAddress {
            count: agents.len(),
            region: args.from.clone(),
        }
        .into());
    }
    let request = wire::ExplainRequest {
        namespace: namespace.to_owned(),
        name: args.name.clone(),
    };
    // Together: an unreachable agent must not make the others wait for its timeout.
    let answers =
        futures::future::join_all(targets.iter().map(|target| ask(target, request.clone()))).await;
    let report = Report {
        namespace: namespace.to_owned(),
        name: args.name.clone(),
        region: args.from.clone(),
        agents: targets
            .iter()
            .zip(answers)
            .map(|(target, answer)| agent_report(target, answer))
            .collect(),
    };
    let rendered = match args.output {
        Format::Table => report_text(&report),
        Format::Json => report_json(&report)?,
        Format::Yaml => report_yaml(&report)?,
    };
    out.write_all(rendered.as_bytes())?;
    out.flush()?;
    if report.explained() {
        Ok(())
    } else {
        Err(ExplainError::NoExplanation {
            region: args.from.clone(),
            namespace: namespace.to_owned(),
            name: args.name.clone(),
        }
        .into())
    }
}
