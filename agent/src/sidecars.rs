//! The sidecars this agent serves: which ones have a routing watch open now (and the admin
//! address each named, for `explain`), and which table each one last reported loaded or could
//! not load. The session reports the statuses upstream, so that `meridianctl get agents` and
//! `status` count an agent in sync only when its sidecars have loaded the newest table too.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meridian_proto::v1::{SidecarStatus, TableReport};
use tokio::sync::watch;
use tokio::time::Instant;

/// A sidecar that closed its watch is still reported this long (as not connected), so that a
/// sidecar stuck reconnecting stays visible with its last error; then it is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(60);
/// Sidecars tracked at most: the local API is reachable by anything on the host, and each name
/// costs memory and a line in every report.
pub const MAX_TRACKED: usize = 1024;
/// Longest reason kept from a sidecar's report.
pub const MAX_REASON_BYTES: usize = 1024;

/// A sidecar watching this agent, as `explain` dials it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchingSidecar {
    pub client: String,
    pub admin_address: String,
}

#[derive(Debug, Clone, Default)]
struct Known {
    loaded_version: i64,
    loaded_generation: u64,
    error: String,
    failed_version: i64,
    updated_unix_ms: i64,
    /// When its last watch closed; `None` while one is open.
    disconnected_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Open watches, by registration id: the client name and the admin address it named.
    open: BTreeMap<u64, (String, Option<String>)>,
    known: BTreeMap<String, Known>,
}

/// What the agent knows of its sidecars. Shared by the local API (which feeds it) and the
/// session (which reports it).
#[derive(Debug)]
pub struct SidecarBook {
    next: AtomicU64,
    inner: Mutex<Inner>,
    statuses: watch::Sender<Arc<Vec<SidecarStatus>>>,
}

