//! Meridian's control plane: the gRPC API over etcd, the watch → cache → table loop, and the
//! push of routing tables to agents. `main.rs` wires these into one server.

pub mod api;
pub mod cache;
pub mod push;
pub mod spec;
pub mod store;
pub mod table;
