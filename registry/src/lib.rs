//! The service registry on etcd: what the services, order-service and the
//! gateway share.
//!
//! Key layout (the contract): `<prefix>/<service>/<instance-id>` holds one
//! JSON [`Entry`] (`{"address": "host:port", "version": "...",
//! "metadata": {...}}`), default prefix [`DEFAULT_PREFIX`]. An instance
//! writes its key under a lease ([`Registration`]): kept alive while the
//! process lives, revoked when it stops gracefully, expired by etcd
//! [`DEFAULT_TTL`] after a crash.
//!
//! A client follows one service's members with [`Follower`]: one range
//! read, then a watch from the next revision (no polling); after a
//! compaction, a cancelled watch or a lost connection it reads and watches
//! again, with back-off, keeping the last members meanwhile.
//!
//! The client is `etcd-client` (etcd's v3 gRPC API over tonic): leases,
//! keep-alive streams and watches are what it is made for, and HTTP/2
//! pings notice a dead connection that a half-open TCP socket would hide.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

mod round_robin;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use round_robin::RoundRobin;

/// Where instances are registered unless told otherwise.
pub const DEFAULT_PREFIX: &str = "/gateway/services";
/// A crashed instance leaves the registry this long after its last
/// keep-alive: long enough to ride out a GC pause or a slow disk, short
/// enough that retries and ejection cover the gap.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// One etcd call (other than a watch) may take this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// First and longest pause before trying etcd again.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// While etcd stays unavailable, say so again this often.
const STILL_DOWN_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("registry URL {0:?} must look like etcd://HOST:PORT[,HOST:PORT...]")]
    Shape(String),
}

/// The etcd endpoints of a registry URL `etcd://HOST:PORT[,HOST:PORT...]`,
/// as `http://HOST:PORT`.
pub fn parse_url(url: &str) -> Result<Vec<String>, UrlError> {
    let shape = || UrlError::Shape(url.to_owned());
    let rest = url.strip_prefix("etcd://").ok_or_else(shape)?;
    let rest = rest.trim_end_matches('/');
    let mut endpoints = Vec::new();
    for host_port in rest.split(',') {
        let host_port = host_port.trim();
        let valid = host_port
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !valid {
            return Err(shape());
        }
        endpoints.push(format!("http://{host_port}"));
    }
    Ok(endpoints)
}

/// Endpoints written as `HOST:PORT` or `http://HOST:PORT`, as etcd-client
/// takes them.
pub fn endpoint_urls(endpoints: &[String]) -> Vec<String> {
    endpoints
        .iter()
        .map(|e| {
            if e.contains("://") {
                e.clone()
            } else {
                format!("http://{e}")
            }
        })
        .collect()
}

/// What an instance registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// `host:port` to send requests to.
    pub address: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// One registered instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The last segment of its key.
    pub id: String,
    #[serde(flatten)]
    pub entry: Entry,
}

/// `<prefix>/<service>/`: every key of the service's instances.
pub fn service_prefix(prefix: &str, service: &str) -> String {
    format!("{}/{service}/", prefix.trim_end_matches('/'))
}

/// `<prefix>/<service>/<id>`.
pub fn key(prefix: &str, service: &str, id: &str) -> String {
    format!("{}{id}", service_prefix(prefix, service))
}

/// A client for `endpoints` (`http://HOST:PORT`). Connects lazily: an
/// unreachable etcd shows in the first call, not here. A closed connection
/// shows at once; HTTP/2 pings every 10 s notice a silent one (etcd closes
/// connections that ping more often than every 5 s: `too_many_pings`).
pub async fn connect(endpoints: &[String]) -> Result<Client, etcd_client::Error> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true);
    Client::connect(endpoint_urls(endpoints), Some(options)).await
}

async fn within<T>(call: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
    }
}

/// Doubling pauses between attempts, reset after a success.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(BACKOFF_MIN)
    }

    fn next(&mut self) -> Duration {
        let pause = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        pause
    }

    fn reset(&mut self) {
        self.0 = BACKOFF_MIN;
    }
}

