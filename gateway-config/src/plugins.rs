//! Validation of a route's plugins: the built-in ones' settings, files
//! they name (read with the configuration, so a reload picks up their new
//! contents), and custom plugins through [`CustomPlugins`]. Every problem
//! is reported at the plugin's place in the file.

use std::path::Path;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde_saphyr::Spanned;

use super::raw::{
    BUILTIN_PLUGINS, RawApiKey, RawApiKeyEntry, RawCors, RawHeaderEdits, RawIpFilter, RawJwt,
    RawPlugin, RawRateLimit,
};
use super::validate::{Problems, beside, cidr};
use super::{
    ApiKeyConfig, ApiKeyEntry, CorsConfig, CustomPluginConfig, CustomPlugins, HeaderEdits,
    HeadersPluginConfig, IpFilterConfig, JwtConfig, JwtKeys, PluginConfig, RateLimitConfig,
    RateLimitKey, Secret, defaults,
};

/// JOSE algorithms a `jwt` plugin may allow.
const ASYMMETRIC: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];
const HMAC: &[&str] = &["HS256", "HS384", "HS512"];

/// One plugin's validated settings, or `None` (and problems) if invalid.
pub(crate) fn plugin_config(
    prefix: &str,
    place: &Spanned<RawPlugin>,
    custom: &dyn CustomPlugins,
    base_dir: &Path,
    problems: &mut Problems,
) -> Option<PluginConfig> {
    let mut errors = Vec::new();
    let plugin = match &place.value {
        RawPlugin::Headers(raw) => Some(PluginConfig::Headers(HeadersPluginConfig {
            request: header_edits(&raw.request, "request", &mut errors),
            response: header_edits(&raw.response, "response", &mut errors),
        })),
        RawPlugin::IpFilter(raw) => Some(PluginConfig::IpFilter(ip_filter(raw, &mut errors))),
        RawPlugin::ApiKey(raw) => api_key(raw, base_dir, &mut errors).map(PluginConfig::ApiKey),
        RawPlugin::Jwt(raw) => jwt(raw, base_dir, &mut errors).map(PluginConfig::Jwt),
        RawPlugin::RateLimit(raw) => rate_limit(raw, &mut errors).map(PluginConfig::RateLimit),
        RawPlugin::Cors(raw) => cors(raw, &mut errors).map(PluginConfig::Cors),
        RawPlugin::Custom { name, settings } => match custom.check(name, settings) {
            Some(Ok(())) => Some(PluginConfig::Custom(CustomPluginConfig {
                name: name.clone(),
                settings: settings.clone(),
                line: place.referenced.line(),
                column: place.referenced.column(),
            })),
            Some(Err(why)) => {
                errors.push(why);
                None
            }
            None => {
                let mut known: Vec<String> =
                    BUILTIN_PLUGINS.iter().map(|n| n.to_string()).collect();
                known.extend(custom.names());
                problems.at(
                    place,
                    format!(
                        "route {prefix}: unknown plugin {name:?} (plugins: {})",
                        known.join(", ")
                    ),
                );
                return None;
            }
        },
    };
    let name = place.value.name();
    for why in &errors {
        problems.at(place, format!("route {prefix}: plugin {name}: {why}"));
    }
    plugin.filter(|_| errors.is_empty())
}

fn header_name(name: &str, what: &str, errors: &mut Vec<String>) -> Option<HeaderName> {
    match HeaderName::from_bytes(name.as_bytes()) {
        Ok(name) => Some(name),
        Err(_) => {
            errors.push(format!("{what}: invalid header name {name:?}"));
            None
        }
    }
}

fn header_edits(raw: &RawHeaderEdits, side: &str, errors: &mut Vec<String>) -> HeaderEdits {
    let mut out = HeaderEdits::default();
    for (name, value) in &raw.set {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(name), Ok(value)) => out.set.push((name, value)),
            _ => errors.push(format!("{side}.set: invalid header {name:?}: {value:?}")),
        }
    }
    for name in &raw.remove {
        out.remove
            .extend(header_name(name, &format!("{side}.remove"), errors));
    }
    out
}

fn ip_filter(raw: &RawIpFilter, errors: &mut Vec<String>) -> IpFilterConfig {
    let mut nets = |list: &[String], what: &str| {
        list.iter()
            .filter_map(|entry| {
                cidr(entry)
                    .map_err(|why| errors.push(format!("{what}: {why}")))
                    .ok()
            })
            .collect()
    };
    let allow = nets(&raw.allow, "allow");
    let deny = nets(&raw.deny, "deny");
    if raw.allow.is_empty() && raw.deny.is_empty() {
        errors.push("give allow, deny or both (an empty filter allows everything)".to_owned());
    }
    IpFilterConfig { allow, deny }
}

