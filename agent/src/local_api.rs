//! The agent's API on its host: `LocalRoutingService` (the served table) and `LoadService` (load
//! reports, activations) for sidecars, `AgentApiService` (instance logs, and the sidecars'
//! explanations of their routing) for operators, plus gRPC health. Tables come from a `watch`
//! channel, so it works the same with or without a control plane (static stability).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use meridian_proto::updates;
use meridian_proto::v1::agent_api_service_server::{AgentApiService, AgentApiServiceServer};
use meridian_proto::v1::load_service_server::{LoadService, LoadServiceServer};
use meridian_proto::v1::local_routing_service_server::{
    LocalRoutingService, LocalRoutingServiceServer,
};
use meridian_proto::v1::sidecar_admin_service_client::SidecarAdminServiceClient;
use meridian_proto::v1::{
    ActivateRequest, ActivateResponse, ExplainRequest, ExplainResponse, FunctionRoute,
    GetRoutesRequest, LoadReport, LoadReportResponse, LogLine, LogsRequest, RoutingTable,
    RoutingTablePage, RoutingUpdate, SidecarExplanation, TableReport, TableReportResponse,
    WatchRoutesRequest,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamExt;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::autoscaler::Activation;
use crate::load::LoadBook;
use crate::runtime::{FunctionKey, LogStream, Runtime, RuntimeError};
use crate::sidecars::{SidecarBook, WatchingSidecar};

/// The latest table (accepted, or served with its overlay); `None` until the agent has one.
pub type CurrentTable = Option<Arc<RoutingTable>>;

/// Message of the NOT_FOUND answer to `Get` before the agent has any table.
pub const NO_TABLE_YET: &str = "agent has no routing table yet";
/// Lines per instance a `Logs` call with `tail_lines` 0 gets.
pub const DEFAULT_TAIL_LINES: usize = 100;
/// Namespace of requests that name none.
pub const DEFAULT_NAMESPACE: &str = "default";
/// How long `Activate` waits for the autoscaler's answer.
const ACTIVATE_TIMEOUT: Duration = Duration::from_secs(2);
/// Request metadata in which a sidecar's Watch names its admin address (`host:port`).
pub const ADMIN_ADDRESS_METADATA: &str = "meridian-admin-address";
/// How long `Explain` waits for each sidecar (connect and answer): sidecars are on this host,
/// so a slow one is a stuck one, and the operator is waiting.
const SIDECAR_EXPLAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// The admin address a Watch request names, if it names a usable one.
fn admin_address<T>(request: &Request<T>) -> Option<String> {
    let value = request
        .metadata()
        .get(ADMIN_ADDRESS_METADATA)?
        .to_str()
        .ok()?;
    let value = value.trim();
    // Only host:port: the agent dials it, so nothing that could become another URL.
    let (host, port) = value.rsplit_once(':')?;
    let valid = !host.is_empty()
        && port.parse::<u16>().is_ok_and(|p| p != 0)
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'));
    valid.then(|| value.to_owned())
}

/// Asks one sidecar for its explanation.
async fn explain_sidecar(sidecar: WatchingSidecar, request: ExplainRequest) -> SidecarExplanation {
    let mut answer = SidecarExplanation {
        sidecar: sidecar.client.clone(),
        admin_address: sidecar.admin_address.clone(),
        ..Default::default()
    };
    let asked = async {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", sidecar.admin_address))
                .map_err(|e| Status::invalid_argument(crate::error_chain(&e)))?
                .connect_timeout(SIDECAR_EXPLAIN_TIMEOUT)
                .connect()
                .await
                .map_err(|e| {
                    Status::unavailable(format!("unreachable: {}", crate::error_chain(&e)))
                })?;
        SidecarAdminServiceClient::new(channel)
            .explain(request)
            .await
            .map(Response::into_inner)
    };
    match tokio::time::timeout(SIDECAR_EXPLAIN_TIMEOUT, asked).await {
        Ok(Ok(explanation)) => answer.explanation = Some(explanation),
        Ok(Err(status)) => {
            answer.error = status.message().to_owned();
            answer.error_code = code_name(status.code()).to_owned();
        }
        Err(_) => {
            answer.error = format!("no answer within {SIDECAR_EXPLAIN_TIMEOUT:?}");
            answer.error_code = code_name(tonic::Code::DeadlineExceeded).to_owned();
        }
    }
    answer
}

/// The gRPC code as its canonical name (`NOT_FOUND`), for clients to match on.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Where `Logs` reads instance output: the runtime, or a fake in tests.
pub trait LogSource: Send + Sync + 'static {
    fn logs(
        &self,
        key: &FunctionKey,
        instance: Option<String>,
        tail: usize,
        follow: bool,
    ) -> Result<LogStream, RuntimeError>;
}

