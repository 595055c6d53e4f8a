//! The control plane as a whole, without a proxy: versions published when
//! a discovery source changes membership (no file change), their new
//! instances checked first, and reloads that compare file and membership.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::watch;

use super::discovery::{Discovery, DiscoveryProvider, Instance, Updates};
use super::reload::{Outcome, Trigger};
use super::*;
use crate::config::ServiceConfig;

/// An HTTP server that answers 200 to anything (health checks).
fn healthy_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0
                        || stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                            .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Sources whose sets the test sends, one channel per service.
#[derive(Default)]
struct Pushed(Mutex<HashMap<String, watch::Sender<Vec<SocketAddr>>>>);

impl Pushed {
    fn channel(&self, service: &str) -> watch::Sender<Vec<SocketAddr>> {
        self.0
            .lock()
            .unwrap()
            .entry(service.to_owned())
            .or_insert_with(|| watch::channel(Vec::new()).0)
            .clone()
    }
}

struct PushedSource(watch::Receiver<Vec<SocketAddr>>);

#[async_trait]
impl Discovery for PushedSource {
    async fn run(&self, updates: Updates) {
        let mut sets = self.0.clone();
        loop {
            let set = sets.borrow_and_update().clone();
            updates.publish(
                set.into_iter()
                    .map(|socket| Instance {
                        address: socket.to_string(),
                        socket,
                        origin: crate::control::discovery::Origin::Static,
                    })
                    .collect(),
            );
            if sets.changed().await.is_err() {
                return;
            }
        }
    }
}

impl DiscoveryProvider for Pushed {
    fn source(&self, service: &ServiceConfig, _config: &Config) -> Box<dyn discovery::Discovery> {
        Box::new(PushedSource(self.channel(&service.name).subscribe()))
    }
}

const FILE: &str = "listen: \"127.0.0.1:1\"\n\
    health_check: { interval: 100ms, timeout: 300ms }\n\
    services:\n  users: { instances: [\"127.0.0.1:9\"] }\n\
    routes:\n  - { prefix: /users, service: users }\n";

fn start(pushed: &Arc<Pushed>, first: Vec<SocketAddr>) -> (ControlPlane, tempfile::TempDir) {
    pushed.channel("users").send_replace(first);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, FILE).unwrap();
    let config = crate::config::load(&path).unwrap();
    let control = ControlPlane::start(
        &path,
        config,
        std::fs::read(&path).ok(),
        PluginRegistry::builtin(),
        Arc::clone(pushed) as Arc<dyn DiscoveryProvider>,
    )
    .unwrap();
    (control, dir)
}

fn instances(control: &ControlPlane) -> Vec<(SocketAddr, bool)> {
    control.current.load().upstreams[0]
        .instances
        .iter()
        .map(|i| (i.socket, i.is_ready()))
        .collect()
}

#[test]
fn a_changed_instance_set_is_published_without_a_file_change_after_its_first_check() {
    let (a, b) = (healthy_backend(), healthy_backend());
    let pushed = Arc::new(Pushed::default());
    let (control, _dir) = start(&pushed, vec![a]);
    assert_eq!(control.current.load().version, 1);
    assert_eq!(instances(&control), [(a, true)]);

    pushed.channel("users").send_replace(vec![a, b]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while control.current.load().version == 1 {
        assert!(Instant::now() < deadline, "no version for the new set");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Published only once the new instance had its first check.
    assert_eq!(instances(&control), [(a, true), (b, true)]);
    let last = control.reloader.last_attempt().unwrap();
    assert_eq!(last.trigger, Trigger::Discovery);
    assert!(matches!(last.outcome, Outcome::Applied { version: 2, .. }));

    // An instance leaves.
    pushed.channel("users").send_replace(vec![b]);
    while control.current.load().version == 2 {
        assert!(Instant::now() < deadline, "no version without the instance");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(instances(&control), [(b, true)]);
}

#[test]
fn a_reload_publishes_when_file_or_membership_changed_and_not_otherwise() {
    let (a, b) = (healthy_backend(), healthy_backend());
    let pushed = Arc::new(Pushed::default());
    let (control, dir) = start(&pushed, vec![a]);
    let reloader = Arc::clone(&control.reloader);
    let reload = |trigger| control.block_on(reloader.reload(trigger));

    assert_eq!(
        reload(Trigger::Admin),
        Some(Outcome::Unchanged { version: 1 })
    );
    // The same file, written again (a comment): still nothing to publish.
    std::fs::write(dir.path().join("gateway.yaml"), format!("{FILE}# edited\n")).unwrap();
    assert_eq!(
        reload(Trigger::File),
        Some(Outcome::Unchanged { version: 1 })
    );
    assert_eq!(
        reload(Trigger::File),
        None,
        "the bytes did not change again"
    );

    // Membership changed: a forced reload publishes it (or the discovery
    // follower did already; either way one new version has it).
    pushed.channel("users").send_replace(vec![a, b]);
    let outcome = reload(Trigger::Admin).unwrap();
    let version = control.current.load().version;
    assert!(
        matches!(outcome, Outcome::Applied { version: 2, .. })
            || (outcome == Outcome::Unchanged { version: 2 } && version == 2),
        "{outcome:?}"
    );
    assert_eq!(instances(&control), [(a, true), (b, true)]);
    assert_eq!(
        reload(Trigger::Admin),
        Some(Outcome::Unchanged { version: 2 })
    );
}
