//! meridianctl: kubectl-like verbs over Meridian's FunctionService and MeshService.
//!
//! `manifest` reads YAML/JSON documents into wire specs, `output` renders tables, JSON and YAML
//! (pure functions, covered by golden tests), `client` talks to a control-plane replica and
//! `commands` ties them together for `main`.

pub mod args;
pub mod client;
pub mod commands;
pub mod duration;
pub mod manifest;
pub mod output;
