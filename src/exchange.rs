//! What the layers pass down and hand back: a validated [`Exchange`] on its way to Easemob, the [`Answer`] every
//! layer returns, and the [`Stamp`] an answer carries up the stack (who made it, why, for which app and route), so
//! that outer layers observe the final answer instead of sharing mutable state. Failures go up as errors
//! (`error.rs`) until the rescue layer renders them.

use std::sync::Arc;
use std::sync::atomic::AtomicU32;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderValue, Response};
use http_body_util::Full;

use crate::apps::{App, Lane};
use crate::ratelimit::{RATELIMIT_POLICY, RateLimitHeaders};
use crate::routes::Route;
use crate::routes::validate::Call;
use crate::token::Token;
use crate::trace::TraceContext;
use crate::trace::export::Recording;

/// Every answer the data plane gives: a small, whole JSON body, and its stamp.
pub type Answer = Response<Stamped>;

/// An answer's body with the answer's [`Stamp`]. Carried beside the body rather than in the response's extensions,
/// where it would cost three allocations per answer.
#[derive(Clone, Default)]
pub struct Stamped {
    body: Full<Bytes>,
    stamp: Stamp,
}

impl Stamped {
    pub fn new(body: Bytes) -> Stamped {
        Stamped { body: Full::new(body), stamp: Stamp::default() }
    }

    /// The body alone, for an answer that leaves the data plane's stack (the admin endpoints').
    pub fn into_full(self) -> Full<Bytes> {
        self.body
    }
}

impl http_body::Body for Stamped {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// An answer a layer has to wait for (a quota slot, a token fetch, a body, Easemob): the one boxed future shape.
/// Below validation a layer fails with a [`GatewayError`](crate::error::GatewayError); above it, with a
/// [`Failure`](crate::error::Failure).
pub type Waiting<E> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Answer, E>> + Send>>;

/// One attempt at a validated call: the request as validation fixed it, immutable and shared by every attempt
/// (reached through `Deref`: `exchange.app`, `exchange.call`), and what the layer that sends this attempt decided
/// for it. Cheap to clone (the token layer and the retry keep a copy); a layer that sends again makes a new one.
#[derive(Clone)]
pub struct Exchange {
    validated: Arc<Validated>,
    /// The token it is sent with: the token layer's.
    token: Option<Arc<Token>>,
    /// A quota slot taken for this call that nothing used (the retry's, after a failed connection; the
    /// scheduler's, for a job): sent under it rather than a new one. Boxed: it is rare, and every layer's future
    /// that keeps an exchange would otherwise carry its room.
    slot: Option<Box<RateLimitHeaders>>,
    /// Why this attempt is sent, for its audit event.
    kind: AttemptKind,
}

/// Why an attempt at a call is sent, as its audit event says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptKind {
    /// A request's first attempt.
    #[default]
    First,
    /// The safe retry after a 502/503 or a failed connection.
    Retry,
    /// Sent again with a new token after Easemob refused the previous one (401).
    TokenReplay,
    /// One of the scheduler's attempts at a job's operation.
    Job,
}

/// What validation fixed about a request, for every attempt at it.
pub struct Validated {
    pub app: Arc<App>,
    pub call: Call,
    pub request_id: Option<HeaderValue>,
    /// The request's path and query as the caller sent them: what Easemob gets, shared, when it already is the
    /// canonical form (`Upstream::uri`). `None` for a job's operations.
    pub received: Option<PathAndQuery>,
    /// The calling service for the audit trail: a caller key's name, or the caller's own `X-Caller`.
    pub caller: Option<Arc<str>>,
    /// The caller sent `Prefer: respond-async`: run it as a job if jobs are on.
    pub respond_async: bool,
    /// The W3C trace the request belongs to; the call to Easemob carries a child of it.
    pub trace: TraceContext,
    /// Where the layers note the request's spans, when they are exported and its trace is sampled.
    pub spans: Option<Arc<Recording>>,
    /// For a job's operation: which of the scheduler's attempts at it this is (1, 2, …).
    pub job_attempt: Option<u32>,
    /// The audit events of its attempts that reached Easemob.
    pub audited: AuditMarks,
    /// The end of the time Easemob has for this request, retry and replay included.
    pub deadline: Deadline,
}

