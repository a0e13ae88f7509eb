//! Meridian's control plane: the gRPC API over etcd, the watch → cache → table loop, the push
//! of routing tables to agents, and the leader-elected scheduler that places process functions.
//! `main.rs` wires these into one server; `admin` serves `metrics` over plain HTTP; `trace` makes
//! the spans that turn a configuration change into one trace, from the API to every agent's ack.

pub mod admin;
pub mod api;
pub mod cache;
pub mod election;
pub mod metrics;
pub mod page;
pub mod push;
pub mod scheduler;
pub mod spec;
pub mod store;
pub mod table;
pub mod trace;
