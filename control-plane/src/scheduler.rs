//! The scheduler, run by the elected leader only: turns each `process` function and the regions
//! that have agents into a placement (`placements/<ns>/<name>`: regions and instance bounds),
//! written in transactions fenced by the election key.
//!
//! It reconciles the cache's view against the placements stored, idempotently: on every view
//! change, every `resync` as well, and soon after a conflict. A placement is rewritten only when
//! its content changes (the `leader` field alone does not count, so a failover rewrites
//! nothing). A fenced write means another replica leads: the loop ends and the caller campaigns
//! again.
//!
//! A region leaves a placement only after its agents have been absent for the region grace
//! (`--region-grace`, default 60 s), counted from when this leader's term began or when it saw
//! the region's last agent go, whichever is later. Lease expiry while etcd or the control plane
//! was down is not evidence that a region is gone: a leader that comes back (or a new one)
//! first waits for agents to reconnect, so a recovery never removes warm instances.
//!
//! When tracing is on and the view comes from a traced change (an Apply), the placements it
//! causes are written under a `meridian.schedule` span in that change's trace, with the span's
//! context in the same fenced transaction, so the pushes of the placed tables join the trace too.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use meridian_common::backoff::Backoff;
use meridian_proto::v1 as pb;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::spec::{FunctionKey, Placement, Runtime};
use crate::store::{
    FencedWrite, PlacementWrite, Store, StoreError, StoredPlacement, MAX_FENCED_WRITES,
};
use crate::table::CachedFunction;
use crate::trace::{ChangeSpan, Tracing};

/// What the scheduler reads from the cache: functions, the regions with agents, and the stored
/// placements, all at `revision`.
#[derive(Debug, Clone, Default)]
pub struct SchedulerView {
    /// False until the cache has loaded its first snapshot: an empty view must never be taken
    /// for "no functions" (that would delete every placement).
    pub loaded: bool,
    pub revision: i64,
    pub functions: BTreeMap<FunctionKey, Arc<CachedFunction>>,
    /// Regions with at least one registered agent.
    pub agent_regions: BTreeSet<String>,
    pub placements: BTreeMap<FunctionKey, Arc<StoredPlacement>>,
    /// The traced change of the batch that produced this view, if any.
    pub trace: Option<Arc<pb::ChangeTrace>>,
}

/// Settings of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Written into every placement as `leader`.
    pub replica_id: String,
    /// Reconcile at least this often even without changes.
    pub resync: Duration,
    /// After a conflict (our view was behind etcd), reconcile again this soon.
    pub conflict_retry: Duration,
    /// Spans of placements caused by traced changes; `None` when export is off.
    pub tracing: Option<Arc<Tracing>>,
    /// How long a placed region's agents must be absent, while this leader sees etcd, before
    /// the region is removed from placements.
    pub region_grace: Duration,
}

/// `--region-grace`'s default: a region must be gone a minute before its instances are.
pub const DEFAULT_REGION_GRACE: Duration = Duration::from_secs(60);

impl SchedulerConfig {
    pub fn new(replica_id: impl Into<String>) -> Self {
        Self {
            replica_id: replica_id.into(),
            resync: Duration::from_secs(10),
            conflict_retry: Duration::from_millis(200),
            tracing: None,
            region_grace: DEFAULT_REGION_GRACE,
        }
    }

    /// See [`SchedulerConfig::region_grace`].
    pub fn with_region_grace(mut self, grace: Duration) -> Self {
        self.region_grace = grace;
        self
    }

    /// Traces the placements caused by traced changes (see [`crate::trace`]).
    pub fn with_tracing(mut self, tracing: Option<Arc<Tracing>>) -> Self {
        self.tracing = tracing;
        self
    }
}

/// Counters of the scheduler, kept across terms.
#[derive(Debug, Default)]
pub struct SchedulerCounters {
    /// Writes refused because the election key was no longer ours: each one ended a term.
    pub fenced_writes: AtomicU64,
    /// Placements put and deleted.
    pub placements_written: AtomicU64,
    pub placements_deleted: AtomicU64,
    /// Writes refused because a placement changed since the view was read.
    pub conflicts: AtomicU64,
}