/// An instance's key in the registry, kept under a lease by a background
/// task: registered as soon as etcd answers, registered again (with
/// back-off, logged) whenever the lease is lost, removed by
/// [`Registration::deregister`].
pub struct Registration {
    key: String,
    stop: Option<oneshot::Sender<oneshot::Sender<()>>>,
    registered: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl Registration {
    /// Starts registering `entry` as `<prefix>/<service>/<id>` with a
    /// lease of `ttl` (whole seconds, at least 1). Returns at once.
    pub fn start(
        endpoints: Vec<String>,
        prefix: &str,
        service: &str,
        id: &str,
        entry: &Entry,
        ttl: Duration,
    ) -> Registration {
        let key = key(prefix, service, id);
        let value = serde_json::to_string(entry).unwrap_or_default();
        let ttl = ttl.as_secs().max(1);
        let (stop, stop_rx) = oneshot::channel();
        let (registered_tx, registered) = watch::channel(false);
        let task = tokio::spawn(keep_registered(
            endpoints,
            key.clone(),
            value,
            ttl,
            stop_rx,
            registered_tx,
        ));
        Registration {
            key,
            stop: Some(stop),
            registered,
            task,
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether the key is in etcd now (as far as this process knows).
    pub fn is_registered(&self) -> bool {
        *self.registered.borrow()
    }

    /// Waits until the key is in etcd.
    pub async fn registered(&self) {
        let mut registered = self.registered.clone();
        let _ = registered.wait_for(|r| *r).await;
    }

    /// Revokes the lease (the key goes with it) and stops; waits at most
    /// [`CALL_TIMEOUT`] for etcd. Safe to call when never registered.
    pub async fn deregister(mut self) {
        if let Some(stop) = self.stop.take() {
            let (done, done_rx) = oneshot::channel();
            if stop.send(done).is_ok() {
                let _ = tokio::time::timeout(CALL_TIMEOUT * 2, done_rx).await;
            }
        }
        self.task.abort();
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why one registration ended.
enum Ended {
    /// Told to stop (lease revoked, or never granted).
    Stopped,
    Lost(String),
}

async fn keep_registered(
    endpoints: Vec<String>,
    key: String,
    value: String,
    ttl: u64,
    mut stop: oneshot::Receiver<oneshot::Sender<()>>,
    registered: watch::Sender<bool>,
) {
    let mut backoff = Backoff::new();
    let mut failures = 0u32;
    loop {
        match register_once(&endpoints, &key, &value, ttl, &mut stop, &registered).await {
            (Ended::Stopped, _) => return,
            (Ended::Lost(why), was_registered) => {
                registered.send_replace(false);
                if was_registered {
                    backoff.reset();
                    failures = 0;
                    tracing::warn!(key, error = %why, "registration lost: registering again");
                }
                failures += 1;
                let pause = backoff.next();
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(key, error = %why, attempt = failures, "cannot register in the registry; trying again in {pause:?}");
                }
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    done = &mut stop => {
                        if let Ok(done) = done { let _ = done.send(()); }
                        return;
                    }
                }
            }
        }
    }
}

/// Grants a lease, writes the key under it and keeps it alive until told
/// to stop or the lease is lost. The flag: whether the key was written.
async fn register_once(
    endpoints: &[String],
    key: &str,
    value: &str,
    ttl: u64,
    stop: &mut oneshot::Receiver<oneshot::Sender<()>>,
    registered: &watch::Sender<bool>,
) -> (Ended, bool) {
    let lost = |why: String| (Ended::Lost(why), false);
    let mut client = match connect(endpoints).await {
        Ok(client) => client,
        Err(err) => return lost(err.to_string()),
    };
    let ttl_i64 = i64::try_from(ttl).unwrap_or(i64::MAX);
    let lease = match within(client.lease_grant(ttl_i64, None)).await {
        Ok(lease) => lease.id(),
        Err(why) => return lost(why),
    };
    let put = client.put(key, value, Some(PutOptions::new().with_lease(lease)));
    if let Err(why) = within(put).await {
        return lost(why);
    }
    let (mut keeper, mut answers) = match within(client.lease_keep_alive(lease)).await {
        Ok(pair) => pair,
        Err(why) => return (Ended::Lost(why), true),
    };
    registered.send_replace(true);
    tracing::info!(key, lease = format!("{lease:x}"), ttl, "registered");
    // A keep-alive every third of the TTL: two may be lost before expiry.
    let every = Duration::from_millis(ttl * 1000 / 3).max(Duration::from_millis(300));
    loop {
        tokio::select! {
            done = &mut *stop => {
                match within(client.lease_revoke(lease)).await {
                    Ok(_) => tracing::info!(key, "deregistered (lease revoked)"),
                    Err(why) => tracing::warn!(key, error = %why, "cannot revoke the lease: the key expires with it"),
                }
                if let Ok(done) = done { let _ = done.send(()); }
                return (Ended::Stopped, true);
            }
            () = tokio::time::sleep(every) => {
                if let Err(err) = keeper.keep_alive().await {
                    return (Ended::Lost(err.to_string()), true);
                }
                match tokio::time::timeout(CALL_TIMEOUT, answers.message()).await {
                    Ok(Ok(Some(answer))) if answer.ttl() > 0 => {}
                    Ok(Ok(Some(_))) => return (Ended::Lost("the lease expired".to_owned()), true),
                    Ok(Ok(None)) => return (Ended::Lost("keep-alive stream closed".to_owned()), true),
                    Ok(Err(err)) => return (Ended::Lost(err.to_string()), true),
                    Err(_) => return (Ended::Lost(format!("no keep-alive answer within {CALL_TIMEOUT:?}")), true),
                }
            }
        }
    }
}

/// Whether the registry could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Not reached yet.
    Connecting,
    /// Read and watched: the members are current.
    Live,
    /// Unreachable since `since`; the members are the last known ones.
    Unavailable { since: SystemTime, error: String },
}

impl State {
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Live => "live",
            State::Unavailable { .. } => "unavailable",
        }
    }
}

