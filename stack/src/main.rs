//! `stack`: runs the gateway and every service it fronts, with one command.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Run the whole system locally: every service instance listed in the
/// gateway configuration, then the gateway.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The gateway configuration; it also says where each service listens
    /// (default: gateway.yaml, or gateway.registry.yaml with --registry).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Where the services keep their SQLite files (and etcd, nats theirs).
    #[arg(long, default_value = "data", global = true)]
    data_dir: PathBuf,
    /// Where the service and gateway binaries are (default: next to this one).
    #[arg(long, global = true)]
    bin_dir: Option<PathBuf>,
    /// Seconds to wait for every service to be healthy.
    #[arg(long, default_value_t = 60)]
    ready_timeout: u64,
    /// Port of the local nats-server (JetStream) that carries the order
    /// events; its store is DATA_DIR/nats.
    #[arg(long, default_value_t = 4222, global = true)]
    nats_port: u16,
    /// Monitoring port of the local nats-server.
    #[arg(long, default_value_t = 8222)]
    nats_monitor_port: u16,
    /// Run without a message broker: events wait in each service's outbox,
    /// cancellations call product-service directly.
    #[arg(long, global = true)]
    no_broker: bool,
    /// Run a local etcd (data in DATA_DIR/etcd) and register every service
    /// in it; the gateway's discovery: etcd services follow it.
    #[arg(long)]
    registry: bool,
    /// Client port of the local etcd.
    #[arg(long, default_value_t = 2379, global = true)]
    etcd_port: u16,
    /// Peer port of the local etcd.
    #[arg(long, default_value_t = 2380)]
    etcd_peer_port: u16,
    /// Instances of a discovery: etcd service, as SERVICE=N (repeatable;
    /// default 2 of product-service, 1 of the others).
    #[arg(long, value_parser = scale)]
    scale: Vec<(String, usize)>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start COUNT more instances of SERVICE beside a running `stack
    /// --registry`: they register and take traffic live; Ctrl-C takes them
    /// out of the registry and stops them.
    Add {
        service: String,
        #[arg(default_value_t = 1)]
        count: usize,
    },
}

fn scale(text: &str) -> Result<(String, usize), String> {
    let (service, count) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected SERVICE=N"))?;
    let count = count
        .parse()
        .map_err(|_| format!("{text:?}: N must be a number"))?;
    Ok((service.to_owned(), count))
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
    let add = cli
        .command
        .map(|Command::Add { service, count }| (service, count));
    let registry = cli.registry || add.is_some();
    let config = cli.config.unwrap_or_else(|| {
        PathBuf::from(if registry {
            "gateway.registry.yaml"
        } else {
            "gateway.yaml"
        })
    });
    stack::run(stack::Options {
        config,
        data_dir: cli.data_dir,
        bin_dir,
        ready_timeout: Duration::from_secs(cli.ready_timeout),
        broker: (!cli.no_broker).then_some(stack::BrokerOptions {
            port: cli.nats_port,
            monitor_port: cli.nats_monitor_port,
        }),
        registry: registry.then_some(stack::RegistryOptions {
            port: cli.etcd_port,
            peer_port: cli.etcd_peer_port,
        }),
        scale: cli.scale.into_iter().collect::<BTreeMap<_, _>>(),
        add,
    })
    .await
}
