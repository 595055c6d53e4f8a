//! The Pingora `ProxyHttp` implementation: thin, it walks the phases and
//! leaves each decision to its module.
//!
//! Per request, in order:
//! 1. `early_request_filter`: the header arrived (the slowloris deadline is
//!    disarmed); header size (431) and framing and path sanity (400).
//! 2. `request_filter`: request id; gateway endpoints (`/health`,
//!    `/services`); route lookup (404); a declared body over the route's
//!    limit (413); no instance able to take it (503, at once); the route's
//!    plugins.
//! 3. `request_body_filter`: a streamed body over the limit (413).
//! 4. `upstream_peer`: an instance not tried yet; its peer with the
//!    service's timeouts, the read timeout capped by the total one.
//! 5. `fail_to_connect` / `error_while_proxy`: whether to try again, on
//!    which instance (see [`Gateway::retry_after_send`]), within the retry
//!    budget; every failure also counts against the instance (passive
//!    health).
//! 6. `upstream_request_filter`: prefix stripping, forwarding headers,
//!    plugins.
//! 7. `upstream_response_filter` / `response_filter`: the outcome for
//!    passive health; hop-by-hop fields out, request id in, plugins.
//! 8. `upstream_response_body_filter`: the total timeout while streaming.
//! 9. `fail_to_proxy`: the error mapped once ([`crate::errors`]) and
//!    answered as JSON if the client can still be answered.
//! 10. `logging`: one access-log line; the slowloris deadline re-armed for
//!     the connection's next request.
//!
//! Bodies are never buffered here: Pingora streams them in both directions
//! (it keeps up to 64 KiB of a request body to replay it on a retry).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::Peer;
use pingora::{Error, ErrorSource, ErrorType};
use smallvec::SmallVec;

use crate::downstream::HeaderDeadlines;
use crate::endpoints::Endpoint;
use crate::errors::{self, GatewayError};
use crate::forwarding::{self, REQUEST_ID};
use crate::health::InstanceHealth;
use crate::routing;
use crate::shutdown::{self, InFlight};
use crate::snapshot::{CurrentSnapshot, Route, Snapshot};
use crate::upstream::Upstream;

/// A client-chosen key that makes a non-idempotent request safe to retry.
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The proxy service; shares the current snapshot with the control plane.
pub struct Gateway {
    pub current: Arc<CurrentSnapshot>,
    pub deadlines: Arc<HeaderDeadlines>,
}

/// Per-request state.
pub struct RequestCtx {
    started: Instant,
    _in_flight: InFlight,
    request_id: forwarding::RequestId,
    /// The configuration version this request runs on, start to end.
    snapshot: Option<Arc<Snapshot>>,
    /// The matched route: its index in the snapshot's route table.
    route: Option<usize>,
    /// Instances tried so far, the last one being the current (inline: no
    /// allocation for the usual one to three attempts).
    tried: SmallVec<[SocketAddr; 4]>,
    /// The instance of the current attempt.
    instance: Option<Arc<InstanceHealth>>,
    /// The next attempt may go to the same instance (a stale pooled
    /// connection failed, not the instance).
    retry_same: bool,
    /// The total timeout's deadline, set at the first attempt.
    deadline: Option<Instant>,
    /// Request body bytes seen so far.
    body_bytes: u64,
    /// Set where a failure is decided, read by `fail_to_proxy`.
    failure: Option<GatewayError>,
    /// Which timeout fired, for the access log.
    timeout: Option<&'static str>,
    /// What the gateway itself answered, for the access log.
    local_status: Option<u16>,
}

impl RequestCtx {
    fn route(&self) -> Option<&Route> {
        let snapshot = self.snapshot.as_ref()?;
        snapshot.routes.get(self.route?)
    }

    fn upstream(&self) -> Option<&Arc<Upstream>> {
        self.route().map(|route| &route.upstream)
    }

    fn attempts(&self) -> u32 {
        self.tried.len() as u32
    }
}

