//! The real `meridianctl` binary against in-process stand-ins for the control plane's
//! FunctionService, MeshService and ScaleService and for agents' AgentApiService: apply's
//! validate-everything-first rule, `get instances`, `logs`, `explain`, messages, exit codes.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian_proto::v1 as wire;
use meridian_proto::v1::agent_api_service_server::{AgentApiService, AgentApiServiceServer};
use meridian_proto::v1::control_plane_service_server::{
    ControlPlaneService, ControlPlaneServiceServer,
};
use meridian_proto::v1::function_service_server::{FunctionService, FunctionServiceServer};
use meridian_proto::v1::mesh_service_server::{MeshService, MeshServiceServer};
use meridian_proto::v1::scale_service_server::{ScaleService, ScaleServiceServer};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

#[derive(Default)]
struct State {
    functions: BTreeMap<(String, String), wire::Function>,
    /// (name, dry_run) of every Apply, in order.
    applies: Vec<(String, bool)>,
    revision: i64,
    agents: Vec<wire::AgentStatus>,
    instances: Vec<wire::FunctionInstances>,
}

/// Accepts any spec except those named "bad", and stores them without normalizing.
#[derive(Clone, Default)]
struct Fake {
    state: Arc<Mutex<State>>,
}

type EventStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<wire::FunctionEvent, Status>> + Send>>;

fn ns(namespace: &str) -> String {
    if namespace.is_empty() {
        "default".into()
    } else {
        namespace.into()
    }
}

#[tonic::async_trait]
impl FunctionService for Fake {
    async fn apply(
        &self,
        request: Request<wire::ApplyFunctionRequest>,
    ) -> Result<Response<wire::ApplyFunctionResponse>, Status> {
        let request = request.into_inner();
        let mut spec = request
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: required"))?;
        spec.namespace = ns(&spec.namespace);
        let mut state = self.state.lock().expect("lock");
        state.applies.push((spec.name.clone(), request.dry_run));
        if spec.name == "bad" {
            return Err(Status::invalid_argument(
                "spec.placement.regions[1].maxInstances: must not be below minInstances (3)",
            ));
        }
        let key = (spec.namespace.clone(), spec.name.clone());
        let existing = state.functions.get(&key).cloned();
        let outcome = match &existing {
            None => wire::ApplyOutcome::Created,
            Some(f) if f.spec.as_ref() == Some(&spec) => wire::ApplyOutcome::Unchanged,
            Some(_) => wire::ApplyOutcome::Configured,
        };
        let mut function = existing.unwrap_or_default();
        if !request.dry_run && outcome != wire::ApplyOutcome::Unchanged {
            state.revision += 1;
            function.version = state.revision;
            if outcome == wire::ApplyOutcome::Created {
                function.created_version = state.revision;
            }
            function.spec = Some(spec);
            state.functions.insert(key, function.clone());
        }
        Ok(Response::new(wire::ApplyFunctionResponse {
            function: Some(function),
            outcome: outcome as i32,
        }))
    }

    async fn get(
        &self,
        request: Request<wire::GetFunctionRequest>,
    ) -> Result<Response<wire::Function>, Status> {
        let request = request.into_inner();
        let state = self.state.lock().expect("lock");
        state
            .functions
            .get(&(ns(&request.namespace), request.name.clone()))
            .cloned()
            .map(Response::new)
            .ok_or_else(|| Status::not_found("not found"))
    }

    async fn list(
        &self,
        request: Request<wire::ListFunctionsRequest>,
    ) -> Result<Response<wire::ListFunctionsResponse>, Status> {
        let request = request.into_inner();
        let state = self.state.lock().expect("lock");
        // Pages of two, so that every listing the CLI makes follows page tokens.
        let start: usize = request.page_token.parse().unwrap_or(0);
        let selected: Vec<wire::Function> = state
            .functions
            .iter()
            .filter(|((namespace, _), _)| {
                request.all_namespaces || *namespace == ns(&request.namespace)
            })
            .map(|(_, f)| f.clone())
            .collect();
        let functions: Vec<wire::Function> = selected.iter().skip(start).take(2).cloned().collect();
        let next = start + functions.len();
        Ok(Response::new(wire::ListFunctionsResponse {
            functions,
            version: state.revision,
            next_page_token: if next < selected.len() {
                next.to_string()
            } else {
                String::new()
            },
        }))
    }

