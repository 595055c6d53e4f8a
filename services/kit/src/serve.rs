//! Running a service: logging, the common router layers, the `/health`
//! handler, binding and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use sqlx::SqlitePool;
use tokio::net::TcpListener;

use crate::AppError;

/// Largest request body a service reads; larger ones get a 413. The services
/// take small JSON documents; a megabyte is far more than any of them needs.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// How long in-flight requests get to finish after SIGTERM/Ctrl-C before the
/// process exits anyway. Below the 10 s that container runtimes wait before
/// SIGKILL.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);

/// Version reported by `/health`, as the original services did.
pub const SERVICE_VERSION: &str = "1.0.0";

/// Sets up `tracing` output: `RUST_LOG` if set, else `info`.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    // A second call (tests) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal())
        .try_init();
}

/// Adds what every service router needs: `GET /health` for `service`, JSON
/// 404/405 answers, the body limit and one log line per request.
pub fn finish_router(router: Router, service: &'static str, pool: SqlitePool) -> Router {
    let health = Router::new()
        .route("/health", get(health))
        .with_state(HealthState { service, pool });
    router
        .merge(health)
        .fallback(|| async { AppError::not_found("Not Found") })
        .method_not_allowed_fallback(|| async {
            AppError::new(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(log_request))
}

#[derive(Clone)]
struct HealthState {
    service: &'static str,
    pool: SqlitePool,
}

/// `GET /health`: 200 with the original body while the database answers,
/// 503 otherwise, so that a gateway health check sees a broken disk.
async fn health(State(state): State<HealthState>) -> Response {
    match sqlx::query("SELECT 1").execute(&state.pool).await {
        Ok(_) => axum::Json(json!({
            "service": state.service,
            "status": "healthy",
            "version": SERVICE_VERSION,
        }))
        .into_response(),
        Err(err) => {
            tracing::warn!(error = %err, "health check: database unavailable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({
                    "service": state.service,
                    "status": "unhealthy",
                    "version": SERVICE_VERSION,
                    "detail": "Database unavailable",
                })),
            )
                .into_response()
        }
    }
}

async fn log_request(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let micros = started.elapsed().as_micros() as u64;
    // Health probes arrive every second from every gateway: keep them out
    // of the default log unless they fail.
    if path == "/health" && response.status().is_success() {
        tracing::debug!(%method, %path, status, micros, request_id, "request");
    } else {
        tracing::info!(%method, %path, status, micros, request_id, "request");
    }
    response
}

/// Binds `addr`, naming the address in the error (a port in use is the
/// usual cause).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|err| std::io::Error::new(err.kind(), format!("cannot listen on {addr}: {err}")))
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets in-flight
/// requests finish for at most [`SHUTDOWN_GRACE`].
pub async fn run(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let signalled = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(signalled);
    let mut stop_rx = stop_rx;
    let grace_expired = async move {
        let _ = stop_rx.wait_for(|stopped| *stopped).await;
        tracing::info!(grace = ?SHUTDOWN_GRACE, "shutting down: finishing in-flight requests");
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        result = server => result,
        () = grace_expired => {
            tracing::warn!("grace period over: exiting with requests still open");
            Ok(())
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

/// The whole life of a service binary after its settings are parsed: bind,
/// announce, serve until a signal, shut down gracefully.
pub async fn serve_until_signal(
    service: &'static str,
    addr: SocketAddr,
    app: Router,
) -> std::io::Result<()> {
    let listener = bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!("{service} listening on http://{local}");
    run(listener, app, shutdown_signal()).await?;
    tracing::info!("{service} stopped");
    Ok(())
}

/// `main` of a service binary once its settings are parsed: opens nothing
/// itself but reports a database that failed to open, builds the router,
/// serves until a signal and closes the database. Exit status 1 on any
/// start-up or serving error, with the cause in the log.
pub async fn service_main(
    service: &'static str,
    listen: SocketAddr,
    db: Result<SqlitePool, crate::db::DbError>,
    build_app: impl FnOnce(SqlitePool) -> Router,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    let db = match db {
        Ok(db) => db,
        Err(err) => {
            tracing::error!("{service}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let served = serve_until_signal(service, listen, build_app(db.clone())).await;
    db.close().await;
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{service}: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Serves `app` on a fresh `127.0.0.1:0` listener in a background task and
/// returns the address; for tests and tools that need a real socket.
pub async fn spawn_local(app: Router) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(err) = run(listener, app, std::future::pending()).await {
            tracing::error!(error = %err, "background server failed");
        }
    });
    Ok(addr)
}
