//! Rate-limit accuracy under concurrent load, in a test binary of its own:
//! `cargo test` runs the tests of one binary in parallel, and on a 2-core
//! machine the other gateways' work would starve this one's clients into
//! clumps, which a limiter exact to the cell cannot make up for (a request
//! late for its turn loses that time).

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::{Backend, GatewayProcess};

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// 20 clients for 3 s at `requests: 50, per: 1s, burst: 0`: 150 ± 5 %
/// pass (the clients on threads of their own, so they keep sending).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limit_holds_its_rate_under_concurrent_load() {
    let backend = Backend::start("b");
    let gateway = GatewayProcess::start(&format!(
        "services:\n  s: {{ instances: [\"{}\"] }}\nroutes:\n  - {{ prefix: /api, service: s, plugins: [ {{ rate_limit: {{ requests: 50, per: 1s, burst: 0 }} }} ] }}\n",
        backend.addr
    ))
    .await;
    let passed = Arc::new(AtomicU64::new(0));
    let limited = Arc::new(AtomicU64::new(0));
    // Clients made and connected first (building one loads TLS roots, a
    // first request opens its connection), then a second for the bucket to
    // fill again: the 3 s are the limiter's, not the clients' start-up.
    let made: Vec<reqwest::Client> = (0..20).map(|_| client()).collect();
    for client in &made {
        client.get(gateway.url("/api/x")).send().await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let mut clients = Vec::new();
    for client in made {
        let (passed, limited) = (Arc::clone(&passed), Arc::clone(&limited));
        let url = gateway.url("/api/x");
        clients.push(tokio::spawn(async move {
            while started.elapsed() < Duration::from_secs(3) {
                let response = client.get(&url).send().await.unwrap();
                let headers = response.headers();
                assert_eq!(headers["ratelimit-limit"], "50");
                assert!(headers.contains_key("ratelimit-remaining"));
                assert!(headers.contains_key("ratelimit-reset"));
                match response.status().as_u16() {
                    200 => passed.fetch_add(1, Ordering::Relaxed),
                    429 => {
                        let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
                        assert!(retry >= 1);
                        assert_eq!(headers["ratelimit-remaining"], "0");
                        limited.fetch_add(1, Ordering::Relaxed)
                    }
                    other => panic!("status {other}"),
                };
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    let passed = passed.load(Ordering::Relaxed);
    let limited = limited.load(Ordering::Relaxed);
    eprintln!("rate limit under load: {passed} passed, {limited} limited");
    assert!(
        (142..=158).contains(&passed),
        "150 ± 5 % expected in 3 s at 50/s: {passed} passed, {limited} limited"
    );
    assert!(
        limited > 100,
        "the load was not enough to test the limit: {limited}"
    );
}
