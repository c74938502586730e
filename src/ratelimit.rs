//! The quota: Easemob's published limits enforced before a request costs anything upstream.
//!
//! Each (AppKey, route) is a [`Lane`] with its own GCRA limiter (`governor`), an optional AppKey-wide cap, and
//! for `delete_conversation` a per-user limit. A request over quota waits for its slot up to `max_wait`, in
//! arrival order (a fair async mutex per lane, so no thread is held and a caller that hangs up leaves the
//! queue), or is refused at once with `Retry-After` when its slot is further away. When Easemob still answers
//! 429, the lane pauses for Easemob's `Retry-After` and halves its rate, then recovers slowly.
//! With `backend = "redis"`, `ratelimit/redis.rs` makes all replicas draw from one quota instead.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

mod redis;

use bytes::Bytes;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::HeaderValue;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::{Limit, RateLimitBackend, RateLimitConfig};
use crate::metrics::Metrics;
use crate::routes::{Call, Route};

use self::redis::{Gate, Reservation, SharedQuota};

type Direct = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// A lane never slows below this share of its configured rate, however many 429s Easemob sends.
const MIN_ADAPTIVE_FACTOR: f64 = 0.1;
/// Several 429s within this window count as one signal: one halving, not a collapse.
const DECREASE_COOLDOWN: Duration = Duration::from_secs(1);
/// After this long without a 429, the rate climbs back by a tenth of the configured rate per step.
const RECOVERY_QUIET: Duration = Duration::from_secs(5);
const RECOVERY_STEP: Duration = Duration::from_secs(2);

/// A request the quota admitted: the `RateLimit` fields for its answer.
#[derive(Debug)]
pub struct Admitted {
    pub headers: RateLimitHeaders,
    pub waited: Duration,
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

pub const RATELIMIT_POLICY: http::HeaderName = http::HeaderName::from_static("ratelimit-policy");
const RATELIMIT: http::HeaderName = http::HeaderName::from_static("ratelimit");

impl RateLimitHeaders {
    pub fn insert_into(self, headers: &mut http::HeaderMap) {
        headers.insert(RATELIMIT_POLICY, self.policy);
        headers.insert(RATELIMIT, self.limit);
    }
}

/// One (AppKey, route) pair.
struct Lane {
    app: String,
    route: Route,
    configured: Limit,
    limiter: RwLock<Arc<Current>>,
    adaptive: Mutex<Adaptive>,
    /// Waiters line up here, in arrival order.
    queue: tokio::sync::Mutex<()>,
    waiting: AtomicUsize,
    policy: HeaderValue,
    /// `rate_limit_wait_seconds` for this lane, looked up once.
    wait: prometheus::Histogram,
    /// The `RateLimit` field of a refusal that may retry in a second: a flood's usual answer, built once.
    refused_for_a_second: HeaderValue,
}

/// The lane's limiter and the rate it was built for (the rate changes when Easemob throttles us).
struct Current {
    limiter: Direct,
    rate: u32,
}

#[derive(Debug)]
struct Adaptive {
    factor: f64,
    last_decrease: Option<Instant>,
    last_throttle: Option<Instant>,
    /// Easemob's `Retry-After`: nothing leaves this lane before it.
    paused_until: Option<Instant>,
}

pub struct QuotaSet {
    lanes: Vec<Lane>,
    apps: Vec<Option<Current>>,
    users: Vec<DefaultKeyedRateLimiter<String>>,
    app_limit: Option<Limit>,
    user_per_minute: NonZeroU32,
    max_wait: Duration,
    adaptive: bool,
    metrics: Metrics,
    clock: DefaultClock,
    shared: Option<Shared>,
}

/// The Redis backend, and the local quota at this replica's share used while Redis is unavailable.
struct Shared {
    quota: SharedQuota,
    fallback: Arc<QuotaSet>,
}

/// `limit` divided among `replicas`, never below one call.
fn share(limit: Limit, replicas: u32) -> Limit {
    let part = |n: NonZeroU32| NonZeroU32::new(n.get() / replicas).unwrap_or(NonZeroU32::MIN);
    Limit { rate: part(limit.rate), burst: part(limit.burst) }
}

fn direct(limit: Limit, factor: f64) -> Current {
    let rate = ((limit.rate.get() as f64 * factor).round() as u32).max(1);
    let quota = Quota::per_second(NonZeroU32::new(rate).expect("at least 1")).allow_burst(limit.burst);
    Current { limiter: RateLimiter::direct(quota).with_middleware::<StateInformationMiddleware>(), rate }
}

/// The `RateLimit` field of a refusal: nothing left, retry in `secs`.
fn refusal_field(route: Route, secs: u64) -> HeaderValue {
    header(format!("\"{}\";r=0;t={secs}", route.name()))
}

fn header(value: String) -> HeaderValue {
    // From `Bytes`, the value is checked but not copied again.
    HeaderValue::from_maybe_shared(Bytes::from(value)).expect("ASCII structured field")
}

impl QuotaSet {
    /// One lane per configured app and route; `apps` are AppKeys in config order.
    pub fn new(config: &RateLimitConfig, apps: &[String], metrics: Metrics) -> Result<Arc<QuotaSet>, String> {
        let shared = match config.backend {
            RateLimitBackend::Local => None,
            RateLimitBackend::Redis => {
                let replicas = config.redis.expected_replicas.get();
                let mut local_share = config.clone();
                local_share.backend = RateLimitBackend::Local;
                local_share.route = share(config.route, replicas);
                local_share.routes.values_mut().for_each(|limit| *limit = share(*limit, replicas));
                local_share.app = config.app.map(|cap| share(cap, replicas));
                local_share.user_conversation_per_minute =
                    share(Limit { rate: config.user_conversation_per_minute, burst: NonZeroU32::MIN }, replicas).rate;
                Some(Shared {
                    quota: SharedQuota::new(&config.redis, metrics.clone())?,
                    fallback: QuotaSet::build(&local_share, apps, metrics.clone(), None, false),
                })
            }
        };
        Ok(QuotaSet::build(config, apps, metrics, shared, true))
    }

