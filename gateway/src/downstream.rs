//! The client side of the proxy: a wrapper around the proxy app that limits
//! open client connections.
//!
//! Slow clients are handled by the proxy itself: reading a request header
//! has a total deadline there (`downstream.header_timeout`, from the
//! connection's opening or the end of its previous response), which is
//! what cuts off a client trickling a header one byte at a time
//! (slowloris) and bounds how long an idle keep-alive connection waits for
//! its next request. Pingora's own header timeout is per read.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;

use crate::proxy::Gateway;
use crate::snapshot::CurrentSnapshot;

/// The proxy app behind a limit on open client connections.
pub struct GuardedProxy {
    pub inner: Arc<Gateway>,
    pub current: Arc<CurrentSnapshot>,
    open: AtomicUsize,
}

impl GuardedProxy {
    pub fn new(inner: Gateway, current: Arc<CurrentSnapshot>) -> Self {
        Self {
            inner: Arc::new(inner),
            current,
            open: AtomicUsize::new(0),
        }
    }
}

struct OpenConnection<'a>(&'a AtomicUsize);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl ServerApp for GuardedProxy {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let limits = self.current.peek().config.downstream;
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        let _open = OpenConnection(&self.open);
        if open > limits.max_connections {
            tracing::warn!(
                open,
                limit = limits.max_connections,
                "too many client connections: closing a new one"
            );
            return None;
        }
        ServerApp::process_new(&self.inner, stream, shutdown).await
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(self.inner.as_ref()).await;
    }
}