    async fn delete(
        &self,
        request: Request<wire::DeleteFunctionRequest>,
    ) -> Result<Response<wire::DeleteFunctionResponse>, Status> {
        let request = request.into_inner();
        let mut state = self.state.lock().expect("lock");
        match state
            .functions
            .remove(&(ns(&request.namespace), request.name.clone()))
        {
            Some(f) => Ok(Response::new(wire::DeleteFunctionResponse {
                version: f.version,
            })),
            None => Err(Status::not_found("not found")),
        }
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        _request: Request<wire::WatchFunctionsRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("watch"))
    }
}

#[tonic::async_trait]
impl MeshService for Fake {
    async fn list_agents(
        &self,
        request: Request<wire::ListAgentsRequest>,
    ) -> Result<Response<wire::ListAgentsResponse>, Status> {
        let region = request.into_inner().region;
        let state = self.state.lock().expect("lock");
        let agents = state
            .agents
            .iter()
            .filter(|a| region.is_empty() || a.region == region)
            .cloned()
            .collect();
        Ok(Response::new(wire::ListAgentsResponse { agents }))
    }

    async fn get_routing_table(
        &self,
        request: Request<wire::GetRoutingTableRequest>,
    ) -> Result<Response<wire::RoutingTablePage>, Status> {
        let region = request.into_inner().region;
        if region == "us-east" {
            Ok(Response::new(wire::RoutingTablePage {
                table: Some(wire::RoutingTable {
                    version: 7,
                    region,
                    functions: Vec::new(),
                    local_generation: 0,
                }),
                next_page_token: String::new(),
            }))
        } else {
            Err(Status::not_found(format!(
                "region {region:?} has no agents and no function names it"
            )))
        }
    }
}

#[tonic::async_trait]
impl ScaleService for Fake {
    async fn list_instances(
        &self,
        request: Request<wire::ListInstancesRequest>,
    ) -> Result<Response<wire::ListInstancesResponse>, Status> {
        let request = request.into_inner();
        let state = self.state.lock().expect("lock");
        let functions = state
            .instances
            .iter()
            .filter(|f| request.all_namespaces || f.namespace == ns(&request.namespace))
            .filter(|f| request.name.is_empty() || f.name == request.name)
            .cloned()
            .collect();
        Ok(Response::new(wire::ListInstancesResponse {
            functions,
            next_page_token: String::new(),
        }))
    }

    async fn get_leader(
        &self,
        _request: Request<wire::GetLeaderRequest>,
    ) -> Result<Response<wire::GetLeaderResponse>, Status> {
        Ok(Response::new(wire::GetLeaderResponse {
            leader: "cp-test".into(),
            elected_version: 1,
        }))
    }
}

#[tonic::async_trait]
impl ControlPlaneService for Fake {
    async fn list_replicas(
        &self,
        _request: Request<wire::ListReplicasRequest>,
    ) -> Result<Response<wire::ListReplicasResponse>, Status> {
        Ok(Response::new(wire::ListReplicasResponse {
            replicas: vec![
                wire::ReplicaInfo {
                    replica_id: "cp-test".into(),
                    address: "127.0.0.1:7000".into(),
                    started_unix_ms: 1,
                    leader: true,
                },
                wire::ReplicaInfo {
                    replica_id: "cp-spare".into(),
                    address: "127.0.0.1:7001".into(),
                    started_unix_ms: 2,
                    leader: false,
                },
            ],
            leader: "cp-test".into(),
            elected_version: 1,
            skipped_records: Vec::new(),
        }))
    }
}

async fn start() -> (Fake, SocketAddr) {
    let fake = Fake::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tonic::transport::Server::builder()
        .add_service(FunctionServiceServer::new(fake.clone()))
        .add_service(MeshServiceServer::new(fake.clone()))
        .add_service(ScaleServiceServer::new(fake.clone()))
        .add_service(ControlPlaneServiceServer::new(fake.clone()))
        .serve_with_incoming(TcpListenerStream::new(listener));
    tokio::spawn(server);
    (fake, addr)
}

