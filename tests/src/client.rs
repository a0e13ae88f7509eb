//! gRPC client helpers: channels, the four service clients, a raw push-stream agent ("probe"), and
//! builders for the specs tests apply.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use meridian_proto::v1::agent_message::Kind as AgentKind;
use meridian_proto::v1::agent_service_client::AgentServiceClient;
use meridian_proto::v1::control_message::Kind as ControlKind;
use meridian_proto::v1::function_service_client::FunctionServiceClient;
use meridian_proto::v1::function_spec::Runtime;
use meridian_proto::v1::local_routing_service_client::LocalRoutingServiceClient;
use meridian_proto::v1::mesh_service_client::MeshServiceClient;
use meridian_proto::v1::{
    Ack, AgentMessage, ApplyFunctionRequest, ControlMessage, ExternalRegion, ExternalRuntime,
    Function, FunctionRoute, FunctionSpec, GetRoutingTableRequest, Hello, Nack, RoutingTable,
    RoutingUpdate,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;

/// Connects a channel to `url` (`http://host:port`). Unary calls (and the wait for a stream's
/// response headers) time out after 10 s so that a test cannot hang on a dead peer.
pub async fn connect(url: &str) -> Result<Channel> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .with_context(|| format!("bad URL {url}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10));
    endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// A `FunctionService` client for `url`.
pub async fn function_client(url: &str) -> Result<FunctionServiceClient<Channel>> {
    Ok(FunctionServiceClient::new(connect(url).await?))
}

/// A `MeshService` client for `url`.
pub async fn mesh_client(url: &str) -> Result<MeshServiceClient<Channel>> {
    Ok(MeshServiceClient::new(connect(url).await?))
}

/// A region's whole routing table as `MeshService.GetRoutingTable` pages it.
pub async fn routing_table(
    mesh: &mut MeshServiceClient<Channel>,
    region: &str,
) -> Result<RoutingTable> {
    let mut table: Option<RoutingTable> = None;
    let mut page_token = String::new();
    loop {
        let page = mesh
            .get_routing_table(GetRoutingTableRequest {
                region: region.to_string(),
                page_size: 0,
                page_token: page_token.clone(),
            })
            .await
            .with_context(|| format!("GetRoutingTable {region}"))?
            .into_inner();
        let part = page.table.context("a page without its table")?;
        match &mut table {
            Some(table) => table.functions.extend(part.functions),
            None => table = Some(part),
        }
        if page.next_page_token.is_empty() {
            return table.context("no page");
        }
        page_token = page.next_page_token;
    }
}

/// An `AgentService` client for `url`.
pub async fn agent_service_client(url: &str) -> Result<AgentServiceClient<Channel>> {
    Ok(AgentServiceClient::new(connect(url).await?))
}

/// A `LocalRoutingService` client for `url` (an agent's local API).
pub async fn local_client(url: &str) -> Result<LocalRoutingServiceClient<Channel>> {
    Ok(LocalRoutingServiceClient::new(connect(url).await?))
}

/// Applies `spec` (no expected version); returns the stored function.
pub async fn apply(
    client: &mut FunctionServiceClient<Channel>,
    spec: FunctionSpec,
) -> Result<Function> {
    let name = spec.name.clone();
    let response = client
        .apply(ApplyFunctionRequest {
            spec: Some(spec),
            ..Default::default()
        })
        .await
        .with_context(|| format!("applying {name}"))?
        .into_inner();
    response
        .function
        .ok_or_else(|| anyhow!("Apply of {name} returned no function"))
}

/// The route of function `name` in namespace "default", if the table has it.
pub fn route<'a>(table: &'a RoutingTable, name: &str) -> Option<&'a FunctionRoute> {
    table
        .functions
        .iter()
        .find(|f| f.name == name && (f.namespace == "default" || f.namespace.is_empty()))
}

/// An `external` function in namespace "default" with the given `(region, url)` pairs.
pub fn external_spec(name: &str, urls: &[(&str, &str)]) -> FunctionSpec {
    let mut regions: Vec<ExternalRegion> = Vec::new();
    for (region, url) in urls {
        match regions.iter_mut().find(|r| r.region == *region) {
            Some(r) => r.urls.push((*url).to_string()),
            None => regions.push(ExternalRegion {
                region: (*region).to_string(),
                urls: vec![(*url).to_string()],
            }),
        }
    }
    FunctionSpec {
        name: name.to_string(),
        namespace: "default".to_string(),
        runtime: Some(Runtime::External(ExternalRuntime { regions })),
        ..Default::default()
    }
}

/// The endpoint id the contract gives an external URL: "ext-" + FNV-1a-64 of the URL in hex.
pub fn external_endpoint_id(url: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in url.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("ext-{hash:016x}")
}

/// A Hello for a probe agent in `region` (gateway on the region's loopback address).
pub fn probe_hello(region: &str, agent_id: &str, last_version: i64) -> Hello {
    let ip = crate::region_index(region).map_or(std::net::Ipv4Addr::LOCALHOST, crate::region_ip);
    Hello {
        agent_id: agent_id.to_string(),
        region: region.to_string(),
        zone: format!("{region}-a"),
        cloud: "local".to_string(),
        gateway: format!("{ip}:15002"),
        last_version,
        api_address: String::new(),
        command_policy: None,
    }
}

/// A hand-driven `AgentService.Connect` stream: the test decides what to send, and sees every
/// message the control plane pushes.
pub struct RawAgent {
    tx: mpsc::Sender<AgentMessage>,
    rx: Streaming<ControlMessage>,
}

impl RawAgent {
    /// Opens the stream and sends `hello` first. An error (e.g. INVALID_ARGUMENT) may come from
    /// here or from the first [`RawAgent::next_update`]; either way it wraps a `tonic::Status`
    /// (find it with `err.downcast_ref::<tonic::Status>()`).
    pub async fn connect(channel: Channel, hello: Hello) -> Result<RawAgent> {
        let (tx, rx) = mpsc::channel(64);
        // Queued before the call: the server may read the Hello before it answers with headers.
        tx.send(AgentMessage {
            kind: Some(AgentKind::Hello(hello)),
        })
        .await
        .map_err(|_| anyhow!("queueing the hello"))?;
        let response = AgentServiceClient::new(channel)
            .connect(ReceiverStream::new(rx))
            .await
            .map_err(anyhow::Error::new)?;
        Ok(RawAgent {
            tx,
            rx: response.into_inner(),
        })
    }

    /// The next message from the control plane, at most `within`. Stream errors wrap the
    /// `tonic::Status`.
    pub async fn next_message(&mut self, within: Duration) -> Result<ControlMessage> {
        match tokio::time::timeout(within, self.rx.message()).await {
            Err(_) => Err(anyhow!(
                "no message from the control plane within {within:?}"
            )),
            Ok(Err(status)) => Err(anyhow::Error::new(status)),
            Ok(Ok(None)) => Err(anyhow!("the control plane closed the stream")),
            Ok(Ok(Some(message))) => Ok(message),
        }
    }

    /// The next routing update, skipping heartbeats, at most `within` in all.
    pub async fn next_update(&mut self, within: Duration) -> Result<RoutingUpdate> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let message = self
                .next_message(left)
                .await
                .context("waiting for a routing update")?;
            match message.kind {
                Some(ControlKind::Update(update)) => return Ok(update),
                Some(ControlKind::Behind(behind)) => {
                    bail!("the control plane says it is behind the agent: {behind:?}")
                }
                Some(ControlKind::Heartbeat(_)) | None => continue,
            }
        }
    }

    /// Sends any message.
    pub async fn send(&self, kind: AgentKind) -> Result<()> {
        self.tx
            .send(AgentMessage { kind: Some(kind) })
            .await
            .map_err(|_| anyhow!("the stream to the control plane is closed"))
    }

    /// Acknowledges `version`.
    pub async fn ack(&self, version: i64) -> Result<()> {
        self.send(AgentKind::Ack(Ack { version })).await
    }

    /// Refuses `version`.
    pub async fn nack(&self, version: i64, reason: &str) -> Result<()> {
        self.send(AgentKind::Nack(Nack {
            version,
            reason: reason.to_string(),
        }))
        .await
    }
}