/// The downstream connection's descriptor, for its header deadline.
fn connection_fd(session: &Session) -> Option<i32> {
    session.as_downstream().stream().map(|stream| stream.id())
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

/// `Option<SocketAddr>` for the access log, `-` when absent, without
/// formatting it into a string first.
struct LoggedUpstream<'a>(Option<&'a SocketAddr>);

impl std::fmt::Display for LoggedUpstream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("-"),
        }
    }
}

impl Gateway {
    async fn answer_locally(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        error: GatewayError,
    ) -> pingora::Result<bool> {
        ctx.local_status = Some(error.status().as_u16());
        errors::respond(session, &error, &ctx.request_id).await?;
        Ok(true)
    }

    /// Whether a request that failed after (part of) it was sent may be
    /// sent again: only if repeating it is harmless (an idempotent method,
    /// or an `Idempotency-Key` from the client), its body can be replayed,
    /// and nothing of the response has reached the client.
    fn retry_after_send(session: &Session) -> bool {
        let request = session.req_header();
        (request.method.is_idempotent() || request.headers.contains_key(IDEMPOTENCY_KEY))
            && !session.as_ref().retry_buffer_truncated()
            && session.response_written().is_none()
    }

    /// Whether one more attempt on another instance is allowed: attempts
    /// left, another instance to go to, and the retry budget agrees.
    fn another_attempt(ctx: &RequestCtx) -> bool {
        ctx.upstream().is_some_and(|upstream| {
            ctx.attempts() <= upstream.retries
                && upstream.has_other_choice(&ctx.tried)
                && upstream.budget.withdraw()
        })
    }

