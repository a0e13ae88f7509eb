//! The agent's Prometheus metrics. Most are read at scrape time from the channels the agent
//! already keeps (the accepted table, the autoscaler's status, the runtime's snapshot); two small
//! tasks record what those channels forget: when the held table was accepted, and each
//! instance's cold start (spawn to ready).

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::autoscaler::ScaleStatus;
use crate::local_api::CurrentTable;
use crate::runtime::{InstanceState, Snapshot};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot encode metrics")]
    Encode(#[source] std::fmt::Error),
}

/// Upper bounds (seconds) of the cold-start histogram's buckets: from a static binary that
/// binds at once to a runtime that loads for a minute.
pub const COLD_START_BUCKETS: [f64; 13] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// What the agent records itself; the rest is read from its channels at scrape time.
#[derive(Debug)]
pub struct AgentMetrics {
    region: String,
    /// Set while a stream to a control plane is open (see `AgentState::with_connected`).
    connected: Arc<AtomicBool>,
    /// Version of the held table and when it was accepted (or persisted, for a table loaded
    /// from disk at start).
    table: Mutex<Option<(i64, SystemTime)>>,
    cold_starts: Histogram,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain values behind the lock: a panic elsewhere cannot leave them half-written.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl AgentMetrics {
    pub fn new(region: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            region: region.into(),
            connected: Arc::new(AtomicBool::new(false)),
            table: Mutex::new(None),
            cold_starts: Histogram::new(COLD_START_BUCKETS),
        })
    }

    /// The flag the control-plane session keeps up while connected.
    pub fn connected_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.connected)
    }

    /// Records that `version` is held since `at`, unless that version is already recorded.
    pub fn table_accepted(&self, version: i64, at: SystemTime) {
        let mut table = lock(&self.table);
        if table.is_none_or(|(held, _)| held != version) {
            *table = Some((version, at));
        }
    }

    /// Observes one instance's time from spawn to ready.
    pub fn cold_start(&self, took: Duration) {
        self.cold_starts.observe(took.as_secs_f64());
    }

    fn table(&self) -> Option<(i64, SystemTime)> {
        *lock(&self.table)
    }
}

