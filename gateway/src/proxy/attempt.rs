//! Attempts: choosing an instance, connecting, and after a failure deciding
//! whether to try again and where.
//!
//! The decision is [`decide`], a pure function of what is known about the
//! failure, the request and the service: a request is sent again only if
//! that cannot duplicate its effect (nothing reached the instance, or the
//! request is idempotent or keyed, its body replayable, and nothing of the
//! response reached the client), within the service's `retries` and its
//! retry budget, and never after a timeout. A pooled connection the
//! instance had closed is retried on the same instance, which is not
//! blamed for it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use pingora::protocols::http::ServerSession;
use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora::{ErrorSource, ErrorType};
use smallvec::SmallVec;

use super::Gateway;
use super::ctx::RequestCtx;
use super::exchange::{self, Exchanged};
use crate::control::health::InstanceHealth;
use crate::control::snapshot::Route;
use crate::errors::{Failure, GatewayError};
use crate::metrics::Outcome;
use crate::tracing_export;

/// A client-chosen key that makes a non-idempotent request safe to retry.
const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Attempts per request whatever else allows more: stale pooled
/// connections are retried on the same instance without limit otherwise.
pub const MAX_ATTEMPTS: usize = 16;

/// A request's attempts so far.
#[derive(Default)]
pub struct Attempts {
    /// Instances tried, the last one being the current (inline: no
    /// allocation for the usual one to three attempts).
    pub tried: SmallVec<[SocketAddr; 4]>,
    /// The instance of the current attempt.
    instance: Option<Arc<InstanceHealth>>,
    /// The next attempt may go to the same instance.
    retry_same: bool,
    /// The total timeout's deadline, set at the first attempt.
    pub deadline: Option<Instant>,
}

impl Attempts {
    pub fn count(&self) -> usize {
        self.tried.len()
    }

    pub fn last(&self) -> Option<&SocketAddr> {
        self.tried.last()
    }
}

/// Where an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// No connection was had: nothing reached the instance.
    Connect,
    /// After the connection was had.
    Exchange,
}

/// What is known when an attempt fails.
#[derive(Debug, Clone, Copy)]
pub struct Facts {
    pub stage: Stage,
    /// The instance (not the client or the gateway) failed.
    pub upstream_fault: bool,
    /// A timeout fired (connect, read, write, total).
    pub timed_out: bool,
    /// Pingora says the error is a pooled connection closed under us
    /// (retry on a reused connection, already decided for this one).
    pub stale_connection: bool,
    /// Sending the request again cannot duplicate its effect.
    pub replayable: bool,
    /// Attempts made so far, this one included.
    pub attempts: usize,
    /// The service's `retries`: further attempts allowed after the first.
    pub retries: u32,
    /// An instance not tried yet can take the request.
    pub other_instance: bool,
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub retry: Retry,
    /// Count the failure against the instance (passive health).
    pub blame_instance: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    No,
    /// On the same instance (a stale pooled connection).
    SameInstance,
    /// On another instance, if the retry budget agrees.
    OtherInstance,
}

/// The retry decision; see the module documentation.
pub fn decide(facts: &Facts) -> Decision {
    let decision = |retry, blame_instance| Decision {
        retry,
        blame_instance,
    };
    let other = facts.attempts <= facts.retries as usize && facts.other_instance;
    let another = if other {
        Retry::OtherInstance
    } else {
        Retry::No
    };
    let mut decided = match facts.stage {
        // Nothing was sent: any method may go elsewhere.
        Stage::Connect => decision(another, true),
        Stage::Exchange if !facts.upstream_fault => decision(Retry::No, false),
        Stage::Exchange if !facts.replayable || facts.timed_out => decision(Retry::No, true),
        Stage::Exchange if facts.stale_connection => decision(Retry::SameInstance, false),
        Stage::Exchange => decision(another, true),
    };
    if facts.attempts >= MAX_ATTEMPTS {
        decided.retry = Retry::No;
    }
    decided
}

/// Whether a request that failed after (part of) it was sent may be sent
/// again: repeating it is harmless (an idempotent method, or an
/// `Idempotency-Key` from the client), its body can be replayed, and
/// nothing of the response has reached the client.
fn replayable(session: &ServerSession) -> bool {
    let request = session.req_header();
    (request.method.is_idempotent() || request.headers.contains_key(IDEMPOTENCY_KEY))
        && !session.retry_buffer_truncated()
        && session.response_written().is_none()
}

