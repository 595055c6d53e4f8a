//! product-service against its own OpenAPI document: every documented
//! route is served, and real answers (successes and every error) have the
//! documented status and shape. Also pagination and the docs page.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use axum::http::StatusCode;
use product_service::{AppState, app, open_db};
use service_kit::contract::Contract;
use service_kit::testing::{docs_page_is_self_contained, get_raw};

async fn fresh() -> (tempfile::TempDir, axum::Router) {
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(&dir.path().join("products.db")).await.unwrap();
    (dir, app(AppState::new(db)))
}

#[tokio::test]
async fn answers_match_the_document() {
    let (_dir, app) = fresh().await;
    let contract = Contract::of(&app).await;
    assert_eq!(
        contract.operations().len(),
        10,
        "{:?}",
        contract.operations()
    );
    contract.every_operation_is_routed().await;

    let laptop =
        r#"{"name":"Pad","description":"A pad","price":12.5,"stock":3,"category":"Stationery"}"#;
    let reserve = r#"{"id":"r-1","items":[{"product_id":1,"quantity":1}]}"#;
    let too_much = r#"{"id":"r-2","items":[{"product_id":1,"quantity":999999}]}"#;
    let unknown = r#"{"id":"r-3","items":[{"product_id":99,"quantity":1}]}"#;
    for (method, template, uri, body, expected) in [
        ("GET", "/products", "/products", None, StatusCode::OK),
        (
            "GET",
            "/products",
            "/products?category=electronics&limit=1",
            None,
            StatusCode::OK,
        ),
        (
            "GET",
            "/products",
            "/products?limit=5000",
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/products",
            "/products",
            Some(laptop),
            StatusCode::CREATED,
        ),
        (
            "POST",
            "/products",
            "/products",
            Some(r#"{"name":"x"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/products",
            "/products",
            Some(r#"{"name":"x","price":-1,"stock":1,"category":"c"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/products",
            "/products",
            Some("["),
            StatusCode::BAD_REQUEST,
        ),
        ("GET", "/products/{id}", "/products/1", None, StatusCode::OK),
        (
            "GET",
            "/products/{id}",
            "/products/99",
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            "GET",
            "/products/{id}",
            "/products/x",
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "PUT",
            "/products/{id}/stock",
            "/products/1/stock?stock_change=5",
            None,
            StatusCode::OK,
        ),
        (
            "PUT",
            "/products/{id}/stock",
            "/products/1/stock?stock_change=-99999",
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "PUT",
            "/products/{id}/stock",
            "/products/99/stock?stock_change=1",
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            "PUT",
            "/products/{id}/stock",
            "/products/1/stock",
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/reservations",
            "/reservations",
            Some(reserve),
            StatusCode::CREATED,
        ),
        (
            "POST",
            "/reservations",
            "/reservations",
            Some(reserve),
            StatusCode::OK,
        ),
        (
            "POST",
            "/reservations",
            "/reservations",
            Some(too_much),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/reservations",
            "/reservations",
            Some(unknown),
            StatusCode::NOT_FOUND,
        ),
        (
            "POST",
            "/reservations",
            "/reservations",
            Some(r#"{"items":[]}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "GET",
            "/reservations/{id}",
            "/reservations/r-1",
            None,
            StatusCode::OK,
        ),
        (
            "GET",
            "/reservations/{id}",
            "/reservations/nope",
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            "GET",
            "/reservations/{id}",
            "/reservations/bad%20id",
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/reservations/{id}/confirm",
            "/reservations/r-1/confirm",
            None,
            StatusCode::OK,
        ),
        (
            "POST",
            "/reservations/{id}/confirm",
            "/reservations/nope/confirm",
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            "POST",
            "/reservations/{id}/release",
            "/reservations/gone/release",
            None,
            StatusCode::OK,
        ),
        (
            "POST",
            "/reservations/{id}/confirm",
            "/reservations/gone/confirm",
            None,
            StatusCode::CONFLICT,
        ),
        (
            "POST",
            "/reservations",
            "/reservations",
            Some(r#"{"id":"gone","items":[{"product_id":1,"quantity":1}]}"#),
            StatusCode::CONFLICT,
        ),
        ("GET", "/health", "/health", None, StatusCode::OK),
    ] {
        let (status, answer) = contract.call(method, template, uri, body).await;
        assert_eq!(status, expected, "{method} {uri}: {answer}");
    }
}

#[tokio::test]
async fn lists_are_paginated_and_filters_stay_in_the_link() {
    let (_dir, app) = fresh().await;
    // A second Electronics product besides the seed's laptop.
    let (status, _) = service_kit::testing::call(
        &app,
        "POST",
        "/products",
        Some(r#"{"name":"Phone","price":499,"stock":5,"category":"electronics"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, headers, body) = get_raw(&app, "/products?limit=1&category=Electronics").await;
    assert_eq!(status, StatusCode::OK);
    let page: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
    assert_eq!(page.len(), 1);
    let link = headers["link"].to_str().unwrap();
    assert_eq!(
        link,
        format!(
            "<?category=Electronics&limit=1&after_id={}>; rel=\"next\"",
            page[0]["id"]
        )
    );
    let next = link.strip_prefix('<').unwrap().split_once('>').unwrap().0;
    let (_, headers, body) = get_raw(&app, &format!("/products{next}")).await;
    let page: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0]["name"], "Phone");
    assert!(
        headers.get("link").is_none(),
        "no third Electronics product"
    );
}

#[tokio::test]
async fn the_docs_page_works_offline() {
    let (_dir, app) = fresh().await;
    docs_page_is_self_contained(&app).await;
}

/// What the document admits and what the handlers admit are the same set.
/// Found by schemathesis: integer-valued floats (`5054.0`, JSON Schema's
/// integers too) were refused, and prices with more than two decimals
/// fitted a schema that did not say `multipleOf: 0.01`.
#[tokio::test]
async fn the_document_admits_exactly_what_the_handlers_take() {
    let (_dir, app) = fresh().await;
    let contract = Contract::of(&app).await;
    let product = |name: &str, price: &str, stock: &str| {
        format!(r#"{{"name":{name},"price":{price},"stock":{stock},"category":"C"}}"#)
    };
    let mut cases = Vec::new();
    for stock in [
        "5054",
        "5054.0",
        "1e2",
        "0",
        "-1",
        "1.5",
        "1000000000",
        "1000000000.0",
        "1000000001",
        "2e9",
    ] {
        cases.push(product(r#""P""#, "1.00", stock));
    }
    for price in [
        "0.07",
        "1.15",
        "1299.99",
        "1e2",
        "1.5e1",
        "0",
        "0.0",
        "10000000000",
        "1.1500000000000001",
        "0.005",
        "1e-7",
        "-0.01",
        "10000000000.01",
        "1e300",
    ] {
        cases.push(product(r#""P""#, price, "1"));
    }
    for name in [
        r#"" ""#,
        r#""\u0085""#,
        r#""\ufeff""#,
        r#"" x ""#,
        r#""\u3000""#,
        r#""\u200b""#,
    ] {
        cases.push(product(name, "1", "1"));
    }
    let (fitted, refused) = contract
        .admits_exactly_what_it_creates("POST", "/products", cases)
        .await;
    assert!(
        fitted > 8 && refused > 8,
        "{fitted} fitted, {refused} refused"
    );

    // A reservation line's quantity and product id, the same way.
    for (line, expected) in [
        (r#"{"product_id":1.0,"quantity":2.0}"#, StatusCode::CREATED),
        (
            r#"{"product_id":1,"quantity":1.5}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        let body = format!(r#"{{"items":[{line}]}}"#);
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            contract.request_fits("POST", "/reservations", &value),
            expected == StatusCode::CREATED
        );
        let (status, answer) = contract
            .call("POST", "/reservations", "/reservations", Some(&body))
            .await;
        assert_eq!(status, expected, "{body}: {answer}");
    }
}
