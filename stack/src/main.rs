//! `stack`: runs the gateway and every service it fronts, with one command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// Run the whole system locally: every service instance listed in the
/// gateway configuration, then the gateway.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The gateway configuration; it also says where each service listens.
    #[arg(long, default_value = "gateway.yaml")]
    config: PathBuf,
    /// Where the services keep their SQLite files.
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// Where the service and gateway binaries are (default: next to this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Seconds to wait for every service to be healthy.
    #[arg(long, default_value_t = 60)]
    ready_timeout: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let bin_dir = match cli.bin_dir {
        Some(dir) => dir,
        None => match std::env::current_exe() {
            Ok(exe) => exe.parent().map(PathBuf::from).unwrap_or_default(),
            Err(err) => {
                eprintln!("stack: cannot find my own binary ({err}); pass --bin-dir");
                return ExitCode::FAILURE;
            }
        },
    };
    stack::run(stack::Options {
        config: cli.config,
        data_dir: cli.data_dir,
        bin_dir,
        ready_timeout: Duration::from_secs(cli.ready_timeout),
    })
    .await
}
