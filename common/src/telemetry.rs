//! Logging and tracing set-up shared by every binary: `tracing` to stderr, filtered by
//! `RUST_LOG`; and, when an OTLP endpoint is configured by the standard `OTEL_*` variables,
//! spans exported over OTLP/gRPC (batched) with W3C trace-context propagation.
//!
//! Export is off unless `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is
//! set: then there is no exporter, no OpenTelemetry layer and [`enabled`] is false, so hot paths
//! that check it once at start pay nothing. A bad `OTEL_*` value is reported on stderr, naming
//! the variable, and the process runs without export: observability must never stop the data
//! plane.

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

pub const OTEL_EXPORTER_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub const OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
pub const OTEL_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
pub const OTEL_TRACES_SAMPLER: &str = "OTEL_TRACES_SAMPLER";
pub const OTEL_TRACES_SAMPLER_ARG: &str = "OTEL_TRACES_SAMPLER_ARG";
pub const OTEL_RESOURCE_ATTRIBUTES: &str = "OTEL_RESOURCE_ATTRIBUTES";
pub const OTEL_SDK_DISABLED: &str = "OTEL_SDK_DISABLED";

/// How long [`shutdown`] waits for the last spans to be sent.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// The provider of this process, once export is on (also the "enabled" flag).
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Why span export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid {var} {value:?}: {why}")]
    Invalid {
        var: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("invalid {var} {value:?}: not a number")]
    NotANumber {
        var: &'static str,
        value: String,
        #[source]
        source: std::num::ParseFloatError,
    },
    #[error("cannot build the OTLP/gRPC span exporter (from {OTEL_EXPORTER_OTLP_TRACES_ENDPOINT} or {OTEL_EXPORTER_OTLP_ENDPOINT})")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
    #[error("OTLP/gRPC export needs a Tokio runtime: telemetry must be set up inside one")]
    NoRuntime(#[source] tokio::runtime::TryCurrentError),
}

/// Installs the global subscriber, with span export when configured; the service name defaults
/// to the binary's file name. `default_filter` applies when `RUST_LOG` is unset, e.g. `"info"`.
/// Safe to call twice (the second call is a no-op).
pub fn init(default_filter: &str) {
    init_with_service(default_filter, &binary_name());
}

/// Like [`init`], with `service_name` as the service name when `OTEL_SERVICE_NAME` (or
/// `service.name` in `OTEL_RESOURCE_ATTRIBUTES`) does not give one. Export needs a Tokio
/// runtime (the gRPC channel lives on it): call this inside one.
pub fn init_with_service(default_filter: &str, service_name: &str) {
    if tracing::dispatcher::has_been_set() {
        return;
    }
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        // Colour codes only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(filter);
    let var = |name: &str| std::env::var(name).ok();
    let provider = if export_requested(var) {
        match build_provider(var, service_name) {
            Ok(provider) => Some(provider),
            Err(error) => {
                // The subscriber is not installed yet: stderr is the only way to say it.
                eprintln!(
                    "error: OpenTelemetry export disabled: {}",
                    crate::error_chain(&error)
                );
                None
            }
        }
    } else {
        None
    };
    // Only Meridian's own spans are exported: hyper's, h2's and tonic's would multiply the cost
    // of every request and say nothing about routing. Independent of RUST_LOG on purpose.
    let otel = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("meridian"))
            .with_filter(Targets::new().with_target("meridian", Level::INFO))
    });
    if tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .is_err()
    {
        return;
    }
    if let Some(provider) = provider {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        opentelemetry::global::set_tracer_provider(provider.clone());
        let _ = PROVIDER.set(provider);
    }
}

/// Whether spans are exported (decided once by `init`). Request paths read it once at start and
/// skip all span work when it is false.
pub fn enabled() -> bool {
    PROVIDER.get().is_some()
}

/// The W3C trace-context fields (`traceparent`, and `tracestate` when it has entries) of the
/// current span, to put on a request leaving this process so that the callee's spans join the
/// trace. Empty when export is off.
pub fn current_context_fields() -> Vec<(String, String)> {
    if !enabled() {
        return Vec::new();
    }
    let context = tracing_opentelemetry::OpenTelemetrySpanExt::context(&tracing::Span::current());
    let mut fields = std::collections::HashMap::new();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut fields)
    });
    fields.into_iter().collect()
}

/// Sends the spans still queued and stops the exporter (waits at most 5 s). Call it once, at the
/// end of `main`; a no-op when export is off. It blocks the calling thread: on a multi-thread
/// runtime the workers keep driving the gRPC channel meanwhile.
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get() {
        if let Err(error) = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            eprintln!("warning: OpenTelemetry shutdown: {error}");
        }
    }
}

