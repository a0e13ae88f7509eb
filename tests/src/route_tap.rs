//! A `LocalRoutingService` between an agent and its sidecar: passes every table through, with
//! each remote tier's gateway address replaced by the [`Relay`] link from this region to that
//! gateway (see the design note in `relay.rs`), and passes the sidecar's `ReportTable` calls back
//! to the agent, keeping a copy for the test.
//!
//! The sidecar's `LoadService` calls (load reports, activations) pass through to the agent
//! unchanged.
//!
//! A test can also tamper with the tables on their way (e.g. make one the sidecar cannot
//! compile) without going around the agent: the report still reaches the agent, which Nacks the
//! version to the control plane as it would for any sidecar refusal.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use futures::{Stream, StreamExt};
use meridian_proto::updates::{self, TableReceiver};
use meridian_proto::v1::load_service_client::LoadServiceClient;
use meridian_proto::v1::load_service_server::{LoadService, LoadServiceServer};
use meridian_proto::v1::local_routing_service_client::LocalRoutingServiceClient;
use meridian_proto::v1::local_routing_service_server::{
    LocalRoutingService, LocalRoutingServiceServer,
};
use meridian_proto::v1::{
    ActivateRequest, ActivateResponse, GetRoutesRequest, LoadReport, LoadReportResponse,
    RoutingTable, RoutingTablePage, RoutingUpdate, TableReport, TableReportResponse,
    WatchRoutesRequest,
};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::{free_port, region_ip, Relay};

/// The Watch metadata in which a sidecar names its admin address (the agent's `explain` asks it).
const ADMIN_ADDRESS_METADATA: &str = "meridian-admin-address";

/// A change a test makes to every table passing through (after the relay rewrite).
pub type Tamper = Arc<dyn Fn(&mut RoutingTable) + Send + Sync>;

#[derive(Clone)]
struct Shared {
    region: String,
    upstream: String,
    relay: Relay,
    tamper: Arc<Mutex<Option<Tamper>>>,
    reports: Arc<Mutex<Vec<TableReport>>>,
    delivered: Arc<Mutex<Vec<i64>>>,
    /// One lazily connected channel to the agent for the frequent load calls.
    load_channel: Channel,
}

impl Shared {
    async fn client(&self) -> Result<LocalRoutingServiceClient<Channel>, Status> {
        let channel = tonic::transport::Endpoint::from_shared(self.upstream.clone())
            .map_err(|e| Status::internal(format!("bad agent URL: {e}")))?
            .connect_timeout(std::time::Duration::from_secs(2))
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("agent unreachable: {e}")))?;
        Ok(LocalRoutingServiceClient::new(channel))
    }

    /// The table as this region's sidecar must see it.
    fn rewrite(&self, mut table: RoutingTable) -> Result<RoutingTable, Status> {
        for function in &mut table.functions {
            for tier in function.tiers.iter_mut().filter(|t| !t.local) {
                for endpoint in &mut tier.endpoints {
                    // Anything that is not ip:port is left for the sidecar to judge.
                    let Ok(target) = endpoint.address.parse::<SocketAddr>() else {
                        continue;
                    };
                    let link = self
                        .relay
                        .link(&self.region, &tier.region, target)
                        .map_err(|e| Status::internal(format!("{e:#}")))?;
                    endpoint.address = link.to_string();
                }
            }
        }
        let tamper = self
            .tamper
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(tamper) = tamper {
            tamper(&mut table);
        }
        self.delivered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(table.version);
        Ok(table)
    }
}

