//! meridianctl: kubectl-like verbs over Meridian's FunctionService, MeshService and
//! ScaleService, and the agents' AgentApiService (logs, explain).
//!
//! `manifest` reads YAML/JSON documents into wire specs, `output`, `instances` and `status`
//! render tables, JSON and YAML (pure functions, covered by golden tests), `client` talks to a control-plane
//! replica, `logs` dials the agents and merges their log streams, `explain` asks a region's
//! agents how their sidecars would route a function, and `commands` ties them together for
//! `main`.

pub mod args;
pub mod client;
pub mod commands;
pub mod duration;
pub mod explain;
pub mod instances;
pub mod logs;
pub mod manifest;
pub mod output;
pub mod status;
