//! order-service with real user- and product-services on loopback sockets:
//! the seed usage, validation, concurrency (no oversell, no leak), the
//! compensation when recording fails, and unavailable dependencies.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::net::SocketAddr;
use std::path::Path;

use axum::http::StatusCode;
use order_service::{AppState, Dependencies};
use serde_json::{Value, json};
use service_kit::serve::spawn_local;

/// The three services, each on its own port and database in `dir`.
struct Stack {
    _dir: tempfile::TempDir,
    orders_db: service_kit::db::Db,
    users: SocketAddr,
    products: SocketAddr,
    orders: SocketAddr,
    http: reqwest::Client,
}

async fn start_orders(
    db_path: &Path,
    users_url: &str,
    products_url: &str,
) -> (service_kit::db::Db, SocketAddr) {
    let db = order_service::open_db(db_path).await.unwrap();
    let deps = Dependencies::new(users_url, products_url).unwrap();
    let addr = spawn_local(order_service::app(AppState::new(db.clone(), deps)))
        .await
        .unwrap();
    (db, addr)
}

impl Stack {
    async fn start() -> Stack {
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
        let (orders_db, orders) = start_orders(
            &dir.path().join("orders.db"),
            &format!("http://{users}"),
            &format!("http://{products}"),
        )
        .await;
        let stack = Stack {
            _dir: dir,
            orders_db,
            users,
            products,
            orders,
            http: reqwest::Client::new(),
        };
        let (status, _) = stack
            .send("POST", stack.users, "/users", Some(json!({"username": "john_doe", "email": "john@example.com", "full_name": "John Doe"})))
            .await;
        assert_eq!(status, StatusCode::CREATED);
        stack
    }