/// The placement of a function given the regions that have agents; `None` for functions that
/// are not `process` functions (they have no placement).
pub fn compute_placement(
    function: &CachedFunction,
    agent_regions: &BTreeSet<String>,
    leader: &str,
) -> Option<pb::FunctionPlacement> {
    let spec = &function.spec;
    if !matches!(spec.runtime, Runtime::Process(_)) {
        return None;
    }
    let scaling = &spec.scaling;
    // (region, min, max) of every candidate region.
    let candidates: Vec<(&str, u32, u32)> = match &spec.placement {
        Placement::AllRegions => agent_regions
            .iter()
            .map(|r| (r.as_str(), scaling.min_instances, scaling.max_instances))
            .collect(),
        Placement::Regions(regions) => regions
            .iter()
            .map(|r| (r.region.as_str(), r.min(scaling), r.max_instances))
            .collect(),
    };
    let mut placement = pb::FunctionPlacement {
        namespace: spec.key.namespace.clone(),
        name: spec.key.name.clone(),
        function_version: function.version,
        leader: leader.to_owned(),
        ..Default::default()
    };
    for (region, min, max) in candidates {
        if agent_regions.contains(region) {
            placement.regions.push(pb::RegionBounds {
                region: region.to_owned(),
                min_instances: min,
                max_instances: max,
            });
        } else {
            let reason = if min > 0 {
                format!("minInstances {min} but region {region} has no agent")
            } else {
                format!("no agent in region {region}")
            };
            placement.problems.push(pb::PlacementProblem {
                region: region.to_owned(),
                reason,
            });
        }
    }
    Some(placement)
}

/// Whether two placements say the same, ignoring which leader wrote them.
pub fn same_placement(a: &pb::FunctionPlacement, b: &pb::FunctionPlacement) -> bool {
    let strip = |p: &pb::FunctionPlacement| pb::FunctionPlacement {
        leader: String::new(),
        ..p.clone()
    };
    strip(a) == strip(b)
}

/// A write of ours that the view may not show yet.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnWrite {
    /// The revision it was committed at (the key's mod revision if it was a put).
    pub revision: i64,
    pub placement: Option<pb::FunctionPlacement>,
}

/// The writes that bring the stored placements to what the view asks for, placing functions in
/// `regions` (the regions with agents, plus those still within their grace). `own` holds this
/// term's writes, which win over the view until the view has caught up with them (otherwise
/// every write would be followed by a conflicting rewrite while the watch lags).
pub fn plan(
    view: &SchedulerView,
    regions: &BTreeSet<String>,
    own: &BTreeMap<FunctionKey, OwnWrite>,
    leader: &str,
) -> Vec<PlacementWrite> {
    // The stored placement as far as we know, and its mod revision (0: absent).
    let known = |key: &FunctionKey| -> (i64, Option<&pb::FunctionPlacement>) {
        match own.get(key) {
            Some(write) if write.revision > view.revision => match &write.placement {
                Some(placement) => (write.revision, Some(placement)),
                None => (0, None),
            },
            _ => view
                .placements
                .get(key)
                .map_or((0, None), |p| (p.version, Some(&p.placement))),
        }
    };
    let mut writes = Vec::new();
    for (key, function) in &view.functions {
        let desired = compute_placement(function, regions, leader);
        let (version, current) = known(key);
        let unchanged = match (&desired, current) {
            (Some(desired), Some(current)) => same_placement(desired, current),
            (None, None) => true,
            _ => false,
        };
        if !unchanged {
            writes.push(PlacementWrite {
                function: key.clone(),
                expected_version: version,
                placement: desired,
            });
        }
    }
    // Placements of functions that are gone.
    let orphans: BTreeSet<&FunctionKey> = view
        .placements
        .keys()
        .chain(own.keys())
        .filter(|key| !view.functions.contains_key(*key))
        .collect();
    for key in orphans {
        if let (version, Some(_)) = known(key) {
            writes.push(PlacementWrite {
                function: key.clone(),
                expected_version: version,
                placement: None,
            });
        }
    }
    writes
}

