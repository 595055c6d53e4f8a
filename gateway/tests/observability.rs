//! What an operator sees of the gateway: the Prometheus exposition (exact
//! counts, health flips, reload results, `promtool check metrics`, a real
//! Prometheus scraping it), JSON log lines, and W3C trace context.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Backend, Extras, FAST_HEALTH, GatewayProcess};

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn scrape(gateway: &GatewayProcess) -> String {
    let response = client()
        .get(gateway.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    response.text().await.unwrap()
}

/// The value of the series written exactly `series` (labels in the order
/// the exposition sorts them: alphabetical).
fn value(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `promtool check metrics` on an exposition: its complaints, if any.
fn promtool_check(exposition: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|err| format!("promtool (scripts/setup.sh installs it): {err}"))?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

#[tokio::test]
async fn a_scrape_counts_exactly_the_requests_sent_and_passes_promtool() {
    let backend = Backend::start("b");
    let gateway = GatewayProcess::start(&format!(
        "services:\n  s: {{ instances: [\"{}\"] }}\nroutes:\n  - {{ prefix: /api, service: s, strip_prefix: /api }}\n",
        backend.addr
    ))
    .await;
    for _ in 0..7 {
        let response = client().get(gateway.url("/api/x")).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    for _ in 0..3 {
        let response = client().get(gateway.url("/nowhere")).send().await.unwrap();
        assert_eq!(response.status(), 404);
    }
    let response = client()
        .get(gateway.url("/api/status/503"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let text = scrape(&gateway).await;
    let series = |s: &str| value(&text, s);
    assert_eq!(
        series(r#"gateway_requests_total{code="200",method="GET",route="/api",service="s"}"#),
        Some(7.0),
        "{text}"
    );
    assert_eq!(
        series(r#"gateway_requests_total{code="404",method="GET",route="-",service="-"}"#),
        Some(3.0)
    );
    assert_eq!(
        series(r#"gateway_requests_total{code="503",method="GET",route="/api",service="s"}"#),
        Some(1.0)
    );
    assert_eq!(
        series(r#"gateway_request_duration_seconds_count{route="/api",service="s"}"#),
        Some(8.0)
    );
    let instance = backend.addr.to_string();
    assert_eq!(
        series(&format!(
            r#"gateway_upstream_attempts_total{{instance="{instance}",outcome="ok",service="s"}}"#
        )),
        Some(7.0)
    );
    assert_eq!(
        series(&format!(
            r#"gateway_upstream_attempts_total{{instance="{instance}",outcome="http_5xx",service="s"}}"#
        )),
        Some(1.0)
    );
    assert_eq!(
        series(&format!(
            r#"gateway_upstream_healthy{{instance="{instance}",service="s"}}"#
        )),
        Some(1.0)
    );
    assert_eq!(series("gateway_config_version"), Some(1.0));
    assert_eq!(series("gateway_config_last_reload_success"), Some(1.0));
    assert!(series("gateway_connections_open").is_some());
    assert!(series("gateway_requests_in_flight").is_some());
    assert!(text.contains("gateway_build_info{version="), "{text}");
    promtool_check(&text).unwrap();
}

#[tokio::test]
async fn a_killed_instance_turns_unhealthy_and_a_rejected_reload_is_counted() {
    let a = Backend::start("a");
    let b = Backend::start("b");
    let gateway = GatewayProcess::start(&format!(
        "{FAST_HEALTH}services:\n  s: {{ instances: [\"{}\", \"{}\"] }}\nroutes:\n  - {{ prefix: /api, service: s }}\n",
        a.addr, b.addr
    ))
    .await;
    let killed = b.addr.to_string();
    let series = format!(r#"gateway_upstream_healthy{{instance="{killed}",service="s"}}"#);
    assert_eq!(value(&scrape(&gateway).await, &series), Some(1.0));
    b.kill();
    let started = Instant::now();
    loop {
        if value(&scrape(&gateway).await, &series) == Some(0.0) {
            break;
        }
        // Two failed checks 50 ms apart, and a margin.
        assert!(started.elapsed() < Duration::from_secs(2), "still healthy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let before = gateway.admin_config().await["last_reload"].clone();
    gateway.write_raw("listen: [not valid\n");
    let attempt = gateway.next_reload(&before).await;
    assert_eq!(attempt["result"], "rejected");
    let text = scrape(&gateway).await;
    assert_eq!(
        value(&text, "gateway_config_last_reload_success"),
        Some(0.0)
    );
    assert_eq!(
        value(&text, r#"gateway_config_reloads_total{result="rejected"}"#),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn metrics_are_on_the_admin_listener_only_and_behind_its_token() {
    let backend = Backend::start("b");
    let gateway = GatewayProcess::start_with(
        &support::single_route("", backend.addr),
        &Extras {
            admin_token: Some("metrics-token"),
            ..Extras::default()
        },
    )
    .await;
    let public = client().get(gateway.url("/metrics")).send().await.unwrap();
    let seen: Value = public.json().await.unwrap();
    assert_eq!(
        seen["backend"], "b",
        "the public /metrics is the upstream's"
    );
    let anonymous = client()
        .get(gateway.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let scraped = client()
        .get(gateway.admin_url("/metrics"))
        .bearer_auth("metrics-token")
        .send()
        .await
        .unwrap();
    assert_eq!(scraped.status(), 200);
}

/// A real Prometheus on a free port scraping the gateway for a few
/// seconds; its HTTP API returns the gateway's series.
#[tokio::test]
async fn a_real_prometheus_scrapes_the_gateway() {
    let backend = Backend::start("b");
    let gateway = GatewayProcess::start(&format!(
        "services:\n  s: {{ instances: [\"{}\"] }}\nroutes:\n  - {{ prefix: /api, service: s }}\n",
        backend.addr
    ))
    .await;
    for _ in 0..5 {
        client().get(gateway.url("/api/x")).send().await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{ scrape_interval: 1s }}\nscrape_configs:\n  - job_name: gateway\n    static_configs: [{{ targets: [\"{}\"] }}]\n",
            gateway.admin
        ),
    )
    .unwrap();
    let port = support::free_port();
    let mut prometheus = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prometheus (scripts/setup.sh installs it)");
    let query = format!(
        "http://127.0.0.1:{port}/api/v1/query?query=gateway_requests_total%7Broute%3D%22%2Fapi%22%7D"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let found = loop {
        if let Ok(response) = client().get(&query).send().await
            && let Ok(body) = response.json::<Value>().await
            && let Some(result) = body["data"]["result"].as_array()
            && !result.is_empty()
        {
            break result.clone();
        }
        assert!(Instant::now() < deadline, "Prometheus never had the series");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    let series = &found[0];
    assert_eq!(series["metric"]["job"], "gateway");
    assert_eq!(series["metric"]["code"], "200");
    assert_eq!(series["metric"]["service"], "s");
    assert_eq!(series["value"][1], "5");
}

#[tokio::test]
async fn json_log_lines_parse_and_carry_the_shared_fields() {
    let backend = Backend::start("b");
    let gateway = GatewayProcess::start_with(
        &support::single_route("", backend.addr),
        &Extras {
            env: vec![("LOG_FORMAT", "json")],
            ..Extras::default()
        },
    )
    .await;
    let response = client()
        .get(gateway.url("/x"))
        .header("x-request-id", "json-log-1")
        .send()
        .await
        .unwrap();
    let trace_id = response.headers()["x-trace-id"]
        .to_str()
        .unwrap()
        .to_owned();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = gateway.log();
    let mut access = None;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let parsed: Value =
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}"));
        for field in ["ts", "level", "service", "msg"] {
            assert!(parsed.get(field).is_some(), "{field} missing: {line}");
        }
        assert_eq!(parsed["service"], "gateway");
        if parsed["request_id"] == "json-log-1" {
            access = Some(parsed);
        }
    }
    let access = access.expect("no access line");
    assert_eq!(access["target"], "access");
    assert_eq!(access["trace_id"], trace_id);
    assert_eq!(access["method"], "GET");
    assert_eq!(access["path"], "/x");
    assert_eq!(access["route"], "/");
    assert_eq!(access["status"], 200);
    assert_eq!(access["attempts"], 1);
    assert_eq!(access["upstream"], backend.addr.to_string());
    assert!(access["duration_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(access["span_id"].as_str().unwrap().len(), 16);
    assert!(humantime::parse_rfc3339(access["ts"].as_str().unwrap()).is_ok());
}

#[tokio::test]
async fn a_valid_traceparent_is_continued_and_a_malformed_one_replaced() {
    let backend = Backend::start("b");
    let gateway = GatewayProcess::start(&support::single_route("", backend.addr)).await;
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let response = client()
        .get(gateway.url("/x"))
        .header("traceparent", incoming)
        .header("tracestate", "vendor=1")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["x-trace-id"],
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    let seen: Value = response.json().await.unwrap();
    let sent = seen["headers"]["traceparent"].as_str().unwrap();
    assert!(
        sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{sent}"
    );
    assert!(sent.ends_with("-01"), "the sampled flag is kept: {sent}");
    assert_ne!(
        &sent[36..52],
        "00f067aa0ba902b7",
        "the gateway's own span is the parent"
    );
    assert_eq!(seen["headers"]["tracestate"], "vendor=1");

    for malformed in [
        "garbage",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
    ] {
        let response = client()
            .get(gateway.url("/x"))
            .header("traceparent", malformed)
            .header("tracestate", "vendor=1")
            .send()
            .await
            .unwrap();
        let trace_id = response.headers()["x-trace-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(trace_id.len(), 32);
        assert_ne!(trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        let seen: Value = response.json().await.unwrap();
        let sent = seen["headers"]["traceparent"].as_str().unwrap();
        assert!(sent.starts_with(&format!("00-{trace_id}-")), "{sent}");
        assert!(
            seen["headers"].get("tracestate").is_none(),
            "tracestate of a bad traceparent"
        );
    }
    // No traceparent at all: a new trace, also on the gateway's own answers.
    let response = client().get(gateway.url("/health")).send().await.unwrap();
    assert_eq!(response.headers()["x-trace-id"].to_str().unwrap().len(), 32);
}

/// Spans go to a real OTLP/HTTP receiver: the gateway's request span
/// continues the client's trace, each attempt is its child, and the
/// upstream is told the attempt's span as its parent. A sampler that says
/// no exports nothing, while the context is still propagated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_with_the_right_parents() {
    use telemetry::receiver::Receiver;
    let receiver = Receiver::start().await.unwrap();
    let backend = Backend::start("b");
    let env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let gateway = GatewayProcess::start_with(
        &support::single_route("", backend.addr),
        &Extras {
            env: env.clone(),
            ..Extras::default()
        },
    )
    .await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = client()
        .get(gateway.url("/api/things"))
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen: Value = response.json().await.unwrap();
    let sent = seen["headers"]["traceparent"].as_str().unwrap().to_owned();

    let spans = receiver
        .wait_for(Duration::from_secs(10), |spans| {
            spans.iter().filter(|s| s.trace_id == trace_id).count() >= 2
        })
        .await;
    let spans: Vec<_> = spans
        .into_iter()
        .filter(|s| s.trace_id == trace_id)
        .collect();
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let server = spans.iter().find(|s| s.kind == 2).expect("a server span");
    let attempt = spans.iter().find(|s| s.kind == 3).expect("a client span");
    assert_eq!(server.service, "gateway");
    assert_eq!(server.name, "GET /");
    assert_eq!(
        server.parent_span_id, "00f067aa0ba902b7",
        "the client's span"
    );
    assert_eq!(server.attribute("http.response.status_code"), Some("200"));
    assert_eq!(server.attribute("http.route"), Some("/"));
    assert_eq!(attempt.parent_span_id, server.span_id);
    assert_eq!(attempt.attribute("gateway.outcome"), Some("ok"));
    assert_eq!(
        sent,
        format!("00-{trace_id}-{}-01", attempt.span_id),
        "the upstream's parent is the attempt's span"
    );
    assert_eq!(
        attempt.attribute("server.port"),
        Some(backend.addr.port().to_string().as_str())
    );

    // A trace the gateway starts is sampled by the default sampler
    // (parentbased_always_on) and has no parent.
    let response = client().get(gateway.url("/api/new")).send().await.unwrap();
    let started = response.headers()["x-trace-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let spans = receiver
        .wait_for(Duration::from_secs(10), |spans| {
            spans.iter().any(|s| s.trace_id == started && s.kind == 2)
        })
        .await;
    let root = spans
        .iter()
        .find(|s| s.trace_id == started && s.kind == 2)
        .expect("the new trace's root span");
    assert_eq!(root.parent_span_id, "");

    // always_off: nothing exported, the context still goes upstream (not
    // sampled: this sampler does not follow the caller).
    let quiet = Receiver::start().await.unwrap();
    let gateway = GatewayProcess::start_with(
        &support::single_route("", backend.addr),
        &Extras {
            env: vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", quiet.endpoint.as_str()),
                ("OTEL_BSP_SCHEDULE_DELAY", "100"),
                ("OTEL_TRACES_SAMPLER", "always_off"),
            ],
            ..Extras::default()
        },
    )
    .await;
    for _ in 0..5 {
        let response = client()
            .get(gateway.url("/api/x"))
            .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
            .send()
            .await
            .unwrap();
        let seen: Value = response.json().await.unwrap();
        let sent = seen["headers"]["traceparent"].as_str().unwrap();
        assert!(sent.starts_with(&format!("00-{trace_id}-")), "{sent}");
        assert!(sent.ends_with("-00"), "{sent}");
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(quiet.spans().is_empty(), "{:#?}", quiet.spans());

    // A sampler the gateway does not know stops it at start-up, named.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: \"127.0.0.1:{}\"\n{}",
            support::free_port(),
            support::single_route("", backend.addr)
        ),
    )
    .unwrap();
    let output = std::process::Command::new(support::GATEWAY)
        .arg("--config")
        .arg(&config)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint)
        .env("OTEL_TRACES_SAMPLER", "sometimes")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("OTEL_TRACES_SAMPLER"), "{text}");
}
