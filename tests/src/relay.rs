//! Fault-injection TCP relay for cross-region links: added latency per link and direction, and
//! blackhole / reset / heal on command, so that distance and partitions are real at the socket
//! level (`tc netem` is not available here).
//!
//! # Design: one listener per (caller region, target gateway), bound on the caller's address
//!
//! A region's sidecar gateway address is global: every other region's routing table names the
//! same `host:port` (what the target's agent reports as `--gateway`). A relay placed *at* that
//! address cannot tell which region is calling: on loopback the kernel picks `127.0.0.1` as the
//! source address of a connection to `127.0.<i>.1` unless the client binds its socket first,
//! which a sidecar has no reason to do (on separate hosts it would not need to). So the relay
//! does not sit at the advertised address. Instead, between each region's agent and its sidecar
//! the tests run a [`crate::RouteTap`], which passes every routing table through unchanged
//! except that each remote tier's gateway address `G` becomes the address of this relay's link
//! *(caller region, G)*: a listener on the caller's loopback address (region i: `127.0.<i+1>.1`)
//! that forwards to `G`. Every link is then one caller and one target, which makes latency,
//! blackhole and reset per link without guessing who is calling, and the sidecar still measures
//! the link (its probes of `G` go through it).
//!
//! Per link and direction, every chunk read is delayed by the direction's one-way latency before
//! it is written (chunks are queued, not serialized: latency does not cut throughput), in order.
//! Latency is per ordered region pair; by default both directions of a link use the pair's
//! configured one-way latency (us-east↔eu-west 40 ms gives an 80 ms round trip).
//!
//! Faults are per ordered pair `(from, to)` (connections opened by `from` to `to`'s gateways):
//! - **blackhole**: nothing crosses the link in either direction, on existing connections and on
//!   new ones (accepted, as a listener's kernel would, but not forwarded: not even the connect to
//!   the target happens). Bytes sent meanwhile are held, not delivered, the way TCP keeps
//!   retransmitting through a real partition; on heal they flow again. (Dropping them instead
//!   would corrupt any byte stream that outlives the partition, which no real network does.)
//! - **reset**: every existing connection is closed with RST on both sides (SO_LINGER 0), and
//!   every new one is reset at once, until heal.
//! - **heal**: back to normal.
//!
//! A failure on one side (read error, reset, refused connect to the target) is passed on as a
//! reset of the other side; an orderly close (EOF) is passed on as a FIN after the latency.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Largest chunk read at once: a chunk is the unit that gets delayed.
const CHUNK: usize = 64 * 1024;
/// Chunks queued per direction before the reader stops reading (backpressure).
const QUEUED_CHUNKS: usize = 64;
/// How long the relay waits for the target to accept a forwarded connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The fault state of a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Bytes flow (after the link's latency).
    Open,
    /// Nothing flows; connections are held.
    Blackhole,
    /// Every connection is reset.
    Reset,
}

impl fmt::Display for LinkState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LinkState::Open => "open",
            LinkState::Blackhole => "blackhole",
            LinkState::Reset => "reset",
        })
    }
}

/// Settings and counters shared by every listener of one ordered region pair (or one
/// stand-alone [`Link`]): what commands change.
#[derive(Debug)]
pub struct LinkControl {
    state: watch::Sender<LinkState>,
    /// One-way latency from the caller to the target, in nanoseconds.
    forward_ns: AtomicU64,
    /// One-way latency from the target back to the caller, in nanoseconds.
    backward_ns: AtomicU64,
    accepted: AtomicU64,
    forwarded_bytes: AtomicU64,
}

impl LinkControl {
    /// Open, with the given one-way latencies.
    pub fn new(forward: Duration, backward: Duration) -> Arc<LinkControl> {
        Arc::new(LinkControl {
            state: watch::Sender::new(LinkState::Open),
            forward_ns: AtomicU64::new(nanos(forward)),
            backward_ns: AtomicU64::new(nanos(backward)),
            accepted: AtomicU64::new(0),
            forwarded_bytes: AtomicU64::new(0),
        })
    }

