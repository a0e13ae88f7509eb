//! The watch → cache → publish loop: mirrors functions, agents and endpoints from etcd, and
//! publishes freshly compiled routing tables after each coalesced batch of changes.
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

use crate::spec::{FunctionKey, FunctionSpec};
use crate::store::{Change, Record, RecordKey, Store, StoreError};
use crate::table::{
    build_route, regions_of_interest, CachedFunction, FunctionEndpoints, RegionTable, Tables,
    Topology,
};

/// What a batch of changes touched.
#[derive(Debug, Default)]
struct Dirty {
    functions: BTreeSet<FunctionKey>,
    agents: bool,
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
    functions: BTreeMap<FunctionKey, CachedFunction>,
    agents: BTreeMap<(String, String), pb::AgentStatus>,
    endpoints: HashMap<FunctionKey, FunctionEndpoints>,
}

impl MeshState {
    fn apply(&mut self, key: RecordKey, record: Option<Record>, dirty: &mut Dirty) {
        match (key, record) {
            (RecordKey::Function(key), Some(Record::Function(stored))) => {
                match FunctionSpec::try_from(stored.spec) {
                    Ok(spec) => {
                        self.functions.insert(
                            key.clone(),
                            CachedFunction {
                                spec,
                                version: stored.version,
                            },
                        );
                    }
                    Err(error) => {
                        tracing::error!(function = %key, %error, "ignoring invalid stored function");
                        self.functions.remove(&key);
                    }
                }
                dirty.functions.insert(key);
            }
            (RecordKey::Function(key), None) => {
                self.functions.remove(&key);
                dirty.functions.insert(key);
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
            // Acknowledgement status never changes a routing table.
            (RecordKey::AgentStatus { .. }, _) => {}
            (key, record) => {
                tracing::warn!(?key, ?record, "record does not match its key; ignored");
            }
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
/// change. Returns `None` when no table changed.
fn compile(
    state: &MeshState,
    previous: &Tables,
    previous_topology: &Topology,
    dirty: &Dirty,
    force_all: bool,
) -> (Option<Tables>, Topology) {
    let topology = state.topology();
    let rebuild_all = force_all || topology != *previous_topology;
    let regions = regions_of_interest(state.functions.values(), &topology);
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
            let route = build_route(function, state.endpoints.get(key), region, &topology);
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
            Arc::new(RegionTable::new(state.revision, region.clone(), routes)),
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

/// Runs forever: keeps `publish` holding the newest tables; sets `ready` once the first
/// snapshot is published.
pub async fn run(
    store: Store,
    config: CacheConfig,
    publish: watch::Sender<Arc<Tables>>,
    ready: watch::Sender<bool>,
) {
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
            ..Default::default()
        };
        let mut dirty = Dirty::default();
        for (key, record) in snapshot.records {
            state.apply(key, Some(record), &mut dirty);
        }
        let previous = publish.borrow().clone();
        let (tables, new_topology) = compile(&state, &previous, &topology, &dirty, true);
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
            "loaded state from etcd"
        );
        backoff.reset();

        match follow(&store, &config, &mut state, &publish, &mut topology).await {
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

/// Follows the watch from the state's revision; returns when it must reload.
async fn follow(
    store: &Store,
    config: &CacheConfig,
    state: &mut MeshState,
    publish: &watch::Sender<Arc<Tables>>,
    topology: &mut Topology,
) -> StoreError {
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
            let relevant = changes
                .iter()
                .any(|c| !matches!(c.key, RecordKey::AgentStatus { .. }));
            for change in changes {
                state.apply(change.key, change.record, &mut dirty);
            }
            if last_revision > 0 {
                next_revision = last_revision + 1;
            }
            if relevant && !dirty.is_empty() {
                state.revision = last_revision;
                let previous = publish.borrow().clone();
                let (tables, new_topology) = compile(state, &previous, topology, &dirty, false);
                *topology = new_topology;
                if let Some(tables) = tables {
                    tracing::debug!(version = tables.version, "publishing routing tables");
                    publish.send_replace(Arc::new(tables));
                }
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

    fn key(name: &str) -> FunctionKey {
        FunctionKey {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    #[test]
    fn compile_reuses_unchanged_routes_and_skips_no_ops() {
        let mut state = MeshState {
            revision: 10,
            ..Default::default()
        };
        let mut dirty = Dirty::default();
        for (k, r) in [agent("us-east"), agent("eu-west")] {
            state.apply(k, Some(r), &mut dirty);
        }
        state.apply(RecordKey::Function(key("a")), Some(stored("a")), &mut dirty);
        state.apply(RecordKey::Function(key("b")), Some(stored("b")), &mut dirty);
        let (first, topology) = compile(
            &state,
            &Tables::default(),
            &Topology::default(),
            &dirty,
            true,
        );
        let first = first.expect("first compile publishes");
        assert_eq!(first.version, 10);
        assert_eq!(first.regions.len(), 2);
        let us = &first.regions["us-east"];
        assert_eq!(us.routes.len(), 2);
        assert_eq!(us.routes[&key("a")].tiers.len(), 2);

        // Nothing relevant changed: no new tables.
        let (none, topology) = compile(&state, &first, &topology, &Dirty::default(), false);
        assert!(none.is_none());

        // Delete b: a's route is shared, b removed.
        let mut dirty = Dirty::default();
        state.revision = 11;
        state.apply(RecordKey::Function(key("b")), None, &mut dirty);
        let (second, _) = compile(&state, &first, &topology, &dirty, false);
        let second = second.expect("changed");
        let us2 = &second.regions["us-east"];
        assert!(Arc::ptr_eq(&us.routes[&key("a")], &us2.routes[&key("a")]));
        let delta = us2.delta_from(us);
        assert!(delta[0].functions.is_empty());
        assert_eq!(delta[0].removed.len(), 1);
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
        assert!(dirty.is_empty());
    }
}
