//! The launcher end to end: the real stack on free ports runs the seed
//! usage through the gateway, survives the loss of one product-service
//! instance, and stops leaving no process behind.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

const STACK: &str = env!("CARGO_BIN_EXE_stack");
const BINARIES: [&str; 4] = [
    "user-service",
    "product-service",
    "order-service",
    "gateway",
];

fn bin_dir() -> PathBuf {
    Path::new(STACK).parent().unwrap().to_owned()
}

/// The other binaries live in the same target dir; `cargo test --workspace`
/// builds them, `cargo test -p stack` may not have: build them then.
fn ensure_binaries() {
    if BINARIES.iter().all(|b| bin_dir().join(b).is_file()) {
        return;
    }
    let mut build = std::process::Command::new(env!("CARGO"));
    build.args(["build", "--bins"]);
    for binary in BINARIES {
        build.args(["-p", binary]);
    }
    assert!(
        build.status().unwrap().success(),
        "cannot build the service binaries"
    );
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn is_listening(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

type Lines = Arc<Mutex<Vec<String>>>;

/// Appends every line `stream` produces to `output`, in the background.
fn collect_lines(stream: impl tokio::io::AsyncRead + Unpin + Send + 'static, output: &Lines) {
    let sink = Arc::clone(output);
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            sink.lock().unwrap().push(line);
        }
    });
}

