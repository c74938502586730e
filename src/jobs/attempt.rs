//! One attempt at a job's operation: sent through the same stack as a direct call, with the slot the scheduler
//! took for it, and what comes next: done, failed, or tried again after a backoff.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, StatusCode};
use tower::{Service, ServiceExt};

use super::Clock;
use super::records::{AttemptNote, Due, Next, OpState, Outcome};
use crate::apps::App;
use crate::config::JobsConfig;
use crate::config::is_plain_label;
use crate::error::{GatewayError, Shape};
use crate::exchange::{Answer, Exchange, Stamped, Validated};
use crate::ratelimit::{RateLimitHeaders, easemob_retry_after, retry_after_secs};
use crate::request_id::X_REQUEST_ID;
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

/// The attempt at an operation, under the slot taken for it: what the stack is sent.
pub(super) fn exchange(op: Held, slot: RateLimitHeaders) -> (Due, Exchange) {
    let Held { due, app, call, .. } = op;
    let exchange = Exchange::job(
        Validated {
            app,
            call,
            request_id: HeaderValue::try_from(format!("job-{}.{}", due.job_id, due.n)).ok(),
            received: None,
            caller: due.caller.as_deref().map(Arc::from),
            respond_async: false,
            // Each attempt a trace of its own: the request that made the job has long been answered.
            trace: TraceContext::start(),
            spans: None,
            job_attempt: Some(due.attempts + 1),
            audited: Default::default(),
            deadline: Default::default(),
        },
        slot,
    );
    (due, exchange)
}

/// Sends one operation's attempt, and says what comes next.
pub(super) async fn attempt<S>(
    send: S,
    due: Due,
    exchange: Exchange,
    config: JobsConfig,
    clock: Clock,
    replica: Arc<str>,
    counted: prometheus::IntCounterVec,
) -> Outcome
where
    S: Service<Exchange, Response = Answer, Error = GatewayError>,
{
    let labels = (Arc::clone(&exchange.app), exchange.route());
    let (sent, at_ms) = (exchange.clone(), clock.now_ms());
    let Answered { status, error, error_description, retryable, retry_after, easemob } =
        answered(send.oneshot(exchange).await);
    let note = AttemptNote {
        attempt: due.attempts + 1,
        at_ms,
        status: Some(status.as_u16()),
        easemob_request_id: easemob.request_id,
        easemob_timestamp: easemob.timestamp,
        replica: replica.to_string(),
        audit_seqs: sent.audited.seqs(),
    };
    let attempts = due.attempts + 1;
    let next = match status {
        StatusCode::OK => Next::Done(OpState::Succeeded),
        _ if !retryable || attempts >= config.max_attempts => Next::Done(OpState::Failed),
        _ => Next::RetryAt(clock.now_ms() + backoff(&config, attempts, retry_after).as_millis() as i64),
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
        note: Some(note),
    }
}

/// What an attempt came to, as its outcome records it and the scheduler decides on it.
struct Answered {
    status: StatusCode,
    /// Easemob's (or the gateway's) `error` and `error_description`, for an answer other than 200.
    error: Option<String>,
    error_description: Option<String>,
    /// Worth another attempt.
    retryable: bool,
    /// Not before this.
    retry_after: Option<Duration>,
    /// What Easemob's answer said of itself, when it answered.
    easemob: Stamp,
}

/// Easemob's own marks on an answer, for the operation's receipt.
#[derive(Default)]
struct Stamp {
    /// `X-Request-Id`, should Easemob send one (its documented answers carry none).
    request_id: Option<String>,
    /// The `timestamp` in the body, success or error envelope (ms).
    timestamp: Option<i64>,
}

/// Worth another attempt: Easemob's 429, 5xx and 401 (the token layer already replaced the token once), and the
/// gateway's own failures when Easemob could not be reached or answer, no token was at hand, or the quota refused
/// a replay.
fn answered(result: Result<Answer, GatewayError>) -> Answered {
    match result {
        Ok(answer) => {
            let status = answer.status();
            let envelope = envelope(answer.body());
            let (error, error_description) = match status {
                StatusCode::OK => (None, None),
                _ => (envelope.error, envelope.error_description.as_deref().map(truncated)),
            };
            let request_id = answer.headers().get(X_REQUEST_ID).and_then(|v| v.to_str().ok());
            let easemob = Stamp {
                request_id: request_id.filter(|id| is_plain_label(id, 128)).map(str::to_owned),
                timestamp: envelope.timestamp,
            };
            Answered {
                status,
                error,
                error_description,
                retryable: status == StatusCode::TOO_MANY_REQUESTS
                    || status == StatusCode::UNAUTHORIZED
                    || status.is_server_error(),
                retry_after: easemob_retry_after(answer.headers(), MAX_RETRY_AFTER),
                easemob,
            }
        }
        Err(e) => {
            let retryable = matches!(
                e,
                GatewayError::UpstreamUnreachable { .. }
                    | GatewayError::UpstreamTimeout
                    | GatewayError::UpstreamFailed
                    | GatewayError::NoToken { .. }
                    | GatewayError::RateLimited { .. }
                    | GatewayError::Internal
            );
            let Shape { status, error, description, retry_after, .. } = e.shape();
            Answered {
                status,
                error: Some(error.to_owned()),
                error_description: Some(truncated(&description)),
                retryable,
                // In whole seconds, as its `Retry-After` would say.
                retry_after: retry_after.map(|wait| Duration::from_secs(retry_after_secs(wait)).min(MAX_RETRY_AFTER)),
                easemob: Stamp::default(),
            }
        }
    }
}

/// An error's description as an outcome keeps it.
fn truncated(description: &str) -> String {
    description.chars().take(500).collect()
}

/// What an answer's body says: Easemob's `error`, `error_description` and `timestamp`, as far as it is JSON.
#[derive(Default, serde::Deserialize)]
struct Envelope {
    error: Option<String>,
    error_description: Option<String>,
    timestamp: Option<i64>,
}

fn envelope(body: &Stamped) -> Envelope {
    let bytes = futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(body.clone()))
        .and_then(Result::ok)
        .map(|collected| collected.to_bytes())
        .unwrap_or_default();
    serde_json::from_slice(&bytes).unwrap_or_default()
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
