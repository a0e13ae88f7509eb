//! The watch → cache → publish loop: mirrors functions, agents, endpoints and placements from
//! etcd, and publishes freshly compiled routing tables after each coalesced batch of changes,
//! plus the scheduler's view (functions, regions with agents, placements) when that changed.
//! The election key sorts inside the watched range and is ignored.
//!
//! It loads a snapshot, then watches from the revision after it. A broken watch resumes from
//! the revision after the last change it applied, so no change is missed or applied twice; a
//! watch that fell behind compaction reloads the snapshot. Publishing is idempotent: routes that
//! come out equal keep their old allocation, and nothing is published when no table changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use meridian_common::backoff::Backoff;
use meridian_proto::v1 as pb;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::scheduler::SchedulerView;
use crate::spec::{FunctionKey, FunctionSpec};
use crate::store::{Change, Record, RecordKey, Store, StoreError, StoredPlacement};
use crate::table::{
    build_route, regions_of_interest, CachedFunction, FunctionEndpoints, RegionTable, Tables,
    Topology,
};

/// What a batch of changes touched.
#[derive(Debug, Default)]
struct Dirty {
    functions: BTreeSet<FunctionKey>,
    agents: bool,
    /// A function or placement changed: the scheduler's view must be published again.
    scheduler: bool,
}

impl Dirty {
    fn is_empty(&self) -> bool {
        self.functions.is_empty() && !self.agents
    }
}

/// The mirror of etcd's routing-relevant keys.
#[derive(Debug, Default)]
pub struct MeshState {
    revision: i64,
    /// `Arc`s so that the scheduler's view is a cheap copy.
    functions: BTreeMap<FunctionKey, Arc<CachedFunction>>,
    agents: BTreeMap<(String, String), pb::AgentStatus>,
    endpoints: HashMap<FunctionKey, FunctionEndpoints>,
    placements: BTreeMap<FunctionKey, Arc<StoredPlacement>>,
    /// Records left out because they cannot be read (undecodable, or a stored function that no
    /// longer validates): what `meridianctl status` and the `meridian_etcd_skipped_records`
    /// gauge report. Any later change of the key clears it.
    skipped: BTreeMap<RecordKey, pb::SkippedRecord>,
    /// The store's key prefix, to name skipped functions by their etcd key.
    prefix: String,
}

impl MeshState {
    /// Applies a change as the watch (or a load) saw it: an undecodable put is recorded as
    /// skipped and applied as a delete, so every replica serves the same state.
    fn apply_change(&mut self, change: Change, dirty: &mut Dirty) {
        if let Some(skipped) = change.undecodable {
            self.apply(change.key.clone(), None, dirty);
            self.skipped.insert(change.key, skipped);
            return;
        }
        self.apply(change.key, change.record, dirty);
    }

    /// The records skipped now, sorted by key.
    pub fn skipped(&self) -> Vec<pb::SkippedRecord> {
        self.skipped.values().cloned().collect()
    }

    fn apply(&mut self, key: RecordKey, record: Option<Record>, dirty: &mut Dirty) {
        // Whatever was skipped under this key is superseded by this change (an invalid
        // function below records itself again).
        if !self.skipped.is_empty() {
            self.skipped.remove(&key);
        }
        match (key, record) {
            (RecordKey::Function(key), Some(Record::Function(stored))) => {
                let version = stored.version;
                match FunctionSpec::try_from(stored.spec) {
                    Ok(spec) => {
                        self.functions
                            .insert(key.clone(), Arc::new(CachedFunction { spec, version }));
                    }
                    Err(error) => {
                        tracing::error!(function = %key, %error, "ignoring invalid stored function");
                        self.functions.remove(&key);
                        let record = pb::SkippedRecord {
                            key: format!("{}functions/{}/{}", self.prefix, key.namespace, key.name),
                            error: format!("stored function is not valid: {error}"),
                            revision: version,
                        };
                        self.skipped
                            .insert(RecordKey::Function(key.clone()), record);
                    }
                }
                dirty.functions.insert(key);
                dirty.scheduler = true;
            }
            (RecordKey::Function(key), None) => {
                self.functions.remove(&key);
                dirty.functions.insert(key);
                dirty.scheduler = true;
            }
            (RecordKey::Placement(key), Some(Record::Placement(placement))) => {
                self.placements.insert(key.clone(), Arc::new(placement));
                dirty.functions.insert(key);
                dirty.scheduler = true;
            }
            (RecordKey::Placement(key), None) => {
                self.placements.remove(&key);
                dirty.functions.insert(key);
                dirty.scheduler = true;
            }
            (RecordKey::Agent { region, agent_id }, Some(Record::Agent(agent))) => {
                self.agents.insert((region, agent_id), agent);
                dirty.agents = true;
            }
            (RecordKey::Agent { region, agent_id }, None) => {
                self.agents.remove(&(region, agent_id));
                dirty.agents = true;
            }
            (
                RecordKey::Endpoint {
                    function,
                    region,
                    id,
                },
                record,
            ) => {
                let endpoints = self.endpoints.entry(function.clone()).or_default();
                match record {
                    Some(Record::Endpoint(endpoint)) => {
                        endpoints.insert((region, id), endpoint);
                    }
                    _ => {
                        endpoints.remove(&(region, id));
                    }
                }
                if endpoints.is_empty() {
                    self.endpoints.remove(&function);
                }
                dirty.functions.insert(function);
            }
            // Acknowledgements, scale reports, the election and replica registrations never
            // change a routing table; a change trace is read by `follow` for the tables of its
            // batch.
            (
                RecordKey::AgentStatus { .. }
                | RecordKey::Scale { .. }
                | RecordKey::Leader
                | RecordKey::ChangeTrace
                | RecordKey::Replica { .. },
                _,
            ) => {}
            (key, record) => {
                tracing::warn!(?key, ?record, "record does not match its key; ignored");
            }
        }
    }

