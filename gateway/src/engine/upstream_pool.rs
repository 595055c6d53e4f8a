//! Upstream connections: new ones through Pingora's `TransportConnector`,
//! idle keep-alive ones kept here, one pool per worker.
//!
//! Pingora's own pool (`Connector`) spawns a task for every connection it
//! takes back, to watch the idle socket with a timer, and hands the
//! connection over through a lock, a channel and an async mutex when it is
//! taken out again: a task, a timer and about ten allocations per proxied
//! request (`bench/notes.md`). Here an idle connection is only a socket in
//! a list, as in nginx's `keepalive` upstream module:
//!
//! - Taken out, it is checked without a system call: its socket is still
//!   registered with the worker's event loop, so if the instance closed it
//!   or sent something meanwhile, the event is already recorded, and the
//!   connection is dropped instead of used (Pingora's check at reuse, the
//!   same one). The most recently used connection goes first.
//! - Every second, a sweep closes the connections that were idle longer
//!   than their service's `idle` timeout or that the instance closed, so
//!   none lingers. It runs on the worker's own thread (started with the
//!   first connection the pool keeps): the pool's lock is never contended
//!   by another thread, which on a busy machine could be preempted while
//!   holding it.
//! - The pool holds at most Pingora's `upstream_keepalive_pool_size`
//!   connections (128 by default) per worker; past that the one idle the
//!   longest is closed.
//!
//! Connecting, its timeouts and socket options stay Pingora's.
//!
//! Upstream change that would delete this file: a `Connector` whose idle
//! connections are checked when taken out and swept in batches, without a
//! task and a timer per pooled connection.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::collections::hash_map::Entry;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use pingora::connectors::{ConnectorOptions, TransportConnector};
use pingora::protocols::Stream;
use pingora::protocols::http::v1::client::HttpSession;
use pingora::upstreams::peer::Peer;
use tokio::io::AsyncReadExt;

/// How often idle connections are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// New and pooled connections to upstream instances, for one worker.
pub struct UpstreamPool {
    connector: TransportConnector,
    idle: Mutex<IdleSet>,
    sweeping: AtomicBool,
}

impl UpstreamPool {
    /// A pool that connects with `options` (Pingora's, from the server
    /// configuration) and keeps up to `options.keepalive_pool_size` idle
    /// connections.
    pub fn new(options: ConnectorOptions) -> Self {
        let capacity = options.keepalive_pool_size;
        UpstreamPool {
            connector: TransportConnector::new(Some(options)),
            idle: Mutex::new(IdleSet::new(capacity)),
            sweeping: AtomicBool::new(false),
        }
    }

    /// A session on an idle connection to `peer` if there is one that is
    /// still open, else on a new connection. `true`: the connection was
    /// pooled (a failure on it may just mean the instance closed it).
    pub async fn session<P: Peer + Send + Sync + 'static>(
        &self,
        peer: &P,
    ) -> pingora::Result<(HttpSession, bool)> {
        if let Some(stream) = self.take(peer.reuse_hash()) {
            return Ok((HttpSession::new_with_options(stream, peer), true));
        }
        // Boxed: connecting (TCP, and TLS in Pingora's type) is a future
        // several times the size of the rest of a request's, which would
        // otherwise be part of, and copied with, every request's future.
        let stream = Box::pin(self.connector.new_stream(peer)).await?;
        Ok((HttpSession::new_with_options(stream, peer), false))
    }

    /// Takes a session back after a complete exchange: its connection is
    /// kept if both sides allow keep-alive, else closed. The first one
    /// kept starts the sweep on the calling runtime.
    pub async fn release<P: Peer>(self: &Arc<Self>, mut session: HttpSession, peer: &P) {
        session.respect_keepalive();
        if let Some(stream) = session.reuse().await {
            let idle_timeout = peer.idle_timeout().unwrap_or(Duration::ZERO);
            self.put(peer.reuse_hash(), stream, idle_timeout);
            if !self.sweeping.load(Ordering::Relaxed)
                && !self.sweeping.swap(true, Ordering::Relaxed)
            {
                tokio::spawn(Self::sweep_every(Arc::downgrade(self), SWEEP_EVERY));
            }
        }
    }

    /// Sweeps every `period` for as long as the pool exists.
    async fn sweep_every(pool: Weak<Self>, period: Duration) {
        let mut every = tokio::time::interval(period);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            every.tick().await;
            let Some(pool) = pool.upgrade() else {
                return;
            };
            let closed = pool.sweep();
            if closed > 0 {
                tracing::debug!(closed, "idle upstream connections closed");
            }
        }
    }

    /// Closes the connections idle past their timeout, and those the
    /// instance closed or sent to while idle. Returns how many it closed.
    pub fn sweep(&self) -> usize {
        let closed = self.lock().sweep(Instant::now());
        let count = closed.len();
        // Closed outside the lock.
        drop(closed);
        count
    }

    /// Idle connections held now.
    pub fn idle_count(&self) -> usize {
        self.lock().len
    }

    fn take(&self, key: u64) -> Option<Stream> {
        self.lock().take(key, Instant::now())
    }

    fn put(&self, key: u64, mut stream: Stream, idle_timeout: Duration) {
        if idle_timeout.is_zero() || !quiet(&mut stream) {
            return;
        }
        let evicted = self.lock().put(key, stream, idle_timeout, Instant::now());
        drop(evicted);
    }

    fn lock(&self) -> MutexGuard<'_, IdleSet> {
        // The set is consistent between any two statements that can panic.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One idle connection.
