//! Compiles the cached mesh state into one routing table per region, and computes the updates
//! (full tables and deltas) that agents are sent.
//!
//! Routes are `Arc`s shared between table versions: a route that did not change is the same
//! allocation in the old and new table, so a delta is found by pointer comparison, and is
//! computed once per (base version, new version) and shared by every agent of the region.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use meridian_proto::updates::{self, PartLimits};
use meridian_proto::v1 as pb;

use crate::spec::{FunctionKey, FunctionSpec, Runtime};

/// Functions per part of an update: about 20 KB encoded with three tiers. Bounding the part
/// bounds the buffers each agent stream keeps (they retain the capacity of their largest
/// message), which is what makes 10,000 streams affordable. Parts are also bounded in bytes, so
/// functions with large specs never make a message the agent cannot read.
pub const FUNCTIONS_PER_PART: usize = 64;

/// How the updates agents are sent are cut into parts.
pub const AGENT_PART_LIMITS: PartLimits = PartLimits {
    items: FUNCTIONS_PER_PART,
    bytes: meridian_proto::updates::PART_BYTES,
};

/// An update, split into the parts it is sent in (`more` set on all but the last).
pub type UpdateParts = Arc<Vec<pb::RoutingUpdate>>;

/// A function as the table builder needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedFunction {
    pub spec: FunctionSpec,
    pub version: i64,
}

/// The inputs of routing tables that are not per function: which regions exist and their
/// gateways.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Topology {
    /// Regions that have at least one connected agent.
    pub agent_regions: BTreeSet<String>,
    /// Per region, the sidecar gateways of its agents (sorted, deduplicated by address).
    pub gateways: BTreeMap<String, Vec<pb::Endpoint>>,
}

/// Endpoints of one function, by (region, id).
pub type FunctionEndpoints = BTreeMap<(String, String), pb::Endpoint>;

/// The table of one region at one version.
#[derive(Debug)]
pub struct RegionTable {
    pub version: i64,
    pub region: String,
    pub routes: BTreeMap<FunctionKey, Arc<pb::FunctionRoute>>,
    /// The traced change this table was compiled from (tracing on, and the change came through
    /// the API): pushes of this table join that change's trace.
    pub trace: Option<Arc<pb::ChangeTrace>>,
    full: OnceLock<UpdateParts>,
    deltas: Mutex<HashMap<i64, UpdateParts>>,
}

impl RegionTable {
    pub fn new(
        version: i64,
        region: String,
        routes: BTreeMap<FunctionKey, Arc<pb::FunctionRoute>>,
    ) -> Self {
        Self {
            version,
            region,
            routes,
            trace: None,
            full: OnceLock::new(),
            deltas: Mutex::new(HashMap::new()),
        }
    }

    /// The same table, compiled from the traced change `trace`.
    pub fn with_trace(mut self, trace: Option<Arc<pb::ChangeTrace>>) -> Self {
        self.trace = trace;
        self
    }

    /// The table as the API shows it.
    pub fn to_proto(&self) -> pb::RoutingTable {
        pb::RoutingTable {
            version: self.version,
            region: self.region.clone(),
            functions: self.routes.values().map(|r| (**r).clone()).collect(),
            local_generation: 0,
        }
    }

    /// The whole table as an update, in parts.
    pub fn full_update(&self) -> UpdateParts {
        self.full
            .get_or_init(|| {
                Arc::new(updates::split(
                    pb::RoutingUpdate {
                        version: self.version,
                        full: true,
                        region: self.region.clone(),
                        functions: self.routes.values().map(|r| (**r).clone()).collect(),
                        ..Default::default()
                    },
                    AGENT_PART_LIMITS,
                ))
            })
            .clone()
    }

    /// The delta that turns `base` into this table, in parts; computed once per base version.
    pub fn delta_from(&self, base: &RegionTable) -> UpdateParts {
        let mut deltas = match self.deltas.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        deltas
            .entry(base.version)
            .or_insert_with(|| {
                let functions = self
                    .routes
                    .iter()
                    .filter(|(key, route)| match base.routes.get(*key) {
                        Some(old) => !Arc::ptr_eq(old, route) && old != *route,
                        None => true,
                    })
                    .map(|(_, route)| (**route).clone())
                    .collect();
                let removed = base
                    .routes
                    .keys()
                    .filter(|key| !self.routes.contains_key(*key))
                    .map(|key| pb::FunctionRef {
                        namespace: key.namespace.clone(),
                        name: key.name.clone(),
                    })
                    .collect();
                Arc::new(updates::split(
                    pb::RoutingUpdate {
                        version: self.version,
                        base_version: base.version,
                        full: false,
                        region: self.region.clone(),
                        functions,
                        removed,
                        ..Default::default()
                    },
                    AGENT_PART_LIMITS,
                ))
            })
            .clone()
    }
}

