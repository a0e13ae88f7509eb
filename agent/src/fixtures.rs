//! Builders the agent's unit tests share: process functions as the control plane routes them,
//! runtime instances, and endpoints in a form `assert_eq!` can show.

use meridian_proto::v1::{local_workload, Endpoint, FunctionRoute, LocalWorkload, ProcessRuntime};

use crate::runtime::{InstanceInfo, InstanceState};

/// A `process` function `name` (version 1, no scale bounds): the bounds and the command do not
/// matter to what reports or serves its instances.
pub fn process_function(name: &str) -> FunctionRoute {
    FunctionRoute {
        namespace: "default".into(),
        name: name.into(),
        function_version: 1,
        workload: Some(LocalWorkload {
            scale: Default::default(),
            kind: Some(local_workload::Kind::Process(ProcessRuntime {
                command: "fn".into(),
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
}

/// An instance `id` in `state`, listening on `127.0.1.1:port`.
pub fn instance(id: &str, port: u16, state: InstanceState) -> InstanceInfo {
    InstanceInfo {
        id: id.into(),
        address: format!("127.0.1.1:{port}").parse().unwrap(),
        state,
        pid: 1,
        started: std::time::SystemTime::UNIX_EPOCH,
        ready: None,
        restarts: 0,
        adopted: false,
    }
}

/// `(id, address, state, zone)` of each endpoint, in order.
pub fn endpoint_summary(endpoints: &[Endpoint]) -> Vec<(&str, &str, i32, &str)> {
    endpoints
        .iter()
        .map(|e| (e.id.as_str(), e.address.as_str(), e.state, e.zone.as_str()))
        .collect()
}
