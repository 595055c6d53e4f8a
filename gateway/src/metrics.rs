//! Prometheus metrics of the gateway, served on the admin listener at
//! `GET /metrics` (never on the public port).
//!
//! The names and labels are a contract (README, `deploy/prometheus/`).
//! Counters on the request path are children resolved once: per route when
//! a configuration version is built ([`RouteMetrics`], with a table of
//! method × status children filled on first use), per instance when its
//! health state is made ([`AttemptCounters`]), per service with its
//! upstream. A request then costs an atomic load and a few atomic adds,
//! no lock and no label hashing. Gauges that describe state (health,
//! connections, the configuration) are read from that state when scraped.

use std::sync::{Arc, OnceLock};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Request durations: from 100 µs (a cached or refused answer) to 10 s.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// How an upstream attempt ended (`gateway_upstream_attempts_total`'s
/// `outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    ConnectError,
    Timeout,
    Reset,
    Http5xx,
}

impl Outcome {
    const ALL: [Outcome; 5] = [
        Outcome::Ok,
        Outcome::ConnectError,
        Outcome::Timeout,
        Outcome::Reset,
        Outcome::Http5xx,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ConnectError => "connect_error",
            Outcome::Timeout => "timeout",
            Outcome::Reset => "reset",
            Outcome::Http5xx => "http_5xx",
        }
    }
}

/// Every metric family of the process.
pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    attempts: IntCounterVec,
    retries: IntCounterVec,
    budget_exhausted: IntCounterVec,
    pub connections_refused: IntCounter,
    reloads: IntCounterVec,
    pub upstream_healthy: IntGaugeVec,
    pub upstream_ejected: IntGaugeVec,
    pub discovery_up: IntGaugeVec,
    pub discovery_data_age: IntGaugeVec,
    pub connections_open: IntGauge,
    pub requests_in_flight: IntGauge,
    pub config_version: IntGauge,
    pub config_last_reload_success: IntGauge,
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric");
    registry
        .register(Box::new(vec.clone()))
        .expect("registered once");
    vec
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let vec = IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid metric");
    registry
        .register(Box::new(vec.clone()))
        .expect("registered once");
    vec
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let gauge = IntGauge::new(name, help).expect("a valid metric");
    registry
        .register(Box::new(gauge.clone()))
        .expect("registered once");
    gauge
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "gateway_request_duration_seconds",
                "Time from a request's header to the end of its answer.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["route", "service"],
        )
        .expect("a valid metric");
        registry
            .register(Box::new(duration.clone()))
            .expect("registered once");
        let build = gauge_vec(
            &registry,
            "gateway_build_info",
            "The gateway's version (always 1).",
            &["version"],
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Metrics {
            requests: counter_vec(
                &registry,
                "gateway_requests_total",
                "Requests answered, by route (its prefix as written), service, method and status.",
                &["route", "service", "method", "code"],
            ),
            duration,
            attempts: counter_vec(
                &registry,
                "gateway_upstream_attempts_total",
                "Attempts to send a request to an instance, by how they ended.",
                &["service", "instance", "outcome"],
            ),
            retries: counter_vec(
                &registry,
                "gateway_retries_total",
                "Attempts after the first, by service.",
                &["service"],
            ),
            budget_exhausted: counter_vec(
                &registry,
                "gateway_retry_budget_exhausted_total",
                "Retries refused because the service's retry budget was spent.",
                &["service"],
            ),
            connections_refused: {
                let counter = IntCounter::new(
                    "gateway_connections_refused_total",
                    "Client connections closed at once: over downstream.max_connections.",
                )
                .expect("a valid metric");
                registry
                    .register(Box::new(counter.clone()))
                    .expect("registered once");
                counter
            },
            reloads: counter_vec(
                &registry,
                "gateway_config_reloads_total",
                "Reload attempts by result.",
                &["result"],
            ),
            upstream_healthy: gauge_vec(
                &registry,
                "gateway_upstream_healthy",
                "1 while the instance is in rotation.",
                &["service", "instance"],
            ),
            upstream_ejected: gauge_vec(
                &registry,
                "gateway_upstream_ejected",
                "1 while the instance is out of rotation after failed requests.",
                &["service", "instance"],
            ),
            discovery_up: gauge_vec(
                &registry,
                "gateway_discovery_up",
                "1 while the service's instance source (static list, etcd) answers; 0 while the last known set is served.",
                &["service", "source"],
            ),
            discovery_data_age: gauge_vec(
                &registry,
                "gateway_discovery_data_age_seconds",
                "How old the service's instance set may be: 0 while its source answers.",
                &["service", "source"],
            ),
            connections_open: gauge(
                &registry,
                "gateway_connections_open",
                "Open client connections.",
            ),
            requests_in_flight: gauge(
                &registry,
                "gateway_requests_in_flight",
                "Requests between their header and the end of their answer.",
            ),
            config_version: gauge(
                &registry,
                "gateway_config_version",
                "The running configuration version (1 at start, one more per published version).",
            ),
            config_last_reload_success: gauge(
                &registry,
                "gateway_config_last_reload_success",
                "0 if the last reload attempt was rejected or failed, else 1.",
            ),
            registry,
        }
    }

    /// The process's metrics.
    pub fn global() -> &'static Metrics {
        static METRICS: OnceLock<Metrics> = OnceLock::new();
        METRICS.get_or_init(Metrics::new)
    }

    /// The exposition, in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %err, "metrics could not be rendered");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// Counts a reload attempt (`applied`, `unchanged`, `rejected`,
    /// `failed`).
    pub fn reload(&self, result: &str) {
        self.reloads.with_label_values(&[result]).inc();
    }

    /// The attempt counters of one instance.
    pub fn attempt_counters(&self, service: &str, instance: &str) -> AttemptCounters {
        AttemptCounters(Outcome::ALL.map(|o| {
            self.attempts
                .with_label_values(&[service, instance, o.as_str()])
        }))
    }

    /// The retry counters of one service.
    pub fn retry_counters(&self, service: &str) -> RetryCounters {
        RetryCounters {
            retries: self.retries.with_label_values(&[service]),
            budget_exhausted: self.budget_exhausted.with_label_values(&[service]),
        }
    }
}

