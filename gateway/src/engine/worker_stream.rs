//! A client connection moved, socket and all, to the worker that serves it.
//!
//! Pingora's listener accepts on the listening thread (worker 0), and the
//! accepted socket is registered with that thread's tokio I/O driver (its
//! epoll). Handed to another worker as it is, the connection's task runs
//! there, but each time its socket becomes readable the event arrives at
//! worker 0, which wakes the task on the other thread across threads (an
//! `eventfd` write, a wake-up of that thread; measured in `bench/notes.md`).
//!
//! [`rehome`] re-registers the socket on the serving worker: it duplicates
//! the descriptor, registers the duplicate there, and drops the accepted
//! stream (which removes it from worker 0's epoll and closes the original
//! descriptor; the socket lives on in the duplicate). Pingora gives a
//! stream made from a socket no buffers (its listener sets them with a
//! crate-private call), so [`WorkerStream`] adds the write buffer its
//! listener would have: a response's header and a small body go out in one
//! `send`, as on worker 0. Reads go straight into Pingora's request buffer.
//!
//! Upstream change that would delete this file: a way to build Pingora's
//! `Stream` from an accepted socket on the serving runtime with the
//! listener's buffers (a public counterpart of its crate-private setup),
//! or a listener per worker thread (`SO_REUSEPORT`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::l4::stream::{DEFAULT_L4_WRITE_BUFFER_SIZE, Stream as L4Stream};
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter, ReadBuf};

/// `stream`, registered with the current runtime's I/O driver instead of
/// the one that accepted it. A stream that is not plain TCP (a Unix socket,
/// TLS: the gateway listens on neither today), or that cannot
/// be moved (no descriptor left to duplicate), is returned as it is: it is
/// served all the same, its readiness still reported by the accepting
/// thread.
pub fn rehome(stream: Stream) -> Stream {
    let Some(accepted) = (*stream).as_any().downcast_ref::<L4Stream>() else {
        return stream;
    };
    // Pingora's listener describes each socket it accepts.
    let tcp = accepted
        .get_socket_digest()
        .and_then(|digest| Some(digest.local_addr()?.as_inet().is_some()));
    if tcp != Some(true) {
        return stream;
    }
    match WorkerStream::duplicate(accepted) {
        // `stream` is dropped here: out of the accepting thread's epoll,
        // its descriptor closed.
        Ok(moved) => Box::new(moved),
        Err(e) => {
            tracing::warn!(error = %e, "client connection left on the accepting thread's poller");
            stream
        }
    }
}

/// A client connection registered with its worker's runtime, with a write
/// buffer as Pingora's listener gives its streams.
#[derive(Debug)]
pub struct WorkerStream(BufWriter<L4Stream>);

impl WorkerStream {
    /// A stream over a duplicate of `accepted`'s socket (connected TCP), on
    /// the current runtime.
    fn duplicate(accepted: &L4Stream) -> io::Result<Self> {
        // Already non-blocking, as tokio requires: the duplicate shares the
        // accepted socket's file status flags.
        let socket = std::net::TcpStream::from(duplicate_descriptor(accepted)?);
        let mut stream = L4Stream::from(tokio::net::TcpStream::from_std(socket)?);
        let digest = SocketDigest::from_raw_fd(stream.as_raw_fd());
        stream.set_socket_digest(digest);
        Ok(WorkerStream(BufWriter::with_capacity(
            DEFAULT_L4_WRITE_BUFFER_SIZE,
            stream,
        )))
    }

    fn inner(&self) -> &L4Stream {
        self.0.get_ref()
    }
}

/// A new descriptor (close-on-exec) for the socket `owner` holds.
///
/// Pingora's stream gives its descriptor only as a `RawFd` (it implements
/// `AsRawFd`, not `AsFd`), so the descriptor is borrowed from a raw number
/// here, and only here. The parameter is Pingora's concrete stream, not
/// any `AsRawFd`: that one owns the socket it names, so the borrow below
/// is sound; an arbitrary `AsRawFd` could name a descriptor it does not
/// own. (`impl AsFd for Stream` upstream would make this safe code.)
#[allow(unsafe_code)]
fn duplicate_descriptor(owner: &L4Stream) -> io::Result<OwnedFd> {
    // SAFETY: the descriptor is the socket `owner` owns; `owner` is
    // borrowed (neither closed nor dropped) for this whole call, and the
    // borrowed descriptor does not outlive the call.
    let borrowed = unsafe { BorrowedFd::borrow_raw(owner.as_raw_fd()) };
    borrowed.try_clone_to_owned()
}