#[tonic::async_trait]
impl LocalRoutingService for Shared {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<RoutingUpdate, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<WatchRoutesRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // The sidecar's admin address lets the agent reach it for `explain`: pass it on.
        let admin = request.metadata().get(ADMIN_ADDRESS_METADATA).cloned();
        let mut forwarded = Request::new(request.into_inner());
        if let Some(admin) = admin {
            forwarded
                .metadata_mut()
                .insert(ADMIN_ADDRESS_METADATA, admin);
        }
        let upstream = self.client().await?.watch(forwarded).await?.into_inner();
        let shared = self.clone();
        // Follow the agent's stream into whole tables, rewrite each, and serve the sidecar
        // its own stream of the rewritten tables: a full one, then deltas, in parts.
        let mut received = TableReceiver::default();
        let mut sent: Option<RoutingTable> = None;
        let updates = upstream.map(move |item| -> Vec<Result<RoutingUpdate, Status>> {
            let part = match item {
                Ok(part) => part,
                Err(status) => return vec![Err(status)],
            };
            let table = match received.push(part) {
                Ok(Some(table)) => table.clone(),
                Ok(None) => return Vec::new(),
                Err(error) => return vec![Err(Status::internal(format!("route tap: {error}")))],
            };
            let table = match shared.rewrite(table) {
                Ok(table) => table,
                Err(status) => return vec![Err(status)],
            };
            let update = match &sent {
                Some(previous) => updates::delta(previous, &table),
                None => updates::full(&table),
            };
            sent = Some(table);
            updates::split(update, updates::LOCAL_PART_LIMITS)
                .into_iter()
                .map(Ok)
                .collect()
        });
        let parts = updates.flat_map(futures::stream::iter);
        Ok(Response::new(Box::pin(parts)))
    }

    async fn get(
        &self,
        request: Request<GetRoutesRequest>,
    ) -> Result<Response<RoutingTablePage>, Status> {
        let mut page = self
            .client()
            .await?
            .get(request.into_inner())
            .await?
            .into_inner();
        if let Some(table) = page.table.take() {
            page.table = Some(self.rewrite(table)?);
        }
        Ok(Response::new(page))
    }

    async fn report_table(
        &self,
        request: Request<TableReport>,
    ) -> Result<Response<TableReportResponse>, Status> {
        let report = request.into_inner();
        self.reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(report.clone());
        let response = self.client().await?.report_table(report).await?;
        Ok(response)
    }
}

#[tonic::async_trait]
impl LoadService for Shared {
    async fn report_load(
        &self,
        request: Request<LoadReport>,
    ) -> Result<Response<LoadReportResponse>, Status> {
        LoadServiceClient::new(self.load_channel.clone())
            .report_load(request.into_inner())
            .await
    }

    async fn activate(
        &self,
        request: Request<ActivateRequest>,
    ) -> Result<Response<ActivateResponse>, Status> {
        LoadServiceClient::new(self.load_channel.clone())
            .activate(request.into_inner())
            .await
    }
}

/// The tap of one region. Stops serving when dropped.
pub struct RouteTap {
    addr: SocketAddr,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl RouteTap {
    /// Serves on a fresh port of `region`'s loopback address (region `region_index`), in front
    /// of the agent at `agent_url`.
    pub async fn start(
        region_index: usize,
        region: &str,
        agent_url: &str,
        relay: Relay,
    ) -> Result<RouteTap> {
        let ip = region_ip(region_index);
        let listen = SocketAddr::new(IpAddr::V4(ip), free_port(ip)?);
        RouteTap::start_on(listen, region, agent_url, relay).await
    }

    /// Serves on `listen` for the sidecars of `region`, in front of the agent at `agent_url`.
    pub async fn start_on(
        listen: SocketAddr,
        region: &str,
        agent_url: &str,
        relay: Relay,
    ) -> Result<RouteTap> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the route tap on {listen}"))?;
        let addr = listener.local_addr()?;
        let load_channel = tonic::transport::Endpoint::from_shared(agent_url.to_string())
            .with_context(|| format!("bad agent URL {agent_url}"))?
            .connect_timeout(std::time::Duration::from_secs(2))
            .connect_lazy();
        let shared = Shared {
            load_channel,
            region: region.to_string(),
            upstream: agent_url.to_string(),
            relay,
            tamper: Arc::default(),
            reports: Arc::default(),
            delivered: Arc::default(),
        };
        let service = LocalRoutingServiceServer::new(shared.clone());
        let load = LoadServiceServer::new(shared.clone());
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .add_service(load)
                .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
                .await;
        });
        Ok(RouteTap { addr, shared, task })
    }

    /// `http://<addr>`: what the sidecar's `--agent` points at.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Applies `tamper` to every table from now on (`None`: stop tampering).
    pub fn set_tamper(&self, tamper: Option<Tamper>) {
        *self.shared.tamper.lock().unwrap_or_else(|e| e.into_inner()) = tamper;
    }

    /// Every `ReportTable` the sidecar sent so far.
    pub fn reports(&self) -> Vec<TableReport> {
        self.shared
            .reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The versions of the tables handed to the sidecar so far, in order.
    pub fn delivered(&self) -> Vec<i64> {
        self.shared
            .delivered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for RouteTap {
    fn drop(&mut self) {
        self.task.abort();
    }
}
