//! Test kit for the gateway's end-to-end tests: real backends (axum, each on
//! its own runtime so it can be killed outright) on 127.0.0.1 port 0, and
//! the real gateway binary started on a configuration written to a temp dir.

#![allow(dead_code, clippy::unwrap_used)] // Each test file uses part of it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use serde_json::{Value, json};

pub const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");

#[derive(Clone)]
struct BackendState {
    name: String,
    healthy: Arc<AtomicBool>,
    hits: Arc<AtomicU64>,
    /// Client ports seen by the catch-all handler: one per connection.
    peers: Arc<std::sync::Mutex<std::collections::HashSet<u16>>>,
    /// The catch-all handler answers 500 while set.
    failing: Arc<AtomicBool>,
    /// `x-write-id`s received by `POST /write`, in order.
    writes: Arc<std::sync::Mutex<Vec<String>>>,
}

/// An HTTP backend on its own runtime. Answers:
/// - `GET /health`: 200, or 503 after `set_healthy(false)`;
/// - `POST /upload`: reads the body as it streams, answers `{"bytes": n}`;
/// - `POST /echo`: the body back, with the request's content type;
/// - `GET /stream/{chunks}/{millis}`: `chunks` chunks, `millis` apart;
/// - `GET /slow/{millis}`: answers after `millis`;
/// - `GET /status/{code}`: that status, a plain-text body;
/// - anything else: `{"backend", "method", "uri", "headers"}`.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    healthy: Arc<AtomicBool>,
    hits: Arc<AtomicU64>,
    peers: Arc<std::sync::Mutex<std::collections::HashSet<u16>>>,
    failing: Arc<AtomicBool>,
    writes: Arc<std::sync::Mutex<Vec<String>>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Backend {
    pub fn start(name: &str) -> Backend {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Self::serve(name, listener)
    }

    /// A backend on a given address (e.g. a restarted one).
    pub fn start_on(name: &str, addr: SocketAddr) -> Backend {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::net::TcpListener::bind(addr) {
                Ok(listener) => return Self::serve(name, listener),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(err) => panic!("cannot rebind {addr}: {err}"),
            }
        }
    }

    fn serve(name: &str, listener: std::net::TcpListener) -> Backend {
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = BackendState {
            name: name.to_owned(),
            healthy: Arc::new(AtomicBool::new(true)),
            hits: Arc::new(AtomicU64::new(0)),
            peers: Arc::default(),
            failing: Arc::default(),
            writes: Arc::default(),
        };
        let app = Router::new()
            .route("/health", get(health))
            .route("/upload", post(upload))
            .route("/echo", post(echo))
            .route("/write", post(write))
            .route("/stream/{chunks}/{millis}", get(stream))
            .route("/slow/{millis}", get(slow))
            .route("/status/{code}", get(status))
            .fallback(any(describe))
            .with_state(state.clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
            axum::serve(listener, app).await.unwrap();
        });
        Backend {
            addr,
            name: name.to_owned(),
            healthy: state.healthy,
            hits: state.hits,
            peers: state.peers,
            failing: state.failing,
            writes: state.writes,
            runtime: Some(runtime),
        }
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Requests served, health checks excluded.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    /// Makes the catch-all handler answer 500 (health checks still pass).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// The write ids `POST /write` recorded.
    pub fn writes(&self) -> Vec<String> {
        self.writes.lock().unwrap().clone()
    }

    /// Distinct connections that reached the catch-all handler.
    pub fn connections(&self) -> usize {
        self.peers.lock().unwrap().len()
    }

    /// Stops the backend outright: listener and every connection closed.
    pub fn kill(mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn health(State(state): State<BackendState>) -> StatusCode {
    if state.healthy.load(Ordering::SeqCst) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn upload(State(state): State<BackendState>, request: Request) -> axum::Json<Value> {
    use http_body_util::BodyExt;
    state.hits.fetch_add(1, Ordering::SeqCst);
    let mut body = request.into_body();
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            bytes += data.len() as u64;
        }
    }
    axum::Json(json!({ "bytes": bytes }))
}

async fn echo(State(state): State<BackendState>, headers: HeaderMap, body: Bytes) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let mut response = body.into_response();
    if let Some(content_type) = headers.get("content-type") {
        response
            .headers_mut()
            .insert("content-type", content_type.clone());
    }
    response
}

