//! HTTP clients for tests: a client that calls a function through a sidecar (the function's name
//! is the URI authority, so it becomes the HTTP/1.1 `Host` or the HTTP/2 `:authority`, while the
//! connection always goes to the sidecar), raw HTTP/1.1 exchanges for malformed input, and a load
//! generator that sends N requests per second and records what happened to each one.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// The response header naming the region whose instance served a request.
pub const REGION_HEADER: &str = "meridian-region";
/// The response header naming why the mesh could not serve a request.
pub const ERROR_HEADER: &str = "meridian-error";
/// The response header saying how long, in ms, the sidecar held a request for a cold start.
pub const HELD_HEADER: &str = "meridian-held-ms";

/// A request body the clients accept.
pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A body of `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Resolves every name to one fixed address (the sidecar's listener).
#[derive(Clone, Debug)]
struct FixedResolver(SocketAddr);

impl tower_service::Service<Name> for FixedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _name: Name) -> Self::Future {
        std::future::ready(Ok(vec![self.0].into_iter()))
    }
}

/// A response, read whole.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// `meridian-region`, if present.
    pub fn region(&self) -> Option<&str> {
        header(&self.headers, REGION_HEADER)
    }

    /// `meridian-error`, if present.
    pub fn error(&self) -> Option<&str> {
        header(&self.headers, ERROR_HEADER)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// One line for messages.
    pub fn describe(&self) -> String {
        let mut body = self.text();
        body.truncate(200);
        format!(
            "{} {:?} region={:?} error={:?} body={body:?}",
            self.status,
            self.version,
            self.region(),
            self.error()
        )
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Calls functions through one sidecar listener.
#[derive(Clone)]
pub struct MeshClient {
    client: Client<HttpConnector<FixedResolver>, Body>,
    target: SocketAddr,
    http2: bool,
}

impl std::fmt::Debug for MeshClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshClient")
            .field("target", &self.target)
            .field("http2", &self.http2)
            .finish()
    }
}

impl MeshClient {
    /// HTTP/1.1 with pooled keep-alive connections to `target`.
    pub fn http1(target: SocketAddr) -> MeshClient {
        MeshClient::build(target, false)
    }

    /// HTTP/2 with prior knowledge (h2c) to `target`.
    pub fn http2(target: SocketAddr) -> MeshClient {
        MeshClient::build(target, true)
    }

    /// HTTP/1.1 whose pool drops a connection idle for `idle`: below a server's idle timeout, so
    /// that the client never reuses a connection the server is closing.
    pub fn http1_with_pool_idle(target: SocketAddr, idle: Duration) -> MeshClient {
        MeshClient::build_with(target, false, idle)
    }

    fn build(target: SocketAddr, http2: bool) -> MeshClient {
        MeshClient::build_with(target, http2, Duration::from_secs(30))
    }

    fn build_with(target: SocketAddr, http2: bool, pool_idle: Duration) -> MeshClient {
        let mut connector = HttpConnector::new_with_resolver(FixedResolver(target));
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new())
            .http2_only(http2)
            .pool_idle_timeout(pool_idle)
            .build(connector);
        MeshClient {
            client,
            target,
            http2,
        }
    }

    /// Where the requests go.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Sends `method http://<authority><path>` with `body` and extra `headers`; reads the whole
    /// response, at most `within`.
    pub async fn send(
        &self,
        method: Method,
        authority: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Body,
        within: Duration,
    ) -> Result<Reply> {
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(format!("http://{authority}{path}"));
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder.body(body).context("building the request")?;
        let exchange = async {
            let response = self.client.request(request).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<Reply, anyhow::Error>(Reply {
                status: parts.status,
                version: parts.version,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(within, exchange)
            .await
            .map_err(|_| anyhow!("{method} {authority}{path}: no response within {within:?}"))?
            .with_context(|| format!("{method} {authority}{path} via {}", self.target))
    }

    /// `GET http://<function><path>`, at most 10 s.
    pub async fn get(&self, function: &str, path: &str) -> Result<Reply> {
        self.send(
            Method::GET,
            function,
            path,
            &[],
            empty(),
            Duration::from_secs(10),
        )
        .await
    }

    /// `POST http://<function><path>` with `body`, at most 10 s.
    pub async fn post(&self, function: &str, path: &str, body: impl Into<Bytes>) -> Result<Reply> {
        self.send(
            Method::POST,
            function,
            path,
            &[],
            full(body),
            Duration::from_secs(10),
        )
        .await
    }
}

/// Writes `request` (raw bytes) to `addr` and reads the response head and body (up to
/// `Content-Length`, or until the peer closes): for requests a well-behaved client cannot send.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Result<Reply> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(request).await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                bail!(
                    "connection closed before a response head; got {:?}",
                    String::from_utf8_lossy(&buf)
                );
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let version = match parts.next() {
            Some("HTTP/1.0") => http::Version::HTTP_10,
            _ => http::Version::HTTP_11,
        };
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {status_line:?}"))?;
        let mut headers = HeaderMap::new();
        for line in lines.filter(|l| !l.is_empty()) {
            if let Some((name, value)) = line.split_once(':') {
                if let (Ok(name), Ok(value)) = (
                    http::HeaderName::from_bytes(name.trim().as_bytes()),
                    http::HeaderValue::from_str(value.trim()),
                ) {
                    headers.append(name, value);
                }
            }
        }
        let mut body = buf[head_end..].to_vec();
        let length: Option<usize> = header(&headers, "content-length").and_then(|v| v.parse().ok());
        loop {
            if length.is_some_and(|l| body.len() >= l) {
                break;
            }
            // The peer may reset after an error response; what arrived is the answer.
            let n: usize = stream.read(&mut chunk).await.unwrap_or_default();
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        Ok(Reply {
            status: StatusCode::from_u16(status)?,
            version,
            headers,
            body: Bytes::from(body),
        })
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| anyhow!("raw exchange with {addr}: no response within 10 s"))?
}

