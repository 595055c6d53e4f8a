//! One configuration version, built and ready to serve, and the atomic
//! pointer to the current one.
//!
//! A [`Snapshot`] holds everything the request path needs: the route table,
//! each route's upstream and plugin chain. It is built off the request path
//! (discovery, health reconciliation, plugin construction) and then
//! published with one atomic swap. A request takes an `Arc` of the current
//! snapshot when it starts and keeps it to the end, so it finishes on the
//! version it started with whatever is swapped in meanwhile.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::discovery::{self, DiscoveryError, Instance};
use crate::health::HealthRegistry;
use crate::plugins::{self, PluginChain};
use crate::routing::RouteTable;
use crate::upstream::Upstream;

pub struct Route {
    pub prefix: String,
    pub strip_prefix: Option<String>,
    /// Largest request body accepted (413 beyond).
    pub max_body_size: Option<u64>,
    pub upstream: Arc<Upstream>,
    pub plugins: PluginChain,
}

pub struct Snapshot {
    /// Starts at 1; each successful reload adds one.
    pub version: u64,
    pub config: Config,
    pub loaded_at: SystemTime,
    pub routes: RouteTable<Route>,
    /// Sorted by name.
    pub upstreams: Vec<Arc<Upstream>>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error("service {service}: cannot build its load balancer: {source}")]
    Balancer {
        service: String,
        source: std::io::Error,
    },
}

impl Snapshot {
    /// Builds version `version` of `config`: asks each service's discovery
    /// for its instances, brings the health probers in line (new instances
    /// start out of rotation until checked) and builds balancers and
    /// plugins.
    pub async fn build(
        config: Config,
        version: u64,
        registry: &HealthRegistry,
    ) -> Result<Snapshot, BuildError> {
        let mut discovered: Vec<Vec<Instance>> = Vec::with_capacity(config.services.len());
        for service in &config.services {
            discovered.push(discovery::for_service(service).discover().await?);
        }
        let wanted: Vec<_> = config
            .services
            .iter()
            .zip(&discovered)
            .map(|(service, instances)| {
                (service.name.as_str(), instances.as_slice(), &service.health)
            })
            .collect();
        let health = registry.reconcile(&wanted);

        let mut upstreams: HashMap<&str, Arc<Upstream>> = HashMap::new();
        for (service, instances) in config.services.iter().zip(&discovered) {
            let handles = instances
                .iter()
                .filter_map(|i| health.get(&(service.name.clone(), i.socket)).cloned())
                .collect();
            let upstream =
                Upstream::new(service, handles).map_err(|source| BuildError::Balancer {
                    service: service.name.clone(),
                    source,
                })?;
            upstreams.insert(service.name.as_str(), Arc::new(upstream));
        }
        let routes = RouteTable::new(config.routes.iter().filter_map(|route| {
            // Validation guarantees the service exists.
            let upstream = upstreams.get(route.service.as_str())?;
            Some((
                route.prefix.clone(),
                Route {
                    prefix: route.prefix.clone(),
                    strip_prefix: route.strip_prefix.clone(),
                    max_body_size: route.max_body_size,
                    upstream: Arc::clone(upstream),
                    plugins: route.plugins.iter().map(plugins::build).collect(),
                },
            ))
        }));
        let mut upstreams: Vec<Arc<Upstream>> = upstreams.into_values().collect();
        upstreams.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Snapshot {
            version,
            config,
            loaded_at: SystemTime::now(),
            routes,
            upstreams,
        })
    }
}

/// The current snapshot, swapped atomically.
pub struct CurrentSnapshot(ArcSwap<Snapshot>);

impl CurrentSnapshot {
    pub fn new(first: Snapshot) -> Self {
        Self(ArcSwap::from_pointee(first))
    }

    /// The version to serve a new request with.
    pub fn load(&self) -> Arc<Snapshot> {
        self.0.load_full()
    }

    /// A short look at the current version (a field or two), without
    /// taking a reference count.
    pub fn peek(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.0.load()
    }

    /// Publishes `next`; requests already running keep theirs.
    pub fn publish(&self, next: Snapshot) {
        self.0.store(Arc::new(next));
    }
}
