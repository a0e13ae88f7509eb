//! `explain`: how the outbound listener would route the next request for a function, and why.
//! Computed from the live routing state (the compiled table, ejections, probe results, in-flight
//! counts, latency estimates, the activator's rules with the sidecar's own settings) with the
//! very functions the request path uses (`plan`, `available`, `HoldRules::plan`), and without
//! changing anything: no pick, no counter, no activation. Served as
//! `SidecarAdminService.Explain` on the admin listener.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use meridian_proto::v1 as pb;
use meridian_proto::v1::sidecar_admin_service_server::SidecarAdminService;
use tonic::{Request, Response, Status};

use crate::activator::{healthy_remote, ColdPlan, GoRemote, HoldRules, Spill};
use crate::balance::Tried;
use crate::endpoints::ProbeState;
use crate::proxy::{available, plan, Listener, Plan};
use crate::routes::{FunctionRoute, HostError, RoutingState, Tier, DEFAULT_NAMESPACE};

/// Why a function cannot be explained.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    #[error("this sidecar has no routing table yet")]
    NoTable,
    #[error("{name:?} in namespace {namespace:?} is not a function name: {why}")]
    BadName {
        namespace: String,
        name: String,
        why: &'static str,
    },
    #[error("function {namespace}/{name} is not in this sidecar's table (version {version})")]
    UnknownFunction {
        namespace: String,
        name: String,
        version: i64,
    },
}

impl From<ExplainError> for Status {
    fn from(error: ExplainError) -> Self {
        let message = error.to_string();
        match error {
            ExplainError::NoTable => Status::unavailable(message),
            ExplainError::BadName { .. } => Status::invalid_argument(message),
            ExplainError::UnknownFunction { .. } => Status::not_found(message),
        }
    }
}

