//! An OTLP/gRPC trace receiver for tests: collects the spans the binaries export (the real
//! protocol, opentelemetry-proto's tonic server types) on a loopback port, and waits for spans by
//! name, trace and attribute.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;

use crate::poll_until;

/// OTLP span kinds (opentelemetry.proto.trace.v1.Span.SpanKind).
pub const KIND_SERVER: i32 = 2;
pub const KIND_CLIENT: i32 = 3;
pub const KIND_PRODUCER: i32 = 4;
pub const KIND_CONSUMER: i32 = 5;

/// OTLP status codes (opentelemetry.proto.trace.v1.Status.StatusCode).
pub const STATUS_UNSET: i32 = 0;
pub const STATUS_OK: i32 = 1;
pub const STATUS_ERROR: i32 = 2;

/// One received span, flattened: ids in lower-case hex (empty parent for a root), attribute
/// values as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedSpan {
    /// The `service.name` of the exporting process's resource.
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub kind: i32,
    pub attributes: BTreeMap<String, String>,
    /// The span's status code ([`STATUS_UNSET`], [`STATUS_OK`] or [`STATUS_ERROR`]).
    pub status_code: i32,
    /// The status message (set with an error).
    pub status_message: String,
}

impl ReceivedSpan {
    /// The attribute `key` as text.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Debug, Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .map(value_text)
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    received.push(ReceivedSpan {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        kind: span.kind,
                        attributes: span
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), value_text(kv)))
                            .collect(),
                        status_code: span.status.as_ref().map_or(STATUS_UNSET, |s| s.code),
                        status_message: span
                            .status
                            .as_ref()
                            .map(|s| s.message.clone())
                            .unwrap_or_default(),
                    });
                }
            }
        }
        self.spans
            .lock()
            .map_err(|_| tonic::Status::internal("collector lock poisoned"))?
            .extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn value_text(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v: &AnyValue| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// The receiver: serves until dropped.
pub struct OtlpReceiver {
    addr: SocketAddr,
    collector: Collector,
    _stop: oneshot::Sender<()>,
}

impl OtlpReceiver {
    /// Listens on a fresh port of 127.0.0.1.
    pub async fn start() -> Result<OtlpReceiver> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the OTLP receiver")?;
        let addr = listener.local_addr()?;
        let collector = Collector::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(error) = served {
                eprintln!("OTLP receiver stopped: {error}");
            }
        });
        Ok(OtlpReceiver {
            addr,
            collector,
            _stop: stop,
        })
    }

    /// The value for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        match self.collector.spans.lock() {
            Ok(spans) => spans.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The spans of trace `trace_id` received so far.
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }

    /// Polls until `check` accepts the spans received (it says what is missing otherwise);
    /// returns what it returned.
    pub async fn wait_for<T, F>(&self, within: Duration, what: &str, check: F) -> Result<T>
    where
        F: Fn(&[ReceivedSpan]) -> Result<T>,
    {
        let check = &check;
        poll_until(within, what, || async move { check(&self.spans()) }).await
    }
}

/// Finds the one span named `name` from `service` among `spans`, satisfying `filter`.
pub fn find<'s>(
    spans: &'s [ReceivedSpan],
    service: &str,
    name: &str,
    filter: impl Fn(&ReceivedSpan) -> bool,
) -> Option<&'s ReceivedSpan> {
    spans
        .iter()
        .find(|s| s.service == service && s.name == name && filter(s))
}

/// A fresh random, sampled W3C trace context: (trace id, parent span id, `traceparent` value).
pub fn new_traceparent() -> (String, String, String) {
    let trace_id = format!("{:016x}{:016x}", random_u64(), random_u64());
    let span_id = format!("{:016x}", random_u64() | 1);
    let header = format!("00-{trace_id}-{span_id}-01");
    (trace_id, span_id, header)
}

/// The (trace id, span id) of a W3C `traceparent` value (`00-<trace>-<span>-<flags>`).
pub fn parse_traceparent(value: &str) -> Option<(String, String)> {
    let mut fields = value.split('-');
    let (_version, trace_id, span_id, _flags) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    (trace_id.len() == 32 && span_id.len() == 16).then(|| (trace_id.to_owned(), span_id.to_owned()))
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}