/// When the persisted table at `path` was written (what a table loaded at start is as old as).
pub fn persisted_at(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Records each newly accepted table's time until the publisher is dropped. A table held at
/// start is recorded by the caller (with its file's time), so the current value is skipped.
pub async fn track_tables(metrics: Arc<AgentMetrics>, mut accepted: watch::Receiver<CurrentTable>) {
    while accepted.changed().await.is_ok() {
        let version = accepted.borrow_and_update().as_ref().map(|t| t.version);
        if let Some(version) = version {
            metrics.table_accepted(version, SystemTime::now());
        }
    }
}

/// Observes the cold start of every instance seen READY for the first time, until the runtime
/// stops publishing.
pub async fn track_cold_starts(
    metrics: Arc<AgentMetrics>,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
) {
    let mut seen = HashSet::new();
    loop {
        let snapshot = Arc::clone(&snapshots.borrow_and_update());
        seen = observe_cold_starts(&metrics, &snapshot, &seen);
        if snapshots.changed().await.is_err() {
            return;
        }
    }
}

/// Observes instances ready in `snapshot` and not in `seen`, except adopted ones (their start
/// was another agent's, perhaps hours ago); returns the ready ids now (so the set never
/// outgrows the live instances).
fn observe_cold_starts(
    metrics: &AgentMetrics,
    snapshot: &Snapshot,
    seen: &HashSet<String>,
) -> HashSet<String> {
    let mut ready = HashSet::new();
    for function in snapshot.functions.values() {
        for instance in &function.instances {
            let Some(at) = instance.ready else { continue };
            if !instance.adopted && !seen.contains(&instance.id) {
                if let Ok(took) = at.duration_since(instance.started) {
                    metrics.cold_start(took);
                }
            }
            ready.insert(instance.id.clone());
        }
    }
    ready
}

/// Encodes the agent's metrics at each scrape.
#[derive(Debug)]
struct AgentCollector {
    metrics: Arc<AgentMetrics>,
    scale: watch::Receiver<ScaleStatus>,
    runtime: watch::Receiver<Arc<Snapshot>>,
}

type FmtResult = Result<(), std::fmt::Error>;

/// A per-function autoscaler gauge: name, help, and its values by `window` label ("": none).
type ScaleGauge = (
    &'static str,
    &'static str,
    fn(&meridian_proto::v1::RegionScale) -> Vec<(&'static str, f64)>,
);

fn gauge_f64(value: f64, encoder: prometheus_client::encoding::MetricEncoder<'_>) -> FmtResult {
    ConstGauge::new(value).encode(encoder)
}

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> FmtResult {
        let region = self.metrics.region.as_str();
        let table = self.metrics.table();
        let version = encoder.encode_descriptor(
            "meridian_agent_table_version",
            "Version (etcd revision) of the routing table this agent holds; 0 when none.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(table.map_or(0, |(v, _)| v)).encode(version)?;
        {
            let age = encoder.encode_descriptor(
                "meridian_agent_table_age_seconds",
                "Seconds since the held routing table was accepted (absent while none is held).",
                None,
                MetricType::Gauge,
            )?;
            if let Some((_, at)) = table {
                let seconds = SystemTime::now()
                    .duration_since(at)
                    .unwrap_or_default()
                    .as_secs_f64();
                gauge_f64(seconds, age)?;
            }
        }
        let connected = encoder.encode_descriptor(
            "meridian_agent_connected",
            "1 while a stream to a control-plane replica is open, else 0.",
            None,
            MetricType::Gauge,
        )?;
        let up = self.metrics.connected.load(Ordering::Relaxed);
        ConstGauge::new(i64::from(up)).encode(connected)?;

        let scale = Arc::clone(&self.scale.borrow());
        let per_function: [ScaleGauge; 3] = [
            (
                "meridian_autoscaler_desired_instances",
                "Instances the autoscaler wants, by function.",
                |s| vec![("", f64::from(s.desired))],
            ),
            (
                "meridian_autoscaler_ready_instances",
                "Instances ready to serve, by function.",
                |s| vec![("", f64::from(s.ready))],
            ),
            (
                "meridian_autoscaler_concurrency",
                "Average in-flight requests over the stable (60 s) and panic (6 s) windows, by function.",
                |s| vec![("stable", s.stable_concurrency), ("panic", s.panic_concurrency)],
            ),
        ];
        for (name, help, values) in per_function {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for function in scale.iter() {
                let Some(state) = &function.scale else {
                    continue;
                };
                for (window, value) in values(state) {
                    let mut labels = vec![
                        ("namespace", function.namespace.as_str()),
                        ("function", function.name.as_str()),
                        ("region", region),
                    ];
                    if !window.is_empty() {
                        labels.push(("window", window));
                    }
                    gauge_f64(value, family.encode_family(&labels)?)?;
                }
            }
        }
        {
            let snapshot = Arc::clone(&self.runtime.borrow());
            let mut family = encoder.encode_descriptor(
                "meridian_instance_restarts",
                "Unexpected instance exits since the agent started running the function.",
                None,
                MetricType::Counter,
            )?;
            for (key, function) in &snapshot.functions {
                let labels = [
                    ("namespace", key.namespace.as_str()),
                    ("function", key.name.as_str()),
                    ("region", region),
                ];
                ConstCounter::new(u64::from(function.restarts))
                    .encode(family.encode_family(&labels)?)?;
            }
            let mut family = encoder.encode_descriptor(
                "meridian_instances",
                "Live instances by function and state (starting, ready, draining).",
                None,
                MetricType::Gauge,
            )?;
            for (key, function) in &snapshot.functions {
                for state in [
                    InstanceState::Starting,
                    InstanceState::Ready,
                    InstanceState::Draining,
                ] {
                    let count = function
                        .instances
                        .iter()
                        .filter(|i| i.state == state)
                        .count();
                    let labels = [
                        ("namespace", key.namespace.as_str()),
                        ("function", key.name.as_str()),
                        ("region", region),
                        ("state", state_label(state)),
                    ];
                    ConstGauge::new(i64::try_from(count).unwrap_or(i64::MAX))
                        .encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

fn state_label(state: InstanceState) -> &'static str {
    match state {
        InstanceState::Starting => "starting",
        InstanceState::Ready => "ready",
        InstanceState::Draining => "draining",
    }
}

/// A registry exporting the agent's metrics.
pub fn registry(
    metrics: Arc<AgentMetrics>,
    scale: watch::Receiver<ScaleStatus>,
    runtime: watch::Receiver<Arc<Snapshot>>,
) -> Registry {
    let mut registry = Registry::default();
    registry.register(
        "meridian_instance_cold_start_seconds",
        "Time from spawning an instance to its first successful readiness check",
        metrics.cold_starts.clone(),
    );
    registry.register_collector(Box::new(AgentCollector {
        metrics,
        scale,
        runtime,
    }));
    registry
}

/// The Prometheus text exposition (format 0.0.4) of `registry`.
pub fn render(registry: &Registry) -> Result<String, MetricsError> {
    let mut out = String::with_capacity(2048);
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
        .map_err(MetricsError::Encode)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{FunctionKey, FunctionRuntime, InstanceInfo};

    fn instance(id: &str, started: SystemTime, ready_after: Option<Duration>) -> InstanceInfo {
        InstanceInfo {
            id: id.to_owned(),
            address: "127.0.0.1:9000".parse().unwrap(),
            state: if ready_after.is_some() {
                InstanceState::Ready
            } else {
                InstanceState::Starting
            },
            pid: 1,
            started,
            ready: ready_after.map(|d| started + d),
            restarts: 0,
            adopted: false,
        }
    }

    fn snapshot(instances: Vec<InstanceInfo>) -> Snapshot {
        let mut snapshot = Snapshot::default();
        snapshot.functions.insert(
            FunctionKey::new("default", "hello"),
            FunctionRuntime {
                instances,
                ..Default::default()
            },
        );
        snapshot
    }

    fn cold_start_count(metrics: &AgentMetrics) -> String {
        let registry = {
            let mut registry = Registry::default();
            registry.register("c", "c", metrics.cold_starts.clone());
            registry
        };
        let text = render(&registry).unwrap();
        text.lines()
            .find(|l| l.starts_with("c_count"))
            .unwrap()
            .to_owned()
    }

    #[test]
    fn each_instance_cold_start_is_observed_once() {
        let metrics = AgentMetrics::new("us-east");
        let t0 = SystemTime::now();
        let seen = observe_cold_starts(
            &metrics,
            &snapshot(vec![instance("a", t0, None)]),
            &HashSet::new(),
        );
        assert!(seen.is_empty());
        let seen = observe_cold_starts(
            &metrics,
            &snapshot(vec![
                instance("a", t0, Some(Duration::from_millis(40))),
                instance("b", t0, None),
            ]),
            &seen,
        );
        assert_eq!(cold_start_count(&metrics), "c_count 1");
        // Still ready in the next snapshot: not observed again.
        let seen = observe_cold_starts(
            &metrics,
            &snapshot(vec![
                instance("a", t0, Some(Duration::from_millis(40))),
                instance("b", t0, Some(Duration::from_millis(90))),
            ]),
            &seen,
        );
        assert_eq!(cold_start_count(&metrics), "c_count 2");
        assert_eq!(seen.len(), 2);
        // An adopted instance, ready again an hour after its start, is no cold start.
        let adopted = InstanceInfo {
            adopted: true,
            ..instance(
                "c",
                t0 - Duration::from_secs(3600),
                Some(Duration::from_secs(3600)),
            )
        };
        let seen = observe_cold_starts(
            &metrics,
            &snapshot(vec![
                instance("a", t0, Some(Duration::from_millis(40))),
                instance("b", t0, Some(Duration::from_millis(90))),
                adopted,
            ]),
            &seen,
        );
        assert_eq!(cold_start_count(&metrics), "c_count 2");
        assert_eq!(seen.len(), 3);
        // Gone instances leave the set.
        let seen = observe_cold_starts(&metrics, &snapshot(Vec::new()), &seen);
        assert!(seen.is_empty());
    }

    #[test]
    fn the_same_version_keeps_its_acceptance_time() {
        let metrics = AgentMetrics::new("us-east");
        let early = SystemTime::now() - Duration::from_secs(60);
        metrics.table_accepted(5, early);
        metrics.table_accepted(5, SystemTime::now());
        assert_eq!(metrics.table(), Some((5, early)));
        let later = SystemTime::now();
        metrics.table_accepted(6, later);
        assert_eq!(metrics.table(), Some((6, later)));
    }
}
