//! An HTTP backend served from the test process on a region's address: registered as an
//! `external` function's URL, it stands in for a function instance whose behaviour the test sets
//! (answer, fail with a status, drop the connection) and counts every request that reaches it,
//! which is how tests count what the sidecar really sends (retries included). It keeps the
//! headers of the last request, which is how tests see what a function is sent.
//!
//! It speaks HTTP/1.1 and h2c (prior knowledge), like a sidecar's upstream may.
//!
//! Paths: `/` answers `<name>`; `/echo-size` reads the whole body (slowly with `?slow=1`) and
//! answers `received=<bytes>`; `/bytes?n=N` streams N bytes back; `/drip?n=N&ms=M` sends N
//! lines, one every M milliseconds.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::http::Body;

/// What the backend does with the next requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behavior {
    /// Serve normally.
    Serve,
    /// Answer every request with this status (e.g. 503).
    Status(u16),
    /// Read the request head, then close the connection without answering (the request was
    /// sent; no response will come).
    Drop,
    /// Serve after this many milliseconds.
    Delay(u64),
    /// Answer every other request with this status, serve the rest: failures that never come
    /// several in a row, so passive ejection does not take the instance out.
    EveryOther(u16),
}

#[derive(Debug)]
struct State {
    name: String,
    behavior: Mutex<Behavior>,
    requests: AtomicU64,
    by_method: Mutex<Vec<(String, u64)>>,
    body_bytes: AtomicU64,
    last_headers: Mutex<Option<http::HeaderMap>>,
}

