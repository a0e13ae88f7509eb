//! Failures answered by the sidecar itself: each at once, with a status, a `meridian-error`
//! reason header, this sidecar's `meridian-region`, and a one-line text body
//! `meridian: <reason>: <detail>`.

use std::time::Duration;

use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};

use crate::body::ResponseBody;

/// The reason header on every response the sidecar answers itself.
pub const MERIDIAN_ERROR: HeaderName = HeaderName::from_static("meridian-error");
/// The region whose instance served a response (or whose sidecar answered it).
pub const MERIDIAN_REGION: HeaderName = HeaderName::from_static("meridian-region");
/// Set on requests sent to another region's gateway: the region they come from.
pub const MERIDIAN_HOP: HeaderName = HeaderName::from_static("meridian-hop");

/// Why a request could not be served, as the `meridian-error` header spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    UnknownFunction,
    BadHost,
    BadRequest,
    NoEndpoints,
    AllEjected,
    Timeout,
    RetryBudgetExhausted,
    UpstreamUnavailable,
    NoTable,
    HeadersTooLarge,
    ColdStartTimeout,
    HoldQueueFull,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::UnknownFunction => "unknown-function",
            Reason::BadHost => "bad-host",
            Reason::BadRequest => "bad-request",
            Reason::NoEndpoints => "no-endpoints",
            Reason::AllEjected => "all-ejected",
            Reason::Timeout => "timeout",
            Reason::RetryBudgetExhausted => "retry-budget-exhausted",
            Reason::UpstreamUnavailable => "upstream-unavailable",
            Reason::NoTable => "no-table",
            Reason::HeadersTooLarge => "headers-too-large",
            Reason::ColdStartTimeout => "cold-start-timeout",
            Reason::HoldQueueFull => "hold-queue-full",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Reason::UnknownFunction => StatusCode::NOT_FOUND,
            Reason::BadHost | Reason::BadRequest => StatusCode::BAD_REQUEST,
            Reason::NoEndpoints
            | Reason::AllEjected
            | Reason::RetryBudgetExhausted
            | Reason::NoTable
            | Reason::ColdStartTimeout
            | Reason::HoldQueueFull => StatusCode::SERVICE_UNAVAILABLE,
            Reason::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Reason::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Reason::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }
}

/// A request the proxy answers itself. The display text (with sources) is the detail.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no routing table loaded yet")]
    NoTable,
    #[error("the request names no host (no Host header or :authority)")]
    MissingHost,
    #[error("host {host:?}: {why}")]
    BadHost { host: String, why: &'static str },
    #[error("no function for host {host:?}")]
    UnknownFunction { host: String },
    #[error("request headers are {size} bytes, more than {limit}")]
    HeadersTooLarge { size: usize, limit: usize },
    #[error("cannot read the request body")]
    RequestBody(#[source] hyper::Error),
    #[error("function {function} has no endpoints{where_}")]
    NoEndpoints {
        function: String,
        where_: &'static str,
    },
    #[error("every endpoint of function {function} is ejected or down")]
    AllEjected { function: String },
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("{endpoint} did not answer within the per-try timeout {after:?}")]
    TryTimeout { endpoint: String, after: Duration },
    #[error("{endpoint}")]
    Upstream {
        endpoint: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("cannot build the request URI for {endpoint}")]
    BadUri {
        endpoint: String,
        #[source]
        source: http::uri::InvalidUriParts,
    },
    #[error("a retry was needed but the retry budget is spent; last attempt: {last}")]
    BudgetExhausted { last: String },
    #[error("no instance of function {function} became ready within {waited:?}")]
    ColdStartTimeout { function: String, waited: Duration },
    #[error("function {function} already has {limit} requests waiting for an instance")]
    HoldQueueFull { function: String, limit: u32 },
}