async fn stream(
    State(state): State<BackendState>,
    Path((chunks, millis)): Path<(u32, u64)>,
) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    tokio::spawn(async move {
        for i in 0..chunks {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(millis)).await;
            }
            if tx
                .send(Ok(Bytes::from(format!("chunk {i}\n"))))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let body = Body::from_stream(tokio_stream_from(rx));
    Response::builder()
        .header("content-type", "text/plain")
        .body(body)
        .unwrap()
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures_core::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Records the request's `x-write-id`, then takes 20 ms to answer, so that
/// a killed backend has writes in flight.
async fn write(State(state): State<BackendState>, headers: HeaderMap) -> StatusCode {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let id = headers
        .get("x-write-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned();
    state.writes.lock().unwrap().push(id);
    tokio::time::sleep(Duration::from_millis(20)).await;
    StatusCode::CREATED
}

async fn slow(State(state): State<BackendState>, Path(millis): Path<u64>) -> &'static str {
    state.hits.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(millis)).await;
    "slow answer"
}

async fn status(State(state): State<BackendState>, Path(code): Path<u16>) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    (
        StatusCode::from_u16(code).unwrap(),
        [("content-type", "text/plain")],
        "teapot body",
    )
        .into_response()
}

async fn describe(
    State(state): State<BackendState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    state.peers.lock().unwrap().insert(peer.port());
    if state.failing.load(Ordering::SeqCst) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({ "backend": state.name, "error": "failing" })),
        )
            .into_response();
    }
    let headers: serde_json::Map<String, Value> = request
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                Value::String(v.to_str().unwrap_or("?").to_owned()),
            )
        })
        .collect();
    axum::Json(json!({
        "backend": state.name,
        "method": request.method().as_str(),
        "uri": request.uri().to_string(),
        "headers": headers,
    }))
    .into_response()
}

/// A raw TCP server on a port of its own; stops accepting when dropped.
pub struct RawServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Hands each connection to `serve` on a thread of its own, until the
/// returned server is dropped.
fn raw_server(serve: impl Fn(std::net::TcpStream) + Send + Sync + 'static) -> RawServer {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        while !stopped.load(Ordering::SeqCst) {
            let Ok((socket, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            };
            socket.set_nonblocking(false).unwrap();
            let serve = Arc::clone(&serve);
            std::thread::spawn(move || serve(socket));
        }
    });
    RawServer { addr, stop }
}

/// Reads from `socket` until a whole request head is in `seen`; returns it
/// (lowercased) and leaves what follows in `seen`. `None`: closed first.
fn read_head(socket: &mut std::net::TcpStream, seen: &mut Vec<u8>) -> Option<String> {
    read_head_as_sent(socket, seen).map(|head| head.to_lowercase())
}

/// The next request head on `socket`, in the case it was sent.
fn read_head_as_sent(socket: &mut std::net::TcpStream, seen: &mut Vec<u8>) -> Option<String> {
    use std::io::Read;
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<u8> = seen.drain(..end + 4).collect();
            return Some(String::from_utf8_lossy(&head).into_owned());
        }
        match socket.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

const HEALTH_OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

/// Answers `GET /health` with 200, and closes every other connection as
/// soon as it has read the request header: a request that was sent and got
/// no answer.
pub struct Dropper {
    pub addr: SocketAddr,
    pub dropped: Arc<AtomicU64>,
    _server: RawServer,
}

impl Dropper {
    pub fn start() -> Dropper {
        let dropped = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&dropped);
        let server = healthy_then(move |_| {
            count.fetch_add(1, Ordering::SeqCst); // dropped unanswered
        });
        Dropper {
            addr: server.addr,
            dropped,
            _server: server,
        }
    }
}

/// Answers `GET /health` with 200 on each connection; the first other
/// request's connection goes to `other` (its head read, nothing more),
/// then closes.
fn healthy_then(other: impl Fn(&mut std::net::TcpStream) + Send + Sync + 'static) -> RawServer {
    use std::io::Write;
    raw_server(move |mut socket| {
        let mut seen = Vec::new();
        while let Some(head) = read_head(&mut socket, &mut seen) {
            if head.starts_with("get /health") {
                let _ = socket.write_all(HEALTH_OK);
            } else {
                other(&mut socket);
                return;
            }
        }
    })
}

