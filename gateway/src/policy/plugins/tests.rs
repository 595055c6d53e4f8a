//! The chain's contract: order, short-circuit, deferral, data handed from
//! hook to hook, and plugins kept across versions.

use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderValue, StatusCode};

use super::*;
use crate::config::CustomPluginConfig;

/// Verified claims, as an auth plugin would leave them.
#[derive(Clone, Debug, PartialEq)]
struct Claims {
    subject: String,
}

/// Leaves `Claims` for later hooks, from the `x-token` header.
struct Authenticate;

impl Plugin for Authenticate {
    fn name(&self) -> &str {
        "authenticate"
    }

    fn request_filter(&self, ctx: &mut PluginContext<'_>) -> Verdict {
        let Some(token) = ctx
            .request()
            .headers
            .get("x-token")
            .and_then(|v| v.to_str().ok())
        else {
            return Verdict::Respond(
                Answer::new(StatusCode::UNAUTHORIZED)
                    .with_detail("Missing token")
                    .with_header(
                        http::header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Token"),
                    ),
            );
        };
        let subject = token.to_owned();
        ctx.extensions_mut().insert(Claims { subject });
        Verdict::Continue
    }
}

/// Forwards the subject another plugin verified, and says so in the
/// response.
struct ForwardSubject;

impl Plugin for ForwardSubject {
    fn name(&self) -> &str {
        "forward-subject"
    }

    fn upstream_request_filter(
        &self,
        request: &mut RequestHeader,
        ctx: &mut PluginContext<'_>,
    ) -> pingora::Result<()> {
        if let Some(claims) = ctx.extensions().get::<Claims>() {
            request.insert_header("x-user", claims.subject.as_str())?;
        }
        Ok(())
    }

    fn response_filter(
        &self,
        response: &mut ResponseHeader,
        ctx: &mut PluginContext<'_>,
    ) -> pingora::Result<()> {
        let seen = ctx.extensions().get::<Claims>().is_some();
        response.insert_header("x-forwarded-subject", if seen { "yes" } else { "no" })
    }
}

/// Waits (a yield) before it decides, when the request asks for it.
struct Slow;

impl Plugin for Slow {
    fn name(&self) -> &str {
        "slow"
    }

    fn request_filter(&self, ctx: &mut PluginContext<'_>) -> Verdict {
        if ctx.request().headers.contains_key("x-slow") {
            Verdict::Defer
        } else {
            Verdict::Continue
        }
    }

    fn request_filter_async<'a>(
        &'a self,
        ctx: &'a mut PluginContext<'_>,
    ) -> BoxFuture<'a, Verdict> {
        Box::pin(async move {
            tokio::task::yield_now().await;
            match ctx.request().headers.get("x-slow").map(|v| v.as_bytes()) {
                Some(b"again") => Verdict::Defer,
                Some(b"no") => Verdict::Respond(Answer::new(StatusCode::FORBIDDEN)),
                _ => Verdict::Continue,
            }
        })
    }
}

fn chain(plugins: Vec<Arc<dyn Plugin>>) -> PluginChain {
    PluginChain {
        links: plugins
            .into_iter()
            .enumerate()
            .map(|(i, plugin)| Link {
                config: custom(&format!("p{i}"), serde_json::Value::Null),
                plugin,
            })
            .collect(),
    }
}

fn custom(name: &str, settings: serde_json::Value) -> PluginConfig {
    PluginConfig::Custom(CustomPluginConfig {
        name: name.to_owned(),
        settings,
        line: 1,
        column: 1,
    })
}

/// The three hooks of `chain` on `request`, as the proxy runs them: the
/// request's outcome, the upstream header (if it got that far) and the
/// response header.
async fn run(
    chain: &PluginChain,
    request: &RequestHeader,
) -> (Result<(), Stop>, Option<RequestHeader>, ResponseHeader) {
    let mut extensions = Extensions::new();
    let mut ctx = PluginContext::new(request, "rid", None, "/api", "svc", &mut extensions);
    let mut ran = 0;
    let outcome = chain.request_hooks(&mut ctx, &mut ran).await;
    let upstream = outcome.is_ok().then(|| {
        let mut upstream = request.clone();
        chain
            .upstream_request_hooks(&mut upstream, &mut ctx)
            .unwrap();
        upstream
    });
    let mut response = ResponseHeader::build(200, None).unwrap();
    chain.response_hooks(&mut response, &mut ctx, ran).unwrap();
    (outcome, upstream, response)
}

fn request(headers: &[(&str, &str)]) -> RequestHeader {
    let mut request = RequestHeader::build("GET", b"/api/x", None).unwrap();
    for (name, value) in headers {
        request.insert_header(name.to_string(), *value).unwrap();
    }
    request
}

