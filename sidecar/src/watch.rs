//! The configuration loop: watch the local agent's routing tables (a full table, then deltas,
//! each in parts: `meridian_proto::updates`), compile each one off the request path, swap the
//! result in atomically, and tell the agent whether the table was accepted. A table that does not compile is reported refused (the agent Nacks it to the
//! control plane) and the previous state keeps serving.
//!
//! Every table the agent sends is applied, including one at the same version with another
//! `local_generation` (the agent's overlay of local process instances changed). Each swap is
//! broadcast on a `watch` channel: held requests re-check for a ready instance, and the load
//! reporter tells the agent it has the new generation.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use meridian_common::backoff::Backoff;
use meridian_proto::updates::{self, Assembler};
use meridian_proto::v1::local_routing_service_client::LocalRoutingServiceClient;
use meridian_proto::v1::{RoutingTable, TableReport, WatchRoutesRequest};
use tokio::sync::{watch, Notify};
use tonic::transport::{Channel, Endpoint};

use crate::metrics::GlobalStats;
use crate::routes::{Compiler, RoutingState, TableError};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(2);
pub const RECONNECT_BASE: Duration = Duration::from_millis(100);
pub const RECONNECT_MAX: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("invalid agent URL {url:?}")]
    Url {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("cannot connect to the agent at {url}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the agent refused the watch")]
    Watch(#[source] tonic::Status),
    #[error("the watch stream broke")]
    Stream(#[source] tonic::Status),
    #[error("the watch stream broke the protocol: {0}")]
    Protocol(String),
    #[error("compiling the table did not finish")]
    Compile(#[source] tokio::task::JoinError),
}

/// The last table this sidecar refused, for `/routes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub version: i64,
    pub reason: String,
}

/// Request metadata of the Watch call naming this sidecar's admin address (the agent's side
/// reads the same name).
pub const ADMIN_ADDRESS_METADATA: &str = "meridian-admin-address";

/// Watches the agent and keeps `state` current.
#[derive(Debug)]
pub struct Watcher {
    agent: String,
    client_id: String,
    compiler: Compiler,
    state: Arc<ArcSwapOption<RoutingState>>,
    refused: Arc<ArcSwapOption<Refusal>>,
    new_gateways: Arc<Notify>,
    swaps: Arc<watch::Sender<u64>>,
    global: Arc<GlobalStats>,
    /// Told to the agent with every Watch, so it can ask this sidecar to explain its routing.
    admin_address: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

/// Clears the "watch connected" flag when the stream ends, whichever way `subscribe` returns
/// (or is dropped on shutdown).
struct Connected<'a>(&'a AtomicBool);

impl<'a> Connected<'a> {
    fn set(flag: &'a AtomicBool) -> Self {
        flag.store(true, Ordering::Relaxed);
        Self(flag)
    }
}

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

impl Watcher {
    /// `new_gateways` is notified after a swap that brings a gateway the previous state did not
    /// have (the prober probes it at once); `swaps` is bumped after every swap.
    pub fn new(
        agent: impl Into<String>,
        client_id: impl Into<String>,
        compiler: Compiler,
        state: Arc<ArcSwapOption<RoutingState>>,
        refused: Arc<ArcSwapOption<Refusal>>,
        new_gateways: Arc<Notify>,
        swaps: Arc<watch::Sender<u64>>,
    ) -> Self {
        Self {
            agent: agent.into(),
            client_id: client_id.into(),
            compiler,
            state,
            refused,
            new_gateways,
            swaps,
            global: Arc::new(GlobalStats::default()),
            admin_address: None,
        }
    }

    /// The admin address (`host:port`) to name in the Watch request's
    /// `meridian-admin-address` metadata; without it the agent cannot reach this sidecar's
    /// `SidecarAdminService`.
    pub fn with_admin_address(mut self, address: Option<String>) -> Self {
        self.admin_address = address.and_then(|a| a.parse().ok());
        self
    }

    /// Where to record whether the watch stream is open (`meridian_agent_watch_connected`);
    /// without it, a private flag nobody exports.
    pub fn with_stats(mut self, global: Arc<GlobalStats>) -> Self {
        self.global = global;
        self
    }

    /// Watches until `shutdown` resolves, reconnecting with capped, jittered backoff.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut backoff = Backoff::new(RECONNECT_BASE, RECONNECT_MAX);
        loop {
            let result = tokio::select! {
                result = self.subscribe(&mut backoff) => result,
                _ = &mut shutdown => return,
            };
            match result {
                Ok(()) => tracing::info!(agent = %self.agent, "agent closed the watch stream"),
                Err(error) => tracing::warn!(
                    agent = %self.agent,
                    error = %crate::error_chain(&error),
                    "watching routes failed; still serving the last table"
                ),
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = &mut shutdown => return,
            }
        }
    }

    async fn subscribe(&self, backoff: &mut Backoff) -> Result<(), WatchError> {
        let endpoint =
            Endpoint::from_shared(self.agent.clone()).map_err(|source| WatchError::Url {
                url: self.agent.clone(),
                source,
            })?;
        let channel = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .connect()
            .await
            .map_err(|source| WatchError::Connect {
                url: self.agent.clone(),
                source,
            })?;
        // Updates come in parts far below this; it is set so no default decides it.
        let mut client = LocalRoutingServiceClient::new(channel)
            .max_decoding_message_size(updates::MAX_MESSAGE_BYTES);
        let mut request = tonic::Request::new(WatchRoutesRequest {
            client: self.client_id.clone(),
        });
        if let Some(address) = &self.admin_address {
            request
                .metadata_mut()
                .insert(ADMIN_ADDRESS_METADATA, address.clone());
        }
        let mut updates = client
            .watch(request)
            .await
            .map_err(WatchError::Watch)?
            .into_inner();
        let _connected = Connected::set(&self.global.agent_watch_connected);
        tracing::info!(agent = %self.agent, "watching routes");
        // The stream's own state: parts of an update in progress, and the last whole table it
        // delivered, which the next delta applies to (whether or not that table compiled).
        let mut parts = Assembler::default();
        let mut received: Option<RoutingTable> = None;
        loop {
            let part = match updates.message().await {
                Ok(Some(part)) => part,
                Ok(None) => return Ok(()),
                Err(status) => {
                    // Say why upstream: a sidecar that cannot read its stream must show in
                    // `meridianctl status`, not only here.
                    self.report_stream_failure(&mut client, &status.to_string())
                        .await;
                    return Err(WatchError::Stream(status));
                }
            };
            let update = match parts.push(part) {
                Ok(Some(update)) => update,
                Ok(None) => continue,
                Err(error) => {
                    let reason = format!("routing stream: {error}");
                    self.report_stream_failure(&mut client, &reason).await;
                    return Err(WatchError::Protocol(reason));
                }
            };
            backoff.reset();
            let table = match updates::apply(received.as_ref(), update) {
                Ok(table) => table,
                Err(error) => {
                    let reason = format!("routing stream: {error}");
                    self.report_stream_failure(&mut client, &reason).await;
                    return Err(WatchError::Protocol(reason));
                }
            };
            let held = self
                .state
                .load()
                .as_ref()
                .map_or(0, |state| state.version());
            if table.version < held {
                // Versions never go back, here as between the control plane and the agent: an
                // older table (an agent whose state was lost) is refused and the held one kept.
                // It stays the stream's base: the agent's next delta applies to it.
                let reason = format!(
                    "table version {} is older than the held version {held}",
                    table.version
                );
                self.refuse(&mut client, &table, reason).await;
                received = Some(table);
                continue;
            }
            received = Some(self.apply(&mut client, table).await?);
        }
    }

    /// Keeps the table in force, records the refusal (`/routes`) and reports it.
    async fn refuse(
        &self,
        client: &mut LocalRoutingServiceClient<Channel>,
        table: &RoutingTable,
        reason: String,
    ) {
        tracing::warn!(version = table.version, %reason, "routing table refused; keeping the previous one");
        self.refused.store(Some(Arc::new(Refusal {
            version: table.version,
            reason: reason.clone(),
        })));
        let report = TableReport {
            client: self.client_id.clone(),
            version: table.version,
            accepted: false,
            reason,
            local_generation: table.local_generation,
        };
        if tokio::time::timeout(REPORT_TIMEOUT, client.report_table(report))
            .await
            .is_err()
        {
            tracing::warn!(
                version = table.version,
                "reporting the table verdict to the agent timed out"
            );
        }
    }

    /// Tells the agent this sidecar could not read its routing stream (version 0: no table
    /// in particular).
    async fn report_stream_failure(
        &self,
        client: &mut LocalRoutingServiceClient<Channel>,
        reason: &str,
    ) {
        let report = TableReport {
            client: self.client_id.clone(),
            version: 0,
            accepted: false,
            reason: reason.to_owned(),
            local_generation: 0,
        };
        let _ = tokio::time::timeout(REPORT_TIMEOUT, client.report_table(report)).await;
    }

    /// Compiles `table` on a blocking thread, swaps it in if it compiles, and reports; gives
    /// the table back (the base of the next delta).
    async fn apply(
        &self,
        client: &mut LocalRoutingServiceClient<Channel>,
        table: RoutingTable,
    ) -> Result<RoutingTable, WatchError> {
        let version = table.version;
        let local_generation = table.local_generation;
        let compiler = self.compiler.clone();
        let (table, compiled) = tokio::task::spawn_blocking(move || {
            let compiled = compiler.compile(&table);
            (table, compiled)
        })
        .await
        .map_err(WatchError::Compile)?;
        let previous = self.state.load_full();
        let report = match apply_compiled(&self.state, &self.compiler, compiled) {
            Ok(functions) => {
                self.swaps
                    .send_modify(|swaps| *swaps = swaps.wrapping_add(1));
                // Overlay changes (instances starting, ready, draining) swap often; probing
                // every gateway on each would only add load. New gateways need a probe now.
                if has_new_gateways(previous.as_deref(), self.state.load().as_deref()) {
                    self.new_gateways.notify_one();
                }
                tracing::info!(
                    version,
                    local_generation,
                    functions,
                    "routing table applied"
                );
                TableReport {
                    client: self.client_id.clone(),
                    version,
                    accepted: true,
                    reason: String::new(),
                    local_generation,
                }
            }
            Err(error) => {
                let reason = error.reason();
                tracing::warn!(version, %reason, "routing table refused; keeping the previous one");
                self.refused.store(Some(Arc::new(Refusal {
                    version,
                    reason: reason.clone(),
                })));
                TableReport {
                    client: self.client_id.clone(),
                    version,
                    accepted: false,
                    reason,
                    local_generation,
                }
            }
        };
        match tokio::time::timeout(REPORT_TIMEOUT, client.report_table(report)).await {
            Ok(Ok(_)) => {}
            Ok(Err(status)) => {
                tracing::warn!(version, %status, "could not report the table verdict to the agent")
            }
            Err(_) => tracing::warn!(
                version,
                "reporting the table verdict to the agent timed out"
            ),
        }
        Ok(table)
    }
}

