//! Per-address endpoint state (load, latency, passive health, probe results), shared by every
//! routing-table version that names the address, so that what the sidecar learned about an
//! endpoint survives table swaps.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::uri::Authority;
use tokio::time::Instant;

/// Consecutive failures (connect errors, timeouts, 5xx) that make an endpoint a candidate for
/// ejection.
pub const FAILURE_THRESHOLD: u32 = 5;
/// First ejection; each further one doubles, up to [`MAX_EJECTION`].
pub const BASE_EJECTION: Duration = Duration::from_secs(1);
pub const MAX_EJECTION: Duration = Duration::from_secs(30);
/// A success this long after the last ejection ended forgets the ejection history, so that an
/// endpoint that failed once long ago starts again from [`BASE_EJECTION`].
pub const EJECTION_MEMORY: Duration = Duration::from_secs(10);
/// Time constant of the latency EWMA (as in Finagle and Linkerd).
pub const EWMA_DECAY: Duration = Duration::from_secs(10);
/// Latency assumed for an endpoint that has not answered yet: small, so that new endpoints get
/// traffic and a real estimate quickly.
pub const DEFAULT_RTT: Duration = Duration::from_millis(1);

/// Monotonic nanoseconds since the registry was created: what the atomics store. Tokio's clock,
/// so tests can pause and advance it.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
        }
    }

    /// Now, in nanoseconds since the epoch plus one: never 0, which the atomics use for
    /// "never".
    pub fn now(&self) -> u64 {
        self.nanos_at(Instant::now())
    }

    pub fn nanos_at(&self, instant: Instant) -> u64 {
        let nanos = instant.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX - 1) + 1
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// What the active prober last learned about a remote gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeState {
    /// Never probed, or not since the sidecar started: routable, ordered last.
    Unknown,
    Up,
    /// The last probe (or a connection attempt) failed: no traffic until a probe succeeds.
    Down,
}

impl ProbeState {
    fn from_u8(value: u8) -> Self {
        match value {
            1 => ProbeState::Up,
            2 => ProbeState::Down,
            _ => ProbeState::Unknown,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            ProbeState::Unknown => 0,
            ProbeState::Up => 1,
            ProbeState::Down => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ProbeState::Unknown => "unknown",
            ProbeState::Up => "up",
            ProbeState::Down => "down",
        }
    }
}

pub use meridian_common::address::AddressError;

/// Parses `host:port` (`[v6]:port` for IPv6) by the mesh's one rule (`meridian_common::address`),
/// the one the control plane and the agent check with: a port in 1..=65535 is required; hosts
/// are names or IP literals.
pub fn parse_address(value: &str) -> Result<Authority, AddressError> {
    meridian_common::address::parse_host_port(value)?;
    // Every character is valid in an authority by now; this cannot fail, but never panic.
    Authority::try_from(value).map_err(|_| AddressError::BadHost('?'))
}

/// One `host:port`. Every field is an atomic: the request path reads and updates them without
/// a lock, and a lost update under a race costs only a slightly stale estimate.
#[derive(Debug)]
pub struct EndpointState {
    address: String,
    authority: Authority,
    in_flight: AtomicUsize,
    ewma_ns: AtomicU64,
    ewma_stamp: AtomicU64,
    consecutive_failures: AtomicU32,
    /// Clock nanos until which the endpoint is ejected; 0 = never ejected.
    ejected_until: AtomicU64,
    /// How many ejections in a row (the backoff exponent).
    ejection_level: AtomicU32,
    ejections: AtomicU64,
    probe: AtomicU8,
    rtt_ns: AtomicU64,
    /// Why the last probe failed; cleared by a successful one. Written by the prober and read
    /// by `explain` only, never on the request path.
    probe_error: ArcSwapOption<String>,
}

