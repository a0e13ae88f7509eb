//! Body types of the proxy: what goes upstream (the client's body streamed through, or a small
//! body kept to be replayed on a retry) and what goes back downstream (the upstream's body, or a
//! short message).
//!
//! The client's body is read through [`ClientBody`], which records why it failed in a shared
//! [`BodyWatch`]. The upstream client only ever sees "the body failed", and for HTTP/2 not even
//! that (it resets the stream); the proxy asks the watch afterwards, so that a failure the client
//! caused (a malformed body, a disconnect, a stall, too many bytes) is never held against the
//! endpoint that was receiving it.

use std::error::Error as _;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::endpoints::InFlight;
use crate::errors::Reason;

/// Why reading the client's request body failed: always the client's doing, never an
/// endpoint's. The text of each is the detail of the answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientBodyError {
    /// Not valid HTTP framing (e.g. an invalid chunk size).
    #[error("the request body is malformed: {0}")]
    Malformed(String),
    /// The connection or stream ended before the body did.
    #[error("the client went away before the end of the request body: {0}")]
    Disconnected(String),
    /// The client sent nothing for this long while the body was unfinished.
    #[error("the client sent no request body data for {0:?}")]
    Idle(Duration),
    /// A request timeout passed while the proxy was still waiting for the client's body.
    #[error("the request body was still arriving when the {0:?} timeout passed")]
    Unfinished(Duration),
    /// More bytes than the limit.
    #[error("the request body is larger than {limit} bytes")]
    TooLarge { limit: u64 },
}

impl ClientBodyError {
    /// Sorts an error of the downstream body into malformed or disconnected. hyper's HTTP/1
    /// decoder reports bad chunk syntax and sizes as `InvalidData`/`InvalidInput` I/O errors and
    /// an early end as `UnexpectedEof`; anything else (a reset h2 stream, a broken connection)
    /// means the client is gone.
    pub fn from_incoming(error: &hyper::Error) -> Self {
        let detail = crate::error_chain(error);
        let mut source = error.source();
        while let Some(cause) = source {
            if let Some(io) = cause.downcast_ref::<io::Error>() {
                if matches!(
                    io.kind(),
                    io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput
                ) {
                    return ClientBodyError::Malformed(detail);
                }
                break;
            }
            source = cause.source();
        }
        ClientBodyError::Disconnected(detail)
    }

    pub fn reason(&self) -> Reason {
        match self {
            ClientBodyError::Malformed(_) => Reason::BadRequestBody,
            ClientBodyError::Disconnected(_) => Reason::ClientDisconnected,
            ClientBodyError::Idle(_) | ClientBodyError::Unfinished(_) => Reason::RequestBodyTimeout,
            ClientBodyError::TooLarge { .. } => Reason::RequestTooLarge,
        }
    }
}

/// Where the client's body stands, shared between the [`ClientBody`] (inside the upstream
/// client) and the proxy that classifies the attempt's outcome. Lock-free: a state byte, and the
/// failure written once.
#[derive(Debug, Default)]
pub struct BodyWatch {
    state: AtomicU8,
    failure: OnceLock<ClientBodyError>,
}

/// The body is being read and the proxy is not waiting for the client right now (the data so
/// far went upstream, or the upstream is not asking for more).
const FLOWING: u8 = 0;
/// The last read found nothing: the proxy waits for the client.
const WAITING_ON_CLIENT: u8 = 1;
const FINISHED: u8 = 2;
const FAILED: u8 = 3;

impl BodyWatch {
    /// The failure the client caused, if any, for an attempt that failed; `timed_out` is the
    /// timeout that ended the attempt, if one did. A timeout is the client's doing only while
    /// the proxy was waiting for more of its body: the endpoint never got the whole request.
    pub fn client_fault(&self, timed_out: Option<Duration>) -> Option<ClientBodyError> {
        match self.state.load(Ordering::Acquire) {
            FAILED => self.failure.get().cloned(),
            WAITING_ON_CLIENT => timed_out.map(ClientBodyError::Unfinished),
            _ => None,
        }
    }

    /// Whether the whole body was read.
    pub fn finished(&self) -> bool {
        self.state.load(Ordering::Acquire) == FINISHED
    }

    fn fail(&self, error: ClientBodyError) -> ClientBodyError {
        // The first failure is the cause; later polls (there should be none) keep it.
        let _ = self.failure.set(error.clone());
        self.state.store(FAILED, Ordering::Release);
        error
    }

    fn set(&self, state: u8) {
        self.state.store(state, Ordering::Release);
    }
}

/// Limits on a client's request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// Longest wait for the next bytes of an unfinished body (`None`: only the function's
    /// timeouts apply).
    pub idle_timeout: Option<Duration>,
    /// Most bytes a body may have (`None`: unlimited; bodies are streamed, so a large one costs
    /// no memory).
    pub max_bytes: Option<u64>,
}

