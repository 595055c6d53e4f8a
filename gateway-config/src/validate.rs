//! From the file as written ([`super::raw`]) to a [`super::Config`]: every
//! check, every default, every error with its place. Never stops at the
//! first problem.

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::ApiDocs;

use ipnet::IpNet;

use serde_saphyr::Spanned;

use super::raw::{
    AllUnhealthy, HumanDuration, LoadBalancing, RawApiDocs, RawConfig, RawHealthCheck, RawRegistry,
    RawRoute, RawService, RawTimeouts,
};
use super::{
    Config, ConfigError, CustomPlugins, DiscoveryKind, Downstream, HealthSettings, OutlierSettings,
    RegistryConfig, RouteConfig, Secret, ServiceConfig, Timeouts, defaults,
};

/// Paths the gateway answers itself; a route may not take them.
pub const RESERVED_PATHS: &[&str] = &["/health", "/services"];

/// Collects problems, each at the place of a `Spanned` value.
#[derive(Default)]
pub(crate) struct Problems(Vec<ConfigError>);

impl Problems {
    pub(crate) fn at<T>(&mut self, place: &Spanned<T>, message: impl Into<String>) {
        self.0.push(ConfigError {
            line: place.referenced.line(),
            column: place.referenced.column(),
            message: message.into(),
        });
    }
}

pub(super) fn validate(
    raw: RawConfig,
    custom: &dyn CustomPlugins,
    base_dir: &Path,
) -> Result<Config, Vec<ConfigError>> {
    let mut problems = Problems::default();

    let listen = socket_addr(&raw.listen, "listen", &mut problems);
    let (admin_listen, admin_token) = admin(&raw, listen, base_dir, &mut problems);
    let trusted_proxies = raw
        .trusted_proxies
        .iter()
        .flatten()
        .filter_map(|entry| match cidr(&entry.value) {
            Ok(net) => Some(net),
            Err(why) => {
                problems.at(entry, format!("trusted_proxies: {why}"));
                None
            }
        })
        .collect();
    let threads = match &raw.threads {
        Some(threads) if threads.value == 0 => {
            problems.at(threads, "threads must be at least 1");
            1
        }
        Some(threads) => threads.value,
        None => std::thread::available_parallelism().map_or(1, usize::from),
    };
    let work_stealing = raw.work_stealing.unwrap_or(false);
    let worker_cpu_affinity = match &raw.worker_cpu_affinity {
        Some(pin) if pin.value && work_stealing => {
            problems.at(
                pin,
                "worker_cpu_affinity needs share-nothing workers (work_stealing: false)",
            );
            false
        }
        Some(pin) => pin.value,
        None => false,
    };

    let downstream = downstream(&raw, &mut problems);
    let shutdown_grace = match &raw.shutdown_grace {
        Some(grace) if grace.value.0.subsec_nanos() != 0 => {
            problems.at(grace, "shutdown_grace must be whole seconds");
            grace.value.0
        }
        Some(grace) => grace.value.0,
        None => defaults::SHUTDOWN_GRACE,
    };
    let dns_refresh = match &raw.dns_refresh {
        Some(refresh) if refresh.value.0.is_zero() => {
            problems.at(refresh, "dns_refresh must be greater than zero");
            refresh.value.0
        }
        Some(refresh) => refresh.value.0,
        None => defaults::DNS_REFRESH,
    };
    let api_docs = api_docs(raw.api_docs.as_ref(), &mut problems);
    let reserved: Vec<&str> = RESERVED_PATHS
        .iter()
        .copied()
        .chain(
            api_docs
                .iter()
                .flat_map(|docs| [docs.path.as_str(), docs.docs_path.as_str()]),
        )
        .collect();
    let registry = registry(raw.registry.as_ref(), base_dir, &mut problems);
    let base_health = health_settings(&raw.health_check, None, &mut problems);
    if raw.services.value.is_empty() {
        problems.at(&raw.services, "at least one service is required");
    }
    let services: Vec<ServiceConfig> = raw
        .services
        .value
        .iter()
        .map(|(name, service)| {
            service_config(
                name,
                service,
                &base_health,
                raw.registry.is_some(),
                &raw.services,
                &mut problems,
            )
        })
        .collect();
    let routes = routes(
        &raw.routes.value,
        &raw.services.value,
        custom,
        base_dir,
        &reserved,
        &mut problems,
    );

    if !problems.0.is_empty() {
        problems.0.sort_by_key(|e| (e.line, e.column));
        return Err(problems.0);
    }
    Ok(Config {
        listen: listen.unwrap_or_else(unreachable_default),
        admin_listen,
        admin_token,
        trusted_proxies,
        threads,
        work_stealing,
        worker_cpu_affinity,
        preserve_header_case: raw.preserve_header_case.unwrap_or(false),
        downstream,
        shutdown_grace,
        dns_refresh,
        metrics: raw.metrics.unwrap_or(true),
        api_docs,
        registry,
        services,
        routes,
    })
}

