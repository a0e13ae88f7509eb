//! The `agent_table` target: what an agent receives from a control-plane replica (update
//! parts) and reads from disk (its persisted table), through the agent's own assembly and table
//! checks, then what it sends on to its sidecars.

use meridian_agent::table::{self, Table, TableError};
use meridian_proto::updates::{self, Assembler, PartLimits, LOCAL_PART_LIMITS};
use meridian_proto::v1::{RoutingTable, RoutingUpdate};
use prost::Message;

/// The region of the agent under test (the seeds' region).
pub const REGION: &str = "us-east";

/// Parts read from one input at most: bounds the work of one run.
const MAX_PARTS: usize = 256;

/// Small parts, so that the sidecar stream's splitting and reassembly are exercised by small
/// tables too.
const TINY_PARTS: PartLimits = PartLimits {
    items: 2,
    bytes: 256,
};

/// Bytes as (1) the persisted table file, and (2) a session's stream of length-delimited
/// `RoutingUpdate` parts, applied as the agent's session applies them.
pub fn agent_table(data: &[u8]) {
    // (1) The state file: whatever it holds, loading either yields a table or a reason.
    if let Ok(wire) = RoutingTable::decode(data) {
        if let Ok(loaded) = Table::from_wire(wire, REGION) {
            check_reloads(&loaded);
        }
    }

    // (2) The stream.
    let mut input = data;
    let mut parts = Assembler::default();
    let mut held: Option<Table> = None;
    // The last table the agent's local API sent its sidecars: the base of the next delta.
    let mut served: Option<RoutingTable> = None;
    for _ in 0..MAX_PARTS {
        if input.is_empty() {
            break;
        }
        let Ok(part) = RoutingUpdate::decode_length_delimited(&mut input) else {
            break;
        };
        // A stray or oversized sequence is Nacked and the session goes on.
        let Ok(Some(update)) = parts.push(part) else {
            continue;
        };
        match table::apply(held.as_ref(), REGION, &update) {
            Ok(accepted) => {
                let held_version = held.as_ref().map_or(0, Table::version);
                assert!(
                    accepted.version() >= held_version,
                    "version went back from {held_version} to {}",
                    accepted.version()
                );
                assert_eq!(accepted.version(), update.version);
                assert_eq!(accepted.region(), REGION);
                check_reloads(&accepted);
                let wire = accepted.to_wire();
                check_sidecar_stream(served.as_ref(), &wire);
                served = Some(wire);
                held = Some(accepted);
            }
            // The session ends and the connector moves to another replica, keeping the table.
            Err(TableError::Older { .. }) => parts = Assembler::default(),
            // Nacked: the held table stays.
            Err(_) => {}
        }
    }
}

/// An accepted table is persisted (`to_wire`, encoded) before it is acknowledged, and loaded
/// back after a restart: the agent must accept what it wrote.
fn check_reloads(table: &Table) {
    let wire = table.to_wire();
    let bytes = wire.encode_to_vec();
    let decoded = match RoutingTable::decode(bytes.as_slice()) {
        Ok(decoded) => decoded,
        Err(error) => panic!("the persisted table does not decode: {error}"),
    };
    assert_eq!(decoded, wire, "the persisted table changed in encoding");
    match Table::from_wire(decoded, REGION) {
        Ok(reloaded) => assert_eq!(&reloaded, table, "the reloaded table differs"),
        Err(error) => panic!(
            "the agent refuses the table it persisted: {}",
            error.reason()
        ),
    }
}

/// The agent sends its sidecars a full table first, then deltas, in parts; a sidecar that
/// assembles and applies them must end up with exactly the agent's table.
fn check_sidecar_stream(served: Option<&RoutingTable>, new: &RoutingTable) {
    let update = match served {
        Some(old) => updates::delta(old, new),
        None => updates::full(new),
    };
    for limits in [LOCAL_PART_LIMITS, TINY_PARTS] {
        let mut assembler = Assembler::default();
        let mut whole = None;
        for part in updates::split(update.clone(), limits) {
            assert!(whole.is_none(), "parts after the last one");
            match assembler.push(part) {
                Ok(done) => whole = done,
                Err(error) => panic!("the agent's own parts do not assemble: {error}"),
            }
        }
        let Some(whole) = whole else {
            panic!("the agent's parts never complete an update");
        };
        match updates::apply(served, whole) {
            Ok(table) => assert_eq!(&table, new, "the sidecar's table differs from the agent's"),
            Err(error) => panic!("the agent's own update does not apply: {error}"),
        }
    }
}
