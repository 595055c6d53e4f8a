//! The order saga end to end with real processes (user-service,
//! product-service, order-service binaries) and a real nats-server: a crash
//! at every step and SIGKILL under load leak no stock, unconfirmed
//! reservations expire, events arrive exactly once and in order, and
//! cancellation goes through the broker.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures_util::StreamExt;
use serde_json::{Value, json};
use service_kit::testing::{ChildService, Nats};

const ORDERS: &str = env!("CARGO_BIN_EXE_order-service");
/// Stock of the product the tests order: plenty.
const STOCK: i64 = 100_000;

fn binary(name: &str) -> String {
    service_kit::testing::binary(ORDERS, name)
}

/// The three services on temp files, with or without a broker.
struct System {
    dir: tempfile::TempDir,
    /// product-service's `--reservation-hold`: long, so that only recovery
    /// (not the expiry backstop) can balance the books in the crash tests.
    hold: &'static str,
    broker: Option<String>,
    users: ChildService,
    products: Option<ChildService>,
    orders: Option<ChildService>,
    http: reqwest::Client,
    product_id: i64,
}

impl System {
    async fn start(broker: Option<&Nats>) -> System {
        Self::start_holding(broker, "5m").await
    }

    async fn start_holding(broker: Option<&Nats>, hold: &'static str) -> System {
        let dir = tempfile::tempdir().unwrap();
        let users_db = dir.path().join("users.db").display().to_string();
        let users = ChildService::start(
            &binary("user-service"),
            &["--listen", "127.0.0.1:0", "--db", &users_db],
        )
        .await
        .unwrap();
        let mut system = System {
            dir,
            hold,
            broker: broker.map(Nats::url),
            users,
            products: None,
            orders: None,
            http: reqwest::Client::new(),
            product_id: 0,
        };
        system.start_products(&[]).await;
        system.start_orders(&[]).await;
        let (status, _) = system
            .send(
                "POST",
                system.users.addr,
                "/users",
                Some(json!({"username": "ann", "email": "ann@example.com", "full_name": "Ann"})),
            )
            .await;
        assert_eq!(status, 201);
        let products = system.products.as_ref().unwrap().addr;
        let (status, product) = system
            .send(
                "POST",
                products,
                "/products",
                Some(json!({"name": "Widget", "price": 2.5, "stock": STOCK, "category": "Tools"})),
            )
            .await;
        assert_eq!(status, 201);
        system.product_id = product["id"].as_i64().unwrap();
        system
    }

    fn db(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    async fn start_products(&mut self, env: &[(&str, &str)]) {
        let db = self.db("products.db");
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--db",
            &db,
            "--reservation-hold",
            self.hold,
        ];
        if let Some(broker) = &self.broker {
            args.extend(["--broker", broker]);
        }
        let products = ChildService::start_with_env(&binary("product-service"), &args, env)
            .await
            .unwrap();
        self.products = Some(products);
        if let Some(orders) = self.orders.take() {
            // The order service follows the new address.
            orders.kill().await.unwrap();
            self.start_orders(&[]).await;
        }
    }

