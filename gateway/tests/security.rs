//! Edge security end to end, through the real gateway binary: each
//! built-in security plugin allowed, refused and malformed, the JWT attacks,
//! spoofed forwarding headers, rate-limit accuracy under load, and the
//! admin token.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sha2::Digest;
use support::{Backend, Extras, GatewayProcess};

const RSA: &[u8] = include_bytes!("fixtures/rsa.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("fixtures/rsa.pub.pem");
const EC: &[u8] = include_bytes!("fixtures/ec.pem");
const ROGUE: &[u8] = include_bytes!("fixtures/rogue.pem");

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// Status, the headers, and the body as JSON (`Null` if not JSON).
async fn send(request: reqwest::RequestBuilder) -> (u16, reqwest::header::HeaderMap, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, headers, body)
}

/// The gateway's JSON error with this detail and the answer's request id.
fn error_body(detail: &str, headers: &reqwest::header::HeaderMap) -> Value {
    json!({"detail": detail, "request_id": headers["x-request-id"].to_str().unwrap()})
}

fn sha256_hex(key: &str) -> String {
    sha2::Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token for `claims`, signed with `pem` as `alg`, naming `kid`.
fn mint(pem: &[u8], alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let key = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(pem).unwrap(),
        Algorithm::HS256 => EncodingKey::from_secret(pem).unwrap(),
        _ => EncodingKey::from_rsa_pem(pem).unwrap(),
    };
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

/// The public JWK of the private key `pem`.
fn jwk(pem: &[u8], alg: Algorithm, kid: &str) -> Value {
    let key = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(pem).unwrap(),
        _ => EncodingKey::from_rsa_pem(pem).unwrap(),
    };
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, alg).unwrap();
    jwk.common.key_id = Some(kid.to_owned());
    serde_json::to_value(jwk).unwrap()
}

/// Base64url without padding (RFC 4648 §5), as JWTs encode their parts.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "iss": "https://issuer.example", "aud": "orders", "exp": now() + 300})
}

/// A JWKS server on its own thread: its document can be changed, it can be
/// made to fail, and it counts fetches.
struct JwksServer {
    addr: SocketAddr,
    document: Arc<Mutex<Value>>,
    failing: Arc<AtomicBool>,
    fetches: Arc<AtomicU64>,
}

impl JwksServer {
    fn start(keys: Vec<Value>) -> JwksServer {
        let document = Arc::new(Mutex::new(json!({ "keys": keys })));
        let failing = Arc::new(AtomicBool::new(false));
        let fetches = Arc::new(AtomicU64::new(0));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = (
            Arc::clone(&document),
            Arc::clone(&failing),
            Arc::clone(&fetches),
        );
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let app = axum::Router::new().route(
                    "/jwks.json",
                    axum::routing::get(move || {
                        let (document, failing, fetches) = state.clone();
                        async move {
                            fetches.fetch_add(1, Ordering::SeqCst);
                            if failing.load(Ordering::SeqCst) {
                                return (
                                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                                    axum::Json(json!({})),
                                );
                            }
                            let body = document.lock().unwrap().clone();
                            (axum::http::StatusCode::OK, axum::Json(body))
                        }
                    }),
                );
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        JwksServer {
            addr,
            document,
            failing,
            fetches,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/jwks.json", self.addr)
    }

    fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::SeqCst)
    }
}

fn jwt_route(jwks_url: &str, backend: SocketAddr) -> String {
    format!(
        "services:\n  orders: {{ instances: [\"{backend}\"] }}\nroutes:\n  - prefix: /api/orders\n    service: orders\n    plugins:\n      - jwt:\n          issuer: https://issuer.example\n          audiences: [orders]\n          algorithms: [RS256, ES256]\n          jwks_url: {jwks_url}\n          leeway: 30s\n          forward_claims: {{ sub: x-user-id }}\n"
    )
}