/// The audit events of a request's attempts that reached Easemob, in the order sent: their count numbers the next
/// one, and, for a job's operation, their sequence numbers in the audit chain go into its receipt.
#[derive(Default)]
pub struct AuditMarks {
    attempts: AtomicU32,
    seqs: std::sync::Mutex<Vec<u64>>,
}

impl AuditMarks {
    /// The number of the attempt being audited (1, 2, …).
    pub fn next_attempt(&self) -> u32 {
        self.attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
    }

    /// Its event was written with this sequence number.
    pub fn written(&self, seq: u64) {
        self.seqs.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(seq);
    }

    /// The sequence numbers of the events written so far.
    pub fn seqs(&self) -> Vec<u64> {
        self.seqs.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

/// The end of the time Easemob has for a request: fixed once, by its first send (waiting for a token or a quota
/// slot does not eat into Easemob's time, as `upstream.timeout` promises), and the same for every later attempt,
/// so a retry or a replay never stretches the caller's wait. Nothing carries it back up or down again. Not tower's
/// `Timeout` layer: its clock starts where it sits, so above the token and the quota it would count their waits as
/// Easemob's time, and below the retry it would give each attempt a time of its own.
#[derive(Default)]
pub struct Deadline(std::sync::OnceLock<tokio::time::Instant>);

impl Deadline {
    /// The deadline, fixed `timeout` from now by the first attempt to ask.
    pub fn start(&self, timeout: std::time::Duration) -> tokio::time::Instant {
        *self.0.get_or_init(|| tokio::time::Instant::now() + timeout)
    }

    /// The deadline, once the first attempt was sent.
    pub fn get(&self) -> Option<tokio::time::Instant> {
        self.0.get().copied()
    }
}

impl Exchange {
    /// A request's first attempt.
    pub fn new(validated: Validated) -> Exchange {
        Exchange { validated: Arc::new(validated), token: None, slot: None, kind: AttemptKind::First }
    }

    /// A scheduler's attempt at a job's operation, under the slot it took for it.
    pub fn job(validated: Validated, slot: RateLimitHeaders) -> Exchange {
        Exchange { slot: Some(Box::new(slot)), kind: AttemptKind::Job, ..Exchange::new(validated) }
    }

    /// This attempt, sent with `token`.
    pub fn with_token(self, token: Arc<Token>) -> Exchange {
        Exchange { token: Some(token), ..self }
    }

    /// Another attempt at the same request, for `kind`, under the slot the last one left unused if any.
    pub fn again(&self, kind: AttemptKind, unused_slot: Option<RateLimitHeaders>) -> Exchange {
        Exchange {
            validated: Arc::clone(&self.validated),
            token: self.token.clone(),
            slot: unused_slot.map(Box::new),
            kind,
        }
    }

    pub fn token(&self) -> Option<&Token> {
        self.token.as_deref()
    }

    pub fn slot(&self) -> Option<&RateLimitHeaders> {
        self.slot.as_deref()
    }

    pub fn kind(&self) -> AttemptKind {
        self.kind
    }

    pub fn route(&self) -> Route {
        self.call.route()
    }

    pub fn lane(&self) -> &Lane {
        self.app.lane(self.route())
    }
}

impl std::ops::Deref for Exchange {
    type Target = Validated;

    fn deref(&self) -> &Validated {
        &self.validated
    }
}

/// What an answer says about itself to the layers above it.
#[derive(Clone, Default)]
pub struct Stamp {
    /// Easemob gave this answer (passed through, hop-by-hop headers aside).
    pub from_easemob: bool,
    /// The gateway made it, for this error (set by the one place that renders errors).
    pub rejection: Option<ErrorKind>,
    /// Who it is about, as far as the request named its app and route.
    pub labels: Labels,
}

/// Who an answer is about, for its log line and metrics: the app and route, as far as the request named them.
#[derive(Clone, Default)]
pub struct Labels {
    pub app: Option<Arc<App>>,
    pub route: Option<Route>,
    /// The trace id, once the request reached validation. Never 0, so the `Option` takes no room of its own: every
    /// answer's stamp stays the size it was before `spans` joined it.
    pub trace_id: Option<std::num::NonZeroU128>,
    /// The request's spans, exported with its final answer (when export is on and the trace sampled).
    pub spans: Option<Arc<Recording>>,
}

impl Labels {
    /// The (app, route) lane, once both are known.
    pub fn lane(&self) -> Option<&Lane> {
        Some(self.app.as_deref()?.lane(self.route?))
    }

    /// Labels `answer`, and states its lane's `RateLimit-Policy` unless the answer names a limit of its own.
    pub fn apply(self, answer: &mut Answer) {
        if let Some(lane) = self.lane() {
            let headers = answer.headers_mut();
            if !headers.contains_key(RATELIMIT_POLICY) {
                headers.insert(RATELIMIT_POLICY, lane.policy.clone());
            }
        }
        answer.stamp_mut().labels = self;
    }
}

impl std::fmt::Debug for Labels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let app = self.app.as_ref().map(|app| app.key.as_str());
        f.debug_struct("Labels").field("app", &app).field("route", &self.route).finish_non_exhaustive()
    }
}

