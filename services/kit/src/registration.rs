//! Registering a service instance in the registry (etcd), from its
//! command line: `--registry etcd://HOST:PORT[,...]` (`REGISTRY_URL`) and
//! `--advertise HOST:PORT`. Without `--registry` nothing is registered.
//!
//! The instance registers once it is ready (database open, migrations
//! done, listener bound) and deregisters first on SIGTERM, then waits
//! `--deregister-delay` before draining, so that gateways stop sending
//! before the listener closes ([`crate::serve::service_main`]).

use std::net::SocketAddr;
use std::time::Duration;

use registry::{Entry, Registration};

/// The registry settings every service takes.
#[derive(Debug, Clone, clap::Args)]
pub struct RegistryArgs {
    /// Register this instance in etcd (etcd://HOST:PORT[,HOST:PORT...]);
    /// without it the service is not registered anywhere.
    #[arg(long = "registry", env = "REGISTRY_URL")]
    pub registry: Option<String>,
    /// `HOST:PORT` others reach this instance at (default: the listen
    /// address, unless it is a wildcard such as 0.0.0.0).
    #[arg(long, env = "ADVERTISE_ADDRESS")]
    pub advertise: Option<String>,
    /// Keys are PREFIX/SERVICE/INSTANCE-ID.
    #[arg(long, env = "REGISTRY_PREFIX", default_value = registry::DEFAULT_PREFIX)]
    pub registry_prefix: String,
    /// Lease TTL: a crashed instance leaves the registry this long after
    /// its last keep-alive.
    #[arg(long, env = "REGISTRY_TTL", value_parser = humantime::parse_duration, default_value = "10s")]
    pub registry_ttl: Duration,
    /// The instance id in the key (default: the advertised address).
    #[arg(long, env = "INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// After deregistering on SIGTERM, keep serving this long before
    /// draining: gateways see the key go in milliseconds, requests they
    /// already picked this instance for still arrive.
    #[arg(long, env = "DEREGISTER_DELAY", value_parser = humantime::parse_duration, default_value = "500ms")]
    pub deregister_delay: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Url(#[from] registry::UrlError),
    #[error(
        "listening on {0}, a wildcard: pass --advertise HOST:PORT (the address others reach this instance at)"
    )]
    Wildcard(SocketAddr),
    #[error("--advertise {0:?} must be HOST:PORT")]
    Advertise(String),
    #[error("--registry-ttl must be at least 1s")]
    Ttl,
}

/// What to register, checked before anything starts.
#[derive(Debug, Clone)]
pub struct RegistryPlan {
    endpoints: Vec<String>,
    prefix: String,
    ttl: Duration,
    instance_id: Option<String>,
    advertise: Option<String>,
    pub deregister_delay: Duration,
}

impl RegistryArgs {
    /// `None` without `--registry`.
    pub fn plan(&self) -> Result<Option<RegistryPlan>, RegistryError> {
        let Some(url) = &self.registry else {
            return Ok(None);
        };
        let endpoints = registry::parse_url(url)?;
        if self.registry_ttl < Duration::from_secs(1) {
            return Err(RegistryError::Ttl);
        }
        if let Some(advertise) = &self.advertise {
            let valid = advertise
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                return Err(RegistryError::Advertise(advertise.clone()));
            }
        }
        Ok(Some(RegistryPlan {
            endpoints,
            prefix: self.registry_prefix.clone(),
            ttl: self.registry_ttl,
            instance_id: self.instance_id.clone(),
            advertise: self.advertise.clone(),
            deregister_delay: self.deregister_delay,
        }))
    }
}

impl RegistryPlan {
    /// The endpoints (`http://HOST:PORT`), for clients that follow the
    /// registry too (order-service).
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The address to register for a listener bound at `local`.
    pub fn advertised(&self, local: SocketAddr) -> Result<String, RegistryError> {
        match &self.advertise {
            Some(address) => Ok(address.clone()),
            None if local.ip().is_unspecified() => Err(RegistryError::Wildcard(local)),
            None => Ok(local.to_string()),
        }
    }

    /// Starts keeping `service` registered at `address` (in the
    /// background; logged when done, retried while etcd is away).
    pub fn register(&self, service: &str, address: String) -> Registration {
        let id = self.instance_id.clone().unwrap_or_else(|| address.clone());
        let mut metadata = serde_json::Map::new();
        metadata.insert("pid".to_owned(), std::process::id().into());
        let entry = Entry {
            address,
            version: crate::serve::SERVICE_VERSION.to_owned(),
            metadata,
        };
        Registration::start(
            self.endpoints.clone(),
            &self.prefix,
            service,
            &id,
            &entry,
            self.ttl,
        )
    }
}
