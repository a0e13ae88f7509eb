//! The `meridian-agent` binary on its own (no real control plane): flag errors, the command policy
//! refusing to start (root without `--run-as`, `--run-as root`, a missing command root), static
//! stability (a persisted table is served with no control plane reachable), the exit code of a
//! refused Hello, and graceful shutdown on SIGTERM.
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

use support::{agent_args, dead_port, running_as_root, Agent, AGENT, RUN_AS};

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

/// Runs the agent with `args` after `--region us-east`; it must exit 2 at once (before it
/// touches any state dir or port). Returns its stderr.
fn exits_2(args: &[&str]) -> String {
    let output = Command::new(AGENT)
        .args([
            "--region",
            "us-east",
            "--state-dir",
            "/nonexistent/meridian-state",
        ])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    stderr
}

#[test]
fn a_root_agent_without_run_as_refuses_to_start() {
    if !running_as_root() {
        eprintln!("skipped: only an agent running as root must refuse to start without --run-as");
        return;
    }
    let stderr = exits_2(&["--allowed-command-root", "/usr/bin"]);
    assert!(stderr.contains("give --run-as USER"), "{stderr}");
    // The environment variable counts as the flag.
    let output = Command::new(AGENT)
        .args([
            "--region",
            "us-east",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "none",
        ])
        .args(["--state-dir", "/nonexistent/meridian-state"])
        .env("MERIDIAN_RUN_AS", "root")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("invalid --run-as \"root\""), "{stderr}");
}

#[test]
fn run_as_root_is_refused_by_name_and_by_uid() {
    for user in ["root", "0"] {
        let stderr = exits_2(&["--run-as", user]);
        assert!(
            stderr.contains("invalid --run-as") && stderr.contains("never run as root"),
            "{stderr}"
        );
    }
    let stderr = exits_2(&["--run-as", "no-such-user-meridian"]);
    assert!(stderr.contains("no such user"), "{stderr}");
}

#[test]
fn an_unprivileged_agent_cannot_run_instances_as_someone_else() {
    if running_as_root() {
        eprintln!("skipped: the tests run as root, which may run instances as another user");
        return;
    }
    let me = nix::unistd::geteuid();
    let other = ["nobody", "daemon", "bin"]
        .into_iter()
        .find(|name| {
            nix::unistd::User::from_name(name)
                .ok()
                .flatten()
                .is_some_and(|user| user.uid != me && !user.uid.is_root())
        })
        .unwrap();
    let stderr = exits_2(&["--run-as", other]);
    assert!(stderr.contains("not as root"), "{stderr}");
}

#[test]
fn a_missing_command_root_is_a_start_up_error_naming_it() {
    let mut args = vec![
        "--allowed-command-root",
        "/usr/bin,/nonexistent/meridian-functions",
    ];
    if running_as_root() {
        args.extend(["--run-as", RUN_AS]);
    }
    let stderr = exits_2(&args);
    assert!(
        stderr.contains("invalid --allowed-command-root /nonexistent/meridian-functions"),
        "{stderr}"
    );
}

// Multi-threaded: the client must keep answering (GOAWAY) while the test blocks on the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_persisted_table_without_control_plane_and_stops_on_sigterm() {
    let dir = support::state_dir();
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
