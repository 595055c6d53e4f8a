//! `api_key`: the request must carry a known key in `header` (default
//! `x-api-key`). Keys are stored as SHA-256 digests (never the key itself)
//! and compared in constant time. The key's `name` becomes the request's
//! consumer; the key header is removed before the request goes upstream.
//! Missing or unknown key: `401` with `WWW-Authenticate: ApiKey`.
//!
//! ```yaml
//! - api_key:
//!     header: x-api-key
//!     keys: [{ name: shop-frontend, sha256: "<hex of the key's SHA-256>" }]
//!     keys_file: keys.yaml     # more, the same list; read with the configuration
//! ```

use std::sync::Arc;

use http::{HeaderName, HeaderValue, StatusCode};
use pingora::http::RequestHeader;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Answer, Plugin, PluginContext, Verdict};
use crate::config::ApiKeyConfig;

pub struct ApiKey {
    header: HeaderName,
    keys: Vec<(Arc<str>, [u8; 32])>,
}

impl ApiKey {
    pub fn new(settings: &ApiKeyConfig) -> Self {
        ApiKey {
            header: settings.header.clone(),
            keys: settings
                .keys
                .iter()
                .map(|key| (Arc::from(key.name.as_str()), key.sha256))
                .collect(),
        }
    }

    /// The consumer whose key `presented` is. Every stored digest is
    /// compared, each in constant time.
    fn consumer(&self, presented: &[u8]) -> Option<&Arc<str>> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = None;
        for (name, stored) in &self.keys {
            if bool::from(digest.ct_eq(stored)) {
                found = Some(name);
            }
        }
        found
    }

    fn refuse(detail: &str) -> Verdict {
        Verdict::Respond(
            Answer::new(StatusCode::UNAUTHORIZED)
                .with_detail(detail)
                .with_header(
                    http::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("ApiKey"),
                ),
        )
    }
}

impl Plugin for ApiKey {
    fn name(&self) -> &str {
        "api_key"
    }

    fn request_filter(&self, ctx: &mut PluginContext<'_>) -> Verdict {
        let mut values = ctx.request().headers.get_all(&self.header).iter();
        let (Some(key), None) = (values.next(), values.next()) else {
            return Self::refuse("Missing API key");
        };
        match self.consumer(key.as_bytes()) {
            Some(name) => {
                let name = Arc::clone(name);
                ctx.set_consumer(name);
                Verdict::Continue
            }
            None => Self::refuse("Invalid API key"),
        }
    }

    fn upstream_request_filter(
        &self,
        request: &mut RequestHeader,
        _ctx: &mut PluginContext<'_>,
    ) -> pingora::Result<()> {
        request.remove_header(&self.header);
        Ok(())
    }

    fn status(&self) -> Option<serde_json::Value> {
        let consumers: Vec<&str> = self.keys.iter().map(|(name, _)| &**name).collect();
        Some(serde_json::json!({ "header": self.header.as_str(), "consumers": consumers }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiKeyEntry;

    #[test]
    fn a_key_is_known_by_its_digest_only() {
        let digest = |key: &str| -> [u8; 32] { Sha256::digest(key.as_bytes()).into() };
        let plugin = ApiKey::new(&ApiKeyConfig {
            header: HeaderName::from_static("x-api-key"),
            keys: vec![
                ApiKeyEntry {
                    name: "shop".into(),
                    sha256: digest("s3cret"),
                },
                ApiKeyEntry {
                    name: "ops".into(),
                    sha256: digest("other"),
                },
            ],
        });
        assert_eq!(plugin.consumer(b"s3cret").map(|n| &**n), Some("shop"));
        assert_eq!(plugin.consumer(b"other").map(|n| &**n), Some("ops"));
        assert_eq!(plugin.consumer(b"s3cre"), None);
        assert_eq!(plugin.consumer(b""), None);
    }
}