impl Gateway {
    /// Attempts, as many as allowed, until one gets a response through.
    pub(super) async fn forward(
        &self,
        session: &mut ServerSession,
        ctx: &mut RequestCtx<'_>,
        route: &Route,
    ) -> Result<(), Failure> {
        let fail = |e| Failure::proxying(e, &route.upstream.name, route.max_body_size);
        session.enable_retry_buffering();
        exchange::continue_if_expected(session)
            .await
            .map_err(fail)?;
        loop {
            let peer = next_peer(ctx, route)?;
            let (mut upstream, reused) = match self.upstreams.session(&peer).await {
                Ok(connected) => connected,
                Err(e) => {
                    let mut e = e.into_up();
                    if e.etype() == &ErrorType::ConnectTimedout {
                        ctx.timeout = Some("connect");
                        count_attempt(ctx, Outcome::Timeout);
                    } else {
                        count_attempt(ctx, Outcome::ConnectError);
                    }
                    let facts = self.facts(Stage::Connect, &e, session, ctx, route, false);
                    let decision = settle(&facts, ctx, route);
                    tracing::warn!(upstream = %peer.address(), error = %e, retry = decision.retry != Retry::No, request_id = %ctx.request_id, "connect failed");
                    if decision.retry != Retry::No {
                        continue;
                    }
                    e.set_retry(false);
                    return Err(fail(e));
                }
            };
            match exchange::exchange(session, &mut upstream, &peer, ctx, route).await {
                Ok(Exchanged::Reusable) => {
                    self.upstreams.release(upstream, &peer).await;
                    return Ok(());
                }
                Ok(Exchanged::Spent) => return Ok(()),
                Err(e) => {
                    let mut e = e.more_context(format!("Peer: {peer}"));
                    match e.etype() {
                        ErrorType::ReadTimedout => {
                            ctx.timeout = Some(ctx.timeout.unwrap_or("read"));
                        }
                        ErrorType::WriteTimedout => ctx.timeout = Some("write"),
                        _ => {}
                    }
                    if e.esource() == &ErrorSource::Upstream {
                        let timed_out = matches!(
                            e.etype(),
                            ErrorType::ReadTimedout | ErrorType::WriteTimedout
                        );
                        count_attempt(
                            ctx,
                            if timed_out {
                                Outcome::Timeout
                            } else {
                                Outcome::Reset
                            },
                        );
                    }
                    let facts = self.facts(Stage::Exchange, &e, session, ctx, route, reused);
                    if settle(&facts, ctx, route).retry != Retry::No {
                        continue;
                    }
                    e.set_retry(false);
                    return Err(fail(e));
                }
            }
        }
    }

    fn facts(
        &self,
        stage: Stage,
        error: &pingora::Error,
        session: &ServerSession,
        ctx: &RequestCtx<'_>,
        route: &Route,
        reused: bool,
    ) -> Facts {
        let mut retry = error.retry;
        retry.decide_reuse(reused);
        Facts {
            stage,
            upstream_fault: stage == Stage::Connect || error.esource() == &ErrorSource::Upstream,
            timed_out: ctx.timeout.is_some(),
            stale_connection: retry.retry(),
            replayable: replayable(session),
            attempts: ctx.attempts.count(),
            retries: route.upstream.retries,
            other_instance: route.upstream.has_other_choice(&ctx.attempts.tried),
        }
    }
}

/// Applies `decide`: blames the instance, draws on the retry budget for
/// another instance, marks a same-instance retry.
fn settle(facts: &Facts, ctx: &mut RequestCtx<'_>, route: &Route) -> Decision {
    let mut decision = decide(facts);
    if decision.blame_instance
        && let Some(instance) = &ctx.attempts.instance
    {
        route.upstream.record(instance, false);
    }
    let counters = &route.upstream.retry_counters;
    match decision.retry {
        Retry::OtherInstance if !route.upstream.budget.withdraw() => {
            counters.budget_exhausted.inc();
            decision.retry = Retry::No;
        }
        Retry::SameInstance => ctx.attempts.retry_same = true,
        _ => {}
    }
    if decision.retry != Retry::No {
        counters.retries.inc();
    }
    decision
}

/// Counts the current attempt's outcome for its instance.
fn count_attempt(ctx: &mut RequestCtx<'_>, outcome: Outcome) {
    if let Some(instance) = &ctx.attempts.instance
        && ctx.snapshot.config.metrics
    {
        instance.attempts.count(outcome);
    }
    tracing_export::end_attempt(ctx, outcome, None);
}

