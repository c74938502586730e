//! The gateway's own errors: what every layer below the edge fails with (a [`GatewayError`], carrying what the
//! layers above decide on), and the one place that turns one into an HTTP answer shaped like Easemob's error
//! envelope. Only the rescue layer (`rescue.rs`) and the panic guard call it.

use std::borrow::Cow;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Response, StatusCode, header};

use crate::exchange::{Answer, ErrorKind, Labels, Marks, Stamped};
use crate::ratelimit::{RATELIMIT, RATELIMIT_POLICY, RateLimitHeaders, retry_after_secs};
use crate::routes::validate::{MAX_MSG_IDS, ValidationError};

/// Marks every response the gateway makes itself, so callers can tell them from Easemob's.
pub const GATEWAY_HEADER: &str = "x-easemob-gateway";

/// The `exception` field of gateway-made envelopes: Easemob puts a server class name there.
const EXCEPTION: &str = "EasemobGatewayException";

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("no such route")]
    UnknownRoute { hint: &'static str },
    #[error("method not allowed")]
    MethodNotAllowed { allow: Method },
    #[error("unknown organization or application")]
    UnknownApp,
    #[error("invalid request: {0}")]
    Invalid(#[from] ValidationError),
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("request line and headers larger than {limit} bytes")]
    HeadTooLarge { limit: usize },
    #[error("request body could not be read")]
    BodyUnreadable,
    #[error("request body not received in time")]
    BodyTimeout,
    /// `limit` holds the `RateLimit-Policy` and `RateLimit` fields naming the limit that refused.
    #[error("over quota")]
    RateLimited { retry_after: Duration, limit: RateLimitHeaders },
    #[error("caller not allowed")]
    Forbidden,
    #[error("gateway key missing or unknown")]
    Unauthenticated,
    #[error("too many requests in flight")]
    Overloaded,
    #[error("no valid app token")]
    NoToken { retry_after: Duration },
    /// Nothing was sent. `unused_slot` is the quota slot taken for the call (set by the quota layer on the way up):
    /// the retry sends with it rather than taking another.
    #[error("upstream unreachable")]
    UpstreamUnreachable { unused_slot: Option<RateLimitHeaders> },
    /// No whole answer in time: the deletion may have been carried out.
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// The answer was cut off or unreadable: the deletion may have been carried out.
    #[error("upstream answer unusable")]
    UpstreamFailed,
    #[error("internal error")]
    Internal,
    #[error("no such job")]
    JobNotFound,
    /// A job request that cannot be accepted: `error` is the envelope's type, the description says what is wrong
    /// (every bad operation by its index).
    #[error("invalid job: {description}")]
    InvalidJob { error: &'static str, description: String },
    #[error("job too large")]
    TooManyOperations { max: usize, got: usize },
    /// One operation of a job request is longer than any can be (`index` counts from 0).
    #[error("job operation too large")]
    OperationTooLarge { index: usize, limit: usize },
    #[error("idempotency key reused for a different job")]
    IdempotencyConflict,
    #[error("jobs store unavailable")]
    JobsUnavailable,
    #[error("deletion jobs are disabled")]
    JobsDisabled,
}

/// What the layers above validation fail with: the error, and who it is about as far as the request named its
/// app and route (validation fills them in), for the answer's log line, metrics and `RateLimit-Policy`.
#[derive(Debug)]
pub struct Failure {
    pub error: GatewayError,
    pub labels: Labels,
}

impl Failure {
    /// A handler's answer or failure, labelled with `labels` (a lane's answer stating its policy).
    #[expect(
        clippy::result_large_err,
        reason = "the answer beside it is larger still, so the result is no larger; a box would allocate per refusal"
    )]
    pub fn labelled(result: Result<Answer, GatewayError>, labels: Labels) -> Result<Answer, Failure> {
        match result {
            Ok(mut answer) => {
                labels.apply(&mut answer);
                Ok(answer)
            }
            Err(error) => Err(Failure { error, labels }),
        }
    }
}

impl From<GatewayError> for Failure {
    fn from(error: GatewayError) -> Failure {
        Failure { error, labels: Labels::default() }
    }
}

