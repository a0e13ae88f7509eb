//! Rendering: wire types in, text out. Nothing here talks to the network or reads the clock
//! (callers pass `now`), so every format is covered by golden tests.
//!
//! Functions are written in the manifest shape users apply (see [`crate::manifest`]), so
//! `get -o yaml > f.yaml && apply -f f.yaml` works. Agents and routing tables are written as a
//! field-for-field mirror of the proto messages with their JSON (lowerCamelCase) names and enum
//! names as strings; unlike canonical proto JSON, 64-bit integers are numbers, not strings.

use std::collections::BTreeMap;

use meridian_proto::v1 as wire;
use serde::{Serialize, Serializer};
use thiserror::Error;

use crate::duration::{format_age_ms, format_ms};
use crate::instances::{describe_scale, ScaleSection};
use crate::manifest::Manifest;

#[derive(Debug, Error)]
pub enum OutputError {
    #[error("cannot write JSON: {source}")]
    Json {
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write YAML: {source}")]
    Yaml {
        #[source]
        source: serde_yaml_ng::Error,
    },
}

/// `-o` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    #[default]
    #[value(alias = "text")]
    Table,
    Json,
    Yaml,
}

/// The resource name kubectl-style lines use: `function.meridian.dev/hello`.
pub fn function_ref(name: &str) -> String {
    format!("function.meridian.dev/{name}")
}

/// `function.meridian.dev/hello created` (or configured, unchanged).
pub fn apply_line(name: &str, outcome: i32, dry_run: bool) -> String {
    let verb = match wire::ApplyOutcome::try_from(outcome) {
        Ok(wire::ApplyOutcome::Created) => "created",
        Ok(wire::ApplyOutcome::Configured) => "configured",
        Ok(wire::ApplyOutcome::Unchanged) => "unchanged",
        Ok(wire::ApplyOutcome::Unspecified) | Err(_) => "applied",
    };
    let suffix = if dry_run { " (server dry run)" } else { "" };
    format!("{} {verb}{suffix}\n", function_ref(name))
}

/// `function.meridian.dev/hello deleted`.
pub fn delete_line(name: &str) -> String {
    format!("{} deleted\n", function_ref(name))
}

/// Columns padded to their widest cell, three spaces apart, like kubectl. The last column is
/// not padded so that lines carry no trailing blanks.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count() + 3;
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub(crate) fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        // A cell must stay on one line.
        s.replace(['\n', '\r', '\t'], " ")
    }
}

pub(crate) fn namespace_of(spec: &wire::FunctionSpec) -> &str {
    if spec.namespace.is_empty() {
        "default"
    } else {
        &spec.namespace
    }
}

fn sorted_functions(functions: &[wire::Function]) -> Vec<(&wire::Function, &wire::FunctionSpec)> {
    static EMPTY: std::sync::OnceLock<wire::FunctionSpec> = std::sync::OnceLock::new();
    let empty = EMPTY.get_or_init(wire::FunctionSpec::default);
    let mut out: Vec<_> = functions
        .iter()
        .map(|f| (f, f.spec.as_ref().unwrap_or(empty)))
        .collect();
    out.sort_by(|a, b| (namespace_of(a.1), &a.1.name).cmp(&(namespace_of(b.1), &b.1.name)));
    out
}

fn runtime_kind(spec: &wire::FunctionSpec) -> &'static str {
    match spec.runtime {
        Some(wire::function_spec::Runtime::Process(_)) => "process",
        Some(wire::function_spec::Runtime::External(_)) => "external",
        None => "-",
    }
}

/// Where a function runs: for `external`, the regions that list URLs; for `process`, its
/// placement (`all`, or the listed regions).
fn regions_summary(spec: &wire::FunctionSpec) -> String {
    let regions: Vec<&str> = match (&spec.runtime, &spec.placement) {
        (Some(wire::function_spec::Runtime::External(e)), _) => {
            e.regions.iter().map(|r| r.region.as_str()).collect()
        }
        (_, Some(p)) if p.all_regions => return "all".to_string(),
        (_, Some(p)) => p.regions.iter().map(|r| r.region.as_str()).collect(),
        (_, None) => Vec::new(),
    };
    if regions.is_empty() {
        "-".to_string()
    } else {
        regions.join(",")
    }
}

