//! The `sidecar_table` target: a routing table as a sidecar's watch delivers it, compiled into
//! the sidecar's routing state, then read the way the request path, the activator and
//! `explain` read it.

use std::sync::Arc;

use meridian_proto::v1::RoutingTable;
use meridian_sidecar::activator::{warm_remote, HoldRules};
use meridian_sidecar::balance::Tried;
use meridian_sidecar::explain::explain;
use meridian_sidecar::proxy::{choose, plan};
use meridian_sidecar::routes::{Compiler, TableSpec, DEFAULT_NAMESPACE};
use prost::Message;

/// Bytes as a `RoutingTable` for a sidecar of the table's own region (a table for another
/// region is refused before anything else is looked at).
pub fn sidecar_table(data: &[u8]) {
    let Ok(table) = RoutingTable::decode(data) else {
        return;
    };
    let checked = TableSpec::try_from(&table);
    let compiler = Compiler::new(table.region.clone());
    let compiled = compiler.compile(&table);
    assert_eq!(
        checked.is_ok(),
        compiled.is_ok(),
        "checking and compiling disagree: {:?} / {:?}",
        checked.err(),
        compiled.err()
    );
    let Ok(state) = compiled else {
        return;
    };
    let now = state.clock().now();
    let tried = Tried::default();
    for function in state.functions() {
        // Every function is found by the names the outbound listener is called by.
        let mut hosts = vec![
            format!("{}.{}", function.name, function.namespace),
            format!("{}:8080", function.label()),
            function.label().to_ascii_uppercase(),
        ];
        if function.namespace == DEFAULT_NAMESPACE {
            hosts.push(function.name.clone());
        }
        for host in hosts {
            match state.lookup(&host) {
                Ok(found) => assert!(
                    Arc::ptr_eq(found, function),
                    "{host} finds another function"
                ),
                Err(error) => panic!("{host} does not find its function: {error:?}"),
            }
        }
        for (local_only, avoid) in [(false, 0), (true, 0), (false, u32::MAX), (false, 1)] {
            let plan = plan(function, now, local_only, &tried, avoid);
            assert!(plan.len <= function.tiers.len());
            let load: u32 = plan.load[..plan.len].iter().sum();
            assert!(load == 0 || load == 1000, "loads add up to {load} permille");
            if let Ok(pick) = choose(function, now, local_only, &tried, avoid) {
                assert!(
                    !local_only || pick.tier.local,
                    "a gateway request leaves the region"
                );
                assert!(pick.endpoint.routable, "an unroutable endpoint was picked");
            }
        }
        let _ = warm_remote(function, now);
        if let Err(error) = explain(
            &state,
            &HoldRules::default(),
            &function.namespace,
            &function.name,
        ) {
            panic!("explain does not find {}: {error}", function.label());
        }
    }
    // The next version of the same table reuses the endpoints' shared state; forgetting what
    // no live table uses must keep what this one does.
    let again = compiler.compile(&table);
    assert!(again.is_ok(), "the same table compiles once only");
    drop(state);
    compiler.prune();
}
