//! The scheduler election: exactly one replica at a time runs the scheduler. A replica
//! campaigns by creating `<prefix>election/scheduler` under a lease of its own (create-if-absent
//! in one transaction); the winner schedules until its term ends, the others wait for the key's
//! deletion and campaign again.
//!
//! A term ends when the leader's lease cannot be kept alive, when its key disappears, when a
//! fenced write is refused (another replica was elected meanwhile), or on shutdown, which
//! resigns by revoking the lease so that a follower takes over at once instead of after a TTL.
//! Two replicas may both believe they lead for a moment (a lease expired in etcd before the old
//! leader noticed); every scheduler write is fenced by the key's create revision, so only the
//! real leader's writes land.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use meridian_common::backoff::Backoff;
use tokio::sync::watch;

use crate::scheduler::{self, SchedulerConfig, SchedulerCounters, SchedulerView};
use crate::store::{Campaign, Store};

/// Settings of the election.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    /// Written as the election key's value (what GetLeader shows).
    pub replica_id: String,
    /// TTL of the leader's lease: how long a dead leader blocks the election. Kept alive every
    /// TTL/3.
    pub lease_ttl: Duration,
    pub scheduler: SchedulerConfig,
}

/// What the election exposes: whether this replica leads, and the scheduler's counters.
#[derive(Debug)]
pub struct ElectionState {
    pub counters: SchedulerCounters,
    /// `Some(elected_version)` while this replica leads.
    leading: watch::Sender<Option<i64>>,
}

impl ElectionState {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            counters: SchedulerCounters::default(),
            leading: watch::Sender::new(None),
        })
    }

    /// `Some(elected_version)` while this replica leads.
    pub fn leading(&self) -> watch::Receiver<Option<i64>> {
        self.leading.subscribe()
    }

    /// Scheduler writes refused because this replica no longer led.
    pub fn fenced_writes(&self) -> u64 {
        self.counters.fenced_writes.load(Ordering::Relaxed)
    }
}

/// Why a term ended. Every step-down is logged with "no longer leader" (operators and tests
/// grep for it); a fenced write as "scheduler write fenced: no longer leader".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TermEnd {
    Fenced,
    LeaseLost,
    KeyGone,
    Shutdown,
}

/// Runs the election until `shutdown` turns true (or its sender is dropped); resigns then.
/// Campaigns only once the cache has loaded, so that a leader schedules from a real view.
pub async fn run(
    store: Store,
    config: ElectionConfig,
    mut views: watch::Receiver<Arc<SchedulerView>>,
    mut shutdown: watch::Receiver<bool>,
    state: Arc<ElectionState>,
) {
    tokio::select! {
        loaded = cache_loaded(&mut views) => {
            if !loaded {
                return;
            }
        }
        _ = stopped(&mut shutdown) => return,
    }
    let ttl_secs = i64::try_from(config.lease_ttl.as_secs().max(1)).unwrap_or(5);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let lease = tokio::select! {
            lease = store.grant_lease(ttl_secs) => lease,
            _ = stopped(&mut shutdown) => return,
        };
        let lease = match lease {
            Ok(lease) => lease,
            Err(error) => {
                tracing::warn!(%error, "cannot obtain an election lease from etcd; retrying");
                if pause(&mut shutdown, backoff.next_delay()).await {
                    return;
                }
                continue;
            }
        };
        let guard = store.keep_alive(lease, config.lease_ttl);
        let mut lost = guard.lost.clone();
        // Campaign under this lease until it is lost.
        loop {
            let campaign = tokio::select! {
                campaign = store.campaign(&config.replica_id, lease) => campaign,
                _ = stopped(&mut shutdown) => {
                    resign(&store, lease).await;
                    return;
                }
            };
            match campaign {
                Err(error) => {
                    // Perhaps the lease is gone in etcd already: start over with a new one.
                    tracing::warn!(%error, "campaign for scheduler leadership failed; retrying");
                    if pause(&mut shutdown, backoff.next_delay()).await {
                        resign(&store, lease).await;
                        return;
                    }
                    let _ = store.revoke_lease(lease).await;
                    break;
                }
                Ok(Campaign::Elected { elected_version }) => {
                    backoff.reset();
                    tracing::info!(
                        replica = %config.replica_id,
                        elected_version,
                        lease,
                        "elected scheduler leader"
                    );
                    state.leading.send_replace(Some(elected_version));
                    let end = tokio::select! {
                        _ = scheduler::run(&store, &config.scheduler, &mut views, elected_version, &state.counters) => TermEnd::Fenced,
                        _ = lease_lost(&mut lost) => TermEnd::LeaseLost,
                        _ = key_gone(&store, elected_version) => TermEnd::KeyGone,
                        _ = stopped(&mut shutdown) => TermEnd::Shutdown,
                    };
                    state.leading.send_replace(None);
                    match end {
                        TermEnd::Shutdown => {
                            resign(&store, lease).await;
                            return;
                        }
                        TermEnd::LeaseLost => {
                            tracing::warn!(
                                elected_version,
                                "scheduler lease lost: no longer leader"
                            );
                            break;
                        }
                        // The scheduler logged it and counted it.
                        TermEnd::Fenced => {}
                        TermEnd::KeyGone => {
                            tracing::warn!(
                                elected_version,
                                "scheduler leader key gone: no longer leader"
                            );
                        }
                    }
                }
                Ok(Campaign::Taken { leader, observed }) => {
                    backoff.reset();
                    tracing::info!(
                        leader = %leader.replica,
                        elected_version = leader.elected_version,
                        "following the scheduler leader"
                    );
                    let gone = tokio::select! {
                        gone = store.wait_leader_gone(leader.elected_version, observed + 1) => gone,
                        _ = lease_lost(&mut lost) => break,
                        _ = stopped(&mut shutdown) => {
                            resign(&store, lease).await;
                            return;
                        }
                    };
                    if let Err(error) = gone {
                        tracing::warn!(%error, "watch on the scheduler leader broke; looking again");
                        if pause(&mut shutdown, backoff.next_delay()).await {
                            resign(&store, lease).await;
                            return;
                        }
                    }
                }
            }
        }
        drop(guard);
    }
}

/// Resolves once our election key is gone (retrying a broken watch).
async fn key_gone(store: &Store, elected_version: i64) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        match store
            .wait_leader_gone(elected_version, elected_version + 1)
            .await
        {
            Ok(()) => return,
            Err(error) => {
                tracing::debug!(%error, "watch on our leader key broke; watching again");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Resolves once the cache has loaded its first snapshot; false if it never will.
async fn cache_loaded(views: &mut watch::Receiver<Arc<SchedulerView>>) -> bool {
    views.wait_for(|view| view.loaded).await.is_ok()
}

/// Resolves when the lease can no longer be kept alive.
async fn lease_lost(lost: &mut watch::Receiver<bool>) {
    let _ = lost.wait_for(|lost| *lost).await;
}

/// Resolves when the process is stopping.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Sleeps for `delay`; true if the process started stopping meanwhile.
async fn pause(shutdown: &mut watch::Receiver<bool>, delay: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = stopped(shutdown) => true,
    }
}

/// Gives up the lease and with it the election key (if we hold it), so a follower is elected
/// at once rather than one TTL later.
async fn resign(store: &Store, lease: i64) {
    match store.revoke_lease(lease).await {
        Ok(()) => tracing::info!(lease, "resigned from the scheduler election"),
        Err(error) => {
            tracing::warn!(%error, lease, "cannot revoke the election lease; it expires by itself")
        }
    }
}
