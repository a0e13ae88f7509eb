//! Rendering of process functions' scale state (ScaleService.ListInstances): `get instances` and
//! the Scheduled and Scale sections of `describe function`. Pure like [`crate::output`]: wire
//! types and `now` in, text out.

use meridian_proto::v1 as wire;
use serde::Serialize;

use crate::duration::format_age_ms;
use crate::output::{or_dash, ser_endpoint_state, table, to_json, to_yaml, Describe, OutputError};

/// STATUS of a region the placement names but whose agent has not reported yet.
pub const STATUS_PENDING: &str = "Pending";
/// STATUS of a region the spec asks for that the scheduler could not place.
pub const STATUS_NOT_PLACED: &str = "Not placed";

/// What one agent's report says in a word, or its error: "Running", "Scaled to zero",
/// "Scaling up" (fewer ready than desired), "Scaling down" (more running than desired),
/// "Draining" (old instances finishing), or e.g. "CrashLoopBackOff: exit code 1".
pub fn status(scale: &wire::RegionScale) -> String {
    if !scale.error.is_empty() {
        return or_dash(&scale.error);
    }
    let running = scale.ready.saturating_add(scale.starting);
    let text = if scale.desired == 0 && running == 0 && scale.draining == 0 {
        "Scaled to zero"
    } else if scale.ready < scale.desired {
        "Scaling up"
    } else if running > scale.desired {
        "Scaling down"
    } else if scale.draining > 0 {
        "Draining"
    } else {
        "Running"
    };
    text.to_string()
}

/// A learned cold start: "42ms"; "-" while unknown (0).
pub fn cold_start(ms: u32) -> String {
    if ms == 0 {
        "-".to_string()
    } else {
        format!("{ms}ms")
    }
}

/// The time since a unix-ms instant, "-" for 0 (never).
fn age(unix_ms: i64, now_unix_ms: i64) -> String {
    if unix_ms == 0 {
        "-".to_string()
    } else {
        format_age_ms(now_unix_ms - unix_ms)
    }
}

fn concurrency(value: f64) -> String {
    format!("{value:.1}")
}

fn namespace_or_default(namespace: &str) -> &str {
    if namespace.is_empty() {
        "default"
    } else {
        namespace
    }
}

fn sorted(functions: &[wire::FunctionInstances]) -> Vec<&wire::FunctionInstances> {
    let mut out: Vec<&wire::FunctionInstances> = functions.iter().collect();
    out.sort_by(|a, b| {
        (namespace_or_default(&a.namespace), &a.name)
            .cmp(&(namespace_or_default(&b.namespace), &b.name))
    });
    out
}

fn sorted_scales(function: &wire::FunctionInstances) -> Vec<&wire::RegionScale> {
    let mut out: Vec<&wire::RegionScale> = function.regions.iter().collect();
    out.sort_by(|a, b| (&a.region, &a.agent_id).cmp(&(&b.region, &b.agent_id)));
    out
}

/// Regions the placement runs the function in that no agent has reported about yet.
fn pending_regions(function: &wire::FunctionInstances) -> Vec<&wire::RegionBounds> {
    let Some(placement) = &function.placement else {
        return Vec::new();
    };
    placement
        .regions
        .iter()
        .filter(|bounds| !function.regions.iter().any(|s| s.region == bounds.region))
        .collect()
}