/// The running binary's file name, the default service name.
fn binary_name() -> String {
    std::env::args_os()
        .next()
        .as_deref()
        .map(std::path::Path::new)
        .and_then(|path| path.file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "meridian".to_owned())
}

/// An endpoint variable is set (non-empty) and the SDK is not disabled.
fn export_requested(var: impl Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| var(name).is_some_and(|v| !v.trim().is_empty());
    let disabled = var(OTEL_SDK_DISABLED).is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    !disabled && (set(OTEL_EXPORTER_OTLP_ENDPOINT) || set(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT))
}

/// What the `OTEL_*` variables ask for, validated.
#[derive(Debug)]
struct Settings {
    sampler: Sampler,
    /// Resource attributes, `service.name` included (exactly once).
    resource: Vec<KeyValue>,
}

fn settings(
    var: impl Fn(&str) -> Option<String>,
    default_service: &str,
) -> Result<Settings, TelemetryError> {
    let sampler = sampler(
        var(OTEL_TRACES_SAMPLER).as_deref(),
        var(OTEL_TRACES_SAMPLER_ARG).as_deref(),
    )?;
    let mut resource = match var(OTEL_RESOURCE_ATTRIBUTES) {
        Some(text) => resource_attributes(&text)?,
        None => Vec::new(),
    };
    // OTEL_SERVICE_NAME wins over service.name in the attributes, which wins over the default.
    let service = match var(OTEL_SERVICE_NAME).filter(|s| !s.trim().is_empty()) {
        Some(name) => Some(name.trim().to_owned()),
        None if resource.iter().any(|kv| kv.key.as_str() == "service.name") => None,
        None => Some(default_service.to_owned()),
    };
    if let Some(service) = service {
        resource.retain(|kv| kv.key.as_str() != "service.name");
        resource.push(KeyValue::new("service.name", service));
    }
    Ok(Settings { sampler, resource })
}

/// `OTEL_TRACES_SAMPLER` (default `parentbased_always_on`) with its ratio argument.
fn sampler(name: Option<&str>, arg: Option<&str>) -> Result<Sampler, TelemetryError> {
    let ratio = || -> Result<f64, TelemetryError> {
        // The specification's default ratio when the argument is missing.
        let Some(text) = arg.map(str::trim).filter(|t| !t.is_empty()) else {
            return Ok(1.0);
        };
        let ratio: f64 = text.parse().map_err(|source| TelemetryError::NotANumber {
            var: OTEL_TRACES_SAMPLER_ARG,
            value: text.to_owned(),
            source,
        })?;
        if !(0.0..=1.0).contains(&ratio) {
            return Err(TelemetryError::Invalid {
                var: OTEL_TRACES_SAMPLER_ARG,
                value: text.to_owned(),
                why: "a ratio must be between 0 and 1",
            });
        }
        Ok(ratio)
    };
    let name = name.map(str::trim).filter(|n| !n.is_empty());
    Ok(match name.unwrap_or("parentbased_always_on") {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatioBased(ratio()?),
        "parentbased_always_on" => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        "parentbased_traceidratio" => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio()?)))
        }
        other => {
            return Err(TelemetryError::Invalid {
                var: OTEL_TRACES_SAMPLER,
                value: other.to_owned(),
                why: "expected always_on, always_off, traceidratio, parentbased_always_on, \
                      parentbased_always_off or parentbased_traceidratio",
            })
        }
    })
}

