//! A programmable API gateway on Pingora.
//!
//! Layout (ARCHITECTURE.md has the map and the invariants):
//! - [`config`]: `gateway.yaml` in two layers, the `gateway-config` crate.
//! - [`proxy`]: the data plane, one module per phase of a request.
//! - [`errors`]: one failure type, and the one mapping to an answer.
//! - [`metrics`]: the Prometheus metrics (served on the admin listener).
//! - [`policy`]: routing, forwarding headers, upstreams, plugins.
//! - [`control`]: versions (snapshot, reload, discovery), health, the admin
//!   listener, shutdown.
//! - [`engine`]: workers, pools, the allocator, the log buffer: the
//!   workarounds for Pingora's limits.
//! - [`server`]: start-up; [`cli`]: the command line, for the stock binary
//!   and for programs that add their own plugins.

pub use gateway_config as config;
/// The Pingora the gateway is built on, for plugins (its header types).
pub use pingora;

pub mod cli;
pub mod control;
pub mod engine;
pub mod errors;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod server;
pub mod tracing_export;

/// Sets up `tracing` output (`RUST_LOG`, default `info`) in `format`, which
/// also receives Pingora's `log` records, through the buffered writer of
/// [`engine::log_buffer`].
pub fn init_tracing(format: telemetry::log::LogFormat) {
    use std::io::IsTerminal;
    engine::log_buffer::install("gateway", format, std::io::stdout().is_terminal());
}

/// Writes out the log lines still buffered; call before the process exits.
pub fn flush_logs() {
    engine::log_buffer::flush();
}