impl EndpointState {
    pub fn new(address: String, authority: Authority) -> Self {
        Self {
            address,
            authority,
            in_flight: AtomicUsize::new(0),
            ewma_ns: AtomicU64::new(nanos(DEFAULT_RTT)),
            ewma_stamp: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejection_level: AtomicU32::new(0),
            ejections: AtomicU64::new(0),
            probe: AtomicU8::new(ProbeState::Unknown.as_u8()),
            rtt_ns: AtomicU64::new(0),
            probe_error: ArcSwapOption::empty(),
        }
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// The address as a URI authority, ready to put in a request URI.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Peak-EWMA latency estimate in nanoseconds.
    pub fn ewma_ns(&self) -> u64 {
        self.ewma_ns.load(Ordering::Relaxed)
    }

    /// The load P2C compares: outstanding requests (plus the one being placed) times latency.
    pub fn cost(&self) -> u128 {
        let in_flight = u128::try_from(self.in_flight()).unwrap_or(u128::MAX);
        (in_flight + 1).saturating_mul(u128::from(self.ewma_ns()))
    }

    /// Counts a request as outstanding until the returned guard is dropped.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint: Arc::clone(self),
        }
    }

    /// Peak EWMA: a slower sample is taken at once (react to trouble fast), a faster one is
    /// blended in with a weight that grows with the time since the last sample.
    pub fn observe_latency(&self, now: u64, latency: Duration) {
        let sample = nanos(latency).max(1);
        let previous_stamp = self.ewma_stamp.swap(now, Ordering::Relaxed);
        let current = self.ewma_ns();
        let next = if sample >= current || previous_stamp == 0 {
            sample
        } else {
            let elapsed = now.saturating_sub(previous_stamp) as f64;
            let decay = (-elapsed / nanos(EWMA_DECAY) as f64).exp();
            let blended = current as f64 * decay + sample as f64 * (1.0 - decay);
            blended.max(1.0) as u64
        };
        self.ewma_ns.store(next, Ordering::Relaxed);
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// A response that is not a failure: resets the failure streak, and the ejection history
    /// once the last ejection is long enough past.
    pub fn record_success(&self, now: u64) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if self.ejection_level.load(Ordering::Relaxed) != 0 {
            let until = self.ejected_until.load(Ordering::Relaxed);
            if now >= until.saturating_add(nanos(EJECTION_MEMORY)) {
                self.ejection_level.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Counts a failure; returns the length of the streak it extends.
    pub fn record_failure(&self) -> u32 {
        self.consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1)
    }

    /// Counts a failure that says nothing is there (the address refused or never answered the
    /// connection): the streak jumps to [`FAILURE_THRESHOLD`]. Unlike a slow or failed answer,
    /// it does not depend on load, and waiting for a streak of them only sends more requests to
    /// an endpoint known to be gone.
    pub fn record_unreachable(&self) -> u32 {
        self.consecutive_failures
            .fetch_max(FAILURE_THRESHOLD - 1, Ordering::Relaxed);
        self.record_failure()
    }

    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    /// Remaining ejection time, if ejected.
    pub fn ejected_for(&self, now: u64) -> Option<Duration> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        (until > now).then(|| Duration::from_nanos(until - now))
    }

    /// Total ejections since the sidecar started.
    pub fn ejections(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Ejects for the next backoff step (1 s, 2 s, 4 s ... 30 s). Returns `None` if the
    /// endpoint is already ejected (a concurrent failure got there first).
    pub fn eject(&self, now: u64) -> Option<Duration> {
        let current = self.ejected_until.load(Ordering::Relaxed);
        if current > now {
            return None;
        }
        let level = self.ejection_level.load(Ordering::Relaxed);
        let duration = ejection_duration(level);
        let until = now.saturating_add(nanos(duration));
        self.ejected_until
            .compare_exchange(current, until, Ordering::AcqRel, Ordering::Relaxed)
            .ok()?;
        self.ejection_level
            .store(level.saturating_add(1), Ordering::Relaxed);
        self.ejections.fetch_add(1, Ordering::Relaxed);
        // One more failure after the ejection ends ejects again (with a longer backoff); a
        // success clears the streak.
        self.consecutive_failures
            .store(FAILURE_THRESHOLD - 1, Ordering::Relaxed);
        Some(duration)
    }

    pub fn probe_state(&self) -> ProbeState {
        ProbeState::from_u8(self.probe.load(Ordering::Relaxed))
    }

    /// Last probe round-trip time, if a probe ever succeeded.
    pub fn rtt(&self) -> Option<Duration> {
        match self.rtt_ns.load(Ordering::Relaxed) {
            0 => None,
            rtt => Some(Duration::from_nanos(rtt)),
        }
    }

    pub fn probe_succeeded(&self, rtt: Duration) {
        self.rtt_ns.store(nanos(rtt).max(1), Ordering::Relaxed);
        self.probe.store(ProbeState::Up.as_u8(), Ordering::Relaxed);
        if self.probe_error.load().is_some() {
            self.probe_error.store(None);
        }
    }

    /// A probe failed for `why`: marks the gateway down and keeps the reason for `explain`.
    pub fn probe_failed(&self, why: String) {
        self.probe_error.store(Some(Arc::new(why)));
        self.mark_down();
    }

    /// Why the last probe failed, unless one succeeded since.
    pub fn probe_error(&self) -> Option<Arc<String>> {
        self.probe_error.load_full()
    }

    /// A failed probe or connection: no traffic until the next successful probe. The last RTT
    /// is kept, so the region's place in the measured order survives a blip.
    pub fn mark_down(&self) {
        self.probe
            .store(ProbeState::Down.as_u8(), Ordering::Relaxed);
    }
}

/// The ejection time after `level` earlier ejections in a row.
pub fn ejection_duration(level: u32) -> Duration {
    let factor = 1u32.checked_shl(level.min(16)).unwrap_or(u32::MAX);
    BASE_EJECTION.saturating_mul(factor).min(MAX_EJECTION)
}

/// An outstanding request on an endpoint; dropping it (when the response body ends or is
/// dropped) ends the request for load balancing.
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<EndpointState>,
}

