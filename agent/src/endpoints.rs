//! The endpoints this agent reports to the control plane, derived from its routing table and its
//! runtime: each URL of an `external` workload assigned to this region, and each live instance
//! (starting, ready or draining) of a `process` workload.

use meridian_proto::v1::{
    local_workload, Endpoint, EndpointReport, EndpointState, FunctionEndpoints,
};

use crate::overlay::instance_endpoints;
use crate::runtime::{FunctionKey, Snapshot};
use crate::table::Table;
use meridian_common::address::{parse_host_opt_port, AddressError};

/// Port of an `http://` URL that names none.
pub const DEFAULT_HTTP_PORT: u16 = 80;

/// Why an external URL cannot be turned into an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("{0:?} is not an http:// URL")]
    NotHttp(String),
    #[error("{url:?} has no valid host:port")]
    BadAuthority {
        url: String,
        #[source]
        source: AddressError,
    },
}

/// FNV-1a, 64 bits: tiny, stable across releases and platforms, good enough to name a URL.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(PRIME)
    })
}

/// `ext-` and 16 hex digits of FNV-1a-64 of the URL exactly as written in the spec, so every
/// agent and every restart names the same URL the same way.
pub fn external_id(url: &str) -> String {
    format!("ext-{:016x}", fnv1a64(url.as_bytes()))
}

/// The endpoint for external URL `url`: its `host:port` (port 80 if absent), READY, in `zone`.
pub fn external_endpoint(url: &str, zone: &str) -> Result<Endpoint, EndpointError> {
    let rest = strip_prefix_ignore_case(url, "http://")
        .ok_or_else(|| EndpointError::NotHttp(url.to_owned()))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    // Credentials are not part of where to connect.
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let address = parse_host_opt_port(host_port, DEFAULT_HTTP_PORT).map_err(|source| {
        EndpointError::BadAuthority {
            url: url.to_owned(),
            source,
        }
    })?;
    Ok(Endpoint {
        address: address.to_string(),
        id: external_id(url),
        state: EndpointState::Ready as i32,
        zone: zone.to_owned(),
    })
}

fn strip_prefix_ignore_case<'a>(value: &'a str, prefix: &str) -> Option<&'a str> {
    let head = value.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &value[prefix.len()..])
}

/// The complete endpoint set of an agent in `zone` holding `table` and running `snapshot`: one
/// entry per function with an external workload or live instances of a process workload, in
/// table order. URLs that cannot be parsed are skipped with a warning (the control plane
/// validates them; a report must not fail because of one).
pub fn compute(table: &Table, zone: &str, snapshot: &Snapshot) -> Vec<FunctionEndpoints> {
    let mut set = Vec::new();
    for route in table.functions() {
        let external = match route.workload.as_ref().and_then(|w| w.kind.as_ref()) {
            Some(local_workload::Kind::External(external)) => external,
            Some(local_workload::Kind::Process(_)) => {
                let key = FunctionKey::new(route.namespace.clone(), route.name.clone());
                let Some(function) = snapshot.functions.get(&key) else {
                    continue;
                };
                if !function.instances.is_empty() {
                    set.push(FunctionEndpoints {
                        namespace: route.namespace.clone(),
                        name: route.name.clone(),
                        endpoints: instance_endpoints(function, zone),
                    });
                }
                continue;
            }
            None => continue,
        };
        let mut endpoints: Vec<Endpoint> = Vec::with_capacity(external.urls.len());
        for url in &external.urls {
            match external_endpoint(url, zone) {
                // The same URL listed twice is one endpoint.
                Ok(endpoint) if endpoints.iter().any(|e| e.id == endpoint.id) => {}
                Ok(endpoint) => endpoints.push(endpoint),
                Err(error) => tracing::warn!(
                    function = %format!("{}/{}", route.namespace, route.name),
                    %error, "skipping external URL"),
            }
        }
        if !endpoints.is_empty() {
            set.push(FunctionEndpoints {
                namespace: route.namespace.clone(),
                name: route.name.clone(),
                endpoints,
            });
        }
    }
    set
}

