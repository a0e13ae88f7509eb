//! Real-etcd tests of the scheduler election: a deposed leader's fenced writes never land, a
//! fenced scheduler steps down, a clean shutdown hands leadership over at once, and a dead
//! leader's key expires with its lease.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use common::{poll, Etcd};
use meridian_control_plane::cache::{self, CacheConfig, Outputs};
use meridian_control_plane::election::{self, ElectionConfig, ElectionState};
use meridian_control_plane::scheduler::{self, SchedulerConfig, SchedulerCounters, SchedulerView};
use meridian_control_plane::spec::{FunctionKey, FunctionSpec};
use meridian_control_plane::store::{
    Campaign, FencedWrite, PlacementWrite, Record, RecordKey, Store,
};
use meridian_control_plane::table::{CachedFunction, Tables};
use meridian_proto::v1 as pb;
use prost::Message;
use tokio::sync::watch;

fn key(name: &str) -> FunctionKey {
    FunctionKey {
        namespace: "default".into(),
        name: name.into(),
    }
}

fn process_spec(name: &str, max_instances: u32) -> FunctionSpec {
    FunctionSpec::try_from(pb::FunctionSpec {
        name: name.into(),
        runtime: Some(pb::function_spec::Runtime::Process(pb::ProcessRuntime {
            command: "/bin/sample".into(),
            ..Default::default()
        })),
        scaling: Some(pb::Scaling {
            max_instances: Some(max_instances),
            ..Default::default()
        }),
        ..Default::default()
    })
    .unwrap()
}

async fn put_function(store: &Store, spec: &FunctionSpec) -> Result<i64> {
    let (stored, _) = store
        .put_function(&spec.key, &pb::FunctionSpec::from(spec), None, false)
        .await?;
    Ok(stored.version)
}

/// Registers an agent record the way a replica does (under a lease).
async fn register_agent(store: &Store, region: &str, agent_id: &str) -> Result<()> {
    let lease = store.grant_lease(30).await?;
    let record = pb::AgentStatus {
        agent_id: agent_id.into(),
        region: region.into(),
        ..Default::default()
    };
    store
        .write_leased(
            lease,
            vec![(store.keys().agent(region, agent_id), record.encode_to_vec())],
            Vec::new(),
        )
        .await?;
    Ok(())
}

async fn placement(store: &Store, name: &str) -> Result<Option<(pb::FunctionPlacement, i64)>> {
    let snapshot = store.load(&store.keys().placements(None)).await?;
    Ok(snapshot
        .records
        .into_iter()
        .find_map(|(k, record)| match (k, record) {
            (RecordKey::Placement(k), Record::Placement(p)) if k.name == name => {
                Some((p.placement, p.version))
            }
            _ => None,
        }))
}