impl GatewayError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            GatewayError::UnknownRoute { .. } => ErrorKind::UnknownRoute,
            GatewayError::MethodNotAllowed { .. } => ErrorKind::MethodNotAllowed,
            GatewayError::UnknownApp => ErrorKind::UnknownApp,
            GatewayError::Invalid(_) => ErrorKind::Invalid,
            GatewayError::BodyTooLarge { .. } => ErrorKind::BodyTooLarge,
            GatewayError::HeadTooLarge { .. } => ErrorKind::HeadTooLarge,
            GatewayError::BodyUnreadable => ErrorKind::BodyUnreadable,
            GatewayError::BodyTimeout => ErrorKind::BodyTimeout,
            GatewayError::RateLimited { .. } => ErrorKind::RateLimited,
            GatewayError::Forbidden => ErrorKind::Forbidden,
            GatewayError::Unauthenticated => ErrorKind::Unauthenticated,
            GatewayError::Overloaded => ErrorKind::Overloaded,
            GatewayError::NoToken { .. } => ErrorKind::NoToken,
            GatewayError::UpstreamUnreachable { .. } => ErrorKind::UpstreamUnreachable,
            GatewayError::UpstreamTimeout => ErrorKind::UpstreamTimeout,
            GatewayError::UpstreamFailed => ErrorKind::UpstreamFailed,
            GatewayError::Internal => ErrorKind::Internal,
            GatewayError::JobNotFound => ErrorKind::JobNotFound,
            GatewayError::InvalidJob { .. } => ErrorKind::InvalidJob,
            GatewayError::TooManyOperations { .. } => ErrorKind::TooManyOperations,
            GatewayError::OperationTooLarge { .. } => ErrorKind::OperationTooLarge,
            GatewayError::IdempotencyConflict => ErrorKind::IdempotencyConflict,
            GatewayError::JobsUnavailable => ErrorKind::JobsUnavailable,
            GatewayError::JobsDisabled => ErrorKind::JobsDisabled,
        }
    }

    /// Everything the answer to this error says, decided in one match: status, Easemob's error type and text, the
    /// origin the marker header states, `Retry-After`, and any header of its own. Also what a job's operation
    /// records when it fails this way.
    pub fn shape(self) -> Shape {
        use StatusCode as S;
        match self {
            GatewayError::UnknownRoute { hint } => rejected(
                S::NOT_FOUND,
                "service_resource_not_found",
                format!("easemob-gateway serves only the six one-way deletion routes; {hint}"),
            ),
            GatewayError::MethodNotAllowed { allow } => Shape {
                headers: [Some((header::ALLOW, HeaderValue::from_str(allow.as_str()).expect("a method"))), None],
                ..rejected(S::METHOD_NOT_ALLOWED, "method_not_allowed", format!("this route accepts only {allow}"))
            },
            GatewayError::UnknownApp => rejected(
                S::NOT_FOUND,
                "organization_application_not_found",
                "this gateway has no configured app for this org_name/app_name",
            ),
            GatewayError::Invalid(e) => rejected(S::BAD_REQUEST, e.error, e.description),
            GatewayError::BodyTooLarge { limit } => {
                rejected(S::PAYLOAD_TOO_LARGE, TOO_LARGE, format!("request body is larger than {limit} bytes"))
            }
            GatewayError::HeadTooLarge { limit } => rejected(
                S::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request_header_fields_too_large",
                format!("the request line and headers are larger than {limit} bytes"),
            ),
            GatewayError::BodyUnreadable => {
                rejected(S::BAD_REQUEST, "invalid_request_body", "the request body could not be read to its end")
            }
            GatewayError::BodyTimeout => {
                rejected(S::REQUEST_TIMEOUT, "request_timeout", "the request body did not arrive in time")
            }
            GatewayError::RateLimited { retry_after, limit } => Shape {
                retry_after: Some(retry_after),
                headers: [Some((RATELIMIT_POLICY, limit.policy)), Some((RATELIMIT, limit.limit))],
                ..rejected(S::TOO_MANY_REQUESTS, "reach_limit", "This request has reached api limit")
            },
            GatewayError::Forbidden => {
                rejected(S::FORBIDDEN, "forbidden", "this address may not call the gateway (server.allow_from)")
            }
            GatewayError::Unauthenticated => {
                rejected(S::UNAUTHORIZED, "gateway_key_required", "send a known key in one X-Gateway-Key header")
            }
            GatewayError::Overloaded => {
                unavailable("the gateway is at its limit of requests in flight; retry shortly", Duration::from_secs(1))
            }
            GatewayError::NoToken { retry_after } => unavailable(
                format!(
                    "the gateway holds no valid Easemob app token yet; retry after {}s",
                    retry_after_secs(retry_after)
                ),
                retry_after,
            ),
            GatewayError::UpstreamUnreachable { .. } => {
                upstream(S::BAD_GATEWAY, "upstream_unreachable", "Easemob could not be reached")
            }
            GatewayError::UpstreamTimeout => {
                upstream(S::GATEWAY_TIMEOUT, "upstream_timeout", "Easemob did not answer in time")
            }
            GatewayError::UpstreamFailed => {
                upstream(S::BAD_GATEWAY, "upstream_failed", "Easemob's answer was cut off or unreadable")
            }
            GatewayError::Internal => {
                rejected(S::INTERNAL_SERVER_ERROR, "internal_error", "the gateway failed to handle this request")
            }
            GatewayError::JobNotFound => rejected(
                S::NOT_FOUND,
                "job_not_found",
                "this app has no job with this id (finished jobs expire after jobs.retention)",
            ),
            GatewayError::InvalidJob { error, description } => rejected(S::BAD_REQUEST, error, description),
            GatewayError::TooManyOperations { max, got } => rejected(
                S::PAYLOAD_TOO_LARGE,
                TOO_LARGE,
                format!(
                    "a job holds at most {max} operations (jobs.max_operations), counting each batch of {MAX_MSG_IDS} message IDs; this one has at least {got}"
                ),
            ),
            GatewayError::OperationTooLarge { index, limit } => rejected(
                S::PAYLOAD_TOO_LARGE,
                TOO_LARGE,
                format!("operations[{index}] is over {limit} bytes, more than any operation takes"),
            ),
            GatewayError::IdempotencyConflict => rejected(
                S::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different job request",
            ),
            GatewayError::JobsUnavailable => unavailable(
                "the jobs store cannot keep new work right now; nothing was accepted",
                Duration::from_secs(5),
            ),
            GatewayError::JobsDisabled => rejected(
                S::NOT_FOUND,
                "jobs_disabled",
                "deletion jobs are disabled on this gateway; its configuration enables them with jobs.enabled = true",
            ),
        }
    }

    /// The answer for the caller, in Easemob's error envelope. `started` is when the request arrived (for the
    /// envelope's `duration`).
    pub fn into_response(self, started: Instant) -> Answer {
        let kind = self.kind();
        let Shape { status, error, description, origin, retry_after, headers } = self.shape();
        let mut response = envelope(status, error, &description, started, origin);
        let response_headers = response.headers_mut();
        if let Some(wait) = retry_after {
            response_headers.insert(header::RETRY_AFTER, retry_after_value(wait));
        }
        for (name, value) in headers.into_iter().flatten() {
            response_headers.insert(name, value);
        }
        response.stamp_mut().rejection = Some(kind);
        response
    }
}

