//! The gateway's command line: `gateway --config gateway.yaml` runs it,
//! `gateway check FILE...` validates files. The stock binary calls
//! [`main`] with the built-in plugins; a program that registers plugins of
//! its own calls it with its registry (see `gateway/examples/`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::policy::plugins::PluginRegistry;

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
    /// Log lines as `text` or `json` (one object per line, the same field
    /// names as the services').
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    log_format: telemetry::log::LogFormat,
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

/// Parses the command line and runs it with `plugins`.
pub fn main(plugins: PluginRegistry) -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check { files }) => check(&files, &plugins),
        None => {
            crate::init_tracing(cli.log_format);
            match telemetry::export::init_from_env("gateway") {
                Ok(true) => tracing::info!("exporting spans over OTLP"),
                Ok(false) => {}
                Err(err) => {
                    tracing::error!("{err}");
                    crate::flush_logs();
                    return ExitCode::FAILURE;
                }
            }
            let status = crate::server::run(&cli.config, cli.upgrade, plugins);
            crate::flush_logs();
            telemetry::export::shutdown();
            status
        }
    }
}

fn check(files: &[PathBuf], plugins: &PluginRegistry) -> ExitCode {
    let mut failed = false;
    for file in files {
        match crate::config::load_with(file, plugins) {
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
