//! The client side of the proxy: a wrapper around the proxy app that limits
//! open client connections and hands each one to its worker.
//!
//! Upstream change that would delete the limit: a maximum of open
//! connections in Pingora's listening service (it has none).
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

use super::worker_stream;
use super::workers::{Placement, Workers};
use crate::control::snapshot::CurrentSnapshot;
use crate::proxy::Gateway;

/// The proxy app behind a limit on open client connections; hands each
/// connection to a worker (see `workers`).
pub struct GuardedProxy {
    pub workers: Arc<Workers<Gateway>>,
    pub current: Arc<CurrentSnapshot>,
    /// Open client connections.
    open: Arc<AtomicUsize>,
}

impl GuardedProxy {
    pub fn new(workers: Arc<Workers<Gateway>>, current: Arc<CurrentSnapshot>) -> Self {
        Self {
            workers,
            current,
            open: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// Counts one open client connection for as long as it lives.
struct OpenConnection(Arc<AtomicUsize>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        crate::metrics::Metrics::global().connections_open.dec();
    }
}

#[async_trait]
impl ServerApp for GuardedProxy {
    /// Serves the whole connection (its kept-alive requests too) on one
    /// worker, so this returns no stream to reuse.
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let limits = self.current.peek().config.downstream;
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        let counted = OpenConnection(Arc::clone(&self.open));
        crate::metrics::Metrics::global().connections_open.inc();
        if open > limits.max_connections {
            crate::metrics::Metrics::global().connections_refused.inc();
            tracing::warn!(
                open,
                limit = limits.max_connections,
                "too many client connections: closing a new one"
            );
            return None;
        }
        match self.workers.place() {
            Placement::Here(gateway) => {
                Workers::serve_connection(gateway, stream, shutdown).await;
            }
            Placement::There(runtime, gateway) => {
                let gateway = Arc::clone(gateway);
                let shutdown = shutdown.clone();
                runtime.spawn(async move {
                    let _counted = counted;
                    let stream = worker_stream::rehome(stream);
                    Workers::serve_connection(&gateway, stream, &shutdown).await;
                });
            }
        }
        None
    }
}
