//! `product-service` binary: parses settings, opens the database, serves.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use product_service::{AppState, SERVICE_NAME, app, open_db, start_background};

#[global_allocator]
static GLOBAL: service_kit::Jemalloc = service_kit::Jemalloc;

/// Product service: catalogue, stock and reservations.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Settings {
    /// Address to listen on.
    #[arg(long, env = "PRODUCT_SERVICE_LISTEN", default_value = "127.0.0.1:8002")]
    listen: SocketAddr,
    /// SQLite database file (created if missing).
    #[arg(long, env = "PRODUCT_SERVICE_DB", default_value = "data/products.db")]
    db: PathBuf,
    /// Log lines as `text` or `json` (one object per line, the same field
    /// names in every process).
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    log_format: telemetry::log::LogFormat,
    /// NATS server with JetStream for the stock events and the
    /// order.cancelled consumer (e.g. nats://127.0.0.1:4222); without it
    /// events wait in the outbox.
    #[arg(long, env = "BROKER_URL")]
    broker: Option<String>,
    /// How long a reservation is held unconfirmed before its stock returns
    /// (e.g. 5m, 30s).
    #[arg(long, env = "RESERVATION_HOLD", value_parser = humantime::parse_duration, default_value = "5m")]
    reservation_hold: Duration,
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
    let db = open_db(&settings.db).await;
    service_kit::serve::service_main(SERVICE_NAME, settings.listen, registry.as_ref(), db, |db| {
        let mut state = AppState::new(db);
        state.hold = settings.reservation_hold;
        start_background(&mut state, broker);
        app(state)
    })
    .await
}
