//! The gateway's configuration: the validated, run-time form of
//! `gateway.yaml`, and how to get one.
//!
//! Two layers: [`raw`] mirrors the file (serde, unknown keys rejected) and
//! `validate` checks it as a whole and builds a [`Config`] (no serde),
//! reporting every problem at once with its line and column. Only a
//! validated `Config` is ever used by the gateway; `gateway check FILE`, the
//! start-up and every hot reload go through the same [`load_with`].
//!
//! A crate of its own, without Pingora, so that tools which only read the
//! file (the `stack` launcher) do not build the proxy.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

mod plugins;
pub mod raw;
#[cfg(test)]
mod tests;
mod validate;

pub use ipnet::IpNet;
pub use raw::{AllUnhealthy, BUILTIN_PLUGINS, LoadBalancing};
pub use validate::{RESERVED_PATHS, segment_prefix_of};

/// Active health-check defaults, applied where the file says nothing.
pub mod defaults {
    use std::time::Duration;
    /// The services' health endpoint, as in the original stack.
    pub const HEALTH_PATH: &str = "/health";
    /// The merged API document, its page, the services' documents, and
    /// how often those are fetched.
    pub const API_DOCS_PATH: &str = "/openapi.json";
    pub const API_DOCS_PAGE: &str = "/docs";
    pub const API_DOCS_SOURCE: &str = "/openapi.json";
    pub const API_DOCS_REFRESH: Duration = Duration::from_secs(30);
    /// Frequent enough that a dead instance leaves rotation within a few
    /// seconds (interval × unhealthy_threshold), cheap enough to not matter.
    pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
    /// A health endpoint that takes longer than this is not healthy.
    pub const HEALTH_TIMEOUT: Duration = Duration::from_millis(500);
    /// Two successes to come back: one lucky answer is not recovery.
    pub const HEALTHY_THRESHOLD: u32 = 2;
    /// Two failures to leave: one lost packet is not an outage.
    pub const UNHEALTHY_THRESHOLD: u32 = 2;
    /// Connecting on a LAN takes microseconds; a second means the host is
    /// gone or overloaded, and the client should hear it quickly.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
    /// Longest wait for the next bytes of an upstream response (not for the
    /// whole response, which may stream for longer).
    pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
    /// Longest wait for an upstream to accept the next bytes of a request.
    pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
    /// Pooled idle upstream connections are closed after this, before
    /// typical backend keep-alive limits (60 s and up) close them under us.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
    /// A whole request, first byte sent upstream to last byte back: long
    /// enough for any API call, short enough that nothing hangs forever.
    pub const TOTAL_TIMEOUT: Duration = Duration::from_secs(60);
    /// Further attempts on other instances: enough to ride out one or two
    /// dead instances, few enough not to multiply load.
    pub const RETRIES: u32 = 2;
    /// Consecutive failures (connection errors, 5xx) that eject an instance
    /// without waiting for the next active check.
    pub const OUTLIER_CONSECUTIVE_FAILURES: u32 = 5;
    /// How long an ejected instance stays out before checks may re-admit it.
    pub const OUTLIER_EJECTION_TIME: Duration = Duration::from_secs(10);
    /// A client must send a request's whole header within this (slowloris),
    /// and may stay idle between keep-alive requests no longer than this.
    pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    /// Largest request header (request line and fields); larger gets 431.
    /// Generous for cookies and tokens, far below Pingora's hard 1 MiB.
    pub const MAX_HEADER_SIZE: u64 = 64 * 1024;
    /// Open client connections; more are closed at once. Below the 20 000
    /// file descriptors these machines allow, leaving room for upstreams.
    pub const MAX_CONNECTIONS: usize = 8_192;
    /// In-flight requests may finish for this long after SIGTERM; well under
    /// the 30 s orchestrators usually wait before SIGKILL.
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
    /// `api_key`'s header, as APISIX's key-auth and most API gateways use.
    pub const API_KEY_HEADER: &str = "x-api-key";
    /// Clock skew allowed on a token's `exp` and `nbf`: machines drift by
    /// seconds, not minutes.
    pub const JWT_LEEWAY: Duration = Duration::from_secs(30);
    /// A `jwks_url` is fetched again this often (and at once for an unknown
    /// `kid`): identity providers rotate keys over days and publish new ones
    /// well ahead.
    pub const JWKS_REFRESH: Duration = Duration::from_secs(600);
    /// Rate-limit keys tracked at once: ~100 bytes each, 10 MB at most.
    pub const RATE_LIMIT_MAX_KEYS: usize = 100_000;
    /// Host names in `instances` are resolved again this often: DNS changes
    /// (a container replaced, a failover record) are followed within half
    /// a minute, at one lookup per name per half minute.
    pub const DNS_REFRESH: Duration = Duration::from_secs(30);
    /// The registry's key prefix, as the services register by default.
    pub const REGISTRY_PREFIX: &str = "/gateway/services";
    /// The last-known-members file, beside the configuration file.
    pub const REGISTRY_CACHE: &str = "registry-cache.json";
}

