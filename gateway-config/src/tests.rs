//! Parsing and validation of `gateway.yaml`: defaults, overrides, and every
//! error reported at once with its place.

use std::time::Duration;

use super::*;
use ipnet::IpNet;

const GOOD: &str = r#"
listen: "127.0.0.1:8000"
admin_listen: "127.0.0.1:9000"
health_check:
  interval: 2s
  timeout: 300ms
services:
  user-service:
    instances: ["127.0.0.1:8001"]
  product-service:
    instances: ["127.0.0.1:8002", "127.0.0.1:8012"]
    load_balancing: random
    health_check: { path: /ready, healthy_threshold: 3 }
  order-service:
    instances: ["localhost:8003"]
    timeouts: { connect: 1s, read: 10s }
routes:
  - { prefix: /api/users, service: user-service, strip_prefix: /api }
  - prefix: /api/products
    service: product-service
    strip_prefix: /api
    plugins:
      - headers:
          request: { set: { x-from: gateway }, remove: [cookie] }
          response: { set: { x-served-by: gateway } }
  - { prefix: /api/orders, service: order-service, strip_prefix: /api }
"#;

#[test]
fn a_good_file_gives_defaults_and_overrides() {
    let config = parse(GOOD, "good.yaml").unwrap();
    assert_eq!(config.listen, "127.0.0.1:8000".parse().unwrap());
    assert_eq!(config.admin_listen, Some("127.0.0.1:9000".parse().unwrap()));
    let names: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["order-service", "product-service", "user-service"]);

    let products = config.service("product-service").unwrap();
    assert_eq!(products.load_balancing, LoadBalancing::Random);
    assert_eq!(products.instances.len(), 2);
    assert_eq!(
        products.health,
        HealthSettings {
            path: "/ready".into(),
            interval: Duration::from_secs(2),
            timeout: Duration::from_millis(300),
            healthy_threshold: 3,
            unhealthy_threshold: defaults::UNHEALTHY_THRESHOLD,
        }
    );
    let users = config.service("user-service").unwrap();
    assert_eq!(users.health.path, "/health");
    assert_eq!(users.load_balancing, LoadBalancing::RoundRobin);
    assert_eq!(users.timeouts.connect, defaults::CONNECT_TIMEOUT);
    let orders = config.service("order-service").unwrap();
    assert_eq!(orders.timeouts.read, Duration::from_secs(10));
    assert_eq!(orders.instances, ["localhost:8003"]);

    assert!(!config.work_stealing);
    assert!(!config.worker_cpu_affinity);
    assert!(!config.preserve_header_case);
    let preserving = parse(&format!("preserve_header_case: true\n{GOOD}"), "good.yaml").unwrap();
    assert!(preserving.preserve_header_case);

    assert_eq!(config.routes.len(), 3);
    assert_eq!(config.routes[0].strip_prefix.as_deref(), Some("/api"));
    let PluginConfig::Headers(headers) = &config.routes[1].plugins[0] else {
        panic!("not the headers plugin");
    };
    assert_eq!(headers.request.set[0].0, "x-from");
    assert_eq!(headers.request.remove[0], "cookie");
}

#[test]
fn workers_are_pinned_only_when_asked_and_only_share_nothing_ones() {
    let pinned = parse(&format!("worker_cpu_affinity: true\n{GOOD}"), "good.yaml").unwrap();
    assert!(pinned.worker_cpu_affinity);
    let stealing = format!("work_stealing: true\nworker_cpu_affinity: true\n{GOOD}");
    let errors = errors(&stealing);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].line, 2);
    assert!(
        errors[0].message.contains("needs share-nothing workers"),
        "{errors:#?}"
    );
}

fn errors(text: &str) -> Vec<ConfigError> {
    parse(text, "bad.yaml").unwrap_err().errors
}

