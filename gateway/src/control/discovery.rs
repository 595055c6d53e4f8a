//! Where a service's instances come from, and how changes reach the
//! running version.
//!
//! [`Discovery`] is the extension point: a source that follows one
//! service's instances and pushes every new set through [`Updates`]. The
//! static list in `gateway.yaml` ([`StaticDiscovery`]) sends its set once
//! if it holds only addresses, and resolves host names again every
//! `dns_refresh`, sending a set only when the answer changed. A dynamic
//! source (etcd, DNS SRV, Consul) implements the same trait; a
//! [`DiscoveryProvider`] says which source serves which service.
//!
//! [`Membership`] runs one source per service on the control runtime and
//! keeps the last set each one sent. The control plane builds each
//! configuration version from the file *and* these sets; when a set
//! changes it builds and publishes a new version (`control::reload`), after
//! the new instances' first health check, as for a reload. A source that
//! fails before its first set makes the version that needs it fail to
//! build (the running one keeps serving, the error is reported); one that
//! fails later keeps its last set and logs.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::runtime::Handle;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::config::{Config, DiscoveryKind, RegistryConfig, ServiceConfig};

pub mod etcd;

/// One instance to send requests to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Instance {
    /// As the source names it, e.g. `127.0.0.1:8001` or `users:8001`.
    pub address: String,
    /// Where it resolved.
    pub socket: SocketAddr,
    pub origin: Origin,
}

/// Where an instance was found.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Origin {
    /// `instances` in the file.
    Static,
    /// The registry, under this instance id.
    Registry { id: String },
}

/// What a source says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceStatus {
    /// `static`, `etcd`, or a custom source's name.
    pub source: String,
    /// `live`, `connecting`, `unavailable` (then the set is the last known).
    pub state: String,
    /// When the set was last known to be current (`None`: always, for a
    /// static list).
    pub synced: Option<SystemTime>,
    /// The set came from the cache file, not from the source itself.
    pub from_cache: bool,
    pub error: Option<String>,
}

impl SourceStatus {
    pub fn static_list() -> Self {
        SourceStatus {
            source: "static".to_owned(),
            state: "live".to_owned(),
            synced: None,
            from_cache: false,
            error: None,
        }
    }

    /// How old the set may be: zero while the source is live, `None` if
    /// it never had one.
    pub fn age(&self) -> Option<Duration> {
        if self.state == "live" {
            return Some(Duration::ZERO);
        }
        self.synced
            .map(|synced| SystemTime::now().duration_since(synced).unwrap_or_default())
    }

    /// As `/services` and `/admin/config` show it: the age of the set in
    /// seconds, 0 while the source is live.
    pub fn to_json(&self) -> serde_json::Value {
        let mut value = serde_json::json!({
            "source": self.source,
            "state": self.state,
        });
        if let Some(age) = self.age() {
            let age = (age.as_secs_f64() * 10.0).round() / 10.0;
            value["data_age_seconds"] = serde_json::json!(age);
        }
        if let (Some(synced), false) = (self.synced, self.state == "live") {
            // The last moment the set was known to be current.
            value["synced_at"] =
                serde_json::Value::String(humantime::format_rfc3339_millis(synced).to_string());
        }
        if self.from_cache {
            value["from_cache"] = serde_json::Value::Bool(true);
        }
        if let Some(error) = &self.error {
            value["error"] = serde_json::Value::String(error.clone());
        }
        value
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("discovery for service {service} failed: {reason}")]
pub struct DiscoveryError {
    pub service: String,
    pub reason: String,
}

/// A service's instances as last reported.
pub type InstanceSet = Arc<[Instance]>;

/// Every service's instance set, by service name.
pub type MembershipView = BTreeMap<String, InstanceSet>;

/// A source of instances for one service.
#[async_trait]
pub trait Discovery: Send + Sync + 'static {
    /// Follows the service's instances for as long as the configuration
    /// uses this source: sends the current set as soon as it knows it, then
    /// each changed set. Runs on the control runtime and is aborted when the
    /// source is no longer wanted; returning early is allowed (the last set
    /// stays).
    async fn run(&self, updates: Updates);
}

/// Which source serves which service.
pub trait DiscoveryProvider: Send + Sync {
    fn source(&self, service: &ServiceConfig, config: &Config) -> Box<dyn Discovery>;
}

/// The sources `gateway.yaml` describes: the static lists, and the
/// registry for `discovery: etcd` (one cache file per path, shared by the
/// services that use it).
#[derive(Default)]
pub struct FileSources {
    caches: Mutex<HashMap<PathBuf, Arc<etcd::Cache>>>,
}

impl FileSources {
    pub fn new() -> Self {
        Self::default()
    }
}

