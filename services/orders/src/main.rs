//! `order-service` binary: parses settings, opens the database, serves.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use order_service::{AppState, Dependencies, SERVICE_NAME, app, open_db};

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
    /// Base URL of user-service.
    #[arg(long, env = "USERS_URL", default_value = "http://127.0.0.1:8001")]
    users_url: String,
    /// Base URL of product-service.
    #[arg(long, env = "PRODUCTS_URL", default_value = "http://127.0.0.1:8002")]
    products_url: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let settings = Settings::parse();
    service_kit::serve::init_tracing();
    let deps = match Dependencies::new(&settings.users_url, &settings.products_url) {
        Ok(deps) => deps,
        Err(err) => {
            tracing::error!("{SERVICE_NAME}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let db = open_db(&settings.db).await;
    service_kit::serve::service_main(SERVICE_NAME, settings.listen, db, |db| {
        app(AppState { db, deps })
    })
    .await
}
