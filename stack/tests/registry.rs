//! Discovery on a real etcd with real processes: product-service instances
//! register themselves, gateways on `discovery: etcd` follow them live
//! (scale 1 -> 3 -> 1, a SIGKILL, an etcd outage, two gateways, a restart
//! from the cache), and order-service finds its dependencies there. Every
//! test prints the times it measured (`--nocapture` shows them).

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use registry::testing::Etcd;
use registry::{DEFAULT_PREFIX, Follower};
use serde_json::{Value, json};
use service_kit::testing::ChildService;

const STACK: &str = env!("CARGO_BIN_EXE_stack");
/// The services' lease TTL in these tests: short, so a crash shows soon.
const TTL: Duration = Duration::from_secs(2);

fn binary(name: &str) -> String {
    service_kit::testing::binary(STACK, name)
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A service instance registered in `etcd`, on a free port.
async fn registered(service: &str, db: &Path, etcd: &Etcd) -> ChildService {
    let db = db.display().to_string();
    let url = etcd.url();
    let ttl = format!("{}s", TTL.as_secs());
    ChildService::start(
        &binary(service),
        &[
            "--listen",
            "127.0.0.1:0",
            "--db",
            &db,
            "--registry",
            &url,
            "--registry-ttl",
            &ttl,
        ],
    )
    .await
    .unwrap()
}

struct Gateway {
    process: ChildService,
    config: PathBuf,
    listen: SocketAddr,
    admin: SocketAddr,
}

impl Gateway {
    /// A gateway on `etcd` whose only service, product-service, comes from
    /// the registry; health checked every 200 ms.
    async fn start(dir: &Path, name: &str, etcd_endpoint: &str) -> Gateway {
        let listen = free_addr();
        let admin = free_addr();
        let config = dir.join(format!("{name}.yaml"));
        let cache = dir.join(format!("{name}-cache.json"));
        std::fs::write(
            &config,
            format!(
                r#"
listen: "{listen}"
admin_listen: "{admin}"
health_check: {{ interval: 200ms, timeout: 150ms, healthy_threshold: 1 }}
api_docs: {{ enabled: false }}
registry:
  etcd: {{ endpoints: ["{etcd_endpoint}"], cache: "{}" }}
services:
  product-service: {{ discovery: etcd }}
routes:
  - {{ prefix: /api/products, service: product-service, strip_prefix: /api }}
"#,
                cache.display()
            ),
        )
        .unwrap();
        Self::start_on(config).await
    }

    async fn start_on(config: PathBuf) -> Gateway {
        let path = config.display().to_string();
        let process = ChildService::start_with_env(
            &binary("gateway"),
            &["--config", &path],
            &[("RUST_LOG", "warn,gateway::server=info")],
        )
        .await
        .unwrap();
        // The process logs its admin address first: take both from the file.
        let text = std::fs::read_to_string(&config).unwrap();
        let address = |key: &str| -> SocketAddr {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|a| a.trim().trim_matches('"').parse().unwrap())
                .unwrap()
        };
        let listen = address("listen: ");
        // The line waited for is the admin listener's; the proxy's own
        // listener may bind a moment later.
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(listen).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "the gateway never listened on {listen}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Gateway {
            process,
            listen,
            admin: address("admin_listen: "),
            config,
        }
    }

    /// A line of the admin `/metrics` that starts with `series`, its value.
    async fn metric(&self, http: &reqwest::Client, series: &str) -> Option<f64> {
        let text = http
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.listen)
    }

    async fn services(&self, http: &reqwest::Client) -> Value {
        answer(http.get(self.url("/services"))).await
    }

    /// product-service's entry in `/services`.
    async fn products(&self, http: &reqwest::Client) -> Value {
        let services = self.services(http).await;
        services["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "product-service")
            .cloned()
            .unwrap()
    }

    /// The addresses of product-service's instances in `/services`.
    async fn addresses(&self, http: &reqwest::Client) -> Vec<String> {
        let mut addresses: Vec<String> = self.products(http).await["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["address"].as_str().unwrap().to_owned())
            .collect();
        addresses.sort();
        addresses
    }
}

fn sorted(addresses: &[SocketAddr]) -> Vec<String> {
    let mut list: Vec<String> = addresses.iter().map(ToString::to_string).collect();
    list.sort();
    list
}

/// Waits until `test` holds (polled every 20 ms) or panics after `limit`;
/// how long it took.
async fn until<F: Future<Output = bool>>(
    limit: Duration,
    what: &str,
    mut test: impl FnMut() -> F,
) -> Duration {
    let started = Instant::now();
    while !test().await {
        assert!(started.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

/// GETs of `/api/products/{id}` through a gateway, one after another,
/// until stopped: counts answers and failures (anything but 200).
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Load {
    fn start(url: String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let (stop, ok) = (Arc::clone(&stop), Arc::clone(&ok));
            async move {
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                let mut errors = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match http.get(&url).send().await {
                        Ok(r) if r.status() == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => {
                            let status = r.status();
                            errors
                                .push(format!("{status}: {}", r.text().await.unwrap_or_default()));
                        }
                        Err(err) => {
                            errors.push(err.to_string());
                        }
                    }
                    // About 500 requests a second: enough to see every gap.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                errors
            }
        });
        Load { stop, ok, task }
    }

    /// Stops; panics if any request failed.
    async fn finish(self, what: &str) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self.task.await.unwrap();
        let ok = self.ok.load(Ordering::Relaxed);
        assert!(
            errors.is_empty(),
            "{what}: {} of {} requests failed: {:?}",
            errors.len(),
            ok + errors.len() as u64,
            &errors[..errors.len().min(5)]
        );
        assert!(ok > 0, "{what}: no request was answered");
        ok
    }
}

/// GETs of `/products/{id}` an instance answered (from its `/metrics`).
async fn served(http: &reqwest::Client, instance: SocketAddr) -> u64 {
    answered(http, instance, "/products/{id}").await
}

/// Requests to `route` (a route template) an instance answered, from its
/// `/metrics`; 0 if it cannot say.
async fn answered(http: &reqwest::Client, instance: SocketAddr, route: &str) -> u64 {
    let Ok(response) = http.get(format!("http://{instance}/metrics")).send().await else {
        return 0;
    };
    let text = response.text().await.unwrap_or_default();
    let label = format!("route=\"{route}\"");
    text.lines()
        .filter(|l| l.starts_with("http_requests_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The JSON body of the answer to `request`.
async fn answer(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

/// A product to read, made on `instance`.
async fn a_product(http: &reqwest::Client, instance: SocketAddr) -> i64 {
    let product =
        answer(http.post(format!("http://{instance}/products")).json(
            &json!({"name": "Widget", "price": 2.5, "stock": 1_000_000, "category": "Tools"}),
        ))
        .await;
    product["id"].as_i64().unwrap()
}

/// When a key of `service` with `address` is in etcd, as a watcher sees it.
async fn registered_at(follower: &Follower, address: SocketAddr) -> Instant {
    let mut view = follower.view();
    let address = address.to_string();
    tokio::time::timeout(
        Duration::from_secs(10),
        view.wait_for(|v| v.members.iter().any(|m| m.entry.address == address)),
    )
    .await
    .unwrap()
    .unwrap();
    Instant::now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_join_leave_and_crash_under_load_without_a_failed_get() {
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("products.db");
    let http = reqwest::Client::new();
    let watcher = Follower::start(vec![etcd.endpoint()], DEFAULT_PREFIX, "product-service");

    let first = registered("product-service", &db, &etcd).await;
    let product = a_product(&http, first.addr).await;
    let gateway = Gateway::start(dir.path(), "gateway", &etcd.endpoint()).await;
    until(
        Duration::from_secs(5),
        "the first instance in rotation",
        || async { gateway.products(&http).await["healthy"] == true },
    )
    .await;
    let products = gateway.products(&http).await;
    assert_eq!(products["discovery"]["source"], "etcd", "{products}");
    assert_eq!(products["discovery"]["state"], "live", "{products}");
    assert_eq!(products["instances"][0]["source"], "registry", "{products}");
    assert_eq!(
        products["instances"][0]["id"],
        first.addr.to_string(),
        "{products}"
    );

    let load = Load::start(gateway.url(&format!("/api/products/{product}")));
    // Scale 1 -> 3: each new instance takes traffic soon after it registers.
    let mut instances = vec![first];
    let mut to_traffic = Vec::new();
    for _ in 0..2 {
        let instance = registered("product-service", &db, &etcd).await;
        let at = registered_at(&watcher, instance.addr).await;
        until(
            Duration::from_secs(5),
            "traffic on the new instance",
            || async { served(&http, instance.addr).await > 0 },
        )
        .await;
        let took = at.elapsed();
        // The issue's bar: within 1 s of registering, plus the first check.
        assert!(
            took <= Duration::from_millis(1200),
            "first request {took:?} after registering"
        );
        to_traffic.push(took);
        instances.push(instance);
    }
    let all: Vec<SocketAddr> = instances.iter().map(|i| i.addr).collect();
    assert_eq!(gateway.addresses(&http).await, sorted(&all));

    // Scale 3 -> 2 gracefully: deregistered before it stops listening.
    let mut leaving = instances.pop().unwrap();
    let status = leaving.terminate(Duration::from_secs(15)).await.unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(gateway.addresses(&http).await, sorted(&all[..2]));

    // 2 -> 1 by SIGKILL: out when its lease expires; retries and ejection
    // cover the gap.
    let crashed = instances.pop().unwrap();
    let crashed_addr = crashed.addr;
    let killed = Instant::now();
    crashed.kill().await.unwrap();
    let mut view = watcher.view();
    tokio::time::timeout(
        TTL + Duration::from_secs(3),
        view.wait_for(|v| {
            !v.members
                .iter()
                .any(|m| m.entry.address == crashed_addr.to_string())
        }),
    )
    .await
    .unwrap()
    .unwrap();
    let expired = Instant::now();
    until(
        TTL + Duration::from_secs(2),
        "the crashed instance out of /services",
        || async { gateway.addresses(&http).await == sorted(&all[..1]) },
    )
    .await;
    let removed = Instant::now();
    assert!(
        removed - killed <= TTL + Duration::from_secs(1),
        "out of rotation {:?} after the kill (TTL {TTL:?})",
        removed - killed
    );
    let answered = load.finish("scaling 1 -> 3 -> 1").await;
    eprintln!(
        "measured: registration -> first proxied request {:?}; kill -> lease expiry {:?}; \
         lease expiry -> out of /services {:?}; kill -> out {:?}; {answered} GETs, 0 failed",
        to_traffic,
        expired - killed,
        removed - expired,
        removed - killed,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_converge_ride_out_an_etcd_outage_and_restart_from_the_cache() {
    let mut etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("products.db");
    let http = reqwest::Client::new();
    let mut instances = vec![registered("product-service", &db, &etcd).await];
    let product = a_product(&http, instances[0].addr).await;
    let one = Gateway::start(dir.path(), "one", &etcd.endpoint()).await;
    let two = Gateway::start(dir.path(), "two", &etcd.endpoint()).await;

    // A change reaches both gateways within a second of each other.
    instances.push(registered("product-service", &db, &etcd).await);
    let all: Vec<SocketAddr> = instances.iter().map(|i| i.addr).collect();
    let first = until(
        Duration::from_secs(5),
        "gateway one sees two instances",
        || async { one.addresses(&http).await == sorted(&all) },
    )
    .await;
    let second = until(
        Duration::from_secs(1),
        "gateway two within 1 s of one",
        || async { two.addresses(&http).await == sorted(&all) },
    )
    .await;
    eprintln!(
        "measured: gateway one saw the new instance after {first:?}, gateway two {second:?} later"
    );

    // etcd stops under load: nothing fails, both say the registry is away.
    let load = Load::start(one.url(&format!("/api/products/{product}")));
    let load_two = Load::start(two.url(&format!("/api/products/{product}")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    etcd.stop().await;
    for gateway in [&one, &two] {
        until(
            Duration::from_secs(5),
            "the registry reported unavailable",
            || async { gateway.products(&http).await["discovery"]["state"] == "unavailable" },
        )
        .await;
        assert_eq!(
            gateway.addresses(&http).await,
            sorted(&all),
            "the last set stays"
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let away = one.products(&http).await;
    assert!(
        away["discovery"]["data_age_seconds"].as_f64().unwrap() >= 1.0,
        "{away}"
    );
    assert!(away["discovery"]["error"].is_string(), "{away}");
    let up = r#"gateway_discovery_up{service="product-service",source="etcd"}"#;
    let age = r#"gateway_discovery_data_age_seconds{service="product-service",source="etcd"}"#;
    assert_eq!(one.metric(&http, up).await, Some(0.0));
    assert!(one.metric(&http, age).await.unwrap() >= 1.0);

    // etcd back: both converge, also on a change made meanwhile.
    etcd.start_again().await.unwrap();
    let returned = Instant::now();
    instances.push(registered("product-service", &db, &etcd).await);
    let all: Vec<SocketAddr> = instances.iter().map(|i| i.addr).collect();
    for gateway in [&one, &two] {
        until(
            Duration::from_secs(10),
            "converged after the outage",
            || async {
                let products = gateway.products(&http).await;
                products["discovery"]["state"] == "live"
                    && gateway.addresses(&http).await == sorted(&all)
            },
        )
        .await;
    }
    eprintln!(
        "measured: etcd back -> both gateways live and converged in {:?}",
        returned.elapsed()
    );
    assert_eq!(one.metric(&http, up).await, Some(1.0));
    assert_eq!(one.metric(&http, age).await, Some(0.0));
    load.finish("etcd outage, gateway one").await;
    load_two.finish("etcd outage, gateway two").await;

    // A restart while etcd is down serves from the cache.
    let config = one.config.clone();
    let mut one = one;
    assert!(
        one.process
            .terminate(Duration::from_secs(15))
            .await
            .unwrap()
            .success()
    );
    etcd.stop().await;
    let restarted = Gateway::start_on(config).await;
    let products = restarted.products(&http).await;
    assert_eq!(products["discovery"]["state"], "unavailable", "{products}");
    assert_eq!(products["discovery"]["from_cache"], true, "{products}");
    assert_eq!(restarted.addresses(&http).await, sorted(&all));
    until(
        Duration::from_secs(5),
        "the cached instances in rotation",
        || async { restarted.products(&http).await["healthy"] == true },
    )
    .await;
    let answer = http
        .get(restarted.url(&format!("/api/products/{product}")))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);

    // Without a cache, a start while etcd is down has no instance: 503.
    let bare = Gateway::start(dir.path(), "bare", "127.0.0.1:1").await;
    let products = bare.products(&http).await;
    assert_eq!(products["discovery"]["state"], "unavailable", "{products}");
    assert_eq!(products["instances"], json!([]), "{products}");
    let answer = http
        .get(bare.url(&format!("/api/products/{product}")))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_succeed_while_product_instances_are_replaced_one_by_one() {
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let users = registered("user-service", &dir.path().join("users.db"), &etcd).await;
    let products_db = dir.path().join("products.db");
    let mut products = vec![
        registered("product-service", &products_db, &etcd).await,
        registered("product-service", &products_db, &etcd).await,
    ];
    let orders = registered("order-service", &dir.path().join("orders.db"), &etcd).await;
    let user = answer(
        http.post(format!("http://{}/users", users.addr))
            .json(&json!({"username": "ann", "email": "ann@example.com", "full_name": "Ann"})),
    )
    .await;
    let product = a_product(&http, products[0].addr).await;
    let order = json!({"user_id": user["id"], "items": [{"product_id": product, "quantity": 1}]});
    let url = format!("http://{}/orders", orders.addr);
    // order-service sees its dependencies once they are registered.
    until(Duration::from_secs(10), "a first order", || async {
        http.post(&url).json(&order).send().await.unwrap().status() == 201
    })
    .await;

    let mut placed = 0;
    for _ in 0..2 {
        // A new instance in, then the oldest out (gracefully).
        products.push(registered("product-service", &products_db, &etcd).await);
        placed += place_orders(&http, &url, &order, 20).await;
        let mut oldest = products.remove(0);
        let stopping = tokio::spawn(async move { oldest.terminate(Duration::from_secs(15)).await });
        placed += place_orders(&http, &url, &order, 20).await;
        assert!(stopping.await.unwrap().unwrap().success());
        placed += place_orders(&http, &url, &order, 20).await;
    }
    // Every placed order took its stock exactly once.
    let stock = answer(http.get(format!("http://{}/products/{product}", products[0].addr))).await;
    assert_eq!(stock["stock"], 1_000_000 - placed - 1, "{stock}");
    // The replaced instances both served reservations.
    let mut total = 0;
    for instance in &products {
        let reservations = answered(&http, instance.addr, "/reservations").await;
        assert!(reservations > 0, "{} got no reservation", instance.addr);
        total += reservations;
    }
    eprintln!(
        "measured: {placed} orders placed across replacements, {total} reservations on the final two instances"
    );
}

/// Places `count` orders one after another; each must succeed.
async fn place_orders(http: &reqwest::Client, url: &str, order: &Value, count: i64) -> i64 {
    for _ in 0..count {
        let response = http.post(url).json(order).send().await.unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(status, 201, "{body}");
    }
    count
}