impl DiscoveryProvider for FileSources {
    fn source(&self, service: &ServiceConfig, config: &Config) -> Box<dyn Discovery> {
        match (service.discovery, &config.registry) {
            (DiscoveryKind::Etcd, Some(registry)) => {
                let cache = Arc::clone(
                    self.caches
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .entry(registry.cache.clone())
                        .or_insert_with(|| Arc::new(etcd::Cache::open(&registry.cache))),
                );
                Box::new(etcd::EtcdDiscovery::new(&service.name, registry, cache))
            }
            // Validation refuses `discovery: etcd` without a registry.
            _ => Box::new(StaticDiscovery::new(
                &service.name,
                service.instances.clone(),
                config.dns_refresh,
            )),
        }
    }
}

/// What a running source was started for: a change restarts it.
#[derive(Debug, Clone, PartialEq)]
struct Settings {
    discovery: DiscoveryKind,
    instances: Vec<String>,
    dns_refresh: Duration,
    registry: Option<RegistryConfig>,
}

impl Settings {
    fn of(service: &ServiceConfig, config: &Config) -> Self {
        Settings {
            discovery: service.discovery,
            instances: service.instances.clone(),
            dns_refresh: config.dns_refresh,
            registry: match service.discovery {
                DiscoveryKind::Etcd => config.registry.clone(),
                DiscoveryKind::Static => None,
            },
        }
    }
}

/// What a source reported last.
#[derive(Debug, Clone)]
enum Report {
    Nothing,
    Set(InstanceSet),
    Failed(DiscoveryError),
}

/// Where a source sends what it finds.
pub struct Updates {
    service: String,
    report: watch::Sender<Report>,
    changed: Arc<Notify>,
    status: Arc<Mutex<SourceStatus>>,
}

impl Updates {
    /// The service this source serves.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Says what state the source is in (shown, never acted on).
    pub fn status(&self, status: SourceStatus) {
        *self.status.lock().unwrap_or_else(PoisonError::into_inner) = status;
    }

    /// The service's instances are now `instances` (in the order the
    /// source gives them: `/services` shows them so).
    pub fn publish(&self, instances: Vec<Instance>) {
        let set: InstanceSet = instances.into();
        let changed = self.report.send_if_modified(|report| match report {
            Report::Set(old) if *old == set => false,
            _ => {
                *report = Report::Set(Arc::clone(&set));
                true
            }
        });
        if changed {
            self.changed.notify_one();
        }
    }

    /// The source cannot say. Before its first set this fails the version
    /// that needs it; after, the last set stays and this is only logged.
    pub fn fail(&self, reason: impl Into<String>) {
        let error = DiscoveryError {
            service: self.service.clone(),
            reason: reason.into(),
        };
        let first = self.report.send_if_modified(|report| match report {
            Report::Set(_) => false,
            _ => {
                *report = Report::Failed(error.clone());
                true
            }
        });
        if first {
            self.changed.notify_one();
        } else {
            tracing::warn!(service = %self.service, reason = %error.reason, "discovery failed: keeping the last known instances");
        }
    }
}

/// A running source.
struct Source {
    settings: Settings,
    report: watch::Receiver<Report>,
    status: Arc<Mutex<SourceStatus>>,
    task: JoinHandle<()>,
}

impl Drop for Source {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One source per service, and the sets they reported.
pub struct Membership {
    runtime: Handle,
    provider: Arc<dyn DiscoveryProvider>,
    sources: Mutex<HashMap<String, Source>>,
    changed: Arc<Notify>,
}

/// How long a new source may take to send its first set.
pub const FIRST_SET_TIMEOUT: Duration = Duration::from_secs(10);

impl Membership {
    pub fn new(runtime: Handle, provider: Arc<dyn DiscoveryProvider>) -> Self {
        Membership {
            runtime,
            provider,
            sources: Mutex::new(HashMap::new()),
            changed: Arc::new(Notify::new()),
        }
    }

    /// Makes the sources match `config`'s services (with `restart`, every
    /// source starts afresh: a forced reload resolves names again), waits
    /// for the first set of each new source, and returns every service's
    /// set. If a new source fails, the sources stay as they were.
    pub async fn reconcile(
        &self,
        config: &Config,
        restart: bool,
    ) -> Result<MembershipView, DiscoveryError> {
        let mut started = Vec::new();
        {
            let sources = self.lock();
            for service in &config.services {
                let settings = Settings::of(service, config);
                let running = sources.get(&service.name);
                if restart || running.is_none_or(|s| s.settings != settings) {
                    started.push((service.name.clone(), self.start(service, config, settings)));
                }
            }
        }
        for (service, source) in &started {
            let mut report = source.report.clone();
            let first = tokio::time::timeout(
                FIRST_SET_TIMEOUT,
                report.wait_for(|r| !matches!(r, Report::Nothing)),
            )
            .await;
            let error = |reason: String| DiscoveryError {
                service: service.clone(),
                reason,
            };
            let failure = match first {
                Ok(Ok(report)) => match &*report {
                    Report::Failed(failed) => Some(failed.clone()),
                    _ => None,
                },
                Ok(Err(_)) => Some(error("the source stopped before sending a set".to_owned())),
                Err(_) => Some(error(format!(
                    "no instance set within {FIRST_SET_TIMEOUT:?}"
                ))),
            };
            if let Some(error) = failure {
                return Err(error); // `started` is dropped: those sources stop
            }
        }
        let mut sources = self.lock();
        for (name, source) in started {
            sources.insert(name, source);
        }
        sources.retain(|name, _| config.service(name).is_some());
        Ok(view(&sources))
    }

