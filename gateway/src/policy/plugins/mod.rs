//! Request and response policies, configured per route: the [`Plugin`]
//! trait, the chain that runs a route's plugins, and the registry of the
//! plugins a program adds to the built-in ones.
//!
//! # The contract
//!
//! A route lists its plugins in `gateway.yaml`; they run in that order. For
//! each request on the route, after routing and the route's declared body
//! limit:
//!
//! 1. **request** ([`Plugin::request_filter`]), before an instance is
//!    chosen. [`Verdict::Continue`] goes on to the next plugin, then the
//!    upstream; [`Verdict::Respond`] answers the client at once (no later
//!    plugin's request hook runs, nothing goes upstream);
//!    [`Verdict::Defer`] asks the proxy to await the plugin's
//!    [`Plugin::request_filter_async`], whose verdict then counts. Only a
//!    plugin that must wait for something (a key set to fetch) defers, and
//!    only when it must: the others cost no allocation and no `await`.
//! 2. **upstream request** ([`Plugin::upstream_request_filter`]), on the
//!    header about to go upstream (path rewritten, forwarding headers set),
//!    once per attempt: a retry builds the header again.
//! 3. **response** ([`Plugin::response_filter`]), on the response header
//!    about to go to the client: the upstream's, or the gateway's own
//!    answer (a plugin's answer, a 502 ...). It runs for every plugin whose
//!    request hook ran, the one that answered included, in route order.
//!
//! Every hook gets the request's [`PluginContext`]: the client's request
//! header, the request id, the client address as the gateway trusts it,
//! the route, and an extension map where a hook leaves typed data for a
//! later hook (its own or another plugin's), e.g. verified token claims.
//! An `Err` from hook 2 or 3 fails the request with a 500 (logged with the
//! plugin's name).
//!
//! Where a response-body hook would go: `proxy::exchange`, in the loop that
//! streams the upstream's body to the client, chunk by chunk (none exists
//! yet).
//!
//! # State across reloads
//!
//! A route's plugins are built when a configuration version is built. A
//! plugin whose route (same prefix) and settings are unchanged from the
//! running version is not built again: the new version shares the same
//! instance, so its state (a rate limiter's buckets, a cached key set, a
//! counter) lives on, as health state does. Changed settings build a new
//! plugin.
//!
//! # Adding a plugin
//!
//! Outside the gateway: implement [`Plugin`] and a [`PluginFactory`], and
//! register the factory in a [`PluginRegistry`] under the name used in the
//! file (`gateway/examples/request_counter.rs` is a whole program). Its
//! settings arrive as JSON, checked when the file is loaded.
//! Built-in: a variant in `gateway_config::raw::RawPlugin` (typed YAML with
//! located errors), one in `PluginConfig`, a module here, an arm in
//! [`PluginChain::build`].

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use http::Extensions;
use pingora::http::{RequestHeader, ResponseHeader};

use crate::config::{CustomPlugins, PluginConfig};
pub use crate::errors::Answer;

mod api_key;
mod cors;
mod headers;
mod ip_filter;
mod jwt;
mod rate_limit;

/// What a request hook decided.
#[derive(Debug)]
pub enum Verdict {
    /// Go on: the next plugin, then the upstream.
    Continue,
    /// Answer the client with this and stop.
    Respond(Answer),
    /// Await [`Plugin::request_filter_async`] for the verdict.
    Defer,
}

/// A boxed future, as [`Plugin::request_filter_async`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What every hook knows of the request it runs for.
pub struct PluginContext<'r> {
    request: &'r RequestHeader,
    request_id: &'r str,
    client_addr: Option<IpAddr>,
    route: &'r str,
    service: &'r str,
    extensions: &'r mut Extensions,
}

/// Who a request is from, as an auth plugin established it (an API key's
/// name, a token's subject); kept in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumer(pub Arc<str>);

impl<'r> PluginContext<'r> {
    /// A context for `request` on the route `route` (its prefix as written)
    /// to `service`. The proxy makes these; so can a plugin's tests.
    pub fn new(
        request: &'r RequestHeader,
        request_id: &'r str,
        client_addr: Option<IpAddr>,
        route: &'r str,
        service: &'r str,
        extensions: &'r mut Extensions,
    ) -> Self {
        PluginContext {
            request,
            request_id,
            client_addr,
            route,
            service,
            extensions,
        }
    }

    /// Who the request is from, as an auth plugin before established it.
    pub fn consumer(&self) -> Option<&Arc<str>> {
        self.extensions.get::<Consumer>().map(|c| &c.0)
    }

