//! `rate_limit`: `requests` per `per` for each key (the client address,
//! the consumer an auth plugin named, or a header's value), `burst` more at
//! once after a quiet spell. A request over the limit is answered `429`
//! with `Retry-After`; every answer of the route carries the IETF
//! `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` fields.
//!
//! The algorithm is GCRA (a token bucket without a refill timer) from the
//! `governor` crate: one atomic word of state per key, no lock on the
//! request path beyond the map's shard. A request weighs two cells of half
//! a period each, and the bucket holds one cell more than its requests'
//! worth: so a request may come up to half a period before its turn, and
//! one that comes after its turn loses nothing (with whole-period cells a
//! request a millisecond late loses that millisecond for good, 2–4 % of the
//! rate under load), while never more than `burst + 1` pass at once. Memory is bounded: keys whose
//! bucket is full again are dropped every second (they behave exactly as an
//! unknown key would), and past `max_keys` live keys, new keys share one
//! overflow bucket (an attacker spraying addresses limits only itself and
//! the other newcomers, never the keys already tracked). Limits are per
//! gateway process: each replica enforces its own.
//!
//! ```yaml
//! - rate_limit: { key: client_ip, requests: 100, per: 1s, burst: 50 }
//! ```

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use governor::clock::{Clock, MonotonicClock};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter as Gcra};
use http::{HeaderName, HeaderValue, StatusCode};
use pingora::http::ResponseHeader;

use super::{Answer, Plugin, PluginContext, Verdict};
use crate::config::{RateLimitConfig, RateLimitKey};

/// How often full buckets are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// What a request is counted by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Ip(IpAddr),
    Text(Box<str>),
    /// Every new key past `max_keys`.
    Overflow,
}

/// The keyed store, with a bound on live keys.
struct BoundedStore {
    map: DashMapStateStore<Key>,
    max_keys: usize,
    /// Keys in `map`, as of the last insert or sweep (`DashMap::len`
    /// locks every shard: too dear for every request).
    keys: AtomicUsize,
}

impl StateStore for BoundedStore {
    type Key = Key;

    fn measure_and_replace<T, F, E>(&self, key: &Key, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        // A known key: one shard's lookup, one atomic update.
        if let Some(state) = self.map.get(key) {
            return state.measure_and_replace(&NotKeyed::NonKey, f);
        }
        let key = if self.keys.load(Ordering::Relaxed) < self.max_keys {
            key
        } else {
            &Key::Overflow
        };
        let state = self.map.entry(key.clone()).or_insert_with(|| {
            self.keys.fetch_add(1, Ordering::Relaxed);
            InMemoryState::default()
        });
        state.measure_and_replace(&NotKeyed::NonKey, f)
    }
}

impl ShrinkableKeyedStateStore<Key> for BoundedStore {
    fn retain_recent(&self, drop_below: Nanos) {
        ShrinkableKeyedStateStore::retain_recent(&self.map, drop_below);
        self.keys.store(self.map.len(), Ordering::Relaxed);
    }

    fn shrink_to_fit(&self) {
        ShrinkableKeyedStateStore::shrink_to_fit(&self.map);
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

type Limiter = Gcra<Key, BoundedStore, MonotonicClock, StateInformationMiddleware>;

pub struct RateLimit {
    key: RateLimitKey,
    limiter: Arc<Limiter>,
    clock: MonotonicClock,
    /// `RateLimit-Limit`: the requests of one period.
    limit: HeaderValue,
    /// Time to earn one request back.
    per_request: Duration,
    /// Requests allowed at once above the first.
    burst: u32,
}

/// Cells per request (see the module documentation).
const CELLS: NonZeroU32 = NonZeroU32::new(2).expect("two is not zero");

/// Numbers below this are sent from a table of header values made once
/// (an integer header value is otherwise formatted and allocated).
const SMALL: u64 = 1024;

fn small_numbers() -> &'static [HeaderValue] {
    static TABLE: std::sync::OnceLock<Vec<HeaderValue>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| (0..SMALL).map(HeaderValue::from).collect())
}

