//! Realistic inputs for every target, so that fuzzing starts from valid shapes: encoded specs
//! and tables as the control plane sends them, manifests as users write them, and request
//! heads as clients and other regions' sidecars send them. `examples/seed_corpus.rs` writes
//! them into `fuzz/corpus/<target>/`; the replay test runs them too.

use meridian_proto::updates::{self, PartLimits};
use meridian_proto::v1 as pb;
use prost::Message;

/// The seeds of `target` (a name of [`crate::TARGETS`]), each with a file name.
pub fn seeds(target: &str) -> Vec<(&'static str, Vec<u8>)> {
    match target {
        "spec" => spec_seeds(),
        "manifest" => manifest_seeds(),
        "agent_table" => agent_table_seeds(),
        "sidecar_table" => sidecar_table_seeds(),
        "request_head" => request_head_seeds(),
        _ => Vec::new(),
    }
}

fn external_spec() -> pb::FunctionSpec {
    pb::FunctionSpec {
        name: "hello".into(),
        namespace: "default".into(),
        labels: [("team".to_owned(), "demo".to_owned())].into(),
        runtime: Some(pb::function_spec::Runtime::External(pb::ExternalRuntime {
            regions: vec![
                pb::ExternalRegion {
                    region: "us-east".into(),
                    urls: vec!["http://127.0.1.1:9000".into(), "http://[::1]:9001/x".into()],
                },
                pb::ExternalRegion {
                    region: "eu-west".into(),
                    urls: vec!["http://eu.example/".into()],
                },
            ],
        })),
        routing: Some(pb::RoutingPolicy {
            timeout_ms: Some(15_000),
            per_try_timeout_ms: Some(5_000),
            max_retries: Some(2),
            retryable_methods: vec!["POST".into()],
            failover_order: vec!["eu-west".into()],
        }),
        ..Default::default()
    }
}

