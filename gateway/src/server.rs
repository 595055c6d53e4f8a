//! Putting the gateway together: load the configuration, start the control
//! plane (health probers, reload triggers, admin listener), wait for the
//! first checks, then hand the proxy service to Pingora's server, which runs
//! until a signal.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use pingora::connectors::ConnectorOptions;
use pingora::prelude::Server;
use pingora::server::configuration::ServerConf;
use pingora::services::background::background_service;

use crate::config::{self, Config};
use crate::control::api_docs::ApiDocs;
use crate::control::discovery::FileSources;
use crate::control::{ControlPlane, admin, shutdown};
use crate::engine::listener::GuardedProxy;
use crate::engine::upstream_pool::UpstreamPool;
use crate::engine::workers::{CpuPlan, Workers};
use crate::policy::plugins::PluginRegistry;
use crate::proxy::Gateway;

/// Seconds the runtimes get to wind down after the grace period (only
/// reached if the drain watch in `shutdown` did not exit first).
const RUNTIME_SHUTDOWN_SECONDS: u64 = 2;

/// Runs the gateway on the configuration at `path`, with the built-in
/// plugins and those of `plugins`, until it is told to stop. With
/// `upgrade`, takes the listening sockets over from a running gateway
/// (which is then sent SIGQUIT). Exit status 2 for an invalid
/// configuration, 1 for any other start-up failure.
pub fn run(path: &Path, upgrade: bool, plugins: PluginRegistry) -> ExitCode {
    // The bytes the first version comes from: a reload compares with them.
    let loaded_bytes = std::fs::read(path).ok();
    let config = match config::load_with(path, &plugins) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            tracing::error!("invalid configuration, not starting");
            return ExitCode::from(2);
        }
    };
    let control = match ControlPlane::start(
        path,
        config.clone(),
        loaded_bytes,
        plugins,
        Arc::new(FileSources::new()),
    ) {
        Ok(control) => control,
        Err(err) => {
            tracing::error!(error = %err, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    let current = Arc::clone(&control.current);
    if let Err(err) = control.watch_file() {
        tracing::error!(error = %err, "cannot watch the configuration file");
        return ExitCode::FAILURE;
    }
    if let Some(admin) = config.admin_listen {
        let app = admin::router(Arc::clone(&control.reloader));
        if upgrade {
            // The old process still holds the admin port until it exits.
            control.handle().spawn(admin::serve_when_free(admin, app));
        } else {
            let listener = match control.block_on(tokio::net::TcpListener::bind(admin)) {
                Ok(listener) => listener,
                Err(err) => {
                    tracing::error!("cannot listen on {admin} (admin_listen): {err}");
                    return ExitCode::FAILURE;
                }
            };
            control.handle().spawn(admin::serve(listener, app));
            tracing::info!("admin listening on http://{admin}");
        }
    }

    if let Err(err) = shutdown::spawn_drain_watch(control.handle(), config.shutdown_grace) {
        tracing::error!(error = %err, "cannot listen for shutdown signals");
        return ExitCode::FAILURE;
    }

    let options = pingora::server::configuration::Opt {
        upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(options), server_conf(&config));
    server.bootstrap();
    let options = ConnectorOptions::from_server_conf(&server.configuration);
    let layout = Layout::of(&config);
    let cpus = if config.worker_cpu_affinity {
        match CpuPlan::this_process() {
            Ok(plan) => plan,
            Err(err) => {
                tracing::error!(error = %err, "worker_cpu_affinity: cannot read the CPUs this process may use");
                return ExitCode::FAILURE;
            }
        }
    } else {
        CpuPlan::none()
    };
    let docs = ApiDocs::new();
    docs.spawn(control.handle(), Arc::clone(&current));
    let workers = Workers::new(
        (0..layout.workers)
            .map(|_| Gateway {
                current: Arc::clone(&current),
                upstreams: Arc::new(UpstreamPool::new(options.clone())),
                docs: Arc::clone(&docs),
                membership: Arc::clone(control.reloader.membership()),
            })
            .collect(),
        cpus,
    );
    for index in 1..workers.count() {
        server.add_service(background_service(
            &format!("gateway worker {index}"),
            workers.runtime_lender(index),
        ));
    }
    let mut service = pingora::services::listening::Service::new(
        "gateway proxy".to_owned(),
        GuardedProxy::new(workers, Arc::clone(&current)),
    );
    service.threads = Some(layout.threads_each);
    service.add_tcp(&config.listen.to_string());
    server.add_service(service);
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

/// How the proxy's `threads` are laid out: with `work_stealing: true`, one
/// worker, a runtime of `threads` threads that steal tasks from each other;
/// with `false`, `threads` share-nothing workers of one thread each (see
/// `workers`).
struct Layout {
    workers: usize,
    threads_each: usize,
}

impl Layout {
    fn of(config: &Config) -> Self {
        if config.work_stealing {
            Layout {
                workers: 1,
                threads_each: config.threads,
            }
        } else {
            Layout {
                workers: config.threads,
                threads_each: 1,
            }
        }
    }
}

fn server_conf(config: &Config) -> ServerConf {
    let port = config.listen.port();
    ServerConf {
        threads: config.threads,
        work_stealing: config.work_stealing,
        // The drain watch exits as soon as requests are done; this is the
        // backstop, a second later.
        grace_period_seconds: Some(config.shutdown_grace.as_secs() + 1),
        graceful_shutdown_timeout_seconds: Some(RUNTIME_SHUTDOWN_SECONDS),
        // One gateway per listen port on a machine: name the files after it.
        pid_file: format!("/tmp/gateway-{port}.pid"),
        upgrade_sock: format!("/tmp/gateway-{port}.upgrade.sock"),
        ..ServerConf::default()
    }
}
