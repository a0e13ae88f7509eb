//! End-to-end etcd restart: etcd stops and starts again (same ports, same data) under a running
//! control plane; without restarting it, Apply works again and agents receive the change.

use std::time::Duration;

use anyhow::{ensure, Result};
use futures::future::try_join_all;
use meridian_tests::{apply, external_spec, poll_until, route, Agent, Mesh, REGIONS};

const SLOW: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_rides_out_an_etcd_restart() -> Result<()> {
    let mut mesh = Mesh::start(1, &REGIONS).await?;
    mesh.wait_agents_synced(SLOW).await?;
    let mut watchers = try_join_all(mesh.agents.iter().map(Agent::watch)).await?;

    let before = apply(
        &mut mesh.cp().functions().await?,
        external_spec("before", &[("us-east", "http://127.0.1.1:9000")]),
    )
    .await?;
    try_join_all(watchers.iter_mut().map(|w| {
        w.wait_for(SLOW, "the function applied before the restart", |t| {
            route(t, "before").is_some()
        })
    }))
    .await?;

    mesh.etcd.stop().await?;
    mesh.etcd.restart().await?;

    // Apply works again once the replica's etcd client has reconnected (poll: the first
    // attempts may still fail).
    let cp = mesh.cp();
    let after = poll_until(SLOW, "Apply to work after the etcd restart", || async {
        apply(
            &mut cp.functions().await?,
            external_spec("after", &[("eu-west", "http://127.0.2.1:9000")]),
        )
        .await
    })
    .await?;
    ensure!(
        after.version > before.version,
        "version {} after the restart is not above {}",
        after.version,
        before.version
    );
    // The replica's watch resumed: the agents receive the change.
    try_join_all(watchers.iter_mut().map(|w| {
        w.wait_for(SLOW, "the function applied after the restart", |t| {
            route(t, "after").is_some() && route(t, "before").is_some()
        })
    }))
    .await?;
    // Same process all along, serving, and the agents are still registered.
    ensure!(
        mesh.control_planes[0].is_running(),
        "the control plane exited"
    );
    mesh.cp().check_serving().await?;
    mesh.wait_agents_synced(SLOW).await?;
    Ok(())
}