/// `registry.etcd`: its endpoints, prefix and cache file.
fn registry(
    raw: Option<&Spanned<RawRegistry>>,
    base_dir: &Path,
    problems: &mut Problems,
) -> Option<RegistryConfig> {
    let etcd = &raw?.value.etcd;
    let mut endpoints = Vec::new();
    if etcd.value.endpoints.value.is_empty() {
        problems.at(
            &etcd.value.endpoints,
            "registry.etcd.endpoints: at least one endpoint is required",
        );
    }
    for endpoint in &etcd.value.endpoints.value {
        let text = endpoint.value.trim();
        let address = text.strip_prefix("http://").unwrap_or(text);
        match host_port(address) {
            Ok(()) => endpoints.push(format!("http://{address}")),
            Err(why) => problems.at(
                endpoint,
                format!(
                    "registry.etcd.endpoints: {text:?}: {why} (TLS endpoints are not supported)"
                ),
            ),
        }
    }
    let prefix = match &etcd.value.prefix {
        Some(prefix)
            if !prefix.value.starts_with('/') || prefix.value.trim_end_matches('/').is_empty() =>
        {
            problems.at(
                prefix,
                format!(
                    "registry.etcd.prefix {:?} must be a key path like /gateway/services",
                    prefix.value
                ),
            );
            defaults::REGISTRY_PREFIX.to_owned()
        }
        Some(prefix) => prefix.value.trim_end_matches('/').to_owned(),
        None => defaults::REGISTRY_PREFIX.to_owned(),
    };
    let cache = match &etcd.value.cache {
        Some(cache) if cache.value.trim().is_empty() => {
            problems.at(cache, "registry.etcd.cache must be a file path");
            PathBuf::new()
        }
        Some(cache) => base_dir.join(&cache.value),
        None => base_dir.join(defaults::REGISTRY_CACHE),
    };
    Some(RegistryConfig {
        endpoints,
        prefix,
        cache,
    })
}

/// `api_docs`, on unless `enabled: false`.
fn api_docs(raw: Option<&Spanned<RawApiDocs>>, problems: &mut Problems) -> Option<ApiDocs> {
    let default = RawApiDocs::default();
    let docs = raw.map_or(&default, |r| &r.value);
    if docs.enabled == Some(false) {
        return None;
    }
    let mut path = |value: &Option<Spanned<String>>, default: &str, what: &str| match value {
        Some(path) => {
            let text = &path.value;
            if !text.starts_with('/')
                || text.len() < 2
                || text.ends_with('/')
                || text.contains(['?', '#', ' '])
            {
                problems.at(
                    path,
                    format!("api_docs.{what} {text:?} must be a path like {default}"),
                );
            } else if RESERVED_PATHS.contains(&text.as_str()) {
                problems.at(
                    path,
                    format!("api_docs.{what} {text:?} is taken by the gateway"),
                );
            }
            text.clone()
        }
        None => default.to_owned(),
    };
    let docs_path = path(&docs.docs_path, defaults::API_DOCS_PAGE, "docs_path");
    let document = path(&docs.path, defaults::API_DOCS_PATH, "path");
    let source = path(&docs.source, defaults::API_DOCS_SOURCE, "source");
    if segment_prefix_of(&docs_path, &document)
        && let Some(place) = docs.path.as_ref().or(docs.docs_path.as_ref())
    {
        problems.at(place, "api_docs.path must not be under api_docs.docs_path");
    }
    let refresh = match &docs.refresh {
        Some(refresh) if refresh.value.0 < Duration::from_secs(1) => {
            problems.at(refresh, "api_docs.refresh must be at least 1s");
            refresh.value.0
        }
        Some(refresh) => refresh.value.0,
        None => defaults::API_DOCS_REFRESH,
    };
    Some(ApiDocs {
        path: document,
        docs_path,
        source,
        refresh,
    })
}