    /// Records who the request is from: later plugins (`rate_limit` with
    /// `key: consumer`) and the access log see it.
    pub fn set_consumer(&mut self, consumer: Arc<str>) {
        self.extensions.insert(Consumer(consumer));
    }

    /// The client's request header, as received.
    pub fn request(&self) -> &RequestHeader {
        self.request
    }

    pub fn request_id(&self) -> &str {
        self.request_id
    }

    /// The client's address as the gateway trusts it: the connection's
    /// peer, or what a proxy in `trusted_proxies` forwarded.
    pub fn client_addr(&self) -> Option<IpAddr> {
        self.client_addr
    }

    /// The route's prefix, as written in the file.
    pub fn route(&self) -> &str {
        self.route
    }

    /// The route's service.
    pub fn service(&self) -> &str {
        self.service
    }

    /// Data hooks left for later hooks, by type.
    pub fn extensions(&self) -> &Extensions {
        self.extensions
    }

    pub fn extensions_mut(&mut self) -> &mut Extensions {
        self.extensions
    }
}

/// A per-route request/response policy. See the module documentation for
/// when each hook runs.
pub trait Plugin: Send + Sync + 'static {
    /// Name used in logs.
    fn name(&self) -> &str;

    /// After routing, before an instance is chosen; synchronous.
    fn request_filter(&self, _ctx: &mut PluginContext<'_>) -> Verdict {
        Verdict::Continue
    }

    /// Awaited only after [`Self::request_filter`] returned
    /// [`Verdict::Defer`]. Returning `Defer` again is a bug: the request
    /// fails with a 500 (a policy never lets a request through by mistake).
    fn request_filter_async<'a>(
        &'a self,
        _ctx: &'a mut PluginContext<'_>,
    ) -> BoxFuture<'a, Verdict> {
        Box::pin(std::future::ready(Verdict::Continue))
    }

    /// On the request header about to go upstream, once per attempt.
    fn upstream_request_filter(
        &self,
        _request: &mut RequestHeader,
        _ctx: &mut PluginContext<'_>,
    ) -> pingora::Result<()> {
        Ok(())
    }

    /// On the response header about to go to the client.
    fn response_filter(
        &self,
        _response: &mut ResponseHeader,
        _ctx: &mut PluginContext<'_>,
    ) -> pingora::Result<()> {
        Ok(())
    }

    /// What `/admin/config` shows of the plugin's state (never a secret),
    /// e.g. when its key set was last fetched.
    fn status(&self) -> Option<serde_json::Value> {
        None
    }
}

/// Builds a registered plugin from its settings in the file.
pub trait PluginFactory: Send + Sync {
    /// Whether `settings` are valid, without building (`gateway check`, and
    /// every load). By default: building succeeds.
    fn check(&self, settings: &serde_json::Value) -> Result<(), String> {
        self.build(settings).map(drop)
    }

    /// A plugin for one route of one configuration version.
    fn build(&self, settings: &serde_json::Value) -> Result<Arc<dyn Plugin>, String>;
}

/// The plugins a program adds to the built-in ones, by name.
#[derive(Clone, Default)]
pub struct PluginRegistry {
    factories: BTreeMap<String, Arc<dyn PluginFactory>>,
}

impl PluginRegistry {
    /// The built-in plugins only.
    pub fn builtin() -> Self {
        PluginRegistry::default()
    }

    /// Adds `factory` as the plugin `name`, replacing one registered
    /// before under that name. A built-in plugin's name (`headers`) always
    /// means the built-in plugin.
    pub fn register(mut self, name: &str, factory: impl PluginFactory + 'static) -> Self {
        self.factories.insert(name.to_owned(), Arc::new(factory));
        self
    }

    fn factory(&self, name: &str) -> Option<&Arc<dyn PluginFactory>> {
        self.factories.get(name)
    }
}

impl CustomPlugins for PluginRegistry {
    fn check(&self, name: &str, settings: &serde_json::Value) -> Option<Result<(), String>> {
        self.factory(name).map(|factory| factory.check(settings))
    }

    fn names(&self) -> Vec<String> {
        self.factories.keys().cloned().collect()
    }
}

/// A plugin of a chain with the settings it was built from.
struct Link {
    config: PluginConfig,
    plugin: Arc<dyn Plugin>,
}

/// A route's plugins, in the order the file lists them.
#[derive(Default)]
pub struct PluginChain {
    links: Vec<Link>,
}

/// Why a request hook stopped the request.
#[derive(Debug)]
pub enum Stop {
    /// A plugin answered.
    Answer(Answer),
    /// A plugin broke its contract (deferred twice).
    Broken(String),
}