/// The `x-easemob-gateway` value of answers the gateway refused to forward, and of those it could not get from
/// Easemob.
const REJECTED: &str = "rejected";
const UPSTREAM_ERROR: &str = "upstream-error";
/// Easemob's `error` for a request too large.
const TOO_LARGE: &str = "request_entity_too_large";

/// Everything one gateway-made answer says, decided together.
pub struct Shape {
    pub status: StatusCode,
    /// Easemob's `error` type.
    pub error: &'static str,
    pub description: Cow<'static, str>,
    /// The `x-easemob-gateway` value.
    origin: &'static str,
    pub retry_after: Option<Duration>,
    /// Headers of its own (`Allow`, the rate-limit fields).
    headers: [Option<(HeaderName, HeaderValue)>; 2],
}

/// A refusal with no header of its own.
fn rejected(status: StatusCode, error: &'static str, description: impl Into<Cow<'static, str>>) -> Shape {
    let description = description.into();
    Shape { status, error, description, origin: REJECTED, retry_after: None, headers: [None, None] }
}

/// A 503 the caller may retry after `retry_after`.
fn unavailable(description: impl Into<Cow<'static, str>>, retry_after: Duration) -> Shape {
    Shape {
        retry_after: Some(retry_after),
        ..rejected(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", description)
    }
}

/// An answer the gateway could not get from Easemob.
fn upstream(status: StatusCode, error: &'static str, description: &'static str) -> Shape {
    Shape { origin: UPSTREAM_ERROR, ..rejected(status, error, description) }
}

/// The `Retry-After` value: the few usual ones (a flood's refusals say 1 or 2) without formatting or allocating.
fn retry_after_value(wait: Duration) -> HeaderValue {
    const SHORT: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match retry_after_secs(wait) {
        secs @ 0..=9 => HeaderValue::from_static(SHORT[secs as usize]),
        secs => secs.into(),
    }
}

/// A JSON answer made by the gateway itself in Easemob's error envelope,
/// `{"error","exception","timestamp","duration","error_description"}`; `origin` is the value of the
/// `x-easemob-gateway` header. Written field by field, in Easemob's order: a string with nothing to escape (every
/// fixed text, and most details) is copied as it is, any other is escaped by serde_json; the numbers by itoa.
pub fn envelope(status: StatusCode, error: &str, description: &str, started: Instant, origin: &'static str) -> Answer {
    let mut body = Vec::with_capacity(ENVELOPE_BYTES + error.len() + description.len());
    let mut number = itoa::Buffer::new();
    body.extend_from_slice(b"{\"error\":");
    json_string(&mut body, error);
    body.extend_from_slice(b",\"exception\":\"");
    body.extend_from_slice(EXCEPTION.as_bytes());
    body.extend_from_slice(b"\",\"timestamp\":");
    body.extend_from_slice(number.format(unix_millis()).as_bytes());
    body.extend_from_slice(b",\"duration\":");
    body.extend_from_slice(number.format(started.elapsed().as_millis() as u64).as_bytes());
    body.extend_from_slice(b",\"error_description\":");
    json_string(&mut body, description);
    body.push(b'}');
    json_response(status, body, origin)
}

/// `s` as a JSON string.
fn json_string(out: &mut Vec<u8>, s: &str) {
    // Every byte looked at, without stopping at the first to escape: the loop vectorizes, and the usual string
    // has none.
    let plain = s.bytes().fold(true, |plain, b| plain & (b >= 0x20) & (b != b'"') & (b != b'\\'));
    if plain {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, s).expect("a string serializes");
    }
}