fn number(n: u64) -> HeaderValue {
    small_numbers()
        .get(n as usize)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from(n))
}

/// What the response hook says about this request.
#[derive(Clone, Copy)]
struct Counted {
    remaining: u32,
    reset: Duration,
}

/// Whole seconds, rounded up (a client waiting that long is never early).
fn seconds(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

impl RateLimit {
    pub fn new(settings: &RateLimitConfig) -> Result<Self, String> {
        let per_request = settings
            .per
            .checked_div(u32::try_from(settings.requests).unwrap_or(u32::MAX))
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                "the rate is too high (more than one request per nanosecond)".to_owned()
            })?;
        let burst = u32::try_from(settings.burst).unwrap_or(u32::MAX / 2 - 2);
        // `burst + 1` requests of two cells, and one cell of slack.
        let cells = burst.saturating_mul(2).saturating_add(3);
        let quota = Quota::with_period(per_request / 2)
            .ok_or_else(|| {
                "the rate is too high (more than one request per nanosecond)".to_owned()
            })?
            .allow_burst(NonZeroU32::new(cells).unwrap_or(NonZeroU32::MIN));
        let clock = MonotonicClock;
        let store = BoundedStore {
            map: DashMapStateStore::default(),
            max_keys: settings.max_keys,
            keys: AtomicUsize::new(0),
        };
        let limiter: Arc<Limiter> = Arc::new(
            Gcra::<Key, BoundedStore, MonotonicClock>::new(quota, store, clock.clone())
                .with_middleware::<StateInformationMiddleware>(),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sweep(Arc::downgrade(&limiter)));
        }
        Ok(RateLimit {
            key: settings.key.clone(),
            limiter,
            clock,
            limit: HeaderValue::from(settings.requests),
            per_request,
            burst,
        })
    }

    fn key(&self, ctx: &PluginContext<'_>) -> Key {
        let by_ip = || ctx.client_addr().map_or(Key::Overflow, Key::Ip);
        match &self.key {
            RateLimitKey::ClientIp => by_ip(),
            RateLimitKey::Consumer => ctx
                .consumer()
                .map_or_else(by_ip, |consumer| Key::Text(Box::from(&**consumer))),
            RateLimitKey::Header(name) => ctx
                .request()
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map_or_else(by_ip, |value| Key::Text(Box::from(value))),
        }
    }

    fn headers(&self, counted: Counted) -> [(HeaderName, HeaderValue); 3] {
        [
            (RATELIMIT_LIMIT, self.limit.clone()),
            (RATELIMIT_REMAINING, number(u64::from(counted.remaining))),
            (RATELIMIT_RESET, number(seconds(counted.reset))),
        ]
    }

    /// Live keys.
    fn keys(&self) -> usize {
        self.limiter.len()
    }
}

/// Drops full buckets every [`SWEEP_EVERY`] until the plugin is gone.
async fn sweep(limiter: Weak<Limiter>) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(limiter) = limiter.upgrade() else {
            return;
        };
        limiter.retain_recent();
        limiter.shrink_to_fit();
    }
}

impl Plugin for RateLimit {
    fn name(&self) -> &str {
        "rate_limit"
    }