impl LogSource for Runtime {
    fn logs(
        &self,
        key: &FunctionKey,
        instance: Option<String>,
        tail: usize,
        follow: bool,
    ) -> Result<LogStream, RuntimeError> {
        Runtime::logs(self, key, instance, tail, follow)
    }
}

/// Where load reports and activations go.
#[derive(Debug, Clone)]
struct LoadSink {
    book: Arc<LoadBook>,
    activations: mpsc::Sender<Activation>,
}

/// The agent's region and its instances' logs.
#[derive(Clone)]
struct Logs {
    source: Arc<dyn LogSource>,
    region: String,
}

impl std::fmt::Debug for Logs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logs")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LocalApiError {
    #[error("local routing API server failed")]
    Serve(#[source] tonic::transport::Error),
}

/// The services; clone it freely, every clone reads the same channel. Without
/// [`LocalApi::with_load`] or [`LocalApi::with_logs`] those RPCs answer UNIMPLEMENTED.
#[derive(Debug, Clone)]
pub struct LocalApi {
    routes: watch::Receiver<CurrentTable>,
    refusals: Option<mpsc::Sender<TableReport>>,
    load: Option<LoadSink>,
    logs: Option<Logs>,
    sidecars: Arc<SidecarBook>,
}

impl LocalApi {
    /// `routes` is what sidecars are served; its publisher going away ends every stream (Watch
    /// and followed logs), which lets graceful shutdown finish.
    pub fn new(routes: watch::Receiver<CurrentTable>) -> Self {
        Self {
            routes,
            refusals: None,
            load: None,
            logs: None,
            sidecars: Arc::default(),
        }
    }

    /// Load reports go to `book`; held requests and `Activate` calls to `activations`.
    pub fn with_load(mut self, book: Arc<LoadBook>, activations: mpsc::Sender<Activation>) -> Self {
        self.load = Some(LoadSink { book, activations });
        self
    }

    /// `Logs` reads `source`; lines that name no region get `region`.
    pub fn with_logs(mut self, source: Arc<dyn LogSource>, region: impl Into<String>) -> Self {
        self.logs = Some(Logs {
            source,
            region: region.into(),
        });
        self
    }

    /// Resolves when the table publisher is gone (agent shutting down).
    fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut routes = self.routes.clone();
        async move { while routes.changed().await.is_ok() {} }
    }

    /// Sidecars' refusals of tables go to `refusals` (the session forwards them as Nacks).
    pub fn with_refusals(mut self, refusals: mpsc::Sender<TableReport>) -> Self {
        self.refusals = Some(refusals);
        self
    }

    /// The sidecars watching this API and what each has loaded, for the session to report.
    pub fn sidecars(&self) -> &Arc<SidecarBook> {
        &self.sidecars
    }
}

/// The next part of a `Get` listing: the table version and local generation it reads, and the
/// last function of the previous page. Written `<version>.<generation>:<namespace>/<name>`.
fn page_token(table: &RoutingTable, last: &FunctionRoute) -> String {
    format!(
        "{}.{}:{}/{}",
        table.version, table.local_generation, last.namespace, last.name
    )
}

/// Parses a `Get` page token into (version, generation, namespace, name).
fn parse_page_token(token: &str) -> Result<(i64, u64, &str, &str), Status> {
    let bad = || {
        Status::invalid_argument(format!(
            "pageToken: {token:?} is not a token this agent handed out"
        ))
    };
    let (versions, key) = token.split_once(':').ok_or_else(bad)?;
    let (version, generation) = versions.split_once('.').ok_or_else(bad)?;
    let (namespace, name) = key.split_once('/').ok_or_else(bad)?;
    Ok((
        version.parse().map_err(|_| bad())?,
        generation.parse().map_err(|_| bad())?,
        namespace,
        name,
    ))
}

/// Functions per `Get` page when the request does not say, and at most.
const DEFAULT_PAGE_SIZE: usize = 500;
const MAX_PAGE_SIZE: usize = 5000;

