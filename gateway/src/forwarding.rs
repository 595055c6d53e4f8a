//! Standard proxy headers: request ids, `X-Forwarded-*`, and hop-by-hop
//! fields on responses.
//!
//! Request side hop-by-hop fields (`Connection` and what it names,
//! `Keep-Alive`, `TE`, `Upgrade` outside WebSocket, ...) are already
//! removed by Pingora's standard upstream request policy; the response side
//! is done here.

use std::net::IpAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderValue;
use pingora::http::{RequestHeader, ResponseHeader};

pub const REQUEST_ID: &str = "x-request-id";
const FORWARDED_FOR: &str = "x-forwarded-for";
const FORWARDED_PROTO: &str = "x-forwarded-proto";
const FORWARDED_HOST: &str = "x-forwarded-host";

/// Longest client-supplied request id kept; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// The client's `X-Request-Id` if it is sane (1 to 128 characters of
/// letters, digits, `-`, `_`, `.`, `:`), else a new one.
pub fn request_id(request: &RequestHeader) -> String {
    request
        .headers
        .get(REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .filter(|id| is_sane_request_id(id))
        .map_or_else(new_request_id, str::to_owned)
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
pub fn new_request_id() -> String {
    static PROCESS: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let process = *PROCESS.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{process:016x}{:016x}", splitmix64(count ^ process))
}

/// SplitMix64's finaliser: a bijection on u64 that scatters neighbours.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Sets `X-Forwarded-For` (appending the client), `-Proto`, `-Host` and
/// `X-Request-Id` on the request going upstream.
pub fn set_forwarding_headers(
    request: &mut RequestHeader,
    client_ip: Option<IpAddr>,
    request_id: &str,
) -> pingora::Result<()> {
    if let Some(ip) = client_ip {
        let forwarded_for = match request
            .headers
            .get(FORWARDED_FOR)
            .and_then(|v| v.to_str().ok())
        {
            Some(previous) if !previous.trim().is_empty() => format!("{previous}, {ip}"),
            _ => ip.to_string(),
        };
        request.insert_header(FORWARDED_FOR, forwarded_for)?;
    }
    // This gateway terminates plain HTTP; it is the edge, so it says so.
    request.insert_header(FORWARDED_PROTO, "http")?;
    if let Some(host) = request.headers.get(http::header::HOST).cloned() {
        request.insert_header(FORWARDED_HOST, host)?;
    }
    request.insert_header(REQUEST_ID, request_id)?;
    Ok(())
}

/// Removes the response fields that concern only the upstream connection
/// (RFC 9110 §7.6.1): those `Connection` names, `Keep-Alive`,
/// `Proxy-Connection`. Pingora writes its own `Connection` and framing.
pub fn strip_hop_by_hop(response: &mut ResponseHeader) {
    let named: Vec<String> = response
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty() && name != "close" && name != "keep-alive")
        .collect();
    for name in named {
        response.remove_header(name.as_str());
    }
    response.remove_header("keep-alive");
    response.remove_header("proxy-connection");
    if response.status != http::StatusCode::SWITCHING_PROTOCOLS {
        response.remove_header(&http::header::UPGRADE);
    }
}

/// The request id as a header value (it is always valid ASCII).
pub fn header_value(request_id: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(request_id).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_when_sane_and_unique_when_new() {
        let mut request = RequestHeader::build("GET", b"/", None).unwrap();
        request.insert_header(REQUEST_ID, "abc-123").unwrap();
        assert_eq!(request_id(&request), "abc-123");
        request
            .insert_header(REQUEST_ID, "bad id with spaces")
            .unwrap();
        let generated = request_id(&request);
        assert_eq!(generated.len(), 32);
        let ids: std::collections::HashSet<String> =
            (0..10_000).map(|_| new_request_id()).collect();
        assert_eq!(ids.len(), 10_000);
    }

    #[test]
    fn forwarding_headers_append_and_set() {
        let mut request = RequestHeader::build("GET", b"/", None).unwrap();
        request.insert_header("host", "shop.example").unwrap();
        request.insert_header(FORWARDED_FOR, "10.0.0.1").unwrap();
        set_forwarding_headers(&mut request, Some("192.0.2.7".parse().unwrap()), "rid").unwrap();
        assert_eq!(request.headers[FORWARDED_FOR], "10.0.0.1, 192.0.2.7");
        assert_eq!(request.headers[FORWARDED_PROTO], "http");
        assert_eq!(request.headers[FORWARDED_HOST], "shop.example");
        assert_eq!(request.headers[REQUEST_ID], "rid");
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