/// A validated gateway configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    /// From `admin.listen` or its short form `admin_listen`.
    pub admin_listen: Option<SocketAddr>,
    /// The bearer token of the admin listener (`admin.token_file`).
    pub admin_token: Option<Secret>,
    /// Peers whose forwarding headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Worker threads of the proxy service.
    pub threads: usize,
    /// One runtime whose `threads` steal work from each other, or (false)
    /// `threads` share-nothing workers of one thread each; see
    /// `server::Workers`.
    pub work_stealing: bool,
    /// Share-nothing worker `i` runs on the `i`-th CPU the process may use
    /// (modulo their count); see `workers::CpuPlan`.
    pub worker_cpu_affinity: bool,
    /// Header names forwarded in the case they arrived in (Pingora's
    /// case-preserving maps), or (false) as `http` writes them; see
    /// `forwarding::header_copy_request`.
    pub preserve_header_case: bool,
    pub downstream: Downstream,
    /// Whole seconds (Pingora counts in seconds).
    pub shutdown_grace: Duration,
    /// How often host names in `instances` lists are resolved again.
    pub dns_refresh: Duration,
    /// Requests are counted for `/metrics`.
    pub metrics: bool,
    /// The merged API document and its page; `None`: off.
    pub api_docs: Option<ApiDocs>,
    /// `registry`: where `discovery: etcd` services are found.
    pub registry: Option<RegistryConfig>,
    /// Sorted by name.
    pub services: Vec<ServiceConfig>,
    /// In file order; lookup is by longest prefix, not by order.
    pub routes: Vec<RouteConfig>,
}

impl Config {
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name == name)
    }
}

/// `api_docs`: one OpenAPI document for the API as clients see it, made
/// from every routed service's own document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiDocs {
    /// The merged document, on the public listener.
    pub path: String,
    /// The documentation page (and its assets below it).
    pub docs_path: String,
    /// Each service's document, on its instances.
    pub source: String,
    pub refresh: Duration,
}

/// Client-side limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Downstream {
    pub header_timeout: Duration,
    pub max_header_size: u64,
    pub max_connections: usize,
}

/// Passive health: eject after this many consecutive failures (0: never).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierSettings {
    pub consecutive_failures: u32,
    pub ejection_time: Duration,
}

/// `registry.etcd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryConfig {
    /// `http://host:port` of each member.
    pub endpoints: Vec<String>,
    /// Without a trailing `/`.
    pub prefix: String,
    /// The last-known-members file.
    pub cache: std::path::PathBuf,
}

/// Where a service's instances come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoveryKind {
    /// `instances` in the file.
    Static,
    /// The registry (`registry.etcd`).
    Etcd,
}

