//! The quota: Easemob's published limits enforced before a request costs anything upstream, counted per window
//! exactly as Easemob counts them.
//!
//! Each (AppKey, route) is a lane (`ratelimit/lane.rs`) paced by `governor` (`ratelimit/pace.rs`: no one-second
//! window ever holds more than the route's quota), with an optional AppKey-wide cap paced the same way, and for
//! `delete_conversation` a per-user window (`ratelimit/window.rs`: at most 5 calls for one user in any 60 s,
//! 5 at once if they come together). A request over quota waits for its slot up to `max_wait`, in arrival order
//! (a fair async mutex per lane, so no thread is held and a caller that hangs up leaves the queue), or is refused
//! at once with `Retry-After` and a `RateLimit` field naming the limit that refused it. When Easemob still answers
//! 429, the lane pauses for Easemob's `Retry-After` and halves its rate, then recovers slowly.
//!
//! The files, one concern each: `ratelimit/local.rs` holds the in-process limits and the one path that decides a
//! call at once or waits; `ratelimit/backend.rs` the backend, local or Redis (`ratelimit/redis.rs`, which makes
//! all replicas draw from one quota with the same rules) with this replica's share (every limit divided by
//! `rate_limit.replicas`) as its fallback, entered and left so that no window is overspent (`Phase`);
//! `ratelimit/jobs_share.rs` the jobs' share; `ratelimit/headers.rs` renders a decision's numbers as the
//! `RateLimit` fields; `layers/quota.rs` puts it in the stack. This file is the set in force, as callers see it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

mod backend;
mod decision;
mod headers;
mod jobs_share;
mod lane;
mod local;
mod pace;
mod redis;
mod status;
mod window;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::{AppKey, RateLimitBackend, RateLimitConfig};
use crate::metrics::Metrics;
use crate::routes::Route;
use crate::routes::validate::Call;

use self::backend::{Ask, Backend, Shared};
pub use self::decision::{AppIndex, MINUTE, Refusal, Scope};
use self::jobs_share::JobsShare;
use self::lane::{Lane, RECOVERY_STEP};
use self::local::{Limits, Now};
use self::redis::SharedQuota;

use self::headers::Fields;
pub use self::headers::{
    Admitted, RATELIMIT, RATELIMIT_POLICY, RateLimitHeaders, Refused, easemob_retry_after, retry_after_secs,
};
pub use self::status::{LaneStatus, QuotaStatus};
pub use ::redis::RedisError;

/// The quota in force. A reload builds another, carrying over what this one has counted.
pub struct QuotaSet {
    /// The AppKeys in config order: an [`AppIndex`] indexes them.
    keys: Vec<AppKey>,
    /// The limits that pace the calls: this replica's share on the local backend; with Redis, the whole quota's,
    /// whose rates the Redis gates take (and which adapt to Easemob's 429s).
    limits: Limits,
    /// Per lane (indexed as `limits.lanes`), the `RateLimit` fields its answers carry.
    fields: Vec<Fields>,
    jobs: JobsShare,
    backend: Backend,
    max_wait: Duration,
    adaptive: bool,
    metrics: Metrics,
}

