//! The data plane: an HTTP/1 proxy app on pingora-core's server and client
//! sessions. One module per phase of a request, in the order it meets them:
//!
//! 1. this module: the connection loop (`process_new`) and, per request,
//!    the header read within `downstream.header_timeout` (slowloris, idle
//!    keep-alive) with the shutdown in view ([`Gateway::serve_request`]);
//! 2. [`admit`]: edge checks (431, 400), the gateway's endpoints
//!    ([`endpoints`]), the route (404), its declared body limit (413);
//! 3. the route's plugins' request hooks (`policy::plugins`), then whether
//!    the service can take the request at all (503, at once);
//! 4. [`attempt`]: instance choice, connection, and the retry decision
//!    after a failure (a pure function);
//! 5. [`exchange`]: header shaping, both bodies streamed, `101` tunnels,
//!    the plugins' response hooks, and the gateway's own answers;
//! 6. a failure from any phase is one [`Failure`], mapped to its answer in
//!    `crate::errors` and answered if the client can still be answered;
//! 7. [`access_log`]: one line per request.
//!
//! Not pingora-proxy's `ProxyHttp`: its per-request machinery (module
//! contexts, two task channels and a task pair per request, cache hooks)
//! costs about a quarter of a proxied request's CPU, for features this
//! gateway does not use (`bench/notes.md`). The protocol work (parsing, framing, keep-alive,
//! body streaming, connecting) is still Pingora's.

use std::sync::Arc;

use async_trait::async_trait;
use pingora::ErrorType;
use pingora::apps::{HttpPersistentSettings, ReusedHttpStream, ServerApp};
use pingora::protocols::Stream;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;

pub mod access_log;
pub mod admit;
pub mod attempt;
pub mod ctx;
pub mod endpoints;
pub mod exchange;

use crate::control::api_docs::ApiDocs;
use crate::control::snapshot::{CurrentSnapshot, Route};
use crate::engine::upstream_pool::UpstreamPool;
use crate::errors::{Failure, GatewayError};
use crate::metrics::RouteMetrics;
use crate::policy::forwarding;
use crate::policy::plugins::Stop;
use crate::tracing_export;
use admit::Admitted;
use bytes::Bytes;
use ctx::{Client, RequestCtx};
use endpoints::Endpoint;
use telemetry::trace::TRACEPARENT;

/// Keep-alive of a new client connection, in seconds (Pingora's default).
const CLIENT_KEEPALIVE_SECONDS: u64 = 60;

/// The proxy application of one worker; shares the current snapshot with
/// the control plane.
pub struct Gateway {
    pub current: Arc<CurrentSnapshot>,
    /// Upstream connections: new, and kept alive per instance.
    pub upstreams: Arc<UpstreamPool>,
    /// The merged API document (`api_docs`).
    pub docs: Arc<ApiDocs>,
    /// The discovery sources, whose state `/services` shows.
    pub membership: Arc<crate::control::discovery::Membership>,
}

/// What is left to do with the client connection after a request.
enum Next {
    /// Finish the response; keep the connection for the next request if
    /// keep-alive allows.
    Finish,
    /// Shut the connection down.
    ShutDown,
    /// Drop it (closed by the client, or the server is stopping).
    Close,
}