/// One page of `table` for `Get`.
fn table_page(
    table: &RoutingTable,
    request: &GetRoutesRequest,
) -> Result<RoutingTablePage, Status> {
    let size = match usize::try_from(request.page_size).unwrap_or(usize::MAX) {
        0 => DEFAULT_PAGE_SIZE,
        size if size <= MAX_PAGE_SIZE => size,
        size => {
            return Err(Status::invalid_argument(format!(
                "pageSize: {size} is more than the limit of {MAX_PAGE_SIZE}"
            )))
        }
    };
    let start = if request.page_token.is_empty() {
        0
    } else {
        let (version, generation, namespace, name) = parse_page_token(&request.page_token)?;
        if (version, generation) != (table.version, table.local_generation) {
            return Err(Status::aborted(format!(
                "the table changed from {version}.{generation} to {}.{} while it was read; read again from the first page",
                table.version, table.local_generation
            )));
        }
        // Functions are sorted by (namespace, name): the page starts after the last one read.
        table
            .functions
            .partition_point(|f| (f.namespace.as_str(), f.name.as_str()) <= (namespace, name))
    };
    let mut functions = Vec::new();
    let mut bytes = 0;
    for function in table.functions.iter().skip(start) {
        let size_of = prost::Message::encoded_len(function);
        if !functions.is_empty()
            && (functions.len() >= size || bytes + size_of > meridian_proto::updates::PART_BYTES)
        {
            break;
        }
        bytes += size_of;
        functions.push(function.clone());
    }
    let next_page_token = match functions.last() {
        Some(last) if start + functions.len() < table.functions.len() => page_token(table, last),
        _ => String::new(),
    };
    Ok(RoutingTablePage {
        table: Some(RoutingTable {
            version: table.version,
            region: table.region.clone(),
            functions,
            local_generation: table.local_generation,
        }),
        next_page_token,
    })
}

/// The first update of a watch (the whole table) or the next one (the delta from the table
/// sent before), cut into parts; nothing when the table did not change.
fn next_updates(
    last: &mut Option<Arc<RoutingTable>>,
    table: Arc<RoutingTable>,
) -> Vec<RoutingUpdate> {
    let update = match last {
        Some(previous) if Arc::ptr_eq(previous, &table) || **previous == *table => {
            return Vec::new()
        }
        Some(previous) => updates::delta(previous, &table),
        None => updates::full(&table),
    };
    *last = Some(table);
    updates::split(update, updates::LOCAL_PART_LIMITS)
}

#[tonic::async_trait]
impl LocalRoutingService for LocalApi {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<RoutingUpdate, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<WatchRoutesRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let admin = admin_address(&request);
        let client = request.into_inner().client;
        tracing::info!(%client, admin = admin.as_deref().unwrap_or("-"), "sidecar watching routes");
        // Kept alive by the stream: the sidecar counts as connected (and can be asked to
        // explain) while it watches.
        let registration = self.sidecars.register(&client, admin);
        // WatchStream yields the current value first, then each new one; a slow watcher skips
        // to the newest table rather than queueing old ones, and its next delta is taken from
        // the last table it was sent. It ends when the publisher is dropped (agent shutting
        // down), which lets graceful shutdown finish.
        let mut last: Option<Arc<RoutingTable>> = None;
        let updates = WatchStream::new(self.routes.clone()).map(move |current| {
            let _registered = &registration;
            match current {
                Some(table) => next_updates(&mut last, table),
                None => Vec::new(),
            }
        });
        let parts = futures::StreamExt::flat_map(updates, |parts| {
            futures::stream::iter(parts.into_iter().map(Ok))
        });
        Ok(Response::new(Box::pin(parts)))
    }

    async fn get(
        &self,
        request: Request<GetRoutesRequest>,
    ) -> Result<Response<RoutingTablePage>, Status> {
        let current = self.routes.borrow().clone();
        match current {
            Some(table) => Ok(Response::new(table_page(&table, request.get_ref())?)),
            None => Err(Status::not_found(NO_TABLE_YET)),
        }
    }

    async fn report_table(
        &self,
        request: Request<TableReport>,
    ) -> Result<Response<TableReportResponse>, Status> {
        let mut report = request.into_inner();
        if report.reason.len() > crate::sidecars::MAX_REASON_BYTES {
            let mut end = crate::sidecars::MAX_REASON_BYTES;
            while !report.reason.is_char_boundary(end) {
                end -= 1;
            }
            report.reason.truncate(end);
        }
        self.sidecars.reported(&report);
        if report.accepted {
            tracing::debug!(client = %report.client, version = report.version, "sidecar accepted table");
            return Ok(Response::new(TableReportResponse {}));
        }
        if report.reason.is_empty() {
            return Err(Status::invalid_argument(
                "reason: required when accepted is false",
            ));
        }
        tracing::warn!(client = %report.client, version = report.version, reason = %report.reason, "sidecar refused routing table");
        if let Some(refusals) = &self.refusals {
            // A full queue means the control plane is unreachable and already has a backlog of
            // refusals to hear about; dropping one loses nothing the next table will not repeat.
            let _ = refusals.try_send(report);
        }
        Ok(Response::new(TableReportResponse {}))
    }
}