/// Which placed regions are kept although no agent of theirs is registered, for one term.
///
/// A region counts as absent from the first pass of the term that finds it placed without
/// agents (the term's start, for regions already placed then), and is kept until it has been
/// absent for the grace. An agent that registers again ends the absence.
#[derive(Debug)]
pub struct RegionGrace {
    grace: Duration,
    absent_since: BTreeMap<String, Instant>,
}

impl RegionGrace {
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            absent_since: BTreeMap::new(),
        }
    }

    /// The regions to place in at `now`, and when the next kept region's grace runs out.
    pub fn regions(
        &mut self,
        view: &SchedulerView,
        own: &BTreeMap<FunctionKey, OwnWrite>,
        now: Instant,
    ) -> (BTreeSet<String>, Option<Instant>) {
        let placed: BTreeSet<&str> = view
            .placements
            .values()
            .map(|p| &p.placement)
            .chain(own.values().filter_map(|w| w.placement.as_ref()))
            .flat_map(|p| p.regions.iter().map(|r| r.region.as_str()))
            .collect();
        self.absent_since
            .retain(|region, _| !view.agent_regions.contains(region));
        for region in placed {
            if !view.agent_regions.contains(region) {
                self.absent_since.entry(region.to_owned()).or_insert(now);
            }
        }
        let mut regions = view.agent_regions.clone();
        let mut next_expiry: Option<Instant> = None;
        let grace = self.grace;
        self.absent_since.retain(|region, since| {
            let until = *since + grace;
            if now >= until {
                tracing::info!(%region, absent_for = ?now.duration_since(*since), "no agent for the region grace: removing the region from placements");
                return false;
            }
            regions.insert(region.clone());
            next_expiry = Some(next_expiry.map_or(until, |at| at.min(until)));
            true
        });
        (regions, next_expiry)
    }
}

/// The election key is no longer ours: a write was refused, the term is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fenced;

/// How a reconcile pass ended (when not fenced).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Done,
    /// Some placement changed under us; the view will catch up.
    Conflict,
}

impl Pass {
    /// The outcome named on a `meridian.schedule` span.
    fn name(self) -> &'static str {
        match self {
            Self::Done => "written",
            Self::Conflict => "conflict",
        }
    }
}