fn downstream(raw: &RawConfig, problems: &mut Problems) -> Downstream {
    let d = &raw.downstream;
    let header_timeout = match &d.header_timeout {
        Some(t) if t.value.0.is_zero() => {
            problems.at(t, "downstream.header_timeout must be greater than zero");
            t.value.0
        }
        Some(t) => t.value.0,
        None => defaults::HEADER_TIMEOUT,
    };
    let max_header_size = match &d.max_header_size {
        Some(s) if !(1024..=1_048_575).contains(&s.value.0) => {
            problems.at(
                s,
                "downstream.max_header_size must be between 1KiB and 1MiB - 1",
            );
            s.value.0
        }
        Some(s) => s.value.0,
        None => defaults::MAX_HEADER_SIZE,
    };
    let max_connections = match &d.max_connections {
        Some(n) if n.value == 0 => {
            problems.at(n, "downstream.max_connections must be at least 1");
            1
        }
        Some(n) => n.value,
        None => defaults::MAX_CONNECTIONS,
    };
    Downstream {
        header_timeout,
        max_header_size,
        max_connections,
    }
}

/// The admin listener's address and token, from `admin` or `admin_listen`.
/// A listener reachable from other hosts needs a token.
fn admin(
    raw: &RawConfig,
    listen: Option<SocketAddr>,
    base_dir: &Path,
    problems: &mut Problems,
) -> (Option<SocketAddr>, Option<Secret>) {
    let (address, token) = match (&raw.admin, &raw.admin_listen) {
        (Some(admin), Some(short)) => {
            problems.at(short, "use admin.listen or admin_listen, not both");
            (
                socket_addr(&admin.value.listen, "admin.listen", problems),
                None,
            )
        }
        (Some(admin), None) => {
            let address = socket_addr(&admin.value.listen, "admin.listen", problems);
            let token = admin.value.token_file.as_ref().and_then(|file| {
                match read_secret_file(base_dir, &file.value) {
                    Ok(token) => Some(token),
                    Err(why) => {
                        problems.at(file, format!("admin.token_file: {why}"));
                        None
                    }
                }
            });
            (address, token)
        }
        (None, Some(short)) => (socket_addr(short, "admin_listen", problems), None),
        (None, None) => (None, None),
    };
    let Some(address) = address else {
        return (None, token);
    };
    let place: &Spanned<String> = match (&raw.admin, &raw.admin_listen) {
        (Some(admin), _) => &admin.value.listen,
        (None, Some(short)) => short,
        (None, None) => return (Some(address), token),
    };
    if listen == Some(address) {
        problems.at(place, "the admin listener must differ from listen");
    }
    let has_token = raw
        .admin
        .as_ref()
        .is_some_and(|admin| admin.value.token_file.is_some());
    if !address.ip().is_loopback() && !has_token {
        problems.at(
            place,
            format!(
                "admin listener {address} is reachable from other hosts: set admin.token_file \
                 (or listen on 127.0.0.1)"
            ),
        );
    }
    (Some(address), token)
}

