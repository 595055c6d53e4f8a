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
    /// Worker threads of the proxy; default: the number of CPUs.
    #[serde(default)]
    pub threads: Option<Spanned<usize>>,
    #[serde(default)]
    pub health_check: RawHealthCheck,
    pub services: Spanned<BTreeMap<String, RawService>>,
    pub routes: Spanned<Vec<RawRoute>>,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub instances: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    pub load_balancing: Option<LoadBalancing>,
    #[serde(default)]
    pub health_check: RawHealthCheck,
    #[serde(default)]
    pub timeouts: RawTimeouts,
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub prefix: Spanned<String>,
    pub service: Spanned<String>,
    #[serde(default)]
    pub strip_prefix: Option<Spanned<String>>,
    #[serde(default)]
    pub plugins: Vec<RawPlugin>,
}

/// One plugin of a route, named by its key: `- headers: {...}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RawPlugin {
    /// Adds, replaces or removes request and response headers.
    Headers(RawHeadersPlugin),
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
