//! The request a piece of work is done for: its request id and trace
//! context, kept in a task-local while the work runs (and on a thread for
//! the part of it handed to one, such as a database write), so that every
//! log line written meanwhile names the request (`log`'s formatters read
//! it) and every call made meanwhile passes it on.
//!
//! It replaces a `tracing` span per request: a span's fields are formatted
//! when it is created, whether a line is written in it or not, and it is
//! entered and left at every poll; most requests write no line of their
//! own but the request line, which is formatted by hand.

use std::future::Future;
use std::sync::Arc;

use crate::trace::TraceContext;

/// What a request's work carries along.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub request_id: Arc<str>,
    pub trace: TraceContext,
}

tokio::task_local! {
    static CURRENT: RequestContext;
}

/// The current request's context, if this runs for one.
pub fn current() -> Option<RequestContext> {
    CURRENT.try_with(Clone::clone).ok()
}

/// Calls `visit` with the current request's context, if this runs for
/// one; whether it did.
pub fn visit(visit: impl FnOnce(&RequestContext)) -> bool {
    CURRENT.try_with(visit).is_ok()
}

/// `work`, run as part of the request `context`. Not an `async fn`: each
/// such layer would hold `work` twice (its argument, and the future it
/// awaits), and `work` is a whole request or saga.
pub fn within<F: Future>(context: RequestContext, work: F) -> impl Future<Output = F::Output> {
    CURRENT.scope(context, work)
}

/// Runs `work`, on this thread and now, as part of the request `context`.
pub fn within_sync<R>(context: RequestContext, work: impl FnOnce() -> R) -> R {
    CURRENT.sync_scope(context, work)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(id: &str) -> RequestContext {
        RequestContext {
            request_id: id.into(),
            trace: TraceContext::root(false),
        }
    }

    fn seen() -> Option<String> {
        let mut id = None;
        visit(|c| id = Some(c.request_id.to_string()));
        id
    }

    #[tokio::test]
    async fn the_context_is_seen_only_within_its_work() {
        assert_eq!(seen(), None);
        let inner = within(context("a"), async {
            tokio::task::yield_now().await;
            (seen(), within_sync(context("b"), seen), seen())
        })
        .await;
        assert_eq!(
            inner,
            (Some("a".into()), Some("b".into()), Some("a".into()))
        );
        assert_eq!(seen(), None);
        assert!(current().is_none());
        // On another thread, as a database writer runs a request's write.
        let on_thread =
            std::thread::spawn(|| within_sync(context("c"), || current().map(|c| c.request_id)))
                .join()
                .unwrap();
        assert_eq!(on_thread.as_deref(), Some("c"));
    }
}