/// A gateway-made JSON response with the marker header.
pub fn json_response(status: StatusCode, body: Vec<u8>, origin: &'static str) -> Answer {
    let mut response = Response::new(Stamped::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, JSON_UTF8);
    headers.insert(GATEWAY_HEADER, HeaderValue::from_static(origin));
    response
}

const JSON_UTF8: HeaderValue = HeaderValue::from_static("application/json;charset=UTF-8");
/// The envelope's keys and numbers, without the description: its buffer is allocated once.
const ENVELOPE_BYTES: usize = 160;

pub fn unix_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_envelope_is_what_serde_json_would_write() {
        for description in ["This request has reached api limit", "quote \" backslash \\ newline \n tab \t 日本 \u{1}"]
        {
            let answer = envelope(StatusCode::BAD_REQUEST, "illegal_argument", description, Instant::now(), "rejected");
            let body = futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(answer.into_body()))
                .unwrap()
                .unwrap()
                .to_bytes();
            let parsed: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
            let keys: Vec<&String> = parsed.as_object().unwrap().keys().collect();
            assert_eq!(parsed["error_description"], description);
            assert_eq!(parsed["error"], "illegal_argument");
            assert_eq!(parsed["exception"], EXCEPTION);
            assert!(parsed["timestamp"].as_u64().unwrap() > 1_700_000_000_000);
            assert_eq!(parsed["duration"], 0);
            let text = String::from_utf8(body.to_vec()).unwrap();
            assert!(
                text.starts_with("{\"error\":") && text.find("\"error_description\"") > text.find("\"duration\""),
                "{text} {keys:?}"
            );
        }
    }
    use http_body_util::BodyExt;

    async fn body_json(r: Answer) -> serde_json::Value {
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn no_token_answer_has_retry_after_and_envelope() {
        let r = GatewayError::NoToken { retry_after: Duration::from_millis(1500) }.into_response(Instant::now());
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        assert_eq!(r.headers()[GATEWAY_HEADER], "rejected");
        let v = body_json(r).await;
        for key in ["error", "exception", "timestamp", "duration", "error_description"] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["error"], "service_unavailable");
    }

    #[tokio::test]
    async fn method_not_allowed_names_the_allowed_method() {
        let r = GatewayError::MethodNotAllowed { allow: Method::DELETE }.into_response(Instant::now());
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[header::ALLOW], "DELETE");
    }

    #[test]
    fn retry_after_is_never_zero() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_value(Duration::from_millis(10)), "1");
        assert_eq!(retry_after_value(Duration::from_millis(60_300)), "61");
    }
}
