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
use serde_json::json;
use tokio::net::TcpListener;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppError;
use crate::db::Db;
use crate::registration::RegistryPlan;

/// Largest request body a service reads; larger ones get a 413. The services
/// take small JSON documents; a megabyte is far more than any of them needs.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// How long in-flight requests get to finish after SIGTERM/Ctrl-C before the
/// process exits anyway. Below the 10 s that container runtimes wait before
/// SIGKILL.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);

/// Version reported by `/health`, as the original services did.
pub const SERVICE_VERSION: &str = "1.0.0";

/// Sets up `tracing` output for `service` in `format`: `RUST_LOG` if set,
/// else `info`, through the buffered writer of [`telemetry::log_buffer`]
/// (lines appear within 100 ms; the guard returned writes out the rest
/// when `main` drops it). A second call (tests) keeps the first
/// subscriber.
pub fn init_tracing(service: &'static str, format: telemetry::log::LogFormat) -> LogGuard {
    use std::io::IsTerminal;
    telemetry::log_buffer::install(service, format, std::io::stdout().is_terminal());
    LogGuard
}

/// Writes out the log lines still buffered when dropped: `main` holds it.
#[must_use = "hold it until main returns: dropping it writes out the buffered lines"]
pub struct LogGuard;

impl Drop for LogGuard {
    fn drop(&mut self) {
        telemetry::log_buffer::flush();
    }
}

/// Adds what every service router needs: `GET /health` for `service`,
/// `GET /metrics`, the API document (`GET /openapi.json`) and its page
/// (`GET /docs`), JSON 404/405 answers, the body limit, and per request a
/// span with its request id and trace context, its metrics and one log
/// line. `routes` carries the service's own document (`openapi`).
pub fn finish_router(routes: OpenApiRouter, service: &'static str, db: Db) -> Router {
    let (router, api) = document(routes, service, db);
    router
        .merge(crate::openapi::docs(api))
        .route_layer(middleware::from_fn(note_route))
        .fallback(|| async { AppError::not_found("Not Found") })
        .method_not_allowed_fallback(|| async {
            AppError::new(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(service, observe_request))
}

/// The service's router and its whole document: its routes, `/health` and
/// `/metrics`.
pub fn document(
    routes: OpenApiRouter,
    service: &'static str,
    db: Db,
) -> (Router, utoipa::openapi::OpenApi) {
    let common = OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(metrics))
        .with_state(HealthState { service, db });
    routes.merge(common).split_for_parts()
}

/// `GET /metrics`: the service's exposition.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain", body = String))
)]
async fn metrics() -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(),
    )
        .into_response()
}

/// Where the route template of a request is noted once routing found it
/// (the outer middleware runs before routing, the route layer after).
#[derive(Clone, Default)]
struct RouteSlot(std::sync::Arc<std::sync::OnceLock<String>>);

async fn note_route(request: Request, next: Next) -> Response {
    if let (Some(slot), Some(matched)) = (
        request.extensions().get::<RouteSlot>(),
        request.extensions().get::<axum::extract::MatchedPath>(),
    ) {
        let _ = slot.0.set(matched.as_str().to_owned());
    }
    next.run(request).await
}

#[derive(Clone)]
struct HealthState {
    service: &'static str,
    db: Db,
}

/// What `/health` answers.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct HealthBody {
    pub service: String,
    /// `healthy` or `unhealthy`.
    pub status: String,
    pub version: String,
    /// Why it is unhealthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `GET /health`: 200 with the original body while the database answers,
/// 503 otherwise, so that a gateway health check sees a broken disk.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses(
        (status = 200, description = "The service and its database answer", body = HealthBody),
        (status = 503, description = "The database does not answer", body = HealthBody),
    )
)]
async fn health(State(state): State<HealthState>) -> Response {
    let answered = state.db.read(|conn| {
        conn.query_row("SELECT 1", [], |_| Ok(()))
            .map_err(crate::db::Error::from)
    });
    match answered {
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

/// One request: its context, its metrics, its log line.
async fn observe_request(
    State(service): State<&'static str>,
    mut request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let headers = request.headers();
    let request_id: std::sync::Arc<str> = crate::trace::request_id(
        headers
            .get(crate::trace::REQUEST_ID)
            .and_then(|v| v.to_str().ok()),
    )
    .into();
    let trace = telemetry::export::begin(
        headers
            .get(telemetry::trace::TRACEPARENT)
            .map(|v| v.as_bytes()),
    );
    let slot = RouteSlot::default();
    request.extensions_mut().insert(slot.clone());
    let context = crate::trace::CallContext {
        request_id: std::sync::Arc::clone(&request_id),
        trace,
    };
    let wall = std::time::SystemTime::now();
    // The line is written within the request too: when it goes through
    // `tracing` (JSON), the formatter names the request from the context.
    crate::trace::within(context, async move {
        let response = next.run(request).await;
        let status = response.status().as_u16();
        let elapsed = started.elapsed();
        let route = slot.0.get().map_or("unmatched", String::as_str);
        crate::metrics::record_request(
            service,
            method.as_str(),
            route,
            status,
            elapsed.as_secs_f64(),
        );
        crate::trace::record_server_span(
            &trace,
            wall,
            method.as_str(),
            &path,
            route,
            status,
            &request_id,
        );
        // Health probes and scrapes arrive every second: keep them out of
        // the default log unless they fail.
        let level =
            if matches!(path.as_str(), "/health" | "/metrics") && response.status().is_success() {
                tracing::Level::DEBUG
            } else {
                tracing::Level::INFO
            };
        crate::access_log::RequestLine {
            method: method.as_str(),
            path: &path,
            route,
            status,
            duration_ms: elapsed.as_secs_f64() * 1000.0,
            request_id: &request_id,
            trace: &trace,
        }
        .log(level);
        response
    })
    .await
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
/// announce (and register, with `registry`), serve until a signal, then
/// deregister, wait the deregister delay, and shut down gracefully.
pub async fn serve_until_signal(
    service: &'static str,
    addr: SocketAddr,
    app: Router,
    registry: Option<&RegistryPlan>,
) -> std::io::Result<()> {
    let listener = bind(addr).await?;
    let local = listener.local_addr()?;
    let registration = match registry {
        Some(plan) => {
            let address = plan.advertised(local).map_err(std::io::Error::other)?;
            Some((plan.register(service, address), plan.deregister_delay))
        }
        None => None,
    };
    tracing::info!("{service} listening on http://{local}");
    let shutdown = async move {
        shutdown_signal().await;
        if let Some((registration, delay)) = registration {
            // Out of the registry first: gateways stop picking this
            // instance while it still answers.
            registration.deregister().await;
            tokio::time::sleep(delay).await;
        }
    };
    run(listener, app, shutdown).await?;
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
    registry: Option<&RegistryPlan>,
    db: Result<Db, crate::db::DbError>,
    build_app: impl FnOnce(Db) -> Router,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    match telemetry::export::init_from_env(service) {
        Ok(true) => tracing::info!("exporting spans over OTLP"),
        Ok(false) => {}
        Err(err) => {
            tracing::error!("{service}: {err}");
            return ExitCode::FAILURE;
        }
    }
    let db = match db {
        Ok(db) => db,
        Err(err) => {
            tracing::error!("{service}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let served = serve_until_signal(service, listen, build_app(db.clone()), registry).await;
    db.close().await;
    // The exporter's thread blocks while it sends what is left.
    let _ = tokio::task::spawn_blocking(telemetry::export::shutdown).await;
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
