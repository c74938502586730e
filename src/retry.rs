//! The safe retry, as a policy for tower's `Retry`: once, when nothing was carried out (the connection could not
//! be made, or Easemob's front answered 502/503), within the request's deadline and under a budget that keeps an
//! outage from being doubled. Never on a timeout or a cut-off answer (the deletion may have happened), never on
//! a 4xx.

use std::future::{Ready, ready};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use prometheus::IntCounterVec;
use tower::retry::Policy;
use tower::retry::budget::{Budget, TpsBudget};

use crate::error::GatewayError;
use crate::exchange::{Answer, AttemptKind, Exchange};
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

impl Policy<Exchange, Answer, GatewayError> for SafeRetry {
    type Future = Ready<()>;

    fn retry(&mut self, exchange: &mut Exchange, result: &mut Result<Answer, GatewayError>) -> Option<Ready<()>> {
        if self.retried {
            if let Err(GatewayError::RateLimited { .. }) = result
                && let Some(previous) = self.previous.take()
            {
                *result = Ok(previous);
            }
            return None;
        }
        // Nothing was carried out: the connection could not be made, or Easemob's front answered 502 or 503.
        let nothing_done = match result {
            Ok(answer) => matches!(answer.status(), StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE),
            Err(e) => matches!(e, GatewayError::UpstreamUnreachable { .. }),
        };
        if !nothing_done {
            return None;
        }
        let time_left = exchange.deadline.get()?.saturating_duration_since(tokio::time::Instant::now());
        if time_left < MIN_RETRY_TIME || !self.budget.withdraw() {
            return None;
        }
        self.retried = true;
        self.retries.with_label_values(&[exchange.app.key.as_str(), exchange.route().name()]).inc();
        let unused_slot = match result {
            Ok(answer) => {
                self.previous = Some(std::mem::take(answer));
                None
            }
            Err(GatewayError::UpstreamUnreachable { unused_slot }) => unused_slot.take(),
            Err(_) => None,
        };
        *exchange = exchange.again(AttemptKind::Retry, unused_slot);
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
    use crate::exchange::Marks;
    use crate::ratelimit::RateLimitHeaders;
    use crate::testing::{self, ScriptedFetch};

    type Result = std::result::Result<Answer, GatewayError>;

    fn slot() -> RateLimitHeaders {
        RateLimitHeaders { policy: HeaderValue::from_static("p"), limit: HeaderValue::from_static("l") }
    }

    fn unreachable_with_a_slot() -> Result {
        Err(GatewayError::UpstreamUnreachable { unused_slot: Some(slot()) })
    }

    fn easemob(status: u16) -> Result {
        Ok(testing::easemob(status))
    }

    async fn attempts(policy: &SafeRetry, first: fn() -> Result, then: fn() -> Result) -> (Result, usize) {
        let app = testing::app(&ScriptedFetch::granting(3600), &testing::quota(Default::default()));
        let (easemob, calls) = testing::upstream(move |n, exchange| {
            if n > 0 {
                assert_eq!(exchange.kind(), AttemptKind::Retry);
                let first_failed_to_connect = matches!(first(), Err(GatewayError::UpstreamUnreachable { .. }));
                assert_eq!(exchange.slot().is_some(), first_failed_to_connect, "the slot nothing used, if any");
            }
            if n == 0 { first() } else { then() }
        });
        let answer =
            RetryLayer::new(policy.clone()).layer(easemob).oneshot(testing::exchange(&app, testing::clear("u")));
        (answer.await, calls.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn a_failed_connection_is_retried_once_with_the_slot_it_never_used() {
        let policy = SafeRetry::new(&Metrics::new());
        let (answer, calls) = attempts(&policy, unreachable_with_a_slot, || easemob(200)).await;
        assert_eq!((answer.unwrap().status().as_u16(), calls), (200, 2));
        let (answer, calls) = attempts(&policy, unreachable_with_a_slot, unreachable_with_a_slot).await;
        assert!(matches!(answer, Err(GatewayError::UpstreamUnreachable { .. })), "once only");
        assert_eq!(calls, 2, "once only");
    }

    #[tokio::test]
    async fn easemobs_502_and_503_are_retried_and_stand_if_the_retry_gets_no_slot() {
        let policy = SafeRetry::new(&Metrics::new());
        let (answer, calls) = attempts(&policy, || easemob(503), || easemob(200)).await;
        assert_eq!((answer.unwrap().status().as_u16(), calls), (200, 2));
        let no_slot = || Err(GatewayError::RateLimited { retry_after: Duration::from_secs(1), limit: slot() });
        let (answer, calls) = attempts(&policy, || easemob(502), no_slot).await;
        let answer = answer.unwrap();
        assert_eq!((answer.status().as_u16(), calls), (502, 2));
        assert!(answer.is_from_easemob(), "Easemob's own answer, not the quota's 429");
    }

    #[tokio::test]
    async fn what_may_have_been_carried_out_is_never_retried() {
        let policy = SafeRetry::new(&Metrics::new());
        for first in [
            (|| Err(GatewayError::UpstreamTimeout)) as fn() -> Result,
            || Err(GatewayError::UpstreamFailed),
            || easemob(500),
            || easemob(400),
            || easemob(429),
        ] {
            let (answer, calls) = attempts(&policy, first, || easemob(200)).await;
            assert_eq!(calls, 1, "{:?}", answer.map(|a| a.status()));
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
