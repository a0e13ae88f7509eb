//! Request statistics kept in plain atomics on the request path (prometheus-client's families and
//! histograms take locks and allocate label sets per update), exported through a
//! prometheus-client `Collector` at scrape time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::activator::HoldStats;
use crate::errors::Reason;
use crate::load::{FunctionLoad, SamplerWake};
use crate::routes::RoutingState;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot encode metrics")]
    Encode(#[source] std::fmt::Error),
}

/// Distinct status codes counted per (function, tier); further codes go to `other`.
const STATUS_SLOTS: usize = 8;

/// Response counts by status code, without a lock: a handful of slots claimed by CAS.
#[derive(Debug, Default)]
pub struct StatusCounts {
    codes: [AtomicU16; STATUS_SLOTS],
    counts: [AtomicU64; STATUS_SLOTS],
    other: AtomicU64,
}

impl StatusCounts {
    pub fn record(&self, status: u16) {
        for (code, count) in self.codes.iter().zip(&self.counts) {
            let current = code.load(Ordering::Acquire);
            if current == status {
                count.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if current == 0 {
                match code.compare_exchange(0, status, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => {
                        count.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Err(winner) if winner == status => {
                        count.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Err(_) => {}
                }
            }
        }
        self.other.fetch_add(1, Ordering::Relaxed);
    }

    /// (status label, count) pairs with a non-zero count.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .codes
            .iter()
            .zip(&self.counts)
            .filter_map(|(code, count)| {
                let code = code.load(Ordering::Acquire);
                let count = count.load(Ordering::Relaxed);
                (code != 0 && count != 0).then(|| (code.to_string(), count))
            })
            .collect();
        let other = self.other.load(Ordering::Relaxed);
        if other != 0 {
            out.push(("other".to_owned(), other));
        }
        out.sort();
        out
    }

    pub fn total(&self) -> u64 {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum::<u64>()
            + self.other.load(Ordering::Relaxed)
    }
}

/// Upper bounds (seconds) of the latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A fixed-bucket histogram of atomics (per-bucket counts; made cumulative when encoded).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let index = LATENCY_BUCKETS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        if let Some(bucket) = self.buckets.get(index) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// (sum in seconds, count, per-bucket (upper bound, count)).
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut buckets = Vec::with_capacity(self.buckets.len());
        let mut count = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            let n = bucket.load(Ordering::Relaxed);
            count += n;
            let bound = LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY);
            buckets.push((bound, n));
        }
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, count, buckets)
    }
}

/// Counts of one tier of one function.
#[derive(Debug)]
pub struct TierStats {
    pub region: String,
    pub responses: StatusCounts,
}

/// Everything counted for one function; survives table swaps (see [`StatsRegistry`]).
#[derive(Debug)]
pub struct FunctionStats {
    pub namespace: String,
    pub name: String,
    /// The `function` label: how the outbound listener addresses it (`name` in the default
    /// namespace, else `name.namespace`).
    pub label: String,
    /// Responses that never reached a tier (no endpoint, all ejected, ...).
    pub untiered: StatusCounts,
    pub latency: LatencyHistogram,
    pub retries: AtomicU64,
    /// What the load reports say about the function (process functions).
    pub load: FunctionLoad,
    /// Holds and activations (process functions).
    pub hold: HoldStats,
    tiers: Mutex<HashMap<String, Arc<TierStats>>>,
}

impl FunctionStats {
    pub fn new(namespace: &str, name: &str, label: String) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            label,
            untiered: StatusCounts::default(),
            latency: LatencyHistogram::default(),
            retries: AtomicU64::new(0),
            load: FunctionLoad::default(),
            hold: HoldStats::default(),
            tiers: Mutex::new(HashMap::new()),
        }
    }

    /// The counters of the tier serving `region` (created on first use; compile time only).
    pub fn tier(&self, region: &str) -> Arc<TierStats> {
        let mut tiers = self
            .tiers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(tiers.entry(region.to_owned()).or_insert_with(|| {
            Arc::new(TierStats {
                region: region.to_owned(),
                responses: StatusCounts::default(),
            })
        }))
    }

    fn tiers_snapshot(&self) -> Vec<Arc<TierStats>> {
        let tiers = self
            .tiers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out: Vec<Arc<TierStats>> = tiers.values().cloned().collect();
        out.sort_by(|a, b| a.region.cmp(&b.region));
        out
    }
}