fn process_spec() -> pb::FunctionSpec {
    pb::FunctionSpec {
        name: "slow".into(),
        namespace: "shop".into(),
        runtime: Some(pb::function_spec::Runtime::Process(pb::ProcessRuntime {
            command: "/usr/local/bin/worker".into(),
            args: vec!["--verbose".into(), "a\tb".into()],
            env: [("DELAY_MS".to_owned(), "200".to_owned())].into(),
            readiness_path: "/healthz".into(),
        })),
        placement: Some(pb::Placement {
            all_regions: false,
            regions: vec![
                pb::RegionPlacement {
                    region: "us-east".into(),
                    min_instances: Some(1),
                    max_instances: Some(3),
                },
                pb::RegionPlacement {
                    region: "eu-west".into(),
                    ..Default::default()
                },
            ],
        }),
        scaling: Some(pb::Scaling {
            min_instances: Some(0),
            max_instances: Some(20),
            target_concurrency: Some(5),
            idle_seconds: Some(20),
        }),
        routing: Some(pb::RoutingPolicy {
            failover_order: vec!["eu-west".into(), "ap-south".into()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn spec_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let all_regions = pb::FunctionSpec {
        placement: Some(pb::Placement {
            all_regions: true,
            regions: Vec::new(),
        }),
        ..process_spec()
    };
    vec![
        ("seed-external", external_spec().encode_to_vec()),
        ("seed-process", process_spec().encode_to_vec()),
        ("seed-all-regions", all_regions.encode_to_vec()),
    ]
}

const SAMPLE_MANIFEST: &str = "apiVersion: meridian.dev/v1
kind: Function
metadata:
  name: hello
  namespace: default
  labels:
    team: demo
spec:
  runtime:
    process:
      command: sample_function
      readinessPath: /healthz
  placement:
    allRegions: true
  scaling:
    minInstances: 1
    maxInstances: 10
    targetConcurrency: 10
    idleSeconds: 60
  routing:
    timeout: 15s
    perTryTimeout: 5s
    maxRetries: 2
---
apiVersion: meridian.dev/v1
kind: Function
metadata:
  name: slow
spec:
  runtime:
    process:
      command: sample_function
      args: [--verbose]
      env:
        DELAY_MS: \"200\"
  placement:
    regions:
      - region: us-east
        minInstances: 1
        maxInstances: 3
      - region: eu-west
  routing:
    timeout: 1m30s
    retryableMethods: [POST]
    failoverOrder: [eu-west]
";

const EXTERNAL_JSON: &str = r#"{
  "apiVersion": "meridian.dev/v1",
  "kind": "Function",
  "metadata": {"name": "hello", "namespace": "web", "labels": {"team": "demo"}},
  "spec": {
    "runtime": {"external": {"regions": [
      {"region": "us-east", "urls": ["http://10.0.0.5:9000", "http://[::1]:9001/x"]},
      {"region": "eu-west", "urls": ["http://eu.example/"]}
    ]}},
    "routing": {"timeout": "2s", "perTryTimeout": "500ms", "maxRetries": 1,
                "failoverOrder": ["eu-west"]}
  }
}
"#;

fn manifest_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("seed-sample.yaml", SAMPLE_MANIFEST.as_bytes().to_vec()),
        ("seed-external.json", EXTERNAL_JSON.as_bytes().to_vec()),
    ]
}

fn endpoint(address: &str, id: &str, state: pb::EndpointState, zone: &str) -> pb::Endpoint {
    pb::Endpoint {
        address: address.into(),
        id: id.into(),
        state: state as i32,
        zone: zone.into(),
    }
}

/// A route as the control plane builds it for `region` (`us-east`): a local process tier, an
/// explicit remote tier and a measured one.
fn route(namespace: &str, name: &str, version: i64) -> pb::FunctionRoute {
    pb::FunctionRoute {
        namespace: namespace.into(),
        name: name.into(),
        function_version: version,
        policy: Some(pb::RoutingPolicy {
            timeout_ms: Some(15_000),
            per_try_timeout_ms: Some(5_000),
            max_retries: Some(2),
            retryable_methods: vec!["POST".into()],
            failover_order: vec!["eu-west".into()],
        }),
        tiers: vec![
            pb::Tier {
                region: "us-east".into(),
                local: true,
                endpoints: vec![
                    endpoint(
                        "127.0.1.1:20001",
                        "i-1",
                        pb::EndpointState::Ready,
                        "us-east-a",
                    ),
                    endpoint(
                        "127.0.1.1:20002",
                        "i-2",
                        pb::EndpointState::Starting,
                        "us-east-b",
                    ),
                ],
                ready_instances: 1,
                order: pb::TierOrder::Local as i32,
            },
            pb::Tier {
                region: "eu-west".into(),
                local: false,
                endpoints: vec![endpoint(
                    "127.0.2.1:15002",
                    "gw-eu",
                    pb::EndpointState::Ready,
                    "eu-west-a",
                )],
                ready_instances: 2,
                order: pb::TierOrder::Explicit as i32,
            },
            pb::Tier {
                region: "ap-south".into(),
                local: false,
                endpoints: vec![endpoint(
                    "[::1]:15002",
                    "gw-ap",
                    pb::EndpointState::Ready,
                    "ap-south-a",
                )],
                ready_instances: 0,
                order: pb::TierOrder::Measured as i32,
            },
        ],
        workload: Some(pb::LocalWorkload {
            kind: Some(pb::local_workload::Kind::Process(pb::ProcessRuntime {
                command: "sample_function".into(),
                readiness_path: "/healthz".into(),
                ..Default::default()
            })),
            scale: Some(pb::ScaleBounds {
                min_instances: 0,
                max_instances: 3,
                target_concurrency: 10,
                idle_seconds: 60,
            }),
        }),
        cold_start_ms: 250,
        local_failed_starts: 0,
        local_restart_backoff: false,
    }
}

fn table(version: i64, functions: Vec<pb::FunctionRoute>) -> pb::RoutingTable {
    pb::RoutingTable {
        version,
        region: "us-east".into(),
        functions,
        local_generation: 0,
    }
}

/// Length-delimited parts, as the agent target reads them.
fn stream(updates: impl IntoIterator<Item = pb::RoutingUpdate>) -> Vec<u8> {
    let limits = PartLimits {
        items: 1,
        bytes: 1024,
    };
    let mut out = Vec::new();
    for update in updates {
        for part in updates::split(update, limits) {
            // Writing into a Vec cannot fail.
            let _ = part.encode_length_delimited(&mut out);
        }
    }
    out
}

fn agent_table_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let first = table(
        5,
        vec![route("default", "hello", 3), route("shop", "api", 4)],
    );
    let second = table(
        6,
        vec![route("default", "hello", 6), route("default", "slow", 6)],
    );
    let older = table(4, vec![route("default", "hello", 3)]);
    let mut other_region = table(7, vec![route("default", "hello", 7)]);
    other_region.region = "eu-west".into();
    vec![
        ("seed-persisted", first.encode_to_vec()),
        (
            "seed-full-then-delta",
            stream([updates::full(&first), updates::delta(&first, &second)]),
        ),
        (
            "seed-older-and-wrong-region",
            stream([
                updates::full(&first),
                updates::full(&older),
                updates::full(&other_region),
                updates::delta(&first, &second),
            ]),
        ),
    ]
}

