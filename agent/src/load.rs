//! What the region's sidecars say about their load: the latest `LoadReport` of each sidecar
//! (with the time it arrived), the per-second load of each function the autoscaler observes, and
//! the [`DrainGate`] that lets the runtime stop a draining instance only once no sidecar can
//! still send to it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use meridian_proto::v1::LoadReport;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::runtime::{DrainGate, FunctionKey};

/// A report older than this counts as no load, and its sidecar as gone (for draining).
pub const REPORT_FRESHNESS: Duration = Duration::from_secs(3);
/// Sidecars silent for this long are forgotten altogether.
const FORGET_AFTER: Duration = Duration::from_secs(300);
/// How often a waiting drain re-checks when nothing wakes it (reports age out silently).
const DRAIN_POLL: Duration = Duration::from_millis(100);

/// One function's load in one second, summed over the sidecars.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Observation {
    /// Sum of the fresh reports' average concurrency.
    pub concurrency: f64,
    /// Requests reported since the previous observation.
    pub requests: u64,
    /// Requests the fresh reports say are held now.
    pub held: u32,
}

/// The latest report of one sidecar, as much of it as the agent uses.
#[derive(Debug)]
struct SidecarLoad {
    received: Instant,
    local_generation: u64,
    /// (concurrency, held) per function.
    functions: HashMap<FunctionKey, (f64, u32)>,
    /// In-flight requests per local endpoint (instance id); zeros left out.
    in_flight: HashMap<String, u32>,
}

/// What the sidecars have been served: which instances were routable, and from which
/// generation on each stopped being routable.
#[derive(Debug, Default)]
struct Served {
    /// Instance ids READY in the table served now.
    ready: HashSet<String>,
    /// Instance id → the first generation that no longer served it as READY.
    retired: HashMap<String, u64>,
}

#[derive(Debug, Default)]
struct Inner {
    sidecars: HashMap<String, SidecarLoad>,
    /// Requests per function since the last [`LoadBook::observe`].
    requests: HashMap<FunctionKey, u64>,
    served: Served,
}

/// The region's load, shared by the local API (writer), the autoscaler loop and the runtime's
/// drains (readers). Locks are held for map updates only, never across an await.
#[derive(Debug, Default)]
pub struct LoadBook {
    inner: Mutex<Inner>,
    /// Woken on every report and every served table: a drain may have completed.
    changed: Notify,
}

impl LoadBook {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The maps stay consistent whatever panicked while holding them: keep going.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores `report` as its sidecar's latest, received at `now`. Returns the functions that
    /// have requests held (each is an activation).
    pub fn record(&self, report: LoadReport, now: Instant) -> Vec<FunctionKey> {
        let mut held = Vec::new();
        let mut requests = Vec::new();
        let mut functions = HashMap::with_capacity(report.functions.len());
        let mut in_flight = HashMap::new();
        for function in report.functions {
            let key = FunctionKey::new(function.namespace, function.name);
            // A sidecar bug must not poison the averages.
            let concurrency = if function.average_concurrency.is_finite() {
                function.average_concurrency.max(0.0)
            } else {
                0.0
            };
            if function.requests > 0 {
                requests.push((key.clone(), function.requests));
            }
            if function.held > 0 {
                held.push(key.clone());
            }
            for endpoint in function.endpoints {
                if endpoint.in_flight > 0 {
                    let count = in_flight.entry(endpoint.id).or_insert(0u32);
                    *count = count.saturating_add(endpoint.in_flight);
                }
            }
            let entry = functions.entry(key).or_insert((0.0, 0u32));
            entry.0 += concurrency;
            entry.1 = entry.1.saturating_add(function.held);
        }
        let sidecar = SidecarLoad {
            received: now,
            local_generation: report.local_generation,
            functions,
            in_flight,
        };
        let mut inner = self.lock();
        for (key, count) in requests {
            let total = inner.requests.entry(key).or_default();
            *total = total.saturating_add(count);
        }
        inner.sidecars.insert(report.client, sidecar);
        drop(inner);
        self.changed.notify_waiters();
        held
    }

    /// The load of every function reported since the last call (requests) or in a fresh
    /// report (concurrency, held). Functions nobody reported are absent: their load is zero.
    pub fn observe(&self, now: Instant) -> BTreeMap<FunctionKey, Observation> {
        let mut inner = self.lock();
        inner
            .sidecars
            .retain(|_, s| now.saturating_duration_since(s.received) < FORGET_AFTER);
        let mut load: BTreeMap<FunctionKey, Observation> = BTreeMap::new();
        for sidecar in inner.sidecars.values() {
            if now.saturating_duration_since(sidecar.received) >= REPORT_FRESHNESS {
                continue;
            }
            for (key, &(concurrency, held)) in &sidecar.functions {
                let entry = load.entry(key.clone()).or_default();
                entry.concurrency += concurrency;
                entry.held = entry.held.saturating_add(held);
            }
        }
        for (key, requests) in inner.requests.drain() {
            load.entry(key).or_default().requests = requests;
        }
        load
    }

