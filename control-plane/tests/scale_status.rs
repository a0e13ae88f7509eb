//! Real-etcd test of what agents report about scale: `Hello.api_address` reaches the agent
//! record, scale reports are stored under `status/scale/` (only changes written, unreported
//! entries deleted, everything removed with the agent's records), and `ScaleService` serves
//! them with the placement.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use common::{poll, Etcd};
use meridian_control_plane::api::ScaleApi;
use meridian_control_plane::push::{self, AgentPush, PushConfig};
use meridian_control_plane::spec::FunctionSpec;
use meridian_control_plane::store::{Campaign, PlacementWrite, Record, RecordKey, Store};
use meridian_control_plane::table::Tables;
use meridian_proto::v1 as pb;
use meridian_proto::v1::agent_service_client::AgentServiceClient;
use meridian_proto::v1::agent_service_server::AgentServiceServer;
use meridian_proto::v1::scale_service_server::ScaleService;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

const LEASE_TTL: Duration = Duration::from_secs(1);

/// Scale entries stored, as (function name, region, agent id, desired).
async fn scale_entries(store: &Store) -> Result<Vec<(String, String, String, u32)>> {
    let snapshot = store.load(&store.keys().scales(None, None)).await?;
    Ok(snapshot
        .records
        .into_iter()
        .filter_map(|(key, record)| match (key, record) {
            (
                RecordKey::Scale {
                    function,
                    region,
                    agent_id,
                },
                Record::Scale(scale),
            ) => {
                assert_eq!((&scale.region, &scale.agent_id), (&region, &agent_id));
                Some((function.name, region, agent_id, scale.desired))
            }
            _ => None,
        })
        .collect())
}

fn report(entries: &[(&str, u32)]) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Scale(pb::ScaleReport {
            functions: entries
                .iter()
                .map(|(name, desired)| pb::FunctionScale {
                    namespace: "default".into(),
                    name: (*name).into(),
                    scale: Some(pb::RegionScale {
                        // Lies about who it is: the replica uses the session's identity.
                        region: "elsewhere".into(),
                        agent_id: "someone".into(),
                        desired: *desired,
                        reason: "stable: concurrency 35.2 / target 10".into(),
                        ..Default::default()
                    }),
                })
                .collect(),
        })),
    }
}

