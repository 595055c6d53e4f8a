//! The local launcher: the whole system from one command.
//!
//! Reads the gateway's `gateway.yaml` to learn where everything listens,
//! starts every instance of every service it lists (the service name is the
//! binary name: `user-service`, `product-service`, `order-service`), then
//! the gateway; waits until the gateway reports every service healthy;
//! prints where to go; streams every process's output with a prefix; and on
//! Ctrl-C or SIGTERM stops them all gracefully (gateway first, so no new
//! requests arrive while the services drain).
//!
//! With a registry ([`RegistryOptions`], `stack --registry`), a local etcd
//! starts first (data in `data/etcd`), every service registers in it, and
//! services on `discovery: etcd` run as many instances as `--scale` says,
//! on free ports; `stack add SERVICE [COUNT]` then starts more instances
//! of one of them beside a running stack, which join live and leave when
//! it stops ([`Options::add`]).
//!
//! A child that dies is reported loudly and restarted after a pause: in
//! development a crash should be visible but should not take the rest of
//! the system down (the gateway keeps serving from the other instances).
//! A child that keeps dying ([`CRASH_LOOP_LIMIT`] times within
//! [`CRASH_LOOP_WINDOW`]) is a configuration problem, not bad luck: the
//! launcher then stops everything and exits with status 1.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use gateway_config::{Config, DiscoveryKind};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

/// Pause before restarting a child that died.
pub const RESTART_DELAY: Duration = Duration::from_secs(1);
/// Deaths of one child within [`CRASH_LOOP_WINDOW`] that make the launcher
/// give up.
pub const CRASH_LOOP_LIMIT: usize = 5;
pub const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(60);
/// How long a stopping child gets after SIGTERM before SIGKILL. The gateway
/// needs its grace period (3 s) plus runtime shutdown (2 s).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Options {
    pub config: PathBuf,
    pub data_dir: PathBuf,
    /// Where the binaries are; default: next to the `stack` binary.
    pub bin_dir: PathBuf,
    /// How long to wait for every service to be healthy at start.
    pub ready_timeout: Duration,
    /// The local message broker for the order events, if any.
    pub broker: Option<BrokerOptions>,
    /// The local registry, if any.
    pub registry: Option<RegistryOptions>,
    /// Instances of each `discovery: etcd` service (default: 2 of
    /// product-service, 1 of the others).
    pub scale: BTreeMap<String, usize>,
    /// Only this many more instances of this service, beside a running
    /// stack (`stack add`): no etcd, broker or gateway of its own.
    pub add: Option<(String, usize)>,
}

/// A local etcd, started first, its data in `data/etcd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryOptions {
    /// Client port (etcd's usual 2379).
    pub port: u16,
    /// Peer port (2380).
    pub peer_port: u16,
}

impl RegistryOptions {
    /// As the services' `--registry` takes it.
    pub fn url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.port)
    }
}

/// Instances of a `discovery: etcd` service when `--scale` does not say.
fn default_scale(service: &str) -> usize {
    if service == "product-service" { 2 } else { 1 }
}

/// A free loopback port, for an instance the registry will announce.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A local `nats-server` with JetStream, started first, its store in
/// `data/nats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerOptions {
    /// Client port (NATS' usual 4222).
    pub port: u16,
    /// Monitoring port (`/healthz`; NATS' usual 8222).
    pub monitor_port: u16,
}

