//! The order service's calls to user-service and product-service.
//!
//! One set of kept-alive HTTP/1.1 connections for the life of the process
//! (`connections`: `TCP_NODELAY`, a connect timeout), never a connection
//! per request, and a whole-call limit that covers reading the answer.
//! These calls go to our own services and need none of reqwest's layers
//! (redirects, retries of its own, a response URL parsed again from text
//! on every answer), nor hyper-util's pooled client (a task spawned per
//! call to put its connection back): both were measured parts of the
//! order path. Each
//! dependency is one base URL (`--users-url`, `--products-url`) or, with
//! `--registry`, the instances registered in etcd: round robin over them,
//! moving on to the next when one cannot be connected to (nothing reached
//! it, so any call is safe to send elsewhere; reservations are idempotent
//! by id besides). Every
//! failure to reach a dependency is a 503 that names it; answers the client
//! must see (user not found, product not found, insufficient stock) are
//! passed on with their status and detail.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use bytes::Bytes;
use http_body_util::Full;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use product_service::api::{ItemRequest, Reservation, ReserveRequest};
use registry::{Follower, RoundRobin};
use serde::de::DeserializeOwned;
use service_kit::AppError;

use crate::connections::{self, Connections};

pub use connections::CONNECT_TIMEOUT;
/// Whole-call limit, answer read included: a reservation waits for
/// SQLite's write lock (up to 10 s busy timeout) under heavy contention,
/// so allow a little more.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(12);
/// The largest answer read from a dependency (a reservation of many lines
/// is a few KiB); a larger one is a failed call, not unbounded memory.
pub const MAX_ANSWER_BYTES: usize = 1 << 20;
/// Attempts to release a reservation before giving up and logging it.
const RELEASE_ATTEMPTS: u32 = 3;
/// Pause between release attempts.
const RELEASE_BACKOFF: Duration = Duration::from_millis(200);

/// What a path segment escapes (the WHATWG URL standard's path-segment
/// set: controls, space, `"#<>?\`{}`, `/` and `%`).
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'/')
    .add(b'%');

/// A dependency that cannot be set up; reported at start-up.
#[derive(Debug, thiserror::Error)]
pub enum DependencyError {
    #[error("invalid --{name}-url {url:?}: {reason}")]
    Url {
        name: &'static str,
        url: String,
        reason: String,
    },
    #[error("--{name}-url {url:?} must be an http:// URL with a host")]
    NotHttp { name: &'static str, url: String },
}

/// Where the user and product services are, and the client that calls them.
#[derive(Clone)]
pub struct Dependencies {
    connections: Arc<Connections>,
    users: Target,
    products: Target,
}

/// A base URL split once: its `host:port` and a path prefix without its
/// trailing `/` (often empty). A call goes to the authority, for the
/// prefix with its escaped segments appended.
#[derive(Clone, Debug, PartialEq)]
struct Base {
    authority: String,
    prefix: String,
    /// The `Host` header of its calls (the authority), made once.
    host: HeaderValue,
}

impl Base {
    /// `None` if `authority` cannot be a header value (an authority that
    /// parsed as one always can).
    fn new(authority: String, prefix: String) -> Option<Base> {
        let host = HeaderValue::try_from(authority.as_str()).ok()?;
        Some(Base {
            authority,
            prefix,
            host,
        })
    }

