//! `discovery: etcd`: a service's instances from the registry
//! (`registry::Follower`: one read, then a watch), and the cache file that
//! lets a gateway start while etcd is down.
//!
//! - etcd answers: every change of the service's members is a new set
//!   (new instances are checked before they take traffic, as for any new
//!   set); the members are written to the cache.
//! - etcd goes away: the last set stays, the status says `unavailable`
//!   with the age of the set; the follower reconnects with back-off and
//!   the set converges when etcd is back.
//! - etcd is unreachable at start ([`FIRST_READ_TIMEOUT`]): the cached
//!   members stand in (status `from_cache`); without a cache the service
//!   starts with no instance (503), and the log says so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use registry::{Follower, Member, State};
use serde::{Deserialize, Serialize};

use super::{
    Discovery, Instance, Origin, Resolve, SourceStatus, SystemResolver, Updates, resolve_address,
};
use crate::config::RegistryConfig;

/// How long the first read of the registry may take before the cache (or
/// an empty set) stands in; well under the first set's own timeout.
pub const FIRST_READ_TIMEOUT: Duration = Duration::from_secs(3);

/// A service's instances from the registry.
pub struct EtcdDiscovery {
    service: String,
    registry: RegistryConfig,
    cache: Arc<Cache>,
    resolver: Arc<dyn Resolve>,
}

impl EtcdDiscovery {
    pub fn new(service: &str, registry: &RegistryConfig, cache: Arc<Cache>) -> Self {
        EtcdDiscovery {
            service: service.to_owned(),
            registry: registry.clone(),
            cache,
            resolver: Arc::new(SystemResolver),
        }
    }

    /// The members as instances; one per address (the first id wins), and
    /// none whose address does not resolve (logged).
    async fn instances(&self, members: &[Member]) -> Vec<Instance> {
        let mut instances: Vec<Instance> = Vec::with_capacity(members.len());
        for member in members {
            match resolve_address(&*self.resolver, &member.entry.address).await {
                Ok(socket) if instances.iter().all(|i| i.socket != socket) => {
                    instances.push(Instance {
                        address: member.entry.address.clone(),
                        socket,
                        origin: Origin::Registry {
                            id: member.id.clone(),
                        },
                    });
                }
                Ok(_) => {}
                Err(reason) => tracing::warn!(
                    service = %self.service,
                    id = %member.id,
                    %reason,
                    "registered instance left out"
                ),
            }
        }
        instances
    }

    fn status(
        &self,
        state: &str,
        synced: Option<SystemTime>,
        error: Option<String>,
    ) -> SourceStatus {
        SourceStatus {
            source: "etcd".to_owned(),
            state: state.to_owned(),
            synced,
            from_cache: false,
            error,
        }
    }
}

#[async_trait]
impl Discovery for EtcdDiscovery {
    async fn run(&self, updates: Updates) {
        let follower = Follower::start(
            self.registry.endpoints.clone(),
            &self.registry.prefix,
            &self.service,
        );
        let mut view = follower.view();
        let live = tokio::time::timeout(
            FIRST_READ_TIMEOUT,
            view.wait_for(|v| v.state == State::Live),
        )
        .await
        .is_ok_and(|seen| seen.is_ok());
        // Until etcd answers, the set comes from the cache: its status says so.
        let mut from_cache = None;
        if !live {
            let state = view.borrow().state.clone();
            let error = match state {
                State::Unavailable { error, .. } => error,
                _ => format!("no answer within {FIRST_READ_TIMEOUT:?}"),
            };
            match self.cache.get(&self.service) {
                Some((members, written)) => {
                    tracing::warn!(
                        service = %self.service,
                        %error,
                        members = members.len(),
                        cache = %self.cache.path.display(),
                        "etcd unreachable at start: serving the cached instances until it answers"
                    );
                    from_cache = Some(written);
                    updates.status(SourceStatus {
                        from_cache: true,
                        ..self.status("unavailable", Some(written), Some(error))
                    });
                    updates.publish(self.instances(&members).await);
                }
                None => {
                    tracing::error!(
                        service = %self.service,
                        %error,
                        "etcd unreachable at start and no cached instances: the service has none (503) until etcd answers"
                    );
                    updates.status(self.status("unavailable", None, Some(error)));
                    updates.publish(Vec::new());
                }
            }
        }
        loop {
            let current = view.borrow_and_update().clone();
            match &current.state {
                State::Live => {
                    from_cache = None;
                    updates.status(self.status("live", current.synced, None));
                    updates.publish(self.instances(&current.members).await);
                    self.cache.store(&self.service, &current.members);
                }
                State::Unavailable { error, .. } => match from_cache {
                    Some(written) => updates.status(SourceStatus {
                        from_cache: true,
                        ..self.status("unavailable", Some(written), Some(error.clone()))
                    }),
                    None => updates.status(self.status(
                        "unavailable",
                        current.synced,
                        Some(error.clone()),
                    )),
                },
                State::Connecting => {}
            }
            if view.changed().await.is_err() {
                return;
            }
        }
    }
}

/// The file of last known members, by service: read once when first
/// needed, written (whole, through a rename) on every change.
pub struct Cache {
    path: PathBuf,
    services: Mutex<BTreeMap<String, CachedService>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CachedService {
    /// Seconds since the Unix epoch.
    written_at: u64,
    members: Vec<Member>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheFile {
    services: BTreeMap<String, CachedService>,
}

impl Cache {
    /// The cache at `path`; a missing file is an empty cache, an unreadable
    /// one too (logged).
    pub fn open(path: &Path) -> Self {
        let services = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<CacheFile>(&bytes) {
                Ok(file) => file.services,
                Err(err) => {
                    tracing::warn!(cache = %path.display(), error = %err, "registry cache unreadable: ignored");
                    BTreeMap::new()
                }
            },
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(err) => {
                tracing::warn!(cache = %path.display(), error = %err, "cannot read the registry cache");
                BTreeMap::new()
            }
        };
        Cache {
            path: path.to_owned(),
            services: Mutex::new(services),
        }
    }

    /// The cached members of `service` and when they were written.
    pub fn get(&self, service: &str) -> Option<(Vec<Member>, SystemTime)> {
        let services = self.services.lock().unwrap_or_else(PoisonError::into_inner);
        services.get(service).map(|cached| {
            (
                cached.members.clone(),
                SystemTime::UNIX_EPOCH + Duration::from_secs(cached.written_at),
            )
        })
    }

    /// Records `members` as current for `service` and writes the file if
    /// that changed anything. A failed write is logged; serving goes on.
    pub fn store(&self, service: &str, members: &[Member]) {
        let text = {
            let mut services = self.services.lock().unwrap_or_else(PoisonError::into_inner);
            if services.get(service).is_some_and(|c| c.members == members) {
                return;
            }
            let written_at = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            services.insert(
                service.to_owned(),
                CachedService {
                    written_at,
                    members: members.to_vec(),
                },
            );
            let file = CacheFile {
                services: services.clone(),
            };
            match serde_json::to_vec_pretty(&file) {
                Ok(text) => text,
                Err(_) => return,
            }
        };
        // A small file on the control thread, off the request path.
        let temporary = self.path.with_extension("json.tmp");
        let written =
            std::fs::write(&temporary, text).and_then(|()| std::fs::rename(&temporary, &self.path));
        if let Err(err) = written {
            tracing::warn!(cache = %self.path.display(), error = %err, "cannot write the registry cache");
        }
    }
}
