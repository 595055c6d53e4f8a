//! What crosses the gateway: the request header shaped for the upstream,
//! both bodies streamed, the response header shaped for the client,
//! `101` tunnels, and the gateway's own answers.
//!
//! Bodies are never buffered: each chunk read is written before the next
//! is read, in both directions (up to 64 KiB of a request body is kept to
//! replay it on a retry). Every response header to the client, proxied or
//! the gateway's own, goes out through [`send_header`], the one place the
//! connection's keep-alive is settled.

use bytes::Bytes;
use http::StatusCode;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::ServerSession;
use pingora::protocols::http::v1::client::HttpSession as UpstreamSession;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType};

use super::attempt;
use super::ctx::RequestCtx;
use crate::control::shutdown;
use crate::control::snapshot::Route;
use crate::errors::{self, Answer, BODY_OVER_LIMIT, Failure};
use crate::policy::forwarding::{self, REQUEST_ID, RequestId, TRACE_ID};
use crate::policy::routing;

/// What the upstream connection is fit for after an exchange.
pub enum Exchanged {
    /// Back to the pool, which keeps it if both sides allow keep-alive.
    Reusable,
    /// Closed (not kept alive, or upgraded and finished).
    Spent,
}

/// Writes a response header to the client, after settling keep-alive:
/// the connection closes after this response if the request said so
/// (`ctx.close`) or the gateway is shutting down.
pub async fn send_header(
    session: &mut ServerSession,
    ctx: &RequestCtx<'_>,
    header: Box<ResponseHeader>,
) -> pingora::Result<()> {
    if ctx.close || shutdown::draining() {
        session.set_keepalive(None);
    }
    session.write_response_header(header).await
}

/// `100 Continue`, if the client waits for it: the request passed every
/// check, the client may send its body. (Expect is not forwarded, see
/// `forwarding::sanitize_request`: the body is streamed as it comes.)
pub async fn continue_if_expected(session: &mut ServerSession) -> pingora::Result<()> {
    let expects = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects && !session.is_body_empty() {
        session
            .write_continue_response()
            .await
            .map_err(|e| e.into_down())?;
    }
    Ok(())
}

/// One request and its response over one upstream connection.
pub async fn exchange(
    session: &mut ServerSession,
    upstream: &mut UpstreamSession,
    peer: &HttpPeer,
    ctx: &mut RequestCtx<'_>,
    route: &Route,
) -> pingora::Result<Exchanged> {
    upstream.read_timeout = peer.options.read_timeout;
    upstream.write_timeout = peer.options.write_timeout;
    let has_body = !session.is_body_empty();
    let request = upstream_request(session, has_body, ctx, route).map_err(|e| e.into_in())?;
    upstream
        .write_request_header(request)
        .await
        .map_err(|e| e.into_up())?;

    let (mut response, early) = match send_body(session, upstream, ctx, route).await {
        Ok(()) => (read_final_header(upstream, ctx).await?, false),
        // An upstream may answer before it has read the whole body (a 413,
        // a 401, a 405 ...) and close: writing the rest then fails, but its
        // answer is already here, and it is what the client must see. The
        // client's unread body ends its connection after this response.
        Err(error)
            if error.esource() == &ErrorSource::Upstream
                && error.etype() == &ErrorType::WriteError =>
        {
            match read_final_header(upstream, ctx).await {
                Ok(response) => {
                    tracing::debug!(error = %error, request_id = %ctx.request_id, "the upstream answered before taking the whole body");
                    ctx.close = true;
                    (response, true)
                }
                Err(_) => return Err(error),
            }
        }
        Err(error) => return Err(error),
    };
    if !response.status.is_informational() {
        attempt::record_response(ctx, route, response.status.as_u16());
    }
    downstream_response(session, &mut response, ctx, route).map_err(|e| e.into_in())?;
    send_header(session, ctx, response)
        .await
        .map_err(|e| e.into_down())?;

    if upstream.was_upgraded() && session.was_upgraded() {
        tunnel(session, upstream).await?;
        return Ok(Exchanged::Spent);
    }
    // A response-body hook for plugins would run here, on each chunk.
    while let Some(chunk) = upstream.read_body_bytes().await.map_err(|e| e.into_up())? {
        check_total_deadline(ctx)?;
        session
            .write_response_body(chunk, false)
            .await
            .map_err(|e| e.into_down())?;
    }
    session.finish_body().await.map_err(|e| e.into_down())?;
    Ok(if early {
        Exchanged::Spent
    } else {
        Exchanged::Reusable
    })
}

