//! Every component's `/metrics` is valid Prometheus text: after real traffic through a process
//! function (so that labelled series exist), the control plane's, each agent's and each
//! sidecar's exposition passes the real `promtool check metrics` (Debian's `prometheus`
//! package). And an Apply is counted by the control plane's propagation-latency histogram.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use http::StatusCode;
use meridian_tests::{
    metric_value, poll_until, wait_scale, ProcessFunction, Relay, SidecarOpts, World,
};
use tokio::io::AsyncWriteExt;

/// Runs `promtool check metrics` on `text`; fails with promtool's findings.
async fn promtool_check(component: &str, text: &str) -> Result<()> {
    let mut child = match tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => bail!(
            "promtool is not installed: install Debian's `prometheus` package \
             (`apt-get install prometheus`, or `deploy/install-packages.sh promtool=prometheus`; \
             tests/run.sh and CI do it)"
        ),
        Err(error) => return Err(error).context("cannot run promtool"),
    };
    let mut stdin = child.stdin.take().context("promtool has no stdin")?;
    stdin.write_all(text.as_bytes()).await?;
    drop(stdin);
    let output = child.wait_with_output().await?;
    ensure!(
        output.status.success(),
        "promtool check metrics failed on the {component}'s /metrics ({}):\n{}{}\n--- metrics:\n{text}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    Ok(())
}

/// `series`' value in `text`, 0 when absent.
fn value(text: &str, series: &str) -> f64 {
    metric_value(text, series).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metrics_endpoint_passes_promtool_and_an_apply_is_propagated() -> Result<()> {
    // Fail fast, before starting anything, when promtool is missing.
    promtool_check("empty input", "").await?;

    let world = World::start_with(
        &["us-east", "eu-west"],
        Relay::new(),
        SidecarOpts::default(),
    )
    .await?;
    let cp = world.mesh.cp();
    world
        .mesh
        .wait_agents_synced(Duration::from_secs(20))
        .await?;
    let propagation = r#"meridian_propagation_seconds_count{region="us-east"}"#;
    let before = value(&cp.metrics().await?, propagation);

    // An Apply: a process function with one instance in us-east.
    let function = ProcessFunction::sample("metered").in_regions(&[("us-east", 1)]);
    world.apply(function.spec()?).await?;
    wait_scale(
        &cp.url(),
        "metered",
        "us-east",
        Duration::from_secs(30),
        "one ready instance of metered",
        |s| s.ready >= 1,
    )
    .await?;
    // Traffic, so that the sidecar has per-function series.
    let client = world.sidecar("us-east").client();
    poll_until(Duration::from_secs(20), "metered to answer 200", || {
        let client = client.clone();
        async move {
            let reply = client.get("metered", "/").await?;
            ensure!(reply.status == StatusCode::OK, "{}", reply.describe());
            Ok(())
        }
    })
    .await?;
    for _ in 0..20 {
        client.get("metered", "/").await?;
    }

    // The control plane counted the Apply's propagation to us-east's agent, and sees both
    // agents, its pushes and its leadership.
    let cp_metrics = poll_until(
        Duration::from_secs(20),
        "the propagation histogram to count the apply",
        || async {
            let text = cp.metrics().await?;
            let count = value(&text, propagation);
            ensure!(
                count > before,
                "{propagation} is {count} (was {before}):\n{text}"
            );
            Ok(text)
        },
    )
    .await?;
    ensure!(
        value(
            &cp_metrics,
            r#"meridian_propagation_seconds_sum{region="us-east"}"#
        ) > 0.0,
        "{cp_metrics}"
    );
    ensure!(
        value(&cp_metrics, "meridian_agents_connected") == 2.0,
        "{cp_metrics}"
    );
    ensure!(
        value(&cp_metrics, r#"meridian_pushes_total{kind="full"}"#) >= 2.0,
        "{cp_metrics}"
    );
    ensure!(
        value(&cp_metrics, "meridian_scheduler_leader") == 1.0,
        "{cp_metrics}"
    );
    ensure!(
        value(
            &cp_metrics,
            r#"meridian_routing_table_version{region="us-east"}"#
        ) > 0.0,
        "{cp_metrics}"
    );
    promtool_check("control plane", &cp_metrics).await?;

    // The us-east agent: its table, its stream, the autoscaler and the cold start.
    let agent = world
        .mesh
        .agents
        .iter()
        .find(|a| a.region() == "us-east")
        .context("no us-east agent")?;
    let desired = r#"meridian_autoscaler_desired_instances{namespace="default",function="metered",region="us-east"}"#;
    let agent_metrics = poll_until(
        Duration::from_secs(10),
        "the agent to report the autoscaler and a cold start",
        || async {
            let text = agent.metrics().await?;
            ensure!(value(&text, desired) >= 1.0, "{desired} missing:\n{text}");
            ensure!(
                value(&text, "meridian_instance_cold_start_seconds_count") >= 1.0,
                "no cold start observed:\n{text}"
            );
            Ok(text)
        },
    )
    .await?;
    ensure!(
        value(&agent_metrics, "meridian_agent_connected") == 1.0,
        "{agent_metrics}"
    );
    ensure!(
        value(&agent_metrics, "meridian_agent_table_version") > 0.0,
        "{agent_metrics}"
    );
    ensure!(
        metric_value(&agent_metrics, "meridian_agent_table_age_seconds").is_some(),
        "{agent_metrics}"
    );
    for agent in &world.mesh.agents {
        let text = agent.metrics().await?;
        promtool_check(&format!("{} agent", agent.region()), &text).await?;
        let ready = agent.admin_get("/ready").await?;
        ensure!(
            ready.status == StatusCode::OK,
            "agent /ready: {}",
            ready.describe()
        );
    }
    let ready = cp.admin_get("/ready").await?;
    ensure!(
        ready.status == StatusCode::OK,
        "control plane /ready: {}",
        ready.describe()
    );

    for sidecar in &world.sidecars {
        let text = sidecar.metrics().await?;
        promtool_check(&format!("{} sidecar", sidecar.region()), &text).await?;
    }
    Ok(())
}