impl BrokerOptions {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

/// `name` in the directories of `PATH`, if it is there.
fn in_path(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// One process to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    /// Shown in front of its output, e.g. `product-service-2`.
    pub label: String,
    pub binary: PathBuf,
    pub args: Vec<String>,
    /// Where it listens (checked free before starting).
    pub listen: Vec<SocketAddr>,
    /// Polled until it answers 2xx.
    pub health_url: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{0}")]
    Config(#[from] gateway_config::ConfigErrors),
    #[error(
        "service {service}: instance {address:?} must be ip:port to be started locally (host names are for containers)"
    )]
    NotLocal { service: String, address: String },
    #[error("{0} not found: build first with `cargo build --release` (scripts/run.sh does it)")]
    MissingBinary(PathBuf),
    #[error(
        "port {port} ({label}) is already in use: stop what listens there or change gateway.yaml"
    )]
    PortInUse { port: u16, label: String },
    #[error(
        "service {0} is on discovery: etcd: run with --registry (scripts/run.sh --registry), or use a configuration with static instances"
    )]
    NeedsRegistry(String),
    #[error("stack add: {0}")]
    Add(String),
    #[error("cannot pick a free port: {0}")]
    Port(std::io::Error),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The SQLite file of a service in `data_dir`.
fn database(data_dir: &Path, service: &str) -> PathBuf {
    let file = match service {
        "user-service" => "users.db".to_owned(),
        "product-service" => "products.db".to_owned(),
        "order-service" => "orders.db".to_owned(),
        other => format!("{other}.db"),
    };
    data_dir.join(file)
}

fn first_instance(config: &Config, service: &str) -> Option<String> {
    config
        .service(service)
        .and_then(|s| s.instances.first())
        .map(|address| format!("http://{address}"))
}

/// Loopback address to reach something listening on `addr` (which may be a
/// wildcard like 0.0.0.0).
fn reachable(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    }
}

