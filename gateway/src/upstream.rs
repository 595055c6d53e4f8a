//! One service of one configuration version: its instances, its load
//! balancer and its connection settings.
//!
//! Selection uses Pingora's `LoadBalancer` (round robin or random over the
//! instances) and accepts only instances that our health state has in
//! rotation and that this request has not tried yet. `None` means no
//! instance can take the request: the caller answers 503 at once, it never
//! waits.

use std::net::SocketAddr;
use std::sync::Arc;

use pingora::lb::LoadBalancer;
use pingora::lb::selection::{Random, RoundRobin};
use pingora::upstreams::peer::HttpPeer;

use crate::config::{LoadBalancing, Timeouts};
use crate::health::InstanceHealth;

enum Balancer {
    RoundRobin(LoadBalancer<RoundRobin>),
    Random(LoadBalancer<Random>),
}

pub struct Upstream {
    pub name: String,
    /// In configuration order.
    pub instances: Vec<Arc<InstanceHealth>>,
    balancer: Balancer,
    pub timeouts: Timeouts,
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
        name: &str,
        instances: Vec<Arc<InstanceHealth>>,
        load_balancing: LoadBalancing,
        timeouts: Timeouts,
    ) -> std::io::Result<Self> {
        let sockets: Vec<SocketAddr> = instances.iter().map(|i| i.socket).collect();
        let balancer = match load_balancing {
            LoadBalancing::RoundRobin => {
                Balancer::RoundRobin(LoadBalancer::try_from_iter(sockets)?)
            }
            LoadBalancing::Random => Balancer::Random(LoadBalancer::try_from_iter(sockets)?),
        };
        Ok(Self {
            name: name.to_owned(),
            instances,
            balancer,
            timeouts,
        })
    }

    fn instance(&self, socket: SocketAddr) -> Option<&Arc<InstanceHealth>> {
        // A handful of instances: a scan beats hashing.
        self.instances.iter().find(|i| i.socket == socket)
    }

    /// The next instance in rotation that is not in `exclude`.
    pub fn select(&self, exclude: &[SocketAddr]) -> Option<&Arc<InstanceHealth>> {
        let accept = |backend: &pingora::lb::Backend, _pingora_health: bool| {
            backend
                .addr
                .as_inet()
                .and_then(|socket| self.instance(*socket))
                .is_some_and(|i| i.is_ready() && !exclude.contains(&i.socket))
        };
        let tries = self.instances.len();
        let backend = match &self.balancer {
            Balancer::RoundRobin(lb) => lb.select_with(b"", tries, accept),
            Balancer::Random(lb) => lb.select_with(b"", tries * 4, accept),
        }?;
        self.instance(*backend.addr.as_inet()?)
    }

    /// Whether any instance is in rotation.
    pub fn any_ready(&self) -> bool {
        self.instances.iter().any(|i| i.is_ready())
    }

    /// Whether any instance other than those in `exclude` is in rotation.
    pub fn has_other_ready(&self, exclude: &[SocketAddr]) -> bool {
        self.instances
            .iter()
            .any(|i| i.is_ready() && !exclude.contains(&i.socket))
    }

    /// The Pingora peer for `instance`, with this service's timeouts (all
    /// set: Pingora's defaults are "wait forever").
    pub fn peer(&self, instance: &InstanceHealth) -> Box<HttpPeer> {
        let mut peer = HttpPeer::new(instance.socket, false, String::new());
        let options = &mut peer.options;
        options.connection_timeout = Some(self.timeouts.connect);
        options.total_connection_timeout = Some(self.timeouts.connect);
        options.read_timeout = Some(self.timeouts.read);
        options.write_timeout = Some(self.timeouts.write);
        options.idle_timeout = Some(self.timeouts.idle);
        Box::new(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HealthSettings, defaults};
    use std::time::Duration;

    fn timeouts() -> Timeouts {
        Timeouts {
            connect: defaults::CONNECT_TIMEOUT,
            read: defaults::READ_TIMEOUT,
            write: defaults::WRITE_TIMEOUT,
            idle: defaults::IDLE_TIMEOUT,
        }
    }

    fn healthy(port: u16) -> Arc<InstanceHealth> {
        let socket: SocketAddr = ([127, 0, 0, 1], port).into();
        let h = Arc::new(InstanceHealth::new("svc", &socket.to_string(), socket));
        let settings = HealthSettings {
            path: "/".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: 1,
            unhealthy_threshold: 1,
        };
        h.observe(Ok(()), &settings);
        h
    }

    #[test]
    fn round_robin_over_ready_instances_skipping_excluded() {
        let (a, b, c) = (healthy(1), healthy(2), healthy(3));
        let unknown = Arc::new(InstanceHealth::new(
            "svc",
            "127.0.0.1:4",
            ([127, 0, 0, 1], 4).into(),
        ));
        let up = Upstream::new(
            "svc",
            vec![a.clone(), b.clone(), c.clone(), unknown],
            LoadBalancing::RoundRobin,
            timeouts(),
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
        assert!(!up.has_other_ready(&[a.socket, b.socket, c.socket]));
    }
}
