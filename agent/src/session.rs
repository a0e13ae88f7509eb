//! One push stream to one control-plane replica: Hello, then apply each update, persist it, Ack
//! it and publish it (or Nack it and keep the old table), report endpoints (external URLs and
//! process instances, again whenever instances change) and the scale state of process
//! functions, and exchange heartbeats until the stream fails or falls silent.
//!
//! When span export is on and an update carries the trace context of the control plane's push
//! (`RoutingUpdate.trace_context`), applying it is a `meridian.agent.apply` span and sending the
//! answer a `meridian.agent.ack` span, both children of that push: the change's trace then
//! reaches every agent. Off, or for untraced updates, there is no span work at all.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use meridian_proto::updates::Assembler;
use meridian_proto::v1::agent_service_client::AgentServiceClient;
use meridian_proto::v1::{
    agent_message, control_message, Ack, AgentMessage, CommandPolicy, ControlMessage,
    FunctionEndpoints, Heartbeat, Hello, Nack, RoutingTable, RoutingUpdate, ScaleReport,
    SidecarReport, SidecarStatus, TableReport,
};
use tokio::sync::{mpsc, watch};
use tokio::time::{self, Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use crate::autoscaler::ScaleStatus;
use crate::endpoints;
use crate::local_api::CurrentTable;
use crate::runtime::Snapshot;
use crate::state::StateStore;
use crate::table::{self, Table};

/// How often the agent sends a heartbeat (the control plane does the same).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// Silence after which the stream is considered dead: three missed heartbeats.
pub const SILENCE_TIMEOUT: Duration = Duration::from_secs(15);
/// TCP connect timeout: a dead replica must be skipped quickly, not waited on.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Messages queued towards the control plane. Small: acks and reports are few, and a control
/// plane that does not read is detected by the send timeout, not by a large buffer.
const OUTBOUND_BUFFER: usize = 16;
/// Instance changes come in bursts (spawn, ready, a neighbour draining): one report per burst.
pub const ENDPOINT_DEBOUNCE: Duration = Duration::from_millis(100);
/// Scale reports change with the load every second; at most one per this interval.
pub const SCALE_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// Why a session ended. The connector retries after all of them except a refusal.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("invalid control-plane address {address:?}")]
    BadAddress {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("cannot connect to {address}")]
    Connect {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// INVALID_ARGUMENT: the control plane refused the Hello. Retrying cannot help.
    #[error("control plane refused the hello: {}", .0.message())]
    Refused(Status),
    #[error("stream failed")]
    Stream(#[source] Status),
    #[error("control plane closed the stream")]
    Closed,
    #[error("no message from the control plane for {0:?}")]
    Silent(Duration),
    #[error("control plane did not answer the stream for {0:?}")]
    OpenTimeout(Duration),
    #[error("control plane stopped reading the stream")]
    SendStalled,
    /// The replica's tables are older than the one held (its cache lags etcd): try another.
    #[error("control plane is behind: its table version {version} is older than the held version {held}")]
    Behind { version: i64, held: i64 },
}

impl SessionError {
    /// Maps a gRPC status, singling out the one that means "do not retry".
    pub fn from_status(status: Status) -> Self {
        if status.code() == Code::InvalidArgument {
            Self::Refused(status)
        } else {
            Self::Stream(status)
        }
    }

    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Refused(_))
    }
}

/// Messages from the control plane, as the session reads them.
pub type ControlStream = BoxStream<'static, Result<ControlMessage, Status>>;

/// Opens the `AgentService.Connect` stream to one address. The seam between the session and the
/// network: tests substitute a scripted control plane.
pub trait Dialer: Send + Sync {
    /// `outbound` already holds the Hello; the stream must carry it before anything else.
    fn open(
        &self,
        address: &str,
        outbound: ReceiverStream<AgentMessage>,
    ) -> BoxFuture<'static, Result<ControlStream, SessionError>>;
}

/// The real dialer: a tonic channel per attempt, with a short connect timeout.
#[derive(Debug, Clone)]
pub struct GrpcDialer {
    connect_timeout: Duration,
}

impl GrpcDialer {
    pub fn new(connect_timeout: Duration) -> Self {
        Self { connect_timeout }
    }
}

impl Default for GrpcDialer {
    fn default() -> Self {
        Self::new(CONNECT_TIMEOUT)
    }
}

impl Dialer for GrpcDialer {
    fn open(
        &self,
        address: &str,
        outbound: ReceiverStream<AgentMessage>,
    ) -> BoxFuture<'static, Result<ControlStream, SessionError>> {
        let address = address.to_owned();
        let connect_timeout = self.connect_timeout;
        Box::pin(async move {
            let endpoint = tonic::transport::Endpoint::from_shared(address.clone())
                .map_err(|source| SessionError::BadAddress {
                    address: address.clone(),
                    source,
                })?
                .connect_timeout(connect_timeout);
            let channel = endpoint
                .connect()
                .await
                .map_err(|source| SessionError::Connect { address, source })?;
            let response = AgentServiceClient::new(channel)
                .max_decoding_message_size(meridian_proto::updates::MAX_MESSAGE_BYTES)
                .connect(outbound)
                .await
                .map_err(SessionError::from_status)?;
            Ok(response.into_inner().boxed())
        })
    }
}

/// Who this agent is, as told in every Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub agent_id: String,
    pub region: String,
    pub zone: String,
    pub cloud: String,
    pub gateway: String,
}

/// Heartbeat and silence periods; the defaults are the protocol's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub heartbeat: Duration,
    pub silence: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            heartbeat: HEARTBEAT_INTERVAL,
            silence: SILENCE_TIMEOUT,
        }
    }
}

/// What outlives a session: identity, the held table, where it is persisted and published.
#[derive(Debug)]
pub struct AgentState {
    identity: Identity,
    store: StateStore,
    publisher: watch::Sender<CurrentTable>,
    held: Option<Table>,
    timing: Timing,
    /// Tables the local sidecars could not compile, to be Nacked upstream.
    sidecar_refusals: Option<mpsc::Receiver<TableReport>>,
    /// The address of the agent's API, told in the Hello (empty: not served).
    api_address: String,
    /// The runtime's instances, reported as endpoints of process functions.
    instances: Option<watch::Receiver<Arc<Snapshot>>>,
    /// The autoscaler's state, reported as `ScaleReport`s.
    scale: Option<watch::Receiver<ScaleStatus>>,
    /// Set while a stream to a control plane is open (the `meridian_agent_connected` gauge).
    connected: Arc<AtomicBool>,
    /// When the last stream opened (the autoscaler's region grace counts from it).
    session_opened: Option<watch::Sender<Option<Instant>>>,
    /// Spans of traced updates; `None` when export is off (decided once, at start).
    spans: Option<spans::UpdateSpans>,
    /// What instances may run, told in the Hello so the API can refuse what never starts.
    command_policy: Option<CommandPolicy>,
    /// The sidecars watching the local API and what each loaded (see `LocalApi`).
    sidecars: Option<watch::Receiver<Arc<Vec<SidecarStatus>>>>,
}

