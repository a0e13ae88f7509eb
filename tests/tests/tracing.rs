//! Traces of the data plane, received by a real OTLP/gRPC receiver: a request that fails over from
//! us-east (its local URL is dead) to eu-west is ONE trace, with the caller's span as the root's
//! parent, a server span from each region's sidecar, attempt spans with the failover reason, and
//! the remote server span a child of the local attempt that reached it. With the `OTEL_*`
//! variables unset nothing is exported and the sidecar leaves trace context alone.

use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use http::{Method, StatusCode};
use meridian_tests::http::empty;
use meridian_tests::otlp::{
    find, new_traceparent, OtlpReceiver, ReceivedSpan, KIND_CLIENT, KIND_SERVER,
};
use meridian_tests::{
    backend_spec, free_addr, region_ip, sample_spec, start_samples, Relay, SidecarOpts, World,
};

const US: &str = "meridian-sidecar-us-east";
const EU: &str = "meridian-sidecar-eu-west";

/// The spans of one failed-over request.
#[derive(Debug)]
struct Failover {
    us_request: ReceivedSpan,
    us_attempts: Vec<ReceivedSpan>,
    eu_request: ReceivedSpan,
    eu_attempt: ReceivedSpan,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_is_one_trace_across_both_regions() -> Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let template = SidecarOpts {
        env: vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), receiver.endpoint()),
            // Export within a fifth of a second instead of five: the test waits for it.
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into()),
        ],
        ..Default::default()
    };
    let world = World::start_with(
        &["us-east", "eu-west"],
        Relay::with_default_latencies(),
        template,
    )
    .await?;
    let instances = start_samples(&[("eu-west", 1)]).await?;
    // Nothing listens there: every local attempt is refused.
    let dead = format!("http://{}", free_addr(region_ip(0))?);
    world
        .apply(backend_spec(
            "hello",
            &[("us-east", dead), ("eu-west", instances[0].url())],
        ))
        .await?;
    world
        .wait_served("us-east", "hello", "eu-west", Duration::from_secs(30))
        .await?;

    let (trace_id, caller_span, traceparent) = new_traceparent();
    let reply = world
        .sidecar("us-east")
        .client()
        .send(
            Method::GET,
            "hello",
            "/",
            &[("traceparent", &traceparent)],
            empty(),
            Duration::from_secs(10),
        )
        .await?;
    ensure!(
        reply.status == StatusCode::OK && reply.region() == Some("eu-west"),
        "{}",
        reply.describe()
    );

    let failover = receiver
        .wait_for(
            Duration::from_secs(15),
            "both sidecars' spans of the traced request",
            |spans| {
                let trace: Vec<ReceivedSpan> = spans
                    .iter()
                    .filter(|s| s.trace_id == trace_id)
                    .cloned()
                    .collect();
                let missing = |what: &str| anyhow!("no {what} yet in trace {trace_id}: {trace:#?}");
                let us_request = find(&trace, US, "meridian.request", |_| true)
                    .ok_or_else(|| missing("us-east request span"))?
                    .clone();
                let us_attempts: Vec<ReceivedSpan> = trace
                    .iter()
                    .filter(|s| s.service == US && s.name == "meridian.attempt")
                    .cloned()
                    .collect();
                ensure!(
                    us_attempts
                        .iter()
                        .any(|s| s.attr("meridian.chosen_region") == Some("eu-west")),
                    "{}",
                    missing("us-east attempt to eu-west")
                );
                let eu_request = find(&trace, EU, "meridian.request", |_| true)
                    .ok_or_else(|| missing("eu-west request span"))?
                    .clone();
                let eu_attempt = find(&trace, EU, "meridian.attempt", |_| true)
                    .ok_or_else(|| missing("eu-west attempt span"))?
                    .clone();
                Ok(Failover {
                    us_request,
                    us_attempts,
                    eu_request,
                    eu_attempt,
                })
            },
        )
        .await?;
    eprintln!("{failover:#?}");
    let Failover {
        us_request,
        us_attempts,
        eu_request,
        eu_attempt,
    } = &failover;

    // us-east's server span continues the caller's trace.
    ensure!(us_request.kind == KIND_SERVER, "{us_request:#?}");
    ensure!(us_request.parent_span_id == caller_span, "{us_request:#?}");
    for (key, want) in [
        ("meridian.function", "hello"),
        ("meridian.namespace", "default"),
        ("meridian.source_region", "us-east"),
        ("meridian.chosen_region", "eu-west"),
        ("http.request.method", "GET"),
        ("http.response.status_code", "200"),
    ] {
        ensure!(
            us_request.attr(key) == Some(want),
            "{key} of the us-east request span: {us_request:#?}"
        );
    }

    // Its attempts are its children; the one that left the region says why.
    for attempt in us_attempts {
        ensure!(attempt.kind == KIND_CLIENT, "{attempt:#?}");
        ensure!(
            attempt.parent_span_id == us_request.span_id,
            "attempt not a child of the request span: {attempt:#?}"
        );
    }
    let to_eu = us_attempts
        .iter()
        .find(|s| s.attr("meridian.chosen_region") == Some("eu-west"))
        .ok_or_else(|| anyhow!("no attempt to eu-west: {us_attempts:#?}"))?;
    let reason = to_eu.attr("meridian.reason").unwrap_or_default();
    ensure!(
        reason == "ejected" || reason.starts_with("retry: "),
        "failover reason {reason:?}: {to_eu:#?}"
    );
    ensure!(to_eu.attr("meridian.tier") == Some("remote"), "{to_eu:#?}");
    ensure!(
        to_eu
            .attr("meridian.endpoint")
            .is_some_and(|e| !e.is_empty()),
        "{to_eu:#?}"
    );
    if reason.starts_with("retry: ") {
        // The retried attempt went to the dead local URL first.
        ensure!(
            us_attempts
                .iter()
                .any(|s| s.attr("meridian.tier") == Some("local")
                    && s.attr("meridian.attempt") == Some("1")),
            "{us_attempts:#?}"
        );
    }

    // eu-west's gateway span is a child of the us-east attempt that reached it.
    ensure!(eu_request.kind == KIND_SERVER, "{eu_request:#?}");
    ensure!(
        eu_request.parent_span_id == to_eu.span_id,
        "remote server span's parent is not the local attempt: {eu_request:#?}"
    );
    ensure!(
        eu_request.attr("meridian.source_region") == Some("us-east"),
        "{eu_request:#?}"
    );
    ensure!(
        eu_attempt.parent_span_id == eu_request.span_id
            && eu_attempt.attr("meridian.tier") == Some("local"),
        "{eu_attempt:#?}"
    );

    // The instance saw the trace context of eu-west's attempt.
    let seen = reply
        .headers
        .get("x-seen-traceparent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    ensure!(
        seen == format!("00-{trace_id}-{}-01", eu_attempt.span_id),
        "instance saw traceparent {seen:?}, eu-west attempt is {}",
        eu_attempt.span_id
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_otel_unset_nothing_is_exported_and_trace_context_passes_untouched() -> Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let world = World::start_with(
        &["us-east"],
        Relay::with_default_latencies(),
        SidecarOpts::default(),
    )
    .await?;
    let instances = start_samples(&[("us-east", 1)]).await?;
    world
        .apply(sample_spec("hello", &instances.iter().collect::<Vec<_>>()))
        .await?;
    world
        .wait_served("us-east", "hello", "us-east", Duration::from_secs(20))
        .await?;
    let client = world.sidecar("us-east").client();

    let (_, _, traceparent) = new_traceparent();
    let reply = client
        .send(
            Method::GET,
            "hello",
            "/",
            &[("traceparent", &traceparent)],
            empty(),
            Duration::from_secs(10),
        )
        .await?;
    ensure!(reply.status == StatusCode::OK, "{}", reply.describe());
    // No span was made in between: the instance got the caller's context as it was.
    let seen = reply
        .headers
        .get("x-seen-traceparent")
        .and_then(|v| v.to_str().ok());
    ensure!(seen == Some(traceparent.as_str()), "instance saw {seen:?}");
    let reply = client.get("hello", "/").await?;
    ensure!(
        reply.status == StatusCode::OK && !reply.headers.contains_key("x-seen-traceparent"),
        "a traceparent was created: {}",
        reply.describe()
    );
    ensure!(
        receiver.spans().is_empty(),
        "spans exported: {:#?}",
        receiver.spans()
    );
    Ok(())
}