#[test]
fn every_problem_is_reported_at_once_with_its_place() {
    let text = r#"listen: "127.0.0.1:8000"
health_check: { interval: 0s, unhealthy_threshold: 0 }
services:
  users:
    instances: []
  products:
    instances: ["127.0.0.1:8002", "not an address", "127.0.0.1:8002"]
routes:
  - { prefix: /api/users, service: usres }
  - { prefix: /api/users, service: users }
  - { prefix: api/x, service: users }
  - { prefix: /api/p/, service: products, strip_prefix: /other }
  - { prefix: /health, service: users }
"#;
    let errors = errors(text);
    let located: Vec<(u64, &str)> = errors
        .iter()
        .map(|e| (e.line, e.message.as_str()))
        .collect();
    let expect = [
        (2, "interval must be greater than zero"),
        (2, "unhealthy_threshold must be at least 1"),
        (5, "users: at least one instance is required"),
        (7, "\"not an address\""),
        (7, "listed twice"),
        (9, "unknown service \"usres\""),
        (10, "already used by the route at line 9"),
        (11, "must start with /"),
        (12, "must not end with /"),
        (12, "must be a leading part of the route prefix"),
        (13, "which the gateway answers itself"),
    ];
    for (line, text) in expect {
        assert!(
            located.iter().any(|(l, m)| *l == line && m.contains(text)),
            "missing line {line}: {text:?} in {located:#?}"
        );
    }
    assert_eq!(errors.len(), expect.len(), "{located:#?}");
    assert!(errors.iter().all(|e| e.column > 0), "{errors:#?}");
}

#[test]
fn syntax_errors_and_unknown_keys_are_located() {
    let unknown = errors("listen: \"127.0.0.1:1\"\nservices: {}\nroutes: []\nlisten_port: 3\n");
    assert_eq!(unknown.len(), 1);
    assert_eq!(unknown[0].line, 4, "{unknown:?}");
    assert!(unknown[0].message.contains("listen_port"), "{unknown:?}");

    let broken = errors("listen: \"127.0.0.1:1\"\nservices:\n  a: [\n");
    assert_eq!(broken.len(), 1);
    assert!(broken[0].line >= 3, "{broken:?}");

    let duration = errors(
        "listen: \"127.0.0.1:1\"\nhealth_check: { interval: soon }\nservices: {}\nroutes: []\n",
    );
    assert_eq!(duration[0].line, 2, "{duration:?}");
    assert!(
        duration[0].message.contains("invalid duration"),
        "{duration:?}"
    );

    let plugin = errors(
        "listen: \"127.0.0.1:1\"\nservices: { a: { instances: [\"127.0.0.1:1\"] } }\nroutes:\n  - { prefix: /a, service: a, plugins: [ { nope: {} } ] }\n",
    );
    assert_eq!(plugin[0].line, 4, "{plugin:?}");

    let empty = errors("  \n");
    assert_eq!(empty[0].message, "the file is empty");
}

#[test]
fn rendering_is_file_line_column_message() {
    let err = parse("listen: nowhere\nservices: {}\nroutes: []\n", "gw.yaml").unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("gw.yaml:1:9: listen \"nowhere\""),
        "{text}"
    );
    assert!(
        text.contains("\ngw.yaml:2:11: at least one service is required"),
        "{text}"
    );
}

