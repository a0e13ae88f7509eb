//! The limits of the sidecar's listeners under attack, on a real sidecar binary: slowloris and
//! idle floods are closed in time while normal requests never fail, HTTP/2 rapid reset gets
//! GOAWAY, hyper's own 431 carries `meridian-error`, and a full listener refuses with 503
//! `connection-limit`, counted in metrics.
//!
//! The limits are given as environment variables (`MERIDIAN_*`), not flags, so that the same
//! test runs against a sidecar that does not know them (it then fails on what it asserts, not on
//! its command line).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use http::StatusCode;
use meridian_tests::http::{Load, LoadSpec, MeshClient};
use meridian_tests::{
    backend_spec, free_port, metric_value, poll_until, region_ip, Relay, SidecarOpts, TestBackend,
    World,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every test's whole budget.
const BUDGET: Duration = Duration::from_secs(60);

/// A us-east world whose sidecar runs with `env`, serving the external function `known` from a
/// backend in the test process.
async fn world_with(env: &[(&str, &str)]) -> Result<(World, TestBackend)> {
    let opts = SidecarOpts {
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..SidecarOpts::default()
    };
    let world = World::start_with(&["us-east"], Relay::new(), opts).await?;
    let ip = region_ip(0);
    let backend = TestBackend::start(SocketAddr::from((ip, free_port(ip)?)), "known").await?;
    world
        .apply(backend_spec("known", &[("us-east", backend.url())]))
        .await?;
    world
        .wait_served("us-east", "known", "us-east", Duration::from_secs(20))
        .await?;
    Ok((world, backend))
}

/// Opens a connection, sends the start of a request head and then one header byte every
/// 500 ms, until the sidecar closes it; returns how long it stayed open.
async fn slowloris(target: SocketAddr, give_up: Duration) -> Result<Duration> {
    let mut stream = TcpStream::connect(target).await?;
    let opened = Instant::now();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: known\r\nx-slow: ")
        .await?;
    let mut buf = [0u8; 256];
    loop {
        if opened.elapsed() > give_up {
            bail!("a slowloris connection is still open after {give_up:?}");
        }
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => return Ok(opened.elapsed()),
                // An answer (none is expected) would end the head; keep reading to the close.
                Ok(_) => {}
            },
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if stream.write_all(b"x").await.is_err() {
                    return Ok(opened.elapsed());
                }
            }
        }
    }
}

