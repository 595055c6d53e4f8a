//! The admin listener (`admin_listen`, loopback by default; never the
//! public port): what version is running and how the last reload went.
//!
//! - `GET /admin/config`: the running version, when it was loaded, its
//!   services and routes, and the last reload attempt with its outcome
//!   (errors with line and column, settings that need a restart).
//! - `POST /admin/reload`: reload now, even if the file did not change;
//!   answers the outcome (422 if the file was rejected).
//! - `GET /admin/stats`: requests in flight right now.
//! - `GET /admin/health`: `200` while the gateway runs (a liveness probe).
//! - `GET /metrics`: the Prometheus exposition (`crate::metrics`).
//!
//! With `admin.token_file`, every endpoint but `/admin/health` requires
//! `Authorization: Bearer <token>` (compared in constant time; the token is
//! read with the configuration, so a reload changes it). Nothing here shows
//! a secret. Served by axum on the control runtime, away from the proxy's
//! threads.

use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::reload::{Attempt, Outcome, Reloader, Trigger};

pub fn router(reloader: Arc<Reloader>) -> Router {
    let guarded = Router::new()
        .route("/admin/config", get(config))
        .route("/admin/reload", post(reload))
        .route("/admin/stats", get(stats))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                axum::Json(json!({"detail": "Not Found"})),
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&reloader),
            require_token,
        ));
    Router::new()
        .route(
            "/admin/health",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .merge(guarded)
        .with_state(reloader)
}

/// Lets a request through if no token is configured or it carries it.
async fn require_token(
    State(reloader): State<Arc<Reloader>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let snapshot = reloader.current().load();
    let Some(token) = &snapshot.config.admin_token else {
        return next.run(request).await;
    };
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim().as_bytes());
    use subtle::ConstantTimeEq;
    match presented {
        Some(presented) if bool::from(presented.ct_eq(token.expose().as_bytes())) => {
            next.run(request).await
        }
        _ => (
            StatusCode::UNAUTHORIZED,
            [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
            axum::Json(json!({"detail": "Missing or invalid admin token"})),
        )
            .into_response(),
    }
}

/// Serves the admin API on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, app: Router) {
    if let Err(err) = axum::serve(listener, app).await {
        tracing::error!(error = %err, "admin listener failed");
    }
}

/// Binds `addr` as soon as it is free (during a binary upgrade the old
/// process holds it until it exits), then serves.
pub async fn serve_when_free(addr: std::net::SocketAddr, app: Router) {
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                tracing::info!("admin listening on http://{addr}");
                return serve(listener, app).await;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
        }
    }
}

fn time(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

fn outcome_json(outcome: &Outcome) -> Value {
    match outcome {
        Outcome::Applied {
            version,
            restart_required,
        } => json!({"result": "applied", "version": version, "restart_required": restart_required}),
        Outcome::Unchanged { version } => json!({"result": "unchanged", "version": version}),
        Outcome::Rejected(errors) => json!({
            "result": "rejected",
            "errors": errors.errors.iter().map(|e| json!({
                "file": errors.file, "line": e.line, "column": e.column, "message": e.message,
            })).collect::<Vec<_>>(),
            "message": errors.to_string(),
        }),
        Outcome::Failed(reason) => json!({"result": "failed", "message": reason}),
    }
}

fn attempt_json(attempt: &Attempt) -> Value {
    let mut value = outcome_json(&attempt.outcome);
    value["at"] = Value::String(time(attempt.at));
    value["trigger"] = Value::String(attempt.trigger.as_str().to_owned());
    value["took_ms"] = json!(attempt.took.as_secs_f64() * 1000.0);
    value
}

async fn config(State(reloader): State<Arc<Reloader>>) -> axum::Json<Value> {
    let snapshot = reloader.current().load();
    let routes: Vec<Value> = snapshot
        .config
        .routes
        .iter()
        .map(|r| {
            let plugins = snapshot
                .routes
                .lookup_prefix(&r.prefix)
                .map(|route| route.plugins.describe())
                .unwrap_or_default();
            json!({"prefix": r.prefix, "service": r.service, "strip_prefix": r.strip_prefix, "plugins": plugins})
        })
        .collect();
    let statuses = reloader.membership().statuses();
    let services: Vec<Value> = snapshot
        .config
        .services
        .iter()
        .map(|s| {
            let instances: Vec<&str> = snapshot
                .membership
                .get(&s.name)
                .map(|set| set.iter().map(|i| i.address.as_str()).collect())
                .unwrap_or_default();
            json!({
                "name": s.name,
                "discovery": s.discovery.as_str(),
                "instances": instances,
                "source": statuses.get(&s.name).map_or(Value::Null, |status| status.to_json()),
            })
        })
        .collect();
    axum::Json(json!({
        "file": reloader.path().display().to_string(),
        "version": snapshot.version,
        "loaded_at": time(snapshot.loaded_at),
        "listen": snapshot.config.listen.to_string(),
        "registry": snapshot.config.registry.as_ref().map(|r| json!({
            "etcd": {"endpoints": r.endpoints, "prefix": r.prefix, "cache": r.cache.display().to_string()},
        })),
        "services": services,
        "routes": routes,
        "last_reload": reloader.last_attempt().as_ref().map(attempt_json),
    }))
}

/// `GET /metrics`: state gauges read now, then every family.
async fn metrics(State(reloader): State<Arc<Reloader>>) -> Response {
    let metrics = crate::metrics::Metrics::global();
    let snapshot = reloader.current().load();
    metrics.upstream_healthy.reset();
    metrics.upstream_ejected.reset();
    for upstream in &snapshot.upstreams {
        for instance in &upstream.instances {
            let labels = [upstream.name.as_str(), instance.address.as_str()];
            metrics
                .upstream_healthy
                .with_label_values(&labels)
                .set(i64::from(instance.is_ready()));
            metrics
                .upstream_ejected
                .with_label_values(&labels)
                .set(i64::from(instance.is_ejected()));
        }
    }
    metrics.discovery_up.reset();
    metrics.discovery_data_age.reset();
    for (service, status) in reloader.membership().statuses() {
        let labels = [service.as_str(), status.source.as_str()];
        metrics
            .discovery_up
            .with_label_values(&labels)
            .set(i64::from(status.state == "live"));
        metrics
            .discovery_data_age
            .with_label_values(&labels)
            .set(status.age().map_or(-1, |age| age.as_secs() as i64));
    }
    metrics
        .requests_in_flight
        .set(super::shutdown::in_flight() as i64);
    metrics.config_version.set(snapshot.version as i64);
    let failed = reloader
        .last_attempt()
        .is_some_and(|a| matches!(a.outcome, Outcome::Rejected(_) | Outcome::Failed(_)));
    metrics.config_last_reload_success.set(i64::from(!failed));
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.render(),
    )
        .into_response()
}

async fn stats(State(reloader): State<Arc<Reloader>>) -> axum::Json<Value> {
    axum::Json(json!({
        "in_flight": super::shutdown::in_flight(),
        "version": reloader.current().load().version,
    }))
}

async fn reload(State(reloader): State<Arc<Reloader>>) -> Response {
    match reloader.reload(Trigger::Admin).await {
        Some(outcome) => {
            let status = match outcome {
                Outcome::Applied { .. } | Outcome::Unchanged { .. } => StatusCode::OK,
                Outcome::Rejected(_) => StatusCode::UNPROCESSABLE_ENTITY,
                Outcome::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            (status, axum::Json(outcome_json(&outcome))).into_response()
        }
        None => (StatusCode::OK, axum::Json(json!({"result": "unchanged"}))).into_response(),
    }
}