    /// `report`: this set's rates are the ones the `rate_limit_rate` gauge shows (not the fallback's).
    fn build(
        config: &RateLimitConfig,
        apps: &[String],
        metrics: Metrics,
        shared: Option<Shared>,
        report: bool,
    ) -> Arc<QuotaSet> {
        let mut lanes = Vec::with_capacity(apps.len() * Route::ALL.len());
        for app in apps {
            for route in Route::ALL {
                let limit = config.route_limit(route.name());
                let mut policy = format!("\"{}\";q={};w=1", route.name(), limit.rate);
                if let Some(cap) = config.app {
                    policy.push_str(&format!(", \"app\";q={};w=1", cap.rate));
                }
                if route == Route::DeleteConversation {
                    policy.push_str(&format!(", \"user\";q={};w=60", config.user_conversation_per_minute));
                }
                if report {
                    metrics.rate_limit_rate.with_label_values(&[app, route.name()]).set(limit.rate.get() as i64);
                    // Series exist from the start at 0, so rate() and alerts work before the first event.
                    metrics.upstream_throttled.with_label_values(&[app, route.name()]);
                    metrics.upstream_retries.with_label_values(&[app, route.name()]);
                }
                lanes.push(Lane {
                    app: app.clone(),
                    route,
                    configured: limit,
                    limiter: RwLock::new(Arc::new(direct(limit, 1.0))),
                    adaptive: Mutex::new(Adaptive {
                        factor: 1.0,
                        last_decrease: None,
                        last_throttle: None,
                        paused_until: None,
                    }),
                    queue: tokio::sync::Mutex::new(()),
                    waiting: AtomicUsize::new(0),
                    policy: header(policy),
                    wait: metrics.rate_limit_wait.with_label_values(&[app, route.name()]),
                    refused_for_a_second: refusal_field(route, 1),
                });
            }
        }
        let per_user = Quota::per_minute(config.user_conversation_per_minute);
        let set = Arc::new(QuotaSet {
            lanes,
            apps: apps.iter().map(|_| config.app.map(|cap| direct(cap, 1.0))).collect(),
            users: apps.iter().map(|_| RateLimiter::keyed(per_user)).collect(),
            app_limit: config.app,
            user_per_minute: config.user_conversation_per_minute,
            max_wait: config.max_wait,
            adaptive: config.adaptive && report,
            metrics,
            clock: DefaultClock::default(),
            shared,
        });
        tokio::spawn(Arc::clone(&set).housekeeping());
        set
    }

    /// The `RateLimit-Policy` value of a lane.
    pub fn policy(&self, app: usize, route: Route) -> HeaderValue {
        self.lane(app, route).policy.clone()
    }

    fn lane(&self, app: usize, route: Route) -> &Lane {
        &self.lanes[app * Route::ALL.len() + route.index()]
    }

