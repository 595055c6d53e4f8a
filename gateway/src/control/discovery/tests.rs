//! Static lists (resolution, re-resolution) and the membership registry
//! (sources started, followed, replaced, failing).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use super::*;

fn updates() -> (Updates, watch::Receiver<Report>, Arc<Notify>) {
    let (sender, receiver) = watch::channel(Report::Nothing);
    let changed = Arc::new(Notify::new());
    let updates = Updates {
        service: "s".into(),
        report: sender,
        changed: Arc::clone(&changed),
        status: Arc::new(Mutex::new(SourceStatus::static_list())),
    };
    (updates, receiver, changed)
}

fn sockets(report: &Report) -> Vec<SocketAddr> {
    match report {
        Report::Set(set) => set.iter().map(|i| i.socket).collect(),
        other => panic!("no set: {other:?}"),
    }
}

#[tokio::test]
async fn static_discovery_resolves_names_and_reports_failures() {
    let found = StaticDiscovery::new(
        "s",
        vec!["127.0.0.1:81".into(), "localhost:82".into()],
        Duration::from_secs(30),
    )
    .resolve()
    .await
    .unwrap();
    assert_eq!(found[0].socket, "127.0.0.1:81".parse().unwrap());
    assert_eq!(found[1].socket.port(), 82);
    assert!(found[1].socket.ip().is_loopback());
    let err = StaticDiscovery::new(
        "s",
        vec!["no-such-host.invalid:80".into()],
        Duration::from_secs(30),
    )
    .resolve()
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot resolve no-such-host.invalid:80"),
        "{err}"
    );
}

/// Answers each lookup with the next address of a script (the last one
/// again once the script is over), counting lookups.
struct Scripted {
    answers: Vec<&'static str>,
    lookups: AtomicUsize,
}

#[async_trait]
impl Resolve for Scripted {
    async fn resolve(&self, _host_port: &str) -> std::io::Result<Option<SocketAddr>> {
        let n = self.lookups.fetch_add(1, Ordering::SeqCst);
        let answer = self.answers[n.min(self.answers.len() - 1)];
        if answer == "fail" {
            return Err(std::io::Error::other("SERVFAIL"));
        }
        Ok(Some(answer.parse().unwrap()))
    }
}

#[tokio::test]
async fn host_names_are_resolved_again_and_only_changes_are_sent() {
    let resolver = Arc::new(Scripted {
        answers: vec!["10.0.0.1:80", "10.0.0.1:80", "fail", "10.0.0.2:80"],
        lookups: AtomicUsize::new(0),
    });
    let source = StaticDiscovery::with_resolver(
        "s",
        vec!["users:80".into(), "127.0.0.1:1".into()],
        Duration::from_millis(20),
        Arc::clone(&resolver) as Arc<dyn Resolve>,
    );
    let (updates, mut report, _changed) = updates();
    let task = tokio::spawn(async move { source.run(updates).await });
    report.changed().await.unwrap();
    assert_eq!(
        sockets(&report.borrow_and_update()),
        [
            "10.0.0.1:80".parse().unwrap(),
            "127.0.0.1:1".parse().unwrap()
        ]
    );
    // The same answer, then a failure: nothing sent; then a new address.
    tokio::time::timeout(Duration::from_secs(5), report.changed())
        .await
        .unwrap()
        .unwrap();
    assert!(resolver.lookups.load(Ordering::SeqCst) >= 4);
    assert_eq!(
        sockets(&report.borrow()),
        [
            "10.0.0.2:80".parse().unwrap(),
            "127.0.0.1:1".parse().unwrap()
        ]
    );
    task.abort();
}

#[tokio::test]
async fn a_list_of_addresses_is_sent_once() {
    let source = StaticDiscovery::new("s", vec!["127.0.0.1:1".into()], Duration::from_millis(1));
    let (updates, report, _changed) = updates();
    tokio::time::timeout(Duration::from_secs(5), source.run(updates))
        .await
        .expect("the source should return once it sent its set");
    assert_eq!(sockets(&report.borrow()), ["127.0.0.1:1".parse().unwrap()]);
}

/// A source whose sets a test sends: the set named by the service's first
/// instance in the file, e.g. `set-a`.
#[derive(Default)]
struct TestSources {
    sets: Mutex<HashMap<String, watch::Sender<Option<Vec<Instance>>>>>,
    started: AtomicUsize,
}

impl TestSources {
    fn sender(&self, name: &str) -> watch::Sender<Option<Vec<Instance>>> {
        self.sets
            .lock()
            .unwrap()
            .entry(name.to_owned())
            .or_insert_with(|| watch::channel(None).0)
            .clone()
    }

