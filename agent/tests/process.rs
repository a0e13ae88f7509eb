//! The agent running `process` functions for real, with this test binary as the function (see
//! [`fake_function`]): instances from a persisted table without any control plane, the served
//! table's overlay and generations, scale-up from sidecar load, drain on scale-down, logs,
//! activation, what the control plane hears (API address, instances, scale), and no instance
//! left behind after SIGTERM.
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use meridian_agent::state::StateStore;
use meridian_proto::updates::TableReceiver;
use meridian_proto::v1::agent_api_service_client::AgentApiServiceClient;
use meridian_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use meridian_proto::v1::load_service_client::LoadServiceClient;
use meridian_proto::v1::local_routing_service_client::LocalRoutingServiceClient;
use meridian_proto::v1::{
    agent_message, control_message, local_workload, ActivateRequest, AgentMessage, ControlMessage,
    EndpointLoad, EndpointState, FunctionLoad, FunctionRef, FunctionRoute, LoadReport,
    LocalWorkload, LogsRequest, ProcessRuntime, RoutingTable, RoutingUpdate, ScaleBounds, Tier,
    WatchRoutesRequest,
};
use support::{dead_port, Agent};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

/// Not a test: when the agent's runtime spawns this test binary as a function instance
/// (`MERIDIAN_FUNCTION` is set), it answers every HTTP request on `HOST:PORT` with 200 until it
/// is killed. Run by the test harness itself, it returns at once.
#[test]
fn fake_function() {
    let Ok(function) = std::env::var("MERIDIAN_FUNCTION") else {
        return;
    };
    let host = std::env::var("HOST").unwrap();
    let port: u16 = std::env::var("PORT").unwrap().parse().unwrap();
    let instance = std::env::var("INSTANCE_ID").unwrap();
    let listener = std::net::TcpListener::bind((host.as_str(), port)).unwrap();
    println!("fake function {function} instance {instance} listening on {host}:{port}");
    eprintln!("fake function {instance}: a line on stderr");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        std::thread::spawn(move || {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        });
    }
}

/// How the agent runs this binary as the fake function: its copy in the allowed command root.
fn fake_process() -> ProcessRuntime {
    ProcessRuntime {
        command: support::test_binary_command(),
        args: [
            "fake_function",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ]
        .map(String::from)
        .to_vec(),
        env: Default::default(),
        readiness_path: "/healthz".into(),
    }
}

fn process_route(name: &str, min: u32, max: u32) -> FunctionRoute {
    FunctionRoute {
        namespace: "default".into(),
        name: name.into(),
        function_version: 1,
        workload: Some(LocalWorkload {
            kind: Some(local_workload::Kind::Process(fake_process())),
            scale: Some(ScaleBounds {
                min_instances: min,
                max_instances: max,
                target_concurrency: 10,
                idle_seconds: 30,
            }),
        }),
        ..Default::default()
    }
}

/// Agent flags for `state_dir` with fast autoscaler windows.
fn agent_args<'a>(state_dir: &'a str, control_plane: &'a str) -> Vec<&'a str> {
    let mut args = support::agent_args(state_dir, control_plane);
    args.extend([
        "--stable-window-secs",
        "2",
        "--panic-window-secs",
        "1",
        "--stop-grace-secs",
        "2",
    ]);
    args
}

/// The local tier of `name` in `table`.
fn local_tier<'a>(table: &'a RoutingTable, name: &str) -> &'a Tier {
    let route = table.functions.iter().find(|f| f.name == name).unwrap();
    route.tiers.iter().find(|t| t.local).unwrap()
}

fn count(tier: &Tier, state: EndpointState) -> usize {
    tier.endpoints
        .iter()
        .filter(|e| e.state == state as i32)
        .count()
}

/// Served tables, checked to grow in generation, until one satisfies `done`.
struct Tables {
    stream: Streaming<RoutingUpdate>,
    receiver: TableReceiver,
    last_generation: u64,
}

impl Tables {
    async fn open(channel: Channel) -> Self {
        let mut client = LocalRoutingServiceClient::new(channel);
        let request = WatchRoutesRequest {
            client: "test".into(),
        };
        let stream = client.watch(request).await.unwrap().into_inner();
        Self {
            stream,
            receiver: TableReceiver::default(),
            last_generation: 0,
        }
    }

    async fn until(&mut self, what: &str, done: impl Fn(&RoutingTable) -> bool) -> RoutingTable {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let next = tokio::time::timeout_at(deadline, self.stream.message()).await;
            let part = next
                .unwrap_or_else(|_| panic!("no served table with {what} within 20 s"))
                .unwrap()
                .unwrap();
            let Some(table) = self.receiver.push(part).unwrap().cloned() else {
                continue;
            };
            assert!(
                table.local_generation > self.last_generation,
                "generation went from {} to {}",
                self.last_generation,
                table.local_generation
            );
            self.last_generation = table.local_generation;
            if done(&table) {
                return table;
            }
        }
    }
}

