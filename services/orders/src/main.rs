//! `order-service` binary: parses settings, opens the database, serves.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use order_service::{
    AppState, Dependencies, Recovery, SERVICE_NAME, app, open_db, start_background,
};

#[global_allocator]
static GLOBAL: service_kit::Jemalloc = service_kit::Jemalloc;

/// Order service: places orders, reserving stock at the product service.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Settings {
    /// Address to listen on.
    #[arg(long, env = "ORDER_SERVICE_LISTEN", default_value = "127.0.0.1:8003")]
    listen: SocketAddr,
    /// SQLite database file (created if missing).
    #[arg(long, env = "ORDER_SERVICE_DB", default_value = "data/orders.db")]
    db: PathBuf,
    /// Log lines as `text` or `json` (one object per line, the same field
    /// names in every process).
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    log_format: telemetry::log::LogFormat,
    /// Base URL of user-service (not used with --registry: the registered
    /// instances are).
    #[arg(long, env = "USERS_URL", default_value = "http://127.0.0.1:8001")]
    users_url: String,
    /// Base URL of product-service (not used with --registry).
    #[arg(long, env = "PRODUCTS_URL", default_value = "http://127.0.0.1:8002")]
    products_url: String,
    /// NATS server with JetStream for the order events (e.g.
    /// nats://127.0.0.1:4222); cancellations then release stock through it.
    /// Without it events wait in the outbox and cancellation calls
    /// product-service directly.
    #[arg(long, env = "BROKER_URL")]
    broker: Option<String>,
    /// Pending orders younger than this are left to the request placing
    /// them; older ones are finished by recovery.
    #[arg(long, env = "RECOVERY_GRACE", value_parser = humantime::parse_duration, default_value = "15s")]
    recovery_grace: Duration,
    /// How often recovery looks for interrupted orders.
    #[arg(long, env = "RECOVERY_INTERVAL", value_parser = humantime::parse_duration, default_value = "5s")]
    recovery_interval: Duration,
    /// Registration in etcd.
    #[command(flatten)]
    registry: service_kit::registration::RegistryArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let settings = Settings::parse();
    let _logs = service_kit::serve::init_tracing(SERVICE_NAME, settings.log_format);
    let registry = match settings.registry.plan() {
        Ok(plan) => plan,
        Err(err) => {
            tracing::error!("{SERVICE_NAME}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let deps = match &registry {
        // With a registry the instances come from there, not from the URLs.
        Some(plan) => Dependencies::from_registry(plan.endpoints(), plan.prefix()),
        None => Dependencies::new(&settings.users_url, &settings.products_url),
    };
    let deps = match deps {
        Ok(deps) => deps,
        Err(err) => {
            tracing::error!("{SERVICE_NAME}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let broker = match &settings.broker {
        Some(url) => match service_kit::events::Broker::connect(url).await {
            Ok(broker) => Some(broker),
            Err(err) => {
                tracing::error!("{SERVICE_NAME}: broker {url}: {err}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let recovery = Recovery {
        grace: settings.recovery_grace,
        every: settings.recovery_interval,
    };
    let db = open_db(&settings.db).await;
    service_kit::serve::service_main(SERVICE_NAME, settings.listen, registry.as_ref(), db, |db| {
        let mut state = AppState::new(db, deps);
        start_background(&mut state, broker, recovery);
        app(state)
    })
    .await
}