/// Every process, in start order: the services (order-service last, it
/// calls the others), then the gateway.
pub fn plan(config: &Config, options: &Options) -> Result<Vec<ProcessSpec>, PlanError> {
    let mut services: Vec<_> = config.services.iter().collect();
    services.sort_by_key(|s| s.name == "order-service");
    let mut specs = Vec::new();
    if let Some((name, _)) = &options.add {
        match config.service(name) {
            None => {
                return Err(PlanError::Add(format!(
                    "{name} is not a service of {}",
                    options.config.display()
                )));
            }
            Some(s) if s.discovery != DiscoveryKind::Etcd => {
                return Err(PlanError::Add(format!(
                    "{name} is not on discovery: etcd in {}",
                    options.config.display()
                )));
            }
            Some(_) if options.registry.is_none() => {
                return Err(PlanError::Add("needs the registry".to_owned()));
            }
            Some(_) => {}
        }
    }
    let whole_stack = options.add.is_none();
    if let (Some(registry), true) = (options.registry, whole_stack) {
        let data = options.data_dir.join("etcd");
        let client = format!("http://127.0.0.1:{}", registry.port);
        let peer = format!("http://127.0.0.1:{}", registry.peer_port);
        specs.push(ProcessSpec {
            label: "etcd".to_owned(),
            binary: in_path("etcd"),
            args: vec![
                "--name=stack".to_owned(),
                format!("--data-dir={}", data.display()),
                format!("--listen-client-urls={client}"),
                format!("--advertise-client-urls={client}"),
                format!("--listen-peer-urls={peer}"),
                format!("--initial-advertise-peer-urls={peer}"),
                format!("--initial-cluster=stack={peer}"),
                "--logger=zap".to_owned(),
                "--log-level=warn".to_owned(),
            ],
            listen: vec![
                SocketAddr::from(([127, 0, 0, 1], registry.port)),
                SocketAddr::from(([127, 0, 0, 1], registry.peer_port)),
            ],
            health_url: format!("{client}/health"),
        });
    }
    if let (Some(broker), true) = (options.broker, whole_stack) {
        let store = options.data_dir.join("nats");
        specs.push(ProcessSpec {
            label: "nats".to_owned(),
            binary: in_path("nats-server"),
            args: vec![
                "-a".to_owned(),
                "127.0.0.1".to_owned(),
                "-p".to_owned(),
                broker.port.to_string(),
                "-m".to_owned(),
                broker.monitor_port.to_string(),
                "-js".to_owned(),
                "-sd".to_owned(),
                store.display().to_string(),
            ],
            listen: vec![
                SocketAddr::from(([127, 0, 0, 1], broker.port)),
                SocketAddr::from(([127, 0, 0, 1], broker.monitor_port)),
            ],
            health_url: format!("http://127.0.0.1:{}/healthz", broker.monitor_port),
        });
    }
    for service in services {
        let addresses: Vec<String> = match (&options.add, service.discovery) {
            (Some((name, _)), _) if *name != service.name => continue,
            (Some((_, count)), _) => free_ports(*count)?,
            (None, DiscoveryKind::Static) => service.instances.clone(),
            (None, DiscoveryKind::Etcd) => {
                if options.registry.is_none() {
                    return Err(PlanError::NeedsRegistry(service.name.clone()));
                }
                let count = options
                    .scale
                    .get(&service.name)
                    .copied()
                    .unwrap_or_else(|| default_scale(&service.name));
                free_ports(count)?
            }
        };
        for (index, address) in addresses.iter().enumerate() {
            let listen: SocketAddr = address.parse().map_err(|_| PlanError::NotLocal {
                service: service.name.clone(),
                address: address.clone(),
            })?;
            let label = match (&options.add, index) {
                (Some(_), _) => format!("{}+{}", service.name, index + 1),
                (None, 0) => service.name.clone(),
                (None, _) => format!("{}-{}", service.name, index + 1),
            };
            let mut args = vec![
                "--listen".to_owned(),
                listen.to_string(),
                "--db".to_owned(),
                database(&options.data_dir, &service.name)
                    .display()
                    .to_string(),
            ];
            if let Some(broker) = options.broker
                && matches!(service.name.as_str(), "order-service" | "product-service")
            {
                args.extend(["--broker".to_owned(), broker.url()]);
            }
            if let Some(registry) = options.registry {
                // Every instance registers; order-service finds the
                // others there too.
                args.extend(["--registry".to_owned(), registry.url()]);
            } else if service.name == "order-service" {
                for (flag, dependency) in [
                    ("--users-url", "user-service"),
                    ("--products-url", "product-service"),
                ] {
                    if let Some(url) = first_instance(config, dependency) {
                        args.extend([flag.to_owned(), url]);
                    }
                }
            }
            specs.push(ProcessSpec {
                label,
                binary: options.bin_dir.join(&service.name),
                args,
                listen: vec![listen],
                health_url: format!("http://{}{}", reachable(listen), service.health.path),
            });
        }
    }
    if whole_stack {
        let mut gateway_listen = vec![config.listen];
        gateway_listen.extend(config.admin_listen);
        specs.push(ProcessSpec {
            label: "gateway".to_owned(),
            binary: options.bin_dir.join("gateway"),
            args: vec!["--config".to_owned(), options.config.display().to_string()],
            listen: gateway_listen,
            health_url: format!("http://{}/health", reachable(config.listen)),
        });
    }
    Ok(specs)
}

/// `count` free loopback addresses.
fn free_ports(count: usize) -> Result<Vec<String>, PlanError> {
    (0..count)
        .map(|_| {
            free_port()
                .map(|port| format!("127.0.0.1:{port}"))
                .map_err(PlanError::Port)
        })
        .collect()
}

/// Fails with the first missing binary or busy port.
pub fn preflight(specs: &[ProcessSpec]) -> Result<(), PlanError> {
    for spec in specs {
        if !spec.binary.is_file() {
            return Err(PlanError::MissingBinary(spec.binary.clone()));
        }
    }
    for spec in specs {
        for addr in &spec.listen {
            if std::net::TcpListener::bind(addr).is_err() {
                return Err(PlanError::PortInUse {
                    port: addr.port(),
                    label: spec.label.clone(),
                });
            }
        }
    }
    Ok(())
}

/// A running child, owned by its waiting task.
struct Running {
    spec: ProcessSpec,
    pid: Option<u32>,
    deaths: VecDeque<Instant>,
    alive: bool,
}

/// Sent by a child's task when it exits.
struct Exited {
    index: usize,
    generation: u64,
    status: String,
}