    fn request_filter(&self, ctx: &mut PluginContext<'_>) -> Verdict {
        let key = self.key(ctx);
        match self.limiter.check_key_n(&key, CELLS) {
            Ok(Ok(snapshot)) => {
                let remaining = snapshot.remaining_burst_capacity() / CELLS.get();
                // The bucket is full again once the used part is earned back.
                let used = self.burst.saturating_sub(remaining);
                ctx.extensions_mut().insert(Counted {
                    remaining,
                    reset: self.per_request * used,
                });
                Verdict::Continue
            }
            Err(_insufficient_capacity) => {
                // Not reached: a request's weight always fits the bucket.
                Verdict::Respond(
                    Answer::new(StatusCode::TOO_MANY_REQUESTS).with_detail("Too many requests"),
                )
            }
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(self.clock.now());
                let counted = Counted {
                    remaining: 0,
                    reset: wait,
                };
                ctx.extensions_mut().insert(counted);
                let mut answer = Answer::new(StatusCode::TOO_MANY_REQUESTS)
                    .with_detail("Too many requests")
                    .with_header(
                        http::header::RETRY_AFTER,
                        HeaderValue::from(seconds(wait).max(1)),
                    );
                answer.headers.extend(self.headers(counted));
                Verdict::Respond(answer)
            }
        }
    }

    fn response_filter(
        &self,
        response: &mut ResponseHeader,
        ctx: &mut PluginContext<'_>,
    ) -> pingora::Result<()> {
        let Some(counted) = ctx.extensions().get::<Counted>().copied() else {
            return Ok(());
        };
        for (name, value) in self.headers(counted) {
            response.insert_header(name, value)?;
        }
        Ok(())
    }

    fn status(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({ "keys": self.keys() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::http::RequestHeader;

    fn limit(requests: u64, per: Duration, burst: u64, max_keys: usize) -> RateLimit {
        RateLimit::new(&RateLimitConfig {
            key: RateLimitKey::ClientIp,
            requests,
            per,
            burst,
            max_keys,
        })
        .unwrap()
    }

    fn verdict(plugin: &RateLimit, ip: &str) -> (bool, Option<u32>) {
        let request = RequestHeader::build("GET", b"/", None).unwrap();
        let mut extensions = http::Extensions::new();
        let mut ctx = PluginContext::new(
            &request,
            "id",
            Some(ip.parse().unwrap()),
            "/",
            "svc",
            &mut extensions,
        );
        let passed = matches!(plugin.request_filter(&mut ctx), Verdict::Continue);
        (
            passed,
            ctx.extensions().get::<Counted>().map(|c| c.remaining),
        )
    }

    #[test]
    fn a_burst_then_the_steady_rate_per_key() {
        let plugin = limit(10, Duration::from_secs(60), 2, 100);
        // burst 2: three at once (the one the rate allows, two more).
        assert_eq!(verdict(&plugin, "10.0.0.1"), (true, Some(2)));
        assert_eq!(verdict(&plugin, "10.0.0.1"), (true, Some(1)));
        assert_eq!(verdict(&plugin, "10.0.0.1"), (true, Some(0)));
        assert_eq!(verdict(&plugin, "10.0.0.1"), (false, Some(0)));
        // Another key has its own bucket.
        assert_eq!(verdict(&plugin, "10.0.0.2"), (true, Some(2)));
    }

    #[test]
    fn past_max_keys_new_keys_share_one_bucket_and_old_ones_keep_theirs() {
        // burst 1: two at once per bucket.
        let plugin = limit(1, Duration::from_secs(60), 1, 2);
        for _ in 0..2 {
            assert!(verdict(&plugin, "10.0.0.1").0);
        }
        assert!(verdict(&plugin, "10.0.0.2").0);
        assert!(
            verdict(&plugin, "10.0.0.3").0,
            "the overflow bucket's first"
        );
        assert!(verdict(&plugin, "10.0.0.4").0, "its second, shared");
        assert!(!verdict(&plugin, "10.0.0.5").0, "spent");
        assert!(!verdict(&plugin, "10.0.0.1").0, "its own, spent");
        assert!(verdict(&plugin, "10.0.0.2").0, "its own, one left");
        assert!(plugin.keys() <= 3);
    }

    #[test]
    fn burst_zero_is_one_request_at_a_time() {
        let plugin = limit(1, Duration::from_secs(60), 0, 10);
        assert_eq!(verdict(&plugin, "10.0.0.1"), (true, Some(0)));
        assert_eq!(verdict(&plugin, "10.0.0.1"), (false, Some(0)));
    }

    #[test]
    fn retry_after_and_reset_round_up() {
        assert_eq!(seconds(Duration::from_millis(1)), 1);
        assert_eq!(seconds(Duration::from_secs(2)), 2);
        assert_eq!(seconds(Duration::ZERO), 0);
    }
}
