//! `gateway` binary: `gateway --config gateway.yaml` runs the gateway;
//! `gateway check FILE...` validates files and exits non-zero on error.

use std::process::ExitCode;

/// jemalloc: the proxy allocates and frees small buffers on every request,
/// which jemalloc's thread caches serve faster than glibc's malloc
/// (measured in BENCHMARKS.md). Built with background threads (the
/// `background_threads` feature): unused dirty pages are returned to the
/// kernel by jemalloc's own thread, not inside a worker's `malloc` or
/// `free` (`bench/notes.md`). In front of it, each worker keeps a few of
/// Pingora's 64 KiB body buffers, which jemalloc's thread cache cannot
/// ([`gateway::engine::allocator`]).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: gateway::engine::allocator::Allocator = gateway::engine::allocator::Allocator;

fn main() -> ExitCode {
    gateway::cli::main(gateway::policy::plugins::PluginRegistry::builtin())
}
