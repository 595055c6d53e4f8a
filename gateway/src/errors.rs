//! Every answer the gateway gives on its own, decided in one place.
//!
//! [`GatewayError`] names what went wrong; [`GatewayError::status`] is the
//! only mapping to a status code, and [`respond`] the only writer of the
//! JSON body `{"detail": ..., "request_id": ...}`. Errors Pingora reports
//! while proxying are classified by [`GatewayError::from_proxy_error`].

use bytes::Bytes;
use http::StatusCode;
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::{Error, ErrorSource, ErrorType};

use crate::forwarding::{REQUEST_ID, RequestId};

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
    /// A plugin refused the request.
    #[error("{detail}")]
    Rejected { status: StatusCode, detail: String },
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
            GatewayError::Rejected { status, .. } => *status,
            GatewayError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Classifies an error Pingora reported while proxying to `service`.
    /// `None` when the client is gone and nobody is left to answer.
    pub fn from_proxy_error(error: &Error, service: &str) -> Option<GatewayError> {
        let service = service.to_owned();
        use ErrorType::*;
        match (error.esource(), error.etype()) {
            (_, HTTPStatus(code)) => Some(GatewayError::Rejected {
                status: StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                detail: StatusCode::from_u16(*code)
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .unwrap_or("Error")
                    .to_owned(),
            }),
            (ErrorSource::Upstream, ConnectTimedout | ReadTimedout | WriteTimedout) => {
                Some(GatewayError::UpstreamTimeout { service })
            }
            (
                ErrorSource::Upstream,
                ConnectRefused | ConnectNoRoute | ConnectError | SocketError | BindError,
            ) => Some(GatewayError::ConnectFailed { service }),
            (ErrorSource::Upstream, _) => Some(GatewayError::UpstreamFailed { service }),
            (ErrorSource::Downstream, ReadError | WriteError | ConnectionClosed) => None,
            (ErrorSource::Downstream, ReadTimedout) => Some(GatewayError::ClientTimeout),
            (ErrorSource::Downstream, _) => Some(GatewayError::BadRequest {
                reason: "malformed request",
            }),
            (ErrorSource::Internal | ErrorSource::Unset, ConnectTimedout) => {
                Some(GatewayError::UpstreamTimeout { service })
            }
            (ErrorSource::Internal | ErrorSource::Unset, _) => Some(GatewayError::Internal),
        }
    }
}

/// The JSON body of a gateway answer.
pub fn json_body(detail: &str, request_id: &str) -> Bytes {
    let body = serde_json::json!({ "detail": detail, "request_id": request_id });
    Bytes::from(body.to_string())
}

fn json_header(
    status: StatusCode,
    body: &Bytes,
    request_id: &RequestId,
) -> pingora::Result<ResponseHeader> {
    let mut header = ResponseHeader::build(status, Some(4))?;
    header.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    header.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    header.insert_header(http::header::CACHE_CONTROL, "no-store")?;
    header.insert_header(REQUEST_ID, request_id.header())?;
    Ok(header)
}

/// Writes a complete JSON answer (header and body) to the client.
pub async fn respond_json(
    session: &mut ServerSession,
    status: StatusCode,
    body: Bytes,
    request_id: &RequestId,
) -> pingora::Result<()> {
    let header = json_header(status, &body, request_id)?;
    if crate::shutdown::draining() {
        session.set_keepalive(None);
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    session.write_response_header(Box::new(header)).await?;
    if head_only {
        session.finish_body().await
    } else {
        session.write_response_body(body, true).await
    }
}

/// Answers the client with `error`.
pub async fn respond(
    session: &mut ServerSession,
    error: &GatewayError,
    request_id: &RequestId,
) -> pingora::Result<()> {
    let body = json_body(&error.to_string(), request_id.as_str());
    respond_json(session, error.status(), body, request_id).await
}

/// Answers a request whose header could not be parsed (there is no
/// request to look at), then the connection closes.
pub async fn respond_unparsed(
    session: &mut ServerSession,
    error: &GatewayError,
    request_id: &RequestId,
) -> pingora::Result<()> {
    let body = json_body(&error.to_string(), request_id.as_str());
    let header = json_header(error.status(), &body, request_id)?;
    session.write_error_response(header, body).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(source: ErrorSource, etype: ErrorType) -> Option<u16> {
        let mut error = Error::new(etype);
        error.esource = source;
        GatewayError::from_proxy_error(&error, "svc").map(|e| e.status().as_u16())
    }

    #[test]
    fn proxy_errors_map_to_the_documented_statuses() {
        use ErrorSource::*;
        use ErrorType::*;
        assert_eq!(classify(Upstream, ConnectRefused), Some(502));
        assert_eq!(classify(Upstream, ConnectTimedout), Some(504));
        assert_eq!(classify(Upstream, ReadTimedout), Some(504));
        assert_eq!(classify(Upstream, ConnectionClosed), Some(502));
        assert_eq!(classify(Upstream, H1Error), Some(502));
        assert_eq!(classify(Downstream, ConnectionClosed), None);
        assert_eq!(classify(Downstream, InvalidHTTPHeader), Some(400));
        assert_eq!(classify(Internal, HTTPStatus(503)), Some(503));
        assert_eq!(classify(Internal, InternalError), Some(500));
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