#[tokio::test]
async fn a_plugin_leaves_data_in_the_context_for_a_later_hook() {
    let chain = chain(vec![Arc::new(Authenticate), Arc::new(ForwardSubject)]);
    let (outcome, upstream, response) = run(&chain, &request(&[("x-token", "alice")])).await;
    assert!(outcome.is_ok());
    assert_eq!(upstream.unwrap().headers["x-user"], "alice");
    assert_eq!(response.headers["x-forwarded-subject"], "yes");
}

#[tokio::test]
async fn an_answer_stops_the_chain_and_only_plugins_that_ran_see_the_response() {
    let chain = chain(vec![Arc::new(Authenticate), Arc::new(ForwardSubject)]);
    let (outcome, upstream, response) = run(&chain, &request(&[])).await;
    let Err(Stop::Answer(answer)) = outcome else {
        panic!("not answered: {outcome:?}");
    };
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.headers[0].1, "Token");
    assert!(upstream.is_none());
    assert!(
        response.headers.get("x-forwarded-subject").is_none(),
        "the second plugin's request hook never ran"
    );

    // In the other order the second plugin ran first: it sees the answer.
    let chain = self::chain(vec![Arc::new(ForwardSubject), Arc::new(Authenticate)]);
    let (_, _, response) = run(&chain, &request(&[])).await;
    assert_eq!(response.headers["x-forwarded-subject"], "no");
}

#[tokio::test]
async fn a_deferred_verdict_is_awaited_and_deferring_twice_fails_closed() {
    let chain = chain(vec![Arc::new(Slow), Arc::new(Authenticate)]);
    let (outcome, _, _) = run(&chain, &request(&[("x-slow", "yes"), ("x-token", "t")])).await;
    assert!(outcome.is_ok());
    let (outcome, _, _) = run(&chain, &request(&[("x-slow", "no"), ("x-token", "t")])).await;
    assert!(matches!(outcome, Err(Stop::Answer(a)) if a.status == StatusCode::FORBIDDEN));
    let (outcome, _, _) = run(&chain, &request(&[("x-slow", "again"), ("x-token", "t")])).await;
    assert!(matches!(outcome, Err(Stop::Broken(_))), "{outcome:?}");
}

/// Counts the requests it saw; its factory counts the plugins it built.
struct Counter(AtomicU64);

impl Plugin for Counter {
    fn name(&self) -> &str {
        "counter"
    }

    fn request_filter(&self, _ctx: &mut PluginContext<'_>) -> Verdict {
        self.0.fetch_add(1, Ordering::Relaxed);
        Verdict::Continue
    }
}

#[derive(Default)]
struct CounterFactory {
    built: Arc<AtomicU64>,
}

impl PluginFactory for CounterFactory {
    fn check(&self, settings: &serde_json::Value) -> Result<(), String> {
        settings
            .is_object()
            .then_some(())
            .ok_or_else(|| "expected a map".to_owned())
    }

    fn build(&self, _settings: &serde_json::Value) -> Result<Arc<dyn Plugin>, String> {
        self.built.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(Counter(AtomicU64::new(0))))
    }
}

#[tokio::test]
async fn unchanged_plugins_keep_their_instance_and_state_across_versions() {
    let factory = CounterFactory::default();
    let built = Arc::clone(&factory.built);
    let registry = PluginRegistry::builtin().register("counter", factory);
    assert_eq!(registry.names(), ["counter"]);
    assert_eq!(
        registry.check("counter", &serde_json::json!([])),
        Some(Err("expected a map".to_owned()))
    );
    assert_eq!(registry.check("nope", &serde_json::json!({})), None);

    let counter = custom("counter", serde_json::json!({"n": 1}));
    let v1 = PluginChain::build(std::slice::from_ref(&counter), None, &registry).unwrap();
    for _ in 0..3 {
        run(&v1, &request(&[])).await.0.unwrap();
    }
    // A version that adds a plugin in front keeps the counter.
    let headers = PluginConfig::Headers(Default::default());
    let v2 = PluginChain::build(&[headers, counter.clone()], Some(&v1), &registry).unwrap();
    assert_eq!(
        built.load(Ordering::Relaxed),
        1,
        "the counter was built again"
    );
    assert!(Arc::ptr_eq(v1.links[0].plugin(), v2.links[1].plugin()));
    run(&v2, &request(&[])).await.0.unwrap();
    // Changed settings: a new plugin, from zero.
    let changed = custom("counter", serde_json::json!({"n": 2}));
    let v3 = PluginChain::build(&[changed], Some(&v2), &registry).unwrap();
    assert_eq!(built.load(Ordering::Relaxed), 2);
    assert!(!Arc::ptr_eq(v2.links[1].plugin(), v3.links[0].plugin()));
}

impl Link {
    fn plugin(&self) -> &Arc<dyn Plugin> {
        &self.plugin
    }
}
