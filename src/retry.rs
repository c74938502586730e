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

use crate::exchange::{Answer, Deadline, Exchange, Marks, UnusedSlot};
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
        let nothing_done = match answer.rejection() {
            Some(reason) => reason == "upstream_unreachable",
            None => {
                answer.is_from_easemob()
                    && matches!(answer.status(), StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE)
            }
        };
        let deadline = answer.extensions().get::<Deadline>()?.0;
        let time_left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if !nothing_done || time_left < MIN_RETRY_TIME || !self.budget.withdraw() {
            return None;
        }
        self.retried = true;
        self.retries.with_label_values(&[&exchange.app.key, exchange.route().name()]).inc();
        exchange.deadline = Some(deadline);
        exchange.slot = answer.extensions_mut().remove::<UnusedSlot>();
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
