//! The client side of the proxy: a wrapper around Pingora's HTTP proxy app
//! that limits open connections and cuts off clients that are too slow to
//! send a request header (slowloris).
//!
//! Pingora's own header timeout is per read, so a client trickling one byte
//! at a time is never cut off. Here every connection gets a deadline, armed
//! when it opens and again after each response, disarmed by the proxy as
//! soon as a whole request header has arrived ([`HeaderDeadlines`]). A
//! connection whose deadline passes is closed. The same deadline bounds how
//! long an idle keep-alive connection may wait for its next request.
//!
//! Deadlines live in a table indexed by the connection's file descriptor,
//! so the request path reaches its slot with one index and one atomic store,
//! no lock and no allocation. A descriptor is reused only after its
//! connection closed, and the slot is re-armed when the next connection
//! with that descriptor opens.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;

use crate::proxy::Gateway;
use crate::snapshot::CurrentSnapshot;

/// Descriptors beyond this have no slot and no header deadline (Pingora's
/// per-read timeout still applies). Far above the 20 000 descriptors a
/// process may open on these machines.
const SLOTS: usize = 65_536;
/// A disarmed slot: a request is being served.
const DISARMED: u64 = u64::MAX;

/// Per-connection header deadlines, in milliseconds since `epoch`.
pub struct HeaderDeadlines {
    epoch: Instant,
    slots: Box<[AtomicU64]>,
}

impl Default for HeaderDeadlines {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            slots: (0..SLOTS).map(|_| AtomicU64::new(DISARMED)).collect(),
        }
    }
}

impl HeaderDeadlines {
    fn slot(&self, fd: i32) -> Option<&AtomicU64> {
        usize::try_from(fd).ok().and_then(|i| self.slots.get(i))
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The connection on `fd` must deliver a request header within `timeout`.
    pub fn arm(&self, fd: i32, timeout: Duration) {
        if let Some(slot) = self.slot(fd) {
            slot.store(
                self.now_ms() + timeout.as_millis() as u64,
                Ordering::Relaxed,
            );
        }
    }

    /// A whole request header arrived on `fd`.
    pub fn disarm(&self, fd: i32) {
        if let Some(slot) = self.slot(fd) {
            slot.store(DISARMED, Ordering::Relaxed);
        }
    }

    /// Resolves when the deadline of `fd` has passed (polling at most every
    /// `period` while a request is served).
    async fn expired(&self, fd: i32, period: Duration) {
        let Some(slot) = self.slot(fd) else {
            return std::future::pending().await;
        };
        loop {
            let deadline = slot.load(Ordering::Relaxed);
            let now = self.now_ms();
            if deadline == DISARMED {
                tokio::time::sleep(period).await;
            } else if now >= deadline {
                return;
            } else {
                tokio::time::sleep(Duration::from_millis(deadline - now)).await;
            }
        }
    }
}

/// The proxy app behind connection limits and header deadlines.
pub struct GuardedProxy {
    pub inner: Arc<Gateway>,
    pub current: Arc<CurrentSnapshot>,
    pub deadlines: Arc<HeaderDeadlines>,
    open: AtomicUsize,
}

impl GuardedProxy {
    pub fn new(
        inner: Gateway,
        current: Arc<CurrentSnapshot>,
        deadlines: Arc<HeaderDeadlines>,
    ) -> Self {
        Self {
            inner: Arc::new(inner),
            current,
            deadlines,
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
        let limits = self.current.load().config.downstream;
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
        let fd = stream.id();
        self.deadlines.arm(fd, limits.header_timeout);
        tokio::select! {
            reused = ServerApp::process_new(&self.inner, stream, shutdown) => reused,
            () = self.deadlines.expired(fd, limits.header_timeout) => {
                tracing::info!(fd, timeout = ?limits.header_timeout, timeout_kind = "header", "client too slow to send a request header: connection closed");
                None
            }
        }
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(self.inner.as_ref()).await;
    }
}
