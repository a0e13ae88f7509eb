//! What every Meridian binary shares: logging set-up, the admin listener (`/metrics`, `/ready`),
//! shutdown signals, reconnect backoff, the `host:port` rule, the naming rule for regions, namespaces and functions, and
//! the one accept/serve loop of every HTTP listener (`serve`).

pub mod address;
pub mod admin;
pub mod backoff;
pub mod names;
pub mod serve;
pub mod shutdown;
pub mod telemetry;

/// An error and all its sources on one line (`outer: inner: root`), for logs, error bodies and
/// Nack reasons.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}
