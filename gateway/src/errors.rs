//! Every answer the gateway gives on its own, decided in one place.
//!
//! Each phase of a request fails with a [`Failure`]: what went wrong
//! ([`GatewayError`]), whether the client connection must close after the
//! answer, and the Pingora error behind it if there is one (for the log).
//! [`GatewayError::answer`] is the only mapping from a failure to a status,
//! a JSON body `{"detail": ..., "request_id": ...}` and extra headers; an
//! error Pingora reported while proxying is classified by [`classify`].
//! `proxy::exchange` writes the answer.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use pingora::{Error, ErrorSource, ErrorType};

/// A response the gateway writes itself instead of proxying: a status, the
/// `detail` of its JSON body (none: an empty body, e.g. a `204`), and extra
/// header fields (`WWW-Authenticate`, `Retry-After`, ...). Plugins answer
/// with one too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: StatusCode,
    pub detail: Option<String>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Answer {
    /// An answer with `status`, an empty body and no extra fields.
    pub fn new(status: StatusCode) -> Self {
        Answer {
            status,
            detail: None,
            headers: Vec::new(),
        }
    }

    /// With a JSON body whose `detail` is `detail`.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// With one more header field (added, not replacing one of the same
    /// name).
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// No route's prefix matches the path.
    #[error("No route for this path")]
    NoRoute,
    /// The route's service has no instance in rotation.
    #[error("No healthy instance of {service}")]
    NoHealthyInstance { service: String },
    /// Every attempt to connect failed (refused, unreachable, reset).
    #[error("Could not connect to {service}")]
    ConnectFailed { service: String },
    /// The upstream did not connect, answer or accept data in time.
    #[error("{service} did not answer in time")]
    UpstreamTimeout { service: String },
    /// The upstream broke the exchange (reset, closed early, invalid HTTP).
    #[error("{service} failed to answer")]
    UpstreamFailed { service: String },
    /// The client sent something unusable.
    #[error("Bad request: {reason}")]
    BadRequest { reason: &'static str },
    /// The request body is over the route's limit.
    #[error("Request body larger than {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    /// The request header is over the gateway's limit.
    #[error("Request header larger than {limit} bytes")]
    HeaderTooLarge { limit: u64 },
    /// The client was too slow to send its request.
    #[error("Request timeout")]
    ClientTimeout,
    /// The client is gone (closed, reset): nobody is left to answer.
    #[error("Client closed the connection")]
    ClientGone,
    /// A plugin answered the request itself.
    #[error("answered by a plugin")]
    Plugin(Answer),
    /// A bug or an unexpected failure inside the gateway.
    #[error("Internal gateway error")]
    Internal,
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::NoRoute => StatusCode::NOT_FOUND,
            GatewayError::NoHealthyInstance { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::ConnectFailed { .. } | GatewayError::UpstreamFailed { .. } => {
                StatusCode::BAD_GATEWAY
            }
            GatewayError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            GatewayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::HeaderTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            GatewayError::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
            // Not sent; nginx's code for it, in logs.
            GatewayError::ClientGone => {
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
            }
            GatewayError::Plugin(answer) => answer.status,
            GatewayError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// What the client is told, or `None` if nobody is left to tell.
    pub fn answer(&self) -> Option<Answer> {
        match self {
            GatewayError::ClientGone => None,
            GatewayError::Plugin(answer) => Some(answer.clone()),
            other => Some(Answer::new(other.status()).with_detail(other.to_string())),
        }
    }
}

/// A request that cannot go on, from whichever phase.
#[derive(Debug)]
pub struct Failure {
    pub error: GatewayError,
    /// The client connection closes after the answer: its state is
    /// unknown (a body left unread, a broken exchange) or unwanted.
    pub close: bool,
    /// What Pingora reported, for the log; `None` for the gateway's own
    /// decisions.
    pub cause: Option<Box<Error>>,
}

impl Failure {
    /// Answered, and the connection may carry the client's next request.
    pub fn answer(error: GatewayError) -> Self {
        Failure {
            error,
            close: false,
            cause: None,
        }
    }

    /// Answered, then the connection closes.
    pub fn closing(error: GatewayError) -> Self {
        Failure {
            error,
            close: true,
            cause: None,
        }
    }

    /// An error Pingora reported while proxying to `service` on a route
    /// with `body_limit`; the connection closes after it.
    pub fn proxying(cause: Box<Error>, service: &str, body_limit: Option<u64>) -> Self {
        Failure {
            error: classify(&cause, service, body_limit),
            close: true,
            cause: Some(cause),
        }
    }
}

/// The error type of a request body over the route's limit, raised while
/// it streams (see [`classify`]).
pub const BODY_OVER_LIMIT: ErrorType = ErrorType::Custom("BodyOverLimit");

/// Classifies an error Pingora reported while proxying to `service`.
pub fn classify(error: &Error, service: &str, body_limit: Option<u64>) -> GatewayError {
    let service = service.to_owned();
    use ErrorType::*;
    match (error.esource(), error.etype()) {
        (_, etype) if *etype == BODY_OVER_LIMIT => GatewayError::PayloadTooLarge {
            limit: body_limit.unwrap_or_default(),
        },
        (ErrorSource::Upstream, ConnectTimedout | ReadTimedout | WriteTimedout) => {
            GatewayError::UpstreamTimeout { service }
        }
        (
            ErrorSource::Upstream,
            ConnectRefused | ConnectNoRoute | ConnectError | SocketError | BindError,
        ) => GatewayError::ConnectFailed { service },
        (ErrorSource::Upstream, _) => GatewayError::UpstreamFailed { service },
        (ErrorSource::Downstream, ReadError | WriteError | ConnectionClosed) => {
            GatewayError::ClientGone
        }
        (ErrorSource::Downstream, ReadTimedout) => GatewayError::ClientTimeout,
        (ErrorSource::Downstream, _) => GatewayError::BadRequest {
            reason: "malformed request",
        },
        (ErrorSource::Internal | ErrorSource::Unset, ConnectTimedout) => {
            GatewayError::UpstreamTimeout { service }
        }
        (ErrorSource::Internal | ErrorSource::Unset, _) => GatewayError::Internal,
    }
}

/// The JSON body of a gateway answer.
pub fn json_body(detail: &str, request_id: &str) -> Bytes {
    let body = serde_json::json!({ "detail": detail, "request_id": request_id });
    Bytes::from(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classified(source: ErrorSource, etype: ErrorType) -> Option<u16> {
        let mut error = Error::new(etype);
        error.esource = source;
        classify(&error, "svc", Some(10))
            .answer()
            .map(|answer| answer.status.as_u16())
    }

    #[test]
    fn proxy_errors_map_to_the_documented_statuses() {
        use ErrorSource::*;
        use ErrorType::*;
        assert_eq!(classified(Upstream, ConnectRefused), Some(502));
        assert_eq!(classified(Upstream, ConnectTimedout), Some(504));
        assert_eq!(classified(Upstream, ReadTimedout), Some(504));
        assert_eq!(classified(Upstream, ConnectionClosed), Some(502));
        assert_eq!(classified(Upstream, H1Error), Some(502));
        assert_eq!(classified(Downstream, ConnectionClosed), None);
        assert_eq!(classified(Downstream, InvalidHTTPHeader), Some(400));
        assert_eq!(classified(Downstream, BODY_OVER_LIMIT), Some(413));
        assert_eq!(classified(Internal, InternalError), Some(500));
    }

    #[test]
    fn an_answer_carries_status_detail_and_headers() {
        let failure = Failure::answer(GatewayError::NoHealthyInstance {
            service: "users".into(),
        });
        assert!(!failure.close);
        let answer = failure.error.answer().unwrap();
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            answer.detail.as_deref(),
            Some("No healthy instance of users")
        );
        let plugin = Answer::new(StatusCode::TOO_MANY_REQUESTS)
            .with_detail("slow down")
            .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        let error = GatewayError::Plugin(plugin.clone());
        assert_eq!(error.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(error.answer(), Some(plugin));
    }

    #[test]
    fn body_is_json_with_detail_and_request_id() {
        let body = json_body("No \"route\"", "abc");
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"detail": "No \"route\"", "request_id": "abc"})
        );
    }
}
