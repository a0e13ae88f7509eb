//! Golden tests of everything meridianctl prints: fixed wire values in, text compared with
//! `tests/golden/*.txt`. Run with `UPDATE_GOLDEN=1` to rewrite the files after an intended change
//! (and review the diff).

use std::collections::HashMap;
use std::path::PathBuf;

use meridian_proto::v1 as wire;
use meridianctl::manifest;
use meridianctl::output::{self, RegionRoutes, RoutesSection};

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
    };
    wire::ListAgentsResponse {
        agents: vec![
            wire::AgentStatus {
                connected_since_unix_ms: NOW_MS - 7_800_000,
                acked_version: 214,
                in_sync: false,
                last_nack: "delta base 200 does not match held version 214".into(),
                replica: "cp-7001".into(),
                ..agent("us-east", "us-east-2", "us-east-b")
            },
            agent("us-east", "us-east-1", "us-east-a"),
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
                cold_start_ms: 0,
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
                    scale: None,
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
    check(
        "get_routes_json.txt",
        &output::routes_json(&routes()).expect("json"),
    );
    check(
        "get_routes_yaml.txt",
        &output::routes_yaml(&routes()).expect("yaml"),
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
        &output::describe_function(&hello, &sections),
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
        &output::describe_function(&worker, &sections),
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
        &output::describe_function(&sparse, &RoutesSection::Regions(Vec::new())),
    );
}
