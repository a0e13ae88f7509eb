//! Meridian's per-region agent as a library: the binary in `main.rs` only parses flags and wires
//! these modules together, so that everything here can be tested without a network.
//!
//! - [`state`]: the persisted routing table, written atomically.
//! - [`fs_modes`]: the modes of the state directory and of every file the agent writes there.
//! - [`table`]: applying full tables and deltas; what the agent refuses (Nacks).
//! - [`session`]: one stream to one control-plane replica; [`connector`] rotates through replicas.
//! - [`endpoints`]: the endpoints this agent reports (external URLs, process instances).
//! - [`runtime`]: runs the instances of `process` functions, under the [`runtime::CommandPolicy`]
//!   (allowed command roots, the `--run-as` user).
//! - [`autoscaler`]: the KPA-style autoscaler per function, and the loop that drives the runtime.
//! - [`load`]: the sidecars' load reports, and the drain gate built on them.
//! - [`overlay`]: the table served to sidecars: local tiers filled from the runtime.
//! - [`local_api`]: `LocalRoutingService` and `LoadService` for the region's sidecars,
//!   `AgentApiService` (logs) for operators.
//! - [`metrics`]: Prometheus metrics; [`admin`] serves them (`/metrics`, `/ready`) over HTTP.

pub mod admin;
pub mod autoscaler;
pub mod connector;
pub mod endpoints;
#[cfg(test)]
mod fixtures;
pub mod fs_modes;
pub mod load;
pub mod local_api;
pub mod metrics;
pub mod overlay;
pub mod runtime;
pub mod session;
pub mod sidecars;
pub mod state;
pub mod table;

pub use meridian_common::error_chain;
