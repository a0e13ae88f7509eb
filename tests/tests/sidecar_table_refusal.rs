//! A table the sidecar cannot compile is refused: the sidecar reports it to its agent
//! (`ReportTable`, accepted = false, with the field at fault), the agent Nacks that version to
//! the control plane (visible in `ListAgents`), and the sidecar keeps serving its old table. The
//! next good table is accepted. Until then the region is not in sync (its sidecar has not loaded
//! the version), and `meridianctl status` and `get agents` say so, naming the sidecar.
//!
//! The control plane and the agent both refuse such tables themselves, so one cannot arrive
//! through them: the route tap between the agent and the sidecar spoils the table on its way
//! (one endpoint address that is not `host:port`), keeping its version, which is the version
//! the agent holds and so the one it Nacks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use http::StatusCode;
use meridian_tests::{
    backend_spec, free_port, output_text, poll_until, region_ip, Relay, SidecarOpts, TestBackend,
    World,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncompilable_table_is_nacked_and_the_old_one_keeps_serving() -> Result<()> {
    let world = World::start_with(&["us-east"], Relay::new(), SidecarOpts::default()).await?;
    let ip = region_ip(0);
    let backend = TestBackend::start(SocketAddr::from((ip, free_port(ip)?)), "b").await?;
    world
        .apply(backend_spec("first", &[("us-east", backend.url())]))
        .await?;
    world
        .wait_served("us-east", "first", "us-east", Duration::from_secs(20))
        .await?;

    // From now on, spoil function "second" in every table the sidecar gets.
    world.tap("us-east").set_tamper(Some(Arc::new(|table| {
        for function in table.functions.iter_mut().filter(|f| f.name == "second") {
            for tier in &mut function.tiers {
                for endpoint in &mut tier.endpoints {
                    endpoint.address = "not an address".to_string();
                }
            }
        }
    })));
    let second = world
        .apply(backend_spec("second", &[("us-east", backend.url())]))
        .await?;
    let spoiled_version = second.version;
    let report = poll_until(
        Duration::from_secs(10),
        "the sidecar to refuse the spoiled table",
        || async {
            world
                .tap("us-east")
                .reports()
                .into_iter()
                .find(|r| !r.accepted && r.version >= spoiled_version)
                .with_context(|| {
                    format!(
                        "no refusal yet; reports: {:?}",
                        world.tap("us-east").reports()
                    )
                })
        },
    )
    .await?;
    eprintln!("sidecar refused: {report:?}");
    ensure!(
        report.reason.contains("address"),
        "the refusal must name the field at fault: {:?}",
        report.reason
    );

    // The agent Nacked it to the control plane.
    let nack = poll_until(
        Duration::from_secs(10),
        "the control plane to record the sidecar's refusal as the agent's Nack",
        || async {
            let agents = world.mesh.cp().agents().await?;
            let status = agents
                .iter()
                .find(|a| a.region == "us-east")
                .with_context(|| format!("us-east not listed: {agents:?}"))?;
            ensure!(
                status.last_nack.contains("address"),
                "last_nack: {:?}",
                status.last_nack
            );
            Ok(status.last_nack.clone())
        },
    )
    .await?;
    eprintln!("control plane: last_nack = {nack:?}");

    // Status tells the truth: the agent holds the newest table, but its sidecar did not load
    // it, so the region is not in sync, and `status` names the sidecar and why.
    let not_in_sync = poll_until(
        Duration::from_secs(10),
        "ListAgents to count us-east out of sync for its sidecar",
        || async {
            let agents = world.mesh.cp().agents().await?;
            let status = agents
                .iter()
                .find(|a| a.region == "us-east")
                .with_context(|| format!("us-east not listed: {agents:?}"))?;
            let failing = status
                .sidecars
                .iter()
                .find(|s| s.connected && !s.error.is_empty())
                .with_context(|| format!("no failing sidecar reported: {:?}", status.sidecars))?;
            ensure!(
                !status.in_sync
                    && status.sidecars_in_sync == 0
                    && failing.error.contains("address")
                    && failing.failed_version >= spoiled_version,
                "in_sync {} sidecars_in_sync {} sidecars {:?}",
                status.in_sync,
                status.sidecars_in_sync,
                status.sidecars
            );
            Ok(failing.sidecar.clone())
        },
    )
    .await?;
    let out = world.mesh.cp().ctl(["status"]).await?;
    let text = output_text(&out);
    ensure!(
        text.contains(&format!("sidecar {not_in_sync}"))
            && text.contains("cannot load its table")
            && text.contains("address"),
        "status must name the sidecar that cannot load its table:\n{text}"
    );
    let out = world.mesh.cp().ctl(["get", "agents"]).await?;
    let text = output_text(&out);
    ensure!(
        text.lines()
            .any(|l| l.starts_with("us-east") && l.contains("0/1 (failing)")),
        "get agents must show the failing sidecar:\n{text}"
    );

    // The old table keeps serving: "first" works; "second" is as the old table has it (the
    // control plane publishes a function before its endpoints are reported, so the old table may
    // already list it, without endpoints), never routed to the spoiled address.
    let routes = world.sidecar("us-east").routes().await?;
    let held = routes["version"].as_i64().unwrap_or_default();
    ensure!(
        held > 0 && held < report.version,
        "the sidecar must hold the table before the refused version {}: /routes {routes}",
        report.version
    );
    ensure!(
        routes["refused"]["version"].as_i64() == Some(report.version),
        "/routes must show the refusal: {routes}"
    );
    let client = world.sidecar("us-east").client();
    let reply = client.get("first", "/").await?;
    ensure!(
        reply.status == StatusCode::OK,
        "first: {}",
        reply.describe()
    );
    let reply = client.get("second", "/").await?;
    ensure!(
        matches!(reply.error(), Some("unknown-function" | "no-endpoints")),
        "second has no endpoint in the old table: {}",
        reply.describe()
    );
    ensure!(
        world.sidecar("us-east").is_ready().await?,
        "a refused table must not make the sidecar unready"
    );

    // A good table after that is accepted.
    world.tap("us-east").set_tamper(None);
    let third = world
        .apply(backend_spec("third", &[("us-east", backend.url())]))
        .await?;
    world
        .wait_served("us-east", "third", "us-east", Duration::from_secs(10))
        .await?;
    // ... and once it is loaded, the region is in sync again, sidecar included.
    poll_until(
        Duration::from_secs(10),
        "us-east to be in sync again",
        || async {
            let agents = world.mesh.cp().agents().await?;
            ensure!(
                agents
                    .iter()
                    .any(|a| a.region == "us-east" && a.in_sync && a.sidecars_in_sync == 1),
                "{agents:?}"
            );
            Ok(())
        },
    )
    .await?;
    let reply = client.get("second", "/").await?;
    ensure!(
        reply.status == StatusCode::OK,
        "second, unspoiled in a newer table: {}",
        reply.describe()
    );
    let accepted = world
        .tap("us-east")
        .reports()
        .into_iter()
        .any(|r| r.accepted && r.version >= third.version);
    ensure!(
        accepted,
        "no accepted report for the good table: {:?}",
        world.tap("us-east").reports()
    );
    Ok(())
}