impl AgentState {
    /// `held` is the table loaded from disk, if any. It is published at once so that the local
    /// API serves it before any control plane is reached.
    pub fn new(
        identity: Identity,
        store: StateStore,
        publisher: watch::Sender<CurrentTable>,
        held: Option<Table>,
    ) -> Self {
        publisher.send_replace(held.as_ref().map(|t| Arc::new(t.to_wire())));
        Self {
            identity,
            store,
            publisher,
            held,
            timing: Timing::default(),
            sidecar_refusals: None,
            api_address: String::new(),
            instances: None,
            scale: None,
            connected: Arc::new(AtomicBool::new(false)),
            session_opened: None,
            spans: spans::UpdateSpans::when_enabled(),
            command_policy: None,
            sidecars: None,
        }
    }

    /// The command policy announced in every Hello.
    pub fn with_command_policy(mut self, policy: CommandPolicy) -> Self {
        self.command_policy = Some(policy);
        self
    }

    /// The sidecars' statuses are reported upstream as they change.
    pub fn with_sidecar_statuses(
        mut self,
        sidecars: watch::Receiver<Arc<Vec<SidecarStatus>>>,
    ) -> Self {
        self.sidecars = Some(sidecars);
        self
    }

    /// Kept true while a stream to a control plane is open.
    pub fn with_connected(mut self, connected: Arc<AtomicBool>) -> Self {
        self.connected = connected;
        self
    }

    /// Told the instant every stream to a control plane opens.
    pub fn with_session_clock(mut self, opened: watch::Sender<Option<Instant>>) -> Self {
        self.session_opened = Some(opened);
        self
    }

    /// The agent's API address (`host:port`), for operators' tools to find it.
    pub fn with_api_address(mut self, api_address: impl Into<String>) -> Self {
        self.api_address = api_address.into();
        self
    }

    /// Instances of process functions are reported as endpoints, on every change.
    pub fn with_instances(mut self, instances: watch::Receiver<Arc<Snapshot>>) -> Self {
        self.instances = Some(instances);
        self
    }

    /// The autoscaler's state is reported upstream as it changes.
    pub fn with_scale_status(mut self, scale: watch::Receiver<ScaleStatus>) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Refusals reported by sidecars (see `LocalApi::with_refusals`) are forwarded as Nacks.
    pub fn with_sidecar_refusals(mut self, refusals: mpsc::Receiver<TableReport>) -> Self {
        self.sidecar_refusals = Some(refusals);
        self
    }

    pub fn with_timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn held(&self) -> Option<&Table> {
        self.held.as_ref()
    }

    fn hello(&self) -> AgentMessage {
        let id = &self.identity;
        message(agent_message::Kind::Hello(Hello {
            agent_id: id.agent_id.clone(),
            region: id.region.clone(),
            zone: id.zone.clone(),
            cloud: id.cloud.clone(),
            gateway: id.gateway.clone(),
            last_version: self.held.as_ref().map_or(0, Table::version),
            api_address: self.api_address.clone(),
            command_policy: self.command_policy.clone(),
        }))
    }

    /// The sidecar statuses now; `None` without a local API tracking them.
    fn sidecar_statuses(&self) -> Option<Arc<Vec<SidecarStatus>>> {
        self.sidecars
            .as_ref()
            .map(|sidecars| Arc::clone(&sidecars.borrow()))
    }

    /// The endpoints the held table and the runtime's instances imply now.
    fn endpoint_set(&self) -> Option<Vec<FunctionEndpoints>> {
        let held = self.held.as_ref()?;
        let snapshot = self
            .instances
            .as_ref()
            .map(|instances| Arc::clone(&instances.borrow()))
            .unwrap_or_default();
        Some(endpoints::compute(held, &self.identity.zone, &snapshot))
    }

    /// The scale state now; `None` without an autoscaler.
    fn scale_status(&self) -> Option<ScaleStatus> {
        self.scale.as_ref().map(|scale| Arc::clone(&scale.borrow()))
    }
}

/// How a session ended. There is no clean end: shutdown drops the session's future instead.
#[derive(Debug)]
pub struct SessionOutcome {
    /// At least one update arrived: the replica worked, so the connector resets its backoff.
    pub received_update: bool,
    pub error: SessionError,
}

/// Runs one session against `address` until it fails.
pub async fn run(state: &mut AgentState, dialer: &dyn Dialer, address: &str) -> SessionOutcome {
    let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
    let mut first = vec![state.hello()];
    // Report what the held table implies right away: a control plane that finds us up to date
    // sends no update, and the endpoints must not wait for the next change to be re-registered
    // under this stream's lease.
    let reported = state.endpoint_set();
    if let Some(set) = &reported {
        first.push(message(agent_message::Kind::Endpoints(endpoints::report(
            set,
        ))));
    }
    // The same for the scale state: the control plane's copy went with the previous stream.
    let scale_reported = state.scale_status().filter(|status| !status.is_empty());
    if let Some(status) = &scale_reported {
        first.push(message(agent_message::Kind::Scale(scale_report(status))));
    }
    let scale_sent_at = scale_reported.as_ref().map(|_| Instant::now());
    // And which sidecars load which table: the control plane counts the agent in sync only
    // once they have the newest one too.
    let sidecars_reported = state.sidecar_statuses();
    if let Some(statuses) = &sidecars_reported {
        first.push(message(agent_message::Kind::Sidecars(SidecarReport {
            sidecars: statuses.to_vec(),
        })));
    }
    for msg in first {
        // The buffer is empty and larger than `first`: this cannot fail.
        let _ = tx.try_send(msg);
    }
    let silence = state.timing.silence;
    // The call returns once the control plane answers with headers, which it may do only after
    // it has handled the Hello (lease, etcd write): bounded like any other silence.
    let inbound = match time::timeout(silence, dialer.open(address, ReceiverStream::new(rx))).await
    {
        Ok(Ok(inbound)) => inbound,
        Ok(Err(error)) => return outcome(false, error),
        Err(_) => return outcome(false, SessionError::OpenTimeout(silence)),
    };
    tracing::info!(%address, agent_id = %state.identity.agent_id, "connected to control plane");
    // Cleared however the session ends, including its future being dropped at shutdown.
    let _connected = ConnectedFlag::raise(Arc::clone(&state.connected));
    if let Some(opened) = &state.session_opened {
        opened.send_replace(Some(Instant::now()));
    }
    let mut stream = OpenStream {
        state,
        tx,
        received_update: false,
        reported,
        endpoints_due: None,
        scale_reported,
        scale_sent_at,
        scale_due: None,
        parts: Assembler::default(),
        sidecars_reported,
        sidecars_due: None,
    };
    let error = stream.run(inbound).await;
    outcome(stream.received_update, error)
}

/// Holds a flag true for as long as it lives.
struct ConnectedFlag(Arc<AtomicBool>);

