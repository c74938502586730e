//! The quota: Easemob's published limits enforced before a request costs anything upstream, counted per window
//! exactly as Easemob counts them.
//!
//! Each (AppKey, route) is a [`Lane`] paced by `governor` (`ratelimit/pace.rs`: no one-second window ever holds
//! more than the route's quota), with an optional AppKey-wide cap paced the same way, and for
//! `delete_conversation` a per-user window (`ratelimit/window.rs`: at most 5 calls for one user in any 60 s,
//! 5 at once if they come together). A request over quota waits for its slot up to `max_wait`, in arrival order
//! (a fair async mutex per lane, so no thread is held and a caller that hangs up leaves the queue), or is refused
//! at once with `Retry-After` and a `RateLimit` field naming the limit that refused it. When Easemob still answers
//! 429, the lane pauses for Easemob's `Retry-After` and halves its rate, then recovers slowly.
//! With `backend = "redis"`, `ratelimit/redis.rs` makes all replicas draw from one quota with the same rules.
//! A replica's share (every limit divided by `rate_limit.replicas`) is its whole quota on the local backend, and
//! its fallback while Redis is unavailable, entered and left so that no window is overspent (`Phase`).
//! `ratelimit/layer.rs` puts it in the stack.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

pub mod layer;
mod pace;
mod redis;
mod window;

use bytes::Bytes;
use http::HeaderValue;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::{AppKey, Limit, RateLimitBackend, RateLimitConfig};
use crate::metrics::Metrics;
use crate::routes::Route;
use crate::routes::validate::Call;

use self::pace::{Pace, guarded};
use self::redis::{Gate, Phase, Reservation, SharedQuota};

use self::window::{Place, WindowLog};
pub use ::redis::RedisError;

/// The IETF draft's rate-limit fields (draft-ietf-httpapi-ratelimit-headers), on every answer of a limited route.
pub const RATELIMIT_POLICY: http::HeaderName = http::HeaderName::from_static("ratelimit-policy");
pub const RATELIMIT: http::HeaderName = http::HeaderName::from_static("ratelimit");

/// Easemob's windows: the route and AppKey limits count calls per second, the per-user limit per minute
/// (`window::MINUTE`, where the Redis backend can name it too).
const SECOND: Duration = Duration::from_secs(1);
pub use window::MINUTE;

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

/// The limit that decided: a refusal names it, with the time to its next free slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Route,
    App,
    User,
}

impl Scope {
    /// The name the `RateLimit-Policy` field gives this limit.
    fn name(self, route: Route) -> &'static str {
        match self {
            Scope::Route => route.name(),
            Scope::App => "app",
            Scope::User => "user",
        }
    }
}

/// Why a request was not admitted: the limit, and how long until it has room.
pub type Refusal = (Scope, Duration);

/// An app's position in the configuration: the index of its lanes, its cap and its users' windows here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppIndex(pub usize);

/// One (AppKey, route) pair.
struct Lane {
    app: AppKey,
    route: Route,
    configured: Limit,
    pace: RwLock<Arc<Pace>>,
    adaptive: Mutex<Adaptive>,
    /// Waiters line up here, in arrival order.
    queue: tokio::sync::Mutex<()>,
    waiting: AtomicUsize,
    policy: HeaderValue,
    /// `rate_limit_wait_seconds` for this lane, looked up once.
    wait: prometheus::Histogram,
    /// The `RateLimit` field of a refusal by this lane that may retry in a second: a flood's usual answer, built
    /// once.
    refused_for_a_second: HeaderValue,
    /// The `RateLimit` field of an admission, by the calls it leaves at once (up to the burst, or
    /// [`PREBUILT_ADMISSIONS`]): built once, as every admitted call carries one.
    admitted: Box<[HeaderValue]>,
    /// The jobs' share of the lane (`jobs.quota_share`), when it is less than the whole.
    jobs: Option<Pace>,
}

#[derive(Debug)]
struct Adaptive {
    factor: f64,
    last_decrease: Option<Instant>,
    last_throttle: Option<Instant>,
    /// Easemob's `Retry-After`: nothing leaves this lane before it.
    paused_until: Option<Instant>,
}

/// Every lane's state is shared (`Arc`), so that a reload can carry what it has counted into the set that
/// replaces this one.
pub struct QuotaSet {
    /// The AppKeys in config order: an [`AppIndex`] indexes them.
    keys: Vec<AppKey>,
    lanes: Vec<Arc<Lane>>,
    /// Per app, its optional cap across routes.
    apps: Vec<Option<Arc<Pace>>>,
    /// Per app, `delete_conversation`'s per-user windows.
    users: Vec<Arc<WindowLog>>,
    user_limit: NonZeroU32,
    max_wait: Duration,
    /// Per app, the jobs' share of its cap (when both exist and the share is less than the whole).
    app_jobs: Vec<Option<Arc<Pace>>>,
    adaptive: bool,
    metrics: Metrics,
    shared: Option<Shared>,
}

/// The Redis backend, and the local quota at this replica's share used while Redis is unavailable.
struct Shared {
    quota: Arc<SharedQuota>,
    fallback: Arc<QuotaSet>,
}

/// The user a call counts against (`delete_conversation`'s owner; IDs compare case-insensitively).
fn user_of(call: &Call) -> Option<String> {
    match call {
        Call::DeleteConversation { owner, .. } => Some(owner.as_str().to_ascii_lowercase()),
        _ => None,
    }
}

/// `factor` of `limit`'s rate, at least one call.
fn scaled(limit: Limit, factor: f64) -> NonZeroU32 {
    NonZeroU32::new((limit.rate.get() as f64 * factor).round() as u32).unwrap_or(NonZeroU32::MIN)
}

/// The jobs' share of `limit`, paced like the limit itself; none when they may use all of it.
fn jobs_pace(limit: Limit, share: f64) -> Option<Pace> {
    (share < 1.0).then(|| Pace::new(scaled(limit, share), NonZeroU32::MIN, SECOND))
}

/// The `RateLimit` field of a refusal: nothing left under the limit `name`, retry in `secs`.
fn refusal_field(name: &str, secs: u64) -> HeaderValue {
    header(format!("\"{name}\";r=0;t={secs}"))
}