fn placement_of(name: &str, leader: &str, regions: &[&str]) -> pb::FunctionPlacement {
    pb::FunctionPlacement {
        namespace: "default".into(),
        name: name.into(),
        leader: leader.into(),
        regions: regions
            .iter()
            .map(|r| pb::RegionBounds {
                region: (*r).into(),
                min_instances: 0,
                max_instances: 10,
            })
            .collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_deposed_leaders_write_does_not_land() -> Result<()> {
    let Some(etcd) = Etcd::start().await? else {
        return Ok(());
    };
    let a = etcd.store("/fence/").await?;
    let b = etcd.store("/fence/").await?;

    let lease_a = a.grant_lease(5).await?;
    let Campaign::Elected {
        elected_version: elected_a,
    } = a.campaign("cp-a", lease_a).await?
    else {
        panic!("the first campaign must win");
    };
    let lease_b = b.grant_lease(5).await?;
    let Campaign::Taken { leader, observed } = b.campaign("cp-b", lease_b).await? else {
        panic!("the key is taken");
    };
    assert_eq!(leader.replica, "cp-a");
    assert_eq!(leader.elected_version, elected_a);

    // A leads: its write lands.
    let first = PlacementWrite {
        function: key("hello"),
        expected_version: 0,
        placement: Some(placement_of("hello", "cp-a", &["us-east"])),
    };
    let FencedWrite::Written { revision: written } =
        a.write_placements(elected_a, &[first]).await?
    else {
        panic!("the leader's write must land");
    };

    // A's lease expires (revoked here, as etcd would on expiry); B sees the key go and wins.
    a.revoke_lease(lease_a).await?;
    tokio::time::timeout(
        Duration::from_secs(5),
        b.wait_leader_gone(elected_a, observed + 1),
    )
    .await??;
    let Campaign::Elected {
        elected_version: elected_b,
    } = b.campaign("cp-b", lease_b).await?
    else {
        panic!("B must win once A's key is gone");
    };
    assert!(elected_b > elected_a);

    // A, not knowing it was deposed, writes with its old term: fenced, nothing lands.
    let stale = PlacementWrite {
        function: key("hello"),
        expected_version: written,
        placement: Some(placement_of("hello", "cp-a", &["us-east", "eu-west"])),
    };
    assert_eq!(
        a.write_placements(elected_a, std::slice::from_ref(&stale))
            .await?,
        FencedWrite::Fenced
    );
    let delete = PlacementWrite {
        placement: None,
        ..stale.clone()
    };
    assert_eq!(
        a.write_placements(elected_a, &[delete]).await?,
        FencedWrite::Fenced
    );
    let (stored, version) = placement(&a, "hello").await?.expect("still there");
    assert_eq!(version, written);
    assert_eq!(stored.leader, "cp-a");
    assert_eq!(stored.regions.len(), 1);

    // B leads; a write guarded by an outdated placement version conflicts, the right one lands.
    let from_b = |expected_version| PlacementWrite {
        function: key("hello"),
        expected_version,
        placement: Some(placement_of("hello", "cp-b", &["eu-west"])),
    };
    assert_eq!(
        b.write_placements(elected_b, &[from_b(0)]).await?,
        FencedWrite::Conflict
    );
    assert!(matches!(
        b.write_placements(elected_b, &[from_b(written)]).await?,
        FencedWrite::Written { .. }
    ));
    assert_eq!(placement(&b, "hello").await?.unwrap().0.leader, "cp-b");

    // A campaigns again and follows B.
    let lease_a = a.grant_lease(5).await?;
    match a.campaign("cp-a", lease_a).await? {
        Campaign::Taken { leader, .. } => assert_eq!(leader.replica, "cp-b"),
        other => panic!("A must follow, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_fenced_scheduler_steps_down_and_counts_it() -> Result<()> {
    let Some(etcd) = Etcd::start().await? else {
        return Ok(());
    };
    let store = etcd.store("/stepdown/").await?;
    let spec = process_spec("hello", 4);
    let version = put_function(&store, &spec).await?;
    let view = SchedulerView {
        loaded: true,
        revision: version,
        functions: [(
            spec.key.clone(),
            Arc::new(CachedFunction {
                spec: spec.clone(),
                version,
            }),
        )]
        .into(),
        agent_regions: ["us-east".to_string()].into(),
        placements: Default::default(),
        trace: None,
    };
    let (_views_tx, views) = watch::channel(Arc::new(view));

    // B holds the key; A believes it leads with a term that is not the key's.
    let lease_b = store.grant_lease(5).await?;
    let Campaign::Elected {
        elected_version: elected_b,
    } = store.campaign("cp-b", lease_b).await?
    else {
        panic!("B must win");
    };
    let counters = SchedulerCounters::default();
    let mut views_a = views.clone();
    let config_a = SchedulerConfig::new("cp-a");
    tokio::time::timeout(
        Duration::from_secs(5),
        scheduler::run(&store, &config_a, &mut views_a, elected_b - 1, &counters),
    )
    .await?;
    assert_eq!(
        counters
            .fenced_writes
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(placement(&store, "hello").await?, None);

    // The real leader's scheduler places the function.
    let store_b = store.clone();
    let mut views_b = views.clone();
    let scheduler_b = tokio::spawn(async move {
        let counters = SchedulerCounters::default();
        scheduler::run(
            &store_b,
            &SchedulerConfig::new("cp-b"),
            &mut views_b,
            elected_b,
            &counters,
        )
        .await
    });
    let placed = poll(Duration::from_secs(5), "B's placement", || async {
        placement(&store, "hello").await.ok().flatten()
    })
    .await?;
    scheduler_b.abort();
    assert_eq!(placed.0.leader, "cp-b");
    assert_eq!(placed.0.function_version, version);
    assert_eq!(placed.0.regions.len(), 1);
    assert_eq!(placed.0.regions[0].region, "us-east");
    assert_eq!(placed.0.regions[0].max_instances, 4);
    Ok(())
}

/// One replica's cache and election, as `main` wires them.
struct Replica {
    shutdown: watch::Sender<bool>,
    state: Arc<ElectionState>,
    election: tokio::task::JoinHandle<()>,
    cache: tokio::task::JoinHandle<()>,
}

impl Replica {
    async fn start(etcd: &Etcd, prefix: &str, id: &str, lease_ttl: Duration) -> Result<Replica> {
        let store = etcd.store(prefix).await?;
        let (tables, _) = watch::channel(Arc::new(Tables::default()));
        let (views, views_rx) = watch::channel(Arc::new(SchedulerView::default()));
        let (ready, _) = watch::channel(false);
        let cache = tokio::spawn(cache::run(
            store.clone(),
            CacheConfig {
                coalesce: Duration::from_millis(5),
                coalesce_max: Duration::from_millis(50),
            },
            Outputs {
                tables,
                views,
                ready,
                metrics: None,
                skipped: None,
            },
        ));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let state = ElectionState::new();
        let election = tokio::spawn(election::run(
            store,
            ElectionConfig {
                replica_id: id.into(),
                lease_ttl,
                scheduler: SchedulerConfig::new(id),
            },
            views_rx,
            shutdown_rx,
            state.clone(),
        ));
        Ok(Replica {
            shutdown,
            state,
            election,
            cache,
        })
    }

    async fn wait_leading(&self, within: Duration) -> Result<i64> {
        let mut leading = self.state.leading();
        poll(within, "leadership", || {
            let value = *leading.borrow_and_update();
            async move { value }
        })
        .await
    }

    /// Stops cleanly (resigning), as on SIGTERM.
    async fn stop(&mut self) -> Result<()> {
        self.shutdown.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), &mut self.election).await??;
        Ok(())
    }

    fn is_leading(&self) -> bool {
        self.state.leading().borrow().is_some()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        // Like a SIGKILL: no resignation, the lease expires by itself.
        self.election.abort();
        self.cache.abort();
    }
}

#[tokio::test]
async fn leadership_moves_on_shutdown_and_on_lease_expiry() -> Result<()> {
    let Some(etcd) = Etcd::start().await? else {
        return Ok(());
    };
    let prefix = "/failover/";
    let store = etcd.store(prefix).await?;
    register_agent(&store, "us-east", "us-east-1").await?;
    put_function(&store, &process_spec("hello", 4)).await?;

    let a = Replica::start(&etcd, prefix, "cp-a", Duration::from_secs(5)).await?;
    a.wait_leading(Duration::from_secs(5)).await?;
    let placed = poll(Duration::from_secs(5), "A's placement", || async {
        placement(&store, "hello").await.ok().flatten()
    })
    .await?;
    assert_eq!(placed.0.leader, "cp-a");
    assert_eq!(
        store.leader().await?.map(|l| l.replica).as_deref(),
        Some("cp-a")
    );

    let b = Replica::start(&etcd, prefix, "cp-b", Duration::from_secs(2)).await?;
    // B follows while A leads.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!b.is_leading());

    // A stops cleanly: it resigns, and B leads long before A's 5 s lease could have expired.
    let stopped_at = tokio::time::Instant::now();
    let mut a = a;
    a.stop().await?;
    b.wait_leading(Duration::from_secs(2)).await?;
    assert!(
        stopped_at.elapsed() < Duration::from_secs(2),
        "took {:?}",
        stopped_at.elapsed()
    );
    assert_eq!(
        store.leader().await?.map(|l| l.replica).as_deref(),
        Some("cp-b")
    );

    // The new leader schedules: a changed function gets a new placement written by B.
    let version = put_function(&store, &process_spec("hello", 6)).await?;
    let placed = poll(Duration::from_secs(5), "B's placement", || async {
        placement(&store, "hello")
            .await
            .ok()
            .flatten()
            .filter(|(p, _)| p.function_version == version)
    })
    .await?;
    assert_eq!(placed.0.leader, "cp-b");
    assert_eq!(placed.0.regions[0].max_instances, 6);

    // B dies without resigning: C, following, takes over once B's 2 s lease expires.
    let c = Replica::start(&etcd, prefix, "cp-c", Duration::from_secs(2)).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!c.is_leading());
    drop(b);
    c.wait_leading(Duration::from_secs(8)).await?;
    assert_eq!(
        store.leader().await?.map(|l| l.replica).as_deref(),
        Some("cp-c")
    );
    assert_eq!(c.state.fenced_writes(), 0);
    Ok(())
}