/// `text` as a network (`10.0.0.0/8`) or one address (`192.0.2.7`).
pub(crate) fn cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{text:?} is not an address or a CIDR (e.g. 10.0.0.0/8)"))
}

/// The path `file` names, relative to the configuration's directory.
pub(crate) fn beside(base_dir: &Path, file: &str) -> PathBuf {
    base_dir.join(file)
}

/// A secret kept in a file (trimmed; must not be empty).
fn read_secret_file(base_dir: &Path, file: &str) -> Result<Secret, String> {
    let path = beside(base_dir, file);
    let text = std::fs::read_to_string(&path)
        .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(Secret::new(token))
}

/// Only reached if an error was recorded, which returns early; keeps the
/// happy path free of `unwrap`.
fn unreachable_default() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn socket_addr(value: &Spanned<String>, what: &str, problems: &mut Problems) -> Option<SocketAddr> {
    match resolve(&value.value) {
        Ok(addr) => Some(addr),
        Err(why) => {
            problems.at(value, format!("{what} {:?}: {why}", value.value));
            None
        }
    }
}

/// Checks the form `ip:port`, `[ipv6]:port` or `host:port`, without DNS.
pub fn host_port(text: &str) -> Result<(), String> {
    if text.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err("expected host:port".to_owned());
    };
    if port.parse::<u16>().is_err() {
        return Err("expected host:port with a port from 0 to 65535".to_owned());
    }
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if !host_ok {
        return Err(
            "expected host:port (a host name of letters, digits, '-', '_' and '.')".to_owned(),
        );
    }
    Ok(())
}

/// `ip:port` or `host:port` (resolved now, first address wins).
fn resolve(text: &str) -> Result<SocketAddr, String> {
    host_port(text)?;
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let host = text.rsplit_once(':').map_or(text, |(host, _)| host);
    let mut addrs = text
        .to_socket_addrs()
        .map_err(|err| format!("cannot resolve {host:?}: {err}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{host:?} resolves to no address"))
}

fn health_settings(
    raw: &RawHealthCheck,
    base: Option<&HealthSettings>,
    problems: &mut Problems,
) -> HealthSettings {
    let path = match &raw.path {
        Some(path) if !path.value.starts_with('/') => {
            problems.at(
                path,
                format!("health_check.path {:?} must start with /", path.value),
            );
            path.value.clone()
        }
        Some(path) => path.value.clone(),
        None => base.map_or_else(|| defaults::HEALTH_PATH.to_owned(), |b| b.path.clone()),
    };
    let duration = |value: &Option<Spanned<HumanDuration>>,
                    inherited: Option<Duration>,
                    default: Duration,
                    what: &str,
                    problems: &mut Problems| match value {
        Some(d) if d.value.0.is_zero() => {
            problems.at(d, format!("health_check.{what} must be greater than zero"));
            d.value.0
        }
        Some(d) => d.value.0,
        None => inherited.unwrap_or(default),
    };
    let threshold = |value: &Option<Spanned<u32>>,
                     inherited: Option<u32>,
                     default: u32,
                     what: &str,
                     problems: &mut Problems| match value {
        Some(t) if t.value == 0 => {
            problems.at(t, format!("health_check.{what} must be at least 1"));
            1
        }
        Some(t) => t.value,
        None => inherited.unwrap_or(default),
    };
    HealthSettings {
        path,
        interval: duration(
            &raw.interval,
            base.map(|b| b.interval),
            defaults::HEALTH_INTERVAL,
            "interval",
            problems,
        ),
        timeout: duration(
            &raw.timeout,
            base.map(|b| b.timeout),
            defaults::HEALTH_TIMEOUT,
            "timeout",
            problems,
        ),
        healthy_threshold: threshold(
            &raw.healthy_threshold,
            base.map(|b| b.healthy_threshold),
            defaults::HEALTHY_THRESHOLD,
            "healthy_threshold",
            problems,
        ),
        unhealthy_threshold: threshold(
            &raw.unhealthy_threshold,
            base.map(|b| b.unhealthy_threshold),
            defaults::UNHEALTHY_THRESHOLD,
            "unhealthy_threshold",
            problems,
        ),
    }
}