impl PluginChain {
    /// The chain for `configs`, reusing each plugin of `previous` (the
    /// running version's chain for the same route) whose settings are
    /// equal, so it keeps its state.
    pub fn build(
        configs: &[PluginConfig],
        previous: Option<&PluginChain>,
        registry: &PluginRegistry,
    ) -> Result<PluginChain, String> {
        let mut reusable: Vec<&Link> = previous
            .map(|p| p.links.iter().collect())
            .unwrap_or_default();
        let mut links = Vec::with_capacity(configs.len());
        for config in configs {
            let plugin = match reusable.iter().position(|link| link.config == *config) {
                Some(at) => Arc::clone(&reusable.remove(at).plugin),
                None => build_one(config, registry)?,
            };
            links.push(Link {
                config: config.clone(),
                plugin,
            });
        }
        Ok(PluginChain { links })
    }

    pub fn len(&self) -> usize {
        self.links.len()
    }

    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// The plugins, in order.
    pub fn plugins(&self) -> impl Iterator<Item = &Arc<dyn Plugin>> {
        self.links.iter().map(|link| &link.plugin)
    }

    /// Each plugin's name and status, for `/admin/config`.
    pub fn describe(&self) -> Vec<serde_json::Value> {
        self.links
            .iter()
            .map(|link| {
                let mut entry = serde_json::json!({ "name": link.config.name() });
                if let Some(status) = link.plugin.status() {
                    entry["status"] = status;
                }
                entry
            })
            .collect()
    }

    /// Runs the request hooks in order; `ran` counts the plugins whose
    /// hook ran (their response hooks will run).
    pub async fn request_hooks(
        &self,
        ctx: &mut PluginContext<'_>,
        ran: &mut usize,
    ) -> Result<(), Stop> {
        for link in &self.links {
            *ran += 1;
            let verdict = match link.plugin.request_filter(ctx) {
                Verdict::Defer => match link.plugin.request_filter_async(ctx).await {
                    Verdict::Defer => {
                        return Err(Stop::Broken(format!(
                            "plugin {} deferred from its asynchronous hook",
                            link.plugin.name()
                        )));
                    }
                    verdict => verdict,
                },
                verdict => verdict,
            };
            match verdict {
                Verdict::Continue | Verdict::Defer => {}
                Verdict::Respond(answer) => {
                    tracing::debug!(plugin = link.plugin.name(), status = %answer.status, "plugin answered");
                    return Err(Stop::Answer(answer));
                }
            }
        }
        Ok(())
    }

    /// Runs the upstream request hooks of every plugin, in order.
    pub fn upstream_request_hooks(
        &self,
        request: &mut RequestHeader,
        ctx: &mut PluginContext<'_>,
    ) -> pingora::Result<()> {
        for link in &self.links {
            link.plugin
                .upstream_request_filter(request, ctx)
                .inspect_err(|e| tracing::warn!(plugin = link.plugin.name(), error = %e, "upstream request hook failed"))?;
        }
        Ok(())
    }

    /// Runs the response hooks of the first `ran` plugins, in order.
    pub fn response_hooks(
        &self,
        response: &mut ResponseHeader,
        ctx: &mut PluginContext<'_>,
        ran: usize,
    ) -> pingora::Result<()> {
        for link in self.links.iter().take(ran) {
            link.plugin.response_filter(response, ctx).inspect_err(
                |e| tracing::warn!(plugin = link.plugin.name(), error = %e, "response hook failed"),
            )?;
        }
        Ok(())
    }
}

fn build_one(config: &PluginConfig, registry: &PluginRegistry) -> Result<Arc<dyn Plugin>, String> {
    match config {
        PluginConfig::Headers(settings) => Ok(Arc::new(headers::Headers::new(settings.clone()))),
        PluginConfig::IpFilter(settings) => Ok(Arc::new(ip_filter::IpFilter::new(settings))),
        PluginConfig::ApiKey(settings) => Ok(Arc::new(api_key::ApiKey::new(settings))),
        PluginConfig::Jwt(settings) => Ok(Arc::new(jwt::Jwt::new(settings)?)),
        PluginConfig::RateLimit(settings) => Ok(Arc::new(rate_limit::RateLimit::new(settings)?)),
        PluginConfig::Cors(settings) => Ok(Arc::new(cors::Cors::new(settings))),
        PluginConfig::Custom(custom) => {
            let factory = registry
                .factory(&custom.name)
                .ok_or_else(|| format!("unknown plugin {:?}", custom.name))?;
            factory.build(&custom.settings).map_err(|why| {
                format!(
                    "plugin {} (line {}, column {}): {why}",
                    custom.name, custom.line, custom.column
                )
            })
        }
    }
}

#[cfg(test)]
mod tests;