    fn send(&self, name: &str, ports: &[u16]) {
        let set = ports
            .iter()
            .map(|port| Instance {
                address: format!("127.0.0.1:{port}"),
                socket: ([127, 0, 0, 1], *port).into(),
                origin: Origin::Static,
            })
            .collect();
        self.sender(name).send_replace(Some(set));
    }
}

struct TestSource(watch::Receiver<Option<Vec<Instance>>>);

#[async_trait]
impl Discovery for TestSource {
    async fn run(&self, updates: Updates) {
        let mut sets = self.0.clone();
        loop {
            let set = sets.borrow_and_update().clone();
            match set {
                Some(set) if set.is_empty() => updates.fail("no such set"),
                Some(set) => updates.publish(set),
                None => {}
            }
            if sets.changed().await.is_err() {
                return;
            }
        }
    }
}

impl DiscoveryProvider for TestSources {
    fn source(&self, service: &ServiceConfig, _config: &Config) -> Box<dyn Discovery> {
        self.started.fetch_add(1, Ordering::SeqCst);
        Box::new(TestSource(self.sender(&service.instances[0]).subscribe()))
    }
}

fn config(sets: &[(&str, &str)]) -> Config {
    let services: String = sets
        .iter()
        .map(|(service, set)| format!("  {service}: {{ instances: [\"{set}:1\"] }}\n"))
        .collect();
    let text = format!("listen: \"127.0.0.1:1\"\nservices:\n{services}routes: []\n");
    crate::config::parse(&text, "test.yaml").unwrap()
}

fn ports(view: &MembershipView, service: &str) -> Vec<u16> {
    view[service].iter().map(|i| i.socket.port()).collect()
}

#[tokio::test]
async fn membership_follows_pushed_sets_and_replaces_sources_whose_settings_changed() {
    let sources = Arc::new(TestSources::default());
    sources.send("a:1", &[10, 11]);
    sources.send("b:1", &[20]);
    let membership = Membership::new(Handle::current(), Arc::clone(&sources) as _);
    let view = membership
        .reconcile(&config(&[("users", "a"), ("orders", "b")]), false)
        .await
        .unwrap();
    assert_eq!(ports(&view, "users"), [10, 11]);
    assert_eq!(ports(&view, "orders"), [20]);

    // A push, with no reconcile: the change is announced and visible.
    // (The first sets were announced too: take that announcement first.)
    tokio::time::timeout(Duration::from_secs(5), membership.changed())
        .await
        .unwrap();
    sources.send("a:1", &[12]);
    tokio::time::timeout(Duration::from_secs(5), membership.changed())
        .await
        .unwrap();
    assert_eq!(ports(&membership.current(), "users"), [12]);

    // Same settings: the sources keep running; a forced restart or new
    // settings start new ones; a removed service's source stops.
    let started = sources.started.load(Ordering::SeqCst);
    membership
        .reconcile(&config(&[("users", "a"), ("orders", "b")]), false)
        .await
        .unwrap();
    assert_eq!(sources.started.load(Ordering::SeqCst), started);
    membership
        .reconcile(&config(&[("users", "a"), ("orders", "b")]), true)
        .await
        .unwrap();
    assert_eq!(sources.started.load(Ordering::SeqCst), started + 2);
    let view = membership
        .reconcile(&config(&[("users", "b")]), false)
        .await
        .unwrap();
    assert_eq!(ports(&view, "users"), [20]);
    assert!(!view.contains_key("orders"));
}

#[tokio::test]
async fn a_new_source_that_fails_leaves_the_running_ones_as_they_were() {
    let sources = Arc::new(TestSources::default());
    sources.send("a:1", &[10]);
    sources.send("bad:1", &[]);
    let membership = Membership::new(Handle::current(), Arc::clone(&sources) as _);
    membership
        .reconcile(&config(&[("users", "a")]), false)
        .await
        .unwrap();
    let started = Instant::now();
    let error = membership
        .reconcile(&config(&[("users", "bad")]), false)
        .await
        .unwrap_err();
    assert_eq!(error.service, "users");
    assert_eq!(error.reason, "no such set");
    assert!(started.elapsed() < FIRST_SET_TIMEOUT, "failed fast");
    assert_eq!(ports(&membership.current(), "users"), [10]);
    // The old source still follows its set.
    sources.send("a:1", &[13]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while ports(&membership.current(), "users") != [13] {
        assert!(Instant::now() < deadline, "not followed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