fn valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn service_config(
    name: &str,
    raw: &RawService,
    base_health: &HealthSettings,
    has_registry: bool,
    services: &Spanned<BTreeMap<String, RawService>>,
    problems: &mut Problems,
) -> ServiceConfig {
    if !valid_service_name(name) {
        problems.at(
            services,
            format!("service name {name:?} may contain only letters, digits, '-', '_' and '.'"),
        );
    }
    let discovery = match &raw.discovery {
        None => DiscoveryKind::Static,
        Some(kind) if kind.value == "static" => DiscoveryKind::Static,
        Some(kind) if kind.value == "etcd" => {
            if !has_registry {
                problems.at(
                    kind,
                    format!("service {name}: discovery: etcd needs a top-level registry: {{ etcd: {{ endpoints: [...] }} }}"),
                );
            }
            DiscoveryKind::Etcd
        }
        Some(kind) => {
            problems.at(
                kind,
                format!(
                    "service {name}: discovery {:?} is not one of static, etcd",
                    kind.value
                ),
            );
            DiscoveryKind::Static
        }
    };
    let listed: &[Spanned<String>] = raw.instances.as_ref().map_or(&[], |i| &i.value);
    match (discovery, &raw.instances) {
        (DiscoveryKind::Static, None) => problems.at(
            services,
            format!("service {name}: instances (or discovery: etcd) is required"),
        ),
        (DiscoveryKind::Static, Some(instances)) if instances.value.is_empty() => problems.at(
            instances,
            format!("service {name}: at least one instance is required"),
        ),
        (DiscoveryKind::Etcd, Some(instances)) => problems.at(
            instances,
            format!("service {name}: instances and discovery: etcd exclude each other (the registry lists the instances)"),
        ),
        _ => {}
    }
    let mut instances: Vec<String> = Vec::with_capacity(listed.len());
    for address in listed {
        if let Err(why) = host_port(&address.value) {
            problems.at(
                address,
                format!("service {name}: instance {:?}: {why}", address.value),
            );
            continue;
        }
        if instances.contains(&address.value) {
            problems.at(
                address,
                format!(
                    "service {name}: instance {:?} is listed twice",
                    address.value
                ),
            );
            continue;
        }
        instances.push(address.value.clone());
    }
    ServiceConfig {
        name: name.to_owned(),
        discovery,
        instances,
        load_balancing: raw.load_balancing.unwrap_or(LoadBalancing::RoundRobin),
        health: health_settings(&raw.health_check, Some(base_health), problems),
        timeouts: timeouts(name, &raw.timeouts, problems),
        retries: raw.retries.as_ref().map_or(defaults::RETRIES, |r| r.value),
        when_all_unhealthy: raw.when_all_unhealthy.unwrap_or(AllUnhealthy::FailFast),
        outlier: OutlierSettings {
            consecutive_failures: raw
                .outlier_detection
                .consecutive_failures
                .as_ref()
                .map_or(defaults::OUTLIER_CONSECUTIVE_FAILURES, |n| n.value),
            ejection_time: match &raw.outlier_detection.ejection_time {
                Some(t) if t.value.0.is_zero() => {
                    problems.at(t, format!("service {name}: outlier_detection.ejection_time must be greater than zero"));
                    t.value.0
                }
                Some(t) => t.value.0,
                None => defaults::OUTLIER_EJECTION_TIME,
            },
        },
    }
}

