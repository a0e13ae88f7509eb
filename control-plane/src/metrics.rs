//! The control plane's Prometheus metrics: pushes, nacks and the propagation-latency histogram
//! (counted as they happen), and gauges read at scrape time (agents connected and their version
//! lag, each region's routing-table version, the scheduler's leadership and fenced writes).
//!
//! Propagation latency is measured per region from the moment the cache's watch delivered a
//! routing change (the etcd commit, give or take the watch's delay) to each agent's ack of a
//! table at or past that revision: Istio's "convergence time", one observation per (change,
//! agent).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::election::ElectionState;
use crate::table::Tables;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot encode metrics")]
    Encode(#[source] std::fmt::Error),
}

/// Upper bounds (seconds) of the propagation histogram's buckets: a healthy mesh converges in
/// tens of milliseconds; the long tail is agents reconnecting or a slow etcd.
pub const PROPAGATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Changes remembered per region while agents may still ack them. Bounded so that a region
/// whose agents never ack cannot grow it; an ack older than this is simply not observed.
const CHANGES_PER_REGION: usize = 1024;

/// Changes older than this are forgotten: an agent acking later is reconnecting, not
/// propagating, and would only smear the histogram.
const CHANGE_MAX_AGE: Duration = Duration::from_secs(600);

