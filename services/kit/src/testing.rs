//! Helpers for the services' tests: call a router in-process and read the
//! JSON answer. Compiled into the kit (it needs nothing axum does not
//! already bring) so every service's tests share one copy.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

/// Sends one request to `app` without a socket and returns the status and
/// the body parsed as JSON (`Value::Null` for an empty body). Panics if the
/// body is not JSON: every answer of these services must be.
pub async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    body: Option<&str>,
) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(uri);
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
        .expect("valid test request");
    let response = app
        .clone()
        .oneshot(request)
        .await
        .expect("router is infallible");
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body readable")
        .to_bytes();
    let json = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|err| {
            panic!(
                "{method} {uri}: body is not JSON ({err}): {}",
                String::from_utf8_lossy(&bytes)
            )
        })
    };
    (status, json)
}