fn api_key(raw: &RawApiKey, base_dir: &Path, errors: &mut Vec<String>) -> Option<ApiKeyConfig> {
    let header = header_name(
        raw.header.as_deref().unwrap_or(defaults::API_KEY_HEADER),
        "header",
        errors,
    )?;
    let mut entries: Vec<RawApiKeyEntry> = raw.keys.clone();
    if let Some(file) = &raw.keys_file {
        let path = beside(base_dir, file);
        match std::fs::read_to_string(&path) {
            Ok(text) => match serde_saphyr::from_str::<Vec<RawApiKeyEntry>>(&text) {
                Ok(more) => entries.extend(more),
                Err(err) => errors.push(format!(
                    "keys_file {}: expected a list of {{ name, sha256 }}: {}",
                    path.display(),
                    err.to_string().lines().next().unwrap_or_default()
                )),
            },
            Err(err) => errors.push(format!("keys_file: cannot read {}: {err}", path.display())),
        }
    }
    if entries.is_empty() {
        errors.push("no keys: give keys or keys_file".to_owned());
    }
    let mut keys: Vec<ApiKeyEntry> = Vec::with_capacity(entries.len());
    for entry in entries {
        let Some(sha256) = hex32(&entry.sha256) else {
            errors.push(format!(
                "key {:?}: sha256 must be 64 hex digits (the SHA-256 of the key, e.g. `printf %s KEY | sha256sum`)",
                entry.name
            ));
            continue;
        };
        if entry.name.trim().is_empty() {
            errors.push("a key needs a name (the consumer it stands for)".to_owned());
            continue;
        }
        if keys.iter().any(|k| k.sha256 == sha256) {
            errors.push(format!(
                "key {:?}: the same key is listed twice",
                entry.name
            ));
            continue;
        }
        keys.push(ApiKeyEntry {
            name: entry.name,
            sha256,
        });
    }
    Some(ApiKeyConfig { header, keys })
}