    /// Every service's current set (no waiting).
    pub fn current(&self) -> MembershipView {
        view(&self.lock())
    }

    /// Every running source's status, by service name.
    pub fn statuses(&self) -> BTreeMap<String, SourceStatus> {
        self.lock()
            .iter()
            .map(|(name, source)| {
                let status = source.status.lock().unwrap_or_else(PoisonError::into_inner);
                (name.clone(), status.clone())
            })
            .collect()
    }

    /// Waits until a source reports something new.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    fn start(&self, service: &ServiceConfig, config: &Config, settings: Settings) -> Source {
        let (sender, report) = watch::channel(Report::Nothing);
        let status = Arc::new(Mutex::new(SourceStatus {
            source: service.discovery.as_str().to_owned(),
            state: "connecting".to_owned(),
            ..SourceStatus::static_list()
        }));
        let updates = Updates {
            service: service.name.clone(),
            report: sender,
            changed: Arc::clone(&self.changed),
            status: Arc::clone(&status),
        };
        let discovery = self.provider.source(service, config);
        let task = self.runtime.spawn(async move {
            discovery.run(updates).await;
        });
        Source {
            settings,
            report,
            status,
            task,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Source>> {
        self.sources.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn view(sources: &HashMap<String, Source>) -> MembershipView {
    sources
        .iter()
        .filter_map(|(name, source)| match &*source.report.borrow() {
            Report::Set(set) => Some((name.clone(), Arc::clone(set))),
            _ => None,
        })
        .collect()
}

/// How a static list's host names are looked up (replaceable in tests).
#[async_trait]
pub trait Resolve: Send + Sync {
    async fn resolve(&self, host_port: &str) -> std::io::Result<Option<SocketAddr>>;
}

/// The system resolver (first address wins).
pub struct SystemResolver;

#[async_trait]
impl Resolve for SystemResolver {
    async fn resolve(&self, host_port: &str) -> std::io::Result<Option<SocketAddr>> {
        Ok(tokio::net::lookup_host(host_port).await?.next())
    }
}

/// `ip:port` as it is, `host:port` looked up with `resolver`.
pub async fn resolve_address(resolver: &dyn Resolve, address: &str) -> Result<SocketAddr, String> {
    match address.parse::<SocketAddr>() {
        Ok(socket) => Ok(socket),
        Err(_) => resolver
            .resolve(address)
            .await
            .map_err(|err| format!("cannot resolve {address}: {err}"))?
            .ok_or_else(|| format!("{address} resolves to no address")),
    }
}

/// The instances listed in the configuration file; host names resolved at
/// start and again every `refresh`.
pub struct StaticDiscovery {
    service: String,
    addresses: Vec<String>,
    refresh: Duration,
    resolver: Arc<dyn Resolve>,
}

impl StaticDiscovery {
    pub fn new(service: &str, addresses: Vec<String>, refresh: Duration) -> Self {
        Self::with_resolver(service, addresses, refresh, Arc::new(SystemResolver))
    }

    pub fn with_resolver(
        service: &str,
        addresses: Vec<String>,
        refresh: Duration,
        resolver: Arc<dyn Resolve>,
    ) -> Self {
        StaticDiscovery {
            service: service.to_owned(),
            addresses,
            refresh,
            resolver,
        }
    }

    /// The list resolved now.
    pub async fn resolve(&self) -> Result<Vec<Instance>, DiscoveryError> {
        let fail = |reason: String| DiscoveryError {
            service: self.service.clone(),
            reason,
        };
        let mut instances = Vec::with_capacity(self.addresses.len());
        for address in &self.addresses {
            let socket = resolve_address(&*self.resolver, address)
                .await
                .map_err(fail)?;
            instances.push(Instance {
                address: address.clone(),
                socket,
                origin: Origin::Static,
            });
        }
        Ok(instances)
    }

    fn has_names(&self) -> bool {
        self.addresses
            .iter()
            .any(|address| address.parse::<SocketAddr>().is_err())
    }
}

#[async_trait]
impl Discovery for StaticDiscovery {
    async fn run(&self, updates: Updates) {
        loop {
            match self.resolve().await {
                Ok(instances) => {
                    updates.status(SourceStatus::static_list());
                    updates.publish(instances);
                }
                Err(error) => updates.fail(error.reason),
            }
            if !self.has_names() {
                return; // addresses only: nothing will change
            }
            tokio::time::sleep(self.refresh).await;
        }
    }
}

#[cfg(test)]
mod tests;