    /// What the scheduler reads, at this state's revision; `trace` is the traced change of the
    /// batch that brought the state there, if any.
    fn scheduler_view(&self, trace: Option<Arc<pb::ChangeTrace>>) -> SchedulerView {
        SchedulerView {
            trace,
            loaded: true,
            revision: self.revision,
            functions: self.functions.clone(),
            agent_regions: self
                .agents
                .keys()
                .map(|(region, _)| region.clone())
                .collect(),
            placements: self.placements.clone(),
        }
    }

    fn topology(&self) -> Topology {
        let mut topology = Topology::default();
        for ((region, agent_id), agent) in &self.agents {
            topology.agent_regions.insert(region.clone());
            if agent.gateway.is_empty() {
                continue;
            }
            let gateways = topology.gateways.entry(region.clone()).or_default();
            if gateways.iter().all(|g| g.address != agent.gateway) {
                gateways.push(pb::Endpoint {
                    address: agent.gateway.clone(),
                    id: agent_id.clone(),
                    state: pb::EndpointState::Ready as i32,
                    zone: agent.zone.clone(),
                });
            }
        }
        for gateways in topology.gateways.values_mut() {
            gateways.sort_by(|a, b| a.address.cmp(&b.address));
        }
        topology
    }
}

/// Builds the next [`Tables`] from the state, reusing every route of `previous` that did not
/// change. Returns `None` when no table changed. Tables that changed carry `trace`, the traced
/// change of this batch, if any.
fn compile(
    state: &MeshState,
    previous: &Tables,
    previous_topology: &Topology,
    dirty: &Dirty,
    force_all: bool,
    trace: Option<&Arc<pb::ChangeTrace>>,
) -> (Option<Tables>, Topology) {
    let topology = state.topology();
    let rebuild_all = force_all || topology != *previous_topology;
    let regions = regions_of_interest(state.functions.values().map(|f| &**f), &topology);
    let mut changed = rebuild_all && regions.len() != previous.regions.len();
    let mut tables = BTreeMap::new();
    for region in &regions {
        let old = previous.regions.get(region);
        let mut routes = match (old, rebuild_all) {
            (Some(old), false) => old.routes.clone(),
            _ => BTreeMap::new(),
        };
        let keys: Box<dyn Iterator<Item = &FunctionKey>> = if rebuild_all || old.is_none() {
            Box::new(state.functions.keys())
        } else {
            Box::new(dirty.functions.iter())
        };
        let mut region_changed = old.is_none();
        for key in keys {
            let Some(function) = state.functions.get(key) else {
                region_changed |= routes.remove(key).is_some();
                continue;
            };
            let placement = state.placements.get(key).map(|p| &p.placement);
            let route = build_route(
                function,
                placement,
                state.endpoints.get(key),
                region,
                &topology,
            );
            let previous_route = old.and_then(|t| t.routes.get(key));
            match previous_route {
                Some(prev) if **prev == route => {
                    routes.insert(key.clone(), prev.clone());
                }
                _ => {
                    routes.insert(key.clone(), Arc::new(route));
                    region_changed = true;
                }
            }
        }
        if let Some(old) = old {
            region_changed |= old.routes.len() != routes.len();
            if !region_changed {
                tables.insert(region.clone(), old.clone());
                continue;
            }
        }
        changed = true;
        tables.insert(
            region.clone(),
            Arc::new(
                RegionTable::new(state.revision, region.clone(), routes).with_trace(trace.cloned()),
            ),
        );
    }
    changed |= previous.regions.keys().any(|r| !regions.contains(r));
    if !changed {
        return (None, topology);
    }
    (
        Some(Tables {
            version: state.revision,
            regions: tables,
            seen_at: None,
        }),
        topology,
    )
}

