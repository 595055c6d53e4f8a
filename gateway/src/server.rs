//! Putting the gateway together: load the configuration, start the control
//! plane (health probers), wait for the first checks, then hand the proxy
//! service to Pingora's server, which runs until a signal.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use pingora::prelude::Server;
use pingora::server::configuration::ServerConf;

use crate::config::{self, Config};
use crate::health::HealthRegistry;
use crate::proxy::Gateway;
use crate::snapshot::{CurrentSnapshot, Snapshot};

/// Seconds Pingora lets in-flight requests run after SIGTERM before it
/// stops its runtimes.
const SHUTDOWN_GRACE_SECONDS: u64 = 3;
/// Seconds the runtimes get to wind down after the grace period.
const RUNTIME_SHUTDOWN_SECONDS: u64 = 2;
/// Retries of one request (on connect failures to other instances).
const MAX_RETRIES: usize = 2;
/// Extra time, beyond the slowest health-check timeout, that start-up
/// waits for the first round of checks.
const FIRST_CHECK_MARGIN: Duration = Duration::from_millis(200);

/// Runs the gateway on the configuration at `path` until it is told to
/// stop. Exit status 2 for an invalid configuration, 1 for any other
/// start-up failure.
pub fn run(path: &Path) -> ExitCode {
    let config = match config::load(path) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            tracing::error!("invalid configuration, not starting");
            return ExitCode::from(2);
        }
    };
    let control = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("gateway-control")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(error = %err, "cannot start the control runtime");
            return ExitCode::FAILURE;
        }
    };
    let registry = Arc::new(HealthRegistry::new(control.handle().clone()));
    let first_wait = first_check_wait(&config);
    let snapshot = match control.block_on(Snapshot::build(config.clone(), 1, &registry)) {
        Ok(snapshot) => snapshot,
        Err(err) => {
            tracing::error!(error = %err, "cannot build the configuration");
            return ExitCode::FAILURE;
        }
    };
    control.block_on(registry.first_checks_done(first_wait));
    let current = Arc::new(CurrentSnapshot::new(snapshot));

    let mut server = Server::new_with_opt_and_conf(None, server_conf(&config));
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        Gateway {
            current: Arc::clone(&current),
        },
        "gateway proxy",
    );
    proxy.add_tcp(&config.listen.to_string());
    server.add_service(proxy);
    tracing::info!(
        listen = %config.listen,
        threads = config.threads,
        services = config.services.len(),
        routes = config.routes.len(),
        "gateway listening on http://{}",
        config.listen
    );
    server.run(pingora::server::RunArgs::default());
    drop(control);
    tracing::info!("gateway stopped");
    ExitCode::SUCCESS
}

fn first_check_wait(config: &Config) -> Duration {
    config
        .services
        .iter()
        .map(|s| s.health.timeout)
        .max()
        .unwrap_or_default()
        + FIRST_CHECK_MARGIN
}

fn server_conf(config: &Config) -> ServerConf {
    let port = config.listen.port();
    ServerConf {
        threads: config.threads,
        grace_period_seconds: Some(SHUTDOWN_GRACE_SECONDS),
        graceful_shutdown_timeout_seconds: Some(RUNTIME_SHUTDOWN_SECONDS),
        max_retries: MAX_RETRIES,
        // One gateway per listen port on a machine: name the files after it.
        pid_file: format!("/tmp/gateway-{port}.pid"),
        upgrade_sock: format!("/tmp/gateway-{port}.upgrade.sock"),
        ..ServerConf::default()
    }
}