/// `key1=value1,key2=value2` (values percent-encoded, W3C Baggage style).
fn resource_attributes(text: &str) -> Result<Vec<KeyValue>, TelemetryError> {
    let bad = |why| TelemetryError::Invalid {
        var: OTEL_RESOURCE_ATTRIBUTES,
        value: text.to_owned(),
        why,
    };
    let mut attributes: Vec<KeyValue> = Vec::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| bad("every entry must be key=value"))?;
        let key = key.trim();
        if key.is_empty() {
            return Err(bad("an entry has an empty key"));
        }
        let value = percent_decode(value.trim()).ok_or_else(|| bad("bad percent-encoding"))?;
        // The last of repeated keys wins, as with the SDK's own parser.
        attributes.retain(|kv| kv.key.as_str() != key);
        attributes.push(KeyValue::new(key.to_owned(), value));
    }
    Ok(attributes)
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        if byte == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(byte);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn build_provider(
    var: impl Fn(&str) -> Option<String>,
    default_service: &str,
) -> Result<SdkTracerProvider, TelemetryError> {
    let settings = settings(var, default_service)?;
    // The tonic channel spawns its worker on the current runtime; without one it would panic.
    tokio::runtime::Handle::try_current().map_err(TelemetryError::NoRuntime)?;
    // The exporter reads the endpoint (and headers, timeout, compression) from the
    // OTEL_EXPORTER_OTLP_* variables itself.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(TelemetryError::Exporter)?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(settings.sampler)
        .with_resource(
            Resource::builder_empty()
                .with_attributes(settings.resource)
                .build(),
        )
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    fn attribute(settings: &Settings, key: &str) -> Option<String> {
        settings
            .resource
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    }

    #[test]
    fn export_only_with_an_endpoint() {
        assert!(!export_requested(vars(&[])));
        assert!(!export_requested(vars(&[(
            OTEL_EXPORTER_OTLP_ENDPOINT,
            " "
        )])));
        assert!(export_requested(vars(&[(
            OTEL_EXPORTER_OTLP_ENDPOINT,
            "http://127.0.0.1:4317"
        )])));
        assert!(export_requested(vars(&[(
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
            "http://127.0.0.1:4317"
        )])));
        assert!(!export_requested(vars(&[
            (OTEL_EXPORTER_OTLP_ENDPOINT, "http://127.0.0.1:4317"),
            (OTEL_SDK_DISABLED, "true"),
        ])));
    }

    #[test]
    fn samplers() {
        let debug = |name: Option<&str>, arg: Option<&str>| format!("{:?}", sampler(name, arg));
        assert_eq!(debug(None, None), "Ok(ParentBased(AlwaysOn))");
        assert_eq!(debug(Some("always_on"), None), "Ok(AlwaysOn)");
        assert_eq!(debug(Some("always_off"), None), "Ok(AlwaysOff)");
        assert_eq!(
            debug(Some("traceidratio"), Some("0.25")),
            "Ok(TraceIdRatioBased(0.25))"
        );
        assert_eq!(
            debug(Some("traceidratio"), None),
            "Ok(TraceIdRatioBased(1.0))"
        );
        assert_eq!(
            debug(Some("parentbased_traceidratio"), Some("0.01")),
            "Ok(ParentBased(TraceIdRatioBased(0.01)))"
        );
        assert_eq!(
            debug(Some("parentbased_always_off"), None),
            "Ok(ParentBased(AlwaysOff))"
        );
    }

    #[test]
    fn bad_sampler_values_name_the_variable() {
        let message = |name: &str, arg: Option<&str>| match sampler(Some(name), arg) {
            Ok(s) => panic!("{name} {arg:?} accepted as {s:?}"),
            Err(e) => crate::error_chain(&e),
        };
        assert!(message("sometimes", None).contains("OTEL_TRACES_SAMPLER \"sometimes\""));
        assert!(message("traceidratio", Some("half")).contains("OTEL_TRACES_SAMPLER_ARG"));
        assert!(message("traceidratio", Some("1.5")).contains("between 0 and 1"));
    }

    #[test]
    fn service_name_precedence() {
        let s = settings(vars(&[]), "meridian-sidecar").unwrap();
        assert_eq!(
            attribute(&s, "service.name").as_deref(),
            Some("meridian-sidecar")
        );
        let s = settings(
            vars(&[(
                OTEL_RESOURCE_ATTRIBUTES,
                "service.name=from-attrs,zone=a%2Cb",
            )]),
            "default",
        )
        .unwrap();
        assert_eq!(attribute(&s, "service.name").as_deref(), Some("from-attrs"));
        assert_eq!(attribute(&s, "zone").as_deref(), Some("a,b"));
        let s = settings(
            vars(&[
                (OTEL_RESOURCE_ATTRIBUTES, "service.name=from-attrs"),
                (OTEL_SERVICE_NAME, "from-env"),
            ]),
            "default",
        )
        .unwrap();
        assert_eq!(attribute(&s, "service.name").as_deref(), Some("from-env"));
        assert_eq!(
            s.resource
                .iter()
                .filter(|kv| kv.key.as_str() == "service.name")
                .count(),
            1
        );
    }

    #[test]
    fn bad_resource_attributes_name_the_variable() {
        for text in ["novalue", "=x", "k=%zz"] {
            let error = settings(vars(&[(OTEL_RESOURCE_ATTRIBUTES, text)]), "d").unwrap_err();
            assert!(
                error.to_string().contains(OTEL_RESOURCE_ATTRIBUTES),
                "{error}"
            );
        }
    }

    #[test]
    fn no_runtime_is_an_error_not_a_panic() {
        let error = build_provider(
            vars(&[(OTEL_EXPORTER_OTLP_ENDPOINT, "http://127.0.0.1:4317")]),
            "d",
        )
        .unwrap_err();
        assert!(matches!(error, TelemetryError::NoRuntime(_)), "{error}");
    }
}