/// Runs the scheduler for one term (the election key created at `elected_version`). Returns
/// only when a write is fenced: another replica leads.
pub async fn run(
    store: &Store,
    config: &SchedulerConfig,
    views: &mut watch::Receiver<Arc<SchedulerView>>,
    elected_version: i64,
    counters: &SchedulerCounters,
) -> Fenced {
    let mut own: BTreeMap<FunctionKey, OwnWrite> = BTreeMap::new();
    let mut resync = tokio::time::interval(config.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut retry_at: Option<Instant> = None;
    // The grace is counted within this term only: a new leader knows nothing of how long a
    // region was gone before it led, so it waits the whole grace.
    let mut grace = RegionGrace::new(config.region_grace);
    let mut grace_ends_at: Option<Instant> = None;
    // The newest view revision whose trace was used: a resync or a retry of the same view must
    // not put later writes into an old change's trace.
    let mut traced_revision = 0;
    views.mark_changed();
    loop {
        tokio::select! {
            changed = views.changed() => {
                if changed.is_err() {
                    // The cache is gone (the process is stopping): nothing more to schedule,
                    // and the election key is released by the caller.
                    std::future::pending::<()>().await;
                }
            }
            _ = resync.tick() => {}
            _ = sleep_until_some(retry_at) => {}
            _ = sleep_until_some(grace_ends_at) => {}
        }
        let view = views.borrow_and_update().clone();
        if !view.loaded {
            continue;
        }
        // Every pass looks at everything, so a pending retry is covered by this one; it is
        // armed again below only if this pass needs it.
        retry_at = None;
        let trace = view
            .trace
            .as_deref()
            .filter(|_| view.revision > traced_revision);
        traced_revision = traced_revision.max(view.revision);
        let (regions, next_expiry) = grace.regions(&view, &own, Instant::now());
        grace_ends_at = next_expiry;
        let pass = Reconcile {
            store,
            config,
            elected_version,
            counters,
        };
        match pass.run(&view, &regions, trace, &mut own).await {
            Ok(Ok(Pass::Done)) => backoff.reset(),
            Ok(Ok(Pass::Conflict)) => retry_at = Some(Instant::now() + config.conflict_retry),
            Ok(Err(Fenced)) => {
                let fenced = counters.fenced_writes.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(
                    fenced_writes = fenced,
                    elected_version,
                    "scheduler write fenced: no longer leader"
                );
                return Fenced;
            }
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(%error, ?delay, "cannot write placements; retrying");
                retry_at = Some(Instant::now() + delay);
            }
        }
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// What a reconcile pass works with.
struct Reconcile<'a> {
    store: &'a Store,
    config: &'a SchedulerConfig,
    elected_version: i64,
    counters: &'a SchedulerCounters,
}

impl Reconcile<'_> {
    /// One pass: plan, then write in fenced transactions of up to [`MAX_FENCED_WRITES`]. A
    /// batch that conflicts is retried one write at a time, so one stale placement does not
    /// hold back the others. With `trace` (the view's traced change, tracing on), the writes
    /// are a `meridian.schedule` span of that trace.
    async fn run(
        &self,
        view: &SchedulerView,
        regions: &BTreeSet<String>,
        trace: Option<&pb::ChangeTrace>,
        own: &mut BTreeMap<FunctionKey, OwnWrite>,
    ) -> Result<Result<Pass, Fenced>, StoreError> {
        own.retain(|_, write| write.revision > view.revision);
        let writes = plan(view, regions, own, &self.config.replica_id);
        let span = match (&self.config.tracing, trace) {
            (Some(tracing), Some(trace)) if !writes.is_empty() => {
                Some(tracing.schedule(trace, writes.len()))
            }
            _ => None,
        };
        let record = span.as_ref().and_then(ChangeSpan::record);
        let result = self.write(&writes, record.as_ref(), own).await;
        if let Some(span) = span {
            match &result {
                Ok(Ok((pass, revision))) => span.committed(pass.name(), *revision),
                Ok(Err(Fenced)) => span.committed("fenced", 0),
                Err(error) => span.failed(&tonic::Status::unavailable(error.to_string())),
            }
        }
        result.map(|fenced| fenced.map(|(pass, _)| pass))
    }

    /// Writes `writes`; returns how the pass ended and the revision of its last write (0 if
    /// none landed).
    async fn write(
        &self,
        writes: &[PlacementWrite],
        trace: Option<&pb::ChangeTrace>,
        own: &mut BTreeMap<FunctionKey, OwnWrite>,
    ) -> Result<Result<(Pass, i64), Fenced>, StoreError> {
        let (store, elected_version, counters) = (self.store, self.elected_version, self.counters);
        let mut pass = Pass::Done;
        let mut last_revision = 0;
        for batch in writes.chunks(MAX_FENCED_WRITES) {
            match store
                .write_placements_traced(elected_version, batch, trace)
                .await?
            {
                FencedWrite::Written { revision } => {
                    last_revision = revision;
                    record(batch, revision, own, counters);
                }
                FencedWrite::Fenced => return Ok(Err(Fenced)),
                FencedWrite::Conflict => {
                    for write in batch {
                        let single = std::slice::from_ref(write);
                        match store
                            .write_placements_traced(elected_version, single, trace)
                            .await?
                        {
                            FencedWrite::Written { revision } => {
                                last_revision = revision;
                                record(single, revision, own, counters);
                            }
                            FencedWrite::Fenced => return Ok(Err(Fenced)),
                            FencedWrite::Conflict => {
                                counters.conflicts.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(function = %write.function, "placement changed since it was read; retrying soon");
                                pass = Pass::Conflict;
                            }
                        }
                    }
                }
            }
        }
        Ok(Ok((pass, last_revision)))
    }
}

