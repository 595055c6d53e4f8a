//! The configuration file as written: serde types that mirror `gateway.yaml`.
//!
//! This is the only module that derives `Deserialize`. Unknown keys are
//! rejected, durations are human (`500ms`, `2s`), and values that later
//! checks may complain about are `Spanned` so the complaint can name the
//! line and column. Nothing here is used at run time: [`super::validate`]
//! turns it into [`super::Config`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use serde_saphyr::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Spanned<String>,
    #[serde(default)]
    pub admin_listen: Option<Spanned<String>>,
    /// The admin listener with its token (`admin_listen` is its short form).
    #[serde(default)]
    pub admin: Option<Spanned<RawAdmin>>,
    /// Peers whose `X-Forwarded-For` / `Forwarded` is believed.
    #[serde(default)]
    pub trusted_proxies: Option<Vec<Spanned<String>>>,
    /// Worker threads of the proxy; default: the number of CPUs.
    #[serde(default)]
    pub threads: Option<Spanned<usize>>,
    /// Whether idle proxy threads steal work from busy ones (Pingora's
    /// `work_stealing`); default false: share-nothing workers.
    #[serde(default)]
    pub work_stealing: Option<bool>,
    /// Whether each share-nothing worker is pinned to one CPU (nginx's
    /// `worker_cpu_affinity auto`); default false.
    #[serde(default)]
    pub worker_cpu_affinity: Option<Spanned<bool>>,
    /// Whether header names keep the case they arrived in; default false:
    /// lowercase, standard names capitalized as usual.
    #[serde(default)]
    pub preserve_header_case: Option<bool>,
    #[serde(default)]
    pub health_check: RawHealthCheck,
    /// Limits and timeouts on the client side.
    #[serde(default)]
    pub downstream: RawDownstream,
    /// How long in-flight requests may run after SIGTERM.
    #[serde(default)]
    pub shutdown_grace: Option<Spanned<HumanDuration>>,
    /// How often host names in `instances` lists are resolved again.
    #[serde(default)]
    pub dns_refresh: Option<Spanned<HumanDuration>>,
    /// Whether requests are counted for `/metrics` (default true).
    #[serde(default)]
    pub metrics: Option<bool>,
    /// The merged API document and its page on the public listener.
    #[serde(default)]
    pub api_docs: Option<Spanned<RawApiDocs>>,
    /// Where services on `discovery: etcd` find their instances.
    #[serde(default)]
    pub registry: Option<Spanned<RawRegistry>>,
    pub services: Spanned<BTreeMap<String, RawService>>,
    pub routes: Spanned<Vec<RawRoute>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiDocs {
    /// Default true.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Where the gateway serves the merged document (`/openapi.json`).
    #[serde(default)]
    pub path: Option<Spanned<String>>,
    /// Where it serves the documentation page (`/docs`).
    #[serde(default)]
    pub docs_path: Option<Spanned<String>>,
    /// Where each service serves its own document (`/openapi.json`).
    #[serde(default)]
    pub source: Option<Spanned<String>>,
    /// How often the services' documents are fetched again (`30s`).
    #[serde(default)]
    pub refresh: Option<Spanned<HumanDuration>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegistry {
    pub etcd: Spanned<RawEtcd>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEtcd {
    /// `host:port` (or `http://host:port`) of each etcd member.
    pub endpoints: Spanned<Vec<Spanned<String>>>,
    /// Keys are `<prefix>/<service>/<instance-id>` (`/gateway/services`).
    #[serde(default)]
    pub prefix: Option<Spanned<String>>,
    /// The last known members, kept for a start while etcd is down
    /// (`registry-cache.json` beside the configuration file).
    #[serde(default)]
    pub cache: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Spanned<String>,
    /// A file holding the bearer token every admin endpoint but the
    /// liveness probe requires.
    #[serde(default)]
    pub token_file: Option<Spanned<String>>,
}

/// Every field optional: the top-level block fills in defaults, a service's
/// block overrides the top-level one field by field.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    #[serde(default)]
    pub path: Option<Spanned<String>>,
    #[serde(default)]
    pub interval: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    pub timeout: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    pub healthy_threshold: Option<Spanned<u32>>,
    #[serde(default)]
    pub unhealthy_threshold: Option<Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDownstream {
    #[serde(default)]
    pub header_timeout: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    pub max_header_size: Option<Spanned<ByteSize>>,
    #[serde(default)]
    pub max_connections: Option<Spanned<usize>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    /// The static list; absent with `discovery: etcd`.
    #[serde(default)]
    pub instances: Option<Spanned<Vec<Spanned<String>>>>,
    /// `static` (the `instances` list, the default) or `etcd`.
    #[serde(default)]
    pub discovery: Option<Spanned<String>>,
    #[serde(default)]
    pub load_balancing: Option<LoadBalancing>,
    #[serde(default)]
    pub health_check: RawHealthCheck,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    /// Further attempts on other instances after a failed one.
    #[serde(default)]
    pub retries: Option<Spanned<u32>>,
    #[serde(default)]
    pub when_all_unhealthy: Option<AllUnhealthy>,
    #[serde(default)]
    pub outlier_detection: RawOutlierDetection,
}

/// What to do when no instance of a service is healthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AllUnhealthy {
    /// Answer 503 at once.
    FailFast,
    /// Send to every instance anyway, as if all were healthy.
    FailOpen,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutlierDetection {
    /// Consecutive connection failures or 5xx answers that eject an
    /// instance at once; 0 turns passive ejection off.
    #[serde(default)]
    pub consecutive_failures: Option<Spanned<u32>>,
    /// How long an ejected instance stays out before active checks may
    /// bring it back.
    #[serde(default)]
    pub ejection_time: Option<Spanned<HumanDuration>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancing {
    RoundRobin,
    Random,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    #[serde(default)]
    pub connect: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    pub read: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    pub write: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    pub idle: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    pub total: Option<Spanned<HumanDuration>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub prefix: Spanned<String>,
    pub service: Spanned<String>,
    #[serde(default)]
    pub strip_prefix: Option<Spanned<String>>,
    /// Largest request body accepted on this route (413 beyond).
    #[serde(default)]
    pub max_body_size: Option<Spanned<ByteSize>>,
    #[serde(default)]
    pub plugins: Vec<Spanned<RawPlugin>>,
}

/// One plugin of a route, named by its key: `- headers: {...}`. A name that
/// is not a built-in plugin's is kept with its settings as written, for the
/// plugins a program built on the gateway registers (checked by
/// [`super::CustomPlugins`] during validation).
#[derive(Debug, Clone)]
pub enum RawPlugin {
    /// Adds, replaces or removes request and response headers.
    Headers(RawHeadersPlugin),
    /// Allows or denies client addresses (403).
    IpFilter(RawIpFilter),
    /// Requires a known API key (401).
    ApiKey(RawApiKey),
    /// Requires a valid JSON Web Token (401).
    Jwt(RawJwt),
    /// Limits requests per key (429).
    RateLimit(RawRateLimit),
    /// Answers CORS preflights and marks allowed origins.
    Cors(RawCors),
    /// Any other name.
    Custom {
        name: String,
        settings: serde_json::Value,
    },
}

impl RawPlugin {
    /// The plugin's key in the file.
    pub fn name(&self) -> &str {
        match self {
            RawPlugin::Headers(_) => "headers",
            RawPlugin::IpFilter(_) => "ip_filter",
            RawPlugin::ApiKey(_) => "api_key",
            RawPlugin::Jwt(_) => "jwt",
            RawPlugin::RateLimit(_) => "rate_limit",
            RawPlugin::Cors(_) => "cors",
            RawPlugin::Custom { name, .. } => name,
        }
    }
}

impl<'de> Deserialize<'de> for RawPlugin {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OneKey;
        impl<'de> serde::de::Visitor<'de> for OneKey {
            type Value = RawPlugin;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a plugin: its name as the only key, e.g. `- headers: {...}`")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawPlugin, A::Error> {
                use serde::de::Error;
                let Some(name) = map.next_key::<String>()? else {
                    return Err(A::Error::custom(
                        "a plugin needs its name as key, e.g. `- headers: {...}`",
                    ));
                };
                let plugin = match name.as_str() {
                    "headers" => RawPlugin::Headers(map.next_value()?),
                    "ip_filter" => RawPlugin::IpFilter(map.next_value()?),
                    "api_key" => RawPlugin::ApiKey(map.next_value()?),
                    "jwt" => RawPlugin::Jwt(map.next_value()?),
                    "rate_limit" => RawPlugin::RateLimit(map.next_value()?),
                    "cors" => RawPlugin::Cors(map.next_value()?),
                    _ => RawPlugin::Custom {
                        settings: map.next_value()?,
                        name,
                    },
                };
                if map.next_key::<serde::de::IgnoredAny>()?.is_some() {
                    return Err(A::Error::custom(
                        "one plugin per list item: write `- a: ...` then `- b: ...`",
                    ));
                }
                Ok(plugin)
            }
        }
        deserializer.deserialize_map(OneKey)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeadersPlugin {
    #[serde(default)]
    pub request: RawHeaderEdits,
    #[serde(default)]
    pub response: RawHeaderEdits,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderEdits {
    /// Headers set (replacing any present) with these values.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Headers removed.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// The names of the built-in plugins, as keys in the file.
pub const BUILTIN_PLUGINS: &[&str] = &[
    "headers",
    "ip_filter",
    "api_key",
    "jwt",
    "rate_limit",
    "cors",
];

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIpFilter {
    /// CIDRs (or single addresses) allowed; empty: every address not denied.
    #[serde(default)]
    pub allow: Vec<String>,
    /// CIDRs denied, even if allowed.
    #[serde(default)]
    pub deny: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiKey {
    /// The request header carrying the key (default `x-api-key`).
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub keys: Vec<RawApiKeyEntry>,
    /// A YAML file with more keys, the same list (read with the
    /// configuration, relative to its directory).
    #[serde(default)]
    pub keys_file: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiKeyEntry {
    /// The consumer this key stands for.
    pub name: String,
    /// The SHA-256 of the key, in hex.
    pub sha256: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    /// Required `iss`.
    #[serde(default)]
    pub issuer: Option<String>,
    /// `aud` must name one of these.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Allowed `alg`s (default RS256).
    #[serde(default)]
    pub algorithms: Vec<String>,
    /// A JWKS document (read with the configuration).
    #[serde(default)]
    pub jwks_file: Option<String>,
    /// A JWKS URL, fetched, cached and refreshed.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// How often `jwks_url` is fetched again (default 10m).
    #[serde(default)]
    pub jwks_refresh: Option<HumanDuration>,
    /// An environment variable holding the HMAC secret (HS256/384/512).
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Clock skew allowed on `exp` and `nbf` (default 30s).
    #[serde(default)]
    pub leeway: Option<HumanDuration>,
    /// Verified claims sent upstream as headers: `{ sub: x-user-id }`.
    #[serde(default)]
    pub forward_claims: BTreeMap<String, String>,
    /// Whether the `Authorization` header goes upstream (default true).
    #[serde(default)]
    pub forward_authorization: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    /// `client_ip` (default), `consumer`, or `header:NAME`.
    #[serde(default)]
    pub key: Option<String>,
    pub requests: u64,
    pub per: HumanDuration,
    /// Requests allowed at once above the steady rate (default 0).
    #[serde(default)]
    pub burst: Option<u64>,
    /// Keys tracked at most (default 100 000).
    #[serde(default)]
    pub max_keys: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCors {
    /// Exact origins, or `"*"`.
    pub allow_origins: Vec<String>,
    #[serde(default)]
    pub allow_methods: Vec<String>,
    #[serde(default)]
    pub allow_headers: Vec<String>,
    #[serde(default)]
    pub expose_headers: Vec<String>,
    #[serde(default)]
    pub max_age: Option<HumanDuration>,
    #[serde(default)]
    pub allow_credentials: Option<bool>,
}

/// A size in bytes: a number, or text such as `64KiB`, `10MiB`, `1GB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<u64, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number
            .parse()
            .map_err(|_| format!("invalid size {text:?}; write e.g. 65536, 64KiB, 10MiB"))?;
        let factor: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => {
                return Err(format!(
                    "unknown size unit {other:?}; use B, KiB, MiB, GiB, KB, MB or GB"
                ));
            }
        };
        number
            .checked_mul(factor)
            .ok_or_else(|| format!("size {text:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Number(u64),
            Text(String),
        }
        match Written::deserialize(deserializer)? {
            Written::Number(n) => Ok(ByteSize(n)),
            Written::Text(text) => ByteSize::parse(&text)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// A duration written for humans: `500ms`, `2s`, `1m30s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(text.trim())
            .map(HumanDuration)
            .map_err(|err| {
                serde::de::Error::custom(format!(
                    "invalid duration {text:?} ({err}); write e.g. 500ms, 2s, 1m"
                ))
            })
    }
}