/// `get functions`: NAMESPACE (with -A), NAME, RUNTIME, REGIONS, VERSION.
pub fn functions_table(functions: &[wire::Function], all_namespaces: bool) -> String {
    let mut headers = vec!["NAME", "RUNTIME", "REGIONS", "VERSION"];
    if all_namespaces {
        headers.insert(0, "NAMESPACE");
    }
    let rows: Vec<Vec<String>> = sorted_functions(functions)
        .into_iter()
        .map(|(function, spec)| {
            let mut row = vec![
                or_dash(&spec.name),
                runtime_kind(spec).to_string(),
                regions_summary(spec),
                function.version.to_string(),
            ];
            if all_namespaces {
                row.insert(0, namespace_of(spec).to_string());
            }
            row
        })
        .collect();
    table(&headers, &rows)
}

/// One function as a manifest (JSON object).
pub fn function_json(function: &wire::Function) -> Result<String, OutputError> {
    to_json(&Manifest::from_function(function))
}

/// Several functions as a JSON array of manifests (what `apply -f` reads back).
pub fn functions_json(functions: &[wire::Function]) -> Result<String, OutputError> {
    let manifests: Vec<Manifest> = sorted_functions(functions)
        .into_iter()
        .map(|(f, _)| Manifest::from_function(f))
        .collect();
    to_json(&manifests)
}

/// Functions as YAML documents separated by `---` (what `apply -f` reads back).
pub fn functions_yaml(functions: &[wire::Function]) -> Result<String, OutputError> {
    let mut out = String::new();
    for (i, (function, _)) in sorted_functions(functions).into_iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&to_yaml(&Manifest::from_function(function))?);
    }
    Ok(out)
}

/// `get agents`' SIDECARS: loaded the newest table / connected, and "!" when one of them
/// reports a table it cannot load.
fn sidecars_cell(agent: &wire::AgentStatus) -> String {
    let connected = agent.sidecars.iter().filter(|s| s.connected).count();
    let failing = agent.sidecars.iter().any(|s| !s.error.is_empty());
    format!(
        "{}/{connected}{}",
        agent.sidecars_in_sync,
        if failing { " (failing)" } else { "" }
    )
}

/// `get agents`: REGION, AGENT, ZONE, CLOUD, GATEWAY, REPLICA, ACKED, NEWEST, IN-SYNC,
/// SIDECARS (in sync / connected), CONNECTED (time since the stream opened), LAST-NACK.
pub fn agents_table(agents: &[wire::AgentStatus], now_unix_ms: i64) -> String {
    let mut sorted: Vec<&wire::AgentStatus> = agents.iter().collect();
    sorted.sort_by(|a, b| (&a.region, &a.agent_id).cmp(&(&b.region, &b.agent_id)));
    let rows: Vec<Vec<String>> = sorted
        .into_iter()
        .map(|a| {
            vec![
                or_dash(&a.region),
                or_dash(&a.agent_id),
                or_dash(&a.zone),
                or_dash(&a.cloud),
                or_dash(&a.gateway),
                or_dash(&a.replica),
                if a.acked_version == 0 {
                    "-".to_string()
                } else {
                    a.acked_version.to_string()
                },
                a.newest_version.to_string(),
                if a.in_sync { "yes" } else { "no" }.to_string(),
                sidecars_cell(a),
                if a.connected_since_unix_ms == 0 {
                    "-".to_string()
                } else {
                    format_age_ms(now_unix_ms - a.connected_since_unix_ms)
                },
                or_dash(&a.last_nack),
            ]
        })
        .collect();
    table(
        &[
            "REGION",
            "AGENT",
            "ZONE",
            "CLOUD",
            "GATEWAY",
            "REPLICA",
            "ACKED",
            "NEWEST",
            "IN-SYNC",
            "SIDECARS",
            "CONNECTED",
            "LAST-NACK",
        ],
        &rows,
    )
}