impl Drop for WorkerStream {
    /// What Pingora's stream does when dropped: a last try at what is still
    /// buffered, without waiting.
    fn drop(&mut self) {
        let _ = flush_now(&mut self.0);
    }
}

/// One poll of `flush`, with a waker that does nothing.
fn flush_now(writer: &mut BufWriter<L4Stream>) -> Poll<io::Result<()>> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    Pin::new(writer).poll_flush(&mut cx)
}

impl AsyncRead for WorkerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for WorkerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for WorkerStream {
    async fn shutdown(&mut self) {
        // Flushes what is buffered, then shuts the socket's write side.
        if let Err(e) = AsyncWriteExt::shutdown(&mut self.0).await {
            tracing::debug!(error = %e, "failed to shut down a client connection");
        }
    }
}

impl UniqueID for WorkerStream {
    fn id(&self) -> UniqueIDType {
        self.inner().id()
    }
}

impl Ssl for WorkerStream {}

impl GetTimingDigest for WorkerStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner().get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner().get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner().get_write_pending_time()
    }
}

impl GetProxyDigest for WorkerStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner().get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.0.get_mut().set_proxy_digest(digest);
    }
}

impl GetSocketDigest for WorkerStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner().get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.0.get_mut().set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for WorkerStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.0.get_mut().try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_moved_connection_no_longer_needs_the_runtime_that_accepted_it() {
        let accepting = runtime();
        let (accepted, client) = accepting.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let mut accepted = L4Stream::from(server);
            accepted.set_socket_digest(SocketDigest::from_raw_fd(accepted.as_raw_fd()));
            let accepted: Stream = Box::new(accepted);
            (accepted, client)
        });
        // Had the socket stayed registered with it, every read and write
        // below would fail: its I/O driver is gone.
        drop(accepting);
        let client_addr = client.local_addr().unwrap();
        client.set_nonblocking(true).unwrap();

        runtime().block_on(async move {
            let mut moved = rehome(accepted);
            assert!((*moved).as_any().is::<WorkerStream>());
            let digest = moved.get_socket_digest().unwrap();
            assert_eq!(digest.peer_addr().unwrap().as_inet(), Some(&client_addr));

            let mut client = tokio::net::TcpStream::from_std(client).unwrap();
            client.write_all(b"ping").await.unwrap();
            let mut ping = [0; 4];
            moved.read_exact(&mut ping).await.unwrap();
            assert_eq!(&ping, b"ping");

            // A header and a small body: buffered until flushed, then sent
            // together.
            moved.write_all(b"header ").await.unwrap();
            moved.write_all(b"body").await.unwrap();
            let mut peek = [0; 16];
            let early = tokio::time::timeout(Duration::from_millis(50), client.peek(&mut peek));
            assert!(early.await.is_err(), "sent before the flush");
            moved.flush().await.unwrap();
            let mut answer = [0; 11];
            client.read_exact(&mut answer).await.unwrap();
            assert_eq!(&answer, b"header body");

            Shutdown::shutdown(&mut *moved).await;
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        });
    }

    #[test]
    fn a_stream_that_is_not_tcp_stays_as_it_is() {
        runtime().block_on(async {
            let (mine, _theirs) = tokio::net::UnixStream::pair().unwrap();
            let mut unix = L4Stream::from(mine);
            unix.set_socket_digest(SocketDigest::from_raw_fd(unix.as_raw_fd()));
            let stream: Stream = Box::new(unix);
            let kept = rehome(stream);
            assert!((*kept).as_any().is::<L4Stream>());
        });
    }
}
