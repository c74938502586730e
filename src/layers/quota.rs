//! The quota as a layer: every call that leaves for Easemob takes a slot first, or is refused with the limit
//! that refused it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::future::Either;
use tower::ServiceExt;

use crate::error::GatewayError;
use crate::exchange::{Answer, Exchange, Waiting};
use crate::ratelimit::{AppIndex, QuotaSet, RateLimitHeaders, Refused, easemob_retry_after};
use crate::routes::Route;
use crate::trace::export::QuotaWait;

/// Takes a slot for every call sent to Easemob (a replay or retry pays for its own: Easemob counts it), or answers
/// 429 with `Retry-After` naming the limit. After validation, so a bad request costs no slot; inside the token,
/// so a call that cannot be sent costs none either. Easemob's own 429 slows the lane down.
#[derive(Clone)]
pub struct QuotaLayer {
    quota: Arc<QuotaSet>,
}

impl QuotaLayer {
    pub fn new(quota: Arc<QuotaSet>) -> QuotaLayer {
        QuotaLayer { quota }
    }
}

impl<S> tower::Layer<S> for QuotaLayer {
    type Service = Quota<S>;

    fn layer(&self, inner: S) -> Quota<S> {
        Quota { inner, quota: Arc::clone(&self.quota) }
    }
}

#[derive(Clone)]
pub struct Quota<S> {
    inner: S,
    quota: Arc<QuotaSet>,
}

impl<S> tower::Service<Exchange> for Quota<S>
where
    S: tower::Service<Exchange, Response = Answer, Error = GatewayError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Answer;
    type Error = GatewayError;
    /// Decided at once (the common case): a named future, no box. Waiting for a slot: boxed.
    type Future = Either<Slotted<S::Future>, Waiting<GatewayError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, exchange: Exchange) -> Self::Future {
        let (app, route) = (exchange.app.index, exchange.route());
        let since = exchange.spans.is_some().then(Instant::now);
        // A retry after a failed connection uses the slot nothing used; a job's operation, the scheduler's.
        let decided = match exchange.slot() {
            Some(slot) => Some(Ok(slot.clone())),
            None => self.quota.try_acquire(app, &exchange.call).map(|decided| decided.map(|a| a.headers)),
        };
        let quota = Arc::clone(&self.quota);
        match decided {
            Some(Ok(slot)) => {
                note(&exchange, since, QuotaWait::Admitted);
                Either::Left(Slotted::Sent {
                    answer: self.inner.call(exchange),
                    sent: Some(Sent { slot, quota, app, route }),
                })
            }
            Some(Err(refused)) => {
                note(&exchange, since, QuotaWait::Refused);
                Either::Left(Slotted::Refused { error: Some(refusal(refused)) })
            }
            None => {
                let inner = self.inner.clone();
                Either::Right(Box::pin(async move {
                    let slot = match quota.acquire(app, &exchange.call).await {
                        Ok(admitted) => admitted.headers,
                        Err(refused) => {
                            note(&exchange, since, QuotaWait::Refused);
                            return Err(refusal(refused));
                        }
                    };
                    note(&exchange, since, QuotaWait::Waited);
                    let result = inner.oneshot(exchange).await;
                    Sent { slot, quota, app, route }.settle(result)
                }))
            }
        }
    }
}

/// Notes a wait for a slot that began at `since` on the request's spans, when they are recorded.
fn note(exchange: &Exchange, since: Option<Instant>, outcome: QuotaWait) {
    if let (Some(spans), Some(since)) = (&exchange.spans, since) {
        spans.quota(since, outcome);
    }
}

fn refusal(refused: Refused) -> GatewayError {
    GatewayError::RateLimited { retry_after: refused.retry_after, limit: refused.headers }
}

/// A call that left with a slot: what its answer needs on the way back.
pub struct Sent {
    slot: RateLimitHeaders,
    quota: Arc<QuotaSet>,
    app: AppIndex,
    route: Route,
}

impl Sent {
    /// Easemob's answer gets the slot's fields, and its 429 slows the lane; a slot nothing used (the connection
    /// failed) goes back up with the failure, for the retry.
    fn settle(self, result: Result<Answer, GatewayError>) -> Result<Answer, GatewayError> {
        match result {
            Ok(mut answer) => {
                if answer.status() == http::StatusCode::TOO_MANY_REQUESTS {
                    let pause = easemob_retry_after(answer.headers(), MAX_PAUSE);
                    self.quota.upstream_throttled(self.app, self.route, pause);
                }
                self.slot.insert_into(answer.headers_mut());
                Ok(answer)
            }
            Err(GatewayError::UpstreamUnreachable { .. }) => {
                Err(GatewayError::UpstreamUnreachable { unused_slot: Some(self.slot) })
            }
            Err(e) => Err(e),
        }
    }
}

