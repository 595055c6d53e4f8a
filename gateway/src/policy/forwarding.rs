//! Standard proxy headers: request ids, `X-Forwarded-*`, the copies of
//! each header for the other side, and hop-by-hop fields.
//!
//! Hop-by-hop fields (`Connection` and what it names, `Keep-Alive`, `TE`,
//! `Upgrade` outside WebSocket, ...) are removed here on both sides:
//! [`sanitize_request`] before a request goes upstream, [`strip_hop_by_hop`]
//! before a response goes to the client.

use std::net::IpAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderName, HeaderValue};
use ipnet::IpNet;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::{Error, ErrorType};
use telemetry::trace::{TRACEPARENT, TRACESTATE, TraceContext};

pub const REQUEST_ID: &str = "x-request-id";
/// The response header that gives the client its request's trace id.
pub const TRACE_ID: &str = "x-trace-id";
const FORWARDED_FOR: &str = "x-forwarded-for";
const FORWARDED_PROTO: &str = "x-forwarded-proto";
const FORWARDED_HOST: &str = "x-forwarded-host";

/// Longest client-supplied request id kept; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// The request fields that never go upstream (RFC 9110 §7.6.1, what would
/// change the upstream connection itself, and `Expect`: the gateway answers
/// `100-continue` itself and streams the body as it comes).
const HOP_BY_HOP_REQUEST: [HeaderName; 11] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::CONNECTION,
    http::header::UPGRADE,
    HeaderName::from_static("http2-settings"),
    http::header::EXPECT,
];

/// The response fields that never go downstream (Pingora writes its own
/// `Connection` and framing).
const HOP_BY_HOP_RESPONSE: [HeaderName; 3] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::UPGRADE,
];

/// A request's id, kept as a header value: the client's is reused as is,
/// and copies onto the upstream request and the response share one buffer.
#[derive(Debug, Clone, Default)]
pub struct RequestId(Option<HeaderValue>);

impl RequestId {
    /// A new id, for a request that did not bring a usable one.
    pub fn new() -> Self {
        RequestId(Some(new_header_value()))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-")
    }

    /// The id as a header value (a reference-counted copy).
    pub fn header(&self) -> HeaderValue {
        self.0
            .clone()
            .unwrap_or_else(|| HeaderValue::from_static("-"))
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The client's `X-Request-Id` if it is sane (1 to 128 characters of
/// letters, digits, `-`, `_`, `.`, `:`), else a new one.
pub fn request_id(request: &RequestHeader) -> RequestId {
    let kept = request
        .headers
        .get(REQUEST_ID)
        .filter(|value| value.to_str().is_ok_and(is_sane_request_id))
        .cloned();
    RequestId(Some(kept.unwrap_or_else(new_header_value)))
}

/// A new id as a header value (hex digits only: always a valid one). Its
/// bytes are one shared allocation, so the copies on the upstream request
/// and on the response cost a reference count each.
fn new_header_value() -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(new_request_id()))
        .unwrap_or_else(|_| HeaderValue::from_static("-"))
}

fn is_sane_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// A new id: 32 hex digits, a random per-process half and a scrambled
/// counter half. Unique within the process (the scramble is a bijection),
/// unguessable across processes, and cheaper than a random UUID.
fn new_request_id() -> [u8; 32] {
    static PROCESS: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let process = *PROCESS.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut id = [0; 32];
    lower_hex(process, &mut id[..16]);
    lower_hex(splitmix64(count ^ process), &mut id[16..]);
    id
}

/// `value` as 16 lowercase hex digits into `out` (16 bytes).
fn lower_hex(value: u64, out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, digit) in out.iter_mut().enumerate() {
        *digit = DIGITS[((value >> (60 - 4 * i)) & 0xf) as usize];
    }
}

/// SplitMix64's finaliser: a bijection on u64 that scatters neighbours.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A client's address as `X-Forwarded-For` gives it: made once per
/// connection, shared by its requests.
pub fn client_ip_value(ip: IpAddr) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(ip.to_string())).ok()
}

