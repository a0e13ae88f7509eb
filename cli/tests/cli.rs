//! The real `meridianctl` binary against an in-process stand-in for the control plane's
//! FunctionService and MeshService: apply's validate-everything-first rule, messages, exit codes.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian_proto::v1 as wire;
use meridian_proto::v1::function_service_server::{FunctionService, FunctionServiceServer};
use meridian_proto::v1::mesh_service_server::{MeshService, MeshServiceServer};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

#[derive(Default)]
struct State {
    functions: BTreeMap<(String, String), wire::Function>,
    /// (name, dry_run) of every Apply, in order.
    applies: Vec<(String, bool)>,
    revision: i64,
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
        let functions = state
            .functions
            .iter()
            .filter(|((namespace, _), _)| {
                request.all_namespaces || *namespace == ns(&request.namespace)
            })
            .map(|(_, f)| f.clone())
            .collect();
        Ok(Response::new(wire::ListFunctionsResponse {
            functions,
            version: state.revision,
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
        _request: Request<wire::ListAgentsRequest>,
    ) -> Result<Response<wire::ListAgentsResponse>, Status> {
        Ok(Response::new(wire::ListAgentsResponse::default()))
    }

    async fn get_routing_table(
        &self,
        request: Request<wire::GetRoutingTableRequest>,
    ) -> Result<Response<wire::RoutingTable>, Status> {
        let region = request.into_inner().region;
        if region == "us-east" {
            Ok(Response::new(wire::RoutingTable {
                version: 7,
                region,
                functions: Vec::new(),
                local_generation: 0,
            }))
        } else {
            Err(Status::not_found(format!(
                "region {region:?} has no agents and no function names it"
            )))
        }
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
