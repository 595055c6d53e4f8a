//! `jwt`: the request must carry `Authorization: Bearer <token>`, a JSON
//! Web Token signed by a key of the route's key set (a JWKS file or URL, or
//! an HMAC secret from the environment), with an allowed `alg`, unexpired
//! (`exp`, `nbf`, with `leeway`), from `issuer`, for one of `audiences`.
//!
//! - `alg: none` cannot pass (not an algorithm here); the algorithms of a
//!   JWKS are asymmetric only and an HMAC secret goes only with HS*, so a
//!   public key can never serve as a shared secret (key confusion); a key
//!   whose JWK names an `alg` is used for that one only.
//! - The token's `kid` picks the key. An unknown `kid` with a `jwks_url`
//!   fetches the set again (at most once per [`MIN_REFETCH`]) and the
//!   request waits for it, the one case where this plugin defers.
//! - A `jwks_url` is fetched at start, every `jwks_refresh`, and on an
//!   unknown `kid`; a failed fetch keeps the last good set and is logged
//!   and shown on `/admin/config`.
//! - Verified claims named in `forward_claims` go upstream as headers (any
//!   header of that name the client sent is removed first); `sub` becomes
//!   the request's consumer. Tokens are read from the header only, never
//!   from a query string.
//! - Refused: `401` with `WWW-Authenticate: Bearer` (no token) or
//!   `Bearer error="invalid_token"`.
//! - A verified token is remembered (up to [`CACHE_TOKENS`], keyed by the
//!   whole token, signature included) until its `exp`, as long as the key
//!   set it was verified with is the current one: a client sending the same
//!   token again costs a lookup, not a signature check.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use http::{HeaderName, HeaderValue, StatusCode};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use pingora::http::RequestHeader;
use serde_json::{Map, Value};
use tokio::sync::{Notify, watch};

use super::{Answer, BoxFuture, Plugin, PluginContext, Verdict};
use crate::config::{JwtConfig, JwtKeys};

/// A `jwks_url` is fetched at most this often for unknown `kid`s: a client
/// sending made-up key ids cannot make the gateway hammer the identity
/// provider.
pub const MIN_REFETCH: Duration = Duration::from_secs(10);
/// How long a request waits for a key set being fetched.
const FETCH_WAIT: Duration = Duration::from_secs(5);
/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Verified tokens remembered at most; past that the cache starts afresh.
pub const CACHE_TOKENS: usize = 10_000;

/// A verified token: its claims, until when it may be taken as verified,
/// and the key set generation it was verified with.
struct Verified {
    claims: Claims,
    /// Unix seconds: its `exp` (plus leeway).
    until: u64,
    generation: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Verified claims, for later hooks.
#[derive(Clone)]
pub struct Claims(pub Arc<Map<String, Value>>);

struct Key {
    decoding: DecodingKey,
    /// The JWK's own `alg`, if it names one.
    alg: Option<Algorithm>,
}

/// Keys by `kid`, and those without one.
#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, Key>,
    unnamed: Vec<Key>,
}

impl KeySet {
    /// The asymmetric keys of a JWKS document; others are skipped (logged).
    fn from_jwks(document: &str) -> Result<KeySet, String> {
        let value: Value =
            serde_json::from_str(document).map_err(|err| format!("not JSON: {err}"))?;
        let keys = value
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("not a JWKS document ({\"keys\": [...]})")?;
        let mut set = KeySet::default();
        for key in keys {
            let jwk: Jwk = match serde_json::from_value(key.clone()) {
                Ok(jwk) => jwk,
                Err(err) => {
                    tracing::warn!(error = %err, "jwt: a JWKS key could not be read: skipped");
                    continue;
                }
            };
            if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
                tracing::warn!("jwt: a symmetric key in a JWKS: skipped");
                continue;
            }
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|alg| format!("{alg:?}").parse::<Algorithm>().ok());
            let decoding = match DecodingKey::from_jwk(&jwk) {
                Ok(decoding) => decoding,
                Err(err) => {
                    tracing::warn!(error = %err, "jwt: a JWKS key is not usable: skipped");
                    continue;
                }
            };
            let key = Key { decoding, alg };
            match jwk.common.key_id {
                Some(kid) => {
                    set.by_kid.insert(kid, key);
                }
                None => set.unnamed.push(key),
            }
        }
        Ok(set)
    }

    fn len(&self) -> usize {
        self.by_kid.len() + self.unnamed.len()
    }

    /// The key for a token's `kid` (without one: the set's only key).
    fn find(&self, kid: Option<&str>) -> Option<&Key> {
        match kid {
            Some(kid) => self.by_kid.get(kid),
            None if self.len() == 1 => self.unnamed.first().or(self.by_kid.values().next()),
            None => None,
        }
    }
}

