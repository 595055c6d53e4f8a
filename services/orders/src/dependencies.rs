//! The order service's calls to user-service and product-service.
//!
//! One `reqwest::Client` for the life of the process (pooled keep-alive
//! connections, connect and total timeouts), never one per request. Each
//! dependency is one base URL (`--users-url`, `--products-url`) or, with
//! `--registry`, the instances registered in etcd: round robin over them,
//! moving on to the next when one cannot be connected to (nothing reached
//! it, so any call is safe to send elsewhere; reservations are idempotent
//! by id besides). Every
//! failure to reach a dependency is a 503 that names it; answers the client
//! must see (user not found, product not found, insufficient stock) are
//! passed on with their status and detail.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use product_service::api::{ItemRequest, Reservation, ReserveRequest};
use registry::{Follower, RoundRobin};
use service_kit::AppError;

/// Time to establish a connection to a dependency on the local network; a
/// dead host is reported quickly instead of holding the order.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Whole-call limit: a reservation waits for SQLite's write lock (up to
/// 10 s busy timeout) under heavy contention, so allow a little more.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(12);
/// Idle pooled connections are closed before the services' own keep-alive
/// limits would close them under us.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts to release a reservation before giving up and logging it.
const RELEASE_ATTEMPTS: u32 = 3;
/// Pause between release attempts.
const RELEASE_BACKOFF: Duration = Duration::from_millis(200);

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
    #[error("cannot build the HTTP client: {0}")]
    Client(reqwest::Error),
}

fn client() -> Result<reqwest::Client, DependencyError> {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build()
        .map_err(DependencyError::Client)
}

/// Where the user and product services are, and the client that calls them.
#[derive(Clone, Debug)]
pub struct Dependencies {
    http: reqwest::Client,
    users: Target,
    products: Target,
}

/// Where one dependency is.
#[derive(Clone)]
enum Target {
    /// One base URL, parsed once.
    Fixed(reqwest::Url),
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
            Target::Fixed(url) => write!(f, "{}", url.as_str().trim_end_matches('/')),
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

    /// Base URLs to try, in order.
    fn bases(&self) -> Vec<reqwest::Url> {
        match self {
            Target::Fixed(url) => vec![url.clone()],
            Target::Registry { instances, .. } => instances
                .candidates()
                .into_iter()
                .filter_map(|address| reqwest::Url::parse(&format!("http://{address}")).ok())
                .collect(),
        }
    }
}

/// A call that got no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("no instance is registered")]
    NoInstance,
    #[error(transparent)]
    Http(#[from] reqwest::Error),
}

impl CallError {
    /// Nothing reached the dependency.
    fn is_connect(&self) -> bool {
        match self {
            CallError::NoInstance => true,
            CallError::Http(err) => err.is_connect(),
        }
    }

    fn is_timeout(&self) -> bool {
        matches!(self, CallError::Http(err) if err.is_timeout())
    }
}