    /// Admits `call` for app number `app`, waiting up to `max_wait` in arrival order, or refuses it.
    pub async fn acquire(&self, app: usize, call: &Call) -> Result<Admitted, Refused> {
        let lane = self.lane(app, call.route());
        let started = Instant::now();
        let user = match call {
            Call::DeleteConversation { owner, .. } => Some(owner.as_str().to_ascii_lowercase()),
            _ => None,
        };
        let result = match &self.shared {
            Some(shared) => self.shared(shared, app, lane, user.as_deref()).await,
            None => self.local(app, lane, user.as_deref()).await,
        };
        let waited = started.elapsed();
        match result {
            Ok(remaining) => {
                lane.wait.observe(waited.as_secs_f64());
                let limit =
                    header(format!("\"{}\";r={remaining};t={}", lane.route.name(), if remaining > 0 { 0 } else { 1 }));
                Ok(Admitted { headers: RateLimitHeaders { policy: lane.policy.clone(), limit }, waited })
            }
            Err(retry_after) => {
                let limit = match crate::error::retry_after_secs(retry_after) {
                    1 => lane.refused_for_a_second.clone(),
                    secs => refusal_field(lane.route, secs),
                };
                Err(Refused { retry_after, headers: RateLimitHeaders { policy: lane.policy.clone(), limit } })
            }
        }
    }

