//! The connection to a control-plane replica (and the dialing agents share): address
//! normalization, timeouts, and turning transport failures and gRPC statuses into the messages
//! meridianctl prints.

use std::error::Error as _;
use std::time::Duration;

use meridian_proto::v1 as wire;
use meridian_proto::v1::control_plane_service_client::ControlPlaneServiceClient;
use meridian_proto::v1::function_service_client::FunctionServiceClient;
use meridian_proto::v1::mesh_service_client::MeshServiceClient;
use meridian_proto::v1::scale_service_client::ScaleServiceClient;
use thiserror::Error;
use tonic::metadata::{MetadataKey, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// How long to wait for the connection (TCP and HTTP/2 handshake). Together with the process
/// start this keeps "control plane unreachable" well under five seconds.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("invalid control-plane address {address:?}: {source}")]
    InvalidAddress {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// No connection could be made, or it broke under a request.
    #[error("cannot reach control plane at {address}: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("request to control plane at {address} timed out after {}s", REQUEST_TIMEOUT.as_secs())]
    Timeout { address: String },
    /// The server answered with an error status.
    #[error("Error from server ({}): {}", reason(.status.code()), .status.message())]
    Server {
        #[source]
        status: Status,
    },
    /// A paged listing was aborted by the server every time it was tried.
    #[error("the {0} kept changing while they were listed; try again")]
    Listing(&'static str),
}

/// How many times a paged listing the server aborts (its version went away) is started again.
const LISTING_ATTEMPTS: u32 = 3;

impl ClientError {
    /// The gRPC code the server answered with, if it answered.
    pub fn server_code(&self) -> Option<Code> {
        match self {
            ClientError::Server { status } => Some(status.code()),
            _ => None,
        }
    }

    /// The server's message, if it answered.
    pub fn server_message(&self) -> Option<&str> {
        match self {
            ClientError::Server { status } => Some(status.message()),
            _ => None,
        }
    }
}

/// kubectl's name for a status, as in `Error from server (NotFound): ...`.
pub fn reason(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Cancelled",
        Code::Unknown | Code::Internal | Code::DataLoss => "InternalError",
        Code::InvalidArgument | Code::OutOfRange => "Invalid",
        Code::DeadlineExceeded => "Timeout",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "Forbidden",
        Code::ResourceExhausted => "TooManyRequests",
        Code::FailedPrecondition | Code::Aborted => "Conflict",
        Code::Unimplemented => "NotImplemented",
        Code::Unavailable => "ServiceUnavailable",
        Code::Unauthenticated => "Unauthorized",
    }
}

/// Accepts `http://host:port`, `https://...` or a bare `host:port` (taken as plain HTTP/2).
pub fn normalize_address(address: &str) -> String {
    let address = address.trim().trim_end_matches('/');
    if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    }
}

/// An error and its causes on one line, without the wrappers that say nothing
/// ("transport error"), e.g. "tcp connect error: Connection refused (os error 111)".
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        let redundant = text.is_empty()
            || text == "transport error"
            || parts.last().is_some_and(|last| last.contains(&text));
        if !redundant {
            parts.push(text);
        }
        next = e.source();
    }
    if parts.is_empty() {
        err.to_string()
    } else {
        parts.join(": ")
    }
}

/// Why [`dial`] could not open a channel; the caller names the peer in its message.
#[derive(Debug, Error)]
pub enum DialError {
    #[error("invalid address {address:?}: {source}")]
    InvalidAddress {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The reason, already one line (see [`error_chain`]).
    #[error("{reason}")]
    Failed { reason: String },
}

/// Puts the current span's W3C trace context on every request (nothing when tracing is off), so
/// that the control plane's and agents' spans join the command's trace.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceContext;

impl tonic::service::Interceptor for TraceContext {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        for (name, value) in meridian_common::telemetry::current_context_fields() {
            // The propagator writes valid header names and values; anything else is dropped
            // rather than failing the call.
            if let (Ok(name), Ok(value)) = (
                MetadataKey::from_bytes(name.as_bytes()),
                MetadataValue::try_from(value.as_str()),
            ) {
                request.metadata_mut().insert(name, value);
            }
        }
        Ok(request)
    }
}

/// A channel whose requests carry the trace context.
pub type TracedChannel = InterceptedService<Channel, TraceContext>;