#[tokio::test]
async fn ip_filter_allows_and_denies_the_client_address() {
    let backend = Backend::start("b");
    let gateway = GatewayProcess::start(&format!(
        "services:\n  s: {{ instances: [\"{}\"] }}\nroutes:\n  - {{ prefix: /allowed, service: s, plugins: [ {{ ip_filter: {{ allow: [\"127.0.0.1/32\"] }} }} ] }}\n  - {{ prefix: /denied, service: s, plugins: [ {{ ip_filter: {{ deny: [\"127.0.0.0/8\"] }} }} ] }}\n  - {{ prefix: /outside, service: s, plugins: [ {{ ip_filter: {{ allow: [\"10.0.0.0/8\"] }} }} ] }}\n",
        backend.addr
    ))
    .await;
    let (status, _, _) = send(client().get(gateway.url("/allowed"))).await;
    assert_eq!(status, 200);
    let hits = backend.hits();
    for path in ["/denied", "/outside"] {
        let (status, headers, body) = send(client().get(gateway.url(path))).await;
        assert_eq!(status, 403, "{path}");
        assert_eq!(body, error_body("Client address not allowed", &headers));
    }
    // A spoofed X-Forwarded-For from an untrusted peer changes nothing.
    let (status, _, _) = send(
        client()
            .get(gateway.url("/outside"))
            .header("x-forwarded-for", "10.1.1.1"),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(
        backend.hits(),
        hits,
        "a refused request reached the backend"
    );
}

#[tokio::test]
async fn api_key_needs_a_known_key_and_never_forwards_it() {
    let backend = Backend::start("b");
    let keys_file = format!(
        "- {{ name: batch-job, sha256: \"{}\" }}\n",
        sha256_hex("k-batch")
    );
    let gateway = GatewayProcess::start_with(
        &format!(
            "services:\n  s: {{ instances: [\"{}\"] }}\nroutes:\n  - prefix: /api\n    service: s\n    plugins:\n      - api_key:\n          header: x-api-key\n          keys: [{{ name: shop-frontend, sha256: \"{}\" }}]\n          keys_file: keys.yaml\n",
            backend.addr,
            sha256_hex("k-shop")
        ),
        &Extras {
            files: vec![("keys.yaml", keys_file.into_bytes())],
            ..Extras::default()
        },
    )
    .await;
    let url = gateway.url("/api/x");
    let (status, headers, body) = send(client().get(&url)).await;
    assert_eq!(status, 401);
    assert_eq!(headers["www-authenticate"], "ApiKey");
    assert_eq!(body, error_body("Missing API key", &headers));
    for wrong in ["k-sho", "k-shopp", "K-SHOP", ""] {
        let (status, headers, body) = send(client().get(&url).header("x-api-key", wrong)).await;
        assert_eq!(status, 401, "{wrong:?}");
        assert_eq!(body, error_body("Invalid API key", &headers));
    }
    let (status, _, _) = send(
        client()
            .get(&url)
            .header("x-api-key", "k-shop")
            .header("x-api-key", "k-shop"),
    )
    .await;
    assert_eq!(status, 401, "two keys at once");
    for key in ["k-shop", "k-batch"] {
        let (status, _, seen) = send(client().get(&url).header("x-api-key", key)).await;
        assert_eq!(status, 200, "{key}");
        assert!(
            seen["headers"].get("x-api-key").is_none(),
            "the key went upstream: {seen}"
        );
    }
    // The consumer is in the access log; the key is not.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = gateway.log();
    assert!(log.contains("consumer=\"shop-frontend\""), "{log}");
    assert!(log.contains("consumer=\"batch-job\""), "{log}");
    assert!(!log.contains("k-shop"));
    // /admin/config names the consumers, never a key or its digest.
    let config = gateway.admin_config().await;
    let text = config.to_string();
    assert!(text.contains("shop-frontend"), "{text}");
    assert!(!text.contains(&sha256_hex("k-shop")), "{text}");
}

/// A request to the jwt route with `Authorization: Bearer <token>`.
fn with_token(gateway: &GatewayProcess, token: &str) -> reqwest::RequestBuilder {
    client()
        .get(gateway.url("/api/orders/1"))
        .bearer_auth(token)
}

fn invalid(detail: &str) -> String {
    format!("Invalid token: {detail}")
}

#[tokio::test]
async fn jwt_accepts_valid_tokens_and_refuses_every_attack() {
    let jwks = JwksServer::start(vec![
        jwk(RSA, Algorithm::RS256, "rsa-1"),
        jwk(EC, Algorithm::ES256, "ec-1"),
    ]);
    let backend = Backend::start("orders");
    let gateway = GatewayProcess::start(&jwt_route(&jwks.url(), backend.addr)).await;

    let good = mint(RSA, Algorithm::RS256, Some("rsa-1"), &claims("alice"));
    let (status, _, seen) = send(with_token(&gateway, &good).header("x-user-id", "mallory")).await;
    assert_eq!(status, 200, "{seen}");
    assert_eq!(
        seen["headers"]["x-user-id"], "alice",
        "the verified claim, not the client's"
    );
    assert_eq!(
        seen["headers"]["authorization"],
        format!("Bearer {good}"),
        "forwarded unchanged"
    );
    let ec = mint(EC, Algorithm::ES256, Some("ec-1"), &claims("bob"));
    let (status, _, seen) = send(with_token(&gateway, &ec)).await;
    assert_eq!(
        (status, seen["headers"]["x-user-id"].as_str()),
        (200, Some("bob"))
    );

    // No token, or one in the query string: not accepted.
    for request in [
        client().get(gateway.url("/api/orders/1")),
        client().get(gateway.url(&format!("/api/orders/1?access_token={good}"))),
    ] {
        let (status, headers, body) = send(request).await;
        assert_eq!(status, 401);
        assert_eq!(headers["www-authenticate"], "Bearer");
        assert_eq!(body, error_body("Missing bearer token", &headers));
    }

    let b64 = |v: &Value| base64url(v.to_string().as_bytes());
    let unsigned = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims("alice"))
    );
    // HS256 with the RSA public key as the secret: key confusion.
    let confused = mint(
        RSA_PUBLIC,
        Algorithm::HS256,
        Some("rsa-1"),
        &claims("alice"),
    );
    let mut expired = claims("alice");
    expired["exp"] = json!(now() - 120);
    let mut wrong_aud = claims("alice");
    wrong_aud["aud"] = json!("billing");
    let mut wrong_iss = claims("alice");
    wrong_iss["iss"] = json!("https://evil.example");
    let mut no_exp = claims("alice");
    no_exp.as_object_mut().unwrap().remove("exp");
    let tampered = {
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        parts[1] = b64(&claims("admin"));
        parts.join(".")
    };
    let cases = [
        (unsigned, "algorithm not allowed"),
        (confused, "algorithm not allowed"),
        (
            mint(RSA, Algorithm::RS256, Some("rsa-1"), &expired),
            "expired",
        ),
        (
            mint(RSA, Algorithm::RS256, Some("rsa-1"), &wrong_aud),
            "wrong audience",
        ),
        (
            mint(RSA, Algorithm::RS256, Some("rsa-1"), &wrong_iss),
            "wrong issuer",
        ),
        (
            mint(RSA, Algorithm::RS256, Some("rsa-1"), &no_exp),
            "a required claim is missing",
        ),
        (tampered, "bad signature"),
        // Signed by the RSA key but naming the EC key's id.
        (
            mint(RSA, Algorithm::RS256, Some("ec-1"), &claims("alice")),
            "algorithm not allowed for this key",
        ),
        ("not.a.token".to_owned(), "malformed"),
    ];
    let hits = backend.hits();
    for (token, detail) in &cases {
        let (status, headers, body) = send(with_token(&gateway, token)).await;
        assert_eq!(status, 401, "{detail}: {token}");
        assert_eq!(
            headers["www-authenticate"],
            "Bearer error=\"invalid_token\""
        );
        assert_eq!(body, error_body(&invalid(detail), &headers), "{token}");
    }
    assert_eq!(backend.hits(), hits, "a refused token reached the backend");

    // Expired within the leeway: still valid.
    let mut lately = claims("alice");
    lately["exp"] = json!(now() - 10);
    let (status, _, _) = send(with_token(
        &gateway,
        &mint(RSA, Algorithm::RS256, Some("rsa-1"), &lately),
    ))
    .await;
    assert_eq!(status, 200);

    // An unknown kid: one fetch of the key set, then 401; another one at
    // once: no fetch (rate-limited), 401.
    let before = jwks.fetches();
    let rogue = mint(ROGUE, Algorithm::RS256, Some("rogue-1"), &claims("alice"));
    let (status, headers, body) = send(with_token(&gateway, &rogue)).await;
    assert_eq!(
        (status, body),
        (401, error_body(&invalid("unknown key"), &headers))
    );
    assert_eq!(jwks.fetches(), before + 1, "one refresh for an unknown kid");
    let rogue2 = mint(ROGUE, Algorithm::RS256, Some("rogue-2"), &claims("alice"));
    let (status, _, _) = send(with_token(&gateway, &rogue2)).await;
    assert_eq!(status, 401);
    assert_eq!(jwks.fetches(), before + 1, "refreshes are rate-limited");
}