struct Idle {
    stream: Stream,
    since: Instant,
    timeout: Duration,
}

impl Idle {
    fn expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.since) >= self.timeout
    }
}

/// The idle connections by peer (`Peer::reuse_hash`), oldest first.
struct IdleSet {
    by_peer: HashMap<u64, VecDeque<Idle>>,
    len: usize,
    capacity: usize,
}

impl IdleSet {
    fn new(capacity: usize) -> Self {
        IdleSet {
            by_peer: HashMap::new(),
            len: 0,
            capacity,
        }
    }

    /// The most recently used open connection to `key`. Expired and
    /// closed ones met on the way are dropped.
    fn take(&mut self, key: u64, now: Instant) -> Option<Stream> {
        let list = self.by_peer.get_mut(&key)?;
        while let Some(mut idle) = list.pop_back() {
            self.len -= 1;
            if idle.expired(now) {
                // The rest are older still.
                self.len -= list.len();
                list.clear();
                return None;
            }
            if quiet(&mut idle.stream) {
                return Some(idle.stream);
            }
        }
        None
    }

    /// Keeps `stream`; returns the connection evicted to make room, if any.
    fn put(&mut self, key: u64, stream: Stream, timeout: Duration, now: Instant) -> Option<Idle> {
        if self.capacity == 0 {
            return None;
        }
        let evicted = if self.len >= self.capacity {
            self.evict_oldest()
        } else {
            None
        };
        self.by_peer.entry(key).or_default().push_back(Idle {
            stream,
            since: now,
            timeout,
        });
        self.len += 1;
        evicted
    }

    fn evict_oldest(&mut self) -> Option<Idle> {
        let key = self
            .by_peer
            .iter()
            .filter_map(|(key, list)| list.front().map(|idle| (idle.since, *key)))
            .min()?
            .1;
        let Entry::Occupied(mut entry) = self.by_peer.entry(key) else {
            return None;
        };
        let idle = entry.get_mut().pop_front();
        if entry.get().is_empty() {
            entry.remove();
        }
        self.len -= usize::from(idle.is_some());
        idle
    }

    /// Removes and returns the expired and closed connections.
    fn sweep(&mut self, now: Instant) -> Vec<Idle> {
        let mut closed = Vec::new();
        self.by_peer.retain(|_, list| {
            let mut kept = VecDeque::with_capacity(list.len());
            for mut idle in list.drain(..) {
                if idle.expired(now) || !quiet(&mut idle.stream) {
                    closed.push(idle);
                } else {
                    kept.push_back(idle);
                }
            }
            *list = kept;
            !list.is_empty()
        });
        self.len -= closed.len();
        closed
    }
}

