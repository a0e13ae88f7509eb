//! The one accept/serve loop of every Meridian HTTP listener (admin listeners, the sidecar's
//! outbound and gateway listeners, the sample function), with its limits written once: a
//! header-read timeout, an idle timeout, a connection cap that evicts the oldest idle connection
//! before it refuses one, HTTP/2 stream and rapid-reset limits, a graceful stop, and a
//! `meridian-error` header on hyper's own 4xx answers to requests it cannot parse.
//!
//! Why the timeouts are ours and not hyper's: hyper's HTTP/1 `header_read_timeout` is armed as
//! soon as a connection waits for a request head, so it also closes every idle keep-alive
//! connection after the header-read timeout, and hyper has no idle timeout for HTTP/1 at all.
//! Here a per-connection watchdog reads two facts the connection's IO and service keep up to
//! date: since when no request has been in flight (idle), and since when the bytes of a request
//! head have been arriving without the head being complete (header read).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

/// The limits of one listener. [`ServeLimits::default`] is the proxy listeners' set,
/// [`ServeLimits::admin`] the admin listeners'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeLimits {
    /// A request head (request line and headers) must arrive within this time of its first byte;
    /// beyond, the connection is closed (slowloris).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Open connections at most. At the cap a new connection first evicts the oldest idle one;
    /// with none idle it is answered `503` `meridian-error: connection-limit` and closed.
    pub max_connections: usize,
    /// HTTP/2 streams in flight per connection at most (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 streams a client may reset before the server accepted them, at most at a time;
    /// beyond, the connection gets GOAWAY (rapid reset, CVE-2023-44487).
    pub h2_max_pending_accept_reset_streams: usize,
    /// HTTP/2 streams the server may reset for a client's protocol errors, at most per
    /// connection; beyond, GOAWAY.
    pub h2_max_local_error_reset_streams: usize,
    /// After the stop, how long open connections may finish before they are dropped.
    pub shutdown_grace: Duration,
}

/// Proxy listeners: open connections at most.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Admin listeners (scrapers, probes, the agent): open connections at most.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 256;
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// hyper's and h2's own default, stated here so that it is a decision, not an accident.
pub const DEFAULT_H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// h2's own default, stated here for the same reason.
pub const DEFAULT_H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            h2_max_concurrent_streams: DEFAULT_H2_MAX_CONCURRENT_STREAMS,
            h2_max_pending_accept_reset_streams: DEFAULT_H2_MAX_PENDING_ACCEPT_RESET_STREAMS,
            h2_max_local_error_reset_streams: DEFAULT_H2_MAX_LOCAL_ERROR_RESET_STREAMS,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

impl ServeLimits {
    /// The admin listeners' limits: the proxy's, with a smaller connection cap.
    pub fn admin() -> Self {
        Self {
            max_connections: DEFAULT_ADMIN_MAX_CONNECTIONS,
            ..Self::default()
        }
    }

    /// Writes the HTTP/2 limits into `builder`. [`serve`] calls it; it is public so that a
    /// caller can see what a builder will run with.
    pub fn apply(&self, builder: &mut auto::Builder<TokioExecutor>) {
        builder
            .http2()
            // h2's keep-alive and reset bookkeeping need a timer.
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.h2_max_concurrent_streams)
            .max_pending_accept_reset_streams(self.h2_max_pending_accept_reset_streams)
            .max_local_error_reset_streams(self.h2_max_local_error_reset_streams);
    }
}

/// The connection metrics of every listener of a process, labelled by listener.
#[derive(Debug, Clone, Default)]
pub struct ConnectionMetrics {
    open: Family<Vec<(String, String)>, Gauge>,
    accepted: Family<Vec<(String, String)>, Counter>,
    refused: Family<Vec<(String, String)>, Counter>,
    evicted: Family<Vec<(String, String)>, Counter>,
    timed_out: Family<Vec<(String, String)>, Counter>,
    accept_errors: Family<Vec<(String, String)>, Counter>,
}

