//! OpenTelemetry spans of the request path: a server span per request (`meridian.request`) and a
//! client span per attempt (`meridian.attempt`), with the routing decision as attributes, and
//! W3C trace context taken from the request and passed to the upstream.
//!
//! Only built when export is on ([`meridian_common::telemetry::enabled`] at start): the proxy
//! holds an `Option<SpanFactory>` and does nothing for tracing when it is `None`.

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use opentelemetry::global::{self, BoxedTracer};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue};

/// Server span name.
pub const REQUEST_SPAN: &str = "meridian.request";
/// Client span name.
pub const ATTEMPT_SPAN: &str = "meridian.attempt";

pub const FUNCTION: &str = "meridian.function";
pub const NAMESPACE: &str = "meridian.namespace";
pub const SOURCE_REGION: &str = "meridian.source_region";
pub const CHOSEN_REGION: &str = "meridian.chosen_region";
pub const HELD_MS: &str = "meridian.held_ms";
pub const ATTEMPT: &str = "meridian.attempt";
pub const TIER: &str = "meridian.tier";
pub const ENDPOINT: &str = "meridian.endpoint";
pub const REASON: &str = "meridian.reason";
pub const ERROR: &str = "meridian.error";
pub const METHOD: &str = "http.request.method";
pub const STATUS: &str = "http.response.status_code";

/// Makes the spans of one sidecar.
#[derive(Debug)]
pub struct SpanFactory {
    tracer: BoxedTracer,
}

impl SpanFactory {
    /// A factory when span export is on; `None` (no tracing work at all) when it is off.
    pub fn when_enabled() -> Option<Self> {
        meridian_common::telemetry::enabled().then(|| Self {
            tracer: global::tracer("meridian-sidecar"),
        })
    }

    /// Starts the server span of a request, as a child of the trace context its headers carry
    /// (a new trace without one). Attributes are built only for a span the sampler keeps: an
    /// unsampled request pays for the context and ids it must propagate, not for attributes.
    pub fn request(
        &self,
        headers: &HeaderMap,
        method: &Method,
        source_region: &str,
    ) -> RequestSpan {
        let parent = global::get_text_map_propagator(|p| p.extract(&Extract(headers)));
        let span = self
            .tracer
            .span_builder(REQUEST_SPAN)
            .with_kind(SpanKind::Server)
            .start_with_context(&self.tracer, &parent);
        let recording = span.is_recording();
        let request = RequestSpan {
            cx: parent.with_span(span),
            recording,
        };
        if recording {
            request.set(KeyValue::new(METHOD, method.as_str().to_owned()));
            request.set(KeyValue::new(SOURCE_REGION, source_region.to_owned()));
        }
        request
    }

    /// Starts the client span of attempt `number` (from 1), a child of `request`. `reason` is
    /// asked only when the span is recorded.
    pub fn attempt(
        &self,
        request: &RequestSpan,
        number: u32,
        region: &str,
        local: bool,
        endpoint: &str,
        reason: impl FnOnce() -> Option<String>,
    ) -> AttemptSpan {
        if !request.recording {
            // Unsampled: the upstream needs the trace id and the "not sampled" flag, which the
            // request's own context carries; a span of its own would only cost.
            return AttemptSpan {
                cx: request.cx.clone(),
                recording: false,
            };
        }
        let mut span = self
            .tracer
            .span_builder(ATTEMPT_SPAN)
            .with_kind(SpanKind::Client)
            .start_with_context(&self.tracer, &request.cx);
        if span.is_recording() {
            let mut attributes = vec![
                KeyValue::new(ATTEMPT, i64::from(number)),
                KeyValue::new(TIER, if local { "local" } else { "remote" }),
                KeyValue::new(ENDPOINT, endpoint.to_owned()),
                KeyValue::new(CHOSEN_REGION, region.to_owned()),
            ];
            if let Some(reason) = reason() {
                attributes.push(KeyValue::new(REASON, reason));
            }
            span.set_attributes(attributes);
            request.set(KeyValue::new(CHOSEN_REGION, region.to_owned()));
        }
        AttemptSpan {
            cx: request.cx.with_span(span),
            recording: true,
        }
    }
}

/// The server span of one request.
#[derive(Debug)]
pub struct RequestSpan {
    cx: Context,
    /// Whether the sampler kept it: nothing is built for attributes otherwise.
    recording: bool,
}

impl RequestSpan {
    pub fn set(&self, attribute: KeyValue) {
        self.cx.span().set_attribute(attribute);
    }

    /// Why the request was held or refused (`cold-start`, `budget-exhausted`).
    pub fn reason(&self, reason: &'static str) {
        if self.recording {
            self.set(KeyValue::new(REASON, reason));
        }
    }

    /// How long the request waited for a local instance.
    pub fn held(&self, millis: u64) {
        if self.recording {
            self.set(KeyValue::new(
                HELD_MS,
                i64::try_from(millis).unwrap_or(i64::MAX),
            ));
            self.reason("cold-start");
        }
    }

    pub fn function(&self, namespace: &str, name: &str) {
        if self.recording {
            self.set(KeyValue::new(FUNCTION, name.to_owned()));
            self.set(KeyValue::new(NAMESPACE, namespace.to_owned()));
        }
    }

    /// Ends the span with the status answered.
    pub fn finish(self, status: u16) {
        let span = self.cx.span();
        if self.recording {
            span.set_attribute(KeyValue::new(STATUS, i64::from(status)));
            if status >= 500 {
                span.set_status(Status::error(format!("answered {status}")));
            }
        }
        span.end();
    }
}

/// The client span of one attempt.
#[derive(Debug)]
pub struct AttemptSpan {
    /// The attempt's own span when recorded, else the (unsampled) request's context.
    cx: Context,
    recording: bool,
}

impl AttemptSpan {
    /// Sets `traceparent` (and `tracestate`) of this span on the upstream request, replacing the
    /// caller's: the remote region's gateway span becomes this attempt's child.
    pub fn inject(&self, headers: &mut HeaderMap) {
        global::get_text_map_propagator(|p| p.inject_context(&self.cx, &mut Inject(headers)));
    }

    /// Ends the span with the upstream's status.
    pub fn answered(self, status: u16) {
        if !self.recording {
            return;
        }
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(STATUS, i64::from(status)));
        if status >= 500 {
            span.set_status(Status::error(format!("answered {status}")));
        }
        span.end();
    }

    /// Ends the span with the error that ended the attempt.
    pub fn failed(self, error: String) {
        if !self.recording {
            return;
        }
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(ERROR, error.clone()));
        span.set_status(Status::error(error));
        span.end();
    }
}

struct Extract<'h>(&'h HeaderMap);

impl Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct Inject<'h>(&'h mut HeaderMap);

impl Injector for Inject<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The W3C propagator writes `tracestate` even when it is empty: send none (and drop the
        // caller's, which this context would have carried were it not empty).
        if value.is_empty() {
            self.0.remove(key);
            return;
        }
        // The propagator only produces valid names and values; anything else is dropped rather
        // than failing the request.
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}