impl DiscoveryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DiscoveryKind::Static => "static",
            DiscoveryKind::Etcd => "etcd",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub name: String,
    pub discovery: DiscoveryKind,
    /// The instances as written (`ip:port` or `host:port`); discovery
    /// resolves them when a version is built. Empty with `discovery: etcd`.
    pub instances: Vec<String>,
    pub load_balancing: LoadBalancing,
    pub health: HealthSettings,
    pub timeouts: Timeouts,
    pub retries: u32,
    pub when_all_unhealthy: AllUnhealthy,
    pub outlier: OutlierSettings,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
    pub write: Duration,
    pub idle: Duration,
    pub total: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// Starts with `/`; no trailing `/` unless it is `/` itself.
    pub prefix: String,
    pub service: String,
    pub strip_prefix: Option<String>,
    /// Largest request body accepted (413 beyond); `None`: no limit.
    pub max_body_size: Option<u64>,
    pub plugins: Vec<PluginConfig>,
}

/// A route's plugin with its validated settings.
#[derive(Debug, Clone, PartialEq)]
pub enum PluginConfig {
    Headers(HeadersPluginConfig),
    IpFilter(IpFilterConfig),
    ApiKey(ApiKeyConfig),
    Jwt(JwtConfig),
    RateLimit(RateLimitConfig),
    Cors(CorsConfig),
    /// A plugin registered by the program (not built in), with its settings
    /// as written; [`CustomPlugins::check`] accepted them.
    Custom(CustomPluginConfig),
}

impl PluginConfig {
    /// The plugin's name, as its key in the file.
    pub fn name(&self) -> &str {
        match self {
            PluginConfig::Headers(_) => "headers",
            PluginConfig::IpFilter(_) => "ip_filter",
            PluginConfig::ApiKey(_) => "api_key",
            PluginConfig::Jwt(_) => "jwt",
            PluginConfig::RateLimit(_) => "rate_limit",
            PluginConfig::Cors(_) => "cors",
            PluginConfig::Custom(custom) => &custom.name,
        }
    }
}

/// A secret read from a file or the environment: compared like any value,
/// never shown (`Debug` prints its length only).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// `ip_filter`: a client address in `deny` is refused; with `allow` not
/// empty, so is one outside it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IpFilterConfig {
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
}

/// `api_key`: the header, and every key (inline and from `keys_file`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyConfig {
    pub header: HeaderName,
    pub keys: Vec<ApiKeyEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyEntry {
    /// The consumer the key stands for.
    pub name: String,
    /// SHA-256 of the key.
    pub sha256: [u8; 32],
}

/// `jwt`: what a token must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtConfig {
    pub issuer: Option<String>,
    /// Empty: `aud` is not checked.
    pub audiences: Vec<String>,
    /// As JOSE names them (`RS256`, `ES256`, `HS256`, ...).
    pub algorithms: Vec<String>,
    pub keys: JwtKeys,
    pub leeway: Duration,
    /// (claim, header it is sent upstream in).
    pub forward_claims: Vec<(String, HeaderName)>,
    pub forward_authorization: bool,
}

/// Where a `jwt` plugin's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtKeys {
    /// A JWKS document, as read with the configuration.
    Jwks { file: String, document: String },
    /// A JWKS URL, fetched by the gateway, refreshed every `refresh`.
    JwksUrl { url: String, refresh: Duration },
    /// An HMAC secret from the environment variable `env`.
    Secret { env: String, secret: Secret },
}

/// `rate_limit`: `requests` per `per` for each key, `burst` more at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitConfig {
    pub key: RateLimitKey,
    pub requests: u64,
    pub per: Duration,
    pub burst: u64,
    pub max_keys: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateLimitKey {
    ClientIp,
    /// The consumer an auth plugin before it named (else the client IP).
    Consumer,
    Header(HeaderName),
}

/// `cors`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorsConfig {
    /// Exact origins; empty with `any_origin`.
    pub allow_origins: Vec<HeaderValue>,
    pub any_origin: bool,
    pub allow_methods: Vec<http::Method>,
    pub allow_headers: Vec<HeaderName>,
    pub expose_headers: Vec<HeaderName>,
    pub max_age: Option<Duration>,
    pub allow_credentials: bool,
}

