//! The `request_head` target: an HTTP/1.x request head as a client sends it, parsed by the
//! parser hyper uses, then through the sidecar's own head handling: the header size limit, the
//! Transfer-Encoding refusal, the Host / :authority rule and the function lookup, and the
//! stripping of hop-by-hop and `meridian-*` headers before the request goes on.

use std::sync::OnceLock;

use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};
use meridian_proto::v1 as pb;
use meridian_sidecar::errors::{ProxyError, MERIDIAN_HOP, MERIDIAN_PREFIX};
use meridian_sidecar::proxy::{
    check_framing, header_bytes, request_host, strip_hop_by_hop, strip_internal, Listener,
    MAX_HEADER_BYTES,
};
use meridian_sidecar::routes::{Compiler, RoutingState};

/// Headers one head may carry (hyper's default is 100).
const MAX_HEADERS: usize = 100;

/// The functions the sidecar under test routes: a bare name in the default namespace and one
/// in another namespace.
fn state() -> Option<&'static RoutingState> {
    static STATE: OnceLock<Option<RoutingState>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            let route = |namespace: &str, name: &str| pb::FunctionRoute {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                function_version: 1,
                tiers: vec![pb::Tier {
                    region: "us-east".to_owned(),
                    local: true,
                    endpoints: vec![pb::Endpoint {
                        address: "127.0.0.1:20001".to_owned(),
                        id: "i-1".to_owned(),
                        state: pb::EndpointState::Ready as i32,
                        zone: "us-east-a".to_owned(),
                    }],
                    ready_instances: 1,
                    order: pb::TierOrder::Local as i32,
                }],
                ..Default::default()
            };
            let table = pb::RoutingTable {
                version: 1,
                region: "us-east".to_owned(),
                functions: vec![route("default", "hello"), route("shop", "api")],
                local_generation: 1,
            };
            Compiler::new("us-east").compile(&table).ok()
        })
        .as_ref()
}

/// Bytes as a request head (`GET /x HTTP/1.1\r\nHost: hello\r\n\r\n`); an incomplete or
/// malformed head is refused by the parser, as hyper would refuse it.
pub fn request_head(data: &[u8]) {
    let Some(request) = parse(data) else {
        return;
    };
    let headers = request.headers();
    if header_bytes(headers) > MAX_HEADER_BYTES {
        return;
    }
    let framing = check_framing(headers);
    if framing.is_ok() {
        let codings: Vec<&HeaderValue> = headers.get_all(TRANSFER_ENCODING).iter().collect();
        assert!(
            codings.len() <= 1,
            "several Transfer-Encoding lines let through"
        );
        if let Some(coding) = codings.first() {
            assert!(
                coding
                    .as_bytes()
                    .trim_ascii()
                    .eq_ignore_ascii_case(b"chunked"),
                "Transfer-Encoding {coding:?} let through"
            );
            assert!(
                !headers.contains_key(CONTENT_LENGTH),
                "Transfer-Encoding with Content-Length let through"
            );
        }
    }
    // The same head as HTTP/1.x, and as HTTP/2 would carry it (:authority in the URI).
    let mut as_h2 = Request::new(());
    *as_h2.method_mut() = request.method().clone();
    *as_h2.uri_mut() = request.uri().clone();
    *as_h2.version_mut() = Version::HTTP_2;
    *as_h2.headers_mut() = request.headers().clone();
    for request in [&request, &as_h2] {
        route(request);
    }
    for listener in [Listener::Outbound, Listener::Gateway] {
        let mut forwarded = request.headers().clone();
        strip_hop_by_hop(&mut forwarded);
        strip_internal(&mut forwarded, listener);
        check_forwarded(request.headers(), &forwarded, listener);
    }
}

/// The head as hyper's HTTP/1 server reads it, into an `http::Request`.
fn parse(data: &[u8]) -> Option<Request<()>> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut slots);
    match head.parse(data) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return None,
    }
    let method = Method::from_bytes(head.method?.as_bytes()).ok()?;
    let uri: Uri = head.path?.parse().ok()?;
    let version = match head.version? {
        0 => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut headers = HeaderMap::new();
    for header in head.headers.iter() {
        let name = HeaderName::from_bytes(header.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(header.value).ok()?;
        headers.append(name, value);
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Some(request)
}

/// Finds the function the request names, and renders the answer the sidecar gives when it
/// names none.
fn route(request: &Request<()>) {
    let region = HeaderValue::from_static("us-east");
    let host = match request_host(request) {
        Ok(host) => host,
        Err(error) => {
            let _ = error.to_response(&region);
            return;
        }
    };
    let Some(state) = state() else {
        panic!("the fixed table does not compile");
    };
    if let Err(error) = state.lookup(host) {
        let error = match error {
            meridian_sidecar::routes::HostError::Unknown => ProxyError::UnknownFunction {
                host: host.to_owned(),
            },
            meridian_sidecar::routes::HostError::Malformed(why) => ProxyError::BadHost {
                host: host.to_owned(),
                why,
            },
        };
        let _ = error.to_response(&region);
    }
}

/// What goes on holds no connection-scoped header and no `meridian-*` header but a gateway's
/// valid `meridian-hop`, and keeps Host.
fn check_forwarded(received: &HeaderMap, forwarded: &HeaderMap, listener: Listener) {
    for name in [CONNECTION, UPGRADE, TRANSFER_ENCODING] {
        assert!(!forwarded.contains_key(&name), "{name} forwarded");
    }
    for name in ["keep-alive", "proxy-connection"] {
        assert!(!forwarded.contains_key(name), "{name} forwarded");
    }
    if let Some(te) = forwarded.get(TE) {
        assert_eq!(te.as_bytes(), b"trailers", "TE {te:?} forwarded");
    }
    for name in forwarded.keys() {
        let internal = name.as_str().starts_with(MERIDIAN_PREFIX);
        if internal {
            assert!(
                listener == Listener::Gateway && *name == MERIDIAN_HOP,
                "{name} forwarded from the {listener:?} listener"
            );
            assert_eq!(forwarded.get_all(name).iter().count(), 1, "several {name}");
        }
    }
    assert_eq!(
        forwarded.get_all(HOST).iter().collect::<Vec<_>>(),
        received.get_all(HOST).iter().collect::<Vec<_>>(),
        "Host changed"
    );
}