/// Records a response's outcome for passive health and (with `metrics`)
/// the attempt counters.
pub fn record_response(ctx: &mut RequestCtx<'_>, route: &Route, status: u16) {
    let outcome = if status >= 500 {
        Outcome::Http5xx
    } else {
        Outcome::Ok
    };
    if let Some(instance) = &ctx.attempts.instance {
        route.upstream.record(instance, outcome == Outcome::Ok);
        if ctx.snapshot.config.metrics {
            instance.attempts.count(outcome);
        }
    }
    tracing_export::end_attempt(ctx, outcome, Some(status));
}

/// The instance for the next attempt and its peer, or why there is none.
fn next_peer(ctx: &mut RequestCtx<'_>, route: &Route) -> Result<HttpPeer, Failure> {
    let upstream = &route.upstream;
    let attempts = &mut ctx.attempts;
    let deadline = *attempts
        .deadline
        .get_or_insert_with(|| Instant::now() + upstream.timeouts.total);
    let time_left = deadline.saturating_duration_since(Instant::now());
    if time_left.is_zero() {
        ctx.timeout = Some("total");
        return Err(Failure::closing(GatewayError::UpstreamTimeout {
            service: upstream.name.clone(),
        }));
    }
    // A stale pooled connection is the connection's fault, not the
    // instance's: that instance may be chosen again.
    let exclude_len = if attempts.retry_same {
        attempts.tried.len().saturating_sub(1)
    } else {
        attempts.tried.len()
    };
    attempts.retry_same = false;
    match upstream.select(&attempts.tried[..exclude_len]) {
        Some(instance) => {
            let peer = upstream.peer(instance, time_left);
            attempts.tried.push(instance.socket);
            attempts.instance = Some(Arc::clone(instance));
            tracing_export::start_attempt(ctx, instance.socket);
            Ok(peer)
        }
        None => {
            let service = upstream.name.clone();
            Err(Failure::closing(if attempts.tried.is_empty() {
                GatewayError::NoHealthyInstance { service }
            } else {
                GatewayError::ConnectFailed { service }
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            stage: Stage::Exchange,
            upstream_fault: true,
            timed_out: false,
            stale_connection: false,
            replayable: true,
            attempts: 1,
            retries: 2,
            other_instance: true,
        }
    }

    fn retry(f: Facts) -> Retry {
        decide(&f).retry
    }

    #[test]
    fn a_failed_connection_goes_to_another_instance_whatever_the_method() {
        let connect = Facts {
            stage: Stage::Connect,
            replayable: false,
            ..facts()
        };
        assert_eq!(
            decide(&connect),
            Decision {
                retry: Retry::OtherInstance,
                blame_instance: true
            }
        );
        assert_eq!(
            retry(Facts {
                other_instance: false,
                ..connect
            }),
            Retry::No
        );
        assert_eq!(
            retry(Facts {
                attempts: 3,
                ..connect
            }),
            Retry::No,
            "retries: 2"
        );
        assert_eq!(
            retry(Facts {
                attempts: 3,
                retries: 3,
                ..connect
            }),
            Retry::OtherInstance
        );
    }

    #[test]
    fn only_a_replayable_request_is_sent_again_after_it_was_sent() {
        assert_eq!(retry(facts()), Retry::OtherInstance);
        let not = Facts {
            replayable: false,
            ..facts()
        };
        assert_eq!(
            decide(&not),
            Decision {
                retry: Retry::No,
                blame_instance: true
            }
        );
    }

    #[test]
    fn a_timeout_is_never_retried_and_blames_the_instance() {
        let timed_out = Facts {
            timed_out: true,
            ..facts()
        };
        assert_eq!(
            decide(&timed_out),
            Decision {
                retry: Retry::No,
                blame_instance: true
            }
        );
    }

    #[test]
    fn a_stale_pooled_connection_retries_the_same_instance_without_blame() {
        let stale = Facts {
            stale_connection: true,
            other_instance: false,
            retries: 0,
            ..facts()
        };
        assert_eq!(
            decide(&stale),
            Decision {
                retry: Retry::SameInstance,
                blame_instance: false
            }
        );
        assert_eq!(
            retry(Facts {
                attempts: MAX_ATTEMPTS,
                ..stale
            }),
            Retry::No,
            "not without end"
        );
        assert_eq!(
            retry(Facts {
                replayable: false,
                ..stale
            }),
            Retry::No
        );
    }

    #[test]
    fn a_client_or_gateway_fault_is_nobody_elses() {
        let client = Facts {
            upstream_fault: false,
            ..facts()
        };
        assert_eq!(
            decide(&client),
            Decision {
                retry: Retry::No,
                blame_instance: false
            }
        );
    }
}