/// A key set fetched from a URL, kept fresh by a task on the control
/// runtime.
struct RemoteKeys {
    url: String,
    set: ArcSwap<KeySet>,
    /// Fetch attempts finished so far (requests waiting watch it).
    fetches: watch::Sender<u64>,
    /// Asks the task for a fetch now.
    wanted: Arc<Notify>,
    /// When an unknown `kid` last asked for a fetch, in milliseconds since
    /// `epoch` + 1 (0: never).
    last_requested: AtomicU64,
    epoch: Instant,
    status: Mutex<FetchStatus>,
}

#[derive(Default)]
struct FetchStatus {
    last_ok: Option<SystemTime>,
    last_error: Option<String>,
}

impl RemoteKeys {
    fn now_millis(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Whether an unknown `kid` may fetch the set again now: before the
    /// first fetch ended (the request waits for it), or once per
    /// [`MIN_REFETCH`].
    fn may_refetch(&self) -> bool {
        if *self.fetches.borrow() == 0 {
            return true;
        }
        match self.last_requested.load(Ordering::Relaxed) {
            0 => true,
            asked => self.now_millis() - asked >= MIN_REFETCH.as_millis() as u64,
        }
    }

    /// Waits (up to [`FETCH_WAIT`]) for the first fetch, or asks for one
    /// more and waits for it.
    async fn refetched(&self) {
        let mut fetches = self.fetches.subscribe();
        let seen = *fetches.borrow_and_update();
        if seen > 0 {
            self.last_requested
                .store(self.now_millis(), Ordering::Relaxed);
            self.wanted.notify_one();
        }
        let _ = tokio::time::timeout(FETCH_WAIT, fetches.wait_for(|n| *n > seen)).await;
    }

    async fn fetch(&self, client: &reqwest::Client) {
        let result = async {
            let response = client
                .get(&self.url)
                .send()
                .await
                .map_err(|err| format!("cannot fetch: {err}"))?;
            if !response.status().is_success() {
                return Err(format!("answered {}", response.status()));
            }
            let body = response
                .text()
                .await
                .map_err(|err| format!("cannot read: {err}"))?;
            KeySet::from_jwks(&body)
        }
        .await;
        {
            let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
            match result {
                Ok(set) => {
                    tracing::info!(url = %self.url, keys = set.len(), "jwt: key set fetched");
                    self.set.store(Arc::new(set));
                    status.last_ok = Some(SystemTime::now());
                    status.last_error = None;
                }
                Err(error) => {
                    tracing::warn!(url = %self.url, %error, keys = self.set.load().len(), "jwt: key set not fetched: keeping the last good one");
                    status.last_error = Some(error);
                }
            }
        }
        self.fetches.send_modify(|n| *n += 1);
    }
}

/// Fetches at once, then every `refresh` or when asked (requests ask at
/// most once per [`MIN_REFETCH`]), until the plugin is gone.
async fn keep_fresh(keys: Weak<RemoteKeys>, wanted: Arc<Notify>, refresh: Duration) {
    let client = match reqwest::Client::builder().timeout(FETCH_TIMEOUT).build() {
        Ok(client) => client,
        Err(err) => {
            tracing::error!(error = %err, "jwt: cannot build the HTTP client for jwks_url");
            return;
        }
    };
    loop {
        let Some(remote) = keys.upgrade() else {
            return;
        };
        remote.fetch(&client).await;
        drop(remote);
        tokio::select! {
            () = tokio::time::sleep(refresh) => {}
            () = wanted.notified() => {}
        }
    }
}

enum Keys {
    Fixed(KeySet),
    Remote(Arc<RemoteKeys>),
}

pub struct Jwt {
    algorithms: Vec<Algorithm>,
    /// One validation per allowed algorithm, built once.
    validations: Vec<(Algorithm, Validation)>,
    keys: Keys,
    forward_claims: Vec<(String, HeaderName)>,
    forward_authorization: bool,
    leeway: u64,
    verified: dashmap::DashMap<Box<str>, Verified>,
}

/// Why a token was refused (the `detail` of the 401).
fn refuse(detail: &str) -> Verdict {
    Verdict::Respond(
        Answer::new(StatusCode::UNAUTHORIZED)
            .with_detail(format!("Invalid token: {detail}"))
            .with_header(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            ),
    )
}

/// The token of `Authorization: Bearer <token>`.
fn bearer(request: &RequestHeader) -> Option<&str> {
    let value = request
        .headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// What the token's header says, if the token has the form of one.
fn token_header(token: &str) -> Result<jsonwebtoken::Header, Verdict> {
    jsonwebtoken::decode_header(token).map_err(|err| match err.kind() {
        ErrorKind::InvalidAlgorithmName => refuse("algorithm not allowed"),
        // A well-formed header naming no algorithm this library knows
        // (`none`, say): the algorithm is what is refused.
        _ if declared_alg(token).is_some() => refuse("algorithm not allowed"),
        _ => refuse("malformed"),
    })
}

/// The `alg` a token's header names, if its header is readable JSON.
fn declared_alg(token: &str) -> Option<String> {
    use base64::Engine as _;
    let header = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()?;
    let value: Value = serde_json::from_slice(&bytes).ok()?;
    value.get("alg")?.as_str().map(str::to_owned)
}

impl Jwt {
    pub fn new(settings: &JwtConfig) -> Result<Self, String> {
        let algorithms: Vec<Algorithm> = settings
            .algorithms
            .iter()
            .map(|alg| alg.parse().map_err(|_| format!("unknown algorithm {alg}")))
            .collect::<Result<_, _>>()?;
        let validations = algorithms
            .iter()
            .map(|alg| {
                let mut validation = Validation::new(*alg);
                validation.leeway = settings.leeway.as_secs();
                validation.validate_nbf = true;
                if let Some(issuer) = &settings.issuer {
                    validation.iss = Some(HashSet::from([issuer.clone()]));
                    validation.required_spec_claims.insert("iss".to_owned());
                }
                if settings.audiences.is_empty() {
                    validation.validate_aud = false;
                } else {
                    validation.set_audience(&settings.audiences);
                    validation.required_spec_claims.insert("aud".to_owned());
                }
                (*alg, validation)
            })
            .collect();
        let keys = match &settings.keys {
            JwtKeys::Jwks { document, .. } => Keys::Fixed(KeySet::from_jwks(document)?),
            JwtKeys::Secret { secret, .. } => {
                let mut set = KeySet::default();
                set.unnamed.push(Key {
                    decoding: DecodingKey::from_secret(secret.expose().as_bytes())
                        .map_err(|err| format!("secret_env: {err}"))?,
                    alg: None,
                });
                Keys::Fixed(set)
            }
            JwtKeys::JwksUrl { url, refresh } => {
                let runtime = tokio::runtime::Handle::try_current()
                    .map_err(|_| "jwks_url needs the control runtime".to_owned())?;
                let wanted = Arc::new(Notify::new());
                let remote = Arc::new(RemoteKeys {
                    url: url.clone(),
                    set: ArcSwap::from_pointee(KeySet::default()),
                    fetches: watch::channel(0).0,
                    wanted: Arc::clone(&wanted),
                    last_requested: AtomicU64::new(0),
                    epoch: Instant::now(),
                    status: Mutex::default(),
                });
                runtime.spawn(keep_fresh(Arc::downgrade(&remote), wanted, *refresh));
                Keys::Remote(remote)
            }
        };
        Ok(Jwt {
            algorithms,
            validations,
            keys,
            forward_claims: settings.forward_claims.clone(),
            forward_authorization: settings.forward_authorization,
            leeway: settings.leeway.as_secs(),
            verified: dashmap::DashMap::new(),
        })
    }

    /// Which key set is current: a fetched set replaces the one before.
    fn generation(&self) -> u64 {
        match &self.keys {
            Keys::Fixed(_) => 0,
            Keys::Remote(remote) => *remote.fetches.borrow(),
        }
    }

    /// `token`, verified from the cache or now.
    fn check(&self, token: &str) -> Result<Claims, Option<Verdict>> {
        let generation = self.generation();
        if let Some(hit) = self.verified.get(token)
            && hit.generation == generation
            && unix_now() <= hit.until
        {
            return Ok(hit.claims.clone());
        }
        let claims = self.verify(token)?;
        if let Some(exp) = claims.0.get("exp").and_then(Value::as_u64) {
            if self.verified.len() >= CACHE_TOKENS {
                self.verified.clear();
            }
            self.verified.insert(
                Box::from(token),
                Verified {
                    claims: claims.clone(),
                    until: exp.saturating_add(self.leeway),
                    generation,
                },
            );
        }
        Ok(claims)
    }

    /// Verifies `token` with the key set as it is now. `Err(None)`: the
    /// token's key is not in the set.
    fn verify(&self, token: &str) -> Result<Claims, Option<Verdict>> {
        let header = token_header(token).map_err(Some)?;
        let Some((alg, validation)) = self.validations.iter().find(|(alg, _)| *alg == header.alg)
        else {
            return Err(Some(refuse("algorithm not allowed")));
        };
        let remote_set;
        let set = match &self.keys {
            Keys::Fixed(set) => set,
            Keys::Remote(remote) => {
                remote_set = remote.set.load();
                &remote_set
            }
        };
        let key = set.find(header.kid.as_deref()).ok_or(None)?;
        if key.alg.is_some_and(|own| own != *alg) {
            return Err(Some(refuse("algorithm not allowed for this key")));
        }
        match jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, validation) {
            Ok(data) => Ok(Claims(Arc::new(data.claims))),
            Err(err) => Err(Some(refuse(match err.kind() {
                ErrorKind::ExpiredSignature => "expired",
                ErrorKind::ImmatureSignature => "not valid yet",
                ErrorKind::InvalidSignature => "bad signature",
                ErrorKind::InvalidAudience => "wrong audience",
                ErrorKind::InvalidIssuer => "wrong issuer",
                ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
                ErrorKind::InvalidAlgorithm => "algorithm not allowed",
                _ => "malformed",
            }))),
        }
    }

    fn accept(ctx: &mut PluginContext<'_>, claims: Claims) -> Verdict {
        if let Some(subject) = claims.0.get("sub").and_then(Value::as_str) {
            ctx.set_consumer(Arc::from(subject));
        }
        ctx.extensions_mut().insert(claims);
        Verdict::Continue
    }
}

impl Plugin for Jwt {
    fn name(&self) -> &str {
        "jwt"
    }