/// The function a request names; an empty namespace is the default one.
fn function_key(namespace: String, name: String) -> Result<FunctionKey, Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument("name: required"));
    }
    let namespace = if namespace.is_empty() {
        DEFAULT_NAMESPACE.to_owned()
    } else {
        namespace
    };
    Ok(FunctionKey::new(namespace, name))
}

#[tonic::async_trait]
impl LoadService for LocalApi {
    async fn report_load(
        &self,
        request: Request<LoadReport>,
    ) -> Result<Response<LoadReportResponse>, Status> {
        let Some(load) = &self.load else {
            return Err(Status::unimplemented("this agent takes no load reports"));
        };
        let held = load
            .book
            .record(request.into_inner(), tokio::time::Instant::now());
        for key in held {
            // Full means the autoscaler is already busy with activations; the next report
            // repeats this one while requests are held.
            let _ = load.activations.try_send(Activation { key, reply: None });
        }
        Ok(Response::new(LoadReportResponse {}))
    }

    async fn activate(
        &self,
        request: Request<ActivateRequest>,
    ) -> Result<Response<ActivateResponse>, Status> {
        let Some(load) = &self.load else {
            return Err(Status::unimplemented("this agent takes no activations"));
        };
        let ActivateRequest {
            client,
            namespace,
            name,
        } = request.into_inner();
        let key = function_key(namespace, name)?;
        tracing::debug!(%client, function = %key, "activation");
        let (reply, answer) = oneshot::channel();
        let activation = Activation {
            key,
            reply: Some(reply),
        };
        let shutting_down = || Status::unavailable("agent is shutting down");
        match tokio::time::timeout(ACTIVATE_TIMEOUT, async {
            load.activations
                .send(activation)
                .await
                .map_err(|_| shutting_down())?;
            answer.await.map_err(|_| shutting_down())
        })
        .await
        {
            Ok(Ok(instances)) => Ok(Response::new(ActivateResponse { instances })),
            Ok(Err(status)) => Err(status),
            Err(_) => Err(Status::deadline_exceeded(
                "the autoscaler did not answer in time",
            )),
        }
    }
}

#[tonic::async_trait]
impl AgentApiService for LocalApi {
    type LogsStream = Pin<Box<dyn Stream<Item = Result<LogLine, Status>> + Send>>;

    async fn logs(
        &self,
        request: Request<LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let Some(logs) = &self.logs else {
            return Err(Status::unimplemented("this agent serves no logs"));
        };
        let LogsRequest {
            namespace,
            name,
            tail_lines,
            follow,
            instance,
        } = request.into_inner();
        let key = function_key(namespace, name)?;
        let tail = if tail_lines == 0 {
            DEFAULT_TAIL_LINES
        } else {
            usize::try_from(tail_lines).unwrap_or(usize::MAX)
        };
        let instance = (!instance.is_empty()).then_some(instance);
        let lines =
            logs.source
                .logs(&key, instance, tail, follow)
                .map_err(|error| match error {
                    RuntimeError::UnknownFunction(_) | RuntimeError::UnknownInstance { .. } => {
                        Status::not_found(crate::error_chain(&error))
                    }
                    other => Status::internal(crate::error_chain(&other)),
                })?;
        let region = logs.region.clone();
        let lines = futures::StreamExt::take_until(lines, self.closed()).map(move |mut line| {
            if line.region.is_empty() {
                line.region.clone_from(&region);
            }
            Ok(line)
        });
        Ok(Response::new(Box::pin(lines)))
    }

    async fn explain(
        &self,
        request: Request<ExplainRequest>,
    ) -> Result<Response<ExplainResponse>, Status> {
        let ExplainRequest { namespace, name } = request.into_inner();
        let key = function_key(namespace, name)?;
        let request = ExplainRequest {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        };
        let asked = self
            .sidecars
            .explainable()
            .into_iter()
            .map(|sidecar| explain_sidecar(sidecar, request.clone()));
        let sidecars = futures::future::join_all(asked).await;
        Ok(Response::new(ExplainResponse {
            region: self
                .logs
                .as_ref()
                .map(|logs| logs.region.clone())
                .unwrap_or_default(),
            sidecars,
        }))
    }
}

