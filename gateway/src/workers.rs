//! Share-nothing proxy workers (`work_stealing: false`, the default).
//!
//! Each worker is one thread with its own single-thread runtime and its own
//! [`Gateway`] (so its own upstream connection pool), as nginx's worker
//! processes. The listening service's thread is worker 0: it accepts, and
//! hands each new client connection to the next worker in turn, where the
//! connection stays, request after request, to its end, its socket moved
//! to that worker's epoll ([`crate::worker_stream`]). The other workers
//! are Pingora background services that only lend their runtime.
//!
//! Why not Pingora's own no-steal runtime (one service over several
//! single-thread runtimes): it places connections on random threads, which
//! is fine, but its connection pool is shared and pingora-core spawns the
//! watch task of each idle pooled connection on a random thread, so about
//! half the requests wake the other thread when they release and reuse an
//! upstream connection (measured at two threads: five times the voluntary
//! context switches per request of one work-stealing runtime). Two workers
//! this way spent less CPU per request on the bench than either layout
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

/// One worker: its app (a [`Gateway`] in the server), and the runtime it
/// runs on once started.
struct Worker<A> {
    app: Arc<A>,
    runtime: OnceLock<Handle>,
}

/// The workers, in the order connections are handed out.
pub struct Workers<A = Gateway> {
    workers: Box<[Worker<A>]>,
    next: AtomicUsize,
}

/// Where a new connection is served.
pub enum Placement<'a, A> {
    /// On the accepting thread, by worker 0's app.
    Here(&'a Arc<A>),
    /// On another worker's thread, by its app.
    There(&'a Handle, &'a Arc<A>),
}

impl<A> Workers<A> {
    /// `apps.len()` workers; the first is the accepting thread's.
    pub fn new(apps: Vec<A>) -> Arc<Self> {
        Arc::new(Workers {
            workers: apps
                .into_iter()
                .map(|app| Worker {
                    app: Arc::new(app),
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
    pub fn place(&self) -> Placement<'_, A> {
        let index = match self.workers.len() {
            1 => 0,
            n => self.next.fetch_add(1, Ordering::Relaxed) % n,
        };
        let worker = &self.workers[index];
        match worker.runtime.get() {
            Some(runtime) if index != 0 => Placement::There(runtime, &worker.app),
            _ => Placement::Here(&self.workers[0].app),
        }
    }

    /// The background service that lends worker `index`'s runtime.
    pub fn runtime_lender(self: &Arc<Self>, index: usize) -> RuntimeLender<A> {
        RuntimeLender {
            workers: Arc::clone(self),
            index,
        }
    }
}

impl<A: ServerApp> Workers<A> {
    /// Runs `app` on `stream` and on the same connection's next requests
    /// (what Pingora's accept loop does for a connection it keeps).
    pub async fn serve_connection(app: &Arc<A>, mut stream: Stream, shutdown: &ShutdownWatch) {
        // This thread serves requests: let it keep body buffers.
        #[cfg(not(target_env = "msvc"))]
        crate::body_buffers::enable_on_this_thread();
        while let Some(reused) = app.process_new(stream, shutdown).await {
            stream = reused;
        }
    }
}

/// A Pingora background service of one thread whose runtime serves the
/// connections handed to its worker.
pub struct RuntimeLender<A> {
    workers: Arc<Workers<A>>,
    index: usize,
}

#[async_trait]
impl<A: Send + Sync + 'static> BackgroundService for RuntimeLender<A> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(workers: &Workers<usize>) -> (bool, usize) {
        match workers.place() {
            Placement::Here(app) => (true, **app),
            Placement::There(_, app) => (false, **app),
        }
    }

    #[test]
    fn connections_go_round_robin_to_started_workers_only() {
        let workers = Workers::new(vec![0, 1, 2]);
        // Nothing started: everything is served where it was accepted.
        for _ in 0..3 {
            assert_eq!(placed(&workers), (true, 0));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        workers.workers[2]
            .runtime
            .set(runtime.handle().clone())
            .unwrap();
        let turns: Vec<_> = (0..6).map(|_| placed(&workers)).collect();
        assert_eq!(
            turns,
            [
                (true, 0),
                (true, 0), // worker 1 not started
                (false, 2),
                (true, 0),
                (true, 0),
                (false, 2)
            ]
        );
    }

    #[test]
    fn a_lender_lends_its_runtime_until_shutdown() {
        let workers = Workers::new(vec![0, 1]);
        let lender = workers.runtime_lender(1);
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let thread = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(lender.start(shutdown));
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while workers.workers[1].runtime.get().is_none() {
            assert!(std::time::Instant::now() < deadline, "never lent");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(matches!(workers.place(), Placement::Here(_)));
        assert!(matches!(workers.place(), Placement::There(..)));
        stop.send(true).unwrap();
        thread.join().unwrap();
    }
}
