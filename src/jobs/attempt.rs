//! One attempt at a job's operation: sent through the same stack as a direct call, with the slot the scheduler
//! took for it, and what comes next: done, failed, or tried again after a backoff.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, StatusCode};
use tower::{Service, ServiceExt};

use super::Clock;
use super::records::{Due, Next, OpState, Outcome};
use crate::apps::App;
use crate::config::JobsConfig;
use crate::exchange::{Answer, AttemptKind, Exchange, Marks, UnusedSlot, Validated};
use crate::ratelimit::easemob_retry_after;
use crate::routes::validate::Call;
use crate::trace::TraceContext;

/// An operation claimed from the store, ready to send.
pub(super) struct Held {
    pub(super) due: Due,
    pub(super) app: Arc<App>,
    pub(super) call: Call,
    /// When it was claimed (with a shared store: under a lease).
    pub(super) held_since: tokio::time::Instant,
}

/// Sends one operation with the slot taken for it, and says what comes next.
pub(super) async fn attempt<S>(
    send: S,
    op: Held,
    slot: UnusedSlot,
    config: JobsConfig,
    clock: Clock,
    counted: prometheus::IntCounterVec,
) -> Outcome
where
    S: Service<Exchange, Response = Answer, Error = Infallible>,
{
    let Held { due, app, call, .. } = op;
    let labels = (Arc::clone(&app), call.route());
    let exchange = Exchange {
        slot: Some(Box::new(slot)),
        kind: AttemptKind::Job,
        ..Exchange::new(Validated {
            app,
            call,
            started: std::time::Instant::now(),
            request_id: HeaderValue::try_from(format!("job-{}.{}", due.job_id, due.n)).ok(),
            received: None,
            caller: due.caller.as_deref().map(Arc::from),
            respond_async: false,
            // Each attempt a trace of its own: the request that made the job has long been answered.
            trace: TraceContext::start(),
            spans: None,
            job_attempt: Some(due.attempts + 1),
            audited: Default::default(),
        })
    };
    let Ok(answer) = send.oneshot(exchange).await;
    let attempts = due.attempts + 1;
    let status = answer.status();
    let (error, error_description) = match status {
        StatusCode::OK => (None, None),
        _ => envelope(answer.body()),
    };
    let next = match status {
        StatusCode::OK => Next::Done(OpState::Succeeded),
        _ if !retryable(&answer) || attempts >= config.max_attempts => Next::Done(OpState::Failed),
        _ => Next::RetryAt(
            clock.now_ms()
                + backoff(&config, attempts, easemob_retry_after(answer.headers(), MAX_RETRY_AFTER)).as_millis() as i64,
        ),
    };
    let outcome = match next {
        Next::Done(OpState::Succeeded) => "succeeded",
        Next::Done(_) => "failed",
        Next::RetryAt(_) => "retried",
    };
    counted.with_label_values(&[labels.0.key.as_str(), labels.1.name(), outcome]).inc();
    Outcome {
        job: due.job,
        app: due.app,
        job_id: due.job_id,
        n: due.n,
        attempts,
        status: Some(status.as_u16()),
        error,
        error_description,
        next,
    }
}

/// Worth another attempt: Easemob's 429, 5xx and 401 (the token layer already replaced the token once), and the
/// gateway's own answers when Easemob could not be reached or answer, no token was at hand, or the quota refused
/// a replay.
fn retryable(answer: &Answer) -> bool {
    let status = answer.status();
    if answer.is_from_easemob() {
        return status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::UNAUTHORIZED
            || status.is_server_error();
    }
    matches!(
        answer.rejection(),
        Some(
            "upstream_unreachable" | "upstream_timeout" | "upstream_failed" | "no_token" | "rate_limited" | "internal"
        )
    )
}

/// Easemob's (or the gateway's) `error` and `error_description`, if the body is an error envelope.
fn envelope(body: &crate::exchange::Stamped) -> (Option<String>, Option<String>) {
    #[derive(serde::Deserialize)]
    struct Envelope {
        error: Option<String>,
        error_description: Option<String>,
    }
    let bytes = futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(body.clone()))
        .and_then(Result::ok)
        .map(|collected| collected.to_bytes())
        .unwrap_or_default();
    match serde_json::from_slice::<Envelope>(&bytes) {
        Ok(e) => (e.error, e.error_description.map(|d| d.chars().take(500).collect())),
        Err(_) => (None, None),
    }
}

/// The longest wait Easemob's `Retry-After` may put before an operation's next attempt.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// `retry_min` doubled for each attempt made, up to `retry_max`, at a random point in its upper half; never before
/// Easemob's `Retry-After`.
pub(super) fn backoff(config: &JobsConfig, attempts: u32, retry_after: Option<Duration>) -> Duration {
    let doubled = config.retry_min.saturating_mul(1 << attempts.saturating_sub(1).min(20));
    let ceiling = doubled.min(config.retry_max);
    let jittered = ceiling / 2 + ceiling.mul_f64(fastrand::f64() / 2.0);
    jittered.max(retry_after.unwrap_or_default())
}
