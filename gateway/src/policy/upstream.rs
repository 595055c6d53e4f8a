//! One service of one configuration version: its instances, its load
//! balancer, its connection settings and its retry budget.
//!
//! Selection uses Pingora's `LoadBalancer` (round robin or random over the
//! instances) and accepts only instances that our health state has in
//! rotation and that this request has not tried yet. When none is in
//! rotation, `when_all_unhealthy` decides: `fail_fast` (the default) returns
//! `None`, which the caller answers with a 503 at once; `fail_open` picks
//! among all instances as if they were healthy.
//!
//! Retries draw on a [`RetryBudget`]: at most [`RETRY_BUDGET_RATIO`] of the
//! requests plus [`RETRY_BUDGET_PER_SECOND`] a second, so that during an
//! outage retries cannot multiply the load on what is left.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use pingora::lb::LoadBalancer;
use pingora::lb::selection::{Random, RoundRobin};
use pingora::upstreams::peer::HttpPeer;

use crate::config::{AllUnhealthy, LoadBalancing, OutlierSettings, ServiceConfig, Timeouts};
use crate::control::health::InstanceHealth;

enum Balancer {
    RoundRobin(LoadBalancer<RoundRobin>),
    Random(LoadBalancer<Random>),
}

/// Retries may add at most this share of the requests...
pub const RETRY_BUDGET_RATIO: f64 = 0.2;
/// ...plus this many a second, so a quiet service can still retry.
pub const RETRY_BUDGET_PER_SECOND: f64 = 10.0;
/// Tokens saved up at most: a burst of retries after a quiet spell.
const RETRY_BUDGET_CAP: f64 = 100.0;

/// A token bucket for retries. The request path only counts requests (one
/// atomic add); the bucket is refilled and drawn under a lock on the rare
/// retry path.
pub struct RetryBudget {
    requests: AtomicU64,
    bucket: Mutex<(f64, Instant)>,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            requests: AtomicU64::new(0),
            bucket: Mutex::new((RETRY_BUDGET_PER_SECOND, Instant::now())),
        }
    }
}