/// The user a call counts against (`delete_conversation`'s owner; IDs compare case-insensitively).
fn user_of(call: &Call) -> Option<String> {
    match call {
        Call::DeleteConversation { owner, .. } => Some(owner.as_str().to_ascii_lowercase()),
        _ => None,
    }
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

    /// What `app`'s share of the quota holds now (for the status page).
    pub fn status(&self, app: AppIndex) -> QuotaStatus {
        let (backend, users_in_window) = match &self.backend {
            Backend::Local => ("local", Some(self.limits.users[app.0].active())),
            Backend::Redis(_) => ("redis", None),
        };
        QuotaStatus {
            backend,
            lanes: status::lanes(&self.limits, app),
            users_in_window,
            user_limit_per_minute: self.limits.user_limit.get(),
        }
    }

    /// Shows this set's rates in `rate_limit_rate`, and creates its lanes' other series at 0 so that rate() and
    /// alerts work before the first event: at start-up, and when a reload puts the set in force (not before: a
    /// reload may yet be rejected).
    pub fn report(&self) {
        for lane in &self.limits.lanes {
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
        let redis = match &self.backend {
            Backend::Local => None,
            Backend::Redis(shared) => Some(Arc::clone(&shared.quota)),
        };
        QuotaSet::assemble(config, apps, self.metrics.clone(), redis, Some(self))
    }

    fn assemble(
        config: &RateLimitConfig,
        apps: &[AppKey],
        metrics: Metrics,
        redis: Option<Arc<SharedQuota>>,
        previous: Option<&QuotaSet>,
    ) -> Arc<QuotaSet> {
        let keys = previous.map(|p| p.keys.as_slice());
        // This replica's share of every limit: what it enforces on its own, always with the local backend and while
        // Redis is unavailable with the Redis one, so that the replicas together keep to Easemob's limits.
        let mine = config.per_replica();
        let (config, backend) = match redis {
            None => (mine, Backend::Local),
            Some(quota) => {
                let before = previous.zip(keys).and_then(|(p, keys)| match &p.backend {
                    Backend::Redis(shared) => Some((keys, &shared.fallback)),
                    Backend::Local => None,
                });
                let fallback = Limits::new(&mine, apps, &metrics, before);
                // With Redis, each replica's jobs keep to their part of the jobs' share, so that together they keep
                // to it.
                let mut whole = config.clone();
                if whole.jobs_share < 1.0 {
                    whole.jobs_share /= f64::from(config.replicas.get());
                }
                (whole, Backend::Redis(Shared { quota, fallback }))
            }
        };
        let set = Arc::new(QuotaSet {
            limits: Limits::new(&config, apps, &metrics, keys.zip(previous.map(|p| &p.limits))),
            fields: apps.iter().flat_map(|_| Route::ALL.map(|route| Fields::new(&config, route))).collect(),
            jobs: JobsShare::new(&config, apps, keys.zip(previous.map(|p| &p.jobs))),
            keys: apps.to_vec(),
            backend,
            max_wait: config.max_wait,
            adaptive: config.adaptive,
            metrics,
        });
        // The set's own task: it ends with the set (a reload replaces it once its requests are done).
        tokio::spawn(QuotaSet::housekeeping(Arc::downgrade(&set)));
        set
    }

    /// The `RateLimit-Policy` value of a lane.
    pub fn policy(&self, app: AppIndex, route: Route) -> http::HeaderValue {
        self.fields[app.lane(route)].policy()
    }

    fn lane(&self, app: AppIndex, route: Route) -> &Lane {
        self.limits.lane(app, route)
    }

    /// Decides `call` for app number `app` at once when no wait is involved: admitted now, or refused because its
    /// slot lies beyond `max_wait`. `None` when it has to wait, or the quota is shared through Redis: then
    /// [`QuotaSet::acquire`]. The common case stays synchronous: no future, no allocation.
    pub fn try_acquire(&self, app: AppIndex, call: &Call) -> Option<Result<Admitted, Refused>> {
        if let Backend::Redis(_) = self.backend {
            return None;
        }
        let route = call.route();
        let user = user_of(call);
        match self.limits.decide(app, route, user.as_deref(), Instant::now() + self.max_wait) {
            Now::Decided(decided) => Some(self.answer(app, route, decided, Duration::ZERO)),
            Now::Waits(_) => None,
        }
    }

    /// Admits `call` for app number `app`, waiting up to `max_wait` in arrival order, or refuses it.
    pub async fn acquire(&self, app: AppIndex, call: &Call) -> Result<Admitted, Refused> {
        let route = call.route();
        let started = Instant::now();
        let user = user_of(call);
        let decided = self.decide(app, route, user.as_deref(), self.max_wait).await;
        self.answer(app, route, decided, started.elapsed())
    }

    /// The backend's decision for a call that may wait `max_wait`: `Ok(calls left at once)`, or the limit that
    /// refused and when it has room.
    async fn decide(
        &self,
        app: AppIndex,
        route: Route,
        user: Option<&str>,
        max_wait: Duration,
    ) -> Result<u32, Refusal> {
        match &self.backend {
            Backend::Local => self.limits.admit(app, route, user, Instant::now() + max_wait).await,
            Backend::Redis(shared) => {
                let ask = Ask { app, route, user, max_wait, granted_ahead: self.max_wait };
                shared.decide(&self.limits, ask).await
            }
        }
    }

    /// A decision's answer: its `RateLimit` fields, and its wait in `rate_limit_wait_seconds`.
    fn answer(
        &self,
        app: AppIndex,
        route: Route,
        decided: Result<u32, Refusal>,
        waited: Duration,
    ) -> Result<Admitted, Refused> {
        let fields = &self.fields[app.lane(route)];
        match decided {
            Ok(remaining) => {
                self.lane(app, route).wait.observe(waited.as_secs_f64());
                Ok(Admitted { headers: fields.admitted(remaining) })
            }
            Err(refusal) => Err(fields.refused(refusal)),
        }
    }

    /// A slot for a job's call, taken only when it costs direct calls nothing: none is waiting in the lane, the
    /// jobs' share has room, and every limit has room now. Otherwise the limit that is full, and when to try again.
    /// Never waits.
    pub async fn background(&self, app: AppIndex, call: &Call) -> Result<RateLimitHeaders, Refusal> {
        let route = call.route();
        let lane = self.lane(app, route);
        if lane.waiting.load(Ordering::Acquire) > 0 {
            return Err((Scope::Route, lane.interval()));
        }
        if let Some(pause) = lane.pause_left() {
            return Err((Scope::Route, pause));
        }
        self.jobs.check(app, route)?;
        let user = user_of(call);
        let decided = match &self.backend {
            Backend::Local => self.limits.at_once(app, route, user.as_deref()),
            Backend::Redis(_) => self.decide(app, route, user.as_deref(), Duration::ZERO).await,
        };
        decided.map(|remaining| self.fields[app.lane(route)].admitted(remaining))
    }

    /// How long app number `app`'s pending job calls need (per route, and per user among them), counted on the
    /// limits the scheduler's slots come from ([`QuotaSet::background`]): each lane's pause for Easemob's
    /// `Retry-After`, its current spacing (slower while Easemob answers 429) or the jobs' share's, the app cap,
    /// and each user's window as it stands.
    pub async fn jobs_time(&self, app: AppIndex, routes: &[(Route, u32)], users: &[(&str, u32)]) -> Duration {
        let lanes = routes.iter().map(|(route, calls)| {
            let lane = self.lane(app, *route);
            let spacing = self.jobs.interval(app, *route).map_or(lane.interval(), |jobs| jobs.max(lane.interval()));
            lane.pause_left().unwrap_or_default() + spacing * *calls
        });
        let all: u32 = routes.iter().map(|(_, calls)| calls).sum();
        let caps = self.limits.apps[app.0].as_deref().into_iter().chain(self.jobs.cap(app));
        let cap = caps.map(|cap| cap.interval() * all);
        let windows = self.users_time(app, users).await;
        lanes.chain(cap).chain(windows).max().unwrap_or_default()
    }

    /// For each user, how long until their `calls` have all gone through their window: in Redis with the shared
    /// quota, here otherwise (and while Redis does not answer).
    async fn users_time(&self, app: AppIndex, users: &[(&str, u32)]) -> Vec<Duration> {
        if let Backend::Redis(shared) = &self.backend
            && !users.is_empty()
            && let Some(times) = shared.users_time(self.keys[app.0].as_str(), users, &self.limits).await
        {
            return times;
        }
        users.iter().map(|(user, calls)| self.limits.users[app.0].time_for(user, *calls as usize)).collect()
    }

    /// Resumes app number `app`'s lanes after a restart: each route in `used` as if its last calls went the time
    /// given ago (the AppKey cap, the jobs' share and the Redis fallback too, the cap by its latest route), so
    /// that calls made before the restart keep their place in Easemob's window.
    pub fn resume(&self, app: AppIndex, used: &[(Route, Duration)]) {
        self.limits.resume(app, used);
        self.jobs.resume(app, used);
        if let Backend::Redis(shared) = &self.backend {
            shared.fallback.resume(app, used);
        }
    }

    /// Resumes app number `app`'s per-user windows after a restart: each user in `sent` as if they made a call
    /// the time given ago, so that a user whose window was full before the restart is not given it again.
    pub fn resume_users(&self, app: AppIndex, sent: &[(&str, Duration)]) {
        for (user, ago) in sent {
            self.limits.users[app.0].resume(user, *ago);
        }
    }

    /// Easemob answered 429 on this lane: pause for its `Retry-After`, and (if adaptive) halve the lane's rate.
    pub fn upstream_throttled(&self, app: AppIndex, route: Route, retry_after: Option<Duration>) {
        let lane = self.lane(app, route);
        let labels = [lane.app.as_str(), route.name()];
        self.metrics.upstream_throttled.with_label_values(&labels).inc();
        if let Some(rate) = lane.throttled(retry_after, self.adaptive) {
            self.metrics.rate_limit_rate.with_label_values(&labels).set(i64::from(rate));
            warn!(app = %lane.app, route = route.name(), rate, ?retry_after, "easemob answered 429: lowering this route's rate");
        }
    }

    /// Recovers throttled lanes step by step, and forgets idle per-user windows (the Redis fallback's too) so
    /// memory stays bounded.
    async fn housekeeping(set: Weak<QuotaSet>) {
        let mut tick = tokio::time::interval(RECOVERY_STEP);
        loop {
            tick.tick().await;
            let Some(set) = set.upgrade() else { return };
            for lane in &set.limits.lanes {
                if let Some(rate) = lane.recover() {
                    let labels = [lane.app.as_str(), lane.route.name()];
                    set.metrics.rate_limit_rate.with_label_values(&labels).set(i64::from(rate));
                    info!(app = %lane.app, route = lane.route.name(), rate, "route rate recovering");
                }
            }
            let fallback = match &set.backend {
                Backend::Local => None,
                Backend::Redis(shared) => Some(&shared.fallback),
            };
            let windows = set.limits.users.iter().chain(fallback.into_iter().flat_map(|f| &f.users));
            windows.for_each(|users| users.evict_idle());
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::num::NonZeroU32;
    use std::sync::Mutex;

    use super::*;
    use crate::config::Limit;
    use crate::routes::validate::Call;

    /// The only app of these tests.
    pub(crate) const A: AppIndex = AppIndex(0);

    pub(crate) fn limit(rate: u32, burst: u32) -> Limit {
        Limit { rate: NonZeroU32::new(rate).unwrap(), burst: NonZeroU32::new(burst).unwrap() }
    }

    pub(crate) fn clear(user: &str) -> Call {
        Call::parse(Route::ClearUserMessages, user, None, b"", 0).unwrap()
    }

    fn conversation(user: &str) -> Call {
        Call::parse(Route::DeleteConversation, user, None, br#"{"channel":"b","type":"chat","delete_roam":true}"#, 0)
            .unwrap()
    }

    fn quota(config: RateLimitConfig) -> Arc<QuotaSet> {
        QuotaSet::new(&config, &[AppKey::new("o", "a")], Metrics::new()).unwrap()
    }

    pub(crate) fn refusing(config: RateLimitConfig) -> Arc<QuotaSet> {
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
    async fn a_reload_that_changes_only_the_app_cap_keeps_what_the_routes_counted() {
        let config = RateLimitConfig {
            route: limit(10, 10),
            app: Some(limit(100, 100)),
            max_wait: Duration::ZERO,
            ..RateLimitConfig::default()
        };
        let before = quota(config.clone());
        assert_eq!(burst(&before, 3, clear), 3);
        let after = before.reloaded(&RateLimitConfig { app: None, ..config }, &[AppKey::new("o", "a")]);
        assert_eq!(
            burst(&after, 12, clear),
            7,
            "the route's limit is unchanged: its burst goes on, not fresh nor spent"
        );
        assert_eq!(after.policy(A, Route::ClearUserMessages), "\"clear_user_messages\";q=10;w=1", "no cap named");
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
        assert!(Arc::ptr_eq(&after.limits.lanes[Route::ALL.len()], &before.limits.lanes[0]), "o#a's lanes, now second");
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
