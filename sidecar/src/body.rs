//! Body types of the proxy: what goes upstream (streamed through, or a small body kept to be
//! replayed on a retry) and what goes back downstream (the upstream's body, or a short message).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::endpoints::InFlight;

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
    Stream(Incoming),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
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