/// The request body: what an earlier attempt already read of it, then the
/// rest as it comes from the client, chunk by chunk.
async fn send_body(
    session: &mut ServerSession,
    upstream: &mut UpstreamSession,
    ctx: &mut RequestCtx<'_>,
    route: &Route,
) -> pingora::Result<()> {
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
            // A read that ended on a chunk boundary. Written to a chunked
            // upstream body, an empty chunk would end it.
            continue;
        }
        count_body(ctx, route, &chunk)?;
        upstream.write_body(&chunk).await.map_err(|e| e.into_up())?;
    }
    upstream.finish_body().await.map_err(|e| e.into_up())?;
    Ok(())
}

/// The upstream's final response header (or a `101`), shaped for the
/// client; interim (1xx) answers other than an upgrade are not passed on.
async fn read_final_header(
    upstream: &mut UpstreamSession,
    ctx: &RequestCtx<'_>,
) -> pingora::Result<Box<ResponseHeader>> {
    loop {
        upstream.read_response().await.map_err(|e| e.into_up())?;
        let Some(header) = upstream.resp_header() else {
            return Error::e_explain(ErrorType::InvalidHTTPHeader, "no response header")
                .map_err(|e| e.into_up());
        };
        if !header.status.is_informational() || header.status == StatusCode::SWITCHING_PROTOCOLS {
            let preserve_case = ctx.snapshot.config.preserve_header_case;
            return Ok(Box::new(
                forwarding::header_copy_response(header, preserve_case).map_err(|e| e.into_up())?,
            ));
        }
    }
}

/// The request header as it goes upstream: hop-by-hop fields out, prefix
/// stripped, forwarding headers, plugins.
fn upstream_request(
    session: &ServerSession,
    has_body: bool,
    ctx: &mut RequestCtx<'_>,
    route: &Route,
) -> pingora::Result<Box<RequestHeader>> {
    let client_request = session.req_header();
    let mut request = Box::new(forwarding::header_copy_request(
        client_request,
        ctx.snapshot.config.preserve_header_case,
    ));
    request.set_version(http::Version::HTTP_11);
    forwarding::sanitize_request(&mut request, has_body)?;
    if let Some(strip) = &route.strip_prefix {
        let path = routing::strip_prefix(request.uri.path(), strip);
        let path_and_query = match request.uri.query() {
            Some(query) => format!("{path}?{query}"),
            None => path.to_owned(),
        };
        let uri = http::Uri::builder()
            .path_and_query(path_and_query)
            .build()
            .map_err(|err| Error::because(ErrorType::InternalError, "rewriting the path", err))?;
        request.set_uri(uri);
    }
    forwarding::set_forwarding_headers(
        &mut request,
        ctx.client.forwarded_for.as_ref(),
        ctx.peer_trusted,
        &ctx.request_id,
    )?;
    let span = ctx.attempt_span.unwrap_or(ctx.trace);
    forwarding::set_trace_headers(&mut request, &span, ctx.trace.parent_id.is_some())?;
    if !route.plugins.is_empty() {
        let mut plugin_ctx = ctx.plugin_context(route, client_request);
        route
            .plugins
            .upstream_request_hooks(&mut request, &mut plugin_ctx)?;
    }
    Ok(request)
}

/// The upstream's response header as it goes downstream: hop-by-hop
/// fields out, the request id in, plugins.
fn downstream_response(
    session: &ServerSession,
    response: &mut ResponseHeader,
    ctx: &mut RequestCtx<'_>,
    route: &Route,
) -> pingora::Result<()> {
    forwarding::strip_hop_by_hop(response);
    response.insert_header(REQUEST_ID, ctx.request_id.header())?;
    response.insert_header(TRACE_ID, ctx.trace_id.clone())?;
    response_hooks(session.req_header(), response, ctx, route)
}

/// The response hooks of the plugins that ran on `route`.
fn response_hooks(
    request: &RequestHeader,
    response: &mut ResponseHeader,
    ctx: &mut RequestCtx<'_>,
    route: &Route,
) -> pingora::Result<()> {
    let ran = ctx.plugins_ran;
    if ran == 0 {
        return Ok(());
    }
    let mut plugin_ctx = ctx.plugin_context(route, request);
    route.plugins.response_hooks(response, &mut plugin_ctx, ran)
}