/// What a load generator sends.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// The function (URI authority).
    pub function: String,
    pub path: String,
    pub method: Method,
    /// Requests started per second (open loop: a slow response does not slow the rate).
    pub rate_per_sec: u32,
    pub duration: Duration,
    /// Requests in flight at most; a request that would exceed it is recorded as a client-side
    /// failure rather than silently skipped.
    pub max_in_flight: usize,
    /// Deadline of each request.
    pub timeout: Duration,
}

impl LoadSpec {
    /// `GET http://<function>/` at `rate_per_sec` for `duration`.
    pub fn get(function: &str, rate_per_sec: u32, duration: Duration) -> LoadSpec {
        LoadSpec {
            function: function.to_string(),
            path: "/".to_string(),
            method: Method::GET,
            rate_per_sec,
            duration,
            max_in_flight: 512,
            timeout: Duration::from_secs(20),
        }
    }
}

/// What happened to one request of a load run.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// When it was sent, from the start of the run.
    pub sent: Duration,
    /// How long until the whole response arrived (or the failure).
    pub latency: Duration,
    /// Status, `meridian-region`, `meridian-error`; or why no response came.
    pub result: Result<(StatusCode, Option<String>, Option<String>), String>,
    /// `meridian-held-ms` of the answer: how long the sidecar held the request for a cold
    /// start (`None`: not held, or no answer).
    pub held_ms: Option<u64>,
}

impl Outcome {
    /// A 200 answer.
    pub fn ok(&self) -> bool {
        matches!(&self.result, Ok((status, _, _)) if *status == StatusCode::OK)
    }

    /// `meridian-region` of the answer.
    pub fn region(&self) -> Option<&str> {
        match &self.result {
            Ok((_, region, _)) => region.as_deref(),
            Err(_) => None,
        }
    }

    /// One line for messages.
    pub fn describe(&self) -> String {
        match &self.result {
            Ok((status, region, error)) => format!(
                "t={:?} {status} region={region:?} error={error:?} in {:?}",
                self.sent, self.latency
            ),
            Err(e) => format!("t={:?} failed: {e} after {:?}", self.sent, self.latency),
        }
    }
}

