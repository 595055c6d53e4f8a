//! Active health checks: one prober per (service, instance), and the health
//! state the request path reads.
//!
//! State machine per instance (as Envoy does it):
//! - `Unknown` (new, never checked): out of rotation. The first check
//!   decides at once: success → `Healthy`, failure → `Unhealthy`.
//! - `Healthy` → `Unhealthy` after `unhealthy_threshold` consecutive
//!   failures; `Unhealthy` → `Healthy` after `healthy_threshold`
//!   consecutive successes.
//!
//! So a new instance, at start-up or added by a reload, takes traffic only
//! after it has answered a check. Pingora's own `LoadBalancer` health is not
//! used for this: it starts every backend as healthy, cannot change its
//! check settings once set, and does not expose per-instance state for
//! `/services`.
//!
//! Passive health (outlier ejection): the proxy reports every request's
//! outcome ([`InstanceHealth::record_passive`]); `consecutive_failures`
//! connection errors or 5xx answers in a row take the instance out of
//! rotation at once, without waiting for a probe, unless it is the last one
//! in rotation (ejecting it would turn its errors into 503s and hide them).
//! An ejected instance stays out for `ejection_time` whatever the probes
//! say; after that, `healthy_threshold` successful probes bring it back.
//!
//! The [`HealthRegistry`] lives for the whole process, across config
//! versions: an instance kept by a reload keeps its state and its prober
//! (whose settings are updated in place); a removed one has its prober
//! stopped. Probers run on the gateway's control runtime, never on the
//! request path. A probe is an HTTP GET through Pingora's
//! [`HttpHealthCheck`], expecting any 2xx within the timeout.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use pingora::lb::Backend;
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck};
use pingora::prelude::RequestHeader;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::discovery::Instance;
use crate::config::{HealthSettings, OutlierSettings};

/// What the last checks concluded about an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Never checked yet: not in rotation.
    Unknown,
    Healthy,
    Unhealthy,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Unknown => "unknown",
            Status::Healthy => "healthy",
            Status::Unhealthy => "unhealthy",
        }
    }
}

/// A point-in-time view of one instance's health, for endpoints and logs.
#[derive(Debug, Clone)]
pub struct HealthView {
    pub status: Status,
    pub last_error: Option<String>,
    pub last_change: Option<SystemTime>,
}

#[derive(Debug)]
struct Observations {
    status: Status,
    consecutive_successes: u32,
    consecutive_failures: u32,
    last_error: Option<String>,
    last_change: Option<SystemTime>,
    /// Passively ejected until then: probe successes do not count before.
    ejected_until: Option<std::time::Instant>,
}

/// Health of one instance of one service, shared by every config version
/// that lists it.
#[derive(Debug)]
pub struct InstanceHealth {
    pub service: String,
    pub address: String,
    pub socket: SocketAddr,
    /// Read on every request: a single atomic load.
    in_rotation: AtomicBool,
    /// Failed proxied requests in a row (connection errors, 5xx).
    passive_failures: AtomicU32,
    /// `gateway_upstream_attempts_total` for this instance.
    pub attempts: crate::metrics::AttemptCounters,
    observations: Mutex<Observations>,
}

impl InstanceHealth {
    pub fn new(service: &str, address: &str, socket: SocketAddr) -> Self {
        Self {
            service: service.to_owned(),
            address: address.to_owned(),
            socket,
            in_rotation: AtomicBool::new(false),
            passive_failures: AtomicU32::new(0),
            attempts: crate::metrics::Metrics::global().attempt_counters(service, address),
            observations: Mutex::new(Observations {
                status: Status::Unknown,
                consecutive_successes: 0,
                consecutive_failures: 0,
                last_error: None,
                last_change: None,
                ejected_until: None,
            }),
        }
    }

    /// Whether the instance may take new requests.
    pub fn is_ready(&self) -> bool {
        self.in_rotation.load(Ordering::Relaxed)
    }