impl ProxyError {
    pub fn reason(&self) -> Reason {
        match self {
            ProxyError::NoTable => Reason::NoTable,
            ProxyError::MissingHost | ProxyError::BadHost { .. } => Reason::BadHost,
            ProxyError::UnknownFunction { .. } => Reason::UnknownFunction,
            ProxyError::HeadersTooLarge { .. } => Reason::HeadersTooLarge,
            ProxyError::RequestBody(_) => Reason::BadRequest,
            ProxyError::NoEndpoints { .. } => Reason::NoEndpoints,
            ProxyError::AllEjected { .. } => Reason::AllEjected,
            ProxyError::Timeout(_) | ProxyError::TryTimeout { .. } => Reason::Timeout,
            ProxyError::Upstream { .. } | ProxyError::BadUri { .. } => Reason::UpstreamUnavailable,
            ProxyError::BudgetExhausted { .. } => Reason::RetryBudgetExhausted,
            ProxyError::ColdStartTimeout { .. } => Reason::ColdStartTimeout,
            ProxyError::HoldQueueFull { .. } => Reason::HoldQueueFull,
        }
    }

    /// The response: status and headers from the reason, `meridian-region` = `region` (this
    /// sidecar's), body `meridian: <reason>: <detail>\n`.
    pub fn to_response(&self, region: &HeaderValue) -> Response<ResponseBody> {
        error_response(self.reason(), &crate::error_chain(self), region)
    }
}

/// A response the sidecar writes itself for `reason`.
pub fn error_response(
    reason: Reason,
    detail: &str,
    region: &HeaderValue,
) -> Response<ResponseBody> {
    let body = format!("meridian: {}: {detail}\n", reason.as_str());
    let mut response = Response::new(ResponseBody::full(body));
    *response.status_mut() = reason.status();
    let headers = response.headers_mut();
    headers.insert(MERIDIAN_ERROR, HeaderValue::from_static(reason.as_str()));
    headers.insert(MERIDIAN_REGION, region.clone());
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn reasons_and_statuses() {
        let cases = [
            (Reason::UnknownFunction, "unknown-function", 404),
            (Reason::BadHost, "bad-host", 400),
            (Reason::NoEndpoints, "no-endpoints", 503),
            (Reason::AllEjected, "all-ejected", 503),
            (Reason::Timeout, "timeout", 504),
            (Reason::RetryBudgetExhausted, "retry-budget-exhausted", 503),
            (Reason::UpstreamUnavailable, "upstream-unavailable", 502),
            (Reason::NoTable, "no-table", 503),
            (Reason::HeadersTooLarge, "headers-too-large", 431),
            (Reason::ColdStartTimeout, "cold-start-timeout", 503),
            (Reason::HoldQueueFull, "hold-queue-full", 503),
        ];
        for (reason, text, status) in cases {
            assert_eq!(reason.as_str(), text);
            assert_eq!(reason.status().as_u16(), status, "{text}");
        }
    }

    #[tokio::test]
    async fn error_response_carries_reason_region_and_detail() {
        let region = HeaderValue::from_static("us-east");
        let error = ProxyError::UnknownFunction {
            host: "nope".into(),
        };
        let response = error.to_response(&region);
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(response.headers()[MERIDIAN_ERROR], "unknown-function");
        assert_eq!(response.headers()[MERIDIAN_REGION], "us-east");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            body,
            "meridian: unknown-function: no function for host \"nope\"\n"
        );
    }

    #[test]
    fn budget_and_timeout_map_to_their_reasons() {
        let e = ProxyError::BudgetExhausted {
            last: "503 from 127.0.0.1:1".into(),
        };
        assert_eq!(e.reason(), Reason::RetryBudgetExhausted);
        let e = ProxyError::TryTimeout {
            endpoint: "x:1".into(),
            after: Duration::from_millis(5),
        };
        assert_eq!(e.reason(), Reason::Timeout);
        assert_eq!(
            ProxyError::HeadersTooLarge { size: 1, limit: 0 }.reason(),
            Reason::HeadersTooLarge
        );
    }
}