#[derive(Debug, Clone)]
pub struct CustomPluginConfig {
    pub name: String,
    /// The value under the plugin's key, as JSON (`null` when empty).
    pub settings: serde_json::Value,
    /// Where it is written, for errors found when it is built.
    pub line: u64,
    pub column: u64,
}

/// Equal settings make equal plugins wherever they are written: moving a
/// route in the file does not make its plugins new (they keep their state
/// across a reload).
impl PartialEq for CustomPluginConfig {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.settings == other.settings
    }
}

/// The plugins a program adds to the built-in ones, as validation sees
/// them: their names, and a check of their settings.
pub trait CustomPlugins {
    /// `None` if there is no plugin called `name`; else whether `settings`
    /// are valid for it (`Err`: what is wrong, reported at the plugin's
    /// place in the file).
    fn check(&self, name: &str, settings: &serde_json::Value) -> Option<Result<(), String>>;
    /// Every name, for the error about an unknown one.
    fn names(&self) -> Vec<String>;
}

/// Built-in plugins only: any other name is an error.
pub struct BuiltinOnly;

impl CustomPlugins for BuiltinOnly {
    fn check(&self, _name: &str, _settings: &serde_json::Value) -> Option<Result<(), String>> {
        None
    }

    fn names(&self) -> Vec<String> {
        Vec::new()
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeadersPluginConfig {
    pub request: HeaderEdits,
    pub response: HeaderEdits,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeaderEdits {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

/// One problem in a configuration file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based; 0 when the problem has no single place (e.g. an empty file).
    pub line: u64,
    pub column: u64,
    pub message: String,
}

/// Every problem found in one file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    pub file: String,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if error.line > 0 {
                write!(
                    f,
                    "{}:{}:{}: {}",
                    self.file, error.line, error.column, error.message
                )?;
            } else {
                write!(f, "{}: {}", self.file, error.message)?;
            }
        }
        Ok(())
    }
}

/// Reads, parses and validates the file at `path`, with the built-in
/// plugins only. May resolve the listen addresses (blocking): call it off
/// the request path. Instance host names are not resolved here but by
/// discovery, so a file's validity does not depend on the DNS of the
/// machine checking it.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_with(path, &BuiltinOnly)
}

/// [`load`], where plugins other than the built-in ones may be used if
/// `custom` knows them.
pub fn load_with(path: &Path, custom: &dyn CustomPlugins) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|err| ConfigErrors {
        file: file.clone(),
        errors: vec![ConfigError {
            line: 0,
            column: 0,
            message: format!("cannot read the file: {err}"),
        }],
    })?;
    parse_with(&text, &file, custom)
}

/// Parses and validates configuration text; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigErrors> {
    parse_with(text, file, &BuiltinOnly)
}

/// [`parse`], with the plugins `custom` knows.
pub fn parse_with(
    text: &str,
    file: &str,
    custom: &dyn CustomPlugins,
) -> Result<Config, ConfigErrors> {
    let errors = |errors| ConfigErrors {
        file: file.to_owned(),
        errors,
    };
    if text.trim().is_empty() {
        return Err(errors(vec![ConfigError {
            line: 0,
            column: 0,
            message: "the file is empty".to_owned(),
        }]));
    }
    let raw: raw::RawConfig = serde_saphyr::from_str(text).map_err(|err| {
        let (line, column) = err
            .location()
            .map_or((0, 0), |location| (location.line(), location.column()));
        errors(vec![ConfigError {
            line,
            column,
            message: yaml_message(&err),
        }])
    })?;
    let base_dir = Path::new(file).parent().unwrap_or(Path::new("."));
    validate::validate(raw, custom, base_dir).map_err(errors)
}

/// serde-saphyr's message without its own location suffix (we print the
/// location in front, like a compiler).
fn yaml_message(err: &serde_saphyr::Error) -> String {
    let text = err.to_string();
    let first = text.lines().next().unwrap_or_default().trim();
    match first.rfind(" at line ") {
        Some(index) => first[..index].to_owned(),
        None => first.to_owned(),
    }
}