#[tokio::test]
async fn scale_reports_are_stored_served_and_removed_with_the_agent() -> Result<()> {
    let Some(etcd) = Etcd::start().await? else {
        return Ok(());
    };
    let store = etcd.store("/scale/").await?;

    // A process function, and a placement written by a leader.
    let spec = FunctionSpec::try_from(pb::FunctionSpec {
        name: "hello".into(),
        runtime: Some(pb::function_spec::Runtime::Process(pb::ProcessRuntime {
            command: "/bin/sample".into(),
            ..Default::default()
        })),
        ..Default::default()
    })
    .unwrap();
    store
        .put_function(&spec.key, &pb::FunctionSpec::from(&spec), None, false)
        .await?;
    let lease = store.grant_lease(30).await?;
    let Campaign::Elected { elected_version } = store.campaign("cp-t", lease).await? else {
        panic!("alone in the election");
    };
    store
        .write_placements(
            elected_version,
            &[PlacementWrite {
                function: spec.key.clone(),
                expected_version: 0,
                placement: Some(pb::FunctionPlacement {
                    namespace: "default".into(),
                    name: "hello".into(),
                    leader: "cp-t".into(),
                    ..Default::default()
                }),
            }],
        )
        .await?;

    // One replica's agent service, in process.
    let (_tables_tx, tables) = watch::channel(Arc::new(Tables::default()));
    let (lease_tx, lease_rx) = watch::channel(None);
    tokio::spawn(push::run_replica_lease(store.clone(), LEASE_TTL, lease_tx));
    let (status_tx, status_rx) = mpsc::channel(1024);
    tokio::spawn(push::run_status_writer(
        store.clone(),
        status_rx,
        Duration::from_millis(20),
    ));
    let (_shutdown_tx, shutdown) = watch::channel(false);
    let mut replica_lease = lease_rx.clone();
    replica_lease.wait_for(Option::is_some).await?;
    let service = AgentPush::new(
        store.clone(),
        tables,
        PushConfig {
            replica_id: "cp-t".into(),
            lease_ttl: LEASE_TTL,
            ..PushConfig::default()
        },
        status_tx,
        lease_rx,
        shutdown,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(service))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
        .connect()
        .await?;
    let (messages, outbound) = mpsc::channel(8);
    messages
        .send(pb::AgentMessage {
            kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
                agent_id: "us-east-1".into(),
                region: "us-east".into(),
                api_address: "127.0.1.1:7100".into(),
                ..Default::default()
            })),
        })
        .await?;
    let _inbound = AgentServiceClient::new(channel)
        .connect(ReceiverStream::new(outbound))
        .await?;

    // The agent record carries the API address.
    let agent = poll(Duration::from_secs(5), "the agent record", || async {
        let snapshot = store.load(&store.keys().agents()).await.ok()?;
        snapshot.records.into_iter().find_map(|(_, r)| match r {
            Record::Agent(agent) => Some(agent),
            _ => None,
        })
    })
    .await?;
    assert_eq!(agent.api_address, "127.0.1.1:7100");

    // A report of two functions: both stored, under the session's region and agent id.
    messages.send(report(&[("hello", 2), ("other", 1)])).await?;
    let entries = poll(Duration::from_secs(5), "two scale entries", || async {
        scale_entries(&store).await.ok().filter(|e| e.len() == 2)
    })
    .await?;
    assert_eq!(
        entries,
        vec![
            ("hello".into(), "us-east".into(), "us-east-1".into(), 2),
            ("other".into(), "us-east".into(), "us-east-1".into(), 1),
        ]
    );

    // The next report no longer has "other": its entry goes; "hello" changes.
    messages.send(report(&[("hello", 3)])).await?;
    poll(
        Duration::from_secs(5),
        "the unreported entry deleted",
        || async {
            scale_entries(&store)
                .await
                .ok()
                .filter(|e| e.len() == 1 && e[0].3 == 3)
        },
    )
    .await?;

    // ScaleService: the function with its placement and the agent's report.
    let api = ScaleApi::new(store.clone());
    let listed = api
        .list_instances(tonic::Request::new(pb::ListInstancesRequest {
            name: "hello".into(),
            ..Default::default()
        }))
        .await?
        .into_inner();
    assert_eq!(listed.functions.len(), 1);
    let hello = &listed.functions[0];
    assert_eq!(
        hello.placement.as_ref().map(|p| p.leader.as_str()),
        Some("cp-t")
    );
    assert_eq!(hello.regions.len(), 1);
    assert_eq!(hello.regions[0].desired, 3);
    assert_eq!(hello.regions[0].region, "us-east");
    assert_eq!(
        hello.regions[0].reason,
        "stable: concurrency 35.2 / target 10"
    );
    let missing = api
        .list_instances(tonic::Request::new(pb::ListInstancesRequest {
            name: "nope".into(),
            ..Default::default()
        }))
        .await
        .expect_err("no such function");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let leader = api
        .get_leader(tonic::Request::new(pb::GetLeaderRequest {}))
        .await?
        .into_inner();
    assert_eq!(leader.leader, "cp-t");
    assert_eq!(leader.elected_version, elected_version);

    // The agent goes away: one lease TTL later its scale entries go with its records.
    drop(messages);
    poll(
        Duration::from_secs(5),
        "the agent's records removed",
        || async {
            let scales = scale_entries(&store).await.ok()?;
            let agents = store.load(&store.keys().agents()).await.ok()?;
            (scales.is_empty() && agents.records.is_empty()).then_some(())
        },
    )
    .await?;
    Ok(())
}
