//! A sample function for demos and tests: an HTTP/1.1 and h2c server that says which instance
//! and region answered.
//!
//! Environment: `PORT` (required), `HOST` (default 127.0.0.1), `REGION` and `INSTANCE_ID`
//! (default "unknown"), `DELAY_MS` (default 0: sleep this long before answering each request
//! except `GET /healthz`) and `START_DELAY_MS` (default 0: sleep this long before listening, to
//! play a slow cold start). Every request gets 200 `hello from <instance> in <region>`, except
//! `GET /healthz` (200 `ok` at once: the readiness path), `GET /status/<code>` (answers that
//! status, e.g. 503 for retry tests) and `POST /echo` (streams the request body back).
//!
//! Every response carries `x-instance`, `x-start-unix-us` (when the process's main began),
//! `x-ready-unix-us` (when it began listening) and `x-arrived-unix-us` (when the request
//! arrived), so a caller can split a cold start into process start, start-up and queueing; and
//! `x-seen-traceparent`, the request's W3C `traceparent` when it had one.
//! Served by Meridian's one serve loop (`meridian_common::serve`) with the proxy listeners'
//! default limits. Stops cleanly on SIGTERM/SIGINT.
//!
//! Run: `PORT=9000 REGION=us-east INSTANCE_ID=a cargo run -p meridian-sidecar --example sample_function`

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use meridian_common::serve::{self, ServeConfig, ServeLimits};
use tokio::net::TcpListener;

/// Who this instance is, and its timings.
struct Identity {
    greeting: Bytes,
    instance: HeaderValue,
    start_us: HeaderValue,
    ready_us: HeaderValue,
    /// Added before every answer except the readiness path.
    delay: Duration,
}

/// The readiness path: answered at once, whatever `DELAY_MS` says.
const HEALTH_PATH: &str = "/healthz";

/// Either a fixed greeting or the request body echoed back as it arrives.
enum Reply {
    Full(Option<Bytes>),
    Echo(Incoming),
}

impl Body for Reply {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Reply::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Reply::Echo(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Reply::Full(data) => data.is_none(),
            Reply::Echo(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Reply::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Reply::Echo(body) => body.size_hint(),
        }
    }
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

async fn answer(identity: Arc<Identity>, request: Request<Incoming>) -> Response<Reply> {
    let arrived_us = unix_us();
    let health = request.method() == Method::GET && request.uri().path() == HEALTH_PATH;
    if !health && !identity.delay.is_zero() {
        tokio::time::sleep(identity.delay).await;
    }
    // Echoed so tests can see what trace context reached the instance (W3C traceparent).
    let traceparent = request.headers().get("traceparent").cloned();
    let path = request.uri().path();
    let (status, body) = if health {
        (
            StatusCode::OK,
            Reply::Full(Some(Bytes::from_static(b"ok\n"))),
        )
    } else if request.method() == Method::POST && path == "/echo" {
        (StatusCode::OK, Reply::Echo(request.into_body()))
    } else if let Some(code) = path.strip_prefix("/status/") {
        match code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
        {
            Some(status) => (
                status,
                Reply::Full(Some(Bytes::from(format!("status {}\n", status.as_u16())))),
            ),
            None => (
                StatusCode::BAD_REQUEST,
                Reply::Full(Some(Bytes::from_static(b"bad status code\n"))),
            ),
        }
    } else {
        (StatusCode::OK, Reply::Full(Some(identity.greeting.clone())))
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert("x-instance", identity.instance.clone());
    headers.insert("x-start-unix-us", identity.start_us.clone());
    headers.insert("x-ready-unix-us", identity.ready_us.clone());
    headers.insert("x-arrived-unix-us", HeaderValue::from(arrived_us));
    if let Some(traceparent) = traceparent {
        headers.insert("x-seen-traceparent", traceparent);
    }
    response
}

/// A millisecond count from the environment; unset or empty is 0.
fn env_ms(name: &str) -> anyhow::Result<Duration> {
    let value = env_or(name, "0");
    let ms: u64 = value
        .parse()
        .with_context(|| format!("{name} must be a number of milliseconds, not {value:?}"))?;
    Ok(Duration::from_millis(ms))
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let start_us = unix_us();
    meridian_common::telemetry::init("info");
    // Who this instance runs as (an agent never runs it as root), and whether it can read each
    // path of PROBE_READ (comma separated; a directory is listed): the tests show what is out of
    // an instance's reach.
    {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        // e.g. "Uid:\t<real>\t<effective>\t<saved>\t<fs>"; the real ids are the first.
        let ids = |name: &str| -> Vec<&str> {
            let line = status.lines().find_map(|l| l.strip_prefix(name));
            line.map_or_else(Vec::new, |v| v.split_whitespace().collect())
        };
        let (uid, gid) = (ids("Uid:"), ids("Gid:"));
        let first = |ids: &[&str]| ids.first().copied().unwrap_or("?").to_owned();
        let groups = ids("Groups:").join(",");
        println!(
            "sample_function uid={} gid={} groups={groups}",
            first(&uid),
            first(&gid)
        );
        for path in env_or("PROBE_READ", "")
            .split(',')
            .filter(|p| !p.is_empty())
        {
            let read = match std::fs::metadata(path) {
                Ok(metadata) if metadata.is_dir() => std::fs::read_dir(path).map(drop),
                _ => std::fs::read(path).map(drop),
            };
            match read {
                Ok(()) => println!("probe-read {path}: ok"),
                Err(error) => println!("probe-read {path}: {error}"),
            }
        }
    }
    let port: u16 = std::env::var("PORT")
        .context("PORT must be set")?
        .parse()
        .context("PORT must be a port number")?;
    let host: IpAddr = env_or("HOST", "127.0.0.1")
        .parse()
        .context("HOST must be an IP address")?;
    let region = env_or("REGION", "unknown");
    let instance = env_or("INSTANCE_ID", "unknown");
    let delay = env_ms("DELAY_MS")?;
    let start_delay = env_ms("START_DELAY_MS")?;
    let instance_header =
        HeaderValue::from_str(&instance).context("INSTANCE_ID must be a header value")?;
    if !start_delay.is_zero() {
        tokio::time::sleep(start_delay).await;
    }

    let listener = TcpListener::bind(SocketAddr::new(host, port))
        .await
        .with_context(|| format!("cannot listen on {host}:{port}"))?;
    let identity = Arc::new(Identity {
        greeting: Bytes::from(format!("hello from {instance} in {region}\n")),
        instance: instance_header,
        start_us: HeaderValue::from(start_us),
        ready_us: HeaderValue::from(unix_us()),
        delay,
    });
    tracing::info!(%region, %instance, "listening on {}", listener.local_addr()?);

    let handler = move |request: Request<Incoming>| answer(Arc::clone(&identity), request);
    // The proxy listeners' limits: an instance faces the same clients through its sidecar.
    let config = ServeConfig::new("function", ServeLimits::default(), Default::default());
    serve::serve(
        listener,
        auto::Builder::new(TokioExecutor::new()),
        config,
        handler,
        meridian_common::shutdown::signal(),
    )
    .await;
    tracing::info!("stopped");
    Ok(())
}