    pub fn view(&self) -> HealthView {
        let o = self.lock();
        HealthView {
            status: o.status,
            last_error: o.last_error.clone(),
            last_change: o.last_change,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Observations> {
        self.observations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records one check result; logs and returns the new status if it
    /// changed.
    pub fn observe(&self, result: Result<(), String>, settings: &HealthSettings) -> Option<Status> {
        let mut o = self.lock();
        let before = o.status;
        if let Some(until) = o.ejected_until {
            if std::time::Instant::now() < until {
                // Ejected: probes cannot bring it back yet.
                o.consecutive_successes = 0;
                return None;
            }
            o.ejected_until = None;
        }
        match &result {
            Ok(()) => {
                o.consecutive_successes = o.consecutive_successes.saturating_add(1);
                o.consecutive_failures = 0;
            }
            Err(err) => {
                o.consecutive_failures = o.consecutive_failures.saturating_add(1);
                o.consecutive_successes = 0;
                o.last_error = Some(err.clone());
            }
        }
        let after = match (before, result.is_ok()) {
            (Status::Unknown, true) => Status::Healthy,
            (Status::Unknown, false) => Status::Unhealthy,
            (Status::Unhealthy, true) if o.consecutive_successes >= settings.healthy_threshold => {
                Status::Healthy
            }
            (Status::Healthy, false) if o.consecutive_failures >= settings.unhealthy_threshold => {
                Status::Unhealthy
            }
            (unchanged, _) => unchanged,
        };
        if after == before {
            return None;
        }
        o.status = after;
        o.last_change = Some(SystemTime::now());
        if after == Status::Healthy {
            o.last_error = None;
        }
        self.in_rotation
            .store(after == Status::Healthy, Ordering::Relaxed);
        match (&result, after) {
            (Ok(()), _) => tracing::info!(
                service = %self.service, instance = %self.address,
                from = before.as_str(), "instance is healthy: in rotation"
            ),
            (Err(err), _) => tracing::warn!(
                service = %self.service, instance = %self.address,
                from = before.as_str(), error = %err, "instance is unhealthy: out of rotation"
            ),
        }
        Some(after)
    }
}

impl InstanceHealth {
    /// Whether it was ejected by failed requests (and not yet re-admitted).
    pub fn is_ejected(&self) -> bool {
        self.lock()
            .ejected_until
            .is_some_and(|until| std::time::Instant::now() < until)
    }

    /// Records the outcome of one proxied request: `success` is false for a
    /// connection error or a 5xx answer. Ejects the instance after
    /// `outlier.consecutive_failures` failures in a row, if `may_eject`
    /// agrees (another instance is in rotation). Returns true if it ejected.
    pub fn record_passive(
        &self,
        success: bool,
        outlier: &OutlierSettings,
        may_eject: impl FnOnce() -> bool,
    ) -> bool {
        if success {
            // Read first: the common case writes nothing, so the cache line
            // stays shared between threads.
            if self.passive_failures.load(Ordering::Relaxed) != 0 {
                self.passive_failures.store(0, Ordering::Relaxed);
            }
            return false;
        }
        let failures = self.passive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if outlier.consecutive_failures == 0
            || failures < outlier.consecutive_failures
            || !self.is_ready()
            || !may_eject()
        {
            return false;
        }
        let mut o = self.lock();
        o.status = Status::Unhealthy;
        o.consecutive_successes = 0;
        o.ejected_until = Some(std::time::Instant::now() + outlier.ejection_time);
        o.last_error = Some(format!("ejected after {failures} failed requests in a row"));
        o.last_change = Some(SystemTime::now());
        self.in_rotation.store(false, Ordering::Relaxed);
        self.passive_failures.store(0, Ordering::Relaxed);
        tracing::warn!(
            service = %self.service, instance = %self.address, failures,
            ejection = ?outlier.ejection_time, "instance ejected: out of rotation"
        );
        true
    }
}

/// (service name, instance socket address).
pub type Key = (String, SocketAddr);

struct Prober {
    health: Arc<InstanceHealth>,
    settings: watch::Sender<HealthSettings>,
    task: JoinHandle<()>,
}

/// All probers of the process, keyed by (service, instance address).
pub struct HealthRegistry {
    runtime: Handle,
    probers: Mutex<HashMap<Key, Prober>>,
}

impl HealthRegistry {
    /// Probers will run on `runtime`.
    pub fn new(runtime: Handle) -> Self {
        Self {
            runtime,
            probers: Mutex::new(HashMap::new()),
        }
    }

    /// Makes the probers match `wanted` (service name, its instances, its
    /// health settings): starts probers for new instances (first check
    /// immediately), updates the settings of kept ones (their state is
    /// kept), stops the ones no longer listed. Returns the health handle of
    /// every wanted instance.
    pub fn reconcile(
        &self,
        wanted: &[(&str, &[Instance], &HealthSettings)],
    ) -> HashMap<Key, Arc<InstanceHealth>> {
        let mut probers = self.probers.lock().unwrap_or_else(PoisonError::into_inner);
        let mut handles = HashMap::new();
        for (service, instances, settings) in wanted {
            for instance in *instances {
                let key = ((*service).to_owned(), instance.socket);
                let health = match probers.get(&key) {
                    Some(prober) => {
                        prober.settings.send_if_modified(|current| {
                            let changed = current != *settings;
                            if changed {
                                *current = (*settings).clone();
                            }
                            changed
                        });
                        Arc::clone(&prober.health)
                    }
                    None => {
                        let health = Arc::new(InstanceHealth::new(
                            service,
                            &instance.address,
                            instance.socket,
                        ));
                        let (sender, receiver) = watch::channel((*settings).clone());
                        let task = self
                            .runtime
                            .spawn(probe_loop(Arc::clone(&health), receiver));
                        probers.insert(
                            key.clone(),
                            Prober {
                                health: Arc::clone(&health),
                                settings: sender,
                                task,
                            },
                        );
                        health
                    }
                };
                handles.insert(key, health);
            }
        }
        probers.retain(|key, prober| {
            let keep = handles.contains_key(key);
            if !keep {
                prober.task.abort();
                tracing::info!(service = %key.0, instance = %prober.health.address, "instance removed: health checks stopped");
            }
            keep
        });
        handles
    }

    /// Waits until every instance has been checked at least once, or until
    /// `limit`. Used at start-up so the first requests do not meet an
    /// empty rotation.
    pub async fn first_checks_done(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let pending = self
                .probers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .any(|p| p.health.view().status == Status::Unknown);
            if !pending || tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for HealthRegistry {
    fn drop(&mut self) {
        let probers = self
            .probers
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for prober in probers.values() {
            prober.task.abort();
        }
    }
}

/// Builds Pingora's HTTP probe for `settings`.
fn http_check(
    health: &InstanceHealth,
    settings: &HealthSettings,
) -> Result<HttpHealthCheck, String> {
    let mut check = HttpHealthCheck::new(&health.address, false);
    let mut request = RequestHeader::build("GET", settings.path.as_bytes(), None)
        .map_err(|err| format!("bad health check path: {err}"))?;
    request
        .insert_header("host", health.address.as_str())
        .and_then(|()| request.insert_header("user-agent", "gateway-health-check"))
        .map_err(|err| format!("bad health check header: {err}"))?;
    check.req = request;
    check.peer_template.options.connection_timeout = Some(settings.timeout);
    check.peer_template.options.read_timeout = Some(settings.timeout);
    check.peer_template.options.write_timeout = Some(settings.timeout);
    check.validator = Some(Box::new(|response| {
        if response.status.is_success() {
            Ok(())
        } else {
            pingora::Error::e_explain(
                pingora::ErrorType::HTTPStatus(response.status.as_u16()),
                "health check expects a 2xx answer",
            )
        }
    }));
    Ok(check)
}

async fn probe_loop(health: Arc<InstanceHealth>, mut settings_rx: watch::Receiver<HealthSettings>) {
    let backend = Backend {
        addr: pingora::protocols::l4::socket::SocketAddr::Inet(health.socket),
        weight: 1,
        ext: Default::default(),
    };
    loop {
        let settings = settings_rx.borrow_and_update().clone();
        let check = match http_check(&health, &settings) {
            Ok(check) => check,
            Err(err) => {
                health.observe(Err(err), &settings);
                if settings_rx.changed().await.is_err() {
                    return;
                }
                continue;
            }
        };
        loop {
            let result = match tokio::time::timeout(settings.timeout, check.check(&backend)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(err)) => Err(describe(&err)),
                Err(_) => Err(format!("no answer within {:?}", settings.timeout)),
            };
            health.observe(result, &settings);
            tokio::select! {
                () = tokio::time::sleep(settings.interval) => {}
                changed = settings_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break; // rebuild the probe with the new settings
                }
            }
        }
    }
}

/// A probe failure in a few words: "connection refused", "HTTP 500", ...
fn describe(err: &pingora::Error) -> String {
    match err.etype() {
        pingora::ErrorType::HTTPStatus(code) => format!("answered HTTP {code}"),
        other => match &err.cause {
            Some(_) => format!("{}: {}", other.as_str(), err.root_cause()),
            None => other.as_str().to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(healthy: u32, unhealthy: u32) -> HealthSettings {
        HealthSettings {
            path: "/health".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(100),
            healthy_threshold: healthy,
            unhealthy_threshold: unhealthy,
        }
    }

    #[test]
    fn thresholds_and_the_first_check() {
        let s = settings(2, 3);
        let h = InstanceHealth::new("svc", "127.0.0.1:1", "127.0.0.1:1".parse().unwrap());
        assert!(!h.is_ready(), "unknown is out of rotation");
        assert_eq!(
            h.observe(Ok(()), &s),
            Some(Status::Healthy),
            "first success admits at once"
        );
        assert!(h.is_ready());
        assert_eq!(h.observe(Err("x".into()), &s), None);
        assert_eq!(h.observe(Err("x".into()), &s), None);
        assert_eq!(
            h.observe(Ok(()), &s),
            None,
            "a success resets the failure count"
        );
        for _ in 0..2 {
            assert_eq!(h.observe(Err("x".into()), &s), None);
        }
        assert_eq!(h.observe(Err("boom".into()), &s), Some(Status::Unhealthy));
        assert!(!h.is_ready());
        assert_eq!(h.view().last_error.as_deref(), Some("boom"));
        assert_eq!(h.observe(Ok(()), &s), None);
        assert_eq!(h.observe(Ok(()), &s), Some(Status::Healthy));
        assert!(h.is_ready());

        let h = InstanceHealth::new("svc", "127.0.0.1:1", "127.0.0.1:1".parse().unwrap());
        assert_eq!(
            h.observe(Err("down".into()), &s),
            Some(Status::Unhealthy),
            "first failure ejects at once"
        );
        assert_eq!(
            h.observe(Ok(()), &s),
            None,
            "then it needs healthy_threshold successes"
        );
    }

    #[test]
    fn passive_failures_eject_and_hold_out_for_the_ejection_time() {
        let s = settings(1, 1);
        let outlier = OutlierSettings {
            consecutive_failures: 3,
            ejection_time: Duration::from_millis(200),
        };
        let h = InstanceHealth::new("svc", "127.0.0.1:1", "127.0.0.1:1".parse().unwrap());
        h.observe(Ok(()), &s);
        assert!(!h.record_passive(false, &outlier, || true));
        assert!(
            !h.record_passive(true, &outlier, || true),
            "a success resets the count"
        );
        assert!(!h.record_passive(false, &outlier, || true));
        assert!(!h.record_passive(false, &outlier, || true));
        assert!(
            !h.record_passive(false, &outlier, || false),
            "never the last instance"
        );
        assert!(h.is_ready());
        assert!(h.record_passive(false, &outlier, || true));
        assert!(!h.is_ready());
        assert_eq!(
            h.observe(Ok(()), &s),
            None,
            "probes do not count while ejected"
        );
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(h.observe(Ok(()), &s), Some(Status::Healthy));
        assert!(h.is_ready());
    }
}
