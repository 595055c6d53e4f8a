//! The proxy itself: an HTTP/1 application on pingora-core's server and
//! client sessions and its upstream connection pool.
//!
//! It does not use pingora-proxy's `ProxyHttp` framework: measured on the
//! bench machine, that framework's per-request machinery (module contexts,
//! two task channels and a task pair per request, cache hooks) cost 5–8 µs
//! of CPU per request (a `ProxyHttp` doing nothing 28.5–30 µs, pingora-core
//! alone 21–22), about a quarter of a proxied request, for features this
//! gateway does not use (see `bench/notes.md`). The protocol work — parsing,
//! framing, keep-alive, body streaming, connecting upstream — is still
//! Pingora's: `ServerSession`, `HttpSession` and `TransportConnector` from
//! pingora-core. Idle upstream connections are kept per worker by
//! [`crate::upstream_pool`], without Pingora's task per pooled connection.
//!
//! A connection's requests are served one after the other by
//! [`Gateway::handle`], in the connection's own loop (`process_new`).
//!
//! Per request, in order ([`Gateway::serve`]):
//! 1. the request header, read within `downstream.header_timeout`
//!    (slowloris, idle keep-alive) and with the shutdown in view;
//!    `early_checks`: header size (431), framing and path sanity (400);
//! 2. `request_checks`: request id; gateway endpoints (`/health`,
//!    `/services`); route lookup (404); a declared body over the route's
//!    limit (413); no instance able to take it (503, at once); the route's
//!    plugins;
//! 3. attempts ([`Gateway::proxy`]): an instance not tried yet, a pooled or
//!    new connection with the service's timeouts (the read timeout capped
//!    by the total one), the request (prefix stripped, forwarding headers,
//!    plugins) and its body streamed (413 past the limit), the response
//!    header (outcome for passive health; hop-by-hop fields out, request id
//!    in, plugins) and body streamed under the total timeout. A failure
//!    decides whether to try again and where ([`Gateway::retry_after_send`]),
//!    within the retry budget, and counts against the instance;
//! 4. a failure is mapped once ([`crate::errors`]) and answered as JSON if
//!    the client can still be answered;
//! 5. one access-log line; the connection waits for its next request.
//!
//! Bodies are never buffered: each chunk read is written before the next
//! is read, in both directions (up to 64 KiB of a request body is kept to
//! replay it on a retry). A `101 Switching Protocols` answer turns the
//! exchange into a two-way byte stream until either side closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use http::HeaderValue;
use pingora::apps::{HttpPersistentSettings, ReusedHttpStream, ServerApp};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::Stream;
use pingora::protocols::http::ServerSession;
use pingora::protocols::http::v1::client::HttpSession as UpstreamSession;
use pingora::server::ShutdownWatch;
use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora::{Error, ErrorSource, ErrorType};
use smallvec::SmallVec;

use crate::endpoints::Endpoint;
use crate::errors::{self, GatewayError};
use crate::forwarding::{self, REQUEST_ID};
use crate::health::InstanceHealth;
use crate::logging;
use crate::routing;
use crate::shutdown::{self, InFlight};
use crate::snapshot::{CurrentSnapshot, Route, Snapshot};
use crate::upstream::Upstream;
use crate::upstream_pool::UpstreamPool;

/// A client-chosen key that makes a non-idempotent request safe to retry.
const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Attempts per request whatever else allows more: stale pooled
/// connections are retried on the same instance without limit otherwise.
const MAX_ATTEMPTS: usize = 16;

/// The proxy application; shares the current snapshot with the control
/// plane.
pub struct Gateway {
    pub current: Arc<CurrentSnapshot>,
    /// Upstream connections: new, and kept alive per instance.
    pub upstreams: Arc<UpstreamPool>,
}