    /// The in-process decision: `Ok(remaining burst)` or `Err(retry after)`.
    async fn local(&self, app: usize, lane: &Lane, user: Option<&str>) -> Result<u32, Duration> {
        let deadline = Instant::now() + self.max_wait;
        let gates = Gates {
            lane,
            app: self.apps[app].as_ref(),
            users: user.map(|u| (&self.users[app], u)),
            clock: &self.clock,
        };
        let mut passed = Passed::default();
        // Fast path: nobody is queued ahead, and every gate has room now.
        let mut first_wait = Duration::ZERO;
        if lane.waiting.load(Ordering::Acquire) == 0 && lane.pause_left().is_none() {
            match gates.check(&mut passed) {
                Ok(remaining) => return Ok(remaining),
                Err(wait) => first_wait = wait,
            }
        }
        let _waiter = Waiter::enter(&lane.waiting);
        let ahead = lane.waiting.load(Ordering::Acquire).saturating_sub(1);
        let emission = Duration::from_secs(1) / lane.current().rate;
        // Refuse at once when the slot is beyond max_wait, rather than make the caller wait to be refused.
        let estimate = lane.pause_left().unwrap_or_default() + first_wait + emission * ahead as u32;
        if Instant::now() + estimate > deadline {
            return Err(estimate.max(emission));
        }
        let Ok(_turn) = tokio::time::timeout_at(deadline, lane.queue.lock()).await else {
            return Err(emission * (ahead as u32 + 1));
        };
        loop {
            if let Some(pause) = lane.pause_left() {
                if Instant::now() + pause > deadline {
                    return Err(pause);
                }
                tokio::time::sleep(pause).await;
                continue;
            }
            match gates.check(&mut passed) {
                Ok(remaining) => return Ok(remaining),
                Err(wait) if Instant::now() + wait > deadline => return Err(wait),
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    /// The shared decision: one reservation across every gate in Redis, or this replica's share while Redis is
    /// unavailable.
    async fn shared(&self, shared: &Shared, app: usize, lane: &Lane, user: Option<&str>) -> Result<u32, Duration> {
        let deadline = Instant::now() + self.max_wait;
        if let Some(pause) = lane.pause_left() {
            if pause > self.max_wait {
                return Err(pause);
            }
            tokio::time::sleep(pause).await;
        }
        if shared.quota.should_try() {
            let gcra = |rate: u32, per: Duration, burst: u32| {
                let emission = per / rate;
                Gate { key: String::new(), emission, tolerance: emission * (burst - 1) }
            };
            let current = lane.current().rate;
            let mut gates = vec![Gate {
                key: shared.quota.key(&lane.app, lane.route.name()),
                ..gcra(current, Duration::from_secs(1), lane.configured.burst.get())
            }];
            if let Some(cap) = self.app_limit {
                gates.push(Gate {
                    key: shared.quota.key(&lane.app, "app"),
                    ..gcra(cap.rate.get(), Duration::from_secs(1), cap.burst.get())
                });
            }
            if let Some(user) = user {
                let n = self.user_per_minute.get();
                gates.push(Gate {
                    key: shared.quota.key(&lane.app, &format!("user:{user}")),
                    ..gcra(n, Duration::from_secs(60), n)
                });
            }
            match shared.quota.reserve(&gates, deadline.saturating_duration_since(Instant::now())).await {
                Ok(Reservation::Admitted { wait, remaining, release }) => {
                    tokio::time::sleep(wait).await;
                    release.disarm();
                    return Ok(remaining);
                }
                Ok(Reservation::Refused { retry_after }) => return Err(retry_after),
                Err(_) => {} // logged once on the transition; this replica's share applies meanwhile
            }
        }
        let fallback = &shared.fallback;
        fallback.local(app, fallback.lane(app, lane.route), user).await
    }

    /// Easemob answered 429 on this lane: pause for its `Retry-After`, and (if adaptive) halve the lane's rate.
    pub fn upstream_throttled(&self, app: usize, route: Route, retry_after: Option<Duration>) {
        let lane = self.lane(app, route);
        self.metrics.upstream_throttled.with_label_values(&[&lane.app, route.name()]).inc();
        let now = Instant::now();
        let mut adaptive = lane.adaptive.lock().expect("adaptive lock");
        adaptive.last_throttle = Some(now);
        if let Some(wait) = retry_after {
            adaptive.paused_until = Some(adaptive.paused_until.map_or(now + wait, |p| p.max(now + wait)));
        }
        let cooling = adaptive.last_decrease.is_some_and(|t| now.duration_since(t) < DECREASE_COOLDOWN);
        if self.adaptive && !cooling && adaptive.factor > MIN_ADAPTIVE_FACTOR {
            adaptive.factor = (adaptive.factor / 2.0).max(MIN_ADAPTIVE_FACTOR);
            adaptive.last_decrease = Some(now);
            let rate = lane.set_factor(adaptive.factor);
            self.metrics.rate_limit_rate.with_label_values(&[&lane.app, route.name()]).set(rate as i64);
            warn!(app = %lane.app, route = route.name(), rate, ?retry_after, "easemob answered 429: lowering this route's rate");
        }
    }

    /// Recovers throttled lanes step by step, and forgets idle per-user keys so memory stays bounded.
    async fn housekeeping(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RECOVERY_STEP);
        loop {
            tick.tick().await;
            let now = Instant::now();
            for lane in &self.lanes {
                let mut adaptive = lane.adaptive.lock().expect("adaptive lock");
                let quiet = adaptive.last_throttle.is_none_or(|t| now.duration_since(t) >= RECOVERY_QUIET);
                if adaptive.factor < 1.0 && quiet {
                    adaptive.factor = (adaptive.factor + 0.1).min(1.0);
                    let rate = lane.set_factor(adaptive.factor);
                    self.metrics.rate_limit_rate.with_label_values(&[&lane.app, lane.route.name()]).set(rate as i64);
                    info!(app = %lane.app, route = lane.route.name(), rate, "route rate recovering");
                }
            }
            for users in &self.users {
                users.retain_recent();
                users.shrink_to_fit();
            }
        }
    }
}

impl Lane {
    fn current(&self) -> Arc<Current> {
        Arc::clone(&self.limiter.read().expect("limiter lock"))
    }

    /// Replaces the limiter at `factor` of the configured rate; returns the new rate.
    fn set_factor(&self, factor: f64) -> u32 {
        let current = direct(self.configured, factor);
        // A new limiter starts with its whole burst available: spend it, so a change of rate never lets a burst
        // through (least of all right after Easemob said 429).
        let _ = current.limiter.check_n(self.configured.burst);
        let rate = current.rate;
        *self.limiter.write().expect("limiter lock") = Arc::new(current);
        rate
    }

    fn pause_left(&self) -> Option<Duration> {
        let paused = self.adaptive.lock().expect("adaptive lock").paused_until?;
        let left = paused.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }
}

/// Which gates a waiting request has already passed, so checking again after a wait never takes a slot twice.
#[derive(Default)]
struct Passed {
    user: bool,
    app: bool,
}

/// The limiters one request must pass: its lane, the AppKey cap, the per-user limit.
struct Gates<'a> {
    lane: &'a Lane,
    app: Option<&'a Current>,
    users: Option<(&'a DefaultKeyedRateLimiter<String>, &'a str)>,
    clock: &'a DefaultClock,
}

impl Gates<'_> {
    /// Takes a slot from each gate not passed yet, scarcest first: the per-user limit (a slot every 12 s), then the
    /// AppKey cap, then the lane. The first gate without room says how long to wait, and since nothing before it
    /// was taken, the commonest refusal (a user over their limit) costs no quota at all. `governor` cannot give a
    /// slot back, so a refusal by a later gate keeps the earlier gates' slots: at worst one per-user slot when
    /// the whole route is saturated past `max_wait`.
    fn check(&self, passed: &mut Passed) -> Result<u32, Duration> {
        let now = self.clock.now();
        if let (Some((users, user)), false) = (self.users, passed.user) {
            users.check_key(&user.to_owned()).map_err(|not_until| not_until.wait_time_from(now))?;
            passed.user = true;
        }
        if let (Some(app), false) = (self.app, passed.app) {
            app.limiter.check().map_err(|not_until| not_until.wait_time_from(now))?;
            passed.app = true;
        }
        match self.lane.current().limiter.check() {
            Ok(snapshot) => Ok(snapshot.remaining_burst_capacity()),
            Err(not_until) => Err(not_until.wait_time_from(now)),
        }
    }
}

/// Counts a request in its lane's queue for exactly as long as it waits, even if the caller hangs up.
struct Waiter<'a>(&'a AtomicUsize);

