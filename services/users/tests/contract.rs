//! user-service against its own OpenAPI document: every documented route
//! is served, and real answers (successes and every error) have the
//! documented status and shape. Also pagination and the docs page.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use axum::http::StatusCode;
use service_kit::contract::Contract;
use service_kit::testing::{docs_page_is_self_contained, get_raw};
use user_service::{AppState, app, open_db};

#[tokio::test]
async fn answers_match_the_document() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(AppState {
        db: open_db(&dir.path().join("users.db")).await.unwrap(),
    });
    let contract = Contract::of(&app).await;
    let mut documented = contract.operations();
    documented.sort();
    assert_eq!(
        documented,
        [
            ("/health", "get"),
            ("/metrics", "get"),
            ("/users", "get"),
            ("/users", "post"),
            ("/users/{id}", "get"),
        ]
        .map(|(p, m)| (p.to_owned(), m.to_owned()))
    );
    contract.every_operation_is_routed().await;
    assert_eq!(
        contract.document["tags"][0]["name"], "users",
        "tags per resource"
    );

    let john = r#"{"username":"john_doe","email":"john@example.com","full_name":"John Doe"}"#;
    for (method, template, uri, body, expected) in [
        ("POST", "/users", "/users", Some(john), StatusCode::CREATED),
        ("POST", "/users", "/users", Some(john), StatusCode::CONFLICT),
        (
            "POST",
            "/users",
            "/users",
            Some(r#"{"username":"","email":"a@b.c","full_name":"A"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/users",
            "/users",
            Some(r#"{"username":"x"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/users",
            "/users",
            Some("{not json"),
            StatusCode::BAD_REQUEST,
        ),
        ("GET", "/users", "/users", None, StatusCode::OK),
        (
            "GET",
            "/users",
            "/users?limit=0",
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "GET",
            "/users",
            "/users?after_id=x",
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        ("GET", "/users/{id}", "/users/1", None, StatusCode::OK),
        (
            "GET",
            "/users/{id}",
            "/users/99",
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            "GET",
            "/users/{id}",
            "/users/abc",
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        ("GET", "/health", "/health", None, StatusCode::OK),
    ] {
        let (status, answer) = contract.call(method, template, uri, body).await;
        assert_eq!(status, expected, "{method} {uri}: {answer}");
    }
}

#[tokio::test]
async fn lists_are_paginated_with_a_link_to_the_next_page() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(AppState {
        db: open_db(&dir.path().join("users.db")).await.unwrap(),
    });
    for n in 0..5 {
        let body =
            format!(r#"{{"username":"u{n}","email":"u{n}@example.com","full_name":"U {n}"}}"#);
        let (status, _) = service_kit::testing::call(&app, "POST", "/users", Some(&body)).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let mut uri = "/users?limit=2".to_owned();
    let mut seen = Vec::new();
    for _ in 0..5 {
        let (status, headers, body) = get_raw(&app, &uri).await;
        assert_eq!(status, StatusCode::OK);
        let page: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
        assert!(page.len() <= 2);
        seen.extend(page.iter().map(|u| u["id"].as_i64().unwrap()));
        let Some(link) = headers.get("link") else {
            break;
        };
        let link = link.to_str().unwrap();
        let next = link
            .strip_prefix("<")
            .and_then(|l| l.split_once(">; rel=\"next\""))
            .unwrap()
            .0;
        uri = format!("/users{next}");
    }
    assert_eq!(seen, [1, 2, 3, 4, 5], "every user once, in id order");
    // The last page has no link; a page that fits has none either.
    let (_, headers, _) = get_raw(&app, "/users?limit=5").await;
    assert!(headers.get("link").is_none());
    let (_, headers, body) = get_raw(&app, "/users?after_id=3").await;
    assert!(headers.get("link").is_none());
    let page: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
    assert_eq!(page.len(), 2);
    // 1000 is the most a page may hold.
    assert_eq!(get_raw(&app, "/users?limit=1000").await.0, StatusCode::OK);
    assert_eq!(
        get_raw(&app, "/users?limit=1001").await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
}

#[tokio::test]
async fn the_docs_page_works_offline() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(AppState {
        db: open_db(&dir.path().join("users.db")).await.unwrap(),
    });
    docs_page_is_self_contained(&app).await;
}