/// 64 hex digits as 32 bytes.
fn hex32(text: &str) -> Option<[u8; 32]> {
    let text = text.trim().as_bytes();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(text.chunks(2)) {
        let digit = |c: u8| (c as char).to_digit(16);
        *byte = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

fn jwt(raw: &RawJwt, base_dir: &Path, errors: &mut Vec<String>) -> Option<JwtConfig> {
    let algorithms: Vec<String> = if raw.algorithms.is_empty() {
        vec!["RS256".to_owned()]
    } else {
        raw.algorithms.clone()
    };
    for alg in &algorithms {
        if !ASYMMETRIC.contains(&alg.as_str()) && !HMAC.contains(&alg.as_str()) {
            errors.push(format!(
                "unknown algorithm {alg:?} (allowed: {}, {})",
                ASYMMETRIC.join(", "),
                HMAC.join(", ")
            ));
        }
    }
    let hmac = algorithms.iter().any(|a| HMAC.contains(&a.as_str()));
    let asymmetric = algorithms.iter().any(|a| ASYMMETRIC.contains(&a.as_str()));
    let sources = [
        raw.jwks_file.is_some(),
        raw.jwks_url.is_some(),
        raw.secret_env.is_some(),
    ];
    if sources.iter().filter(|s| **s).count() != 1 {
        errors.push("give exactly one of jwks_file, jwks_url, secret_env".to_owned());
        return None;
    }
    let keys = if let Some(env) = &raw.secret_env {
        if asymmetric {
            errors.push(
                "secret_env is an HMAC secret: allow only HS256/HS384/HS512 with it".to_owned(),
            );
        }
        match std::env::var(env) {
            Ok(secret) if secret.len() >= 32 => JwtKeys::Secret {
                env: env.clone(),
                secret: Secret::new(secret),
            },
            Ok(_) => {
                errors.push(format!(
                    "secret_env {env}: the secret must be at least 32 bytes"
                ));
                return None;
            }
            Err(_) => {
                errors.push(format!(
                    "secret_env {env}: the environment variable is not set"
                ));
                return None;
            }
        }
    } else {
        if hmac {
            // An HMAC algorithm with a key set would let a public key be
            // used as a shared secret (key confusion).
            errors.push("HS256/HS384/HS512 only with secret_env, never with a JWKS".to_owned());
        }
        if let Some(file) = &raw.jwks_file {
            let path = beside(base_dir, file);
            match std::fs::read_to_string(&path) {
                Ok(document) => {
                    let parsed: Result<serde_json::Value, _> = serde_json::from_str(&document);
                    match parsed {
                        Ok(value) if value.get("keys").is_some_and(|k| k.is_array()) => {
                            JwtKeys::Jwks {
                                file: path.display().to_string(),
                                document,
                            }
                        }
                        _ => {
                            errors.push(format!(
                                "jwks_file {}: not a JWKS document ({{\"keys\": [...]}})",
                                path.display()
                            ));
                            return None;
                        }
                    }
                }
                Err(err) => {
                    errors.push(format!("jwks_file: cannot read {}: {err}", path.display()));
                    return None;
                }
            }
        } else {
            let url = raw.jwks_url.clone().unwrap_or_default();
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                errors.push(format!(
                    "jwks_url {url:?} must be an http:// or https:// URL"
                ));
            }
            let refresh = raw.jwks_refresh.map_or(defaults::JWKS_REFRESH, |d| d.0);
            if refresh < Duration::from_secs(1) {
                errors.push("jwks_refresh must be at least 1s".to_owned());
            }
            JwtKeys::JwksUrl { url, refresh }
        }
    };
    let forward_claims = raw
        .forward_claims
        .iter()
        .filter_map(|(claim, header)| {
            header_name(header, &format!("forward_claims.{claim}"), errors)
                .map(|name| (claim.clone(), name))
        })
        .collect();
    Some(JwtConfig {
        issuer: raw.issuer.clone(),
        audiences: raw.audiences.clone(),
        algorithms,
        keys,
        leeway: raw.leeway.map_or(defaults::JWT_LEEWAY, |d| d.0),
        forward_claims,
        forward_authorization: raw.forward_authorization.unwrap_or(true),
    })
}

fn rate_limit(raw: &RawRateLimit, errors: &mut Vec<String>) -> Option<RateLimitConfig> {
    let key = match raw.key.as_deref().unwrap_or("client_ip") {
        "client_ip" => RateLimitKey::ClientIp,
        "consumer" => RateLimitKey::Consumer,
        other => match other.strip_prefix("header:") {
            Some(name) => RateLimitKey::Header(header_name(name.trim(), "key", errors)?),
            None => {
                errors.push(format!(
                    "key {other:?}: use client_ip, consumer or header:NAME"
                ));
                return None;
            }
        },
    };
    if raw.requests == 0 {
        errors.push("requests must be at least 1".to_owned());
    }
    if raw.per.0.is_zero() {
        errors.push("per must be greater than zero".to_owned());
    }
    let max_keys = raw.max_keys.unwrap_or(defaults::RATE_LIMIT_MAX_KEYS);
    if max_keys == 0 {
        errors.push("max_keys must be at least 1".to_owned());
    }
    Some(RateLimitConfig {
        key,
        requests: raw.requests,
        per: raw.per.0,
        burst: raw.burst.unwrap_or(0),
        max_keys,
    })
}

fn cors(raw: &RawCors, errors: &mut Vec<String>) -> Option<CorsConfig> {
    let any_origin = raw.allow_origins.iter().any(|o| o == "*");
    let mut allow_origins = Vec::new();
    for origin in raw.allow_origins.iter().filter(|o| *o != "*") {
        let scheme_ok = origin.starts_with("https://") || origin.starts_with("http://");
        match HeaderValue::from_str(origin) {
            Ok(value) if scheme_ok && !origin.ends_with('/') => allow_origins.push(value),
            _ => errors.push(format!(
                "allow_origins: {origin:?} is not an origin (scheme://host[:port], no path)"
            )),
        }
    }
    if raw.allow_origins.is_empty() {
        errors.push("allow_origins: give at least one origin (or \"*\")".to_owned());
    }
    let allow_credentials = raw.allow_credentials.unwrap_or(false);
    if any_origin && allow_credentials {
        errors.push(
            "allow_credentials cannot go with allow_origins \"*\" (browsers refuse it)".to_owned(),
        );
    }
    let methods = if raw.allow_methods.is_empty() {
        vec!["GET".to_owned(), "HEAD".to_owned(), "POST".to_owned()]
    } else {
        raw.allow_methods.clone()
    };
    let allow_methods = methods
        .iter()
        .filter_map(|m| {
            m.to_ascii_uppercase()
                .parse::<http::Method>()
                .map_err(|_| errors.push(format!("allow_methods: invalid method {m:?}")))
                .ok()
        })
        .collect();
    let names = |list: &[String], what: &str, errors: &mut Vec<String>| -> Vec<HeaderName> {
        list.iter()
            .filter_map(|name| header_name(name, what, errors))
            .collect()
    };
    Some(CorsConfig {
        allow_origins,
        any_origin,
        allow_methods,
        allow_headers: names(&raw.allow_headers, "allow_headers", errors),
        expose_headers: names(&raw.expose_headers, "expose_headers", errors),
        max_age: raw.max_age.map(|d| d.0),
        allow_credentials,
    })
}
