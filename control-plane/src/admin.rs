//! The admin listener (plain HTTP/1.1, apart from the gRPC port so that scrapers and load
//! balancers need no gRPC): `/metrics` (Prometheus text) and `/ready` (200 once the cache has
//! loaded its first etcd snapshot). The listener is `meridian_common::admin`; this module holds
//! the control plane's readiness rule.

use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::sync::watch;

pub use meridian_common::admin::{parse_address, serve, Admin, AdminError};

/// The control plane's `/ready`: ready once the state is loaded from etcd.
pub fn readiness(ready: &watch::Receiver<bool>) -> Result<String, String> {
    if *ready.borrow() {
        Ok("ready\n".into())
    } else {
        Err("not ready: state not loaded from etcd yet\n".into())
    }
}

/// The control plane's admin endpoints: `registry` on `/metrics`, [`readiness`] of `ready` on
/// `/ready`.
pub fn new(registry: Registry, ready: watch::Receiver<bool>) -> Admin {
    Admin::new(registry, Arc::new(move || readiness(&ready)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::election::ElectionState;
    use crate::metrics::{self, Metrics};
    use crate::table::Tables;

    #[test]
    fn ready_after_load() {
        let (ready_tx, ready) = watch::channel(false);
        assert_eq!(
            readiness(&ready),
            Err("not ready: state not loaded from etcd yet\n".to_owned())
        );
        ready_tx.send_replace(true);
        assert_eq!(readiness(&ready), Ok("ready\n".to_owned()));
    }

    #[test]
    fn metrics_on_the_admin_registry() {
        let (_tables_tx, tables) = watch::channel(Arc::new(Tables::default()));
        let registry = metrics::registry(Metrics::new(), tables, ElectionState::new());
        let body = metrics::render(&registry).unwrap();
        assert!(body.contains("meridian_agents_connected 0"), "{body}");
    }
}