/// Admissions whose `RateLimit` field is built in advance, per lane: far above Easemob's bursts.
const PREBUILT_ADMISSIONS: u32 = 1024;

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

impl QuotaSet {
    /// One lane per configured app and route; `apps` are AppKeys in config order.
    pub fn new(config: &RateLimitConfig, apps: &[AppKey], metrics: Metrics) -> Result<Arc<QuotaSet>, RedisError> {
        let redis = match config.backend {
            RateLimitBackend::Local => None,
            RateLimitBackend::Redis => Some(Arc::new(SharedQuota::new(&config.redis, metrics.clone())?)),
        };
        let set = QuotaSet::assemble(config, apps, metrics, redis, None);
        set.report();
        Ok(set)
    }

    /// Shows this set's rates in `rate_limit_rate`, and creates its lanes' other series at 0 so that rate() and
    /// alerts work before the first event: at start-up, and when a reload puts the set in force (not before: a
    /// reload may yet be rejected).
    pub fn report(&self) {
        for lane in &self.lanes {
            let labels = [lane.app.as_str(), lane.route.name()];
            self.metrics.rate_limit_rate.with_label_values(&labels).set(i64::from(lane.current().rate()));
            self.metrics.upstream_throttled.with_label_values(&labels);
            self.metrics.upstream_retries.with_label_values(&labels);
        }
    }

    /// The set a reloaded config asks for, keeping what this one has counted: a lane whose limit is unchanged
    /// is carried over as it is, one whose limit changed starts with its burst spent, and the per-user windows
    /// keep their calls. So a reload never hands out a fresh burst. The Redis connection is kept too (its
    /// settings need a restart).
    pub fn reloaded(&self, config: &RateLimitConfig, apps: &[AppKey]) -> Arc<QuotaSet> {
        let redis = self.shared.as_ref().map(|shared| Arc::clone(&shared.quota));
        QuotaSet::assemble(config, apps, self.metrics.clone(), redis, Some(self))
    }

    fn assemble(
        config: &RateLimitConfig,
        apps: &[AppKey],
        metrics: Metrics,
        redis: Option<Arc<SharedQuota>>,
        previous: Option<&QuotaSet>,
    ) -> Arc<QuotaSet> {
        // This replica's share of every limit: what it enforces on its own, always with the local backend and while
        // Redis is unavailable with the Redis one, so that the replicas together keep to Easemob's limits.
        let mine = config.per_replica();
        let shared = redis.map(|quota| {
            let previous = previous.and_then(|p| p.shared.as_ref()).map(|shared| &*shared.fallback);
            Shared { quota, fallback: QuotaSet::build(&mine, apps, metrics.clone(), None, false, previous) }
        });
        let main = match shared {
            None => mine,
            // With Redis, each replica's jobs keep to their part of the jobs' share, so that together they keep to it.
            Some(_) => {
                let mut main = config.clone();
                if main.jobs_share < 1.0 {
                    main.jobs_share /= f64::from(config.replicas.get());
                }
                main
            }
        };
        QuotaSet::build(&main, apps, metrics, shared, true, previous)
    }