/// The trace id of `trace` as a header value (32 hex digits).
pub fn trace_id_value(trace: &TraceContext) -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(trace.trace_id_bytes()))
        .unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// Sets `traceparent` on the request going upstream: `span` is its parent.
/// The client's `tracestate` goes with it only if its `traceparent` was
/// valid (`continued`); a malformed `traceparent` is never forwarded.
pub fn set_trace_headers(
    request: &mut RequestHeader,
    span: &TraceContext,
    continued: bool,
) -> pingora::Result<()> {
    let value = HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(span.header_bytes()))
        .map_err(|e| Error::because(ErrorType::InternalError, "traceparent", e))?;
    request.insert_header(TRACEPARENT, value)?;
    if !continued && request.headers.contains_key(TRACESTATE) {
        request.remove_header(TRACESTATE);
    }
    Ok(())
}

/// Whether `ip` is in one of `nets`.
pub fn is_trusted(ip: IpAddr, nets: &[IpNet]) -> bool {
    nets.iter().any(|net| net.contains(&ip))
}

/// The client's address as the gateway trusts it: the connection's peer,
/// unless the peer is a trusted proxy. Then the forwarding headers it sent
/// are believed: the right-most address of `X-Forwarded-For` (or, without
/// it, of `Forwarded`'s `for=`) that is not itself a trusted proxy. An
/// entry that is not an address ends the walk (the last address believed
/// wins): a client can add entries on the left, never on the right.
pub fn client_address(peer: IpAddr, request: &RequestHeader, trusted: &[IpNet]) -> IpAddr {
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let forwarded_for: Vec<&str> = request
        .headers
        .get_all(FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    let entries: Vec<&str> = if forwarded_for.is_empty() {
        request
            .headers
            .get_all(http::header::FORWARDED)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|element| {
                element.split(';').find_map(|pair| {
                    let (key, value) = pair.trim().split_once('=')?;
                    key.eq_ignore_ascii_case("for")
                        .then(|| value.trim().trim_matches('"'))
                })
            })
            .collect()
    } else {
        forwarded_for
    };
    let mut client = peer;
    for entry in entries.iter().rev() {
        let Some(ip) = parse_forwarded_address(entry) else {
            break;
        };
        client = ip;
        if !is_trusted(ip, trusted) {
            break;
        }
    }
    client
}

/// `192.0.2.7`, `192.0.2.7:4711`, `2001:db8::1`, `[2001:db8::1]:4711`.
fn parse_forwarded_address(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(socket) = entry.parse::<std::net::SocketAddr>() {
        return Some(socket.ip());
    }
    let bracketed = entry.strip_prefix('[')?.split(']').next()?;
    bracketed.parse().ok()
}

/// Sets `X-Forwarded-For`, `-Proto`, `-Host` and `X-Request-Id` on the
/// request going upstream. From a `trusted` peer (a proxy in
/// `trusted_proxies`), what it forwarded is kept: the peer is appended to
/// `X-Forwarded-For`, its `-Proto` and `-Host` stay. From any other peer,
/// the client's forwarding headers are replaced (`X-Forwarded-For` is the
/// peer, as [`client_ip_value`] gives it) and `Forwarded` removed, so a
/// client cannot choose the address or scheme an upstream believes.
pub fn set_forwarding_headers(
    request: &mut RequestHeader,
    peer: Option<&HeaderValue>,
    trusted: bool,
    request_id: &RequestId,
) -> pingora::Result<()> {
    if trusted {
        if let Some(ip) = peer {
            let previous: Vec<&[u8]> = request
                .headers
                .get_all(FORWARDED_FOR)
                .iter()
                .map(HeaderValue::as_bytes)
                .filter(|v| !v.trim_ascii().is_empty())
                .collect();
            let forwarded_for = if previous.is_empty() {
                ip.clone()
            } else {
                let mut joined = previous.join(&b", "[..]);
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(ip.as_bytes());
                HeaderValue::from_maybe_shared(bytes::Bytes::from(joined)).map_err(|e| {
                    Error::because(ErrorType::InvalidHTTPHeader, "X-Forwarded-For", e)
                })?
            };
            request.insert_header(FORWARDED_FOR, forwarded_for)?;
        }
    } else {
        match peer {
            Some(ip) => request.insert_header(FORWARDED_FOR, ip.clone())?,
            None => {
                request.remove_header(FORWARDED_FOR);
            }
        }
        if request.headers.contains_key(http::header::FORWARDED) {
            request.remove_header(&http::header::FORWARDED);
        }
    }
    if !(trusted && request.headers.contains_key(FORWARDED_PROTO)) {
        // This gateway terminates plain HTTP; it is the edge, so it says so.
        request.insert_header(FORWARDED_PROTO, "http")?;
    }
    if !(trusted && request.headers.contains_key(FORWARDED_HOST)) {
        match request.headers.get(http::header::HOST).cloned() {
            Some(host) => request.insert_header(FORWARDED_HOST, host)?,
            None => {
                request.remove_header(FORWARDED_HOST);
            }
        }
    }
    request.insert_header(REQUEST_ID, request_id.header())?;
    Ok(())
}