    /// Locks the served-table bookkeeping while a new table is computed and published: a drain
    /// checked meanwhile then sees either the old table (the instance still READY) or the new
    /// one, never a gap in which a table computed from an older snapshot goes out unrecorded.
    pub fn begin_serving(&self) -> ServeGuard<'_> {
        ServeGuard {
            inner: self.lock(),
            book: self,
        }
    }

    /// Whether instance `id` can be stopped: it is not served as READY, and every sidecar that
    /// reported within [`REPORT_FRESHNESS`] has a table from the generation that retired it on
    /// and no request in flight to it.
    pub fn is_drained(&self, id: &str, now: Instant) -> bool {
        let inner = self.lock();
        if inner.served.ready.contains(id) {
            return false;
        }
        // Never served as READY: no sidecar can have sent it anything.
        let Some(&retired) = inner.served.retired.get(id) else {
            return true;
        };
        inner
            .sidecars
            .values()
            .filter(|s| now.saturating_duration_since(s.received) < REPORT_FRESHNESS)
            .all(|s| s.local_generation >= retired && !s.in_flight.contains_key(id))
    }
}

/// Holds the book while a table is published; see [`LoadBook::begin_serving`].
pub struct ServeGuard<'a> {
    inner: MutexGuard<'a, Inner>,
    book: &'a LoadBook,
}

impl ServeGuard<'_> {
    /// Records that the table of `generation` serves `ready` as READY instances; `live` are
    /// every instance the runtime still has (bookkeeping of the others is dropped).
    pub fn served(mut self, generation: u64, ready: HashSet<String>, live: &HashSet<String>) {
        let served = &mut self.inner.served;
        for id in served.ready.difference(&ready) {
            served.retired.entry(id.clone()).or_insert(generation);
        }
        served.ready = ready;
        served.retired.retain(|id, _| live.contains(id));
        drop(self.inner);
        self.book.changed.notify_waiters();
    }
}

