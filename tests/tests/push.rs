//! End-to-end push: an applied function reaches the agent of every region within a second, an
//! update travels as a delta on top of the version the agent holds, a delete removes it
//! everywhere, and `meridianctl get agents` shows what each agent acknowledged.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use futures::future::try_join_all;
use meridian_proto::v1::{
    DeleteFunctionRequest, FunctionSpec, GetFunctionRequest, RoutingPolicy, RoutingUpdate,
};
use meridian_tests::{
    apply, external_spec, json_acked_versions, output_text, poll_until, probe_hello, route, Agent,
    Mesh, RawAgent, REGIONS,
};
use tokio::time::Instant;

/// The promise under test: an apply is in every region's agent within this.
const WITHIN_A_SECOND: Duration = Duration::from_secs(1);
/// Generous bound for everything else (start-up, acks, status writes).
const SLOW: Duration = Duration::from_secs(10);

const HELLO_URLS: [(&str, &str); 3] = [
    ("us-east", "http://127.0.1.1:9000"),
    ("eu-west", "http://127.0.2.1:9000"),
    ("ap-south", "http://127.0.3.1:9000"),
];

fn hello_spec(timeout_ms: Option<u32>) -> FunctionSpec {
    let mut spec = external_spec("hello", &HELLO_URLS);
    spec.routing = timeout_ms.map(|timeout_ms| RoutingPolicy {
        timeout_ms: Some(timeout_ms),
        ..Default::default()
    });
    spec
}

