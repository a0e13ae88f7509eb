//! Configuration propagation as one trace: the API's `meridian.apply` / `meridian.delete`
//! server span (a child of the caller's W3C context, when its request metadata carries one),
//! the [`pb::ChangeTrace`] record that carries that span's context through etcd in the same
//! transaction as the change, and one `meridian.push` span per agent from sending a table until
//! the agent's ack (or nack, or timeout), whose context travels to the agent in
//! `RoutingUpdate.trace_context`. Placements the scheduler leader writes because of a traced
//! change are a `meridian.schedule` span (the change span's child), carried the same way.
//!
//! Everything here exists only when span export is on ([`Tracing::when_enabled`] returns
//! `None` otherwise): then no span, no extra etcd key and an empty `trace_context`.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use meridian_proto::v1 as pb;
use opentelemetry::global::{self, BoxedTracer};
use opentelemetry::propagation::Extractor;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue};

/// The API's span for an Apply.
pub const APPLY_SPAN: &str = "meridian.apply";
/// The API's span for a Delete.
pub const DELETE_SPAN: &str = "meridian.delete";
/// One agent's push, from sending the table to its ack.
pub const PUSH_SPAN: &str = "meridian.push";
/// The scheduler leader writing the placements a traced change caused.
pub const SCHEDULE_SPAN: &str = "meridian.schedule";
/// How many placements a schedule span writes.
pub const PLACEMENTS: &str = "meridian.placements";

pub const FUNCTION: &str = "meridian.function";
pub const NAMESPACE: &str = "meridian.namespace";
/// The etcd revision the change was committed at (the routing tables' version).
pub const ETCD_REVISION: &str = "meridian.etcd.revision";
/// API spans: `created`, `configured`, `unchanged`, `dry-run`, `deleted` or `error`; schedule
/// spans: `written`, `conflict`, `fenced` or `error`.
pub const OUTCOME: &str = "meridian.outcome";
pub const ERROR: &str = "meridian.error";
pub const REPLICA: &str = "meridian.replica";
pub const REGION: &str = "meridian.region";
pub const AGENT: &str = "meridian.agent";
pub const TABLE_VERSION: &str = "meridian.table.version";
/// `true` for a full table, `false` for a delta.
pub const FULL: &str = "meridian.push.full";
pub const PARTS: &str = "meridian.push.parts";
/// How the push ended: `ack`, `nack`, `timeout`, or why the session ended.
pub const RESULT: &str = "meridian.push.result";

/// Makes this replica's spans; exists only while export is on.
#[derive(Debug)]
pub struct Tracing {
    tracer: BoxedTracer,
    replica: String,
}

impl Tracing {
    /// `Some` when span export is on, `None` (no tracing work at all) when it is off.
    pub fn when_enabled(replica: &str) -> Option<Self> {
        meridian_common::telemetry::enabled().then(|| Self {
            tracer: global::tracer("meridian-control-plane"),
            replica: replica.to_owned(),
        })
    }

    /// Starts the API span `name` for a change of `function`, a child of the W3C context in
    /// the request's metadata (the root of a new trace without one).
    pub fn change(
        &self,
        name: &'static str,
        metadata: &tonic::metadata::MetadataMap,
        namespace: &str,
        function: &str,
    ) -> ChangeSpan {
        let parent = global::get_text_map_propagator(|p| p.extract(&Metadata(metadata)));
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new(FUNCTION, function.to_owned()),
                KeyValue::new(NAMESPACE, namespace.to_owned()),
                KeyValue::new(REPLICA, self.replica.clone()),
            ])
            .start_with_context(&self.tracer, &parent);
        ChangeSpan {
            cx: parent.with_span(span),
            change: format!("{} {namespace}/{function}", short(name)),
        }
    }

    /// Starts the span of the scheduler writing `placements` placements caused by the change
    /// traced in `trace` (a child of that change's span). Its [`ChangeSpan::record`] goes into
    /// the placements' transaction, so their pushes join the trace as its children.
    pub fn schedule(&self, trace: &pb::ChangeTrace, placements: usize) -> ChangeSpan {
        let parent = global::get_text_map_propagator(|p| p.extract(&trace.context));
        let span = self
            .tracer
            .span_builder(SCHEDULE_SPAN)
            .with_kind(SpanKind::Internal)
            .with_attributes([
                KeyValue::new(PLACEMENTS, i64::try_from(placements).unwrap_or(i64::MAX)),
                KeyValue::new(REPLICA, self.replica.clone()),
            ])
            .start_with_context(&self.tracer, &parent);
        ChangeSpan {
            cx: parent.with_span(span),
            change: format!("schedule after {}", trace.change),
        }
    }

    /// Starts the push span of a table to one agent, a child of the change's span (carried in
    /// `trace`). The caller puts [`PushSpan::context`] on every part it sends.
    pub fn push(
        &self,
        trace: &pb::ChangeTrace,
        region: &str,
        agent: &str,
        version: i64,
        full: bool,
        parts: usize,
    ) -> PushSpan {
        let parent = global::get_text_map_propagator(|p| p.extract(&trace.context));
        let span = self
            .tracer
            .span_builder(PUSH_SPAN)
            .with_kind(SpanKind::Producer)
            .with_attributes([
                KeyValue::new(REGION, region.to_owned()),
                KeyValue::new(AGENT, agent.to_owned()),
                KeyValue::new(TABLE_VERSION, version),
                KeyValue::new(FULL, full),
                KeyValue::new(PARTS, i64::try_from(parts).unwrap_or(i64::MAX)),
                KeyValue::new(REPLICA, self.replica.clone()),
            ])
            .start_with_context(&self.tracer, &parent);
        let cx = parent.with_span(span);
        let mut context = HashMap::new();
        global::get_text_map_propagator(|p| p.inject_context(&cx, &mut context));
        PushSpan { cx, context }
    }
}