    async fn send(
        &self,
        method: &str,
        addr: SocketAddr,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.http.request(method, format!("http://{addr}{path}"));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    async fn order(&self, body: Value) -> (StatusCode, Value) {
        self.send("POST", self.orders, "/orders", Some(body)).await
    }

    async fn stock(&self, product_id: i64) -> i64 {
        let (status, product) = self
            .send(
                "GET",
                self.products,
                &format!("/products/{product_id}"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        product["stock"].as_i64().unwrap()
    }

    async fn add_product(&self, name: &str, stock: i64) -> i64 {
        let body = json!({"name": name, "price": 2.5, "stock": stock, "category": "Test"});
        let (status, product) = self
            .send("POST", self.products, "/products", Some(body))
            .await;
        assert_eq!(status, StatusCode::CREATED);
        product["id"].as_i64().unwrap()
    }
}

#[tokio::test]
async fn the_seed_usage_works() {
    let stack = Stack::start().await;
    let (status, order) = stack
        .order(json!({"user_id": 1, "items": [{"product_id": 1, "quantity": 2}, {"product_id": 2, "quantity": 1}]}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    assert_eq!(order["id"], 1);
    assert_eq!(order["total"], json!(2612.97));
    assert_eq!(order["status"], "confirmed");
    assert_eq!(
        order["items"],
        json!([{"product_id": 1, "quantity": 2, "price": 1299.99}, {"product_id": 2, "quantity": 1, "price": 12.99}])
    );
    let created_at = order["created_at"].as_str().unwrap();
    assert!(
        created_at.len() == 20 && created_at.ends_with('Z') && created_at.as_bytes()[10] == b'T',
        "{created_at}"
    );
    assert_eq!(stack.stock(1).await, 8);

    let (status, fetched) = stack.send("GET", stack.orders, "/orders/1", None).await;
    assert_eq!((status, &fetched), (StatusCode::OK, &order));
    let (_, mine) = stack
        .send("GET", stack.orders, "/orders?user_id=1", None)
        .await;
    assert_eq!(mine, json!([order]));
    let (_, theirs) = stack
        .send("GET", stack.orders, "/orders?user_id=2", None)
        .await;
    assert_eq!(theirs, json!([]));
    let (status, missing) = stack.send("GET", stack.orders, "/orders/2", None).await;
    assert_eq!(
        (status, missing),
        (StatusCode::NOT_FOUND, json!({"detail": "Order not found"}))
    );
}

#[tokio::test]
async fn duplicate_lines_are_merged() {
    let stack = Stack::start().await;
    let (status, order) = stack
        .order(json!({"user_id": 1, "items": [{"product_id": 2, "quantity": 1}, {"product_id": 2, "quantity": 2}]}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    assert_eq!(
        order["items"],
        json!([{"product_id": 2, "quantity": 3, "price": 12.99}])
    );
    assert_eq!(order["total"], json!(38.97));
    assert_eq!(stack.stock(2).await, 47);
}

#[tokio::test]
async fn refusals_are_clear_and_change_no_stock() {
    let stack = Stack::start().await;
    let cases = [
        (
            json!({"user_id": 1, "items": []}),
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
        ),
        (
            json!({"user_id": 1, "items": [{"product_id": 1, "quantity": 0}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
        ),
        (
            json!({"user_id": 1, "items": [{"product_id": 1, "quantity": -5}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
        ),
        (
            json!({"user_id": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
        ),
        (
            json!({"user_id": "one", "items": [{"product_id": 1, "quantity": 1}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
        ),
        (
            json!({"user_id": 42, "items": [{"product_id": 1, "quantity": 1}]}),
            StatusCode::NOT_FOUND,
            Some("User not found"),
        ),
        (
            json!({"user_id": 1, "items": [{"product_id": 1, "quantity": 1}, {"product_id": 99, "quantity": 1}]}),
            StatusCode::NOT_FOUND,
            Some("Product 99 not found"),
        ),
        (
            json!({"user_id": 1, "items": [{"product_id": 2, "quantity": 1}, {"product_id": 1, "quantity": 11}]}),
            StatusCode::BAD_REQUEST,
            Some("Insufficient stock for product 1"),
        ),
    ];
    for (body, expected, detail) in cases {
        let (status, answer) = stack.order(body.clone()).await;
        assert_eq!(status, expected, "{body} -> {answer}");
        if let Some(detail) = detail {
            assert_eq!(answer, json!({"detail": detail}));
        }
    }
    let response = stack
        .http
        .post(format!("http://{}/orders", stack.orders))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!((stack.stock(1).await, stack.stock(2).await), (10, 50));
}

/// 30 concurrent orders, each for one plentiful product and one product
/// with stock 5: exactly 5 succeed; the plentiful stock drops by exactly 5
/// (nothing leaked by the 25 refused orders) and the scarce one ends at 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_orders_never_oversell_or_leak() {
    let stack = Stack::start().await;
    let plentiful = stack.add_product("Plenty", 1_000).await;
    let scarce = stack.add_product("Scarce", 5).await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..30 {
        let (http, url) = (
            stack.http.clone(),
            format!("http://{}/orders", stack.orders),
        );
        let body = json!({"user_id": 1, "items": [{"product_id": plentiful, "quantity": 1}, {"product_id": scarce, "quantity": 1}]});
        tasks.spawn(async move {
            let response = http.post(url).json(&body).send().await.unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        });
    }
    let mut ids = Vec::new();
    let mut refused = 0;
    while let Some(result) = tasks.join_next().await {
        match result.unwrap() {
            (StatusCode::CREATED, order) => ids.push(order["id"].as_i64().unwrap()),
            (StatusCode::BAD_REQUEST, answer) => {
                assert_eq!(
                    answer,
                    json!({"detail": format!("Insufficient stock for product {scarce}")})
                );
                refused += 1;
            }
            (status, answer) => panic!("unexpected {status}: {answer}"),
        }
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!((ids.len(), refused), (5, 25), "five distinct order ids");
    assert_eq!(stack.stock(plentiful).await, 995);
    assert_eq!(stack.stock(scarce).await, 0);
}

/// The order insert fails after the stock was reserved (a trigger makes the
/// database refuse it): the client gets a 500 and the stock comes back.
#[tokio::test]
async fn a_failure_after_reservation_releases_the_stock() {
    let stack = Stack::start().await;
    stack
        .orders_db
        .write(|conn| {
            conn.execute_batch("CREATE TRIGGER refuse BEFORE INSERT ON orders BEGIN SELECT RAISE(ABORT, 'disk on fire'); END;")
                .map_err(service_kit::db::Error::from)
        })
        .await
        .unwrap();
    let (status, answer) = stack
        .order(json!({"user_id": 1, "items": [{"product_id": 1, "quantity": 3}, {"product_id": 2, "quantity": 4}]}))
        .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{answer}");
    assert_eq!(
        answer,
        json!({"detail": "Internal server error"}),
        "no internals leak"
    );
    assert_eq!((stack.stock(1).await, stack.stock(2).await), (10, 50));

    stack
        .orders_db
        .write(|conn| {
            conn.execute_batch("DROP TRIGGER refuse")
                .map_err(service_kit::db::Error::from)
        })
        .await
        .unwrap();
    let (status, _) = stack
        .order(json!({"user_id": 1, "items": [{"product_id": 1, "quantity": 3}]}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(stack.stock(1).await, 7);
}

/// A port nothing listens on: bind one, note it, close it.
async fn dead_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

#[tokio::test]
async fn an_unavailable_dependency_is_a_503_and_changes_no_stock() {
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let body = json!({"user_id": 1, "items": [{"product_id": 1, "quantity": 1}]});

    let (_db, no_users) = start_orders(
        &dir.path().join("a.db"),
        &dead_url().await,
        &format!("http://{}", stack.products),
    )
    .await;
    let (status, answer) = stack
        .send("POST", no_users, "/orders", Some(body.clone()))
        .await;
    assert_eq!(
        (status, answer),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"detail": "User service unavailable"})
        )
    );

    let (_db, no_products) = start_orders(
        &dir.path().join("b.db"),
        &format!("http://{}", stack.users),
        &dead_url().await,
    )
    .await;
    let (status, answer) = stack.send("POST", no_products, "/orders", Some(body)).await;
    assert_eq!(
        (status, answer),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"detail": "Product service unavailable"})
        )
    );

    assert_eq!(stack.stock(1).await, 10);
}

#[tokio::test]
async fn orders_survive_a_restart_on_the_same_file() {
    let stack = Stack::start().await;
    let (status, order) = stack
        .order(json!({"user_id": 1, "items": [{"product_id": 3, "quantity": 1}]}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    stack.orders_db.close().await;

    let path = stack._dir.path().join("orders.db");
    let (_db, restarted) = start_orders(
        &path,
        &format!("http://{}", stack.users),
        &format!("http://{}", stack.products),
    )
    .await;
    let (status, all) = stack.send("GET", restarted, "/orders", None).await;
    assert_eq!((status, all), (StatusCode::OK, json!([order])));
}