impl Default for SidecarBook {
    fn default() -> Self {
        Self {
            next: AtomicU64::new(0),
            inner: Mutex::default(),
            statuses: watch::channel(Arc::new(Vec::new())).0,
        }
    }
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A name for a sidecar that gave none.
fn name_of(client: &str) -> String {
    if client.is_empty() {
        "(unnamed)".to_owned()
    } else {
        truncate(client, 253)
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

impl SidecarBook {
    /// The statuses as they change, for the session.
    pub fn statuses(&self) -> watch::Receiver<Arc<Vec<SidecarStatus>>> {
        self.statuses.subscribe()
    }

    /// A watch opened by `client`; it counts as connected until the registration is dropped.
    pub fn register(self: &Arc<Self>, client: &str, admin_address: Option<String>) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let name = name_of(client);
        {
            let mut inner = self.lock();
            inner.open.insert(id, (name.clone(), admin_address));
            if inner.known.len() >= MAX_TRACKED && !inner.known.contains_key(&name) {
                evict_one(&mut inner);
            }
            if inner.known.len() < MAX_TRACKED || inner.known.contains_key(&name) {
                let known = inner.known.entry(name).or_default();
                known.disconnected_at = None;
                known.updated_unix_ms = unix_ms();
            }
        }
        self.publish();
        Registration {
            book: Arc::clone(self),
            id,
        }
    }

    /// A sidecar's verdict on a table (or, with version 0 and not accepted, on the stream).
    pub fn reported(&self, report: &TableReport) {
        {
            let mut inner = self.lock();
            let name = name_of(&report.client);
            let Some(known) = inner.known.get_mut(&name) else {
                // Only sidecars with a watch are tracked: a report from anything else is noise.
                return;
            };
            if report.accepted {
                known.loaded_version = report.version;
                known.loaded_generation = report.local_generation;
                known.error.clear();
                known.failed_version = 0;
            } else {
                known.error = truncate(&report.reason, MAX_REASON_BYTES);
                known.failed_version = report.version;
            }
            known.updated_unix_ms = unix_ms();
        }
        self.publish();
    }

    /// The sidecars to ask for an explanation: one per admin address (a sidecar that
    /// re-watched before its old stream was noticed gone is asked once), sorted by name.
    pub fn explainable(&self) -> Vec<WatchingSidecar> {
        let inner = self.lock();
        let mut by_address: BTreeMap<&str, &str> = BTreeMap::new();
        for (client, admin) in inner.open.values() {
            if let Some(admin) = admin {
                // Later registrations have larger ids: the newest watch wins.
                by_address.insert(admin, client);
            }
        }
        let mut sidecars: Vec<WatchingSidecar> = by_address
            .into_iter()
            .map(|(admin, client)| WatchingSidecar {
                client: client.to_owned(),
                admin_address: admin.to_owned(),
            })
            .collect();
        sidecars.sort_by(|a, b| (&a.client, &a.admin_address).cmp(&(&b.client, &b.admin_address)));
        sidecars
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn closed(&self, id: u64) {
        {
            let mut inner = self.lock();
            let Some((name, _)) = inner.open.remove(&id) else {
                return;
            };
            let still_open = inner.open.values().any(|(client, _)| *client == name);
            if let (false, Some(known)) = (still_open, inner.known.get_mut(&name)) {
                known.disconnected_at = Some(Instant::now());
                known.updated_unix_ms = unix_ms();
            }
        }
        self.publish();
    }

    /// Publishes the statuses if they changed, forgetting sidecars gone for [`FORGET_AFTER`].
    fn publish(&self) {
        let statuses = {
            let mut inner = self.lock();
            inner.known.retain(|_, known| {
                known
                    .disconnected_at
                    .is_none_or(|at| at.elapsed() < FORGET_AFTER)
            });
            let inner = &*inner;
            inner
                .known
                .iter()
                .map(|(name, known)| SidecarStatus {
                    sidecar: name.clone(),
                    connected: known.disconnected_at.is_none(),
                    loaded_version: known.loaded_version,
                    loaded_local_generation: known.loaded_generation,
                    error: known.error.clone(),
                    failed_version: known.failed_version,
                    updated_unix_ms: known.updated_unix_ms,
                })
                .collect::<Vec<_>>()
        };
        self.statuses.send_if_modified(|current| {
            // The time of the last change alone is no reason to report again.
            let same = current.len() == statuses.len()
                && current.iter().zip(&statuses).all(|(a, b)| {
                    SidecarStatus {
                        updated_unix_ms: 0,
                        ..a.clone()
                    } == SidecarStatus {
                        updated_unix_ms: 0,
                        ..b.clone()
                    }
                });
            if !same {
                *current = Arc::new(statuses);
            }
            !same
        });
    }
}

/// Makes room for a new sidecar: forgets the one disconnected longest ago, if any.
fn evict_one(inner: &mut Inner) {
    let oldest = inner
        .known
        .iter()
        .filter_map(|(name, known)| known.disconnected_at.map(|at| (at, name.clone())))
        .min();
    if let Some((_, name)) = oldest {
        inner.known.remove(&name);
    }
}

/// An open watch; dropping it (the stream ended) marks the sidecar disconnected.
#[derive(Debug)]
pub struct Registration {
    book: Arc<SidecarBook>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.book.closed(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(client: &str, version: i64, accepted: bool, reason: &str) -> TableReport {
        TableReport {
            client: client.into(),
            version,
            accepted,
            reason: reason.into(),
            local_generation: 3,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn tracks_watches_loads_and_failures() {
        let book = Arc::new(SidecarBook::default());
        let statuses = book.statuses();
        assert!(statuses.borrow().is_empty());
        let watch = book.register("sidecar-1", Some("127.0.0.1:15090".into()));
        assert_eq!(statuses.borrow().len(), 1);
        assert!(statuses.borrow()[0].connected);
        assert_eq!(statuses.borrow()[0].loaded_version, 0);

        book.reported(&report("sidecar-1", 7, true, ""));
        let now = statuses.borrow()[0].clone();
        assert_eq!((now.loaded_version, now.loaded_local_generation), (7, 3));

        book.reported(&report("sidecar-1", 8, false, "functions[0]: bad"));
        let now = statuses.borrow()[0].clone();
        assert_eq!(now.loaded_version, 7, "the loaded table stays");
        assert_eq!(
            (now.failed_version, now.error.as_str()),
            (8, "functions[0]: bad")
        );

        // Reports from something that never watched are not tracked.
        book.reported(&report("stranger", 1, true, ""));
        assert_eq!(statuses.borrow().len(), 1);

        drop(watch);
        assert!(!statuses.borrow()[0].connected);
        tokio::time::advance(FORGET_AFTER + Duration::from_secs(1)).await;
        let _other = book.register("sidecar-2", None);
        let names: Vec<String> = statuses
            .borrow()
            .iter()
            .map(|s| s.sidecar.clone())
            .collect();
        assert_eq!(
            names,
            vec!["sidecar-2"],
            "a sidecar gone for long is forgotten"
        );
    }

    #[test]
    fn explainable_sidecars_are_the_open_ones_with_an_address() {
        let book = Arc::new(SidecarBook::default());
        let a = book.register("a", Some("127.0.0.1:1".into()));
        let _b = book.register("b", None);
        let _a2 = book.register("a", Some("127.0.0.1:1".into()));
        assert_eq!(
            book.explainable(),
            vec![WatchingSidecar {
                client: "a".into(),
                admin_address: "127.0.0.1:1".into()
            }]
        );
        drop(a);
        assert_eq!(
            book.explainable().len(),
            1,
            "the second watch of a is still open"
        );
        assert!(book.statuses().borrow().iter().all(|s| s.connected));
    }
}
