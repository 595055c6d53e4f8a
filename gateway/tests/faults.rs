//! Fault injection: what clients see when backends die, hang or fail, when
//! clients misbehave, and when the gateway itself is stopped or replaced.
//! Real backends and the real gateway binary, load generated here, bounded
//! in count and time.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{
    Backend, BlackHole, Dropper, EARLY_ANSWER, EarlyAnswerer, GatewayProcess, IdleCloser, Upgrader,
    instance_healthy, single_route,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HEALTH: &str = "health_check: { interval: 200ms, timeout: 200ms, healthy_threshold: 2, unhealthy_threshold: 2 }\n";

fn one_service(instances: &[std::net::SocketAddr], extra: &str) -> String {
    let list: Vec<String> = instances.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "{HEALTH}services:\n  s:\n    instances: [{}]\n{extra}routes:\n  - {{ prefix: /, service: s }}\n",
        list.join(", ")
    )
}

/// Reports a load run and fails if any request did not get a 200.
fn assert_none_failed(what: &str, ok: u64, failed: &[String]) {
    eprintln!("{what}: {ok} ok, {} failed", failed.len());
    assert!(
        failed.is_empty(),
        "{what}: {} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
}

/// `clients` tasks sending `GET url` until `until`; returns the number of
/// 200s and a description of every other outcome.
async fn get_load(url: String, clients: usize, until: Instant) -> (u64, Vec<String>) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let url = url.clone();
        tasks.spawn(async move {
            let http = reqwest::Client::new();
            let (mut ok, mut failed) = (0u64, Vec::new());
            while Instant::now() < until {
                match http.get(&url).send().await {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(r) => failed.push(r.status().to_string()),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        });
    }
    let (mut ok, mut failed) = (0, Vec::new());
    while let Some(result) = tasks.join_next().await {
        let (o, f) = result.unwrap();
        ok += o;
        failed.extend(f);
    }
    (ok, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_two_instances_under_get_load_shows_no_error() {
    let a = Backend::start("a");
    let b = Backend::start("b");
    let gateway = GatewayProcess::start(&one_service(&[a.addr, b.addr], "")).await;
    let until = Instant::now() + Duration::from_secs(3);
    let load = tokio::spawn(get_load(gateway.url("/x"), 20, until));
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.kill();
    let (ok, failed) = load.await.unwrap();
    assert_none_failed("GET load, one of two killed", ok, &failed);
    assert!(ok > 100);
    assert!(b.hits() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_instance_under_post_load_never_duplicates_a_write() {
    let a = Backend::start("a");
    let b = Backend::start("b");
    let gateway = Arc::new(GatewayProcess::start(&one_service(&[a.addr, b.addr], "")).await);
    let counter = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(3);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let (gateway, counter) = (Arc::clone(&gateway), Arc::clone(&counter));
        tasks.spawn(async move {
            let http = reqwest::Client::new();
            let mut outcomes = Vec::new();
            while Instant::now() < until {
                let id = counter.fetch_add(1, Ordering::SeqCst).to_string();
                let status = match http
                    .post(gateway.url("/write"))
                    .header("x-write-id", &id)
                    .body("payload")
                    .send()
                    .await
                {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 0,
                };
                outcomes.push((id, status));
            }
            outcomes
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let a_writes_before_kill = a.writes().len();
    let a_writes = {
        let writes = a.writes();
        a.kill();
        writes
    };
    let mut outcomes = Vec::new();
    while let Some(result) = tasks.join_next().await {
        outcomes.extend(result.unwrap());
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    for id in a_writes.iter().chain(b.writes().iter()) {
        *seen.entry(id.clone()).or_default() += 1;
    }
    let duplicates: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(duplicates.is_empty(), "written twice: {duplicates:?}");
    let failures: Vec<u16> = outcomes
        .iter()
        .map(|(_, s)| *s)
        .filter(|s| *s != 201)
        .collect();
    assert!(
        failures.iter().all(|s| *s == 502 || *s == 503),
        "unclean failures: {failures:?}"
    );
    for (id, status) in &outcomes {
        if *status == 201 {
            assert_eq!(
                seen.get(id),
                Some(&1),
                "write {id} answered 201 but recorded {:?} times",
                seen.get(id)
            );
        }
    }
    eprintln!(
        "POST load, one of two killed: {} requests, {} failed cleanly ({failures:?}), {a_writes_before_kill} on a before the kill",
        outcomes.len(),
        failures.len()
    );
}

#[tokio::test]
async fn a_backend_that_never_answers_gets_a_504_and_frees_the_slot() {
    let hole = BlackHole::start();
    let gateway = GatewayProcess::start(&one_service(
        &[hole.addr],
        "    timeouts: { read: 500ms }\n    when_all_unhealthy: fail_open\n",
    ))
    .await;
    let http = reqwest::Client::new();
    for _ in 0..3 {
        let started = Instant::now();
        let response = http.get(gateway.url("/x")).send().await.unwrap();
        let took = started.elapsed();
        assert_eq!(response.status(), 504);
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_millis(1500),
            "{took:?}"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["detail"], "s did not answer in time");
    }
    // The request's slot is released just after its answer is written.
    let freed = Instant::now();
    loop {
        let stats: Value = reqwest::get(gateway.admin_url("/admin/stats"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if stats["in_flight"] == 0 {
            break;
        }
        assert!(
            freed.elapsed() < Duration::from_secs(1),
            "slot not freed: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        gateway.log().contains("timeout=\"read\""),
        "the access log names the timeout:\n{}",
        gateway.log()
    );
}

#[tokio::test]
async fn an_instance_answering_500_is_ejected_before_the_next_active_check() {
    let bad = Backend::start("bad");
    let good = Backend::start("good");
    bad.set_failing(true);
    let gateway = GatewayProcess::start(&format!(
        "health_check: {{ interval: 60s }}\nservices:\n  s:\n    instances: [\"{}\", \"{}\"]\n    outlier_detection: {{ consecutive_failures: 3, ejection_time: 30s }}\nroutes:\n  - {{ prefix: /, service: s }}\n",
        bad.addr, good.addr
    ))
    .await;
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..30 {
        statuses.push(
            http.get(gateway.url("/x"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    let errors = statuses.iter().filter(|s| **s == 500).count();
    assert_eq!(
        errors, 3,
        "three 500s pass through, then the instance is out: {statuses:?}"
    );
    assert_eq!(bad.hits(), 3);
    let services = gateway.services().await;
    assert_eq!(
        instance_healthy(&services, &bad.addr.to_string()),
        Some(false)
    );
    assert!(
        services
            .to_string()
            .contains("ejected after 3 failed requests"),
        "{services}"
    );
}

#[tokio::test]
async fn fail_open_sends_to_unhealthy_instances_when_none_is_healthy() {
    let a = Backend::start("a");
    a.set_healthy(false);
    let gateway = GatewayProcess::start(&one_service(
        &[a.addr],
        "    when_all_unhealthy: fail_open\n",
    ))
    .await;
    let response = reqwest::get(gateway.url("/x")).await.unwrap();
    assert_eq!(response.status(), 200);
    let fast = GatewayProcess::start(&one_service(&[a.addr], "")).await;
    assert_eq!(reqwest::get(fast.url("/x")).await.unwrap().status(), 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_slow_request_finish_refuses_new_ones_and_exits() {
    let a = Backend::start("a");
    let mut gateway = GatewayProcess::start(&format!(
        "shutdown_grace: 5s\n{}",
        one_service(&[a.addr], "")
    ))
    .await;
    let url = gateway.url("/slow/1500");
    let slow = tokio::spawn(async move {
        let started = Instant::now();
        let response = reqwest::get(url).await.unwrap();
        (
            response.status().as_u16(),
            response.text().await.unwrap(),
            started.elapsed(),
        )
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signalled = Instant::now();
    gateway.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        tokio::net::TcpStream::connect(gateway.addr).await.is_err(),
        "new connections are refused after SIGTERM"
    );
    let (status, body, took) = slow.await.unwrap();
    assert_eq!((status, body.as_str()), (200, "slow answer"));
    assert!(took >= Duration::from_millis(1500));
    let exit = tokio::task::block_in_place(|| gateway.wait_exit(Duration::from_secs(6)));
    let exited_after = signalled.elapsed();
    assert!(exit.is_some_and(|s| s.success()), "exited: {exit:?}");
    assert!(
        exited_after < Duration::from_secs(3),
        "exited {exited_after:?} after SIGTERM, not at the end of the grace"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_upgrade_under_load_fails_no_request() {
    let a = Backend::start("a");
    let mut old = GatewayProcess::start(&one_service(&[a.addr], "")).await;
    let old_pid = old.pid();
    let mut new = old.start_upgrade();
    let until = Instant::now() + Duration::from_secs(9);
    let load = tokio::spawn(get_load(old.url("/x"), 10, until));
    tokio::time::sleep(Duration::from_millis(700)).await;
    old.signal("QUIT");
    let exit = tokio::task::block_in_place(|| old.wait_exit(Duration::from_secs(8)));
    assert!(exit.is_some(), "the old gateway exits after handing over");
    let (ok, failed) = load.await.unwrap();
    assert_none_failed("binary upgrade under load", ok, &failed);
    // The new process answers now.
    let health = reqwest::get(old.url("/health")).await.unwrap();
    assert_eq!(health.status(), 200);
    assert_ne!(new.id(), old_pid);
    let _ = new.kill();
    let _ = new.wait();
}

#[tokio::test]
async fn a_slowloris_client_is_cut_off_and_blocks_nobody() {
    let a = Backend::start("a");
    let gateway = GatewayProcess::start(&format!(
        "downstream: {{ header_timeout: 1s }}\n{}",
        one_service(&[a.addr], "")
    ))
    .await;
    let mut slow = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let started = Instant::now();
    let request = b"GET /x HTTP/1.1\r\nhost: test\r\nx-filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let http = reqwest::Client::new();
    let mut cut_off_after = None;
    for byte in request {
        if slow.write_all(&[*byte]).await.is_err() {
            cut_off_after = Some(started.elapsed());
            break;
        }
        // Meanwhile, another client is served at once.
        let quick = Instant::now();
        assert_eq!(
            http.get(gateway.url("/x")).send().await.unwrap().status(),
            200
        );
        assert!(quick.elapsed() < Duration::from_millis(500));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut probe = [0u8; 1];
        if let Ok(Ok(0)) =
            tokio::time::timeout(Duration::from_millis(1), slow.read(&mut probe)).await
        {
            cut_off_after = Some(started.elapsed());
            break;
        }
    }
    let cut = cut_off_after.expect("the slow client was never cut off");
    assert!(
        cut >= Duration::from_millis(900) && cut < Duration::from_secs(3),
        "cut off after {cut:?}"
    );
}

/// A raw HTTP/1.1 exchange: the status code of the answer (0 if none).
async fn raw_status(gateway: &GatewayProcess, request: &[u8]) -> u16 {
    let mut stream = gateway.send_raw(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn bad_requests_are_refused_at_the_edge() {
    let a = Backend::start("a");
    let gateway = GatewayProcess::start(&one_service(&[a.addr], "")).await;
    let cases: [(&str, &[u8], u16); 7] = [
        ("CL and TE", b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n4\r\nabcd\r\n0\r\n\r\n", 400),
        ("two different CLs", b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 4\r\ncontent-length: 5\r\nconnection: close\r\n\r\nabcde", 400),
        ("invalid header byte", b"GET /x HTTP/1.1\r\nhost: t\r\nx-bad: a\x01b\r\nconnection: close\r\n\r\n", 400),
        ("dot segments", b"GET /a/../etc/passwd HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n", 400),
        ("encoded slash", b"GET /a%2Fb HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n", 400),
        ("encoded dot segment", b"GET /a/%2e%2e/b HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n", 400),
        ("a sane request", b"GET /x HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n", 200),
    ];
    for (what, request, expected) in cases {
        assert_eq!(raw_status(&gateway, request).await, expected, "{what}");
    }
    assert_eq!(a.hits(), 1, "only the sane request reached the backend");
}

#[tokio::test]
async fn header_body_and_connection_limits() {
    let a = Backend::start("a");
    let gateway = GatewayProcess::start(&format!(
        "downstream: {{ max_header_size: 4KiB, max_connections: 4 }}\n{HEALTH}services:\n  s: {{ instances: [\"{}\"] }}\nroutes:\n  - {{ prefix: /, service: s, max_body_size: 1KiB }}\n",
        a.addr
    ))
    .await;
    let http = reqwest::Client::new();
    let response = http
        .get(gateway.url("/x"))
        .header("x-big", "a".repeat(5000))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 431);
    let response = http
        .post(gateway.url("/echo"))
        .body(vec![b'x'; 2048])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413, "declared length over the limit");
    // A chunked body (no declared length) over the limit is stopped while
    // streaming.
    let mut chunked = b"POST /echo HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
    for _ in 0..4 {
        chunked.extend_from_slice(b"200\r\n");
        chunked.extend_from_slice(&[b'y'; 512]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(raw_status(&gateway, &chunked).await, 413);
    assert_eq!(
        http.post(gateway.url("/echo"))
            .body(vec![b'x'; 1000])
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // Four connections are the limit; a fifth is closed at once. (The
    // client's pooled connections go first, so only ours count.)
    drop(http);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(tokio::net::TcpStream::connect(gateway.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fifth = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let _ = fifth.write_all(b"GET /x HTTP/1.1\r\nhost: t\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(2), fifth.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the fifth connection was served: {read:?}"
    );
    drop(open);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(reqwest::get(gateway.url("/x")).await.unwrap().status(), 200);
}

/// An instance that closes idle keep-alive connections long before the
/// gateway's idle timeout: the next request goes out on a new connection,
/// not on the closed one. A POST shows it: once sent, it is never retried,
/// so a closed connection handed out would have been a 502.
#[tokio::test]
async fn a_connection_the_instance_closed_while_idle_is_not_reused() {
    let closer = IdleCloser::start(Duration::from_millis(100));
    let gateway = GatewayProcess::start(&single_route(
        "health_check: { interval: 60s }\n",
        closer.addr,
    ))
    .await;
    let http = reqwest::Client::new();
    for round in 0..3 {
        let status = http.post(gateway.url("/x")).send().await.unwrap().status();
        assert_eq!(status, 200, "round {round}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Back to back, a kept-alive connection is reused.
    let before = closer.connections.load(Ordering::SeqCst);
    for _ in 0..3 {
        let status = http.post(gateway.url("/x")).send().await.unwrap().status();
        assert_eq!(status, 200);
    }
    assert_eq!(closer.connections.load(Ordering::SeqCst), before + 1);
    // The access log is written every 100 ms.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = gateway.log();
    assert_eq!(log.matches("attempts=1 status=200").count(), 6, "{log}");
}

/// An instance that takes requests and drops them unanswered: a request
/// that was sent is repeated on the other instance only when that is safe
/// (idempotent method or Idempotency-Key); a plain POST gets a clean 502.
#[tokio::test]
async fn only_safe_requests_are_retried_after_they_were_sent() {
    let dropper = Dropper::start();
    let good = Backend::start("good");
    let gateway = GatewayProcess::start(&format!(
        "health_check: {{ interval: 60s }}\nservices:\n  s:\n    instances: [\"{}\", \"{}\"]\n    outlier_detection: {{ consecutive_failures: 0 }}\nroutes:\n  - {{ prefix: /, service: s }}\n",
        dropper.addr, good.addr
    ))
    .await;
    let http = reqwest::Client::new();
    // Plain POSTs alone: round robin alternates the instances, and the ones
    // that reached the dropper are never sent again.
    let (mut plain_ok, mut plain_502) = (0, 0);
    for i in 0..10 {
        let plain = http
            .post(gateway.url("/write"))
            .header("x-write-id", format!("plain-{i}"))
            .body("x")
            .send()
            .await
            .unwrap();
        match plain.status().as_u16() {
            201 => plain_ok += 1,
            502 => plain_502 += 1,
            other => panic!("plain POST {i}: {other}"),
        }
    }
    // Idempotent or keyed: always answered, by the good instance.
    for i in 0..10 {
        let get = http.get(gateway.url("/x")).send().await.unwrap();
        assert_eq!(get.status(), 200, "GET {i}");
        let keyed = http
            .post(gateway.url("/write"))
            .header("idempotency-key", format!("k{i}"))
            .header("x-write-id", format!("keyed-{i}"))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(keyed.status(), 201, "keyed POST {i}");
    }
    let dropped = dropper.dropped.load(Ordering::SeqCst);
    assert!(
        dropped >= 10,
        "the dropper saw too few requests to prove anything: {dropped}"
    );
    assert!(
        plain_502 > 0 && plain_ok > 0,
        "plain POSTs: {plain_ok} ok, {plain_502} refused"
    );
    let writes = good.writes();
    assert_eq!(
        writes.iter().filter(|w| w.starts_with("keyed-")).count(),
        10
    );
    assert_eq!(
        writes.iter().filter(|w| w.starts_with("plain-")).count(),
        plain_ok
    );
    // A retried body is replayed whole: it was read once, and up to 64 KiB
    // of it is kept for this. (After a second, so the retry budget, 10 a
    // second beyond its share of requests, has refilled.)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let dropped_before = dropper.dropped.load(Ordering::SeqCst);
    let body: String = (0..20_000)
        .map(|n| char::from(b'a' + (n % 26) as u8))
        .collect();
    for i in 0..4 {
        let echoed = http
            .post(gateway.url("/echo"))
            .header("idempotency-key", format!("e{i}"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(echoed.status(), 200, "keyed echo {i}");
        assert!(
            echoed.text().await.unwrap() == body,
            "keyed echo {i}: body changed"
        );
    }
    assert!(
        dropper.dropped.load(Ordering::SeqCst) > dropped_before,
        "no echo went to the dropper first: nothing was replayed"
    );
}

/// Reads from `stream` until `needle` has arrived (or 3 s passed).
async fn read_until(stream: &mut tokio::net::TcpStream, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(3);
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test]
async fn a_websocket_upgrade_becomes_a_two_way_stream() {
    let upgrader = Upgrader::start();
    let gateway = GatewayProcess::start(&one_service(&[upgrader.addr], "")).await;
    let mut stream = gateway.send_raw(b"GET /chat HTTP/1.1\r\nhost: t\r\nconnection: keep-alive, Upgrade\r\nupgrade: websocket\r\nsec-websocket-key: k\r\nsec-websocket-version: 13\r\n\r\n").await;
    let head = read_until(&mut stream, "\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.to_lowercase().contains("upgrade: websocket"), "{head}");
    let seen = upgrader.last_head.lock().unwrap().clone();
    assert!(seen.contains("connection: upgrade\r\n"), "{seen}");
    assert!(seen.contains("upgrade: websocket\r\n"), "{seen}");
    assert!(seen.contains("sec-websocket-key: k\r\n"), "{seen}");
    // Both ways, several times: the gateway relays each message as it comes.
    for message in ["hello", "again", "and again"] {
        stream.write_all(message.as_bytes()).await.unwrap();
        let echoed = read_until(&mut stream, &message.to_uppercase()).await;
        assert_eq!(echoed, message.to_uppercase());
    }
    drop(stream);
    // Any other upgrade is not passed on: the request goes as a plain one.
    let mut stream = gateway
        .send_raw(b"GET /x HTTP/1.1\r\nhost: t\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n")
        .await;
    read_until(&mut stream, "\r\n\r\n").await;
    let seen = upgrader.last_head.lock().unwrap().clone();
    assert!(seen.starts_with("get /x "), "{seen}");
    assert!(!seen.contains("upgrade"), "{seen}");
}

#[tokio::test]
async fn expect_100_continue_gets_its_interim_answer_after_the_checks() {
    let a = Backend::start("a");
    let config = format!(
        "{HEALTH}services:\n  s:\n    instances: [\"{}\"]\nroutes:\n  - {{ prefix: /, service: s, max_body_size: 16 }}\n",
        a.addr
    );
    let gateway = GatewayProcess::start(&config).await;
    let mut stream = gateway
        .send_raw(
            b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n",
        )
        .await;
    let interim = read_until(&mut stream, "\r\n\r\n").await;
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    stream.write_all(b"hello").await.unwrap();
    let answer = read_until(&mut stream, "hello").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Over the limit: refused at once, no interim answer, body never asked for.
    let mut stream = gateway.send_raw(b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 500\r\nexpect: 100-continue\r\n\r\n").await;
    let answer = read_until(&mut stream, "\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(a.hits(), 1);
}

#[tokio::test]
async fn a_chunked_upload_split_at_awkward_places_arrives_whole() {
    let a = Backend::start("a");
    let gateway = GatewayProcess::start(&one_service(&[a.addr], "")).await;
    let mut stream = gateway.send_raw(b"POST /echo HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n").await;
    // Each chunk sent in pieces cut inside its size line, its data and its
    // CRLF: reads then end on every kind of boundary, including ones that
    // leave no data to pass on (an empty chunk written upstream would end
    // the body there).
    let mut sent = Vec::new();
    for i in 0..40u8 {
        let data: Vec<u8> = (0..(i as usize % 7) * 300 + 1)
            .map(|n| b'a' + ((n + i as usize) % 26) as u8)
            .collect();
        let framed = [
            format!("{:x}\r\n", data.len()).into_bytes(),
            data.clone(),
            b"\r\n".to_vec(),
        ]
        .concat();
        for piece in [
            &framed[..1],
            &framed[1..framed.len() - 1],
            &framed[framed.len() - 1..],
        ] {
            stream.write_all(piece).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        sent.extend_from_slice(&data);
    }
    stream.write_all(b"0\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..text.len().min(300)]
    );
    let body_at = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = text[..body_at].to_lowercase();
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(&answer[body_at..])
    } else {
        answer[body_at..].to_vec()
    };
    assert_eq!(body.len(), sent.len());
    assert!(body == sent, "the body changed on the way");
}

/// The data of a chunked body.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut data = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..line_end]).unwrap().trim(), 16)
            .unwrap();
        raw = &raw[line_end + 2..];
        if size == 0 {
            return data;
        }
        data.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

#[tokio::test]
async fn an_answer_sent_before_the_body_was_taken_reaches_the_client() {
    // The body is far larger than the socket buffers between the gateway
    // and the instance, so writing it fails once the instance has answered
    // and closed: the client must still get the instance's answer, not a 502.
    const SIZE: usize = 32 * 1024 * 1024;
    let early = EarlyAnswerer::start();
    let gateway = GatewayProcess::start(&single_route("", early.addr)).await;
    for round in 0..3 {
        let head = format!(
            "POST /upload HTTP/1.1\r\nhost: test\r\ncontent-type: application/octet-stream\r\ncontent-length: {SIZE}\r\n\r\n"
        );
        let stream = gateway.send_raw(head.as_bytes()).await;
        let (mut reader, mut writer) = stream.into_split();
        let sender = tokio::spawn(async move {
            let chunk = vec![0x5Au8; 64 * 1024];
            for _ in 0..SIZE / chunk.len() {
                if writer.write_all(&chunk).await.is_err() {
                    return; // the gateway closed: the rest is not wanted
                }
            }
        });
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            let mut buf = [0u8; 4096];
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                }
            }
        });
        read.await.expect("the answer came within 10 s");
        sender.abort();
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 413"),
            "round {round}: {answer}"
        );
        assert!(answer.ends_with(EARLY_ANSWER), "round {round}: {answer}");
        assert!(
            answer.to_lowercase().contains("connection: close"),
            "the client's unread body ends its connection: {answer}"
        );
    }
}
