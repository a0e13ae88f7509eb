//! Meridian's sidecar, the data plane: an HTTP/1.1 and h2c proxy with an outbound listener for
//! applications and a gateway listener for other regions; tiered failover across regions
//! (Envoy-style priority levels), power-of-two-choices load balancing, passive ejection and
//! active probes, retries within a budget, and per-try and total timeouts; an activator that
//! holds requests for a process function scaled to zero until the agent has started an
//! instance; load reports that feed the agent's autoscaler. Its configuration is the routing
//! table its local agent serves.

pub mod activator;
pub mod admin;
pub mod balance;
pub mod body;
pub mod budget;
pub mod endpoints;
pub mod errors;
pub mod explain;
pub mod health;
pub mod load;
pub mod metrics;
pub mod priority;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod spans;
pub mod watch;

pub use server::{run, Bound, Config};

pub use meridian_common::error_chain;
