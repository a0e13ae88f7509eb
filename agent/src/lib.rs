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
pub mod runtime;
pub mod session;
pub mod state;
pub mod table;

pub use meridian_common::error_chain;