    /// `main`: the set in force, whose rates adapt to Easemob's 429s and show in `rate_limit_rate` (not the
    /// Redis fallback).
    fn build(
        config: &RateLimitConfig,
        apps: &[AppKey],
        metrics: Metrics,
        shared: Option<Shared>,
        main: bool,
        previous: Option<&QuotaSet>,
    ) -> Arc<QuotaSet> {
        // What the previous set counted for the same AppKey, if it had it.
        let before = |app: &AppKey| previous.and_then(|p| Some((p, p.keys.iter().position(|k| k == app)?)));
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
                let jobs = jobs_pace(limit, config.jobs_share);
                let kept = before(app).map(|(p, i)| &p.lanes[i * Route::ALL.len() + route.index()]);
                if let Some(lane) = kept.filter(|lane| {
                    lane.configured == limit
                        && lane.policy == policy.as_str()
                        && lane.jobs.as_ref().map(Pace::rate) == jobs.as_ref().map(Pace::rate)
                }) {
                    lanes.push(Arc::clone(lane));
                    continue;
                }
                let pace = match kept {
                    Some(_) => Pace::spent(limit.rate, limit.burst, SECOND),
                    None => Pace::new(limit.rate, limit.burst, SECOND),
                };
                lanes.push(Arc::new(Lane {
                    app: app.clone(),
                    route,
                    configured: limit,
                    pace: RwLock::new(Arc::new(pace)),
                    adaptive: Mutex::new(Adaptive {
                        factor: 1.0,
                        last_decrease: None,
                        last_throttle: None,
                        paused_until: None,
                    }),
                    queue: tokio::sync::Mutex::new(()),
                    waiting: AtomicUsize::new(0),
                    policy: header(policy),
                    wait: metrics.rate_limit_wait.with_label_values(&[app.as_str(), route.name()]),
                    refused_for_a_second: refusal_field(route.name(), 1),
                    admitted: (0..=limit.burst.get().min(PREBUILT_ADMISSIONS))
                        .map(|left| admission_field(route, left))
                        .collect(),
                    jobs,
                }));
            }
        }
        // An app's cap and the jobs' share of it: kept when unchanged, otherwise new, its burst spent if the app
        // was already being served.
        let paced = |app: &AppKey, limit: Option<Limit>, of: fn(&QuotaSet) -> &Vec<Option<Arc<Pace>>>| {
            let limit = limit?;
            match before(app) {
                None => Some(Arc::new(Pace::new(limit.rate, limit.burst, SECOND))),
                Some((p, i)) => match &of(p)[i] {
                    Some(pace) if pace.rate() == limit.rate.get() && pace.burst() == limit.burst => {
                        Some(Arc::clone(pace))
                    }
                    _ => Some(Arc::new(Pace::spent(limit.rate, limit.burst, SECOND))),
                },
            }
        };
        let jobs_cap = config.app.and_then(|cap| {
            (config.jobs_share < 1.0).then(|| Limit { rate: scaled(cap, config.jobs_share), burst: NonZeroU32::MIN })
        });
        let user_limit = config.user_conversation_per_minute;
        let set = Arc::new(QuotaSet {
            lanes,
            apps: apps.iter().map(|app| paced(app, config.app, |p| &p.apps)).collect(),
            users: apps
                .iter()
                .map(|app| match before(app) {
                    Some((p, i)) if p.user_limit == user_limit => Arc::clone(&p.users[i]),
                    Some((p, i)) => Arc::new(p.users[i].with_limit(user_limit)),
                    None => Arc::new(WindowLog::new(user_limit, MINUTE)),
                })
                .collect(),
            user_limit,
            max_wait: config.max_wait,
            app_jobs: apps.iter().map(|app| paced(app, jobs_cap, |p| &p.app_jobs)).collect(),
            keys: apps.to_vec(),
            adaptive: config.adaptive && main,
            metrics,
            shared,
        });
        // The set's own task: it ends with the set (a reload replaces it once its requests are done).
        tokio::spawn(QuotaSet::housekeeping(Arc::downgrade(&set)));
        set
    }

    /// The `RateLimit-Policy` value of a lane.
    pub fn policy(&self, app: AppIndex, route: Route) -> HeaderValue {
        self.lane(app, route).policy.clone()
    }

    fn lane(&self, app: AppIndex, route: Route) -> &Lane {
        &self.lanes[app.0 * Route::ALL.len() + route.index()]
    }

    /// Decides `call` for app number `app` at once when no wait is involved: admitted now, or refused because its
    /// slot lies beyond `max_wait`. `None` when it has to wait, or the quota is shared through Redis: then
    /// [`QuotaSet::acquire`]. The common case stays synchronous: no future, no allocation.
    pub fn try_acquire(&self, app: AppIndex, call: &Call) -> Option<Result<Admitted, Refused>> {
        if self.shared.is_some() {
            return None;
        }
        let lane = self.lane(app, call.route());
        let decided = self.decide_now(app, lane, user_of(call).as_deref(), Instant::now() + self.max_wait)?;
        Some(self.answer(lane, decided, Duration::ZERO))
    }

    /// Admits `call` for app number `app`, waiting up to `max_wait` in arrival order, or refuses it.
    pub async fn acquire(&self, app: AppIndex, call: &Call) -> Result<Admitted, Refused> {
        let lane = self.lane(app, call.route());
        let started = Instant::now();
        let user = user_of(call);
        let result = match &self.shared {
            Some(shared) => self.shared(shared, app, lane, user.as_deref(), self.max_wait).await,
            None => self.local(app, lane, user.as_deref(), started + self.max_wait).await,
        };
        self.answer(lane, result, started.elapsed())
    }

    /// The fields of a decision's answer.
    fn answer(&self, lane: &Lane, result: Result<u32, Refusal>, waited: Duration) -> Result<Admitted, Refused> {
        match result {
            Ok(remaining) => {
                lane.wait.observe(waited.as_secs_f64());
                Ok(Admitted { headers: lane.admitted(remaining) })
            }
            Err((scope, retry_after)) => {
                let limit = match (scope, retry_after_secs(retry_after)) {
                    (Scope::Route, 1) => lane.refused_for_a_second.clone(),
                    (scope, secs) => refusal_field(scope.name(lane.route), secs),
                };
                Err(Refused { retry_after, headers: RateLimitHeaders { policy: lane.policy.clone(), limit } })
            }
        }
    }

    /// The in-process decision when it needs no waiting (`None` when it does): the scarcest limit first, and its
    /// place given back if the route refuses, so a user over their limit costs no route quota and a call the
    /// route refuses no place in the user's window.
    fn decide_now(
        &self,
        app: AppIndex,
        lane: &Lane,
        user: Option<&str>,
        deadline: Instant,
    ) -> Option<Result<u32, Refusal>> {
        let place = match user {
            Some(user) => match self.users[app.0].reserve(user) {
                Ok(place) => Some(place),
                Err(wait) if Instant::now() + wait > deadline => return Some(Err((Scope::User, wait))),
                Err(_) => return None,
            },
            None => None,
        };
        let decided = self.lane_now(app, lane, deadline)?;
        if let (Ok(_), Some(place)) = (&decided, place) {
            place.sent();
        }
        Some(decided)
    }

    /// The lane's decision when it needs no waiting: a slot now (nobody queued ahead, every gate has room), or a
    /// refusal because the slot is known to lie beyond `deadline` (rather than make the caller wait to be
    /// refused). Behind a queue, the head's own wait is unknown (governor cannot peek without taking a slot):
    /// a whole interval is counted for it.
    fn lane_now(&self, app: AppIndex, lane: &Lane, deadline: Instant) -> Option<Result<u32, Refusal>> {
        let interval = lane.current().interval();
        let ahead = lane.waiting.load(Ordering::Acquire) as u32;
        let pause = lane.pause_left();
        let (scope, first) = match (ahead, pause) {
            (0, None) => match (Gates { lane, app: self.apps[app.0].as_deref() }).check() {
                Ok(remaining) => return Some(Ok(remaining)),
                Err(refusal) => refusal,
            },
            _ => (Scope::Route, interval),
        };
        let estimate = pause.unwrap_or_default() + first + interval * ahead;
        (Instant::now() + estimate > deadline).then_some(Err((scope, estimate)))
    }

    /// The in-process decision: `Ok(calls left at once)`, or the limit that refused and when it has room. Each
    /// step first decides what it can at once, as [`QuotaSet::decide_now`] does, then waits.
    async fn local(&self, app: AppIndex, lane: &Lane, user: Option<&str>, deadline: Instant) -> Result<u32, Refusal> {
        let place = match user {
            Some(user) => Some(self.user_place(app, user, deadline).await?),
            None => None,
        };
        let remaining = self.lane_slot(app, lane, deadline).await?;
        if let Some(place) = place {
            place.sent();
        }
        Ok(remaining)
    }

    /// A place in the user's 60-second window, waiting for one only if it frees before `deadline`.
    async fn user_place(&self, app: AppIndex, user: &str, deadline: Instant) -> Result<Place<'_>, Refusal> {
        loop {
            match self.users[app.0].reserve(user) {
                Ok(place) => return Ok(place),
                Err(wait) if Instant::now() + wait > deadline => return Err((Scope::User, wait)),
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    /// A slot in the lane (and the AppKey cap), in arrival order, or a refusal as soon as the slot is known to lie
    /// beyond `deadline`.
    async fn lane_slot(&self, app: AppIndex, lane: &Lane, deadline: Instant) -> Result<u32, Refusal> {
        if let Some(decided) = self.lane_now(app, lane, deadline) {
            return decided;
        }
        let gates = Gates { lane, app: self.apps[app.0].as_deref() };
        let interval = lane.current().interval();
        let _waiter = Waiter::enter(&lane.waiting);
        let ahead = lane.waiting.load(Ordering::Acquire).saturating_sub(1) as u32;
        let Ok(_turn) = tokio::time::timeout_at(deadline, lane.queue.lock()).await else {
            return Err((Scope::Route, interval * (ahead + 1)));
        };
        loop {
            if let Some(pause) = lane.pause_left() {
                if Instant::now() + pause > deadline {
                    return Err((Scope::Route, pause));
                }
                tokio::time::sleep(pause).await;
                continue;
            }
            match gates.check() {
                Ok(remaining) => return Ok(remaining),
                Err((scope, wait)) if Instant::now() + wait > deadline => return Err((scope, wait)),
                Err((_, wait)) => tokio::time::sleep(wait).await,
            }
        }
    }

    /// The shared decision: one reservation across every gate in Redis, or this replica's share while Redis is
    /// unavailable, or both while the replicas return to Redis (see [`Phase`]).
    async fn shared(
        &self,
        shared: &Shared,
        app: AppIndex,
        lane: &Lane,
        user: Option<&str>,
        max_wait: Duration,
    ) -> Result<u32, Refusal> {
        let deadline = Instant::now() + max_wait;
        if let Some(pause) = lane.pause_left() {
            if pause > max_wait {
                return Err((Scope::Route, pause));
            }
            tokio::time::sleep(pause).await;
        }
        let phase = shared.quota.phase(self.max_wait);
        // Returning: other replicas may still send what only their share granted, so keep to this one's as well.
        // Fallback: this replica's share is the quota (and a probe below may find Redis back).
        let mine = match phase {
            Phase::Shared | Phase::UsersReturning => None,
            Phase::Returning | Phase::Fallback { .. } => {
                Some(self.own_share(shared, app, lane.route, user, phase, deadline).await?)
            }
        };
        // For a minute after the return, a user's window in Redis misses what the shares admitted: keep to this
        // replica's share of it as well (the place is given back if Redis refuses the call).
        let place = match (phase, user) {
            (Phase::UsersReturning, Some(user)) => Some(shared.fallback.user_place(app, user, deadline).await?),
            _ => None,
        };
        if shared.quota.should_try() {
            let (emission, tolerance) = lane.current().gcra();
            let mut gates = vec![(
                Scope::Route,
                Gate::Pace { key: shared.quota.key(lane.app.as_str(), lane.route.name()), emission, tolerance },
            )];
            if let Some(cap) = &self.apps[app.0] {
                let (emission, tolerance) = cap.gcra();
                gates.push((
                    Scope::App,
                    Gate::Pace { key: shared.quota.key(lane.app.as_str(), "app"), emission, tolerance },
                ));
            }
            if let Some(user) = user {
                gates.push((
                    Scope::User,
                    Gate::Window {
                        key: shared.quota.key(lane.app.as_str(), &format!("user:{user}")),
                        window: guarded(MINUTE),
                        limit: self.user_limit,
                    },
                ));
            }
            let (scopes, gates): (Vec<Scope>, Vec<Gate>) = gates.into_iter().unzip();
            match shared.quota.reserve(&gates, deadline.saturating_duration_since(Instant::now())).await {
                Ok(Reservation::Admitted { wait, remaining, release }) => {
                    tokio::time::sleep(wait).await;
                    release.disarm();
                    if let Some(place) = place {
                        place.sent();
                    }
                    return Ok(remaining);
                }
                Ok(Reservation::Refused { retry_after, gate }) => return Err((scopes[gate], retry_after)),
                Err(_) => {} // logged once on the transition; this replica's share applies meanwhile
            }
        }
        drop(place);
        match (phase, mine) {
            (Phase::Fallback { .. }, Some(remaining)) => Ok(remaining),
            // Redis failed just now: a slot in the share from the loss on.
            _ => self.own_share(shared, app, lane.route, user, shared.quota.phase(self.max_wait), deadline).await,
        }
    }

    /// A slot in this replica's share of the quota (the Redis fallback set) by `deadline`. After a loss, none
    /// before every call Redis granted can have gone out (they may lie `max_wait` ahead, for any replica), and one
    /// interval more, so the share never adds to a window the shared quota already filled; for a user, none before
    /// their window in Redis (which may be full) has passed.
    async fn own_share(
        &self,
        shared: &Shared,
        app: AppIndex,
        route: Route,
        user: Option<&str>,
        phase: Phase,
        deadline: Instant,
    ) -> Result<u32, Refusal> {
        let fallback = &shared.fallback;
        let lane = fallback.lane(app, route);
        if let Phase::Fallback { since } = phase {
            let interval =
                fallback.apps[app.0].as_ref().map_or(lane.interval(), |cap| cap.interval().max(lane.interval()));
            let (scope, after) = match user {
                Some(_) => (Scope::User, guarded(MINUTE)),
                None => (Scope::Route, interval),
            };
            let (opens, now) = (since + self.max_wait + after, Instant::now());
            if opens > deadline {
                return Err((scope, opens.saturating_duration_since(now)));
            }
            tokio::time::sleep_until(opens).await;
        }
        match deadline > Instant::now() {
            true => fallback.local(app, lane, user, deadline).await,
            false => {
                fallback.decide_now(app, lane, user, Instant::now()).unwrap_or(Err((Scope::Route, lane.interval())))
            }
        }
    }

    /// A slot for a job's call, taken only when it costs direct calls nothing: none is waiting in the lane, the
    /// jobs' share has room, and every limit has room now. Otherwise the limit that is full, and when to try again.
    /// Never waits.
    pub async fn background(&self, app: AppIndex, call: &Call) -> Result<RateLimitHeaders, Refusal> {
        let lane = self.lane(app, call.route());
        if lane.waiting.load(Ordering::Acquire) > 0 {
            return Err((Scope::Route, lane.interval()));
        }
        if let Some(pause) = lane.pause_left() {
            return Err((Scope::Route, pause));
        }
        if let Some(jobs) = &lane.jobs {
            jobs.check().map_err(|wait| (Scope::Route, wait))?;
        }
        if let Some(jobs) = &self.app_jobs[app.0] {
            jobs.check().map_err(|wait| (Scope::App, wait))?;
        }
        let user = user_of(call);
        let decided = match &self.shared {
            Some(shared) => self.shared(shared, app, lane, user.as_deref(), Duration::ZERO).await,
            None => self
                .decide_now(app, lane, user.as_deref(), Instant::now())
                .unwrap_or(Err((Scope::Route, lane.interval()))),
        };
        decided.map(|remaining| lane.admitted(remaining))
    }

    /// How long app number `app`'s pending job calls need (per route, and per user among them), counted on the
    /// limits the scheduler's slots come from ([`QuotaSet::background`]): each lane's pause for Easemob's
    /// `Retry-After`, its current spacing (slower while Easemob answers 429) or the jobs' share's, the app cap,
    /// and each user's window as it stands.
    pub async fn jobs_time(&self, app: AppIndex, routes: &[(Route, u32)], users: &[(&str, u32)]) -> Duration {
        let lanes = routes.iter().map(|(route, calls)| {
            let lane = self.lane(app, *route);
            let spacing = lane.jobs.as_ref().map_or(lane.interval(), |jobs| jobs.interval().max(lane.interval()));
            lane.pause_left().unwrap_or_default() + spacing * *calls
        });
        let all: u32 = routes.iter().map(|(_, calls)| calls).sum();
        let cap = self.apps[app.0].iter().chain(&self.app_jobs[app.0]).map(|cap| cap.interval() * all);
        let windows = self.users_time(app, users).await;
        lanes.chain(cap).chain(windows).max().unwrap_or_default()
    }

    /// For each user, how long until their `calls` have all gone through their window: in Redis with the shared
    /// quota, here otherwise (and while Redis does not answer).
    async fn users_time(&self, app: AppIndex, users: &[(&str, u32)]) -> Vec<Duration> {
        if let Some(shared) = &self.shared
            && !users.is_empty()
        {
            let app_key = self.keys[app.0].as_str();
            let keys: Vec<String> =
                users.iter().map(|(user, _)| shared.quota.key(app_key, &format!("user:{user}"))).collect();
            if let Ok(windows) = shared.quota.window_calls(&keys, self.user_limit.get()).await {
                let limit = self.user_limit.get() as usize;
                let calls = users.iter().map(|(_, calls)| *calls as usize);
                return windows
                    .into_iter()
                    .zip(calls)
                    .map(|(t, n)| window::time_for(t, n, guarded(MINUTE), limit))
                    .collect();
            }
        }
        users.iter().map(|(user, calls)| self.users[app.0].time_for(user, *calls as usize)).collect()
    }

    /// Resumes app number `app`'s lanes after a restart: each route in `used` as if its last calls went the time
    /// given ago (the AppKey cap, the jobs' share and the Redis fallback too, the cap by its latest route), so
    /// that calls made before the restart keep their place in Easemob's window.
    pub fn resume(&self, app: AppIndex, used: &[(Route, Duration)]) {
        for (route, ago) in used {
            let lane = self.lane(app, *route);
            lane.current().resume(*ago);
            lane.jobs.iter().for_each(|jobs| jobs.resume(*ago));
        }
        if let Some(latest) = used.iter().map(|(_, ago)| *ago).min() {
            let caps = self.apps[app.0].iter().chain(&self.app_jobs[app.0]);
            caps.for_each(|cap| cap.resume(latest));
        }
        if let Some(shared) = &self.shared {
            shared.fallback.resume(app, used);
        }
    }

    /// Resumes app number `app`'s per-user windows after a restart: each user in `sent` as if they made a call
    /// the time given ago, so that a user whose window was full before the restart is not given it again.
    pub fn resume_users(&self, app: AppIndex, sent: &[(&str, Duration)]) {
        for (user, ago) in sent {
            self.users[app.0].resume(user, *ago);
        }
    }

    /// Easemob answered 429 on this lane: pause for its `Retry-After`, and (if adaptive) halve the lane's rate.
    pub fn upstream_throttled(&self, app: AppIndex, route: Route, retry_after: Option<Duration>) {
        let lane = self.lane(app, route);
        self.metrics.upstream_throttled.with_label_values(&[lane.app.as_str(), route.name()]).inc();
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
            self.metrics.rate_limit_rate.with_label_values(&[lane.app.as_str(), route.name()]).set(rate as i64);
            warn!(app = %lane.app, route = route.name(), rate, ?retry_after, "easemob answered 429: lowering this route's rate");
        }
    }

    /// Recovers throttled lanes step by step, and forgets idle per-user windows so memory stays bounded.
    async fn housekeeping(set: Weak<QuotaSet>) {
        let mut tick = tokio::time::interval(RECOVERY_STEP);
        loop {
            tick.tick().await;
            let Some(set) = set.upgrade() else { return };
            let now = Instant::now();
            for lane in &set.lanes {
                let mut adaptive = lane.adaptive.lock().expect("adaptive lock");
                let quiet = adaptive.last_throttle.is_none_or(|t| now.duration_since(t) >= RECOVERY_QUIET);
                if adaptive.factor < 1.0 && quiet {
                    adaptive.factor = (adaptive.factor + 0.1).min(1.0);
                    let rate = lane.set_factor(adaptive.factor);
                    set.metrics
                        .rate_limit_rate
                        .with_label_values(&[lane.app.as_str(), lane.route.name()])
                        .set(rate as i64);
                    info!(app = %lane.app, route = lane.route.name(), rate, "route rate recovering");
                }
            }
            set.users.iter().for_each(|users| users.evict_idle());
        }
    }
}

