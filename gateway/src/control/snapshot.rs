//! One configuration version, built and ready to serve, and the atomic
//! pointer to the current one.
//!
//! A [`Snapshot`] holds everything the request path needs: the route table,
//! each route's upstream and plugin chain. It is built off the request path
//! from a validated `Config` and the instance sets discovery reported
//! (health reconciliation, balancers, plugins kept from the previous
//! version where unchanged), then published with one atomic swap. A
//! request takes the current snapshot when it starts and keeps it to the
//! end, so it finishes on the version it started with whatever is swapped
//! in meanwhile.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;

use super::discovery::MembershipView;
use super::health::HealthRegistry;
use crate::config::Config;
use crate::metrics::RouteMetrics;
use crate::policy::plugins::{PluginChain, PluginRegistry};
use crate::policy::routing::RouteTable;
use crate::policy::upstream::Upstream;

pub struct Route {
    /// As written in the file.
    pub prefix: String,
    pub strip_prefix: Option<String>,
    /// Largest request body accepted (413 beyond).
    pub max_body_size: Option<u64>,
    pub upstream: Arc<Upstream>,
    pub plugins: PluginChain,
    /// Its request metrics, resolved once.
    pub metrics: Arc<RouteMetrics>,
}

pub struct Snapshot {
    /// Starts at 1; each published version adds one.
    pub version: u64,
    pub config: Config,
    /// The instance sets it was built from.
    pub membership: MembershipView,
    pub loaded_at: SystemTime,
    pub routes: RouteTable<Route>,
    /// Sorted by name.
    pub upstreams: Vec<Arc<Upstream>>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("service {service}: cannot build its load balancer: {source}")]
    Balancer {
        service: String,
        source: std::io::Error,
    },
    #[error("route {route}: {reason}")]
    Plugin { route: String, reason: String },
}

impl Snapshot {
    /// Builds version `version` of `config` over the instance sets of
    /// `membership`: brings the health probers in line (new instances
    /// start out of rotation until checked), builds balancers, and builds
    /// the plugins, keeping those of `previous` whose route and settings
    /// did not change.
    pub fn build(
        config: Config,
        membership: MembershipView,
        version: u64,
        registry: &HealthRegistry,
        plugins: &PluginRegistry,
        previous: Option<&Snapshot>,
    ) -> Result<Snapshot, BuildError> {
        let no_instances = Arc::from([]);
        let instances_of = |name: &str| membership.get(name).unwrap_or(&no_instances);
        let wanted: Vec<_> = config
            .services
            .iter()
            .map(|service| {
                let instances: &[_] = instances_of(&service.name);
                (service.name.as_str(), instances, &service.health)
            })
            .collect();
        let health = registry.reconcile(&wanted);

        let mut upstreams: HashMap<&str, Arc<Upstream>> = HashMap::new();
        for service in &config.services {
            let handles = instances_of(&service.name)
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
        let mut routes = Vec::with_capacity(config.routes.len());
        for route in &config.routes {
            // Validation guarantees the service exists.
            let Some(upstream) = upstreams.get(route.service.as_str()) else {
                continue;
            };
            let previous_chain = previous
                .and_then(|p| p.routes.lookup_prefix(&route.prefix))
                .map(|r| &r.plugins);
            let chain =
                PluginChain::build(&route.plugins, previous_chain, plugins).map_err(|reason| {
                    BuildError::Plugin {
                        route: route.prefix.clone(),
                        reason,
                    }
                })?;
            routes.push((
                route.prefix.clone(),
                Route {
                    prefix: route.prefix.clone(),
                    strip_prefix: route.strip_prefix.clone(),
                    max_body_size: route.max_body_size,
                    metrics: RouteMetrics::new(&route.prefix, &upstream.name),
                    upstream: Arc::clone(upstream),
                    plugins: chain,
                },
            ));
        }
        let mut upstreams: Vec<Arc<Upstream>> = upstreams.into_values().collect();
        upstreams.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Snapshot {
            version,
            config,
            membership,
            loaded_at: SystemTime::now(),
            routes: RouteTable::new(routes),
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