    fn request_filter(&self, ctx: &mut PluginContext<'_>) -> Verdict {
        let Some(token) = bearer(ctx.request()) else {
            return Verdict::Respond(
                Answer::new(StatusCode::UNAUTHORIZED)
                    .with_detail("Missing bearer token")
                    .with_header(
                        http::header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Bearer"),
                    ),
            );
        };
        match self.check(token) {
            Ok(claims) => Self::accept(ctx, claims),
            Err(Some(refused)) => refused,
            Err(None) => match &self.keys {
                Keys::Remote(remote) if remote.may_refetch() => Verdict::Defer,
                _ => refuse("unknown key"),
            },
        }
    }

    fn request_filter_async<'a>(
        &'a self,
        ctx: &'a mut PluginContext<'_>,
    ) -> BoxFuture<'a, Verdict> {
        Box::pin(async move {
            if let Keys::Remote(remote) = &self.keys {
                remote.refetched().await;
            }
            let Some(token) = bearer(ctx.request()) else {
                return refuse("malformed");
            };
            match self.check(token) {
                Ok(claims) => Self::accept(ctx, claims),
                Err(Some(refused)) => refused,
                Err(None) => refuse("unknown key"),
            }
        })
    }

    fn upstream_request_filter(
        &self,
        request: &mut RequestHeader,
        ctx: &mut PluginContext<'_>,
    ) -> pingora::Result<()> {
        for (_, header) in &self.forward_claims {
            request.remove_header(header);
        }
        if !self.forward_authorization {
            request.remove_header(&http::header::AUTHORIZATION);
        }
        let Some(Claims(claims)) = ctx.extensions().get::<Claims>() else {
            return Ok(());
        };
        for (claim, header) in &self.forward_claims {
            let text = match claims.get(claim) {
                Some(Value::String(text)) => text.clone(),
                Some(value @ (Value::Number(_) | Value::Bool(_))) => value.to_string(),
                _ => continue,
            };
            if let Ok(value) = HeaderValue::from_str(&text) {
                request.insert_header(header.clone(), value)?;
            }
        }
        Ok(())
    }

    fn status(&self) -> Option<Value> {
        let algorithms: Vec<String> = self.algorithms.iter().map(|a| format!("{a:?}")).collect();
        Some(match &self.keys {
            Keys::Fixed(set) => serde_json::json!({"keys": set.len(), "algorithms": algorithms}),
            Keys::Remote(remote) => {
                let status = remote.status.lock().unwrap_or_else(PoisonError::into_inner);
                serde_json::json!({
                    "jwks_url": remote.url,
                    "keys": remote.set.load().len(),
                    "algorithms": algorithms,
                    "last_fetch_ok": status.last_ok.map(|at| humantime::format_rfc3339_millis(at).to_string()),
                    "last_error": status.last_error,
                })
            }
        })
    }
}