impl InFlight {
    pub fn endpoint(&self) -> &Arc<EndpointState> {
        &self.endpoint
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Hands out one [`EndpointState`] per address. Holds weak references: an address no table uses
/// any more is forgotten once the last state naming it is dropped.
#[derive(Debug, Default)]
pub struct EndpointRegistry {
    clock: Clock,
    entries: Mutex<HashMap<String, Weak<EndpointState>>>,
}

impl EndpointRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// The state for `address`, created if no live table uses the address yet. Called while
    /// compiling a table, never on the request path.
    pub fn get(&self, address: &str, authority: &Authority) -> Arc<EndpointState> {
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(existing) = entries.get(address).and_then(Weak::upgrade) {
            return existing;
        }
        let state = Arc::new(EndpointState::new(address.to_owned(), authority.clone()));
        entries.insert(address.to_owned(), Arc::downgrade(&state));
        state
    }

    /// Drops entries whose state no table holds any more.
    pub fn prune(&self) {
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.retain(|_, weak| weak.strong_count() > 0);
    }

    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Arc<EndpointState> {
        let authority = Authority::from_static("127.0.0.1:9000");
        Arc::new(EndpointState::new("127.0.0.1:9000".into(), authority))
    }

    #[test]
    fn registry_reuses_state_while_it_is_alive() {
        let registry = EndpointRegistry::new();
        let authority = Authority::from_static("127.0.0.1:9000");
        let a = registry.get("127.0.0.1:9000", &authority);
        let b = registry.get("127.0.0.1:9000", &authority);
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        registry.prune();
        assert!(registry.is_empty());
    }

    #[test]
    fn ejection_backs_off_and_caps() {
        let levels: Vec<u64> = (0..8).map(|l| ejection_duration(l).as_secs()).collect();
        assert_eq!(levels, vec![1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn an_unreachable_endpoint_reaches_the_threshold_at_once() {
        let e = endpoint();
        assert_eq!(e.record_failure(), 1);
        assert_eq!(e.record_unreachable(), FAILURE_THRESHOLD);
        assert_eq!(e.record_unreachable(), FAILURE_THRESHOLD + 1);
        e.record_success(1);
        assert_eq!(e.record_unreachable(), FAILURE_THRESHOLD);
    }

    #[test]
    fn eject_only_once_while_ejected() {
        let e = endpoint();
        let now = 1_000;
        assert_eq!(e.eject(now), Some(Duration::from_secs(1)));
        assert_eq!(e.eject(now + 5), None, "already ejected");
        assert!(e.is_ejected(now + 1));
        let after = now + nanos(Duration::from_secs(1));
        assert!(!e.is_ejected(after));
        assert_eq!(e.eject(after), Some(Duration::from_secs(2)));
        assert_eq!(e.ejections(), 2);
    }

    #[test]
    fn success_long_after_ejection_resets_backoff() {
        let e = endpoint();
        e.eject(1);
        e.record_success(2);
        assert_eq!(e.consecutive_failures(), 0);
        let later = nanos(BASE_EJECTION + EJECTION_MEMORY) + 10;
        e.record_success(later);
        assert_eq!(e.eject(later), Some(BASE_EJECTION));
    }

    #[test]
    fn peak_ewma_takes_peaks_and_decays_slowly() {
        let e = endpoint();
        e.observe_latency(1, Duration::from_millis(10));
        assert_eq!(e.ewma_ns(), 10_000_000);
        // A faster sample right after barely moves the estimate.
        e.observe_latency(2, Duration::from_millis(1));
        assert!(e.ewma_ns() > 9_000_000);
        // Long after, the faster sample dominates.
        e.observe_latency(nanos(Duration::from_secs(100)), Duration::from_millis(1));
        assert!(e.ewma_ns() < 1_100_000);
        // A slow sample is taken as is.
        e.observe_latency(nanos(Duration::from_secs(101)), Duration::from_millis(50));
        assert_eq!(e.ewma_ns(), 50_000_000);
    }

    #[test]
    fn in_flight_guard_counts() {
        let e = endpoint();
        let a = e.start_request();
        let b = e.start_request();
        assert_eq!(e.in_flight(), 2);
        drop(a);
        assert_eq!(e.in_flight(), 1);
        drop(b);
        assert_eq!(e.in_flight(), 0);
    }

    #[test]
    fn parses_addresses_like_the_agent() {
        assert!(parse_address("127.0.0.1:9000").is_ok());
        assert!(parse_address("[::1]:80").is_ok());
        assert!(parse_address("gw.example:1").is_ok());
        assert_eq!(parse_address("h"), Err(AddressError::MissingPort));
        assert_eq!(parse_address(":80"), Err(AddressError::EmptyHost));
        assert_eq!(parse_address("h:0"), Err(AddressError::BadPort("0".into())));
        assert_eq!(
            parse_address("h:+80"),
            Err(AddressError::BadPort("+80".into()))
        );
        assert_eq!(parse_address("a/b:80"), Err(AddressError::BadHost('/')));
        assert_eq!(parse_address("[::1]"), Err(AddressError::MissingPort));
    }
}