    /// Sets the state; existing connections react at once.
    pub fn set_state(&self, state: LinkState) {
        self.state.send_replace(state);
    }

    /// The current state.
    pub fn state(&self) -> LinkState {
        *self.state.borrow()
    }

    /// Sets both one-way latencies (applies to bytes read from now on).
    pub fn set_latency(&self, forward: Duration, backward: Duration) {
        self.forward_ns.store(nanos(forward), Ordering::Relaxed);
        self.backward_ns.store(nanos(backward), Ordering::Relaxed);
    }

    /// `(forward, backward)` one-way latencies.
    pub fn latency(&self) -> (Duration, Duration) {
        (
            Duration::from_nanos(self.forward_ns.load(Ordering::Relaxed)),
            Duration::from_nanos(self.backward_ns.load(Ordering::Relaxed)),
        )
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Bytes written to either side so far.
    pub fn forwarded_bytes(&self) -> u64 {
        self.forwarded_bytes.load(Ordering::Relaxed)
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// One listener forwarding every connection to one target through a [`LinkControl`]. Stops (and
/// drops every connection it relays) when dropped.
pub struct Link {
    listen: SocketAddr,
    target: SocketAddr,
    control: Arc<LinkControl>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("listen", &self.listen)
            .field("target", &self.target)
            .field("state", &self.control.state())
            .finish()
    }
}

impl Link {
    /// Listens on a fresh port of `ip` and relays to `target`. Must run inside a tokio runtime.
    pub fn start(ip: IpAddr, target: SocketAddr, control: Arc<LinkControl>) -> Result<Link> {
        // std bind, then hand to tokio: keeps this callable from synchronous code (the route tap
        // creates links while it rewrites a table).
        let mut last_error = None;
        for _ in 0..5 {
            let port = crate::free_port(ip)?;
            match std::net::TcpListener::bind(SocketAddr::new(ip, port)) {
                Ok(listener) => {
                    listener.set_nonblocking(true)?;
                    let listener = TcpListener::from_std(listener)?;
                    return Ok(Link::serve(listener, target, control));
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(anyhow!(
            "cannot bind a relay listener on {ip}: {last_error:?}"
        ))
    }

    /// Relays connections accepted on `listener` to `target`.
    pub fn serve(listener: TcpListener, target: SocketAddr, control: Arc<LinkControl>) -> Link {
        let listen = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
        let accept_control = Arc::clone(&control);
        let accept_task = tokio::spawn(async move {
            // Owned here so that aborting this task (on drop) drops every relayed connection.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            accept_control.accepted.fetch_add(1, Ordering::Relaxed);
                            connections.spawn(relay_connection(
                                stream,
                                target,
                                Arc::clone(&accept_control),
                            ));
                        }
                        // EMFILE and the like: keep serving the connections we have.
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    },
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Link {
            listen,
            target,
            control,
            accept_task,
        }
    }

    /// Where callers connect.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Where connections are forwarded.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The shared settings.
    pub fn control(&self) -> &Arc<LinkControl> {
        &self.control
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

/// Why a relayed connection ended badly: the other side gets a reset.
#[derive(Debug)]
enum Broken {
    /// A read or write failed (the peer reset, or went away).
    Io,
    /// The link was reset on command.
    Reset,
}

impl From<io::Error> for Broken {
    fn from(_: io::Error) -> Self {
        Broken::Io
    }
}

async fn relay_connection(mut client: TcpStream, target: SocketAddr, control: Arc<LinkControl>) {
    let mut state = control.state.subscribe();
    // Hold a new connection while the link is blackholed; reset it if the link is reset.
    loop {
        let current = *state.borrow_and_update();
        match current {
            LinkState::Open => break,
            LinkState::Reset => return reset(client, None),
            LinkState::Blackhole => {
                if state.changed().await.is_err() {
                    return;
                }
            }
        }
    }
    let mut upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await
    {
        Ok(Ok(upstream)) => upstream,
        // The target is down: the caller sees its connection reset, the nearest thing to the
        // refused connect it would have seen without the relay.
        _ => return reset(client, None),
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let outcome = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        let forward = pump(
            client_read,
            upstream_write,
            &control,
            Direction::Forward,
            state.clone(),
        );
        let backward = pump(
            upstream_read,
            client_write,
            &control,
            Direction::Backward,
            state.clone(),
        );
        let mut reset_watch = state.clone();
        let on_reset = async move {
            loop {
                if *reset_watch.borrow_and_update() == LinkState::Reset {
                    return;
                }
                if reset_watch.changed().await.is_err() {
                    // The control is gone with the relay: nothing will reset us.
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            done = async { tokio::try_join!(forward, backward) } => done.map(|_| ()),
            () = on_reset => Err(Broken::Reset),
        }
    };
    if outcome.is_err() {
        reset(client, Some(upstream));
    }
}

/// Closes with RST (SO_LINGER 0) rather than FIN.
fn reset(client: TcpStream, upstream: Option<TcpStream>) {
    let _ = client.set_zero_linger();
    drop(client);
    if let Some(upstream) = upstream {
        let _ = upstream.set_zero_linger();
        drop(upstream);
    }
}

#[derive(Clone, Copy, Debug)]
enum Direction {
    Forward,
    Backward,
}

/// Copies `reader` to `writer`, each chunk written one latency after it was read, in order;
/// holds the bytes while the link is blackholed.
async fn pump<R, W>(
    mut reader: R,
    mut writer: W,
    control: &LinkControl,
    direction: Direction,
    mut state: watch::Receiver<LinkState>,
) -> Result<(), Broken>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // `None` is the end of the stream (EOF), passed on as a FIN.
    let (tx, mut rx) = mpsc::channel::<(Instant, Option<Bytes>)>(QUEUED_CHUNKS);
    let read = async move {
        loop {
            let mut buf = BytesMut::with_capacity(CHUNK);
            let n = reader.read_buf(&mut buf).await?;
            let latency = match direction {
                Direction::Forward => control.forward_ns.load(Ordering::Relaxed),
                Direction::Backward => control.backward_ns.load(Ordering::Relaxed),
            };
            let due = Instant::now() + Duration::from_nanos(latency);
            let chunk = (n > 0).then(|| buf.freeze());
            let eof = chunk.is_none();
            if tx.send((due, chunk)).await.is_err() || eof {
                return Ok::<(), Broken>(());
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            loop {
                let current = *state.borrow_and_update();
                match current {
                    LinkState::Open => break,
                    LinkState::Reset => return Err(Broken::Reset),
                    LinkState::Blackhole => {
                        if state.changed().await.is_err() {
                            return Err(Broken::Reset);
                        }
                    }
                }
            }
            match chunk {
                Some(bytes) => {
                    writer.write_all(&bytes).await?;
                    control
                        .forwarded_bytes
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                }
                None => {
                    writer.shutdown().await?;
                    return Ok(());
                }
            }
        }
        Ok(())
    };
    tokio::try_join!(read, write).map(|_| ())
}

/// Links between regions: one per (caller region, target address), created on first use, with
/// latency and faults per ordered region pair. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct Relay {
    inner: Arc<Mutex<RelayInner>>,
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Relay")
    }
}

#[derive(Default)]
struct RelayInner {
    /// One-way latency per unordered pair, stored under both orders.
    latency: HashMap<(String, String), Duration>,
    pairs: HashMap<(String, String), Arc<LinkControl>>,
    links: HashMap<(String, SocketAddr), Link>,
}

impl RelayInner {
    fn pair(&mut self, from: &str, to: &str) -> Arc<LinkControl> {
        let key = (from.to_string(), to.to_string());
        if let Some(control) = self.pairs.get(&key) {
            return Arc::clone(control);
        }
        let forward = self.latency.get(&key).copied().unwrap_or_default();
        let backward = self
            .latency
            .get(&(to.to_string(), from.to_string()))
            .copied()
            .unwrap_or_default();
        let control = LinkControl::new(forward, backward);
        self.pairs.insert(key, Arc::clone(&control));
        control
    }
}

impl Relay {
    /// A relay with no latency anywhere yet.
    pub fn new() -> Relay {
        Relay::default()
    }

    /// The layout the issue describes, one way: us-east↔eu-west 40 ms, us-east↔ap-south 120 ms,
    /// eu-west↔ap-south 100 ms.
    pub fn with_default_latencies() -> Relay {
        let relay = Relay::new();
        relay.set_latency("us-east", "eu-west", Duration::from_millis(40));
        relay.set_latency("us-east", "ap-south", Duration::from_millis(120));
        relay.set_latency("eu-west", "ap-south", Duration::from_millis(100));
        relay
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RelayInner> {
        // A poisoned lock only means a test panicked elsewhere; the map is still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the one-way latency between `a` and `b`, both directions, for existing and future
    /// links.
    pub fn set_latency(&self, a: &str, b: &str, one_way: Duration) {
        let mut inner = self.lock();
        inner
            .latency
            .insert((a.to_string(), b.to_string()), one_way);
        inner
            .latency
            .insert((b.to_string(), a.to_string()), one_way);
        if let Some(control) = inner.pairs.get(&(a.to_string(), b.to_string())) {
            control.set_latency(one_way, one_way);
        }
        if let Some(control) = inner.pairs.get(&(b.to_string(), a.to_string())) {
            control.set_latency(one_way, one_way);
        }
    }

    /// The address `from`'s sidecar must dial to reach `target` (a gateway of region `to`):
    /// a listener on `from`'s loopback address, created on first use.
    pub fn link(&self, from: &str, to: &str, target: SocketAddr) -> Result<SocketAddr> {
        let mut inner = self.lock();
        let key = (from.to_string(), target);
        if let Some(link) = inner.links.get(&key) {
            return Ok(link.listen());
        }
        let ip = crate::region_index(from).map_or(Ipv4Addr::LOCALHOST, crate::region_ip);
        let control = inner.pair(from, to);
        let link = Link::start(IpAddr::V4(ip), target, control)
            .with_context(|| format!("relay link {from} -> {to} ({target})"))?;
        let listen = link.listen();
        inner.links.insert(key, link);
        Ok(listen)
    }

    /// The control of the ordered pair `from -> to` (created if needed).
    pub fn control(&self, from: &str, to: &str) -> Arc<LinkControl> {
        self.lock().pair(from, to)
    }

    /// Blackholes connections from `from` to `to`'s gateways.
    pub fn blackhole(&self, from: &str, to: &str) {
        self.control(from, to).set_state(LinkState::Blackhole);
    }

    /// Resets connections from `from` to `to`'s gateways, now and until healed.
    pub fn reset(&self, from: &str, to: &str) {
        self.control(from, to).set_state(LinkState::Reset);
    }

    /// Undoes a blackhole or reset of `from -> to`.
    pub fn heal(&self, from: &str, to: &str) {
        self.control(from, to).set_state(LinkState::Open);
    }

    /// Blackholes both directions between `a` and `b`.
    pub fn partition(&self, a: &str, b: &str) {
        self.blackhole(a, b);
        self.blackhole(b, a);
    }

    /// Heals both directions between `a` and `b`.
    pub fn heal_both(&self, a: &str, b: &str) {
        self.heal(a, b);
        self.heal(b, a);
    }

    /// Every link: `(from, target, listen address)`.
    pub fn links(&self) -> Vec<(String, SocketAddr, SocketAddr)> {
        let mut links: Vec<_> = self
            .lock()
            .links
            .iter()
            .map(|((from, target), link)| (from.clone(), *target, link.listen()))
            .collect();
        links.sort();
        links
    }

    /// Every ordered pair with a control: `((from, to), state, accepted connections)`.
    pub fn pairs(&self) -> Vec<((String, String), LinkState, u64)> {
        let mut pairs: Vec<_> = self
            .lock()
            .pairs
            .iter()
            .map(|(key, control)| (key.clone(), control.state(), control.accepted()))
            .collect();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        pairs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;

    /// An echo server on 127.0.0.1; returns its address.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn link(forward_ms: u64, backward_ms: u64) -> Link {
        let target = echo_server().await;
        let control = LinkControl::new(
            Duration::from_millis(forward_ms),
            Duration::from_millis(backward_ms),
        );
        Link::start(IpAddr::V4(Ipv4Addr::LOCALHOST), target, control).unwrap()
    }

    async fn round_trip(stream: &mut TcpStream, payload: &[u8]) -> io::Result<Duration> {
        let started = Instant::now();
        stream.write_all(payload).await?;
        let mut buf = vec![0u8; payload.len()];
        stream.read_exact(&mut buf).await?;
        assert_eq!(buf, payload);
        Ok(started.elapsed())
    }

    #[tokio::test]
    async fn adds_latency_per_direction() {
        let link = link(30, 10).await;
        let mut stream = TcpStream::connect(link.listen()).await.unwrap();
        stream.set_nodelay(true).unwrap();
        for _ in 0..3 {
            let rtt = round_trip(&mut stream, b"ping").await.unwrap();
            assert!(rtt >= Duration::from_millis(40), "rtt {rtt:?} < 30 + 10 ms");
            assert!(
                rtt < Duration::from_millis(120),
                "rtt {rtt:?} far above 40 ms"
            );
        }
        link.control().set_latency(Duration::ZERO, Duration::ZERO);
        let rtt = round_trip(&mut stream, b"pong").await.unwrap();
        assert!(rtt < Duration::from_millis(30), "latency 0: rtt {rtt:?}");
    }

    #[tokio::test]
    async fn latency_delays_chunks_without_serializing_them_and_keeps_order() {
        let link = link(50, 0).await;
        let stream = TcpStream::connect(link.listen()).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (mut r, mut w) = stream.into_split();
        let started = Instant::now();
        let writer = tokio::spawn(async move {
            for i in 0u32..20 {
                w.write_all(&i.to_be_bytes()).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            w
        });
        let mut got = Vec::new();
        for _ in 0..20 {
            let mut word = [0u8; 4];
            r.read_exact(&mut word).await.unwrap();
            got.push(u32::from_be_bytes(word));
        }
        let elapsed = started.elapsed();
        let _ = writer.await.unwrap();
        assert_eq!(got, (0..20).collect::<Vec<_>>(), "bytes out of order");
        // 20 writes 5 ms apart, each delayed 50 ms: about 150 ms when chunks are queued, about
        // 1 s if the delay were paid one chunk after another.
        assert!(elapsed >= Duration::from_millis(140), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(400), "{elapsed:?}");
    }

    #[tokio::test]
    async fn large_transfer_arrives_intact() {
        let link = link(5, 5).await;
        let stream = TcpStream::connect(link.listen()).await.unwrap();
        let (mut r, mut w) = stream.into_split();
        let data: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "corrupted transfer");
        assert!(link.control().forwarded_bytes() >= 8_000_000);
    }

    #[tokio::test]
    async fn blackhole_holds_bytes_on_old_and_new_connections_until_heal() {
        let link = link(0, 0).await;
        let mut old = TcpStream::connect(link.listen()).await.unwrap();
        round_trip(&mut old, b"before").await.unwrap();

        link.control().set_state(LinkState::Blackhole);
        old.write_all(b"during").await.unwrap();
        let mut buf = [0u8; 6];
        let read = tokio::time::timeout(Duration::from_millis(300), old.read_exact(&mut buf)).await;
        assert!(read.is_err(), "bytes crossed a blackholed link: {read:?}");

        // A new connection is accepted but nothing crosses.
        let mut new =
            tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(link.listen()))
                .await
                .expect("connect must not hang: the listener accepts")
                .unwrap();
        new.write_all(b"hello?").await.unwrap();
        let mut buf2 = [0u8; 6];
        let read =
            tokio::time::timeout(Duration::from_millis(300), new.read_exact(&mut buf2)).await;
        assert!(read.is_err(), "a new connection crossed a blackholed link");

        link.control().set_state(LinkState::Open);
        tokio::time::timeout(Duration::from_secs(2), old.read_exact(&mut buf))
            .await
            .expect("held bytes must flow after heal")
            .unwrap();
        assert_eq!(&buf, b"during");
        tokio::time::timeout(Duration::from_secs(2), new.read_exact(&mut buf2))
            .await
            .expect("the held connection must be forwarded after heal")
            .unwrap();
        assert_eq!(&buf2, b"hello?");
    }

    fn is_reset(result: &io::Result<usize>) -> bool {
        matches!(result, Err(e) if e.kind() == ErrorKind::ConnectionReset)
    }

    #[tokio::test]
    async fn reset_kills_old_and_new_connections_until_heal() {
        let link = link(0, 0).await;
        let mut old = TcpStream::connect(link.listen()).await.unwrap();
        round_trip(&mut old, b"before").await.unwrap();

        link.control().set_state(LinkState::Reset);
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(2), old.read(&mut buf))
            .await
            .expect("an existing connection must be reset at once");
        assert!(is_reset(&read), "expected a reset, got {read:?}");

        let mut new = TcpStream::connect(link.listen()).await.unwrap();
        let _ = new.write_all(b"x").await;
        let read = tokio::time::timeout(Duration::from_secs(2), new.read(&mut buf))
            .await
            .expect("a new connection must be reset at once");
        assert!(is_reset(&read), "expected a reset, got {read:?}");

        link.control().set_state(LinkState::Open);
        let mut healed = TcpStream::connect(link.listen()).await.unwrap();
        round_trip(&mut healed, b"after").await.unwrap();
    }

    #[tokio::test]
    async fn refused_target_resets_the_caller() {
        let dead = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap()
        };
        let link = Link::start(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            dead,
            LinkControl::new(Duration::ZERO, Duration::ZERO),
        )
        .unwrap();
        let mut stream = TcpStream::connect(link.listen()).await.unwrap();
        let mut buf = [0u8; 4];
        let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
            .await
            .unwrap();
        assert!(is_reset(&read), "expected a reset, got {read:?}");
    }

    #[tokio::test]
    async fn relay_links_are_per_caller_with_pair_latency_and_faults() {
        let target = echo_server().await;
        let relay = Relay::with_default_latencies();
        let from_us = relay.link("us-east", "eu-west", target).unwrap();
        let from_ap = relay.link("ap-south", "eu-west", target).unwrap();
        assert_eq!(from_us.ip(), IpAddr::V4(Ipv4Addr::new(127, 0, 1, 1)));
        assert_eq!(from_ap.ip(), IpAddr::V4(Ipv4Addr::new(127, 0, 3, 1)));
        assert_eq!(relay.link("us-east", "eu-west", target).unwrap(), from_us);

        let mut us = TcpStream::connect(from_us).await.unwrap();
        us.set_nodelay(true).unwrap();
        let mut ap = TcpStream::connect(from_ap).await.unwrap();
        ap.set_nodelay(true).unwrap();
        let rtt_us = round_trip(&mut us, b"x").await.unwrap();
        let rtt_ap = round_trip(&mut ap, b"x").await.unwrap();
        assert!(rtt_us >= Duration::from_millis(80), "{rtt_us:?}");
        assert!(rtt_ap >= Duration::from_millis(200), "{rtt_ap:?}");

        // Blackholing us-east -> eu-west leaves ap-south -> eu-west alone.
        relay.blackhole("us-east", "eu-west");
        us.write_all(b"y").await.unwrap();
        let mut buf = [0u8; 1];
        let held = tokio::time::timeout(Duration::from_millis(400), us.read_exact(&mut buf)).await;
        assert!(held.is_err(), "blackholed link delivered");
        round_trip(&mut ap, b"z").await.unwrap();
        relay.heal("us-east", "eu-west");
        tokio::time::timeout(Duration::from_secs(2), us.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(relay.control("us-east", "eu-west").accepted(), 1);
    }
}
