//! Failures answered by the sidecar itself: each at once, with a status, a `meridian-error`
//! reason header, this sidecar's `meridian-region`, and a one-line text body
//! `meridian: <reason>: <detail>`.

use std::time::Duration;

use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};

use crate::body::{ClientBodyError, ResponseBody};

/// The reason header on every response the sidecar answers itself.
pub const MERIDIAN_ERROR: HeaderName = HeaderName::from_static("meridian-error");
/// The region whose instance served a response (or whose sidecar answered it).
pub const MERIDIAN_REGION: HeaderName = HeaderName::from_static("meridian-region");
/// Set on requests sent to another region's gateway: the region they come from.
pub const MERIDIAN_HOP: HeaderName = HeaderName::from_static("meridian-hop");
/// Every header whose name starts with this is the mesh's own: a client may not set one.
pub const MERIDIAN_PREFIX: &str = "meridian-";

/// The status of a request whose client went away (nginx's 499): nobody receives it, but the
/// metrics and logs say the client ended it, not the function.
const CLIENT_CLOSED_REQUEST: u16 = 499;

/// Why a request could not be served, as the `meridian-error` header spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    UnknownFunction,
    BadHost,
    BadRequestBody,
    ClientDisconnected,
    RequestBodyTimeout,
    RequestTooLarge,
    AmbiguousTransferEncoding,
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
            Reason::BadRequestBody => "bad-request-body",
            Reason::ClientDisconnected => "client-disconnected",
            Reason::RequestBodyTimeout => "request-body-timeout",
            Reason::RequestTooLarge => "request-too-large",
            Reason::AmbiguousTransferEncoding => "ambiguous-transfer-encoding",
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
            Reason::BadHost | Reason::BadRequestBody | Reason::AmbiguousTransferEncoding => {
                StatusCode::BAD_REQUEST
            }
            Reason::ClientDisconnected => {
                StatusCode::from_u16(CLIENT_CLOSED_REQUEST).unwrap_or(StatusCode::BAD_REQUEST)
            }
            Reason::RequestBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Reason::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
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

    /// Whether it is a failure the client causes with a request an endpoint is (or would be)
    /// given: never counted against the endpoint, counted in `meridian_client_errors_total`.
    /// (A bad Host, an unknown function or oversized headers are the client's too, but are
    /// refused before any endpoint is chosen, and counted as unrouted.)
    pub fn is_client_fault(self) -> bool {
        matches!(
            self,
            Reason::BadRequestBody
                | Reason::ClientDisconnected
                | Reason::RequestBodyTimeout
                | Reason::RequestTooLarge
                | Reason::AmbiguousTransferEncoding
        )
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
    #[error(transparent)]
    ClientBody(ClientBodyError),
    #[error("the request declares {length} body bytes, more than the limit of {limit}")]
    DeclaredTooLarge { length: u64, limit: u64 },
    #[error("Transfer-Encoding {value:?} is ambiguous: only exactly \"chunked\" (and no Content-Length) is accepted")]
    AmbiguousTransferEncoding { value: String },
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
            ProxyError::ClientBody(error) => error.reason(),
            ProxyError::DeclaredTooLarge { .. } => Reason::RequestTooLarge,
            ProxyError::AmbiguousTransferEncoding { .. } => Reason::AmbiguousTransferEncoding,
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
            (Reason::BadRequestBody, "bad-request-body", 400),
            (Reason::ClientDisconnected, "client-disconnected", 499),
            (Reason::RequestBodyTimeout, "request-body-timeout", 408),
            (Reason::RequestTooLarge, "request-too-large", 413),
            (
                Reason::AmbiguousTransferEncoding,
                "ambiguous-transfer-encoding",
                400,
            ),
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
            // Exactly the 4xx causes are the client's: 5xx are the mesh's or an endpoint's,
            // and a bad Host or an unknown function never reached one.
            let client = matches!(status, 400 | 408 | 413 | 499)
                && !matches!(reason, Reason::BadHost | Reason::UnknownFunction);
            assert_eq!(reason.is_client_fault(), client, "{text}");
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