/// The rows of one function, sorted by region: one per reporting agent, one per placed region
/// without a report yet ("Pending"), one per placement problem ("Not placed"); a single
/// "Not placed" row when there is nothing else to show.
fn function_rows(function: &wire::FunctionInstances, now_unix_ms: i64) -> Vec<Vec<String>> {
    let dash = || "-".to_string();
    // (region, kind, agent) orders the rows; kind keeps reports before pending before problems.
    let mut keyed: Vec<((String, u8, String), Vec<String>)> = Vec::new();
    for scale in sorted_scales(function) {
        keyed.push((
            (scale.region.clone(), 0, scale.agent_id.clone()),
            vec![
                or_dash(&scale.region),
                or_dash(&scale.agent_id),
                scale.desired.to_string(),
                scale.ready.to_string(),
                scale.min_instances.to_string(),
                scale.max_instances.to_string(),
                concurrency(scale.stable_concurrency),
                cold_start(scale.cold_start_ms),
                age(scale.last_change_unix_ms, now_unix_ms),
                status(scale),
                or_dash(&scale.reason),
            ],
        ));
    }
    for bounds in pending_regions(function) {
        keyed.push((
            (bounds.region.clone(), 1, String::new()),
            vec![
                or_dash(&bounds.region),
                dash(),
                dash(),
                dash(),
                bounds.min_instances.to_string(),
                bounds.max_instances.to_string(),
                dash(),
                dash(),
                dash(),
                STATUS_PENDING.to_string(),
                "no report from the region's agents yet".to_string(),
            ],
        ));
    }
    if let Some(placement) = &function.placement {
        for problem in &placement.problems {
            keyed.push((
                (problem.region.clone(), 2, String::new()),
                vec![
                    or_dash(&problem.region),
                    dash(),
                    dash(),
                    dash(),
                    dash(),
                    dash(),
                    dash(),
                    dash(),
                    dash(),
                    STATUS_NOT_PLACED.to_string(),
                    or_dash(&problem.reason),
                ],
            ));
        }
    }
    if keyed.is_empty() {
        let reason = if function.placement.is_some() {
            "no region to run in"
        } else {
            "waiting for the scheduler"
        };
        let mut row = vec![dash(); 9];
        row.push(STATUS_NOT_PLACED.to_string());
        row.push(reason.to_string());
        return vec![row];
    }
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    keyed.into_iter().map(|(_, row)| row).collect()
}

/// `get instances`: NAMESPACE (with -A), NAME, REGION, AGENT, DESIRED, READY, MIN, MAX,
/// CONCURRENCY (stable window average), COLD-START, LAST-CHANGE (age of the last change of
/// desired), STATUS, REASON (why desired last changed, or the placement problem).
pub fn instances_table(
    functions: &[wire::FunctionInstances],
    all_namespaces: bool,
    now_unix_ms: i64,
) -> String {
    let mut headers = vec![
        "NAME",
        "REGION",
        "AGENT",
        "DESIRED",
        "READY",
        "MIN",
        "MAX",
        "CONCURRENCY",
        "COLD-START",
        "LAST-CHANGE",
        "STATUS",
        "REASON",
    ];
    if all_namespaces {
        headers.insert(0, "NAMESPACE");
    }
    let mut rows = Vec::new();
    for function in sorted(functions) {
        for mut row in function_rows(function, now_unix_ms) {
            row.insert(0, or_dash(&function.name));
            if all_namespaces {
                row.insert(0, namespace_or_default(&function.namespace).to_string());
            }
            rows.push(row);
        }
    }
    table(&headers, &rows)
}

pub fn instances_json(response: &wire::ListInstancesResponse) -> Result<String, OutputError> {
    to_json(&InstancesView::from(response))
}

pub fn instances_yaml(response: &wire::ListInstancesResponse) -> Result<String, OutputError> {
    to_yaml(&InstancesView::from(response))
}

/// What `describe function` shows of a function's placement and scale state.
#[derive(Debug, Clone)]
pub enum ScaleSection {
    /// Not a process function: nothing is placed or scaled, the sections are left out.
    NotProcess,
    /// The control plane could not be asked (the message says why).
    Unavailable(String),
    /// The function's entry of ListInstances; `None` when the control plane has none yet.
    Instances(Option<wire::FunctionInstances>),
}

