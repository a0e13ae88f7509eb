//! Real-etcd test of the replica registry: each replica registers `replicas/<id>` on its own
//! lease, `ControlPlaneService.ListReplicas` lists them sorted with the scheduler leader marked,
//! and a replica whose lease is gone (it died) drops out of the list.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use anyhow::{ensure, Result};
use common::{poll, Etcd};
use meridian_control_plane::api::ControlPlaneApi;
use meridian_control_plane::push;
use meridian_control_plane::store::{Campaign, Store};
use meridian_proto::v1 as pb;
use meridian_proto::v1::control_plane_service_server::ControlPlaneService;
use tokio::sync::watch;

const LEASE_TTL: Duration = Duration::from_secs(1);

fn info(id: &str, port: u16) -> pb::ReplicaInfo {
    pb::ReplicaInfo {
        replica_id: id.into(),
        address: format!("127.0.0.1:{port}"),
        started_unix_ms: 1_700_000_000_000,
        leader: false,
    }
}

/// Runs a replica's lease with its registration; returns the task and the lease once held.
async fn replica(store: &Store, id: &str, port: u16) -> Result<(tokio::task::JoinHandle<()>, i64)> {
    let (lease_tx, mut lease_rx) = watch::channel(None);
    let task = tokio::spawn(push::run_registered_replica_lease(
        store.clone(),
        LEASE_TTL,
        lease_tx,
        Some(info(id, port)),
    ));
    let lease = lease_rx
        .wait_for(Option::is_some)
        .await?
        .unwrap_or_default();
    Ok((task, lease))
}

async fn listed(api: &ControlPlaneApi) -> Result<pb::ListReplicasResponse> {
    Ok(api
        .list_replicas(tonic::Request::new(pb::ListReplicasRequest {}))
        .await?
        .into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_register_on_their_lease_and_the_leader_is_marked() -> Result<()> {
    let Some(etcd) = Etcd::start().await? else {
        return Ok(());
    };
    let store = etcd.store("/replicas-test/").await?;
    let api = ControlPlaneApi::new(store.clone());
    let (b_task, b_lease) = replica(&store, "cp-b", 7001).await?;
    let (a_task, _) = replica(&store, "cp-a", 7000).await?;

    let both = poll(
        Duration::from_secs(5),
        "both replicas registered",
        || async {
            listed(&api)
                .await
                .ok()
                .filter(|answer| answer.replicas.len() == 2)
        },
    )
    .await?;
    ensure!(
        both.replicas == vec![info("cp-a", 7000), info("cp-b", 7001)] && both.leader.is_empty(),
        "sorted, nobody leads yet: {both:?}"
    );

    let Campaign::Elected { elected_version } = store.campaign("cp-b", b_lease).await? else {
        anyhow::bail!("cp-b was not elected");
    };
    let answer = listed(&api).await?;
    ensure!(
        answer.leader == "cp-b" && answer.elected_version == elected_version,
        "{answer:?}"
    );
    let leaders: Vec<&str> = answer
        .replicas
        .iter()
        .filter(|r| r.leader)
        .map(|r| r.replica_id.as_str())
        .collect();
    ensure!(leaders == vec!["cp-b"], "{answer:?}");

    // cp-a dies: its lease is no longer kept alive, and its registration expires with it.
    a_task.abort();
    let ids = |answer: &pb::ListReplicasResponse| -> Vec<String> {
        answer
            .replicas
            .iter()
            .map(|r| r.replica_id.clone())
            .collect()
    };
    poll(
        Duration::from_secs(10),
        "cp-a's registration to expire with its lease",
        || async { listed(&api).await.ok().filter(|a| ids(a) == ["cp-b"]) },
    )
    .await?;
    b_task.abort();
    Ok(())
}
