//! `gateway` binary: `gateway --config gateway.yaml` runs the gateway;
//! `gateway check FILE...` validates files and exits non-zero on error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// jemalloc: the proxy allocates and frees small buffers on every request,
/// which jemalloc's thread caches serve faster than glibc's malloc
/// (measured in BENCHMARKS.md). Built with background threads (the
/// `background_threads` feature): unused dirty pages are returned to the
/// kernel by jemalloc's own thread, not inside a worker's `malloc` or
/// `free` (paired rounds: CPU per request ×0.95, see `bench/notes.md`).
/// In front of it, each worker keeps a few of Pingora's 64 KiB body
/// buffers, which jemalloc's thread cache cannot ([`gateway::body_buffers`]).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: gateway::body_buffers::Allocator = gateway::body_buffers::Allocator;

/// A programmable API gateway on Pingora.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The configuration file to run with.
    #[arg(long, short, env = "GATEWAY_CONFIG", default_value = "gateway.yaml")]
    config: PathBuf,
    /// Take the listening sockets over from a running gateway on the same
    /// configuration (zero-downtime upgrade): start this, then send SIGQUIT
    /// to the old process.
    #[arg(long, short)]
    upgrade: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate configuration files exactly as the gateway would load them;
    /// prints every error as FILE:LINE:COLUMN: message.
    Check {
        /// Files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check { files }) => check(&files),
        None => {
            gateway::init_tracing();
            let status = gateway::server::run(&cli.config, cli.upgrade);
            gateway::flush_logs();
            status
        }
    }
}

fn check(files: &[PathBuf]) -> ExitCode {
    let mut failed = false;
    for file in files {
        match gateway::config::load(file) {
            Ok(config) => println!(
                "{}: ok ({} services, {} routes)",
                file.display(),
                config.services.len(),
                config.routes.len()
            ),
            Err(errors) => {
                eprintln!("{errors}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}