impl ConnectionMetrics {
    /// Registers the families in `registry` (the `_total` suffix is prometheus-client's).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "meridian_connections_open",
            "Open connections, by listener.",
            self.open.clone(),
        );
        registry.register(
            "meridian_connections_accepted",
            "Connections accepted, by listener.",
            self.accepted.clone(),
        );
        registry.register(
            "meridian_connections_refused",
            "Connections refused at accept with 503 connection-limit (the cap reached, none idle to evict), by listener.",
            self.refused.clone(),
        );
        registry.register(
            "meridian_connections_evicted",
            "Idle connections closed to make room for a new one at the cap, by listener.",
            self.evicted.clone(),
        );
        registry.register(
            "meridian_connections_timed_out",
            "Connections closed by a timeout, by listener and timeout (header-read, idle).",
            self.timed_out.clone(),
        );
        registry.register(
            "meridian_connections_accept_errors",
            "Failed accepts (e.g. out of file descriptors), by listener.",
            self.accept_errors.clone(),
        );
    }

    /// The handles of one listener.
    pub fn listener(&self, name: &str) -> ListenerMetrics {
        let labels = vec![("listener".to_owned(), name.to_owned())];
        let timeout = |kind: &str| {
            let mut labels = labels.clone();
            labels.push(("timeout".to_owned(), kind.to_owned()));
            self.timed_out.get_or_create(&labels).clone()
        };
        ListenerMetrics {
            open: self.open.get_or_create(&labels).clone(),
            accepted: self.accepted.get_or_create(&labels).clone(),
            refused: self.refused.get_or_create(&labels).clone(),
            evicted: self.evicted.get_or_create(&labels).clone(),
            header_timeouts: timeout("header-read"),
            idle_timeouts: timeout("idle"),
            accept_errors: self.accept_errors.get_or_create(&labels).clone(),
        }
    }
}

/// One listener's connection metrics. `Default` is a set registered nowhere.
#[derive(Debug, Clone, Default)]
pub struct ListenerMetrics {
    pub open: Gauge,
    pub accepted: Counter,
    pub refused: Counter,
    pub evicted: Counter,
    pub header_timeouts: Counter,
    pub idle_timeouts: Counter,
    pub accept_errors: Counter,
}

/// Milliseconds on tokio's clock (so that tests can pause it), since the loop started. 0 means
/// "never" in the connection state, so times are stored plus one.
#[derive(Debug, Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now(self) -> u64 {
        u64::try_from(self.0.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
    }

    fn instant(self, at: u64) -> Instant {
        self.0 + Duration::from_millis(at.saturating_sub(1))
    }
}

/// What the watchdog of one connection reads; written by its IO wrapper and its service.
#[derive(Debug)]
struct ConnState {
    clock: Clock,
    /// When the connection was accepted.
    accepted_at: u64,
    /// Requests between the service call and the end (or drop) of their response body.
    in_flight: AtomicU32,
    /// When `in_flight` last became 0 (or the connection was accepted).
    idle_since: AtomicU64,
    /// When the first byte of a request head arrived while no request was in flight; 0: none.
    head_since: AtomicU64,
    /// Some request reached the service (for eviction: a connection never used goes first).
    served_any: AtomicBool,
    /// How many times `in_flight` became 0.
    idle_seq: AtomicU64,
    /// `idle_seq` at the last flush with no request in flight: equal to it when every byte of
    /// the finished responses has been written out.
    flushed_seq: AtomicU64,
    /// The connection speaks HTTP/2 (prior knowledge preface seen): no header-read timeout,
    /// since its frames are not request heads.
    h2: AtomicBool,
    /// The first read was seen (the protocol is known).
    first_read_seen: AtomicBool,
    /// The serve loop is stopping: drain the connection rather than close it at once.
    stopping: AtomicBool,
    /// Wakes the connection's task to close it: evicted, or (with `stopping`) the loop stops.
    /// One wake-up source rather than two, since every wake-up of the task polls each of them.
    wake: Notify,
}

impl ConnState {
    fn new(clock: Clock) -> Self {
        Self {
            clock,
            accepted_at: clock.now(),
            in_flight: AtomicU32::new(0),
            idle_since: AtomicU64::new(clock.now()),
            head_since: AtomicU64::new(0),
            served_any: AtomicBool::new(false),
            idle_seq: AtomicU64::new(0),
            flushed_seq: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            first_read_seen: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }

    fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(0, Ordering::Release);
        if !self.served_any.load(Ordering::Relaxed) {
            self.served_any.store(true, Ordering::Release);
        }
        InFlight(Arc::clone(self))
    }

    fn bytes_read(&self, bytes: &[u8]) {
        if !self.first_read_seen.load(Ordering::Relaxed) {
            self.first_read_seen.store(true, Ordering::Relaxed);
            // The HTTP/2 prior-knowledge preface starts "PRI * HTTP/2.0".
            if bytes.starts_with(b"PRI ") {
                self.h2.store(true, Ordering::Release);
            }
        }
        if self.h2.load(Ordering::Relaxed) || !self.is_idle() {
            return;
        }
        if self.head_since.load(Ordering::Relaxed) == 0 {
            self.head_since.store(self.clock.now(), Ordering::Release);
        }
    }
}

