//! Helpers for the services' tests: call a router in-process and read the
//! JSON answer. Compiled into the kit (it needs nothing axum does not
//! already bring) so every service's tests share one copy.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

/// Sends one request to `app` without a socket and returns the status and
/// the body parsed as JSON (`Value::Null` for an empty body). Panics if the
/// body is not JSON: every answer of these services must be.
pub async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    body: Option<&str>,
) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(uri);
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
        .expect("valid test request");
    let response = app
        .clone()
        .oneshot(request)
        .await
        .expect("router is infallible");
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body readable")
        .to_bytes();
    let json = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|err| {
            panic!(
                "{method} {uri}: body is not JSON ({err}): {}",
                String::from_utf8_lossy(&bytes)
            )
        })
    };
    (status, json)
}

/// A service binary started as a child process on `127.0.0.1:0`; killed when
/// dropped. Its address is read from the "listening on http://..." line it
/// logs at start-up, so no port is ever chosen in advance.
pub struct ChildService {
    pub addr: std::net::SocketAddr,
    child: tokio::process::Child,
}

impl ChildService {
    /// Starts `binary` with `args` (which must include `--listen
    /// 127.0.0.1:0`) and waits up to 30 s for it to announce its address.
    /// Later output is drained in the background so the child never blocks
    /// on a full pipe.
    pub async fn start(binary: &str, args: &[&str]) -> std::io::Result<ChildService> {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(binary)
            .args(args)
            .env("RUST_LOG", "warn,service_kit::serve=info")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("no stdout"))?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let find_addr = async {
            let mut seen = String::new();
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or_default();
                    return addr.parse().map_err(std::io::Error::other);
                }
                seen.push_str(&line);
                seen.push('\n');
            }
            Err(std::io::Error::other(format!(
                "{binary} exited before listening:\n{seen}"
            )))
        };
        let addr = tokio::time::timeout(std::time::Duration::from_secs(30), find_addr)
            .await
            .map_err(|_| std::io::Error::other(format!("{binary} did not start in 30 s")))??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(ChildService { addr, child })
    }

    /// Stops the child with SIGKILL and waits for it.
    pub async fn kill(mut self) -> std::io::Result<()> {
        self.child.kill().await
    }
}
