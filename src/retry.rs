//! The safe retry, as a policy for tower's `Retry`: once, when nothing was carried out (the connection could not
//! be made, or Easemob's front answered 502/503), within the request's deadline and under a budget that keeps an
//! outage from being doubled. Never on a timeout or a cut-off answer (the deletion may have happened), never on
//! a 4xx.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use prometheus::IntCounterVec;
use tower::retry::Policy;
use tower::retry::budget::{Budget, TpsBudget};

use crate::exchange::{Answer, AttemptKind, Exchange, Marks, UnusedSlot};
use crate::metrics::Metrics;

/// A retry needs at least this much of the request's deadline left to be worth sending.
const MIN_RETRY_TIME: Duration = Duration::from_millis(100);

pub struct SafeRetry {
    budget: Arc<TpsBudget>,
    retries: IntCounterVec,
    /// This request has had its retry.
    retried: bool,
    /// Easemob's answer to the first attempt: the caller's answer if the retry cannot be admitted by the quota.
    previous: Option<Answer>,
}

impl SafeRetry {
    /// One per process: its budget is shared by every connection. Retries may add at most a fifth to the calls
    /// Easemob sees, plus a trickle.
    pub fn new(metrics: &Metrics) -> SafeRetry {
        SafeRetry {
            budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 1, 0.2)),
            retries: metrics.upstream_retries.clone(),
            retried: false,
            previous: None,
        }
    }
}

impl Clone for SafeRetry {
    /// A fresh policy for each request (tower clones it per call); an answer kept for one is never another's.
    fn clone(&self) -> SafeRetry {
        SafeRetry { budget: Arc::clone(&self.budget), retries: self.retries.clone(), retried: false, previous: None }
    }
}

impl Policy<Exchange, Answer, Infallible> for SafeRetry {
    type Future = Ready<()>;

    fn retry(&mut self, exchange: &mut Exchange, result: &mut Result<Answer, Infallible>) -> Option<Ready<()>> {
        let answer = match result {
            Ok(answer) => answer,
            Err(never) => match *never {},
        };
        if self.retried {
            if answer.rejection() == Some("rate_limited")
                && let Some(previous) = self.previous.take()
            {
                *answer = previous;
            }
            return None;
        }
        // Nothing was carried out only behind a 502 or 503: the usual answer is decided on its status alone.
        if !matches!(answer.status(), StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE) {
            return None;
        }
        let nothing_done = match answer.rejection() {
            Some(reason) => reason == "upstream_unreachable",
            None => answer.is_from_easemob(),
        };
        let deadline = answer.deadline()?;
        let time_left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if !nothing_done || time_left < MIN_RETRY_TIME || !self.budget.withdraw() {
            return None;
        }
        self.retried = true;
        self.retries.with_label_values(&[exchange.app.key.as_str(), exchange.route().name()]).inc();
        exchange.deadline = Some(deadline);
        exchange.kind = AttemptKind::Retry;
        exchange.slot = answer.extensions_mut().remove::<UnusedSlot>().map(Box::new);
        if answer.is_from_easemob() {
            self.previous = Some(std::mem::take(answer));
        }
        Some(ready(()))
    }

    fn clone_request(&mut self, exchange: &Exchange) -> Option<Exchange> {
        // Called before each attempt: the first one deposits in the budget.
        if !self.retried {
            self.budget.deposit();
        }
        Some(exchange.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use http::HeaderValue;
    use tower::retry::RetryLayer;
    use tower::{Layer, ServiceExt};

    use super::*;
    use crate::error::GatewayError;
    use crate::testing::{self, ScriptedFetch};

    /// An answer to one exchange, with the deadline it ran under.
    fn answered(mut answer: Answer) -> Answer {
        answer.stamp_mut().deadline = Some(tokio::time::Instant::now() + Duration::from_secs(10));
        answer
    }

    fn failed(e: GatewayError) -> Answer {
        answered(e.into_response(std::time::Instant::now()))
    }

    fn unreachable_with_a_slot() -> Answer {
        let mut answer = failed(GatewayError::UpstreamUnreachable);
        let slot = UnusedSlot { policy: HeaderValue::from_static("p"), limit: HeaderValue::from_static("l") };
        answer.extensions_mut().insert(slot);
        answer
    }

    async fn attempts(policy: &SafeRetry, first: fn() -> Answer, then: fn() -> Answer) -> (Answer, usize) {
        let app = testing::app(&ScriptedFetch::granting(3600), &testing::quota(Default::default()));
        let (easemob, calls) = testing::upstream(move |n, exchange| {
            if n > 0 {
                assert!(exchange.deadline.is_some(), "the retry keeps the first attempt's deadline");
            }
            if n == 0 { first() } else { then() }
        });
        let answer =
            RetryLayer::new(policy.clone()).layer(easemob).oneshot(testing::exchange(&app, testing::clear("u")));
        (answer.await.unwrap(), calls.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn a_failed_connection_is_retried_once_with_the_slot_it_never_used() {
        let policy = SafeRetry::new(&Metrics::new());
        let (answer, calls) = attempts(&policy, unreachable_with_a_slot, || answered(testing::easemob(200))).await;
        assert_eq!((answer.status().as_u16(), calls), (200, 2));
        let (answer, calls) = attempts(&policy, unreachable_with_a_slot, unreachable_with_a_slot).await;
        assert_eq!((answer.rejection(), calls), (Some("upstream_unreachable"), 2), "once only");
    }

    #[tokio::test]
    async fn easemobs_502_and_503_are_retried_and_stand_if_the_retry_gets_no_slot() {
        let policy = SafeRetry::new(&Metrics::new());
        let (answer, calls) =
            attempts(&policy, || answered(testing::easemob(503)), || answered(testing::easemob(200))).await;
        assert_eq!((answer.status().as_u16(), calls), (200, 2));
        let no_slot = || {
            let (policy, limit) = (HeaderValue::from_static("p"), HeaderValue::from_static("l"));
            failed(GatewayError::RateLimited { retry_after: Duration::from_secs(1), policy, limit })
        };
        let (answer, calls) = attempts(&policy, || answered(testing::easemob(502)), no_slot).await;
        assert_eq!((answer.status().as_u16(), calls), (502, 2));
        assert!(answer.is_from_easemob(), "Easemob's own answer, not the quota's 429");
    }

    #[tokio::test]
    async fn what_may_have_been_carried_out_is_never_retried() {
        let policy = SafeRetry::new(&Metrics::new());
        let ok = || answered(testing::easemob(200));
        for first in [
            (|| failed(GatewayError::UpstreamTimeout)) as fn() -> Answer,
            || failed(GatewayError::UpstreamFailed),
            || answered(testing::easemob(500)),
            || answered(testing::easemob(400)),
            || answered(testing::easemob(429)),
        ] {
            let (answer, calls) = attempts(&policy, first, ok).await;
            assert_eq!(calls, 1, "{}", answer.status());
        }
    }

    #[tokio::test]
    async fn retries_stay_within_the_budget() {
        let policy = SafeRetry::new(&Metrics::new());
        let mut retried = 0;
        for _ in 0..50 {
            let (_, calls) = attempts(&policy, unreachable_with_a_slot, unreachable_with_a_slot).await;
            retried += calls - 1;
        }
        // Ten seconds' reserve of one a second, plus a fifth of the 50 requests.
        assert!((10..=20).contains(&retried), "{retried} retries for 50 requests");
    }
}
