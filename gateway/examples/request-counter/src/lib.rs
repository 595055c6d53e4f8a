//! A plugin written outside the gateway, as a user of the gateway crate
//! would write one: `request_counter` counts the requests of its route.
//!
//! ```yaml
//! routes:
//!   - prefix: /api
//!     service: echo
//!     plugins:
//!       - request_counter: { header: x-request-count, limit: 1000 }
//! ```
//!
//! - Its request hook numbers the request and leaves the number in the
//!   request's context; its upstream request hook and its response hook
//!   read it there and send it as `header`, so the upstream and the client
//!   both see it.
//! - Past `limit` requests it answers `429` itself, with `Retry-After`.
//! - The count lives in the plugin: a reload that leaves this route's
//!   plugin settings alone keeps the same plugin, so the count goes on;
//!   changed settings start a new plugin from zero.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use gateway::pingora::http::{RequestHeader, ResponseHeader};
use gateway::policy::plugins::{
    Answer, Plugin, PluginContext, PluginFactory, PluginRegistry, Verdict,
};
use http::{HeaderName, HeaderValue, StatusCode};

/// The plugin's name in `gateway.yaml`.
pub const NAME: &str = "request_counter";
/// The header the number goes in, unless `header` says otherwise.
pub const DEFAULT_HEADER: &str = "x-request-count";

/// The built-in plugins, and this one.
pub fn registry() -> PluginRegistry {
    PluginRegistry::builtin().register(NAME, RequestCounterFactory)
}

pub struct RequestCounter {
    header: HeaderName,
    limit: Option<u64>,
    seen: AtomicU64,
}

/// What the request hook leaves for the later hooks.
#[derive(Debug, Clone, Copy)]
struct RequestNumber(u64);

impl RequestCounter {
    fn number_header(&self, ctx: &PluginContext<'_>) -> Option<HeaderValue> {
        let RequestNumber(n) = *ctx.extensions().get::<RequestNumber>()?;
        Some(HeaderValue::from(n))
    }
}

impl Plugin for RequestCounter {
    fn name(&self) -> &str {
        NAME
    }

    fn request_filter(&self, ctx: &mut PluginContext<'_>) -> Verdict {
        let n = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
        ctx.extensions_mut().insert(RequestNumber(n));
        match self.limit {
            Some(limit) if n > limit => Verdict::Respond(
                Answer::new(StatusCode::TOO_MANY_REQUESTS)
                    .with_detail(format!("Request limit of {limit} reached"))
                    .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("60")),
            ),
            _ => Verdict::Continue,
        }
    }

    fn upstream_request_filter(
        &self,
        request: &mut RequestHeader,
        ctx: &mut PluginContext<'_>,
    ) -> gateway::pingora::Result<()> {
        match self.number_header(ctx) {
            Some(value) => request.insert_header(self.header.clone(), value),
            None => Ok(()),
        }
    }

    fn response_filter(
        &self,
        response: &mut ResponseHeader,
        ctx: &mut PluginContext<'_>,
    ) -> gateway::pingora::Result<()> {
        match self.number_header(ctx) {
            Some(value) => response.insert_header(self.header.clone(), value),
            None => Ok(()),
        }
    }
}

/// Builds `request_counter` from `{ header: NAME, limit: N }` (both
/// optional).
pub struct RequestCounterFactory;

impl RequestCounterFactory {
    fn parse(settings: &serde_json::Value) -> Result<(HeaderName, Option<u64>), String> {
        let empty = serde_json::Map::new();
        let map = match settings {
            serde_json::Value::Null => &empty,
            serde_json::Value::Object(map) => map,
            _ => return Err("expected a map: { header: ..., limit: ... }".to_owned()),
        };
        if let Some(key) = map
            .keys()
            .find(|key| !["header", "limit"].contains(&key.as_str()))
        {
            return Err(format!("unknown setting {key:?} (settings: header, limit)"));
        }
        let header = match map.get("header") {
            None => DEFAULT_HEADER,
            Some(serde_json::Value::String(name)) => name.as_str(),
            Some(_) => return Err("header must be a header name".to_owned()),
        };
        let header = HeaderName::from_bytes(header.as_bytes())
            .map_err(|_| format!("header {header:?} is not a valid header name"))?;
        let limit = match map.get("limit") {
            None => None,
            Some(limit) => Some(
                limit
                    .as_u64()
                    .ok_or_else(|| "limit must be a whole number".to_owned())?,
            ),
        };
        Ok((header, limit))
    }
}

impl PluginFactory for RequestCounterFactory {
    fn check(&self, settings: &serde_json::Value) -> Result<(), String> {
        Self::parse(settings).map(drop)
    }

    fn build(&self, settings: &serde_json::Value) -> Result<Arc<dyn Plugin>, String> {
        let (header, limit) = Self::parse(settings)?;
        Ok(Arc::new(RequestCounter {
            header,
            limit,
            seen: AtomicU64::new(0),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_requests_and_answers_past_the_limit() {
        let plugin = RequestCounterFactory
            .build(&serde_json::json!({"header": "x-n", "limit": 2}))
            .unwrap();
        let request = RequestHeader::build("GET", b"/", None).unwrap();
        let mut verdicts = Vec::new();
        for _ in 0..3 {
            let mut extensions = http::Extensions::new();
            let mut ctx = PluginContext::new(&request, "id", None, "/", "svc", &mut extensions);
            verdicts.push(plugin.request_filter(&mut ctx));
            let mut response = ResponseHeader::build(200, None).unwrap();
            plugin.response_filter(&mut response, &mut ctx).unwrap();
            assert!(response.headers.contains_key("x-n"));
        }
        assert!(matches!(verdicts[1], Verdict::Continue));
        let Verdict::Respond(answer) = &verdicts[2] else {
            panic!("not answered: {:?}", verdicts[2]);
        };
        assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    }

    #[test]
    fn settings_are_checked() {
        let factory = RequestCounterFactory;
        assert!(factory.check(&serde_json::Value::Null).is_ok());
        for bad in [
            serde_json::json!({"header": "bad header"}),
            serde_json::json!({"limit": -1}),
            serde_json::json!({"lmit": 1}),
            serde_json::json!([1]),
        ] {
            assert!(factory.check(&bad).is_err(), "{bad}");
        }
    }
}