fn load_report(generation: u64, concurrency: f64, in_flight: &[&str]) -> LoadReport {
    LoadReport {
        client: "sidecar-1".into(),
        table_version: 42,
        local_generation: generation,
        window_ms: 1000,
        functions: vec![FunctionLoad {
            namespace: "default".into(),
            name: "f".into(),
            average_concurrency: concurrency,
            requests: (concurrency * 10.0) as u64,
            held: 0,
            endpoints: in_flight
                .iter()
                .map(|id| EndpointLoad {
                    id: (*id).into(),
                    in_flight: 1,
                })
                .collect(),
        }],
    }
}

fn http_get(address: &str) -> String {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: f\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

// Multi-threaded: the test blocks on the agent's log while gRPC streams stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_scales_drains_and_stops_instances_without_a_control_plane() {
    let dir = support::state_dir();
    StateStore::open(dir.path())
        .unwrap()
        .save(&RoutingTable {
            version: 42,
            region: "us-east".into(),
            local_generation: 0,
            functions: vec![process_route("f", 1, 3)],
        })
        .unwrap();
    let cp = format!("http://127.0.0.1:{}", dead_port());
    let state_dir = dir.path().to_str().unwrap();
    let mut agent = Agent::start(&agent_args(state_dir, &cp));
    let channel = agent.connect().await;
    let mut tables = Tables::open(channel.clone()).await;

    // Min instances run from the persisted table alone; the served table has the instance,
    // READY, in a local tier the control plane never sent, and its learned cold start.
    let table = tables
        .until("one READY instance", |t| {
            count(local_tier(t, "f"), EndpointState::Ready) == 1
        })
        .await;
    assert_eq!(table.version, 42);
    let route = &table.functions[0];
    assert!(route.cold_start_ms > 0);
    let tier = local_tier(&table, "f");
    assert_eq!(tier.region, "us-east");
    assert_eq!(tier.ready_instances, 1);
    let first = tier.endpoints[0].clone();
    assert!(
        first.id.starts_with("f-") && first.id.len() == 8,
        "{}",
        first.id
    );
    assert!(first.address.starts_with("127.0.0.1:"), "{}", first.address);
    assert!(http_get(&first.address).starts_with("HTTP/1.1 200"));

    // Its output, through the agent's API.
    let mut logs = AgentApiServiceClient::new(channel.clone());
    let request = LogsRequest {
        namespace: "default".into(),
        name: "f".into(),
        ..Default::default()
    };
    let mut stream = logs.logs(request).await.unwrap().into_inner();
    let mut lines = Vec::new();
    while let Some(line) = stream.message().await.unwrap() {
        assert_eq!(line.region, "us-east");
        lines.push(format!("{} {}: {}", line.instance, line.stream, line.line));
    }
    let started = format!("listening on {}", first.address);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&first.id) && l.contains(&started)),
        "{lines:?}"
    );

    // A sidecar reports concurrency 25 on one instance of target 10: panic, up to the max 3.
    let mut load = LoadServiceClient::new(channel.clone());
    let generation = tables.last_generation;
    load.report_load(load_report(generation, 25.0, &[]))
        .await
        .unwrap();
    let table = tables
        .until("three READY instances", |t| {
            count(local_tier(t, "f"), EndpointState::Ready) == 3
        })
        .await;
    let ids: Vec<String> = local_tier(&table, "f")
        .endpoints
        .iter()
        .map(|e| e.id.clone())
        .collect();

    // The load stops. Two instances go: DRAINING first. The sidecar keeps reporting, with a
    // request in flight to every instance until it has seen them draining.
    let drained_from = tables.last_generation;
    let reporter = {
        let mut load = load.clone();
        let ids = ids.clone();
        let (generations, mut latest) = tokio::sync::watch::channel(drained_from);
        let task = tokio::spawn(async move {
            loop {
                let generation = *latest.borrow_and_update();
                let busy: Vec<&str> = if generation == drained_from {
                    ids.iter().map(String::as_str).collect()
                } else {
                    Vec::new()
                };
                load.report_load(load_report(generation, 0.0, &busy))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        (generations, task)
    };
    let table = tables
        .until("two DRAINING instances", |t| {
            count(local_tier(t, "f"), EndpointState::Draining) == 2
        })
        .await;
    assert_eq!(local_tier(&table, "f").ready_instances, 1);
    let drain_started = Instant::now();
    reporter.0.send_replace(table.local_generation);
    let table = tables
        .until("one instance left", |t| {
            local_tier(t, "f").endpoints.len() == 1
        })
        .await;
    // The drain gate opened on the sidecar's report, long before the 30 s drain timeout.
    assert!(drain_started.elapsed() < Duration::from_secs(10));
    let survivor = local_tier(&table, "f").endpoints[0].clone();
    assert_eq!(survivor.state, EndpointState::Ready as i32);
    reporter.1.abort();

    // Activation of a function that has an instance: answered with what runs.
    let answer = load
        .activate(ActivateRequest {
            client: "sidecar-1".into(),
            namespace: "default".into(),
            name: "f".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.instances, 1);

    // SIGTERM: the instance is stopped before the agent exits.
    drop(tables);
    agent.terminate();
    let code = tokio::task::spawn_blocking(move || agent.wait_exit())
        .await
        .unwrap();
    assert_eq!(code, 0);
    assert!(TcpStream::connect(&survivor.address).is_err());
    let records = std::fs::read_to_string(dir.path().join("instances.json")).unwrap();
    assert!(!records.contains(&survivor.id), "{records}");
}

/// A control plane that pushes what the test sends it and hands the test what the agent says.
struct ScriptedCp {
    updates: std::sync::Mutex<Option<mpsc::Receiver<RoutingUpdate>>>,
    heard: mpsc::UnboundedSender<agent_message::Kind>,
}

#[tonic::async_trait]
impl AgentService for ScriptedCp {
    type ConnectStream = futures::stream::BoxStream<'static, Result<ControlMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = request.into_inner();
        let heard = self.heard.clone();
        tokio::spawn(async move {
            while let Ok(Some(AgentMessage { kind: Some(kind) })) = inbound.message().await {
                if heard.send(kind).is_err() {
                    break;
                }
            }
        });
        let Some(updates) = self.updates.lock().unwrap().take() else {
            return Err(Status::unavailable("one stream only"));
        };
        let stream = futures::StreamExt::map(ReceiverStream::new(updates), |update| {
            Ok(ControlMessage {
                kind: Some(control_message::Kind::Update(update)),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The next message the agent sent that `pick` accepts, within 20 s.
async fn hear<T>(
    heard: &mut mpsc::UnboundedReceiver<agent_message::Kind>,
    what: &str,
    pick: impl Fn(agent_message::Kind) -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let kind = tokio::time::timeout_at(deadline, heard.recv())
            .await
            .unwrap_or_else(|_| panic!("the control plane did not hear {what} within 20 s"))
            .unwrap();
        if let Some(found) = pick(kind) {
            return found;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_hears_api_address_instances_and_scale() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cp = format!("http://{}", listener.local_addr().unwrap());
    let (updates, updates_rx) = mpsc::channel(4);
    let (heard_tx, mut heard) = mpsc::unbounded_channel();
    let service = ScriptedCp {
        updates: std::sync::Mutex::new(Some(updates_rx)),
        heard: heard_tx,
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(service))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let dir = support::state_dir();
    let mut args = agent_args(dir.path().to_str().unwrap(), &cp);
    args.extend(["--api-address", "127.0.0.1:7999"]);
    let _agent = Agent::start(&args);

    let hello = hear(&mut heard, "a hello", |kind| match kind {
        agent_message::Kind::Hello(hello) => Some(hello),
        _ => None,
    })
    .await;
    assert_eq!(hello.api_address, "127.0.0.1:7999");

    updates
        .send(RoutingUpdate {
            version: 5,
            full: true,
            region: "us-east".into(),
            functions: vec![process_route("f", 1, 2)],
            ..Default::default()
        })
        .await
        .unwrap();
    let endpoints = hear(&mut heard, "a READY instance", |kind| match kind {
        agent_message::Kind::Endpoints(report) => report
            .functions
            .into_iter()
            .find(|f| f.name == "f")
            .filter(|f| {
                f.endpoints
                    .iter()
                    .any(|e| e.state == EndpointState::Ready as i32)
            }),
        _ => None,
    })
    .await;
    assert_eq!(endpoints.endpoints.len(), 1);
    let instance = endpoints.endpoints[0].clone();
    assert_eq!(instance.zone, "us-east-a");

    let scale = hear(
        &mut heard,
        "a scale report with it ready",
        |kind| match kind {
            agent_message::Kind::Scale(report) => report
                .functions
                .into_iter()
                .find(|f| f.name == "f")
                .and_then(|f| f.scale)
                .filter(|s| s.ready == 1),
            _ => None,
        },
    )
    .await;
    assert_eq!(scale.region, "us-east");
    assert_eq!(scale.agent_id, "us-east-1");
    assert_eq!(
        (scale.desired, scale.min_instances, scale.max_instances),
        (1, 1, 2)
    );
    assert_eq!(scale.reason, "min instances 1");
    assert!(scale.cold_start_ms > 0);
    assert_eq!(scale.instances.len(), 1);
    assert_eq!(scale.instances[0].id, instance.id);
    assert!(scale.instances[0].pid > 0);

    // The function leaves the table: its instance is drained (no sidecar reports, so at once)
    // and the reports say it is gone.
    updates
        .send(RoutingUpdate {
            version: 6,
            base_version: 5,
            region: "us-east".into(),
            removed: vec![FunctionRef {
                namespace: "default".into(),
                name: "f".into(),
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    hear(&mut heard, "an empty scale report", |kind| match kind {
        agent_message::Kind::Scale(report) if report.functions.is_empty() => Some(()),
        _ => None,
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(&instance.address).is_ok() {
        assert!(Instant::now() < deadline, "the removed instance still runs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