/// One backend; stops (closing every connection, like a killed process) when dropped or
/// [`TestBackend::stop`]ped.
pub struct TestBackend {
    addr: SocketAddr,
    state: Arc<State>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestBackend {
    /// Serves on `addr` (e.g. a free port of a region's address), named `name` in its answers.
    pub async fn start(addr: SocketAddr, name: &str) -> Result<TestBackend> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding backend {name} on {addr}"))?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            name: name.to_string(),
            behavior: Mutex::new(Behavior::Serve),
            requests: AtomicU64::new(0),
            by_method: Mutex::new(Vec::new()),
            body_bytes: AtomicU64::new(0),
            last_headers: Mutex::new(None),
        });
        let task = tokio::spawn(serve(listener, Arc::clone(&state)));
        Ok(TestBackend {
            addr,
            state,
            task: Some(task),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`: the URL to register.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes what the next requests get.
    pub fn set_behavior(&self, behavior: Behavior) {
        *self
            .state
            .behavior
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = behavior;
    }

    /// Requests that reached it so far (any method, any outcome).
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Requests with `method` that reached it so far.
    pub fn requests_with(&self, method: &str) -> u64 {
        self.state
            .by_method
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(m, _)| m == method)
            .map_or(0, |(_, n)| *n)
    }

    /// The headers of the last request that reached it (as its HTTP server parsed them).
    pub fn last_headers(&self) -> Option<http::HeaderMap> {
        self.state
            .last_headers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Request body bytes read so far.
    pub fn body_bytes(&self) -> u64 {
        self.state.body_bytes.load(Ordering::SeqCst)
    }

    /// Stops listening and closes every connection.
    pub fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve(listener: TcpListener, state: Arc<State>) {
    // Owned here: aborting this task drops (closes) every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let state = Arc::clone(&state);
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        handle(Arc::clone(&state), request)
                    });
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    // Accept what a sidecar may pass on (its limit is 64 KiB of headers); h2's
                    // default of 16 KiB would answer 431 itself.
                    builder.http2().max_header_list_size(256 * 1024);
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Aborts the connection: hyper closes it when a service returns an error.
#[derive(Debug)]
struct DropConnection;

impl std::fmt::Display for DropConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dropping the connection on purpose")
    }
}

impl std::error::Error for DropConnection {}

async fn handle(
    state: Arc<State>,
    request: Request<Incoming>,
) -> Result<Response<Body>, DropConnection> {
    *state.last_headers.lock().unwrap_or_else(|e| e.into_inner()) = Some(request.headers().clone());
    let nth = state.requests.fetch_add(1, Ordering::SeqCst);
    {
        let mut by_method = state.by_method.lock().unwrap_or_else(|e| e.into_inner());
        let method = request.method().as_str().to_string();
        match by_method.iter_mut().find(|(m, _)| *m == method) {
            Some((_, n)) => *n += 1,
            None => by_method.push((method, 1)),
        }
    }
    let behavior = *state.behavior.lock().unwrap_or_else(|e| e.into_inner());
    match behavior {
        Behavior::Serve => {}
        Behavior::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return Ok(named(
                &state,
                text(status, format!("{} failing on purpose\n", state.name)),
            ));
        }
        Behavior::Drop => return Err(DropConnection),
        Behavior::Delay(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
        Behavior::EveryOther(code) if nth % 2 == 1 => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return Ok(named(
                &state,
                text(status, format!("{} failing on purpose\n", state.name)),
            ));
        }
        Behavior::EveryOther(_) => {}
    }
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or_default().to_string();
    match path.as_str() {
        "/echo-size" => {
            let slow = query.split('&').any(|kv| kv == "slow=1");
            let mut body = request.into_body();
            let mut received: u64 = 0;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return Err(DropConnection);
                };
                if let Some(data) = frame.data_ref() {
                    received += data.len() as u64;
                    state
                        .body_bytes
                        .fetch_add(data.len() as u64, Ordering::SeqCst);
                }
                if slow {
                    // Read slower than the client sends, so a proxy that buffers would pile up
                    // the body in memory.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            Ok(named(
                &state,
                text(StatusCode::OK, format!("received={received}\n")),
            ))
        }
        "/bytes" => {
            let n: u64 = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("n="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            const CHUNK: u64 = 64 * 1024;
            let chunks = futures::stream::iter((0..n.div_ceil(CHUNK)).map(move |i| {
                let len = CHUNK.min(n - i * CHUNK) as usize;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(Bytes::from(
                    vec![b'x'; len],
                )))
            }));
            let body = BodyExt::boxed(StreamBody::new(chunks));
            Ok(Response::builder()
                .status(StatusCode::OK)
                .header("content-length", n.to_string())
                .header("x-backend", state.name.as_str())
                .body(body)
                .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, String::new())))
        }
        "/drip" => {
            let param = |name: &str| -> u64 {
                query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            let (n, every) = (param("n"), Duration::from_millis(param("ms")));
            let lines = futures::stream::unfold(0u64, move |i| async move {
                if i >= n {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(every).await;
                }
                let frame = Frame::data(Bytes::from(format!("line {i}\n")));
                Some((
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(frame),
                    i + 1,
                ))
            });
            let mut response = Response::new(BodyExt::boxed(StreamBody::new(lines)));
            response.headers_mut().insert(
                "content-type",
                http::HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            Ok(named(&state, response))
        }
        _ => {
            // Drain the body so that keep-alive works.
            let _ = request.into_body().collect().await;
            Ok(named(
                &state,
                text(StatusCode::OK, format!("{}\n", state.name)),
            ))
        }
    }
}

/// Adds `x-backend: <name>`.
fn named(state: &State, mut response: Response<Body>) -> Response<Body> {
    if let Ok(value) = http::HeaderValue::from_str(&state.name) {
        response.headers_mut().insert("x-backend", value);
    }
    response
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(crate::http::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Takes the address of a killed instance and resets every connection made to it, recording
/// when each came: how a test sees that (and when) a sidecar still tries a dead instance. A
/// dead process would refuse the connection instead; either way the attempt fails before any
/// response, and a refusal leaves no trace to count.
pub struct Tombstone {
    addr: SocketAddr,
    attempts: Arc<Mutex<Vec<tokio::time::Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Tombstone {
    /// Binds `addr` (free again once its process was reaped).
    pub async fn bind(addr: SocketAddr) -> Result<Tombstone> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding a tombstone on {addr}"))?;
        let attempts: Arc<Mutex<Vec<tokio::time::Instant>>> = Arc::default();
        let recorded = Arc::clone(&attempts);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                recorded
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(tokio::time::Instant::now());
                let _ = stream.set_zero_linger();
                drop(stream);
            }
        });
        Ok(Tombstone {
            addr,
            attempts,
            task,
        })
    }

    /// The address it holds.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// When each connection attempt came, in order.
    pub fn attempts(&self) -> Vec<tokio::time::Instant> {
        self.attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Tombstone {
    fn drop(&mut self) {
        self.task.abort();
    }
}
