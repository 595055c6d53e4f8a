//! A service's Prometheus metrics, served at `GET /metrics` on its own
//! port: `http_requests_total{service, method, route, code}` (route: the
//! axum route template, `/users/{id}`, or `unmatched`),
//! `http_request_duration_seconds{service, route}`,
//! `db_query_duration_seconds{service, op}`, and the domain counters each
//! service registers here ([`counter`]).

use std::future::Future;
use std::sync::OnceLock;
use std::time::Instant;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

/// Request durations: from 100 µs to 10 s.
const REQUEST_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Database work: from 10 µs (a primary-key read) to 1 s (a busy wait).
const DB_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0,
];

struct Families {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    db: HistogramVec,
}

fn families() -> &'static Families {
    static FAMILIES: OnceLock<Families> = OnceLock::new();
    FAMILIES.get_or_init(|| {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "Requests answered, by route template and status.",
            ),
            &["service", "method", "route", "code"],
        )
        .expect("a valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "Time to answer a request.")
                .buckets(REQUEST_BUCKETS.to_vec()),
            &["service", "route"],
        )
        .expect("a valid metric");
        let db = HistogramVec::new(
            HistogramOpts::new(
                "db_query_duration_seconds",
                "Time of a database operation (a query or a transaction), by operation.",
            )
            .buckets(DB_BUCKETS.to_vec()),
            &["service", "op"],
        )
        .expect("a valid metric");
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(db.clone()),
        ] {
            registry.register(collector).expect("registered once");
        }
        Families {
            registry,
            requests,
            duration,
            db,
        }
    })
}

/// Counts one answered request of `service`.
pub fn record_request(service: &str, method: &str, route: &str, code: u16, seconds: f64) {
    let families = families();
    families
        .requests
        .with_label_values(&[service, method, route, &code.to_string()])
        .inc();
    families
        .duration
        .with_label_values(&[service, route])
        .observe(seconds);
}

/// Runs `work`, timing it as `service`'s database operation `op`.
/// Within a request whose trace is exported, also a span (`db <op>`).
pub async fn timed<F: Future>(service: &str, op: &str, work: F) -> F::Output {
    let timer = DbTimer::start();
    let output = work.await;
    timer.finish(service, op);
    output
}

/// [`timed`] for work that does not wait: a read on the request's thread.
pub fn time<T>(service: &str, op: &str, work: impl FnOnce() -> T) -> T {
    let timer = DbTimer::start();
    let output = work();
    timer.finish(service, op);
    output
}

struct DbTimer {
    span: crate::trace::Child,
    started: Instant,
}

impl DbTimer {
    fn start() -> DbTimer {
        DbTimer {
            span: crate::trace::Child::start(),
            started: Instant::now(),
        }
    }

    fn finish(self, service: &str, op: &str) {
        families()
            .db
            .with_label_values(&[service, op])
            .observe(self.started.elapsed().as_secs_f64());
        if !self.span.exported() {
            return;
        }
        self.span.finish(
            format!("db {op}"),
            telemetry::export::SpanKind::Internal,
            vec![
                telemetry::export::KeyValue::new("db.system", "sqlite"),
                telemetry::export::KeyValue::new("db.operation.name", op.to_owned()),
            ],
            None,
        );
    }
}

/// A domain counter (`orders_placed_total`, ...) in the service's
/// registry; `labels` besides none.
pub fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric");
    if families().registry.register(Box::new(vec.clone())).is_err() {
        tracing::warn!(name, "metric registered twice");
    }
    vec
}

/// The exposition, in Prometheus' text format.
pub fn render() -> String {
    let mut out = Vec::new();
    if let Err(err) = TextEncoder::new().encode(&families().registry.gather(), &mut out) {
        tracing::warn!(error = %err, "metrics could not be rendered");
    }
    String::from_utf8(out).unwrap_or_default()
}