/// Held from the service call until the response body ends or is dropped.
#[derive(Debug)]
struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0
                .idle_since
                .store(self.0.clock.now(), Ordering::Release);
            self.0.idle_seq.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// What the watchdog decides at a check.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Nothing expired; look again at this time (ms on the clock).
    CheckAt(u64),
    HeaderReadTimeout,
    IdleTimeout,
}

fn verdict(state: &ConnState, limits: &ServeLimits, now: u64) -> Verdict {
    let header_ms = u64::try_from(limits.header_read_timeout.as_millis()).unwrap_or(u64::MAX);
    let idle_ms = u64::try_from(limits.idle_timeout.as_millis()).unwrap_or(u64::MAX);
    if !state.is_idle() {
        // Busy: look again after the shorter timeout; a head or idle period that starts
        // meanwhile starts after now, so it cannot expire before that look.
        return Verdict::CheckAt(now.saturating_add(header_ms.min(idle_ms)));
    }
    let head_since = state.head_since.load(Ordering::Acquire);
    if head_since != 0 {
        let head_deadline = head_since.saturating_add(header_ms);
        if now >= head_deadline {
            return Verdict::HeaderReadTimeout;
        }
    }
    let idle_deadline = state
        .idle_since
        .load(Ordering::Acquire)
        .saturating_add(idle_ms);
    if now >= idle_deadline {
        return Verdict::IdleTimeout;
    }
    // A head that starts after now expires no earlier than now + header_ms.
    let head_deadline = if head_since != 0 {
        head_since.saturating_add(header_ms)
    } else {
        now.saturating_add(header_ms)
    };
    Verdict::CheckAt(idle_deadline.min(head_deadline))
}

/// The `meridian-error` cause of one of hyper's automatic answers, from its status code.
fn parse_error_cause(status: &[u8]) -> &'static str {
    match status {
        b"431" => "headers-too-large",
        b"414" => "uri-too-long",
        _ => "bad-request",
    }
}

/// If `head` is one of hyper's automatic answers (`HTTP/1.1 4xx ...\r\n...`), the same bytes
/// with `meridian-error: <cause>` after the status line; else `None`.
fn with_meridian_error(head: &[u8]) -> Option<Vec<u8>> {
    const PREFIX: &[u8] = b"HTTP/1.1 4";
    if !head.starts_with(PREFIX) || head.len() < 12 {
        return None;
    }
    let line_end = head.windows(2).position(|w| w == b"\r\n")? + 2;
    let cause = parse_error_cause(&head[9..12]);
    let mut out = Vec::with_capacity(head.len() + 40);
    out.extend_from_slice(&head[..line_end]);
    out.extend_from_slice(b"meridian-error: ");
    out.extend_from_slice(cause.as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&head[line_end..]);
    Some(out)
}

/// The accepted stream as hyper sees it: reads and writes pass through, noting what the
/// watchdog needs, and hyper's automatic 400/414/431 answer to a request head it could not parse
/// gets `meridian-error`.
///
/// Such an answer is told from a service's response, without parsing hyper's output, by when it
/// is written (HTTP/1 only): no request is in flight, every byte of the previous responses has
/// been written out (hyper flushes its IO only once its buffer is empty, and a response's bytes
/// are all in that buffer by the time its body is dropped), and bytes of a new head have been
/// read since the last request reached the service. A service's response is never written in
/// that state: its request reached the service after those bytes, or its body ended after the
/// last flush. What this misses (a malformed request pipelined behind another, already read with
/// it) goes out as hyper writes it; nothing is ever rewritten wrongly.
#[derive(Debug)]
struct TrackedIo<T> {
    inner: T,
    state: Arc<ConnState>,
    /// A rewritten write still being written: the bytes, how many are out, and how many bytes of
    /// hyper's buffer it stands for (reported once all are out).
    pending: Option<(Vec<u8>, usize, usize)>,
}

