//! Where a service's instances come from.
//!
//! [`Discovery`] is the extension point: each service of a configuration
//! version gets one, and the instances it returns are what that version
//! balances over (and health-checks). Today the only source is the static
//! list in `gateway.yaml` ([`StaticDiscovery`]); a dynamic source (etcd,
//! DNS SRV, Consul) implements the same trait. Errors are returned, never
//! swallowed: a source that fails makes the new version fail to build, so
//! the previous one keeps serving and the error is reported.

use async_trait::async_trait;

use crate::config::{Instance, ServiceConfig};

#[derive(Debug, thiserror::Error)]
#[error("discovery for service {service} failed: {reason}")]
pub struct DiscoveryError {
    pub service: String,
    pub reason: String,
}

/// A source of instances for one service.
#[async_trait]
pub trait Discovery: Send + Sync {
    /// The instances of the service now. Called off the request path, when
    /// a configuration version is built.
    async fn discover(&self) -> Result<Vec<Instance>, DiscoveryError>;
}

/// The instances listed in the configuration file.
pub struct StaticDiscovery {
    instances: Vec<Instance>,
}

impl StaticDiscovery {
    pub fn new(instances: Vec<Instance>) -> Self {
        Self { instances }
    }
}

#[async_trait]
impl Discovery for StaticDiscovery {
    async fn discover(&self) -> Result<Vec<Instance>, DiscoveryError> {
        Ok(self.instances.clone())
    }
}

/// The discovery a service's configuration asks for.
pub fn for_service(service: &ServiceConfig) -> Box<dyn Discovery> {
    Box::new(StaticDiscovery::new(service.instances.clone()))
}
