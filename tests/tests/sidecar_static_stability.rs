//! Static stability of the data plane: with the control plane and etcd stopped in the middle
//! of a steady load, traffic continues with no failed request, and failover still works (it is
//! decided in the data plane): killing the local instance afterwards moves traffic to eu-west.

use std::time::Duration;

use anyhow::{ensure, Result};
use meridian_tests::http::{Load, LoadReport, LoadSpec};
use meridian_tests::{start_samples, World};

const RATE: u32 = 100;
const RUN: Duration = Duration::from_secs(7);
const STOP_AT: Duration = Duration::from_secs(1);
const KILL_AT: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_continues_with_the_control_plane_and_etcd_stopped() -> Result<()> {
    let mut world = World::start().await?;
    let mut instances = start_samples(&[("us-east", 1), ("eu-west", 1), ("ap-south", 1)]).await?;
    world.serve_hello_in_us_east(&instances).await?;

    let client = world.sidecar("us-east").client();
    let load = Load::start(&client, LoadSpec::get("hello", RATE, RUN));
    tokio::time::sleep_until(load.started() + STOP_AT).await;
    for cp in &mut world.mesh.control_planes {
        cp.kill();
    }
    world.mesh.etcd.kill();
    tokio::time::sleep_until(load.started() + KILL_AT).await;
    for instance in instances.iter_mut().filter(|i| i.region() == "us-east") {
        instance.kill();
    }
    let report = load.finish().await?;
    eprintln!("load: {}", report.summary());
    ensure!(
        report.failures().is_empty(),
        "requests failed with the control plane down:\n{}",
        report.summary()
    );
    let between =
        LoadReport::served_by(&report.sent_between(STOP_AT, KILL_AT - Duration::from_millis(200)));
    ensure!(
        between.len() == 1 && between[0].0 == "us-east",
        "with the control plane down, the local instance still serves everything: {between:?}"
    );
    let after = LoadReport::served_by(&report.sent_between(KILL_AT + Duration::from_secs(1), RUN));
    ensure!(
        after.len() == 1 && after[0].0 == "eu-west",
        "with the control plane down, failover to eu-west still happens: {after:?}"
    );
    // The agents are still up and the sidecars still ready.
    for sidecar in &world.sidecars {
        ensure!(
            sidecar.is_ready().await?,
            "{} unready without a control plane",
            sidecar.region()
        );
    }
    Ok(())
}