/// Whether an idle connection has nothing to read: no data, no end of
/// stream, no error. Polled once without waiting; this makes a system call
/// only if the event loop recorded an event for the socket since it was
/// last read to the end.
fn quiet(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    // Unconstrained: a task out of its scheduling budget would see
    // `Pending` whatever the socket's state.
    let read = tokio::task::unconstrained(stream.read(&mut byte));
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(read).poll(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Ok(0)) => {
            tracing::debug!("an idle upstream connection was closed by the instance");
            false
        }
        Poll::Ready(Ok(_)) => {
            tracing::warn!("an idle upstream connection received data: closed");
            false
        }
        Poll::Ready(Err(err)) => {
            tracing::debug!(error = %err, "an idle upstream connection failed");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A connected pair: the pool's side as a Pingora stream, and the
    /// instance's side.
    async fn pair(listener: &TcpListener) -> (Stream, TcpStream) {
        let (client, server) = tokio::join!(
            TcpStream::connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        (
            Box::new(pingora::protocols::l4::stream::Stream::from(
                client.unwrap(),
            )),
            server.unwrap().0,
        )
    }

    /// A connection's identity: its descriptor (all are open while compared).
    fn fd(stream: &Stream) -> i32 {
        stream.id()
    }

    async fn settle() {
        // Loopback delivers at once; give the event loop a turn to see it.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    fn pool(capacity: usize) -> UpstreamPool {
        let mut options = ConnectorOptions::new(capacity);
        options.keepalive_pool_size = capacity;
        UpstreamPool::new(options)
    }

    #[tokio::test]
    async fn the_most_recent_open_connection_is_taken_first() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = pool(8);
        let (first, _a) = pair(&listener).await;
        let (second, _b) = pair(&listener).await;
        let (first_fd, second_fd) = (fd(&first), fd(&second));
        pool.put(1, first, Duration::from_secs(30));
        pool.put(1, second, Duration::from_secs(30));
        assert!(
            pool.take(2).is_none(),
            "another peer's connection was handed out"
        );
        assert_eq!(pool.take(1).map(|s| fd(&s)), Some(second_fd));
        assert_eq!(pool.take(1).map(|s| fd(&s)), Some(first_fd));
        assert!(pool.take(1).is_none());
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_connection_the_instance_closed_or_wrote_to_is_not_handed_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = pool(8);
        let (open, _kept) = pair(&listener).await;
        let open_fd = fd(&open);
        let (closed, server_closed) = pair(&listener).await;
        let (talked, mut server_talked) = pair(&listener).await;
        pool.put(1, open, Duration::from_secs(30));
        pool.put(1, closed, Duration::from_secs(30));
        pool.put(1, talked, Duration::from_secs(30));
        drop(server_closed);
        server_talked
            .write_all(b"HTTP/1.1 408\r\n\r\n")
            .await
            .unwrap();
        settle().await;
        // The two newer ones are dropped on the way to the open one.
        assert_eq!(pool.take(1).map(|s| fd(&s)), Some(open_fd));
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_connection_idle_past_its_timeout_is_not_handed_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = pool(8);
        let (stream, _server) = pair(&listener).await;
        pool.put(1, stream, Duration::from_millis(20));
        settle().await;
        assert!(pool.take(1).is_none());
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_connection_that_is_not_quiet_when_released_is_not_kept() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = pool(8);
        let (stream, mut server) = pair(&listener).await;
        server.write_all(b"extra").await.unwrap();
        settle().await;
        pool.put(1, stream, Duration::from_secs(30));
        assert_eq!(pool.idle_count(), 0);
        // Nor is one kept without an idle timeout.
        let (stream, _server) = pair(&listener).await;
        pool.put(1, stream, Duration::ZERO);
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn past_capacity_the_connection_idle_longest_is_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = pool(2);
        let (oldest, mut oldest_server) = pair(&listener).await;
        let (middle, _m) = pair(&listener).await;
        let (newest, _n) = pair(&listener).await;
        let (middle_fd, newest_fd) = (fd(&middle), fd(&newest));
        pool.put(1, oldest, Duration::from_secs(30));
        pool.put(2, middle, Duration::from_secs(30));
        pool.put(2, newest, Duration::from_secs(30));
        assert_eq!(pool.idle_count(), 2);
        // The evicted connection was closed, not leaked.
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), oldest_server.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0))),
            "evicted connection still open: {read:?}"
        );
        assert!(pool.take(1).is_none());
        assert_eq!(pool.take(2).map(|s| fd(&s)), Some(newest_fd));
        assert_eq!(pool.take(2).map(|s| fd(&s)), Some(middle_fd));
    }

    #[tokio::test]
    async fn a_sweep_closes_expired_and_closed_connections_only() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = pool(8);
        let (kept, _k) = pair(&listener).await;
        let kept_fd = fd(&kept);
        let (expiring, mut expiring_server) = pair(&listener).await;
        let (closed, closed_server) = pair(&listener).await;
        pool.put(1, kept, Duration::from_secs(30));
        pool.put(1, expiring, Duration::from_millis(20));
        pool.put(2, closed, Duration::from_secs(30));
        drop(closed_server);
        settle().await;
        assert_eq!(pool.sweep(), 2);
        assert_eq!(pool.idle_count(), 1);
        let mut buf = [0u8; 1];
        let read =
            tokio::time::timeout(Duration::from_secs(2), expiring_server.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0))),
            "expired connection still open: {read:?}"
        );
        assert_eq!(pool.take(1).map(|s| fd(&s)), Some(kept_fd));
        assert_eq!(pool.sweep(), 0);
    }

    #[tokio::test]
    async fn the_periodic_sweep_runs_until_the_pool_is_dropped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Arc::new(pool(8));
        let (stream, _server) = pair(&listener).await;
        pool.put(1, stream, Duration::from_millis(20));
        let sweeper = tokio::spawn(UpstreamPool::sweep_every(
            Arc::downgrade(&pool),
            Duration::from_millis(10),
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(pool.idle_count(), 0);
        drop(pool);
        tokio::time::timeout(Duration::from_secs(2), sweeper)
            .await
            .expect("the sweep outlived its pool")
            .unwrap();
    }
}