/// One [`FunctionStats`] per (namespace, name) as long as some table holds it.
#[derive(Debug, Default)]
pub struct StatsRegistry {
    functions: Mutex<HashMap<(String, String), Weak<FunctionStats>>>,
    /// Shared by every function's load counters: their first request wakes the idle sampler.
    wake: Arc<SamplerWake>,
}

impl StatsRegistry {
    /// What the load sampler sleeps on while nothing happens.
    pub fn sampler_wake(&self) -> &Arc<SamplerWake> {
        &self.wake
    }

    pub fn get(&self, namespace: &str, name: &str, label: &str) -> Arc<FunctionStats> {
        let mut functions = self
            .functions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(existing) = functions.get(&key).and_then(Weak::upgrade) {
            return existing;
        }
        let mut stats = FunctionStats::new(namespace, name, label.to_owned());
        stats.load = FunctionLoad::new(Arc::clone(&self.wake));
        let stats = Arc::new(stats);
        functions.insert(key, Arc::downgrade(&stats));
        stats
    }

    pub fn prune(&self) {
        self.functions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|_, weak| weak.strong_count() > 0);
    }
}

/// The causes of failures a client brings on itself, as `meridian-error` spells them.
pub const CLIENT_FAULTS: [Reason; 5] = [
    Reason::BadRequestBody,
    Reason::ClientDisconnected,
    Reason::RequestBodyTimeout,
    Reason::RequestTooLarge,
    Reason::AmbiguousTransferEncoding,
];

/// Requests that failed through their client's fault, by cause: what the endpoints were spared.
#[derive(Debug, Default)]
pub struct ClientFaults {
    counts: [AtomicU64; CLIENT_FAULTS.len()],
}