impl Dependencies {
    /// `users_url` and `products_url` are base URLs such as
    /// `http://127.0.0.1:8001`.
    pub fn new(users_url: &str, products_url: &str) -> Result<Self, DependencyError> {
        let base = |name: &'static str, url: &str| {
            let parsed = reqwest::Url::parse(url).map_err(|err| DependencyError::Url {
                name,
                url: url.to_owned(),
                reason: err.to_string(),
            })?;
            if !matches!(parsed.scheme(), "http" | "https") || !parsed.has_host() {
                return Err(DependencyError::NotHttp {
                    name,
                    url: url.to_owned(),
                });
            }
            Ok(parsed)
        };
        let users = Target::Fixed(base("users", users_url)?);
        let products = Target::Fixed(base("products", products_url)?);
        Ok(Self {
            http: client()?,
            users,
            products,
        })
    }

    /// user-service and product-service as registered in etcd at
    /// `endpoints` under `prefix` (followed live from now on).
    pub fn from_registry(endpoints: &[String], prefix: &str) -> Result<Self, DependencyError> {
        Ok(Self {
            http: client()?,
            users: Target::registry(endpoints, prefix, "user-service"),
            products: Target::registry(endpoints, prefix, "product-service"),
        })
    }

    /// Sends the request `build` makes for the URL of `path` (its
    /// segments) at a base URL of `target`, trying the next instance while
    /// one cannot be connected to.
    async fn call(
        &self,
        target: &Target,
        name: &'static str,
        path: &[&str],
        build: impl Fn(&reqwest::Client, reqwest::Url) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, CallError> {
        let mut last = CallError::NoInstance;
        for base in target.bases() {
            match send(build(&self.http, join(&base, path)), name).await {
                Ok(response) => return Ok(response),
                Err(err) if err.is_connect() => {
                    tracing::debug!(%base, error = %err, "cannot connect: trying the next instance");
                    last = CallError::Http(err);
                }
                Err(err) => return Err(CallError::Http(err)),
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
                &["users", &user_id.to_string()],
                |http, url| http.get(url),
            )
            .await
            .map_err(|err| unreachable("User service", &err))?;
        match response.status() {
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
        let unknown = |error: AppError, released: bool| Refused::Unknown { error, released };
        let response = match self
            .call(
                &self.products,
                "POST product-service /reservations",
                &["reservations"],
                |http, url| http.post(url).json(&body),
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
        let status = response.status();
        if status.is_success() {
            return match response.json::<Reservation>().await {
                Ok(reservation) => Ok(reservation),
                Err(err) => {
                    let released = self.release(reservation_id).await;
                    Err(unknown(
                        unreachable("Product service", &err.into()),
                        released,
                    ))
                }
            };
        }
        match status {
            StatusCode::NOT_FOUND
            | StatusCode::BAD_REQUEST
            | StatusCode::UNPROCESSABLE_ENTITY
            | StatusCode::CONFLICT => Err(Refused::Clean(AppError::new(
                status,
                detail_of(response).await,
            ))),
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
                &["reservations", reservation_id, "confirm"],
                |http, url| http.post(url),
            )
            .await
            .map_err(|err| unreachable("Product service", &err))?;
        match response.status() {
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
                &["reservations", reservation_id],
                |http, url| http.get(url),
            )
            .await
            .map_err(|err| unreachable("Product service", &err))?;
        match response.status() {
            s if s.is_success() => response
                .json::<Reservation>()
                .await
                .map(Some)
                .map_err(|err| unreachable("Product service", &err.into())),
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
                &path,
                |http, url| http.post(url),
            );
            match call.await {
                Ok(response) if response.status().is_success() => return true,
                Ok(response) => {
                    tracing::warn!(reservation = reservation_id, status = %response.status(), attempt, "release refused");
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

/// `base` with `segments` appended to its path: the base's scheme and host
/// are not parsed (and checked) again for every call.
fn join(base: &reqwest::Url, segments: &[&str]) -> reqwest::Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    url
}

/// Sends `request` as a client span of the current request (named
/// `name`): its `traceparent` and the request's `x-request-id` go along.
async fn send(
    request: reqwest::RequestBuilder,
    name: &'static str,
) -> reqwest::Result<reqwest::Response> {
    use service_kit::trace::Child;
    use telemetry::export::{KeyValue, SpanKind};
    let span = Child::start();
    let mut headers = reqwest::header::HeaderMap::new();
    for (header, value) in span.headers() {
        if let Ok(value) = reqwest::header::HeaderValue::from_str(&value) {
            headers.insert(header, value);
        }
    }
    let response = request.headers(headers).send().await;
    let (attributes, error) = match &response {
        Ok(response) => {
            let status = response.status().as_u16();
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
    response
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
async fn detail_of(response: reqwest::Response) -> String {
    #[derive(serde::Deserialize)]
    struct Detail {
        detail: String,
    }
    let status = response.status();
    response
        .json::<Detail>()
        .await
        .map(|d| d.detail)
        .unwrap_or_else(|_| format!("Product service answered {status}"))
}

#[cfg(test)]
mod tests {
    use super::join;

    #[test]
    fn a_call_url_is_the_base_with_the_path_appended() {
        let cases = [
            ("http://127.0.0.1:8001", "http://127.0.0.1:8001/users/7"),
            ("http://127.0.0.1:8001/", "http://127.0.0.1:8001/users/7"),
            ("http://users.local/api", "http://users.local/api/users/7"),
            ("http://users.local/api/", "http://users.local/api/users/7"),
        ];
        for (base, expected) in cases {
            let base = reqwest::Url::parse(base).unwrap();
            assert_eq!(join(&base, &["users", "7"]).as_str(), expected, "{base}");
        }
        let base = reqwest::Url::parse("http://p:1").unwrap();
        assert_eq!(
            join(&base, &["reservations", "01a2-b_c", "confirm"]).as_str(),
            "http://p:1/reservations/01a2-b_c/confirm"
        );
    }
}