/// Every request of a load run, in the order they were sent.
#[derive(Clone, Debug)]
pub struct LoadReport {
    /// When the run started.
    pub started: Instant,
    pub outcomes: Vec<Outcome>,
}

impl LoadReport {
    /// The requests that were not answered 200.
    pub fn failures(&self) -> Vec<&Outcome> {
        self.outcomes.iter().filter(|o| !o.ok()).collect()
    }

    /// Requests sent within `[from, to)` (offsets from the start).
    pub fn sent_between(&self, from: Duration, to: Duration) -> Vec<&Outcome> {
        self.outcomes
            .iter()
            .filter(|o| o.sent >= from && o.sent < to)
            .collect()
    }

    /// `(region, count)` of 200 answers, most first.
    pub fn served_by(outcomes: &[&Outcome]) -> Vec<(String, usize)> {
        let mut counts: Vec<(String, usize)> = Vec::new();
        for outcome in outcomes.iter().filter(|o| o.ok()) {
            let region = outcome.region().unwrap_or("<none>").to_string();
            match counts.iter_mut().find(|(r, _)| *r == region) {
                Some((_, n)) => *n += 1,
                None => counts.push((region, 1)),
            }
        }
        counts.sort_by_key(|c| std::cmp::Reverse(c.1));
        counts
    }

    /// A summary for messages: counts, regions, failures (the first few).
    pub fn summary(&self) -> String {
        let all: Vec<&Outcome> = self.outcomes.iter().collect();
        let failures = self.failures();
        let mut text = format!(
            "{} requests, {} failed, served by {:?}",
            self.outcomes.len(),
            failures.len(),
            LoadReport::served_by(&all)
        );
        for failure in failures.iter().take(10) {
            text.push_str("\n  ");
            text.push_str(&failure.describe());
        }
        if failures.len() > 10 {
            text.push_str(&format!("\n  ... and {} more", failures.len() - 10));
        }
        text
    }

    /// Latency percentile `p` (0..=100) of the 200 answers.
    pub fn latency_percentile(&self, p: f64) -> Option<Duration> {
        let mut latencies: Vec<Duration> = self
            .outcomes
            .iter()
            .filter(|o| o.ok())
            .map(|o| o.latency)
            .collect();
        latencies.sort();
        if latencies.is_empty() {
            return None;
        }
        let rank = ((p / 100.0) * (latencies.len() - 1) as f64).round() as usize;
        latencies.get(rank.min(latencies.len() - 1)).copied()
    }
}

/// A load run in the background; [`Load::finish`] waits for every request to end.
pub struct Load {
    started: Instant,
    task: tokio::task::JoinHandle<Vec<Outcome>>,
}

impl Load {
    /// Starts sending `spec` through `client` now.
    pub fn start(client: &MeshClient, spec: LoadSpec) -> Load {
        let client = client.clone();
        let started = Instant::now();
        let task = tokio::spawn(run_load(client, spec, started));
        Load { started, task }
    }

    /// When the run started (offsets in the report are from here).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits for the end of the run and of every request it sent.
    pub async fn finish(self) -> Result<LoadReport> {
        let outcomes = self.task.await.context("the load task panicked")?;
        Ok(LoadReport {
            started: self.started,
            outcomes,
        })
    }
}

type Pending = Pin<Box<dyn Future<Output = Outcome> + Send>>;