#[tokio::test]
async fn a_rotated_key_is_fetched_on_first_use_and_a_failing_jwks_keeps_the_last_good_set() {
    let jwks = JwksServer::start(vec![jwk(RSA, Algorithm::RS256, "rsa-1")]);
    let backend = Backend::start("orders");
    let gateway = GatewayProcess::start(
        &jwt_route(&jwks.url(), backend.addr)
            .replace("leeway: 30s", "leeway: 30s\n          jwks_refresh: 1s"),
    )
    .await;
    // The provider publishes a new key; a token signed with it is accepted
    // on first use (the unknown kid fetches the set again).
    jwks.document.lock().unwrap()["keys"]
        .as_array_mut()
        .unwrap()
        .push(jwk(ROGUE, Algorithm::RS256, "rsa-2"));
    let rotated = mint(ROGUE, Algorithm::RS256, Some("rsa-2"), &claims("carol"));
    let (status, _, seen) = send(with_token(&gateway, &rotated)).await;
    assert_eq!(
        (status, seen["headers"]["x-user-id"].as_str()),
        (200, Some("carol"))
    );

    // The provider fails: the periodic refresh keeps the last good set and
    // says so on /admin/config.
    jwks.failing.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let config = gateway.admin_config().await;
        let status = config["routes"][0]["plugins"][0]["status"].clone();
        if !status["last_error"].is_null() {
            break status;
        }
        assert!(Instant::now() < deadline, "no failed fetch seen: {config}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status["keys"], 2, "{status}");
    assert!(
        status["last_error"].as_str().unwrap().contains("500"),
        "{status}"
    );
    let good = mint(RSA, Algorithm::RS256, Some("rsa-1"), &claims("alice"));
    let (status, _, _) = send(with_token(&gateway, &good)).await;
    assert_eq!(status, 200);
    // The gateway's log reaches its file a moment after the status shows
    // the failure: wait for the line, a few seconds at most.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gateway.log().contains("key set not fetched") {
        assert!(
            Instant::now() < deadline,
            "no warning logged:\n{}",
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_hmac_secret_from_the_environment_verifies_hs256_only() {
    let backend = Backend::start("b");
    let secret = "0123456789abcdef0123456789abcdef-test";
    let gateway = GatewayProcess::start_with(
        &format!(
            "services:\n  s: {{ instances: [\"{}\"] }}\nroutes:\n  - prefix: /api\n    service: s\n    plugins:\n      - jwt: {{ algorithms: [HS256], secret_env: JWT_TEST_SECRET, leeway: 0s }}\n",
            backend.addr
        ),
        &Extras {
            env: vec![("JWT_TEST_SECRET", secret)],
            ..Extras::default()
        },
    )
    .await;
    let ok = mint(
        secret.as_bytes(),
        Algorithm::HS256,
        None,
        &json!({"exp": now() + 60}),
    );
    let (status, _, _) = send(client().get(gateway.url("/api/x")).bearer_auth(&ok)).await;
    assert_eq!(status, 200);
    let rs = mint(RSA, Algorithm::RS256, None, &json!({"exp": now() + 60}));
    let (status, _, _) = send(client().get(gateway.url("/api/x")).bearer_auth(&rs)).await;
    assert_eq!(status, 401);

    // A verified token is remembered, but not past its exp.
    let short = mint(
        secret.as_bytes(),
        Algorithm::HS256,
        None,
        &json!({"exp": now() + 1}),
    );
    for _ in 0..3 {
        let (status, _, _) = send(client().get(gateway.url("/api/x")).bearer_auth(&short)).await;
        assert_eq!(status, 200);
    }
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, headers, body) =
        send(client().get(gateway.url("/api/x")).bearer_auth(&short)).await;
    assert_eq!(
        (status, body),
        (401, error_body(&invalid("expired"), &headers))
    );
}

#[tokio::test]
async fn a_rate_limit_bucket_survives_a_reload_of_an_unrelated_part_of_the_file() {
    let backend = Backend::start("b");
    let config = |requests: u32, extra: &str| {
        format!(
            "services:\n  s: {{ instances: [\"{}\"] }}\nroutes:\n  - {{ prefix: /api, service: s, plugins: [ {{ rate_limit: {{ requests: {requests}, per: 60s }} }} ] }}\n{extra}",
            backend.addr
        )
    };
    let gateway = GatewayProcess::start(&config(1, "")).await;
    let get = || send(client().get(gateway.url("/api/x")));
    let (status, headers, _) = get().await;
    assert_eq!(
        (status, headers["ratelimit-remaining"].to_str().unwrap()),
        (200, "0")
    );
    let (status, headers, body) = get().await;
    assert_eq!(status, 429);
    assert_eq!(body, error_body("Too many requests", &headers));
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    // One per minute, a request allowed half a period early: 30 s.
    assert!((25..=30).contains(&retry), "{retry}");

    let before = gateway.admin_config().await["last_reload"].clone();
    gateway.write_config(&config(1, "  - { prefix: /other, service: s }\n"));
    let reload = gateway.next_reload(&before).await;
    assert_eq!(reload["result"], "applied", "{reload}");
    assert_eq!(get().await.0, 429, "the bucket was reset by the reload");

    // Changed settings: a new limiter.
    let before = reload;
    gateway.write_config(&config(2, "  - { prefix: /other, service: s }\n"));
    assert_eq!(gateway.next_reload(&before).await["result"], "applied");
    assert_eq!(get().await.0, 200);
}

#[tokio::test]
async fn cors_answers_preflights_at_the_edge_and_marks_allowed_origins() {
    let backend = Backend::start("b");
    let gateway = GatewayProcess::start(&format!(
        "services:\n  s: {{ instances: [\"{}\"] }}\nroutes:\n  - prefix: /api\n    service: s\n    plugins:\n      - cors: {{ allow_origins: [\"https://shop.example\"], allow_methods: [GET, POST], allow_headers: [content-type, authorization], max_age: 10m }}\n",
        backend.addr
    ))
    .await;
    let url = gateway.url("/api/items");
    let preflight = |origin: &str| {
        client()
            .request(reqwest::Method::OPTIONS, &url)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
    };
    let hits = backend.hits();
    let response = preflight("https://shop.example").send().await.unwrap();
    assert_eq!(response.status(), 204);
    let h = response.headers();
    assert_eq!(h["access-control-allow-origin"], "https://shop.example");
    assert_eq!(h["access-control-allow-methods"], "GET, POST");
    assert_eq!(
        h["access-control-allow-headers"],
        "content-type, authorization"
    );
    assert_eq!(h["access-control-max-age"], "600");
    assert_eq!(h["vary"], "Origin");
    assert!(response.bytes().await.unwrap().is_empty());

    let (status, headers, body) = send(preflight("https://evil.example")).await;
    assert_eq!(status, 403);
    assert_eq!(body, error_body("Origin not allowed", &headers));
    assert!(
        headers
            .keys()
            .all(|name| !name.as_str().starts_with("access-control-"))
    );
    assert_eq!(backend.hits(), hits, "a preflight reached the backend");

    let (status, headers, _) =
        send(client().get(&url).header("origin", "https://shop.example")).await;
    assert_eq!(status, 200);
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://shop.example"
    );
    assert_eq!(headers["vary"], "Origin");
    let (status, headers, _) =
        send(client().get(&url).header("origin", "https://evil.example")).await;
    assert_eq!(status, 200);
    assert!(headers.get("access-control-allow-origin").is_none());
    assert_eq!(headers["vary"], "Origin");
    let (_, headers, _) = send(client().get(&url)).await;
    assert!(headers.get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn a_spoofed_forwarded_for_from_an_untrusted_peer_changes_no_client_address() {
    let backend = Backend::start("b");
    let routes = format!(
        "services:\n  s: {{ instances: [\"{}\"] }}\nroutes:\n  - {{ prefix: /inside, service: s, plugins: [ {{ ip_filter: {{ allow: [\"10.0.0.0/8\"] }} }} ] }}\n  - {{ prefix: /limited, service: s, plugins: [ {{ rate_limit: {{ requests: 1, per: 60s }} }} ] }}\n  - {{ prefix: /open, service: s }}\n",
        backend.addr
    );
    let untrusted = GatewayProcess::start(&routes).await;
    let spoof = |gateway: &GatewayProcess, path: &str, xff: &str| {
        client()
            .get(gateway.url(path))
            .header("x-forwarded-for", xff)
            .header("x-forwarded-proto", "https")
    };
    assert_eq!(send(spoof(&untrusted, "/inside", "10.1.1.1")).await.0, 403);
    assert_eq!(send(spoof(&untrusted, "/limited", "10.0.0.1")).await.0, 200);
    assert_eq!(
        send(spoof(&untrusted, "/limited", "10.0.0.2")).await.0,
        429,
        "one bucket: the peer's"
    );
    let (_, _, seen) = send(spoof(&untrusted, "/open", "10.1.1.1")).await;
    assert_eq!(seen["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "http");

    // The same peer, trusted: what it forwards is believed.
    let trusted =
        GatewayProcess::start(&format!("trusted_proxies: [\"127.0.0.1/32\"]\n{routes}")).await;
    assert_eq!(send(spoof(&trusted, "/inside", "10.1.1.1")).await.0, 200);
    assert_eq!(send(spoof(&trusted, "/limited", "10.0.0.1")).await.0, 200);
    assert_eq!(send(spoof(&trusted, "/limited", "10.0.0.1")).await.0, 429);
    assert_eq!(
        send(spoof(&trusted, "/limited", "10.0.0.2")).await.0,
        200,
        "a bucket per client"
    );
    let (_, _, seen) = send(spoof(&trusted, "/open", "10.1.1.1")).await;
    assert_eq!(seen["headers"]["x-forwarded-for"], "10.1.1.1, 127.0.0.1");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
}

#[tokio::test]
async fn the_admin_listener_wants_its_token_except_for_liveness() {
    let backend = Backend::start("b");
    let gateway = GatewayProcess::start_with(
        &support::single_route("", backend.addr),
        &Extras {
            admin_token: Some("admin-token-for-tests\n"),
            ..Extras::default()
        },
    )
    .await;
    for path in ["/admin/config", "/admin/stats", "/admin/nowhere"] {
        let response = client().get(gateway.admin_url(path)).send().await.unwrap();
        assert_eq!(response.status(), 401, "{path}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        let wrong = client()
            .get(gateway.admin_url(path))
            .bearer_auth("admin-token-for-test")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401, "{path}");
    }
    let reload = client()
        .post(gateway.admin_url("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 401);
    let ok = client()
        .get(gateway.admin_url("/admin/config"))
        .bearer_auth("admin-token-for-tests")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let text = ok.text().await.unwrap();
    assert!(!text.contains("admin-token-for-tests"), "{text}");
    let live = client()
        .get(gateway.admin_url("/admin/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
}
