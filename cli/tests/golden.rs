//! Golden tests of everything meridianctl prints: fixed wire values in, text compared with
//! `tests/golden/*.txt`. Run with `UPDATE_GOLDEN=1` to rewrite the files after an intended change
//! (and review the diff).

use std::collections::HashMap;
use std::path::PathBuf;

use meridian_proto::v1 as wire;
use meridianctl::instances::{self, ScaleSection};
use meridianctl::manifest;
use meridianctl::output::{self, RegionRoutes, RoutesSection};
use meridianctl::status::{self, StatusInput};

/// 2026-11-25T12:00:00Z, the `now` every rendering uses.
const NOW_MS: i64 = 1_795_608_000_000;

fn check(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var("UPDATE_GOLDEN").as_deref() == Ok("1") {
        std::fs::create_dir_all(path.parent().expect("golden dir")).expect("create golden dir");
        std::fs::write(&path, actual).expect("write golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}); run with UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    assert!(
        actual == expected,
        "{name} differs from {} (UPDATE_GOLDEN=1 rewrites it)\n--- expected\n{expected}--- actual\n{actual}---",
        path.display()
    );
}

fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn routing(
    timeout_ms: u32,
    per_try_ms: u32,
    retries: u32,
    failover: &[&str],
) -> wire::RoutingPolicy {
    wire::RoutingPolicy {
        timeout_ms: Some(timeout_ms),
        per_try_timeout_ms: Some(per_try_ms),
        max_retries: Some(retries),
        retryable_methods: strings(&["POST"]),
        failover_order: strings(failover),
    }
}

fn scaling(min: u32, max: u32) -> wire::Scaling {
    wire::Scaling {
        min_instances: Some(min),
        max_instances: Some(max),
        target_concurrency: Some(10),
        idle_seconds: Some(300),
    }
}

/// Normalized, as the server returns them.
fn functions() -> Vec<wire::Function> {
    vec![
        wire::Function {
            spec: Some(wire::FunctionSpec {
                name: "worker".into(),
                namespace: "batch".into(),
                labels: map(&[("team", "data"), ("tier", "batch")]),
                runtime: Some(wire::function_spec::Runtime::Process(
                    wire::ProcessRuntime {
                        command: "/usr/local/bin/worker".into(),
                        args: strings(&["--port", "8080", "--greeting", "hello world"]),
                        env: map(&[("MODE", "fast"), ("LOG", "info")]),
                        readiness_path: "/healthz".into(),
                    },
                )),
                placement: Some(wire::Placement {
                    all_regions: false,
                    regions: vec![
                        wire::RegionPlacement {
                            region: "us-east".into(),
                            min_instances: Some(1),
                            max_instances: Some(3),
                        },
                        wire::RegionPlacement {
                            region: "eu-west".into(),
                            min_instances: Some(0),
                            max_instances: Some(10),
                        },
                    ],
                }),
                scaling: Some(scaling(1, 10)),
                routing: Some(wire::RoutingPolicy {
                    retryable_methods: Vec::new(),
                    ..routing(30_000, 500, 0, &[])
                }),
            }),
            version: 214,
            created_version: 180,
        },
        wire::Function {
            spec: Some(wire::FunctionSpec {
                name: "hello".into(),
                namespace: "default".into(),
                labels: map(&[("team", "web")]),
                runtime: Some(wire::function_spec::Runtime::External(
                    wire::ExternalRuntime {
                        regions: vec![
                            wire::ExternalRegion {
                                region: "us-east".into(),
                                urls: strings(&["http://127.0.1.1:9000", "http://127.0.1.1:9001"]),
                            },
                            wire::ExternalRegion {
                                region: "eu-west".into(),
                                urls: strings(&["http://127.0.2.1:9000"]),
                            },
                        ],
                    },
                )),
                placement: Some(wire::Placement {
                    all_regions: true,
                    regions: Vec::new(),
                }),
                scaling: Some(scaling(0, 10)),
                routing: Some(routing(15_000, 5_000, 2, &["eu-west", "ap-south"])),
            }),
            version: 231,
            created_version: 97,
        },
        wire::Function {
            spec: Some(wire::FunctionSpec {
                name: "api".into(),
                namespace: "default".into(),
                labels: HashMap::new(),
                runtime: Some(wire::function_spec::Runtime::Process(
                    wire::ProcessRuntime {
                        command: "/srv/api".into(),
                        ..Default::default()
                    },
                )),
                placement: Some(wire::Placement {
                    all_regions: true,
                    regions: Vec::new(),
                }),
                scaling: Some(scaling(0, 10)),
                routing: Some(routing(120_000, 1_500, 1, &[])),
            }),
            version: 12,
            created_version: 12,
        },
    ]
}

fn agents() -> wire::ListAgentsResponse {
    let agent = |region: &str, id: &str, zone: &str| wire::AgentStatus {
        api_address: String::new(),
        agent_id: id.into(),
        region: region.into(),
        zone: zone.into(),
        cloud: "local".into(),
        gateway: format!("127.0.{}.1:15002", if region == "us-east" { 1 } else { 2 }),
        connected_since_unix_ms: NOW_MS - 303_000,
        acked_version: 231,
        newest_version: 231,
        in_sync: true,
        last_nack: String::new(),
        replica: "cp-7000".into(),
        ..Default::default()
    };
    let sidecar = |name: &str, loaded: i64, error: &str| wire::SidecarStatus {
        sidecar: name.into(),
        connected: true,
        loaded_version: loaded,
        error: error.into(),
        updated_unix_ms: NOW_MS - 2_000,
        ..Default::default()
    };
    wire::ListAgentsResponse {
        agents: vec![
            wire::AgentStatus {
                sidecars: vec![sidecar("sidecar-c", 214, "")],
                connected_since_unix_ms: NOW_MS - 7_800_000,
                acked_version: 214,
                in_sync: false,
                last_nack: "delta base 200 does not match held version 214".into(),
                replica: "cp-7001".into(),
                ..agent("us-east", "us-east-2", "us-east-b")
            },
            wire::AgentStatus {
                api_address: "127.0.1.1:15003".into(),
                in_sync: false,
                sidecars_in_sync: 1,
                sidecars: vec![
                    sidecar("sidecar-a", 231, ""),
                    wire::SidecarStatus {
                        failed_version: 231,
                        ..sidecar(
                            "sidecar-b",
                            229,
                            "functions[2].tiers[0].endpoints[0].address: \"not an address\" is not host:port",
                        )
                    },
                ],
                ..agent("us-east", "us-east-1", "us-east-a")
            },
            wire::AgentStatus {
                connected_since_unix_ms: NOW_MS - 4_000,
                acked_version: 0,
                in_sync: false,
                ..agent("eu-west", "eu-west-1", "eu-west-a")
            },
        ],
    }
}

fn endpoint(address: &str, id: &str, state: wire::EndpointState, zone: &str) -> wire::Endpoint {
    wire::Endpoint {
        address: address.into(),
        id: id.into(),
        state: state as i32,
        zone: zone.into(),
    }
}

fn routes() -> wire::RoutingTable {
    use wire::EndpointState::{Draining, Ready, Starting};
    wire::RoutingTable {
        local_generation: 0,
        version: 231,
        region: "us-east".into(),
        functions: vec![
            wire::FunctionRoute {
                cold_start_ms: 42,
                local_failed_starts: 0,
                local_restart_backoff: false,
                namespace: "batch".into(),
                name: "worker".into(),
                function_version: 214,
                policy: Some(routing(30_000, 500, 0, &[])),
                tiers: vec![wire::Tier {
                    region: "us-east".into(),
                    local: true,
                    endpoints: vec![
                        endpoint("127.0.1.1:20001", "worker-1", Ready, "us-east-a"),
                        endpoint("127.0.1.1:20002", "worker-2", Starting, "us-east-a"),
                        endpoint("127.0.1.1:20003", "worker-3", Draining, "us-east-b"),
                    ],
                    order: wire::TierOrder::Local as i32,
                    ready_instances: 1,
                }],
                workload: Some(wire::LocalWorkload {
                    scale: Some(wire::ScaleBounds {
                        min_instances: 1,
                        max_instances: 3,
                        target_concurrency: 10,
                        idle_seconds: 300,
                    }),
                    kind: Some(wire::local_workload::Kind::Process(wire::ProcessRuntime {
                        command: "/usr/local/bin/worker".into(),
                        args: strings(&["--port", "8080"]),
                        env: map(&[("MODE", "fast")]),
                        readiness_path: "/healthz".into(),
                    })),
                }),
            },
            wire::FunctionRoute {
                cold_start_ms: 0,
                local_failed_starts: 0,
                local_restart_backoff: false,
                namespace: "default".into(),
                name: "hello".into(),
                function_version: 231,
                policy: Some(routing(15_000, 5_000, 2, &["eu-west", "ap-south"])),
                tiers: vec![
                    wire::Tier {
                        region: "us-east".into(),
                        local: true,
                        endpoints: vec![
                            endpoint("127.0.1.1:9000", "ext-1b3c5d7e9f0a2b4c", Ready, "us-east-a"),
                            endpoint("127.0.1.1:9001", "ext-0a1b2c3d4e5f6a7b", Ready, "us-east-a"),
                        ],
                        order: wire::TierOrder::Local as i32,
                        ready_instances: 2,
                    },
                    wire::Tier {
                        region: "eu-west".into(),
                        local: false,
                        endpoints: vec![endpoint(
                            "127.0.2.1:15002",
                            "eu-west-1",
                            Ready,
                            "eu-west-a",
                        )],
                        order: wire::TierOrder::Explicit as i32,
                        ready_instances: 1,
                    },
                    wire::Tier {
                        region: "ap-south".into(),
                        local: false,
                        endpoints: Vec::new(),
                        order: wire::TierOrder::Explicit as i32,
                        ready_instances: 0,
                    },
                    wire::Tier {
                        region: "sa-east".into(),
                        local: false,
                        endpoints: vec![endpoint(
                            "127.0.4.1:15002",
                            "sa-east-1",
                            Ready,
                            "sa-east-a",
                        )],
                        order: wire::TierOrder::Measured as i32,
                        ready_instances: 3,
                    },
                ],
                workload: Some(wire::LocalWorkload {
                    scale: None,
                    kind: Some(wire::local_workload::Kind::External(wire::ExternalRegion {
                        region: "us-east".into(),
                        urls: strings(&["http://127.0.1.1:9000", "http://127.0.1.1:9001"]),
                    })),
                }),
            },
            wire::FunctionRoute {
                cold_start_ms: 0,
                local_failed_starts: 0,
                local_restart_backoff: false,
                namespace: "default".into(),
                name: "idle".into(),
                function_version: 40,
                policy: None,
                tiers: Vec::new(),
                workload: None,
            },
        ],
    }
}

fn default_namespace(functions: Vec<wire::Function>) -> Vec<wire::Function> {
    functions
        .into_iter()
        .filter(|f| f.spec.as_ref().is_some_and(|s| s.namespace == "default"))
        .collect()
}

#[test]
fn get_functions_table() {
    check(
        "get_functions.txt",
        &output::functions_table(&default_namespace(functions()), false),
    );
}

#[test]
fn get_functions_all_namespaces_table() {
    check(
        "get_functions_all_namespaces.txt",
        &output::functions_table(&functions(), true),
    );
}

#[test]
fn get_functions_json() {
    check(
        "get_functions_json.txt",
        &output::functions_json(&functions()).expect("json"),
    );
    check(
        "get_function_json.txt",
        &output::function_json(&functions()[1]).expect("json"),
    );
}

#[test]
fn get_functions_yaml() {
    check(
        "get_functions_yaml.txt",
        &output::functions_yaml(&functions()).expect("yaml"),
    );
}

/// What `get -o json|yaml` prints is what `apply -f` reads: the same specs come back.
#[test]
fn function_output_applies_back() {
    let specs = |functions: &[wire::Function]| {
        let mut specs: Vec<wire::FunctionSpec> =
            functions.iter().filter_map(|f| f.spec.clone()).collect();
        specs.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        specs
    };
    let expected = specs(&functions());
    let json = output::functions_json(&functions()).expect("json");
    let yaml = output::functions_yaml(&functions()).expect("yaml");
    for (file, text) in [("out.json", json), ("out.yaml", yaml)] {
        let documents = manifest::parse(file, &text).expect("re-parses");
        let parsed: Vec<wire::FunctionSpec> = documents
            .iter()
            .map(|d| {
                let namespace = d.manifest.namespace().expect("namespace is written");
                d.manifest.to_spec(namespace)
            })
            .collect();
        assert_eq!(parsed, expected, "{file}");
    }
}

#[test]
fn get_agents_table() {
    check(
        "get_agents.txt",
        &output::agents_table(&agents().agents, NOW_MS),
    );
}

#[test]
fn get_agents_json_and_yaml() {
    check(
        "get_agents_json.txt",
        &output::agents_json(&agents()).expect("json"),
    );
    check(
        "get_agents_yaml.txt",
        &output::agents_yaml(&agents()).expect("yaml"),
    );
}

#[test]
fn get_routes_table() {
    check("get_routes.txt", &output::routes_table(&routes()));
    let empty = wire::RoutingTable {
        local_generation: 0,
        version: 5,
        region: "ap-south".into(),
        functions: Vec::new(),
    };
    check("get_routes_empty.txt", &output::routes_table(&empty));
}

#[test]
fn get_routes_json_and_yaml() {
    // As an agent serves it to sidecars (the mirror shows every field).
    let served = wire::RoutingTable {
        local_generation: 7,
        ..routes()
    };
    check(
        "get_routes_json.txt",
        &output::routes_json(&served).expect("json"),
    );
    check(
        "get_routes_yaml.txt",
        &output::routes_yaml(&served).expect("yaml"),
    );
}

#[test]
fn describe_external_function_with_routes() {
    let hello = functions()
        .into_iter()
        .find(|f| f.spec.as_ref().is_some_and(|s| s.name == "hello"))
        .expect("fixture");
    let eu_west = wire::RoutingTable {
        local_generation: 0,
        version: 231,
        region: "eu-west".into(),
        functions: vec![wire::FunctionRoute {
            cold_start_ms: 0,
            local_failed_starts: 0,
            local_restart_backoff: false,
            namespace: "default".into(),
            name: "hello".into(),
            function_version: 231,
            policy: None,
            tiers: vec![wire::Tier {
                region: "eu-west".into(),
                local: true,
                endpoints: vec![endpoint(
                    "127.0.2.1:9000",
                    "ext-2c4e6a8b0d1f3a5c",
                    wire::EndpointState::Ready,
                    "eu-west-a",
                )],
                order: wire::TierOrder::Local as i32,
                ready_instances: 1,
            }],
            workload: None,
        }],
    };
    let sections = RoutesSection::Regions(vec![
        RegionRoutes {
            region: "ap-south".into(),
            table: Err("no routing table".into()),
        },
        RegionRoutes {
            region: "eu-west".into(),
            table: Ok(eu_west),
        },
        RegionRoutes {
            region: "sa-east".into(),
            table: Ok(wire::RoutingTable {
                version: 231,
                region: "sa-east".into(),
                functions: Vec::new(),
                local_generation: 0,
            }),
        },
        RegionRoutes {
            region: "us-east".into(),
            table: Ok(routes()),
        },
    ]);
    check(
        "describe_function.txt",
        &output::describe_function(&hello, &sections, &ScaleSection::NotProcess, NOW_MS),
    );
}

#[test]
fn describe_process_function_without_mesh_view() {
    let worker = functions().into_iter().next().expect("fixture");
    let sections = RoutesSection::Unavailable(
        "Error from server (ServiceUnavailable): etcd is unavailable".into(),
    );
    check(
        "describe_function_process.txt",
        &output::describe_function(
            &worker,
            &sections,
            &ScaleSection::Unavailable(
                "Error from server (ServiceUnavailable): etcd is unavailable".into(),
            ),
            NOW_MS,
        ),
    );
    // A spec as a client might send it: unset fields show as such.
    let sparse = wire::Function {
        spec: Some(wire::FunctionSpec {
            name: "sparse".into(),
            routing: Some(wire::RoutingPolicy::default()),
            ..Default::default()
        }),
        version: 3,
        created_version: 3,
    };
    check(
        "describe_function_sparse.txt",
        &output::describe_function(
            &sparse,
            &RoutesSection::Regions(Vec::new()),
            &ScaleSection::NotProcess,
            NOW_MS,
        ),
    );
}

fn instance(
    id: &str,
    address: &str,
    state: wire::EndpointState,
    started_ago_ms: i64,
    cold_start_ms: i64,
) -> wire::InstanceStatus {
    wire::InstanceStatus {
        id: id.into(),
        address: address.into(),
        state: state as i32,
        pid: 40_000 + u32::try_from(started_ago_ms / 1000).expect("small"),
        started_unix_ms: NOW_MS - started_ago_ms,
        ready_unix_ms: if state == wire::EndpointState::Starting {
            0
        } else {
            NOW_MS - started_ago_ms + cold_start_ms
        },
        restarts: 0,
    }
}

/// ListInstances as the control plane answers it (but unsorted: the CLI sorts).
fn instances() -> wire::ListInstancesResponse {
    use wire::EndpointState::{Draining, Ready, Starting};
    let worker = wire::FunctionInstances {
        namespace: "batch".into(),
        name: "worker".into(),
        placement: Some(wire::FunctionPlacement {
            namespace: "batch".into(),
            name: "worker".into(),
            function_version: 214,
            regions: vec![
                wire::RegionBounds {
                    region: "us-east".into(),
                    min_instances: 1,
                    max_instances: 3,
                },
                wire::RegionBounds {
                    region: "eu-west".into(),
                    min_instances: 0,
                    max_instances: 10,
                },
            ],
            problems: vec![wire::PlacementProblem {
                region: "ap-south".into(),
                reason: "minInstances 2 but region ap-south has no agent".into(),
            }],
            leader: "cp-7000".into(),
        }),
        regions: vec![
            wire::RegionScale {
                region: "us-east".into(),
                agent_id: "us-east-2".into(),
                desired: 1,
                ready: 1,
                min_instances: 1,
                max_instances: 3,
                reason: "min instances 1".into(),
                last_change_unix_ms: NOW_MS - 7_800_000,
                stable_concurrency: 0.35,
                panic_concurrency: 0.0,
                cold_start_ms: 38,
                instances: vec![instance(
                    "worker-0c1d2e",
                    "127.0.1.2:40100",
                    Ready,
                    7_800_000,
                    38,
                )],
                last_request_unix_ms: NOW_MS - 2_000,
                ..Default::default()
            },
            wire::RegionScale {
                region: "us-east".into(),
                agent_id: "us-east-1".into(),
                desired: 3,
                ready: 2,
                starting: 1,
                draining: 1,
                min_instances: 1,
                max_instances: 3,
                reason: "panic: concurrency 98.0 >= 2x capacity 10".into(),
                last_change_unix_ms: NOW_MS - 12_000,
                stable_concurrency: 25.04,
                panic_concurrency: 98.0,
                panic: true,
                cold_start_ms: 42,
                restarts: 1,
                last_exit: "killed by signal 9".into(),
                last_log_lines: strings(&["worker: loading model", "worker: out of memory"]),
                instances: vec![
                    instance("worker-a1b2c3", "127.0.1.1:40001", Ready, 303_000, 41),
                    instance("worker-d4e5f6", "127.0.1.1:40002", Ready, 20_000, 44),
                    instance("worker-0a9b8c", "127.0.1.1:40003", Starting, 1_000, 0),
                    wire::InstanceStatus {
                        restarts: 1,
                        ..instance("worker-77ee00", "127.0.1.1:40004", Draining, 4_000_000, 39)
                    },
                ],
                last_request_unix_ms: NOW_MS - 1_000,
                ..Default::default()
            },
        ],
    };
    let api = wire::FunctionInstances {
        namespace: "default".into(),
        name: "api".into(),
        placement: Some(wire::FunctionPlacement {
            namespace: "default".into(),
            name: "api".into(),
            function_version: 12,
            regions: vec![wire::RegionBounds {
                region: "us-east".into(),
                min_instances: 0,
                max_instances: 10,
            }],
            problems: Vec::new(),
            leader: "cp-7001".into(),
        }),
        regions: vec![wire::RegionScale {
            region: "us-east".into(),
            agent_id: "us-east-1".into(),
            desired: 1,
            min_instances: 0,
            max_instances: 10,
            reason: "activation: request held".into(),
            last_change_unix_ms: NOW_MS - 45_000,
            restarts: 3,
            last_exit: "exit code 1".into(),
            last_log_lines: strings(&["error: cannot bind\t0.0.0.0:80", "exiting"]),
            error: "CrashLoopBackOff: exit code 1".into(),
            ..Default::default()
        }],
    };
    let idle = wire::FunctionInstances {
        namespace: "default".into(),
        name: "idle".into(),
        placement: Some(wire::FunctionPlacement {
            namespace: "default".into(),
            name: "idle".into(),
            function_version: 40,
            regions: vec![wire::RegionBounds {
                region: "eu-west".into(),
                min_instances: 0,
                max_instances: 5,
            }],
            problems: Vec::new(),
            leader: "cp-7000".into(),
        }),
        regions: vec![wire::RegionScale {
            region: "eu-west".into(),
            agent_id: "eu-west-1".into(),
            min_instances: 0,
            max_instances: 5,
            reason: "idle 300s: scale to zero".into(),
            last_change_unix_ms: NOW_MS - 303_000,
            cold_start_ms: 1_250,
            last_request_unix_ms: NOW_MS - 603_000,
            ..Default::default()
        }],
    };
    let unplaced = wire::FunctionInstances {
        namespace: "default".into(),
        name: "new".into(),
        placement: None,
        regions: Vec::new(),
    };
    wire::ListInstancesResponse {
        functions: vec![idle, worker, unplaced, api],
        next_page_token: String::new(),
    }
}

fn in_namespace(namespace: &str) -> Vec<wire::FunctionInstances> {
    instances()
        .functions
        .into_iter()
        .filter(|f| f.namespace == namespace)
        .collect()
}

#[test]
fn get_instances_table() {
    check(
        "get_instances.txt",
        &instances::instances_table(&in_namespace("default"), false, NOW_MS),
    );
    check(
        "get_instances_all_namespaces.txt",
        &instances::instances_table(&instances().functions, true, NOW_MS),
    );
}

#[test]
fn get_instances_json_and_yaml() {
    check(
        "get_instances_json.txt",
        &instances::instances_json(&instances()).expect("json"),
    );
    check(
        "get_instances_yaml.txt",
        &instances::instances_yaml(&instances()).expect("yaml"),
    );
}

#[test]
fn describe_process_function_with_scale() {
    let worker = functions().into_iter().next().expect("fixture");
    let routes = RoutesSection::Regions(vec![RegionRoutes {
        region: "us-east".into(),
        table: Ok(routes()),
    }]);
    let scale = ScaleSection::Instances(in_namespace("batch").into_iter().next());
    check(
        "describe_function_scale.txt",
        &output::describe_function(&worker, &routes, &scale, NOW_MS),
    );

    // Crash-looping, and a function the scheduler has not placed yet.
    let api = functions()
        .into_iter()
        .find(|f| f.spec.as_ref().is_some_and(|s| s.name == "api"))
        .expect("fixture");
    let crashing = in_namespace("default")
        .into_iter()
        .find(|f| f.name == "api");
    let mut text = output::describe_function(
        &api,
        &RoutesSection::Regions(Vec::new()),
        &ScaleSection::Instances(crashing),
        NOW_MS,
    );
    text.push_str("---\n");
    text.push_str(&output::describe_function(
        &api,
        &RoutesSection::Regions(Vec::new()),
        &ScaleSection::Instances(None),
        NOW_MS,
    ));
    check("describe_function_crashing.txt", &text);
}

#[test]
fn log_lines() {
    let line = |region: &str, instance: &str, text: &str| wire::LogLine {
        instance: instance.into(),
        stream: "stdout".into(),
        line: text.into(),
        region: region.into(),
    };
    let lines = [
        line("us-east", "hello-3fa2c1", "listening on 127.0.1.1:40123"),
        line(
            "",
            "hello-3fa2c1",
            "region taken from the agent when the line has none",
        ),
        line("eu-west", "", "no instance id"),
        line(
            "us-east",
            "hello-9b8a7c",
            "tab\tand \u{1b}[31mescape\u{1b}[0m shown, not run\r",
        ),
        line("us-east", "hello-9b8a7c", ""),
    ];
    let mut text: String = lines
        .iter()
        .map(|l| meridianctl::logs::format_line("us-west", l))
        .collect();
    text.push_str(&meridianctl::logs::warning_line(
        &meridianctl::logs::AgentTarget {
            agent_id: "eu-west-1".into(),
            region: "eu-west".into(),
            address: "http://127.0.2.1:15003".into(),
        },
        "unreachable: tcp connect error: Connection refused (os error 111)",
    ));
    check("logs.txt", &text);
}

fn status_input() -> StatusInput {
    StatusInput {
        address: "http://127.0.0.1:7000".into(),
        leader: Ok(wire::GetLeaderResponse {
            leader: "cp-7000".into(),
            elected_version: 180,
        }),
        replicas: Ok(vec![
            wire::ReplicaInfo {
                replica_id: "cp-7000".into(),
                address: "127.0.0.1:7000".into(),
                started_unix_ms: 1_795_600_000_000,
                leader: true,
            },
            wire::ReplicaInfo {
                replica_id: "cp-7001".into(),
                address: "127.0.0.1:7001".into(),
                started_unix_ms: 1_795_600_000_500,
                leader: false,
            },
        ]),
        skipped_records: vec![wire::SkippedRecord {
            key: "/meridian/functions/default/broken".into(),
            error: "cannot decode the stored function: invalid wire type".into(),
            revision: 171,
        }],
        agents: Ok(agents().agents),
        instances: Ok(instances().functions),
        functions: Ok(functions()),
    }
}

#[test]
fn status_with_problems() {
    let model = status::status(&status_input());
    check("status.txt", &status::status_text(&model));
    check(
        "status_json.txt",
        &status::status_json(&model).expect("json"),
    );
    check(
        "status_yaml.txt",
        &status::status_yaml(&model).expect("yaml"),
    );
}

#[test]
fn status_healthy() {
    let mut agents = agents().agents;
    for agent in &mut agents {
        agent.acked_version = agent.newest_version;
        agent.in_sync = true;
        agent.last_nack.clear();
        for sidecar in &mut agent.sidecars {
            sidecar.loaded_version = agent.newest_version;
            sidecar.error.clear();
        }
        agent.sidecars_in_sync = u32::try_from(agent.sidecars.len()).expect("few sidecars");
    }
    let hello: Vec<wire::Function> = functions()
        .into_iter()
        .filter(|f| f.spec.as_ref().is_some_and(|s| s.name == "hello"))
        .collect();
    let model = status::status(&StatusInput {
        skipped_records: Vec::new(),
        agents: Ok(agents),
        instances: Ok(Vec::new()),
        functions: Ok(hello),
        ..status_input()
    });
    assert_eq!(model.verdict, "healthy");
    check("status_healthy.txt", &status::status_text(&model));
}

#[test]
fn status_without_leader_and_scale_view() {
    let model = status::status(&StatusInput {
        leader: Ok(wire::GetLeaderResponse::default()),
        replicas: Err("Error from server (Unimplemented): unknown service".into()),
        skipped_records: Vec::new(),
        agents: Ok(Vec::new()),
        instances: Err("Error from server (ServiceUnavailable): etcd unavailable".into()),
        functions: Err("Error from server (ServiceUnavailable): etcd unavailable".into()),
        ..status_input()
    });
    check("status_degraded.txt", &status::status_text(&model));
}
