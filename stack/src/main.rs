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
    /// Port of the local nats-server (JetStream) that carries the order
    /// events; its store is DATA_DIR/nats.
    #[arg(long, default_value_t = 4222)]
    nats_port: u16,
    /// Monitoring port of the local nats-server.
    #[arg(long, default_value_t = 8222)]
    nats_monitor_port: u16,
    /// Run without a message broker: events wait in each service's outbox,
    /// cancellations call product-service directly.
    #[arg(long)]
    no_broker: bool,
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
        broker: (!cli.no_broker).then_some(stack::BrokerOptions {
            port: cli.nats_port,
            monitor_port: cli.nats_monitor_port,
        }),
    })
    .await
}
