//! `gateway check FILE...`: the same validation as start-up and reload,
//! every error printed as FILE:LINE:COLUMN, exit status 2 on any error.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::process::Command;

const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");

#[test]
fn the_repository_configuration_is_valid() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../gateway.yaml");
    let output = Command::new(GATEWAY)
        .args(["check", file])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("ok (3 services, 3 routes)"));
}

#[test]
fn every_error_is_printed_with_its_place_and_the_exit_status_is_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "listen: \"127.0.0.1:8000\"
services:
  users: { instances: [\"127.0.0.1:8001\"] }
routes:
  - { prefix: /api/users, service: usres }
  - { prefix: /api/users, service: users }
",
    )
    .unwrap();
    let output = Command::new(GATEWAY)
        .arg("check")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let name = file.display();
    assert!(
        stderr.contains(&format!("{name}:5:")) && stderr.contains("unknown service \"usres\""),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{name}:6:")) && stderr.contains("already used"),
        "{stderr}"
    );

    std::fs::write(&file, "listen: [unclosed\n").unwrap();
    let output = Command::new(GATEWAY)
        .arg("check")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains(&format!("{name}:")));

    let missing = dir.path().join("missing.yaml");
    let output = Command::new(GATEWAY)
        .arg("check")
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot read the file"));
}

#[test]
fn an_invalid_configuration_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, "listen: nowhere\nservices: {}\nroutes: []\n").unwrap();
    let output = Command::new(GATEWAY)
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("listen \"nowhere\""));
}

/// The compose configuration is the local one with container names: same
/// routes, same services and settings, same number of instances.
#[test]
fn the_compose_configuration_does_not_drift_from_the_local_one() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let local =
        gateway::config::load(std::path::Path::new(&format!("{root}/gateway.yaml"))).unwrap();
    let compose = gateway::config::load(std::path::Path::new(&format!(
        "{root}/deploy/gateway.compose.yaml"
    )))
    .unwrap();
    assert_eq!(local.routes, compose.routes);
    assert_eq!(local.services.len(), compose.services.len());
    for (l, c) in local.services.iter().zip(&compose.services) {
        assert_eq!(
            (
                &l.name,
                l.load_balancing,
                &l.health,
                l.timeouts,
                l.instances.len()
            ),
            (
                &c.name,
                c.load_balancing,
                &c.health,
                c.timeouts,
                c.instances.len()
            ),
        );
    }
    assert_eq!(local.listen.port(), compose.listen.port());
}

#[test]
fn a_public_admin_listener_without_a_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.yaml");
    let body = "services:\n  users: { instances: [\"127.0.0.1:8001\"] }\nroutes: []\n";
    std::fs::write(
        &file,
        format!("listen: \"127.0.0.1:8000\"\nadmin_listen: \"0.0.0.0:9000\"\n{body}"),
    )
    .unwrap();
    let output = Command::new(GATEWAY)
        .arg("check")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(":2:15: admin listener 0.0.0.0:9000 is reachable from other hosts"),
        "{stderr}"
    );
    // With a token it is fine.
    std::fs::write(dir.path().join("admin.token"), "s3cret\n").unwrap();
    std::fs::write(
        &file,
        format!(
            "listen: \"127.0.0.1:8000\"\nadmin: {{ listen: \"0.0.0.0:9000\", token_file: admin.token }}\n{body}"
        ),
    )
    .unwrap();
    let output = Command::new(GATEWAY)
        .arg("check")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The registry configurations are the static ones with `discovery: etcd`:
/// same routes, same services and settings.
#[test]
fn the_registry_configurations_do_not_drift_from_the_static_ones() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let load = |path: &str| {
        gateway::config::load(std::path::Path::new(&format!("{root}/{path}"))).unwrap()
    };
    for (fixed, registry) in [
        ("gateway.yaml", "gateway.registry.yaml"),
        (
            "deploy/gateway.compose.yaml",
            "deploy/gateway.compose.registry.yaml",
        ),
    ] {
        let (fixed, registry) = (load(fixed), load(registry));
        assert_eq!(fixed.routes, registry.routes);
        assert_eq!(fixed.listen, registry.listen);
        assert!(registry.registry.is_some());
        assert_eq!(fixed.services.len(), registry.services.len());
        for (f, r) in fixed.services.iter().zip(&registry.services) {
            assert_eq!(
                r.discovery,
                gateway::config::DiscoveryKind::Etcd,
                "{}",
                r.name
            );
            assert!(r.instances.is_empty());
            assert_eq!(
                (&f.name, f.load_balancing, &f.health, f.timeouts, f.retries),
                (&r.name, r.load_balancing, &r.health, r.timeouts, r.retries),
            );
        }
    }
}
