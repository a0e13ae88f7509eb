//! `LocalRoutingService`: the agent's API for the sidecars on its host, plus gRPC health. It only
//! reads the latest accepted table from a `watch` channel, so it works the same with or without
//! a control plane (static stability).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use meridian_proto::v1::local_routing_service_server::{
    LocalRoutingService, LocalRoutingServiceServer,
};
use meridian_proto::v1::{
    GetRoutesRequest, RoutingTable, TableReport, TableReportResponse, WatchRoutesRequest,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamExt;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// The latest accepted table; `None` until the agent has one.
pub type CurrentTable = Option<Arc<RoutingTable>>;

/// Message of the NOT_FOUND answer to `Get` before the agent has any table.
pub const NO_TABLE_YET: &str = "agent has no routing table yet";

#[derive(Debug, thiserror::Error)]
pub enum LocalApiError {
    #[error("local routing API server failed")]
    Serve(#[source] tonic::transport::Error),
}

/// The service; clone it freely, every clone reads the same channel.
#[derive(Debug, Clone)]
pub struct LocalApi {
    routes: watch::Receiver<CurrentTable>,
    refusals: Option<mpsc::Sender<TableReport>>,
}

impl LocalApi {
    pub fn new(routes: watch::Receiver<CurrentTable>) -> Self {
        Self {
            routes,
            refusals: None,
        }
    }

    /// Sidecars' refusals of tables go to `refusals` (the session forwards them as Nacks).
    pub fn with_refusals(mut self, refusals: mpsc::Sender<TableReport>) -> Self {
        self.refusals = Some(refusals);
        self
    }
}

#[tonic::async_trait]
impl LocalRoutingService for LocalApi {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<RoutingTable, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<WatchRoutesRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let client = request.into_inner().client;
        tracing::info!(%client, "sidecar watching routes");
        // WatchStream yields the current value first, then each new one; a slow watcher skips
        // to the newest table rather than queueing old ones. It ends when the publisher is
        // dropped (agent shutting down), which lets graceful shutdown finish.
        let tables = WatchStream::new(self.routes.clone())
            .filter_map(|current| current.map(|table| Ok(RoutingTable::clone(&table))));
        Ok(Response::new(Box::pin(tables)))
    }

    async fn get(
        &self,
        _request: Request<GetRoutesRequest>,
    ) -> Result<Response<RoutingTable>, Status> {
        let current = self.routes.borrow().clone();
        match current {
            Some(table) => Ok(Response::new(RoutingTable::clone(&table))),
            None => Err(Status::not_found(NO_TABLE_YET)),
        }
    }

    async fn report_table(
        &self,
        request: Request<TableReport>,
    ) -> Result<Response<TableReportResponse>, Status> {
        let report = request.into_inner();
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

/// Serves `LocalRoutingService` and `grpc.health.v1.Health` on `listener` until `shutdown`
/// resolves and the open streams have ended.
pub async fn serve(
    listener: TcpListener,
    api: LocalApi,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), LocalApiError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<LocalRoutingServiceServer<LocalApi>>()
        .await;
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(LocalRoutingServiceServer::new(api))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
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
            .get(Request::new(GetRoutesRequest {}))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), NO_TABLE_YET);

        publisher.send_replace(Some(table(3)));
        let got = api.get(Request::new(GetRoutesRequest {})).await.unwrap();
        assert_eq!(got.into_inner().version, 3);
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

    #[tokio::test]
    async fn serves_over_grpc_with_health() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (publisher, routes) = watch::channel(Some(table(4)));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, LocalApi::new(routes), async {
            let _ = stopped.await;
        }));

        let url = format!("http://{addr}");
        let channel = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = LocalRoutingServiceClient::new(channel.clone());
        let got = client.get(GetRoutesRequest {}).await.unwrap().into_inner();
        assert_eq!(got.version, 4);

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
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
