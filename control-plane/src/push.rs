//! `AgentService.Connect`: one session per agent stream. Registers the agent in etcd, pushes its
//! region's table (full, then deltas; one push in flight; latest wins), records acks and nacks,
//! writes the endpoints the agent reports, and stores its scale reports under `status/scale/`.
//!
//! Records of agents are held by one lease per replica rather than one per agent: thousands of
//! agents then cost one keep-alive stream, not thousands. If the replica dies, its lease expires
//! and takes its agents' records along (the agents re-register elsewhere). If an agent's stream
//! ends, the replica removes the agent's records one lease TTL later unless the agent has
//! registered again meanwhile, which is the same visible behaviour as a lease per agent.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meridian_common::address::parse_host_port;
use meridian_common::names::validate_dns_label;
use meridian_proto::v1 as pb;
use prost::Message;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::{AgentGuard, Metrics};
use crate::spec::{FunctionKey, MAX_INSTANCES_LIMIT};
use crate::store::{LeasedWrite, StatusOp, Store};
use crate::table::{RegionTable, Tables};
use crate::trace::{PushSpan, Tracing};

/// Settings of agent sessions.
#[derive(Debug, Clone)]
pub struct PushConfig {
    pub replica_id: String,
    /// TTL of the lease that holds an agent's records: how long a vanished agent lingers.
    pub lease_ttl: Duration,
    /// How often the control plane sends a heartbeat on an idle stream.
    pub heartbeat_interval: Duration,
    /// Silence after which a stream is considered dead.
    pub silence_timeout: Duration,
    /// How long a push may stay unacknowledged before the agent is assumed to have lost it.
    pub ack_timeout: Duration,
    /// Full tables in flight at once across all agents. A full table is large; after a
    /// restart thousands of agents want one at the same moment, and this bounds the memory
    /// they take (deltas are small and never wait).
    pub max_full_syncs: usize,
    /// How long a session waits for this replica's tables to reach the version the agent says
    /// it holds before it tells the agent `Behind` (versions never go back).
    pub behind_wait: Duration,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            replica_id: "cp".into(),
            lease_ttl: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(5),
            silence_timeout: Duration::from_secs(15),
            ack_timeout: Duration::from_secs(30),
            max_full_syncs: 64,
            behind_wait: Duration::from_secs(5),
        }
    }
}

/// What an agent says it is, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    pub agent_id: String,
    pub region: String,
    pub zone: String,
    pub cloud: String,
    pub gateway: String,
    /// The agent's API (logs); empty when it serves none.
    pub api_address: String,
    /// What it lets process functions run, when it says.
    pub command_policy: Option<pb::CommandPolicy>,
}

/// Directories an agent may announce as allowed command roots, at most.
const MAX_COMMAND_ROOTS: usize = 64;
/// Sidecars one agent may report, at most; the rest are dropped (and logged).
pub const MAX_REPORTED_SIDECARS: usize = 256;
/// Longest reason or name kept from an agent's reports: they end up in etcd and on screens.
const MAX_REPORTED_TEXT: usize = 1024;

/// Cuts `text` to at most `max` bytes, on a character boundary.
fn truncated(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Checks the command policy of a Hello.
fn check_policy(policy: &pb::CommandPolicy) -> Result<(), HelloError> {
    if policy.allowed_roots.len() > MAX_COMMAND_ROOTS {
        return Err(HelloError {
            field: "commandPolicy.allowedRoots",
            problem: format!("more than {MAX_COMMAND_ROOTS} roots"),
        });
    }
    for root in &policy.allowed_roots {
        let valid =
            root.starts_with('/') && root.len() <= 4096 && !root.chars().any(char::is_control);
        if !valid {
            return Err(HelloError {
                field: "commandPolicy.allowedRoots",
                problem: format!("{root:?} is not an absolute path"),
            });
        }
    }
    if policy.run_as.len() > 256 || policy.run_as.chars().any(char::is_control) {
        return Err(HelloError {
            field: "commandPolicy.runAs",
            problem: "not a user name".into(),
        });
    }
    Ok(())
}

/// The sidecar statuses of a report, bounded: at most [`MAX_REPORTED_SIDECARS`], with names
/// and reasons cut to [`MAX_REPORTED_TEXT`], sorted by name.
pub fn bounded_sidecars(report: pb::SidecarReport) -> Vec<pb::SidecarStatus> {
    let mut sidecars: Vec<pb::SidecarStatus> = report
        .sidecars
        .into_iter()
        .take(MAX_REPORTED_SIDECARS)
        .map(|mut sidecar| {
            sidecar.sidecar = truncated(sidecar.sidecar, MAX_REPORTED_TEXT);
            sidecar.error = truncated(sidecar.error, MAX_REPORTED_TEXT);
            sidecar
        })
        .collect();
    sidecars.sort_by(|a, b| a.sidecar.cmp(&b.sidecar));
    sidecars
}

/// A hello field that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("hello.{field}: {problem}")]
pub struct HelloError {
    pub field: &'static str,
    pub problem: String,
}

/// Checks `host:port` by the mesh's one rule (`meridian_common::address`), which the agent and
/// the sidecar apply too.
pub fn check_host_port(address: &str) -> Result<(), String> {
    parse_host_port(address)
        .map(drop)
        .map_err(|problem| format!("{address:?} is not a valid host:port: {problem}"))
}

impl TryFrom<&pb::Hello> for AgentIdentity {
    type Error = HelloError;

    fn try_from(hello: &pb::Hello) -> Result<Self, Self::Error> {
        let label = |field: &'static str, value: &str| {
            validate_dns_label(value).map_err(|e| HelloError {
                field,
                problem: format!("{value:?} {e}"),
            })
        };
        label("agentId", &hello.agent_id)?;
        label("region", &hello.region)?;
        if !hello.zone.is_empty() {
            label("zone", &hello.zone)?;
        }
        if !hello.cloud.is_empty() {
            label("cloud", &hello.cloud)?;
        }
        if !hello.gateway.is_empty() {
            check_host_port(&hello.gateway).map_err(|problem| HelloError {
                field: "gateway",
                problem,
            })?;
        }
        if !hello.api_address.is_empty() {
            check_host_port(&hello.api_address).map_err(|problem| HelloError {
                field: "apiAddress",
                problem,
            })?;
        }
        if let Some(policy) = &hello.command_policy {
            check_policy(policy)?;
        }
        Ok(Self {
            agent_id: hello.agent_id.clone(),
            region: hello.region.clone(),
            zone: hello.zone.clone(),
            cloud: hello.cloud.clone(),
            gateway: hello.gateway.clone(),
            api_address: hello.api_address.clone(),
            command_policy: hello.command_policy.clone(),
        })
    }
}