/// Opens an HTTP/2 channel to `address` (already normalized) eagerly, so that an unreachable
/// peer is reported before anything else happens, within [`CONNECT_TIMEOUT`]. Every request on
/// the channel may take [`REQUEST_TIMEOUT`] until its response headers arrive (a stream's body
/// is not bounded, so `logs --follow` can run for hours).
pub async fn dial(address: &str) -> Result<TracedChannel, DialError> {
    let endpoint = Endpoint::from_shared(address.to_string())
        .map_err(|source| DialError::InvalidAddress {
            address: address.to_string(),
            source,
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT);
    // connect_timeout bounds the TCP connect only; this bounds name resolution and the HTTP/2
    // handshake too (a listener that never answers must not hang us).
    match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(InterceptedService::new(channel, TraceContext)),
        Ok(Err(err)) => Err(DialError::Failed {
            reason: error_chain(&err),
        }),
        Err(_) => Err(DialError::Failed {
            reason: format!("timed out after {}s", CONNECT_TIMEOUT.as_secs()),
        }),
    }
}

/// A connected client of FunctionService, MeshService, ScaleService and ControlPlaneService.
#[derive(Clone)]
pub struct ControlPlane {
    address: String,
    functions: FunctionServiceClient<TracedChannel>,
    mesh: MeshServiceClient<TracedChannel>,
    scale: ScaleServiceClient<TracedChannel>,
    replicas: ControlPlaneServiceClient<TracedChannel>,
}

impl ControlPlane {
    /// Connects eagerly (see [`dial`]).
    pub async fn connect(address: &str) -> Result<ControlPlane, ClientError> {
        let address = normalize_address(address);
        let channel = match dial(&address).await {
            Ok(channel) => channel,
            Err(DialError::InvalidAddress { address, source }) => {
                return Err(ClientError::InvalidAddress { address, source })
            }
            Err(DialError::Failed { reason }) => {
                return Err(ClientError::Unreachable { address, reason })
            }
        };
        Ok(ControlPlane {
            address,
            functions: FunctionServiceClient::new(channel.clone()),
            mesh: MeshServiceClient::new(channel.clone()),
            scale: ScaleServiceClient::new(channel.clone()),
            replicas: ControlPlaneServiceClient::new(channel),
        })
    }

    /// The normalized address, e.g. `http://127.0.0.1:7000`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Statuses made up locally by the transport (they carry a source error) are connection
    /// problems, not answers from the server.
    fn map_status(&self, status: Status) -> ClientError {
        let Some(source) = status.source() else {
            return ClientError::Server { status };
        };
        let reason = error_chain(source);
        if reason.contains("Timeout expired") || status.message().contains("Timeout expired") {
            ClientError::Timeout {
                address: self.address.clone(),
            }
        } else {
            ClientError::Unreachable {
                address: self.address.clone(),
                reason,
            }
        }
    }

    pub async fn apply(
        &self,
        request: wire::ApplyFunctionRequest,
    ) -> Result<wire::ApplyFunctionResponse, ClientError> {
        let mut client = self.functions.clone();
        client
            .apply(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| self.map_status(s))
    }

