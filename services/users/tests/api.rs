//! user-service through its router: the contract, every error case, and
//! persistence across a restart on the same file.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use axum::http::StatusCode;
use serde_json::{Value, json};
use service_kit::testing::call;
use user_service::{AppState, app, open_db};

async fn fresh() -> (tempfile::TempDir, axum::Router) {
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(&dir.path().join("users.db")).await.unwrap();
    (dir, app(AppState { db }))
}

const JOHN: &str = r#"{"username":"john_doe","email":"john@example.com","full_name":"John Doe"}"#;

#[tokio::test]
async fn create_then_read_back() {
    let (_dir, app) = fresh().await;
    let (status, user) = call(&app, "POST", "/users", Some(JOHN)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        user,
        json!({"id": 1, "username": "john_doe", "email": "john@example.com", "full_name": "John Doe", "is_active": true})
    );
    let (status, got) = call(&app, "GET", "/users/1", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got, user);
    let (status, all) = call(&app, "GET", "/users", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(all, json!([user]));
}

#[tokio::test]
async fn duplicates_are_409_with_the_field_named() {
    let (_dir, app) = fresh().await;
    assert_eq!(
        call(&app, "POST", "/users", Some(JOHN)).await.0,
        StatusCode::CREATED
    );
    let same_name = r#"{"username":"john_doe","email":"other@example.com","full_name":"J"}"#;
    let (status, body) = call(&app, "POST", "/users", Some(same_name)).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::CONFLICT,
            json!({"detail": "Username already exists"})
        )
    );
    // E-mail addresses are compared without regard to case.
    let same_mail = r#"{"username":"jd2","email":"JOHN@example.com","full_name":"J"}"#;
    let (status, body) = call(&app, "POST", "/users", Some(same_mail)).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::CONFLICT,
            json!({"detail": "Email already exists"})
        )
    );
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_never_a_500() {
    let (_dir, app) = fresh().await;
    let cases: &[(&str, &str, Option<&str>, StatusCode)] = &[
        ("POST", "/users", Some("{not json"), StatusCode::BAD_REQUEST),
        ("POST", "/users", Some(""), StatusCode::BAD_REQUEST),
        (
            "POST",
            "/users",
            Some(r#"{"username":"a"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/users",
            Some(r#"{"username":1,"email":"a@b.c","full_name":"x"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/users",
            Some(r#"{"username":"","email":"a@b.c","full_name":"x"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/users",
            Some(r#"{"username":"has space","email":"a@b.c","full_name":"x"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/users",
            Some(r#"{"username":"a","email":"not-an-email","full_name":"x"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/users",
            Some(r#"{"username":"a","email":"a@b.c","full_name":"  "}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        ("GET", "/users/abc", None, StatusCode::UNPROCESSABLE_ENTITY),
        (
            "GET",
            "/users/99999999999999999999",
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        ("GET", "/users/42", None, StatusCode::NOT_FOUND),
        ("GET", "/nowhere", None, StatusCode::NOT_FOUND),
        ("DELETE", "/users", None, StatusCode::METHOD_NOT_ALLOWED),
    ];
    for (method, uri, body, expected) in cases {
        let (status, json) = call(&app, method, uri, *body).await;
        assert_eq!(status, *expected, "{method} {uri} {body:?} -> {json}");
        assert!(
            json["detail"].is_string(),
            "{method} {uri}: no detail in {json}"
        );
    }
    let (_, json) = call(&app, "GET", "/users/42", None).await;
    assert_eq!(json, json!({"detail": "User not found"}));
}

#[tokio::test]
async fn oversized_body_is_413() {
    let (_dir, app) = fresh().await;
    let big = format!(
        r#"{{"username":"a","email":"a@b.c","full_name":"{}"}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    let (status, json) = call(&app, "POST", "/users", Some(&big)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{json}");
}

#[tokio::test]
async fn health_reports_the_service() {
    let (_dir, app) = fresh().await;
    let (status, json) = call(&app, "GET", "/health", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        json,
        json!({"service": "user-service", "status": "healthy", "version": "1.0.0"})
    );
}

#[tokio::test]
async fn data_survives_a_restart_on_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("users.db");
    let db = open_db(&path).await.unwrap();
    let (status, created) = call(
        &app(AppState { db: db.clone() }),
        "POST",
        "/users",
        Some(JOHN),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    db.close().await;

    let db = open_db(&path).await.unwrap();
    let (status, users) = call(&app(AppState { db }), "GET", "/users", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(users, Value::Array(vec![created]));
}
