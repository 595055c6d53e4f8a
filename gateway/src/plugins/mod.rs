//! Request and response policies, configured per route.
//!
//! A [`Plugin`] is built once per configuration version from its validated
//! settings ([`build`]), then shared by every request on its route. The
//! proxy calls its hooks in route order at three points of the request:
//! before an upstream is chosen ([`Plugin::request_filter`], which may
//! answer the request itself, e.g. an auth check), on the request about to
//! go upstream ([`Plugin::upstream_request_filter`]) and on the response
//! header about to go downstream ([`Plugin::response_filter`]).
//!
//! Adding a plugin: a variant in `config::raw::RawPlugin` (its YAML), one in
//! `config::PluginConfig` (validated), a module here implementing the trait,
//! and an arm in [`build`].

use std::sync::Arc;

use async_trait::async_trait;
use http::StatusCode;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::ServerSession;

use crate::config::PluginConfig;

mod headers;

/// An answer a plugin gives instead of proxying, rendered like every other
/// gateway error: `{"detail": ..., "request_id": ...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    pub detail: String,
}

/// A per-route request/response policy.
#[async_trait]
pub trait Plugin: Send + Sync {
    /// Name used in logs.
    fn name(&self) -> &'static str;

    /// After routing, before upstream selection. `Ok(None)`: continue with
    /// the next plugin and then the upstream; `Ok(Some(rejection))`: answer
    /// the client with it and stop; `Err`: the request fails with a 500.
    async fn request_filter(
        &self,
        _session: &mut ServerSession,
    ) -> pingora::Result<Option<Rejection>> {
        Ok(None)
    }

    /// On the request header about to be sent upstream (path already
    /// rewritten, forwarding headers already set).
    fn upstream_request_filter(&self, _request: &mut RequestHeader) -> pingora::Result<()> {
        Ok(())
    }

    /// On the upstream's response header before it goes downstream.
    fn response_filter(&self, _response: &mut ResponseHeader) -> pingora::Result<()> {
        Ok(())
    }
}

/// A route's plugins, in the order the file lists them.
pub type PluginChain = Vec<Arc<dyn Plugin>>;

/// Builds the plugin a validated configuration describes.
pub fn build(config: &PluginConfig) -> Arc<dyn Plugin> {
    match config {
        PluginConfig::Headers(settings) => Arc::new(headers::Headers::new(settings.clone())),
    }
}