/// The field names a `Connection` header lists, lowercased (`close` and
/// `keep-alive` are options, not names). No allocation without one.
fn connection_nominated(headers: &http::HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty() && name != "close" && name != "keep-alive")
        .collect()
}

/// Whether the request asks to become a WebSocket (RFC 6455 §4.1).
fn is_websocket_upgrade(request: &RequestHeader) -> bool {
    request.method == http::Method::GET
        && request.version == http::Version::HTTP_11
        && request
            .headers
            .get(http::header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
        && connection_nominated(&request.headers)
            .iter()
            .any(|name| name == "upgrade")
}

/// The client's request header as the start of the upstream one. Unless
/// `preserve_case`, its fields are copied without Pingora's record of
/// their original case, so names go upstream lowercase, or capitalized as
/// usual for the standard ones (as HAProxy and Envoy send them; field
/// names are case-insensitive, RFC 9110 §5.1). Keeping the case doubles
/// the header map work of every request: a second map to copy and to keep
/// in step on each field added. A request target the URI does not
/// reproduce byte for byte (absolute-form, authority-form, not UTF-8) is
/// kept by copying the whole header.
pub fn header_copy_request(request: &RequestHeader, preserve_case: bool) -> RequestHeader {
    let target_is_the_uris = request.raw_path_is_utf8()
        && request.uri.path_and_query().map(|p| p.as_str().as_bytes()) == Some(request.raw_path());
    if target_is_the_uris && !preserve_case {
        RequestHeader::from(request.as_owned_parts())
    } else {
        request.clone()
    }
}

/// The upstream's response header as the start of the client's: as
/// [`header_copy_request`], the fields without their original case unless
/// `preserve_case`; the status line's reason phrase kept.
pub fn header_copy_response(
    response: &ResponseHeader,
    preserve_case: bool,
) -> pingora::Result<ResponseHeader> {
    if preserve_case {
        return Ok(response.clone());
    }
    let mut copy = ResponseHeader::from(response.as_owned_parts());
    copy.set_reason_phrase(response.get_reason_phrase())?;
    Ok(copy)
}

/// Removes the request fields that concern only the client's connection
/// (RFC 9110 §7.6.1) before the request goes upstream: the names its
/// `Connection` lists, the standard hop-by-hop fields, `Expect` and the
/// framing; then frames the body for the upstream connection (`has_body` without a
/// `Content-Length`: chunked). A WebSocket upgrade keeps its
/// `Connection: Upgrade` and `Upgrade: websocket`; no other upgrade is
/// forwarded.
pub fn sanitize_request(request: &mut RequestHeader, has_body: bool) -> pingora::Result<()> {
    let websocket = is_websocket_upgrade(request);
    for name in connection_nominated(&request.headers) {
        request.remove_header(name.as_str());
    }
    // One pass over the names usually finds none of these: then no
    // removal (each is a hash lookup) is made.
    if request
        .headers
        .keys()
        .any(|name| HOP_BY_HOP_REQUEST.contains(name))
    {
        for name in &HOP_BY_HOP_REQUEST {
            request.remove_header(name);
        }
    }
    if websocket {
        request.insert_header(http::header::CONNECTION, "Upgrade")?;
        request.insert_header(http::header::UPGRADE, "websocket")?;
    }
    if has_body && !request.headers.contains_key(http::header::CONTENT_LENGTH) {
        request.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
    }
    Ok(())
}

/// Removes the response fields that concern only the upstream connection
/// (RFC 9110 §7.6.1): those `Connection` names, `Keep-Alive`,
/// `Proxy-Connection`. Pingora writes its own `Connection` and framing.
/// A `101 Switching Protocols` keeps its `Upgrade`: the client needs it.
pub fn strip_hop_by_hop(response: &mut ResponseHeader) {
    let switching = response.status == http::StatusCode::SWITCHING_PROTOCOLS;
    for name in connection_nominated(&response.headers) {
        if !(switching && name == "upgrade") {
            response.remove_header(name.as_str());
        }
    }
    for name in &HOP_BY_HOP_RESPONSE {
        if response.headers.contains_key(name) && !(switching && name == http::header::UPGRADE) {
            response.remove_header(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(request: &RequestHeader) -> String {
        let mut buf = Vec::new();
        request.header_to_h1_wire(&mut buf);
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn a_request_copy_keeps_everything_but_the_case_of_names() {
        let mut request = RequestHeader::build("POST", b"/a/b?x=1&y=%20", None).unwrap();
        request.append_header("X-Custom-Thing", "one").unwrap();
        request.append_header("X-Custom-Thing", "two").unwrap();
        request.append_header("content-type", "text/plain").unwrap();
        let copy = header_copy_request(&request, false);
        assert_eq!(copy.method, request.method);
        assert_eq!(copy.uri, request.uri);
        assert_eq!(copy.raw_path(), b"/a/b?x=1&y=%20");
        assert_eq!(copy.version, request.version);
        assert_eq!(copy.headers, request.headers);
        assert!(wire(&request).contains("X-Custom-Thing: one\r\nX-Custom-Thing: two\r\n"));
        let copied = wire(&copy);
        assert!(
            copied.contains("x-custom-thing: one\r\nx-custom-thing: two\r\n"),
            "{copied}"
        );
        assert!(copied.contains("Content-Type: text/plain\r\n"), "{copied}");
        let kept = wire(&header_copy_request(&request, true));
        assert!(kept.contains("X-Custom-Thing: one\r\n"), "{kept}");

        // A target the URI does not reproduce is copied whole, case and all.
        let mut absolute = RequestHeader::build("GET", b"http://example.com/p?q", None).unwrap();
        absolute.append_header("X-Custom-Thing", "one").unwrap();
        let copy = header_copy_request(&absolute, false);
        assert_eq!(copy.raw_path(), b"http://example.com/p?q");
        assert!(wire(&copy).contains("X-Custom-Thing: one"));
    }

    #[test]
    fn a_response_copy_keeps_status_reason_and_fields() {
        let mut response = ResponseHeader::build(404, None).unwrap();
        response.set_reason_phrase(Some("Gone Fishing")).unwrap();
        response.append_header("X-Backend", "b1").unwrap();
        let copy = header_copy_response(&response, false).unwrap();
        assert_eq!(copy.status, 404);
        assert_eq!(copy.get_reason_phrase(), Some("Gone Fishing"));
        assert_eq!(copy.headers, response.headers);
        let mut buf = Vec::new();
        copy.header_to_h1_wire(&mut buf);
        assert_eq!(String::from_utf8(buf).unwrap(), "x-backend: b1\r\n");
        let plain =
            header_copy_response(&ResponseHeader::build(200, None).unwrap(), false).unwrap();
        assert_eq!(plain.get_reason_phrase(), Some("OK"));
    }

    #[test]
    fn request_ids_are_kept_when_sane_and_unique_when_new() {
        let mut request = RequestHeader::build("GET", b"/", None).unwrap();
        request.insert_header(REQUEST_ID, "abc-123").unwrap();
        assert_eq!(request_id(&request).as_str(), "abc-123");
        request
            .insert_header(REQUEST_ID, "bad id with spaces")
            .unwrap();
        let generated = request_id(&request);
        assert_eq!(generated.as_str().len(), 32);
        let ids: std::collections::HashSet<[u8; 32]> =
            (0..10_000).map(|_| new_request_id()).collect();
        assert_eq!(ids.len(), 10_000);
    }

    #[test]
    fn hex_digits_are_the_ones_fmt_writes() {
        for value in [0, 1, 0xf, 0x10, 0xdead_beef, u64::MAX, splitmix64(7)] {
            let mut out = [0; 16];
            lower_hex(value, &mut out);
            assert_eq!(std::str::from_utf8(&out).unwrap(), format!("{value:016x}"));
        }
        let id = new_request_id();
        assert!(
            id.iter()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
    }

    #[test]
    fn forwarding_headers_append_and_set() {
        let mut request = RequestHeader::build("GET", b"/", None).unwrap();
        request.insert_header("host", "shop.example").unwrap();
        request.insert_header(FORWARDED_FOR, "10.0.0.1").unwrap();
        let mut with_id = RequestHeader::build("GET", b"/", None).unwrap();
        with_id.insert_header(REQUEST_ID, "rid").unwrap();
        let id = request_id(&with_id);
        let client = client_ip_value("192.0.2.7".parse().unwrap());
        set_forwarding_headers(&mut request, client.as_ref(), true, &id).unwrap();
        assert_eq!(request.headers[FORWARDED_FOR], "10.0.0.1, 192.0.2.7");
        assert_eq!(request.headers[FORWARDED_PROTO], "http");
        assert_eq!(request.headers[FORWARDED_HOST], "shop.example");
        assert_eq!(request.headers[REQUEST_ID], "rid");
    }

    #[test]
    fn an_untrusted_peer_cannot_choose_its_forwarding_headers() {
        let mut request = RequestHeader::build("GET", b"/", None).unwrap();
        request.insert_header("host", "shop.example").unwrap();
        request.append_header(FORWARDED_FOR, "10.0.0.1").unwrap();
        request.append_header(FORWARDED_FOR, "10.0.0.2").unwrap();
        request.insert_header(FORWARDED_PROTO, "https").unwrap();
        request
            .insert_header(FORWARDED_HOST, "bank.example")
            .unwrap();
        request.insert_header("forwarded", "for=10.9.9.9").unwrap();
        let client = client_ip_value("192.0.2.7".parse().unwrap());
        let mut untrusted = request.clone();
        set_forwarding_headers(&mut untrusted, client.as_ref(), false, &RequestId::new()).unwrap();
        assert_eq!(untrusted.headers.get_all(FORWARDED_FOR).iter().count(), 1);
        assert_eq!(untrusted.headers[FORWARDED_FOR], "192.0.2.7");
        assert_eq!(untrusted.headers[FORWARDED_PROTO], "http");
        assert_eq!(untrusted.headers[FORWARDED_HOST], "shop.example");
        assert!(untrusted.headers.get("forwarded").is_none());
        // From a trusted proxy, what it forwarded stays, every line of it.
        set_forwarding_headers(&mut request, client.as_ref(), true, &RequestId::new()).unwrap();
        assert_eq!(
            request.headers[FORWARDED_FOR],
            "10.0.0.1, 10.0.0.2, 192.0.2.7"
        );
        assert_eq!(request.headers[FORWARDED_PROTO], "https");
        assert_eq!(request.headers[FORWARDED_HOST], "bank.example");
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_forwarded_address() {
        let trusted: Vec<IpNet> = vec![
            "10.0.0.0/8".parse().unwrap(),
            "192.0.2.1/32".parse().unwrap(),
        ];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let with = |headers: &[(&str, &str)]| {
            let mut request = RequestHeader::build("GET", b"/", None).unwrap();
            for (name, value) in headers {
                request.append_header(name.to_string(), *value).unwrap();
            }
            request
        };
        let spoofed = with(&[(FORWARDED_FOR, "6.6.6.6, 203.0.113.5, 10.1.1.1")]);
        // An untrusted peer: its headers say nothing.
        assert_eq!(
            client_address(ip("198.51.100.1"), &spoofed, &trusted),
            ip("198.51.100.1")
        );
        // A trusted one: right to left, past the trusted hops.
        assert_eq!(
            client_address(ip("192.0.2.1"), &spoofed, &trusted),
            ip("203.0.113.5")
        );
        let lines = with(&[
            (FORWARDED_FOR, "6.6.6.6"),
            (FORWARDED_FOR, "[2001:db8::5]:4711, 10.0.0.3"),
        ]);
        assert_eq!(
            client_address(ip("10.0.0.9"), &lines, &trusted),
            ip("2001:db8::5")
        );
        let garbage = with(&[(FORWARDED_FOR, "1.2.3.4, nonsense, 10.0.0.3")]);
        assert_eq!(
            client_address(ip("10.0.0.9"), &garbage, &trusted),
            ip("10.0.0.3")
        );
        let forwarded = with(&[(
            "forwarded",
            "for=203.0.113.8;proto=https, for=\"[2001:db8::9]:80\"",
        )]);
        assert_eq!(
            client_address(ip("10.0.0.9"), &forwarded, &trusted),
            ip("2001:db8::9")
        );
        let nothing = with(&[]);
        assert_eq!(
            client_address(ip("10.0.0.9"), &nothing, &trusted),
            ip("10.0.0.9")
        );
    }

    #[test]
    fn hop_by_hop_request_fields_go_and_websockets_stay() {
        let mut request = RequestHeader::build("POST", b"/", None).unwrap();
        request
            .insert_header("connection", "x-secret, keep-alive")
            .unwrap();
        request.insert_header("x-secret", "1").unwrap();
        request.insert_header("te", "trailers").unwrap();
        request
            .insert_header("transfer-encoding", "chunked")
            .unwrap();
        request.insert_header("upgrade", "h2c").unwrap();
        request.insert_header("expect", "100-continue").unwrap();
        request.insert_header("x-kept", "1").unwrap();
        sanitize_request(&mut request, true).unwrap();
        for gone in ["connection", "x-secret", "te", "upgrade", "expect"] {
            assert!(request.headers.get(gone).is_none(), "{gone}");
        }
        assert_eq!(request.headers["transfer-encoding"], "chunked");
        assert_eq!(request.headers["x-kept"], "1");

        let mut upgrade = RequestHeader::build("GET", b"/ws", None).unwrap();
        upgrade
            .insert_header("connection", "keep-alive, Upgrade")
            .unwrap();
        upgrade.insert_header("upgrade", "WebSocket").unwrap();
        upgrade.insert_header("sec-websocket-key", "k").unwrap();
        sanitize_request(&mut upgrade, false).unwrap();
        assert_eq!(upgrade.headers["connection"], "Upgrade");
        assert_eq!(upgrade.headers["upgrade"], "websocket");
        assert_eq!(upgrade.headers["sec-websocket-key"], "k");
        assert!(upgrade.headers.get("transfer-encoding").is_none());
    }

    #[test]
    fn hop_by_hop_response_fields_go() {
        let mut response = ResponseHeader::build(200, None).unwrap();
        response
            .insert_header("connection", "x-secret, close")
            .unwrap();
        response.insert_header("x-secret", "1").unwrap();
        response.insert_header("keep-alive", "timeout=5").unwrap();
        response.insert_header("x-kept", "1").unwrap();
        strip_hop_by_hop(&mut response);
        assert!(response.headers.get("x-secret").is_none());
        assert!(response.headers.get("keep-alive").is_none());
        assert_eq!(response.headers["x-kept"], "1");
    }
}