/// Waits until a line containing `text` was printed; runs `check` while
/// waiting; panics with everything printed after `limit`.
async fn wait_for_line(output: &Lines, text: &str, limit: Duration, mut check: impl FnMut()) {
    let started = Instant::now();
    while !output.lock().unwrap().iter().any(|l| l.contains(text)) {
        check();
        assert!(
            started.elapsed() < limit,
            "no {text:?} in {limit:?}:\n{}",
            output.lock().unwrap().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_runs_the_usage_survives_an_instance_loss_and_stops_cleanly() {
    ensure_binaries();
    let dir = tempfile::tempdir().unwrap();
    let [gateway, admin, users, products1, products2, orders] = [(); 6].map(|()| free_addr());
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: \"{gateway}\"
admin_listen: \"{admin}\"
health_check: {{ interval: 200ms, timeout: 500ms, healthy_threshold: 1, unhealthy_threshold: 1 }}
services:
  user-service: {{ instances: [\"{users}\"] }}
  product-service: {{ instances: [\"{products1}\", \"{products2}\"] }}
  order-service: {{ instances: [\"{orders}\"] }}
routes:
  - {{ prefix: /api/users, service: user-service, strip_prefix: /api }}
  - {{ prefix: /api/products, service: product-service, strip_prefix: /api }}
  - {{ prefix: /api/orders, service: order-service, strip_prefix: /api }}
"
        ),
    )
    .unwrap();

    // The local broker on free ports too.
    let (nats, nats_monitor) = (free_addr().port(), free_addr().port());
    // Every process exports its spans to one OTLP receiver.
    let receiver = telemetry::receiver::Receiver::start().await.unwrap();
    let mut stack = tokio::process::Command::new(STACK)
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--bin-dir")
        .arg(bin_dir())
        .args(["--nats-port", &nats.to_string()])
        .args(["--nats-monitor-port", &nats_monitor.to_string()])
        // Every process logs JSON lines: one order's trace is then followed
        // through all four.
        .env("LOG_FORMAT", "json")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let output = Arc::new(Mutex::new(Vec::<String>::new()));
    collect_lines(stack.stdout.take().unwrap(), &output);
    collect_lines(stack.stderr.take().unwrap(), &output);
    wait_for_line(&output, "stack ready", Duration::from_secs(60), || {
        assert!(
            stack.try_wait().unwrap().is_none(),
            "stack exited:\n{}",
            output.lock().unwrap().join("\n")
        );
    })
    .await;
    let pid_of = |label: &str| -> i32 {
        let out = output.lock().unwrap();
        // The banner's "  LABEL  pid N  ADDRESS" line.
        let line = out
            .iter()
            .find(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                words.len() > 2 && words[0] == label && words[1] == "pid"
            })
            .unwrap();
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };

    // The seed usage through the gateway.
    let http = reqwest::Client::new();
    let url = |path: &str| format!("http://{gateway}{path}");
    let response = http
        .post(url("/api/users"))
        .json(
            &json!({"username": "john_doe", "email": "john@example.com", "full_name": "John Doe"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.json::<Value>().await.unwrap()["id"], 1);
    let products: Value = http
        .get(url("/api/products"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(products.as_array().unwrap().len(), 3);
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = http
        .post(url("/api/orders"))
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&json!({"user_id": 1, "items": [{"product_id": 1, "quantity": 2}, {"product_id": 2, "quantity": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["x-trace-id"], trace_id);
    let order: Value = response.json().await.unwrap();
    assert_eq!(
        (order["total"].clone(), order["status"].clone()),
        (json!(2612.97), json!("confirmed"))
    );
    let laptop: Value = http
        .get(url("/api/products/1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(laptop["stock"], 8);

    // The order left JSON lines with its trace id in all four processes:
    // the gateway, order-service, and the two it called.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let labels: std::collections::BTreeSet<String> = output
            .lock()
            .unwrap()
            .iter()
            .filter_map(|line| line.split_once(" | "))
            .filter_map(|(label, json)| {
                let parsed: Value = serde_json::from_str(json).ok()?;
                (parsed["trace_id"] == trace_id).then(|| {
                    let label = label.trim();
                    label.strip_suffix("-2").unwrap_or(label).to_owned()
                })
            })
            .collect();
        let wanted = [
            "gateway",
            "order-service",
            "product-service",
            "user-service",
        ];
        if wanted.iter().all(|w| labels.contains(*w)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "trace {trace_id} seen in {labels:?} only:\n{}",
            output.lock().unwrap().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ... and one trace of spans across the four, each linked to its
    // parent: client → gateway request → attempt → order-service request →
    // its calls → user-service's and product-service's requests.
    let spans = receiver
        .wait_for(Duration::from_secs(15), |spans| {
            let services: std::collections::BTreeSet<&str> = spans
                .iter()
                .filter(|s| s.trace_id == trace_id && s.kind == 2)
                .map(|s| s.service.as_str())
                .collect();
            services.len() == 4
        })
        .await;
    let spans: Vec<_> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    let summary = || {
        spans
            .iter()
            .map(|s| {
                format!(
                    "{} {:?} {} <- {}",
                    s.service, s.name, s.span_id, s.parent_span_id
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let find = |service: &str, name: &str| {
        spans
            .iter()
            .find(|s| s.service == service && s.name == name)
            .unwrap_or_else(|| panic!("no span {service} {name:?} in:\n{}", summary()))
    };
    let gateway_request = find("gateway", "POST /api/orders");
    assert_eq!(gateway_request.parent_span_id, "00f067aa0ba902b7");
    let attempt = find("gateway", "POST order-service");
    assert_eq!(attempt.parent_span_id, gateway_request.span_id);
    let order_request = find("order-service", "POST /orders");
    assert_eq!(
        order_request.parent_span_id,
        attempt.span_id,
        "{}",
        summary()
    );
    let user_call = find("order-service", "GET user-service /users/{id}");
    assert_eq!(user_call.parent_span_id, order_request.span_id);
    let user_request = find("user-service", "GET /users/{id}");
    assert_eq!(user_request.parent_span_id, user_call.span_id);
    let reserve_call = find("order-service", "POST product-service /reservations");
    assert_eq!(reserve_call.parent_span_id, order_request.span_id);
    let reserve_request = find("product-service", "POST /reservations");
    assert_eq!(reserve_request.parent_span_id, reserve_call.span_id);
    let insert = find("order-service", "db order_insert_pending");
    assert_eq!(insert.parent_span_id, order_request.span_id);
    let reserve_commit = find("product-service", "db reserve_commit");
    assert_eq!(reserve_commit.parent_span_id, reserve_request.span_id);
    // Every span's parent is in the trace, but the client's.
    for span in &spans {
        assert!(
            span.parent_span_id == "00f067aa0ba902b7"
                || spans.iter().any(|p| p.span_id == span.parent_span_id),
            "{} {:?} has no parent in the trace:\n{}",
            span.service,
            span.name,
            summary()
        );
    }

    // The gateway's merged API document: every service's paths as clients
    // reach them, their schemas under the service's name.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let document: Value = loop {
        let document: Value = http
            .get(url("/openapi.json"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let services = &document["x-gateway-services"];
        let all = ["user-service", "product-service", "order-service"]
            .iter()
            .all(|s| services[s]["available"] == true);
        if all || std::time::Instant::now() > deadline {
            break document;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(document["openapi"], "3.1.0");
    let paths: Vec<&str> = document["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for wanted in [
        "/api/users",
        "/api/users/{id}",
        "/api/products",
        "/api/products/{id}/stock",
        "/api/orders",
        "/api/orders/{id}/cancel",
    ] {
        assert!(paths.contains(&wanted), "{wanted} not in {paths:?}");
    }
    assert!(
        !paths
            .iter()
            .any(|p| *p == "/health" || p.starts_with("/users")),
        "paths no route reaches are left out: {paths:?}"
    );
    assert_eq!(
        document["paths"]["/api/users/{id}"]["get"]["responses"]["200"]["content"]["application/json"]
            ["schema"]["$ref"],
        "#/components/schemas/user-service.User"
    );
    // Every reference resolves, and every schema is valid JSON Schema
    // 2020-12 (OpenAPI 3.1's dialect).
    let text = document.to_string();
    let components = &document["components"]["schemas"];
    for (start, _) in text.match_indices("\"#/components/schemas/") {
        let name = &text[start + 22..];
        let name = &name[..name.find('"').unwrap()];
        assert!(components[name].is_object(), "dangling $ref to {name}");
    }
    for (name, schema) in components.as_object().unwrap() {
        let mut root = schema.clone();
        root["components"] = document["components"].clone();
        assert!(
            jsonschema::draft202012::meta::is_valid(schema),
            "{name} is not JSON Schema 2020-12"
        );
        jsonschema::draft202012::new(&root).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // The page, offline: everything from the gateway itself.
    let no_redirect = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let moved = no_redirect.get(url("/docs")).send().await.unwrap();
    assert_eq!(moved.status(), 301);
    assert_eq!(moved.headers()["location"], "/docs/");
    let page = http.get(url("/docs/")).send().await.unwrap();
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = page.text().await.unwrap();
    for asset in [
        "swagger-ui-bundle.js",
        "swagger-ui.css",
        "swagger-initializer.js",
    ] {
        assert!(page.contains(asset), "{asset} not on the page");
        let response = http
            .get(url(&format!("/docs/{asset}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{asset}");
    }
    let initializer = http
        .get(url("/docs/swagger-initializer.js"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(initializer.contains("\"/openapi.json\""), "{initializer}");
    assert!(
        !page.contains("//unpkg") && !page.contains("https://"),
        "no other host"
    );

    let health: Value = http
        .get(url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["overall_healthy"], true);

    // Kill one product-service instance: product requests keep working.
    let victim = pid_of("product-service-2");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    for _ in 0..30 {
        let response = http.get(url("/api/products")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The launcher noticed, said so, and restarted it.
    wait_for_line(
        &output,
        "restarted product-service-2",
        Duration::from_secs(10),
        || {},
    )
    .await;
    assert!(
        output
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("product-service-2 DIED"))
    );

    // Stop: every process goes, every port is free.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(stack.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(40), stack.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.success(),
        "{status}:\n{}",
        output.lock().unwrap().join("\n")
    );
    for addr in [gateway, admin, users, products1, products2, orders] {
        assert!(
            !is_listening(addr),
            "{addr} still listening after the stack stopped"
        );
    }
    // No child left: none of the binaries runs with this test's config or data.
    let data = dir.path().display().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read_to_string(entry.path().join("cmdline")) {
            let state = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let zombie = state.split_whitespace().nth(2) == Some("Z");
            assert!(
                zombie || !cmdline.contains(&data),
                "left behind: {}",
                cmdline.replace('\0', " ")
            );
        }
    }
}

#[tokio::test]
async fn a_busy_port_is_named_and_nothing_starts() {
    ensure_binaries();
    let dir = tempfile::tempdir().unwrap();
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: \"{}\"\nservices:\n  user-service: {{ instances: [\"{busy_addr}\"] }}\nroutes:\n  - {{ prefix: /api/users, service: user-service }}\n",
            free_addr()
        ),
    )
    .unwrap();
    let output = std::process::Command::new(STACK)
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--bin-dir")
        .arg(bin_dir())
        .arg("--no-broker")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "port {} (user-service) is already in use",
            busy_addr.port()
        )),
        "{stderr}"
    );
}
