//! The state of one request as it goes through the phases, and of the
//! client connection it came on.

use std::net::IpAddr;
use std::time::Instant;

use http::{Extensions, HeaderValue};
use pingora::http::RequestHeader;
use pingora::protocols::Stream;

use super::attempt::Attempts;
use crate::control::shutdown::InFlight;
use crate::control::snapshot::{Route, Snapshot};
use crate::policy::forwarding::{self, RequestId};
use crate::policy::plugins::PluginContext;
use crate::tracing_export::AttemptSpan;
use telemetry::trace::TraceContext;

/// The client end of a connection, as every request on it sees it.
pub struct Client {
    /// The peer's address (the gateway believes no forwarding header).
    pub addr: Option<IpAddr>,
    /// The same, as `X-Forwarded-For` gives it (made once per connection).
    pub forwarded_for: Option<HeaderValue>,
}

impl Client {
    pub fn of(stream: &Stream) -> Client {
        let addr = stream
            .get_socket_digest()
            .and_then(|digest| digest.peer_addr()?.as_inet().map(|addr| addr.ip()));
        Client {
            addr,
            forwarded_for: addr.and_then(forwarding::client_ip_value),
        }
    }
}

/// One request, from its header on.
pub struct RequestCtx<'s> {
    pub started: Instant,
    _in_flight: InFlight,
    /// The configuration version this request runs on, start to end.
    pub snapshot: &'s Snapshot,
    pub client: &'s Client,
    /// The client's address as the gateway trusts it: the peer's, or what
    /// a trusted proxy forwarded (`forwarding::client_address`).
    pub client_addr: Option<IpAddr>,
    /// The peer is one of `trusted_proxies`.
    pub peer_trusted: bool,
    pub request_id: RequestId,
    /// The gateway's span of this request in its W3C trace (continuing the
    /// client's valid `traceparent`, or a new trace).
    pub trace: TraceContext,
    /// The trace id, as `x-trace-id` gives it to the client.
    pub trace_id: HeaderValue,
    /// The span of the current attempt (the parent the upstream is told).
    pub attempt_span: Option<TraceContext>,
    /// The attempts' spans, kept only when this request is exported.
    pub attempt_spans: Vec<AttemptSpan>,
    /// The matched route, once routed.
    pub route: Option<&'s Route>,
    /// What plugins left for later hooks.
    pub extensions: Extensions,
    /// How many of the route's plugins ran their request hook (their
    /// response hooks run).
    pub plugins_ran: usize,
    pub attempts: Attempts,
    /// Request body bytes seen so far.
    pub body_bytes: u64,
    /// Which timeout fired, for the access log.
    pub timeout: Option<&'static str>,
    /// What the gateway itself answered, for the access log.
    pub local_status: Option<u16>,
    /// The connection closes after this response: decided before its
    /// header is written (`exchange::send_header`), the one place
    /// keep-alive is settled.
    pub close: bool,
}

impl<'s> RequestCtx<'s> {
    pub fn new(snapshot: &'s Snapshot, client: &'s Client) -> Self {
        RequestCtx {
            started: Instant::now(),
            _in_flight: InFlight::start(),
            snapshot,
            client,
            client_addr: client.addr,
            peer_trusted: false,
            request_id: RequestId::default(),
            trace: TraceContext::root(false),
            trace_id: HeaderValue::from_static("-"),
            attempt_span: None,
            attempt_spans: Vec::new(),
            route: None,
            extensions: Extensions::new(),
            plugins_ran: 0,
            attempts: Attempts::default(),
            body_bytes: 0,
            timeout: None,
            local_status: None,
            close: false,
        }
    }

    /// The service's name for errors, before or after routing.
    pub fn service_name(&self) -> &'s str {
        self.route
            .map_or("upstream", |route| route.upstream.name.as_str())
    }

    /// What plugins see of this request: `request` is the client's header.
    pub fn plugin_context<'a>(
        &'a mut self,
        route: &'a Route,
        request: &'a RequestHeader,
    ) -> PluginContext<'a> {
        PluginContext::new(
            request,
            self.request_id.as_str(),
            self.client_addr,
            &route.prefix,
            &route.upstream.name,
            &mut self.extensions,
        )
    }
}