const COLORS: [&str; 6] = [
    "\x1b[36m", "\x1b[32m", "\x1b[33m", "\x1b[35m", "\x1b[34m", "\x1b[31m",
];

fn prefix(index: usize, label: &str, color: bool) -> String {
    if color {
        format!("{}{label:>17} |\x1b[0m ", COLORS[index % COLORS.len()])
    } else {
        format!("{label:>17} | ")
    }
}

fn spawn(
    index: usize,
    generation: u64,
    spec: &ProcessSpec,
    color: bool,
    exits: &mpsc::UnboundedSender<Exited>,
) -> std::io::Result<u32> {
    let mut child = tokio::process::Command::new(&spec.binary)
        .args(&spec.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own process group: a Ctrl-C in the terminal reaches only the
        // launcher, which then stops the children in order.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().unwrap_or_default();
    let tag = prefix(index, &spec.label, color);
    if let Some(stdout) = child.stdout.take() {
        tokio::spawn(stream_lines(BufReader::new(stdout), tag.clone()));
    }
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(stream_lines(BufReader::new(stderr), tag));
    }
    let exits = exits.clone();
    tokio::spawn(async move {
        let status = match child.wait().await {
            Ok(status) => status.to_string(),
            Err(err) => format!("unknown status ({err})"),
        };
        let _ = exits.send(Exited {
            index,
            generation,
            status,
        });
    });
    Ok(pid)
}

async fn stream_lines<R: tokio::io::AsyncRead + Unpin>(reader: BufReader<R>, tag: String) {
    let mut lines = reader.lines();
    while let Ok(Some(line)) = lines.next_line().await {
        println!("{tag}{line}");
    }
}