impl<T> TrackedIo<T> {
    fn new(inner: T, state: Arc<ConnState>) -> Self {
        Self {
            inner,
            state,
            pending: None,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TrackedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let read = &buf.filled()[before..];
            if !read.is_empty() {
                this.state.bytes_read(read);
            }
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> TrackedIo<T> {
    /// Writes out the rewritten first write; `Ready(Ok(n))` reports hyper's `n` bytes.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        while let Some((bytes, written, stands_for)) = self.pending.as_mut() {
            if *written == bytes.len() {
                let n = *stands_for;
                self.pending = None;
                return Poll::Ready(Ok(n));
            }
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]) {
                Poll::Ready(Ok(0)) => {
                    self.pending = None;
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(error)) => {
                    self.pending = None;
                    return Poll::Ready(Err(error));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(0))
    }

    /// Whether `buf` is one of hyper's automatic answers (see the type's documentation).
    fn is_automatic_answer(&self, buf: &[u8]) -> bool {
        let state = &self.state;
        buf.starts_with(b"HTTP/1.1 4")
            && !state.h2.load(Ordering::Acquire)
            && state.is_idle()
            && state.head_since.load(Ordering::Acquire) != 0
            && state.flushed_seq.load(Ordering::Acquire) == state.idle_seq.load(Ordering::Acquire)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TrackedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pending.is_some() {
            // hyper calls again with the same buffer until it is reported written.
            return this.poll_pending(cx);
        }
        if this.is_automatic_answer(buf) {
            if let Some(bytes) = with_meridian_error(buf) {
                this.pending = Some((bytes, 0, buf.len()));
                return this.poll_pending(cx);
            }
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| b);
        if this.pending.is_some() || this.is_automatic_answer(first) {
            // Through `poll_write` with the first slice alone: a head hyper wrote is in one.
            return Pin::new(this).poll_write(cx, first);
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = result {
            let state = &this.state;
            if state.is_idle() {
                // Everything of the responses finished so far is out.
                state
                    .flushed_seq
                    .store(state.idle_seq.load(Ordering::Acquire), Ordering::Release);
            }
        }
        result
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A response body that holds its request's [`InFlight`] until it ends or is dropped.
#[derive(Debug)]
pub struct TrackedBody<B> {
    inner: B,
    in_flight: Option<InFlight>,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = result {
            this.in_flight = None;
        }
        result
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The open connections of one listener, oldest first, for eviction.
#[derive(Debug, Default)]
struct Connections {
    next_id: u64,
    open: BTreeMap<u64, Arc<ConnState>>,
}

impl Connections {
    /// Removes the oldest connection with no request in flight and tells it to close. One that
    /// has sent no request in its first [`EVICTION_GRACE`] goes first (an idle flood or a
    /// slowloris, and never a client about to reuse its keep-alive connection, nor one whose
    /// first request is still on its way), then the oldest idle one.
    fn evict_oldest_idle(&mut self) -> bool {
        let never_served = self.open.iter().find(|(_, state)| {
            state.is_idle()
                && !state.served_any.load(Ordering::Acquire)
                && state.clock.now().saturating_sub(state.accepted_at) >= EVICTION_GRACE_MS
        });
        let Some(id) = never_served
            .or_else(|| self.open.iter().find(|(_, state)| state.is_idle()))
            .map(|(id, _)| *id)
        else {
            return false;
        };
        if let Some(state) = self.open.remove(&id) {
            // notify_one stores a permit, so a watchdog that is not waiting yet still sees it.
            state.wake.notify_one();
        }
        true
    }
}

/// How long a new connection may take to send its first request before it counts as unused for
/// eviction.
pub const EVICTION_GRACE: Duration = Duration::from_secs(1);
const EVICTION_GRACE_MS: u64 = 1000;

/// The refusal at the connection cap, written before any byte is read.
fn connection_limit_response(limit: usize) -> Vec<u8> {
    let body = format!(
        "meridian: connection-limit: this listener has {limit} connections open, none idle\n"
    );
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nmeridian-error: connection-limit\r\nconnection: close\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Refused connections lingering (answer written, waiting for the client's bytes to drain so
/// that closing sends FIN, not RST, and the client reads the answer) at most at once; beyond,
/// they are closed at once.
const MAX_LINGERING_REFUSALS: u32 = 256;
/// How long a refused connection lingers at most.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);

/// Answers a refused connection and closes it.
fn refuse(mut stream: TcpStream, answer: Arc<[u8]>, lingering: Arc<AtomicU32>) {
    // A fresh socket's send buffer is empty: the short answer fits at once.
    let _ = stream.try_write(&answer);
    if lingering.fetch_add(1, Ordering::AcqRel) >= MAX_LINGERING_REFUSALS {
        lingering.fetch_sub(1, Ordering::AcqRel);
        return;
    }
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 4096];
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            while let Ok(n) = stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        lingering.fetch_sub(1, Ordering::AcqRel);
    });
}

/// Whether an accept error means this process is out of descriptors (or the system is).
fn out_of_descriptors(error: &io::Error) -> bool {
    // EMFILE 24, ENFILE 23 on Linux; also ENOBUFS/ENOMEM, which are resource exhaustion too.
    matches!(error.raw_os_error(), Some(23 | 24 | 105 | 12))
}

/// Accept errors logged at most once per this interval (the rest are counted).
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(1);
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// A listener served by [`serve`]: its name (for logs and the `listener` label), limits and
/// metrics.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub name: String,
    pub limits: ServeLimits,
    pub metrics: ListenerMetrics,
}

impl ServeConfig {
    pub fn new(name: impl Into<String>, limits: ServeLimits, metrics: ListenerMetrics) -> Self {
        Self {
            name: name.into(),
            limits,
            metrics,
        }
    }
}

/// Serves HTTP/1.1 and h2c on `listener` with `builder` (the caller's protocol settings; the
/// HTTP/2 limits of `config` are applied on top), every request answered by `handler`, until
/// `shutdown` resolves; open connections then get `config.limits.shutdown_grace` to finish.
pub async fn serve<H, F, B>(
    listener: TcpListener,
    mut builder: auto::Builder<TokioExecutor>,
    config: ServeConfig,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    config.limits.apply(&mut builder);
    let clock = Clock(Instant::now());
    let connections = Arc::new(Mutex::new(Connections::default()));
    let limits = Arc::new(config.limits.clone());
    let metrics = config.metrics.clone();
    let refusal: Arc<[u8]> = connection_limit_response(limits.max_connections).into();
    let lingering = Arc::new(AtomicU32::new(0));
    // Every connection task holds a sender; when all are gone, every connection has closed.
    let (alive, mut all_closed) = mpsc::channel::<()>(1);
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut last_error_log: Option<Instant> = None;
    let mut suppressed_errors = 0u64;
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                stream
            }
            Err(error) => {
                metrics.accept_errors.inc();
                let now = Instant::now();
                if last_error_log.is_none_or(|at| now - at >= ACCEPT_ERROR_LOG_INTERVAL) {
                    tracing::warn!(listener = %config.name, %error, suppressed = suppressed_errors, "accept failed; backing off");
                    last_error_log = Some(now);
                    suppressed_errors = 0;
                } else {
                    suppressed_errors += 1;
                }
                if out_of_descriptors(&error) {
                    // Free a descriptor for the connection waiting in the backlog.
                    if let Ok(mut registry) = connections.lock() {
                        if registry.evict_oldest_idle() {
                            metrics.evicted.inc();
                        }
                    }
                }
                // Never spin: the error repeats until a descriptor is free.
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = &mut shutdown => break,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let state = Arc::new(ConnState::new(clock));
        let id = {
            let Ok(mut registry) = connections.lock() else {
                // Poisoned only if a holder panicked; nothing sensible to serve with.
                break;
            };
            if registry.open.len() >= limits.max_connections {
                if registry.evict_oldest_idle() {
                    metrics.evicted.inc();
                } else {
                    drop(registry);
                    metrics.refused.inc();
                    refuse(stream, Arc::clone(&refusal), Arc::clone(&lingering));
                    continue;
                }
            }
            let id = registry.next_id;
            registry.next_id += 1;
            registry.open.insert(id, Arc::clone(&state));
            id
        };
        metrics.accepted.inc();
        metrics.open.inc();
        let _ = stream.set_nodelay(true);
        let task = ConnectionTask {
            builder: builder.clone(),
            limits: Arc::clone(&limits),
            metrics: metrics.clone(),
            state,
        };
        let handler = handler.clone();
        let connections = Arc::clone(&connections);
        let alive = alive.clone();
        let open_gauge = metrics.open.clone();
        tokio::spawn(async move {
            task.run(stream, handler).await;
            if let Ok(mut registry) = connections.lock() {
                registry.open.remove(&id);
            }
            open_gauge.dec();
            drop(alive);
        });
    }
    drop(listener);
    if let Ok(registry) = connections.lock() {
        for state in registry.open.values() {
            state.stopping.store(true, Ordering::Release);
            state.wake.notify_one();
        }
    }
    drop(alive);
    if tokio::time::timeout(config.limits.shutdown_grace, all_closed.recv())
        .await
        .is_err()
    {
        tracing::warn!(listener = %config.name, "connections still open after the shutdown grace period");
    }
}

/// One connection: hyper's connection future and its watchdog.
struct ConnectionTask {
    builder: auto::Builder<TokioExecutor>,
    limits: Arc<ServeLimits>,
    metrics: ListenerMetrics,
    state: Arc<ConnState>,
}

impl ConnectionTask {
    async fn run<I, H, F, B>(self, io: I, handler: H)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<B>> + Send + 'static,
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let state = Arc::clone(&self.state);
        let service = service_fn(move |request: Request<Incoming>| {
            let in_flight = state.request_started();
            let response = handler(request);
            async move {
                let response = response.await;
                Ok::<_, Infallible>(response.map(|inner| TrackedBody {
                    inner,
                    in_flight: Some(in_flight),
                }))
            }
        });
        let io = TokioIo::new(TrackedIo::new(io, Arc::clone(&self.state)));
        let connection = self.builder.serve_connection(io, service).into_owned();
        tokio::pin!(connection);
        let clock = self.state.clock;
        let mut check_at = clock.now();
        let mut draining = false;
        loop {
            tokio::select! {
                // In this order, not at random: the connection is polled first on every wake-up
                // (most are its IO), and no random draw is made per wake-up.
                biased;
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                    return;
                }
                _ = tokio::time::sleep_until(clock.instant(check_at)), if !draining => {
                    match verdict(&self.state, &self.limits, clock.now()) {
                        Verdict::CheckAt(at) => check_at = at,
                        Verdict::HeaderReadTimeout => {
                            self.metrics.header_timeouts.inc();
                            // Dropping the connection closes it; there is no request to answer.
                            return;
                        }
                        Verdict::IdleTimeout => {
                            self.metrics.idle_timeouts.inc();
                            if self.state.h2.load(Ordering::Acquire) {
                                // GOAWAY first, so the client knows not to start a stream.
                                connection.as_mut().graceful_shutdown();
                                draining = true;
                            } else {
                                return;
                            }
                        }
                    }
                }
                _ = self.state.wake.notified(), if !draining => {
                    if !self.state.stopping.load(Ordering::Acquire) {
                        // Evicted: idle, so there is nothing to finish.
                        return;
                    }
                    connection.as_mut().graceful_shutdown();
                    draining = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn inserts_meridian_error_after_hypers_status_line() {
        // What hyper 1.x writes for a head it cannot parse (role.rs `on_error` + `encode`).
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let out = with_meridian_error(head).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 431 Request Header Fields Too Large\r\nmeridian-error: headers-too-large\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n"
        );
        let out = with_meridian_error(b"HTTP/1.1 414 URI Too Long\r\n\r\n").unwrap();
        assert!(out.starts_with(b"HTTP/1.1 414 URI Too Long\r\nmeridian-error: uri-too-long\r\n"));
        let out = with_meridian_error(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
        assert!(out.starts_with(b"HTTP/1.1 400 Bad Request\r\nmeridian-error: bad-request\r\n"));
        assert!(with_meridian_error(b"HTTP/1.1 200 OK\r\n\r\n").is_none());
        assert!(with_meridian_error(b"HTTP/1.1 404 Not Found").is_none());
        assert!(with_meridian_error(b"\x00\x00\x12\x04").is_none());
    }

    /// A loop on a fresh loopback port with `limits`, answering "ok" (or after `delay`).
    async fn start(
        limits: ServeLimits,
        delay: Duration,
    ) -> (
        std::net::SocketAddr,
        ListenerMetrics,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let metrics = ConnectionMetrics::default().listener("test");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config = ServeConfig::new("test", limits, metrics.clone());
        let server = tokio::spawn(serve(
            listener,
            auto::Builder::new(TokioExecutor::new()),
            config,
            move |_request: Request<Incoming>| async move {
                tokio::time::sleep(delay).await;
                Response::new(Full::new(Bytes::from_static(b"ok")))
            },
            async {
                let _ = stopped.await;
            },
        ));
        (address, metrics, stop, server)
    }

    async fn read_all(stream: &mut TcpStream) -> String {
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn get(address: std::net::SocketAddr) -> String {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        read_all(&mut stream).await
    }

    #[tokio::test]
    async fn too_many_headers_get_431_with_meridian_error() {
        let (address, _, stop, server) = start(ServeLimits::default(), Duration::ZERO).await;
        let mut request = String::from("GET / HTTP/1.1\r\nhost: x\r\n");
        for i in 0..10_000 {
            request.push_str(&format!("x-h{i}: v\r\n"));
        }
        request.push_str("\r\n");
        let mut stream = TcpStream::connect(address).await.unwrap();
        let _ = stream.write_all(request.as_bytes()).await;
        let answer = read_all(&mut stream).await;
        assert!(
            answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\nmeridian-error: headers-too-large\r\n"),
            "{answer}"
        );
        // A normal request is not touched.
        let answer = get(address).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(!answer.contains("meridian-error"), "{answer}");
        // On a keep-alive connection, after a request served: the same.
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 512];
        let n = stream.read(&mut first).await.unwrap();
        assert!(first[..n].starts_with(b"HTTP/1.1 200 OK\r\n"));
        let _ = stream.write_all(request.as_bytes()).await;
        let answer = read_all(&mut stream).await;
        assert!(
            answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\nmeridian-error: headers-too-large\r\n"),
            "{answer}"
        );
        let _ = stop.send(());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn slow_heads_and_idle_connections_are_closed_in_time() {
        let limits = ServeLimits {
            header_read_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(600),
            ..ServeLimits::default()
        };
        let (address, metrics, stop, server) = start(limits, Duration::ZERO).await;
        let started = std::time::Instant::now();
        // Slowloris: a header byte every 100 ms keeps bytes coming but never ends the head.
        let mut slow = TcpStream::connect(address).await.unwrap();
        let slow_task = tokio::spawn(async move {
            let _ = slow.write_all(b"GET / HTTP/1.1\r\n").await;
            loop {
                if slow.write_all(b"x").await.is_err() {
                    break;
                }
                let mut byte = [0u8; 1];
                match tokio::time::timeout(Duration::from_millis(100), slow.read(&mut byte)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    _ => {}
                }
            }
            started.elapsed()
        });
        // Idle: connects and sends nothing.
        let mut idle = TcpStream::connect(address).await.unwrap();
        let idle_closed = read_all(&mut idle).await;
        let idle_after = started.elapsed();
        let slow_after = slow_task.await.unwrap();
        assert_eq!(idle_closed, "");
        assert!(
            slow_after >= Duration::from_millis(300) && slow_after < Duration::from_millis(800),
            "slowloris closed after {slow_after:?}"
        );
        assert!(
            idle_after >= Duration::from_millis(600) && idle_after < Duration::from_millis(1100),
            "idle closed after {idle_after:?}"
        );
        assert_eq!(metrics.header_timeouts.get(), 1);
        assert_eq!(metrics.idle_timeouts.get(), 1);
        // A keep-alive connection that keeps sending requests is not idle.
        let mut busy = TcpStream::connect(address).await.unwrap();
        for _ in 0..8 {
            busy.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            let mut buf = [0u8; 1024];
            let n = busy.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        let _ = stop.send(());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn at_the_cap_the_oldest_idle_connection_is_evicted_else_503() {
        let limits = ServeLimits {
            max_connections: 3,
            ..ServeLimits::default()
        };
        let (address, metrics, stop, server) = start(limits, Duration::from_millis(800)).await;
        let mut idle: Vec<TcpStream> = Vec::new();
        for _ in 0..3 {
            idle.push(TcpStream::connect(address).await.unwrap());
        }
        wait_for(|| metrics.open.get() == 3).await;
        // A fourth evicts the oldest idle one and is served.
        let answer = tokio::spawn(get(address));
        let first = read_all(&mut idle[0]).await;
        assert_eq!(first, "", "the oldest idle connection is closed");
        assert!(answer.await.unwrap().starts_with("HTTP/1.1 200"));
        assert_eq!(metrics.evicted.get(), 1);
        // Three requests in flight: nothing idle to evict, so the next is refused with 503.
        drop(idle);
        wait_for(|| metrics.open.get() == 0).await;
        let busy: Vec<_> = (0..3).map(|_| tokio::spawn(get(address))).collect();
        wait_for(|| metrics.open.get() == 3).await;
        // Their requests reach the service (800 ms each) well within this.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let refused = get(address).await;
        assert!(
            refused.starts_with("HTTP/1.1 503 Service Unavailable\r\nmeridian-error: connection-limit\r\nconnection: close\r\n"),
            "{refused}"
        );
        assert!(refused.ends_with("none idle\n"), "{refused}");
        assert_eq!(metrics.refused.get(), 1);
        for request in busy {
            assert!(request.await.unwrap().starts_with("HTTP/1.1 200"));
        }
        let _ = stop.send(());
        server.await.unwrap();
    }

    async fn wait_for(condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !condition() {
            assert!(Instant::now() < deadline, "condition not met within 5 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_stop_lets_requests_in_flight_finish_and_closes_idle_connections() {
        let (address, metrics, stop, server) =
            start(ServeLimits::default(), Duration::from_millis(300)).await;
        let mut idle = TcpStream::connect(address).await.unwrap();
        let request = tokio::spawn(get(address));
        wait_for(|| metrics.open.get() == 2).await;
        // The request has reached the service (300 ms) well within this.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stopped_at = std::time::Instant::now();
        let _ = stop.send(());
        assert!(request.await.unwrap().starts_with("HTTP/1.1 200"));
        assert_eq!(read_all(&mut idle).await, "");
        server.await.unwrap();
        assert!(
            stopped_at.elapsed() < Duration::from_secs(2),
            "the loop returns once its connections are closed, not after the grace period"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn watchdog_verdicts_on_the_paused_clock() {
        let limits = ServeLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            ..ServeLimits::default()
        };
        let clock = Clock(Instant::now());
        let state = Arc::new(ConnState::new(clock));
        assert_eq!(
            verdict(&state, &limits, clock.now()),
            Verdict::CheckAt(clock.now() + 10_000)
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        state.bytes_read(b"GET / HT");
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert!(matches!(
            verdict(&state, &limits, clock.now()),
            Verdict::CheckAt(_)
        ));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            verdict(&state, &limits, clock.now()),
            Verdict::HeaderReadTimeout
        );
        // The head completes: a request in flight is never timed out.
        let in_flight = state.request_started();
        tokio::time::advance(Duration::from_secs(120)).await;
        assert!(matches!(
            verdict(&state, &limits, clock.now()),
            Verdict::CheckAt(_)
        ));
        drop(in_flight);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(matches!(
            verdict(&state, &limits, clock.now()),
            Verdict::CheckAt(_)
        ));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(verdict(&state, &limits, clock.now()), Verdict::IdleTimeout);
        // HTTP/2 frames are not request heads.
        let h2 = Arc::new(ConnState::new(clock));
        h2.bytes_read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(matches!(
            verdict(&h2, &limits, clock.now()),
            Verdict::CheckAt(_)
        ));
    }

    /// Writes `bytes` through `io` and returns what reached the other end.
    async fn through(
        io: &mut TrackedIo<tokio::io::DuplexStream>,
        client: &mut tokio::io::DuplexStream,
        bytes: &[u8],
    ) -> String {
        let (written, received) = tokio::join!(
            async {
                let n = io.write(bytes).await.unwrap();
                io.flush().await.unwrap();
                n
            },
            async {
                let mut out = Vec::new();
                let mut chunk = [0u8; 7];
                while !out.ends_with(b"\r\n\r\n") {
                    let n = client.read(&mut chunk).await.unwrap();
                    out.extend_from_slice(&chunk[..n]);
                }
                out
            }
        );
        assert_eq!(written, bytes.len(), "hyper is told its own length");
        String::from_utf8(received).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn tracked_io_rewrites_hypers_answers_and_never_a_services() {
        const AUTO_431: &[u8] =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        const WITH_ERROR: &str = "HTTP/1.1 431 Request Header Fields Too Large\r\nmeridian-error: headers-too-large\r\ncontent-length: 0\r\n\r\n";
        let clock = Clock(Instant::now());
        // A pipe that takes 7 bytes at a time: the rewritten head goes out whole all the same.
        let (mut client, server) = tokio::io::duplex(7);
        let state = Arc::new(ConnState::new(clock));
        let mut io = TrackedIo::new(server, Arc::clone(&state));
        // A fresh connection: a head arrives, hyper cannot parse it and answers 431.
        state.bytes_read(b"GET / HTTP/1.1\r\nx-1: a\r\n");
        assert_eq!(through(&mut io, &mut client, AUTO_431).await, WITH_ERROR);

        // Keep-alive: a request reaches the service, which answers 404 with an empty body
        // (dropped before hyper writes the head), while the next request's bytes already arrive.
        let (mut client, server) = tokio::io::duplex(1024);
        let state = Arc::new(ConnState::new(clock));
        let mut io = TrackedIo::new(server, Arc::clone(&state));
        state.bytes_read(b"GET / HTTP/1.1\r\n\r\n");
        drop(state.request_started());
        state.bytes_read(b"GET /next HTTP/1.1\r\n");
        let service_404 = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(
            through(&mut io, &mut client, service_404).await,
            String::from_utf8_lossy(service_404)
        );
        // Once that is out, the next head is refused by hyper: that answer gets the header.
        assert_eq!(through(&mut io, &mut client, AUTO_431).await, WITH_ERROR);

        // A body that looks like an answer, written while its request is in flight, passes.
        let (mut client, server) = tokio::io::duplex(1024);
        let state = Arc::new(ConnState::new(clock));
        let mut io = TrackedIo::new(server, Arc::clone(&state));
        state.bytes_read(b"POST /echo HTTP/1.1\r\n");
        let in_flight = state.request_started();
        state.bytes_read(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        let echoed = b"HTTP/1.1 400 Bad Request\r\n\r\n";
        assert_eq!(
            through(&mut io, &mut client, echoed).await,
            String::from_utf8_lossy(echoed)
        );
        drop(in_flight);
        // Its last bytes written after the body ended (before any flush) pass as well.
        assert_eq!(
            through(&mut io, &mut client, echoed).await,
            String::from_utf8_lossy(echoed)
        );
    }
}