/// The largest request the local API decodes: load reports of a sidecar routing thousands of
/// functions, and table reports, are far smaller.
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Streams per connection: a sidecar holds a watch and a few calls.
const MAX_STREAMS_PER_CONNECTION: u32 = 128;
const CONCURRENCY_PER_CONNECTION: usize = 128;
/// Pings that find a sidecar gone (its watch would otherwise hold a registration for ever).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `LocalRoutingService`, `LoadService`, `AgentApiService` and `grpc.health.v1.Health` on
/// `listener` until `shutdown` resolves and the open streams have ended.
pub async fn serve(
    listener: TcpListener,
    api: LocalApi,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), LocalApiError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<LocalRoutingServiceServer<LocalApi>>()
        .await;
    if api.load.is_some() {
        health.set_serving::<LoadServiceServer<LocalApi>>().await;
    }
    if api.logs.is_some() {
        health
            .set_serving::<AgentApiServiceServer<LocalApi>>()
            .await;
    }
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .concurrency_limit_per_connection(CONCURRENCY_PER_CONNECTION)
        .add_service(health_service)
        .add_service(
            LocalRoutingServiceServer::new(api.clone())
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(updates::MAX_MESSAGE_BYTES),
        )
        .add_service(
            LoadServiceServer::new(api.clone())
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            AgentApiServiceServer::new(api)
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(updates::MAX_MESSAGE_BYTES),
        )
        // A listener passed in keeps Nagle on unless told otherwise: a table sent right after
        // another (an instance READY just after STARTING) would wait for the delayed ACK.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
        .map_err(LocalApiError::Serve)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_proto::v1::local_routing_service_client::LocalRoutingServiceClient;
    use tonic::Code;

    fn table(version: i64) -> Arc<RoutingTable> {
        Arc::new(RoutingTable {
            local_generation: Default::default(),
            version,
            region: "us-east".into(),
            functions: vec![],
        })
    }

    #[tokio::test]
    async fn get_is_not_found_until_a_table_is_published() {
        let (publisher, routes) = watch::channel(None);
        let api = LocalApi::new(routes);
        let status = api
            .get(Request::new(GetRoutesRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), NO_TABLE_YET);

        publisher.send_replace(Some(table(3)));
        let got = api
            .get(Request::new(GetRoutesRequest::default()))
            .await
            .unwrap();
        assert_eq!(got.into_inner().table.unwrap().version, 3);
    }

    fn big_table(version: i64, functions: usize) -> Arc<RoutingTable> {
        Arc::new(RoutingTable {
            version,
            region: "us-east".into(),
            local_generation: 1,
            functions: (0..functions)
                .map(|i| FunctionRoute {
                    namespace: "default".into(),
                    name: format!("f{i:05}"),
                    function_version: 1,
                    ..Default::default()
                })
                .collect(),
        })
    }

    #[tokio::test]
    async fn get_pages_through_a_table_and_refuses_a_changed_one() {
        let (publisher, routes) = watch::channel(Some(big_table(5, 1200)));
        let api = LocalApi::new(routes);
        let mut token = String::new();
        let mut names = Vec::new();
        loop {
            let page = api
                .get(Request::new(GetRoutesRequest {
                    page_size: 500,
                    page_token: token.clone(),
                }))
                .await
                .unwrap()
                .into_inner();
            let table = page.table.unwrap();
            assert!(table.functions.len() <= 500);
            names.extend(table.functions.into_iter().map(|f| f.name));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(names.len(), 1200);
        assert!(
            names.windows(2).all(|w| w[0] < w[1]),
            "in order, no repeats"
        );

        let first = api
            .get(Request::new(GetRoutesRequest {
                page_size: 10,
                page_token: String::new(),
            }))
            .await
            .unwrap()
            .into_inner();
        publisher.send_replace(Some(big_table(6, 1200)));
        let status = api
            .get(Request::new(GetRoutesRequest {
                page_size: 10,
                page_token: first.next_page_token,
            }))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Aborted);
        let status = api
            .get(Request::new(GetRoutesRequest {
                page_size: 10,
                page_token: "nonsense".into(),
            }))
            .await
            .unwrap_err();
        assert!(status.message().starts_with("pageToken:"), "{status}");
    }

    #[tokio::test]
    async fn watch_sends_a_large_table_in_parts_then_deltas() {
        let (publisher, routes) = watch::channel(Some(big_table(1, 2000)));
        let api = LocalApi::new(routes);
        let mut stream = api
            .watch(Request::new(WatchRoutesRequest::default()))
            .await
            .unwrap()
            .into_inner();
        let mut receiver = updates::TableReceiver::default();
        let mut parts = 0;
        let table = loop {
            let part = stream.next().await.unwrap().unwrap();
            assert!(part.full && part.functions.len() <= updates::LOCAL_PART_LIMITS.items);
            parts += 1;
            if let Some(table) = receiver.push(part).unwrap() {
                break table.clone();
            }
        };
        assert!(parts >= 2000 / updates::LOCAL_PART_LIMITS.items);
        assert_eq!(table, *big_table(1, 2000));

        // One function changes, one goes: a delta of one part.
        let mut next = RoutingTable::clone(&big_table(2, 2000));
        next.functions[7].function_version = 2;
        next.functions.pop();
        publisher.send_replace(Some(Arc::new(next.clone())));
        let delta = stream.next().await.unwrap().unwrap();
        assert!(!delta.full && !delta.more);
        assert_eq!((delta.functions.len(), delta.removed.len()), (1, 1));
        assert_eq!(receiver.push(delta).unwrap().unwrap(), &next);
    }

    #[tokio::test]
    async fn watch_sends_current_then_every_accepted_table() {
        let (publisher, routes) = watch::channel(Some(table(1)));
        let api = LocalApi::new(routes);
        let request = Request::new(WatchRoutesRequest {
            client: "test".into(),
        });
        let mut stream = api.watch(request).await.unwrap().into_inner();
        assert_eq!(stream.next().await.unwrap().unwrap().version, 1);
        publisher.send_replace(Some(table(2)));
        assert_eq!(stream.next().await.unwrap().unwrap().version, 2);
        drop(publisher);
        assert!(
            stream.next().await.is_none(),
            "stream ends with the publisher"
        );
    }

    #[tokio::test]
    async fn watch_without_a_table_waits_for_the_first() {
        let (publisher, routes) = watch::channel(None);
        let api = LocalApi::new(routes);
        let request = Request::new(WatchRoutesRequest::default());
        let mut stream = api.watch(request).await.unwrap().into_inner();
        publisher.send_replace(Some(table(7)));
        assert_eq!(stream.next().await.unwrap().unwrap().version, 7);
    }

    /// `serve` running on a loopback port, and a channel connected to it.
    struct Running {
        channel: tonic::transport::Channel,
        stop: tokio::sync::oneshot::Sender<()>,
        server: tokio::task::JoinHandle<Result<(), LocalApiError>>,
    }

    impl Running {
        async fn start(api: LocalApi) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(serve(listener, api, async {
                let _ = stopped.await;
            }));
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            Running {
                channel,
                stop,
                server,
            }
        }

        /// Shuts the server down; it must return cleanly, which it only does once the open
        /// streams have ended.
        async fn stop(self) {
            self.stop.send(()).unwrap();
            self.server.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn serves_over_grpc_with_health() {
        let (publisher, routes) = watch::channel(Some(table(4)));
        let running = Running::start(LocalApi::new(routes)).await;
        let channel = running.channel.clone();
        let mut client = LocalRoutingServiceClient::new(channel.clone());
        let got = client
            .get(GetRoutesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.table.unwrap().version, 4);

        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let request = tonic_health::pb::HealthCheckRequest {
            service: "meridian.v1.LocalRoutingService".into(),
        };
        let status = health.check(request).await.unwrap().into_inner().status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );

        drop(publisher);
        running.stop().await;
    }

    /// Lines of two instances, and a follow stream that never ends by itself.
    struct FakeLogs;

    impl LogSource for FakeLogs {
        fn logs(
            &self,
            key: &FunctionKey,
            instance: Option<String>,
            tail: usize,
            follow: bool,
        ) -> Result<LogStream, RuntimeError> {
            if key.name != "f" {
                return Err(RuntimeError::UnknownFunction(key.to_string()));
            }
            let line = |instance: &str, n: usize| LogLine {
                instance: instance.into(),
                stream: "stdout".into(),
                line: format!("{key} line {n}"),
                region: String::new(),
            };
            let mut lines = Vec::new();
            for id in ["f-aaaaaa", "f-bbbbbb"] {
                if instance.as_deref().is_none_or(|i| i == id) {
                    lines.extend((0..tail.min(3)).map(|n| line(id, n)));
                }
            }
            let head = futures::stream::iter(lines);
            if follow {
                Ok(Box::pin(head.chain(futures::stream::pending())))
            } else {
                Ok(Box::pin(head))
            }
        }
    }

    struct Served {
        running: Running,
        publisher: watch::Sender<CurrentTable>,
        book: Arc<LoadBook>,
        activations: mpsc::Receiver<Activation>,
    }

    async fn serve_everything() -> Served {
        let (publisher, routes) = watch::channel(Some(table(4)));
        let book = Arc::new(LoadBook::new());
        let (activations_tx, activations) = mpsc::channel(8);
        let api = LocalApi::new(routes)
            .with_load(Arc::clone(&book), activations_tx)
            .with_logs(Arc::new(FakeLogs), "us-east");
        Served {
            running: Running::start(api).await,
            publisher,
            book,
            activations,
        }
    }

    #[tokio::test]
    async fn load_reports_reach_the_book_and_held_requests_activate() {
        use meridian_proto::v1::load_service_client::LoadServiceClient;
        use meridian_proto::v1::FunctionLoad;

        let mut served = serve_everything().await;
        let mut client = LoadServiceClient::new(served.running.channel.clone());
        let function = |name: &str, held: u32| FunctionLoad {
            namespace: "default".into(),
            name: name.into(),
            average_concurrency: 2.0,
            requests: 4,
            held,
            endpoints: vec![],
        };
        client
            .report_load(LoadReport {
                client: "sidecar-1".into(),
                table_version: 4,
                local_generation: 1,
                window_ms: 1000,
                functions: vec![function("f", 0), function("g", 2)],
            })
            .await
            .unwrap();
        let seen = served.book.observe(tokio::time::Instant::now());
        assert_eq!(seen[&FunctionKey::new("default", "f")].requests, 4);
        assert_eq!(seen[&FunctionKey::new("default", "g")].concurrency, 2.0);
        let activation = served.activations.recv().await.unwrap();
        assert_eq!(activation.key, FunctionKey::new("default", "g"));
        assert!(activation.reply.is_none());

        // Activate waits for the autoscaler's answer.
        let call = tokio::spawn(async move {
            client
                .activate(ActivateRequest {
                    client: "sidecar-1".into(),
                    namespace: String::new(),
                    name: "f".into(),
                })
                .await
        });
        let activation = served.activations.recv().await.unwrap();
        assert_eq!(activation.key, FunctionKey::new("default", "f"));
        activation.reply.unwrap().send(3).unwrap();
        assert_eq!(call.await.unwrap().unwrap().into_inner().instances, 3);

        let mut client = LoadServiceClient::new(served.running.channel.clone());
        let status = client
            .activate(ActivateRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        // No autoscaler any more: UNAVAILABLE, not a hang.
        drop(served.activations);
        let status = client
            .activate(ActivateRequest {
                name: "f".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        drop(served.publisher);
        served.running.stop().await;
    }

    #[tokio::test]
    async fn logs_tail_filter_and_follow_until_shutdown() {
        use meridian_proto::v1::agent_api_service_client::AgentApiServiceClient;

        let served = serve_everything().await;
        let mut client = AgentApiServiceClient::new(served.running.channel.clone());
        let request = |instance: &str, tail_lines: u32, follow: bool| LogsRequest {
            namespace: "default".into(),
            name: "f".into(),
            tail_lines,
            follow,
            instance: instance.into(),
        };
        let mut stream = client
            .logs(request("", 2, false))
            .await
            .unwrap()
            .into_inner();
        let mut lines = Vec::new();
        while let Some(line) = stream.message().await.unwrap() {
            assert_eq!(line.region, "us-east");
            lines.push(format!("{} {}", line.instance, line.line));
        }
        assert_eq!(
            lines,
            [
                "f-aaaaaa default/f line 0",
                "f-aaaaaa default/f line 1",
                "f-bbbbbb default/f line 0",
                "f-bbbbbb default/f line 1",
            ]
        );

        let status = client
            .logs(LogsRequest {
                name: "nope".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        assert!(
            status.message().contains("default/nope"),
            "{}",
            status.message()
        );

        // tail 0 means the default; a followed stream stays open until the agent shuts down.
        let mut stream = client
            .logs(request("f-bbbbbb", 0, true))
            .await
            .unwrap()
            .into_inner();
        for _ in 0..3 {
            let line = stream.message().await.unwrap().unwrap();
            assert_eq!(line.instance, "f-bbbbbb");
        }
        drop(served.publisher);
        assert!(stream.message().await.unwrap().is_none());
        served.running.stop().await;
    }

    #[tokio::test]
    async fn without_load_or_logs_the_calls_are_unimplemented() {
        let (_publisher, routes) = watch::channel(None);
        let api = LocalApi::new(routes);
        let status = api
            .report_load(Request::new(LoadReport::default()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented);
        let status = api
            .logs(Request::new(LogsRequest::default()))
            .await
            .err()
            .unwrap();
        assert_eq!(status.code(), Code::Unimplemented);
    }

    /// A sidecar's admin service that explains `hello` and knows no other function.
    struct FakeSidecar;

    #[tonic::async_trait]
    impl meridian_proto::v1::sidecar_admin_service_server::SidecarAdminService for FakeSidecar {
        async fn explain(
            &self,
            request: Request<ExplainRequest>,
        ) -> Result<Response<meridian_proto::v1::Explanation>, Status> {
            let request = request.into_inner();
            if request.name != "hello" {
                return Err(Status::not_found(format!("no {}", request.name)));
            }
            Ok(Response::new(meridian_proto::v1::Explanation {
                namespace: request.namespace,
                name: request.name,
                table_version: 9,
                ..Default::default()
            }))
        }
    }

    fn watch_request(client: &str, admin: &str) -> Request<WatchRoutesRequest> {
        let mut request = Request::new(WatchRoutesRequest {
            client: client.into(),
        });
        request
            .metadata_mut()
            .insert(ADMIN_ADDRESS_METADATA, admin.parse().unwrap());
        request
    }

    async fn explain_hello(api: &LocalApi, name: &str) -> ExplainResponse {
        api.explain(Request::new(ExplainRequest {
            namespace: String::new(),
            name: name.into(),
        }))
        .await
        .unwrap()
        .into_inner()
    }

    #[tokio::test]
    async fn explain_asks_each_sidecar_while_its_watch_is_open() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sidecar = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(
                    meridian_proto::v1::sidecar_admin_service_server::SidecarAdminServiceServer::new(
                        FakeSidecar,
                    ),
                )
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gone = closed.local_addr().unwrap().to_string();
        drop(closed);

        let (_publisher, routes) = watch::channel(Some(table(1)));
        let api = LocalApi::new(routes).with_logs(Arc::new(NoLogs), "us-east");
        assert!(explain_hello(&api, "hello").await.sidecars.is_empty());

        let a = api
            .watch(watch_request("sidecar-a", &sidecar))
            .await
            .unwrap();
        let b = api.watch(watch_request("sidecar-b", &gone)).await.unwrap();
        // Not host:port: never dialed.
        let _c = api
            .watch(watch_request("sidecar-c", "http://evil/"))
            .await
            .unwrap();
        let answer = explain_hello(&api, "hello").await;
        assert_eq!(answer.region, "us-east");
        let names: Vec<&str> = answer.sidecars.iter().map(|s| s.sidecar.as_str()).collect();
        assert_eq!(names, ["sidecar-a", "sidecar-b"]);
        let explained = answer.sidecars[0].explanation.as_ref().unwrap();
        assert_eq!(
            (explained.namespace.as_str(), explained.table_version),
            ("default", 9)
        );
        assert!(answer.sidecars[1].explanation.is_none());
        assert_eq!(answer.sidecars[1].error_code, "UNAVAILABLE");
        assert!(answer.sidecars[1].error.starts_with("unreachable: "));

        let answer = explain_hello(&api, "nope").await;
        assert_eq!(answer.sidecars[0].error_code, "NOT_FOUND");
        assert_eq!(answer.sidecars[0].error, "no nope");

        // A watch that ends takes its sidecar off the list.
        drop(b);
        let answer = explain_hello(&api, "hello").await;
        assert_eq!(answer.sidecars.len(), 1);
        drop(a);
        assert!(explain_hello(&api, "hello").await.sidecars.is_empty());

        let status = api
            .explain(Request::new(ExplainRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }

    /// Logs are not what these tests are about.
    struct NoLogs;

    impl LogSource for NoLogs {
        fn logs(
            &self,
            key: &FunctionKey,
            _instance: Option<String>,
            _tail: usize,
            _follow: bool,
        ) -> Result<LogStream, RuntimeError> {
            Err(RuntimeError::UnknownFunction(key.to_string()))
        }
    }
}
