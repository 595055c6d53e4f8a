//! The gateway's spans: one server span per request and one client span
//! per upstream attempt, exported over OTLP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (`telemetry::export`).
//!
//! Propagation is always on and costs the same whatever the sampling: the
//! request's `TraceContext` is made from the client's `traceparent`
//! ([`begin`]), each attempt gets a child span whose id goes upstream. Only
//! a sampled request with export on keeps anything more: each attempt's
//! instance, times and outcome, turned into spans after the access line
//! and handed to the exporter's queue (its own thread sends them).

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use pingora::protocols::http::ServerSession;
use telemetry::export::{self, KeyValue, Span, SpanKind};
use telemetry::trace::TraceContext;

use crate::errors::Failure;
use crate::metrics::Outcome;
use crate::proxy::ctx::RequestCtx;

/// The span of a request that came with `traceparent`.
pub fn begin(traceparent: Option<&[u8]>) -> TraceContext {
    export::begin(traceparent)
}

/// What an exported request keeps of one attempt.
#[derive(Debug)]
pub struct AttemptSpan {
    context: TraceContext,
    instance: SocketAddr,
    started: Instant,
    ended: Option<Instant>,
    outcome: Option<Outcome>,
    status: Option<u16>,
}

/// Starts the span of an attempt on `instance`: its id is the parent the
/// upstream is told.
pub fn start_attempt(ctx: &mut RequestCtx<'_>, instance: SocketAddr) {
    let span = ctx.trace.child();
    ctx.attempt_span = Some(span);
    if ctx.trace.sampled() && export::enabled() {
        ctx.attempt_spans.push(AttemptSpan {
            context: span,
            instance,
            started: Instant::now(),
            ended: None,
            outcome: None,
            status: None,
        });
    }
}

/// The current attempt's outcome: a failed attempt's span ends here, a
/// response's when the request does (its body streams until then).
pub fn end_attempt(ctx: &mut RequestCtx<'_>, outcome: Outcome, status: Option<u16>) {
    if let Some(span) = ctx.attempt_spans.last_mut()
        && span.outcome.is_none()
    {
        span.outcome = Some(outcome);
        span.status = status;
        if status.is_none() {
            span.ended = Some(Instant::now());
        }
    }
}

/// Exports the request's spans, if it is sampled and export is on.
pub fn finish(
    session: &ServerSession,
    ctx: &RequestCtx<'_>,
    status: u16,
    failure: Option<&Failure>,
) {
    if !ctx.trace.sampled() || !export::enabled() {
        return;
    }
    let now = Instant::now();
    let wall = SystemTime::now();
    let at = |instant: Instant| wall - now.saturating_duration_since(instant);
    let request = session.req_header();
    let method = request.method.as_str();
    let service = ctx.route.map(|route| route.upstream.name.as_str());
    for (n, attempt) in ctx.attempt_spans.iter().enumerate() {
        let outcome = attempt.outcome.map_or("unfinished", Outcome::as_str);
        let mut attributes = vec![
            KeyValue::new("http.request.method", method.to_owned()),
            KeyValue::new("server.address", attempt.instance.ip().to_string()),
            KeyValue::new("server.port", i64::from(attempt.instance.port())),
            KeyValue::new("gateway.attempt", (n + 1) as i64),
            KeyValue::new("gateway.outcome", outcome),
        ];
        if let Some(status) = attempt.status {
            attributes.push(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
        export::record(Span {
            context: &attempt.context,
            remote_parent: false,
            name: Cow::Owned(format!("{method} {}", service.unwrap_or("upstream"))),
            kind: SpanKind::Client,
            start: at(attempt.started),
            end: at(attempt.ended.unwrap_or(now)),
            attributes,
            error: (!matches!(attempt.outcome, Some(Outcome::Ok)))
                .then_some(Cow::Borrowed(outcome)),
        });
    }
    let route = ctx.route.map(|route| route.prefix.as_str());
    let mut attributes = vec![
        KeyValue::new("http.request.method", method.to_owned()),
        KeyValue::new("url.path", request.uri.path().to_owned()),
        KeyValue::new("http.response.status_code", i64::from(status)),
        KeyValue::new("gateway.request_id", ctx.request_id.as_str().to_owned()),
        KeyValue::new("gateway.attempts", ctx.attempts.count() as i64),
    ];
    if let Some(route) = route {
        attributes.push(KeyValue::new("http.route", route.to_owned()));
    }
    if let Some(service) = service {
        attributes.push(KeyValue::new("gateway.service", service.to_owned()));
    }
    if let Some(client) = ctx.client_addr {
        attributes.push(KeyValue::new("client.address", client.to_string()));
    }
    export::record(Span {
        context: &ctx.trace,
        remote_parent: ctx.trace.parent_id.is_some(),
        name: Cow::Owned(match route {
            Some(route) => format!("{method} {route}"),
            None => method.to_owned(),
        }),
        kind: SpanKind::Server,
        start: at(ctx.started),
        end: wall,
        attributes,
        error: (status >= 500 || status == 0)
            .then(|| Cow::Owned(failure.map_or_else(String::new, |f| f.error.to_string()))),
    });
}