/// Counts a request body chunk against the route's limit.
fn count_body(ctx: &mut RequestCtx<'_>, route: &Route, chunk: &[u8]) -> pingora::Result<()> {
    ctx.body_bytes += chunk.len() as u64;
    if let Some(limit) = route.max_body_size
        && ctx.body_bytes > limit
    {
        let mut error = Error::explain(BODY_OVER_LIMIT, "request body over the route's limit");
        error.esource = ErrorSource::Downstream;
        return Err(error);
    }
    Ok(())
}

/// The total timeout, checked as the response streams.
fn check_total_deadline(ctx: &mut RequestCtx<'_>) -> pingora::Result<()> {
    if ctx
        .attempts
        .deadline
        .is_some_and(|deadline| std::time::Instant::now() > deadline)
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

/// After `101 Switching Protocols`: bytes both ways until both sides are
/// done.
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

/// The header of a gateway answer: JSON (when there is a body), never
/// cached, with the request id and the answer's own fields.
fn answer_header(
    status: StatusCode,
    body: &Bytes,
    extra: &[(http::HeaderName, http::HeaderValue)],
    request_id: &RequestId,
) -> pingora::Result<ResponseHeader> {
    let mut header = ResponseHeader::build(status, Some(5 + extra.len()))?;
    if !body.is_empty() {
        header.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    }
    if status != StatusCode::NO_CONTENT && status != StatusCode::NOT_MODIFIED {
        header.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    }
    header.insert_header(http::header::CACHE_CONTROL, "no-store")?;
    header.insert_header(REQUEST_ID, request_id.header())?;
    for (name, value) in extra {
        if name == http::header::CONTENT_TYPE {
            header.insert_header(name.clone(), value.clone())?;
        } else {
            header.append_header(name.clone(), value.clone())?;
        }
    }
    Ok(header)
}

/// Writes a complete answer of the gateway's own (header and body) to the
/// client; on a route, its plugins' response hooks see it first.
pub async fn answer_with(
    session: &mut ServerSession,
    ctx: &mut RequestCtx<'_>,
    status: StatusCode,
    body: Bytes,
    extra: &[(http::HeaderName, http::HeaderValue)],
) -> pingora::Result<()> {
    let mut header = Box::new(answer_header(status, &body, extra, &ctx.request_id)?);
    header.insert_header(TRACE_ID, ctx.trace_id.clone())?;
    if let Some(route) = ctx.route {
        response_hooks(session.req_header(), &mut header, ctx, route)?;
    }
    ctx.local_status = Some(status.as_u16());
    let head_only = session.req_header().method == http::Method::HEAD;
    send_header(session, ctx, header).await?;
    if head_only || body.is_empty() {
        session.finish_body().await
    } else {
        session.write_response_body(body, true).await
    }
}

/// Answers `answer` as JSON `{"detail", "request_id"}` (no body without a
/// detail).
pub async fn answer(
    session: &mut ServerSession,
    ctx: &mut RequestCtx<'_>,
    answer: Answer,
) -> pingora::Result<()> {
    let body = match &answer.detail {
        Some(detail) => errors::json_body(detail, ctx.request_id.as_str()),
        None => Bytes::new(),
    };
    answer_with(session, ctx, answer.status, body, &answer.headers).await
}

/// Answers a failed request, if the client can still be answered: once a
/// response has started, its status is on the wire and all that is left
/// is to close.
pub async fn answer_failure(
    session: &mut ServerSession,
    ctx: &mut RequestCtx<'_>,
    failure: &Failure,
) {
    ctx.close |= failure.close;
    if session.response_written().is_some() {
        ctx.close = true;
        return;
    }
    let Some(reply) = failure.error.answer() else {
        return;
    };
    if let Err(err) = answer(session, ctx, reply).await {
        tracing::debug!(error = %err, "could not send the error answer");
        ctx.close = true;
    }
}

/// Answers a request whose header could not be parsed (there is no request
/// to look at), then the connection closes.
pub async fn answer_unparsed(session: &mut ServerSession, error: &errors::GatewayError) {
    let Some(reply) = error.answer() else {
        return;
    };
    let id = RequestId::new();
    let body = errors::json_body(reply.detail.as_deref().unwrap_or_default(), id.as_str());
    let written = match answer_header(reply.status, &body, &reply.headers, &id) {
        Ok(header) => session.write_error_response(header, body).await,
        Err(err) => Err(err),
    };
    if let Err(err) = written {
        tracing::debug!(error = %err, "could not answer a malformed request");
    }
}