/// The `Scheduled:` (the leader's placement) and `Scale:` (per agent) sections.
pub(crate) fn describe_scale(d: &mut Describe, section: &ScaleSection, now_unix_ms: i64) {
    let function = match section {
        ScaleSection::NotProcess => return,
        ScaleSection::Unavailable(why) => {
            let text = format!("<unavailable: {why}>");
            d.kv(0, "Scheduled", &text);
            d.kv(0, "Scale", &text);
            return;
        }
        ScaleSection::Instances(None) => {
            d.kv(0, "Scheduled", "<not placed yet>");
            d.kv(0, "Scale", "<none>");
            return;
        }
        ScaleSection::Instances(Some(function)) => function,
    };

    match &function.placement {
        None => d.kv(0, "Scheduled", "<not placed yet>"),
        Some(placement) => {
            d.kv(0, "Scheduled", "");
            d.kv(1, "Leader", &placement.leader);
            d.kv(
                1,
                "Function Version",
                &placement.function_version.to_string(),
            );
            if placement.regions.is_empty() {
                d.kv(1, "Regions", "<none>");
            } else {
                d.kv(1, "Regions", "");
                for r in &placement.regions {
                    d.kv(
                        2,
                        &or_dash(&r.region),
                        &format!("min {}, max {} instances", r.min_instances, r.max_instances),
                    );
                }
            }
            if placement.problems.is_empty() {
                d.kv(1, "Problems", "<none>");
            } else {
                d.kv(1, "Problems", "");
                for p in &placement.problems {
                    d.kv(2, &or_dash(&p.region), &or_dash(&p.reason));
                }
            }
        }
    }

    let scales = sorted_scales(function);
    let pending = pending_regions(function);
    if scales.is_empty() && pending.is_empty() {
        d.kv(0, "Scale", "<none>");
        return;
    }
    d.kv(0, "Scale", "");
    // Reports and pending regions interleaved by region, as in `get instances`.
    let mut entries: Vec<(&str, Option<&wire::RegionScale>)> = scales
        .iter()
        .map(|s| (s.region.as_str(), Some(*s)))
        .chain(pending.iter().map(|b| (b.region.as_str(), None)))
        .collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    for (region, scale) in entries {
        match scale {
            None => d.kv(
                1,
                &or_dash(region),
                "<no report from the region's agents yet>",
            ),
            Some(scale) => describe_region_scale(d, scale, now_unix_ms),
        }
    }
}

fn describe_region_scale(d: &mut Describe, scale: &wire::RegionScale, now_unix_ms: i64) {
    d.kv(
        1,
        &format!(
            "{} (agent {})",
            or_dash(&scale.region),
            or_dash(&scale.agent_id)
        ),
        "",
    );
    d.kv(2, "Status", &status(scale));
    d.kv(2, "Desired", &scale.desired.to_string());
    d.kv(
        2,
        "Current",
        &format!(
            "ready {}, starting {}, draining {}",
            scale.ready, scale.starting, scale.draining
        ),
    );
    d.kv(
        2,
        "Bounds",
        &format!("min {}, max {}", scale.min_instances, scale.max_instances),
    );
    let last_change = if scale.last_change_unix_ms == 0 {
        "<never>".to_string()
    } else {
        format!(
            "{} ({} ago)",
            or_dash(&scale.reason),
            format_age_ms(now_unix_ms - scale.last_change_unix_ms)
        )
    };
    d.kv(2, "Last Change", &last_change);
    d.kv(
        2,
        "Concurrency",
        &format!(
            "stable {}, panic {}",
            concurrency(scale.stable_concurrency),
            concurrency(scale.panic_concurrency)
        ),
    );
    d.kv(2, "Panic", if scale.panic { "yes" } else { "no" });
    d.kv(2, "Cold Start", &cold_start(scale.cold_start_ms));
    let last_request = if scale.last_request_unix_ms == 0 {
        "<none>".to_string()
    } else {
        format!(
            "{} ago",
            format_age_ms(now_unix_ms - scale.last_request_unix_ms)
        )
    };
    d.kv(2, "Last Request", &last_request);
    d.kv(2, "Restarts", &scale.restarts.to_string());
    d.kv(2, "Last Exit", &one_line(&scale.last_exit));
    d.kv(2, "Error", &one_line(&scale.error));
    let log_lines: Vec<String> = scale.last_log_lines.iter().map(|l| log_text(l)).collect();
    d.kv(2, "Last Log Lines", &log_lines.join("\n"));

    if scale.instances.is_empty() {
        d.kv(2, "Instances", "<none>");
        return;
    }
    d.kv(2, "Instances", "");
    let mut instances: Vec<&wire::InstanceStatus> = scale.instances.iter().collect();
    instances.sort_by(|a, b| (a.started_unix_ms, &a.id).cmp(&(b.started_unix_ms, &b.id)));
    let rows: Vec<Vec<String>> = instances
        .into_iter()
        .map(|i| {
            let started = if i.ready_unix_ms == 0 || i.started_unix_ms == 0 {
                "-".to_string()
            } else {
                format!("{}ms", (i.ready_unix_ms - i.started_unix_ms).max(0))
            };
            vec![
                or_dash(&i.id),
                or_dash(&i.address),
                instance_state(i.state).to_string(),
                if i.pid == 0 {
                    "-".to_string()
                } else {
                    i.pid.to_string()
                },
                i.restarts.to_string(),
                started,
                age(i.started_unix_ms, now_unix_ms),
            ]
        })
        .collect();
    let text = table(
        &[
            "ID",
            "ADDRESS",
            "STATE",
            "PID",
            "RESTARTS",
            "COLD-START",
            "AGE",
        ],
        &rows,
    );
    for line in text.lines() {
        d.raw(3, line);
    }
}

