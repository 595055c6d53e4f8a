//! Extractors whose rejections are [`AppError`]s, so that bad input always
//! gets a JSON `{"detail": ...}` with the right status, never axum's
//! plain-text default and never a 500.
//!
//! - [`Json`]: 400 for a body that is not JSON (syntax error, empty, cut
//!   short), 422 for JSON of the wrong shape (missing or mistyped field),
//!   413 for a body over the router's `DefaultBodyLimit`. The content type is
//!   not required: a client that forgot the header still gets its body read.
//! - [`Path`] and [`Query`]: 422 for a parameter that does not parse
//!   (e.g. `/users/abc`), as the original FastAPI services answered.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::AppError;

/// A JSON request body (as an extractor) or response body.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                AppError::new(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large")
            } else {
                AppError::bad_request(format!("Could not read request body: {rejection}"))
            }
        })?;
        parse_json(&bytes).map(Json)
    }
}

/// Parses a JSON body, classifying the failure as 400 (not JSON) or 422
/// (JSON, but not what the endpoint expects).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AppError> {
    serde_json::from_slice(bytes).map_err(|err| {
        use serde_json::error::Category;
        match err.classify() {
            Category::Data => AppError::unprocessable(format!("Invalid request body: {err}")),
            Category::Syntax | Category::Eof | Category::Io => {
                AppError::bad_request(format!("Malformed JSON: {err}"))
            }
        }
    })
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// Path parameters; a value that does not parse is a 422.
#[derive(Debug, Clone, Copy)]
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| Path(value))
            .map_err(|rejection| {
                AppError::unprocessable(format!(
                    "Invalid path parameter: {}",
                    rejection.body_text()
                ))
            })
    }
}

/// Query-string parameters; a missing or unparsable one is a 422.
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| Query(value))
            .map_err(|rejection| {
                AppError::unprocessable(format!("Invalid query string: {}", rejection.body_text()))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        count: u32,
    }

    #[test]
    fn malformed_json_is_400_and_wrong_shape_is_422() {
        let status = |bytes: &[u8]| parse_json::<Body>(bytes).unwrap_err().status();
        assert_eq!(status(b"{not json"), StatusCode::BAD_REQUEST);
        assert_eq!(status(b""), StatusCode::BAD_REQUEST);
        assert_eq!(status(b"{\"name\": \"x\""), StatusCode::BAD_REQUEST);
        assert_eq!(
            status(b"{\"name\": \"x\"}"),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            status(b"{\"name\": \"x\", \"count\": -1}"),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert!(parse_json::<Body>(b"{\"name\": \"x\", \"count\": 1}").is_ok());
    }
}
