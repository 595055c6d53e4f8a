//! product-service through its router and over real sockets: the seed, the
//! contract, every error case, atomic stock changes and reservations.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use axum::http::StatusCode;
use product_service::{AppState, app, open_db};
use serde_json::{Value, json};
use service_kit::testing::call;

async fn fresh() -> (tempfile::TempDir, axum::Router) {
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(&dir.path().join("products.db")).await.unwrap();
    (dir, app(AppState::new(db)))
}

async fn stock_of(app: &axum::Router, id: i64) -> i64 {
    let (status, product) = call(app, "GET", &format!("/products/{id}"), None).await;
    assert_eq!(status, StatusCode::OK);
    product["stock"].as_i64().unwrap()
}

#[tokio::test]
async fn an_empty_database_is_seeded_with_the_catalogue() {
    let (_dir, app) = fresh().await;
    let (status, products) = call(&app, "GET", "/products", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        products,
        json!([
            {"id": 1, "name": "Laptop", "description": "High-performance laptop", "price": 1299.99, "stock": 10, "category": "Electronics"},
            {"id": 2, "name": "Coffee Mug", "description": "Ceramic coffee mug", "price": 12.99, "stock": 50, "category": "Kitchenware"},
            {"id": 3, "name": "Book", "description": "Programming book", "price": 39.99, "stock": 25, "category": "Books"},
        ])
    );
}

#[tokio::test]
async fn category_filter_ignores_case() {
    let (_dir, app) = fresh().await;
    let (status, products) = call(&app, "GET", "/products?category=electronics", None).await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = products
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Laptop"]);
    let (_, none) = call(&app, "GET", "/products?category=toys", None).await;
    assert_eq!(none, json!([]));
}

