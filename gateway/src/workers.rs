//! Share-nothing proxy workers (`work_stealing: false`, the default).
//!
//! Each worker is one thread with its own single-thread runtime and its own
//! [`Gateway`] (so its own upstream connection pool), as nginx's worker
//! processes. The listening service's thread is worker 0: it accepts, and
//! hands each new client connection to the next worker in turn, where the
//! connection stays, request after request, to its end. The other workers
//! are Pingora background services that only lend their runtime.
//!
//! Why not Pingora's own no-steal runtime (one service over several
//! single-thread runtimes): it places connections on random threads, which
//! is fine, but its connection pool is shared and watches each idle pooled
//! connection from a task on a random thread, so most proxied requests woke
//! another thread. Measured on the bench, two workers this way spent less
//! CPU per request than either that or one work-stealing runtime
//! (`bench/notes.md`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::runtime::Handle;

use crate::proxy::Gateway;

/// One worker: its proxy app, and the runtime it runs on once started.
pub struct Worker {
    pub gateway: Arc<Gateway>,
    runtime: OnceLock<Handle>,
}

/// The workers, in the order connections are handed out.
pub struct Workers {
    workers: Box<[Worker]>,
    next: AtomicUsize,
}

/// Where a new connection is served.
pub enum Placement<'a> {
    /// On the accepting thread, by this worker's app.
    Here(&'a Arc<Gateway>),
    /// On another worker's thread.
    There(&'a Handle, &'a Arc<Gateway>),
}

impl Workers {
    /// `gateways.len()` workers; the first is the accepting thread's.
    pub fn new(gateways: Vec<Gateway>) -> Arc<Self> {
        Arc::new(Workers {
            workers: gateways
                .into_iter()
                .map(|gateway| Worker {
                    gateway: Arc::new(gateway),
                    runtime: OnceLock::new(),
                })
                .collect(),
            next: AtomicUsize::new(0),
        })
    }

    pub fn count(&self) -> usize {
        self.workers.len()
    }

    /// The worker for the next connection, round robin. A worker whose
    /// runtime has not started yet is skipped (served here).
    pub fn place(&self) -> Placement<'_> {
        let index = match self.workers.len() {
            1 => 0,
            n => self.next.fetch_add(1, Ordering::Relaxed) % n,
        };
        let worker = &self.workers[index];
        match worker.runtime.get() {
            Some(runtime) if index != 0 => Placement::There(runtime, &worker.gateway),
            _ => Placement::Here(&self.workers[0].gateway),
        }
    }

    /// The background service that lends worker `index`'s runtime.
    pub fn runtime_lender(self: &Arc<Self>, index: usize) -> RuntimeLender {
        RuntimeLender {
            workers: Arc::clone(self),
            index,
        }
    }

    /// Runs `app` on `stream` and on the same connection's next requests
    /// (what Pingora's accept loop does for a connection it keeps).
    pub async fn serve_connection<A: ServerApp>(
        app: &Arc<A>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) {
        while let Some(reused) = app.process_new(stream, shutdown).await {
            stream = reused;
        }
    }
}

/// A Pingora background service of one thread whose runtime serves the
/// connections handed to its worker.
pub struct RuntimeLender {
    workers: Arc<Workers>,
    index: usize,
}

#[async_trait]
impl BackgroundService for RuntimeLender {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let _ = self.workers.workers[self.index]
            .runtime
            .set(Handle::current());
        // Lend the runtime until the server stops; the connections served
        // on it are tasks of their own.
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
    }
}