    pub async fn get_function(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<wire::Function, ClientError> {
        let mut client = self.functions.clone();
        client
            .get(wire::GetFunctionRequest {
                namespace: namespace.to_string(),
                name: name.to_string(),
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| self.map_status(s))
    }

    /// Every function the request selects, following the server's pages (all read at the
    /// first page's revision).
    pub async fn list_functions(
        &self,
        request: wire::ListFunctionsRequest,
    ) -> Result<wire::ListFunctionsResponse, ClientError> {
        let client = self.functions.clone();
        self.follow_pages(
            "functions",
            |page_token| {
                let mut client = client.clone();
                let request = wire::ListFunctionsRequest {
                    page_token,
                    ..request.clone()
                };
                async move {
                    let page = client.list(request).await?.into_inner();
                    let next = page.next_page_token.clone();
                    Ok((page, next))
                }
            },
            |all: &mut wire::ListFunctionsResponse, page| {
                if all.version == 0 {
                    all.version = page.version;
                }
                all.functions.extend(page.functions);
            },
        )
        .await
    }

    pub async fn delete_function(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<wire::DeleteFunctionResponse, ClientError> {
        let mut client = self.functions.clone();
        client
            .delete(wire::DeleteFunctionRequest {
                namespace: namespace.to_string(),
                name: name.to_string(),
                expected_version: 0,
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| self.map_status(s))
    }

    pub async fn list_agents(&self, region: &str) -> Result<wire::ListAgentsResponse, ClientError> {
        let mut client = self.mesh.clone();
        client
            .list_agents(wire::ListAgentsRequest {
                region: region.to_string(),
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| self.map_status(s))
    }

    /// Every function's instances the request selects, following the server's pages.
    pub async fn list_instances(
        &self,
        request: wire::ListInstancesRequest,
    ) -> Result<wire::ListInstancesResponse, ClientError> {
        let client = self.scale.clone();
        self.follow_pages(
            "instances",
            |page_token| {
                let mut client = client.clone();
                let request = wire::ListInstancesRequest {
                    page_token,
                    ..request.clone()
                };
                async move {
                    let page = client.list_instances(request).await?.into_inner();
                    let next = page.next_page_token.clone();
                    Ok((page, next))
                }
            },
            |all: &mut wire::ListInstancesResponse, page| all.functions.extend(page.functions),
        )
        .await
    }

    pub async fn get_leader(&self) -> Result<wire::GetLeaderResponse, ClientError> {
        let mut client = self.scale.clone();
        client
            .get_leader(wire::GetLeaderRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| self.map_status(s))
    }

    pub async fn list_replicas(&self) -> Result<wire::ListReplicasResponse, ClientError> {
        let mut client = self.replicas.clone();
        client
            .list_replicas(wire::ListReplicasRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| self.map_status(s))
    }

    /// A region's whole routing table, following the server's pages (all cut from one table
    /// version; a listing the server aborts because that version is gone starts again).
    pub async fn routing_table(&self, region: &str) -> Result<wire::RoutingTable, ClientError> {
        let client = self.mesh.clone();
        let table: Option<wire::RoutingTable> = self
            .follow_pages(
                "routes",
                |page_token| {
                    let mut client = client.clone();
                    let request = wire::GetRoutingTableRequest {
                        region: region.to_string(),
                        page_size: 0,
                        page_token,
                    };
                    async move {
                        let page = client.get_routing_table(request).await?.into_inner();
                        let next = page.next_page_token.clone();
                        Ok((page.table.unwrap_or_default(), next))
                    }
                },
                |table: &mut Option<wire::RoutingTable>, part| match table {
                    Some(table) => table.functions.extend(part.functions),
                    None => *table = Some(part),
                },
            )
            .await?;
        Ok(table.unwrap_or_default())
    }

    /// Reads a listing page by page: `fetch(token)` asks for one page and gives it with the next
    /// token (empty after the last), `merge` adds it to what was read. A listing the server
    /// aborts (ABORTED: the version it was paging through is gone, e.g. compacted or
    /// superseded) starts again from the first page, a few times at most, so pages of two
    /// versions are never mixed.
    async fn follow_pages<T, P, F, Fut>(
        &self,
        what: &'static str,
        mut fetch: F,
        mut merge: impl FnMut(&mut T, P),
    ) -> Result<T, ClientError>
    where
        T: Default,
        F: FnMut(String) -> Fut,
        Fut: std::future::Future<Output = Result<(P, String), tonic::Status>>,
    {
        for attempt in 1..=LISTING_ATTEMPTS {
            let mut all = T::default();
            let mut page_token = String::new();
            let aborted = loop {
                match fetch(page_token).await {
                    Ok((page, next)) => {
                        merge(&mut all, page);
                        if next.is_empty() {
                            break false;
                        }
                        page_token = next;
                    }
                    Err(status) if status.code() == Code::Aborted && attempt < LISTING_ATTEMPTS => {
                        break true
                    }
                    Err(status) => return Err(self.map_status(status)),
                }
            };
            if !aborted {
                return Ok(all);
            }
        }
        Err(ClientError::Listing(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(normalize_address("127.0.0.1:7000"), "http://127.0.0.1:7000");
        assert_eq!(
            normalize_address("http://127.0.0.1:7000/"),
            "http://127.0.0.1:7000"
        );
        assert_eq!(normalize_address("https://cp:443"), "https://cp:443");
    }

    #[test]
    fn server_errors_read_like_kubectl() {
        let err = ClientError::Server {
            status: Status::invalid_argument("spec.placement.regions[1].maxInstances: too small"),
        };
        assert_eq!(
            err.to_string(),
            "Error from server (Invalid): spec.placement.regions[1].maxInstances: too small"
        );
        let err = ClientError::Server {
            status: Status::failed_precondition("version 3 is not 4"),
        };
        assert_eq!(
            err.to_string(),
            "Error from server (Conflict): version 3 is not 4"
        );
    }
}
