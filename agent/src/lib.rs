//! Meridian's per-region agent as a library: the binary in `main.rs` only parses flags and wires
//! these modules together, so that everything here can be tested without a network.
//!
//! - [`state`]: the persisted routing table, written atomically.
//! - [`table`]: applying full tables and deltas; what the agent refuses (Nacks).
//! - [`session`]: one stream to one control-plane replica; [`connector`] rotates through replicas.
//! - [`endpoints`]: the endpoints this agent reports.
//! - [`local_api`]: `LocalRoutingService` for the region's sidecars.

pub mod address;
pub mod connector;
pub mod endpoints;
pub mod local_api;
pub mod session;
pub mod state;
pub mod table;

/// An error and all its sources on one line (`outer: inner: root`), for logs and Nack reasons.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}
