//! Golden tests of `meridianctl explain`: fixed explanations (as sidecars send them through
//! their agents) in, text / JSON / YAML compared with `tests/golden/explain_*.txt`. Run with
//! `UPDATE_GOLDEN=1` to rewrite the files after an intended change (and review the diff).

use std::path::PathBuf;

use meridian_proto::v1 as wire;
use meridianctl::explain::{agent_report, report_json, report_text, report_yaml, Report};
use meridianctl::logs::AgentTarget;

fn check(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var("UPDATE_GOLDEN").as_deref() == Ok("1") {
        std::fs::write(&path, actual).expect("write golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}); run with UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    assert!(
        actual == expected,
        "{name} differs from {} (UPDATE_GOLDEN=1 rewrites it)\n--- expected\n{expected}--- actual\n{actual}---",
        path.display()
    );
}

fn instance(address: &str, id: &str, ewma_ms: f64, in_flight: u64) -> wire::ExplainedEndpoint {
    wire::ExplainedEndpoint {
        address: address.into(),
        id: id.into(),
        state: "READY".into(),
        available: true,
        in_flight,
        ewma_ms,
        ..Default::default()
    }
}

fn gateway(address: &str, region: &str, rtt_ms: f64) -> wire::ExplainedEndpoint {
    wire::ExplainedEndpoint {
        address: address.into(),
        id: format!("gateway-{region}"),
        state: "READY".into(),
        available: true,
        ewma_ms: rtt_ms,
        probe: "up".into(),
        rtt_ms: Some(rtt_ms),
        ..Default::default()
    }
}

fn tier(
    region: &str,
    order: &str,
    priority: u32,
    (health, load): (u32, u32),
    endpoints: Vec<wire::ExplainedEndpoint>,
    note: &str,
) -> wire::ExplainedTier {
    wire::ExplainedTier {
        region: region.into(),
        local: order == "local",
        order: order.into(),
        priority: Some(priority),
        ready_instances: u32::try_from(endpoints.len()).expect("small"),
        health_permille: health,
        load_permille: load,
        available: u32::try_from(endpoints.iter().filter(|e| e.available).count()).expect("small"),
        endpoints,
        note: note.into(),
    }
}

fn explanation(
    tiers: Vec<wire::ExplainedTier>,
    decision: wire::ExplainDecision,
) -> wire::Explanation {
    wire::Explanation {
        region: "us-east".into(),
        table_version: 42,
        local_generation: 1_795_608_000_017,
        table_age_ms: 1250,
        namespace: "default".into(),
        name: "hello".into(),
        function_version: 17,
        workload: "process".into(),
        cold_start_ms: 35,
        held: 0,
        tiers,
        decision: Some(decision),
    }
}

fn route(region: &str, local: bool, candidates: &[&str], reason: &str) -> wire::ExplainDecision {
    wire::ExplainDecision {
        action: "route".into(),
        region: region.into(),
        local,
        candidates: candidates.iter().map(|c| c.to_string()).collect(),
        reason: reason.into(),
        error: String::new(),
    }
}

fn remote_tiers(eu_priority: u32, eu: (u32, u32), eu_note: &str) -> Vec<wire::ExplainedTier> {
    vec![
        tier(
            "eu-west",
            "explicit",
            eu_priority,
            eu,
            vec![gateway("127.0.2.1:15002", "eu-west", 3.1)],
            eu_note,
        ),
        tier(
            "ap-south",
            "explicit",
            eu_priority + 1,
            (1000, 0),
            vec![gateway("127.0.3.1:15002", "ap-south", 12.4)],
            "standby: earlier tiers take all traffic",
        ),
    ]
}

/// One agent with one sidecar that sent `explanation`, plus an unreachable second agent.
fn report(explanation: wire::Explanation) -> Report {
    let agent = |id: &str, port: u16| AgentTarget {
        agent_id: id.into(),
        region: "us-east".into(),
        address: format!("http://127.0.1.1:{port}"),
    };
    let answer = wire::ExplainResponse {
        region: "us-east".into(),
        sidecars: vec![wire::SidecarExplanation {
            sidecar: "sidecar-15001".into(),
            admin_address: "127.0.1.1:15090".into(),
            explanation: Some(explanation),
            error: String::new(),
            error_code: String::new(),
        }],
    };
    Report {
        namespace: "default".into(),
        name: "hello".into(),
        region: "us-east".into(),
        agents: vec![
            agent_report(&agent("us-east-1", 7100), Ok(answer)),
            agent_report(
                &agent("us-east-2", 7101),
                Err("unreachable: tcp connect error: Connection refused (os error 111)".into()),
            ),
        ],
    }
}

fn healthy() -> Report {
    let mut tiers = vec![tier(
        "us-east",
        "local",
        0,
        (1000, 1000),
        vec![
            instance("127.0.1.1:40001", "hello-3fa2c1", 1.2, 1),
            instance("127.0.1.1:40002", "hello-9b0d4e", 0.8, 0),
        ],
        "",
    )];
    tiers.extend(remote_tiers(
        1,
        (1000, 0),
        "standby: earlier tiers take all traffic",
    ));
    report(explanation(
        tiers,
        route(
            "us-east",
            true,
            &["127.0.1.1:40001", "127.0.1.1:40002"],
            "local tier healthy: 2/2 endpoints available",
        ),
    ))
}

#[test]
fn explain_healthy() {
    let report = healthy();
    check("explain_healthy.txt", &report_text(&report));
    check(
        "explain_healthy_json.txt",
        &report_json(&report).expect("json"),
    );
    check(
        "explain_healthy_yaml.txt",
        &report_yaml(&report).expect("yaml"),
    );
}

#[test]
fn explain_local_endpoint_ejected() {
    let mut ejected = instance("127.0.1.1:40001", "hello-3fa2c1", 1500.0, 0);
    ejected.available = false;
    ejected.ejected = true;
    ejected.ejected_for_ms = 1640;
    ejected.consecutive_failures = 4;
    ejected.ejections = 2;
    let mut tiers = vec![tier(
        "us-east",
        "local",
        0,
        (0, 0),
        vec![ejected],
        "all 1 endpoint(s) ejected (first back in 1.6 s)",
    )];
    tiers.extend(remote_tiers(1, (1000, 1000), ""));
    let report = report(explanation(
        tiers,
        route(
            "eu-west",
            false,
            &["127.0.2.1:15002"],
            "us-east: all 1 endpoint(s) ejected (first back in 1.6 s) → eu-west (explicit \
             order), RTT 3 ms",
        ),
    ));
    check("explain_ejected.txt", &report_text(&report));
}

#[test]
fn explain_region_down() {
    let mut ejected = instance("127.0.1.1:40001", "hello-3fa2c1", 1500.0, 0);
    ejected.available = false;
    ejected.ejected = true;
    ejected.ejected_for_ms = 820;
    ejected.consecutive_failures = 4;
    ejected.ejections = 1;
    let mut tiers = vec![tier(
        "us-east",
        "local",
        0,
        (0, 0),
        vec![ejected],
        "all 1 endpoint(s) ejected (first back in 820 ms)",
    )];
    let mut remote = remote_tiers(1, (0, 0), "down (probe failed: probe request failed: client error (Connect): tcp connect error: Connection refused (os error 111))");
    let eu = &mut remote[0].endpoints[0];
    eu.available = false;
    eu.probe = "down".into();
    eu.probe_error =
        "probe request failed: client error (Connect): tcp connect error: Connection refused \
         (os error 111)"
            .into();
    remote[0].available = 0;
    remote[1].load_permille = 1000;
    remote[1].note = String::new();
    tiers.extend(remote);
    let report = report(explanation(
        tiers,
        route(
            "ap-south",
            false,
            &["127.0.3.1:15002"],
            "us-east: all 1 endpoint(s) ejected (first back in 820 ms), eu-west: down (probe \
             failed: probe request failed: client error (Connect): tcp connect error: \
             Connection refused (os error 111)) → ap-south (explicit order), RTT 12 ms",
        ),
    ));
    check("explain_region_down.txt", &report_text(&report));
}

#[test]
fn explain_scaled_to_zero_holding() {
    let mut tiers = vec![tier(
        "us-east",
        "local",
        0,
        (0, 0),
        Vec::new(),
        "no local instance",
    )];
    let mut remote = remote_tiers(1, (1000, 1000), "");
    remote[0].endpoints[0] = gateway("127.0.2.1:15002", "eu-west", 40.0);
    remote[1].endpoints[0] = gateway("127.0.3.1:15002", "ap-south", 120.0);
    tiers.extend(remote);
    let mut explanation = explanation(
        tiers,
        wire::ExplainDecision {
            action: "hold".into(),
            reason: "no ready local instance: would hold (cold start ~35 ms) and ask the agent \
                     to start one; warm regions are farther than a cold start (eu-west RTT 40 \
                     ms, ap-south RTT 120 ms)"
                .into(),
            ..Default::default()
        },
    );
    explanation.name = "slow".into();
    explanation.held = 3;
    let mut report = report(explanation);
    report.name = "slow".into();
    check("explain_holding.txt", &report_text(&report));
}

#[test]
fn explain_without_sidecars() {
    let target = AgentTarget {
        agent_id: "us-east-1".into(),
        region: "us-east".into(),
        address: "http://127.0.1.1:7100".into(),
    };
    let report = Report {
        namespace: "default".into(),
        name: "hello".into(),
        region: "us-east".into(),
        agents: vec![agent_report(&target, Ok(wire::ExplainResponse::default()))],
    };
    assert!(!report.explained());
    check("explain_no_sidecar.txt", &report_text(&report));
}
