//! `product-service` binary: parses settings, opens the database, serves.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use product_service::{AppState, SERVICE_NAME, app, open_db};

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
}

#[tokio::main]
async fn main() -> ExitCode {
    let settings = Settings::parse();
    service_kit::serve::init_tracing();
    let db = open_db(&settings.db).await;
    service_kit::serve::service_main(SERVICE_NAME, settings.listen, db, |db| app(AppState { db }))
        .await
}