    fn parse(name: &'static str, url: &str) -> Result<Base, DependencyError> {
        let uri: Uri =
            url.parse()
                .map_err(|err: axum::http::uri::InvalidUri| DependencyError::Url {
                    name,
                    url: url.to_owned(),
                    reason: err.to_string(),
                })?;
        let not_http = || DependencyError::NotHttp {
            name,
            url: url.to_owned(),
        };
        let authority = uri.authority().ok_or_else(not_http)?;
        if uri.scheme_str() != Some("http") || authority.host().is_empty() {
            return Err(not_http());
        }
        let invalid = |reason: &str| DependencyError::Url {
            name,
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        if uri.query().is_some() || authority.as_str().contains('@') {
            return Err(invalid("a base URL has no query and no credentials"));
        }
        // Something after the host is a port, and must be one.
        if authority.as_str().len() > authority.host().len() && authority.port_u16().is_none() {
            return Err(invalid("invalid port"));
        }
        // Without a port, HTTP's.
        let authority = match authority.port_u16() {
            Some(_) => authority.as_str().to_owned(),
            None => format!("{}:80", authority.as_str()),
        };
        let prefix = uri.path().trim_end_matches('/').to_owned();
        Base::new(authority, prefix).ok_or_else(|| invalid("invalid host"))
    }

    /// The request target (origin form: the path) of `segments` under
    /// this base.
    fn target(&self, segments: &[&str]) -> Result<Uri, axum::http::Error> {
        let mut path = String::with_capacity(self.prefix.len() + 64);
        path.push_str(&self.prefix);
        for segment in segments {
            path.push('/');
            path.extend(utf8_percent_encode(segment, SEGMENT));
        }
        Ok(Uri::try_from(path)?)
    }
}

/// Where one dependency is.
#[derive(Clone)]
enum Target {
    /// One base URL, parsed once.
    Fixed(Base),
    /// The instances registered in etcd, in turn.
    Registry {
        service: &'static str,
        instances: Arc<RoundRobin>,
        /// Keeps the registry followed while the target lives.
        _follower: Arc<Follower>,
    },
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Fixed(base) => write!(f, "http://{}{}", base.authority, base.prefix),
            Target::Registry { service, .. } => write!(f, "registry:{service}"),
        }
    }
}

impl Target {
    fn registry(endpoints: &[String], prefix: &str, service: &'static str) -> Self {
        let follower = Follower::start(endpoints.to_vec(), prefix, service);
        Target::Registry {
            service,
            instances: Arc::new(RoundRobin::new(follower.view())),
            _follower: Arc::new(follower),
        }
    }

    /// Base URLs to try, in order (a fixed one is not copied per call).
    fn bases(&self) -> Cow<'_, [Base]> {
        match self {
            Target::Fixed(base) => Cow::Borrowed(std::slice::from_ref(base)),
            Target::Registry { instances, .. } => Cow::Owned(
                instances
                    .candidates()
                    .into_iter()
                    .filter_map(|address| Base::new(address.to_string(), String::new()))
                    .collect(),
            ),
        }
    }
}

/// A dependency's answer, read whole.
struct Answer {
    status: StatusCode,
    body: Bytes,
}

impl Answer {
    fn json<T: DeserializeOwned>(&self) -> Result<T, CallError> {
        serde_json::from_slice(&self.body).map_err(CallError::Decode)
    }
}

