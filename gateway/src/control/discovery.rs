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
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::runtime::Handle;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::config::{Config, ServiceConfig};

/// One instance to send requests to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Instance {
    /// As the source names it, e.g. `127.0.0.1:8001` or `users:8001`.
    pub address: String,
    /// Where it resolved.
    pub socket: SocketAddr,
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

/// The sources `gateway.yaml` describes (the static lists).
pub struct FileSources;

impl DiscoveryProvider for FileSources {
    fn source(&self, service: &ServiceConfig, config: &Config) -> Box<dyn Discovery> {
        Box::new(StaticDiscovery::new(
            &service.name,
            service.instances.clone(),
            config.dns_refresh,
        ))
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
}

impl Updates {
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
    /// The settings it was started for: a change restarts it.
    settings: (Vec<String>, Duration),
    report: watch::Receiver<Report>,
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
                let settings = (service.instances.clone(), config.dns_refresh);
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

    /// Waits until a source reports something new.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    fn start(
        &self,
        service: &ServiceConfig,
        config: &Config,
        settings: (Vec<String>, Duration),
    ) -> Source {
        let (sender, report) = watch::channel(Report::Nothing);
        let updates = Updates {
            service: service.name.clone(),
            report: sender,
            changed: Arc::clone(&self.changed),
        };
        let discovery = self.provider.source(service, config);
        let task = self.runtime.spawn(async move {
            discovery.run(updates).await;
        });
        Source {
            settings,
            report,
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
            let socket = match address.parse::<SocketAddr>() {
                Ok(socket) => socket,
                Err(_) => self
                    .resolver
                    .resolve(address)
                    .await
                    .map_err(|err| fail(format!("cannot resolve {address}: {err}")))?
                    .ok_or_else(|| fail(format!("{address} resolves to no address")))?,
            };
            instances.push(Instance {
                address: address.clone(),
                socket,
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
                Ok(instances) => updates.publish(instances),
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