fn record(
    writes: &[PlacementWrite],
    revision: i64,
    own: &mut BTreeMap<FunctionKey, OwnWrite>,
    counters: &SchedulerCounters,
) {
    for write in writes {
        match &write.placement {
            Some(placement) => {
                counters.placements_written.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    function = %write.function,
                    regions = ?placement.regions.iter().map(|r| r.region.as_str()).collect::<Vec<_>>(),
                    problems = placement.problems.len(),
                    "placement written"
                );
            }
            None => {
                counters.placements_deleted.fetch_add(1, Ordering::Relaxed);
                tracing::info!(function = %write.function, "placement deleted");
            }
        }
        own.insert(
            write.function.clone(),
            OwnWrite {
                revision,
                placement: write.placement.clone(),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::FunctionSpec;

    fn process(
        name: &str,
        placement: Option<pb::Placement>,
        scaling: pb::Scaling,
    ) -> CachedFunction {
        let spec = pb::FunctionSpec {
            name: name.into(),
            runtime: Some(pb::function_spec::Runtime::Process(pb::ProcessRuntime {
                command: "/bin/true".into(),
                ..Default::default()
            })),
            placement,
            scaling: Some(scaling),
            ..Default::default()
        };
        CachedFunction {
            spec: FunctionSpec::try_from(spec).expect("valid"),
            version: 42,
        }
    }

    fn external(name: &str) -> CachedFunction {
        let spec = pb::FunctionSpec {
            name: name.into(),
            runtime: Some(pb::function_spec::Runtime::External(pb::ExternalRuntime {
                regions: vec![pb::ExternalRegion {
                    region: "us-east".into(),
                    urls: vec!["http://127.0.1.1:9000".into()],
                }],
            })),
            ..Default::default()
        };
        CachedFunction {
            spec: FunctionSpec::try_from(spec).expect("valid"),
            version: 7,
        }
    }

    fn region(name: &str, min: Option<u32>, max: Option<u32>) -> pb::RegionPlacement {
        pb::RegionPlacement {
            region: name.into(),
            min_instances: min,
            max_instances: max,
        }
    }

    fn regions(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|r| (*r).to_owned()).collect()
    }

    fn key(name: &str) -> FunctionKey {
        FunctionKey {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn bounds(placement: &pb::FunctionPlacement) -> Vec<(&str, u32, u32)> {
        placement
            .regions
            .iter()
            .map(|r| (r.region.as_str(), r.min_instances, r.max_instances))
            .collect()
    }

    #[test]
    fn all_regions_places_in_every_region_with_an_agent() {
        let f = process(
            "hello",
            None,
            pb::Scaling {
                min_instances: Some(1),
                max_instances: Some(4),
                ..Default::default()
            },
        );
        let placement =
            compute_placement(&f, &regions(&["us-east", "eu-west"]), "cp-1").expect("process");
        assert_eq!(
            bounds(&placement),
            vec![("eu-west", 1, 4), ("us-east", 1, 4)]
        );
        assert!(placement.problems.is_empty());
        assert_eq!(placement.leader, "cp-1");
        assert_eq!(placement.function_version, 42);
        assert_eq!(
            (placement.namespace.as_str(), placement.name.as_str()),
            ("default", "hello")
        );

        let nowhere = compute_placement(&f, &BTreeSet::new(), "cp-1").expect("process");
        assert!(nowhere.regions.is_empty() && nowhere.problems.is_empty());
    }

    #[test]
    fn explicit_regions_take_their_bounds_else_the_function_bounds() {
        let f = process(
            "hello",
            Some(pb::Placement {
                all_regions: false,
                regions: vec![
                    region("us-east", Some(0), Some(3)),
                    region("eu-west", None, None),
                ],
            }),
            pb::Scaling {
                min_instances: Some(2),
                max_instances: Some(8),
                ..Default::default()
            },
        );
        let placement = compute_placement(&f, &regions(&["us-east", "eu-west", "ap-south"]), "cp")
            .expect("process");
        // Declaration order; ap-south is not asked for.
        assert_eq!(
            bounds(&placement),
            vec![("us-east", 0, 3), ("eu-west", 2, 8)]
        );
    }

    #[test]
    fn regions_without_agents_become_problems() {
        let f = process(
            "hello",
            Some(pb::Placement {
                all_regions: false,
                regions: vec![
                    region("us-east", Some(1), None),
                    region("ap-south", Some(2), None),
                    region("eu-west", Some(0), None),
                ],
            }),
            pb::Scaling::default(),
        );
        let placement = compute_placement(&f, &regions(&["us-east"]), "cp").expect("process");
        assert_eq!(bounds(&placement), vec![("us-east", 1, 10)]);
        let problems: Vec<(&str, &str)> = placement
            .problems
            .iter()
            .map(|p| (p.region.as_str(), p.reason.as_str()))
            .collect();
        assert_eq!(
            problems,
            vec![
                (
                    "ap-south",
                    "minInstances 2 but region ap-south has no agent"
                ),
                ("eu-west", "no agent in region eu-west"),
            ]
        );
    }

    #[test]
    fn external_functions_have_no_placement() {
        assert_eq!(
            compute_placement(&external("ext"), &regions(&["us-east"]), "cp"),
            None
        );
    }

    fn view(functions: Vec<CachedFunction>, agents: &[&str], revision: i64) -> SchedulerView {
        SchedulerView {
            loaded: true,
            revision,
            functions: functions
                .into_iter()
                .map(|f| (f.spec.key.clone(), Arc::new(f)))
                .collect(),
            agent_regions: regions(agents),
            placements: BTreeMap::new(),
            trace: None,
        }
    }

    fn stored(placement: pb::FunctionPlacement, version: i64) -> Arc<StoredPlacement> {
        Arc::new(StoredPlacement { placement, version })
    }

    #[test]
    fn plan_writes_only_changes_and_deletes_orphans() {
        let hello = process("hello", None, pb::Scaling::default());
        let mut view = view(vec![hello.clone(), external("ext")], &["us-east"], 100);

        // Nothing stored: one put, none for the external function.
        let writes = plan(&view, &view.agent_regions, &BTreeMap::new(), "cp-1");
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].function, key("hello"));
        assert_eq!(writes[0].expected_version, 0);

        // Stored by another leader with the same content: nothing to do.
        let mut by_other = compute_placement(&hello, &view.agent_regions, "cp-0").expect("process");
        view.placements
            .insert(key("hello"), stored(by_other.clone(), 90));
        assert!(plan(&view, &view.agent_regions, &BTreeMap::new(), "cp-1").is_empty());

        // Content differs: rewritten, guarded by the stored mod revision.
        by_other.regions.clear();
        view.placements.insert(key("hello"), stored(by_other, 90));
        let writes = plan(&view, &view.agent_regions, &BTreeMap::new(), "cp-1");
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].expected_version, 90);
        assert_eq!(
            writes[0].placement.as_ref().map(|p| p.leader.as_str()),
            Some("cp-1")
        );

        // Placements of deleted and external functions are deleted.
        view.placements
            .insert(key("gone"), stored(pb::FunctionPlacement::default(), 80));
        view.placements
            .insert(key("ext"), stored(pb::FunctionPlacement::default(), 81));
        let writes = plan(&view, &view.agent_regions, &BTreeMap::new(), "cp-1");
        let deletes: Vec<(&str, i64)> = writes
            .iter()
            .filter(|w| w.placement.is_none())
            .map(|w| (w.function.name.as_str(), w.expected_version))
            .collect();
        assert_eq!(deletes, vec![("ext", 81), ("gone", 80)]);
    }

    #[test]
    fn plan_trusts_own_writes_until_the_view_catches_up() {
        let hello = process("hello", None, pb::Scaling::default());
        let view = view(vec![hello.clone()], &["us-east"], 100);
        let written = compute_placement(&hello, &view.agent_regions, "cp-1");
        let mut own = BTreeMap::from([(
            key("hello"),
            OwnWrite {
                revision: 101,
                placement: written,
            },
        )]);
        // The view (revision 100) does not show our write at 101 yet: nothing to do.
        assert!(plan(&view, &view.agent_regions, &own, "cp-1").is_empty());

        // Our delete of a function's placement that the view still shows.
        own.insert(
            key("gone"),
            OwnWrite {
                revision: 102,
                placement: None,
            },
        );
        assert!(plan(&view, &view.agent_regions, &own, "cp-1").is_empty());

        // A put of ours for a function deleted since: deleted, guarded by our revision.
        let mut later = view.clone();
        later.functions.clear();
        let writes = plan(&later, &later.agent_regions, &own, "cp-1");
        assert_eq!(writes.len(), 1);
        assert_eq!(
            (writes[0].function.name.as_str(), writes[0].expected_version),
            ("hello", 101)
        );
        assert!(writes[0].placement.is_none());
    }

    #[test]
    fn agents_joining_and_leaving_change_the_placement() {
        let hello = process("hello", None, pb::Scaling::default());
        let one = compute_placement(&hello, &regions(&["us-east"]), "cp").expect("process");
        let two =
            compute_placement(&hello, &regions(&["us-east", "eu-west"]), "cp").expect("process");
        assert!(!same_placement(&one, &two));
        let mut relabeled = one.clone();
        relabeled.leader = "other".into();
        assert!(same_placement(&one, &relabeled));
    }

    #[test]
    fn a_placed_region_without_agents_is_kept_for_the_grace_only() {
        let hello = process("hello", None, pb::Scaling::default());
        let grace = Duration::from_secs(60);
        let start = Instant::now();
        // A recovered control plane: the placement names both regions, no agent registered.
        let mut view = view(vec![hello.clone()], &[], 100);
        let both =
            compute_placement(&hello, &regions(&["eu-west", "us-east"]), "cp-0").expect("process");
        view.placements.insert(key("hello"), stored(both, 90));
        let own = BTreeMap::new();
        let mut kept = RegionGrace::new(grace);

        let (placed, next) = kept.regions(&view, &own, start);
        assert_eq!(placed, regions(&["eu-west", "us-east"]));
        assert_eq!(next, Some(start + grace));
        assert!(
            plan(&view, &placed, &own, "cp-1").is_empty(),
            "nothing is removed within the grace"
        );

        // us-east's agent is back; eu-west is still gone after 59 s, then past the grace.
        view.agent_regions = regions(&["us-east"]);
        let (placed, _) = kept.regions(&view, &own, start + Duration::from_secs(59));
        assert_eq!(placed, regions(&["eu-west", "us-east"]));
        let (placed, next) = kept.regions(&view, &own, start + grace);
        assert_eq!(placed, regions(&["us-east"]));
        assert_eq!(next, None);
        let writes = plan(&view, &placed, &own, "cp-1");
        let regions_written: Vec<&str> = writes[0]
            .placement
            .as_ref()
            .map(|p| p.regions.iter().map(|r| r.region.as_str()).collect())
            .unwrap_or_default();
        assert_eq!(regions_written, vec!["us-east"]);
    }

    #[test]
    fn an_agent_that_returns_ends_the_absence_and_a_new_one_counts_afresh() {
        let hello = process("hello", None, pb::Scaling::default());
        let grace = Duration::from_secs(60);
        let start = Instant::now();
        let mut view = view(vec![hello.clone()], &["us-east"], 100);
        let placed_once =
            compute_placement(&hello, &regions(&["us-east"]), "cp-0").expect("process");
        view.placements
            .insert(key("hello"), stored(placed_once, 90));
        let own = BTreeMap::new();
        let mut kept = RegionGrace::new(grace);
        assert_eq!(kept.regions(&view, &own, start).1, None);

        // Gone at 10 s, back at 50 s, gone again at 100 s: kept until 160 s, not 70 s.
        view.agent_regions.clear();
        kept.regions(&view, &own, start + Duration::from_secs(10));
        view.agent_regions = regions(&["us-east"]);
        kept.regions(&view, &own, start + Duration::from_secs(50));
        view.agent_regions.clear();
        let (_, next) = kept.regions(&view, &own, start + Duration::from_secs(100));
        assert_eq!(next, Some(start + Duration::from_secs(160)));
        let (placed, _) = kept.regions(&view, &own, start + Duration::from_secs(159));
        assert!(placed.contains("us-east"));

        // A region never placed (no agent ever) gets no grace: its problem is reported at once.
        let view = view_with_problem(&hello);
        let (placed, next) = RegionGrace::new(grace).regions(&view, &own, start);
        assert!(placed.is_empty() && next.is_none(), "{placed:?}");
    }

    fn view_with_problem(hello: &CachedFunction) -> SchedulerView {
        let mut view = view(vec![hello.clone()], &[], 100);
        let unplaced = compute_placement(hello, &BTreeSet::new(), "cp-0").expect("process");
        view.placements.insert(key("hello"), stored(unplaced, 90));
        view
    }
}