type Labels = Vec<(&'static str, String)>;

/// One connected agent, as far as the gauges care.
#[derive(Debug, Clone)]
struct AgentEntry {
    /// Which session registered it (an agent reconnecting overlaps its old session briefly).
    session: u64,
    acked: i64,
}

/// Everything the control plane counts; shared by the cache, the agent sessions and the
/// admin endpoint.
#[derive(Debug)]
pub struct Metrics {
    pushes: Family<Labels, Counter>,
    nacks: Counter,
    propagation: Family<Labels, Histogram, fn() -> Histogram>,
    /// Per region: (table version, when the watch saw the change), oldest first.
    changes: Mutex<BTreeMap<String, VecDeque<(i64, Instant)>>>,
    /// (region, agent id) -> what its session knows.
    agents: Mutex<BTreeMap<(String, String), AgentEntry>>,
    next_session: AtomicU64,
}

fn propagation_histogram() -> Histogram {
    Histogram::new(PROPAGATION_BUCKETS)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded maps stay consistent at every await-free step: a panic cannot corrupt them.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Default for Metrics {
    fn default() -> Self {
        let pushes = Family::<Labels, Counter>::default();
        // Both series exist from the start, so rate() sees the first push.
        for kind in ["full", "delta"] {
            let _ = pushes.get_or_create(&vec![("kind", kind.to_owned())]);
        }
        Self {
            pushes,
            nacks: Counter::default(),
            propagation: Family::new_with_constructor(propagation_histogram),
            changes: Mutex::new(BTreeMap::new()),
            agents: Mutex::new(BTreeMap::new()),
            next_session: AtomicU64::new(1),
        }
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The cache published `tables` for a change its watch delivered at `seen_at`: remember it
    /// for every region whose table changed (those at the tables' version).
    pub fn table_changed(&self, tables: &Tables, seen_at: Instant) {
        let mut changes = lock(&self.changes);
        for (region, table) in &tables.regions {
            if table.version != tables.version {
                continue;
            }
            let pending = changes.entry(region.clone()).or_default();
            pending.push_back((table.version, seen_at));
            while pending.len() > CHANGES_PER_REGION
                || pending
                    .front()
                    .is_some_and(|(_, at)| at.elapsed() > CHANGE_MAX_AGE)
            {
                pending.pop_front();
            }
        }
    }

    /// A table was sent to an agent (all parts of one update count once).
    pub fn pushed(&self, full: bool) {
        let kind = if full { "full" } else { "delta" };
        self.pushes
            .get_or_create(&vec![("kind", kind.to_owned())])
            .inc();
    }

    /// An agent refused a table.
    pub fn nacked(&self) {
        self.nacks.inc();
    }

    /// An agent's session started; it holds `held` (from its hello). The agent counts as
    /// connected until the returned guard is dropped.
    pub fn agent_connected(
        self: &Arc<Self>,
        region: &str,
        agent_id: &str,
        held: i64,
    ) -> AgentGuard {
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        let key = (region.to_owned(), agent_id.to_owned());
        lock(&self.agents).insert(
            key.clone(),
            AgentEntry {
                session,
                acked: held,
            },
        );
        AgentGuard {
            metrics: Arc::clone(self),
            key,
            session,
            acked: held,
        }
    }

    /// Observes, for every remembered change of the agent's region after its previous ack and
    /// at or before `version`, the time from the change to now.
    fn observe_ack(&self, region: &str, previous: i64, version: i64) {
        let now = Instant::now();
        let durations: Vec<f64> = lock(&self.changes)
            .get(region)
            .map(|pending| {
                pending
                    .iter()
                    .filter(|(v, _)| *v > previous && *v <= version)
                    .map(|(_, at)| now.saturating_duration_since(*at).as_secs_f64())
                    .collect()
            })
            .unwrap_or_default();
        if durations.is_empty() {
            return;
        }
        let histogram = self
            .propagation
            .get_or_create(&vec![("region", region.to_owned())]);
        for seconds in durations {
            histogram.observe(seconds);
        }
    }

    fn set_acked(&self, key: &(String, String), session: u64, version: i64) {
        if let Some(entry) = lock(&self.agents).get_mut(key) {
            if entry.session == session {
                entry.acked = version;
            }
        }
    }

    fn disconnected(&self, key: &(String, String), session: u64) {
        let mut agents = lock(&self.agents);
        if agents.get(key).is_some_and(|e| e.session == session) {
            agents.remove(key);
        }
    }

    fn agents_snapshot(&self) -> Vec<((String, String), AgentEntry)> {
        lock(&self.agents)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// An agent's presence in the gauges, held by its session.
#[derive(Debug)]
pub struct AgentGuard {
    metrics: Arc<Metrics>,
    key: (String, String),
    session: u64,
    /// The version the agent is known to hold.
    acked: i64,
}

impl AgentGuard {
    /// The metrics this agent is counted in.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The agent acknowledged `version` (or is known to hold it): updates its lag and observes
    /// the propagation of every change it now has.
    pub fn acked(&mut self, version: i64) {
        if version > self.acked {
            self.metrics.observe_ack(&self.key.0, self.acked, version);
        }
        self.acked = version;
        self.metrics.set_acked(&self.key, self.session, version);
    }
}

impl Drop for AgentGuard {
    fn drop(&mut self) {
        self.metrics.disconnected(&self.key, self.session);
    }
}

/// Encodes the gauges that are read at scrape time.
#[derive(Debug)]
struct StateCollector {
    metrics: Arc<Metrics>,
    tables: watch::Receiver<Arc<Tables>>,
    election: Arc<ElectionState>,
}

type FmtResult = Result<(), std::fmt::Error>;

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> FmtResult {
        let tables = Arc::clone(&self.tables.borrow());
        let agents = self.metrics.agents_snapshot();

        let connected = encoder.encode_descriptor(
            "meridian_agents_connected",
            "Agents with an open stream to this replica.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::try_from(agents.len()).unwrap_or(i64::MAX)).encode(connected)?;
        {
            let mut family = encoder.encode_descriptor(
                "meridian_agent_version_lag",
                "Newest routing-table version of the agent's region minus the version it acked.",
                None,
                MetricType::Gauge,
            )?;
            for ((region, agent), entry) in &agents {
                let newest = tables.regions.get(region).map_or(0, |t| t.version);
                let lag = newest.saturating_sub(entry.acked).max(0);
                let labels = [("region", region.as_str()), ("agent", agent.as_str())];
                ConstGauge::new(lag).encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "meridian_routing_table_version",
                "Version (etcd revision) of the newest routing table of each region.",
                None,
                MetricType::Gauge,
            )?;
            for (region, table) in &tables.regions {
                let labels = [("region", region.as_str())];
                ConstGauge::new(table.version).encode(family.encode_family(&labels)?)?;
            }
        }
        let leader = encoder.encode_descriptor(
            "meridian_scheduler_leader",
            "1 while this replica is the elected scheduler, else 0.",
            None,
            MetricType::Gauge,
        )?;
        let leading = self.election.leading().borrow().is_some();
        ConstGauge::new(i64::from(leading)).encode(leader)?;
        let fenced = encoder.encode_descriptor(
            "meridian_scheduler_fenced_writes",
            "Scheduler writes refused because this replica no longer led.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.election.fenced_writes()).encode(fenced)?;
        Ok(())
    }
}

/// Encodes the count of etcd records the cache skipped, read at scrape time.
#[derive(Debug)]
struct SkippedCollector {
    skipped: watch::Receiver<Arc<Vec<meridian_proto::v1::SkippedRecord>>>,
}

impl Collector for SkippedCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> FmtResult {
        let count = self.skipped.borrow().len();
        let gauge = encoder.encode_descriptor(
            "meridian_etcd_skipped_records",
            "Records in etcd this replica skipped because it cannot read them (meridianctl status lists their keys).",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::try_from(count).unwrap_or(i64::MAX)).encode(gauge)
    }
}

/// Adds `meridian_etcd_skipped_records` to `registry`.
pub fn register_skipped(
    registry: &mut Registry,
    skipped: watch::Receiver<Arc<Vec<meridian_proto::v1::SkippedRecord>>>,
) {
    registry.register_collector(Box::new(SkippedCollector { skipped }));
}

/// A registry exporting `metrics` and the state behind the gauges.
pub fn registry(
    metrics: Arc<Metrics>,
    tables: watch::Receiver<Arc<Tables>>,
    election: Arc<ElectionState>,
) -> Registry {
    let mut registry = Registry::default();
    registry.register(
        "meridian_pushes",
        "Routing-table updates sent to agents, by kind (full or delta)",
        metrics.pushes.clone(),
    );
    registry.register(
        "meridian_nacks",
        "Routing tables agents refused",
        metrics.nacks.clone(),
    );
    registry.register(
        "meridian_propagation_seconds",
        "Time from the watch seeing a routing change to an agent acking a table that has it, by region",
        metrics.propagation.clone(),
    );
    registry.register_collector(Box::new(StateCollector {
        metrics,
        tables,
        election,
    }));
    registry
}

/// The Prometheus text exposition (format 0.0.4) of `registry`.
pub fn render(registry: &Registry) -> Result<String, MetricsError> {
    let mut out = String::with_capacity(4096);
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
        .map_err(MetricsError::Encode)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::RegionTable;

    fn tables(version: i64, regions: &[(&str, i64)]) -> Tables {
        Tables {
            version,
            regions: regions
                .iter()
                .map(|(r, v)| {
                    (
                        (*r).to_owned(),
                        Arc::new(RegionTable::new(*v, (*r).to_owned(), BTreeMap::new())),
                    )
                })
                .collect(),
            seen_at: None,
        }
    }

    fn render_all(metrics: &Arc<Metrics>, tables: Tables) -> String {
        let (_tx, rx) = watch::channel(Arc::new(tables));
        let registry = registry(Arc::clone(metrics), rx, ElectionState::new());
        render(&registry).unwrap()
    }

    #[test]
    fn counts_pushes_nacks_and_agents() {
        let metrics = Metrics::new();
        metrics.pushed(true);
        metrics.pushed(false);
        metrics.pushed(false);
        metrics.nacked();
        let mut east = metrics.agent_connected("us-east", "us-east-1", 0);
        let _west = metrics.agent_connected("eu-west", "eu-west-1", 7);
        east.acked(5);
        let text = render_all(&metrics, tables(9, &[("us-east", 9), ("eu-west", 7)]));
        assert!(
            text.contains(r#"meridian_pushes_total{kind="full"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"meridian_pushes_total{kind="delta"} 2"#),
            "{text}"
        );
        assert!(text.contains("meridian_nacks_total 1"), "{text}");
        assert!(text.contains("meridian_agents_connected 2"), "{text}");
        assert!(
            text.contains(r#"meridian_agent_version_lag{region="us-east",agent="us-east-1"} 4"#),
            "{text}"
        );
        assert!(
            text.contains(r#"meridian_agent_version_lag{region="eu-west",agent="eu-west-1"} 0"#),
            "{text}"
        );
        assert!(text.contains(r#"meridian_routing_table_version{region="us-east"} 9"#));
        assert!(text.contains("meridian_scheduler_leader 0"), "{text}");
        assert!(
            text.contains("meridian_scheduler_fenced_writes_total 0"),
            "{text}"
        );
        drop(east);
        let text = render_all(&metrics, tables(9, &[]));
        assert!(text.contains("meridian_agents_connected 1"), "{text}");
    }

    #[test]
    fn a_reconnect_does_not_lose_the_new_session() {
        let metrics = Metrics::new();
        let old = metrics.agent_connected("us-east", "a", 0);
        let _new = metrics.agent_connected("us-east", "a", 3);
        drop(old);
        let text = render_all(&metrics, tables(3, &[("us-east", 3)]));
        assert!(text.contains("meridian_agents_connected 1"), "{text}");
    }

    #[test]
    fn propagation_observes_each_change_once_per_agent() {
        let metrics = Metrics::new();
        let seen = Instant::now();
        metrics.table_changed(&tables(10, &[("us-east", 10), ("eu-west", 4)]), seen);
        metrics.table_changed(&tables(12, &[("us-east", 12), ("eu-west", 12)]), seen);
        let mut agent = metrics.agent_connected("us-east", "a", 4);
        // Acks 12 at once: both changes (10 and 12) are observed.
        agent.acked(12);
        // The same version again observes nothing more.
        agent.acked(12);
        let mut west = metrics.agent_connected("eu-west", "b", 4);
        west.acked(12);
        let text = render_all(&metrics, tables(12, &[]));
        assert!(
            text.contains(r#"meridian_propagation_seconds_count{region="us-east"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"meridian_propagation_seconds_count{region="eu-west"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"meridian_propagation_seconds_bucket{le="+Inf",region="us-east"} 2"#)
                || text.contains(
                    r#"meridian_propagation_seconds_bucket{region="us-east",le="+Inf"} 2"#
                ),
            "{text}"
        );
    }

    #[test]
    fn remembered_changes_are_bounded() {
        let metrics = Metrics::new();
        let seen = Instant::now();
        for v in 1..=(CHANGES_PER_REGION as i64 + 10) {
            metrics.table_changed(&tables(v, &[("r", v)]), seen);
        }
        assert_eq!(lock(&metrics.changes)["r"].len(), CHANGES_PER_REGION);
    }
}