/// Every region's table at one version.
#[derive(Debug, Default)]
pub struct Tables {
    pub version: i64,
    pub regions: BTreeMap<String, Arc<RegionTable>>,
    /// When the watch delivered the first change these tables reflect (`None` after a full
    /// load): where the propagation-latency histogram starts counting.
    pub seen_at: Option<std::time::Instant>,
}

/// Regions a function runs in: for an external function the spec's, for a process function
/// its placement's (none until the scheduler has placed it).
fn hosting_regions<'a>(
    spec: &'a FunctionSpec,
    placement: Option<&'a pb::FunctionPlacement>,
) -> BTreeSet<&'a str> {
    match &spec.runtime {
        Runtime::External(regions) => regions.keys().map(String::as_str).collect(),
        Runtime::Process(_) => placement
            .map(|p| p.regions.iter().map(|r| r.region.as_str()).collect())
            .unwrap_or_default(),
    }
}

/// Every region some table must exist for: those with agents and those specs name.
pub fn regions_of_interest<'a>(
    functions: impl IntoIterator<Item = &'a CachedFunction>,
    topology: &Topology,
) -> BTreeSet<String> {
    let mut regions = topology.agent_regions.clone();
    for function in functions {
        if let Some(hosting) = function.spec.hosting_regions() {
            regions.extend(hosting.into_iter().map(str::to_owned));
        }
    }
    regions
}

