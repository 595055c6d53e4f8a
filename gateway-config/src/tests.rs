//! Parsing and validation of `gateway.yaml`: defaults, overrides, and every
//! error reported at once with its place.

use std::time::Duration;

use super::*;

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
