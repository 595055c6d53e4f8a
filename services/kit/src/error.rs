//! The error type of every handler, and the one place that maps it to HTTP.
//!
//! Client-facing failures carry their own `detail`; internal failures are
//! logged with their cause and reach the client only as a generic 500, so no
//! SQL or file path ever leaks out.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Result alias used by handlers.
pub type AppResult<T> = Result<T, AppError>;

/// A failure a handler reports. Its status and detail are decided where it is
/// created; [`IntoResponse`] renders it as `{"detail": ...}`.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A failure the client caused or must know about: sent as is.
    #[error("{status}: {detail}")]
    Client { status: StatusCode, detail: String },
    /// A bug or an infrastructure failure: logged, answered with a generic 500.
    #[error("internal error: {0}")]
    Internal(String),
}

impl AppError {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Self::Client {
            status,
            detail: detail.into(),
        }
    }
    /// 400: the request could not be read (malformed JSON, bad query string).
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, detail)
    }
    /// 404: the addressed resource does not exist.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, detail)
    }
    /// 409: the request conflicts with existing data.
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, detail)
    }
    /// 422: the request was well-formed but a field is missing or invalid.
    pub fn unprocessable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, detail)
    }
    /// 503: a dependency (another service, the database) is unavailable.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, detail)
    }
    /// 500 with the cause kept for the log only.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        Self::Internal(cause.to_string())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Client { status, .. } => *status,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<crate::db::Error> for AppError {
    fn from(err: crate::db::Error) -> Self {
        // A database that cannot serve now (closed, locked by another
        // process past the busy timeout) is unavailable, not a bug.
        if err.is_unavailable() {
            tracing::error!(error = %err, "database unavailable");
            Self::unavailable("Database unavailable")
        } else {
            Self::internal(format!("database: {err}"))
        }
    }
}

impl From<rusqlite::Error> for AppError {
    fn from(err: rusqlite::Error) -> Self {
        crate::db::Error::from(err).into()
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        let detail = match self {
            Self::Client { detail, .. } => detail,
            Self::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                "Internal server error".to_owned()
            }
        };
        (status, Json(json!({ "detail": detail }))).into_response()
    }
}
