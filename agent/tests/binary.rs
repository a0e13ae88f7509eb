//! The `meridian-agent` binary on its own (no real control plane): flag errors, static stability
//! (a persisted table is served with no control plane reachable), the exit code of a refused
//! Hello, and graceful shutdown on SIGTERM.
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use meridian_agent::state::StateStore;
use meridian_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use meridian_proto::v1::local_routing_service_client::LocalRoutingServiceClient;
use meridian_proto::v1::{
    AgentMessage, ControlMessage, FunctionRoute, GetRoutesRequest, RoutingTable, WatchRoutesRequest,
};
use tonic::{Request, Response, Status, Streaming};

const AGENT: &str = env!("CARGO_BIN_EXE_meridian-agent");

/// The agent's stderr, line by line, from a reader thread.
struct Agent {
    child: Child,
    lines: std_mpsc::Receiver<String>,
}

impl Agent {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(AGENT)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("agent: {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// Waits for a log line containing `needle` and returns it.
    fn wait_for(&self, needle: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("no log line containing {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    fn wait_exit(&mut self) -> i32 {
        for _ in 0..100 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.child.kill().unwrap();
        panic!("agent did not exit within 10 s");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago (nothing listens on it).
fn dead_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

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
    let mut agent = Agent::start(&[
        "--region",
        "us-east",
        "--state-dir",
        state_dir,
        "--listen",
        "127.0.0.1:0",
        "--control-plane",
        &cp,
    ]);
    let line = agent.wait_for("serving local routing API on ");
    let addr = line.rsplit(' ').next().unwrap().to_owned();

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = LocalRoutingServiceClient::new(channel);
    let table = client.get(GetRoutesRequest {}).await.unwrap().into_inner();
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
    let pid = agent.child.id().to_string();
    let started = Instant::now();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
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
    let mut agent = Agent::start(&[
        "--region",
        "us-east",
        "--state-dir",
        dir.path().to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--control-plane",
        &cp,
    ]);
    agent.wait_for("hello.gateway: must be host:port");
    let code = tokio::task::spawn_blocking(move || agent.wait_exit())
        .await
        .unwrap();
    assert_eq!(code, 2);
}