/// A service's members as last known, and how current they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// Sorted by id.
    pub members: Vec<Member>,
    pub state: State,
    /// When the members were last known to be current: now while
    /// [`State::Live`], the moment it was lost while unavailable; `None`
    /// before the first read.
    pub synced: Option<SystemTime>,
}

impl View {
    /// How old the members may be: zero while live.
    pub fn age(&self) -> Option<Duration> {
        match self.state {
            State::Live => Some(Duration::ZERO),
            _ => self
                .synced
                .map(|t| SystemTime::now().duration_since(t).unwrap_or_default()),
        }
    }
}

/// Follows one service's members in etcd from a background task until
/// dropped.
pub struct Follower {
    view: watch::Receiver<View>,
    task: JoinHandle<()>,
}

impl Follower {
    /// Starts following `<prefix>/<service>/` on `endpoints`.
    pub fn start(endpoints: Vec<String>, prefix: &str, service: &str) -> Follower {
        let (sender, view) = watch::channel(View {
            members: Vec::new(),
            state: State::Connecting,
            synced: None,
        });
        let task = tokio::spawn(follow(endpoints, service_prefix(prefix, service), sender));
        Follower { view, task }
    }

    /// The latest view, and each change.
    pub fn view(&self) -> watch::Receiver<View> {
        self.view.clone()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn follow(endpoints: Vec<String>, prefix: String, view: watch::Sender<View>) {
    let mut backoff = Backoff::new();
    let mut down_since: Option<SystemTime> = None;
    let mut last_said = std::time::Instant::now();
    loop {
        let error = match follow_once(&endpoints, &prefix, &view, &mut down_since).await {
            Relist::Now(why) => {
                tracing::info!(
                    prefix,
                    reason = why,
                    "registry watch restarted: reading again"
                );
                backoff.reset();
                // Not at once: a watch that etcd keeps cancelling must not
                // spin.
                tokio::time::sleep(BACKOFF_MIN).await;
                continue;
            }
            Relist::After(error) => error,
        };
        let now = SystemTime::now();
        view.send_modify(|v| {
            if v.state == State::Live {
                v.synced = Some(now);
            }
            if !matches!(v.state, State::Unavailable { .. }) {
                v.state = State::Unavailable {
                    since: now,
                    error: error.clone(),
                };
            }
        });
        match down_since {
            None => {
                down_since = Some(now);
                last_said = std::time::Instant::now();
                tracing::warn!(prefix, %error, "registry unavailable: keeping the last known instances");
            }
            Some(since) if last_said.elapsed() >= STILL_DOWN_EVERY => {
                last_said = std::time::Instant::now();
                let down = now.duration_since(since).unwrap_or_default();
                tracing::warn!(prefix, %error, down_seconds = down.as_secs(), "registry still unavailable: keeping the last known instances");
            }
            Some(_) => {}
        }
        tokio::time::sleep(backoff.next()).await;
    }
}

enum Relist {
    /// The watch ended in a way that a fresh read fixes (compaction,
    /// cancellation): read again at once.
    Now(&'static str),
    /// etcd could not be reached or failed: wait, then try again.
    After(String),
}

async fn follow_once(
    endpoints: &[String],
    prefix: &str,
    view: &watch::Sender<View>,
    down_since: &mut Option<SystemTime>,
) -> Relist {
    let mut client = match connect(endpoints).await {
        Ok(client) => client,
        Err(err) => return Relist::After(err.to_string()),
    };
    let listed = match within(client.get(prefix, Some(GetOptions::new().with_prefix()))).await {
        Ok(listed) => listed,
        Err(why) => return Relist::After(why),
    };
    let revision = listed.header().map_or(0, |h| h.revision());
    let mut members: BTreeMap<String, Entry> = BTreeMap::new();
    for kv in listed.kvs() {
        if let Some((id, entry)) = parse(prefix, kv.key(), kv.value()) {
            members.insert(id, entry);
        }
    }
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1)
        .with_progress_notify();
    let mut stream = match within(client.watch(prefix, Some(options))).await {
        Ok(stream) => stream,
        Err(why) => return Relist::After(why),
    };
    if let Some(since) = down_since.take() {
        let down = SystemTime::now().duration_since(since).unwrap_or_default();
        tracing::info!(
            prefix,
            down_ms = down.as_millis() as u64,
            members = members.len(),
            "registry available again"
        );
    }
    publish(view, &members);
    loop {
        let answer = match stream.message().await {
            Ok(Some(answer)) => answer,
            Ok(None) => return Relist::After("the watch stream closed".to_owned()),
            Err(err) => return Relist::After(err.to_string()),
        };
        if answer.compact_revision() > 0 {
            return Relist::Now("compacted");
        }
        if answer.canceled() {
            return Relist::Now("cancelled");
        }
        if answer.events().is_empty() {
            continue; // created, or a progress notice
        }
        for event in answer.events() {
            let Some(kv) = event.kv() else { continue };
            match event.event_type() {
                EventType::Put => match parse(prefix, kv.key(), kv.value()) {
                    Some((id, entry)) => {
                        members.insert(id, entry);
                    }
                    // Overwritten with something that is not an entry: no
                    // longer a member.
                    None => {
                        if let Some(id) = id_of(prefix, kv.key()) {
                            members.remove(&id);
                        }
                    }
                },
                EventType::Delete => {
                    if let Some(id) = id_of(prefix, kv.key()) {
                        members.remove(&id);
                    }
                }
            }
        }
        publish(view, &members);
    }
}

fn publish(view: &watch::Sender<View>, members: &BTreeMap<String, Entry>) {
    let members: Vec<Member> = members
        .iter()
        .map(|(id, entry)| Member {
            id: id.clone(),
            entry: entry.clone(),
        })
        .collect();
    let synced = Some(SystemTime::now());
    view.send_if_modified(|v| {
        let changed = v.members != members || v.state != State::Live;
        v.members = members;
        v.state = State::Live;
        v.synced = synced;
        changed
    });
}

/// The instance id of a key directly under `prefix` (deeper keys are not
/// instances).
fn id_of(prefix: &str, key: &[u8]) -> Option<String> {
    let id = std::str::from_utf8(key).ok()?.strip_prefix(prefix)?;
    (!id.is_empty() && !id.contains('/')).then(|| id.to_owned())
}

fn parse(prefix: &str, key: &[u8], value: &[u8]) -> Option<(String, Entry)> {
    let id = id_of(prefix, key)?;
    match serde_json::from_slice::<Entry>(value) {
        Ok(entry) if !entry.address.is_empty() => Some((id, entry)),
        Ok(_) => {
            tracing::warn!(prefix, id, "registry entry without an address: ignored");
            None
        }
        Err(err) => {
            tracing::warn!(prefix, id, error = %err, "registry entry is not the expected JSON: ignored");
            None
        }
    }
}

#[cfg(test)]
mod tests;
