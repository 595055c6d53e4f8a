//! The request a piece of work belongs to: its request id and W3C trace
//! context, so that logs carry them and outgoing calls pass them on.
//!
//! The serving middleware (`serve`) reads `traceparent` and `x-request-id`
//! from each request (continuing a valid trace, starting one otherwise)
//! and runs the handler with its [`CallContext`] in a task-local
//! (`telemetry::request`), which every log line written meanwhile names
//! (as `request{request_id=.. trace_id=.. span_id=..}`); a call to another
//! service runs as a [`Child`] span and sends its headers. Work moved to
//! another task keeps the context with [`carry`]. Spans are exported over
//! OTLP when the request is sampled and export is on (`telemetry::export`).

use std::borrow::Cow;
use std::future::Future;
use std::time::SystemTime;

use telemetry::export::{KeyValue, Span, SpanKind};
use telemetry::trace::{TRACEPARENT, TraceContext};

/// The request id header.
pub const REQUEST_ID: &str = "x-request-id";

/// What a request's work carries along: its id and trace context.
pub use telemetry::request::RequestContext as CallContext;

/// The current request's context, if this runs for one.
pub use telemetry::request::current;

/// `work`, run as part of the request `context`.
pub use telemetry::request::within;

/// `work`, carrying the current request's context, for another task.
/// (Built from the futures themselves, not an `async` block, which would
/// hold `work` twice: `work` is a whole saga.)
pub fn carry<F: Future>(work: F) -> impl Future<Output = F::Output> {
    use futures_util::future::Either;
    match current() {
        Some(context) => Either::Left(within(context, work)),
        None => Either::Right(work),
    }
}

/// A span within the current request (a database query, a call to
/// another service): its id is chosen at once, so that a call can name it
/// as the callee's parent; it is exported when it finishes if the request
/// is sampled and export is on. Outside a request it is inert.
pub struct Child {
    context: Option<CallContext>,
    /// When it started, only if it will be exported.
    started: Option<SystemTime>,
}

impl Child {
    pub fn start() -> Child {
        let context = current().map(|mut context| {
            context.trace = context.trace.child();
            context
        });
        let started = context
            .as_ref()
            .filter(|c| c.trace.sampled() && telemetry::export::enabled())
            .map(|_| SystemTime::now());
        Child { context, started }
    }

    /// The headers a call made as this span sends: `traceparent` (this
    /// span as the parent) and the request's `x-request-id`.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        match &self.context {
            Some(context) => vec![
                (TRACEPARENT, context.trace.header()),
                (REQUEST_ID, context.request_id.to_string()),
            ],
            None => Vec::new(),
        }
    }

    /// Whether [`Child::finish`] will export it: callers skip building its
    /// name and attributes when not.
    pub fn exported(&self) -> bool {
        self.context.is_some() && self.started.is_some()
    }

    /// Ends the span; `error` if its work failed.
    pub fn finish(
        self,
        name: String,
        kind: SpanKind,
        attributes: Vec<KeyValue>,
        error: Option<String>,
    ) {
        if let (Some(context), Some(start)) = (&self.context, self.started) {
            telemetry::export::record(Span {
                context: &context.trace,
                remote_parent: false,
                name: Cow::Owned(name),
                kind,
                start,
                end: SystemTime::now(),
                attributes,
                error: error.map(Cow::Owned),
            });
        }
    }
}

/// Exports the span of a request this service served (started at `start`),
/// if it is sampled and export is on.
pub fn record_server_span(
    trace: &TraceContext,
    start: SystemTime,
    method: &str,
    path: &str,
    route: &str,
    status: u16,
    request_id: &str,
) {
    if !trace.sampled() || !telemetry::export::enabled() {
        return;
    }
    telemetry::export::record(Span {
        context: trace,
        remote_parent: trace.parent_id.is_some(),
        name: Cow::Owned(format!("{method} {route}")),
        kind: SpanKind::Server,
        start,
        end: SystemTime::now(),
        attributes: vec![
            KeyValue::new("http.request.method", method.to_owned()),
            KeyValue::new("url.path", path.to_owned()),
            KeyValue::new("http.route", route.to_owned()),
            KeyValue::new("http.response.status_code", i64::from(status)),
            KeyValue::new("request_id", request_id.to_owned()),
        ],
        error: (status >= 500).then(|| Cow::Owned(format!("status {status}"))),
    });
}

/// A sane request id from the client (1–128 of `[A-Za-z0-9._:-]`), else a
/// new one.
pub fn request_id(header: Option<&str>) -> String {
    header
        .filter(|id| {
            !id.is_empty()
                && id.len() <= 128
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
        })
        .map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), str::to_owned)
}