impl ConnectedFlag {
    fn raise(flag: Arc<AtomicBool>) -> Self {
        flag.store(true, Ordering::Relaxed);
        Self(flag)
    }
}

impl Drop for ConnectedFlag {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// The request stream closed under a send: the control plane ended the call, and what it sent
/// last may still be in the response stream (a `Behind`, or the status it ended with). Read it,
/// for at most `within`, so that the session ends for the reason the control plane gave.
async fn why_closed(inbound: &mut ControlStream, within: Duration) -> SessionError {
    let drain = async {
        while let Some(next) = inbound.next().await {
            match next {
                Err(status) => return SessionError::from_status(status),
                Ok(ControlMessage {
                    kind: Some(control_message::Kind::Behind(behind)),
                }) => {
                    return SessionError::Behind {
                        version: behind.version,
                        held: behind.held_version,
                    }
                }
                // An update or heartbeat sent before the end is moot now.
                Ok(_) => {}
            }
        }
        SessionError::Closed
    };
    time::timeout(within, drain)
        .await
        .unwrap_or(SessionError::Closed)
}

fn outcome(received_update: bool, error: SessionError) -> SessionOutcome {
    SessionOutcome {
        received_update,
        error,
    }
}

fn message(kind: agent_message::Kind) -> AgentMessage {
    AgentMessage { kind: Some(kind) }
}

fn scale_report(status: &ScaleStatus) -> ScaleReport {
    ScaleReport {
        functions: status.to_vec(),
    }
}

/// Waits for a change on an optional channel; never resolves without one or once it closed
/// (the caller then stops polling it).
async fn next_change<T>(receiver: &mut Option<watch::Receiver<T>>) -> bool {
    match receiver {
        Some(receiver) => receiver.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Sleeps until `deadline`; never resolves without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// One open stream's bookkeeping.
struct OpenStream<'a> {
    state: &'a mut AgentState,
    tx: mpsc::Sender<AgentMessage>,
    received_update: bool,
    /// The endpoint set last reported on this stream; `None` before the first.
    reported: Option<Vec<FunctionEndpoints>>,
    /// When to look at changed instances again (debounced).
    endpoints_due: Option<Instant>,
    /// The scale state last reported on this stream, and when.
    scale_reported: Option<ScaleStatus>,
    scale_sent_at: Option<Instant>,
    /// A changed scale state waits until then (at most one report per interval).
    scale_due: Option<Instant>,
    /// Parts of an update received so far (`more` was set); applied when the last arrives.
    parts: Assembler,
    /// The sidecar statuses last reported on this stream, and when to look again.
    sidecars_reported: Option<Arc<Vec<SidecarStatus>>>,
    sidecars_due: Option<Instant>,
}

impl OpenStream<'_> {
    async fn run(&mut self, mut inbound: ControlStream) -> SessionError {
        match self.serve(&mut inbound).await {
            SessionError::Closed => why_closed(&mut inbound, self.state.timing.silence).await,
            error => error,
        }
    }

    async fn serve(&mut self, inbound: &mut ControlStream) -> SessionError {
        let timing = self.state.timing;
        let mut heartbeat = time::interval_at(Instant::now() + timing.heartbeat, timing.heartbeat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut deadline = Instant::now() + timing.silence;
        let mut watch_instances = self.state.instances.is_some();
        let mut watch_scale = self.state.scale.is_some();
        let mut watch_sidecars = self.state.sidecars.is_some();
        loop {
            tokio::select! {
                changed = next_change(&mut self.state.sidecars), if watch_sidecars => {
                    watch_sidecars = changed;
                    if changed && self.sidecars_due.is_none() {
                        self.sidecars_due = Some(Instant::now() + ENDPOINT_DEBOUNCE);
                    }
                }
                () = sleep_until_some(self.sidecars_due) => {
                    self.sidecars_due = None;
                    if let Err(error) = self.report_sidecars().await {
                        return error;
                    }
                }
                changed = next_change(&mut self.state.instances), if watch_instances => {
                    watch_instances = changed;
                    if changed && self.endpoints_due.is_none() {
                        self.endpoints_due = Some(Instant::now() + ENDPOINT_DEBOUNCE);
                    }
                }
                () = sleep_until_some(self.endpoints_due) => {
                    self.endpoints_due = None;
                    if let Err(error) = self.report_endpoints().await {
                        return error;
                    }
                }
                changed = next_change(&mut self.state.scale), if watch_scale => {
                    watch_scale = changed;
                    if changed && self.scale_due.is_none() {
                        let now = Instant::now();
                        let earliest = self
                            .scale_sent_at
                            .map_or(now, |at| at + SCALE_REPORT_INTERVAL);
                        self.scale_due = Some(earliest.max(now));
                    }
                }
                () = sleep_until_some(self.scale_due) => {
                    self.scale_due = None;
                    if let Err(error) = self.report_scale().await {
                        return error;
                    }
                }
                _ = heartbeat.tick() => {
                    let beat = Heartbeat { unix_ms: unix_ms() };
                    if let Err(error) = self.send(agent_message::Kind::Heartbeat(beat)).await {
                        return error;
                    }
                }
                () = time::sleep_until(deadline) => return SessionError::Silent(timing.silence),
                Some(report) = next_refusal(&mut self.state.sidecar_refusals) => {
                    let held = self.state.held.as_ref().map_or(0, Table::version);
                    // A refusal of an older table is moot: the sidecar has been sent a newer one.
                    if report.version == held {
                        let reason = format!("sidecar {}: {}", report.client, report.reason);
                        if let Err(error) = self.nack(report.version, reason).await {
                            return error;
                        }
                    }
                }
                next = inbound.next() => {
                    let msg = match next {
                        None => return SessionError::Closed,
                        Some(Err(status)) => return SessionError::from_status(status),
                        Some(Ok(msg)) => msg,
                    };
                    deadline = Instant::now() + timing.silence;
                    if let Some(control_message::Kind::Behind(behind)) = &msg.kind {
                        return SessionError::Behind {
                            version: behind.version,
                            held: behind.held_version,
                        };
                    }
                    if let Some(control_message::Kind::Update(update)) = msg.kind {
                        self.received_update = true;
                        let update = match self.assemble(update) {
                            Ok(Some(update)) => update,
                            Ok(None) => continue,
                            Err((version, reason)) => {
                                if let Err(error) = self.nack(version, reason).await {
                                    return error;
                                }
                                continue;
                            }
                        };
                        // The control plane hears from us while a large table is applied and
                        // persisted, which can outlast its silence timeout on a loaded host.
                        let keepalive = keep_alive(self.tx.clone(), timing.heartbeat);
                        let handled = tokio::select! {
                            handled = self.handle_update(update) => handled,
                            never = keepalive => match never {},
                        };
                        if let Err(error) = handled {
                            return error;
                        }
                        // Applying and persisting a large table is our time, not the control
                        // plane's silence: what it sent meanwhile waits in the stream.
                        deadline = Instant::now() + timing.silence;
                    }
                    // Heartbeats only prove the stream is alive, which resetting the deadline
                    // has recorded.
                }
            }
        }
    }

    /// Collects the parts of a large update; returns the whole update once its last part is in.
    fn assemble(&mut self, part: RoutingUpdate) -> Result<Option<RoutingUpdate>, (i64, String)> {
        self.parts
            .push(part)
            .map_err(|error| (error.version(), error.to_string()))
    }

    /// Apply, persist, Ack, publish, report; or Nack and keep the old table.
    async fn handle_update(&mut self, update: RoutingUpdate) -> Result<(), SessionError> {
        let version = update.version;
        let state = &mut *self.state;
        let trace = state
            .spans
            .as_ref()
            .and_then(|spans| spans.start(&update, &state.identity));
        let table = match table::apply(state.held.as_ref(), &state.identity.region, &update) {
            Ok(table) => table,
            // Versions never go back: keep the held table and find a replica that is not behind.
            Err(table::TableError::Older { version, held }) => {
                drop(trace);
                tracing::warn!(
                    version,
                    held,
                    "control plane sent an older table; keeping the held one"
                );
                return Err(SessionError::Behind { version, held });
            }
            Err(error) => return self.refuse(trace, version, error.reason()).await,
        };
        let wire = Arc::new(table.to_wire());
        if let Err(reason) = persist(&state.store, &wire).await {
            tracing::error!(version, %reason, "cannot persist routing table; refusing it");
            return self.refuse(trace, version, reason).await;
        }
        let ack = trace.map(|trace| trace.applied(table.functions().len()));
        let sent = self.send(agent_message::Kind::Ack(Ack { version })).await;
        if let Some(ack) = ack {
            ack.sent(sent.as_ref().err());
        }
        sent?;
        tracing::info!(
            version,
            full = update.full,
            functions = table.functions().len(),
            "accepted routing table"
        );
        let state = &mut *self.state;
        state.publisher.send_replace(Some(wire));
        state.held = Some(table);
        self.report_endpoints().await
    }

    /// Sends the endpoint set if it differs from the last one sent on this stream.
    async fn report_endpoints(&mut self) -> Result<(), SessionError> {
        let Some(set) = self.state.endpoint_set() else {
            return Ok(());
        };
        if self.reported.as_ref() != Some(&set) {
            let report = endpoints::report(&set);
            self.reported = Some(set);
            self.send(agent_message::Kind::Endpoints(report)).await?;
        }
        Ok(())
    }

    /// Sends the sidecars' statuses if they differ from the last ones sent on this stream.
    async fn report_sidecars(&mut self) -> Result<(), SessionError> {
        let Some(statuses) = self.state.sidecar_statuses() else {
            return Ok(());
        };
        if self.sidecars_reported.as_deref() == Some(&*statuses) {
            return Ok(());
        }
        let report = SidecarReport {
            sidecars: statuses.to_vec(),
        };
        self.sidecars_reported = Some(statuses);
        self.send(agent_message::Kind::Sidecars(report)).await
    }

    /// Sends the scale state if it differs from the last one sent on this stream.
    async fn report_scale(&mut self) -> Result<(), SessionError> {
        let Some(status) = self.state.scale_status() else {
            return Ok(());
        };
        let unchanged = match &self.scale_reported {
            Some(reported) => **reported == *status,
            // Nothing to say yet: no process function here.
            None => status.is_empty(),
        };
        if unchanged {
            return Ok(());
        }
        self.scale_sent_at = Some(Instant::now());
        let report = scale_report(&status);
        self.scale_reported = Some(status);
        self.send(agent_message::Kind::Scale(report)).await
    }

    /// Nacks an update, ending its spans (if traced) with the reason.
    async fn refuse(
        &mut self,
        trace: Option<spans::ApplySpan>,
        version: i64,
        reason: String,
    ) -> Result<(), SessionError> {
        let Some(trace) = trace else {
            return self.nack(version, reason).await;
        };
        let nack = trace.refused(&reason);
        let sent = self.nack(version, reason).await;
        nack.sent(sent.as_ref().err());
        sent
    }

    async fn nack(&mut self, version: i64, reason: String) -> Result<(), SessionError> {
        tracing::warn!(version, %reason, "refusing routing update; keeping the held table");
        self.send(agent_message::Kind::Nack(Nack { version, reason }))
            .await
    }

    async fn send(&mut self, kind: agent_message::Kind) -> Result<(), SessionError> {
        match time::timeout(self.state.timing.silence, self.tx.send(message(kind))).await {
            Ok(Ok(())) => Ok(()),
            // The transport dropped the request stream: the call is over.
            Ok(Err(_)) => Err(SessionError::Closed),
            Err(_) => Err(SessionError::SendStalled),
        }
    }
}

/// The next sidecar refusal; never resolves when there is no source of them.
async fn next_refusal(source: &mut Option<mpsc::Receiver<TableReport>>) -> Option<TableReport> {
    match source {
        Some(receiver) => match receiver.recv().await {
            Some(report) => Some(report),
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Writes the table off the async threads (fsync can take a while). Returns the Nack reason.
/// Sends a heartbeat every `period` (the first one period from now) until dropped; a full
/// queue already tells the control plane that we are alive.
async fn keep_alive(tx: mpsc::Sender<AgentMessage>, period: Duration) -> std::convert::Infallible {
    let mut ticks = time::interval_at(Instant::now() + period, period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let _ = tx.try_send(message(agent_message::Kind::Heartbeat(Heartbeat {
            unix_ms: unix_ms(),
        })));
    }
}

async fn persist(store: &StateStore, wire: &Arc<RoutingTable>) -> Result<(), String> {
    let store = store.clone();
    let wire = Arc::clone(wire);
    match tokio::task::spawn_blocking(move || store.save(&wire)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(format!(
            "cannot persist table: {}",
            crate::error_chain(&error)
        )),
        Err(error) => Err(format!("cannot persist table: {error}")),
    }
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The spans of traced updates: `meridian.agent.apply` (validate and persist) and
/// `meridian.agent.ack` (send the Ack or Nack), both children of the control plane's
/// `meridian.push` span whose W3C context the update carries.
mod spans {
    use std::sync::Arc;

    use opentelemetry::global::{self, BoxedTracer};
    use opentelemetry::trace::{SpanKind, Status, TraceContextExt as _, Tracer as _};
    use opentelemetry::{Context, KeyValue};

    use super::{Identity, RoutingUpdate, SessionError};

    pub const APPLY_SPAN: &str = "meridian.agent.apply";
    pub const ACK_SPAN: &str = "meridian.agent.ack";
    pub const REGION: &str = "meridian.region";
    pub const AGENT: &str = "meridian.agent";
    pub const TABLE_VERSION: &str = "meridian.table.version";
    pub const FULL: &str = "meridian.push.full";
    pub const FUNCTIONS: &str = "meridian.table.functions";
    /// `ack` or `nack`.
    pub const RESULT: &str = "meridian.agent.result";
    pub const ERROR: &str = "meridian.error";

    /// Makes the spans; exists only while export is on.
    #[derive(Debug)]
    pub struct UpdateSpans {
        tracer: Arc<BoxedTracer>,
    }

    impl UpdateSpans {
        pub fn when_enabled() -> Option<Self> {
            meridian_common::telemetry::enabled().then(|| Self {
                tracer: Arc::new(global::tracer("meridian-agent")),
            })
        }

        /// Starts the apply span of `update`; `None` when the update carries no trace context
        /// (the change was not traced).
        pub fn start(&self, update: &RoutingUpdate, identity: &Identity) -> Option<ApplySpan> {
            if update.trace_context.is_empty() {
                return None;
            }
            let push = global::get_text_map_propagator(|p| p.extract(&update.trace_context));
            let attributes = vec![
                KeyValue::new(REGION, identity.region.clone()),
                KeyValue::new(AGENT, identity.agent_id.clone()),
                KeyValue::new(TABLE_VERSION, update.version),
            ];
            let mut apply_attributes = attributes.clone();
            apply_attributes.push(KeyValue::new(FULL, update.full));
            let span = self
                .tracer
                .span_builder(APPLY_SPAN)
                .with_kind(SpanKind::Consumer)
                .with_attributes(apply_attributes)
                .start_with_context(&*self.tracer, &push);
            Some(ApplySpan {
                tracer: Arc::clone(&self.tracer),
                apply: push.with_span(span),
                push,
                attributes,
            })
        }
    }

    /// The apply span of one update, open while it is validated and persisted.
    #[derive(Debug)]
    pub struct ApplySpan {
        tracer: Arc<BoxedTracer>,
        /// The push's context: the parent of both spans.
        push: Context,
        apply: Context,
        /// Region, agent and version, shared by both spans.
        attributes: Vec<KeyValue>,
    }

    impl ApplySpan {
        /// The table was applied and persisted; starts the span of sending the Ack.
        pub fn applied(self, functions: usize) -> AckSpan {
            let span = self.apply.span();
            span.set_attribute(KeyValue::new(
                FUNCTIONS,
                i64::try_from(functions).unwrap_or(i64::MAX),
            ));
            span.end();
            self.answer("ack")
        }

        /// The table was refused; starts the span of sending the Nack.
        pub fn refused(self, reason: &str) -> AckSpan {
            let span = self.apply.span();
            span.set_attribute(KeyValue::new(ERROR, reason.to_owned()));
            span.set_status(Status::error(reason.to_owned()));
            span.end();
            self.answer("nack")
        }

        fn answer(self, result: &'static str) -> AckSpan {
            let mut attributes = self.attributes;
            attributes.push(KeyValue::new(RESULT, result));
            let span = self
                .tracer
                .span_builder(ACK_SPAN)
                .with_kind(SpanKind::Producer)
                .with_attributes(attributes)
                .start_with_context(&*self.tracer, &self.push);
            AckSpan {
                cx: self.push.with_span(span),
            }
        }
    }

    /// The span of sending one Ack or Nack.
    #[derive(Debug)]
    pub struct AckSpan {
        cx: Context,
    }

    impl AckSpan {
        /// Ends the span: sent, or the error that kept it from the control plane.
        pub fn sent(self, error: Option<&SessionError>) {
            let span = self.cx.span();
            if let Some(error) = error {
                let message = crate::error_chain(error);
                span.set_attribute(KeyValue::new(ERROR, message.clone()));
                span.set_status(Status::error(message));
            }
            span.end();
        }
    }
}

/// A scripted control plane for session and connector tests.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use tokio::sync::oneshot;

    /// One `open` call, for the test to answer.
    pub struct Attempt {
        pub address: String,
        pub outbound: ReceiverStream<AgentMessage>,
        pub at: Instant,
        reply: oneshot::Sender<Result<ControlStream, SessionError>>,
    }

    impl Attempt {
        /// Accepts the stream; the returned sender plays the control plane.
        pub fn accept(self) -> (mpsc::Sender<Result<ControlMessage, Status>>, Outbound) {
            let (tx, rx) = mpsc::channel(16);
            let _ = self.reply.send(Ok(ReceiverStream::new(rx).boxed()));
            (tx, Outbound(self.outbound))
        }

        pub fn fail(self, error: SessionError) {
            let _ = self.reply.send(Err(error));
        }
    }

    /// What the agent sends.
    pub struct Outbound(pub ReceiverStream<AgentMessage>);

    impl Outbound {
        pub async fn next(&mut self) -> agent_message::Kind {
            self.0
                .next()
                .await
                .and_then(|m| m.kind)
                .expect("agent closed its stream")
        }

        /// The next message that is not a heartbeat.
        pub async fn next_non_heartbeat(&mut self) -> agent_message::Kind {
            loop {
                match self.next().await {
                    agent_message::Kind::Heartbeat(_) => continue,
                    other => return other,
                }
            }
        }
    }

    pub struct FakeDialer(pub mpsc::UnboundedSender<Attempt>);

    pub fn dialer() -> (FakeDialer, mpsc::UnboundedReceiver<Attempt>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (FakeDialer(tx), rx)
    }

    impl Dialer for FakeDialer {
        fn open(
            &self,
            address: &str,
            outbound: ReceiverStream<AgentMessage>,
        ) -> BoxFuture<'static, Result<ControlStream, SessionError>> {
            let (reply, answer) = oneshot::channel();
            let attempt = Attempt {
                address: address.to_owned(),
                outbound,
                at: Instant::now(),
                reply,
            };
            let sent = self.0.send(attempt);
            Box::pin(async move {
                if sent.is_err() {
                    return Err(SessionError::Closed);
                }
                answer.await.unwrap_or(Err(SessionError::Closed))
            })
        }
    }

    pub fn update(msg: RoutingUpdate) -> Result<ControlMessage, Status> {
        Ok(ControlMessage {
            kind: Some(control_message::Kind::Update(msg)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::fake::*;
    use super::*;
    use meridian_proto::v1::{local_workload, ExternalRegion, FunctionRoute, LocalWorkload};

    fn identity() -> Identity {
        Identity {
            agent_id: "us-east-1".into(),
            region: "us-east".into(),
            zone: "us-east-a".into(),
            cloud: "local".into(),
            gateway: "127.0.1.1:15002".into(),
        }
    }

    fn external(name: &str, urls: &[&str]) -> FunctionRoute {
        FunctionRoute {
            namespace: "default".into(),
            name: name.into(),
            function_version: 1,
            workload: Some(LocalWorkload {
                scale: Default::default(),
                kind: Some(local_workload::Kind::External(ExternalRegion {
                    region: "us-east".into(),
                    urls: urls.iter().map(|u| (*u).into()).collect(),
                })),
            }),
            ..Default::default()
        }
    }

    fn full(version: i64, functions: Vec<FunctionRoute>) -> RoutingUpdate {
        RoutingUpdate {
            version,
            full: true,
            region: "us-east".into(),
            functions,
            ..Default::default()
        }
    }

    fn delta(base: i64, version: i64, functions: Vec<FunctionRoute>) -> RoutingUpdate {
        RoutingUpdate {
            version,
            base_version: base,
            region: "us-east".into(),
            functions,
            ..Default::default()
        }
    }

    struct Harness {
        state: AgentState,
        routes: watch::Receiver<CurrentTable>,
        _dir: tempfile::TempDir,
    }

    fn harness(held: Option<Table>) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let (publisher, routes) = watch::channel(None);
        Harness {
            state: AgentState::new(identity(), store, publisher, held),
            routes,
            _dir: dir,
        }
    }

    fn spawn_session(
        mut state: AgentState,
        dialer: FakeDialer,
    ) -> tokio::task::JoinHandle<(AgentState, SessionOutcome)> {
        tokio::spawn(async move {
            let outcome = run(&mut state, &dialer, "http://cp-a").await;
            (state, outcome)
        })
    }

    #[tokio::test]
    async fn hello_then_updates_are_acked_persisted_published_and_reported() {
        let Harness {
            state,
            routes,
            _dir,
        } = harness(None);
        let store = state.store.clone();
        let (dialer, mut attempts) = dialer();
        let session = spawn_session(state, dialer);

        let attempt = attempts.recv().await.unwrap();
        assert_eq!(attempt.address, "http://cp-a");
        let (cp, mut agent) = attempt.accept();
        let agent_message::Kind::Hello(hello) = agent.next().await else {
            panic!("first message is not a hello");
        };
        assert_eq!(hello.agent_id, "us-east-1");
        assert_eq!(hello.region, "us-east");
        assert_eq!(hello.zone, "us-east-a");
        assert_eq!(hello.cloud, "local");
        assert_eq!(hello.gateway, "127.0.1.1:15002");
        assert_eq!(hello.last_version, 0);

        // A full table: Ack, then the first report of this stream.
        let fns = vec![external("ext", &["http://127.0.1.1:9000"])];
        cp.send(update(full(10, fns))).await.unwrap();
        assert_eq!(
            agent.next_non_heartbeat().await,
            agent_message::Kind::Ack(Ack { version: 10 })
        );
        let agent_message::Kind::Endpoints(report) = agent.next_non_heartbeat().await else {
            panic!("expected an endpoint report");
        };
        assert_eq!(report.functions.len(), 1);
        assert_eq!(report.functions[0].endpoints[0].address, "127.0.1.1:9000");
        // Persisted before the Ack was sent, published after.
        assert_eq!(store.load("us-east").unwrap().unwrap().version(), 10);
        assert_eq!(routes.borrow().as_ref().unwrap().version, 10);

        // A delta on the wrong base: Nack, old table kept everywhere.
        cp.send(update(delta(9, 11, vec![]))).await.unwrap();
        assert_eq!(
            agent.next_non_heartbeat().await,
            agent_message::Kind::Nack(Nack {
                version: 11,
                reason: "delta base 9 does not match held version 10".into(),
            })
        );
        assert_eq!(routes.borrow().as_ref().unwrap().version, 10);
        assert_eq!(store.load("us-east").unwrap().unwrap().version(), 10);

        // A delta that leaves the endpoint set alone: Ack only. The next one changes the set:
        // Ack and a report, which also proves no report came in between.
        let mut plain = external("plain", &[]);
        plain.workload = None;
        cp.send(update(delta(10, 11, vec![plain]))).await.unwrap();
        let more = vec![external("ext", &["http://127.0.1.1:9000", "http://h2"])];
        cp.send(update(delta(11, 12, more))).await.unwrap();
        assert_eq!(
            agent.next_non_heartbeat().await,
            agent_message::Kind::Ack(Ack { version: 11 })
        );
        assert_eq!(
            agent.next_non_heartbeat().await,
            agent_message::Kind::Ack(Ack { version: 12 })
        );
        let agent_message::Kind::Endpoints(report) = agent.next_non_heartbeat().await else {
            panic!("expected an endpoint report");
        };
        assert_eq!(report.functions[0].endpoints.len(), 2);

        drop(cp);
        let (state, outcome) = session.await.unwrap();
        assert!(
            matches!(outcome.error, SessionError::Closed),
            "{:?}",
            outcome.error
        );
        assert!(outcome.received_update);
        assert_eq!(state.held().unwrap().version(), 12);
    }

    #[tokio::test]
    async fn hello_carries_held_version_and_reports_at_once() {
        let held = table::apply_full(
            "us-east",
            &full(5, vec![external("ext", &["http://127.0.1.1:9000"])]),
        )
        .unwrap();
        let Harness {
            state,
            routes,
            _dir,
        } = harness(Some(held));
        // Published before any control plane: static stability.
        assert_eq!(routes.borrow().as_ref().unwrap().version, 5);
        let (dialer, mut attempts) = dialer();
        let _session = spawn_session(state, dialer);
        let (_cp, mut agent) = attempts.recv().await.unwrap().accept();
        let agent_message::Kind::Hello(hello) = agent.next().await else {
            panic!("first message is not a hello");
        };
        assert_eq!(hello.last_version, 5);
        let agent_message::Kind::Endpoints(report) = agent.next().await else {
            panic!("expected an endpoint report");
        };
        assert_eq!(report.functions[0].name, "ext");
    }

    #[tokio::test]
    async fn a_table_that_cannot_be_persisted_is_nacked() {
        let Harness {
            state,
            routes,
            _dir,
        } = harness(None);
        // Pull the directory away under the agent.
        std::fs::remove_dir_all(state.store.dir()).unwrap();
        let (dialer, mut attempts) = dialer();
        let session = spawn_session(state, dialer);
        let (cp, mut agent) = attempts.recv().await.unwrap().accept();
        agent.next().await;
        cp.send(update(full(3, vec![]))).await.unwrap();
        let agent_message::Kind::Nack(nack) = agent.next_non_heartbeat().await else {
            panic!("expected a nack");
        };
        assert_eq!(nack.version, 3);
        assert!(
            nack.reason.starts_with("cannot persist table"),
            "{}",
            nack.reason
        );
        assert!(routes.borrow().is_none());
        drop(cp);
        let (state, _) = session.await.unwrap();
        assert!(state.held().is_none());
    }

    #[tokio::test]
    async fn an_older_table_is_never_accepted_and_the_session_ends_as_behind() {
        let held = table::apply_full("us-east", &full(10, vec![])).unwrap();
        let Harness {
            state,
            routes,
            _dir,
        } = harness(Some(held));
        let (dialer, mut attempts) = dialer();
        let session = spawn_session(state, dialer);
        let (cp, mut agent) = attempts.recv().await.unwrap().accept();
        agent.next().await; // hello
        cp.send(update(full(
            9,
            vec![external("back", &["http://127.0.1.1:9000"])],
        )))
        .await
        .unwrap();
        let (state, outcome) = session.await.unwrap();
        assert!(
            matches!(
                outcome.error,
                SessionError::Behind {
                    version: 9,
                    held: 10
                }
            ),
            "{:?}",
            outcome.error
        );
        assert_eq!(state.held().unwrap().version(), 10);
        assert_eq!(routes.borrow().as_ref().unwrap().version, 10);
    }

    #[tokio::test]
    async fn behind_from_the_control_plane_ends_the_session_keeping_the_table() {
        let held = table::apply_full("us-east", &full(10, vec![])).unwrap();
        let Harness { state, _dir, .. } = harness(Some(held));
        let (dialer, mut attempts) = dialer();
        let session = spawn_session(state, dialer);
        let (cp, mut agent) = attempts.recv().await.unwrap().accept();
        agent.next().await; // hello
        cp.send(Ok(ControlMessage {
            kind: Some(control_message::Kind::Behind(meridian_proto::v1::Behind {
                version: 7,
                held_version: 10,
            })),
        }))
        .await
        .unwrap();
        let (state, outcome) = session.await.unwrap();
        assert!(
            matches!(
                outcome.error,
                SessionError::Behind {
                    version: 7,
                    held: 10
                }
            ),
            "{:?}",
            outcome.error
        );
        assert_eq!(state.held().unwrap().version(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_behind_that_races_a_send_still_ends_the_session_as_behind() {
        // The replica sends Behind and ends the call just as the agent sends a heartbeat: the
        // send fails first, and the reason must still be read from what the replica sent.
        let held = table::apply_full("us-east", &full(10, vec![])).unwrap();
        let Harness { state, _dir, .. } = harness(Some(held));
        let (dialer, mut attempts) = dialer();
        let session = spawn_session(state, dialer);
        let (cp, mut agent) = attempts.recv().await.unwrap().accept();
        agent.next().await; // hello
        drop(agent); // the call is over for the agent's sends
        tokio::time::sleep(Duration::from_secs(6)).await; // past the 5 s heartbeat
        cp.send(Ok(ControlMessage {
            kind: Some(control_message::Kind::Behind(meridian_proto::v1::Behind {
                version: 7,
                held_version: 10,
            })),
        }))
        .await
        .unwrap();
        drop(cp);
        let (_, outcome) = session.await.unwrap();
        assert!(
            matches!(
                outcome.error,
                SessionError::Behind {
                    version: 7,
                    held: 10
                }
            ),
            "{:?}",
            outcome.error
        );
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_every_5s_and_silence_ends_the_stream_after_15s() {
        let Harness { state, _dir, .. } = harness(None);
        let (dialer, mut attempts) = dialer();
        let session = spawn_session(state, dialer);
        let (cp, mut agent) = attempts.recv().await.unwrap().accept();
        let start = Instant::now();
        agent.next().await; // hello
        for n in 1..=2u32 {
            assert!(matches!(
                agent.next().await,
                agent_message::Kind::Heartbeat(_)
            ));
            assert_eq!(Instant::now() - start, HEARTBEAT_INTERVAL * n);
        }
        // The control plane's heartbeat at 10 s pushes the deadline to 25 s.
        cp.send(Ok(ControlMessage {
            kind: Some(control_message::Kind::Heartbeat(Heartbeat { unix_ms: 1 })),
        }))
        .await
        .unwrap();
        let (_, outcome) = session.await.unwrap();
        assert!(
            matches!(outcome.error, SessionError::Silent(_)),
            "{:?}",
            outcome.error
        );
        assert!(!outcome.received_update);
        assert_eq!(Instant::now() - start, Duration::from_secs(25));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_open_times_out() {
        let Harness { state, _dir, .. } = harness(None);
        let (dialer, mut attempts) = dialer();
        let session = spawn_session(state, dialer);
        let _pending = attempts.recv().await.unwrap();
        let (_, outcome) = session.await.unwrap();
        assert!(matches!(outcome.error, SessionError::OpenTimeout(_)));
    }

    /// A control plane on a real socket that reads the Hello before it answers, as the real one
    /// does: proves the Hello is on the wire before the call waits for response headers.
    mod over_grpc {
        use super::*;
        use meridian_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
        use tonic::{Request, Response, Streaming};

        struct ScriptedCp {
            received: mpsc::UnboundedSender<AgentMessage>,
        }

        #[tonic::async_trait]
        impl AgentService for ScriptedCp {
            type ConnectStream = ControlStream;

            async fn connect(
                &self,
                request: Request<Streaming<AgentMessage>>,
            ) -> Result<Response<ControlStream>, Status> {
                let mut inbound = request.into_inner();
                let Some(AgentMessage {
                    kind: Some(agent_message::Kind::Hello(hello)),
                }) = inbound.message().await?
                else {
                    return Err(Status::invalid_argument("first message must be a hello"));
                };
                if hello.region != "us-east" {
                    return Err(Status::invalid_argument("hello.region: unknown region"));
                }
                let (tx, rx) = mpsc::channel(4);
                tx.send(update(full(1, vec![]))).await.unwrap();
                let received = self.received.clone();
                tokio::spawn(async move {
                    let _keep_open = tx;
                    while let Ok(Some(msg)) = inbound.message().await {
                        let _ = received.send(msg);
                    }
                });
                Ok(Response::new(ReceiverStream::new(rx).boxed()))
            }
        }

        async fn start_cp() -> (String, mpsc::UnboundedReceiver<AgentMessage>) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = format!("http://{}", listener.local_addr().unwrap());
            let (received, rx) = mpsc::unbounded_channel();
            let service = AgentServiceServer::new(ScriptedCp { received });
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
            );
            (address, rx)
        }

        #[tokio::test]
        async fn session_over_a_real_stream_acks() {
            let (address, mut received) = start_cp().await;
            let Harness {
                mut state, _dir, ..
            } = harness(None);
            let session =
                tokio::spawn(
                    async move { run(&mut state, &GrpcDialer::default(), &address).await },
                );
            let ack = received.recv().await.unwrap();
            assert_eq!(ack.kind, Some(agent_message::Kind::Ack(Ack { version: 1 })));
            session.abort();
        }

        #[tokio::test]
        async fn refused_hello_over_a_real_stream() {
            let (address, _received) = start_cp().await;
            let Harness {
                mut state, _dir, ..
            } = harness(None);
            state.identity.region = "eu-west".into();
            let outcome = run(&mut state, &GrpcDialer::default(), &address).await;
            assert!(outcome.error.is_refusal(), "{:?}", outcome.error);
            assert_eq!(
                outcome.error.to_string(),
                "control plane refused the hello: hello.region: unknown region"
            );
        }

        #[tokio::test]
        async fn nothing_listening_is_a_connect_error() {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let address = format!("http://{}", listener.local_addr().unwrap());
            drop(listener);
            let Harness {
                mut state, _dir, ..
            } = harness(None);
            let outcome = run(&mut state, &GrpcDialer::default(), &address).await;
            assert!(
                matches!(outcome.error, SessionError::Connect { .. }),
                "{:?}",
                outcome.error
            );
        }
    }

    #[tokio::test]
    async fn invalid_argument_is_a_refusal() {
        let Harness { state, _dir, .. } = harness(None);
        let (dialer, mut attempts) = dialer();
        let session = spawn_session(state, dialer);
        let (cp, _agent) = attempts.recv().await.unwrap().accept();
        cp.send(Err(Status::invalid_argument(
            "hello.region: must not be empty",
        )))
        .await
        .unwrap();
        let (_, outcome) = session.await.unwrap();
        assert!(outcome.error.is_refusal());
        assert_eq!(
            outcome.error.to_string(),
            "control plane refused the hello: hello.region: must not be empty"
        );
        // Other codes are retried.
        assert!(!SessionError::from_status(Status::unavailable("x")).is_refusal());
    }

    mod instances_and_scale {
        use super::*;
        use meridian_proto::v1::{EndpointState, FunctionScale, RegionScale};

        use crate::fixtures::{instance, process_function as process};
        use crate::runtime::{FunctionKey, FunctionRuntime, InstanceState};

        fn running(states: &[InstanceState]) -> Arc<Snapshot> {
            let instances = states
                .iter()
                .enumerate()
                .map(|(n, state)| {
                    let port = 4000 + u16::try_from(n).unwrap();
                    instance(&format!("f-00000{n}"), port, *state)
                })
                .collect();
            let mut snapshot = Snapshot::default();
            snapshot.functions.insert(
                FunctionKey::new("default", "f"),
                FunctionRuntime {
                    instances,
                    ..Default::default()
                },
            );
            Arc::new(snapshot)
        }

        fn status(desired: u32) -> ScaleStatus {
            Arc::new(vec![FunctionScale {
                namespace: "default".into(),
                name: "f".into(),
                scale: Some(RegionScale {
                    desired,
                    ..Default::default()
                }),
            }])
        }

        fn endpoint_states(kind: agent_message::Kind) -> Vec<i32> {
            let agent_message::Kind::Endpoints(report) = kind else {
                panic!("expected an endpoint report, got {kind:?}");
            };
            report.functions[0]
                .endpoints
                .iter()
                .map(|e| e.state)
                .collect()
        }

        #[tokio::test(start_paused = true)]
        async fn hello_names_the_api_and_instances_and_scale_are_reported() {
            let held = table::apply_full("us-east", &full(5, vec![process("f")])).unwrap();
            let Harness { state, _dir, .. } = harness(Some(held));
            let (instances, instances_rx) = watch::channel(running(&[InstanceState::Starting]));
            let (scale, scale_rx) = watch::channel(status(1));
            let state = state
                .with_api_address("127.0.1.1:7100")
                .with_instances(instances_rx)
                .with_scale_status(scale_rx);
            let (dialer, mut attempts) = dialer();
            let _session = spawn_session(state, dialer);
            let (_cp, mut agent) = attempts.recv().await.unwrap().accept();

            let agent_message::Kind::Hello(hello) = agent.next().await else {
                panic!("first message is not a hello");
            };
            assert_eq!(hello.api_address, "127.0.1.1:7100");
            // The held table's endpoints and the scale state, at once.
            assert_eq!(
                endpoint_states(agent.next().await),
                [EndpointState::Starting as i32]
            );
            let agent_message::Kind::Scale(report) = agent.next().await else {
                panic!("expected a scale report");
            };
            assert_eq!(report.functions, *status(1));
            let start = Instant::now();

            // A burst of instance changes: one report, 100 ms after the first.
            instances.send_replace(running(&[InstanceState::Ready]));
            time::sleep(Duration::from_millis(30)).await;
            instances.send_replace(running(&[InstanceState::Ready, InstanceState::Starting]));
            let states = endpoint_states(agent.next_non_heartbeat().await);
            assert_eq!(
                states,
                [EndpointState::Ready as i32, EndpointState::Starting as i32]
            );
            assert_eq!(Instant::now() - start, ENDPOINT_DEBOUNCE);
            // A change that leaves the endpoints alone (another snapshot, same instances)
            // sends nothing; the next real one does.
            instances.send_replace(running(&[InstanceState::Ready, InstanceState::Starting]));
            time::sleep(Duration::from_millis(300)).await;
            instances.send_replace(running(&[InstanceState::Draining]));
            let states = endpoint_states(agent.next_non_heartbeat().await);
            assert_eq!(states, [EndpointState::Draining as i32]);

            // Scale: the first change waits out the second since the report at the start,
            // and two changes in that time are one report of the latest.
            let since_start = Instant::now() - start;
            assert!(since_start < SCALE_REPORT_INTERVAL);
            scale.send_replace(status(2));
            scale.send_replace(status(3));
            let agent_message::Kind::Scale(report) = agent.next_non_heartbeat().await else {
                panic!("expected a scale report");
            };
            assert_eq!(report.functions, *status(3));
            assert_eq!(Instant::now() - start, SCALE_REPORT_INTERVAL);
            // After a quiet second, a change goes out at once.
            time::sleep(Duration::from_secs(2)).await;
            let changed_at = Instant::now();
            scale.send_replace(status(0));
            let agent_message::Kind::Scale(report) = agent.next_non_heartbeat().await else {
                panic!("expected a scale report");
            };
            assert_eq!(report.functions, *status(0));
            assert_eq!(Instant::now(), changed_at);
            // The function is gone: an empty report, so the control plane drops its entry.
            time::sleep(Duration::from_secs(1)).await;
            scale.send_replace(Arc::new(Vec::new()));
            let agent_message::Kind::Scale(report) = agent.next_non_heartbeat().await else {
                panic!("expected a scale report");
            };
            assert!(report.functions.is_empty());
        }

        #[tokio::test(start_paused = true)]
        async fn no_scale_report_until_there_is_a_process_function() {
            let Harness { state, _dir, .. } = harness(None);
            let (scale, scale_rx) = watch::channel(Arc::new(Vec::new()));
            let state = state.with_scale_status(scale_rx);
            let (dialer, mut attempts) = dialer();
            let _session = spawn_session(state, dialer);
            let (_cp, mut agent) = attempts.recv().await.unwrap().accept();
            assert!(matches!(agent.next().await, agent_message::Kind::Hello(_)));
            // A change to the same empty state says nothing; the heartbeat comes first.
            scale.send_replace(Arc::new(Vec::new()));
            assert!(matches!(
                agent.next().await,
                agent_message::Kind::Heartbeat(_)
            ));
            scale.send_replace(status(1));
            let agent_message::Kind::Scale(report) = agent.next_non_heartbeat().await else {
                panic!("expected a scale report");
            };
            assert_eq!(report.functions, *status(1));
        }
    }
}
