//! Putting the gateway together: load the configuration, start the control
//! plane (health probers, reload triggers, admin listener), wait for the
//! first checks, then hand the proxy service to Pingora's server, which runs
//! until a signal.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use pingora::prelude::Server;
use pingora::server::configuration::ServerConf;

use crate::admin;
use crate::config::{self, Config};
use crate::health::HealthRegistry;
use crate::proxy::Gateway;
use crate::reload::{self, Reloader};
use crate::snapshot::{CurrentSnapshot, Snapshot};

/// Seconds Pingora lets in-flight requests run after SIGTERM before it
/// stops its runtimes.
const SHUTDOWN_GRACE_SECONDS: u64 = 3;
/// Seconds the runtimes get to wind down after the grace period.
const RUNTIME_SHUTDOWN_SECONDS: u64 = 2;
/// Retries of one request (on connect failures to other instances).
const MAX_RETRIES: usize = 2;

/// Runs the gateway on the configuration at `path` until it is told to
/// stop. Exit status 2 for an invalid configuration, 1 for any other
/// start-up failure.
pub fn run(path: &Path) -> ExitCode {
    // The bytes the first version comes from: a reload compares with them.
    let loaded_bytes = std::fs::read(path).ok();
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
    let snapshot = match control.block_on(Snapshot::build(config.clone(), 1, &registry)) {
        Ok(snapshot) => snapshot,
        Err(err) => {
            tracing::error!(error = %err, "cannot build the configuration");
            return ExitCode::FAILURE;
        }
    };
    control.block_on(registry.first_checks_done(reload::first_check_wait(&config)));
    let current = Arc::new(CurrentSnapshot::new(snapshot));
    let reloader = Arc::new(Reloader::new(
        path,
        Arc::clone(&current),
        registry,
        loaded_bytes,
    ));
    if let Err(err) = reloader.spawn_triggers(control.handle()) {
        tracing::error!(error = %err, "cannot watch the configuration file");
        return ExitCode::FAILURE;
    }
    if let Some(admin) = config.admin_listen {
        let listener = match control.block_on(tokio::net::TcpListener::bind(admin)) {
            Ok(listener) => listener,
            Err(err) => {
                tracing::error!("cannot listen on {admin} (admin_listen): {err}");
                return ExitCode::FAILURE;
            }
        };
        let app = admin::router(Arc::clone(&reloader));
        control.spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                tracing::error!(error = %err, "admin listener failed");
            }
        });
        tracing::info!("admin listening on http://{admin}");
    }

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