pin_project_lite::pin_project! {
    /// A call decided without waiting.
    #[project = SlottedProj]
    pub enum Slotted<F> {
        Refused { error: Option<GatewayError> },
        Sent { #[pin] answer: F, sent: Option<Sent> },
    }
}

impl<F> Future for Slotted<F>
where
    F: Future<Output = Result<Answer, GatewayError>>,
{
    type Output = Result<Answer, GatewayError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            SlottedProj::Refused { error } => Poll::Ready(Err(error.take().expect("polled after completion"))),
            SlottedProj::Sent { answer, sent } => {
                let result = std::task::ready!(answer.poll(cx));
                Poll::Ready(sent.take().expect("polled after completion").settle(result))
            }
        }
    }
}

/// The longest pause Easemob's `Retry-After` may put on a lane.
const MAX_PAUSE: Duration = Duration::from_secs(300);

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use tower::Layer;

    use super::*;
    use crate::config::{AppKey, RateLimitConfig};
    use crate::exchange::ErrorKind;
    use crate::exchange::{AttemptKind, Marks};
    use crate::metrics::Metrics;
    use crate::ratelimit::tests::{A, clear, limit, refusing};
    use crate::testing::{self, ScriptedFetch};

    #[tokio::test(start_paused = true)]
    async fn a_call_without_a_slot_is_answered_429_and_never_sent() {
        let quota = refusing(RateLimitConfig { route: limit(1, 1), ..RateLimitConfig::default() });
        let app = testing::app(&ScriptedFetch::granting(3600), &quota);
        let (easemob, calls) = testing::upstream(|_, _| Ok(testing::easemob(200)));
        let service = QuotaLayer::new(Arc::clone(&quota)).layer(easemob);
        let first = service.clone().oneshot(testing::exchange(&app, clear("u"))).await.unwrap();
        assert_eq!(first.headers()["ratelimit"], "\"clear_user_messages\";r=0;t=1", "the slot's fields");
        let refused = testing::failed(service.clone().oneshot(testing::exchange(&app, clear("u"))).await);
        assert!(matches!(refused, GatewayError::RateLimited { .. }));
        let refused = refused.into_response(std::time::Instant::now());
        assert_eq!((refused.status().as_u16(), refused.rejection()), (429, Some(ErrorKind::RateLimited)));
        assert_eq!(refused.headers()["retry-after"], "2");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_nothing_used_goes_with_the_retry_and_easemobs_429_slows_the_lane() {
        let config = RateLimitConfig { route: limit(1, 1), max_wait: Duration::ZERO, ..RateLimitConfig::default() };
        let metrics = Metrics::new();
        let quota = QuotaSet::new(&config, &[AppKey::new("o", "a")], metrics.clone()).unwrap();
        let app = testing::app(&ScriptedFetch::granting(3600), &quota);
        let (easemob, calls) = testing::upstream(|n, _| match n {
            0 => Err(GatewayError::UpstreamUnreachable { unused_slot: None }),
            _ => Ok(testing::easemob(429)),
        });
        let service = QuotaLayer::new(Arc::clone(&quota)).layer(easemob);
        let failed = testing::failed(service.clone().oneshot(testing::exchange(&app, clear("u"))).await);
        let GatewayError::UpstreamUnreachable { unused_slot: Some(slot) } = failed else {
            panic!("the slot comes back up: {failed:?}")
        };
        let retry = testing::exchange(&app, clear("u")).again(AttemptKind::Retry, Some(slot));
        let answer = service.clone().oneshot(retry).await.unwrap();
        assert_eq!((answer.status().as_u16(), calls.load(Ordering::SeqCst)), (429, 2), "sent without a new slot");
        assert!(answer.is_from_easemob());
        let lanes = quota.status(A).lanes;
        let rate = lanes.iter().find(|lane| lane.route == "clear_user_messages").unwrap().rate_now;
        assert_eq!(rate, 1, "halved, but never below one call");
        assert_eq!(metrics.upstream_throttled.with_label_values(&["o#a", "clear_user_messages"]).get(), 1);
    }
}