impl ClientFaults {
    /// Counts one; a reason that is no client fault is ignored.
    pub fn record(&self, reason: Reason) {
        if let Some(count) = CLIENT_FAULTS
            .iter()
            .position(|r| *r == reason)
            .and_then(|i| self.counts.get(i))
        {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn get(&self, reason: Reason) -> u64 {
        CLIENT_FAULTS
            .iter()
            .position(|r| *r == reason)
            .and_then(|i| self.counts.get(i))
            .map_or(0, |count| count.load(Ordering::Relaxed))
    }
}

/// Sidecar-wide counters.
#[derive(Debug, Default)]
pub struct GlobalStats {
    /// Failures caused by clients (never counted against an endpoint).
    pub client_faults: ClientFaults,
    /// Requests that matched no function (no table, bad or unknown host, headers too large).
    pub unrouted: StatusCounts,
    pub ejections: AtomicU64,
    pub budget_exhausted: AtomicU64,
    /// Load reports the agent took, and those that failed.
    pub load_reports: AtomicU64,
    pub load_report_failures: AtomicU64,
    /// The last load report failed (so the next failure is not logged again).
    pub load_reports_failing: AtomicBool,
    /// The Watch stream to the agent is open (set and cleared by the watcher).
    pub agent_watch_connected: AtomicBool,
}

/// Encodes the statistics of the current routing state at each scrape.
#[derive(Debug)]
pub struct MeshCollector {
    state: Arc<ArcSwapOption<RoutingState>>,
    global: Arc<GlobalStats>,
}

impl MeshCollector {
    pub fn new(state: Arc<ArcSwapOption<RoutingState>>, global: Arc<GlobalStats>) -> Self {
        Self { state, global }
    }
}

fn counter(value: u64, encoder: prometheus_client::encoding::MetricEncoder<'_>) -> FmtResult {
    ConstCounter::new(value).encode(encoder)
}

type FmtResult = Result<(), std::fmt::Error>;

/// A per-function hold counter: metric name, help, and which field of [`HoldStats`].
type HoldCounter = (&'static str, &'static str, fn(&HoldStats) -> &AtomicU64);

impl Collector for MeshCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> FmtResult {
        let state = self.state.load_full();
        let functions: Vec<Arc<FunctionStats>> = state
            .as_ref()
            .map(|s| s.functions().map(|f| Arc::clone(f.stats())).collect())
            .unwrap_or_default();
        // Hold and activation series only for the functions the local agent runs: the rest
        // never hold, and a thousand zero series would only cost scrape time.
        let processes: Vec<Arc<FunctionStats>> = state
            .as_ref()
            .map(|s| {
                s.process_functions()
                    .iter()
                    .map(|f| Arc::clone(f.stats()))
                    .collect()
            })
            .unwrap_or_default();

        // The table in use: no series before the first one (there is no version or age).
        {
            let version = encoder.encode_descriptor(
                "meridian_sidecar_table_version",
                "Version (etcd revision) of the routing table in use (absent before the first).",
                None,
                MetricType::Gauge,
            )?;
            if let Some(state) = &state {
                ConstGauge::new(state.version()).encode(version)?;
            }
        }
        {
            let generation = encoder.encode_descriptor(
                "meridian_sidecar_table_local_generation",
                "The agent's local-instance generation of the routing table in use (absent before the first).",
                None,
                MetricType::Gauge,
            )?;
            if let Some(state) = &state {
                ConstGauge::new(state.local_generation()).encode(generation)?;
            }
        }
        {
            let age = encoder.encode_descriptor(
                "meridian_sidecar_table_age_seconds",
                "Seconds since the routing table in use was applied (absent before the first).",
                None,
                MetricType::Gauge,
            )?;
            if let Some(state) = &state {
                ConstGauge::new(state.age().as_secs_f64()).encode(age)?;
            }
        }
        let connected = encoder.encode_descriptor(
            "meridian_agent_watch_connected",
            "1 while the Watch stream to the local agent is open, else 0.",
            None,
            MetricType::Gauge,
        )?;
        let up = self.global.agent_watch_connected.load(Ordering::Relaxed);
        ConstGauge::new(i64::from(up)).encode(connected)?;

        {
            let mut family = encoder.encode_descriptor(
                "meridian_requests",
                "Responses sent, by function, tier (region that served it, or none) and status.",
                None,
                MetricType::Counter,
            )?;
            for (status, count) in self.global.unrouted.snapshot() {
                let labels = [("function", ""), ("tier", "none"), ("status", &status)];
                counter(count, family.encode_family(&labels)?)?;
            }
            for function in &functions {
                for (status, count) in function.untiered.snapshot() {
                    let labels = [
                        ("function", function.label.as_str()),
                        ("tier", "none"),
                        ("status", &status),
                    ];
                    counter(count, family.encode_family(&labels)?)?;
                }
                for tier in function.tiers_snapshot() {
                    for (status, count) in tier.responses.snapshot() {
                        let labels = [
                            ("function", function.label.as_str()),
                            ("tier", tier.region.as_str()),
                            ("status", &status),
                        ];
                        counter(count, family.encode_family(&labels)?)?;
                    }
                }
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "meridian_request_duration_seconds",
                "Time from receiving a request to sending the response head, by function.",
                None,
                MetricType::Histogram,
            )?;
            for function in &functions {
                let (sum, count, buckets) = function.latency.snapshot();
                let labels = [("function", function.label.as_str())];
                family
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "meridian_retries",
                "Retries sent, by function.",
                None,
                MetricType::Counter,
            )?;
            for function in &functions {
                let labels = [("function", function.label.as_str())];
                let retries = function.retries.load(Ordering::Relaxed);
                counter(retries, family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "meridian_held_requests",
                "Requests held now, waiting for a local instance to become ready, by function.",
                None,
                MetricType::Gauge,
            )?;
            for function in &processes {
                let labels = [("function", function.label.as_str())];
                let held = i64::from(function.load.held());
                ConstGauge::new(held).encode(family.encode_family(&labels)?)?;
            }
        }
        let per_function: [HoldCounter; 7] = [
            (
                "meridian_holds",
                "Requests held for want of a ready local instance, by function.",
                |h| &h.holds,
            ),
            (
                "meridian_hold_queue_full",
                "Requests refused (503 hold-queue-full) because the hold queue was full.",
                |h| &h.queue_full,
            ),
            (
                "meridian_cold_start_timeouts",
                "Held requests answered 503 cold-start-timeout, by function.",
                |h| &h.cold_start_timeouts,
            ),
            (
                "meridian_crash_loop_remote",
                "Requests sent to a healthy remote region instead of being held, because the \
                 local instances crash-loop, by function.",
                |h| &h.crash_loop_remote,
            ),
            (
                "meridian_hold_spills",
                "Held requests sent to a healthy remote region when their hold reached its bound \
                 (its round trip plus the margin, or the per-try timeout), by function.",
                |h| &h.spills,
            ),
            (
                "meridian_activations",
                "Activate calls sent to the agent, by function.",
                |h| &h.activations,
            ),
            (
                "meridian_activation_failures",
                "Activate calls the agent did not answer successfully, by function.",
                |h| &h.activation_failures,
            ),
        ];
        for (name, help, field) in per_function {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for function in &processes {
                let labels = [("function", function.label.as_str())];
                let value = field(&function.hold).load(Ordering::Relaxed);
                counter(value, family.encode_family(&labels)?)?;
            }
        }
        let reports = encoder.encode_descriptor(
            "meridian_load_reports",
            "Load reports the agent accepted.",
            None,
            MetricType::Counter,
        )?;
        counter(self.global.load_reports.load(Ordering::Relaxed), reports)?;
        let report_failures = encoder.encode_descriptor(
            "meridian_load_report_failures",
            "Load reports that failed (agent unreachable, refused or slow).",
            None,
            MetricType::Counter,
        )?;
        counter(
            self.global.load_report_failures.load(Ordering::Relaxed),
            report_failures,
        )?;
        let ejections = encoder.encode_descriptor(
            "meridian_ejections",
            "Endpoints ejected by passive health checking.",
            None,
            MetricType::Counter,
        )?;
        counter(self.global.ejections.load(Ordering::Relaxed), ejections)?;
        let exhausted = encoder.encode_descriptor(
            "meridian_retry_budget_exhausted",
            "Retries refused because the retry budget was spent.",
            None,
            MetricType::Counter,
        )?;
        counter(
            self.global.budget_exhausted.load(Ordering::Relaxed),
            exhausted,
        )?;
        let mut faults = encoder.encode_descriptor(
            "meridian_client_errors",
            "Requests failed by their client (malformed, cut off, stalled or too large body; \
             ambiguous framing), by meridian-error cause; never counted against an endpoint.",
            None,
            MetricType::Counter,
        )?;
        for reason in CLIENT_FAULTS {
            let labels = [("cause", reason.as_str())];
            counter(
                self.global.client_faults.get(reason),
                faults.encode_family(&labels)?,
            )?;
        }
        Ok(())
    }
}

/// A registry exporting the mesh statistics.
pub fn registry(state: Arc<ArcSwapOption<RoutingState>>, global: Arc<GlobalStats>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(MeshCollector::new(state, global)));
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

    #[test]
    fn status_counts_use_slots_then_other() {
        let counts = StatusCounts::default();
        for code in [200, 200, 503, 200] {
            counts.record(code);
        }
        assert_eq!(
            counts.snapshot(),
            vec![("200".to_owned(), 3), ("503".to_owned(), 1)]
        );
        for code in 300..310 {
            counts.record(code);
        }
        assert_eq!(counts.total(), 14);
        assert!(counts.snapshot().contains(&("other".to_owned(), 4)));
    }

    #[test]
    fn histogram_buckets() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 60.0031).abs() < 1e-6, "{sum}");
        assert_eq!(buckets[0], (0.0005, 1));
        assert_eq!(buckets[3], (0.005, 1));
        assert_eq!(buckets.last().copied(), Some((f64::INFINITY, 1)));
    }

    #[test]
    fn renders_prometheus_text_without_a_table() {
        let global = Arc::new(GlobalStats::default());
        global.unrouted.record(404);
        global.ejections.fetch_add(2, Ordering::Relaxed);
        let registry = registry(Arc::new(ArcSwapOption::empty()), Arc::clone(&global));
        let text = render(&registry).unwrap();
        assert!(
            text.contains(r#"meridian_requests_total{function="",tier="none",status="404"} 1"#),
            "{text}"
        );
        assert!(text.contains("meridian_ejections_total 2"), "{text}");
        global.client_faults.record(Reason::BadRequestBody);
        global.client_faults.record(Reason::NoEndpoints);
        let text = render(&registry).unwrap();
        assert!(
            text.contains(r#"meridian_client_errors_total{cause="bad-request-body"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"meridian_client_errors_total{cause="client-disconnected"} 0"#),
            "{text}"
        );
        assert!(
            text.contains("meridian_retry_budget_exhausted_total 0"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE meridian_request_duration_seconds histogram"),
            "{text}"
        );
        // No table: the table gauges are described but have no series.
        for name in [
            "meridian_sidecar_table_version",
            "meridian_sidecar_table_local_generation",
            "meridian_sidecar_table_age_seconds",
        ] {
            assert!(text.contains(&format!("# TYPE {name} gauge\n")), "{text}");
            assert!(!text.contains(&format!("\n{name} ")), "{text}");
        }
        assert!(
            text.contains("meridian_agent_watch_connected 0\n"),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn renders_the_table_in_use_and_its_age() {
        use crate::routes::tests::{route, table, tier};
        use crate::routes::Compiler;

        let mut spec = table(vec![route(
            "default",
            "f",
            vec![tier("us-east", true, &["127.0.1.1:9000"])],
        )]);
        spec.local_generation = 3;
        let compiler = Compiler::new("us-east");
        let state = Arc::new(ArcSwapOption::empty());
        let global = Arc::new(GlobalStats::default());
        let registry = registry(Arc::clone(&state), Arc::clone(&global));

        // Compiled 10 s before it is applied: the age counts from the swap.
        let compiled = compiler.compile(&spec);
        tokio::time::advance(Duration::from_secs(10)).await;
        crate::watch::apply_compiled(&state, &compiler, compiled).unwrap();
        tokio::time::advance(Duration::from_millis(2500)).await;
        global.agent_watch_connected.store(true, Ordering::Relaxed);

        let text = render(&registry).unwrap();
        assert!(
            text.contains(
                "# HELP meridian_sidecar_table_version Version (etcd revision) of the routing \
                 table in use (absent before the first).\n\
                 # TYPE meridian_sidecar_table_version gauge\n\
                 meridian_sidecar_table_version 7\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("\nmeridian_sidecar_table_local_generation 3\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE meridian_sidecar_table_age_seconds gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("\nmeridian_sidecar_table_age_seconds 2.5\n"),
            "{text}"
        );
        assert!(
            text.contains("meridian_agent_watch_connected 1\n"),
            "{text}"
        );

        // Measured at scrape time.
        tokio::time::advance(Duration::from_secs(60)).await;
        let text = render(&registry).unwrap();
        assert!(
            text.contains("\nmeridian_sidecar_table_age_seconds 62.5\n"),
            "{text}"
        );
    }
}