fn instance_state(state: i32) -> &'static str {
    match wire::EndpointState::try_from(state) {
        Ok(wire::EndpointState::Ready) => "ready",
        Ok(wire::EndpointState::Starting) => "starting",
        Ok(wire::EndpointState::Draining) => "draining",
        Ok(wire::EndpointState::Unspecified) | Err(_) => "unknown",
    }
}

/// A value that must stay on one line; empty stays empty (describe prints `<none>`).
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r', '\t'], " ")
}

/// A log line as a terminal should see it: tabs kept as spaces, other control characters (an
/// instance may print escape sequences) shown as `\u{..}` escapes rather than interpreted.
pub fn log_text(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    for c in line.trim_end_matches(['\n', '\r']).chars() {
        match c {
            '\t' => out.push_str("    "),
            c if c.is_control() => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    out
}

// Field-for-field mirrors of the scale.proto messages (lowerCamelCase, enum names as strings,
// 64-bit integers as numbers), as `output` does for agents and routes.

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct InstancesView<'a> {
    functions: Vec<FunctionInstancesView<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FunctionInstancesView<'a> {
    namespace: &'a str,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    placement: Option<PlacementView<'a>>,
    regions: Vec<RegionScaleView<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PlacementView<'a> {
    namespace: &'a str,
    name: &'a str,
    function_version: i64,
    regions: Vec<RegionBoundsView<'a>>,
    problems: Vec<PlacementProblemView<'a>>,
    leader: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RegionBoundsView<'a> {
    region: &'a str,
    min_instances: u32,
    max_instances: u32,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PlacementProblemView<'a> {
    region: &'a str,
    reason: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RegionScaleView<'a> {
    region: &'a str,
    agent_id: &'a str,
    desired: u32,
    ready: u32,
    starting: u32,
    draining: u32,
    min_instances: u32,
    max_instances: u32,
    reason: &'a str,
    last_change_unix_ms: i64,
    stable_concurrency: f64,
    panic_concurrency: f64,
    panic: bool,
    cold_start_ms: u32,
    restarts: u32,
    last_exit: &'a str,
    last_log_lines: &'a [String],
    error: &'a str,
    instances: Vec<InstanceView<'a>>,
    last_request_unix_ms: i64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct InstanceView<'a> {
    id: &'a str,
    address: &'a str,
    #[serde(serialize_with = "ser_endpoint_state")]
    state: i32,
    pid: u32,
    started_unix_ms: i64,
    ready_unix_ms: i64,
    restarts: u32,
}

impl<'a> From<&'a wire::ListInstancesResponse> for InstancesView<'a> {
    fn from(response: &'a wire::ListInstancesResponse) -> Self {
        InstancesView {
            functions: sorted(&response.functions)
                .into_iter()
                .map(FunctionInstancesView::from)
                .collect(),
        }
    }
}

