//! A programmable API gateway on Pingora.
//!
//! Layout, in the order a request meets it:
//! - [`config`]: `gateway.yaml` in two layers (serde mirror, then a
//!   validated run-time `Config`), with located errors.
//! - [`snapshot`]: one configuration version built for serving (routes,
//!   upstreams, plugins) and the atomic pointer to the current one.
//! - [`proxy`]: the HTTP/1 proxy app on pingora-core's sessions and
//!   connection pool, walking the steps below.
//! - [`forwarding`]: request ids, `X-Forwarded-*`, hop-by-hop fields.
//! - [`endpoints`]: `/health` and `/services`.
//! - [`routing`]: longest segment-prefix match and prefix stripping.
//! - [`plugins`]: the per-route policy trait and the built-in plugins.
//! - [`upstream`]: a service's instances, balancer, timeouts and peers.
//! - [`health`]: active health checks and per-instance state.
//! - [`discovery`]: where instances come from (the extension trait).
//! - [`errors`]: the one mapping from failures to status and JSON body.
//! - [`server`]: start-up and the Pingora server.
//! - [`workers`]: share-nothing worker threads, each with its own pool.
//! - [`logging`]: buffered log output (the access log costs no system call).
//! - [`body_buffers`]: the global allocator, jemalloc with a per-worker
//!   cache of Pingora's 64 KiB body buffers.

pub mod admin;
#[cfg(not(target_env = "msvc"))]
pub mod body_buffers;
pub mod config;
pub mod discovery;
pub mod downstream;
pub mod endpoints;
pub mod errors;
pub mod forwarding;
pub mod health;
pub mod logging;
pub mod plugins;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod server;
pub mod shutdown;
pub mod snapshot;
pub mod upstream;
pub mod upstream_pool;
pub mod worker_stream;
pub mod workers;

/// Sets up `tracing` output (`RUST_LOG`, default `info`), which also
/// receives Pingora's `log` records, through the buffered writer of
/// [`logging`].
pub fn init_tracing() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stdout().is_terminal();
    let installed = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(logging::BufferedStdout)
        .try_init()
        .is_ok();
    if installed {
        logging::set_plain(!ansi);
        if let Err(err) = logging::start_flusher() {
            eprintln!("cannot start the log writer thread: {err}");
        }
    }
}

/// Writes out the log lines still buffered; call before the process exits.
pub fn flush_logs() {
    logging::flush();
}
