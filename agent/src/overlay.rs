//! The table the agent serves its sidecars: the accepted table with the local tier of every
//! `process` function filled from the runtime's live instances (all states, so sidecars stop
//! sending to a DRAINING one), its expected cold start, its failed starts in a row and whether
//! it waits out a restart backoff (so that sidecars do not hold requests for a crash loop), and a
//! `local_generation` that grows with every change of what is served.

use std::collections::HashSet;
use std::sync::Arc;

use meridian_proto::v1::{local_workload, Endpoint, FunctionRoute, RoutingTable, Tier, TierOrder};
use tokio::sync::watch;

use crate::load::LoadBook;
use crate::local_api::CurrentTable;
use crate::runtime::{FunctionKey, FunctionRuntime, InstanceState, Snapshot};

/// Whether `route` runs as local processes (its local tier comes from the runtime).
pub fn is_process(route: &FunctionRoute) -> bool {
    matches!(
        route.workload.as_ref().and_then(|w| w.kind.as_ref()),
        Some(local_workload::Kind::Process(_))
    )
}

/// The endpoints of `function`'s live instances in `zone`, sorted by id.
pub fn instance_endpoints(function: &FunctionRuntime, zone: &str) -> Vec<Endpoint> {
    let mut endpoints: Vec<Endpoint> = function
        .instances
        .iter()
        .map(|instance| Endpoint {
            address: instance.address.to_string(),
            id: instance.id.clone(),
            state: instance.state.to_proto() as i32,
            zone: zone.to_owned(),
        })
        .collect();
    endpoints.sort_by(|a, b| a.id.cmp(&b.id));
    endpoints
}

/// `accepted` with the runtime's instances in the local tier of each process route. The local
/// tier (the one marked `local`) is inserted first when the control plane sent none. The
/// `local_generation` is left as `accepted` has it; [`Overlay`] sets it.
pub fn overlay(accepted: &RoutingTable, snapshot: &Snapshot, zone: &str) -> RoutingTable {
    let mut table = accepted.clone();
    let empty = FunctionRuntime::default();
    for route in table.functions.iter_mut().filter(|r| is_process(r)) {
        let key = FunctionKey::new(route.namespace.clone(), route.name.clone());
        let function = snapshot.functions.get(&key).unwrap_or(&empty);
        let endpoints = instance_endpoints(function, zone);
        let ready = function.ready();
        route.cold_start_ms = function.cold_start_ms();
        let crash = snapshot.crashes.get(&key).copied().unwrap_or_default();
        route.local_failed_starts = crash.failed_starts;
        route.local_restart_backoff = crash.restart_backoff;
        let local = match route.tiers.iter().position(|t| t.local) {
            Some(index) => &mut route.tiers[index],
            None => {
                route.tiers.insert(
                    0,
                    Tier {
                        region: accepted.region.clone(),
                        local: true,
                        endpoints: Vec::new(),
                        order: TierOrder::Local as i32,
                        ready_instances: 0,
                    },
                );
                &mut route.tiers[0]
            }
        };
        local.endpoints = endpoints;
        local.ready_instances = ready;
    }
    table
}

/// Ids of the instances `table` serves as READY in local tiers of process routes.
pub fn ready_instance_ids(table: &RoutingTable) -> HashSet<String> {
    let ready = InstanceState::Ready.to_proto() as i32;
    table
        .functions
        .iter()
        .filter(|route| is_process(route))
        .flat_map(|route| route.tiers.iter().filter(|t| t.local))
        .flat_map(|tier| tier.endpoints.iter())
        .filter(|endpoint| endpoint.state == ready)
        .map(|endpoint| endpoint.id.clone())
        .collect()
}

/// Every instance id the runtime has, in any state.
fn live_instance_ids(snapshot: &Snapshot) -> HashSet<String> {
    snapshot
        .functions
        .values()
        .flat_map(|f| f.instances.iter().map(|i| i.id.clone()))
        .collect()
}