/// Answers `GET /health` with 200, and every other request with `413`
/// as soon as it has read the request header, then closes without reading
/// the body: a service that refuses a body before taking it.
pub struct EarlyAnswerer {
    pub addr: SocketAddr,
    _server: RawServer,
}

/// What [`EarlyAnswerer`] says to a request with a body.
pub const EARLY_ANSWER: &str = "not taking this body";

impl EarlyAnswerer {
    pub fn start() -> EarlyAnswerer {
        let server = healthy_then(|socket| {
            use std::io::Write;
            let answer = format!(
                "HTTP/1.1 413 Content Too Large\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{EARLY_ANSWER}",
                EARLY_ANSWER.len()
            );
            let _ = socket.write_all(answer.as_bytes()); // closed with the body unread
        });
        EarlyAnswerer {
            addr: server.addr,
            _server: server,
        }
    }
}

/// Answers every request with 200 on a keep-alive connection, and closes
/// a connection left idle for `idle`, without a word: the instance's own
/// keep-alive timeout, shorter than the gateway's.
pub struct IdleCloser {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicU64>,
    _server: RawServer,
}

impl IdleCloser {
    pub fn start(idle: Duration) -> IdleCloser {
        use std::io::Write;
        let connections = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&connections);
        let server = raw_server(move |mut socket| {
            count.fetch_add(1, Ordering::SeqCst);
            socket.set_read_timeout(Some(idle)).unwrap();
            let mut seen = Vec::new();
            while read_head(&mut socket, &mut seen).is_some() {
                if socket.write_all(HEALTH_OK).is_err() {
                    return;
                }
            }
        });
        IdleCloser {
            addr: server.addr,
            connections,
            _server: server,
        }
    }
}

/// Answers `GET /health` with 200 and any request asking for an upgrade
/// with `101 Switching Protocols`, then sends back every byte it receives,
/// uppercased, until the client closes. Keeps the last request head seen.
pub struct Upgrader {
    pub addr: SocketAddr,
    pub last_head: Arc<std::sync::Mutex<String>>,
    _server: RawServer,
}