/// The client's request body, read for the upstream request (or to be kept for replays), with
/// the idle timeout and size limit applied and every failure recorded in its [`BodyWatch`].
#[derive(Debug)]
pub struct ClientBody {
    body: Incoming,
    watch: Arc<BodyWatch>,
    limits: BodyLimits,
    received: u64,
    /// Armed when a read finds nothing after data (or at the start), so it measures how long
    /// the client has been silent, never how long the upstream took to ask for more.
    idle: Option<Pin<Box<Sleep>>>,
    idle_armed: bool,
}

impl ClientBody {
    pub fn new(body: Incoming, limits: BodyLimits) -> Self {
        Self {
            body,
            watch: Arc::new(BodyWatch::default()),
            limits,
            received: 0,
            idle: None,
            idle_armed: false,
        }
    }

    pub fn watch(&self) -> &Arc<BodyWatch> {
        &self.watch
    }

    /// Polls the idle timer while the client is silent; `Some` once it has run out.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Option<Duration> {
        let timeout = self.limits.idle_timeout?;
        if !self.idle_armed {
            let deadline = Instant::now() + timeout;
            match &mut self.idle {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => self.idle = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.idle_armed = true;
        }
        let sleep = self.idle.as_mut()?;
        sleep.as_mut().poll(cx).is_ready().then_some(timeout)
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Pending => {
                if let Some(waited) = this.poll_idle(cx) {
                    return Poll::Ready(Some(Err(this.watch.fail(ClientBodyError::Idle(waited)))));
                }
                this.watch.set(WAITING_ON_CLIENT);
                Poll::Pending
            }
            Poll::Ready(Some(Ok(frame))) => {
                this.idle_armed = false;
                if let Some(data) = frame.data_ref() {
                    this.received = this.received.saturating_add(data.len() as u64);
                    if let Some(limit) = this.limits.max_bytes {
                        if this.received > limit {
                            let error = ClientBodyError::TooLarge { limit };
                            return Poll::Ready(Some(Err(this.watch.fail(error))));
                        }
                    }
                }
                this.watch.set(FLOWING);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                let error = ClientBodyError::from_incoming(&error);
                tracing::debug!(error = %error, "the client's request body failed");
                Poll::Ready(Some(Err(this.watch.fail(error))))
            }
            Poll::Ready(None) => {
                this.watch.set(FINISHED);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body that fits the replay limit, kept whole so each attempt can send it again.
#[derive(Debug, Clone, Default)]
pub struct Replayable {
    data: Bytes,
    trailers: Option<HeaderMap>,
}

impl Replayable {
    pub fn new(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self { data, trailers }
    }

    /// A fresh body for one attempt (a reference-counted copy, not a byte copy).
    pub fn body(&self) -> RequestBody {
        if self.data.is_empty() && self.trailers.is_none() {
            return RequestBody::Empty;
        }
        RequestBody::Replay {
            data: (!self.data.is_empty()).then(|| self.data.clone()),
            trailers: self.trailers.clone(),
        }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// The body of a request sent upstream.
#[derive(Debug)]
pub enum RequestBody {
    Empty,
    Replay {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    /// The client's body, streamed through as it arrives.
    Stream(ClientBody),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Replay { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            RequestBody::Stream(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Replay { data, trailers } => data.is_none() && trailers.is_none(),
            RequestBody::Stream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Replay { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            RequestBody::Stream(body) => body.size_hint(),
        }
    }
}

/// The body of a response sent downstream.
#[derive(Debug)]
pub enum ResponseBody {
    /// The upstream's body; the endpoint counts the request as outstanding until it ends.
    Upstream { body: Incoming, in_flight: InFlight },
    /// A short body the sidecar wrote itself.
    Full(Option<Bytes>),
}

impl ResponseBody {
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        ResponseBody::Full((!data.is_empty()).then_some(data))
    }

    pub fn empty() -> Self {
        ResponseBody::Full(None)
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ResponseBody::Upstream { body, .. } => Pin::new(body).poll_frame(cx),
            ResponseBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream { body, .. } => body.is_end_stream(),
            ResponseBody::Full(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream { body, .. } => body.size_hint(),
            ResponseBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;

    /// What a server reading the request through [`ClientBody`] saw.
    struct Read {
        result: Result<Bytes, ClientBodyError>,
        watch: Arc<BodyWatch>,
    }

    /// Serves one HTTP/1.1 connection on loopback, reading the request body through a
    /// [`ClientBody`] with `limits`, while a raw client writes `raw` and then, unless
    /// `hold_open`, closes its side.
    async fn read_raw(raw: &'static [u8], limits: BodyLimits, hold_open: bool) -> Read {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let tx = std::sync::Mutex::new(Some(tx));
            let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
                let tx = tx.lock().unwrap().take();
                async move {
                    let body = ClientBody::new(request.into_body(), limits);
                    let watch = Arc::clone(body.watch());
                    let result = body.collect().await.map(|c| c.to_bytes());
                    if let Some(tx) = tx {
                        let _ = tx.send(Read { result, watch });
                    }
                    Ok::<_, std::convert::Infallible>(http::Response::new(ResponseBody::empty()))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client.write_all(raw).await.unwrap();
        if !hold_open {
            client.shutdown().await.unwrap();
        }
        let read = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .expect("the server read the body within 10 s")
            .unwrap();
        drop(client);
        server.abort();
        read
    }

    const NO_LIMITS: BodyLimits = BodyLimits {
        idle_timeout: None,
        max_bytes: None,
    };

    #[tokio::test]
    async fn a_whole_body_is_read_and_finished() {
        let read = read_raw(
            b"POST / HTTP/1.1\r\nhost: f\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            NO_LIMITS,
            true,
        )
        .await;
        assert_eq!(read.result.unwrap(), Bytes::from_static(b"hello"));
        assert!(read.watch.finished());
        assert_eq!(read.watch.client_fault(Some(Duration::from_secs(1))), None);
    }

    #[tokio::test]
    async fn an_invalid_chunk_size_is_malformed() {
        let read = read_raw(
            b"POST / HTTP/1.1\r\nhost: f\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            NO_LIMITS,
            true,
        )
        .await;
        let error = read.result.unwrap_err();
        assert!(matches!(error, ClientBodyError::Malformed(_)), "{error:?}");
        assert_eq!(error.reason(), Reason::BadRequestBody);
        // Whatever the attempt's outcome, the watch blames the client.
        assert_eq!(read.watch.client_fault(None), Some(error));
    }

    #[tokio::test]
    async fn a_client_gone_mid_body_is_disconnected() {
        let read = read_raw(
            b"POST / HTTP/1.1\r\nhost: f\r\ncontent-length: 100\r\n\r\nonly part",
            NO_LIMITS,
            false,
        )
        .await;
        let error = read.result.unwrap_err();
        assert!(
            matches!(error, ClientBodyError::Disconnected(_)),
            "{error:?}"
        );
        assert_eq!(error.reason(), Reason::ClientDisconnected);
        assert_eq!(read.watch.client_fault(None), Some(error));
    }

    #[tokio::test]
    async fn a_silent_client_runs_out_the_idle_timeout() {
        let limits = BodyLimits {
            idle_timeout: Some(Duration::from_millis(100)),
            max_bytes: None,
        };
        let read = read_raw(
            b"POST / HTTP/1.1\r\nhost: f\r\ncontent-length: 100\r\n\r\nsome",
            limits,
            true,
        )
        .await;
        let error = read.result.unwrap_err();
        assert_eq!(error, ClientBodyError::Idle(Duration::from_millis(100)));
        assert_eq!(error.reason(), Reason::RequestBodyTimeout);
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_too_large() {
        let limits = BodyLimits {
            idle_timeout: None,
            max_bytes: Some(4),
        };
        let read = read_raw(
            b"POST / HTTP/1.1\r\nhost: f\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            limits,
            true,
        )
        .await;
        let error = read.result.unwrap_err();
        assert_eq!(error, ClientBodyError::TooLarge { limit: 4 });
        assert_eq!(error.reason(), Reason::RequestTooLarge);
    }

    #[test]
    fn a_timeout_is_the_clients_only_while_waiting_for_its_body() {
        let watch = BodyWatch::default();
        let timeout = Some(Duration::from_secs(5));
        // Data went upstream and the upstream has not asked for more: the endpoint's doing.
        assert_eq!(watch.client_fault(timeout), None);
        watch.set(WAITING_ON_CLIENT);
        assert_eq!(
            watch.client_fault(timeout),
            Some(ClientBodyError::Unfinished(Duration::from_secs(5)))
        );
        // An upstream error while the client is slow is still the upstream's.
        assert_eq!(watch.client_fault(None), None);
        watch.set(FINISHED);
        assert_eq!(watch.client_fault(timeout), None);
    }

    #[tokio::test]
    async fn replayable_body_is_sent_whole_each_time() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-t", "1".parse().unwrap());
        let replay = Replayable::new(Bytes::from_static(b"hello"), Some(trailers));
        for _ in 0..2 {
            let body = replay.body();
            assert_eq!(body.size_hint().exact(), Some(5));
            let collected = body.collect().await.unwrap();
            assert_eq!(collected.trailers().unwrap()["x-t"], "1");
            assert_eq!(collected.to_bytes(), Bytes::from_static(b"hello"));
        }
        assert!(Replayable::default().body().is_end_stream());
    }

    #[tokio::test]
    async fn full_response_body() {
        let body = ResponseBody::full("meridian: x: y\n");
        assert_eq!(body.size_hint().exact(), Some(15));
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes, Bytes::from_static(b"meridian: x: y\n"));
        assert!(ResponseBody::empty().is_end_stream());
    }
}
