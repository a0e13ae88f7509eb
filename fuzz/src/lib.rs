//! Meridian's fuzz harness: one function per fuzz target, each taking arbitrary bytes and
//! driving the real code where untrusted or remote input enters.
//!
//! - [`spec()`]: bytes as a wire `FunctionSpec` through the API's limits and validation;
//!   [`manifest()`]: bytes as a YAML/JSON manifest through `meridianctl`'s reader, then the same.
//!   A spec that validates is followed downstream (see [`spec::check_valid`]).
//! - [`agent_table()`]: bytes as a stream of `RoutingUpdate` parts through the agent's
//!   assembler and table apply, then the agent's stream to its sidecars.
//! - [`sidecar_table()`]: bytes as a `RoutingTable` compiled into the sidecar's routing state,
//!   then the request path's lookups and plans on it.
//! - [`request_head()`]: bytes as an HTTP/1.x request head through the sidecar's head checks.
//!
//! None of them panics on any input: inputs are refused with errors, as the real code refuses
//! them. They panic only when the code under test breaks one of its own promises (an accepted
//! table that cannot be reloaded, a valid spec whose table a sidecar refuses, ...): those
//! assertions are the point of the harness. `fuzz/cargo-fuzz/` runs them under libFuzzer;
//! `tests/replay.rs` replays the committed corpora (`fuzz/corpus/<target>/`) in plain tests.

pub mod agent_table;
pub mod request_head;
pub mod seeds;
pub mod sidecar_table;
pub mod spec;

pub use agent_table::agent_table;
pub use request_head::request_head;
pub use sidecar_table::sidecar_table;
pub use spec::{manifest, spec};

/// A target's function.
pub type Target = fn(&[u8]);

/// Every target: its name (the cargo-fuzz target and the corpus directory) and its function.
pub const TARGETS: &[(&str, Target)] = &[
    ("spec", spec),
    ("manifest", manifest),
    ("agent_table", agent_table),
    ("sidecar_table", sidecar_table),
    ("request_head", request_head),
];
