//! Helpers for the services' tests: call a router in-process and read the
//! JSON answer. Compiled into the kit (it needs nothing axum does not
//! already bring) so every service's tests share one copy.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

/// Sends one request to `app` without a socket (a JSON body if `body` is
/// given) and returns the status, the headers and the raw body.
pub async fn send(
    app: &Router,
    method: &str,
    uri: &str,
    body: Option<&str>,
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
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
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.expect("body readable").to_bytes();
    (parts.status, parts.headers, bytes.to_vec())
}

/// [`send`], the body parsed as JSON (`Value::Null` for an empty body).
/// Panics if the body is not JSON: every answer of these services must be.
pub async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    body: Option<&str>,
) -> (StatusCode, Value) {
    let (status, _, bytes) = send(app, method, uri, body).await;
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

/// A GET through [`send`] (for answers that are not JSON, or whose
/// headers matter).
pub async fn get_raw(app: &Router, uri: &str) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    send(app, "GET", uri, None).await
}

/// Panics unless `app` serves its documentation page at `/docs/` with
/// every script and style sheet it names from the service itself.
pub async fn docs_page_is_self_contained(app: &Router) {
    let (status, headers, page) = get_raw(app, "/docs/").await;
    assert_eq!(status, StatusCode::OK, "GET /docs/");
    assert!(
        headers[axum::http::header::CONTENT_TYPE]
            .to_str()
            .unwrap_or_default()
            .starts_with("text/html"),
        "{headers:?}"
    );
    let page = String::from_utf8_lossy(&page).into_owned();
    let mut assets = Vec::new();
    for attribute in ["src=\"", "href=\""] {
        for (start, _) in page.match_indices(attribute) {
            let rest = &page[start + attribute.len()..];
            let end = rest.find('"').unwrap_or(rest.len());
            assets.push(rest[..end].to_owned());
        }
    }
    assert!(assets.len() >= 3, "assets named by the page: {assets:?}");
    for asset in assets {
        assert!(
            !asset.contains("//"),
            "the docs page loads {asset} from another host"
        );
        let uri = format!("/docs/{}", asset.trim_start_matches("./"));
        let (status, _, body) = get_raw(app, &uri).await;
        assert_eq!(status, StatusCode::OK, "GET {uri}");
        assert!(!body.is_empty(), "GET {uri} is empty");
    }
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
        Self::start_with_env(binary, args, &[]).await
    }

    /// [`Self::start`] with environment variables (e.g. the fault
    /// injection of [`crate::fault`]).
    pub async fn start_with_env(
        binary: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> std::io::Result<ChildService> {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(binary)
            .args(args)
            .env("RUST_LOG", "warn,service_kit::serve=info")
            .envs(env.iter().copied())
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

    /// Sends SIGTERM (a graceful stop) and waits up to `limit` for the
    /// exit; its status.
    pub async fn terminate(
        &mut self,
        limit: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        let pid = i32::try_from(self.child.id()?).ok()?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .ok()?;
        self.exited(limit).await
    }

    /// Stops the child with SIGKILL and waits for it.
    pub async fn kill(mut self) -> std::io::Result<()> {
        self.child.kill().await
    }

    /// Waits (up to `limit`) for the child to exit by itself; its status.
    pub async fn exited(&mut self, limit: std::time::Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .ok()?
            .ok()
    }
}

/// The path of the workspace binary `name`, in the directory of `beside`
/// (a test's `env!("CARGO_BIN_EXE_...")`); built first if it is not there
/// (`cargo test --workspace` builds every binary, `cargo test -p X` may
/// not have).
pub fn binary(beside: &str, name: &str) -> String {
    let path = std::path::Path::new(beside).with_file_name(name);
    if !path.is_file() {
        let built = std::process::Command::new(env!("CARGO"))
            .args(["build", "--bins", "-p", name])
            .status()
            .is_ok_and(|status| status.success());
        assert!(built, "cannot build {name}");
    }
    path.display().to_string()
}

/// A real `nats-server` with JetStream on a free loopback port, its store in
/// a temp dir; killed when dropped. [`Nats::stop`] and [`Nats::start_again`]
/// take it down and bring it back on the same port and store.
pub struct Nats {
    pub port: u16,
    store: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl Nats {
    /// Starts a server and waits until it accepts connections. A port
    /// picked free can be taken (by another test's socket) before the
    /// server binds it: the server then exits, and a new port is tried.
    pub async fn start() -> std::io::Result<Nats> {
        let mut attempts = 0;
        loop {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let mut nats = Nats {
                port,
                store: tempfile::tempdir()?,
                child: None,
            };
            match nats.start_again().await {
                Ok(()) => return Ok(nats),
                Err(err) if err.kind() == std::io::ErrorKind::AddrInUse && attempts < 3 => {
                    attempts += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server again (after [`Self::stop`]) on the same port and
    /// store.
    pub async fn start_again(&mut self) -> std::io::Result<()> {
        let child = std::process::Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|err| {
                std::io::Error::other(format!("nats-server (scripts/setup.sh installs it): {err}"))
            })?;
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            self.exited_early()?;
            if std::time::Instant::now() > deadline {
                return Err(std::io::Error::other("nats-server did not start in 10 s"));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // What answered may be another test's server on a port taken
        // meanwhile: this one would have exited by now.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        self.exited_early()
    }

    /// An `AddrInUse` error if the server has exited.
    fn exited_early(&mut self) -> std::io::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("nats-server exited ({status}): port {} taken?", self.port),
            ));
        }
        Ok(())
    }

    /// Kills the server (its store stays) and waits until its port is free.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_ok()
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The `CREATE` statement SQLite keeps for `table`: what a migration made
/// of it.
pub fn table_sql(conn: &rusqlite::Connection, table: &str) -> rusqlite::Result<String> {
    conn.query_row(
        "SELECT sql FROM sqlite_schema WHERE name = ?",
        [table],
        |row| row.get(0),
    )
}

/// The outbox's events in publication order: `(seq, subject)`.
pub fn outbox_subjects(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<(i64, String)>> {
    conn.prepare("SELECT seq, subject FROM outbox ORDER BY seq")?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect()
}

/// How many temporary b-trees (`OpenEphemeral`) SQLite's program for `sql`
/// opens each time it runs; statements on the request path should open
/// none (see `db`'s module documentation). `sql` is compiled, not run.
pub fn ephemeral_tables(conn: &rusqlite::Connection, sql: &str) -> rusqlite::Result<usize> {
    let mut explain = conn.prepare(&format!("EXPLAIN {sql}"))?;
    let mut rows = explain.raw_query();
    let mut count = 0;
    while let Some(row) = rows.next()? {
        let opcode: String = row.get(1)?;
        count += usize::from(opcode == "OpenEphemeral");
    }
    Ok(count)
}