/// Which error a gateway-made answer stands for: the mark it carries to the layers above the rescue (observe),
/// one byte where the error itself would be a hundred.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    UnknownRoute,
    MethodNotAllowed,
    UnknownApp,
    Invalid,
    BodyTooLarge,
    HeadTooLarge,
    BodyUnreadable,
    BodyTimeout,
    RateLimited,
    Forbidden,
    Unauthenticated,
    Overloaded,
    NoToken,
    UpstreamUnreachable,
    UpstreamTimeout,
    UpstreamFailed,
    Internal,
    JobNotFound,
    InvalidJob,
    TooManyOperations,
    OperationTooLarge,
    IdempotencyConflict,
    JobsUnavailable,
    JobsDisabled,
}

impl ErrorKind {
    /// A short, stable name: the `reason` label of metrics and log lines, so cardinality stays bounded.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::UnknownRoute => "unknown_route",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::UnknownApp => "unknown_app",
            ErrorKind::Invalid => "invalid",
            ErrorKind::BodyTooLarge => "body_too_large",
            ErrorKind::HeadTooLarge => "head_too_large",
            ErrorKind::BodyUnreadable => "body_unreadable",
            ErrorKind::BodyTimeout => "body_timeout",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::NoToken => "no_token",
            ErrorKind::UpstreamUnreachable => "upstream_unreachable",
            ErrorKind::UpstreamTimeout => "upstream_timeout",
            ErrorKind::UpstreamFailed => "upstream_failed",
            ErrorKind::Internal => "internal",
            ErrorKind::JobNotFound => "job_not_found",
            ErrorKind::InvalidJob => "invalid_job",
            ErrorKind::TooManyOperations => "too_many_operations",
            ErrorKind::OperationTooLarge => "operation_too_large",
            ErrorKind::IdempotencyConflict => "idempotency_conflict",
            ErrorKind::JobsUnavailable => "jobs_unavailable",
            ErrorKind::JobsDisabled => "jobs_disabled",
        }
    }
}

/// An answer's [`Stamp`], read and written by the layers it passes.
pub trait Marks {
    fn stamp(&self) -> &Stamp;
    fn stamp_mut(&mut self) -> &mut Stamp;

    fn is_from_easemob(&self) -> bool {
        self.stamp().from_easemob
    }

    fn rejection(&self) -> Option<ErrorKind> {
        self.stamp().rejection
    }
}

impl Marks for Answer {
    fn stamp(&self) -> &Stamp {
        &self.body().stamp
    }

    fn stamp_mut(&mut self) -> &mut Stamp {
        &mut self.body_mut().stamp
    }
}
