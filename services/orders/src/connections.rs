//! Kept-alive HTTP/1.1 connections to order-service's dependencies, on
//! hyper's connection API.
//!
//! A call takes an idle connection to its origin (or opens one:
//! `TCP_NODELAY`, within [`CONNECT_TIMEOUT`], driven by a task of its own
//! for its whole life), sends its request, reads the answer whole, and
//! puts the connection back itself. hyper-util's pooled client, used
//! before, spawned a task per call to put its connection back once it was
//! ready again, and looked its pool up by a hashed key: a measured part of
//! every call (`bench/notes.md`).
//!
//! A connection its server closed, or one idle for longer than
//! [`IDLE_TIMEOUT`] (below the servers' own idle limit, so that the server
//! does not close it just as it is used), is dropped instead of used. A
//! request that a reused connection could not even take (it closed in the
//! meantime) is sent on a new connection: nothing of it was sent. A call
//! given up half-way (its deadline) drops its connection: hyper closes a
//! connection whose exchange was abandoned, so none goes back in an
//! unknown state.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::http::{Request, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Time to establish a connection to a dependency on the local network; a
/// dead host is reported quickly instead of holding the order.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// An idle connection older than this is closed rather than used: the
/// services' servers (hyper) close a connection that brings no request
/// header for 30 s, and one closed just as a request goes out would fail
/// that request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Idle connections kept per origin; more are closed when handed back.
const MAX_IDLE: usize = 256;

/// Why an exchange got no answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection could be made: nothing reached the dependency.
    #[error("cannot connect to {authority}: {source}")]
    Connect {
        authority: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error("reading the answer: {0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
}

/// The idle connections, by origin (`host:port`).
#[derive(Default)]
pub struct Connections {
    idle: Mutex<Vec<(String, Vec<Idle>)>>,
}

struct Idle {
    sender: SendRequest<Full<Bytes>>,
    since: Instant,
}

impl Connections {
    fn idle(&self) -> MutexGuard<'_, Vec<(String, Vec<Idle>)>> {
        // The lists stay consistent whatever panicked holding them.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `request` to `authority` and reads the answer whole, at most
    /// `limit` bytes of it.
    pub async fn exchange(
        &self,
        authority: &str,
        request: Request<Full<Bytes>>,
        limit: usize,
    ) -> Result<(StatusCode, Bytes), Error> {
        let (mut sender, reused) = match self.take(authority) {
            Some(sender) => (sender, true),
            None => (connect(authority).await?, false),
        };
        let response = match sender.try_send_request(request).await {
            Ok(response) => response,
            Err(mut refused) => match refused.take_message() {
                // The connection closed while it was idle, before it took
                // the request: nothing was sent, and it goes on a new one.
                Some(request) if reused => {
                    sender = connect(authority).await?;
                    sender.send_request(request).await?
                }
                _ => return Err(refused.into_error().into()),
            },
        };
        let status = response.status();
        let body = Limited::new(response.into_body(), limit)
            .collect()
            .await
            .map_err(Error::Body)?
            .to_bytes();
        self.put_back(authority, sender);
        Ok((status, body))
    }

    /// An idle connection to `authority` that is still open and young
    /// enough; the others found on the way are closed.
    fn take(&self, authority: &str) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle();
        let (_, connections) = idle.iter_mut().find(|(origin, _)| origin == authority)?;
        while let Some(Idle { sender, since }) = connections.pop() {
            if !sender.is_closed() && since.elapsed() < IDLE_TIMEOUT {
                return Some(sender);
            }
        }
        None
    }

    fn put_back(&self, authority: &str, sender: SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle();
        let position = match idle.iter().position(|(origin, _)| origin == authority) {
            Some(position) => position,
            None => {
                idle.push((authority.to_owned(), Vec::new()));
                idle.len() - 1
            }
        };
        let connections = &mut idle[position].1;
        if connections.len() < MAX_IDLE {
            connections.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }
}

/// A new connection to `authority`, its task spawned.
async fn connect(authority: &str) -> Result<SendRequest<Full<Bytes>>, Error> {
    let failed = |source| Error::Connect {
        authority: authority.to_owned(),
        source,
    };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(authority))
        .await
        .map_err(|_| failed(std::io::ErrorKind::TimedOut.into()))?
        .map_err(failed)?;
    stream.set_nodelay(true).map_err(failed)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|err| failed(std::io::Error::other(err)))?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "dependency connection ended");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::header;
    use hyper::body::Incoming;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A server that counts the connections it accepted and answers every
    /// request with its path; aborting the task it returns closes its
    /// connections too.
    async fn server() -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                connections.spawn(async move {
                    let service =
                        hyper::service::service_fn(|request: Request<Incoming>| async move {
                            let path = Bytes::copy_from_slice(request.uri().path().as_bytes());
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(path)))
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (authority, accepted, task)
    }

    fn get(authority: &str, path: &'static str) -> Request<Full<Bytes>> {
        Request::builder()
            .uri(path)
            .header(header::HOST, authority)
            .body(Full::default())
            .unwrap()
    }

    #[tokio::test]
    async fn calls_one_after_another_share_one_connection() {
        let (authority, accepted, _server) = server().await;
        let connections = Connections::default();
        for path in ["/a", "/b", "/c"] {
            let (status, body) = connections
                .exchange(&authority, get(&authority, path), 1024)
                .await
                .unwrap();
            assert_eq!((status, &body[..]), (StatusCode::OK, path.as_bytes()));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_is_replaced_and_the_call_goes_through() {
        let (authority, accepted, server) = server().await;
        let connections = Connections::default();
        connections
            .exchange(&authority, get(&authority, "/a"), 1024)
            .await
            .unwrap();
        // The server goes away with the idle connection, and comes back
        // on the same port.
        server.abort();
        let _ = server.await;
        let closed = |c: &Connections| {
            c.idle()
                .iter()
                .all(|(_, idle)| idle.iter().all(|i| i.sender.is_closed()))
        };
        while !closed(&connections) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let listener = tokio::net::TcpListener::bind(&authority).await.unwrap();
        let again = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let service = hyper::service::service_fn(|_request| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                    Bytes::from_static(b"again"),
                )))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        let (status, body) = connections
            .exchange(&authority, get(&authority, "/b"), 1024)
            .await
            .unwrap();
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"again"[..]));
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        again.abort();
    }

    #[tokio::test]
    async fn an_answer_over_the_limit_fails_and_its_connection_is_not_kept() {
        let (authority, _, _server) = server().await;
        let connections = Connections::default();
        let err = connections
            .exchange(&authority, get(&authority, "/longer-than-eight"), 8)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Body(_)), "{err}");
        assert!(connections.idle().iter().all(|(_, idle)| idle.is_empty()));
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let authority = format!("127.0.0.1:{port}");
        let err = Connections::default()
            .exchange(&authority, get(&authority, "/"), 8)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Connect { .. }), "{err}");
    }
}