/// Holds this replica's lease: grants one, keeps it alive, and grants a new one when it is lost
/// (etcd unreachable for longer than the TTL). `current` is `None` while there is none.
pub async fn run_replica_lease(store: Store, ttl: Duration, current: watch::Sender<Option<i64>>) {
    run_registered_replica_lease(store, ttl, current, None).await;
}

/// [`run_replica_lease`], also registering `replica` (`replicas/<id>`) under every lease it
/// holds, so that the registration lives exactly as long as the replica's lease.
pub async fn run_registered_replica_lease(
    store: Store,
    ttl: Duration,
    current: watch::Sender<Option<i64>>,
    replica: Option<pb::ReplicaInfo>,
) {
    let ttl_secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(10);
    let mut backoff =
        meridian_common::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let lease = match store.grant_lease(ttl_secs).await {
            Ok(lease) => lease,
            Err(error) => {
                tracing::warn!(%error, "cannot obtain a lease from etcd; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        backoff.reset();
        let guard = store.keep_alive(lease, ttl);
        let mut lost = guard.lost.clone();
        current.send_replace(Some(lease));
        tracing::info!(lease, "holding replica lease");
        if let Some(replica) = &replica {
            register(&store, lease, replica, &mut lost).await;
        }
        let _ = lost.wait_for(|lost| *lost).await;
        current.send_replace(None);
        tracing::warn!(lease, "replica lease lost; agents must register again");
    }
}

/// Writes the replica's registration under `lease`, retrying (capped backoff) until it lands
/// or the lease is lost: the registration is advisory, the agents' records are not.
async fn register(
    store: &Store,
    lease: i64,
    replica: &pb::ReplicaInfo,
    lost: &mut watch::Receiver<bool>,
) {
    let mut backoff =
        meridian_common::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        match store.register_replica(lease, replica).await {
            Ok(()) => return,
            Err(error) => tracing::warn!(%error, "cannot register this replica; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff.next_delay()) => {}
            _ = lost.wait_for(|lost| *lost) => return,
        }
    }
}

/// A write waiting for the group commit, and who to tell when it is done.
#[derive(Debug)]
pub struct PendingWrite {
    write: LeasedWrite,
    done: tokio::sync::oneshot::Sender<Result<i64, String>>,
}

/// Commits agents' registrations and endpoint writes in groups: when thousands of agents
/// connect at once (a control-plane restart), one etcd transaction per agent would overload
/// etcd until leases expire and the storm repeats.
pub async fn run_write_batcher(store: Store, mut writes: mpsc::Receiver<PendingWrite>) {
    const MAX_OPS: usize = 120;
    while let Some(first) = writes.recv().await {
        let mut ops = first.write.ops();
        let mut batch = vec![first];
        while ops < MAX_OPS {
            match writes.try_recv() {
                Ok(next) => {
                    ops += next.write.ops();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let result = store
            .write_many(batch.iter().map(|p| p.write.clone()).collect())
            .await;
        match result {
            Ok(revision) => {
                for pending in batch {
                    let _ = pending.done.send(Ok(revision));
                }
            }
            Err(error) if batch.len() > 1 => {
                // Perhaps two writes of one key (an agent reconnecting mid-batch): one by one.
                tracing::debug!(%error, "group commit failed; writing one by one");
                for pending in batch {
                    let result = store
                        .write_many(vec![pending.write])
                        .await
                        .map_err(|e| e.to_string());
                    let _ = pending.done.send(result);
                }
            }
            Err(error) => {
                for pending in batch {
                    let _ = pending.done.send(Err(error.to_string()));
                }
            }
        }
    }
}

/// Sends writes to the batcher and waits for their commit.
#[derive(Debug, Clone)]
pub struct Writer {
    queue: mpsc::Sender<PendingWrite>,
}

impl Writer {
    pub fn new(queue: mpsc::Sender<PendingWrite>) -> Self {
        Self { queue }
    }

    /// Returns the revision of the commit.
    pub async fn write(&self, write: LeasedWrite) -> Result<i64, String> {
        let (done, result) = tokio::sync::oneshot::channel();
        self.queue
            .send(PendingWrite { write, done })
            .await
            .map_err(|_| "control plane stopping".to_string())?;
        result
            .await
            .map_err(|_| "control plane stopping".to_string())?
    }
}

/// A status record of an agent to write (coalesced by [`run_status_writer`]): its
/// acknowledgement status or a scale report, under the replica lease; `value: None` deletes it.
#[derive(Debug)]
pub struct StatusWrite {
    pub lease: i64,
    pub key: String,
    pub value: Option<Vec<u8>>,
}

/// Ticks a failed status write is retried for before it is dropped: two seconds at the usual
/// 100 ms, enough to ride out an etcd leader election. Scale reports are sent only when they
/// change, so a write dropped at once would leave a stale entry until the next change.
const STATUS_WRITE_ATTEMPTS: u32 = 20;

/// Writes agent statuses and scale reports to etcd in batches, newest per key, every
/// `interval`: acks are frequent and must not cost one etcd write each.
pub async fn run_status_writer(
    store: Store,
    mut updates: mpsc::Receiver<StatusWrite>,
    interval: Duration,
) {
    // Key -> (lease, value, failed attempts so far).
    let mut pending: BTreeMap<String, (i64, Option<Vec<u8>>, u32)> = BTreeMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            update = updates.recv() => match update {
                Some(update) => {
                    pending.insert(update.key, (update.lease, update.value, 0));
                }
                None => break,
            },
            _ = tick.tick() => {
                if pending.is_empty() {
                    continue;
                }
                let batch = std::mem::take(&mut pending);
                let attempts: BTreeMap<String, u32> =
                    batch.iter().map(|(key, (_, _, n))| (key.clone(), *n)).collect();
                let ops = batch
                    .into_iter()
                    .map(|(key, (lease, value, _))| StatusOp { lease, key, value })
                    .collect();
                for op in store.write_statuses(ops).await {
                    let tried = attempts.get(&op.key).copied().unwrap_or_default() + 1;
                    // A newer write of the same key arrived meanwhile: it wins.
                    if tried < STATUS_WRITE_ATTEMPTS && !pending.contains_key(&op.key) {
                        pending.insert(op.key, (op.lease, op.value, tried));
                    } else if tried >= STATUS_WRITE_ATTEMPTS {
                        tracing::warn!(key = %op.key, "dropping a status write etcd kept refusing");
                    }
                }
            }
        }
    }
}

/// The AgentService implementation.
#[derive(Clone)]
pub struct AgentPush {
    store: Store,
    tables: watch::Receiver<Arc<Tables>>,
    config: PushConfig,
    statuses: mpsc::Sender<StatusWrite>,
    lease: watch::Receiver<Option<i64>>,
    shutdown: watch::Receiver<bool>,
    full_syncs: Arc<Semaphore>,
    writer: Writer,
    metrics: Arc<Metrics>,
    /// Push spans of traced changes; `None` when export is off.
    tracing: Option<Arc<Tracing>>,
}

impl AgentPush {
    pub fn new(
        store: Store,
        tables: watch::Receiver<Arc<Tables>>,
        config: PushConfig,
        statuses: mpsc::Sender<StatusWrite>,
        lease: watch::Receiver<Option<i64>>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let (queue, pending) = mpsc::channel(4096);
        tokio::spawn(run_write_batcher(store.clone(), pending));
        let writer = Writer::new(queue);
        let full_syncs = Arc::new(Semaphore::new(config.max_full_syncs.max(1)));
        Self {
            store,
            tables,
            config,
            statuses,
            lease,
            shutdown,
            full_syncs,
            writer,
            metrics: Metrics::new(),
            tracing: None,
        }
    }

    /// Each push of a table compiled from a traced change gets a `meridian.push` span in that
    /// change's trace (see [`crate::trace`]).
    pub fn with_tracing(mut self, tracing: Option<Arc<Tracing>>) -> Self {
        self.tracing = tracing;
        self
    }

    /// Counts pushes, nacks, connected agents and propagation in `metrics` (by default in a
    /// private set nobody reads).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }
}

fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentPush {
    type ConnectStream = ReceiverStream<Result<pb::ControlMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10s"))??;
        let hello = match first.and_then(|m| m.kind) {
            Some(pb::agent_message::Kind::Hello(hello)) => hello,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message on the stream must be a hello",
                ))
            }
        };
        let identity =
            AgentIdentity::try_from(&hello).map_err(|e| Status::invalid_argument(e.to_string()))?;

        let lease = (*self.lease.borrow()).ok_or_else(|| {
            Status::unavailable("this control-plane replica cannot reach etcd; try another")
        })?;
        let connected_since = unix_ms(SystemTime::now());
        let record = pb::AgentStatus {
            agent_id: identity.agent_id.clone(),
            region: identity.region.clone(),
            zone: identity.zone.clone(),
            cloud: identity.cloud.clone(),
            gateway: identity.gateway.clone(),
            api_address: identity.api_address.clone(),
            command_policy: identity.command_policy.clone(),
            connected_since_unix_ms: connected_since,
            replica: self.config.replica_id.clone(),
            ..Default::default()
        };
        let agent_key = self
            .store
            .keys()
            .agent(&identity.region, &identity.agent_id);
        let registered_revision = self
            .writer
            .write(LeasedWrite {
                lease,
                puts: vec![(agent_key.clone(), record.encode_to_vec())],
                deletes: Vec::new(),
            })
            .await
            .map_err(|e| Status::unavailable(format!("cannot register agent: {e}")))?;
        tracing::info!(
            agent = %identity.agent_id,
            region = %identity.region,
            last_version = hello.last_version,
            "agent connected"
        );

        let (outbound, receiver) = mpsc::channel(8);
        let metrics =
            self.metrics
                .agent_connected(&identity.region, &identity.agent_id, hello.last_version);
        let session = Session {
            store: self.store.clone(),
            config: self.config.clone(),
            statuses: self.statuses.clone(),
            tables: self.tables.clone(),
            shutdown: self.shutdown.clone(),
            lease_changes: self.lease.clone(),
            full_syncs: self.full_syncs.clone(),
            writer: self.writer.clone(),
            identity,
            lease,
            agent_key,
            registered_revision,
            status: record,
            acked: None,
            held_version: hello.last_version,
            behind_since: None,
            in_flight: None,
            nacked_version: 0,
            endpoints_desired: BTreeMap::new(),
            endpoints_written: BTreeMap::new(),
            endpoint_flush: None,
            scale_desired: BTreeMap::new(),
            scale_queued: BTreeMap::new(),
            outbound,
            metrics,
            tracing: self.tracing.clone(),
        };
        tokio::spawn(session.run(inbound));
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

struct InFlight {
    table: Arc<RegionTable>,
    full: bool,
    sent_at: Instant,
    /// Held from sending a full table until it is acknowledged.
    _full_sync: Option<OwnedSemaphorePermit>,
    /// Open until the agent answers, when the table came from a traced change.
    span: Option<PushSpan>,
}

impl InFlight {
    /// Ends the push span (if any) without an ack: `result` says how, `reason` why.
    fn failed(self, result: &'static str, reason: &str) {
        if let Some(span) = self.span {
            span.failed(result, reason);
        }
    }
}

struct Session {
    store: Store,
    config: PushConfig,
    statuses: mpsc::Sender<StatusWrite>,
    tables: watch::Receiver<Arc<Tables>>,
    shutdown: watch::Receiver<bool>,
    lease_changes: watch::Receiver<Option<i64>>,
    full_syncs: Arc<Semaphore>,
    writer: Writer,
    identity: AgentIdentity,
    lease: i64,
    /// The agent's record key and the revision this session wrote it at.
    agent_key: String,
    registered_revision: i64,
    status: pb::AgentStatus,
    /// The table the agent is known to hold (acked); `None`: unknown, send a full table.
    acked: Option<Arc<RegionTable>>,
    /// The version the agent said it holds in its hello, until something is acked.
    held_version: i64,
    /// Since when this replica's newest table has been older than `held_version`.
    behind_since: Option<Instant>,
    in_flight: Option<InFlight>,
    /// A full table of this version was refused; wait for a newer one.
    nacked_version: i64,
    endpoints_desired: BTreeMap<String, Vec<u8>>,
    endpoints_written: BTreeMap<String, Vec<u8>>,
    /// The endpoint write under way, off the session loop: with tens of thousands of records
    /// it can take longer than the agent's silence timeout on a loaded etcd, and the session
    /// must keep heartbeating and reading meanwhile.
    endpoint_flush: Option<EndpointFlush>,
    /// Scale records (`status/scale/...`) of the last report, and what was handed to the
    /// status writer, so that only changes are written and unreported entries are deleted.
    scale_desired: BTreeMap<String, Vec<u8>>,
    scale_queued: BTreeMap<String, Vec<u8>>,
    outbound: mpsc::Sender<Result<pb::ControlMessage, Status>>,
    /// Counts this agent as connected until the session ends.
    metrics: AgentGuard,
    tracing: Option<Arc<Tracing>>,
}

enum Flow {
    Continue,
    End(&'static str),
}

/// Sleeps until `deadline`; never resolves without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Endpoint records a session writes per group commit: small enough that a registration
/// queued behind a large report waits for one chunk, not for the whole report.
const ENDPOINT_CHUNK: usize = 100;

/// An endpoint write running beside its session; aborted when the session drops it.
struct EndpointFlush(tokio::task::JoinHandle<EndpointsWritten>);

/// What an endpoint write left in etcd, and whether it wrote everything it set out to.
struct EndpointsWritten {
    written: BTreeMap<String, Vec<u8>>,
    complete: bool,
}

impl Drop for EndpointFlush {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the endpoint write under way leaves in etcd, once it is done; never resolves without
/// one.
async fn flushed(flush: &mut Option<EndpointFlush>) -> EndpointsWritten {
    let Some(EndpointFlush(task)) = flush else {
        return std::future::pending().await;
    };
    // Only a panic fails here (an abort comes with the session's end, which no longer polls):
    // nothing is known to be written, so the next flush writes everything again.
    task.await.unwrap_or(EndpointsWritten {
        written: BTreeMap::new(),
        complete: false,
    })
}

/// Writes `puts` and `deletes` in chunks and returns `written` updated by every chunk that
/// was committed; a failed chunk ends the write (the next heartbeat retries the rest).
async fn write_endpoints(
    writer: Writer,
    lease: i64,
    agent: String,
    mut written: BTreeMap<String, Vec<u8>>,
    puts: Vec<(String, Vec<u8>)>,
    deletes: Vec<String>,
) -> EndpointsWritten {
    let mut puts = puts.into_iter().peekable();
    let mut deletes = deletes.into_iter().peekable();
    while puts.peek().is_some() || deletes.peek().is_some() {
        let chunk_puts: Vec<(String, Vec<u8>)> = puts.by_ref().take(ENDPOINT_CHUNK).collect();
        let chunk_deletes: Vec<String> = deletes
            .by_ref()
            .take(ENDPOINT_CHUNK - chunk_puts.len())
            .collect();
        let write = LeasedWrite {
            lease,
            puts: chunk_puts.clone(),
            deletes: chunk_deletes.clone(),
        };
        if let Err(error) = writer.write(write).await {
            tracing::warn!(%agent, %error, "cannot write endpoints; will retry");
            return EndpointsWritten {
                written,
                complete: false,
            };
        }
        written.extend(chunk_puts);
        for key in chunk_deletes {
            written.remove(&key);
        }
    }
    EndpointsWritten {
        written,
        complete: true,
    }
}

/// Session-end reasons after which the agent's records are left alone: the replica lost its
/// lease (etcd removes them) or is stopping (the agent re-registers elsewhere within the TTL).
const LEAVE_RECORDS: [&str; 2] = ["lease lost", "control plane stopping"];

impl Session {
    async fn run(mut self, mut inbound: Streaming<pb::AgentMessage>) {
        let mut heartbeat = tokio::time::interval(self.config.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let mut lease_changes = self.lease_changes.clone();
        let mut shutdown = self.shutdown.clone();
        let mut tables = self.tables.clone();
        tables.mark_changed();
        self.report_status();
        let reason = loop {
            let flow = tokio::select! {
                changed = tables.changed() => match changed {
                    Ok(()) => Flow::Continue,
                    Err(_) => Flow::End("control plane stopping"),
                },
                message = inbound.message() => match message {
                    Ok(Some(message)) => {
                        last_heard = Instant::now();
                        self.handle(message).await
                    }
                    Ok(None) => Flow::End("agent closed the stream"),
                    Err(_) => Flow::End("stream broke"),
                },
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > self.config.silence_timeout {
                        Flow::End("agent silent")
                    } else {
                        let beat = pb::ControlMessage {
                            kind: Some(pb::control_message::Kind::Heartbeat(pb::Heartbeat {
                                unix_ms: unix_ms(SystemTime::now()),
                            })),
                        };
                        // A full channel already tells the agent we are alive.
                        let _ = self.outbound.try_send(Ok(beat));
                        self.flush_endpoints();
                        self.flush_scale();
                        Flow::Continue
                    }
                },
                done = flushed(&mut self.endpoint_flush) => {
                    self.endpoint_flush = None;
                    self.endpoints_written = done.written;
                    // A report that came in meanwhile is written now, not a heartbeat later;
                    // after a failure the next heartbeat retries (no hot loop while etcd is
                    // down).
                    if done.complete {
                        self.flush_endpoints();
                    }
                    Flow::Continue
                },
                _ = lease_changes.changed() => {
                    if *lease_changes.borrow() == Some(self.lease) {
                        Flow::Continue
                    } else {
                        let _ = self.outbound.try_send(Err(Status::unavailable(
                            "control-plane replica lost its etcd lease; register again",
                        )));
                        Flow::End("lease lost")
                    }
                },
                _ = shutdown.changed() => Flow::End("control plane stopping"),
                _ = self.outbound.closed() => Flow::End("agent went away"),
                // The wait for this replica to catch up with the agent's table ran out.
                () = until(self.behind_since.map(|since| since + self.config.behind_wait)) => {
                    Flow::Continue
                }
            };
            if let Flow::End(reason) = flow {
                break reason;
            }
            let waited = Instant::now();
            if let Err(reason) = self.push_if_needed().await {
                break reason;
            }
            // Waiting for a full-sync slot is our delay, not the agent's silence.
            if waited.elapsed() > self.config.heartbeat_interval {
                last_heard = Instant::now();
            }
        };
        tracing::info!(
            agent = %self.identity.agent_id,
            region = %self.identity.region,
            reason,
            "agent session ended"
        );
        if let Some(sent) = self.in_flight.take() {
            sent.failed("session-ended", reason);
        }
        // Dropping it stops the write; what it wrote is among the desired keys removed below.
        self.endpoint_flush = None;
        if !LEAVE_RECORDS.contains(&reason) {
            self.remove_records_later();
        }
    }

    /// One lease TTL after the stream ended, removes the agent's records unless it registered
    /// again meanwhile (which rewrote its record).
    fn remove_records_later(self) {
        // The desired keys too: a write cut short by the session's end may have put some.
        let mut keys: Vec<String> = self
            .endpoints_written
            .keys()
            .chain(self.endpoints_desired.keys())
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        keys.extend(self.scale_queued.keys().cloned());
        keys.push(
            self.store
                .keys()
                .agent_status(&self.identity.region, &self.identity.agent_id),
        );
        keys.push(self.agent_key.clone());
        let store = self.store.clone();
        let ttl = self.config.lease_ttl;
        let agent = self.identity.agent_id.clone();
        let (agent_key, revision) = (self.agent_key, self.registered_revision);
        tokio::spawn(async move {
            tokio::time::sleep(ttl).await;
            match store.delete_if_unchanged(&agent_key, revision, keys).await {
                Ok(true) => tracing::info!(%agent, "agent did not come back; removed its records"),
                Ok(false) => {}
                Err(error) => {
                    // The replica lease still bounds how long they can outlive the agent.
                    tracing::warn!(%agent, %error, "cannot remove records of a departed agent")
                }
            }
        });
    }

    fn current_table(&self) -> Option<Arc<RegionTable>> {
        self.tables
            .borrow()
            .regions
            .get(&self.identity.region)
            .cloned()
    }

    /// Sends the newest table if the agent does not hold it and nothing is in flight.
    async fn push_if_needed(&mut self) -> Result<(), &'static str> {
        if let Some(in_flight) = &self.in_flight {
            if in_flight.sent_at.elapsed() < self.config.ack_timeout {
                return Ok(());
            }
            tracing::warn!(agent = %self.identity.agent_id, version = in_flight.table.version, "push not acknowledged in time; resending a full table");
            if let Some(sent) = self.in_flight.take() {
                let reason = format!("no ack within {:?}", self.config.ack_timeout);
                sent.failed("timeout", &reason);
            }
            self.acked = None;
        }
        let Some(current) = self.current_table() else {
            return Ok(());
        };
        if current.version <= self.nacked_version {
            return Ok(());
        }
        if self.acked.is_none() && current.version < self.held_version {
            // Versions never go back: a full table older than what the agent holds would route
            // it on older state. Wait (bounded) for the cache to catch up; heartbeats re-check.
            let since = *self.behind_since.get_or_insert_with(Instant::now);
            if since.elapsed() < self.config.behind_wait {
                return Ok(());
            }
            tracing::warn!(
                agent = %self.identity.agent_id,
                version = current.version,
                held = self.held_version,
                "this replica is behind the agent's table; telling it to try another replica"
            );
            let behind = pb::ControlMessage {
                kind: Some(pb::control_message::Kind::Behind(pb::Behind {
                    version: current.version,
                    held_version: self.held_version,
                })),
            };
            let _ = self.outbound.send(Ok(behind)).await;
            return Err("replica behind the agent");
        }
        self.behind_since = None;
        let update = match &self.acked {
            Some(acked) if acked.version == current.version => return Ok(()),
            Some(acked) => current.delta_from(acked),
            None if self.held_version == current.version => {
                // The agent already holds exactly this version (reconnect without changes).
                self.acked = Some(current.clone());
                self.status.acked_version = current.version;
                self.metrics.acked(current.version);
                self.report_status();
                return Ok(());
            }
            None => current.full_update(),
        };
        let full = update.first().is_some_and(|part| part.full);
        let permit = if full {
            let permit = self
                .full_syncs
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| "control plane stopping")?;
            Some(permit)
        } else {
            None
        };
        // Only tables compiled from a traced change are traced: with tracing off, or for
        // changes that did not come through the API, this is `None` and costs nothing.
        let span = match (&self.tracing, &current.trace) {
            (Some(tracing), Some(trace)) => Some(tracing.push(
                trace,
                &self.identity.region,
                &self.identity.agent_id,
                current.version,
                full,
                update.len(),
            )),
            _ => None,
        };
        for part in update.iter() {
            let mut part = part.clone();
            if let Some(span) = &span {
                part.trace_context = span.context().clone();
            }
            let message = pb::ControlMessage {
                kind: Some(pb::control_message::Kind::Update(part)),
            };
            self.outbound
                .send(Ok(message))
                .await
                .map_err(|_| "agent went away")?;
        }
        self.metrics.metrics().pushed(full);
        self.in_flight = Some(InFlight {
            table: current,
            full,
            sent_at: Instant::now(),
            _full_sync: permit,
            span,
        });
        Ok(())
    }

    async fn handle(&mut self, message: pb::AgentMessage) -> Flow {
        use pb::agent_message::Kind;
        match message.kind {
            Some(Kind::Ack(ack)) => {
                match self.in_flight.take() {
                    Some(mut sent) if sent.table.version == ack.version => {
                        if let Some(span) = sent.span.take() {
                            span.acked();
                        }
                        self.acked = Some(sent.table);
                        self.held_version = ack.version;
                        self.status.acked_version = ack.version;
                        self.metrics.acked(ack.version);
                        self.report_status();
                    }
                    other => {
                        tracing::debug!(agent = %self.identity.agent_id, version = ack.version, "ack for a version not in flight");
                        self.in_flight = other;
                    }
                }
                Flow::Continue
            }
            Some(Kind::Nack(nack)) => {
                tracing::warn!(agent = %self.identity.agent_id, version = nack.version, reason = %nack.reason, "agent refused a routing table");
                self.metrics.metrics().nacked();
                if let Some(sent) = self.in_flight.take() {
                    if sent.full {
                        // The table itself is unacceptable: wait for a newer version.
                        self.nacked_version = sent.table.version;
                    }
                    // After a refused delta the agent's table is unknown: send it a full one.
                    self.acked = None;
                    self.held_version = 0;
                    sent.failed("nack", &nack.reason);
                }
                self.status.last_nack = format!("version {}: {}", nack.version, nack.reason);
                self.report_status();
                Flow::Continue
            }
            Some(Kind::Endpoints(report)) => {
                self.endpoints_desired = self.endpoint_records(report);
                self.flush_endpoints();
                Flow::Continue
            }
            Some(Kind::Heartbeat(_)) => Flow::Continue,
            Some(Kind::Sidecars(report)) => {
                let sidecars = bounded_sidecars(report);
                if sidecars != self.status.sidecars {
                    self.status.sidecars = sidecars;
                    self.report_status();
                }
                Flow::Continue
            }
            Some(Kind::Scale(report)) => {
                self.scale_desired = self.scale_records(report);
                self.flush_scale();
                Flow::Continue
            }
            Some(Kind::Hello(_)) => {
                let _ = self
                    .outbound
                    .try_send(Err(Status::invalid_argument("hello sent twice")));
                Flow::End("second hello")
            }
            None => Flow::Continue,
        }
    }

    /// The etcd records for an endpoint report; invalid entries are logged and skipped.
    fn endpoint_records(&self, report: pb::EndpointReport) -> BTreeMap<String, Vec<u8>> {
        let mut records = BTreeMap::new();
        for function in report.functions {
            let key = match FunctionKey::parse(&function.namespace, &function.name) {
                Ok(key) => key,
                Err(error) => {
                    tracing::warn!(agent = %self.identity.agent_id, %error, "ignoring endpoints of an invalid function name");
                    continue;
                }
            };
            for mut endpoint in function.endpoints {
                let id_ok = !endpoint.id.is_empty()
                    && endpoint.id.len() <= 128
                    && endpoint
                        .id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
                if !id_ok {
                    tracing::warn!(agent = %self.identity.agent_id, id = %endpoint.id, "ignoring endpoint with an invalid id");
                    continue;
                }
                if let Err(problem) = check_host_port(&endpoint.address) {
                    tracing::warn!(agent = %self.identity.agent_id, %problem, "ignoring endpoint with an invalid address");
                    continue;
                }
                if endpoint.zone.is_empty() {
                    endpoint.zone = self.identity.zone.clone();
                }
                let etcd_key =
                    self.store
                        .keys()
                        .endpoint(&key, &self.identity.region, &endpoint.id);
                records.insert(etcd_key, endpoint.encode_to_vec());
            }
        }
        records
    }

    /// Starts bringing etcd to the endpoints last reported, unless a write is under way (its
    /// end starts the next); retried on every heartbeat until it works.
    fn flush_endpoints(&mut self) {
        if self.endpoint_flush.is_some() || self.endpoints_desired == self.endpoints_written {
            return;
        }
        let puts: Vec<(String, Vec<u8>)> = self
            .endpoints_desired
            .iter()
            .filter(|(k, v)| self.endpoints_written.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let deletes: Vec<String> = self
            .endpoints_written
            .keys()
            .filter(|k| !self.endpoints_desired.contains_key(*k))
            .cloned()
            .collect();
        let task = tokio::spawn(write_endpoints(
            self.writer.clone(),
            self.lease,
            self.identity.agent_id.clone(),
            self.endpoints_written.clone(),
            puts,
            deletes,
        ));
        self.endpoint_flush = Some(EndpointFlush(task));
    }

    /// The etcd records for a scale report: region and agent id are this session's, whatever
    /// the report says; invalid entries are logged and skipped.
    fn scale_records(&self, report: pb::ScaleReport) -> BTreeMap<String, Vec<u8>> {
        let mut records = BTreeMap::new();
        for function in report.functions {
            let key = match FunctionKey::parse(&function.namespace, &function.name) {
                Ok(key) => key,
                Err(error) => {
                    tracing::warn!(agent = %self.identity.agent_id, %error, "ignoring the scale of an invalid function name");
                    continue;
                }
            };
            let Some(mut scale) = function.scale else {
                tracing::warn!(agent = %self.identity.agent_id, function = %key, "ignoring a function scale without a scale");
                continue;
            };
            scale.region = self.identity.region.clone();
            scale.agent_id = self.identity.agent_id.clone();
            bound_scale(&mut scale);
            let etcd_key =
                self.store
                    .keys()
                    .scale(&key, &self.identity.region, &self.identity.agent_id);
            records.insert(etcd_key, scale.encode_to_vec());
        }
        records
    }

    /// Hands the scale records that changed (and deletions of those no longer reported) to the
    /// status writer. What does not fit in its queue is retried on the next heartbeat.
    fn flush_scale(&mut self) {
        let puts: Vec<(String, Vec<u8>)> = self
            .scale_desired
            .iter()
            .filter(|(k, v)| self.scale_queued.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let deletes: Vec<String> = self
            .scale_queued
            .keys()
            .filter(|k| !self.scale_desired.contains_key(*k))
            .cloned()
            .collect();
        let writes = puts
            .into_iter()
            .map(|(k, v)| (k, Some(v)))
            .chain(deletes.into_iter().map(|k| (k, None)));
        for (key, value) in writes {
            let write = StatusWrite {
                lease: self.lease,
                key: key.clone(),
                value: value.clone(),
            };
            if self.statuses.try_send(write).is_err() {
                tracing::debug!(agent = %self.identity.agent_id, "status writer busy; scale report deferred");
                return;
            }
            match value {
                Some(value) => self.scale_queued.insert(key, value),
                None => self.scale_queued.remove(&key),
            };
        }
    }

    fn report_status(&mut self) {
        let write = StatusWrite {
            lease: self.lease,
            key: self
                .store
                .keys()
                .agent_status(&self.identity.region, &self.identity.agent_id),
            value: Some(self.status.encode_to_vec()),
        };
        if self.statuses.try_send(write).is_err() {
            tracing::debug!(agent = %self.identity.agent_id, "status writer busy; status dropped");
        }
    }
}

/// Longest text kept from an agent's scale report field (a log line, a reason, an error).
const MAX_SCALE_TEXT: usize = 1024;
/// Log lines kept per scale report.
const MAX_SCALE_LOG_LINES: usize = 10;

/// Cuts a scale report down to what etcd should hold: an agent's log lines are unbounded, and
/// a batch of reports must stay under etcd's request size limit.
fn bound_scale(scale: &mut pb::RegionScale) {
    fn cut(text: &mut String) {
        if text.len() > MAX_SCALE_TEXT {
            let mut end = MAX_SCALE_TEXT;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
    }
    let excess = scale
        .last_log_lines
        .len()
        .saturating_sub(MAX_SCALE_LOG_LINES);
    scale.last_log_lines.drain(..excess);
    scale.last_log_lines.iter_mut().for_each(cut);
    cut(&mut scale.reason);
    cut(&mut scale.error);
    cut(&mut scale.last_exit);
    scale.instances.truncate(MAX_INSTANCES_LIMIT as usize);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn endpoints_are_written_in_chunks_and_a_failed_chunk_is_left_for_later() {
        let (queue, mut commits) = mpsc::channel(1);
        let puts: Vec<(String, Vec<u8>)> =
            (0..250).map(|i| (format!("k{i:03}"), vec![1])).collect();
        let written = BTreeMap::from([("old".to_string(), vec![0])]);
        let write = tokio::spawn(write_endpoints(
            Writer::new(queue),
            7,
            "a1".into(),
            written,
            puts,
            vec!["old".into()],
        ));
        // Two chunks commit; the third fails.
        let mut sizes = Vec::new();
        for answer in [Ok(1), Ok(2), Err("etcd timed out".to_string())] {
            let pending = commits.recv().await.expect("a chunk");
            assert_eq!(pending.write.lease, 7);
            sizes.push(pending.write.ops());
            let _ = pending.done.send(answer);
        }
        let done = write.await.expect("the write ends");
        assert!(!done.complete);
        let written = done.written;
        assert_eq!(sizes, [ENDPOINT_CHUNK, ENDPOINT_CHUNK, 51]);
        // What the committed chunks put is known written; the failed chunk's keys are not, and
        // the failed delete leaves "old" to be deleted by the next flush.
        assert_eq!(written.len(), 2 * ENDPOINT_CHUNK + 1);
        assert!(written.contains_key("old"));
        assert!(written.contains_key("k199") && !written.contains_key("k200"));
    }

    #[test]
    fn hello_validation_names_the_field() {
        let hello = pb::Hello {
            agent_id: "a1".into(),
            region: "Bad_Region".into(),
            ..Default::default()
        };
        let error = AgentIdentity::try_from(&hello).expect_err("invalid region");
        assert_eq!(error.field, "region");
        assert!(error.to_string().starts_with("hello.region: "));

        let hello = pb::Hello {
            agent_id: "a1".into(),
            region: "us-east".into(),
            gateway: "nohostport".into(),
            ..Default::default()
        };
        assert_eq!(
            AgentIdentity::try_from(&hello)
                .expect_err("bad gateway")
                .field,
            "gateway"
        );

        let hello = pb::Hello {
            agent_id: "a1".into(),
            region: "us-east".into(),
            gateway: "127.0.1.1:15002".into(),
            ..Default::default()
        };
        assert!(AgentIdentity::try_from(&hello).is_ok());
    }

    #[test]
    fn hello_api_address_is_checked_and_kept() {
        let hello = pb::Hello {
            agent_id: "a1".into(),
            region: "us-east".into(),
            api_address: "127.0.1.1".into(),
            ..Default::default()
        };
        let error = AgentIdentity::try_from(&hello).expect_err("no port");
        assert_eq!(error.field, "apiAddress");
        let hello = pb::Hello {
            api_address: "127.0.1.1:7100".into(),
            ..hello
        };
        assert_eq!(
            AgentIdentity::try_from(&hello).expect("valid").api_address,
            "127.0.1.1:7100"
        );
    }

    #[test]
    fn scale_reports_are_bounded() {
        let mut scale = pb::RegionScale {
            last_log_lines: (0..15).map(|i| format!("line {i}")).collect(),
            reason: "é".repeat(MAX_SCALE_TEXT),
            instances: vec![pb::InstanceStatus::default(); 1500],
            ..Default::default()
        };
        bound_scale(&mut scale);
        assert_eq!(scale.last_log_lines.len(), MAX_SCALE_LOG_LINES);
        assert_eq!(scale.last_log_lines[0], "line 5");
        assert_eq!(scale.reason.len(), MAX_SCALE_TEXT);
        assert_eq!(scale.instances.len(), MAX_INSTANCES_LIMIT as usize);
    }

    #[test]
    fn host_port() {
        assert!(check_host_port("127.0.0.1:80").is_ok());
        assert!(check_host_port("host:0").is_err());
        assert!(check_host_port(":80").is_err());
        assert!(check_host_port("host").is_err());
    }
}