fn sidecar_table_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut external = route("web", "site", 2);
    external.tiers.truncate(2);
    external.workload = Some(pb::LocalWorkload {
        kind: Some(pb::local_workload::Kind::External(pb::ExternalRegion {
            region: "us-east".into(),
            urls: vec!["http://127.0.1.1:20001".into()],
        })),
        scale: None,
    });
    let mut remote_only = route("", "far", 1);
    remote_only.tiers.remove(0);
    remote_only.workload = None;
    remote_only.policy = None;
    vec![
        (
            "seed-three-functions",
            table(9, vec![route("default", "hello", 3), external, remote_only]).encode_to_vec(),
        ),
        ("seed-empty", table(1, Vec::new()).encode_to_vec()),
    ]
}

fn request_head_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let heads: [(&'static str, &str); 6] = [
        ("seed-get", "GET /greet?name=x HTTP/1.1\r\nHost: hello\r\nUser-Agent: curl/8.0\r\nAccept: */*\r\n\r\n"),
        (
            "seed-post-chunked",
            "POST /orders HTTP/1.1\r\nHost: api.shop:15001\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive, x-trace\r\nX-Trace: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nContent-Type: application/json\r\n\r\n",
        ),
        (
            "seed-smuggling",
            "POST / HTTP/1.1\r\nHost: hello\r\nContent-Length: 5\r\nTransfer-Encoding: gzip, chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        ),
        (
            "seed-gateway-hop",
            "GET /x HTTP/1.1\r\nHost: hello\r\nmeridian-hop: eu-west\r\nmeridian-region: ap-south\r\nmeridian-anything: 1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        ),
        (
            "seed-absolute-form",
            "GET http://api.shop:15001/path HTTP/1.1\r\nHost: hello\r\nProxy-Connection: keep-alive\r\n\r\n",
        ),
        (
            "seed-http10-two-hosts",
            "GET / HTTP/1.0\r\nHost: hello\r\nHost: api.shop\r\n\r\n",
        ),
    ];
    heads
        .into_iter()
        .map(|(name, head)| (name, head.as_bytes().to_vec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_control_plane::spec::FunctionSpec;

    #[test]
    fn seeds_are_valid_where_they_mean_to_be() {
        for (name, bytes) in spec_seeds() {
            let wire = pb::FunctionSpec::decode(bytes.as_slice()).expect(name);
            FunctionSpec::try_from(wire).expect(name);
        }
        for (name, bytes) in manifest_seeds() {
            let text = std::str::from_utf8(&bytes).expect(name);
            let documents = meridianctl::manifest::parse(name, text).expect(name);
            for document in documents {
                FunctionSpec::try_from(document.manifest.to_spec("default")).expect(name);
            }
        }
        let persisted = &agent_table_seeds()[0].1;
        let wire = pb::RoutingTable::decode(persisted.as_slice()).expect("a table");
        meridian_agent::table::Table::from_wire(wire, crate::agent_table::REGION).expect("valid");
        for (name, bytes) in sidecar_table_seeds() {
            let table = pb::RoutingTable::decode(bytes.as_slice()).expect(name);
            let compiler = meridian_sidecar::routes::Compiler::new("us-east");
            if let Err(error) = compiler.compile(&table) {
                panic!("{name}: {}", error.reason());
            }
        }
        for (name, bytes) in request_head_seeds() {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut head = httparse::Request::new(&mut headers);
            assert!(head.parse(&bytes).expect(name).is_complete(), "{name}");
        }
    }
}
