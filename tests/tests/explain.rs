//! End-to-end `meridianctl explain`: real etcd, control plane, agents and sidecars in two
//! regions, and the real CLI binary. The explanation comes from us-east's sidecar through its
//! agent: first the healthy local tier is the next hop; once the local backend is dead and its
//! endpoint ejected, the next request goes to eu-west, and the explanation says why.
//!
//! The sidecars watch their agents directly (no route tap): the agent learns each sidecar's
//! admin address from its Watch call, which is what `AgentApiService.Explain` dials.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use meridian_tests::{
    backend_spec, free_port, function_tiers, meridianctl, output_text, poll_until, region_ip,
    AgentOpts, Mesh, Sidecar, SidecarOpts, TestBackend,
};

const REGIONS: [&str; 2] = ["us-east", "eu-west"];
const WITHIN: Duration = Duration::from_secs(20);

/// `meridianctl explain --from <region> hello -o <format>` against the mesh's control plane.
async fn explain(mesh: &Mesh, region: &str, format: &str) -> Result<std::process::Output> {
    meridianctl([
        "--control-plane",
        &mesh.cp().url(),
        "explain",
        "--from",
        region,
        "hello",
        "-o",
        format,
    ])
    .await
}

/// The JSON explanation of us-east's one sidecar, if the command succeeded.
async fn explanation(mesh: &Mesh) -> Result<serde_json::Value> {
    let output = explain(mesh, "us-east", "json").await?;
    ensure!(output.status.success(), "{}", output_text(&output));
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("explain -o json is JSON")?;
    let sidecars = report["agents"][0]["sidecars"]
        .as_array()
        .ok_or_else(|| anyhow!("no sidecars in {report}"))?;
    ensure!(sidecars.len() == 1, "one sidecar expected: {report}");
    Ok(sidecars[0]["explanation"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_follows_the_sidecars_routing_state() -> Result<()> {
    let mut gateways: Vec<SocketAddr> = Vec::new();
    for index in 0..REGIONS.len() {
        let ip = region_ip(index);
        gateways.push(SocketAddr::from((ip, free_port(ip)?)));
    }
    let mesh = Mesh::start_with(1, &REGIONS, |index, _| AgentOpts {
        gateway: gateways.get(index).copied(),
        ..Default::default()
    })
    .await?;
    let mut sidecars = Vec::new();
    for (index, agent) in mesh.agents.iter().enumerate() {
        sidecars.push(
            Sidecar::start(
                index,
                agent.region(),
                &agent.url(),
                SidecarOpts {
                    gateway: gateways.get(index).copied(),
                    client_id: Some(format!("sidecar-{}", agent.region())),
                    ..Default::default()
                },
            )
            .await?,
        );
    }
    let mut us_backend = TestBackend::start(
        SocketAddr::from((region_ip(0), free_port(region_ip(0))?)),
        "us-east-backend",
    )
    .await?;
    let eu_backend = TestBackend::start(
        SocketAddr::from((region_ip(1), free_port(region_ip(1))?)),
        "eu-west-backend",
    )
    .await?;
    meridian_tests::apply(
        &mut mesh.cp().functions().await?,
        backend_spec(
            "hello",
            &[("us-east", us_backend.url()), ("eu-west", eu_backend.url())],
        ),
    )
    .await?;

    // us-east serves hello locally and has probed eu-west up.
    let us_east = &sidecars[0];
    let client = us_east.client();
    poll_until(
        WITHIN,
        "us-east to serve hello locally, eu-west probed up",
        || async {
            let reply = client.get("hello", "/").await?;
            ensure!(reply.region() == Some("us-east"), "{}", reply.describe());
            let tiers = function_tiers(&us_east.routes().await?, "hello")?;
            let eu = tiers
                .iter()
                .find(|t| t.region == "eu-west")
                .ok_or_else(|| anyhow!("no eu-west tier: {tiers:?}"))?;
            ensure!(eu.probe.as_deref() == Some("up"), "eu-west: {:?}", eu.raw);
            ensure!(
                eu.raw["readyInstances"].as_u64().unwrap_or(0) > 0,
                "{:?}",
                eu.raw
            );
            Ok(())
        },
    )
    .await?;

    // The next request goes to the local tier, as the sidecar itself says.
    let healthy = poll_until(
        WITHIN,
        "explain to show the local tier as next hop",
        || async {
            let e = explanation(&mesh).await?;
            ensure!(e["next"]["region"] == "us-east", "{e:#}");
            Ok(e)
        },
    )
    .await?;
    assert_eq!(healthy["next"]["action"], "route");
    assert_eq!(healthy["next"]["local"], true);
    assert_eq!(
        healthy["next"]["reason"],
        "local tier healthy: 1/1 endpoints available"
    );
    assert_eq!(
        healthy["next"]["candidates"][0],
        us_backend.addr().to_string()
    );
    let tiers = healthy["tiers"].as_array().context("tiers")?;
    assert_eq!(tiers.len(), 2, "{healthy:#}");
    assert_eq!(tiers[1]["region"], "eu-west");
    assert_eq!(tiers[1]["endpoints"][0]["probe"], "up");
    let text = explain(&mesh, "us-east", "text").await?;
    ensure!(text.status.success(), "{}", output_text(&text));
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(
        stdout.contains("Next request → us-east (local) because local tier healthy"),
        "{stdout}"
    );
    assert!(stdout.contains("Sidecar sidecar-us-east"), "{stdout}");

    // Kill the local backend; requests (GETs are retried in eu-west) fail on it until it is
    // ejected, and the explanation moves the next request to eu-west, saying why.
    us_backend.stop();
    let ejected = poll_until(
        WITHIN,
        "explain to show the local endpoint ejected",
        || async {
            for _ in 0..6 {
                client.get("hello", "/").await?;
            }
            let e = explanation(&mesh).await?;
            let local = &e["tiers"][0]["endpoints"][0];
            ensure!(local["ejected"] == true, "not ejected yet: {e:#}");
            ensure!(e["next"]["region"] == "eu-west", "{e:#}");
            Ok(e)
        },
    )
    .await?;
    let reason = ejected["next"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("us-east: all 1 endpoint(s) ejected (first back in ")
            && reason.contains(" → eu-west (measured order), RTT "),
        "{ejected:#}"
    );
    assert_eq!(ejected["next"]["local"], false);
    assert_eq!(ejected["tiers"][0]["sharePercent"], 0.0);
    assert_eq!(ejected["tiers"][1]["sharePercent"], 100.0);
    assert!(
        ejected["tiers"][0]["endpoints"][0]["ejectedForMs"]
            .as_u64()
            .unwrap_or(0)
            > 0
    );

    // The other region explains from its own sidecar; an unknown region is named.
    let output = explain(&mesh, "eu-west", "yaml").await?;
    ensure!(output.status.success(), "{}", output_text(&output));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("region: eu-west"),
        "{}",
        output_text(&output)
    );
    let output = explain(&mesh, "ap-south", "text").await?;
    assert_eq!(output.status.code(), Some(1), "{}", output_text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("no agent is connected in region \"ap-south\""),
        "{}",
        output_text(&output)
    );
    Ok(())
}