#[async_trait]
impl ServerApp for Gateway {
    /// Serves a client connection, request after request, as Pingora's own
    /// HTTP/1 loop does (the gateway speaks plain HTTP/1.1 downstream).
    ///
    /// The loop is here rather than Pingora's `HttpServerApp` because that
    /// trait boxes each request's future: a heap allocation, and a copy of
    /// the whole future (several KiB: every `await` of the request), per
    /// request. Here they are made once per connection.
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let client = Client::of(&stream);
        let mut persistent = None;
        loop {
            let mut session = ServerSession::new_http1(stream);
            match persistent {
                Some(settings) => HttpPersistentSettings::apply_to_session(settings, &mut session),
                None if *shutdown.borrow() => session.set_keepalive(None),
                None => session.set_keepalive(Some(CLIENT_KEEPALIVE_SECONDS)),
            }
            match self.serve_request(&mut session, shutdown, &client).await {
                Next::Finish => {}
                Next::ShutDown => {
                    session.shutdown().await;
                    return None;
                }
                Next::Close => return None,
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
    /// One request on `session`: its header read, then served, answered if
    /// it failed, and logged.
    async fn serve_request(
        &self,
        session: &mut ServerSession,
        shutdown: &ShutdownWatch,
        client: &Client,
    ) -> Next {
        if let Some(next) = self.read_header(session, shutdown).await {
            return next;
        }
        // One version of the configuration per request, from its header on
        // (on a kept-alive connection, the wait for it may be long).
        let snapshot = self.current.load();
        let mut ctx = RequestCtx::new(&snapshot, client);
        ctx.close = *shutdown.borrow();
        ctx.request_id = forwarding::request_id(session.req_header());
        ctx.trace = tracing_export::begin(
            session
                .req_header()
                .headers
                .get(TRACEPARENT)
                .map(|value| value.as_bytes()),
        );
        ctx.trace_id = forwarding::trace_id_value(&ctx.trace);
        let trusted = &snapshot.config.trusted_proxies;
        if let Some(peer) = client.addr
            && !trusted.is_empty()
            && forwarding::is_trusted(peer, trusted)
        {
            ctx.peer_trusted = true;
            ctx.client_addr = Some(forwarding::client_address(
                peer,
                session.req_header(),
                trusted,
            ));
        }
        let failure = self.serve(session, &mut ctx).await.err();
        if let Some(failure) = &failure {
            tracing::debug!(error = %failure.error, cause = ?failure.cause, request_id = %ctx.request_id, "request failed");
            exchange::answer_failure(session, &mut ctx, failure).await;
        }
        observe(session, &ctx, failure.as_ref());
        if ctx.close && failure.is_some() {
            Next::ShutDown
        } else {
            Next::Finish
        }
    }

    /// Reads the request header within the deadline; `Some` if there is no
    /// request to serve.
    async fn read_header(
        &self,
        session: &mut ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<Next> {
        let header_timeout = self.current.peek().config.downstream.header_timeout;
        let read = tokio::select! {
            biased; // a request already received is served
            read = tokio::time::timeout(header_timeout, session.read_request()) => read,
            () = shutting_down(shutdown) => return Some(Next::Close),
        };
        match read {
            Ok(Ok(true)) => None,
            Ok(Ok(false)) => Some(Next::Close), // closed before a request
            Ok(Err(e)) => {
                if matches!(e.etype(), ErrorType::InvalidHTTPHeader) {
                    let error = GatewayError::BadRequest {
                        reason: "malformed request header",
                    };
                    exchange::answer_unparsed(session, &error).await;
                }
                tracing::debug!(error = %e, "no request read");
                Some(Next::ShutDown)
            }
            Err(_elapsed) => {
                // Slowloris, or an idle keep-alive connection: either way
                // no request to answer.
                tracing::info!(timeout = ?header_timeout, timeout_kind = "header", "no complete request header in time: connection closed");
                Some(Next::ShutDown)
            }
        }
    }

    /// The phases after the header: admission, plugins, attempts.
    async fn serve(
        &self,
        session: &mut ServerSession,
        ctx: &mut RequestCtx<'_>,
    ) -> Result<(), Failure> {
        admit::edge_checks(session, ctx)?;
        let route = match admit::route(session.req_header(), ctx)? {
            Admitted::Route(route) => route,
            Admitted::Endpoint(endpoint) => return self.endpoint(session, ctx, endpoint).await,
        };
        admit::declared_body(session.req_header(), route)?;
        request_hooks(session, ctx, route).await?;
        admit::ready(route)?;
        self.forward(session, ctx, route).await
    }
}

impl Gateway {
    /// Answers one of the gateway's own endpoints.
    async fn endpoint(
        &self,
        session: &mut ServerSession,
        ctx: &mut RequestCtx<'_>,
        endpoint: Endpoint,
    ) -> Result<(), Failure> {
        use http::header::{CONTENT_TYPE, LOCATION};
        let mut status = http::StatusCode::OK;
        let mut extra = Vec::new();
        let body = match endpoint {
            Endpoint::Health | Endpoint::Services => endpoint.body(ctx.snapshot, &self.membership),
            Endpoint::ApiDocument => self.docs.document(ctx.snapshot).await,
            Endpoint::ApiPage => {
                let Some(settings) = &ctx.snapshot.config.api_docs else {
                    return Err(Failure::answer(GatewayError::NoRoute));
                };
                let path = session.req_header().uri.path();
                match path.strip_prefix(settings.docs_path.as_str()) {
                    // The page's files are named relative to it.
                    Some("") => {
                        status = http::StatusCode::MOVED_PERMANENTLY;
                        let location = format!("{}/", settings.docs_path);
                        if let Ok(value) = http::HeaderValue::try_from(location) {
                            extra.push((LOCATION, value));
                        }
                        Bytes::new()
                    }
                    Some(tail) => {
                        let (bytes, content_type) = ApiDocs::page_file(tail, &settings.path)
                            .ok_or(Failure::answer(GatewayError::NoRoute))?;
                        if let Ok(value) = http::HeaderValue::try_from(content_type) {
                            extra.push((CONTENT_TYPE, value));
                        }
                        bytes
                    }
                    None => return Err(Failure::answer(GatewayError::NoRoute)),
                }
            }
        };
        exchange::answer_with(session, ctx, status, body, &extra)
            .await
            .map_err(|e| Failure::proxying(e, "gateway", None))
    }
}

/// The route's plugins' request hooks, in order.
async fn request_hooks(
    session: &ServerSession,
    ctx: &mut RequestCtx<'_>,
    route: &Route,
) -> Result<(), Failure> {
    if route.plugins.is_empty() {
        return Ok(());
    }
    let mut ran = 0;
    let outcome = {
        let mut plugin_ctx = ctx.plugin_context(route, session.req_header());
        route.plugins.request_hooks(&mut plugin_ctx, &mut ran).await
    };
    ctx.plugins_ran = ran;
    match outcome {
        Ok(()) => Ok(()),
        Err(Stop::Answer(answer)) => Err(Failure::answer(GatewayError::Plugin(answer))),
        Err(Stop::Broken(why)) => {
            tracing::error!(route = %route.prefix, "{why}");
            Err(Failure::answer(GatewayError::Internal))
        }
    }
}

/// The request's metrics and access line, once it is answered.
fn observe(session: &ServerSession, ctx: &RequestCtx<'_>, failure: Option<&Failure>) {
    let status = ctx
        .local_status
        .or_else(|| session.response_written().map(|r| r.status.as_u16()))
        .unwrap_or(0);
    let elapsed = ctx.started.elapsed();
    if ctx.snapshot.config.metrics {
        let metrics = ctx
            .route
            .map_or(RouteMetrics::unrouted(), |route| &route.metrics);
        // Nobody left to answer: nginx's 499.
        let code = if status == 0 { 499 } else { status };
        metrics.record(&session.req_header().method, code, elapsed.as_secs_f64());
    }
    access_log::log(session, ctx, failure, status, elapsed);
    tracing_export::finish(session, ctx, status, failure);
}

/// Waits until the server starts shutting down.
async fn shutting_down(shutdown: &ShutdownWatch) {
    let mut watch = shutdown.clone();
    if watch.wait_for(|stopping| *stopping).await.is_err() {
        std::future::pending::<()>().await;
    }
}