    async fn start_orders(&mut self, env: &[(&str, &str)]) {
        let db = self.db("orders.db");
        let users = format!("http://{}", self.users.addr);
        let products = format!("http://{}", self.products.as_ref().unwrap().addr);
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--db",
            &db,
            "--users-url",
            &users,
            "--products-url",
            &products,
            "--recovery-grace",
            "1s",
            "--recovery-interval",
            "200ms",
        ];
        if let Some(broker) = &self.broker {
            args.extend(["--broker", broker]);
        }
        self.orders = Some(
            ChildService::start_with_env(ORDERS, &args, env)
                .await
                .unwrap(),
        );
    }

    fn orders_addr(&self) -> std::net::SocketAddr {
        self.orders.as_ref().unwrap().addr
    }

    fn products_addr(&self) -> std::net::SocketAddr {
        self.products.as_ref().unwrap().addr
    }

    async fn send(
        &self,
        method: &str,
        addr: std::net::SocketAddr,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method.parse().unwrap(), format!("http://{addr}{path}"));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Places an order for `quantity`; the status, or 0 if the connection
    /// broke (the service crashed).
    async fn order(&self, quantity: i64) -> (u16, Value) {
        let request = self
            .http
            .post(format!("http://{}/orders", self.orders_addr()))
            .json(&json!({"user_id": 1, "items": [{"product_id": self.product_id, "quantity": quantity}]}));
        match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                (status, response.json().await.unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        }
    }

    async fn stock(&self) -> i64 {
        let (_, product) = self
            .send(
                "GET",
                self.products_addr(),
                &format!("/products/{}", self.product_id),
                None,
            )
            .await;
        product["stock"].as_i64().unwrap()
    }

    /// Every order in `status`, page after page (the list is paginated).
    async fn orders(&self, status: &str) -> Vec<Value> {
        let mut all: Vec<Value> = Vec::new();
        loop {
            let after = all.last().map_or(0, |o| o["id"].as_i64().unwrap());
            let (code, page) = self
                .send(
                    "GET",
                    self.orders_addr(),
                    &format!("/orders?status={status}&limit=1000&after_id={after}"),
                    None,
                )
                .await;
            assert_eq!(code, 200, "{page}");
            let page = page.as_array().unwrap().clone();
            if page.is_empty() {
                return all;
            }
            all.extend(page);
        }
    }

    /// Units in confirmed orders.
    async fn confirmed_units(&self) -> i64 {
        self.orders("confirmed")
            .await
            .iter()
            .flat_map(|o| o["items"].as_array().unwrap().clone())
            .map(|i| i["quantity"].as_i64().unwrap())
            .sum()
    }

    /// Waits until recovery finished every pending order.
    async fn settled(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.orders("pending").await.is_empty() {
            assert!(Instant::now() < deadline, "orders still pending after 20 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The books balance once recovery is done: stock taken is exactly what
    /// confirmed orders hold. Recovery finishes pending orders, then
    /// releases failed orders' stock (retrying while product-service is
    /// away): waited for, up to 20 s.
    async fn assert_no_leak(&self, what: &str) {
        self.settled().await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let taken = STOCK - self.stock().await;
            let confirmed = self.confirmed_units().await;
            if taken == confirmed {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: stock taken {taken}, in confirmed orders {confirmed}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn a_crash_after_any_step_leaves_stock_equal_to_confirmed_orders() {
    let nats = Nats::start().await.unwrap();
    for step in [
        "pending",
        "reserved",
        "reservation_confirmed",
        "confirmed",
        "published",
    ] {
        let mut system = System::start(Some(&nats)).await;
        let published = stream_events(&nats, "ORDERS").await.len();
        assert_eq!(system.order(3).await.0, 201, "{step}: a normal order first");
        // Its event out, so the crash comes with the next order's.
        wait_for_events(&nats, "ORDERS", published + 1).await;
        system.orders.take().unwrap().kill().await.unwrap();
        system
            .start_orders(&[(service_kit::fault::VARIABLE, step)])
            .await;
        let (status, _) = system.order(5).await;
        if step != "published" {
            assert_eq!(status, 0, "{step}: the service should have died mid-order");
        }
        let died = system
            .orders
            .as_mut()
            .unwrap()
            .exited(Duration::from_secs(10))
            .await;
        assert!(died.is_some(), "{step}: no crash");
        system.orders = None;
        system.start_orders(&[]).await;
        system.assert_no_leak(step).await;
        let confirmed = system.orders("confirmed").await.len();
        let expected = if matches!(step, "reservation_confirmed" | "confirmed" | "published") {
            2
        } else {
            1
        };
        assert_eq!(confirmed, expected, "{step}: confirmed orders");
    }

    // product-service dies right after reserving, before answering.
    let mut system = System::start(Some(&nats)).await;
    system.products.take().unwrap().kill().await.unwrap();
    system
        .start_products(&[(service_kit::fault::VARIABLE, "reserved")])
        .await;
    let (status, _) = system.order(7).await;
    assert_eq!(status, 503, "product-service died mid-reserve");
    let died = system
        .products
        .as_mut()
        .unwrap()
        .exited(Duration::from_secs(10))
        .await;
    assert!(died.is_some());
    system.products = None;
    system.start_products(&[]).await;
    system
        .assert_no_leak("product-service after reserving")
        .await;
    assert!(system.orders("confirmed").await.is_empty());
    assert_eq!(system.orders("failed").await.len(), 1);
}

#[tokio::test]
async fn sigkill_under_load_three_times_leaks_no_stock() {
    let mut system = System::start(None).await;
    for round in 1..=3 {
        let stop = Arc::new(AtomicBool::new(false));
        let created = Arc::new(AtomicU64::new(0));
        let addr = system.orders_addr();
        let product = system.product_id;
        let mut clients = Vec::new();
        for _ in 0..20 {
            let (stop, created) = (Arc::clone(&stop), Arc::clone(&created));
            clients.push(tokio::spawn(async move {
                let http = reqwest::Client::new();
                while !stop.load(Ordering::Relaxed) {
                    let sent = http
                        .post(format!("http://{addr}/orders"))
                        .json(&json!({"user_id": 1, "items": [{"product_id": product, "quantity": 1}]}))
                        .send()
                        .await;
                    if let Ok(response) = sent
                        && response.status() == 201
                    {
                        created.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        // Kill it mid-load: once more than 20 orders went through (at most
        // 30 s on a starved machine), after at least 1.5 s of load.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while created.load(Ordering::Relaxed) <= 20 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        system.orders.take().unwrap().kill().await.unwrap();
        stop.store(true, Ordering::Relaxed);
        for client in clients {
            client.await.unwrap();
        }
        assert!(
            created.load(Ordering::Relaxed) > 20,
            "round {round}: the load placed too few orders"
        );
        system.start_orders(&[]).await;
        system
            .assert_no_leak(&format!("SIGKILL round {round}"))
            .await;
    }
}

#[tokio::test]
async fn an_unconfirmed_reservation_expires_and_gives_its_stock_back() {
    let system = System::start_holding(None, "3s").await;
    let before = system.stock().await;
    let products = system.products_addr();
    let (status, reservation) = system
        .send(
            "POST",
            products,
            "/reservations",
            Some(json!({"id": "never-confirmed", "items": [{"product_id": system.product_id, "quantity": 4}]})),
        )
        .await;
    assert_eq!(
        (status, reservation["status"].as_str()),
        (201, Some("held"))
    );
    assert_eq!(system.stock().await, before - 4);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, seen) = system
            .send("GET", products, "/reservations/never-confirmed", None)
            .await;
        if seen["status"] == "expired" {
            break;
        }
        assert!(Instant::now() < deadline, "not expired: {seen}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(system.stock().await, before, "the stock came back");
    let (status, body) = system
        .send(
            "POST",
            products,
            "/reservations/never-confirmed/confirm",
            None,
        )
        .await;
    assert_eq!(
        (status, body["detail"].as_str()),
        (409, Some("Reservation never-confirmed was already expired"))
    );
    // A confirmed reservation does not expire.
    let (_, _) = system
        .send(
            "POST",
            products,
            "/reservations",
            Some(
                json!({"id": "kept", "items": [{"product_id": system.product_id, "quantity": 2}]}),
            ),
        )
        .await;
    let (status, _) = system
        .send("POST", products, "/reservations/kept/confirm", None)
        .await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, kept) = system
        .send("GET", products, "/reservations/kept", None)
        .await;
    assert_eq!(kept["status"], "confirmed");
    assert_eq!(system.stock().await, before - 2);
}

/// Every message of a stream, in stream order: (type, event id, order id).
async fn stream_events(nats: &Nats, stream: &str) -> Vec<(String, String, Option<i64>)> {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    let stream = js.get_stream(stream).await.unwrap();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut batch = consumer
        .fetch()
        .max_messages(10_000)
        .expires(Duration::from_millis(500))
        .messages()
        .await
        .unwrap();
    let mut events = Vec::new();
    while let Some(Ok(message)) = batch.next().await {
        let event: Value = serde_json::from_slice(&message.payload).unwrap();
        events.push((
            event["type"].as_str().unwrap().to_owned(),
            event["id"].as_str().unwrap().to_owned(),
            event["data"]["order_id"].as_i64(),
        ));
    }
    events
}

/// Waits until the stream holds `n` messages or more.
async fn wait_for_events(
    nats: &Nats,
    stream: &str,
    n: usize,
) -> Vec<(String, String, Option<i64>)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let events = stream_events(nats, stream).await;
        if events.len() >= n {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "{} events in {stream}, {n} expected: {events:?}",
            events.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn events_arrive_once_and_in_order_through_a_relay_crash_and_a_broker_outage() {
    let mut nats = Nats::start().await.unwrap();
    let mut system = System::start(Some(&nats)).await;
    // The relay dies right after publishing its first event, before marking
    // it: after the restart it publishes it again; JetStream drops the copy.
    system.orders.take().unwrap().kill().await.unwrap();
    system
        .start_orders(&[(service_kit::fault::VARIABLE, "published")])
        .await;
    // The crash comes right after the relay publishes, which under load may
    // be before the answer is written: 201, or the connection cut by the
    // crash; the order is placed either way (checked after the restart).
    let (status, _) = system.order(1).await;
    assert!(status == 201 || status == 0, "{status}");
    assert!(
        system
            .orders
            .as_mut()
            .unwrap()
            .exited(Duration::from_secs(10))
            .await
            .is_some()
    );
    system.orders = None;
    system.start_orders(&[]).await;
    let (status, first) = system
        .send("GET", system.orders_addr(), "/orders/1", None)
        .await;
    assert_eq!(
        (status, first["status"].as_str()),
        (200, Some("confirmed")),
        "{first}"
    );
    for _ in 0..4 {
        assert_eq!(system.order(1).await.0, 201);
    }
    let events = wait_for_events(&nats, "ORDERS", 5).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events_again = stream_events(&nats, "ORDERS").await;
    assert_eq!(
        events_again.len(),
        5,
        "one event per order, duplicates dropped: {events_again:?}"
    );
    let ids: HashSet<&String> = events.iter().map(|(_, id, _)| id).collect();
    assert_eq!(ids.len(), 5);
    assert!(events.iter().all(|(kind, _, _)| kind == "order.confirmed"));

    // The broker goes away: orders are placed and cancelled all the same;
    // cancellations wait; everything arrives once it is back, in order per
    // order.
    nats.stop().await;
    let mut placed = Vec::new();
    for _ in 0..3 {
        let (status, order) = system.order(2).await;
        assert_eq!(status, 201, "{order}");
        placed.push(order["id"].as_i64().unwrap());
    }
    let (status, cancelling) = system
        .send(
            "POST",
            system.orders_addr(),
            &format!("/orders/{}/cancel", placed[0]),
            None,
        )
        .await;
    assert_eq!(
        (status, cancelling["status"].as_str()),
        (202, Some("cancelling"))
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, still) = system
        .send(
            "GET",
            system.orders_addr(),
            &format!("/orders/{}", placed[0]),
            None,
        )
        .await;
    assert_eq!(still["status"], "cancelling", "no broker, no release yet");
    nats.start_again().await.unwrap();
    let events = wait_for_events(&nats, "ORDERS", 9).await;
    let mut per_order: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for (kind, _, order) in &events {
        per_order
            .entry(order.unwrap())
            .or_default()
            .push(kind.clone());
    }
    assert_eq!(
        per_order[&placed[0]],
        ["order.confirmed", "order.cancelled"]
    );
    for id in &placed[1..] {
        assert_eq!(per_order[id], ["order.confirmed"]);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, order) = system
            .send(
                "GET",
                system.orders_addr(),
                &format!("/orders/{}", placed[0]),
                None,
            )
            .await;
        if order["status"] == "cancelled" {
            break;
        }
        assert!(Instant::now() < deadline, "not cancelled: {order}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    system.assert_no_leak("after the outage").await;
}

#[tokio::test]
async fn cancellation_goes_through_the_broker_and_a_duplicate_changes_nothing() {
    let nats = Nats::start().await.unwrap();
    let system = System::start(Some(&nats)).await;
    let (status, order) = system.order(6).await;
    assert_eq!(status, 201);
    let id = order["id"].as_i64().unwrap();
    assert_eq!(system.stock().await, STOCK - 6);
    let orders = system.orders_addr();
    let (status, body) = system
        .send("POST", orders, &format!("/orders/{id}/cancel"), None)
        .await;
    assert_eq!((status, body["status"].as_str()), (202, Some("cancelling")));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, order) = system
            .send("GET", orders, &format!("/orders/{id}"), None)
            .await;
        if order["status"] == "cancelled" {
            break;
        }
        assert!(Instant::now() < deadline, "not cancelled: {order}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(system.stock().await, STOCK, "the stock came back");
    // Cancelling again: the same answer, nothing more.
    let (status, body) = system
        .send("POST", orders, &format!("/orders/{id}/cancel"), None)
        .await;
    assert_eq!((status, body["status"].as_str()), (200, Some("cancelled")));
    let (status, _) = system
        .send("POST", orders, "/orders/999/cancel", None)
        .await;
    assert_eq!(status, 404);

    // The order.cancelled event delivered a second time (a new message id,
    // as a redelivery after a lost ack would be): no stock moves, no second
    // stock.released.
    let cancelled = stream_events(&nats, "ORDERS").await;
    let (_, event_id, _) = cancelled
        .iter()
        .find(|(kind, _, _)| kind == "order.cancelled")
        .unwrap()
        .clone();
    let released_before = wait_for_events(&nats, "STOCK", 1)
        .await
        .iter()
        .filter(|(kind, _, _)| kind == "stock.released")
        .count();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    let message = js.get_stream("ORDERS").await.unwrap();
    let raw = message
        .get_last_raw_message_by_subject("orders.cancelled")
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&raw.payload).contains(&event_id));
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "redelivered-once-more");
    js.publish_with_headers("orders.cancelled", headers, raw.payload.clone())
        .await
        .unwrap()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(system.stock().await, STOCK);
    let released_after = stream_events(&nats, "STOCK")
        .await
        .iter()
        .filter(|(kind, _, _)| kind == "stock.released")
        .count();
    assert_eq!(
        released_after, released_before,
        "a duplicate released stock again"
    );

    // A failed order cannot be cancelled.
    let (status, _) = system.order(STOCK * 11).await;
    assert_eq!(status, 422, "more than the quantity limit");
    let (status, failed) = system.order(STOCK + 1).await;
    assert_eq!(status, 400, "{failed}");
    let failed_orders = system.orders("failed").await;
    let failed_id = failed_orders[0]["id"].as_i64().unwrap();
    let (status, _) = system
        .send("POST", orders, &format!("/orders/{failed_id}/cancel"), None)
        .await;
    assert_eq!(status, 409);
}