/// Polls `url` until it answers 2xx (and, for the gateway, reports every
/// service healthy) or `limit` passes.
async fn wait_healthy(http: &reqwest::Client, url: &str, gateway: bool, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(response) = http.get(url).send().await
            && response.status().is_success()
        {
            if !gateway {
                return true;
            }
            if let Ok(body) = response.json::<serde_json::Value>().await
                && body["overall_healthy"] == true
            {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn banner(config: &Config, specs: &[ProcessSpec], running: &[Running]) -> String {
    let gateway = format!("http://{}", reachable(config.listen));
    let mut text = String::from("\nstack ready: every service is healthy\n\n");
    for (spec, run) in specs.iter().zip(running) {
        let listen: Vec<String> = spec.listen.iter().map(ToString::to_string).collect();
        text.push_str(&format!(
            "  {:<18} pid {:<7} {}\n",
            spec.label,
            run.pid.unwrap_or_default(),
            listen.join(", ")
        ));
    }
    text.push_str(&format!(
        "\n  gateway:  {gateway}   (health: {gateway}/health, services: {gateway}/services)\n"
    ));
    if let Some(admin) = config.admin_listen {
        text.push_str(&format!("  admin:    http://{admin}/admin/config\n"));
    }
    text.push_str(&format!(
        "\nTry:
  curl -s -X POST {gateway}/api/users -H 'content-type: application/json' \\
       -d '{{\"username\":\"john_doe\",\"email\":\"john@example.com\",\"full_name\":\"John Doe\"}}'
  curl -s {gateway}/api/products
  curl -s -X POST {gateway}/api/orders -H 'content-type: application/json' \\
       -d '{{\"user_id\":1,\"items\":[{{\"product_id\":1,\"quantity\":2}},{{\"product_id\":2,\"quantity\":1}}]}}'
  curl -s {gateway}/health

Edit gateway.yaml to change routes live. Ctrl-C stops everything.
"
    ));
    text
}

fn signal(pid: Option<u32>, signal: Signal) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()).filter(|p| *p > 0) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// Stops every live child in reverse start order, each one completely
/// before the next: the gateway stops taking requests and finishes the
/// ones in flight while the services behind it still answer. SIGTERM, then
/// SIGKILL after [`STOP_TIMEOUT`].
async fn stop_all(running: &mut [Running], exits: &mut mpsc::UnboundedReceiver<Exited>) {
    for index in (0..running.len()).rev() {
        if !running[index].alive {
            continue;
        }
        println!("stack: stopping {} (SIGTERM)", running[index].spec.label);
        signal(running[index].pid, Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
        while running[index].alive {
            match tokio::time::timeout_at(deadline, exits.recv()).await {
                Ok(Some(exit)) => {
                    if let Some(run) = running.get_mut(exit.index) {
                        run.alive = false;
                        println!("stack: {} stopped ({})", run.spec.label, exit.status);
                    }
                }
                Ok(None) => return,
                Err(_) => {
                    let run = &mut running[index];
                    eprintln!(
                        "stack: {} did not stop in {STOP_TIMEOUT:?}: SIGKILL",
                        run.spec.label
                    );
                    signal(run.pid, Signal::SIGKILL);
                    run.alive = false;
                }
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        eprintln!("stack: cannot listen for signals; stop it with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
}

/// Runs the whole system until a signal. Exit status: 0 after a clean stop,
/// 1 if it could not start or a child crash-looped, 2 for an invalid
/// configuration.
pub async fn run(options: Options) -> ExitCode {
    let config = match gateway_config::load(&options.config) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    let specs = match plan(&config, &options).and_then(|specs| preflight(&specs).map(|()| specs)) {
        Ok(specs) => specs,
        Err(err) => {
            eprintln!("stack: {err}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(source) = std::fs::create_dir_all(&options.data_dir) {
        eprintln!(
            "stack: {}",
            PlanError::DataDir {
                path: options.data_dir.clone(),
                source
            }
        );
        return ExitCode::FAILURE;
    }
    let color = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap_or_default();
    let (exits_tx, mut exits) = mpsc::unbounded_channel();
    let mut running: Vec<Running> = Vec::with_capacity(specs.len());
    let mut generations = vec![0u64; specs.len()];

    let stop = shutdown_signal();
    tokio::pin!(stop);
    for (index, spec) in specs.iter().enumerate() {
        println!(
            "stack: starting {} ({} {})",
            spec.label,
            spec.binary.display(),
            spec.args.join(" ")
        );
        let pid = match spawn(index, 0, spec, color, &exits_tx) {
            Ok(pid) => pid,
            Err(err) => {
                eprintln!("stack: cannot start {}: {err}", spec.label);
                stop_all(&mut running, &mut exits).await;
                return ExitCode::FAILURE;
            }
        };
        running.push(Running {
            spec: spec.clone(),
            pid: Some(pid),
            deaths: VecDeque::new(),
            alive: true,
        });
        let is_gateway = spec.label == "gateway";
        let limit = if is_gateway {
            options.ready_timeout
        } else {
            Duration::from_secs(30)
        };
        let healthy = tokio::select! {
            healthy = wait_healthy(&http, &spec.health_url, is_gateway, limit) => healthy,
            exit = exits.recv() => {
                let status = exit.map_or_else(|| "?".to_owned(), |e| e.status);
                eprintln!("stack: !!! {} exited during start-up ({status})", spec.label);
                if let Some(run) = running.last_mut() { run.alive = false; }
                false
            }
            () = &mut stop => {
                stop_all(&mut running, &mut exits).await;
                return ExitCode::SUCCESS;
            }
        };
        if !healthy {
            eprintln!(
                "stack: {} did not become healthy ({}); stopping",
                spec.label, spec.health_url
            );
            stop_all(&mut running, &mut exits).await;
            return ExitCode::FAILURE;
        }
    }
    if options.add.is_some() {
        println!(
            "\nstack add: every instance is up and registered; Ctrl-C stops them (they leave the registry first)\n"
        );
    } else {
        println!("{}", banner(&config, &specs, &running));
    }

    loop {
        tokio::select! {
            () = &mut stop => {
                println!("stack: stopping everything");
                stop_all(&mut running, &mut exits).await;
                println!("stack: stopped");
                return ExitCode::SUCCESS;
            }
            Some(exit) = exits.recv() => {
                if exit.generation != generations[exit.index] {
                    continue;
                }
                let run = &mut running[exit.index];
                run.alive = false;
                eprintln!("stack: !!! {} DIED ({}); restarting in {RESTART_DELAY:?}", run.spec.label, exit.status);
                let now = Instant::now();
                run.deaths.push_back(now);
                while run.deaths.front().is_some_and(|t| now.duration_since(*t) > CRASH_LOOP_WINDOW) {
                    run.deaths.pop_front();
                }
                if run.deaths.len() >= CRASH_LOOP_LIMIT {
                    eprintln!(
                        "stack: !!! {} died {CRASH_LOOP_LIMIT} times within {CRASH_LOOP_WINDOW:?}: giving up, stopping everything",
                        run.spec.label
                    );
                    stop_all(&mut running, &mut exits).await;
                    return ExitCode::FAILURE;
                }
                tokio::select! {
                    () = tokio::time::sleep(RESTART_DELAY) => {}
                    () = &mut stop => {
                        stop_all(&mut running, &mut exits).await;
                        return ExitCode::SUCCESS;
                    }
                }
                generations[exit.index] += 1;
                let run = &mut running[exit.index];
                match spawn(exit.index, generations[exit.index], &run.spec, color, &exits_tx) {
                    Ok(pid) => {
                        run.pid = Some(pid);
                        run.alive = true;
                        println!("stack: restarted {} (pid {pid})", run.spec.label);
                    }
                    Err(err) => {
                        eprintln!("stack: cannot restart {}: {err}; stopping everything", run.spec.label);
                        stop_all(&mut running, &mut exits).await;
                        return ExitCode::FAILURE;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

    use super::*;

    fn options(add: Option<(&str, usize)>) -> Options {
        Options {
            config: PathBuf::from("gateway.registry.yaml"),
            data_dir: PathBuf::from("data"),
            bin_dir: PathBuf::from("bin"),
            ready_timeout: Duration::from_secs(1),
            broker: None,
            registry: Some(RegistryOptions {
                port: 2379,
                peer_port: 2380,
            }),
            scale: BTreeMap::from([("user-service".to_owned(), 3)]),
            add: add.map(|(s, n)| (s.to_owned(), n)),
        }
    }

    fn registry_config() -> Config {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway.registry.yaml"),
        )
        .unwrap();
        gateway_config::parse(&text, "gateway.registry.yaml").unwrap()
    }

    #[test]
    fn with_a_registry_etcd_starts_first_and_every_instance_registers() {
        let specs = plan(&registry_config(), &options(None)).unwrap();
        let labels: Vec<&str> = specs.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "etcd",
                "product-service",
                "product-service-2",
                "user-service",
                "user-service-2",
                "user-service-3",
                "order-service",
                "gateway"
            ]
        );
        for spec in &specs[1..specs.len() - 1] {
            assert!(
                spec.args
                    .windows(2)
                    .any(|w| w == ["--registry", "etcd://127.0.0.1:2379"]),
                "{spec:?}"
            );
            assert!(!spec.args.iter().any(|a| a.ends_with("-url")), "{spec:?}");
        }
        // Without --registry such a table is refused, with the reason.
        let mut without = options(None);
        without.registry = None;
        let err = plan(&registry_config(), &without).unwrap_err();
        assert!(err.to_string().contains("--registry"), "{err}");
    }

    #[test]
    fn add_starts_only_the_extra_instances() {
        let specs = plan(&registry_config(), &options(Some(("product-service", 2)))).unwrap();
        let labels: Vec<&str> = specs.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, ["product-service+1", "product-service+2"]);
        assert_ne!(specs[0].listen, specs[1].listen);
        let err = plan(&registry_config(), &options(Some(("nope", 1)))).unwrap_err();
        assert!(err.to_string().contains("not a service"), "{err}");
    }
}