impl RetryBudget {
    /// Counts one request.
    pub fn deposit(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget, if there is one.
    pub fn withdraw(&self) -> bool {
        let mut bucket = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        let (tokens, last) = &mut *bucket;
        let now = Instant::now();
        let requests = self.requests.swap(0, Ordering::Relaxed) as f64;
        *tokens = (*tokens
            + requests * RETRY_BUDGET_RATIO
            + now.duration_since(*last).as_secs_f64() * RETRY_BUDGET_PER_SECOND)
            .min(RETRY_BUDGET_CAP);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub struct Upstream {
    pub name: String,
    /// In configuration order.
    pub instances: Vec<Arc<InstanceHealth>>,
    balancer: Balancer,
    pub timeouts: Timeouts,
    /// Further attempts after a failed one.
    pub retries: u32,
    pub when_all_unhealthy: AllUnhealthy,
    pub outlier: OutlierSettings,
    pub budget: RetryBudget,
    /// `gateway_retries_total`, `gateway_retry_budget_exhausted_total`.
    pub retry_counters: crate::metrics::RetryCounters,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("instances", &self.instances)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    pub fn new(
        service: &ServiceConfig,
        instances: Vec<Arc<InstanceHealth>>,
    ) -> std::io::Result<Self> {
        let sockets: Vec<SocketAddr> = instances.iter().map(|i| i.socket).collect();
        let balancer = match service.load_balancing {
            LoadBalancing::RoundRobin => {
                Balancer::RoundRobin(LoadBalancer::try_from_iter(sockets)?)
            }
            LoadBalancing::Random => Balancer::Random(LoadBalancer::try_from_iter(sockets)?),
        };
        Ok(Self {
            name: service.name.clone(),
            instances,
            balancer,
            timeouts: service.timeouts,
            retries: service.retries,
            when_all_unhealthy: service.when_all_unhealthy,
            outlier: service.outlier,
            budget: RetryBudget::default(),
            retry_counters: crate::metrics::Metrics::global().retry_counters(&service.name),
        })
    }

    fn instance(&self, socket: SocketAddr) -> Option<&Arc<InstanceHealth>> {
        // A handful of instances: a scan beats hashing.
        self.instances.iter().find(|i| i.socket == socket)
    }

    /// The next instance in rotation that is not in `exclude`; with
    /// `fail_open` and nothing in rotation, the next one not in `exclude`.
    pub fn select(&self, exclude: &[SocketAddr]) -> Option<&Arc<InstanceHealth>> {
        self.pick(exclude, true).or_else(|| {
            (self.when_all_unhealthy == AllUnhealthy::FailOpen && !self.any_ready())
                .then(|| self.pick(exclude, false))
                .flatten()
        })
    }

    /// Whether a request can be sent anywhere now.
    pub fn can_take_requests(&self) -> bool {
        self.any_ready() || self.when_all_unhealthy == AllUnhealthy::FailOpen
    }

    /// Records a proxied request's outcome for passive health.
    pub fn record(&self, instance: &Arc<InstanceHealth>, success: bool) {
        instance.record_passive(success, &self.outlier, || {
            self.instances
                .iter()
                .any(|other| !Arc::ptr_eq(other, instance) && other.is_ready())
        });
    }

    fn pick(&self, exclude: &[SocketAddr], healthy_only: bool) -> Option<&Arc<InstanceHealth>> {
        let accept = |backend: &pingora::lb::Backend, _pingora_health: bool| {
            backend
                .addr
                .as_inet()
                .and_then(|socket| self.instance(*socket))
                .is_some_and(|i| (!healthy_only || i.is_ready()) && !exclude.contains(&i.socket))
        };
        // Other threads advance the shared round-robin counter between our
        // steps, so a few passes may see the same instance twice: allow
        // several, then fall back to a scan so that an acceptable instance
        // is never missed.
        let tries = self.instances.len() * 4;
        let backend = match &self.balancer {
            Balancer::RoundRobin(lb) => lb.select_with(b"", tries, accept),
            Balancer::Random(lb) => lb.select_with(b"", tries, accept),
        };
        match backend.and_then(|b| b.addr.as_inet().copied()) {
            Some(socket) => self.instance(socket),
            None => self
                .instances
                .iter()
                .find(|i| (!healthy_only || i.is_ready()) && !exclude.contains(&i.socket)),
        }
    }

    /// Whether any instance is in rotation.
    pub fn any_ready(&self) -> bool {
        self.instances.iter().any(|i| i.is_ready())
    }

    /// Whether another attempt could go somewhere not in `exclude`.
    pub fn has_other_choice(&self, exclude: &[SocketAddr]) -> bool {
        let fail_open = self.when_all_unhealthy == AllUnhealthy::FailOpen && !self.any_ready();
        self.instances
            .iter()
            .any(|i| (fail_open || i.is_ready()) && !exclude.contains(&i.socket))
    }

    /// The Pingora peer for `instance`, with this service's timeouts (all
    /// set: Pingora's defaults are "wait forever").
    /// `time_left` of the request's total timeout caps the read timeout.
    pub fn peer(&self, instance: &InstanceHealth, time_left: std::time::Duration) -> HttpPeer {
        let mut peer = HttpPeer::new(instance.socket, false, String::new());
        let options = &mut peer.options;
        options.connection_timeout = Some(self.timeouts.connect.min(time_left));
        options.total_connection_timeout = Some(self.timeouts.connect.min(time_left));
        options.read_timeout = Some(self.timeouts.read.min(time_left));
        options.write_timeout = Some(self.timeouts.write);
        options.idle_timeout = Some(self.timeouts.idle);
        peer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HealthSettings, defaults};
    use std::time::Duration;

    fn service(when_all_unhealthy: AllUnhealthy) -> ServiceConfig {
        ServiceConfig {
            name: "svc".into(),
            discovery: gateway_config::DiscoveryKind::Static,
            instances: Vec::new(),
            load_balancing: LoadBalancing::RoundRobin,
            health: HealthSettings {
                path: "/".into(),
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                healthy_threshold: 1,
                unhealthy_threshold: 1,
            },
            timeouts: Timeouts {
                connect: defaults::CONNECT_TIMEOUT,
                read: defaults::READ_TIMEOUT,
                write: defaults::WRITE_TIMEOUT,
                idle: defaults::IDLE_TIMEOUT,
                total: defaults::TOTAL_TIMEOUT,
            },
            retries: 2,
            when_all_unhealthy,
            outlier: OutlierSettings {
                consecutive_failures: 5,
                ejection_time: Duration::from_secs(10),
            },
        }
    }

    fn instance(port: u16, healthy: bool) -> Arc<InstanceHealth> {
        let socket: SocketAddr = ([127, 0, 0, 1], port).into();
        let h = Arc::new(InstanceHealth::new("svc", &socket.to_string(), socket));
        if healthy {
            h.observe(Ok(()), &service(AllUnhealthy::FailFast).health);
        }
        h
    }

    #[test]
    fn round_robin_over_ready_instances_skipping_excluded() {
        let (a, b, c) = (instance(1, true), instance(2, true), instance(3, true));
        let unknown = instance(4, false);
        let up = Upstream::new(
            &service(AllUnhealthy::FailFast),
            vec![a.clone(), b.clone(), c.clone(), unknown],
        )
        .unwrap();
        let mut counts = std::collections::HashMap::new();
        for _ in 0..30 {
            *counts
                .entry(up.select(&[]).unwrap().socket.port())
                .or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 3, "never the unchecked instance: {counts:?}");
        assert!(counts.values().all(|n| *n == 10), "even spread: {counts:?}");
        for _ in 0..10 {
            let picked = up.select(&[a.socket, b.socket]).unwrap();
            assert_eq!(picked.socket, c.socket);
        }
        assert!(up.select(&[a.socket, b.socket, c.socket]).is_none());
        assert!(!up.has_other_choice(&[a.socket, b.socket, c.socket]));
    }

    #[test]
    fn all_unhealthy_fails_fast_or_open_as_configured() {
        let (a, b) = (instance(1, false), instance(2, false));
        let fast =
            Upstream::new(&service(AllUnhealthy::FailFast), vec![a.clone(), b.clone()]).unwrap();
        assert!(fast.select(&[]).is_none());
        assert!(!fast.can_take_requests());
        let open =
            Upstream::new(&service(AllUnhealthy::FailOpen), vec![a.clone(), b.clone()]).unwrap();
        assert!(open.can_take_requests());
        let first = open.select(&[]).unwrap().socket;
        let second = open.select(&[first]).unwrap().socket;
        assert_ne!(first, second);
        assert!(open.select(&[first, second]).is_none());
    }

    #[test]
    fn the_retry_budget_caps_retries_at_a_share_of_requests() {
        let budget = RetryBudget::default();
        // The floor: about RETRY_BUDGET_PER_SECOND retries right away.
        let mut granted = 0;
        while budget.withdraw() {
            granted += 1;
            assert!(granted < 100, "the budget never ran out");
        }
        assert!((10..=11).contains(&granted), "{granted}");
        for _ in 0..100 {
            budget.deposit();
        }
        let mut more = 0;
        while budget.withdraw() {
            more += 1;
        }
        assert!(
            (20..=21).contains(&more),
            "100 requests allow ~20 retries: {more}"
        );
    }
}