/// The route of one function as seen from `region`. `placement` is the scheduler's placement of
/// a process function (ignored for external functions).
pub fn build_route(
    function: &CachedFunction,
    placement: Option<&pb::FunctionPlacement>,
    endpoints: Option<&FunctionEndpoints>,
    region: &str,
    topology: &Topology,
) -> pb::FunctionRoute {
    let spec = &function.spec;
    let hosting = hosting_regions(spec, placement);
    let endpoints_in = |r: &str| -> Vec<pb::Endpoint> {
        endpoints
            .map(|all| {
                all.iter()
                    .filter(|((er, _), _)| er == r)
                    .map(|(_, e)| e.clone())
                    .collect()
            })
            .unwrap_or_default()
    };
    let ready = |list: &[pb::Endpoint]| {
        let count = list
            .iter()
            .filter(|e| e.state == pb::EndpointState::Ready as i32)
            .count();
        u32::try_from(count).unwrap_or(u32::MAX)
    };

    let mut tiers = Vec::new();
    if hosting.contains(region) {
        let local = endpoints_in(region);
        tiers.push(pb::Tier {
            region: region.to_owned(),
            local: true,
            ready_instances: ready(&local),
            endpoints: local,
            order: pb::TierOrder::Local as i32,
        });
    }
    let remote = |r: &str, order: pb::TierOrder| pb::Tier {
        region: r.to_owned(),
        local: false,
        ready_instances: ready(&endpoints_in(r)),
        endpoints: topology.gateways.get(r).cloned().unwrap_or_default(),
        order: order as i32,
    };
    let explicit: Vec<&str> = spec
        .routing
        .failover_order
        .iter()
        .map(String::as_str)
        .filter(|r| *r != region && hosting.contains(r))
        .collect();
    for r in &explicit {
        tiers.push(remote(r, pb::TierOrder::Explicit));
    }
    for r in &hosting {
        if *r != region && !explicit.contains(r) {
            tiers.push(remote(r, pb::TierOrder::Measured));
        }
    }

    let workload = match &spec.runtime {
        Runtime::External(regions) => regions.get(region).map(|urls| pb::LocalWorkload {
            kind: Some(pb::local_workload::Kind::External(pb::ExternalRegion {
                region: region.to_owned(),
                urls: urls.clone(),
            })),
            scale: None,
        }),
        Runtime::Process(process) => placement
            .and_then(|p| p.regions.iter().find(|r| r.region == region))
            .map(|bounds| pb::LocalWorkload {
                kind: Some(pb::local_workload::Kind::Process(process.into())),
                scale: Some(pb::ScaleBounds {
                    min_instances: bounds.min_instances,
                    max_instances: bounds.max_instances,
                    target_concurrency: spec.scaling.target_concurrency,
                    idle_seconds: spec.scaling.idle_seconds,
                }),
            }),
    };

    pb::FunctionRoute {
        namespace: spec.key.namespace.clone(),
        name: spec.key.name.clone(),
        function_version: function.version,
        policy: Some((&spec.routing).into()),
        tiers,
        workload,
        // The local region's agent fills these in for its sidecars.
        cold_start_ms: 0,
        local_failed_starts: 0,
        local_restart_backoff: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec;

    fn function(name: &str, regions: &[&str], failover: &[&str]) -> CachedFunction {
        let spec = pb::FunctionSpec {
            name: name.into(),
            runtime: Some(pb::function_spec::Runtime::External(pb::ExternalRuntime {
                regions: regions
                    .iter()
                    .map(|r| pb::ExternalRegion {
                        region: (*r).into(),
                        urls: vec![format!("http://{r}.example:80")],
                    })
                    .collect(),
            })),
            routing: Some(pb::RoutingPolicy {
                failover_order: failover.iter().map(|r| (*r).to_string()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        CachedFunction {
            spec: spec::FunctionSpec::try_from(spec).expect("valid"),
            version: 7,
        }
    }

    fn topology() -> Topology {
        let mut topology = Topology::default();
        for (r, addr) in [
            ("us-east", "127.0.1.1:15002"),
            ("eu-west", "127.0.2.1:15002"),
            ("ap-south", "127.0.3.1:15002"),
        ] {
            topology.agent_regions.insert(r.into());
            topology.gateways.insert(
                r.into(),
                vec![pb::Endpoint {
                    address: addr.into(),
                    id: format!("{r}-1"),
                    state: pb::EndpointState::Ready as i32,
                    zone: String::new(),
                }],
            );
        }
        topology
    }

    #[test]
    fn local_tier_first_then_explicit_then_measured() {
        let f = function("hello", &["us-east", "eu-west", "ap-south"], &["ap-south"]);
        let route = build_route(&f, None, None, "us-east", &topology());
        let tiers: Vec<(&str, bool, i32)> = route
            .tiers
            .iter()
            .map(|t| (t.region.as_str(), t.local, t.order))
            .collect();
        assert_eq!(
            tiers,
            vec![
                ("us-east", true, pb::TierOrder::Local as i32),
                ("ap-south", false, pb::TierOrder::Explicit as i32),
                ("eu-west", false, pb::TierOrder::Measured as i32),
            ]
        );
        assert_eq!(route.tiers[1].endpoints[0].address, "127.0.3.1:15002");
        match route.workload.and_then(|w| w.kind) {
            Some(pb::local_workload::Kind::External(ext)) => {
                assert_eq!(ext.urls, vec!["http://us-east.example:80".to_string()])
            }
            other => panic!("unexpected workload {other:?}"),
        }
    }

    #[test]
    fn region_not_hosting_gets_only_remote_tiers() {
        let f = function("hello", &["eu-west"], &[]);
        let route = build_route(&f, None, None, "us-east", &topology());
        assert_eq!(route.tiers.len(), 1);
        assert_eq!(route.tiers[0].region, "eu-west");
        assert!(route.workload.is_none());
    }

    fn process(name: &str) -> CachedFunction {
        let spec = pb::FunctionSpec {
            name: name.into(),
            runtime: Some(pb::function_spec::Runtime::Process(pb::ProcessRuntime {
                command: "/bin/sample".into(),
                ..Default::default()
            })),
            scaling: Some(pb::Scaling {
                target_concurrency: Some(5),
                idle_seconds: Some(30),
                ..Default::default()
            }),
            ..Default::default()
        };
        CachedFunction {
            spec: spec::FunctionSpec::try_from(spec).expect("valid"),
            version: 9,
        }
    }

    #[test]
    fn process_function_follows_its_placement() {
        let f = process("worker");
        let topology = topology();

        // Not placed yet: no tiers, nothing to run.
        let route = build_route(&f, None, None, "us-east", &topology);
        assert!(route.tiers.is_empty());
        assert!(route.workload.is_none());

        let placement = pb::FunctionPlacement {
            regions: vec![
                pb::RegionBounds {
                    region: "us-east".into(),
                    min_instances: 1,
                    max_instances: 4,
                },
                pb::RegionBounds {
                    region: "eu-west".into(),
                    min_instances: 0,
                    max_instances: 2,
                },
            ],
            ..Default::default()
        };
        let endpoints = FunctionEndpoints::from([(
            ("eu-west".to_string(), "worker-0a1b2c".to_string()),
            pb::Endpoint {
                address: "127.0.2.1:40000".into(),
                id: "worker-0a1b2c".into(),
                state: pb::EndpointState::Ready as i32,
                zone: String::new(),
            },
        )]);
        let route = build_route(&f, Some(&placement), Some(&endpoints), "us-east", &topology);
        let tiers: Vec<(&str, bool, u32)> = route
            .tiers
            .iter()
            .map(|t| (t.region.as_str(), t.local, t.ready_instances))
            .collect();
        assert_eq!(tiers, vec![("us-east", true, 0), ("eu-west", false, 1)]);
        let workload = route.workload.expect("placed here");
        assert!(matches!(
            workload.kind,
            Some(pb::local_workload::Kind::Process(ref p)) if p.command == "/bin/sample"
        ));
        assert_eq!(
            workload.scale,
            Some(pb::ScaleBounds {
                min_instances: 1,
                max_instances: 4,
                target_concurrency: 5,
                idle_seconds: 30,
            })
        );

        // ap-south is not in the placement: remote tiers only, nothing to run.
        let route = build_route(
            &f,
            Some(&placement),
            Some(&endpoints),
            "ap-south",
            &topology,
        );
        assert!(route.tiers.iter().all(|t| !t.local));
        assert_eq!(route.tiers.len(), 2);
        assert!(route.workload.is_none());
    }

    #[test]
    fn delta_contains_only_changes_and_is_shared() {
        let key = |n: &str| FunctionKey {
            namespace: "default".into(),
            name: n.into(),
        };
        let topology = topology();
        let a = Arc::new(build_route(
            &function("a", &["us-east"], &[]),
            None,
            None,
            "us-east",
            &topology,
        ));
        let b = Arc::new(build_route(
            &function("b", &["us-east"], &[]),
            None,
            None,
            "us-east",
            &topology,
        ));
        let old = RegionTable::new(
            10,
            "us-east".into(),
            BTreeMap::from([(key("a"), a.clone()), (key("b"), b)]),
        );
        let mut changed = (*a).clone();
        changed.function_version = 11;
        let new = RegionTable::new(
            11,
            "us-east".into(),
            BTreeMap::from([(key("a"), Arc::new(changed))]),
        );
        let parts = new.delta_from(&old);
        assert_eq!(parts.len(), 1);
        let delta = &parts[0];
        assert!(!delta.more);
        assert!(!delta.full);
        assert_eq!(delta.base_version, 10);
        assert_eq!(delta.functions.len(), 1);
        assert_eq!(delta.functions[0].function_version, 11);
        assert_eq!(delta.removed.len(), 1);
        assert_eq!(delta.removed[0].name, "b");
        assert!(Arc::ptr_eq(&parts, &new.delta_from(&old)));
        assert_eq!(new.full_update()[0].functions.len(), 1);
    }

    #[test]
    fn large_updates_are_split_with_removals_last() {
        let route = |i: usize| pb::FunctionRoute {
            name: format!("f{i}"),
            ..Default::default()
        };
        let update = pb::RoutingUpdate {
            version: 9,
            base_version: 8,
            functions: (0..130).map(route).collect(),
            removed: vec![pb::FunctionRef::default()],
            ..Default::default()
        };
        let parts = updates::split(update, AGENT_PART_LIMITS);
        let sizes: Vec<usize> = parts.iter().map(|p| p.functions.len()).collect();
        assert_eq!(sizes, vec![64, 64, 2]);
        assert_eq!(
            parts.iter().map(|p| p.more).collect::<Vec<_>>(),
            vec![true, true, false]
        );
        assert!(parts.iter().all(|p| p.version == 9 && p.base_version == 8));
        assert!(parts[..2].iter().all(|p| p.removed.is_empty()));
        assert_eq!(parts[2].removed.len(), 1);
    }
}