/// Explains the next request for `namespace`/`name` (empty namespace: the default one), under
/// the activator's `rules`.
pub fn explain(
    state: &RoutingState,
    rules: &HoldRules,
    namespace: &str,
    name: &str,
) -> Result<pb::Explanation, ExplainError> {
    let namespace = if namespace.is_empty() {
        DEFAULT_NAMESPACE
    } else {
        namespace
    };
    let function = match state.lookup(&format!("{name}.{namespace}")) {
        Ok(function) => function,
        Err(HostError::Unknown) => {
            return Err(ExplainError::UnknownFunction {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                version: state.version(),
            })
        }
        Err(HostError::Malformed(why)) => {
            return Err(ExplainError::BadName {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                why,
            })
        }
    };
    let now = state.clock().now();
    // Exactly what a first attempt on the outbound listener computes.
    let plan = plan(function, now, false, &Tried::default(), 0);
    let mut tiers: Vec<pb::ExplainedTier> = function
        .tiers
        .iter()
        .map(|tier| explain_tier(tier, now))
        .collect();
    for slot in 0..plan.len {
        if let Some(tier) = tiers.get_mut(plan.order[slot]) {
            tier.priority = u32::try_from(slot).ok();
            tier.health_permille = plan.health[slot];
            tier.load_permille = plan.load[slot];
        }
    }
    for (explained, tier) in tiers.iter_mut().zip(&function.tiers) {
        explained.note = tier_note(tier, explained, now);
    }
    let decision = decide(function, rules, &plan, &tiers, now);
    Ok(pb::Explanation {
        region: state.region().to_owned(),
        table_version: state.version(),
        local_generation: state.local_generation(),
        table_age_ms: millis(state.age()),
        namespace: function.namespace.clone(),
        name: function.name.clone(),
        function_version: function.version,
        workload: function.workload.as_str().to_owned(),
        cold_start_ms: millis(function.cold_start),
        held: function.stats().load.held(),
        tiers,
        decision: Some(decision),
    })
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn ms_f64(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// A duration for people: `850 µs`, `3 ms`, `2.4 s`.
pub fn human(duration: Duration) -> String {
    if duration < Duration::from_millis(1) {
        format!("{} µs", duration.as_micros())
    } else if duration < Duration::from_secs(1) {
        format!("{} ms", duration.as_millis())
    } else {
        format!("{:.1} s", duration.as_secs_f64())
    }
}

fn explain_tier(tier: &Tier, now: u64) -> pb::ExplainedTier {
    let endpoints: Vec<pb::ExplainedEndpoint> = tier
        .endpoints
        .iter()
        .map(|endpoint| {
            let shared = &endpoint.shared;
            let ejected_for = shared.ejected_for(now);
            pb::ExplainedEndpoint {
                address: shared.address().to_owned(),
                id: endpoint.id.clone(),
                state: endpoint.state.to_owned(),
                available: available(tier, endpoint, now),
                ejected: ejected_for.is_some(),
                ejected_for_ms: ejected_for.map(millis).unwrap_or(0),
                consecutive_failures: shared.consecutive_failures(),
                ejections: shared.ejections(),
                in_flight: u64::try_from(shared.in_flight()).unwrap_or(u64::MAX),
                ewma_ms: shared.ewma_ns() as f64 / 1e6,
                probe: if tier.local {
                    String::new()
                } else {
                    shared.probe_state().as_str().to_owned()
                },
                rtt_ms: if tier.local {
                    None
                } else {
                    shared.rtt().map(ms_f64)
                },
                probe_error: if tier.local || shared.probe_state() != ProbeState::Down {
                    String::new()
                } else {
                    shared
                        .probe_error()
                        .map(|why| String::clone(&why))
                        .unwrap_or_default()
                },
            }
        })
        .collect();
    pb::ExplainedTier {
        region: tier.region.clone(),
        local: tier.local,
        order: tier.order.as_str().to_owned(),
        priority: None,
        ready_instances: tier.ready_instances,
        health_permille: 0,
        load_permille: 0,
        available: u32::try_from(endpoints.iter().filter(|e| e.available).count())
            .unwrap_or(u32::MAX),
        endpoints,
        note: String::new(),
    }
}

/// Why a tier takes no traffic ("" when it takes some).
fn tier_note(tier: &Tier, explained: &pb::ExplainedTier, now: u64) -> String {
    if explained.load_permille > 0 {
        return String::new();
    }
    let routable: Vec<_> = tier.endpoints.iter().filter(|e| e.routable).collect();
    if tier.endpoints.is_empty() {
        return if tier.local {
            "no local instance".into()
        } else {
            "no gateway".into()
        };
    }
    if !tier.local && tier.ready_instances == 0 {
        return "no ready instance in the region".into();
    }
    if routable.is_empty() {
        let states: Vec<&str> = tier.endpoints.iter().map(|e| e.state).collect();
        return format!("no READY endpoint ({})", summarize(&states));
    }
    if explained.available == 0 {
        let ejected: Vec<Duration> = routable
            .iter()
            .filter_map(|e| e.shared.ejected_for(now))
            .collect();
        let down: Vec<_> = routable
            .iter()
            .filter(|e| !tier.local && e.shared.probe_state() == ProbeState::Down)
            .collect();
        if !down.is_empty() {
            let why = down
                .iter()
                .find_map(|e| e.shared.probe_error())
                .map(|why| format!("probe failed: {why}"))
                .unwrap_or_else(|| "a request could not connect".to_owned());
            return format!("down ({why})");
        }
        if let Some(first_back) = ejected.iter().min() {
            return format!(
                "all {} endpoint(s) ejected (first back in {})",
                routable.len(),
                human(*first_back)
            );
        }
        return "no endpoint available".into();
    }
    if explained.priority.is_some() {
        return "standby: earlier tiers take all traffic".into();
    }
    "not eligible".into()
}

/// `2 STARTING, 1 DRAINING`.
fn summarize(states: &[&str]) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for state in states {
        match counts.iter_mut().find(|(s, _)| s == state) {
            Some((_, n)) => *n += 1,
            None => counts.push((state, 1)),
        }
    }
    counts
        .iter()
        .map(|(state, n)| format!("{n} {state}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn best_rtt(tier: &Tier) -> Option<Duration> {
    tier.endpoints.iter().filter_map(|e| e.shared.rtt()).min()
}

/// `3 failed starts, restart backoff`.
fn crash_loop_detail(failed_starts: u32, restart_backoff: bool) -> String {
    let mut parts = Vec::new();
    if failed_starts > 0 {
        let plural = if failed_starts == 1 { "" } else { "s" };
        parts.push(format!("{failed_starts} failed start{plural}"));
    }
    if restart_backoff {
        parts.push("restart backoff".to_owned());
    }
    parts.join(", ")
}

/// `; held at most 90 ms (eu-west RTT 40 ms + 50 ms margin), then sent to eu-west`.
fn spill_note(function: &FunctionRoute, rules: &HoldRules, spill: &Spill) -> String {
    let region = function
        .tiers
        .get(spill.tier)
        .map_or("?", |tier| tier.region.as_str());
    let bound = match spill.rtt {
        Some(rtt) if rtt.saturating_add(rules.remote_margin) <= spill.after => format!(
            "{region} RTT {} + {} margin",
            human(rtt),
            human(rules.remote_margin)
        ),
        Some(_) => "the per-try timeout".to_owned(),
        None => format!("the per-try timeout; {region} RTT not yet measured"),
    };
    format!(
        "; held at most {} ({bound}), then sent to {region}",
        human(spill.after)
    )
}

/// Where the next request goes and why.
fn decide(
    function: &FunctionRoute,
    rules: &HoldRules,
    plan: &Plan,
    tiers: &[pb::ExplainedTier],
    now: u64,
) -> pb::ExplainDecision {
    let cold = if function.cold_start.is_zero() {
        "cold start not yet measured".to_owned()
    } else {
        format!("cold start ~{}", human(function.cold_start))
    };
    let mut prefix = String::new();
    if function.needs_activation() {
        match rules.plan(function, now, Listener::Outbound) {
            ColdPlan::Remote(GoRemote::CrashLoop {
                failed_starts,
                restart_backoff,
            }) => {
                prefix = format!(
                    "crash loop here ({}): sent to a healthy region at once while the agent \
                     restarts it; ",
                    crash_loop_detail(failed_starts, restart_backoff)
                );
            }
            ColdPlan::Remote(GoRemote::Warm) => {
                prefix = format!(
                    "no ready local instance ({cold}): sent to a warm region at once while the \
                     agent starts one; "
                );
            }
            ColdPlan::Hold(spill) => {
                let mut reason = format!(
                    "no ready local instance: would hold ({cold}) and ask the agent to start one"
                );
                let slower: Vec<String> = function
                    .tiers
                    .iter()
                    .filter(|t| !t.local && t.ready_instances > 0)
                    .filter_map(|t| best_rtt(t).map(|rtt| (t, rtt)))
                    .map(|(t, rtt)| format!("{} RTT {}", t.region, human(rtt)))
                    .collect();
                if !slower.is_empty() {
                    reason.push_str(&format!(
                        "; warm regions are farther than a cold start ({})",
                        slower.join(", ")
                    ));
                }
                match spill {
                    Some(spill) => reason.push_str(&spill_note(function, rules, &spill)),
                    None if rules.crash_looping(function) => reason.push_str(&format!(
                        "; crash loop here ({}), but no healthy remote region",
                        crash_loop_detail(
                            function.local_failed_starts,
                            function.local_restart_backoff
                        )
                    )),
                    None => {
                        if let Some((index, _)) = healthy_remote(function, now) {
                            let region = function
                                .tiers
                                .get(index)
                                .map_or("?", |tier| tier.region.as_str());
                            reason.push_str(&format!(
                                "; the hold timeout ({}) comes before the bound that would send \
                                 it to {region}",
                                human(rules.hold_limit(function))
                            ));
                        }
                    }
                }
                return pb::ExplainDecision {
                    action: "hold".into(),
                    reason,
                    ..Default::default()
                };
            }
        }
    }
    let loads = &plan.load[..plan.len];
    let total: u32 = loads.iter().sum();
    if total == 0 {
        let passed = passed_over(function, tiers, plan, plan.len);
        return if plan.candidates == 0 {
            pb::ExplainDecision {
                action: "fail".into(),
                reason: format!("{prefix}no endpoint could take a request{passed}"),
                error: "no-endpoints".into(),
                ..Default::default()
            }
        } else {
            pb::ExplainDecision {
                action: "fail".into(),
                reason: format!("{prefix}every endpoint is ejected or down{passed}"),
                error: "all-ejected".into(),
                ..Default::default()
            }
        };
    }
    // The tier most of the next requests go to; on a tie the one tried first.
    let mut slot = 0;
    for (i, load) in loads.iter().enumerate() {
        if *load > loads[slot] {
            slot = i;
        }
    }
    let index = plan.order[slot];
    let (Some(tier), Some(explained)) = (function.tiers.get(index), tiers.get(index)) else {
        return pb::ExplainDecision {
            action: "fail".into(),
            reason: "inconsistent routing state".into(),
            ..Default::default()
        };
    };
    let candidates: Vec<String> = tier
        .endpoints
        .iter()
        .filter(|e| available(tier, e, now))
        .map(|e| e.shared.address().to_owned())
        .collect();
    let share = f64::from(loads[slot]) / 10.0;
    let others: Vec<String> = (0..plan.len)
        .filter(|s| *s != slot && loads[*s] > 0)
        .filter_map(|s| {
            let other = function.tiers.get(plan.order[s])?;
            Some(format!("{} {}%", other.region, f64::from(loads[s]) / 10.0))
        })
        .collect();
    let spill = if others.is_empty() {
        String::new()
    } else {
        format!("; the rest goes to {}", others.join(", "))
    };
    let count = format!("{}/{}", explained.available, tier.endpoints.len());
    let reason = if tier.local {
        if loads[slot] >= 1000 {
            format!("{prefix}local tier healthy: {count} endpoints available")
        } else {
            format!("{prefix}local tier takes {share}% ({count} endpoints available){spill}")
        }
    } else {
        let passed = passed_over(function, tiers, plan, slot);
        let rtt = match best_rtt(tier) {
            Some(rtt) => format!(", RTT {}", human(rtt)),
            None => ", RTT not yet measured".to_owned(),
        };
        let why_remote = if !passed.is_empty() {
            format!("{} → ", passed.trim_start_matches("; "))
        } else if function.local_tier().is_none() {
            "no local tier here → ".to_owned()
        } else {
            String::new()
        };
        let share = if loads[slot] >= 1000 {
            String::new()
        } else {
            format!(" ({share}%{spill})")
        };
        format!(
            "{prefix}{why_remote}{} ({} order){rtt}{share}",
            tier.region,
            tier.order.as_str()
        )
    };
    pb::ExplainDecision {
        action: "route".into(),
        region: tier.region.clone(),
        local: tier.local,
        candidates,
        reason,
        error: String::new(),
    }
}

/// `; us-east: all 1 endpoint(s) ejected (...), eu-west: down (...)`: the tiers tried before
/// priority slot `before` that take nothing, with their notes.
fn passed_over(
    function: &FunctionRoute,
    tiers: &[pb::ExplainedTier],
    plan: &Plan,
    before: usize,
) -> String {
    let notes: Vec<String> = (0..before.min(plan.len))
        .filter(|s| plan.load[*s] == 0)
        .filter_map(|s| {
            let index = plan.order[s];
            let tier = function.tiers.get(index)?;
            let note = &tiers.get(index)?.note;
            (!note.is_empty()).then(|| format!("{}: {}", tier.region, note))
        })
        .collect();
    if notes.is_empty() {
        String::new()
    } else {
        format!("; {}", notes.join(", "))
    }
}

/// `SidecarAdminService`, read from the state the proxy uses, under the activator's rules.
#[derive(Debug, Clone)]
pub struct ExplainService {
    state: Arc<ArcSwapOption<RoutingState>>,
    rules: HoldRules,
}

impl ExplainService {
    pub fn new(state: Arc<ArcSwapOption<RoutingState>>, rules: HoldRules) -> Self {
        Self { state, rules }
    }
}

#[tonic::async_trait]
impl SidecarAdminService for ExplainService {
    async fn explain(
        &self,
        request: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::Explanation>, Status> {
        let request = request.into_inner();
        let state = self.state.load_full().ok_or(ExplainError::NoTable)?;
        Ok(Response::new(explain(
            &state,
            &self.rules,
            &request.namespace,
            &request.name,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activator::tests::process;
    use crate::routes::tests::{route, table, tier};
    use crate::routes::Compiler;
    use std::sync::atomic::Ordering;

    fn compile(functions: Vec<pb::FunctionRoute>) -> RoutingState {
        Compiler::new("us-east").compile(&table(functions)).unwrap()
    }

    fn hello(local: &[&str]) -> pb::FunctionRoute {
        route(
            "default",
            "hello",
            vec![
                tier("us-east", true, local),
                tier("eu-west", false, &["127.0.2.1:15002"]),
                tier("ap-south", false, &["127.0.3.1:15002"]),
            ],
        )
    }

    fn decision(e: &pb::Explanation) -> &pb::ExplainDecision {
        e.decision.as_ref().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn healthy_local_tier_takes_the_next_request() {
        let state = compile(vec![hello(&["127.0.1.1:9000", "127.0.1.1:9001"])]);
        let e = explain(&state, &HoldRules::default(), "", "hello").unwrap();
        assert_eq!((e.table_version, e.region.as_str()), (7, "us-east"));
        assert_eq!(e.tiers.len(), 3);
        assert_eq!(e.tiers[0].priority, Some(0));
        assert_eq!(e.tiers[0].load_permille, 1000);
        assert_eq!(e.tiers[0].available, 2);
        assert_eq!(e.tiers[1].note, "standby: earlier tiers take all traffic");
        assert_eq!(e.tiers[1].endpoints[0].probe, "unknown");
        let d = decision(&e);
        assert_eq!(
            (d.action.as_str(), d.region.as_str(), d.local),
            ("route", "us-east", true)
        );
        assert_eq!(d.candidates, vec!["127.0.1.1:9000", "127.0.1.1:9001"]);
        assert_eq!(d.reason, "local tier healthy: 2/2 endpoints available");
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_local_endpoint_sends_the_next_request_to_the_next_region() {
        let state = compile(vec![hello(&["127.0.1.1:9000"])]);
        let f = state.lookup("hello").unwrap();
        let clock = state.clock();
        f.tiers[0].endpoints[0].shared.eject(clock.now());
        f.tiers[1].endpoints[0]
            .shared
            .probe_succeeded(Duration::from_millis(3));
        tokio::time::advance(Duration::from_millis(400)).await;

        let e = explain(&state, &HoldRules::default(), "default", "hello").unwrap();
        let local = &e.tiers[0].endpoints[0];
        assert!(local.ejected && !local.available);
        assert_eq!(local.ejected_for_ms, 600);
        assert_eq!(
            local.consecutive_failures, 4,
            "one more failure ejects again"
        );
        assert_eq!(
            e.tiers[0].note,
            "all 1 endpoint(s) ejected (first back in 600 ms)"
        );
        assert_eq!(e.tiers[1].endpoints[0].rtt_ms, Some(3.0));
        let d = decision(&e);
        assert_eq!((d.action.as_str(), d.region.as_str()), ("route", "eu-west"));
        assert_eq!(d.candidates, vec!["127.0.2.1:15002"]);
        assert_eq!(
            d.reason,
            "us-east: all 1 endpoint(s) ejected (first back in 600 ms) → eu-west (explicit \
             order), RTT 3 ms"
        );
        // Back from ejection: local again.
        tokio::time::advance(Duration::from_millis(600)).await;
        let e = explain(&state, &HoldRules::default(), "default", "hello").unwrap();
        assert_eq!(decision(&e).region, "us-east");
    }

    #[tokio::test(start_paused = true)]
    async fn half_a_local_tier_ejected_spills_the_rest() {
        let state = compile(vec![hello(&[
            "127.0.1.1:9000",
            "127.0.1.1:9001",
            "127.0.1.1:9002",
            "127.0.1.1:9003",
        ])]);
        let f = state.lookup("hello").unwrap();
        let now = state.clock().now();
        f.tiers[0].endpoints[0].shared.eject(now);
        f.tiers[0].endpoints[1].shared.eject(now);
        let e = explain(&state, &HoldRules::default(), "default", "hello").unwrap();
        assert_eq!(
            (e.tiers[0].load_permille, e.tiers[1].load_permille),
            (700, 300)
        );
        let d = decision(&e);
        assert_eq!(d.region, "us-east");
        assert_eq!(d.candidates, vec!["127.0.1.1:9002", "127.0.1.1:9003"]);
        assert_eq!(
            d.reason,
            "local tier takes 70% (2/4 endpoints available); the rest goes to eu-west 30%"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn down_region_is_passed_over_with_the_probe_error() {
        let state = compile(vec![hello(&["127.0.1.1:9000"])]);
        let f = state.lookup("hello").unwrap();
        f.tiers[0].endpoints[0].shared.eject(state.clock().now());
        f.tiers[1].endpoints[0]
            .shared
            .probe_failed("connection refused".into());
        f.tiers[2].endpoints[0]
            .shared
            .probe_succeeded(Duration::from_micros(2500));
        let e = explain(&state, &HoldRules::default(), "default", "hello").unwrap();
        assert_eq!(e.tiers[1].endpoints[0].probe, "down");
        assert_eq!(e.tiers[1].endpoints[0].probe_error, "connection refused");
        assert_eq!(e.tiers[1].note, "down (probe failed: connection refused)");
        let d = decision(&e);
        assert_eq!(d.region, "ap-south");
        assert_eq!(
            d.reason,
            "us-east: all 1 endpoint(s) ejected (first back in 1.0 s), eu-west: down (probe \
             failed: connection refused) → ap-south (explicit order), RTT 2 ms"
        );

        // Everything gone: the request would fail at once, and says why.
        f.tiers[2].endpoints[0].shared.mark_down();
        let d = explain(&state, &HoldRules::default(), "default", "hello")
            .unwrap()
            .decision
            .unwrap();
        assert_eq!(
            (d.action.as_str(), d.error.as_str()),
            ("fail", "all-ejected")
        );
        assert!(d
            .reason
            .starts_with("every endpoint is ejected or down; us-east: all 1"));
        assert!(
            d.reason
                .ends_with("ap-south: down (a request could not connect)"),
            "{}",
            d.reason
        );
    }

    #[tokio::test(start_paused = true)]
    async fn scaled_to_zero_holds_unless_a_warm_region_is_nearer() {
        let slow = |cold_start_ms| {
            let mut f = process(hello(&[]), cold_start_ms);
            f.name = "slow".into();
            f
        };
        let state = compile(vec![slow(10)]);
        let f = state.lookup("slow").unwrap();
        f.tiers[1].endpoints[0]
            .shared
            .probe_succeeded(Duration::from_millis(40));
        let e = explain(&state, &HoldRules::default(), "default", "slow").unwrap();
        assert_eq!(e.workload, "process");
        assert_eq!(e.cold_start_ms, 10);
        assert_eq!(e.tiers[0].note, "no local instance");
        let d = decision(&e);
        assert_eq!(d.action, "hold");
        assert_eq!(
            d.reason,
            "no ready local instance: would hold (cold start ~10 ms) and ask the agent to start \
             one; warm regions are farther than a cold start (eu-west RTT 40 ms); held at most \
             90 ms (eu-west RTT 40 ms + 50 ms margin), then sent to eu-west"
        );
        // A hold timeout below that bound ends the hold first, and says so.
        let short = HoldRules {
            timeout: Duration::from_millis(60),
            ..HoldRules::default()
        };
        let d = explain(&state, &short, "default", "slow")
            .unwrap()
            .decision
            .unwrap();
        assert_eq!(d.action, "hold");
        assert!(
            d.reason.ends_with(
                "; the hold timeout (60 ms) comes before the bound that would send it to eu-west"
            ),
            "{}",
            d.reason
        );
        // Explaining asks the agent for nothing and holds nothing.
        assert_eq!(f.stats().hold.activations.load(Ordering::Relaxed), 0);
        assert_eq!(e.held, 0);

        // A cold start slower than the warm region's round trip: go there at once.
        let state = compile(vec![slow(500)]);
        let f = state.lookup("slow").unwrap();
        f.tiers[1].endpoints[0]
            .shared
            .probe_succeeded(Duration::from_millis(40));
        let d = explain(&state, &HoldRules::default(), "default", "slow")
            .unwrap()
            .decision
            .unwrap();
        assert_eq!((d.action.as_str(), d.region.as_str()), ("route", "eu-west"));
        assert!(
            d.reason.starts_with(
                "no ready local instance (cold start ~500 ms): sent to a warm region at once"
            ),
            "{}",
            d.reason
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_crash_loop_goes_to_a_healthy_region_and_says_why() {
        let mut crashy = process(hello(&[]), 10);
        crashy.name = "crashy".into();
        crashy.local_failed_starts = 3;
        crashy.local_restart_backoff = true;
        let state = compile(vec![crashy]);
        let f = state.lookup("crashy").unwrap();
        f.tiers[1].endpoints[0]
            .shared
            .probe_succeeded(Duration::from_millis(80));
        let rules = HoldRules::default();
        // The request path's own rule.
        assert_eq!(
            rules.plan(f, state.clock().now(), Listener::Outbound),
            ColdPlan::Remote(GoRemote::CrashLoop {
                failed_starts: 3,
                restart_backoff: true
            })
        );
        let d = explain(&state, &rules, "default", "crashy")
            .unwrap()
            .decision
            .unwrap();
        assert_eq!((d.action.as_str(), d.region.as_str()), ("route", "eu-west"));
        assert_eq!(
            d.reason,
            "crash loop here (3 failed starts, restart backoff): sent to a healthy region at once \
             while the agent restarts it; us-east: no local instance → eu-west (explicit order), \
             RTT 80 ms"
        );
        // Below the sidecar's threshold, without a backoff: held, within the bound.
        let patient = HoldRules {
            crash_loop_failed_starts: 4,
            ..rules
        };
        let mut starting = process(hello(&[]), 10);
        starting.name = "crashy".into();
        starting.local_failed_starts = 3;
        let state = compile(vec![starting]);
        let f = state.lookup("crashy").unwrap();
        f.tiers[1].endpoints[0]
            .shared
            .probe_succeeded(Duration::from_millis(80));
        let d = explain(&state, &patient, "default", "crashy")
            .unwrap()
            .decision
            .unwrap();
        assert_eq!(d.action, "hold");
        assert!(
            d.reason.ends_with(
                "; held at most 130 ms (eu-west RTT 80 ms + 50 ms margin), then sent to eu-west"
            ),
            "{}",
            d.reason
        );
        // No healthy region: held, and the crash loop is named.
        let d = explain(&state, &rules, "default", "crashy")
            .unwrap()
            .decision
            .unwrap();
        assert_eq!(d.action, "route");
        f.tiers[1].endpoints[0].shared.mark_down();
        f.tiers[2].endpoints[0].shared.mark_down();
        let d = explain(&state, &rules, "default", "crashy")
            .unwrap()
            .decision
            .unwrap();
        assert_eq!(d.action, "hold");
        assert!(
            d.reason
                .ends_with("; crash loop here (3 failed starts), but no healthy remote region"),
            "{}",
            d.reason
        );
    }

    #[tokio::test(start_paused = true)]
    async fn explaining_changes_nothing_and_unknown_functions_are_named() {
        let state = compile(vec![hello(&["127.0.1.1:9000"])]);
        let f = state.lookup("hello").unwrap();
        let counters = || -> Vec<(usize, u32, u64)> {
            f.tiers
                .iter()
                .flat_map(|t| &t.endpoints)
                .map(|e| {
                    (
                        e.shared.in_flight(),
                        e.shared.consecutive_failures(),
                        e.shared.ejections(),
                    )
                })
                .collect()
        };
        let before = counters();
        for _ in 0..3 {
            explain(&state, &HoldRules::default(), "default", "hello").unwrap();
        }
        let after = counters();
        assert_eq!(before, after);
        assert_eq!(f.stats().retries.load(Ordering::Relaxed), 0);

        assert_eq!(
            explain(&state, &HoldRules::default(), "team", "hello")
                .unwrap_err()
                .to_string(),
            "function team/hello is not in this sidecar's table (version 7)"
        );
        assert_eq!(
            Status::from(explain(&state, &HoldRules::default(), "", "Bad_Name").unwrap_err())
                .code(),
            tonic::Code::InvalidArgument
        );
    }
}
