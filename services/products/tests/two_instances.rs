//! Two product-service processes on one SQLite file, as the local stack runs
//! them: the seed goes in once, and concurrent reservations split across
//! both never oversell and never fail with `database is locked`.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use axum::http::StatusCode;
use serde_json::{Value, json};
use service_kit::testing::ChildService;

const BINARY: &str = env!("CARGO_BIN_EXE_product-service");

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_share_one_database_safely() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("products.db");
    let args = ["--listen", "127.0.0.1:0", "--db", db.to_str().unwrap()];
    // Started together on a file that does not exist yet.
    let (a, b) = tokio::join!(
        ChildService::start(BINARY, &args),
        ChildService::start(BINARY, &args)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let client = reqwest::Client::new();

    let products: Vec<Value> = client
        .get(format!("http://{}/products", a.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(products.len(), 3, "seeded exactly once: {products:?}");

    // Product 1 (Laptop) has 10. 40 reservations of 1, alternating between
    // the two processes: exactly 10 succeed, the rest are clean 400s.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40 {
        let addr = if i % 2 == 0 { a.addr } else { b.addr };
        let client = client.clone();
        tasks.spawn(async move {
            let response = client
                .post(format!("http://{addr}/reservations"))
                .json(&json!({"items": [{"product_id": 1, "quantity": 1}, {"product_id": 2, "quantity": 1}]}))
                .send()
                .await
                .unwrap();
            let status = response.status();
            (status, response.text().await.unwrap())
        });
    }
    let (mut held, mut refused) = (0, 0);
    while let Some(result) = tasks.join_next().await {
        let (status, body) = result.unwrap();
        match status {
            StatusCode::CREATED => held += 1,
            StatusCode::BAD_REQUEST => {
                assert!(body.contains("Insufficient stock for product 1"), "{body}");
                refused += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((held, refused), (10, 30));
    for (instance, id, stock) in [(&b, 1, 0), (&a, 2, 40)] {
        let product: Value = client
            .get(format!("http://{}/products/{id}", instance.addr))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(product["stock"], stock, "product {id}: {product}");
    }
    a.kill().await.unwrap();
    b.kill().await.unwrap();
}