/// Settings of the cache loop.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// After the first change of a burst, wait this long for more before publishing.
    pub coalesce: Duration,
    /// Never hold a burst longer than this.
    pub coalesce_max: Duration,
}

/// Publishes the scheduler's view if it differs from the last one in what the scheduler reads.
/// Agents re-registering (a record rewrite) change nothing it reads.
fn publish_view(
    state: &MeshState,
    views: &watch::Sender<Arc<SchedulerView>>,
    dirty: &Dirty,
    trace: Option<Arc<pb::ChangeTrace>>,
) {
    let view = state.scheduler_view(trace);
    let previous = views.borrow().clone();
    let changed =
        dirty.scheduler || !previous.loaded || previous.agent_regions != view.agent_regions;
    if changed {
        views.send_replace(Arc::new(view));
    }
}

/// Where the cache loop publishes.
#[derive(Debug)]
pub struct Outputs {
    /// The newest routing tables.
    pub tables: watch::Sender<Arc<Tables>>,
    /// The scheduler's view; `loaded` once the first snapshot is in.
    pub views: watch::Sender<Arc<SchedulerView>>,
    /// Set once the first snapshot is published.
    pub ready: watch::Sender<bool>,
    /// Told when each routing change was seen, for the propagation-latency histogram.
    pub metrics: Option<Arc<Metrics>>,
    /// The records skipped now (see [`MeshState::skipped`]), republished when they change.
    pub skipped: Option<watch::Sender<Arc<Vec<pb::SkippedRecord>>>>,
}

/// Publishes the skipped records if they changed.
fn publish_skipped(
    state: &MeshState,
    skipped: Option<&watch::Sender<Arc<Vec<pb::SkippedRecord>>>>,
) {
    let Some(skipped) = skipped else { return };
    let now = state.skipped();
    if **skipped.borrow() != now {
        skipped.send_replace(Arc::new(now));
    }
}