#[test]
fn resilience_settings_have_defaults_and_are_checked() {
    let config = parse(GOOD, "good.yaml").unwrap();
    let orders = config.service("order-service").unwrap();
    assert_eq!(orders.retries, defaults::RETRIES);
    assert_eq!(orders.when_all_unhealthy, AllUnhealthy::FailFast);
    assert_eq!(orders.timeouts.total, defaults::TOTAL_TIMEOUT);
    assert_eq!(config.downstream.max_header_size, defaults::MAX_HEADER_SIZE);
    assert_eq!(config.shutdown_grace, defaults::SHUTDOWN_GRACE);
    assert_eq!(config.routes[0].max_body_size, None);

    let custom = parse(
        "listen: \"127.0.0.1:1\"
shutdown_grace: 3s
downstream: { header_timeout: 2s, max_header_size: 8KiB, max_connections: 100 }
services:
  s:
    instances: [\"127.0.0.1:2\"]
    retries: 0
    when_all_unhealthy: fail_open
    outlier_detection: { consecutive_failures: 0, ejection_time: 1s }
    timeouts: { total: 5s }
routes:
  - { prefix: /, service: s, max_body_size: 10MiB }
",
        "custom.yaml",
    )
    .unwrap();
    assert_eq!(custom.downstream.max_header_size, 8192);
    assert_eq!(custom.downstream.max_connections, 100);
    assert_eq!(custom.shutdown_grace, Duration::from_secs(3));
    let s = custom.service("s").unwrap();
    assert_eq!(
        (
            s.retries,
            s.when_all_unhealthy,
            s.outlier.consecutive_failures
        ),
        (0, AllUnhealthy::FailOpen, 0)
    );
    assert_eq!(custom.routes[0].max_body_size, Some(10 * 1024 * 1024));

    let bad = errors(
        "listen: \"127.0.0.1:1\"
shutdown_grace: 1500ms
downstream: { max_header_size: 2MiB, max_connections: 0 }
services: { s: { instances: [\"127.0.0.1:2\"] } }
routes:
  - { prefix: /, service: s, max_body_size: 10 parsecs }
",
    );
    let messages: Vec<&str> = bad.iter().map(|e| e.message.as_str()).collect();
    assert!(
        messages.iter().any(|m| m.contains("unknown size unit")),
        "{messages:?}"
    );
    assert_eq!(
        bad.len(),
        1,
        "a serde error stops at the first: {messages:?}"
    );
    let bad = errors(
        "listen: \"127.0.0.1:1\"
shutdown_grace: 1500ms
downstream: { max_header_size: 2MiB, max_connections: 0 }
services: { s: { instances: [\"127.0.0.1:2\"] } }
routes: []
",
    );
    let messages: Vec<&str> = bad.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(bad.len(), 3, "{messages:?}");
    assert!(messages.iter().any(|m| m.contains("whole seconds")));
    assert!(messages.iter().any(|m| m.contains("max_header_size")));
    assert!(messages.iter().any(|m| m.contains("max_connections")));
}

/// A file in a temp dir with `files` beside it; its validated `Config`.
fn load_beside(text: &str, files: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
    let dir = tempfile::tempdir().unwrap();
    for (name, contents) in files {
        std::fs::write(dir.path().join(name), contents).unwrap();
    }
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, text).unwrap();
    load(&path)
}

const SECURE: &str = r#"
listen: "127.0.0.1:8000"
admin: { listen: "0.0.0.0:9000", token_file: admin.token }
trusted_proxies: ["10.0.0.0/8", "192.0.2.7"]
services:
  orders: { instances: ["127.0.0.1:8003"] }
routes:
  - prefix: /api/orders
    service: orders
    plugins:
      - ip_filter: { allow: ["10.0.0.0/8", "127.0.0.1/32"], deny: ["10.6.6.6"] }
      - api_key:
          keys: [{ name: shop-frontend, sha256: "5c8f7bfe7dcbd5b3ab8a2d29e42ff5d3aa1d47cfe1e1fe19a8fb6bbd8c61e4a5" }]
          keys_file: keys.yaml
      - jwt:
          issuer: https://issuer.example
          audiences: [orders]
          algorithms: [RS256, ES256]
          jwks_file: jwks.json
          forward_claims: { sub: x-user-id }
      - rate_limit: { key: consumer, requests: 100, per: 1s, burst: 50 }
      - cors: { allow_origins: ["https://shop.example"], allow_methods: [get, POST], max_age: 10m }
"#;

#[test]
fn the_security_settings_validate_and_read_their_files() {
    let keys = "- { name: batch, sha256: \"00000000000000000000000000000000000000000000000000000000000000ff\" }\n";
    let config = load_beside(
        SECURE,
        &[
            ("admin.token", " t0ken \n"),
            ("keys.yaml", keys),
            ("jwks.json", r#"{"keys": []}"#),
        ],
    )
    .unwrap();
    assert_eq!(config.admin_listen, Some("0.0.0.0:9000".parse().unwrap()));
    assert_eq!(
        config.admin_token.as_ref().map(Secret::expose),
        Some("t0ken")
    );
    assert_eq!(format!("{:?}", config.admin_token), "Some(Secret(5 bytes))");
    assert_eq!(
        config.trusted_proxies[1],
        "192.0.2.7/32".parse::<IpNet>().unwrap()
    );
    let plugins = &config.routes[0].plugins;
    let names: Vec<&str> = plugins.iter().map(PluginConfig::name).collect();
    assert_eq!(names, ["ip_filter", "api_key", "jwt", "rate_limit", "cors"]);
    let PluginConfig::ApiKey(api_key) = &plugins[1] else {
        panic!()
    };
    assert_eq!(api_key.header, "x-api-key");
    assert_eq!(api_key.keys.len(), 2);
    assert_eq!(api_key.keys[1].name, "batch");
    assert_eq!(api_key.keys[1].sha256[31], 0xff);
    let PluginConfig::Jwt(jwt) = &plugins[2] else {
        panic!()
    };
    assert_eq!(jwt.leeway, defaults::JWT_LEEWAY);
    assert!(jwt.forward_authorization);
    assert!(matches!(&jwt.keys, JwtKeys::Jwks { document, .. } if document == r#"{"keys": []}"#));
    let PluginConfig::RateLimit(rate) = &plugins[3] else {
        panic!()
    };
    assert_eq!(
        (rate.key.clone(), rate.requests, rate.burst),
        (RateLimitKey::Consumer, 100, 50)
    );
    assert_eq!(rate.max_keys, defaults::RATE_LIMIT_MAX_KEYS);
    let PluginConfig::Cors(cors) = &plugins[4] else {
        panic!()
    };
    assert_eq!(cors.allow_methods, [http::Method::GET, http::Method::POST]);
    assert_eq!(cors.max_age, Some(Duration::from_secs(600)));
}

#[test]
fn security_mistakes_are_each_reported_at_their_place() {
    let text = r#"listen: "127.0.0.1:8000"
admin_listen: "0.0.0.0:9000"
trusted_proxies: ["10.0.0.0/8", "not-a-net"]
services:
  s: { instances: ["127.0.0.1:1"] }
routes:
  - prefix: /a
    service: s
    plugins:
      - ip_filter: {}
      - api_key: { keys: [{ name: x, sha256: "abc" }] }
      - jwt: { algorithms: [HS256], jwks_file: missing.json }
      - jwt: { algorithms: [RS256], jwks_url: "ftp://x", secret_env: NOPE }
      - rate_limit: { key: "cookie", requests: 0, per: 1s }
      - cors: { allow_origins: ["*", "shop.example/"], allow_credentials: true }
      - nope: {}
"#;
    let errors = load_beside(text, &[]).unwrap_err().errors;
    let found = |line: u64, needle: &str| {
        assert!(
            errors
                .iter()
                .any(|e| e.line == line && e.message.contains(needle)),
            "line {line}: {needle:?} not in {errors:#?}"
        );
    };
    found(
        2,
        "admin listener 0.0.0.0:9000 is reachable from other hosts: set admin.token_file",
    );
    found(
        3,
        "trusted_proxies: \"not-a-net\" is not an address or a CIDR",
    );
    found(10, "plugin ip_filter: give allow, deny or both");
    found(
        11,
        "plugin api_key: key \"x\": sha256 must be 64 hex digits",
    );
    found(12, "plugin jwt: HS256/HS384/HS512 only with secret_env");
    found(12, "jwks_file: cannot read");
    found(
        13,
        "plugin jwt: give exactly one of jwks_file, jwks_url, secret_env",
    );
    found(
        14,
        "plugin rate_limit: key \"cookie\": use client_ip, consumer or header:NAME",
    );
    found(15, "allow_credentials cannot go with allow_origins \"*\"");
    found(15, "\"shop.example/\" is not an origin");
    found(
        16,
        "unknown plugin \"nope\" (plugins: headers, ip_filter, api_key, jwt, rate_limit, cors)",
    );

    let both = errors_of(
        "listen: \"127.0.0.1:8000\"\nadmin_listen: \"127.0.0.1:9000\"\nadmin: { listen: \"127.0.0.1:9001\" }\nservices: { s: { instances: [\"127.0.0.1:1\"] } }\nroutes: []\n",
    );
    assert!(
        both.iter()
            .any(|e| e.line == 2 && e.message.contains("not both")),
        "{both:?}"
    );
    let no_token_file = load_beside(
        "listen: \"127.0.0.1:8000\"\nadmin: { listen: \"0.0.0.0:9000\", token_file: gone.token }\nservices: { s: { instances: [\"127.0.0.1:1\"] } }\nroutes: []\n",
        &[],
    )
    .unwrap_err()
    .errors;
    assert!(
        no_token_file[0]
            .message
            .contains("admin.token_file: cannot read"),
        "{no_token_file:?}"
    );
}

fn errors_of(text: &str) -> Vec<ConfigError> {
    load_beside(text, &[]).unwrap_err().errors
}

#[test]
fn api_docs_are_on_by_default_configurable_and_reserve_their_paths() {
    let config = parse(GOOD, "good.yaml").unwrap();
    assert_eq!(
        config.api_docs,
        Some(ApiDocs {
            path: "/openapi.json".into(),
            docs_path: "/docs".into(),
            source: "/openapi.json".into(),
            refresh: Duration::from_secs(30),
        })
    );
    let off = format!("api_docs: {{ enabled: false }}\n{GOOD}");
    assert_eq!(parse(&off, "off.yaml").unwrap().api_docs, None);
    let moved = format!(
        "api_docs: {{ path: /api/openapi.json, docs_path: /api-docs, refresh: 5s }}\n{GOOD}"
    );
    let docs = parse(&moved, "moved.yaml").unwrap().api_docs.unwrap();
    assert_eq!(
        (docs.path.as_str(), docs.docs_path.as_str()),
        ("/api/openapi.json", "/api-docs")
    );

    // A route may not take the paths; with the docs off it may.
    let taken = GOOD.replace(
        "prefix: /api/users, service: user-service, strip_prefix: /api",
        "prefix: /docs, service: user-service",
    );
    let problems = errors(&taken);
    assert!(
        problems
            .iter()
            .any(|e| e.message.contains("\"/docs\"") && e.message.contains("answers itself")),
        "{problems:?}"
    );
    assert!(
        parse(
            &format!("api_docs: {{ enabled: false }}\n{taken}"),
            "x.yaml"
        )
        .is_ok()
    );
    for bad in [
        "api_docs: { path: openapi.json }",
        "api_docs: { docs_path: /health }",
        "api_docs: { refresh: 10ms }",
        "api_docs: { docs_path: /d, path: /d/openapi.json }",
        "api_docs: { nonsense: 1 }",
    ] {
        assert!(!errors(&format!("{bad}\n{GOOD}")).is_empty(), "{bad}");
    }
}

#[test]
fn services_may_come_from_the_registry_in_a_mixed_table() {
    let text = r#"
listen: "127.0.0.1:8000"
registry:
  etcd: { endpoints: ["127.0.0.1:2379", "http://10.0.0.2:2379"], prefix: /apps/, cache: state/members.json }
services:
  static-one: { instances: ["127.0.0.1:8001"] }
  found: { discovery: etcd }
routes:
  - { prefix: /a, service: static-one }
  - { prefix: /b, service: found }
"#;
    let config = parse(text, "/etc/gw/gateway.yaml").unwrap();
    let registry = config.registry.clone().unwrap();
    assert_eq!(
        registry.endpoints,
        ["http://127.0.0.1:2379", "http://10.0.0.2:2379"]
    );
    assert_eq!(registry.prefix, "/apps");
    assert_eq!(
        registry.cache,
        std::path::Path::new("/etc/gw/state/members.json")
    );
    let found = config.service("found").unwrap();
    assert_eq!(found.discovery, DiscoveryKind::Etcd);
    assert!(found.instances.is_empty());
    assert_eq!(
        config.service("static-one").unwrap().discovery,
        DiscoveryKind::Static
    );
    // Defaults: the services' prefix, a cache beside the file.
    let text = text.replace(", prefix: /apps/, cache: state/members.json", "");
    let registry = parse(&text, "/etc/gw/gateway.yaml")
        .unwrap()
        .registry
        .unwrap();
    assert_eq!(registry.prefix, "/gateway/services");
    assert_eq!(
        registry.cache,
        std::path::Path::new("/etc/gw/registry-cache.json")
    );
}

#[test]
fn registry_mistakes_are_each_reported() {
    let messages =
        |text: &str| -> Vec<String> { errors(text).into_iter().map(|e| e.message).collect() };
    let without_registry = messages(
        r#"
listen: "127.0.0.1:8000"
services:
  a: { discovery: etcd }
  b: { discovery: consul, instances: ["127.0.0.1:1"] }
  c: {}
routes: [{ prefix: /a, service: a }]
"#,
    );
    let mut without_registry = without_registry;
    without_registry.sort();
    assert_eq!(
        without_registry,
        [
            "service a: discovery: etcd needs a top-level registry: { etcd: { endpoints: [...] } }",
            "service b: discovery \"consul\" is not one of static, etcd",
            "service c: instances (or discovery: etcd) is required",
        ]
    );
    let with_registry = messages(
        r#"
listen: "127.0.0.1:8000"
registry: { etcd: { endpoints: ["nohost", "https://x:1"], prefix: relative } }
services:
  a: { discovery: etcd, instances: ["127.0.0.1:1"] }
routes: [{ prefix: /a, service: a }]
"#,
    );
    assert_eq!(with_registry.len(), 4, "{with_registry:?}");
    assert!(
        with_registry[0].starts_with("registry.etcd.endpoints: \"nohost\""),
        "{with_registry:?}"
    );
    assert!(
        with_registry[1].contains("\"https://x:1\""),
        "{with_registry:?}"
    );
    assert!(
        with_registry[2].starts_with("registry.etcd.prefix \"relative\""),
        "{with_registry:?}"
    );
    assert!(
        with_registry[3].contains("exclude each other"),
        "{with_registry:?}"
    );
}