/// `meridian.apply` → `apply`, for the change record's description.
fn short(name: &str) -> &str {
    name.strip_prefix("meridian.").unwrap_or(name)
}

/// The API span of one change.
#[derive(Debug)]
pub struct ChangeSpan {
    cx: Context,
    change: String,
}

impl ChangeSpan {
    /// The record to write with the change, in the same etcd transaction; `None` when the
    /// trace is not sampled (its pushes would not be recorded either: no etcd write for it).
    pub fn record(&self) -> Option<pb::ChangeTrace> {
        if !self.cx.span().span_context().is_sampled() {
            return None;
        }
        let mut context = HashMap::new();
        global::get_text_map_propagator(|p| p.inject_context(&self.cx, &mut context));
        Some(pb::ChangeTrace {
            context,
            written_at_unix_ms: unix_ms(SystemTime::now()),
            change: self.change.clone(),
        })
    }

    /// Ends the span: the change was committed at `revision` (0: nothing was written).
    pub fn committed(self, outcome: &'static str, revision: i64) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(OUTCOME, outcome));
        if revision > 0 {
            span.set_attribute(KeyValue::new(ETCD_REVISION, revision));
        }
        span.end();
    }

    /// Ends the span with the error that refused the change.
    pub fn failed(self, error: &tonic::Status) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(OUTCOME, "error"));
        span.set_attribute(KeyValue::new(ERROR, error.message().to_owned()));
        span.set_status(Status::error(format!(
            "{:?}: {}",
            error.code(),
            error.message()
        )));
        span.end();
    }
}

/// One agent's push span, open until the agent answers.
#[derive(Debug)]
pub struct PushSpan {
    cx: Context,
    context: HashMap<String, String>,
}

impl PushSpan {
    /// The span's W3C context, for `RoutingUpdate.trace_context`.
    pub fn context(&self) -> &HashMap<String, String> {
        &self.context
    }

    /// The agent acknowledged the table.
    pub fn acked(self) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(RESULT, "ack"));
        span.end();
    }

    /// The push did not end in an ack: `result` says how (`nack`, `timeout`, the session's
    /// end), `reason` why.
    pub fn failed(self, result: &'static str, reason: &str) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(RESULT, result));
        span.set_attribute(KeyValue::new(ERROR, reason.to_owned()));
        span.set_status(Status::error(format!("{result}: {reason}")));
        span.end();
    }
}

/// Reads W3C headers out of gRPC request metadata.
struct Metadata<'m>(&'m tonic::metadata::MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                tonic::metadata::KeyRef::Ascii(key) => Some(key.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_unless_export_was_set_up() {
        // No test initialises telemetry: export is off, so nothing is traced.
        assert!(Tracing::when_enabled("cp-0").is_none());
    }

    #[test]
    fn reads_w3c_headers_from_grpc_metadata() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        metadata.insert("traceparent", traceparent.parse().expect("ascii"));
        metadata.insert("tracestate", "vendor=1".parse().expect("ascii"));
        metadata.insert_bin(
            "opaque-bin",
            tonic::metadata::MetadataValue::from_bytes(b"\x00\x01"),
        );
        let extractor = Metadata(&metadata);
        assert_eq!(extractor.get("traceparent"), Some(traceparent));
        assert_eq!(extractor.get("tracestate"), Some("vendor=1"));
        assert_eq!(extractor.get("missing"), None);
        let mut keys = extractor.keys();
        keys.sort_unstable();
        assert_eq!(keys, vec!["traceparent", "tracestate"]);
        assert_eq!(short(APPLY_SPAN), "apply");
        assert_eq!(short(DELETE_SPAN), "delete");
    }
}