    fn record_outcome(ctx: &RequestCtx, success: bool) {
        if let (Some(upstream), Some(instance)) = (ctx.upstream(), &ctx.instance) {
            upstream.record(instance, success);
        }
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            _in_flight: InFlight::start(),
            request_id: forwarding::RequestId::default(),
            snapshot: None,
            route: None,
            tried: SmallVec::new(),
            instance: None,
            retry_same: false,
            deadline: None,
            body_bytes: 0,
            failure: None,
            timeout: None,
            local_status: None,
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if let Some(fd) = connection_fd(session) {
            self.deadlines.disarm(fd);
        }
        ctx.request_id = forwarding::request_id(session.req_header());
        let snapshot = self.current.load();
        let limit = snapshot.config.downstream.max_header_size;
        ctx.snapshot = Some(snapshot);
        let request = session.req_header();
        let problem = if header_size(request) > limit {
            Some(GatewayError::HeaderTooLarge { limit })
        } else if let Some(reason) = path_problem(request.uri.path()) {
            Some(GatewayError::BadRequest { reason })
        } else if request
            .headers
            .contains_key(http::header::TRANSFER_ENCODING)
            && session
                .as_downstream()
                .to_h1_raw()
                .to_ascii_lowercase()
                .windows(16)
                .any(|w| w == b"\ncontent-length:")
        {
            // Pingora would drop Content-Length and go by Transfer-Encoding;
            // a request that frames itself two ways is refused instead.
            Some(GatewayError::BadRequest {
                reason: "both Content-Length and Transfer-Encoding",
            })
        } else {
            None
        };
        if let Some(problem) = problem {
            session.set_keepalive(None);
            ctx.failure = Some(problem.clone());
            ctx.local_status = Some(problem.status().as_u16());
            errors::respond(session, &problem, &ctx.request_id).await?;
            // Stop here: `request_filter` sees the answer was written.
        }
        Ok(())
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        if ctx.local_status.is_some() {
            return Ok(true); // answered in early_request_filter
        }
        let Some(snapshot) = ctx.snapshot.clone() else {
            return Error::e_explain(ErrorType::InternalError, "request without a snapshot");
        };
        let path = session.req_header().uri.path();
        if let Some(endpoint) = Endpoint::at(path) {
            let body = endpoint.body(&snapshot);
            ctx.local_status = Some(200);
            errors::respond_json(session, http::StatusCode::OK, body, &ctx.request_id).await?;
            return Ok(true);
        }
        let Some(route_index) = snapshot.routes.find(path) else {
            return self
                .answer_locally(session, ctx, GatewayError::NoRoute)
                .await;
        };
        ctx.route = Some(route_index);
        let Some(route) = snapshot.routes.get(route_index) else {
            return Error::e_explain(ErrorType::InternalError, "route index out of range");
        };
        route.upstream.budget.deposit();

        if let Some(limit) = route.max_body_size {
            let declared = session
                .req_header()
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|length| length > limit) {
                session.set_keepalive(None);
                return self
                    .answer_locally(session, ctx, GatewayError::PayloadTooLarge { limit })
                    .await;
            }
        }
        if !route.upstream.can_take_requests() {
            // Decided before any upstream work, so the client connection
            // stays open for its next request.
            let service = route.upstream.name.clone();
            return self
                .answer_locally(session, ctx, GatewayError::NoHealthyInstance { service })
                .await;
        }
        for plugin in &route.plugins {
            if let Some(rejection) = plugin.request_filter(session).await? {
                tracing::debug!(plugin = plugin.name(), status = %rejection.status, "plugin answered");
                let error = GatewayError::Rejected {
                    status: rejection.status,
                    detail: rejection.detail,
                };
                return self.answer_locally(session, ctx, error).await;
            }
        }
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        let Some(chunk) = body else {
            return Ok(());
        };
        ctx.body_bytes += chunk.len() as u64;
        if let Some(limit) = ctx.route().and_then(|route| route.max_body_size)
            && ctx.body_bytes > limit
        {
            ctx.failure = Some(GatewayError::PayloadTooLarge { limit });
            return Error::e_explain(
                ErrorType::HTTPStatus(413),
                "request body over the route's limit",
            );
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let Some(upstream) = ctx.upstream().cloned() else {
            return Error::e_explain(ErrorType::InternalError, "upstream_peer without a route");
        };
        let deadline = *ctx
            .deadline
            .get_or_insert_with(|| Instant::now() + upstream.timeouts.total);
        let time_left = deadline.saturating_duration_since(Instant::now());
        if time_left.is_zero() {
            ctx.timeout = Some("total");
            ctx.failure = Some(GatewayError::UpstreamTimeout {
                service: upstream.name.clone(),
            });
            return Error::e_explain(
                ErrorType::HTTPStatus(504),
                "total timeout before an attempt",
            );
        }
        // A stale pooled connection is the connection's fault, not the
        // instance's: that instance may be chosen again.
        let exclude_len = if ctx.retry_same {
            ctx.tried.len().saturating_sub(1)
        } else {
            ctx.tried.len()
        };
        ctx.retry_same = false;
        match upstream.select(&ctx.tried[..exclude_len]) {
            Some(instance) => {
                let peer = upstream.peer(instance, time_left);
                ctx.tried.push(instance.socket);
                ctx.instance = Some(Arc::clone(instance));
                Ok(peer)
            }
            None => {
                let service = upstream.name.clone();
                let (failure, status) = if ctx.tried.is_empty() {
                    (GatewayError::NoHealthyInstance { service }, 503)
                } else {
                    (GatewayError::ConnectFailed { service }, 502)
                };
                ctx.failure = Some(failure);
                Error::e_explain(
                    ErrorType::HTTPStatus(status),
                    "no instance to send the request to",
                )
            }
        }
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        Self::record_outcome(ctx, false);
        if e.etype() == &ErrorType::ConnectTimedout {
            ctx.timeout = Some("connect");
        }
        // Nothing reached the upstream: any method may try another instance.
        let retry = Self::another_attempt(ctx);
        tracing::warn!(upstream = %peer.address(), error = %e, retry, request_id = %ctx.request_id, "connect failed");
        e.set_retry(retry);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        match e.etype() {
            ErrorType::ReadTimedout => ctx.timeout = Some(ctx.timeout.unwrap_or("read")),
            ErrorType::WriteTimedout => ctx.timeout = Some("write"),
            _ => {}
        }
        if !Self::retry_after_send(session) || ctx.timeout.is_some() {
            if e.esource() == &ErrorSource::Upstream {
                Self::record_outcome(ctx, false);
            }
            e.set_retry(false);
            return e;
        }
        e.retry.decide_reuse(client_reused);
        if e.retry() {
            // A pooled connection the upstream had closed: the same
            // instance is fine, and this is no sign of trouble.
            ctx.retry_same = true;
            return e;
        }
        Self::record_outcome(ctx, false);
        e.set_retry(Self::another_attempt(ctx));
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        let Some(route) = ctx.route() else {
            return Ok(());
        };
        if let Some(strip) = &route.strip_prefix {
            let path = routing::strip_prefix(upstream_request.uri.path(), strip);
            let path_and_query = match upstream_request.uri.query() {
                Some(query) => format!("{path}?{query}"),
                None => path.to_owned(),
            };
            let uri = http::Uri::builder()
                .path_and_query(path_and_query)
                .build()
                .map_err(|err| {
                    Error::because(ErrorType::InternalError, "rewriting the path", err)
                })?;
            upstream_request.set_uri(uri);
        }
        let client_ip = session
            .client_addr()
            .and_then(|addr| addr.as_inet())
            .map(|addr| addr.ip());
        forwarding::set_forwarding_headers(upstream_request, client_ip, &ctx.request_id)?;
        for plugin in &route.plugins {
            plugin.upstream_request_filter(upstream_request)?;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if !upstream_response.status.is_informational() {
            Self::record_outcome(ctx, !upstream_response.status.is_server_error());
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if shutdown::draining() {
            session.set_keepalive(None);
        }
        forwarding::strip_hop_by_hop(upstream_response);
        upstream_response.insert_header(REQUEST_ID, ctx.request_id.header())?;
        if let Some(route) = ctx.route() {
            for plugin in &route.plugins {
                plugin.response_filter(upstream_response)?;
            }
        }
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Option<Duration>> {
        if ctx
            .deadline
            .is_some_and(|deadline| Instant::now() > deadline)
        {
            ctx.timeout = Some("total");
            let mut error = Error::explain(
                ErrorType::ReadTimedout,
                "total request timeout while streaming the response",
            );
            error.esource = ErrorSource::Upstream;
            return Err(error);
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let service = ctx.upstream().map_or("upstream", |u| u.name.as_str());
        let failure = ctx
            .failure
            .clone()
            .or_else(|| GatewayError::from_proxy_error(e, service));
        // Pingora closes the client connection after a failed proxy attempt
        // whatever this hook says: announce it, so clients do not reuse it.
        session.set_keepalive(None);
        let code = match failure {
            // Once the response has started, its status is on the wire:
            // all that is left is to close.
            Some(failure) if session.response_written().is_none() => {
                let status = failure.status().as_u16();
                if let Err(err) = errors::respond(session, &failure, &ctx.request_id).await {
                    tracing::debug!(error = %err, "could not send the error answer");
                }
                status
            }
            _ => 0,
        };
        ctx.local_status = (code > 0).then_some(code);
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        if let (Some(fd), Some(snapshot)) = (connection_fd(session), &ctx.snapshot) {
            self.deadlines
                .arm(fd, snapshot.config.downstream.header_timeout);
        }
        let request = session.req_header();
        let status = ctx
            .local_status
            .or_else(|| session.response_written().map(|r| r.status.as_u16()))
            .unwrap_or(0);
        tracing::info!(
            target: "access",
            method = %request.method,
            path = %request.uri.path(),
            route = ctx.route().map_or("-", |r| r.prefix.as_str()),
            upstream = %LoggedUpstream(ctx.tried.last()),
            attempts = ctx.tried.len(),
            status,
            micros = ctx.started.elapsed().as_micros() as u64,
            request_id = %ctx.request_id,
            error = e.map(|e| e.etype().as_str()).unwrap_or("-"),
            timeout = ctx.timeout.unwrap_or("-"),
            "request"
        );
    }
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