impl Lane {
    /// The fields of an admission that leaves `remaining` calls at once.
    fn admitted(&self, remaining: u32) -> RateLimitHeaders {
        let limit = match self.admitted.get(remaining as usize) {
            Some(field) => field.clone(),
            None => admission_field(self.route, remaining),
        };
        RateLimitHeaders { policy: self.policy.clone(), limit }
    }

    fn current(&self) -> Arc<Pace> {
        Arc::clone(&self.pace.read().expect("pace lock"))
    }

    /// Replaces the pace at `factor` of the configured rate, its burst spent; returns the new rate.
    fn set_factor(&self, factor: f64) -> u32 {
        let pace = Pace::spent(scaled(self.configured, factor), self.configured.burst, SECOND);
        let rate = pace.rate();
        *self.pace.write().expect("pace lock") = Arc::new(pace);
        rate
    }

    fn interval(&self) -> Duration {
        self.current().interval()
    }

    fn pause_left(&self) -> Option<Duration> {
        let paused = self.adaptive.lock().expect("adaptive lock").paused_until?;
        let left = paused.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }
}

/// The per-second limits one request must pass: its lane and the AppKey cap.
struct Gates<'a> {
    lane: &'a Lane,
    app: Option<&'a Pace>,
}

impl Gates<'_> {
    /// Takes a slot from the lane, then from the AppKey cap, at the same moment, so each counts the call when it
    /// leaves. `governor` cannot give a slot back: when the cap refuses, the lane's slot is lost (the cap is then
    /// the scarcer limit anyway), which can waste quota but never overspend it.
    fn check(&self) -> Result<u32, Refusal> {
        let remaining = self.lane.current().check().map_err(|wait| (Scope::Route, wait))?;
        if let Some(app) = self.app {
            app.check().map_err(|wait| (Scope::App, wait))?;
        }
        Ok(remaining)
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
    use crate::routes::validate::Call;

    /// The only app of these tests.
    pub(super) const A: AppIndex = AppIndex(0);

    pub(super) fn limit(rate: u32, burst: u32) -> Limit {
        Limit { rate: NonZeroU32::new(rate).unwrap(), burst: NonZeroU32::new(burst).unwrap() }
    }

    pub(super) fn clear(user: &str) -> Call {
        Call::parse(Route::ClearUserMessages, user, None, b"", 0).unwrap()
    }

    fn conversation(user: &str) -> Call {
        Call::parse(Route::DeleteConversation, user, None, br#"{"channel":"b","type":"chat","delete_roam":true}"#, 0)
            .unwrap()
    }

    fn quota(config: RateLimitConfig) -> Arc<QuotaSet> {
        QuotaSet::new(&config, &[AppKey::new("o", "a")], Metrics::new()).unwrap()
    }

    pub(super) fn refusing(config: RateLimitConfig) -> Arc<QuotaSet> {
        quota(RateLimitConfig { max_wait: Duration::ZERO, ..config })
    }

    /// `n` callers arriving together: when each was admitted (from the start), or `None` if refused.
    async fn together(quota: &Arc<QuotaSet>, n: usize, call: fn(&str) -> Call) -> Vec<Option<Duration>> {
        let start = Instant::now();
        let callers: Vec<_> = (0..n)
            .map(|_| {
                let quota = Arc::clone(quota);
                tokio::spawn(async move { quota.acquire(A, &call("u")).await.ok().map(|_| start.elapsed()) })
            })
            .collect();
        let mut admitted = Vec::new();
        for caller in callers {
            admitted.push(caller.await.unwrap());
        }
        admitted
    }

    /// The most admissions in any closed window of `window`.
    fn busiest(mut times: Vec<Duration>, window: Duration) -> usize {
        times.sort();
        (0..times.len())
            .map(|last| times[..=last].iter().filter(|t| times[last] - **t <= window).count())
            .max()
            .unwrap_or(0)
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_refusal_naming_the_route_with_the_time_to_its_next_slot() {
        let quota = refusing(RateLimitConfig { route: limit(10, 2), ..RateLimitConfig::default() });
        let first = quota.acquire(A, &clear("u")).await.unwrap();
        assert_eq!(first.headers.limit, "\"clear_user_messages\";r=1;t=0");
        assert_eq!(first.headers.policy, "\"clear_user_messages\";q=10;w=1");
        quota.acquire(A, &clear("u")).await.unwrap();
        let refused = quota.acquire(A, &clear("u")).await.unwrap_err();
        assert!(refused.retry_after <= Duration::from_millis(101), "{:?}", refused.retry_after);
        assert_eq!(refused.headers.limit, "\"clear_user_messages\";r=0;t=1");
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_a_routes_own_quota_is_served_in_full_within_a_second() {
        for n in [50, 100] {
            let quota = quota(RateLimitConfig::default());
            let admitted = together(&quota, n, clear).await;
            let times: Vec<Duration> = admitted.iter().map(|t| t.expect("none refused")).collect();
            assert!(times.iter().all(|t| *t < Duration::from_secs(1)), "{n}: the last at {:?}", times.iter().max());
            // Paced, not let through at once: about ten per 100 ms.
            assert!(busiest(times, Duration::from_millis(100)) <= 11, "{n}");
            tokio::time::advance(Duration::from_secs(5)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn callers_wait_in_arrival_order() {
        let quota = quota(RateLimitConfig { route: limit(10, 1), ..RateLimitConfig::default() });
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut callers = Vec::new();
        for i in 0..8 {
            let (quota, order) = (Arc::clone(&quota), Arc::clone(&order));
            callers.push(tokio::spawn(async move {
                quota.acquire(A, &clear("u")).await.unwrap();
                order.lock().unwrap().push(i);
            }));
            tokio::task::yield_now().await;
        }
        for caller in callers {
            caller.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (0..8).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn beyond_max_wait_a_caller_is_refused_at_once_with_its_slot_time() {
        let config =
            RateLimitConfig { route: limit(10, 1), max_wait: Duration::from_millis(250), ..Default::default() };
        let quota = quota(config);
        // Slots at 0, about 100 and about 200 ms: within max_wait.
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                let quota = Arc::clone(&quota);
                tokio::spawn(async move { quota.acquire(A, &clear("u")).await.is_ok() })
            })
            .collect();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let start = Instant::now();
        let refused = quota.acquire(A, &clear("u")).await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::ZERO, "refused without waiting");
        assert!(refused.retry_after > Duration::from_millis(250), "{:?}", refused.retry_after);
        assert!(refused.retry_after < Duration::from_millis(310), "{:?}", refused.retry_after);
        assert_eq!(refused.headers.limit, "\"clear_user_messages\";r=0;t=1");
        for caller in waiting {
            assert!(caller.await.unwrap());
        }
    }

    /// A burst of `n` calls at once for user `u`: how many were admitted.
    fn burst(quota: &QuotaSet, n: usize, call: fn(&str) -> Call) -> usize {
        (0..n).filter(|_| quota.try_acquire(A, &call("u")).is_some_and(|d| d.is_ok())).count()
    }

    #[tokio::test(start_paused = true)]
    async fn on_the_local_backend_each_replica_enforces_its_share_of_every_limit() {
        let two = NonZeroU32::new(2).unwrap();
        let quota = refusing(RateLimitConfig { replicas: two, route: limit(100, 10), ..RateLimitConfig::default() });
        assert_eq!(burst(&quota, 10, clear), 5, "half the route's burst");
        assert_eq!(burst(&quota, 5, conversation), 2, "5 a minute per user, 2 of them here");
        assert_eq!(quota.policy(A, Route::DeleteConversation), "\"delete_conversation\";q=50;w=1, \"user\";q=2;w=60");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_keeps_what_unchanged_lanes_counted() {
        let config = RateLimitConfig { route: limit(10, 10), max_wait: Duration::ZERO, ..RateLimitConfig::default() };
        let before = quota(config.clone());
        assert_eq!(burst(&before, 12, clear), 10, "the burst, then refusals");
        let after = before.reloaded(&config, &[AppKey::new("o", "a")]);
        assert_eq!(burst(&after, 5, clear), 0, "no fresh burst: the lane was carried over");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(burst(&after, 12, clear), 10, "and it refills as before");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_that_changes_a_limit_starts_it_spent_and_keeps_the_users_calls() {
        let config = RateLimitConfig { route: limit(10, 10), max_wait: Duration::ZERO, ..RateLimitConfig::default() };
        let before = quota(config.clone());
        assert_eq!(burst(&before, 10, conversation), 5, "the user's 5 a minute");
        let raised = RateLimitConfig {
            route: limit(20, 20),
            user_conversation_per_minute: NonZeroU32::new(6).unwrap(),
            ..config
        };
        let after = before.reloaded(&raised, &[AppKey::new("o", "a")]);
        assert_eq!(burst(&after, 10, conversation), 0, "the new route limit starts spent: no burst");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(burst(&after, 10, conversation), 1, "the user's 5 calls still count: one more of 6");
        let paced = burst(&after, 20, clear);
        assert!((3..=5).contains(&paced), "another changed lane: 200 ms at 20/s, not a burst of 20: {paced}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_drops_a_removed_apps_lanes_and_ends_the_old_sets_task() {
        let before = quota(RateLimitConfig::default());
        let weak = Arc::downgrade(&before);
        let config = RateLimitConfig::default();
        let after = before.reloaded(&config, &[AppKey::new("o", "b"), AppKey::new("o", "a")]);
        assert_eq!(after.keys, [AppKey::new("o", "b"), AppKey::new("o", "a")]);
        assert!(Arc::ptr_eq(&after.lanes[Route::ALL.len()], &before.lanes[0]), "o#a's lanes, now second");
        drop(before);
        tokio::time::sleep(RECOVERY_STEP * 2).await;
        assert!(weak.upgrade().is_none(), "nothing holds the replaced set: its housekeeping ended");
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_hangs_up_while_waiting_gives_its_turn_to_the_next() {
        let quota = quota(RateLimitConfig {
            route: limit(1, 1),
            max_wait: Duration::from_secs(5),
            ..RateLimitConfig::default()
        });
        quota.acquire(A, &clear("u")).await.unwrap();
        let quitter = tokio::time::timeout(Duration::from_millis(200), quota.acquire(A, &clear("u"))).await;
        assert!(quitter.is_err());
        let start = Instant::now();
        quota.acquire(A, &clear("u")).await.unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "the first free slot, not one behind a ghost: {:?}",
            start.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_gets_over_99_percent_of_the_quota_and_no_window_over_it() {
        let quota = quota(RateLimitConfig::default());
        let start = Instant::now();
        let times = Arc::new(Mutex::new(Vec::new()));
        let callers: Vec<_> = (0..48)
            .map(|_| {
                let (quota, times) = (Arc::clone(&quota), Arc::clone(&times));
                tokio::spawn(async move {
                    while start.elapsed() < Duration::from_secs(10) {
                        match quota.acquire(A, &clear("u")).await {
                            Ok(_) => times.lock().unwrap().push(start.elapsed()),
                            // A refused caller comes back a little later, as a real one would.
                            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    }
                })
            })
            .collect();
        for caller in callers {
            caller.await.unwrap();
        }
        let times: Vec<Duration> =
            times.lock().unwrap().iter().copied().filter(|t| *t < Duration::from_secs(10)).collect();
        assert!(times.len() >= 990, "{} of the 1,000 calls the quota allows in 10 s", times.len());
        assert!(busiest(times, Duration::from_millis(1004)) <= 100);
    }

    #[tokio::test(start_paused = true)]
    async fn five_calls_for_one_user_go_at_once_and_a_sixth_waits_for_the_window() {
        let quota = refusing(RateLimitConfig { route: limit(100, 10), ..RateLimitConfig::default() });
        for user in ["Ann", "ann", "ANN", "aNn", "ann"] {
            let admitted = quota.acquire(A, &conversation(user)).await.unwrap();
            assert_eq!(admitted.headers.policy, "\"delete_conversation\";q=100;w=1, \"user\";q=5;w=60");
        }
        let refused = quota.acquire(A, &conversation("ANN")).await.unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_millis(60_300));
        assert_eq!(refused.headers.limit, "\"user\";r=0;t=61", "the refusal names the per-user limit");
        assert!(quota.acquire(A, &conversation("bob")).await.is_ok(), "another user has a window of their own");
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(quota.acquire(A, &conversation("ann")).await.unwrap_err().headers.limit, "\"user\";r=0;t=31");
        tokio::time::advance(Duration::from_millis(30_300)).await;
        assert!(quota.acquire(A, &conversation("ann")).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn one_users_calls_over_75_seconds_never_put_six_in_a_minute() {
        let quota = quota(RateLimitConfig::default());
        let start = Instant::now();
        let mut sent = Vec::new();
        while start.elapsed() < Duration::from_secs(75) {
            match quota.acquire(A, &conversation("ann")).await {
                Ok(_) => sent.push(start.elapsed()),
                Err(refused) => assert!(refused.retry_after > quota.max_wait, "refused only beyond max_wait"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert_eq!(busiest(sent.clone(), Duration::from_secs(60)), 5, "{sent:?}");
        assert_eq!(sent.len(), 10, "five at once, five more as the first leave the window: {sent:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_user_refused_by_the_route_keeps_no_place_in_their_window() {
        let quota = refusing(RateLimitConfig { route: limit(1, 1), ..RateLimitConfig::default() });
        quota.acquire(A, &conversation("bob")).await.unwrap();
        for _ in 0..10 {
            let refused = quota.acquire(A, &conversation("ann")).await.unwrap_err();
            assert!(refused.headers.limit.to_str().unwrap().starts_with("\"delete_conversation\";r=0"));
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(quota.acquire(A, &conversation("ann")).await.is_ok(), "ann's refused calls took no place");
    }

    #[tokio::test(start_paused = true)]
    async fn a_per_user_refusal_costs_no_route_quota() {
        let quota = refusing(RateLimitConfig { route: limit(1, 6), ..RateLimitConfig::default() });
        for _ in 0..5 {
            quota.acquire(A, &conversation("ann")).await.unwrap();
        }
        quota.acquire(A, &conversation("ann")).await.unwrap_err();
        assert!(quota.acquire(A, &conversation("bob")).await.is_ok(), "the route's sixth slot is still there");
    }

    #[tokio::test(start_paused = true)]
    async fn the_app_cap_names_itself_when_it_refuses() {
        let quota = refusing(RateLimitConfig { app: Some(limit(1, 1)), ..RateLimitConfig::default() });
        quota.acquire(A, &clear("u")).await.unwrap();
        let refused = quota.acquire(A, &conversation("u")).await.unwrap_err();
        assert_eq!(refused.headers.limit, "\"app\";r=0;t=2", "a second and its margin");
    }

    #[tokio::test(start_paused = true)]
    async fn easemob_429_halves_the_lane_pauses_it_and_the_rate_recovers() {
        let quota = refusing(RateLimitConfig::default());
        quota.upstream_throttled(A, Route::ClearUserMessages, Some(Duration::from_secs(2)));
        let lane = quota.lane(A, Route::ClearUserMessages);
        assert_eq!(lane.current().rate(), 50);
        let refused = quota.acquire(A, &clear("u")).await.unwrap_err();
        assert!(refused.retry_after > Duration::from_secs(1), "paused for Easemob's Retry-After");
        assert!(quota.acquire(A, &conversation("u")).await.is_ok(), "other routes are not paused");
        tokio::time::advance(Duration::from_millis(2100)).await;
        assert!(quota.acquire(A, &clear("u")).await.is_ok(), "the pause is over");
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(lane.current().rate(), 100, "recovered step by step after 5 s without a 429");
    }

    #[tokio::test(start_paused = true)]
    async fn after_losing_redis_the_share_opens_once_every_call_redis_granted_can_have_gone_out() {
        let max_wait = Duration::from_millis(300);
        let quota = without_redis(RateLimitConfig { max_wait, ..Default::default() });
        let lost = Instant::now();
        // Redis may have granted slots up to max_wait ahead, to any replica: a slot of the share comes after them,
        // so this call (which may wait as long) is refused, saying when the share opens.
        let refused = quota.acquire(A, &clear("u")).await.unwrap_err();
        assert!(refused.retry_after > max_wait, "{:?}", refused.retry_after);
        assert!(refused.retry_after < max_wait * 2, "{:?}", refused.retry_after);
        tokio::time::sleep(Duration::from_millis(100)).await;
        quota.acquire(A, &clear("u")).await.unwrap();
        assert!(lost.elapsed() > max_wait, "admitted once Redis's grants are gone: {:?}", lost.elapsed());
    }

    /// A replica whose Redis is unreachable: a port nothing listens on (bound, then released) refuses at once.
    fn without_redis(config: RateLimitConfig) -> Arc<QuotaSet> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let redis = crate::config::RedisConfig { url: format!("redis://127.0.0.1:{port}"), ..Default::default() };
        let config = RateLimitConfig {
            backend: RateLimitBackend::Redis,
            replicas: NonZeroU32::new(2).unwrap(),
            redis,
            ..config
        };
        QuotaSet::new(&config, &[AppKey::new("o", "a")], Metrics::new()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn while_redis_is_unreachable_each_replica_enforces_its_share_of_the_same_rules() {
        let quota = without_redis(RateLimitConfig {
            route: limit(100, 4),
            user_conversation_per_minute: NonZeroU32::new(4).unwrap(),
            max_wait: Duration::ZERO,
            ..Default::default()
        });
        // The call that finds Redis gone: the share opens an interval after the calls Redis granted.
        let refused = quota.acquire(A, &clear("u")).await.unwrap_err();
        assert!(refused.retry_after > Duration::ZERO && refused.retry_after < Duration::from_millis(50));
        assert_eq!(quota.metrics.rate_limit_backend_fallback.get(), 1);
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Half the burst (2 of 4), then a refusal naming the route.
        assert!(quota.acquire(A, &clear("u")).await.is_ok());
        assert!(quota.acquire(A, &clear("u")).await.is_ok());
        let refused = quota.acquire(A, &clear("u")).await.unwrap_err();
        assert!(refused.headers.limit.to_str().unwrap().starts_with("\"clear_user_messages\";r=0"));
        assert_eq!(quota.metrics.rate_limit_backend_fallback.get(), 1);
        // A user's window in Redis may have been full: their share opens once it has passed.
        let refused = quota.acquire(A, &conversation("ann")).await.unwrap_err();
        assert!(refused.headers.limit.to_str().unwrap().starts_with("\"user\";r=0;t=6"), "{:?}", refused.headers.limit);
        tokio::time::sleep(Duration::from_secs(60)).await;
        // Half the per-user window (2 of 4), with its own refusal.
        for user in ["ann", "ANN"] {
            assert!(quota.acquire(A, &conversation(user)).await.is_ok(), "{user}");
        }
        let refused = quota.acquire(A, &conversation("Ann")).await.unwrap_err();
        assert!(refused.headers.limit.to_str().unwrap().starts_with("\"user\";r=0;t="), "{:?}", refused.headers.limit);
    }
}
