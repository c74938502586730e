//! The in-process limits: per AppKey, a lane per route, the optional AppKey cap and `delete_conversation`'s
//! per-user windows. They are the whole quota on the local backend and the Redis backend's fallback; with Redis
//! they also keep the pace the shared quota reserves by. One path decides a call: at once when it can
//! ([`Limits::decide`]), otherwise by waiting from where that left off ([`Pending::wait`]).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{AppKey, RateLimitConfig};
use crate::metrics::Metrics;
use crate::routes::Route;

use super::decision::{AppIndex, MINUTE, Refusal, SECOND, Scope};
use super::lane::{Gates, Lane, Waiter};
use super::pace::Pace;
use super::window::{Place, WindowLog};

/// Every limit's state is shared (`Arc`), so that a reload can carry what it has counted into the limits that
/// replace these.
pub struct Limits {
    pub lanes: Vec<Arc<Lane>>,
    /// Per app, its optional cap across routes.
    pub apps: Vec<Option<Arc<Pace>>>,
    /// Per app, `delete_conversation`'s per-user windows.
    pub users: Vec<Arc<WindowLog>>,
    pub user_limit: NonZeroU32,
}

/// What the limits say without waiting: a decision, or the wait it takes.
pub enum Now<'a> {
    Decided(Result<u32, Refusal>),
    Waits(Pending<'a>),
}

/// A call that has to wait for its slot, with what it already holds.
pub struct Pending<'a> {
    limits: &'a Limits,
    app: AppIndex,
    lane: &'a Lane,
    deadline: Instant,
    step: Step<'a>,
}