async fn run_load(client: MeshClient, spec: LoadSpec, started: Instant) -> Vec<Outcome> {
    let period = Duration::from_secs_f64(1.0 / f64::from(spec.rate_per_sec.max(1)));
    let total = (spec.duration.as_secs_f64() * f64::from(spec.rate_per_sec)).round() as usize;
    let limit = Arc::new(Semaphore::new(spec.max_in_flight.max(1)));
    let mut pending: Vec<tokio::task::JoinHandle<Outcome>> = Vec::with_capacity(total);
    for i in 0..total {
        // Open loop: request i goes out at start + i * period, whatever happened before.
        let due = started + period.mul_f64(i as f64);
        tokio::time::sleep_until(due).await;
        let sent = started.elapsed();
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            let outcome = Outcome {
                sent,
                latency: Duration::ZERO,
                result: Err(format!(
                    "client: {} requests already in flight",
                    spec.max_in_flight
                )),
                held_ms: None,
            };
            pending.push(tokio::spawn(std::future::ready(outcome)));
            continue;
        };
        let request: Pending = {
            let client = client.clone();
            let spec = spec.clone();
            Box::pin(async move {
                let begin = Instant::now();
                let reply = client
                    .send(
                        spec.method.clone(),
                        &spec.function,
                        &spec.path,
                        &[],
                        empty(),
                        spec.timeout,
                    )
                    .await;
                let latency = begin.elapsed();
                drop(permit);
                let held_ms = reply.as_ref().ok().and_then(|reply| {
                    header(&reply.headers, HELD_HEADER).and_then(|v| v.parse().ok())
                });
                let result = reply
                    .map(|reply| {
                        (
                            reply.status,
                            reply.region().map(str::to_string),
                            reply.error().map(str::to_string),
                        )
                    })
                    .map_err(|e| format!("{e:#}"));
                Outcome {
                    sent,
                    latency,
                    result,
                    held_ms,
                }
            })
        };
        pending.push(tokio::spawn(request));
    }
    let mut outcomes = Vec::with_capacity(pending.len());
    for handle in pending {
        match handle.await {
            Ok(outcome) => outcomes.push(outcome),
            Err(e) => outcomes.push(Outcome {
                sent: Duration::ZERO,
                latency: Duration::ZERO,
                result: Err(format!("request task failed: {e}")),
                held_ms: None,
            }),
        }
    }
    outcomes
}

/// A body of `len` bytes produced in 64 KiB chunks as it is sent (the test never holds it
/// whole).
pub fn streamed(len: u64) -> Body {
    const CHUNK: u64 = 64 * 1024;
    let chunks = futures::stream::iter((0..len.div_ceil(CHUNK)).map(move |i| {
        let size = CHUNK.min(len - i * CHUNK) as usize;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(Bytes::from(
            vec![b'm'; size],
        )))
    }));
    BodyExt::boxed(http_body_util::StreamBody::new(chunks))
}

/// A connector that dials one fixed address whatever the URI says (for tonic channels whose
/// URI authority is a function name).
#[derive(Clone, Debug)]
pub struct FixedConnector(pub SocketAddr);

impl tower_service::Service<http::Uri> for FixedConnector {
    type Response = hyper_util::rt::TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let addr = self.0;
        Box::pin(async move {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// A gRPC channel to function `function` through the listener at `addr` (h2c; the function's
/// name is the `:authority`).
pub async fn grpc_channel(addr: SocketAddr, function: &str) -> Result<tonic::transport::Channel> {
    tonic::transport::Endpoint::from_shared(format!("http://{function}"))
        .context("bad function name")?
        .timeout(Duration::from_secs(10))
        .connect_with_connector(FixedConnector(addr))
        .await
        .with_context(|| format!("gRPC channel to {function} via {addr}"))
}

impl MeshClient {
    /// Sends `GET http://<authority><path>` and returns when each body chunk arrived (from the
    /// send) with the chunk, reading to the end at most `within`.
    pub async fn get_timed_chunks(
        &self,
        authority: &str,
        path: &str,
        within: Duration,
    ) -> Result<(StatusCode, Vec<(Duration, Bytes)>)> {
        let request = Request::builder()
            .method(Method::GET)
            .uri(format!("http://{authority}{path}"))
            .body(empty())
            .context("building the request")?;
        let started = Instant::now();
        let exchange = async {
            let response = self.client.request(request).await?;
            let status = response.status();
            let mut body = response.into_body();
            let mut chunks = Vec::new();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    chunks.push((started.elapsed(), data));
                }
            }
            Ok::<_, anyhow::Error>((status, chunks))
        };
        tokio::time::timeout(within, exchange)
            .await
            .map_err(|_| anyhow!("GET {authority}{path}: not finished within {within:?}"))?
    }
}