/// Opens a connection and sends nothing; returns how long it stayed open.
async fn idle(target: SocketAddr, give_up: Duration) -> Result<Duration> {
    let mut stream = TcpStream::connect(target).await?;
    let opened = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout_at(
            tokio::time::Instant::from_std(opened + give_up),
            stream.read(&mut buf),
        )
        .await
        {
            Err(_) => bail!("an idle connection is still open after {give_up:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(opened.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_idle_flood_are_closed_in_time_and_normal_requests_never_fail() -> Result<()>
{
    tokio::time::timeout(BUDGET, async {
        let (world, _backend) = world_with(&[
            ("MERIDIAN_HEADER_READ_TIMEOUT_MS", "2000"),
            ("MERIDIAN_IDLE_TIMEOUT_MS", "3000"),
            ("MERIDIAN_MAX_CONNECTIONS", "600"),
        ])
        .await?;
        let sidecar = world.sidecar("us-east");
        let outbound = sidecar.outbound();
        // Each attacker is closed within its timeout + 1 s; beyond 8 s the test calls it open.
        let give_up = Duration::from_secs(8);
        // The attackers connect in waves of 50, 20 ms apart, as a flood from many clients
        // would arrive: 650 connects in the same instant would only measure the accept backlog.
        let mut slow = Vec::new();
        let mut idle_flood = Vec::new();
        for wave in 0..13 {
            for _ in 0..50 {
                if wave < 10 {
                    slow.push(tokio::spawn(slowloris(outbound, give_up)));
                } else {
                    // Idle connections up to the cap and past it (150 more than the 100 left by
                    // the slowloris connections): the newest push the oldest never-used ones out.
                    idle_flood.push(tokio::spawn(idle(outbound, give_up)));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Normal requests during the attack, from a client whose pool drops connections before
        // the sidecar's 3 s idle timeout would.
        let client = MeshClient::http1_with_pool_idle(outbound, Duration::from_secs(1));
        let load = Load::start(&client, LoadSpec::get("known", 50, Duration::from_secs(6)));
        let report = load.finish().await?;
        ensure!(
            report.failures().is_empty(),
            "normal requests failed under attack: {}: {:?}",
            report.summary(),
            report
                .failures()
                .iter()
                .take(5)
                .map(|o| o.describe())
                .collect::<Vec<_>>()
        );
        let mut slow_times = Vec::new();
        for task in slow {
            slow_times.push(task.await??);
        }
        let mut idle_times = Vec::new();
        for task in idle_flood {
            idle_times.push(task.await??);
        }
        slow_times.sort();
        idle_times.sort();
        let slow_max = slow_times.last().copied().unwrap_or_default();
        let idle_max = idle_times.last().copied().unwrap_or_default();
        eprintln!(
            "slowloris closed after {:?} (median) / {slow_max:?} (max); idle after {:?} / {idle_max:?}",
            slow_times[slow_times.len() / 2],
            idle_times[idle_times.len() / 2]
        );
        eprintln!("{}; longest slowloris {slow_max:?}, longest idle {idle_max:?}", report.summary());
        ensure!(
            slow_max < Duration::from_secs(3),
            "a slowloris connection stayed open {slow_max:?}, more than the 2 s header-read timeout + 1 s"
        );
        ensure!(
            idle_max < Duration::from_secs(4),
            "an idle connection stayed open {idle_max:?}, more than the 3 s idle timeout + 1 s"
        );
        let metrics = sidecar.metrics().await?;
        for timeout in ["header-read", "idle"] {
            let series = format!(
                r#"meridian_connections_timed_out_total{{listener="outbound",timeout="{timeout}"}}"#
            );
            ensure!(
                metric_value(&metrics, &series).is_some_and(|n| n >= 1.0),
                "{series} must count the attack:\n{metrics}"
            );
        }
        Ok(())
    })
    .await
    .context("the test ran past its budget")?
}

/// An HTTP/2 frame header: length, type, flags, stream.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

const FRAME_HEADERS: u8 = 1;
const FRAME_RST_STREAM: u8 = 3;
const FRAME_SETTINGS: u8 = 4;
const FRAME_GOAWAY: u8 = 7;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 3;
const ERROR_ENHANCE_YOUR_CALM: u32 = 0xb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_gets_goaway_and_other_clients_see_no_failure() -> Result<()> {
    tokio::time::timeout(BUDGET, async {
        let (world, _backend) =
            world_with(&[("MERIDIAN_H2_MAX_CONCURRENT_STREAMS", "100")]).await?;
        let outbound = world.sidecar("us-east").outbound();
        let h2_load = Load::start(
            &MeshClient::http2(outbound),
            LoadSpec::get("known", 50, Duration::from_secs(4)),
        );
        let h1_load = Load::start(
            &MeshClient::http1(outbound),
            LoadSpec::get("known", 50, Duration::from_secs(4)),
        );
        // The attacker: HEADERS (GET / for `known`, from HPACK's static table) and at once
        // RST_STREAM (CANCEL), stream after stream, never waiting for an answer.
        let mut attacker = TcpStream::connect(outbound).await?;
        let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        opening.extend(frame(FRAME_SETTINGS, 0, 0, &[]));
        attacker.write_all(&opening).await?;
        let (mut reader, mut writer) = attacker.into_split();
        let attack = tokio::spawn(async move {
            let mut headers = vec![0x82, 0x86, 0x84, 0x01, 5];
            headers.extend_from_slice(b"known");
            let mut sent = 0u32;
            'attack: for batch in 0..100u32 {
                let mut bytes = Vec::new();
                for i in 0..100u32 {
                    let stream = 2 * (batch * 100 + i) + 1;
                    bytes.extend(frame(FRAME_HEADERS, 0x5, stream, &headers));
                    bytes.extend(frame(FRAME_RST_STREAM, 0, stream, &8u32.to_be_bytes()));
                }
                if writer.write_all(&bytes).await.is_err() {
                    break 'attack;
                }
                sent += 100;
            }
            sent
        });
        // Everything the sidecar sends until it closes the connection.
        let mut received = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(20), async {
            let mut chunk = [0u8; 16 * 1024];
            loop {
                match reader.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => received.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        ensure!(read.is_ok(), "the rapid-reset connection was not closed within 20 s");
        let sent = attack.await?;
        let (max_streams, goaway) = read_frames(&received);
        eprintln!("rapid reset: {sent} streams sent; SETTINGS_MAX_CONCURRENT_STREAMS {max_streams:?}; GOAWAY {goaway:?}");
        ensure!(
            max_streams == Some(100),
            "the sidecar must advertise SETTINGS_MAX_CONCURRENT_STREAMS 100 (the flag), advertised {max_streams:?}"
        );
        ensure!(
            goaway == Some(ERROR_ENHANCE_YOUR_CALM),
            "the rapid-reset client must get GOAWAY ENHANCE_YOUR_CALM, got {goaway:?} after {sent} streams"
        );
        for (what, load) in [("h2", h2_load), ("h1", h1_load)] {
            let report = load.finish().await?;
            ensure!(
                report.failures().is_empty() && !report.outcomes.is_empty(),
                "{what} requests failed during the rapid reset: {}",
                report.summary()
            );
        }
        Ok(())
    })
    .await
    .context("the test ran past its budget")?
}

/// The frames the sidecar sent, up to GOAWAY: the advertised SETTINGS_MAX_CONCURRENT_STREAMS
/// and the GOAWAY error code, if any.
fn read_frames(bytes: &[u8]) -> (Option<u32>, Option<u32>) {
    let mut max_streams = None;
    let mut rest = bytes;
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        if rest.len() < 9 + len {
            break;
        }
        let (kind, flags) = (rest[3], rest[4]);
        let payload = &rest[9..9 + len];
        rest = &rest[9 + len..];
        if kind == FRAME_SETTINGS && flags & 1 == 0 {
            for setting in payload.chunks_exact(6) {
                if u16::from_be_bytes([setting[0], setting[1]]) == SETTINGS_MAX_CONCURRENT_STREAMS {
                    max_streams = Some(u32::from_be_bytes([
                        setting[2], setting[3], setting[4], setting[5],
                    ]));
                }
            }
        }
        if kind == FRAME_GOAWAY && payload.len() >= 8 {
            let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
            return (max_streams, Some(code));
        }
    }
    (max_streams, None)
}

/// Writes `request`, ignoring a write cut short by the sidecar's close, and reads until the
/// close: hyper answers a head it refuses before it has read all of it.
async fn send_and_read(target: SocketAddr, request: &[u8]) -> Result<String> {
    let mut stream = TcpStream::connect(target).await?;
    let _ = stream.write_all(request).await;
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await {
            Err(_) => bail!(
                "no close within 10 s; got {:?}",
                String::from_utf8_lossy(&out)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_headers_get_431_with_meridian_error() -> Result<()> {
    tokio::time::timeout(BUDGET, async {
        let (world, _backend) = world_with(&[]).await?;
        let outbound = world.sidecar("us-east").outbound();
        let mut request = String::from("GET / HTTP/1.1\r\nHost: known\r\n");
        for i in 0..10_000 {
            request.push_str(&format!("x-h{i}: v\r\n"));
        }
        request.push_str("\r\n");
        let answer = send_and_read(outbound, request.as_bytes()).await?;
        let head = answer
            .split("\r\n\r\n")
            .next()
            .unwrap_or_default()
            .to_lowercase();
        ensure!(
            head.starts_with("http/1.1 431 "),
            "10,000 headers: expected 431, got {answer:?}"
        );
        ensure!(
            head.lines()
                .any(|l| l == "meridian-error: headers-too-large"),
            "the 431 must carry meridian-error: headers-too-large: {answer:?}"
        );
        // The same on a keep-alive connection that has served a request first.
        let mut stream = TcpStream::connect(outbound).await?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: known\r\n\r\n")
            .await?;
        let mut first = Vec::new();
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(&first).ends_with("known\n") {
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
                .await
                .context("no answer to the first request within 10 s")??;
            ensure!(n > 0, "closed before the first answer: {:?}", String::from_utf8_lossy(&first));
            first.extend_from_slice(&chunk[..n]);
        }
        ensure!(first.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&first));
        let _ = stream.write_all(request.as_bytes()).await;
        let mut second = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await {
                Err(_) => bail!("no close within 10 s"),
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => second.extend_from_slice(&chunk[..n]),
            }
        }
        let second = String::from_utf8_lossy(&second).to_lowercase();
        ensure!(
            second.starts_with("http/1.1 431 ")
                && second.lines().any(|l| l == "meridian-error: headers-too-large"),
            "10,000 headers after a served request: expected 431 with meridian-error, got {second:?}"
        );
        // The listener still serves normal requests.
        let reply = world.sidecar("us-east").client().get("known", "/").await?;
        ensure!(reply.status == StatusCode::OK, "{}", reply.describe());
        Ok(())
    })
    .await
    .context("the test ran past its budget")?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_cap_with_none_idle_is_refused_with_503_connection_limit() -> Result<()> {
    tokio::time::timeout(BUDGET, async {
        let (world, backend) = world_with(&[("MERIDIAN_MAX_CONNECTIONS", "4")]).await?;
        let sidecar = world.sidecar("us-east");
        let outbound = sidecar.outbound();
        let served_before = backend.requests();
        // Four connections, each with a request in flight for 4 s (20 lines, 200 ms apart).
        let busy: Vec<_> = (0..4)
            .map(|_| {
                tokio::spawn(send_and_read(
                    outbound,
                    b"GET /drip?n=20&ms=200 HTTP/1.1\r\nHost: known\r\nConnection: close\r\n\r\n",
                ))
            })
            .collect();
        // Wait until all four are streaming (the backend saw four requests).
        poll_until(Duration::from_secs(10), "four requests in flight", || async {
            let seen = backend.requests() - served_before;
            ensure!(seen >= 4, "the backend saw {seen} of the four requests");
            Ok(())
        })
        .await?;
        let answer = send_and_read(
            outbound,
            b"GET / HTTP/1.1\r\nHost: known\r\nConnection: close\r\n\r\n",
        )
        .await?;
        let head = answer.split("\r\n\r\n").next().unwrap_or_default().to_lowercase();
        ensure!(
            head.starts_with("http/1.1 503 "),
            "a fifth connection with none idle: expected 503, got {answer:?}"
        );
        ensure!(
            head.lines().any(|l| l == "meridian-error: connection-limit")
                && head.lines().any(|l| l == "connection: close")
                && head.lines().any(|l| l.starts_with("content-length: ")),
            "the refusal must carry meridian-error: connection-limit, connection: close and a content-length: {answer:?}"
        );
        let metrics = sidecar.metrics().await?;
        let refused = metric_value(
            &metrics,
            r#"meridian_connections_refused_total{listener="outbound"}"#,
        );
        ensure!(
            refused == Some(1.0),
            "meridian_connections_refused_total must count the refusal, is {refused:?}:\n{metrics}"
        );
        for request in busy {
            let answer = request.await??;
            ensure!(
                answer.starts_with("HTTP/1.1 200"),
                "the requests in flight are served to the end: {answer:?}"
            );
        }
        Ok(())
    })
    .await
    .context("the test ran past its budget")?
}
