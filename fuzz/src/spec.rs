//! The `spec` and `manifest` targets: a function spec from the wire or from a manifest file,
//! through the API's limits and validation; a spec that validates is then followed to every
//! place it goes (normalized storage, `meridianctl get -o yaml|json` and back, the routing
//! table each region's agent and sidecars receive), which must all accept it.

use std::collections::BTreeSet;

use meridian_agent::endpoints::external_endpoint;
use meridian_agent::table as agent_table;
use meridian_control_plane::scheduler::compute_placement;
use meridian_control_plane::spec::{FunctionSpec, Runtime, SpecLimits, DEFAULT_NAMESPACE};
use meridian_control_plane::table::{build_route, CachedFunction, FunctionEndpoints, Topology};
use meridian_proto::v1 as pb;
use meridian_sidecar::routes::Compiler;
use meridianctl::{manifest as cli_manifest, output};
use prost::Message;

/// A region that neither hosts the function nor names it: it still gets the route.
const BYSTANDER: &str = "fuzz-bystander";

/// Bytes as the `FunctionSpec` of an `Apply` request: the limits first, then validation, as
/// the API does. Whatever is decoded is also rendered as `meridianctl get` would.
pub fn spec(data: &[u8]) {
    let Ok(wire) = pb::FunctionSpec::decode(data) else {
        return;
    };
    // Rendering a stored spec never fails, whatever it holds.
    render(&wire);
    let within_limits = SpecLimits::default().check(&wire).is_ok();
    // Validation runs whatever the limits say (more code reached), but only a spec within the
    // limits is followed downstream, as only such a spec is ever stored.
    let validated = FunctionSpec::try_from(wire);
    if let (true, Ok(spec)) = (within_limits, validated) {
        check_valid(&spec);
    }
}

/// Bytes as a manifest file for `meridianctl apply -f`: every document through the limits and
/// validation, as the CLI's dry run and the API would.
pub fn manifest(data: &[u8]) {
    // The CLI reads files with `read_to_string`: not UTF-8 is an error before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(documents) = cli_manifest::parse("fuzz.yaml", text) else {
        return;
    };
    for document in documents {
        let namespace = document.manifest.namespace().unwrap_or(DEFAULT_NAMESPACE);
        let wire = document.manifest.to_spec(namespace);
        if SpecLimits::default().check(&wire).is_err() {
            continue;
        }
        if let Ok(spec) = FunctionSpec::try_from(wire) {
            check_valid(&spec);
        }
    }
}

fn render(wire: &pb::FunctionSpec) {
    let function = pb::Function {
        spec: Some(wire.clone()),
        version: 1,
        created_version: 1,
    };
    // Serialization errors are reported, never panics; the text itself is not checked here.
    let _ = output::functions_yaml(std::slice::from_ref(&function));
    let _ = output::function_json(&function);
}

/// Follows a validated spec everywhere it goes; panics (a bug) where it is refused.
pub fn check_valid(spec: &FunctionSpec) {
    // Stored specs are normalized, and every replica validates them again when it loads them:
    // a normalized spec must validate to the same spec.
    let normalized = pb::FunctionSpec::from(spec);
    match FunctionSpec::try_from(normalized.clone()) {
        Ok(again) => assert_eq!(&again, spec, "normalizing changed the spec"),
        Err(error) => panic!("a normalized valid spec is refused: {error}"),
    }
    check_cli_round_trip(spec, &normalized);
    check_tables(spec);
}