/// One instance's `gateway_upstream_attempts_total` children.
#[derive(Debug, Clone)]
pub struct AttemptCounters([IntCounter; 5]);

impl AttemptCounters {
    pub fn count(&self, outcome: Outcome) {
        let index = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.0[index].inc();
    }
}

/// One service's retry counters.
#[derive(Debug, Clone)]
pub struct RetryCounters {
    pub retries: IntCounter,
    pub budget_exhausted: IntCounter,
}

/// Methods with a column of their own; others share the last.
const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "OTHER",
];
/// Status codes 100 to 599.
const CODES: usize = 500;

/// A route's request metrics, resolved when its version is built.
pub struct RouteMetrics {
    labels: [String; 2],
    duration: Histogram,
    /// `gateway_requests_total` children by method and status, made on
    /// first use (an unused combination is never exported as a zero).
    requests: Box<[OnceLock<IntCounter>]>,
}

impl RouteMetrics {
    pub fn new(route: &str, service: &str) -> Arc<RouteMetrics> {
        let metrics = Metrics::global();
        Arc::new(RouteMetrics {
            duration: metrics.duration.with_label_values(&[route, service]),
            labels: [route.to_owned(), service.to_owned()],
            requests: (0..METHODS.len() * CODES)
                .map(|_| OnceLock::new())
                .collect(),
        })
    }

    /// The metrics of requests that matched no route (`route="-"`,
    /// `service="-"`).
    pub fn unrouted() -> &'static Arc<RouteMetrics> {
        static UNROUTED: OnceLock<Arc<RouteMetrics>> = OnceLock::new();
        UNROUTED.get_or_init(|| RouteMetrics::new("-", "-"))
    }

    /// Counts one answered request.
    pub fn record(&self, method: &http::Method, status: u16, seconds: f64) {
        self.duration.observe(seconds);
        let column = METHODS
            .iter()
            .position(|m| *m == method.as_str())
            .unwrap_or(METHODS.len() - 1);
        let code = usize::from(status.clamp(100, 599)) - 100;
        let child = self.requests[column * CODES + code].get_or_init(|| {
            let code = status.clamp(100, 599).to_string();
            Metrics::global().requests.with_label_values(&[
                &self.labels[0],
                &self.labels[1],
                METHODS[column],
                &code,
            ])
        });
        child.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find(|line| line.starts_with(series))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn a_route_counts_by_method_and_status_and_times_its_requests() {
        let route = RouteMetrics::new("/api/test-metrics", "svc");
        route.record(&http::Method::GET, 200, 0.002);
        route.record(&http::Method::GET, 200, 0.004);
        route.record(&http::Method::from_bytes(b"PROPFIND").unwrap(), 404, 0.0001);
        let text = Metrics::global().render();
        assert_eq!(
            value(
                &text,
                r#"gateway_requests_total{code="200",method="GET",route="/api/test-metrics",service="svc"}"#
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                r#"gateway_requests_total{code="404",method="OTHER",route="/api/test-metrics",service="svc"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                r#"gateway_request_duration_seconds_count{route="/api/test-metrics",service="svc"}"#
            ),
            Some(3.0)
        );
        assert!(
            !text.contains(r#"code="201",method="GET",route="/api/test-metrics""#),
            "no zero series"
        );
        assert!(text.contains("gateway_build_info{version="));
    }
}