impl Upgrader {
    pub fn start() -> Upgrader {
        use std::io::{Read, Write};
        let last_head = Arc::new(std::sync::Mutex::new(String::new()));
        let heads = Arc::clone(&last_head);
        let server = raw_server(move |mut socket| {
            let mut seen = Vec::new();
            while let Some(head) = read_head(&mut socket, &mut seen) {
                if head.starts_with("get /health") {
                    let _ = socket.write_all(HEALTH_OK);
                    continue;
                }
                *heads.lock().unwrap() = head;
                let _ = socket.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
                );
                let _ = socket.write_all(&seen.to_ascii_uppercase());
                let mut buf = [0u8; 4096];
                loop {
                    match socket.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if socket.write_all(&buf[..n].to_ascii_uppercase()).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        Upgrader {
            addr: server.addr,
            last_head,
            _server: server,
        }
    }
}

/// Answers every request with 200 and a `X-Backend-Thing: yes` field, and
/// keeps the last request head (other than health checks) byte for byte,
/// so the case of its field names shows.
pub struct CaseRecorder {
    pub addr: SocketAddr,
    pub last_head: Arc<std::sync::Mutex<String>>,
    _server: RawServer,
}

impl CaseRecorder {
    pub fn start() -> CaseRecorder {
        use std::io::Write;
        let last_head = Arc::new(std::sync::Mutex::new(String::new()));
        let heads = Arc::clone(&last_head);
        let server = raw_server(move |mut socket| {
            let mut seen = Vec::new();
            while let Some(head) = read_head_as_sent(&mut socket, &mut seen) {
                if head.to_lowercase().starts_with("get /health") {
                    let _ = socket.write_all(HEALTH_OK);
                    continue;
                }
                *heads.lock().unwrap() = head;
                let _ = socket.write_all(
                    b"HTTP/1.1 200 OK\r\nX-Backend-Thing: yes\r\nContent-Length: 2\r\n\r\nok",
                );
            }
        });
        CaseRecorder {
            addr: server.addr,
            last_head,
            _server: server,
        }
    }
}

/// Accepts connections and never answers; holds them until dropped.
pub struct BlackHole {
    pub addr: SocketAddr,
    /// The connections, open until the black hole is dropped.
    _held: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    _server: RawServer,
}

impl BlackHole {
    pub fn start() -> BlackHole {
        let held = Arc::new(std::sync::Mutex::new(Vec::new()));
        let holder = Arc::clone(&held);
        let server = raw_server(move |socket| holder.lock().unwrap().push(socket));
        BlackHole {
            addr: server.addr,
            _held: held,
            _server: server,
        }
    }
}

/// A gateway configuration body with one service `s` of one instance,
/// routed from `/`, after the top-level lines `top` (each ending in `\n`).
pub fn single_route(top: &str, instance: SocketAddr) -> String {
    format!(
        "{top}services:\n  s: {{ instances: [\"{instance}\"] }}\nroutes:\n  - {{ prefix: /, service: s }}\n"
    )
}

/// A port that was free a moment ago (the gateway binds it itself).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The real gateway binary running on a configuration in a temp dir.
pub struct GatewayProcess {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    /// The admin listener's bearer token, if it has one.
    pub admin_token: Option<String>,
    child: Child,
    _dir: tempfile::TempDir,
}

/// What a gateway starts with besides its configuration.
#[derive(Default)]
pub struct Extras<'a> {
    /// Files written beside the configuration (name, contents).
    pub files: Vec<(&'a str, Vec<u8>)>,
    /// An admin token: the admin listener is `admin: { listen, token_file }`.
    pub admin_token: Option<&'a str>,
    /// Environment variables of the gateway process.
    pub env: Vec<(&'a str, &'a str)>,
}

impl GatewayProcess {
    /// Starts the gateway on `body` (the configuration without `listen` and
    /// `admin_listen`, which are added on free ports) and waits until
    /// `/health` answers.
    pub async fn start(body: &str) -> GatewayProcess {
        Self::start_with(body, &Extras::default()).await
    }

    /// [`Self::start`], with files beside the configuration, an admin
    /// token, environment variables.
    pub async fn start_with(body: &str, extras: &Extras<'_>) -> GatewayProcess {
        for _ in 0..3 {
            if let Some(gateway) = Self::try_start(body, extras).await {
                return gateway;
            }
        }
        panic!("gateway did not start");
    }

    async fn try_start(body: &str, extras: &Extras<'_>) -> Option<GatewayProcess> {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        for (name, contents) in &extras.files {
            std::fs::write(dir.path().join(name), contents).unwrap();
        }
        let config_path = dir.path().join("gateway.yaml");
        let text = match extras.admin_token {
            Some(token) => {
                std::fs::write(dir.path().join("admin.token"), token).unwrap();
                Self::file_text(addr, admin, body).replacen(
                    &format!("admin_listen: \"{admin}\""),
                    &format!("admin: {{ listen: \"{admin}\", token_file: admin.token }}"),
                    1,
                )
            }
            None => Self::file_text(addr, admin, body),
        };
        std::fs::write(&config_path, text).unwrap();
        let log = std::fs::File::create(dir.path().join("gateway.log")).unwrap();
        let child = Command::new(GATEWAY)
            .arg("--config")
            .arg(&config_path)
            .env(
                "RUST_LOG",
                std::env::var("GATEWAY_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(extras.env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut gateway = GatewayProcess {
            addr,
            admin,
            config_path,
            admin_token: extras.admin_token.map(str::to_owned),
            child,
            _dir: dir,
        };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = gateway.child.try_wait() {
                eprintln!("gateway exited early:\n{}", gateway.log());
                return None;
            }
            // The port picked for it was taken again between `free_port`
            // and the gateway's bind (by another test's socket): Pingora
            // would retry the same port for 30 s. Start over on new ports.
            if gateway.log().contains("is in use, will try again") {
                eprintln!("gateway's port was taken meanwhile: starting over");
                return None; // dropping it stops the process
            }
            if let Ok(response) = client.get(gateway.url("/health")).send().await
                && response.status().is_success()
            {
                return Some(gateway);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("gateway did not answer /health in 20 s:\n{}", gateway.log());
    }

    /// Two workers whatever the machine's CPUs, so that every test also
    /// goes through the hand-off of connections to the second worker.
    fn file_text(addr: SocketAddr, admin: SocketAddr, body: &str) -> String {
        format!("listen: \"{addr}\"\nadmin_listen: \"{admin}\"\nthreads: 2\n{body}")
    }

    /// A raw connection to the gateway with `bytes` already sent on it
    /// (no Nagle delay: later writes go out as written).
    pub async fn send_raw(&self, bytes: &[u8]) -> tokio::net::TcpStream {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        stream.write_all(bytes).await.unwrap();
        stream
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Replaces the configuration with `body` (listen addresses kept) the
    /// way editors do: a temp file renamed over it.
    pub fn write_config(&self, body: &str) {
        let text = Self::file_text(self.addr, self.admin, body);
        let text = match &self.admin_token {
            Some(_) => text.replacen(
                &format!("admin_listen: \"{}\"", self.admin),
                &format!(
                    "admin: {{ listen: \"{}\", token_file: admin.token }}",
                    self.admin
                ),
                1,
            ),
            None => text,
        };
        self.write_raw(&text);
    }

    /// A file beside the configuration.
    pub fn write_file(&self, name: &str, contents: &[u8]) {
        std::fs::write(self._dir.path().join(name), contents).unwrap();
    }

    /// Replaces the file with exactly `text`, atomically.
    pub fn write_raw(&self, text: &str) {
        let temp = self.config_path.with_extension("yaml.tmp");
        std::fs::write(&temp, text).unwrap();
        std::fs::rename(&temp, &self.config_path).unwrap();
    }

    /// `GET /admin/config` (with the admin token, if there is one).
    pub async fn admin_config(&self) -> Value {
        let mut request = reqwest::Client::new().get(self.admin_url("/admin/config"));
        if let Some(token) = &self.admin_token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap().json().await.unwrap()
    }

    /// Waits until the last reload attempt is newer than `previous` (its
    /// `at`), or panics after 3 s; returns it.
    pub async fn next_reload(&self, previous: &Value) -> Value {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let last = self.admin_config().await["last_reload"].clone();
            if !last.is_null() && last["at"] != previous["at"] {
                return last;
            }
            assert!(
                Instant::now() < deadline,
                "no reload attempt seen after {previous}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. "TERM", "QUIT") to the gateway.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits up to `limit` for the gateway to exit; its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Starts a second gateway on the same configuration with `--upgrade`,
    /// to take the listeners over once this one gets SIGQUIT.
    pub fn start_upgrade(&self) -> Child {
        let log = std::fs::File::create(self._dir.path().join("gateway-new.log")).unwrap();
        Command::new(GATEWAY)
            .arg("--config")
            .arg(&self.config_path)
            .arg("--upgrade")
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// What the gateway printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("gateway.log")).unwrap_or_default()
    }

    /// A field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`).
    pub fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find(|line| line.starts_with(field))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap()
    }

    /// The gateway's `/services` answer.
    pub async fn services(&self) -> Value {
        get_json(self.url("/services")).await
    }

    /// Polls `GET /services` until `predicate` holds, or panics after
    /// `limit`. Returns how long it took.
    pub async fn wait_for_services(
        &self,
        limit: Duration,
        predicate: impl Fn(&Value) -> bool,
    ) -> Duration {
        let started = Instant::now();
        loop {
            let services = self.services().await;
            if predicate(&services) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "condition not met in {limit:?}: {services}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET url`, its body as JSON.
async fn get_json(url: String) -> Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// The health state of `address` in a `/services` answer.
pub fn instance_healthy(services: &Value, address: &str) -> Option<bool> {
    services["services"]
        .as_array()?
        .iter()
        .flat_map(|s| s["instances"].as_array().into_iter().flatten())
        .find(|i| i["address"] == address)
        .and_then(|i| i["healthy"].as_bool())
}

/// A fast health-check block for tests: 50 ms apart, thresholds of 2.
pub const FAST_HEALTH: &str = "health_check: { interval: 50ms, timeout: 200ms, healthy_threshold: 2, unhealthy_threshold: 2 }\n";