/// Runs forever: keeps `outputs` holding the newest tables and scheduler view.
pub async fn run(store: Store, config: CacheConfig, outputs: Outputs) {
    let Outputs {
        tables: publish,
        views,
        ready,
        metrics,
        skipped,
    } = outputs;
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    let mut topology = Topology::default();
    loop {
        // (Re)load everything. After a compaction we cannot know what we missed.
        let snapshot = match store.load_range(store.keys().routing_range()).await {
            Ok(snapshot) => snapshot,
            Err(error) => {
                tracing::warn!(%error, "cannot load state from etcd; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        let mut state = MeshState {
            revision: snapshot.revision,
            prefix: store.keys().prefix().to_owned(),
            ..Default::default()
        };
        let mut dirty = Dirty::default();
        for (key, record) in snapshot.records {
            state.apply(key, Some(record), &mut dirty);
        }
        for record in snapshot.skipped {
            if let Some(key) = store.keys().parse(record.key.as_bytes()) {
                state.skipped.insert(key, record);
            }
        }
        publish_skipped(&state, skipped.as_ref());
        // A reload replaces the view whole (a compaction may have hidden deletions).
        views.send_replace(Arc::new(state.scheduler_view(None)));
        let previous = publish.borrow().clone();
        // A reload is no traced change: whatever trace key it finds belongs to the past.
        let (tables, new_topology) = compile(&state, &previous, &topology, &dirty, true, None);
        topology = new_topology;
        if let Some(tables) = tables {
            publish.send_replace(Arc::new(tables));
        } else {
            // Same content as before the reload: keep versions stable.
        }
        let _ = ready.send(true);
        tracing::info!(
            revision = snapshot.revision,
            functions = state.functions.len(),
            agents = state.agents.len(),
            skipped = state.skipped.len(),
            "loaded state from etcd"
        );
        backoff.reset();

        let outputs = Follow {
            publish: &publish,
            views: &views,
            metrics: metrics.as_deref(),
            skipped: skipped.as_ref(),
        };
        match follow(&store, &config, &mut state, &outputs, &mut topology).await {
            StoreError::Compacted(revision) => {
                tracing::warn!(revision, "watch fell behind compaction; reloading");
            }
            error => {
                tracing::warn!(%error, "watch ended; reloading");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Where [`follow`] publishes.
struct Follow<'a> {
    publish: &'a watch::Sender<Arc<Tables>>,
    views: &'a watch::Sender<Arc<SchedulerView>>,
    metrics: Option<&'a Metrics>,
    skipped: Option<&'a watch::Sender<Arc<Vec<pb::SkippedRecord>>>>,
}

/// Follows the watch from the state's revision; returns when it must reload.
async fn follow(
    store: &Store,
    config: &CacheConfig,
    state: &mut MeshState,
    outputs: &Follow<'_>,
    topology: &mut Topology,
) -> StoreError {
    let Follow {
        publish,
        views,
        metrics,
        skipped,
    } = *outputs;
    let mut next_revision = state.revision + 1;
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    loop {
        let mut watch = match store
            .watch_range(store.keys().routing_range(), next_revision)
            .await
        {
            Ok(watch) => watch,
            Err(error) => {
                tracing::warn!(%error, next_revision, "cannot start watch; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        loop {
            let mut dirty = Dirty::default();
            let mut changes: Vec<Change> = Vec::new();
            let first = match watch.next().await {
                Ok(batch) => batch,
                Err(StoreError::Compacted(revision)) => return StoreError::Compacted(revision),
                Err(error) => {
                    tracing::warn!(%error, next_revision, "watch broke; resuming");
                    tokio::time::sleep(backoff.next_delay()).await;
                    break;
                }
            };
            backoff.reset();
            // Propagation is measured from here: the coalescing below is part of it.
            let seen_at = std::time::Instant::now();
            let mut last_revision = first.revision;
            changes.extend(first.changes);
            // Coalesce a burst: keep reading until it has been quiet for `coalesce`.
            let deadline = tokio::time::Instant::now() + config.coalesce_max;
            let mut broken = None;
            loop {
                let quiet = tokio::time::Instant::now() + config.coalesce;
                match tokio::time::timeout_at(quiet.min(deadline), watch.next()).await {
                    Err(_) => break,
                    Ok(Ok(batch)) => {
                        last_revision = last_revision.max(batch.revision);
                        changes.extend(batch.changes);
                    }
                    Ok(Err(error)) => {
                        broken = Some(error);
                        break;
                    }
                }
            }
            let relevant = changes.iter().any(|c| c.key.affects_routing());
            // The trace written with a change of this batch (the last one if several were
            // coalesced): it has the change's revision, so it belongs to these tables.
            let mut trace = None;
            for change in changes {
                if let (RecordKey::ChangeTrace, Some(Record::ChangeTrace(record))) =
                    (&change.key, &change.record)
                {
                    trace = Some(Arc::new(record.clone()));
                }
                state.apply_change(change, &mut dirty);
            }
            publish_skipped(state, skipped);
            if last_revision > 0 {
                next_revision = last_revision + 1;
            }
            if relevant && !dirty.is_empty() {
                state.revision = last_revision;
                let previous = publish.borrow().clone();
                let (tables, new_topology) =
                    compile(state, &previous, topology, &dirty, false, trace.as_ref());
                *topology = new_topology;
                if let Some(mut tables) = tables {
                    tracing::debug!(version = tables.version, "publishing routing tables");
                    tables.seen_at = Some(seen_at);
                    if let Some(metrics) = metrics {
                        metrics.table_changed(&tables, seen_at);
                    }
                    publish.send_replace(Arc::new(tables));
                }
                publish_view(state, views, &dirty, trace);
            }
            match broken {
                None => {}
                Some(StoreError::Compacted(revision)) => return StoreError::Compacted(revision),
                Some(error) => {
                    tracing::warn!(%error, next_revision, "watch broke; resuming");
                    tokio::time::sleep(backoff.next_delay()).await;
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoredFunction;

    fn stored(name: &str) -> Record {
        Record::Function(StoredFunction {
            spec: pb::FunctionSpec {
                name: name.into(),
                namespace: "default".into(),
                runtime: Some(pb::function_spec::Runtime::Process(pb::ProcessRuntime {
                    command: "/bin/true".into(),
                    ..Default::default()
                })),
                ..Default::default()
            },
            version: 5,
            created_version: 5,
        })
    }

    fn agent(region: &str) -> (RecordKey, Record) {
        (
            RecordKey::Agent {
                region: region.into(),
                agent_id: format!("{region}-1"),
            },
            Record::Agent(pb::AgentStatus {
                agent_id: format!("{region}-1"),
                region: region.into(),
                gateway: format!("{region}.gw:15002"),
                ..Default::default()
            }),
        )
    }

    fn placement(regions: &[&str]) -> Record {
        Record::Placement(StoredPlacement {
            placement: pb::FunctionPlacement {
                regions: regions
                    .iter()
                    .map(|r| pb::RegionBounds {
                        region: (*r).into(),
                        min_instances: 0,
                        max_instances: 10,
                    })
                    .collect(),
                ..Default::default()
            },
            version: 6,
        })
    }

    fn key(name: &str) -> FunctionKey {
        FunctionKey {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    /// A state at `revision` with an agent in each of `regions`, and what those records dirtied.
    fn state_with_agents(revision: i64, regions: &[&str]) -> (MeshState, Dirty) {
        let mut state = MeshState {
            revision,
            ..Default::default()
        };
        let mut dirty = Dirty::default();
        for region in regions {
            let (k, r) = agent(region);
            state.apply(k, Some(r), &mut dirty);
        }
        (state, dirty)
    }

    /// The first compile from nothing, which must publish tables.
    fn first_compile(state: &MeshState, dirty: &Dirty) -> (Tables, Topology) {
        let (first, topology) = compile(
            state,
            &Tables::default(),
            &Topology::default(),
            dirty,
            true,
            None,
        );
        (first.expect("first compile publishes"), topology)
    }

    #[test]
    fn compile_reuses_unchanged_routes_and_skips_no_ops() {
        let (mut state, mut dirty) = state_with_agents(10, &["us-east", "eu-west"]);
        state.apply(RecordKey::Function(key("a")), Some(stored("a")), &mut dirty);
        state.apply(RecordKey::Function(key("b")), Some(stored("b")), &mut dirty);
        for name in ["a", "b"] {
            state.apply(
                RecordKey::Placement(key(name)),
                Some(placement(&["us-east", "eu-west"])),
                &mut dirty,
            );
        }
        let (first, topology) = first_compile(&state, &dirty);
        assert_eq!(first.version, 10);
        assert_eq!(first.regions.len(), 2);
        let us = &first.regions["us-east"];
        assert_eq!(us.routes.len(), 2);
        assert_eq!(us.routes[&key("a")].tiers.len(), 2);

        // Nothing relevant changed: no new tables.
        let (none, topology) = compile(&state, &first, &topology, &Dirty::default(), false, None);
        assert!(none.is_none());

        // Delete b: a's route is shared, b removed.
        let mut dirty = Dirty::default();
        state.revision = 11;
        state.apply(RecordKey::Function(key("b")), None, &mut dirty);
        let (second, _) = compile(&state, &first, &topology, &dirty, false, None);
        let second = second.expect("changed");
        let us2 = &second.regions["us-east"];
        assert!(Arc::ptr_eq(&us.routes[&key("a")], &us2.routes[&key("a")]));
        let delta = us2.delta_from(us);
        assert!(delta[0].functions.is_empty());
        assert_eq!(delta[0].removed.len(), 1);
    }

    #[test]
    fn a_traced_change_is_carried_by_the_tables_it_changed_only() {
        let (mut state, mut dirty) = state_with_agents(10, &["us-east", "eu-west"]);
        state.apply(RecordKey::Function(key("a")), Some(stored("a")), &mut dirty);
        state.apply(
            RecordKey::Placement(key("a")),
            Some(placement(&["us-east", "eu-west"])),
            &mut dirty,
        );
        let (first, topology) = first_compile(&state, &dirty);
        assert!(first.regions.values().all(|t| t.trace.is_none()));

        // A starting instance of a in us-east changes us-east's local tier only: eu-west
        // reaches us-east through its gateways and counts only its ready instances, so its
        // table does not change and keeps no trace.
        let mut dirty = Dirty::default();
        state.revision = 11;
        state.apply(
            RecordKey::Endpoint {
                function: key("a"),
                region: "us-east".into(),
                id: "a-1".into(),
            },
            Some(Record::Endpoint(pb::Endpoint {
                address: "127.0.1.1:9000".into(),
                id: "a-1".into(),
                state: pb::EndpointState::Starting as i32,
                ..Default::default()
            })),
            &mut dirty,
        );
        // The trace record itself dirties nothing.
        state.apply(
            RecordKey::ChangeTrace,
            Some(Record::ChangeTrace(pb::ChangeTrace::default())),
            &mut dirty,
        );
        let trace = Arc::new(pb::ChangeTrace {
            change: "apply default/b".into(),
            ..Default::default()
        });
        let (second, _) = compile(&state, &first, &topology, &dirty, false, Some(&trace));
        let second = second.expect("the instance changed us-east");
        let us = &second.regions["us-east"];
        assert_eq!(us.version, 11);
        assert!(us.trace.as_ref().is_some_and(|t| Arc::ptr_eq(t, &trace)));
        let eu = &second.regions["eu-west"];
        assert_eq!(eu.version, 10);
        assert!(eu.trace.is_none());
    }

    #[test]
    fn status_records_do_not_dirty() {
        let mut state = MeshState::default();
        let mut dirty = Dirty::default();
        state.apply(
            RecordKey::AgentStatus {
                region: "us-east".into(),
                agent_id: "a".into(),
            },
            Some(Record::AgentStatus(pb::AgentStatus::default())),
            &mut dirty,
        );
        state.apply(
            RecordKey::Scale {
                function: key("a"),
                region: "us-east".into(),
                agent_id: "a".into(),
            },
            Some(Record::Scale(pb::RegionScale::default())),
            &mut dirty,
        );
        assert!(dirty.is_empty() && !dirty.scheduler);
        assert!(!RecordKey::AgentStatus {
            region: "r".into(),
            agent_id: "a".into()
        }
        .affects_routing());
    }

    #[test]
    fn election_keys_build_no_tables() {
        let (mut state, dirty) = state_with_agents(3, &["us-east"]);
        let (first, topology) = first_compile(&state, &dirty);

        let mut dirty = Dirty::default();
        state.revision = 4;
        state.apply(
            RecordKey::Leader,
            Some(Record::Leader(crate::store::LeaderRecord {
                replica: "cp-1".into(),
                elected_version: 4,
                lease: 1,
            })),
            &mut dirty,
        );
        assert!(dirty.is_empty() && !dirty.scheduler);
        assert!(!RecordKey::Leader.affects_routing());
        let (none, _) = compile(&state, &first, &topology, &dirty, false, None);
        assert!(none.is_none());
    }

    #[test]
    fn placements_change_routes_and_the_scheduler_view() {
        let (mut state, mut dirty) = state_with_agents(10, &["us-east", "eu-west"]);
        state.apply(RecordKey::Function(key("a")), Some(stored("a")), &mut dirty);
        let (first, topology) = first_compile(&state, &dirty);
        assert!(first.regions["us-east"].routes[&key("a")].tiers.is_empty());

        let (views, _keep) = watch::channel(Arc::new(SchedulerView::default()));
        publish_view(&state, &views, &dirty, None);
        let view = views.borrow().clone();
        assert!(view.loaded);
        assert_eq!(view.functions.len(), 1);
        assert_eq!(
            view.agent_regions
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            vec!["eu-west", "us-east"]
        );

        let mut dirty = Dirty::default();
        state.revision = 11;
        state.apply(
            RecordKey::Placement(key("a")),
            Some(placement(&["us-east"])),
            &mut dirty,
        );
        assert!(dirty.scheduler);
        let (second, _) = compile(&state, &first, &topology, &dirty, false, None);
        let second = second.expect("the placement changed the route");
        let route = &second.regions["us-east"].routes[&key("a")];
        assert_eq!(route.tiers.len(), 1);
        assert!(route.tiers[0].local);
        let scale = route
            .workload
            .as_ref()
            .and_then(|w| w.scale)
            .expect("bounds");
        assert_eq!(scale.max_instances, 10);
        assert!(second.regions["eu-west"].routes[&key("a")]
            .workload
            .is_none());
        publish_view(&state, &views, &dirty, None);
        assert_eq!(views.borrow().placements.len(), 1);

        // An agent record rewritten (re-registration) changes nothing the scheduler reads.
        let before = views.borrow().clone();
        let mut dirty = Dirty::default();
        let (k, r) = agent("us-east");
        state.apply(k, Some(r), &mut dirty);
        publish_view(&state, &views, &dirty, None);
        assert!(Arc::ptr_eq(&before, &views.borrow()));
    }
}