impl<'a> From<&'a wire::FunctionInstances> for FunctionInstancesView<'a> {
    fn from(function: &'a wire::FunctionInstances) -> Self {
        FunctionInstancesView {
            namespace: &function.namespace,
            name: &function.name,
            placement: function.placement.as_ref().map(|p| PlacementView {
                namespace: &p.namespace,
                name: &p.name,
                function_version: p.function_version,
                regions: p
                    .regions
                    .iter()
                    .map(|r| RegionBoundsView {
                        region: &r.region,
                        min_instances: r.min_instances,
                        max_instances: r.max_instances,
                    })
                    .collect(),
                problems: p
                    .problems
                    .iter()
                    .map(|p| PlacementProblemView {
                        region: &p.region,
                        reason: &p.reason,
                    })
                    .collect(),
                leader: &p.leader,
            }),
            regions: sorted_scales(function)
                .into_iter()
                .map(RegionScaleView::from)
                .collect(),
        }
    }
}

impl<'a> From<&'a wire::RegionScale> for RegionScaleView<'a> {
    fn from(s: &'a wire::RegionScale) -> Self {
        RegionScaleView {
            region: &s.region,
            agent_id: &s.agent_id,
            desired: s.desired,
            ready: s.ready,
            starting: s.starting,
            draining: s.draining,
            min_instances: s.min_instances,
            max_instances: s.max_instances,
            reason: &s.reason,
            last_change_unix_ms: s.last_change_unix_ms,
            stable_concurrency: s.stable_concurrency,
            panic_concurrency: s.panic_concurrency,
            panic: s.panic,
            cold_start_ms: s.cold_start_ms,
            restarts: s.restarts,
            last_exit: &s.last_exit,
            last_log_lines: &s.last_log_lines,
            error: &s.error,
            instances: s
                .instances
                .iter()
                .map(|i| InstanceView {
                    id: &i.id,
                    address: &i.address,
                    state: i.state,
                    pid: i.pid,
                    started_unix_ms: i.started_unix_ms,
                    ready_unix_ms: i.ready_unix_ms,
                    restarts: i.restarts,
                })
                .collect(),
            last_request_unix_ms: s.last_request_unix_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scale(desired: u32, ready: u32, starting: u32, draining: u32) -> wire::RegionScale {
        wire::RegionScale {
            desired,
            ready,
            starting,
            draining,
            ..Default::default()
        }
    }

    #[test]
    fn statuses() {
        assert_eq!(status(&scale(0, 0, 0, 0)), "Scaled to zero");
        assert_eq!(status(&scale(3, 3, 0, 0)), "Running");
        assert_eq!(status(&scale(3, 1, 2, 0)), "Scaling up");
        assert_eq!(status(&scale(1, 0, 1, 0)), "Scaling up");
        assert_eq!(status(&scale(1, 3, 0, 0)), "Scaling down");
        assert_eq!(status(&scale(0, 1, 0, 0)), "Scaling down");
        assert_eq!(status(&scale(0, 0, 0, 1)), "Draining");
        assert_eq!(status(&scale(2, 2, 0, 1)), "Draining");
        let crashing = wire::RegionScale {
            error: "CrashLoopBackOff: exit code 1".into(),
            ..scale(1, 0, 0, 0)
        };
        assert_eq!(status(&crashing), "CrashLoopBackOff: exit code 1");
    }

    #[test]
    fn cold_starts_and_log_text() {
        assert_eq!(cold_start(0), "-");
        assert_eq!(cold_start(42), "42ms");
        assert_eq!(log_text("a\tb\r\n"), "a    b");
        assert_eq!(log_text("\u{1b}[31mred"), "\\u{1b}[31mred");
    }
}
