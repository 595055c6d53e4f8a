//! The request a piece of work belongs to: its request id and W3C trace
//! context, so that logs carry them and outgoing calls pass them on.
//!
//! The serving middleware (`serve`) reads `traceparent` and `x-request-id`
//! from each request (continuing a valid trace, starting one otherwise),
//! runs the handler in a `request` span with `request_id`, `trace_id` and
//! `span_id`, and keeps the [`CallContext`] in a task-local; a call to
//! another service runs as a [`Child`] span and sends its headers. Work
//! moved to another task keeps both with [`carry`]. Spans are exported
//! over OTLP when the request is sampled and export is on
//! (`telemetry::export`).

use std::borrow::Cow;
use std::future::Future;
use std::time::SystemTime;

use telemetry::export::{KeyValue, Span, SpanKind};
use telemetry::trace::{TRACEPARENT, TraceContext};
use tracing::Instrument;

/// The request id header.
pub const REQUEST_ID: &str = "x-request-id";

/// What a request's work carries along.
#[derive(Debug, Clone)]
pub struct CallContext {
    pub request_id: String,
    pub trace: TraceContext,
}

tokio::task_local! {
    static CURRENT: CallContext;
}

/// The current request's context, if this runs for one.
pub fn current() -> Option<CallContext> {
    CURRENT.try_with(Clone::clone).ok()
}

/// Runs `work` as part of the request `context`.
pub async fn within<F: Future>(context: CallContext, work: F) -> F::Output {
    CURRENT.scope(context, work).await
}

/// `work`, carrying the current request's context and `tracing` span, for
/// another task.
pub fn carry<F: Future>(work: F) -> impl Future<Output = F::Output> {
    let context = current();
    let span = tracing::Span::current();
    async move {
        match context {
            Some(context) => CURRENT.scope(context, work).instrument(span).await,
            None => work.instrument(span).await,
        }
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
                (REQUEST_ID, context.request_id.clone()),
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
