//! The one enum of errors the gateway answers itself, and the one place that turns them into HTTP answers
//! shaped like Easemob's error envelope.

use std::borrow::Cow;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body_util::Full;
use serde::Serialize;

use crate::ratelimit::RateLimitHeaders;
use crate::routes::ValidationError;

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
    #[error("request body could not be read")]
    BodyUnreadable,
    #[error("request body not received in time")]
    BodyTimeout,
    #[error("over quota")]
    RateLimited { retry_after: Duration, headers: RateLimitHeaders },
    #[error("caller not allowed")]
    Forbidden,
    #[error("gateway key missing or unknown")]
    Unauthenticated,
    #[error("too many requests in flight")]
    Overloaded,
    #[error("no valid app token")]
    NoToken { retry_after: Duration },
    #[error("upstream unreachable")]
    UpstreamUnreachable,
    #[error("upstream timed out")]
    UpstreamTimeout,
    #[error("upstream answer unusable")]
    UpstreamFailed,
    #[error("internal error")]
    Internal,
}

impl GatewayError {
    /// A short, stable name: the `reason` label of metrics and log lines, so cardinality stays bounded.
    pub fn kind(&self) -> &'static str {
        match self {
            GatewayError::UnknownRoute { .. } => "unknown_route",
            GatewayError::MethodNotAllowed { .. } => "method_not_allowed",
            GatewayError::UnknownApp => "unknown_app",
            GatewayError::Invalid(_) => "invalid",
            GatewayError::BodyTooLarge { .. } => "body_too_large",
            GatewayError::BodyUnreadable => "body_unreadable",
            GatewayError::BodyTimeout => "body_timeout",
            GatewayError::RateLimited { .. } => "rate_limited",
            GatewayError::Forbidden => "forbidden",
            GatewayError::Unauthenticated => "unauthenticated",
            GatewayError::Overloaded => "overloaded",
            GatewayError::NoToken { .. } => "no_token",
            GatewayError::UpstreamUnreachable => "upstream_unreachable",
            GatewayError::UpstreamTimeout => "upstream_timeout",
            GatewayError::UpstreamFailed => "upstream_failed",
            GatewayError::Internal => "internal",
        }
    }

    /// The answer for the caller. `started` is when the request arrived (for the envelope's `duration`).
    pub fn into_response(self, started: Instant) -> Response<Full<Bytes>> {
        let (status, error, description): (StatusCode, &str, Cow<'static, str>) = match &self {
            GatewayError::UnknownRoute { hint } => (
                StatusCode::NOT_FOUND,
                "service_resource_not_found",
                format!("easemob-gateway serves only the six one-way deletion routes; {hint}").into(),
            ),
            GatewayError::MethodNotAllowed { allow } => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("this route accepts only {allow}").into(),
            ),
            GatewayError::UnknownApp => (
                StatusCode::NOT_FOUND,
                "organization_application_not_found",
                "this gateway has no configured app for this org_name/app_name".into(),
            ),
            GatewayError::Invalid(e) => (StatusCode::BAD_REQUEST, e.error, e.description.clone().into()),
            GatewayError::BodyTooLarge { limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_entity_too_large",
                format!("request body is larger than {limit} bytes").into(),
            ),
            GatewayError::BodyUnreadable => (
                StatusCode::BAD_REQUEST,
                "invalid_request_body",
                "the request body could not be read to its end".into(),
            ),
            GatewayError::RateLimited { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "reach_limit", "This request has reached api limit".into())
            }
            GatewayError::BodyTimeout => {
                (StatusCode::REQUEST_TIMEOUT, "request_timeout", "the request body did not arrive in time".into())
            }
            GatewayError::Forbidden => {
                (StatusCode::FORBIDDEN, "forbidden", "this address may not call the gateway (server.allow_from)".into())
            }
            GatewayError::Unauthenticated => (
                StatusCode::UNAUTHORIZED,
                "gateway_key_required",
                "send a known key in the X-Gateway-Key header".into(),
            ),
            GatewayError::Overloaded => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "the gateway is at its limit of requests in flight; retry shortly".into(),
            ),
            GatewayError::NoToken { retry_after } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                format!(
                    "the gateway holds no valid Easemob app token yet; retry after {}s",
                    retry_after_secs(*retry_after)
                )
                .into(),
            ),
            GatewayError::UpstreamUnreachable => {
                (StatusCode::BAD_GATEWAY, "upstream_unreachable", "Easemob could not be reached".into())
            }
            GatewayError::UpstreamTimeout => {
                (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", "Easemob did not answer in time".into())
            }
            GatewayError::UpstreamFailed => {
                (StatusCode::BAD_GATEWAY, "upstream_failed", "Easemob's answer was cut off or unreadable".into())
            }
            GatewayError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the gateway failed to handle this request".into(),
            ),
        };
        let origin = match self {
            GatewayError::UpstreamUnreachable | GatewayError::UpstreamTimeout | GatewayError::UpstreamFailed => {
                "upstream-error"
            }
            _ => "rejected",
        };
        let mut response = envelope(status, error, &description, started, origin);
        match self {
            GatewayError::MethodNotAllowed { allow } => {
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_str(allow.as_str()).expect("method is a valid header"));
            }
            GatewayError::NoToken { retry_after } => {
                response.headers_mut().insert(header::RETRY_AFTER, retry_after_secs(retry_after).into());
            }
            GatewayError::Overloaded => {
                response.headers_mut().insert(header::RETRY_AFTER, 1.into());
            }
            GatewayError::RateLimited { retry_after, headers } => {
                response.headers_mut().insert(header::RETRY_AFTER, retry_after_secs(retry_after).into());
                headers.insert_into(response.headers_mut());
            }
            _ => {}
        }
        response
    }
}

/// Whole seconds for `Retry-After`, never 0 (which would invite an immediate retry storm).
pub fn retry_after_secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

/// Easemob's error envelope: `{"error","exception","timestamp","duration","error_description"}`.
#[derive(Serialize)]
struct Envelope<'a> {
    error: &'a str,
    exception: &'a str,
    timestamp: u64,
    duration: u64,
    error_description: &'a str,
}

/// A JSON answer made by the gateway itself; `origin` is the value of the `x-easemob-gateway` header.
pub fn envelope(
    status: StatusCode,
    error: &str,
    description: &str,
    started: Instant,
    origin: &'static str,
) -> Response<Full<Bytes>> {
    let mut body = Vec::with_capacity(ENVELOPE_BYTES + description.len());
    let envelope = Envelope {
        error,
        exception: EXCEPTION,
        timestamp: unix_millis(),
        duration: started.elapsed().as_millis() as u64,
        error_description: description,
    };
    serde_json::to_writer(&mut body, &envelope).expect("envelope serializes");
    json_response(status, body, origin)
}

/// A gateway-made JSON response with the marker header.
pub fn json_response(status: StatusCode, body: Vec<u8>, origin: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
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
    use http_body_util::BodyExt;

    async fn body_json(r: Response<Full<Bytes>>) -> serde_json::Value {
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
    }
}