impl<'a> Waiter<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Waiter(count)
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::Call;

    fn limit(rate: u32, burst: u32) -> Limit {
        Limit { rate: NonZeroU32::new(rate).unwrap(), burst: NonZeroU32::new(burst).unwrap() }
    }

    fn clear(user: &str) -> Call {
        Call::parse(Route::ClearUserMessages, user, None, b"", 0).unwrap()
    }

    fn conversation(user: &str) -> Call {
        Call::parse(Route::DeleteConversation, user, None, br#"{"channel":"b","type":"chat","delete_roam":true}"#, 0)
            .unwrap()
    }

    fn quota(config: RateLimitConfig) -> Arc<QuotaSet> {
        QuotaSet::new(&config, &["o#a".to_owned()], Metrics::new()).unwrap()
    }

    #[test]
    fn a_replicas_share_is_never_zero() {
        assert_eq!(share(limit(100, 10), 3), limit(33, 3));
        assert_eq!(share(limit(2, 1), 3), limit(1, 1));
    }

    #[tokio::test]
    async fn burst_then_refusal_with_the_time_to_the_next_slot() {
        let config = RateLimitConfig { max_wait: Duration::ZERO, route: limit(10, 2), ..RateLimitConfig::default() };
        let quota = quota(config);
        let first = quota.acquire(0, &clear("u")).await.unwrap();
        assert_eq!(first.headers.limit, "\"clear_user_messages\";r=1;t=0");
        assert_eq!(first.headers.policy, "\"clear_user_messages\";q=10;w=1");
        quota.acquire(0, &clear("u")).await.unwrap();
        let refused = quota.acquire(0, &clear("u")).await.unwrap_err();
        assert!(refused.retry_after <= Duration::from_millis(100), "{:?}", refused.retry_after);
        assert_eq!(refused.headers.limit, "\"clear_user_messages\";r=0;t=1");
    }

    #[tokio::test]
    async fn per_user_limit_folds_case_and_names_itself_in_the_policy() {
        let config = RateLimitConfig { max_wait: Duration::ZERO, route: limit(100, 100), ..RateLimitConfig::default() };
        let quota = quota(config);
        for user in ["Ann", "ann", "ANN", "aNn", "ann"] {
            let admitted = quota.acquire(0, &conversation(user)).await.unwrap();
            assert_eq!(admitted.headers.policy, "\"delete_conversation\";q=100;w=1, \"user\";q=5;w=60");
        }
        let refused = quota.acquire(0, &conversation("ANN")).await.unwrap_err();
        assert!(refused.retry_after > Duration::from_secs(10));
        assert!(quota.acquire(0, &conversation("bob")).await.is_ok());
    }

    #[tokio::test]
    async fn easemob_429_halves_the_lane_and_pauses_it() {
        let quota = quota(RateLimitConfig { max_wait: Duration::ZERO, ..RateLimitConfig::default() });
        quota.upstream_throttled(0, Route::ClearUserMessages, Some(Duration::from_secs(2)));
        let lane = quota.lane(0, Route::ClearUserMessages);
        assert_eq!(lane.current().rate, 50);
        let refused = quota.acquire(0, &clear("u")).await.unwrap_err();
        assert!(refused.retry_after > Duration::from_secs(1), "paused for Easemob's Retry-After");
        assert!(quota.acquire(0, &conversation("u")).await.is_ok(), "other routes are not paused");
    }
}
