//! Blame where it belongs: what a client does wrong is answered to that client and never held
//! against the function's instances. A function has one healthy instance in us-east and another
//! region (eu-west) to fail over to; malformed, cut-off and stalled request bodies get a 4xx with
//! `meridian-error` (or, for a client that is gone, are counted as its doing), the instance is
//! never ejected, and not one following request moves to eu-west. Requests with ambiguous
//! framing never reach a backend, and no header a client sets for the mesh or for one hop
//! reaches the function.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use meridian_proto::v1::RoutingPolicy;
use meridian_tests::http::{raw_exchange, Body, Reply};
use meridian_tests::{
    backend_spec, free_port, function_tiers, metric_value, poll_until, region_ip, Relay,
    SidecarOpts, TestBackend, World,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every test here ends within this, whatever happens.
const TEST_BUDGET: Duration = Duration::from_secs(60);
/// The functions' per-try timeout: what a stalled body runs into (the default is 5 s).
const PER_TRY_MS: u32 = 1500;
/// Normal requests sent after the bad ones; every one must be served in us-east.
const FOLLOWING: usize = 20;

async fn within(test: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(TEST_BUDGET, test)
        .await
        .map_err(|_| anyhow!("the test did not finish within {TEST_BUDGET:?}"))?
}

fn fresh_addr(region_index: usize) -> Result<SocketAddr> {
    let ip = region_ip(region_index);
    Ok(SocketAddr::from((ip, free_port(ip)?)))
}

/// A world of us-east and eu-west serving `function` from one backend in each; us-east's
/// sidecar serves it locally and has probed eu-west up, so failing over would be possible.
async fn two_regions(function: &str) -> Result<(World, TestBackend, TestBackend)> {
    let world = World::start_with(
        &["us-east", "eu-west"],
        Relay::new(),
        SidecarOpts::default(),
    )
    .await?;
    let east = TestBackend::start(fresh_addr(0)?, "east").await?;
    let west = TestBackend::start(fresh_addr(1)?, "west").await?;
    let mut spec = backend_spec(
        function,
        &[("us-east", east.url()), ("eu-west", west.url())],
    );
    spec.routing = Some(RoutingPolicy {
        per_try_timeout_ms: Some(PER_TRY_MS),
        ..Default::default()
    });
    world.apply(spec).await?;
    world
        .wait_served("us-east", function, "us-east", Duration::from_secs(20))
        .await?;
    world
        .wait_remote_tiers_up("us-east", function, &["eu-west"], Duration::from_secs(10))
        .await?;
    Ok((world, east, west))
}

/// `region`'s own endpoint of `function` as its sidecar's `/routes` shows it: failure streak,
/// ejected now, ejections ever.
async fn local_endpoint(world: &World, region: &str, function: &str) -> Result<(u64, bool, u64)> {
    let routes = world.sidecar(region).routes().await?;
    let tiers = function_tiers(&routes, function)?;
    let local = tiers
        .iter()
        .find(|t| t.local)
        .with_context(|| format!("no local tier for {function} in {routes}"))?;
    let endpoint = local
        .raw
        .get("endpoints")
        .and_then(|e| e.get(0))
        .with_context(|| format!("no endpoint in the local tier {}", local.raw))?;
    let number = |field: &str| endpoint.get(field).and_then(|v| v.as_u64());
    Ok((
        number("consecutiveFailures").context("consecutiveFailures")?,
        endpoint
            .get("ejected")
            .and_then(|v| v.as_bool())
            .context("ejected")?,
        number("ejections").context("ejections")?,
    ))
}

/// us-east's instance was never held responsible: no failure streak, never ejected, and the
/// sidecar ejected nothing at all.
async fn ensure_blameless(world: &World, function: &str, what: &str) -> Result<()> {
    ensure_blameless_in(world, "us-east", function, what).await
}

/// The same for `region`'s instance, as `region`'s sidecar sees it.
async fn ensure_blameless_in(
    world: &World,
    region: &str,
    function: &str,
    what: &str,
) -> Result<()> {
    let (failures, ejected, ejections) = local_endpoint(world, region, function).await?;
    let metrics = world.sidecar(region).metrics().await?;
    let ejected_total = metric_value(&metrics, "meridian_ejections_total").unwrap_or(0.0);
    ensure!(
        failures == 0 && !ejected && ejections == 0 && ejected_total == 0.0,
        "after {what}, {region}'s healthy instance is blamed: {failures} consecutive failures, \
         ejected now: {ejected}, ejections: {ejections}, meridian_ejections_total \
         {ejected_total}\n/routes: {}",
        world.routes_text(region).await
    );
    Ok(())
}

/// Sends [`FOLLOWING`] normal requests; every one must be served in us-east, and eu-west's
/// instance must have had no request since it had `west_before` (counted once the setup was
/// done: only what follows the bad requests is measured).
async fn ensure_nothing_moves(
    world: &World,
    function: &str,
    west: &TestBackend,
    west_before: u64,
) -> Result<()> {
    let client = world.sidecar("us-east").client();
    let mut moved = Vec::new();
    for _ in 0..FOLLOWING {
        let reply = client.get(function, "/").await?;
        if reply.status != StatusCode::OK || reply.region() != Some("us-east") {
            moved.push(reply.describe());
        }
    }
    let west_got = west.requests() - west_before;
    ensure!(
        moved.is_empty() && west_got == 0,
        "{} of {FOLLOWING} normal requests were not served in us-east, and eu-west's instance \
         got {west_got} requests: {moved:?}",
        moved.len(),
    );
    Ok(())
}

/// `meridian_client_errors_total{cause="<cause>"}` of us-east's sidecar.
async fn client_errors(world: &World, cause: &str) -> Result<f64> {
    let metrics = world.sidecar("us-east").metrics().await?;
    Ok(metric_value(
        &metrics,
        &format!(r#"meridian_client_errors_total{{cause="{cause}"}}"#),
    )
    .unwrap_or(0.0))
}

fn ensure_client_error(reply: &Reply, status: StatusCode, cause: &str, what: &str) -> Result<()> {
    ensure!(
        reply.status == status && reply.error() == Some(cause),
        "{what}: expected {status} with meridian-error {cause}, got {}",
        reply.describe()
    );
    Ok(())
}

/// Every response us-east's sidecar counted for `function`, whatever the tier and status.
async fn answered(world: &World, function: &str) -> Result<f64> {
    let metrics = world.sidecar("us-east").metrics().await?;
    let prefix = format!(r#"meridian_requests_total{{function="{function}","#);
    Ok(metrics
        .lines()
        .filter(|line| line.starts_with(&prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// A request body that sends a little, then fails: the client gives up on it.
fn abandoned_body() -> Body {
    let frames = futures::stream::unfold(0u8, |step| async move {
        match step {
            0 => Some((Ok(Frame::data(Bytes::from_static(b"the start"))), 1)),
            1 => {
                // The client's own pace, not a wait for state: it gives up a moment after it
                // started, typically once the request is on its way upstream (if not, it is
                // abandoned all the same).
                tokio::time::sleep(Duration::from_millis(100)).await;
                let error: Box<dyn std::error::Error + Send + Sync> = "the client gives up".into();
                Some((Err(error), 2))
            }
            _ => None,
        }
    });
    BodyExt::boxed(StreamBody::new(frames))
}

/// Writes `request`, closes the sending side (the client is gone mid-body), and reads
/// whatever comes back until the sidecar closes: the sidecar has then finished with it.
async fn send_and_vanish(addr: SocketAddr, request: &[u8]) -> Result<String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(request).await?;
        stream.shutdown().await?;
        let mut answer = Vec::new();
        // A reset after the answer is as good as a close.
        let _ = stream.read_to_end(&mut answer).await;
        Ok::<_, anyhow::Error>(String::from_utf8_lossy(&answer).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| anyhow!("the sidecar did not finish with a vanished client within 10 s"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_get_a_4xx_and_eject_nothing() -> Result<()> {
    within(async {
        let (world, east, west) = two_regions("blame").await?;
        let west_before = west.requests();
        let outbound = world.sidecar("us-east").outbound();
        let mut replies = Vec::new();
        for _ in 0..10 {
            replies.push(
                raw_exchange(
                    outbound,
                    b"POST / HTTP/1.1\r\nHost: blame\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                )
                .await?,
            );
        }
        // Blame first (what the issue saw: the instance ejected), then what the client got.
        ensure_blameless(&world, "blame", "10 malformed bodies").await?;
        for (n, reply) in replies.iter().enumerate() {
            ensure_client_error(
                reply,
                StatusCode::BAD_REQUEST,
                "bad-request-body",
                &format!("malformed POST {n}"),
            )?;
        }
        let counted = client_errors(&world, "bad-request-body").await?;
        ensure!(
            counted == 10.0,
            "meridian_client_errors_total{{cause=\"bad-request-body\"}} is {counted}, not 10"
        );
        ensure_nothing_moves(&world, "blame", &west, west_before).await?;
        ensure!(east.requests() > 0, "us-east's instance served nothing");
        Ok(())
    })
    .await
}

/// The same bodies sent on to another region: the remote gateway sees a body cut off by the
/// calling sidecar, blames neither its instance nor anyone else, and the caller's region is not
/// marked down either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_sent_through_a_gateway_eject_nothing_there() -> Result<()> {
    within(async {
        let world =
            World::start_with(&["us-east", "eu-west"], Relay::new(), SidecarOpts::default())
                .await?;
        let far = TestBackend::start(fresh_addr(1)?, "far").await?;
        world
            .apply(backend_spec("far", &[("eu-west", far.url())]))
            .await?;
        world
            .wait_served("us-east", "far", "eu-west", Duration::from_secs(20))
            .await?;
        let outbound = world.sidecar("us-east").outbound();
        let mut replies = Vec::new();
        for _ in 0..10 {
            replies.push(
                raw_exchange(
                    outbound,
                    b"POST / HTTP/1.1\r\nHost: far\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
                )
                .await?,
            );
        }
        ensure_blameless_in(&world, "eu-west", "far", "10 malformed bodies from us-east").await?;
        for (n, reply) in replies.iter().enumerate() {
            ensure_client_error(
                reply,
                StatusCode::BAD_REQUEST,
                "bad-request-body",
                &format!("malformed POST {n} through the gateway"),
            )?;
        }
        let client = world.sidecar("us-east").client();
        for _ in 0..FOLLOWING {
            let reply = client.get("far", "/").await?;
            ensure!(
                reply.status == StatusCode::OK && reply.region() == Some("eu-west"),
                "a normal request after the malformed ones: {}",
                reply.describe()
            );
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_clients_count_against_no_endpoint() -> Result<()> {
    within(async {
        let (world, _east, west) = two_regions("vanish").await?;
        let west_before = west.requests();
        let outbound = world.sidecar("us-east").outbound();

        // Six clients gone mid-body (more than the five failures that eject): chunked, and
        // with a declared length too large to be kept for replays, so both are streamed.
        let chunked: &[u8] =
            b"POST / HTTP/1.1\r\nHost: vanish\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n";
        let sized: &[u8] =
            b"POST / HTTP/1.1\r\nHost: vanish\r\nContent-Length: 100000\r\n\r\nonly the start";
        let mut answers = Vec::new();
        for request in [chunked, sized, chunked, sized, chunked, sized] {
            answers.push(send_and_vanish(outbound, request).await?);
        }
        ensure_blameless(&world, "vanish", "6 clients vanished mid-body").await?;
        for answer in &answers {
            ensure!(
                !answer.starts_with("HTTP/1.1 5"),
                "a vanished client was answered as an endpoint failure: {answer:?}"
            );
        }
        let counted = client_errors(&world, "client-disconnected").await?;
        ensure!(
            counted == 6.0,
            "meridian_client_errors_total{{cause=\"client-disconnected\"}} is {counted}, not 6"
        );

        // Six HTTP/2 clients that give up on their body part way (the stream is reset, the
        // connection lives on).
        let h2 = world.sidecar("us-east").client_h2();
        let answered_before = answered(&world, "vanish").await?;
        for _ in 0..6 {
            let sent = h2
                .send(
                    Method::POST,
                    "vanish",
                    "/",
                    &[],
                    abandoned_body(),
                    Duration::from_secs(10),
                )
                .await;
            ensure!(
                sent.is_err(),
                "an abandoned HTTP/2 body was answered: {sent:?}"
            );
        }
        // The client saw its own reset; wait until the sidecar is done with all six too: it
        // has counted them as the clients' doing, or answered them or blamed the instance.
        poll_until(
            Duration::from_secs(10),
            "the sidecar to finish six abandoned HTTP/2 requests",
            || async {
                let counted = client_errors(&world, "client-disconnected").await? - 6.0;
                let answered = answered(&world, "vanish").await? - answered_before;
                let (failures, _, ejections) = local_endpoint(&world, "us-east", "vanish").await?;
                ensure!(
                    counted >= 6.0 || answered >= 6.0 || failures > 0 || ejections > 0,
                    "{counted} of 6 counted as the clients' doing, {answered} answered"
                );
                Ok(())
            },
        )
        .await?;
        ensure_blameless(&world, "vanish", "6 HTTP/2 clients abandoned their bodies").await?;
        let counted = client_errors(&world, "client-disconnected").await?;
        ensure!(
            counted == 12.0,
            "meridian_client_errors_total{{cause=\"client-disconnected\"}} is {counted}, not 12"
        );
        ensure_nothing_moves(&world, "vanish", &west, west_before).await?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_time_out_as_the_clients_fault() -> Result<()> {
    within(async {
        let (world, _east, west) = two_regions("stall").await?;
        let west_before = west.requests();
        let outbound = world.sidecar("us-east").outbound();
        // Five clients at once that send part of a body and then nothing: each runs into the
        // per-try timeout while the sidecar waits for its body.
        let stalls = (0..5).map(|_| {
            raw_exchange(
                outbound,
                b"POST / HTTP/1.1\r\nHost: stall\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            )
        });
        let replies = futures::future::try_join_all(stalls).await?;
        ensure_blameless(&world, "stall", "5 stalled bodies").await?;
        let counted = client_errors(&world, "request-body-timeout").await?;
        ensure!(
            counted == 5.0,
            "meridian_client_errors_total{{cause=\"request-body-timeout\"}} is {counted}, not 5"
        );
        for (n, reply) in replies.iter().enumerate() {
            ensure_client_error(
                reply,
                StatusCode::REQUEST_TIMEOUT,
                "request-body-timeout",
                &format!("stalled body {n}"),
            )?;
        }
        ensure_nothing_moves(&world, "stall", &west, west_before).await?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_transfer_encoding_never_reaches_a_backend() -> Result<()> {
    within(async {
        let world = World::start_with(&["us-east"], Relay::new(), SidecarOpts::default()).await?;
        let backend = TestBackend::start(fresh_addr(0)?, "framing").await?;
        world
            .apply(backend_spec("framing", &[("us-east", backend.url())]))
            .await?;
        world
            .wait_served("us-east", "framing", "us-east", Duration::from_secs(20))
            .await?;
        let outbound = world.sidecar("us-east").outbound();
        let before = backend.requests();
        for codings in [
            "Transfer-Encoding: identity, chunked",
            "Transfer-Encoding: gzip, chunked",
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
        ] {
            let request = format!(
                "POST / HTTP/1.1\r\nHost: framing\r\n{codings}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            );
            let reply = raw_exchange(outbound, request.as_bytes()).await?;
            ensure_client_error(
                &reply,
                StatusCode::BAD_REQUEST,
                "ambiguous-transfer-encoding",
                &format!("{codings:?}"),
            )?;
        }
        ensure!(
            backend.requests() == before,
            "{} requests with ambiguous framing reached the backend",
            backend.requests() - before
        );

        // The one unambiguous form goes through, framed by the sidecar itself.
        let reply = raw_exchange(
            outbound,
            b"POST /echo-size HTTP/1.1\r\nHost: framing\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )
        .await?;
        ensure!(
            reply.status == StatusCode::OK && reply.text().trim() == "received=5",
            "a chunked POST: {}",
            reply.describe()
        );
        // Content-Length beside Transfer-Encoding: hyper drops the length before the proxy sees
        // the request (and closes the connection after it); the backend never gets both.
        let reply = raw_exchange(
            outbound,
            b"POST /echo-size HTTP/1.1\r\nHost: framing\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )
        .await?;
        let seen = backend.last_headers().context("no headers recorded")?;
        ensure!(
            reply.status == StatusCode::OK
                && reply.text().trim() == "received=5"
                && !(seen.contains_key("content-length") && seen.contains_key("transfer-encoding")),
            "Content-Length with Transfer-Encoding: {}; the backend saw {seen:?}",
            reply.describe()
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_set_mesh_and_hop_by_hop_headers_never_reach_the_function() -> Result<()> {
    within(async {
        let (world, east, west) = two_regions("headers").await?;
        let west_before = west.requests();
        let outbound = world.sidecar("us-east").outbound();
        // The mesh's own headers, a header named by the second of two Connection lines, and
        // the other hop-by-hop ones.
        let forged = "Connection: keep-alive\r\nConnection: x-private\r\nx-private: secret\r\n\
                      Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n\
                      TE: gzip\r\nUpgrade: websocket\r\n\
                      meridian-hop: ap-south\r\nmeridian-region: ap-south\r\n\
                      x-kept: yes\r\n";
        let request = format!("GET / HTTP/1.1\r\nHost: headers\r\n{forged}\r\n");
        let reply = raw_exchange(outbound, request.as_bytes()).await?;
        ensure!(
            reply.status == StatusCode::OK && reply.region() == Some("us-east"),
            "{}",
            reply.describe()
        );
        let seen = east.last_headers().context("no headers recorded")?;
        let leaked: Vec<&str> = [
            "x-private",
            "keep-alive",
            "proxy-connection",
            "te",
            "upgrade",
            "meridian-hop",
            "meridian-region",
        ]
        .into_iter()
        .filter(|name| seen.contains_key(*name))
        .collect();
        ensure!(
            leaked.is_empty() && seen.get("x-kept").is_some_and(|v| v == "yes"),
            "the function was sent {leaked:?} (and x-kept: {:?}); all it saw: {seen:?}",
            seen.get("x-kept")
        );

        // Through another region's gateway the function is told the real calling region, and
        // nothing the client forged.
        let far = TestBackend::start(fresh_addr(1)?, "far").await?;
        world
            .apply(backend_spec("far", &[("eu-west", far.url())]))
            .await?;
        world
            .wait_served("us-east", "far", "eu-west", Duration::from_secs(20))
            .await?;
        let request = format!("GET / HTTP/1.1\r\nHost: far\r\n{forged}\r\n");
        let reply = raw_exchange(outbound, request.as_bytes()).await?;
        ensure!(
            reply.status == StatusCode::OK && reply.region() == Some("eu-west"),
            "{}",
            reply.describe()
        );
        let seen = far.last_headers().context("no headers recorded")?;
        let hops: Vec<_> = seen.get_all("meridian-hop").iter().collect();
        ensure!(
            hops.len() == 1
                && hops[0] == "us-east"
                && !seen.contains_key("x-private")
                && !seen.contains_key("meridian-region"),
            "through eu-west's gateway the function saw meridian-hop {hops:?}: {seen:?}"
        );
        let west_got = west.requests() - west_before;
        ensure!(
            west_got == 0,
            "eu-west's `headers` instance was called {west_got} times"
        );
        Ok(())
    })
    .await
}
