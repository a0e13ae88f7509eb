//! The agent's admin listener (plain HTTP/1.1, apart from the gRPC API so that scrapers and
//! load balancers need no gRPC): `/metrics` (Prometheus text) and `/ready` (200 while a routing
//! table is held: the agent can serve its sidecars). The listener is `meridian_common::admin`;
//! this module holds the agent's readiness rule.

use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::local_api::CurrentTable;

pub use meridian_common::admin::{parse_address, serve, Admin, AdminError};

/// The agent's `/ready`: ready while a routing table is held.
pub fn readiness(table: &watch::Receiver<CurrentTable>) -> Result<String, String> {
    match table.borrow().as_ref().map(|t| t.version) {
        Some(version) => Ok(format!("ready (table {version})\n")),
        None => Err("not ready: no routing table yet\n".into()),
    }
}

/// The agent's admin endpoints: `registry` on `/metrics`, [`readiness`] of `table` on `/ready`.
pub fn new(registry: Registry, table: watch::Receiver<CurrentTable>) -> Admin {
    Admin::new(registry, Arc::new(move || readiness(&table)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{self, AgentMetrics};
    use meridian_proto::v1::{FunctionScale, RegionScale, RoutingTable};
    use std::time::{Duration, SystemTime};

    #[test]
    fn ready_while_a_table_is_held() {
        let (table_tx, table) = watch::channel(None);
        assert_eq!(
            readiness(&table),
            Err("not ready: no routing table yet\n".to_owned())
        );
        table_tx.send_replace(Some(Arc::new(RoutingTable {
            version: 42,
            ..Default::default()
        })));
        assert_eq!(readiness(&table), Ok("ready (table 42)\n".to_owned()));
    }

    #[test]
    fn metrics_on_the_admin_registry() {
        let (_scale_tx, scale) = watch::channel(std::sync::Arc::new(vec![FunctionScale {
            namespace: "default".into(),
            name: "hello".into(),
            scale: Some(RegionScale {
                desired: 3,
                ready: 2,
                stable_concurrency: 1.5,
                ..Default::default()
            }),
        }]));
        let (_runtime_tx, runtime) = watch::channel(Default::default());
        let metrics = AgentMetrics::new("us-east");
        let registry = metrics::registry(Arc::clone(&metrics), scale, runtime);
        metrics.table_accepted(42, SystemTime::now() - Duration::from_secs(5));
        metrics.cold_start(Duration::from_millis(30));
        let body = metrics::render(&registry).unwrap();
        assert!(body.contains("meridian_agent_table_version 42"), "{body}");
        assert!(
            body.contains("meridian_agent_table_age_seconds 5."),
            "{body}"
        );
        assert!(body.contains("meridian_agent_connected 0"), "{body}");
        assert!(
            body.contains(r#"meridian_autoscaler_desired_instances{namespace="default",function="hello",region="us-east"} 3"#),
            "{body}"
        );
        assert!(
            body.contains(r#"meridian_autoscaler_ready_instances{namespace="default",function="hello",region="us-east"} 2"#),
            "{body}"
        );
        assert!(
            body.contains(r#"meridian_autoscaler_concurrency{namespace="default",function="hello",region="us-east",window="stable"} 1.5"#),
            "{body}"
        );
        assert!(
            body.contains("meridian_instance_cold_start_seconds_count 1"),
            "{body}"
        );
    }
}
