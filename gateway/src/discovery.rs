//! Where a service's instances come from.
//!
//! [`Discovery`] is the extension point: each service of a configuration
//! version gets one, and the instances it returns are what that version
//! balances over (and health-checks). Today the only source is the static
//! list in `gateway.yaml` ([`StaticDiscovery`]), whose host names are
//! resolved here, when a version is built (at start-up and on every
//! reload); a dynamic source (etcd, DNS SRV, Consul) implements the same
//! trait. Errors are returned, never swallowed: a source that fails makes
//! the new version fail to build, so the previous one keeps serving and the
//! error is reported.

use std::net::SocketAddr;

use async_trait::async_trait;

use crate::config::ServiceConfig;

/// One instance to send requests to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Instance {
    /// As the source names it, e.g. `127.0.0.1:8001` or `users:8001`.
    pub address: String,
    /// Where it resolved.
    pub socket: SocketAddr,
}

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

/// The instances listed in the configuration file, host names resolved
/// (first address wins).
pub struct StaticDiscovery {
    service: String,
    addresses: Vec<String>,
}

impl StaticDiscovery {
    pub fn new(service: &str, addresses: Vec<String>) -> Self {
        Self {
            service: service.to_owned(),
            addresses,
        }
    }
}

#[async_trait]
impl Discovery for StaticDiscovery {
    async fn discover(&self) -> Result<Vec<Instance>, DiscoveryError> {
        let mut instances = Vec::with_capacity(self.addresses.len());
        for address in &self.addresses {
            let socket = match address.parse::<SocketAddr>() {
                Ok(socket) => socket,
                Err(_) => {
                    let fail = |reason: String| DiscoveryError {
                        service: self.service.clone(),
                        reason,
                    };
                    tokio::net::lookup_host(address.as_str())
                        .await
                        .map_err(|err| fail(format!("cannot resolve {address}: {err}")))?
                        .next()
                        .ok_or_else(|| fail(format!("{address} resolves to no address")))?
                }
            };
            instances.push(Instance {
                address: address.clone(),
                socket,
            });
        }
        Ok(instances)
    }
}

/// The discovery a service's configuration asks for.
pub fn for_service(service: &ServiceConfig) -> Box<dyn Discovery> {
    Box::new(StaticDiscovery::new(
        &service.name,
        service.instances.clone(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_discovery_resolves_names_and_reports_failures() {
        let found = StaticDiscovery::new("s", vec!["127.0.0.1:81".into(), "localhost:82".into()])
            .discover()
            .await
            .unwrap();
        assert_eq!(found[0].socket, "127.0.0.1:81".parse().unwrap());
        assert_eq!(found[1].socket.port(), 82);
        assert!(found[1].socket.ip().is_loopback());
        let err = StaticDiscovery::new("s", vec!["no-such-host.invalid:80".into()])
            .discover()
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot resolve no-such-host.invalid:80"),
            "{err}"
        );
    }
}
