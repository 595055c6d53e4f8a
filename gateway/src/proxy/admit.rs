//! Admission: what is decided from the request header alone, before any
//! plugin or upstream work. Edge checks (header size, path sanity,
//! framing), the gateway's own endpoints, the route, the route's declared
//! body limit, and whether the route's service can take the request.

use pingora::http::RequestHeader;
use pingora::protocols::http::ServerSession;

use super::ctx::RequestCtx;
use super::endpoints::Endpoint;
use crate::control::snapshot::Route;
use crate::errors::{Failure, GatewayError};

/// Where an admitted request goes.
pub enum Admitted<'s> {
    /// A gateway endpoint answers it.
    Endpoint(Endpoint),
    /// Its route's plugins, then the upstream.
    Route(&'s Route),
}

/// Checks on the request header alone: size (431), path (400), method and
/// framing (400). A refused request's connection closes: what follows the
/// header is not trusted.
pub fn edge_checks(session: &ServerSession, ctx: &RequestCtx<'_>) -> Result<(), Failure> {
    let limit = ctx.snapshot.config.downstream.max_header_size;
    let request = session.req_header();
    let problem = if header_size(request) > limit {
        GatewayError::HeaderTooLarge { limit }
    } else if let Some(reason) = path_problem(request.uri.path()) {
        GatewayError::BadRequest { reason }
    } else if request.method == http::Method::CONNECT {
        GatewayError::BadRequest {
            reason: "CONNECT is not proxied",
        }
    } else if request
        .headers
        .contains_key(http::header::TRANSFER_ENCODING)
        && session
            .to_h1_raw()
            .to_ascii_lowercase()
            .windows(16)
            .any(|w| w == b"\ncontent-length:")
    {
        // Pingora would drop Content-Length and go by Transfer-Encoding;
        // a request that frames itself two ways is refused instead.
        GatewayError::BadRequest {
            reason: "both Content-Length and Transfer-Encoding",
        }
    } else {
        return Ok(());
    };
    Err(Failure::closing(problem))
}

/// A gateway endpoint, or the route (404 without one). Counts the request
/// in its service's retry budget.
pub fn route<'s>(
    request: &RequestHeader,
    ctx: &mut RequestCtx<'s>,
) -> Result<Admitted<'s>, Failure> {
    let path = request.uri.path();
    if let Some(endpoint) = Endpoint::at(path, &ctx.snapshot.config) {
        return Ok(Admitted::Endpoint(endpoint));
    }
    let route = ctx
        .snapshot
        .routes
        .lookup(path)
        .ok_or(Failure::answer(GatewayError::NoRoute))?;
    ctx.route = Some(route);
    route.upstream.budget.deposit();
    Ok(Admitted::Route(route))
}

/// A declared body over the route's limit (413): refused before it is
/// read, so the connection closes.
pub fn declared_body(request: &RequestHeader, route: &Route) -> Result<(), Failure> {
    let Some(limit) = route.max_body_size else {
        return Ok(());
    };
    let declared = request
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(Failure::closing(GatewayError::PayloadTooLarge { limit }));
    }
    Ok(())
}

/// No instance of the route's service can take the request (503, at once;
/// the connection stays open for the next request).
pub fn ready(route: &Route) -> Result<(), Failure> {
    if route.upstream.can_take_requests() {
        return Ok(());
    }
    Err(Failure::answer(GatewayError::NoHealthyInstance {
        service: route.upstream.name.clone(),
    }))
}

/// Approximate size of the request header as received.
fn header_size(request: &RequestHeader) -> u64 {
    let fields: usize = request
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    let target = request
        .uri
        .path_and_query()
        .map_or(1, |pq| pq.as_str().len())
        + request.uri.authority().map_or(0, |a| a.as_str().len());
    (request.method.as_str().len() + target + 12 + fields) as u64
}

/// Why a path must not be routed, if it must not: dot segments (also
/// percent-encoded), encoded slashes or backslashes, NUL. Such paths mean
/// different things to different servers; forwarding them is how access
/// rules get bypassed. Allocates nothing: it runs on every request.
fn path_problem(path: &str) -> Option<&'static str> {
    if !path.starts_with('/') {
        return Some("path must start with /");
    }
    let bytes = path.as_bytes();
    let encoded = |code: &[u8]| bytes.windows(3).any(|w| w.eq_ignore_ascii_case(code));
    if encoded(b"%2f") || encoded(b"%5c") || path.contains('\\') {
        return Some("encoded slash or backslash in path");
    }
    if encoded(b"%00") {
        return Some("NUL in path");
    }
    let dot = |s: &str| s == "." || s.eq_ignore_ascii_case("%2e");
    let is_dot_segment = |segment: &str| {
        dot(segment)
            || ["..", "%2e%2e", ".%2e", "%2e."]
                .iter()
                .any(|form| segment.eq_ignore_ascii_case(form))
    };
    if path.split('/').any(is_dot_segment) {
        return Some("dot segment in path");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_paths_are_refused() {
        for bad in [
            "/a/../b",
            "/a/..",
            "/./a",
            "/a/%2e%2e/b",
            "/a/%2E/b",
            "/a%2fb",
            "/a%2Fb",
            "/a%5cb",
            "/a\\b",
            "/a%00",
            "a",
        ] {
            assert!(path_problem(bad).is_some(), "{bad}");
        }
        for good in ["/", "/api/users/7", "/a.b/c..d/.e", "/%20x"] {
            assert_eq!(path_problem(good), None, "{good}");
        }
    }
}