/// A call that got no (usable) answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("no instance is registered")]
    NoInstance,
    #[error("invalid request URL: {0}")]
    Url(#[from] axum::http::Error),
    #[error(transparent)]
    Http(#[from] connections::Error),
    #[error("no answer within {REQUEST_TIMEOUT:?}")]
    Timeout,
    #[error("undecodable answer: {0}")]
    Decode(serde_json::Error),
}

impl CallError {
    /// Nothing reached the dependency.
    fn is_connect(&self) -> bool {
        match self {
            CallError::NoInstance | CallError::Url(_) => true,
            CallError::Http(err) => matches!(err, connections::Error::Connect { .. }),
            _ => false,
        }
    }

    fn is_timeout(&self) -> bool {
        matches!(self, CallError::Timeout)
    }
}

impl Dependencies {
    /// `users_url` and `products_url` are base URLs such as
    /// `http://127.0.0.1:8001`.
    pub fn new(users_url: &str, products_url: &str) -> Result<Self, DependencyError> {
        Ok(Self {
            connections: Arc::default(),
            users: Target::Fixed(Base::parse("users", users_url)?),
            products: Target::Fixed(Base::parse("products", products_url)?),
        })
    }

    /// user-service and product-service as registered in etcd at
    /// `endpoints` under `prefix` (followed live from now on).
    pub fn from_registry(endpoints: &[String], prefix: &str) -> Result<Self, DependencyError> {
        Ok(Self {
            connections: Arc::default(),
            users: Target::registry(endpoints, prefix, "user-service"),
            products: Target::registry(endpoints, prefix, "product-service"),
        })
    }

    /// Sends `method` to the URL of `path` (its segments) at a base URL
    /// of `target`, with `body` as JSON if there is one, and reads the
    /// answer; tries the next instance while one cannot be connected to.
    async fn call(
        &self,
        target: &Target,
        name: &'static str,
        method: Method,
        path: &[&str],
        body: Option<&Bytes>,
    ) -> Result<Answer, CallError> {
        let mut last = CallError::NoInstance;
        for base in target.bases().iter() {
            let uri = base.target(path)?;
            let mut request = Request::new(Full::new(body.cloned().unwrap_or_default()));
            *request.method_mut() = method.clone();
            *request.uri_mut() = uri;
            request
                .headers_mut()
                .insert(header::HOST, base.host.clone());
            if body.is_some() {
                request.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
            match send(&self.connections, &base.authority, request, name).await {
                Ok(answer) => return Ok(answer),
                Err(err) if err.is_connect() => {
                    tracing::debug!(base = %base.authority, error = %err, "cannot connect: trying the next instance");
                    last = err;
                }
                Err(err) => return Err(err),
            }
        }
        Err(last)
    }

    /// Ok if the user exists; 404 `User not found`; 503 if user-service
    /// cannot answer.
    pub async fn check_user(&self, user_id: i64) -> Result<(), AppError> {
        let response = self
            .call(
                &self.users,
                "GET user-service /users/{id}",
                Method::GET,
                &["users", &user_id.to_string()],
                None,
            )
            .await
            .map_err(|err| unreachable("User service", &err))?;
        match response.status {
            s if s.is_success() => Ok(()),
            StatusCode::NOT_FOUND => Err(AppError::not_found("User not found")),
            other => Err(bad_answer("User service", other)),
        }
    }

    /// Holds stock for every item under `reservation_id`, or for none.
    /// Passes on 404 `Product N not found` and 400 `Insufficient stock for
    /// product N` as [`Refused`]. If the call fails in a way that leaves its
    /// outcome unknown (timeout, connection lost), the reservation is
    /// released before the 503 is returned; [`Refused::Unknown`] says
    /// whether that release went through (if not, stock may still be held
    /// and the order must stay pending for recovery).
    pub async fn reserve(
        &self,
        reservation_id: &str,
        items: &[ItemRequest],
    ) -> Result<Reservation, Refused> {
        let body = ReserveRequest {
            id: Some(reservation_id.to_owned()),
            items: items.to_vec(),
        };
        let body = match serde_json::to_vec(&body) {
            Ok(body) => Bytes::from(body),
            Err(err) => {
                return Err(Refused::Clean(AppError::internal(format!(
                    "cannot encode the reservation: {err}"
                ))));
            }
        };
        let unknown = |error: AppError, released: bool| Refused::Unknown { error, released };
        let response = match self
            .call(
                &self.products,
                "POST product-service /reservations",
                Method::POST,
                &["reservations"],
                Some(&body),
            )
            .await
        {
            Ok(response) => response,
            Err(err) if err.is_connect() => {
                // Nothing reached product-service.
                return Err(Refused::Clean(unreachable("Product service", &err)));
            }
            Err(err) => {
                // The request may have been applied: undo it.
                let released = self.release(reservation_id).await;
                return Err(unknown(unreachable("Product service", &err), released));
            }
        };
        let status = response.status;
        if status.is_success() {
            return match response.json::<Reservation>() {
                Ok(reservation) => Ok(reservation),
                Err(err) => {
                    let released = self.release(reservation_id).await;
                    Err(unknown(unreachable("Product service", &err), released))
                }
            };
        }
        match status {
            StatusCode::NOT_FOUND
            | StatusCode::BAD_REQUEST
            | StatusCode::UNPROCESSABLE_ENTITY
            | StatusCode::CONFLICT => {
                Err(Refused::Clean(AppError::new(status, detail_of(&response))))
            }
            other => {
                // A failed reservation rolls back, but releasing is
                // idempotent and costs little: leave nothing to chance.
                let released = self.release(reservation_id).await;
                Err(unknown(bad_answer("Product service", other), released))
            }
        }
    }

    /// Confirms a held reservation (the order is placed; the hold no longer
    /// expires). `Ok(false)`: it was released or expired first.
    pub async fn confirm(&self, reservation_id: &str) -> Result<bool, AppError> {
        let response = self
            .call(
                &self.products,
                "POST product-service /reservations/{id}/confirm",
                Method::POST,
                &["reservations", reservation_id, "confirm"],
                None,
            )
            .await
            .map_err(|err| unreachable("Product service", &err))?;
        match response.status {
            s if s.is_success() => Ok(true),
            StatusCode::CONFLICT | StatusCode::NOT_FOUND => Ok(false),
            other => Err(bad_answer("Product service", other)),
        }
    }

    /// The reservation as product-service has it; `None` if it never saw
    /// the id.
    pub async fn reservation(&self, reservation_id: &str) -> Result<Option<Reservation>, AppError> {
        let response = self
            .call(
                &self.products,
                "GET product-service /reservations/{id}",
                Method::GET,
                &["reservations", reservation_id],
                None,
            )
            .await
            .map_err(|err| unreachable("Product service", &err))?;
        match response.status {
            s if s.is_success() => response
                .json::<Reservation>()
                .map(Some)
                .map_err(|err| unreachable("Product service", &err)),
            StatusCode::NOT_FOUND => Ok(None),
            other => Err(bad_answer("Product service", other)),
        }
    }

    /// Gives a reservation's stock back; whether product-service
    /// confirmed it. Retries a few times; if product-service stays
    /// unreachable the order stays pending and recovery releases it later
    /// (releasing is idempotent).
    pub async fn release(&self, reservation_id: &str) -> bool {
        let path = ["reservations", reservation_id, "release"];
        for attempt in 1..=RELEASE_ATTEMPTS {
            let call = self.call(
                &self.products,
                "POST product-service /reservations/{id}/release",
                Method::POST,
                &path,
                None,
            );
            match call.await {
                Ok(response) if response.status.is_success() => return true,
                Ok(response) => {
                    tracing::warn!(reservation = reservation_id, status = %response.status, attempt, "release refused");
                }
                Err(err) => {
                    tracing::warn!(reservation = reservation_id, error = %err, attempt, "release failed");
                }
            }
            tokio::time::sleep(RELEASE_BACKOFF * attempt).await;
        }
        tracing::warn!(
            reservation = reservation_id,
            "could not release the reservation now; recovery will"
        );
        false
    }
}

/// Why a reservation was not made.
#[derive(Debug)]
pub enum Refused {
    /// Nothing is held: refused (404, 400, 409) or never reached.
    Clean(AppError),
    /// The outcome was unknown; a release was attempted (`released`: it
    /// went through, so nothing is held).
    Unknown { error: AppError, released: bool },
}

impl Refused {
    pub fn error(self) -> AppError {
        match self {
            Refused::Clean(error) | Refused::Unknown { error, .. } => error,
        }
    }
}

/// Sends `request` as a client span of the current request (named
/// `name`): its `traceparent` and the request's `x-request-id` go along.
/// The answer is read whole, within [`REQUEST_TIMEOUT`] from the start.
async fn send(
    connections: &Connections,
    authority: &str,
    mut request: Request<Full<Bytes>>,
    name: &'static str,
) -> Result<Answer, CallError> {
    use service_kit::trace::Child;
    use telemetry::export::{KeyValue, SpanKind};
    let span = Child::start();
    for (header, value) in span.headers() {
        if let Ok(value) = HeaderValue::from_str(&value) {
            request.headers_mut().insert(header, value);
        }
    }
    let exchange = connections.exchange(authority, request, MAX_ANSWER_BYTES);
    let answer = match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
        Ok(Ok((status, body))) => Ok(Answer { status, body }),
        Ok(Err(err)) => Err(CallError::Http(err)),
        Err(_) => Err(CallError::Timeout),
    };
    if span.exported() {
        let (attributes, error) = match &answer {
            Ok(answer) => {
                let status = answer.status.as_u16();
                (
                    vec![KeyValue::new(
                        "http.response.status_code",
                        i64::from(status),
                    )],
                    (status >= 500).then(|| format!("status {status}")),
                )
            }
            Err(err) => (Vec::new(), Some(err.to_string())),
        };
        span.finish(name.to_owned(), SpanKind::Client, attributes, error);
    }
    answer
}

fn unreachable(dependency: &str, err: &CallError) -> AppError {
    tracing::warn!(error = %err, "{dependency} unreachable");
    let why = if err.is_timeout() {
        "timed out"
    } else {
        "unavailable"
    };
    AppError::unavailable(format!("{dependency} {why}"))
}

fn bad_answer(dependency: &str, status: StatusCode) -> AppError {
    tracing::warn!(%status, "{dependency} answered with an unexpected status");
    AppError::unavailable(format!("{dependency} unavailable (answered {status})"))
}

/// The `detail` of a JSON error body, or a generic text if there is none.
fn detail_of(answer: &Answer) -> String {
    #[derive(serde::Deserialize)]
    struct Detail {
        detail: String,
    }
    answer
        .json::<Detail>()
        .map(|d| d.detail)
        .unwrap_or_else(|_| format!("Product service answered {}", answer.status))
}

#[cfg(test)]
mod tests {
    use super::{Base, DependencyError};

    #[test]
    fn a_call_goes_to_the_bases_authority_for_its_prefix_and_path() {
        let cases = [
            ("http://127.0.0.1:8001", "127.0.0.1:8001", "/users/7"),
            ("http://127.0.0.1:8001/", "127.0.0.1:8001", "/users/7"),
            ("http://users.local/api", "users.local:80", "/api/users/7"),
            ("http://users.local/api/", "users.local:80", "/api/users/7"),
            ("http://[::1]:8001", "[::1]:8001", "/users/7"),
        ];
        for (base, authority, target) in cases {
            let base = Base::parse("users", base).unwrap();
            assert_eq!(base.authority, authority, "{base:?}");
            assert_eq!(base.target(&["users", "7"]).unwrap(), target, "{base:?}");
        }
        let base = Base::parse("products", "http://p:1").unwrap();
        assert_eq!(
            base.target(&["reservations", "01a2-b_c", "confirm"])
                .unwrap(),
            "/reservations/01a2-b_c/confirm"
        );
        // A segment never adds a segment, a query or a fragment.
        assert_eq!(
            base.target(&["reservations", "a/b?c#d %"]).unwrap(),
            "/reservations/a%2Fb%3Fc%23d%20%25"
        );
    }

    #[test]
    fn a_base_url_is_plain_http_with_a_host() {
        for url in ["https://p:1", "p:1", "/users", "ftp://p"] {
            assert!(
                matches!(
                    Base::parse("users", url),
                    Err(DependencyError::NotHttp { .. })
                ),
                "{url}"
            );
        }
        for url in [
            "http://p:1/?a=b",
            "http://u:pw@p:1",
            "http://p:99999999",
            "http://p:",
        ] {
            assert!(
                matches!(Base::parse("users", url), Err(DependencyError::Url { .. })),
                "{url}"
            );
        }
        assert!(matches!(
            Base::parse("users", "not a url"),
            Err(DependencyError::Url { .. })
        ));
    }
}