/// The report message for a set from [`compute`].
pub fn report(set: &[FunctionEndpoints]) -> EndpointReport {
    EndpointReport {
        functions: set.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_proto::v1::{ExternalRegion, FunctionRoute, LocalWorkload, RoutingTable};

    use crate::fixtures::{endpoint_summary, instance, process_function};
    use crate::runtime::{FunctionRuntime, InstanceState};

    #[test]
    fn fnv1a64_matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn id_is_stable_and_distinct() {
        let url = "http://127.0.1.1:9000";
        let id = external_id(url);
        assert_eq!(id, format!("ext-{:016x}", fnv1a64(url.as_bytes())));
        assert_eq!(id.len(), 4 + 16);
        assert_eq!(id, external_id(url));
        assert_ne!(id, external_id("http://127.0.1.1:9001"));
        // Leading zeros are kept: always 16 digits.
        assert_eq!(format!("ext-{:016x}", 0xabu64), "ext-00000000000000ab");
    }

    #[test]
    fn endpoint_from_url() {
        let e = external_endpoint("http://127.0.1.1:9000/hello?x=1", "us-east-a").unwrap();
        assert_eq!(e.address, "127.0.1.1:9000");
        assert_eq!(e.state, EndpointState::Ready as i32);
        assert_eq!(e.zone, "us-east-a");
        assert_eq!(e.id, external_id("http://127.0.1.1:9000/hello?x=1"));
    }

    #[test]
    fn port_defaults_to_80() {
        for url in [
            "http://legacy.example",
            "http://legacy.example/",
            "HTTP://legacy.example",
        ] {
            let e = external_endpoint(url, "z").unwrap();
            assert_eq!(e.address, "legacy.example:80", "{url}");
        }
        let e = external_endpoint("http://user:pw@[::1]/x", "z").unwrap();
        assert_eq!(e.address, "[::1]:80");
    }

    #[test]
    fn non_http_urls_are_refused() {
        assert!(matches!(
            external_endpoint("https://a.example", "z"),
            Err(EndpointError::NotHttp(_))
        ));
        assert!(matches!(
            external_endpoint("http://a.example:x/", "z"),
            Err(EndpointError::BadAuthority { .. })
        ));
    }

    #[test]
    fn set_covers_external_workloads_only() {
        let external = |name: &str, urls: &[&str]| FunctionRoute {
            namespace: "default".into(),
            name: name.into(),
            workload: Some(LocalWorkload {
                scale: Default::default(),
                kind: Some(local_workload::Kind::External(ExternalRegion {
                    region: "us-east".into(),
                    urls: urls.iter().map(|u| (*u).into()).collect(),
                })),
            }),
            ..Default::default()
        };
        let plain = FunctionRoute {
            namespace: "default".into(),
            name: "plain".into(),
            ..Default::default()
        };
        let wire = RoutingTable {
            local_generation: Default::default(),
            version: 1,
            region: "us-east".into(),
            functions: vec![
                external("b", &["http://h:1", "http://h:1", "ftp://nope"]),
                plain,
                external("a", &["http://h:2"]),
                external("c", &["bad"]),
            ],
        };
        let table = Table::from_wire(wire, "us-east").unwrap();
        let set = compute(&table, "us-east-a", &Snapshot::default());
        let summary: Vec<(String, Vec<String>)> = set
            .iter()
            .map(|f| {
                let addresses = f.endpoints.iter().map(|e| e.address.clone()).collect();
                (f.name.clone(), addresses)
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("a".to_string(), vec!["h:2".to_string()]),
                ("b".to_string(), vec!["h:1".to_string()]),
            ]
        );
        assert_eq!(report(&set).functions, set);
    }

    #[test]
    fn process_instances_are_reported_in_every_state() {
        let wire = RoutingTable {
            local_generation: 0,
            version: 1,
            region: "us-east".into(),
            functions: vec![
                process_function("idle"),
                process_function("busy"),
                process_function("unknown"),
            ],
        };
        let table = Table::from_wire(wire, "us-east").unwrap();
        let mut snapshot = Snapshot::default();
        snapshot.functions.insert(
            FunctionKey::new("default", "busy"),
            FunctionRuntime {
                instances: vec![
                    instance("busy-000002", 4002, InstanceState::Draining),
                    instance("busy-000001", 4001, InstanceState::Ready),
                    instance("busy-000003", 4003, InstanceState::Starting),
                ],
                ..Default::default()
            },
        );
        snapshot.functions.insert(
            FunctionKey::new("default", "idle"),
            FunctionRuntime::default(),
        );
        // Instances of a function the table does not have (draining after removal): left out.
        snapshot.functions.insert(
            FunctionKey::new("default", "gone"),
            FunctionRuntime {
                instances: vec![instance("gone-000001", 4009, InstanceState::Draining)],
                ..Default::default()
            },
        );
        let set = compute(&table, "us-east-a", &snapshot);
        assert_eq!(set.len(), 1);
        assert_eq!(set[0].name, "busy");
        assert_eq!(
            endpoint_summary(&set[0].endpoints),
            [
                (
                    "busy-000001",
                    "127.0.1.1:4001",
                    EndpointState::Ready as i32,
                    "us-east-a"
                ),
                (
                    "busy-000002",
                    "127.0.1.1:4002",
                    EndpointState::Draining as i32,
                    "us-east-a"
                ),
                (
                    "busy-000003",
                    "127.0.1.1:4003",
                    EndpointState::Starting as i32,
                    "us-east-a"
                ),
            ]
        );
    }
}