enum Step<'a> {
    /// The user's window is full for now.
    UserWindow(&'a str),
    /// The lane is busy; the user's place (if any) is held.
    Lane(Option<Place<'a>>),
}

impl Limits {
    /// One lane per app in `apps` and route. `previous`: the limits a reload replaces (with their apps), whose
    /// counts carry over: a lane or cap whose limit is unchanged is kept as it is, one whose limit changed starts
    /// with its burst spent, and the per-user windows keep their calls.
    pub fn new(
        config: &RateLimitConfig,
        apps: &[AppKey],
        metrics: &Metrics,
        previous: Option<(&[AppKey], &Limits)>,
    ) -> Limits {
        let before = |app: &AppKey| previous.and_then(|(keys, p)| Some((p, AppIndex::of(keys, app)?)));
        let mut lanes = Vec::with_capacity(apps.len() * Route::ALL.len());
        for app in apps {
            for route in Route::ALL {
                let limit = config.route_limit(route.name());
                let kept = before(app).map(|(p, i)| &p.lanes[i.lane(route)]);
                lanes.push(match kept {
                    Some(lane) if lane.configured == limit => Arc::clone(lane),
                    _ => Arc::new(Lane::new(app, route, limit, kept.is_some(), metrics)),
                });
            }
        }
        let user_limit = config.user_conversation_per_minute;
        Limits {
            lanes,
            apps: apps
                .iter()
                .map(|app| Pace::carried(before(app).map(|(p, i)| &p.apps[i.0]), config.app, SECOND))
                .collect(),
            users: apps
                .iter()
                .map(|app| match before(app) {
                    Some((p, i)) if p.user_limit == user_limit => Arc::clone(&p.users[i.0]),
                    Some((p, i)) => Arc::new(p.users[i.0].with_limit(user_limit)),
                    None => Arc::new(WindowLog::new(user_limit, MINUTE)),
                })
                .collect(),
            user_limit,
        }
    }

    pub fn lane(&self, app: AppIndex, route: Route) -> &Lane {
        &self.lanes[app.lane(route)]
    }

    fn gates<'a>(&'a self, app: AppIndex, lane: &'a Lane) -> Gates<'a> {
        Gates { lane, app: self.apps[app.0].as_deref() }
    }

    /// Decides a call at once when no wait is involved: admitted now, or refused because its slot lies beyond
    /// `deadline`; otherwise what it holds while it waits. The scarcest limit first, and its place given back if
    /// the route refuses, so a user over their limit costs no route quota and a call the route refuses no place in
    /// the user's window. No future, no allocation: the common case stays synchronous.
    pub fn decide<'a>(&'a self, app: AppIndex, route: Route, user: Option<&'a str>, deadline: Instant) -> Now<'a> {
        let lane = self.lane(app, route);
        let pending = |step| Now::Waits(Pending { limits: self, app, lane, deadline, step });
        let place = match user {
            Some(user) => match self.users[app.0].reserve(user) {
                Ok(place) => Some(place),
                Err(wait) if Instant::now() + wait > deadline => return Now::Decided(Err((Scope::User, wait))),
                Err(_) => return pending(Step::UserWindow(user)),
            },
            None => None,
        };
        match self.lane_now(app, lane, deadline) {
            Some(decided) => Now::Decided(sent_if_admitted(decided, place)),
            None => pending(Step::Lane(place)),
        }
    }

    /// Admits a call by `deadline`, waiting in arrival order, or refuses it as soon as its slot is known to lie
    /// beyond: `Ok(calls left at once)`, or the limit that refused and when it has room.
    pub async fn admit(
        &self,
        app: AppIndex,
        route: Route,
        user: Option<&str>,
        deadline: Instant,
    ) -> Result<u32, Refusal> {
        match self.decide(app, route, user, deadline) {
            Now::Decided(decided) => decided,
            Now::Waits(pending) => pending.wait().await,
        }
    }

    /// The decision now, whatever it would wait for: a call that would have to wait is refused by its route.
    pub fn at_once(&self, app: AppIndex, route: Route, user: Option<&str>) -> Result<u32, Refusal> {
        match self.decide(app, route, user, Instant::now()) {
            Now::Decided(decided) => decided,
            Now::Waits(_) => Err((Scope::Route, self.lane(app, route).interval())),
        }
    }

    /// A place in the user's 60-second window, waiting for one only if it frees before `deadline`.
    pub async fn user_place(&self, app: AppIndex, user: &str, deadline: Instant) -> Result<Place<'_>, Refusal> {
        loop {
            match self.users[app.0].reserve(user) {
                Ok(place) => return Ok(place),
                Err(wait) if Instant::now() + wait > deadline => return Err((Scope::User, wait)),
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    /// The lane's decision when it needs no waiting: a slot now (nobody queued ahead, every gate has room), or a
    /// refusal because the slot is known to lie beyond `deadline` (rather than make the caller wait to be
    /// refused). Behind a queue, the head's own wait is unknown (governor cannot peek without taking a slot):
    /// a whole interval is counted for it.
    fn lane_now(&self, app: AppIndex, lane: &Lane, deadline: Instant) -> Option<Result<u32, Refusal>> {
        let interval = lane.interval();
        let ahead = lane.waiting.load(Ordering::Acquire) as u32;
        let pause = lane.pause_left();
        let (scope, first) = match (ahead, pause) {
            (0, None) => match self.gates(app, lane).check() {
                Ok(remaining) => return Some(Ok(remaining)),
                Err(refusal) => refusal,
            },
            _ => (Scope::Route, interval),
        };
        let estimate = pause.unwrap_or_default() + first + interval * ahead;
        (Instant::now() + estimate > deadline).then_some(Err((scope, estimate)))
    }

    /// A slot in the lane (and the AppKey cap) after those queued ahead, or a refusal as soon as the slot is known
    /// to lie beyond `deadline`.
    async fn queued(&self, app: AppIndex, lane: &Lane, deadline: Instant) -> Result<u32, Refusal> {
        let gates = self.gates(app, lane);
        let interval = lane.interval();
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

    /// Resumes app number `app`'s lanes after a restart: each route in `used` as if its last calls went the time
    /// given ago (the AppKey cap by its latest route).
    pub fn resume(&self, app: AppIndex, used: &[(Route, Duration)]) {
        for (route, ago) in used {
            self.lane(app, *route).current().resume(*ago);
        }
        if let (Some(cap), Some(latest)) = (&self.apps[app.0], used.iter().map(|(_, ago)| *ago).min()) {
            cap.resume(latest);
        }
    }
}

impl<'a> Pending<'a> {
    /// Waits for what [`Limits::decide`] could not give at once: the user's place (then the lane is decided
    /// afresh), and the lane's slot in arrival order.
    pub async fn wait(self) -> Result<u32, Refusal> {
        let Pending { limits, app, lane, deadline, step } = self;
        let place = match step {
            Step::Lane(place) => place,
            Step::UserWindow(user) => {
                let place = limits.user_place(app, user, deadline).await?;
                if let Some(decided) = limits.lane_now(app, lane, deadline) {
                    return sent_if_admitted(decided, Some(place));
                }
                Some(place)
            }
        };
        let decided = limits.queued(app, lane, deadline).await;
        sent_if_admitted(decided, place)
    }
}

/// The user's place counts from now if the call was admitted; otherwise it is given back.
fn sent_if_admitted(decided: Result<u32, Refusal>, place: Option<Place<'_>>) -> Result<u32, Refusal> {
    if let (Ok(_), Some(place)) = (&decided, place) {
        place.sent();
    }
    decided
}
