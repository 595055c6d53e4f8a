//! The control plane: everything that decides what the request path serves,
//! on its own runtime (one `gateway-control` thread), never on a worker.
//!
//! - [`snapshot`]: a configuration version built for serving, and the
//!   atomic pointer to the current one (the only thing the data plane
//!   reads from here, besides health).
//! - [`reload`]: new versions from the file (watch, poll, SIGHUP, admin)
//!   and from discovery changes.
//! - [`discovery`]: where instances come from (the extension trait) and
//!   the sets the sources last reported.
//! - [`health`]: active probes and per-instance state, across versions.
//! - [`admin`]: the admin listener.
//! - [`shutdown`]: in-flight count and the drain after SIGTERM/SIGQUIT.

use std::path::Path;
use std::sync::Arc;

use crate::config::Config;
use crate::policy::plugins::PluginRegistry;

pub mod admin;
pub mod api_docs;
pub mod discovery;
pub mod health;
pub mod reload;
pub mod shutdown;
pub mod snapshot;
#[cfg(test)]
mod tests;

use discovery::{DiscoveryError, DiscoveryProvider, Membership};
use health::HealthRegistry;
use reload::Reloader;
use snapshot::{BuildError, CurrentSnapshot, Snapshot};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start the control runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error("cannot build the configuration: {0}")]
    Build(#[from] BuildError),
}

/// The running control plane: its runtime, the current version and the
/// reloader.
pub struct ControlPlane {
    runtime: tokio::runtime::Runtime,
    pub current: Arc<CurrentSnapshot>,
    pub reloader: Arc<Reloader>,
}

impl ControlPlane {
    /// Starts the control runtime, asks discovery for the first instance
    /// sets, builds version 1 of `config` (read from `path`, whose bytes
    /// were `loaded_bytes`), waits for the first health checks, and follows
    /// discovery from then on. The file is not watched yet
    /// ([`Self::watch_file`]).
    pub fn start(
        path: &Path,
        config: Config,
        loaded_bytes: Option<Vec<u8>>,
        plugins: PluginRegistry,
        sources: Arc<dyn DiscoveryProvider>,
    ) -> Result<ControlPlane, StartError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("gateway-control")
            .enable_all()
            .build()
            .map_err(StartError::Runtime)?;
        let handle = runtime.handle().clone();
        let registry = Arc::new(HealthRegistry::new(handle.clone()));
        let membership = Arc::new(Membership::new(handle.clone(), sources));
        let view = runtime.block_on(membership.reconcile(&config, false))?;
        let wait = reload::first_check_wait(&config);
        // Plugins with background work (a key set to keep fresh, buckets
        // to sweep) start it on the control runtime.
        let snapshot = {
            let _on_the_control_runtime = runtime.enter();
            Snapshot::build(config, view, 1, &registry, &plugins, None)?
        };
        runtime.block_on(registry.first_checks_done(wait));
        let current = Arc::new(CurrentSnapshot::new(snapshot));
        let reloader = Arc::new(Reloader::new(
            path,
            Arc::clone(&current),
            registry,
            membership,
            plugins,
            loaded_bytes,
        ));
        reloader.follow_membership(&handle);
        Ok(ControlPlane {
            runtime,
            current,
            reloader,
        })
    }

    pub fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime.handle()
    }

    /// Runs `future` to its end on the control runtime.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// Reloads on file changes, a slow poll and SIGHUP.
    pub fn watch_file(&self) -> notify::Result<()> {
        self.reloader.spawn_triggers(self.runtime.handle())
    }
}
