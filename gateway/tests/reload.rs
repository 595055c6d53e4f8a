//! Hot reload end to end: edits of gateway.yaml take effect within a second,
//! invalid files change nothing, and rewrites under load lose no request.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Backend, GatewayProcess, single_route};

/// Health checks fast enough that new instances are admitted at once.
const HEALTH: &str = "health_check: { interval: 50ms, timeout: 200ms, healthy_threshold: 1, unhealthy_threshold: 1 }\n";

/// The backend that answered `path`, or the status if it was not a 200.
async fn who(client: &reqwest::Client, url: &str) -> String {
    let response = client.get(url).send().await.unwrap();
    if response.status() != 200 {
        return response.status().as_u16().to_string();
    }
    let body: Value = response.json().await.unwrap();
    body["backend"].as_str().unwrap().to_owned()
}

/// Polls until `check` holds, returning how long after `since` it held;
/// panics after 3 s.
async fn until(since: Instant, mut check: impl AsyncFnMut() -> bool) -> Duration {
    loop {
        if check().await {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < Duration::from_secs(3),
            "not applied within 3 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn routes_and_instances_follow_the_file_within_a_second() {
    let (a, b, c) = (
        Backend::start("a"),
        Backend::start("b"),
        Backend::start("c"),
    );
    let services = |s2: &str| {
        format!(
            "{HEALTH}services:\n  s1: {{ instances: [\"{}\"] }}\n  s2: {{ instances: [{s2}] }}\n",
            a.addr
        )
    };
    let b_only = format!("\"{}\"", b.addr);
    let b_and_c = format!("\"{}\", \"{}\"", b.addr, c.addr);
    let c_only = format!("\"{}\"", c.addr);
    let gateway = GatewayProcess::start(&format!(
        "{}routes:\n  - {{ prefix: /one, service: s1 }}\n",
        services(&b_only)
    ))
    .await;
    let http = reqwest::Client::new();
    let (one, two) = (gateway.url("/one/x"), gateway.url("/two/x"));
    assert_eq!(who(&http, &two).await, "404");
    let mut took = Vec::new();

    // Add a route.
    let written = Instant::now();
    gateway.write_config(&format!(
        "{}routes:\n  - {{ prefix: /one, service: s1 }}\n  - {{ prefix: /two, service: s2 }}\n",
        services(&b_only)
    ));
    took.push((
        "add a route",
        until(written, async || who(&http, &two).await == "b").await,
    ));

    // Change a route's service.
    let written = Instant::now();
    gateway.write_config(&format!(
        "{}routes:\n  - {{ prefix: /one, service: s2 }}\n  - {{ prefix: /two, service: s2 }}\n",
        services(&b_only)
    ));
    took.push((
        "change a route's service",
        until(written, async || who(&http, &one).await == "b").await,
    ));

    // Add an instance: both take traffic.
    let written = Instant::now();
    gateway.write_config(&format!(
        "{}routes:\n  - {{ prefix: /one, service: s2 }}\n  - {{ prefix: /two, service: s2 }}\n",
        services(&b_and_c)
    ));
    took.push((
        "add an instance",
        until(written, async || who(&http, &two).await == "c").await,
    ));

    // Remove an instance: from then on, only c.
    let written = Instant::now();
    gateway.write_config(&format!(
        "{}routes:\n  - {{ prefix: /one, service: s2 }}\n  - {{ prefix: /two, service: s2 }}\n",
        services(&c_only)
    ));
    let removed = until(written, async || {
        gateway.admin_config().await["version"] == 5
    })
    .await;
    took.push(("remove an instance", removed));
    for _ in 0..10 {
        assert_eq!(who(&http, &two).await, "c");
    }

    // Remove a route.
    let written = Instant::now();
    gateway.write_config(&format!(
        "{}routes:\n  - {{ prefix: /one, service: s2 }}\n",
        services(&c_only)
    ));
    took.push((
        "remove a route",
        until(written, async || who(&http, &two).await == "404").await,
    ));

    for (what, elapsed) in &took {
        eprintln!(
            "reload latency, {what}: {:.1} ms",
            elapsed.as_secs_f64() * 1000.0
        );
        assert!(*elapsed < Duration::from_secs(1), "{what} took {elapsed:?}");
    }
    let config = gateway.admin_config().await;
    assert_eq!(config["version"], 6);
    assert_eq!(config["last_reload"]["result"], "applied");
}

#[tokio::test]
async fn invalid_files_change_nothing_and_are_reported_with_their_place() {
    let a = Backend::start("a");
    let good = format!(
        "{HEALTH}services:\n  s: {{ instances: [\"{}\"] }}\nroutes:\n  - {{ prefix: /s, service: s }}\n",
        a.addr
    );
    let gateway = GatewayProcess::start(&good).await;
    let http = reqwest::Client::new();
    let mut last = gateway.admin_config().await["last_reload"].clone();

    let full = std::fs::read_to_string(&gateway.config_path).unwrap();
    let bad_files = [
        ("invalid YAML", full.replace("routes:\n", "routes: [\n")),
        (
            "unknown service",
            full.replace("service: s }", "service: nope }"),
        ),
        ("truncated file", full[..full.len() - 20].to_owned()),
    ];
    for (what, text) in bad_files {
        gateway.write_raw(&text);
        let attempt = gateway.next_reload(&last).await;
        assert_eq!(attempt["result"], "rejected", "{what}: {attempt}");
        let error = &attempt["errors"][0];
        assert!(
            error["line"].as_u64().unwrap() > 0 && error["column"].as_u64().unwrap() > 0,
            "{what}: {attempt}"
        );
        assert!(
            attempt["message"]
                .as_str()
                .unwrap()
                .contains("gateway.yaml:"),
            "{what}: {attempt}"
        );
        assert_eq!(gateway.admin_config().await["version"], 1, "{what}");
        assert_eq!(
            who(&http, &gateway.url("/s/x")).await,
            "a",
            "{what}: still serving"
        );
        last = attempt;
    }
    assert!(
        gateway.log().contains("configuration rejected"),
        "logged too:\n{}",
        gateway.log()
    );

    // A good file again is applied.
    gateway.write_raw(&full.replace("prefix: /s,", "prefix: /t,"));
    let attempt = gateway.next_reload(&last).await;
    assert_eq!(attempt["result"], "applied", "{attempt}");
    assert_eq!(who(&http, &gateway.url("/t/x")).await, "a");
}

#[tokio::test]
async fn a_new_instance_failing_its_check_gets_no_traffic() {
    let a = Backend::start("a");
    let sick = Backend::start("sick");
    sick.set_healthy(false);
    let gateway = GatewayProcess::start(&single_route(HEALTH, a.addr)).await;
    let last = gateway.admin_config().await["last_reload"].clone();
    gateway.write_config(&format!(
        "{HEALTH}services:\n  s: {{ instances: [\"{}\", \"{}\"] }}\nroutes:\n  - {{ prefix: /, service: s }}\n",
        a.addr, sick.addr
    ));
    assert_eq!(gateway.next_reload(&last).await["result"], "applied");
    let http = reqwest::Client::new();
    for _ in 0..50 {
        assert_eq!(who(&http, &gateway.url("/x")).await, "a");
    }
    assert_eq!(sick.hits(), 0);
}

#[tokio::test]
async fn rewrites_under_load_lose_no_request() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let version = |service: &str| {
        format!(
            "{HEALTH}services:\n  sa: {{ instances: [\"{}\"] }}\n  sb: {{ instances: [\"{}\"] }}\nroutes:\n  - {{ prefix: /, service: {service} }}\n",
            a.addr, b.addr
        )
    };
    let gateway = Arc::new(GatewayProcess::start(&version("sa")).await);
    let failures = Arc::new(AtomicU64::new(0));
    let mut clients = tokio::task::JoinSet::new();
    let stop_at = Instant::now() + Duration::from_secs(5);
    for _ in 0..20 {
        let (gateway, failures) = (Arc::clone(&gateway), Arc::clone(&failures));
        clients.spawn(async move {
            let http = reqwest::Client::new();
            let mut seen: HashMap<String, u64> = HashMap::new();
            while Instant::now() < stop_at {
                match http.get(gateway.url("/x")).send().await {
                    Ok(response) if response.status() == 200 => {
                        let body: Value = response.json().await.unwrap();
                        *seen
                            .entry(body["backend"].as_str().unwrap().to_owned())
                            .or_default() += 1;
                    }
                    Ok(response) => {
                        eprintln!("failed: {}", response.status());
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(err) => {
                        eprintln!("failed: {err}");
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            seen
        });
    }
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        gateway.write_config(&version(if i % 2 == 0 { "sb" } else { "sa" }));
    }
    let mut total: HashMap<String, u64> = HashMap::new();
    while let Some(seen) = clients.join_next().await {
        for (backend, n) in seen.unwrap() {
            *total.entry(backend).or_default() += n;
        }
    }
    let requests: u64 = total.values().sum();
    eprintln!(
        "{requests} requests during 10 rewrites: {total:?}, failures: {}",
        failures.load(Ordering::SeqCst)
    );
    assert_eq!(failures.load(Ordering::SeqCst), 0);
    assert!(total.keys().all(|k| k == "a" || k == "b"), "{total:?}");
    assert!(
        total.get("a").copied().unwrap_or(0) > 0 && total.get("b").copied().unwrap_or(0) > 0,
        "{total:?}"
    );
    let config = gateway.admin_config().await;
    assert_eq!(
        config["version"], 11,
        "ten rewrites, ten versions: {config}"
    );
}

#[tokio::test]
async fn sighup_and_the_admin_endpoint_reload_and_listen_changes_are_reported() {
    let a = Backend::start("a");
    let body = single_route(HEALTH, a.addr);
    let gateway = GatewayProcess::start(&body).await;

    let last = gateway.admin_config().await["last_reload"].clone();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &gateway.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let attempt = gateway.next_reload(&last).await;
    assert_eq!(
        (attempt["trigger"].as_str(), attempt["result"].as_str()),
        (Some("sighup"), Some("unchanged"))
    );

    // A new listen address cannot be applied live: said, and the rest applies.
    let text = std::fs::read_to_string(&gateway.config_path).unwrap();
    let moved = text
        .replace(&gateway.addr.to_string(), "127.0.0.1:1")
        .replace("prefix: /,", "prefix: /moved,");
    // The file watcher picks the write up within its 100 ms debounce; an
    // admin request sent after the write raced it (on a loaded machine the
    // watcher won and the request found nothing new). So: the watcher's
    // attempt is checked, then the admin endpoint on the file as it is.
    let before = gateway.admin_config().await["last_reload"].clone();
    std::fs::write(&gateway.config_path, moved).unwrap();
    let outcome = gateway.next_reload(&before).await;
    assert_eq!(outcome["result"], "applied", "{outcome}");
    let notes = outcome["restart_required"].as_array().unwrap();
    assert!(
        notes.len() == 1 && notes[0].as_str().unwrap().starts_with("listen:"),
        "{outcome}"
    );
    let response = reqwest::Client::new()
        .post(gateway.admin_url("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let again: Value = response.json().await.unwrap();
    assert_eq!(again["result"], "unchanged", "{again}");
    assert_eq!(
        who(&reqwest::Client::new(), &gateway.url("/moved/x")).await,
        "a",
        "still on the old port"
    );
}

#[tokio::test]
async fn kept_instances_keep_their_pooled_connections() {
    let a = Backend::start("a");
    let body = |prefix: &str| {
        format!(
            "{HEALTH}services:\n  s: {{ instances: [\"{}\"] }}\nroutes:\n  - {{ prefix: {prefix}, service: s }}\n",
            a.addr
        )
    };
    let gateway = GatewayProcess::start(&body("/")).await;
    let http = reqwest::Client::new();
    for _ in 0..5 {
        assert_eq!(who(&http, &gateway.url("/x")).await, "a");
    }
    let before = a.connections();
    let last = gateway.admin_config().await["last_reload"].clone();
    gateway.write_config(&format!(
        "{}  - {{ prefix: /other, service: s }}\n",
        body("/")
    ));
    assert_eq!(gateway.next_reload(&last).await["result"], "applied");
    for _ in 0..5 {
        assert_eq!(who(&http, &gateway.url("/x")).await, "a");
    }
    // Sequential requests ride one pooled upstream connection, before and
    // after the reload alike.
    assert_eq!((before, a.connections()), (1, 1));
}