fn timeouts(service: &str, raw: &RawTimeouts, problems: &mut Problems) -> Timeouts {
    let mut one =
        |value: &Option<Spanned<HumanDuration>>, default: Duration, what: &str| match value {
            Some(d) if d.value.0.is_zero() => {
                problems.at(
                    d,
                    format!("service {service}: timeouts.{what} must be greater than zero"),
                );
                default
            }
            Some(d) => d.value.0,
            None => default,
        };
    Timeouts {
        connect: one(&raw.connect, defaults::CONNECT_TIMEOUT, "connect"),
        read: one(&raw.read, defaults::READ_TIMEOUT, "read"),
        write: one(&raw.write, defaults::WRITE_TIMEOUT, "write"),
        idle: one(&raw.idle, defaults::IDLE_TIMEOUT, "idle"),
        total: one(&raw.total, defaults::TOTAL_TIMEOUT, "total"),
    }
}

/// A path prefix as routes use it: starts with `/`, no trailing `/` (unless
/// it is `/`), no query, no empty or dot segments.
fn path_prefix_problem(prefix: &str) -> Option<&'static str> {
    if !prefix.starts_with('/') {
        return Some("must start with /");
    }
    if prefix.len() > 1 && prefix.ends_with('/') {
        return Some("must not end with / (a prefix matches whole segments already)");
    }
    if prefix.contains(['?', '#', ' ']) {
        return Some("must be a path, without query, fragment or spaces");
    }
    if prefix.len() > 1
        && prefix[1..]
            .split('/')
            .any(|segment| segment.is_empty() || segment == "." || segment == "..")
    {
        return Some("must not contain empty, '.' or '..' segments");
    }
    None
}

/// True if `prefix` matches `path` on a segment boundary.
pub fn segment_prefix_of(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || (path.starts_with(prefix)
            && (path.len() == prefix.len() || path.as_bytes()[prefix.len()] == b'/'))
}

fn routes(
    raw: &[RawRoute],
    services: &BTreeMap<String, RawService>,
    custom: &dyn CustomPlugins,
    base_dir: &Path,
    reserved: &[&str],
    problems: &mut Problems,
) -> Vec<RouteConfig> {
    let mut seen: HashMap<&str, u64> = HashMap::new();
    let mut routes = Vec::with_capacity(raw.len());
    for route in raw {
        let prefix = &route.prefix.value;
        if let Some(why) = path_prefix_problem(prefix) {
            problems.at(&route.prefix, format!("route prefix {prefix:?} {why}"));
        } else if reserved
            .iter()
            .any(|reserved| segment_prefix_of(prefix, reserved) && prefix != "/")
        {
            problems.at(
                &route.prefix,
                format!("route prefix {prefix:?} would take {reserved:?}, which the gateway answers itself"),
            );
        }
        if let Some(first_line) = seen.insert(prefix.as_str(), route.prefix.referenced.line()) {
            problems.at(
                &route.prefix,
                format!(
                    "route prefix {prefix:?} is already used by the route at line {first_line}"
                ),
            );
        }
        if !services.contains_key(&route.service.value) {
            let known: Vec<&str> = services.keys().map(String::as_str).collect();
            problems.at(
                &route.service,
                format!(
                    "route {prefix}: unknown service {:?} (services: {})",
                    route.service.value,
                    known.join(", ")
                ),
            );
        }
        if let Some(strip) = &route.strip_prefix {
            if let Some(why) = path_prefix_problem(&strip.value) {
                problems.at(strip, format!("strip_prefix {:?} {why}", strip.value));
            } else if !segment_prefix_of(&strip.value, prefix) {
                problems.at(
                    strip,
                    format!(
                        "strip_prefix {:?} must be a leading part of the route prefix {prefix:?}",
                        strip.value
                    ),
                );
            }
        }
        let plugins = route
            .plugins
            .iter()
            .filter_map(|plugin| {
                super::plugins::plugin_config(prefix, plugin, custom, base_dir, problems)
            })
            .collect();
        routes.push(RouteConfig {
            prefix: prefix.clone(),
            service: route.service.value.clone(),
            strip_prefix: route.strip_prefix.as_ref().map(|s| s.value.clone()),
            max_body_size: route.max_body_size.as_ref().map(|s| s.value.0),
            plugins,
        });
    }
    routes
}