/// The served table and its generation.
#[derive(Debug)]
pub struct Overlay {
    zone: String,
    /// Generation of the table served now; the next change gets one more.
    generation: u64,
    served: CurrentTable,
}

impl Overlay {
    /// `first_generation` is the generation of the first table served. Starting above what an
    /// earlier run of the agent reached (the caller uses the start time) keeps a sidecar that
    /// outlived the agent from mistaking a new table for the one it holds.
    pub fn new(zone: impl Into<String>, first_generation: u64) -> Self {
        Self {
            zone: zone.into(),
            generation: first_generation.saturating_sub(1),
            served: None,
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn served(&self) -> &CurrentTable {
        &self.served
    }

    /// Recomputes the served table; returns it when it changed (with the next generation).
    pub fn update(&mut self, accepted: &CurrentTable, snapshot: &Snapshot) -> Option<CurrentTable> {
        let next = accepted
            .as_deref()
            .map(|table| overlay(table, snapshot, &self.zone));
        let same = match (&next, &self.served) {
            (None, None) => true,
            (Some(next), Some(served)) => {
                next.version == served.version
                    && next.region == served.region
                    && next.functions == served.functions
            }
            _ => false,
        };
        if same {
            return None;
        }
        let next = next.map(|mut table| {
            self.generation += 1;
            table.local_generation = self.generation;
            Arc::new(table)
        });
        self.served = next.clone();
        Some(next)
    }
}

/// Serves the overlay of the latest accepted table and runtime snapshot on `publisher` until
/// the accepted-table channel closes (agent shutdown), telling `book` what each generation
/// serves. Dropping `publisher` at the end ends the sidecars' Watch streams.
pub async fn run(
    mut overlay: Overlay,
    mut accepted: watch::Receiver<CurrentTable>,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    publisher: watch::Sender<CurrentTable>,
    book: Arc<LoadBook>,
) {
    let mut runtime_open = true;
    loop {
        {
            // The book stays locked from reading the snapshot to recording what was served:
            // see `LoadBook::begin_serving`.
            let guard = book.begin_serving();
            let table = accepted.borrow_and_update().clone();
            let snapshot = Arc::clone(&snapshots.borrow_and_update());
            if let Some(next) = overlay.update(&table, &snapshot) {
                publisher.send_replace(next);
            }
            let ready = overlay
                .served()
                .as_deref()
                .map(ready_instance_ids)
                .unwrap_or_default();
            guard.served(overlay.generation(), ready, &live_instance_ids(&snapshot));
        }
        tokio::select! {
            changed = accepted.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            changed = snapshots.changed(), if runtime_open => {
                // A runtime that stopped publishing leaves its last snapshot in place.
                runtime_open = changed.is_ok();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use meridian_proto::v1::{EndpointState, LocalWorkload, ProcessRuntime, ScaleBounds};

    use crate::fixtures::{endpoint_summary, instance};
    use crate::runtime::{CrashState, InstanceInfo};

    fn process_route(name: &str, tiers: Vec<Tier>) -> FunctionRoute {
        FunctionRoute {
            namespace: "default".into(),
            name: name.into(),
            function_version: 3,
            tiers,
            workload: Some(LocalWorkload {
                kind: Some(local_workload::Kind::Process(ProcessRuntime {
                    command: "fn".into(),
                    ..Default::default()
                })),
                scale: Some(ScaleBounds {
                    min_instances: 0,
                    max_instances: 5,
                    target_concurrency: 10,
                    idle_seconds: 30,
                }),
            }),
            ..Default::default()
        }
    }

    fn remote_tier(region: &str) -> Tier {
        Tier {
            region: region.into(),
            local: false,
            endpoints: vec![Endpoint {
                address: "127.0.2.1:15002".into(),
                id: format!("{region}-1"),
                state: EndpointState::Ready as i32,
                zone: format!("{region}-a"),
            }],
            order: TierOrder::Measured as i32,
            ready_instances: 2,
        }
    }

    fn table(functions: Vec<FunctionRoute>) -> RoutingTable {
        RoutingTable {
            version: 9,
            region: "us-east".into(),
            functions,
            local_generation: 0,
        }
    }

    fn snapshot(name: &str, instances: Vec<InstanceInfo>, cold: Option<u64>) -> Snapshot {
        let mut snapshot = Snapshot::default();
        snapshot.functions.insert(
            FunctionKey::new("default", name),
            FunctionRuntime {
                instances,
                cold_start: cold.map(Duration::from_millis),
                ..Default::default()
            },
        );
        snapshot
    }

    #[test]
    fn local_tier_is_inserted_first_with_every_instance_state() {
        let accepted = table(vec![process_route("f", vec![remote_tier("eu-west")])]);
        let snap = snapshot(
            "f",
            vec![
                instance("f-bbbbbb", 9002, InstanceState::Starting),
                instance("f-aaaaaa", 9001, InstanceState::Ready),
                instance("f-cccccc", 9003, InstanceState::Draining),
            ],
            Some(42),
        );
        let served = overlay(&accepted, &snap, "us-east-a");
        let route = &served.functions[0];
        assert_eq!(route.cold_start_ms, 42);
        assert_eq!(route.tiers.len(), 2);
        let local = &route.tiers[0];
        assert!(local.local);
        assert_eq!(local.region, "us-east");
        assert_eq!(local.order, TierOrder::Local as i32);
        assert_eq!(local.ready_instances, 1);
        assert_eq!(
            endpoint_summary(&local.endpoints),
            [
                (
                    "f-aaaaaa",
                    "127.0.1.1:9001",
                    EndpointState::Ready as i32,
                    "us-east-a"
                ),
                (
                    "f-bbbbbb",
                    "127.0.1.1:9002",
                    EndpointState::Starting as i32,
                    "us-east-a"
                ),
                (
                    "f-cccccc",
                    "127.0.1.1:9003",
                    EndpointState::Draining as i32,
                    "us-east-a"
                ),
            ]
        );
        assert_eq!(route.tiers[1], remote_tier("eu-west"));
        assert_eq!(
            ready_instance_ids(&served),
            HashSet::from(["f-aaaaaa".to_owned()])
        );
    }

    #[test]
    fn an_existing_local_tier_is_replaced_in_place() {
        let mut stale_local = remote_tier("us-east");
        stale_local.local = true;
        stale_local.order = TierOrder::Local as i32;
        let accepted = table(vec![process_route(
            "f",
            vec![remote_tier("eu-west"), stale_local],
        )]);
        let served = overlay(&accepted, &Snapshot::default(), "us-east-a");
        let tiers = &served.functions[0].tiers;
        assert_eq!(tiers.len(), 2);
        assert_eq!(tiers[0], remote_tier("eu-west"));
        assert!(tiers[1].local);
        assert!(tiers[1].endpoints.is_empty());
        assert_eq!(tiers[1].ready_instances, 0);
        assert_eq!(served.functions[0].cold_start_ms, 0);
    }

    #[test]
    fn failed_starts_and_restart_backoff_come_from_the_runtime() {
        let accepted = table(vec![process_route("f", vec![remote_tier("eu-west")])]);
        let mut snap = snapshot("f", Vec::new(), Some(12));
        snap.crashes.insert(
            FunctionKey::new("default", "f"),
            CrashState {
                failed_starts: 3,
                restart_backoff: true,
            },
        );
        let route = &overlay(&accepted, &snap, "us-east-a").functions[0];
        assert_eq!(
            (route.local_failed_starts, route.local_restart_backoff),
            (3, true)
        );
        // A function the runtime does not know (yet): nothing failed, no backoff.
        let route = &overlay(&accepted, &Snapshot::default(), "us-east-a").functions[0];
        assert_eq!(
            (route.local_failed_starts, route.local_restart_backoff),
            (0, false)
        );
    }

    #[test]
    fn other_routes_are_left_alone() {
        let plain = FunctionRoute {
            namespace: "default".into(),
            name: "f".into(),
            tiers: vec![remote_tier("eu-west")],
            ..Default::default()
        };
        let accepted = table(vec![plain]);
        // Even with instances of a function of that name (left over from a process workload).
        let snap = snapshot(
            "f",
            vec![instance("f-aaaaaa", 1, InstanceState::Ready)],
            None,
        );
        assert_eq!(overlay(&accepted, &snap, "z"), accepted);
        assert!(ready_instance_ids(&accepted).is_empty());
    }

    #[test]
    fn generation_grows_with_every_change_only() {
        let mut o = Overlay::new("us-east-a", 100);
        assert_eq!(o.update(&None, &Snapshot::default()), None);
        let accepted = Some(Arc::new(table(vec![process_route("f", vec![])])));
        let first = o.update(&accepted, &Snapshot::default()).unwrap().unwrap();
        assert_eq!(first.local_generation, 100);
        assert_eq!(first.version, 9);
        // Same inputs: nothing new.
        assert_eq!(o.update(&accepted, &Snapshot::default()), None);
        // An instance starts, then is ready: two new generations at the same version.
        let starting = snapshot("f", vec![instance("f-a", 1, InstanceState::Starting)], None);
        let served = o.update(&accepted, &starting).unwrap().unwrap();
        assert_eq!((served.version, served.local_generation), (9, 101));
        let ready = snapshot("f", vec![instance("f-a", 1, InstanceState::Ready)], Some(7));
        let served = o.update(&accepted, &ready).unwrap().unwrap();
        assert_eq!((served.version, served.local_generation), (9, 102));
        assert_eq!(o.update(&accepted, &ready), None);
        // A new accepted table.
        let mut newer = table(vec![process_route("f", vec![])]);
        newer.version = 10;
        let served = o.update(&Some(Arc::new(newer)), &ready).unwrap().unwrap();
        assert_eq!((served.version, served.local_generation), (10, 103));
        assert_eq!(o.generation(), 103);
    }

    /// Waits for `run` to publish its next table; returns that table's local generation.
    async fn next_generation(served: &mut watch::Receiver<CurrentTable>) -> u64 {
        served.changed().await.unwrap();
        served
            .borrow_and_update()
            .as_ref()
            .unwrap()
            .local_generation
    }

    #[tokio::test]
    async fn run_publishes_changes_and_records_what_it_served() {
        let (accepted_tx, accepted_rx) = watch::channel(None);
        let (snap_tx, snap_rx) = watch::channel(Arc::new(Snapshot::default()));
        let (publisher, mut served) = watch::channel(None);
        let book = Arc::new(LoadBook::new());
        let task = tokio::spawn(run(
            Overlay::new("us-east-a", 1),
            accepted_rx,
            snap_rx,
            publisher,
            Arc::clone(&book),
        ));
        accepted_tx.send_replace(Some(Arc::new(table(vec![process_route("f", vec![])]))));
        assert_eq!(next_generation(&mut served).await, 1);

        let ready = snapshot("f", vec![instance("f-a", 1, InstanceState::Ready)], None);
        snap_tx.send_replace(Arc::new(ready));
        assert_eq!(next_generation(&mut served).await, 2);
        assert!(!book.is_drained("f-a", tokio::time::Instant::now()));

        let draining = snapshot("f", vec![instance("f-a", 1, InstanceState::Draining)], None);
        snap_tx.send_replace(Arc::new(draining));
        assert_eq!(next_generation(&mut served).await, 3);
        assert!(book.is_drained("f-a", tokio::time::Instant::now()));

        // The runtime going away is not the end; the accepted table's channel closing is.
        drop(snap_tx);
        drop(accepted_tx);
        task.await.unwrap();
        assert!(served.changed().await.is_err(), "publisher dropped");
    }
}
