//! Where the quota is counted: in this process, or in Redis for every replica with this replica's share of the
//! limits as its fallback (`redis.rs` times the switches: [`Phase`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::routes::Route;

use super::decision::{AppIndex, MINUTE, Refusal, Scope};
use super::local::Limits;
use super::pace::guarded;
use super::redis::{Gate, Phase, Reservation, SharedQuota};
use super::window;

pub enum Backend {
    /// The limits in this process are the whole quota.
    Local,
    /// Redis holds the quota every replica draws from.
    Redis(Shared),
}

/// The Redis backend, and the local limits at this replica's share used while Redis is unavailable.
pub struct Shared {
    pub quota: Arc<SharedQuota>,
    pub fallback: Limits,
}

/// One call to decide in the shared quota.
pub struct Ask<'a> {
    pub app: AppIndex,
    pub route: Route,
    pub user: Option<&'a str>,
    /// The longest this call may wait (none for a job's call).
    pub max_wait: Duration,
    /// The configured `max_wait`: how far ahead Redis may have granted slots, to any replica.
    pub granted_ahead: Duration,
}

impl Shared {
    /// One reservation across every gate in Redis, paced by `limits` (the whole quota's, with their adaptive rates
    /// and Easemob's pauses), or this replica's share while Redis is unavailable, or both while the replicas
    /// return to Redis (see [`Phase`]).
    pub async fn decide(&self, limits: &Limits, ask: Ask<'_>) -> Result<u32, Refusal> {
        let Ask { app, route, user, max_wait, granted_ahead } = ask;
        let lane = limits.lane(app, route);
        let deadline = Instant::now() + max_wait;
        if let Some(pause) = lane.pause_left() {
            if pause > max_wait {
                return Err((Scope::Route, pause));
            }
            tokio::time::sleep(pause).await;
        }
        let phase = self.quota.phase(granted_ahead);
        // Returning: other replicas may still send what only their share granted, so keep to this one's as well.
        // Fallback: this replica's share is the quota (and a probe below may find Redis back).
        let mine = match phase {
            Phase::Shared | Phase::UsersReturning => None,
            Phase::Returning | Phase::Fallback { .. } => Some(self.own_share(&ask, phase, deadline).await?),
        };
        // For a minute after the return, a user's window in Redis misses what the shares admitted: keep to this
        // replica's share of it as well (the place is given back if Redis refuses the call).
        let place = match (phase, user) {
            (Phase::UsersReturning, Some(user)) => Some(self.fallback.user_place(app, user, deadline).await?),
            _ => None,
        };
        if self.quota.should_try() {
            let (scopes, gates) = self.gates(limits, app, route, user);
            match self.quota.reserve(&gates, deadline.saturating_duration_since(Instant::now())).await {
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
            _ => self.own_share(&ask, self.quota.phase(granted_ahead), deadline).await,
        }
    }

    /// The gates of a call in Redis, each with the limit it stands for: the route, the AppKey cap, the user.
    fn gates(&self, limits: &Limits, app: AppIndex, route: Route, user: Option<&str>) -> (Vec<Scope>, Vec<Gate>) {
        let app_key = limits.lane(app, route).app.as_str();
        let (emission, tolerance) = limits.lane(app, route).current().gcra();
        let mut gates =
            vec![(Scope::Route, Gate::Pace { key: self.quota.key(app_key, route.name()), emission, tolerance })];
        if let Some(cap) = &limits.apps[app.0] {
            let (emission, tolerance) = cap.gcra();
            gates.push((Scope::App, Gate::Pace { key: self.quota.key(app_key, "app"), emission, tolerance }));
        }
        if let Some(user) = user {
            gates.push((
                Scope::User,
                Gate::Window { key: self.user_key(app_key, user), window: guarded(MINUTE), limit: limits.user_limit },
            ));
        }
        gates.into_iter().unzip()
    }

    fn user_key(&self, app_key: &str, user: &str) -> String {
        self.quota.key(app_key, &format!("user:{user}"))
    }

    /// A slot in this replica's share of the quota (the fallback limits) by `deadline`. After a loss, none before
    /// every call Redis granted can have gone out (they may lie `max_wait` ahead, for any replica), and one
    /// interval more, so the share never adds to a window the shared quota already filled; for a user, none before
    /// their window in Redis (which may be full) has passed.
    async fn own_share(&self, ask: &Ask<'_>, phase: Phase, deadline: Instant) -> Result<u32, Refusal> {
        let (fallback, app, user) = (&self.fallback, ask.app, ask.user);
        let lane = fallback.lane(app, ask.route);
        if let Phase::Fallback { since } = phase {
            let interval =
                fallback.apps[app.0].as_ref().map_or(lane.interval(), |cap| cap.interval().max(lane.interval()));
            let (scope, after) = match user {
                Some(_) => (Scope::User, guarded(MINUTE)),
                None => (Scope::Route, interval),
            };
            let (opens, now) = (since + ask.granted_ahead + after, Instant::now());
            if opens > deadline {
                return Err((scope, opens.saturating_duration_since(now)));
            }
            tokio::time::sleep_until(opens).await;
        }
        match deadline > Instant::now() {
            true => fallback.admit(app, ask.route, user, deadline).await,
            false => fallback.at_once(app, ask.route, user),
        }
    }

    /// For each user, how long until their `calls` have all gone through their window in Redis; `None` when Redis
    /// cannot say.
    pub async fn users_time(&self, app_key: &str, users: &[(&str, u32)], limits: &Limits) -> Option<Vec<Duration>> {
        let keys: Vec<String> = users.iter().map(|(user, _)| self.user_key(app_key, user)).collect();
        let windows = self.quota.window_calls(&keys, limits.user_limit.get()).await.ok()?;
        let limit = limits.user_limit.get() as usize;
        let calls = users.iter().map(|(_, calls)| *calls as usize);
        Some(windows.into_iter().zip(calls).map(|(t, n)| window::time_for(t, n, guarded(MINUTE), limit)).collect())
    }
}