/// `meridianctl get -o yaml` (and `-o json`) writes a stored function in manifest shape that
/// `meridianctl apply -f` reads back to the same spec.
fn check_cli_round_trip(spec: &FunctionSpec, normalized: &pb::FunctionSpec) {
    let function = pb::Function {
        spec: Some(normalized.clone()),
        version: 7,
        created_version: 3,
    };
    let yaml = output::functions_yaml(std::slice::from_ref(&function));
    let json = output::function_json(&function);
    for (file, text) in [("get.yaml", yaml), ("get.json", json)] {
        let text = match text {
            Ok(text) => text,
            Err(error) => panic!("cannot render a valid spec as {file}: {error}"),
        };
        let documents = match cli_manifest::parse(file, &text) {
            Ok(documents) => documents,
            Err(errors) => {
                panic!("meridianctl cannot read back its own {file}: {errors:?}\n{text}")
            }
        };
        assert_eq!(documents.len(), 1, "{file} holds one document:\n{text}");
        for document in documents {
            let namespace = document.manifest.namespace().unwrap_or(DEFAULT_NAMESPACE);
            match FunctionSpec::try_from(document.manifest.to_spec(namespace)) {
                Ok(read_back) => assert_eq!(&read_back, spec, "{file} changed the spec:\n{text}"),
                Err(error) => panic!("{file} read back is refused: {error}\n{text}"),
            }
        }
    }
}

/// Every region's routing table carries the function's route; the region's agent and its
/// sidecars must accept it. One route they refuse would make them refuse the whole table, so
/// the region would stop following every change of every function.
fn check_tables(spec: &FunctionSpec) {
    let function = CachedFunction {
        spec: spec.clone(),
        version: 1,
    };
    let mut regions: BTreeSet<String> = match spec.hosting_regions() {
        Some(hosting) => hosting.into_iter().map(str::to_owned).collect(),
        None => ["us-east", "eu-west"].map(str::to_owned).into(),
    };
    regions.extend(spec.routing.failover_order.iter().cloned());
    regions.insert(BYSTANDER.to_owned());
    let topology = Topology {
        agent_regions: regions.clone(),
        gateways: regions
            .iter()
            .enumerate()
            .map(|(index, region)| {
                let gateway = pb::Endpoint {
                    address: format!("127.0.{}.1:15002", index % 250 + 1),
                    id: format!("gateway-{index}"),
                    state: pb::EndpointState::Ready as i32,
                    zone: format!("{region}-a"),
                };
                (region.clone(), vec![gateway])
            })
            .collect(),
    };
    let placement = compute_placement(&function, &topology.agent_regions, "fuzz");
    // What the agents report: for an external function, the endpoints of its URLs by the
    // agent's own rule (a URL the agent cannot read is skipped, as the agent does); for a
    // process function, one ready instance in every placed region.
    let mut endpoints = FunctionEndpoints::new();
    match &spec.runtime {
        Runtime::External(by_region) => {
            for (region, urls) in by_region {
                for url in urls {
                    if let Ok(endpoint) = external_endpoint(url, &format!("{region}-a")) {
                        endpoints.insert((region.clone(), endpoint.id.clone()), endpoint);
                    }
                }
            }
        }
        Runtime::Process(_) => {
            for bounds in placement.iter().flat_map(|p| &p.regions) {
                let endpoint = pb::Endpoint {
                    address: "127.0.0.1:20001".to_owned(),
                    id: "i-1".to_owned(),
                    state: pb::EndpointState::Ready as i32,
                    zone: format!("{}-a", bounds.region),
                };
                endpoints.insert((bounds.region.clone(), endpoint.id.clone()), endpoint);
            }
        }
    }
    for region in &regions {
        let route = build_route(
            &function,
            placement.as_ref(),
            Some(&endpoints),
            region,
            &topology,
        );
        let update = pb::RoutingUpdate {
            version: 1,
            full: true,
            region: region.clone(),
            functions: vec![route.clone()],
            ..Default::default()
        };
        if let Err(error) = agent_table::apply(None, region, &update) {
            panic!(
                "the agent of {region} refuses the route of a valid spec: {}",
                error.reason()
            );
        }
        let table = pb::RoutingTable {
            version: 1,
            region: region.clone(),
            functions: vec![route],
            local_generation: 0,
        };
        if let Err(error) = Compiler::new(region.clone()).compile(&table) {
            panic!(
                "the sidecars of {region} refuse the route of a valid spec: {}",
                error.reason()
            );
        }
    }
}