/// Per-request state.
pub struct RequestCtx {
    started: Instant,
    _in_flight: InFlight,
    request_id: forwarding::RequestId,
    /// The client's address for `X-Forwarded-For` (the connection's).
    client_ip: Option<HeaderValue>,
    /// The configuration version this request runs on, start to end.
    snapshot: Arc<Snapshot>,
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
    fn new(snapshot: Arc<Snapshot>, client_ip: Option<HeaderValue>) -> Self {
        RequestCtx {
            started: Instant::now(),
            _in_flight: InFlight::start(),
            request_id: forwarding::RequestId::default(),
            client_ip,
            snapshot,
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

    fn route(&self) -> Option<&Route> {
        self.snapshot.routes.get(self.route?)
    }

    fn upstream(&self) -> Option<&Arc<Upstream>> {
        self.route().map(|route| &route.upstream)
    }

    fn attempts(&self) -> u32 {
        self.tried.len() as u32
    }
}

/// What is left to do with the client connection after a request.
enum Served {
    /// Finish the response; keep the connection for the next request if
    /// it can be.
    Finish,
    /// Shut the connection down (after a failure).
    ShutDown,
    /// Drop it (closed by the client, or the server is stopping).
    Close,
}

/// What the upstream connection is fit for after an exchange.
enum Exchanged {
    /// Back to the pool, which keeps it if both sides allow keep-alive.
    Reusable,
    /// Closed (not kept alive, or upgraded and finished).
    Spent,
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

/// The access log's line for one request.
struct AccessLine<'a> {
    method: &'a str,
    path: &'a str,
    route: &'a str,
    upstream: LoggedUpstream<'a>,
    attempts: usize,
    status: u16,
    micros: u64,
    request_id: &'a forwarding::RequestId,
    error: &'a str,
    timeout: &'a str,
}

thread_local! {
    /// Where a worker thread formats its access lines (no allocation per
    /// request once it has grown).
    static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

impl AccessLine<'_> {
    /// Through `tracing`, like every other line.
    fn trace(&self) {
        tracing::info!(
            target: "access",
            method = %self.method,
            path = %self.path,
            route = self.route,
            upstream = %self.upstream,
            attempts = self.attempts,
            status = self.status,
            micros = self.micros,
            request_id = %self.request_id,
            error = self.error,
            timeout = self.timeout,
            "request"
        );
    }

    /// Formatted here, byte for byte as `tracing_subscriber`'s plain format
    /// writes [`Self::trace`], and appended to the log buffer: about 1.5 µs
    /// per request where `tracing` took 2.5 (measured, `bench/notes.md`).
    /// No `fmt` on the common path: numbers through `itoa`, an IPv4
    /// upstream by hand, strings quoted as `{:?}` would when nothing in
    /// them needs escaping (else `fmt` escapes them).
    fn append(&self) {
        LINE.with_borrow_mut(|line| {
            line.clear();
            self.format(line, std::time::SystemTime::now());
            logging::append(line.as_bytes());
        });
    }

    fn format(&self, line: &mut String, now: std::time::SystemTime) {
        write_timestamp(line, now);
        line.push_str("  INFO access: request method=");
        line.push_str(self.method);
        line.push_str(" path=");
        line.push_str(self.path);
        line.push_str(" route=");
        push_debug(line, self.route);
        line.push_str(" upstream=");
        match self.upstream.0 {
            Some(SocketAddr::V4(addr)) => {
                for (i, octet) in addr.ip().octets().into_iter().enumerate() {
                    if i > 0 {
                        line.push('.');
                    }
                    push_number(line, u64::from(octet));
                }
                line.push(':');
                push_number(line, u64::from(addr.port()));
            }
            _ => {
                use std::fmt::Write as _;
                let _ = write!(line, "{}", self.upstream);
            }
        }
        line.push_str(" attempts=");
        push_number(line, self.attempts as u64);
        line.push_str(" status=");
        push_number(line, u64::from(self.status));
        line.push_str(" micros=");
        push_number(line, self.micros);
        line.push_str(" request_id=");
        line.push_str(self.request_id.as_str());
        line.push_str(" error=");
        push_debug(line, self.error);
        line.push_str(" timeout=");
        push_debug(line, self.timeout);
        line.push('\n');
    }
}

/// `n` in decimal.
fn push_number(line: &mut String, n: u64) {
    line.push_str(itoa::Buffer::new().format(n));
}

/// `text` as `{:?}` writes it; without `fmt` when nothing needs escaping.
fn push_debug(line: &mut String, text: &str) {
    if text
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
    {
        line.push('"');
        line.push_str(text);
        line.push('"');
    } else {
        use std::fmt::Write as _;
        let _ = write!(line, "{text:?}");
    }
}

/// `now` in RFC 3339 with microseconds, as `humantime` (and so `tracing`'s
/// default format) writes it; the part to the second is formatted once a
/// second per thread, the rest by hand.
fn write_timestamp(line: &mut String, now: std::time::SystemTime) {
    use std::fmt::Write as _;
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, String)> =
            const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let since_epoch = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = since_epoch.as_secs();
    SECOND.with_borrow_mut(|(cached, prefix)| {
        if *cached != seconds {
            prefix.clear();
            let second = std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds);
            let _ = write!(prefix, "{}", humantime::format_rfc3339_seconds(second));
            prefix.pop(); // its 'Z': the fraction comes first
            *cached = seconds;
        }
        line.push_str(prefix);
    });
    let mut micros = since_epoch.subsec_micros();
    let mut digits = [b'0'; 6];
    for digit in digits.iter_mut().rev() {
        *digit = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    line.push('.');
    line.extend(digits.iter().map(|&digit| char::from(digit)));
    line.push('Z');
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
        session: &mut ServerSession,
        ctx: &mut RequestCtx,
        error: GatewayError,
    ) -> pingora::Result<()> {
        ctx.local_status = Some(error.status().as_u16());
        errors::respond(session, &error, &ctx.request_id).await
    }

