//! The Pingora `ProxyHttp` implementation: thin, it walks the phases and
//! leaves each decision to its module.
//!
//! Per request, in order:
//! 1. `request_filter`: request id; gateway endpoints (`/health`,
//!    `/services`); route lookup (404 if none); the route's plugins.
//! 2. `upstream_peer`: an instance in rotation not tried yet (503 at once if
//!    none); its peer with the service's timeouts.
//! 3. `fail_to_connect`: nothing was sent, so the request is retried on
//!    another instance when one is in rotation.
//! 4. `upstream_request_filter`: prefix stripping, forwarding headers,
//!    plugins.
//! 5. `response_filter`: hop-by-hop fields out, request id in, plugins.
//! 6. `fail_to_proxy`: the error mapped once ([`crate::errors`]) and
//!    answered as JSON if the client can still be answered.
//! 7. `logging`: one access-log line.
//!
//! Bodies are never touched here: Pingora streams them in both directions.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::Peer;
use pingora::{Error, ErrorType};

use crate::endpoints::Endpoint;
use crate::errors::{self, GatewayError};
use crate::forwarding::{self, REQUEST_ID};
use crate::routing;
use crate::snapshot::{CurrentSnapshot, Route, Snapshot};

/// The proxy service; shares the current snapshot with the control plane.
pub struct Gateway {
    pub current: Arc<CurrentSnapshot>,
}

/// Per-request state.
pub struct RequestCtx {
    started: Instant,
    request_id: String,
    /// The configuration version this request runs on, start to end.
    snapshot: Option<Arc<Snapshot>>,
    /// The matched route: its index in the snapshot's route table.
    route: Option<usize>,
    /// Instances tried so far, the last one being the current.
    tried: Vec<SocketAddr>,
    /// Set where a failure is decided, read by `fail_to_proxy`.
    failure: Option<GatewayError>,
    /// What the gateway itself answered, for the access log.
    local_status: Option<u16>,
}

impl RequestCtx {
    fn route(&self) -> Option<&Route> {
        let snapshot = self.snapshot.as_ref()?;
        snapshot.routes.get(self.route?)
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
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            request_id: String::new(),
            snapshot: None,
            route: None,
            tried: Vec::new(),
            failure: None,
            local_status: None,
        }
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        ctx.request_id = forwarding::request_id(session.req_header());
        let snapshot = self.current.load();
        let path = session.req_header().uri.path();

        if let Some(endpoint) = Endpoint::at(path) {
            let body = endpoint.body(&snapshot);
            ctx.local_status = Some(200);
            errors::respond_json(session, http::StatusCode::OK, body, &ctx.request_id).await?;
            return Ok(true);
        }
        let route_index = snapshot.routes.find(path);
        ctx.snapshot = Some(snapshot);
        let Some(route_index) = route_index else {
            return self
                .answer_locally(session, ctx, GatewayError::NoRoute)
                .await;
        };
        ctx.route = Some(route_index);
        if let Some(route) = ctx.route()
            && !route.upstream.any_ready()
        {
            // Decided before any upstream work, so the client connection
            // stays open for its next request.
            let service = route.upstream.name.clone();
            return self
                .answer_locally(session, ctx, GatewayError::NoHealthyInstance { service })
                .await;
        }

        let plugins = ctx.route().map(|r| r.plugins.clone()).unwrap_or_default();
        for plugin in &plugins {
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

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let Some(route) = ctx.route() else {
            return Error::e_explain(ErrorType::InternalError, "upstream_peer without a route");
        };
        let upstream = Arc::clone(&route.upstream);
        match upstream.select(&ctx.tried) {
            Some(instance) => {
                let peer = upstream.peer(instance);
                ctx.tried.push(instance.socket);
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
        // Nothing reached the upstream: any method may go to another
        // instance, if one is in rotation.
        let retry = ctx
            .route()
            .is_some_and(|route| route.upstream.has_other_ready(&ctx.tried));
        tracing::warn!(upstream = %peer.address(), error = %e, retry, request_id = %ctx.request_id, "connect failed");
        if retry {
            e.set_retry(true);
        }
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

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        forwarding::strip_hop_by_hop(upstream_response);
        upstream_response.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
        if let Some(route) = ctx.route() {
            for plugin in &route.plugins {
                plugin.response_filter(upstream_response)?;
            }
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let service = ctx.route().map_or("upstream", |r| r.upstream.name.as_str());
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
        let request = session.req_header();
        let status = ctx
            .local_status
            .or_else(|| session.response_written().map(|r| r.status.as_u16()))
            .unwrap_or(0);
        let route = ctx.route();
        tracing::info!(
            target: "access",
            method = %request.method,
            path = %request.uri.path(),
            route = route.map_or("-", |r| r.prefix.as_str()),
            upstream = ctx.tried.last().map(ToString::to_string).as_deref().unwrap_or("-"),
            status,
            micros = ctx.started.elapsed().as_micros() as u64,
            request_id = %ctx.request_id,
            error = e.map(|e| e.etype().as_str()).unwrap_or("-"),
            "request"
        );
    }
}