/// Reads the probe's updates (acknowledging each) until one satisfies `accept`. Every update
/// after the first full table must be a delta on top of the version the probe holds.
async fn probe_until(
    probe: &mut RawAgent,
    held: &mut i64,
    what: &str,
    accept: impl Fn(&RoutingUpdate) -> bool,
) -> Result<RoutingUpdate> {
    let deadline = Instant::now() + SLOW;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let update = probe
            .next_update(left)
            .await
            .with_context(|| format!("probe waiting for {what}"))?;
        ensure!(
            !update.full,
            "expected a delta after the first full table, got a full table {update:?}"
        );
        ensure!(
            update.base_version == *held,
            "delta base_version {} but the probe holds (and acked) {}: {update:?}",
            update.base_version,
            *held
        );
        ensure!(
            update.version > *held,
            "delta version {} is not newer than the held {}",
            update.version,
            *held
        );
        probe.ack(update.version).await?;
        *held = update.version;
        if accept(&update) {
            return Ok(update);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_update_delete_reach_every_agent_full_then_deltas() -> Result<()> {
    let mesh = Mesh::start(1, &REGIONS).await?;
    let cp = mesh.cp();
    mesh.wait_agents_synced(SLOW).await?;
    let mut watchers = try_join_all(mesh.agents.iter().map(Agent::watch)).await?;

    // A hand-driven agent of us-east, to see the wire: one full table, then deltas.
    let mut probe =
        RawAgent::connect(cp.channel().await?, probe_hello("us-east", "probe-1", 0)).await?;
    let first = probe.next_update(SLOW).await?;
    ensure!(
        first.full,
        "the first update must be a full table: {first:?}"
    );
    ensure!(
        first.region == "us-east",
        "full table for the wrong region: {first:?}"
    );
    probe.ack(first.version).await?;
    let mut held = first.version;

    // Apply: every region's agent has the function within a second.
    let mut functions = cp.functions().await?;
    let created = apply(&mut functions, hello_spec(None)).await?;
    let v1 = created.version;
    ensure!(v1 > 0, "Apply returned version {v1}");
    try_join_all(watchers.iter_mut().map(|w| {
        w.wait_for(WITHIN_A_SECOND, "hello at its first version", move |t| {
            route(t, "hello").is_some_and(|r| r.function_version == v1)
        })
    }))
    .await?;
    probe_until(&mut probe, &mut held, "a delta adding hello", |u| {
        u.functions
            .iter()
            .any(|f| f.name == "hello" && f.function_version == v1)
    })
    .await?;

    // Update: a delta carries the new version and policy.
    let updated = apply(&mut functions, hello_spec(Some(20_000))).await?;
    let v2 = updated.version;
    ensure!(v2 > v1, "update version {v2} not above {v1}");
    try_join_all(watchers.iter_mut().map(|w| {
        w.wait_for(SLOW, "hello at its updated version", move |t| {
            route(t, "hello").is_some_and(|r| {
                r.function_version == v2
                    && r.policy
                        .as_ref()
                        .is_some_and(|p| p.timeout_ms == Some(20_000))
            })
        })
    }))
    .await?;
    probe_until(&mut probe, &mut held, "a delta updating hello", |u| {
        u.functions
            .iter()
            .any(|f| f.name == "hello" && f.function_version == v2)
    })
    .await?;

    // Delete: gone from every agent, and the delta says it was removed.
    functions
        .delete(DeleteFunctionRequest {
            namespace: "default".to_string(),
            name: "hello".to_string(),
            expected_version: 0,
        })
        .await?;
    try_join_all(
        watchers
            .iter_mut()
            .map(|w| w.wait_for(SLOW, "hello to be removed", |t| route(t, "hello").is_none())),
    )
    .await?;
    probe_until(&mut probe, &mut held, "a delta removing hello", |u| {
        u.removed.iter().any(|r| r.name == "hello")
    })
    .await?;

    // Every agent's acked version (and the probe's) shows in `meridianctl get agents -o json`.
    let agents = &mesh.agents;
    let probe_held = held;
    poll_until(
        SLOW,
        "get agents to show every acked version",
        || async move {
            let out = cp.ctl(["get", "agents", "-o", "json"]).await?;
            ensure!(
                out.status.success(),
                "get agents failed: {}",
                output_text(&out)
            );
            let json: serde_json::Value =
                serde_json::from_slice(&out.stdout).with_context(|| {
                    format!("get agents -o json is not JSON: {}", output_text(&out))
                })?;
            let acked = json_acked_versions(&json);
            let mut expected: Vec<(String, i64)> = vec![("probe-1".to_string(), probe_held)];
            for agent in agents {
                let table = agent.table().await?.context("agent has no table")?;
                expected.push((agent.agent_id().to_string(), table.version));
            }
            for (id, version) in &expected {
                ensure!(
                    acked.contains(&(id.clone(), *version)),
                    "{id} should show acked version {version}; get agents shows {acked:?}"
                );
            }
            Ok(())
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meridianctl_apply_of_yaml_reaches_every_agent() -> Result<()> {
    let mesh = Mesh::start(1, &REGIONS).await?;
    let cp = mesh.cp();
    mesh.wait_agents_synced(SLOW).await?;
    let mut watchers = try_join_all(mesh.agents.iter().map(Agent::watch)).await?;

    let dir = tempfile::tempdir()?;
    let manifest = dir.path().join("hello-yaml.yaml");
    std::fs::write(
        &manifest,
        "\
# An external function, one URL per region.
apiVersion: meridian.dev/v1
kind: Function
metadata:
  name: hello-yaml
  labels:
    team: web
spec:
  runtime:
    external:
      regions:
        - region: us-east
          urls: [\"http://127.0.1.1:9000\"]
        - region: eu-west
          urls: [\"http://127.0.2.1:9000\"]
        - region: ap-south
          urls: [\"http://127.0.3.1:9000\"]
  routing:
    timeout: 12s
    maxRetries: 3
",
    )?;
    let out = cp
        .ctl([
            std::ffi::OsStr::new("apply"),
            "-f".as_ref(),
            manifest.as_os_str(),
        ])
        .await?;
    ensure!(
        out.status.success(),
        "apply -f failed: {}",
        output_text(&out)
    );
    try_join_all(watchers.iter_mut().map(|w| {
        w.wait_for(WITHIN_A_SECOND, "hello-yaml to arrive", |t| {
            route(t, "hello-yaml").is_some()
        })
    }))
    .await?;

    // The YAML fields landed where they belong.
    let stored = cp
        .functions()
        .await?
        .get(GetFunctionRequest {
            namespace: "default".to_string(),
            name: "hello-yaml".to_string(),
        })
        .await?
        .into_inner();
    let spec = stored.spec.context("stored function without spec")?;
    ensure!(
        spec.labels.get("team").map(String::as_str) == Some("web"),
        "labels: {spec:?}"
    );
    let routing = spec.routing.context("no routing policy stored")?;
    ensure!(
        routing.timeout_ms == Some(12_000) && routing.max_retries == Some(3),
        "routing policy: {routing:?}"
    );

    // The read verbs see it too.
    for args in [
        vec!["get", "functions"],
        vec!["get", "routes", "us-east"],
        vec!["describe", "function", "hello-yaml"],
    ] {
        let out = cp.ctl(&args).await?;
        ensure!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("hello-yaml"),
            "meridianctl {args:?} should show hello-yaml: {}",
            output_text(&out)
        );
    }
    Ok(())
}