impl DrainGate for LoadBook {
    fn drained(&self, instance_id: &str) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let id = instance_id.to_owned();
        Box::pin(async move {
            loop {
                // Registered before the check, so a report arriving in between still wakes us.
                let mut notified = pin!(self.changed.notified());
                notified.as_mut().enable();
                if self.is_drained(&id, Instant::now()) {
                    return;
                }
                tokio::select! {
                    () = notified => {}
                    () = tokio::time::sleep(DRAIN_POLL) => {}
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_proto::v1::{EndpointLoad, FunctionLoad};

    fn key(name: &str) -> FunctionKey {
        FunctionKey::new("default", name)
    }

    fn load(name: &str, concurrency: f64, requests: u64, held: u32) -> FunctionLoad {
        FunctionLoad {
            namespace: "default".into(),
            name: name.into(),
            average_concurrency: concurrency,
            requests,
            held,
            endpoints: vec![],
        }
    }

    fn report(client: &str, generation: u64, functions: Vec<FunctionLoad>) -> LoadReport {
        LoadReport {
            client: client.into(),
            table_version: 7,
            local_generation: generation,
            window_ms: 1000,
            functions,
        }
    }

    fn ids(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|id| (*id).to_owned()).collect()
    }

    #[test]
    fn observation_sums_fresh_reports_and_counts_requests_once() {
        let book = LoadBook::new();
        let t0 = Instant::now();
        let held = book.record(
            report("a", 1, vec![load("f", 2.5, 10, 0), load("g", 1.0, 1, 3)]),
            t0,
        );
        assert_eq!(held, [key("g")]);
        book.record(report("b", 1, vec![load("f", 4.0, 5, 0)]), t0);
        let seen = book.observe(t0 + Duration::from_millis(500));
        assert_eq!(
            seen[&key("f")],
            Observation {
                concurrency: 6.5,
                requests: 15,
                held: 0
            }
        );
        assert_eq!(seen[&key("g")].held, 3);
        // Requests were taken; concurrency stays while the reports are fresh.
        let seen = book.observe(t0 + Duration::from_secs(1));
        assert_eq!(seen[&key("f")].requests, 0);
        assert_eq!(seen[&key("f")].concurrency, 6.5);
        // Sidecar b says its load dropped to zero.
        book.record(
            report("b", 1, vec![load("f", 0.0, 0, 0)]),
            t0 + Duration::from_secs(1),
        );
        assert_eq!(
            book.observe(t0 + Duration::from_secs(2))[&key("f")].concurrency,
            2.5
        );
        // a's report is 3 s old: stale, zero.
        let seen = book.observe(t0 + REPORT_FRESHNESS);
        assert_eq!(seen[&key("f")].concurrency, 0.0);
        assert!(!seen.contains_key(&key("g")));
    }

    #[test]
    fn nonsense_concurrency_counts_as_zero() {
        let book = LoadBook::new();
        let t0 = Instant::now();
        book.record(
            report(
                "a",
                1,
                vec![load("f", f64::NAN, 0, 0), load("g", -4.0, 0, 0)],
            ),
            t0,
        );
        let seen = book.observe(t0);
        assert_eq!(seen[&key("f")].concurrency, 0.0);
        assert_eq!(seen[&key("g")].concurrency, 0.0);
    }

    fn with_in_flight(mut report: LoadReport, id: &str, in_flight: u32) -> LoadReport {
        report.functions[0].endpoints.push(EndpointLoad {
            id: id.into(),
            in_flight,
        });
        report
    }

    #[test]
    fn drain_waits_for_the_retiring_generation_and_no_in_flight() {
        let book = LoadBook::new();
        let t0 = Instant::now();
        let live = ids(&["f-aaaaaa", "f-bbbbbb"]);
        book.begin_serving()
            .served(10, ids(&["f-aaaaaa", "f-bbbbbb"]), &live);
        // Served as READY: not drained whatever the sidecars say.
        assert!(!book.is_drained("f-aaaaaa", t0));
        // Generation 11 marks it DRAINING.
        book.begin_serving().served(11, ids(&["f-bbbbbb"]), &live);
        // No sidecar reported recently: nobody can still be sending.
        assert!(book.is_drained("f-aaaaaa", t0));
        // A sidecar on generation 10 with a request in flight to it.
        let on_old = with_in_flight(report("a", 10, vec![load("f", 1.0, 1, 0)]), "f-aaaaaa", 1);
        book.record(on_old, t0);
        assert!(!book.is_drained("f-aaaaaa", t0));
        // It applied generation 11 but the request is still in flight.
        let in_flight = with_in_flight(report("a", 11, vec![load("f", 1.0, 1, 0)]), "f-aaaaaa", 1);
        book.record(in_flight, t0);
        assert!(!book.is_drained("f-aaaaaa", t0));
        // Done: absent means zero.
        book.record(report("a", 11, vec![load("f", 0.0, 0, 0)]), t0);
        assert!(book.is_drained("f-aaaaaa", t0));
        // A second sidecar still on generation 10: waits, until its report is stale.
        book.record(report("b", 10, vec![]), t0);
        assert!(!book.is_drained("f-aaaaaa", t0));
        assert!(book.is_drained("f-aaaaaa", t0 + REPORT_FRESHNESS));
        // An instance never served as READY is drained at once.
        assert!(book.is_drained("f-cccccc", t0));
    }

    #[test]
    fn retired_generation_is_the_first_that_stopped_serving_it() {
        let book = LoadBook::new();
        let t0 = Instant::now();
        let live = ids(&["f-aaaaaa"]);
        book.begin_serving().served(5, ids(&["f-aaaaaa"]), &live);
        book.begin_serving().served(6, ids(&[]), &live);
        book.begin_serving().served(7, ids(&[]), &live);
        book.record(report("a", 6, vec![]), t0);
        assert!(book.is_drained("f-aaaaaa", t0));
        // Gone from the runtime: forgotten.
        book.begin_serving().served(8, ids(&[]), &ids(&[]));
        assert!(book.lock().served.retired.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn drained_future_resolves_on_the_report_that_completes_the_drain() {
        let book = std::sync::Arc::new(LoadBook::new());
        let live = ids(&["f-aaaaaa"]);
        book.begin_serving().served(1, ids(&["f-aaaaaa"]), &live);
        book.record(report("a", 1, vec![]), Instant::now());
        let waiter = {
            let book = book.clone();
            tokio::spawn(async move { book.drained("f-aaaaaa").await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        book.begin_serving().served(2, ids(&[]), &live);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiter.is_finished(), "sidecar a still holds generation 1");
        book.record(report("a", 2, vec![]), Instant::now());
        let started = Instant::now();
        waiter.await.unwrap();
        assert!(started.elapsed() <= DRAIN_POLL);
    }

    #[tokio::test(start_paused = true)]
    async fn drained_future_resolves_when_the_last_report_goes_stale() {
        let book = LoadBook::new();
        let live = ids(&["f-aaaaaa"]);
        book.begin_serving().served(1, ids(&["f-aaaaaa"]), &live);
        book.begin_serving().served(2, ids(&[]), &live);
        let start = Instant::now();
        book.record(report("a", 1, vec![]), start);
        book.drained("f-aaaaaa").await;
        let waited = start.elapsed();
        assert!(waited >= REPORT_FRESHNESS, "{waited:?}");
        assert!(waited <= REPORT_FRESHNESS + DRAIN_POLL, "{waited:?}");
    }
}