#[tokio::test]
async fn create_keeps_money_exact() {
    let (_dir, app) = fresh().await;
    let body = r#"{"name":"Pen","price":1.1,"stock":3,"category":"Office"}"#;
    let (status, raw) = call(&app, "POST", "/products", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(raw["id"], 4);
    assert_eq!(raw["description"], Value::Null);
    // Exactly 1.10, written with two decimals.
    let request = axum::http::Request::get("/products/4")
        .body(axum::body::Body::empty())
        .unwrap();
    let response = tower::ServiceExt::oneshot(app.clone(), request)
        .await
        .unwrap();
    let bytes = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert!(
        String::from_utf8_lossy(&bytes).contains(r#""price":1.10"#),
        "{bytes:?}"
    );
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_never_a_500() {
    let (_dir, app) = fresh().await;
    let product = |fields: &str| format!(r#"{{"name":"Pen","category":"Office",{fields}}}"#);
    let cases: Vec<(&str, String, Option<String>, StatusCode)> = vec![
        (
            "POST",
            "/products".into(),
            Some("{oops".into()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/products".into(),
            Some(product(r#""price":1"#)),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/products".into(),
            Some(product(r#""price":-1,"stock":1"#)),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/products".into(),
            Some(product(r#""price":1.001,"stock":1"#)),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/products".into(),
            Some(product(r#""price":"1.00","stock":1"#)),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/products".into(),
            Some(product(r#""price":1,"stock":-1"#)),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/products".into(),
            Some(product(r#""price":1,"stock":1.5"#)),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/products".into(),
            Some(r#"{"name":" ","price":1,"stock":1,"category":"x"}"#.into()),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "GET",
            "/products/abc".into(),
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        ("GET", "/products/99".into(), None, StatusCode::NOT_FOUND),
        (
            "PUT",
            "/products/1/stock?stock_change=abc".into(),
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "PUT",
            "/products/1/stock".into(),
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "PUT",
            "/products/99/stock?stock_change=1".into(),
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            "PUT",
            "/products/1/stock?stock_change=-11".into(),
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "PUT",
            "/products/1/stock?stock_change=9223372036854775807".into(),
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/reservations".into(),
            Some(r#"{"items":[]}"#.into()),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/reservations".into(),
            Some(r#"{"items":[{"product_id":1,"quantity":0}]}"#.into()),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/reservations".into(),
            Some(r#"{"items":[{"product_id":1,"quantity":-2}]}"#.into()),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/reservations".into(),
            Some(r#"{"id":"no spaces","items":[{"product_id":1,"quantity":1}]}"#.into()),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ];
    for (method, uri, body, expected) in &cases {
        let (status, json) = call(&app, method, uri, body.as_deref()).await;
        assert_eq!(status, *expected, "{method} {uri} {body:?} -> {json}");
        assert!(
            json["detail"].is_string(),
            "{method} {uri}: no detail in {json}"
        );
    }
    let (_, json) = call(&app, "PUT", "/products/1/stock?stock_change=-11", None).await;
    assert_eq!(json, json!({"detail": "Insufficient stock"}));
    assert_eq!(
        stock_of(&app, 1).await,
        10,
        "failed changes changed nothing"
    );
}

#[tokio::test]
async fn stock_change_answers_the_new_stock() {
    let (_dir, app) = fresh().await;
    let (status, json) = call(&app, "PUT", "/products/1/stock?stock_change=-2", None).await;
    assert_eq!(
        (status, json),
        (StatusCode::OK, json!({"product_id": 1, "new_stock": 8}))
    );
    let (status, json) = call(&app, "PUT", "/products/1/stock?stock_change=-8", None).await;
    assert_eq!(
        (status, json),
        (StatusCode::OK, json!({"product_id": 1, "new_stock": 0}))
    );
}

#[tokio::test]
async fn reservation_is_all_or_nothing_and_release_is_idempotent() {
    let (_dir, app) = fresh().await;
    // Product 1 has 10, product 3 has 25: asking 26 of product 3 fails and
    // must not keep the 2 of product 1 taken earlier in the same call.
    let too_much = r#"{"items":[{"product_id":1,"quantity":2},{"product_id":3,"quantity":26}]}"#;
    let (status, json) = call(&app, "POST", "/reservations", Some(too_much)).await;
    assert_eq!(
        (status, json),
        (
            StatusCode::BAD_REQUEST,
            json!({"detail": "Insufficient stock for product 3"})
        )
    );
    let unknown = r#"{"items":[{"product_id":1,"quantity":2},{"product_id":77,"quantity":1}]}"#;
    let (status, json) = call(&app, "POST", "/reservations", Some(unknown)).await;
    assert_eq!(
        (status, json),
        (
            StatusCode::NOT_FOUND,
            json!({"detail": "Product 77 not found"})
        )
    );
    assert_eq!(stock_of(&app, 1).await, 10);

    // Duplicate lines are merged; a retry with the same id reserves nothing more.
    let ok = r#"{"id":"order-a","items":[{"product_id":1,"quantity":1},{"product_id":3,"quantity":2},{"product_id":1,"quantity":1}]}"#;
    let (status, held) = call(&app, "POST", "/reservations", Some(ok)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        held,
        json!({"id": "order-a", "status": "held", "items": [
            {"product_id": 1, "quantity": 2, "price": 1299.99},
            {"product_id": 3, "quantity": 2, "price": 39.99},
        ]})
    );
    let (status, again) = call(&app, "POST", "/reservations", Some(ok)).await;
    assert_eq!((status, &again), (StatusCode::OK, &held));
    assert_eq!((stock_of(&app, 1).await, stock_of(&app, 3).await), (8, 23));

    for _ in 0..2 {
        let (status, released) = call(&app, "POST", "/reservations/order-a/release", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(released["status"], "released");
    }
    assert_eq!((stock_of(&app, 1).await, stock_of(&app, 3).await), (10, 25));
    // A released id cannot be reserved again.
    let (status, _) = call(&app, "POST", "/reservations", Some(ok)).await;
    assert_eq!(status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn a_release_that_overtakes_its_reserve_blocks_it() {
    let (_dir, app) = fresh().await;
    let (status, released) = call(&app, "POST", "/reservations/late/release", None).await;
    assert_eq!(
        (status, released["items"].clone()),
        (StatusCode::OK, json!([]))
    );
    let late = r#"{"id":"late","items":[{"product_id":1,"quantity":1}]}"#;
    let (status, _) = call(&app, "POST", "/reservations", Some(late)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(stock_of(&app, 1).await, 10);
}

/// Many clients over real connections change the same stock at once: every
/// change counts, none is lost, and stock never goes below zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_stock_changes_lose_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(&dir.path().join("products.db")).await.unwrap();
    let addr = service_kit::serve::spawn_local(app(AppState::new(db)))
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let url = |change: i64| format!("http://{addr}/products/3/stock?stock_change={change}");

    // 40 increments and 40 decrements of 1 on stock 25: ends at 25.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..80 {
        let (client, url) = (client.clone(), url(if i % 2 == 0 { 1 } else { -1 }));
        tasks.spawn(async move { client.put(url).send().await.unwrap().status() });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
    // 40 decrements of 1 on stock 25: exactly 25 succeed, stock ends at 0.
    for _ in 0..40 {
        let (client, url) = (client.clone(), url(-1));
        tasks.spawn(async move { client.put(url).send().await.unwrap().status() });
    }
    let (mut ok, mut refused) = (0, 0);
    while let Some(status) = tasks.join_next().await {
        match status.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::BAD_REQUEST => refused += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ok, refused), (25, 15));
    let product: Value = client
        .get(format!("http://{addr}/products/3"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(product["stock"], 0);
}
