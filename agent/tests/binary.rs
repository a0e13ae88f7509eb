//! The `meridian-agent` binary on its own (no real control plane): flag errors, static stability
//! (a persisted table is served with no control plane reachable), the exit code of a refused
//! Hello, and graceful shutdown on SIGTERM.
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use meridian_agent::state::StateStore;
use meridian_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use meridian_proto::v1::local_routing_service_client::LocalRoutingServiceClient;
use meridian_proto::v1::{
    AgentMessage, ControlMessage, FunctionRoute, GetRoutesRequest, RoutingTable, WatchRoutesRequest,
};
use tonic::{Request, Response, Status, Streaming};

use support::{agent_args, dead_port, Agent, AGENT};

#[test]
fn bad_region_exits_2_naming_the_flag() {
    let output = Command::new(AGENT)
        .args(["--region", "Not_A_Label"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--region"), "{stderr}");
}

// Multi-threaded: the client must keep answering (GOAWAY) while the test blocks on the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_persisted_table_without_control_plane_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    store
        .save(&RoutingTable {
            version: 42,
            region: "us-east".into(),
            local_generation: 0,
            functions: vec![FunctionRoute {
                namespace: "default".into(),
                name: "hello".into(),
                ..Default::default()
            }],
        })
        .unwrap();
    let cp = format!("http://127.0.0.1:{}", dead_port());
    let state_dir = dir.path().to_str().unwrap();
    let mut agent = Agent::start(&agent_args(state_dir, &cp));
    let channel = agent.connect().await;
    let mut client = LocalRoutingServiceClient::new(channel);
    let page = client
        .get(GetRoutesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(page.next_page_token.is_empty());
    let table = page.table.unwrap();
    assert_eq!(table.version, 42);
    assert_eq!(table.functions[0].name, "hello");
    let request = WatchRoutesRequest {
        client: "test".into(),
    };
    let mut watch = client.watch(request).await.unwrap().into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().version, 42);
    // It keeps trying the control plane meanwhile.
    agent.wait_for("control-plane session ended");

    // SIGTERM: open Watch streams end, and the agent exits at once rather than after the
    // shutdown grace period.
    let started = Instant::now();
    agent.terminate();
    assert!(!matches!(watch.message().await, Ok(Some(_))));
    let code = tokio::task::spawn_blocking(move || agent.wait_exit())
        .await
        .unwrap();
    assert_eq!(code, 0);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

/// Refuses every Hello, as a control plane does for a bad identity.
struct RefusingCp;

#[tonic::async_trait]
impl AgentService for RefusingCp {
    type ConnectStream = futures::stream::BoxStream<'static, Result<ControlMessage, Status>>;

    async fn connect(
        &self,
        mut request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let _hello = request.get_mut().message().await?;
        Err(Status::invalid_argument("hello.gateway: must be host:port"))
    }
}

// Multi-threaded: the test blocks on the agent's log while the fake control plane serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_hello_exits_2() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cp = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(RefusingCp))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(&agent_args(dir.path().to_str().unwrap(), &cp));
    agent.wait_for("hello.gateway: must be host:port");
    let code = tokio::task::spawn_blocking(move || agent.wait_exit())
        .await
        .unwrap();
    assert_eq!(code, 2);
}
