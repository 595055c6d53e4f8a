//! user-service's `/metrics`: requests counted by route template and
//! status, the domain counter, a clean `promtool check metrics`, and a real
//! Prometheus scraping it.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use user_service::{AppState, app, open_db};

fn value(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn requests_are_counted_by_route_template_and_prometheus_scrapes_them() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(&dir.path().join("users.db")).await.unwrap();
    let addr = service_kit::serve::spawn_local(app(AppState { db }))
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let url = |path: &str| format!("http://{addr}{path}");
    let created = http
        .post(url("/users"))
        .json(&json!({"username": "ann", "email": "ann@example.com", "full_name": "Ann"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    for id in [1, 1, 99] {
        http.get(url(&format!("/users/{id}"))).send().await.unwrap();
    }
    http.get(url("/nowhere")).send().await.unwrap();
    let text = http
        .get(url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = |s: &str| value(&text, s);
    assert_eq!(
        series(
            r#"http_requests_total{code="200",method="GET",route="/users/{id}",service="user-service"}"#
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        series(
            r#"http_requests_total{code="404",method="GET",route="/users/{id}",service="user-service"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        series(
            r#"http_requests_total{code="404",method="GET",route="unmatched",service="user-service"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        series(
            r#"http_request_duration_seconds_count{route="/users/{id}",service="user-service"}"#
        ),
        Some(3.0)
    );
    assert!(
        series("users_created_total").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(
        text.contains(r#"db_query_duration_seconds_count{op="user_get",service="user-service"}"#)
    );

    // promtool finds nothing to complain about.
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (scripts/setup.sh installs it)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // A real Prometheus scrapes it.
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!("global: {{ scrape_interval: 1s }}\nscrape_configs:\n  - job_name: users\n    static_configs: [{{ targets: [\"{addr}\"] }}]\n"),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut prometheus = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prometheus (scripts/setup.sh installs it)");
    let query = format!(
        "http://127.0.0.1:{port}/api/v1/query?query=sum(http_requests_total%7Bservice%3D%22user-service%22%2Croute%3D%22%2Fusers%2F%7Bid%7D%22%7D)"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let total = loop {
        if let Ok(response) = http.get(&query).send().await
            && let Ok(body) = response.json::<Value>().await
            && let Some(first) = body["data"]["result"].get(0)
        {
            break first["value"][1].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "Prometheus never had the series");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    assert_eq!(total, "3");
}
