//! What every Meridian binary shares: logging set-up, shutdown signals, reconnect backoff and
//! the naming rule for regions, namespaces and functions.

pub mod backoff;
pub mod names;
pub mod shutdown;
pub mod telemetry;
