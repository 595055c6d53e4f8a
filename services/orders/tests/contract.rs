//! order-service against its own OpenAPI document, with real user- and
//! product-services behind it: every documented route is served, and real
//! answers (successes and every error) have the documented status and
//! shape. Also pagination and the docs page.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use axum::http::StatusCode;
use order_service::{AppState, Dependencies};
use service_kit::contract::Contract;
use service_kit::serve::spawn_local;
use service_kit::testing::{docs_page_is_self_contained, get_raw};

async fn fresh() -> (tempfile::TempDir, axum::Router) {
    let dir = tempfile::tempdir().unwrap();
    let users_db = user_service::open_db(&dir.path().join("users.db"))
        .await
        .unwrap();
    let users = spawn_local(user_service::app(user_service::AppState { db: users_db }))
        .await
        .unwrap();
    let products_db = product_service::open_db(&dir.path().join("products.db"))
        .await
        .unwrap();
    let products = spawn_local(product_service::app(product_service::AppState::new(
        products_db,
    )))
    .await
    .unwrap();
    reqwest::Client::new()
        .post(format!("http://{users}/users"))
        .body(r#"{"username":"john_doe","email":"john@example.com","full_name":"John Doe"}"#)
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    let db = order_service::open_db(&dir.path().join("orders.db"))
        .await
        .unwrap();
    let deps =
        Dependencies::new(&format!("http://{users}"), &format!("http://{products}")).unwrap();
    (dir, order_service::app(AppState::new(db, deps)))
}

#[tokio::test]
async fn answers_match_the_document() {
    let (_dir, app) = fresh().await;
    let contract = Contract::of(&app).await;
    assert_eq!(
        contract.operations().len(),
        6,
        "{:?}",
        contract.operations()
    );
    contract.every_operation_is_routed().await;

    let order =
        r#"{"user_id":1,"items":[{"product_id":1,"quantity":2},{"product_id":2,"quantity":1}]}"#;
    for (method, template, uri, body, expected) in [
        (
            "POST",
            "/orders",
            "/orders",
            Some(order),
            StatusCode::CREATED,
        ),
        (
            "POST",
            "/orders",
            "/orders",
            Some(r#"{"user_id":9,"items":[{"product_id":1,"quantity":1}]}"#),
            StatusCode::NOT_FOUND,
        ),
        (
            "POST",
            "/orders",
            "/orders",
            Some(r#"{"user_id":1,"items":[{"product_id":99,"quantity":1}]}"#),
            StatusCode::NOT_FOUND,
        ),
        (
            "POST",
            "/orders",
            "/orders",
            Some(r#"{"user_id":1,"items":[{"product_id":1,"quantity":9999}]}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/orders",
            "/orders",
            Some(r#"{"user_id":1,"items":[]}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/orders",
            "/orders",
            Some(r#"{"user_id":1,"items":[{"product_id":1,"quantity":0}]}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/orders",
            "/orders",
            Some("nope"),
            StatusCode::BAD_REQUEST,
        ),
        ("GET", "/orders", "/orders", None, StatusCode::OK),
        (
            "GET",
            "/orders",
            "/orders?status=all&user_id=1&limit=10",
            None,
            StatusCode::OK,
        ),
        (
            "GET",
            "/orders",
            "/orders?status=bogus",
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "GET",
            "/orders",
            "/orders?limit=-1",
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        ("GET", "/orders/{id}", "/orders/1", None, StatusCode::OK),
        (
            "GET",
            "/orders/{id}",
            "/orders/99",
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            "GET",
            "/orders/{id}",
            "/orders/one",
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/orders/{id}/cancel",
            "/orders/99/cancel",
            None,
            StatusCode::NOT_FOUND,
        ),
        ("GET", "/health", "/health", None, StatusCode::OK),
    ] {
        let (status, answer) = contract.call(method, template, uri, body).await;
        assert_eq!(status, expected, "{method} {uri}: {answer}");
    }
    let (status, answer) = contract
        .call("POST", "/orders/{id}/cancel", "/orders/1/cancel", None)
        .await;
    assert!(
        status == StatusCode::OK || status == StatusCode::ACCEPTED,
        "{status} {answer}"
    );
}

#[tokio::test]
async fn lists_are_paginated() {
    let (_dir, app) = fresh().await;
    for _ in 0..3 {
        let (status, _) = service_kit::testing::call(
            &app,
            "POST",
            "/orders",
            Some(r#"{"user_id":1,"items":[{"product_id":3,"quantity":1}]}"#),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let (_, headers, body) = get_raw(&app, "/orders?limit=2").await;
    let page: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
    assert_eq!(page.len(), 2);
    assert_eq!(page[1]["items"][0]["product_id"], 3, "lines come along");
    assert_eq!(
        headers["link"],
        format!("<?limit=2&after_id={}>; rel=\"next\"", page[1]["id"])
    );
    let (_, headers, body) =
        get_raw(&app, &format!("/orders?limit=2&after_id={}", page[1]["id"])).await;
    let last: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!(last[0]["items"].as_array().unwrap().len(), 1);
    assert!(headers.get("link").is_none());
}

#[tokio::test]
async fn the_docs_page_works_offline() {
    let (_dir, app) = fresh().await;
    docs_page_is_self_contained(&app).await;
}
