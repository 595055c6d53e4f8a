//! The example plugin in the real gateway binary it builds: numbers seen
//! by the upstream and the client, a count that survives a reload, a new
//! count when its settings change, the 429 past the limit, and located
//! errors for bad settings.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway-request-counter");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A backend that answers every request with the `x-count` it received.
fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve(stream));
        }
    });
    addr
}

fn serve(stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut count = String::from("none");
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("x-count")
            {
                count = value.trim().to_owned();
            }
        }
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{count}",
            count.len()
        );
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

struct Gateway {
    addr: SocketAddr,
    admin: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config_text(
    gateway: (SocketAddr, SocketAddr),
    backend: SocketAddr,
    plugin: &str,
    extra_route: bool,
) -> String {
    let (addr, admin) = gateway;
    let extra = if extra_route {
        "  - { prefix: /other, service: echo }\n"
    } else {
        ""
    };
    format!(
        "listen: \"{addr}\"\nadmin_listen: \"{admin}\"\nthreads: 2\n\
         health_check: {{ path: /health, interval: 200ms }}\n\
         services:\n  echo:\n    instances: [\"{backend}\"]\n\
         routes:\n  - prefix: /api\n    service: echo\n    plugins:\n      - {plugin}\n{extra}"
    )
}

async fn start(backend: SocketAddr, plugin: &str) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, config_text((addr, admin), backend, plugin, false)).unwrap();
    let log = std::fs::File::create(dir.path().join("gateway.log")).unwrap();
    let child = Command::new(GATEWAY)
        .arg("--config")
        .arg(&config)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let gateway = Gateway {
        addr,
        admin,
        child,
        _dir: dir,
        config,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(response) = reqwest::get(format!("http://{addr}/health")).await
            && response.status().is_success()
        {
            let body: serde_json::Value = response.json().await.unwrap();
            if body["overall_healthy"] == true {
                return gateway;
            }
        }
        assert!(Instant::now() < deadline, "gateway did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The count the client saw and the one the backend saw.
async fn get(gateway: &Gateway) -> (u16, Option<String>, String) {
    let response = reqwest::get(format!("http://{}/api/x", gateway.addr))
        .await
        .unwrap();
    let status = response.status().as_u16();
    let header = response
        .headers()
        .get("x-count")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, header, response.text().await.unwrap())
}

async fn version(gateway: &Gateway) -> u64 {
    let config: serde_json::Value = reqwest::get(format!("http://{}/admin/config", gateway.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    config["version"].as_u64().unwrap()
}

async fn rewrite(gateway: &Gateway, text: String) {
    let before = version(gateway).await;
    std::fs::write(&gateway.config, text).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while version(gateway).await == before {
        assert!(Instant::now() < deadline, "the new file was not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_count_flows_through_the_hooks_survives_a_reload_and_ends_at_the_limit() {
    let backend = backend();
    let plugin = "request_counter: { header: x-count, limit: 5 }";
    let gateway = start(backend, plugin).await;
    for n in 1..=3 {
        let n = n.to_string();
        assert_eq!(get(&gateway).await, (200, Some(n.clone()), n));
    }

    // An unrelated change: the same plugin, the count goes on.
    let addrs = (gateway.addr, gateway.admin);
    rewrite(&gateway, config_text(addrs, backend, plugin, true)).await;
    assert_eq!(get(&gateway).await, (200, Some("4".into()), "4".into()));
    assert_eq!(get(&gateway).await, (200, Some("5".into()), "5".into()));

    // Past the limit: the plugin's own answer, headers and all.
    let response = reqwest::get(format!("http://{}/api/x", gateway.addr))
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "60");
    assert_eq!(response.headers()["x-count"], "6");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["detail"], "Request limit of 5 reached");
    assert_eq!(body["request_id"].as_str().unwrap().len(), 32);

    // New settings: a new plugin, counting from one.
    let changed = "request_counter: { header: x-count, limit: 50 }";
    rewrite(&gateway, config_text(addrs, backend, changed, true)).await;
    assert_eq!(get(&gateway).await, (200, Some("1".into()), "1".into()));
}

#[test]
fn check_reports_bad_plugin_settings_and_unknown_plugins_with_their_place() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.yaml");
    let backend: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let gateway: SocketAddr = "127.0.0.1:2".parse().unwrap();
    let text = config_text(
        (gateway, "127.0.0.1:3".parse().unwrap()),
        backend,
        "request_counter: { header: \"bad header\" }",
        false,
    ) + "  - prefix: /x\n    service: echo\n    plugins: [ { nope: {} } ]\n";
    std::fs::write(&file, text).unwrap();
    let output = check(&file);
    assert_eq!(output.0, Some(2), "{output:?}");
    let errors: Vec<&str> = output.1.lines().collect();
    assert_eq!(errors.len(), 2, "{output:?}");
    assert!(
        errors[0].ends_with("gateway.yaml:12:9: route /api: plugin request_counter: header \"bad header\" is not a valid header name"),
        "{output:?}"
    );
    assert!(errors[1].contains("gateway.yaml:15:16: route /x: unknown plugin \"nope\" (plugins: headers, ip_filter, api_key, jwt, rate_limit, cors, request_counter)"), "{output:?}");
}

fn check(file: &Path) -> (Option<i32>, String) {
    let output = Command::new(GATEWAY)
        .arg("check")
        .arg(file)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8(output.stderr).unwrap(),
    )
}