pub fn agents_json(response: &wire::ListAgentsResponse) -> Result<String, OutputError> {
    to_json(&AgentsView::from(response))
}

pub fn agents_yaml(response: &wire::ListAgentsResponse) -> Result<String, OutputError> {
    to_yaml(&AgentsView::from(response))
}

fn tier_order(order: i32) -> &'static str {
    match wire::TierOrder::try_from(order) {
        Ok(wire::TierOrder::Local) => "local",
        Ok(wire::TierOrder::Explicit) => "explicit",
        Ok(wire::TierOrder::Measured) => "measured",
        Ok(wire::TierOrder::Unspecified) | Err(_) => "-",
    }
}

/// Endpoint addresses, comma separated; the state follows those not ready: `a:1(starting)`.
fn endpoints_summary(endpoints: &[wire::Endpoint]) -> String {
    if endpoints.is_empty() {
        return "-".to_string();
    }
    endpoints
        .iter()
        .map(|e| match wire::EndpointState::try_from(e.state) {
            Ok(wire::EndpointState::Ready) => e.address.clone(),
            Ok(wire::EndpointState::Starting) => format!("{}(starting)", e.address),
            Ok(wire::EndpointState::Draining) => format!("{}(draining)", e.address),
            Ok(wire::EndpointState::Unspecified) | Err(_) => format!("{}(unknown)", e.address),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `get routes REGION`: a `region R, version V` line, then one row per function and tier:
/// FUNCTION (namespace/name), TIER, REGION, ORDER, ENDPOINTS.
pub fn routes_table(routing: &wire::RoutingTable) -> String {
    let mut out = format!(
        "region {}, version {}\n",
        or_dash(&routing.region),
        routing.version
    );
    if routing.functions.is_empty() {
        out.push_str("No functions are routed in this region.\n");
        return out;
    }
    let mut rows = Vec::new();
    for route in &routing.functions {
        let function = format!(
            "{}/{}",
            if route.namespace.is_empty() {
                "default"
            } else {
                &route.namespace
            },
            route.name
        );
        if route.tiers.is_empty() {
            rows.push(vec![
                function.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for (i, tier) in route.tiers.iter().enumerate() {
            rows.push(vec![
                function.clone(),
                i.to_string(),
                or_dash(&tier.region),
                tier_order(tier.order).to_string(),
                endpoints_summary(&tier.endpoints),
            ]);
        }
    }
    out.push_str(&table(
        &["FUNCTION", "TIER", "REGION", "ORDER", "ENDPOINTS"],
        &rows,
    ));
    out
}

pub fn routes_json(routing: &wire::RoutingTable) -> Result<String, OutputError> {
    to_json(&RoutingTableView::from(routing))
}

pub fn routes_yaml(routing: &wire::RoutingTable) -> Result<String, OutputError> {
    to_yaml(&RoutingTableView::from(routing))
}

/// The routing tables `describe function` shows, per region.
#[derive(Debug, Clone)]
pub enum RoutesSection {
    /// The mesh could not be asked (the message says why); the spec is still described.
    Unavailable(String),
    /// Each region's table, or why there is none, sorted by region.
    Regions(Vec<RegionRoutes>),
}

#[derive(Debug, Clone)]
pub struct RegionRoutes {
    pub region: String,
    pub table: Result<wire::RoutingTable, String>,
}

/// `describe function`: an aligned `Key: value` block like kubectl's, then the function's tiers
/// in each region's routing table, then (process functions) where the scheduler placed it and
/// each agent's scale state.
pub fn describe_function(
    function: &wire::Function,
    routes: &RoutesSection,
    scale: &ScaleSection,
    now_unix_ms: i64,
) -> String {
    let default_spec = wire::FunctionSpec::default();
    let spec = function.spec.as_ref().unwrap_or(&default_spec);
    let mut d = Describe::default();
    d.kv(0, "Name", &spec.name);
    d.kv(0, "Namespace", namespace_of(spec));
    d.kv(0, "Labels", &pairs(&spec.labels));
    d.kv(0, "Version", &function.version.to_string());
    d.kv(0, "Created Version", &function.created_version.to_string());

    match &spec.runtime {
        Some(wire::function_spec::Runtime::External(e)) => {
            d.kv(0, "Runtime", "external");
            if e.regions.is_empty() {
                d.kv(1, "Regions", "<none>");
            }
            for region in &e.regions {
                d.kv(1, &region.region, &region.urls.join("\n"));
            }
        }
        Some(wire::function_spec::Runtime::Process(p)) => {
            d.kv(0, "Runtime", "process");
            d.kv(1, "Command", &p.command);
            let args: Vec<String> = p.args.iter().map(|a| shell_word(a)).collect();
            d.kv(1, "Args", &args.join(" "));
            d.kv(1, "Env", &pairs(&p.env));
            d.kv(1, "Readiness Path", &p.readiness_path);
        }
        None => d.kv(0, "Runtime", "<none>"),
    }

    match &spec.placement {
        Some(p) if p.all_regions => d.kv(0, "Placement", "all regions"),
        Some(p) if !p.regions.is_empty() => {
            d.kv(0, "Placement", "regions");
            for r in &p.regions {
                d.kv(
                    1,
                    &r.region,
                    &format!(
                        "min {}, max {} instances",
                        opt(r.min_instances),
                        opt(r.max_instances)
                    ),
                );
            }
        }
        _ => d.kv(0, "Placement", "<none>"),
    }

    match &spec.scaling {
        Some(s) => {
            d.kv(0, "Scaling", "");
            d.kv(1, "Min Instances", &opt(s.min_instances));
            d.kv(1, "Max Instances", &opt(s.max_instances));
            d.kv(1, "Target Concurrency", &opt(s.target_concurrency));
            d.kv(1, "Idle Seconds", &opt(s.idle_seconds));
        }
        None => d.kv(0, "Scaling", "<none>"),
    }

    match &spec.routing {
        Some(r) => {
            d.kv(0, "Routing", "");
            d.kv(1, "Timeout", &r.timeout_ms.map_or(UNSET.into(), format_ms));
            d.kv(
                1,
                "Per-Try Timeout",
                &r.per_try_timeout_ms.map_or(UNSET.into(), format_ms),
            );
            d.kv(1, "Max Retries", &opt(r.max_retries));
            d.kv(1, "Retryable Methods", &r.retryable_methods.join(", "));
            d.kv(1, "Failover Order", &r.failover_order.join(", "));
        }
        None => d.kv(0, "Routing", "<none>"),
    }

    match routes {
        RoutesSection::Unavailable(why) => d.kv(0, "Routes", &format!("<unavailable: {why}>")),
        RoutesSection::Regions(regions) if regions.is_empty() => d.kv(0, "Routes", "<no regions>"),
        RoutesSection::Regions(regions) => {
            d.kv(0, "Routes", "");
            for region in regions {
                describe_region_routes(&mut d, spec, region);
            }
        }
    }
    describe_scale(&mut d, scale, now_unix_ms);
    d.render()
}

fn describe_region_routes(d: &mut Describe, spec: &wire::FunctionSpec, region: &RegionRoutes) {
    let routing = match &region.table {
        Ok(routing) => routing,
        Err(why) => {
            d.kv(1, &region.region, &format!("<{why}>"));
            return;
        }
    };
    let namespace = namespace_of(spec);
    let route = routing.functions.iter().find(|r| {
        r.name == spec.name
            && (r.namespace == namespace || (r.namespace.is_empty() && namespace == "default"))
    });
    let title = format!("table version {}", routing.version);
    let Some(route) = route else {
        d.kv(1, &region.region, &format!("not routed ({title})"));
        return;
    };
    d.kv(1, &region.region, &title);
    let rows: Vec<Vec<String>> = route
        .tiers
        .iter()
        .enumerate()
        .map(|(i, tier)| {
            vec![
                i.to_string(),
                or_dash(&tier.region),
                tier_order(tier.order).to_string(),
                tier.ready_instances.to_string(),
                endpoints_summary(&tier.endpoints),
            ]
        })
        .collect();
    if rows.is_empty() {
        d.raw(2, "no tiers");
        return;
    }
    for line in table(&["TIER", "REGION", "ORDER", "READY", "ENDPOINTS"], &rows).lines() {
        d.raw(2, line);
    }
}

/// What an optional field that was never set (the server's default applies) shows as.
pub(crate) const UNSET: &str = "<unset>";

pub(crate) fn opt(value: Option<u32>) -> String {
    value.map_or(UNSET.into(), |v| v.to_string())
}

/// `k=v` pairs, sorted, one per line.
fn pairs(map: &std::collections::HashMap<String, String>) -> String {
    let sorted: BTreeMap<&String, &String> = map.iter().collect();
    sorted
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Quotes an argument that a shell would split or misread, so `Args:` reads unambiguously.
fn shell_word(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

enum DescribeLine {
    /// `key:` then the value aligned with its siblings; an empty value prints `<none>` unless
    /// the key opens a section.
    Kv {
        indent: usize,
        key: String,
        value: String,
    },
    Raw {
        indent: usize,
        text: String,
    },
}

impl DescribeLine {
    fn indent(&self) -> usize {
        match self {
            DescribeLine::Kv { indent, .. } | DescribeLine::Raw { indent, .. } => *indent,
        }
    }
}

/// kubectl-describe style text: values of sibling keys start in the same column; multi-line
/// values continue in that column.
#[derive(Default)]
pub(crate) struct Describe {
    lines: Vec<DescribeLine>,
}

impl Describe {
    pub(crate) fn kv(&mut self, indent: usize, key: &str, value: &str) {
        self.lines.push(DescribeLine::Kv {
            indent,
            key: key.to_string(),
            value: value.to_string(),
        });
    }

    pub(crate) fn raw(&mut self, indent: usize, text: &str) {
        self.lines.push(DescribeLine::Raw {
            indent,
            text: text.to_string(),
        });
    }

    /// Keys at the same indent align when only deeper lines separate them.
    fn key_width(&self, at: usize, indent: usize) -> usize {
        let in_block = |l: &DescribeLine| l.indent() >= indent;
        let start = self.lines[..at]
            .iter()
            .rposition(|l| !in_block(l))
            .map_or(0, |p| p + 1);
        let end = self.lines[at..]
            .iter()
            .position(|l| !in_block(l))
            .map_or(self.lines.len(), |p| at + p);
        self.lines[start..end]
            .iter()
            .filter_map(|l| match l {
                DescribeLine::Kv { indent: i, key, .. } if *i == indent => {
                    Some(key.chars().count() + 1)
                }
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        for (at, line) in self.lines.iter().enumerate() {
            match line {
                DescribeLine::Raw { indent, text } => {
                    out.push_str(&"  ".repeat(*indent));
                    out.push_str(text);
                    out.push('\n');
                }
                DescribeLine::Kv { indent, key, value } => {
                    let prefix = "  ".repeat(*indent);
                    let opens_section = self
                        .lines
                        .get(at + 1)
                        .is_some_and(|next| next.indent() > *indent);
                    if value.is_empty() && opens_section {
                        out.push_str(&format!("{prefix}{key}:\n"));
                        continue;
                    }
                    let width = self.key_width(at, *indent) + 2;
                    let value = if value.is_empty() { "<none>" } else { value };
                    for (i, part) in value.lines().enumerate() {
                        let label = if i == 0 {
                            format!("{key}:")
                        } else {
                            String::new()
                        };
                        let text = format!("{prefix}{label:<width$}{part}");
                        out.push_str(text.trim_end());
                        out.push('\n');
                    }
                }
            }
        }
        out
    }
}

pub(crate) fn to_json<T: Serialize>(value: &T) -> Result<String, OutputError> {
    serde_json::to_string_pretty(value)
        .map(|mut s| {
            s.push('\n');
            s
        })
        .map_err(|source| OutputError::Json { source })
}

pub(crate) fn to_yaml<T: Serialize>(value: &T) -> Result<String, OutputError> {
    serde_yaml_ng::to_string(value).map_err(|source| OutputError::Yaml { source })
}

/// An enum field: its proto name when known, else the number (as proto JSON does).
fn enum_name<S: Serializer>(
    name: Option<&'static str>,
    value: i32,
    s: S,
) -> Result<S::Ok, S::Error> {
    match name {
        Some(name) => s.serialize_str(name),
        None => s.serialize_i32(value),
    }
}

fn ser_tier_order<S: Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
    let name = wire::TierOrder::try_from(*value)
        .ok()
        .map(|v| v.as_str_name());
    enum_name(name, *value, s)
}

pub(crate) fn ser_endpoint_state<S: Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
    let name = wire::EndpointState::try_from(*value)
        .ok()
        .map(|v| v.as_str_name());
    enum_name(name, *value, s)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AgentsView<'a> {
    agents: Vec<AgentView<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AgentView<'a> {
    agent_id: &'a str,
    region: &'a str,
    zone: &'a str,
    cloud: &'a str,
    gateway: &'a str,
    connected_since_unix_ms: i64,
    acked_version: i64,
    newest_version: i64,
    in_sync: bool,
    last_nack: &'a str,
    replica: &'a str,
    api_address: &'a str,
    sidecars_in_sync: u32,
    sidecars: Vec<SidecarView<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SidecarView<'a> {
    sidecar: &'a str,
    connected: bool,
    loaded_version: i64,
    #[serde(skip_serializing_if = "str::is_empty")]
    error: &'a str,
}

impl<'a> From<&'a wire::ListAgentsResponse> for AgentsView<'a> {
    fn from(response: &'a wire::ListAgentsResponse) -> Self {
        let mut agents: Vec<&wire::AgentStatus> = response.agents.iter().collect();
        agents.sort_by(|a, b| (&a.region, &a.agent_id).cmp(&(&b.region, &b.agent_id)));
        AgentsView {
            agents: agents
                .into_iter()
                .map(|a| AgentView {
                    agent_id: &a.agent_id,
                    region: &a.region,
                    zone: &a.zone,
                    cloud: &a.cloud,
                    gateway: &a.gateway,
                    connected_since_unix_ms: a.connected_since_unix_ms,
                    acked_version: a.acked_version,
                    newest_version: a.newest_version,
                    in_sync: a.in_sync,
                    last_nack: &a.last_nack,
                    replica: &a.replica,
                    api_address: &a.api_address,
                    sidecars_in_sync: a.sidecars_in_sync,
                    sidecars: a
                        .sidecars
                        .iter()
                        .map(|s| SidecarView {
                            sidecar: &s.sidecar,
                            connected: s.connected,
                            loaded_version: s.loaded_version,
                            error: &s.error,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RoutingTableView<'a> {
    version: i64,
    region: &'a str,
    functions: Vec<FunctionRouteView<'a>>,
    local_generation: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FunctionRouteView<'a> {
    namespace: &'a str,
    name: &'a str,
    function_version: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<RoutingPolicyView<'a>>,
    tiers: Vec<TierView<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    workload: Option<LocalWorkloadView<'a>>,
    cold_start_ms: u32,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LocalWorkloadView<'a> {
    // Flattened: `{process: {...}, scale: {...}}` as in proto JSON, rather than YAML's
    // `!process` tag.
    #[serde(flatten)]
    kind: Option<WorkloadView<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scale: Option<ScaleBoundsView>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ScaleBoundsView {
    min_instances: u32,
    max_instances: u32,
    target_concurrency: u32,
    idle_seconds: u32,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RoutingPolicyView<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout_ms: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    per_try_timeout_ms: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_retries: Option<u32>,
    retryable_methods: &'a [String],
    failover_order: &'a [String],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TierView<'a> {
    region: &'a str,
    local: bool,
    endpoints: Vec<EndpointView<'a>>,
    #[serde(serialize_with = "ser_tier_order")]
    order: i32,
    ready_instances: u32,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EndpointView<'a> {
    address: &'a str,
    id: &'a str,
    #[serde(serialize_with = "ser_endpoint_state")]
    state: i32,
    zone: &'a str,
}

/// The `LocalWorkload.kind` oneof, named by its field as in proto JSON.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
enum WorkloadView<'a> {
    External {
        region: &'a str,
        urls: &'a [String],
    },
    Process {
        command: &'a str,
        args: &'a [String],
        env: BTreeMap<&'a str, &'a str>,
        #[serde(rename = "readinessPath")]
        readiness_path: &'a str,
    },
}

impl<'a> From<&'a wire::RoutingTable> for RoutingTableView<'a> {
    fn from(routing: &'a wire::RoutingTable) -> Self {
        RoutingTableView {
            version: routing.version,
            region: &routing.region,
            functions: routing
                .functions
                .iter()
                .map(FunctionRouteView::from)
                .collect(),
            local_generation: routing.local_generation,
        }
    }
}

impl<'a> From<&'a wire::FunctionRoute> for FunctionRouteView<'a> {
    fn from(route: &'a wire::FunctionRoute) -> Self {
        FunctionRouteView {
            namespace: &route.namespace,
            name: &route.name,
            function_version: route.function_version,
            policy: route.policy.as_ref().map(|p| RoutingPolicyView {
                timeout_ms: p.timeout_ms,
                per_try_timeout_ms: p.per_try_timeout_ms,
                max_retries: p.max_retries,
                retryable_methods: &p.retryable_methods,
                failover_order: &p.failover_order,
            }),
            tiers: route
                .tiers
                .iter()
                .map(|t| TierView {
                    region: &t.region,
                    local: t.local,
                    endpoints: t
                        .endpoints
                        .iter()
                        .map(|e| EndpointView {
                            address: &e.address,
                            id: &e.id,
                            state: e.state,
                            zone: &e.zone,
                        })
                        .collect(),
                    order: t.order,
                    ready_instances: t.ready_instances,
                })
                .collect(),
            workload: route.workload.as_ref().map(|w| LocalWorkloadView {
                kind: w.kind.as_ref().map(|kind| match kind {
                    wire::local_workload::Kind::External(e) => WorkloadView::External {
                        region: &e.region,
                        urls: &e.urls,
                    },
                    wire::local_workload::Kind::Process(p) => WorkloadView::Process {
                        command: &p.command,
                        args: &p.args,
                        env: p
                            .env
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.as_str()))
                            .collect(),
                        readiness_path: &p.readiness_path,
                    },
                }),
                scale: w.scale.as_ref().map(|b| ScaleBoundsView {
                    min_instances: b.min_instances,
                    max_instances: b.max_instances,
                    target_concurrency: b.target_concurrency,
                    idle_seconds: b.idle_seconds,
                }),
            }),
            cold_start_ms: route.cold_start_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_pads_all_but_the_last_column() {
        let out = table(
            &["A", "LONGER"],
            &[vec!["xxxx".into(), "1".into()], vec!["y".into(), "".into()]],
        );
        assert_eq!(out, "A      LONGER\nxxxx   1\ny\n");
    }

    #[test]
    fn apply_lines() {
        assert_eq!(
            apply_line("hello", wire::ApplyOutcome::Created as i32, false),
            "function.meridian.dev/hello created\n"
        );
        assert_eq!(
            apply_line("hello", wire::ApplyOutcome::Unchanged as i32, true),
            "function.meridian.dev/hello unchanged (server dry run)\n"
        );
        assert_eq!(
            delete_line("hello"),
            "function.meridian.dev/hello deleted\n"
        );
    }

    #[test]
    fn shell_words() {
        assert_eq!(shell_word("--port"), "--port");
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "''");
    }
}