    /// Whether a request that failed after (part of) it was sent may be
    /// sent again: only if repeating it is harmless (an idempotent method,
    /// or an `Idempotency-Key` from the client), its body can be replayed,
    /// and nothing of the response has reached the client.
    fn retry_after_send(session: &ServerSession) -> bool {
        let request = session.req_header();
        (request.method.is_idempotent() || request.headers.contains_key(IDEMPOTENCY_KEY))
            && !session.retry_buffer_truncated()
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

    /// Checks on the request header alone, before anything else. `Ok(true)`:
    /// the request was refused (and answered).
    async fn early_checks(
        &self,
        session: &mut ServerSession,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        ctx.request_id = forwarding::request_id(session.req_header());
        let limit = ctx.snapshot.config.downstream.max_header_size;
        let request = session.req_header();
        let problem = if header_size(request) > limit {
            Some(GatewayError::HeaderTooLarge { limit })
        } else if let Some(reason) = path_problem(request.uri.path()) {
            Some(GatewayError::BadRequest { reason })
        } else if request.method == http::Method::CONNECT {
            Some(GatewayError::BadRequest {
                reason: "CONNECT is not proxied",
            })
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
            Some(GatewayError::BadRequest {
                reason: "both Content-Length and Transfer-Encoding",
            })
        } else {
            None
        };
        let Some(problem) = problem else {
            return Ok(false);
        };
        session.set_keepalive(None);
        ctx.failure = Some(problem.clone());
        ctx.local_status = Some(problem.status().as_u16());
        errors::respond(session, &problem, &ctx.request_id).await?;
        Ok(true)
    }

    /// Gateway endpoints, routing, limits and plugins. `Ok(true)`: answered
    /// here, nothing goes upstream.
    async fn request_checks(
        &self,
        session: &mut ServerSession,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        let snapshot = Arc::clone(&ctx.snapshot);
        let path = session.req_header().uri.path();
        if let Some(endpoint) = Endpoint::at(path) {
            let body = endpoint.body(&snapshot);
            ctx.local_status = Some(200);
            errors::respond_json(session, http::StatusCode::OK, body, &ctx.request_id).await?;
            return Ok(true);
        }
        let Some(route_index) = snapshot.routes.find(path) else {
            self.answer_locally(session, ctx, GatewayError::NoRoute)
                .await?;
            return Ok(true);
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
                let error = GatewayError::PayloadTooLarge { limit };
                self.answer_locally(session, ctx, error).await?;
                return Ok(true);
            }
        }
        if !route.upstream.can_take_requests() {
            // Decided before any upstream work, so the client connection
            // stays open for its next request.
            let service = route.upstream.name.clone();
            let error = GatewayError::NoHealthyInstance { service };
            self.answer_locally(session, ctx, error).await?;
            return Ok(true);
        }
        for plugin in &route.plugins {
            if let Some(rejection) = plugin.request_filter(session).await? {
                tracing::debug!(plugin = plugin.name(), status = %rejection.status, "plugin answered");
                let error = GatewayError::Rejected {
                    status: rejection.status,
                    detail: rejection.detail,
                };
                self.answer_locally(session, ctx, error).await?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The instance for the next attempt and its peer, or why there is none.
    fn upstream_peer(ctx: &mut RequestCtx) -> pingora::Result<HttpPeer> {
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

    /// A connection to the instance could not be had: nothing reached it,
    /// so any method may try another instance.
    fn fail_to_connect(peer: &HttpPeer, ctx: &mut RequestCtx, mut e: Box<Error>) -> Box<Error> {
        Self::record_outcome(ctx, false);
        if e.etype() == &ErrorType::ConnectTimedout {
            ctx.timeout = Some("connect");
        }
        let retry = Self::another_attempt(ctx);
        tracing::warn!(upstream = %peer.address(), error = %e, retry, request_id = %ctx.request_id, "connect failed");
        e.set_retry(retry);
        e
    }

    /// An attempt failed after its connection was had: whether to try
    /// again, and where.
    fn error_while_proxy(
        peer: &HttpPeer,
        session: &ServerSession,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        upstream_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        match e.etype() {
            ErrorType::ReadTimedout => ctx.timeout = Some(ctx.timeout.unwrap_or("read")),
            ErrorType::WriteTimedout => ctx.timeout = Some("write"),
            _ => {}
        }
        if e.esource() != &ErrorSource::Upstream {
            // The client or the gateway failed: not the instance's fault,
            // and nothing to retry for.
            e.set_retry(false);
            return e;
        }
        if !Self::retry_after_send(session) || ctx.timeout.is_some() {
            Self::record_outcome(ctx, false);
            e.set_retry(false);
            return e;
        }
        e.retry.decide_reuse(upstream_reused);
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

    /// The request header as it goes upstream: hop-by-hop fields out,
    /// prefix stripped, forwarding headers, plugins.
    fn upstream_request(
        session: &mut ServerSession,
        ctx: &RequestCtx,
    ) -> pingora::Result<Box<RequestHeader>> {
        let has_body = !session.is_body_empty();
        let mut request = Box::new(forwarding::header_copy_request(
            session.req_header(),
            ctx.snapshot.config.preserve_header_case,
        ));
        request.set_version(http::Version::HTTP_11);
        forwarding::sanitize_request(&mut request, has_body)?;
        let Some(route) = ctx.route() else {
            return Ok(request);
        };
        if let Some(strip) = &route.strip_prefix {
            let path = routing::strip_prefix(request.uri.path(), strip);
            let path_and_query = match request.uri.query() {
                Some(query) => format!("{path}?{query}"),
                None => path.to_owned(),
            };
            let uri = http::Uri::builder()
                .path_and_query(path_and_query)
                .build()
                .map_err(|err| {
                    Error::because(ErrorType::InternalError, "rewriting the path", err)
                })?;
            request.set_uri(uri);
        }
        forwarding::set_forwarding_headers(&mut request, ctx.client_ip.as_ref(), &ctx.request_id)?;
        for plugin in &route.plugins {
            plugin.upstream_request_filter(&mut request)?;
        }
        Ok(request)
    }

    /// The upstream's response header as it goes downstream.
    fn downstream_response(
        session: &mut ServerSession,
        response: &mut ResponseHeader,
        ctx: &RequestCtx,
    ) -> pingora::Result<()> {
        if shutdown::draining() {
            session.set_keepalive(None);
        }
        forwarding::strip_hop_by_hop(response);
        response.insert_header(REQUEST_ID, ctx.request_id.header())?;
        if let Some(route) = ctx.route() {
            for plugin in &route.plugins {
                plugin.response_filter(response)?;
            }
        }
        Ok(())
    }

    /// Counts a request body chunk against the route's limit.
    fn count_body(ctx: &mut RequestCtx, chunk: &[u8]) -> pingora::Result<()> {
        ctx.body_bytes += chunk.len() as u64;
        if let Some(limit) = ctx.route().and_then(|route| route.max_body_size)
            && ctx.body_bytes > limit
        {
            ctx.failure = Some(GatewayError::PayloadTooLarge { limit });
            let mut error = Error::explain(
                ErrorType::HTTPStatus(413),
                "request body over the route's limit",
            );
            error.esource = ErrorSource::Downstream;
            return Err(error);
        }
        Ok(())
    }

    /// The total timeout, checked as the response streams.
    fn check_total_deadline(ctx: &mut RequestCtx) -> pingora::Result<()> {
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
        Ok(())
    }

    /// One request and its response over one upstream connection.
    async fn exchange(
        session: &mut ServerSession,
        upstream: &mut UpstreamSession,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Exchanged> {
        upstream.read_timeout = peer.options.read_timeout;
        upstream.write_timeout = peer.options.write_timeout;
        let request = Self::upstream_request(session, ctx).map_err(|e| e.into_in())?;
        upstream
            .write_request_header(request)
            .await
            .map_err(|e| e.into_up())?;

        // What an earlier attempt already read of the body, then the rest.
        if let Some(replay) = session.get_retry_buffer()
            && !replay.is_empty()
        {
            upstream
                .write_body(&replay)
                .await
                .map_err(|e| e.into_up())?;
        }
        while !session.is_body_done() {
            let Some(chunk) = session
                .read_request_body()
                .await
                .map_err(|e| e.into_down())?
            else {
                break;
            };
            if chunk.is_empty() {
                // A read that ended on a chunk boundary. Written to a
                // chunked upstream body, an empty chunk would end it.
                continue;
            }
            Self::count_body(ctx, &chunk)?;
            upstream.write_body(&chunk).await.map_err(|e| e.into_up())?;
        }
        upstream.finish_body().await.map_err(|e| e.into_up())?;

        // The response header; interim (1xx) answers other than an upgrade
        // are not passed on.
        let mut response = loop {
            upstream.read_response().await.map_err(|e| e.into_up())?;
            let Some(header) = upstream.resp_header() else {
                return Error::e_explain(ErrorType::InvalidHTTPHeader, "no response header")
                    .map_err(|e| e.into_up());
            };
            if !header.status.is_informational()
                || header.status == http::StatusCode::SWITCHING_PROTOCOLS
            {
                let preserve_case = ctx.snapshot.config.preserve_header_case;
                break Box::new(
                    forwarding::header_copy_response(header, preserve_case)
                        .map_err(|e| e.into_up())?,
                );
            }
        };
        if !response.status.is_informational() {
            Self::record_outcome(ctx, !response.status.is_server_error());
        }
        Self::downstream_response(session, &mut response, ctx).map_err(|e| e.into_in())?;
        session
            .write_response_header(response)
            .await
            .map_err(|e| e.into_down())?;

        if upstream.was_upgraded() && session.was_upgraded() {
            Self::tunnel(session, upstream).await?;
            return Ok(Exchanged::Spent);
        }
        while let Some(chunk) = upstream.read_body_bytes().await.map_err(|e| e.into_up())? {
            Self::check_total_deadline(ctx)?;
            session
                .write_response_body(chunk, false)
                .await
                .map_err(|e| e.into_down())?;
        }
        session.finish_body().await.map_err(|e| e.into_down())?;
        Ok(Exchanged::Reusable)
    }

    /// After `101 Switching Protocols`: bytes both ways until both sides
    /// are done.
    async fn tunnel(
        session: &mut ServerSession,
        upstream: &mut UpstreamSession,
    ) -> pingora::Result<()> {
        upstream.maybe_upgrade_body_writer();
        let (mut client_done, mut upstream_done) = (false, false);
        while !(client_done && upstream_done) {
            tokio::select! {
                chunk = session.read_request_body(), if !client_done => {
                    match chunk.map_err(|e| e.into_down())? {
                        Some(chunk) if chunk.is_empty() => {}
                        Some(chunk) => {
                            upstream.write_body(&chunk).await.map_err(|e| e.into_up())?;
                        }
                        None => {
                            client_done = true;
                            upstream.finish_body().await.map_err(|e| e.into_up())?;
                        }
                    }
                }
                chunk = upstream.read_body_bytes(), if !upstream_done => {
                    match chunk.map_err(|e| e.into_up())? {
                        Some(chunk) => {
                            session.write_response_body(chunk, false).await.map_err(|e| e.into_down())?;
                        }
                        None => {
                            upstream_done = true;
                            session.finish_body().await.map_err(|e| e.into_down())?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Attempts, as many as allowed, until one gets a response through.
    async fn proxy(
        &self,
        session: &mut ServerSession,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        session.enable_retry_buffering();
        if session
            .req_header()
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
            && !session.is_body_empty()
        {
            // The request passed every check: the client may send its body.
            // (Expect is not forwarded, see `forwarding::sanitize_request`:
            // the body is streamed as it comes.)
            session
                .write_continue_response()
                .await
                .map_err(|e| e.into_down())?;
        }
        loop {
            let peer = Self::upstream_peer(ctx)?;
            let (mut upstream, reused) = match self.upstreams.session(&peer).await {
                Ok(connected) => connected,
                Err(e) => {
                    let e = Self::fail_to_connect(&peer, ctx, e.into_up());
                    if e.retry() && ctx.tried.len() < MAX_ATTEMPTS {
                        continue;
                    }
                    return Err(e);
                }
            };
            match Self::exchange(session, &mut upstream, &peer, ctx).await {
                Ok(Exchanged::Reusable) => {
                    self.upstreams.release(upstream, &peer).await;
                    return Ok(());
                }
                Ok(Exchanged::Spent) => return Ok(()),
                Err(e) => {
                    let e = Self::error_while_proxy(&peer, session, e, ctx, reused);
                    if e.retry() && ctx.tried.len() < MAX_ATTEMPTS {
                        continue;
                    }
                    return Err(e);
                }
            }
        }
    }

    /// A request that failed: the error mapped once and answered, if the
    /// client can still be answered. The connection is closed after it.
    async fn fail_to_proxy(&self, session: &mut ServerSession, e: &Error, ctx: &mut RequestCtx) {
        let service = ctx.upstream().map_or("upstream", |u| u.name.as_str());
        let failure = ctx
            .failure
            .clone()
            .or_else(|| GatewayError::from_proxy_error(e, service));
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
    }

    fn logging(&self, session: &ServerSession, e: Option<&Error>, ctx: &RequestCtx) {
        if !tracing::enabled!(target: "access", tracing::Level::INFO) {
            return;
        }
        let request = session.req_header();
        let line = AccessLine {
            method: request.method.as_str(),
            path: request.uri.path(),
            route: ctx.route().map_or("-", |r| r.prefix.as_str()),
            upstream: LoggedUpstream(ctx.tried.last()),
            attempts: ctx.tried.len(),
            status: ctx
                .local_status
                .or_else(|| session.response_written().map(|r| r.status.as_u16()))
                .unwrap_or(0),
            micros: ctx.started.elapsed().as_micros() as u64,
            request_id: &ctx.request_id,
            error: e.map(|e| e.etype().as_str()).unwrap_or("-"),
            timeout: ctx.timeout.unwrap_or("-"),
        };
        if logging::plain() {
            line.append();
        } else {
            line.trace();
        }
    }

    /// Checks, then the upstream, unless a check answered.
    async fn checked_proxy(
        &self,
        session: &mut ServerSession,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if self.early_checks(session, ctx).await? || self.request_checks(session, ctx).await? {
            return Ok(());
        }
        self.proxy(session, ctx).await
    }

    /// One request, start to end, after its header was read.
    async fn serve(&self, session: &mut ServerSession, ctx: &mut RequestCtx) -> Option<Box<Error>> {
        let error = self.checked_proxy(session, ctx).await.err();
        if let Some(e) = &error {
            tracing::debug!(error = %e, request_id = %ctx.request_id, "request failed");
            self.fail_to_proxy(session, e, ctx).await;
        }
        error
    }
}

/// Waits until the server starts shutting down.
async fn shutting_down(shutdown: &ShutdownWatch) {
    let mut watch = shutdown.clone();
    if watch.wait_for(|stopping| *stopping).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[async_trait]
impl ServerApp for Gateway {
    /// Serves a client connection, request after request, as Pingora's own
    /// HTTP/1 loop does (the gateway speaks plain HTTP/1.1 downstream).
    ///
    /// The loop is here rather than Pingora's `HttpServerApp` because that
    /// trait boxes each request's future: a heap allocation, and a copy of
    /// the whole future (several KiB: every `await` of the request below),
    /// per request. Here they are made once per connection.
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // The client's address as forwarded upstream: the connection's,
        // made once for all its requests.
        let client_ip = stream
            .get_socket_digest()
            .and_then(|digest| digest.peer_addr()?.as_inet().copied())
            .and_then(|addr| forwarding::client_ip_value(addr.ip()));
        let mut persistent = None;
        loop {
            let mut session = ServerSession::new_http1(stream);
            match persistent {
                Some(settings) => HttpPersistentSettings::apply_to_session(settings, &mut session),
                // A new connection: Pingora's default keep-alive.
                None if *shutdown.borrow() => session.set_keepalive(None),
                None => session.set_keepalive(Some(60)),
            }
            match self
                .handle(&mut session, shutdown, client_ip.as_ref())
                .await
            {
                Served::Finish => {}
                Served::ShutDown => {
                    session.shutdown().await;
                    return None;
                }
                Served::Close => return None,
            }
            let settings = HttpPersistentSettings::for_session(&session);
            match session.finish().await {
                Ok(Some(reusable)) => {
                    (stream, persistent) =
                        ReusedHttpStream::from_reusable_stream(reusable, settings).consume();
                }
                Ok(None) => return None,
                Err(e) => {
                    tracing::debug!(error = %e, "client connection not reusable");
                    return None;
                }
            }
        }
    }
}

impl Gateway {
    /// One request on `session`: its header read, then served.
    async fn handle(
        &self,
        session: &mut ServerSession,
        shutdown: &ShutdownWatch,
        client_ip: Option<&HeaderValue>,
    ) -> Served {
        let header_timeout = self.current.peek().config.downstream.header_timeout;
        let read = tokio::select! {
            biased; // a request already received is served
            read = tokio::time::timeout(header_timeout, session.read_request()) => read,
            () = shutting_down(shutdown) => return Served::Close,
        };
        match read {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return Served::Close, // closed before a request
            Ok(Err(e)) => {
                if matches!(e.etype(), ErrorType::InvalidHTTPHeader) {
                    let error = GatewayError::BadRequest {
                        reason: "malformed request header",
                    };
                    let id = forwarding::RequestId::new();
                    if let Err(err) = errors::respond_unparsed(session, &error, &id).await {
                        tracing::debug!(error = %err, "could not answer a malformed request");
                    }
                }
                tracing::debug!(error = %e, "no request read");
                return Served::ShutDown;
            }
            Err(_elapsed) => {
                // Slowloris, or an idle keep-alive connection: either way
                // no request to answer.
                tracing::info!(timeout = ?header_timeout, timeout_kind = "header", "no complete request header in time: connection closed");
                return Served::ShutDown;
            }
        }
        if *shutdown.borrow() {
            session.set_keepalive(None);
        }
        // One version of the configuration per request, from its header on
        // (on a kept-alive connection, the wait for it may be long).
        let mut ctx = RequestCtx::new(self.current.load(), client_ip.cloned());
        let error = self.serve(session, &mut ctx).await;
        self.logging(session, error.as_deref(), &ctx);
        match error {
            None => Served::Finish,
            Some(_) => Served::ShutDown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_hand_made_timestamp_is_the_one_humantime_writes() {
        let start = std::time::SystemTime::now();
        let mut line = String::new();
        for step_micros in [
            0,
            1,
            999_999,
            1_000_000,
            1_234_567,
            59_999_999,
            86_400_000_001,
        ] {
            let at = start + std::time::Duration::from_micros(step_micros);
            line.clear();
            write_timestamp(&mut line, at);
            assert_eq!(line, humantime::format_rfc3339_micros(at).to_string());
        }
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_micros(42);
        line.clear();
        write_timestamp(&mut line, at);
        assert_eq!(line, "1970-01-01T00:00:00.000042Z");
    }

    #[test]
    fn the_hand_made_access_line_is_the_one_tracing_writes() {
        let addr: SocketAddr = "127.0.0.1:8001".parse().unwrap();
        let v6: SocketAddr = "[::1]:443".parse().unwrap();
        let v4: SocketAddr = "255.0.10.200:65535".parse().unwrap();
        let mut header = RequestHeader::build("GET", b"/", None).unwrap();
        header.insert_header(REQUEST_ID, "rid-1").unwrap();
        let id = forwarding::request_id(&header);
        let lines = [
            AccessLine {
                method: "GET",
                path: "/api/users/7",
                route: "/api/users",
                upstream: LoggedUpstream(Some(&addr)),
                attempts: 1,
                status: 200,
                micros: 1234,
                request_id: &id,
                error: "-",
                timeout: "-",
            },
            AccessLine {
                method: "POST",
                path: "/x",
                route: "-",
                upstream: LoggedUpstream(None),
                attempts: 0,
                status: 504,
                micros: 0,
                request_id: &id,
                error: "ReadTimedout",
                timeout: "read",
            },
            // Escaped through `fmt`, as `tracing` does.
            AccessLine {
                method: "DELETE",
                path: "/we%22ird",
                route: "/we\"ird\\ é\t",
                upstream: LoggedUpstream(Some(&v6)),
                attempts: 3,
                status: 65535,
                micros: u64::MAX,
                request_id: &id,
                error: "",
                timeout: "total",
            },
            AccessLine {
                method: "GET",
                path: "/",
                route: "/",
                upstream: LoggedUpstream(Some(&v4)),
                attempts: 10,
                status: 100,
                micros: 10_000_000,
                request_id: &id,
                error: "-",
                timeout: "-",
            },
        ];
        for line in lines {
            let captured = Captured::default();
            let sink = captured.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_writer(move || sink.clone())
                .finish();
            tracing::subscriber::with_default(subscriber, || line.trace());
            let traced = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
            let mut made = String::new();
            line.format(&mut made, std::time::SystemTime::now());
            // Equal after the timestamp (the two were taken at different times).
            let after_time = |s: &str| s.split_once(' ').map(|(_, rest)| rest.to_owned());
            assert_eq!(after_time(&made), after_time(&traced), "{made}{traced}");
            assert_eq!(made.split_once(' ').unwrap().0.len(), 27, "{made}");
            assert_eq!(traced.split_once(' ').unwrap().0.len(), 27, "{traced}");
        }
    }

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
