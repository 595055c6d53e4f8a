//! The request a piece of work belongs to: its request id and W3C trace
//! context, so that logs carry them and outgoing calls pass them on.
//!
//! The serving middleware (`serve`) reads `traceparent` and `x-request-id`
//! from each request (continuing a valid trace, starting one otherwise),
//! runs the handler in a `request` span with `request_id`, `trace_id` and
//! `span_id`, and keeps the [`CallContext`] in a task-local; a call to
//! another service adds [`outgoing_headers`]. Work moved to another task
//! keeps both with [`carry`].

use std::future::Future;

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

/// The headers a call to another service sends for the current request:
/// `traceparent` (this request's span as the parent) and `x-request-id`.
pub fn outgoing_headers() -> Vec<(&'static str, String)> {
    match current() {
        Some(context) => vec![
            (TRACEPARENT, context.trace.header()),
            (REQUEST_ID, context.request_id),
        ],
        None => Vec::new(),
    }
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
