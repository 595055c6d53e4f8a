//! `user-service` binary: parses settings, opens the database, serves.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use user_service::{AppState, SERVICE_NAME, app, open_db};

#[global_allocator]
static GLOBAL: service_kit::Jemalloc = service_kit::Jemalloc;

/// User service: registration and lookup of users.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Settings {
    /// Address to listen on.
    #[arg(long, env = "USER_SERVICE_LISTEN", default_value = "127.0.0.1:8001")]
    listen: SocketAddr,
    /// SQLite database file (created if missing).
    #[arg(long, env = "USER_SERVICE_DB", default_value = "data/users.db")]
    db: PathBuf,
    /// Log lines as `text` or `json` (one object per line, the same field
    /// names in every process).
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    log_format: telemetry::log::LogFormat,
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
    let db = open_db(&settings.db).await;
    service_kit::serve::service_main(SERVICE_NAME, settings.listen, registry.as_ref(), db, |db| {
        app(AppState { db })
    })
    .await
}