/// Runs meridianctl with `args`, feeding `stdin`, off the runtime's threads.
async fn ctl(addr: &str, args: &[&str], stdin: &str) -> Output {
    let mut all = vec!["--control-plane".to_string(), addr.to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    let stdin = stdin.to_string();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_meridianctl"))
            .args(&all)
            .env_remove("MERIDIAN_CONTROL_PLANE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn meridianctl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("wait")
    })
    .await
    .expect("join")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const GOOD: &str = "\
apiVersion: meridian.dev/v1
kind: Function
metadata: {name: hello, labels: {team: web}}
spec:
  runtime: {external: {regions: [{region: us-east, urls: [\"http://127.0.1.1:9000\"]}]}}
  routing: {timeout: 15s, perTryTimeout: 500ms}
---
apiVersion: meridian.dev/v1
kind: Function
metadata: {name: worker, namespace: batch}
spec:
  runtime: {process: {command: /bin/worker}}
  placement: {regions: [{region: us-east, minInstances: 1, maxInstances: 3}]}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_get_delete_round_trip() {
    let (fake, addr) = start().await;
    let addr = addr.to_string(); // bare host:port

    let out = ctl(&addr, &["apply", "-f", "-"], GOOD).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "function.meridian.dev/hello created\nfunction.meridian.dev/worker created\n"
    );
    // Both documents are validated before either is written.
    assert_eq!(
        fake.state.lock().expect("lock").applies,
        [
            ("hello".to_string(), true),
            ("worker".to_string(), true),
            ("hello".to_string(), false),
            ("worker".to_string(), false),
        ]
    );
    let stored = fake.state.lock().expect("lock").functions.clone();
    let hello = stored[&("default".to_string(), "hello".to_string())]
        .spec
        .clone()
        .expect("spec");
    let routing = hello.routing.expect("routing");
    assert_eq!(routing.timeout_ms, Some(15_000));
    assert_eq!(routing.per_try_timeout_ms, Some(500));
    assert!(stored.contains_key(&("batch".to_string(), "worker".to_string())));

    let changed = GOOD.replace("perTryTimeout: 500ms", "perTryTimeout: 2s");
    let out = ctl(&addr, &["apply", "-f", "-"], &changed).await;
    assert_eq!(
        text(&out.stdout),
        "function.meridian.dev/hello configured\nfunction.meridian.dev/worker unchanged\n"
    );

    let out = ctl(&addr, &["get", "functions", "-A"], "").await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "NAMESPACE   NAME     RUNTIME    REGIONS   VERSION\n\
         batch       worker   process    us-east   2\n\
         default     hello    external   us-east   3\n"
    );

    // What -o yaml prints applies back unchanged.
    let out = ctl(
        &addr,
        &["get", "functions", "-n", "batch", "-o", "yaml"],
        "",
    )
    .await;
    let yaml = text(&out.stdout);
    assert!(yaml.contains("name: worker"), "{yaml}");
    let out = ctl(&addr, &["apply", "-f", "-"], &yaml).await;
    assert_eq!(
        text(&out.stdout),
        "function.meridian.dev/worker unchanged\n",
        "{}",
        text(&out.stderr)
    );

    let out = ctl(&addr, &["get", "function", "hello", "-o", "json"], "").await;
    assert!(text(&out.stdout).contains("\"perTryTimeout\": \"2s\""));

    let out = ctl(&addr, &["delete", "function", "hello"], "").await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), "function.meridian.dev/hello deleted\n");

    let out = ctl(&addr, &["delete", "function", "hello"], "").await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "Error from server (NotFound): function \"hello\" not found in namespace \"default\"\n"
    );

    let out = ctl(&addr, &["get", "functions"], "").await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), "");
    assert_eq!(
        text(&out.stderr),
        "No resources found in default namespace.\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_writes_nothing_when_a_document_is_invalid() {
    let (fake, addr) = start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("fns.yaml");
    let bad = GOOD.replace("name: worker, namespace: batch", "name: bad");
    std::fs::write(&file, format!("{bad}---\n{}", GOOD.replace("hello", "bad"))).expect("write");
    let path = file.to_str().expect("utf-8 path");

    let out = ctl(&format!("http://{addr}"), &["apply", "-f", path], "").await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "");
    let message = "spec.placement.regions[1].maxInstances: must not be below minInstances (3)";
    assert_eq!(
        text(&out.stderr),
        format!(
            "error: {path} document 2 (function \"bad\"): {message}\n\
             error: {path} document 3 (function \"bad\"): {message}\n"
        )
    );
    let state = fake.state.lock().expect("lock");
    assert!(state.applies.iter().all(|(_, dry_run)| *dry_run));
    assert!(state.functions.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_problems_are_reported_before_calling_the_server() {
    let (fake, addr) = start().await;
    let addr = addr.to_string();

    let typo = GOOD.replace("perTryTimeout: 500ms", "perTryTimeout: 500ms, timeoutt: 1s");
    let out = ctl(&addr, &["apply", "-f", "-"], &typo).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with(
            "error: <stdin>: document 1: spec.routing: unknown field `timeoutt`, expected one of"
        ),
        "{}",
        text(&out.stderr)
    );

    let out = ctl(&addr, &["-n", "prod", "apply", "-f", "-"], GOOD).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "error: <stdin> document 2 (function \"worker\"): the namespace from the provided object \
         \"batch\" does not match the namespace \"prod\". You must pass '--namespace=batch' to \
         perform this operation.\n"
    );
    assert!(fake.state.lock().expect("lock").applies.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_views() {
    let (_fake, addr) = start().await;
    let addr = addr.to_string();

    let out = ctl(&addr, &["get", "routes", "us-east"], "").await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        text(&out.stdout),
        "region us-east, version 7\nNo functions are routed in this region.\n"
    );

    let out = ctl(&addr, &["get", "routes", "mars"], "").await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "Error from server (NotFound): region \"mars\" has no agents and no function names it\n"
    );

    let out = ctl(&addr, &["get", "agents"], "").await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stderr), "No agents found\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_control_plane_fails_fast() {
    // A port nobody listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);

    let started = Instant::now();
    let out = ctl(&addr.to_string(), &["get", "functions"], "").await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "error: cannot reach control plane at http://{addr}: "
        )),
        "{stderr}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_meridianctl"))
        .args(["get", "functions", "-o", "wide"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(env!("CARGO_BIN_EXE_meridianctl"))
        .args(["apply"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
}

fn scale(region: &str, agent: &str, desired: u32, ready: u32, error: &str) -> wire::RegionScale {
    wire::RegionScale {
        region: region.into(),
        agent_id: agent.into(),
        desired,
        ready,
        min_instances: 0,
        max_instances: 5,
        reason: "stable: concurrency 12.0 / target 10".into(),
        stable_concurrency: 12.04,
        cold_start_ms: 17,
        error: error.into(),
        ..Default::default()
    }
}

fn worker_instances() -> wire::FunctionInstances {
    wire::FunctionInstances {
        namespace: "batch".into(),
        name: "worker".into(),
        placement: Some(wire::FunctionPlacement {
            namespace: "batch".into(),
            name: "worker".into(),
            function_version: 2,
            regions: vec![wire::RegionBounds {
                region: "us-east".into(),
                min_instances: 0,
                max_instances: 5,
            }],
            problems: vec![wire::PlacementProblem {
                region: "ap-south".into(),
                reason: "minInstances 2 but region ap-south has no agent".into(),
            }],
            leader: "cp-test".into(),
        }),
        regions: vec![
            scale("us-east", "us-east-1", 2, 2, ""),
            scale(
                "us-east",
                "us-east-2",
                1,
                0,
                "CrashLoopBackOff: exit code 1",
            ),
        ],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_describe_instances() {
    let (fake, addr) = start().await;
    let addr = addr.to_string();
    let out = ctl(&addr, &["apply", "-f", "-"], GOOD).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    fake.state
        .lock()
        .expect("lock")
        .instances
        .push(worker_instances());

    let out = ctl(&addr, &["get", "instances", "-A"], "").await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[0].starts_with("NAMESPACE   NAME     REGION     AGENT       DESIRED"));
    assert!(lines[1].contains("ap-south") && lines[1].contains("Not placed"));
    assert!(lines[1].ends_with("minInstances 2 but region ap-south has no agent"));
    assert!(lines[2].contains("us-east-1") && lines[2].contains("Running"));
    assert!(lines[2].contains(" 12.0 ") && lines[2].contains(" 17ms "));
    assert!(
        lines[3].contains("CrashLoopBackOff: exit code 1"),
        "{table}"
    );

    let out = ctl(
        &addr,
        &["-n", "batch", "get", "instances", "worker", "-o", "json"],
        "",
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["functions"][0]["regions"][1]["agentId"], "us-east-2");
    assert_eq!(json["functions"][0]["placement"]["leader"], "cp-test");

    // Not a process function (or no such function): NotFound, exit 1.
    let out = ctl(&addr, &["get", "instances", "hello"], "").await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "Error from server (NotFound): no process function \"hello\" in namespace \"default\"\n"
    );
    let out = ctl(&addr, &["get", "instances"], "").await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        text(&out.stderr),
        "No resources found in default namespace.\n"
    );

    let out = ctl(
        &addr,
        &["-n", "batch", "describe", "function", "worker"],
        "",
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let described = text(&out.stdout);
    for expected in [
        "Scheduled:\n  Leader:            cp-test\n",
        "    ap-south:  minInstances 2 but region ap-south has no agent\n",
        "  us-east (agent us-east-2):\n    Status:          CrashLoopBackOff: exit code 1\n",
    ] {
        assert!(described.contains(expected), "{expected:?} in\n{described}");
    }
    // An external function has no placement or scale sections.
    let out = ctl(&addr, &["describe", "function", "hello"], "").await;
    assert!(!text(&out.stdout).contains("Scheduled:"));
}

/// An agent's AgentApiService: `lines` for function "hello" in any namespace ("quiet" has
/// none, anything else is NOT_FOUND); when following, lines sent on `extra` after the first
/// ones.
#[derive(Clone)]
struct FakeAgent {
    region: String,
    lines: Vec<wire::LogLine>,
    requests: Arc<Mutex<Vec<wire::LogsRequest>>>,
    extra: broadcast::Sender<wire::LogLine>,
}

type LogStream = ReceiverStream<Result<wire::LogLine, Status>>;

#[tonic::async_trait]
impl AgentApiService for FakeAgent {
    type LogsStream = LogStream;

    async fn logs(
        &self,
        request: Request<wire::LogsRequest>,
    ) -> Result<Response<LogStream>, Status> {
        let request = request.into_inner();
        self.requests.lock().expect("lock").push(request.clone());
        let lines = match request.name.as_str() {
            "hello" => self.lines.clone(),
            "quiet" => Vec::new(),
            other => return Err(Status::not_found(format!("function {other:?} not found"))),
        };
        let mut extra = self.extra.subscribe();
        let (sender, receiver) = mpsc::channel(16);
        tokio::spawn(async move {
            for line in lines {
                if sender.send(Ok(line)).await.is_err() {
                    return;
                }
            }
            if request.follow {
                loop {
                    tokio::select! {
                        line = extra.recv() => match line {
                            Ok(line) => if sender.send(Ok(line)).await.is_err() { return },
                            Err(_) => return,
                        },
                        () = sender.closed() => return,
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    /// `hello`: one sidecar explains (us-east routes locally); `quiet`: no sidecar watches.
    async fn explain(
        &self,
        request: Request<wire::ExplainRequest>,
    ) -> Result<Response<wire::ExplainResponse>, Status> {
        let request = request.into_inner();
        let sidecars = match request.name.as_str() {
            "hello" => vec![wire::SidecarExplanation {
                sidecar: "sidecar-15001".into(),
                admin_address: "127.0.1.1:15090".into(),
                explanation: Some(wire::Explanation {
                    region: self.region.clone(),
                    table_version: 7,
                    namespace: request.namespace.clone(),
                    name: request.name.clone(),
                    workload: "none".into(),
                    tiers: vec![wire::ExplainedTier {
                        region: self.region.clone(),
                        local: true,
                        order: "local".into(),
                        priority: Some(0),
                        ready_instances: 1,
                        health_permille: 1000,
                        load_permille: 1000,
                        available: 1,
                        endpoints: vec![wire::ExplainedEndpoint {
                            address: "127.0.1.1:9000".into(),
                            id: "hello-aaaaaa".into(),
                            state: "READY".into(),
                            available: true,
                            ewma_ms: 1.0,
                            ..Default::default()
                        }],
                        note: String::new(),
                    }],
                    decision: Some(wire::ExplainDecision {
                        action: "route".into(),
                        region: self.region.clone(),
                        local: true,
                        candidates: vec!["127.0.1.1:9000".into()],
                        reason: "local tier healthy: 1/1 endpoints available".into(),
                        error: String::new(),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            _ => Vec::new(),
        };
        Ok(Response::new(wire::ExplainResponse {
            region: self.region.clone(),
            sidecars,
        }))
    }
}

fn log_line(region: &str, instance: &str, line: &str) -> wire::LogLine {
    wire::LogLine {
        instance: instance.into(),
        stream: "stdout".into(),
        line: line.into(),
        region: region.into(),
    }
}

async fn start_agent(region: &str, instances: &[&str]) -> (FakeAgent, SocketAddr) {
    let lines = instances
        .iter()
        .flat_map(|i| {
            [
                log_line(region, i, &format!("{i} started")),
                log_line(region, i, &format!("{i} ready")),
            ]
        })
        .collect();
    let agent = FakeAgent {
        region: region.into(),
        lines,
        requests: Arc::default(),
        extra: broadcast::channel(16).0,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentApiServiceServer::new(agent.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (agent, addr)
}

fn agent_status(region: &str, id: &str, api_address: &str) -> wire::AgentStatus {
    wire::AgentStatus {
        agent_id: id.into(),
        region: region.into(),
        api_address: api_address.into(),
        ..Default::default()
    }
}

/// A control plane that lists: us-east-1 and eu-west-1 (fake agents), us-east-2 (its API
/// address refuses connections, as does sa-east-1's) and ap-south-1 (no API address).
async fn start_mesh() -> (Fake, String, FakeAgent, FakeAgent, SocketAddr) {
    let (fake, addr) = start().await;
    let (us_east, us_east_addr) = start_agent("us-east", &["hello-aaaaaa", "hello-bbbbbb"]).await;
    let (eu_west, eu_west_addr) = start_agent("eu-west", &["hello-cccccc"]).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let closed_addr = closed.local_addr().expect("addr");
    drop(closed);
    fake.state.lock().expect("lock").agents = vec![
        agent_status("us-east", "us-east-1", &us_east_addr.to_string()),
        agent_status("us-east", "us-east-2", &closed_addr.to_string()),
        agent_status("eu-west", "eu-west-1", &format!("http://{eu_west_addr}")),
        agent_status("ap-south", "ap-south-1", ""),
        agent_status("sa-east", "sa-east-1", &closed_addr.to_string()),
    ];
    (fake, addr.to_string(), us_east, eu_west, closed_addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_merge_every_agent_and_skip_unreachable_ones() {
    let (_fake, addr, us_east, eu_west, closed) = start_mesh().await;

    let out = ctl(&addr, &["logs", "hello"], "").await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // Agent by agent, in (region, agent) order.
    assert_eq!(
        text(&out.stdout),
        "[eu-west/hello-cccccc] hello-cccccc started\n\
         [eu-west/hello-cccccc] hello-cccccc ready\n\
         [us-east/hello-aaaaaa] hello-aaaaaa started\n\
         [us-east/hello-aaaaaa] hello-aaaaaa ready\n\
         [us-east/hello-bbbbbb] hello-bbbbbb started\n\
         [us-east/hello-bbbbbb] hello-bbbbbb ready\n"
    );
    let stderr = text(&out.stderr);
    let warnings: Vec<&str> = stderr.lines().collect();
    assert_eq!(warnings.len(), 2, "{stderr}");
    for agent in ["sa-east-1 (sa-east)", "us-east-2 (us-east)"] {
        let prefix = format!("warning: agent {agent} at http://{closed}: unreachable: ");
        assert!(
            warnings.iter().any(|w| w.starts_with(&prefix)),
            "{prefix} in {stderr}"
        );
    }
    assert_eq!(
        eu_west.requests.lock().expect("lock").clone(),
        [wire::LogsRequest {
            namespace: "default".into(),
            name: "hello".into(),
            tail_lines: 100,
            follow: false,
            instance: String::new(),
        }]
    );

    // Flags reach the agents of the region asked for, and only those.
    let out = ctl(
        &addr,
        &[
            "-n",
            "prod",
            "logs",
            "hello",
            "--region",
            "us-east",
            "--instance",
            "hello-bbbbbb",
            "--tail",
            "5",
        ],
        "",
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        us_east.requests.lock().expect("lock").last().cloned(),
        Some(wire::LogsRequest {
            namespace: "prod".into(),
            name: "hello".into(),
            tail_lines: 5,
            follow: false,
            instance: "hello-bbbbbb".into(),
        })
    );
    assert_eq!(eu_west.requests.lock().expect("lock").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_errors_are_clear() {
    let (_fake, addr, _us_east, _eu_west, _closed) = start_mesh().await;

    let out = ctl(&addr, &["logs", "nope", "--region", "eu-west"], "").await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "error: no agent in region eu-west has instances of function \"nope\" in namespace \
         \"default\" (running, or exited in the last 10 minutes)\n"
    );

    let out = ctl(&addr, &["logs", "quiet", "--region", "eu-west"], "").await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "");
    assert_eq!(
        text(&out.stderr),
        "No log lines for function default/quiet (1 agent(s) answered).\n"
    );

    let out = ctl(&addr, &["logs", "hello", "--region", "ap-south"], "").await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "error: none of the 1 agent(s) in region ap-south advertises an API address (agent \
         flag --api-address), so no logs can be fetched\n"
    );

    let out = ctl(&addr, &["logs", "hello", "--region", "mars"], "").await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "error: no agents are connected in region mars\n"
    );

    let out = ctl(&addr, &["logs", "hello", "--region", "sa-east"], "").await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("warning: agent sa-east-1 (sa-east) at http://")
            && stderr.ends_with("\nerror: no agent answered (1 asked)\n"),
        "{stderr}"
    );

    // us-east-1 answers; us-east-2 does not: a warning, and the lines of the other.
    let out = ctl(&addr, &["logs", "hello", "--region", "us-east"], "").await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout).lines().count(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_streams_new_lines() {
    let (_fake, addr, us_east, eu_west, _closed) = start_mesh().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_meridianctl"))
        .args([
            "--control-plane",
            &addr,
            "logs",
            "hello",
            "-f",
            "--tail",
            "10",
        ])
        .env_remove("MERIDIAN_CONTROL_PLANE")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn meridianctl");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut next_line = async || {
        tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .expect("a line before the deadline")
            .expect("read")
            .expect("stdout still open")
    };

    // The first lines, in whatever order the two agents' streams interleave.
    let mut first = Vec::new();
    for _ in 0..6 {
        first.push(next_line().await);
    }
    first.sort();
    assert_eq!(first[0], "[eu-west/hello-cccccc] hello-cccccc ready");
    assert_eq!(first[5], "[us-east/hello-bbbbbb] hello-bbbbbb started");

    // Lines written later arrive while the command keeps running.
    for (agent, instance) in [(&us_east, "hello-aaaaaa"), (&eu_west, "hello-cccccc")] {
        agent
            .extra
            .send(log_line(&agent.region, instance, "a new request"))
            .expect("a follower is subscribed");
        assert_eq!(
            next_line().await,
            format!("[{}/{instance}] a new request", agent.region)
        );
    }
    assert!(us_east.requests.lock().expect("lock")[0].follow);
    child.kill().await.expect("kill meridianctl");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_problems_and_exits_0() {
    let (fake, addr) = start().await;
    let addr = addr.to_string();
    let out = ctl(&addr, &["apply", "-f", "-"], GOOD).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    {
        let mut state = fake.state.lock().expect("lock");
        state.instances = vec![worker_instances()];
        state.agents = vec![
            wire::AgentStatus {
                acked_version: 7,
                newest_version: 7,
                in_sync: true,
                replica: "cp-test".into(),
                ..agent_status("us-east", "us-east-1", "127.0.1.1:15003")
            },
            wire::AgentStatus {
                acked_version: 5,
                newest_version: 7,
                in_sync: false,
                replica: "cp-test".into(),
                last_nack: "bad table".into(),
                ..agent_status("us-east", "us-east-2", "127.0.1.2:15003")
            },
        ];
    }

    let out = ctl(&addr, &["status"], "").await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for expected in [
        "Scheduler leader: cp-test (since version 1)",
        "us-east   2        1/2",
        "us-east-2: bad table",
        "batch/worker    process    us-east 2/3 (CrashLoopBackOff: exit code 1)",
        "ap-south not placed: minInstances 2 but region ap-south has no agent",
        "default/hello   external   us-east",
        "\n3 problems: agent us-east-2 (us-east) lagging by 2 versions; ",
        "Replicas:         cp-spare 127.0.0.1:7001 (0 agents)",
        "                   cp-test 127.0.0.1:7000 (leader, 2 agents)",
    ] {
        assert!(stdout.contains(expected), "{expected:?} not in\n{stdout}");
    }

    let out = ctl(&addr, &["status", "-o", "json"], "").await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["controlPlane"]["leader"], "cp-test");
    assert_eq!(json["problems"].as_array().map(Vec::len), Some(3));

    let out = ctl(&addr, &["-n", "batch", "status", "-o", "yaml"], "").await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("name: worker"), "{stdout}");
    assert!(
        !stdout.contains("name: hello"),
        "-n scopes the functions\n{stdout}"
    );

    // Unreachable: the only failure.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let gone = listener.local_addr().expect("addr").to_string();
    drop(listener);
    let out = ctl(&gone, &["status"], "").await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("error: cannot reach control plane at "),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_asks_the_regions_agents_and_names_what_is_missing() {
    let (fake, addr, _us_east, _eu_west, closed) = start_mesh().await;
    for name in ["hello", "quiet"] {
        let spec = wire::FunctionSpec {
            name: name.into(),
            namespace: "default".into(),
            ..Default::default()
        };
        fake.state.lock().expect("lock").functions.insert(
            ("default".into(), name.into()),
            wire::Function {
                spec: Some(spec),
                version: 1,
                ..Default::default()
            },
        );
    }

    let out = ctl(&addr, &["explain", "--from", "eu-west", "hello"], "").await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.ends_with(
            "Next request → eu-west (local) because local tier healthy: 1/1 endpoints \
             available\n  candidates: 127.0.1.1:9000\n"
        ),
        "{stdout}"
    );

    let out = ctl(
        &addr,
        &["explain", "--from", "eu-west", "hello", "-o", "json"],
        "",
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        json["agents"][0]["sidecars"][0]["explanation"]["next"]["region"],
        "eu-west"
    );

    // us-east-2 is unreachable: shown, but us-east-1 explains, so the command succeeds.
    let out = ctl(&addr, &["explain", "--from", "us-east", "hello"], "").await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!(
            "agent us-east-2 at http://{closed}: unreachable: "
        )),
        "{}",
        text(&out.stdout)
    );

    let out = ctl(&addr, &["explain", "--from", "eu-west", "nope"], "").await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "Error from server (NotFound): function \"nope\" not found in namespace \"default\"\n"
    );

    let out = ctl(&addr, &["explain", "--from", "mars", "hello"], "").await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "error: no agent is connected in region \"mars\" (regions with agents: ap-south, \
         eu-west, sa-east, us-east)\n"
    );

    let out = ctl(&addr, &["explain", "--from", "ap-south", "hello"], "").await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "error: none of the 1 agent(s) in region ap-south advertises an API address (agent \
         flag --api-address), so none can be asked\n"
    );

    let out = ctl(&addr, &["explain", "--from", "eu-west", "quiet"], "").await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("no sidecar is watching this agent, so none can explain"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(
        text(&out.stderr),
        "error: no sidecar in region eu-west could explain default/quiet\n"
    );
}
