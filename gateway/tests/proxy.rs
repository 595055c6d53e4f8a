//! The gateway end to end: real backends and the real gateway binary on
//! loopback, port 0. Routing, balancing, health, streaming, errors, headers.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Backend, CaseRecorder, FAST_HEALTH, GatewayProcess, instance_healthy, single_route};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn get_json(url: &str) -> (u16, Value) {
    let response = client().get(url).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test]
async fn routes_by_segment_prefix_and_strips_it() {
    let users = Backend::start("users");
    let other = Backend::start("other");
    let gateway = GatewayProcess::start(&format!(
        "services:
  users: {{ instances: [\"{}\"] }}
  other: {{ instances: [\"{}\"] }}
routes:
  - {{ prefix: /api/users, service: users, strip_prefix: /api }}
  - {{ prefix: /api, service: other }}
",
        users.addr, other.addr
    ))
    .await;

    let (status, seen) = get_json(&gateway.url("/api/users/7?expand=true&x=%20")).await;
    assert_eq!(status, 200);
    assert_eq!(
        (seen["backend"].as_str(), seen["uri"].as_str()),
        (Some("users"), Some("/users/7?expand=true&x=%20"))
    );
    let (_, seen) = get_json(&gateway.url("/api/users")).await;
    assert_eq!(
        (seen["backend"].as_str(), seen["uri"].as_str()),
        (Some("users"), Some("/users"))
    );
    // Not a segment boundary: falls to the shorter /api route, unstripped.
    let (_, seen) = get_json(&gateway.url("/api/usersX")).await;
    assert_eq!(
        (seen["backend"].as_str(), seen["uri"].as_str()),
        (Some("other"), Some("/api/usersX"))
    );

    let response = client().get(gateway.url("/nowhere")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"detail": "No route for this path", "request_id": id})
    );
}

#[tokio::test]
async fn round_robin_spreads_requests_evenly() {
    let backends: Vec<Backend> = (0..3).map(|i| Backend::start(&format!("b{i}"))).collect();
    let instances: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    let gateway = GatewayProcess::start(&format!(
        "services:\n  s: {{ instances: [{}] }}\nroutes:\n  - {{ prefix: /, service: s }}\n",
        instances.join(", ")
    ))
    .await;
    for _ in 0..300 {
        assert_eq!(
            client()
                .get(gateway.url("/x"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let hits: Vec<u64> = backends.iter().map(Backend::hits).collect();
    assert_eq!(hits, [100, 100, 100]);
}

#[tokio::test]
async fn a_failing_instance_leaves_rotation_and_comes_back() {
    let a = Backend::start("a");
    let b = Backend::start("b");
    let gateway = GatewayProcess::start(&format!(
        "{FAST_HEALTH}services:\n  s: {{ instances: [\"{}\", \"{}\"] }}\nroutes:\n  - {{ prefix: /, service: s }}\n",
        a.addr, b.addr
    ))
    .await;
    let a_addr = a.addr.to_string();

    a.set_healthy(false);
    // interval × unhealthy_threshold = 100 ms, plus one probe timeout.
    let took = gateway
        .wait_for_services(Duration::from_secs(2), |s| {
            instance_healthy(s, &a_addr) == Some(false)
        })
        .await;
    assert!(
        took < Duration::from_millis(600),
        "left rotation after {took:?}"
    );
    let before = a.hits();
    for _ in 0..20 {
        let (_, seen) = get_json(&gateway.url("/x")).await;
        assert_eq!(seen["backend"], "b");
    }
    assert_eq!(a.hits(), before);

    a.set_healthy(true);
    let took = gateway
        .wait_for_services(Duration::from_secs(2), |s| {
            instance_healthy(s, &a_addr) == Some(true)
        })
        .await;
    assert!(
        took < Duration::from_millis(600),
        "back in rotation after {took:?}"
    );
    for _ in 0..20 {
        client().get(gateway.url("/x")).send().await.unwrap();
    }
    assert_eq!(a.hits(), before + 10, "even split again");
}

#[tokio::test]
async fn all_instances_down_is_a_fast_503_and_recovery_follows() {
    let a = Backend::start("a");
    let addr = a.addr;
    let gateway = GatewayProcess::start(&format!(
        "{FAST_HEALTH}services:\n  s: {{ instances: [\"{addr}\"] }}\nroutes:\n  - {{ prefix: /, service: s }}\n"
    ))
    .await;
    a.kill();
    gateway
        .wait_for_services(Duration::from_secs(2), |s| {
            instance_healthy(s, &addr.to_string()) == Some(false)
        })
        .await;
    let http = client();
    for _ in 0..5 {
        let started = Instant::now();
        let response = http.get(gateway.url("/x")).send().await.unwrap();
        let took = started.elapsed();
        assert_eq!(response.status(), 503);
        assert!(took < Duration::from_millis(100), "503 took {took:?}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["detail"], "No healthy instance of s");
    }
    let (status, health) = get_json(&gateway.url("/health")).await;
    assert_eq!(status, 200);
    assert_eq!(
        health,
        json!({"gateway": "healthy", "services": {"s": false}, "overall_healthy": false})
    );

    let _back = Backend::start_on("a", addr);
    gateway
        .wait_for_services(Duration::from_secs(2), |s| {
            instance_healthy(s, &addr.to_string()) == Some(true)
        })
        .await;
    assert_eq!(
        http.get(gateway.url("/x")).send().await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn health_and_services_describe_every_instance() {
    let a = Backend::start("a");
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gateway = GatewayProcess::start(&format!(
        "{FAST_HEALTH}services:\n  up: {{ instances: [\"{}\"] }}\n  down: {{ instances: [\"{dead}\"] }}\nroutes:\n  - {{ prefix: /up, service: up }}\n  - {{ prefix: /down, service: down }}\n",
        a.addr
    ))
    .await;
    // The first check ran before the gateway listened: no "unknown" left.
    let (_, health) = get_json(&gateway.url("/health")).await;
    assert_eq!(
        health,
        json!({"gateway": "healthy", "services": {"up": true, "down": false}, "overall_healthy": false})
    );
    let (_, services) = get_json(&gateway.url("/services")).await;
    let list = services["services"].as_array().unwrap();
    let up = list.iter().find(|s| s["name"] == "up").unwrap();
    assert_eq!(up["url"], format!("http://{}", a.addr));
    assert_eq!(up["healthy"], true);
    assert_eq!(
        up["instances"],
        json!([{"address": a.addr.to_string(), "healthy": true, "status": "healthy", "source": "static"}])
    );
    assert_eq!(
        up["discovery"],
        json!({"source": "static", "state": "live", "data_age_seconds": 0.0})
    );
    let down = list.iter().find(|s| s["name"] == "down").unwrap();
    assert_eq!(down["instances"][0]["status"], "unhealthy");
    assert!(down["instances"][0]["last_error"].is_string(), "{down}");
}

#[tokio::test]
async fn a_streamed_response_arrives_chunk_by_chunk() {
    let a = Backend::start("a");
    let gateway = GatewayProcess::start(&single_route("", a.addr)).await;
    let started = Instant::now();
    // 4 chunks, 400 ms apart: the whole answer takes 1.2 s.
    let mut response = client()
        .get(gateway.url("/stream/4/400"))
        .send()
        .await
        .unwrap();
    let first = response.chunk().await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert_eq!(&first[..], b"chunk 0\n");
    assert!(
        first_at < Duration::from_millis(350),
        "first chunk after {first_at:?}"
    );
    let mut rest = Vec::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"chunk 1\nchunk 2\nchunk 3\n");
    assert!(started.elapsed() >= Duration::from_millis(1200));
}

#[tokio::test]
async fn a_large_upload_streams_through_without_growing_memory() {
    const SIZE: u64 = 256 * 1024 * 1024;
    let a = Backend::start("a");
    let gateway = GatewayProcess::start(&single_route("", a.addr)).await;
    let rss_before = gateway.memory_kib("VmRSS");
    let head = format!(
        "POST /upload HTTP/1.1\r\nhost: test\r\ncontent-type: application/octet-stream\r\ncontent-length: {SIZE}\r\nconnection: close\r\n\r\n"
    );
    let mut stream = gateway.send_raw(head.as_bytes()).await;
    let chunk = vec![0xA5u8; 256 * 1024];
    for _ in 0..SIZE / chunk.len() as u64 {
        stream.write_all(&chunk).await.unwrap();
    }
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with(&format!("{{\"bytes\":{SIZE}}}")),
        "{answer}"
    );
    let peak = gateway.memory_kib("VmHWM");
    let growth_mib = peak.saturating_sub(rss_before) / 1024;
    assert!(
        growth_mib < 48,
        "gateway memory grew by {growth_mib} MiB for a 256 MiB upload"
    );
}

#[tokio::test]
async fn any_body_and_any_status_pass_untouched() {
    let a = Backend::start("a");
    let gateway = GatewayProcess::start(&single_route("", a.addr)).await;
    let binary: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let response = client()
        .post(gateway.url("/echo"))
        .header("content-type", "application/x-custom")
        .body(binary.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-custom");
    assert_eq!(response.bytes().await.unwrap().to_vec(), binary);

    let response = client()
        .post(gateway.url("/echo"))
        .body("not json {")
        .send()
        .await
        .unwrap();
    assert_eq!(response.text().await.unwrap(), "not json {");

    let response = client()
        .get(gateway.url("/status/418"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 418);
    assert_eq!(response.headers()["content-type"], "text/plain");
    assert_eq!(response.text().await.unwrap(), "teapot body");
    let response = client()
        .get(gateway.url("/status/500"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        500,
        "an upstream 500 is the upstream's answer"
    );
    assert_eq!(response.text().await.unwrap(), "teapot body");
}

#[tokio::test]
async fn forwarding_headers_request_ids_and_hop_by_hop() {
    let a = Backend::start("a");
    // The test client is a trusted proxy here, so what it forwards is kept
    // (from an untrusted peer it is replaced: `tests/security.rs`).
    let gateway = GatewayProcess::start(&single_route(
        "trusted_proxies: [\"127.0.0.1/32\"]\n",
        a.addr,
    ))
    .await;
    let response = client()
        .get(gateway.url("/x"))
        .header("host", "shop.example")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-request-id", "client-id-1")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "client-id-1");
    let seen: Value = response.json().await.unwrap();
    let headers = &seen["headers"];
    assert_eq!(headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-forwarded-host"], "shop.example");
    assert_eq!(headers["x-request-id"], "client-id-1");
    assert!(
        headers.get("x-hop").is_none(),
        "hop-by-hop header forwarded: {headers}"
    );

    let response = client()
        .get(gateway.url("/x"))
        .header("x-request-id", "no spaces allowed")
        .send()
        .await
        .unwrap();
    let returned = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(returned.len(), 32, "a fresh id replaces an insane one");
    let seen: Value = response.json().await.unwrap();
    assert_eq!(seen["headers"]["x-request-id"], returned);
}

#[tokio::test]
async fn the_headers_plugin_edits_both_directions() {
    let a = Backend::start("a");
    let gateway = GatewayProcess::start(&format!(
        "services:\n  s: {{ instances: [\"{}\"] }}\nroutes:
  - prefix: /
    service: s
    plugins:
      - headers:
          request: {{ set: {{ x-team: shop }}, remove: [cookie] }}
          response: {{ set: {{ cache-control: no-store }} }}
",
        a.addr
    ))
    .await;
    let response = client()
        .get(gateway.url("/x"))
        .header("cookie", "session=1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["cache-control"], "no-store");
    let seen: Value = response.json().await.unwrap();
    assert_eq!(seen["headers"]["x-team"], "shop");
    assert!(seen["headers"].get("cookie").is_none());
}

#[tokio::test]
async fn connect_failures_are_502_and_slow_upstreams_504() {
    let a = Backend::start("a");
    let slow = Backend::start("slow");
    // Health checks far apart, so the dead instance is still "healthy".
    let gateway = GatewayProcess::start(&format!(
        "health_check: {{ interval: 60s }}
services:
  s: {{ instances: [\"{}\"] }}
  slow: {{ instances: [\"{}\"], timeouts: {{ read: 300ms }} }}
routes:
  - {{ prefix: /s, service: s }}
  - {{ prefix: /slow, service: slow }}
",
        a.addr, slow.addr
    ))
    .await;
    a.kill();
    let response = client().get(gateway.url("/s/x")).send().await.unwrap();
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["detail"], "Could not connect to s");

    let started = Instant::now();
    let response = client()
        .get(gateway.url("/slow/2000"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    assert!(started.elapsed() < Duration::from_millis(1500));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["detail"], "slow did not answer in time");
}

#[tokio::test]
async fn a_connect_failure_is_retried_on_another_instance() {
    let a = Backend::start("a");
    let b = Backend::start("b");
    let gateway = GatewayProcess::start(&format!(
        "health_check: {{ interval: 60s }}\nservices:\n  s: {{ instances: [\"{}\", \"{}\"] }}\nroutes:\n  - {{ prefix: /, service: s }}\n",
        a.addr, b.addr
    ))
    .await;
    a.kill();
    for _ in 0..10 {
        let (status, seen) = get_json(&gateway.url("/x")).await;
        assert_eq!((status, seen["backend"].as_str()), (200, Some("b")));
    }
}

/// `0-2,5` → [0, 1, 2, 5] (a `Cpus_allowed_list` line of `/proc`).
#[cfg(target_os = "linux")]
fn cpu_list(text: &str) -> Vec<usize> {
    text.trim()
        .split(',')
        .flat_map(|part| match part.split_once('-') {
            Some((a, b)) => (a.parse().unwrap()..=b.parse().unwrap()).collect::<Vec<usize>>(),
            None => vec![part.parse().unwrap()],
        })
        .collect()
}

#[cfg(target_os = "linux")]
fn allowed_cpus(status: &str) -> Vec<usize> {
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .unwrap();
    cpu_list(line)
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn worker_cpu_affinity_pins_each_worker_to_its_own_cpu() {
    let backend = Backend::start("b");
    let gateway =
        GatewayProcess::start(&single_route("worker_cpu_affinity: true\n", backend.addr)).await;
    // New connections, handed to both workers in turn.
    for _ in 0..4 {
        assert_eq!(get_json(&gateway.url("/x")).await.0, 200);
    }

    let ours = allowed_cpus(&std::fs::read_to_string("/proc/self/status").unwrap());
    let tasks = format!("/proc/{}/task", gateway.pid());
    let mut workers = Vec::new();
    for task in std::fs::read_dir(&tasks).unwrap() {
        let dir = task.unwrap().path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap();
        let status = std::fs::read_to_string(dir.join("status")).unwrap();
        let cpus = allowed_cpus(&status);
        match name.trim_end() {
            // Worker 0 accepts; worker 1 lends a background service's
            // runtime ("BG gateway worker 1", cut to 15 bytes).
            "gateway proxy" => workers.push((0, cpus)),
            "BG gateway work" => workers.push((1, cpus)),
            // Every other thread keeps the process's CPUs.
            _ => assert_eq!(cpus, ours, "{name}"),
        }
    }
    workers.sort();
    let expected: Vec<(usize, Vec<usize>)> =
        (0..2).map(|i| (i, vec![ours[i % ours.len()]])).collect();
    assert_eq!(workers, expected, "{}", gateway.log());

    // Not pinned unless asked.
    let unpinned = GatewayProcess::start(&single_route("", backend.addr)).await;
    for _ in 0..4 {
        assert_eq!(get_json(&unpinned.url("/x")).await.0, 200);
    }
    let tasks = format!("/proc/{}/task", unpinned.pid());
    for task in std::fs::read_dir(&tasks).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        assert_eq!(allowed_cpus(&status), ours);
    }
}

#[tokio::test]
async fn header_names_go_lowercase_unless_their_case_is_preserved() {
    for preserve in [false, true] {
        let backend = CaseRecorder::start();
        let gateway = GatewayProcess::start(&single_route(
            &format!("preserve_header_case: {preserve}\n"),
            backend.addr,
        ))
        .await;
        let mut stream = gateway
            .send_raw(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Custom-Thing: 1\r\n\r\n")
            .await;
        let mut received = Vec::new();
        let mut buf = [0u8; 4096];
        while !received.ends_with(b"\r\n\r\nok") {
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_ne!(n, 0, "closed: {}", String::from_utf8_lossy(&received));
            received.extend_from_slice(&buf[..n]);
        }
        let answer = String::from_utf8(received).unwrap();
        let sent = backend.last_head.lock().unwrap().clone();
        let (custom, backend_field) = if preserve {
            ("\r\nX-Custom-Thing: 1\r\n", "\r\nX-Backend-Thing: yes\r\n")
        } else {
            ("\r\nx-custom-thing: 1\r\n", "\r\nx-backend-thing: yes\r\n")
        };
        assert!(sent.contains(custom), "preserve {preserve}: {sent}");
        assert!(
            answer.contains(backend_field),
            "preserve {preserve}: {answer}"
        );
        // Standard names are capitalized as usual either way.
        assert!(sent.contains("\r\nHost: a\r\n"), "{sent}");
        assert!(answer.contains("\r\nContent-Length: 2\r\n"), "{answer}");
    }
}

/// `work_stealing: true` (one runtime whose two threads steal tasks, and
/// Pingora's shared pool path through the gateway's): concurrent clients
/// on kept-alive connections, balancing, a streamed body both ways, a
/// plugin, and a retry after a dead instance, all as in the default mode.
#[tokio::test]
async fn work_stealing_serves_as_the_default_layout_does() {
    let a = Backend::start("a");
    let b = Backend::start("b");
    let dead = Backend::start("dead");
    let gateway = GatewayProcess::start(&format!(
        "work_stealing: true\nhealth_check: {{ interval: 60s }}\nservices:\n  s: {{ instances: [\"{}\", \"{}\", \"{}\"] }}\nroutes:\n  - prefix: /\n    service: s\n    plugins:\n      - headers: {{ response: {{ set: {{ x-mode: stealing }} }} }}\n",
        a.addr, b.addr, dead.addr
    ))
    .await;
    dead.kill();
    let client = client();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = client.clone();
        let url = gateway.url("/describe");
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..25 {
                let response = client.get(&url).send().await.unwrap();
                assert_eq!(response.status(), 200);
                assert_eq!(response.headers()["x-mode"], "stealing");
                let body: Value = response.json().await.unwrap();
                seen.push(body["backend"].as_str().unwrap().to_owned());
            }
            seen
        }));
    }
    let mut counts = std::collections::HashMap::new();
    for task in tasks {
        for backend in task.await.unwrap() {
            *counts.entry(backend).or_insert(0) += 1;
        }
    }
    assert_eq!(counts.values().sum::<i32>(), 200);
    assert!(!counts.contains_key("dead"), "{counts:?}");
    assert!(
        counts["a"] > 40 && counts["b"] > 40,
        "both serve: {counts:?}"
    );

    let body = vec![b'x'; 1 << 20];
    let response = client
        .post(gateway.url("/upload"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen: Value = response.json().await.unwrap();
    assert_eq!(seen["bytes"], 1 << 20);
}
