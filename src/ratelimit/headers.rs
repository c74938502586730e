//! The quota's decisions on the wire: the IETF draft's `RateLimit-Policy` and `RateLimit` fields
//! (draft-ietf-httpapi-ratelimit-headers, structured-field lists) rendered from the numbers a decision holds, and
//! Easemob's own `Retry-After` read back.

use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;

use crate::config::RateLimitConfig;
use crate::routes::Route;

use super::decision::{Refusal, Scope};

/// The IETF draft's rate-limit fields (draft-ietf-httpapi-ratelimit-headers), on every answer of a limited route.
pub const RATELIMIT_POLICY: http::HeaderName = http::HeaderName::from_static("ratelimit-policy");
pub const RATELIMIT: http::HeaderName = http::HeaderName::from_static("ratelimit");

/// Admissions whose `RateLimit` field is built in advance, per lane: far above Easemob's bursts.
const PREBUILT_ADMISSIONS: u32 = 1024;

/// A request the quota admitted: the `RateLimit` fields for its answer.
#[derive(Debug)]
pub struct Admitted {
    pub headers: RateLimitHeaders,
}

/// A request the quota refused: it cost nothing and goes nowhere.
#[derive(Debug)]
pub struct Refused {
    pub retry_after: Duration,
    pub headers: RateLimitHeaders,
}

/// The current IETF draft's fields (draft-ietf-httpapi-ratelimit-headers): structured-field lists.
#[derive(Clone, Debug)]
pub struct RateLimitHeaders {
    pub policy: HeaderValue,
    pub limit: HeaderValue,
}

impl RateLimitHeaders {
    pub fn insert_into(self, headers: &mut http::HeaderMap) {
        headers.insert(RATELIMIT_POLICY, self.policy);
        headers.insert(RATELIMIT, self.limit);
    }
}

/// Easemob's `Retry-After` in seconds (Easemob does not document one, but honour it if it comes), at most
/// `at_most`.
pub fn easemob_retry_after(headers: &http::HeaderMap, at_most: Duration) -> Option<Duration> {
    let secs: u64 = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs).min(at_most))
}

/// Whole seconds for `Retry-After`, never 0 (which would invite an immediate retry storm).
pub fn retry_after_secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

/// One lane's fields, built once per set: every admitted call carries one, and a flood's refusals share one.
pub struct Fields {
    route: Route,
    policy: HeaderValue,
    /// The `RateLimit` field of a refusal by the route that may retry in a second: a flood's usual answer.
    refused_for_a_second: HeaderValue,
    /// The `RateLimit` field of an admission, by the calls it leaves at once (up to the burst, or
    /// [`PREBUILT_ADMISSIONS`]).
    admitted: Box<[HeaderValue]>,
}

impl Fields {
    /// The fields of `route`'s lane under `config`: its limit, the AppKey cap and, for `delete_conversation`, the
    /// per-user window.
    pub fn new(config: &RateLimitConfig, route: Route) -> Fields {
        let limit = config.route_limit(route.name());
        let mut policy = format!("\"{}\";q={};w=1", route.name(), limit.rate);
        if let Some(cap) = config.app {
            policy.push_str(&format!(", \"app\";q={};w=1", cap.rate));
        }
        if route == Route::DeleteConversation {
            policy.push_str(&format!(", \"user\";q={};w=60", config.user_conversation_per_minute));
        }
        Fields {
            route,
            policy: header(policy),
            refused_for_a_second: refusal_field(route.name(), 1),
            admitted: (0..=limit.burst.get().min(PREBUILT_ADMISSIONS))
                .map(|left| admission_field(route, left))
                .collect(),
        }
    }

    /// The `RateLimit-Policy` value.
    pub fn policy(&self) -> HeaderValue {
        self.policy.clone()
    }

    /// The fields of an admission that leaves `remaining` calls at once.
    pub fn admitted(&self, remaining: u32) -> RateLimitHeaders {
        let limit = match self.admitted.get(remaining as usize) {
            Some(field) => field.clone(),
            None => admission_field(self.route, remaining),
        };
        RateLimitHeaders { policy: self.policy(), limit }
    }

    /// The answer to a refusal: the limit that refused, and when it has room.
    pub fn refused(&self, (scope, retry_after): Refusal) -> Refused {
        let limit = match (scope, retry_after_secs(retry_after)) {
            (Scope::Route, 1) => self.refused_for_a_second.clone(),
            (scope, secs) => refusal_field(scope_name(scope, self.route), secs),
        };
        Refused { retry_after, headers: RateLimitHeaders { policy: self.policy(), limit } }
    }
}

/// The name the `RateLimit-Policy` field gives a limit.
fn scope_name(scope: Scope, route: Route) -> &'static str {
    match scope {
        Scope::Route => route.name(),
        Scope::App => "app",
        Scope::User => "user",
    }
}

/// The `RateLimit` field of a refusal: nothing left under the limit `name`, retry in `secs`.
fn refusal_field(name: &str, secs: u64) -> HeaderValue {
    header(format!("\"{name}\";r=0;t={secs}"))
}

/// The `RateLimit` field of an admission that leaves `left` calls at once (none: the next in a second at most).
fn admission_field(route: Route, left: u32) -> HeaderValue {
    // Pushed, not formatted: with a burst above the prebuilt ones, this runs per admission.
    let mut field = String::with_capacity(40);
    field.push('"');
    field.push_str(route.name());
    field.push_str("\";r=");
    field.push_str(itoa::Buffer::new().format(left));
    field.push_str(if left == 0 { ";t=1" } else { ";t=0" });
    header(field)
}

fn header(value: String) -> HeaderValue {
    // From `Bytes`, the value is checked but not copied again.
    HeaderValue::from_maybe_shared(Bytes::from(value)).expect("ASCII structured field")
}