/// Whether `next` names a remote gateway `previous` did not (any, when there was no state).
fn has_new_gateways(previous: Option<&RoutingState>, next: Option<&RoutingState>) -> bool {
    let Some(next) = next else { return false };
    let Some(previous) = previous else {
        return !next.gateways().is_empty();
    };
    next.gateways()
        .iter()
        .any(|g| !previous.gateways().iter().any(|p| Arc::ptr_eq(p, g)))
}

/// Swaps in a compiled state (returning its function count) or leaves the current one.
pub fn apply_compiled(
    state: &ArcSwapOption<RoutingState>,
    compiler: &Compiler,
    compiled: Result<RoutingState, TableError>,
) -> Result<usize, TableError> {
    let mut compiled = compiled?;
    let functions = compiled.functions().count();
    compiled.mark_applied();
    state.store(Some(Arc::new(compiled)));
    compiler.prune();
    Ok(functions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::tests::{route, table, tier};
    use meridian_proto::v1::local_routing_service_server::{
        LocalRoutingService, LocalRoutingServiceServer,
    };
    use meridian_proto::v1::{
        GetRoutesRequest, RoutingTablePage, RoutingUpdate, TableReportResponse,
    };
    use std::pin::Pin;
    use tokio::sync::{mpsc, Mutex};
    use tokio_stream_shim::ReceiverStream;
    use tonic::{Request, Response, Status};

    /// A minimal stream over an mpsc receiver (avoids a tokio-stream dependency here).
    mod tokio_stream_shim {
        use std::pin::Pin;
        use std::task::{Context, Poll};
        use tokio::sync::mpsc;

        pub struct ReceiverStream<T>(pub mpsc::Receiver<T>);

        impl<T> futures::Stream for ReceiverStream<T> {
            type Item = T;
            fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
                self.0.poll_recv(cx)
            }
        }
    }

    struct FakeAgent {
        tables: Mutex<Option<mpsc::Receiver<Result<RoutingUpdate, Status>>>>,
        reports: mpsc::Sender<TableReport>,
    }

    #[tonic::async_trait]
    impl LocalRoutingService for FakeAgent {
        type WatchStream =
            Pin<Box<dyn futures::Stream<Item = Result<RoutingUpdate, Status>> + Send>>;

        async fn watch(
            &self,
            _request: Request<WatchRoutesRequest>,
        ) -> Result<Response<Self::WatchStream>, Status> {
            let Some(rx) = self.tables.lock().await.take() else {
                return Err(Status::unavailable("this fake agent serves one watch"));
            };
            Ok(Response::new(Box::pin(ReceiverStream(rx))))
        }

        async fn get(
            &self,
            _request: Request<GetRoutesRequest>,
        ) -> Result<Response<RoutingTablePage>, Status> {
            Err(Status::unimplemented("get"))
        }

        async fn report_table(
            &self,
            request: Request<TableReport>,
        ) -> Result<Response<TableReportResponse>, Status> {
            self.reports.send(request.into_inner()).await.unwrap();
            Ok(Response::new(TableReportResponse {}))
        }
    }

    #[test]
    fn only_new_gateways_wake_the_prober() {
        let compiler = Compiler::new("us-east");
        let one = |gateway: &str| {
            compiler
                .compile(&table(vec![route(
                    "default",
                    "f",
                    vec![tier("eu-west", false, &[gateway])],
                )]))
                .unwrap()
        };
        let a = one("127.0.2.1:15002");
        let same = one("127.0.2.1:15002");
        let other = one("127.0.3.1:15002");
        assert!(has_new_gateways(None, Some(&a)));
        assert!(!has_new_gateways(Some(&a), Some(&same)));
        assert!(has_new_gateways(Some(&a), Some(&other)));
        let empty = compiler.compile(&table(vec![])).unwrap();
        assert!(!has_new_gateways(None, Some(&empty)));
    }

    #[tokio::test]
    async fn applies_good_tables_and_reports_refusals() {
        let (table_tx, table_rx) = mpsc::channel(4);
        let (report_tx, mut report_rx) = mpsc::channel(4);
        let agent = FakeAgent {
            tables: Mutex::new(Some(table_rx)),
            reports: report_tx,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(LocalRoutingServiceServer::new(agent))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );

        let state = Arc::new(ArcSwapOption::empty());
        let refused = Arc::new(ArcSwapOption::empty());
        let swaps = Arc::new(watch::channel(0u64).0);
        let mut swapped = swaps.subscribe();
        let global = Arc::new(GlobalStats::default());
        let connected = || global.agent_watch_connected.load(Ordering::Relaxed);
        assert!(!connected());
        let watcher = Watcher::new(
            format!("http://{addr}"),
            "sidecar-test",
            Compiler::new("us-east"),
            Arc::clone(&state),
            Arc::clone(&refused),
            Arc::new(Notify::new()),
            Arc::clone(&swaps),
        )
        .with_stats(Arc::clone(&global));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(watcher.run(async {
            let _ = stop_rx.await;
        }));

        let good = table(vec![route(
            "default",
            "f",
            vec![tier("us-east", true, &["127.0.1.1:9000"])],
        )]);
        table_tx.send(Ok(updates::full(&good))).await.unwrap();
        let report = report_rx.recv().await.unwrap();
        assert!(report.accepted, "{report:?}");
        assert_eq!(report.client, "sidecar-test");
        assert!(connected(), "the watch stream is open");
        assert_eq!(state.load().as_ref().unwrap().version(), 7);

        let mut bad = good.clone();
        bad.version = 8;
        bad.functions[0].tiers[0].endpoints[0].address = "nope".into();
        table_tx.send(Ok(updates::full(&bad))).await.unwrap();
        let report = report_rx.recv().await.unwrap();
        assert!(!report.accepted);
        assert_eq!(report.version, 8);
        assert!(
            report
                .reason
                .starts_with("functions[0].tiers[0].endpoints[0].address"),
            "{}",
            report.reason
        );
        // The old state keeps serving.
        assert_eq!(state.load().as_ref().unwrap().version(), 7);
        assert_eq!(refused.load().as_ref().unwrap().version, 8);
        assert_eq!(*swapped.borrow_and_update(), 1, "one swap so far");

        // Same version, next local generation: applied (the agent's overlay changed).
        let mut overlay = good.clone();
        overlay.local_generation = 1;
        overlay.functions[0].tiers[0].endpoints[0].address = "127.0.1.1:9001".into();
        table_tx.send(Ok(updates::full(&overlay))).await.unwrap();
        assert!(report_rx.recv().await.unwrap().accepted);
        swapped.changed().await.unwrap();
        let current = state.load_full().unwrap();
        assert_eq!((current.version(), current.local_generation()), (7, 1));
        assert_eq!(
            current.lookup("f").unwrap().tiers[0].endpoints[0]
                .shared
                .address(),
            "127.0.1.1:9001"
        );

        // Versions never go back: an older full table is refused and the held one kept.
        let mut older = good.clone();
        older.version = 6;
        older.local_generation = 2;
        table_tx.send(Ok(updates::full(&older))).await.unwrap();
        let report = report_rx.recv().await.unwrap();
        assert!(!report.accepted);
        assert_eq!(report.version, 6);
        assert!(
            report.reason.contains("older than the held version 7"),
            "{}",
            report.reason
        );
        assert_eq!(state.load().as_ref().unwrap().version(), 7);

        // The agent ends the stream (and refuses the next watch): no longer connected.
        drop(table_tx);
        tokio::time::timeout(Duration::from_secs(5), async {
            while connected() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the flag is cleared when the stream ends");

        stop_tx.send(()).unwrap();
        task.await.unwrap();
    }
}
