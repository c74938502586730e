//! What the quota holds now, for the admin status page: per lane its limit, the pace in force and the calls
//! waiting for a slot, and how many users have calls in their `delete_conversation` window.

use std::sync::atomic::Ordering;

use serde::Serialize;

use super::decision::AppIndex;
use super::local::Limits;
use crate::routes::Route;

#[derive(Debug, Serialize)]
pub struct QuotaStatus {
    /// `local`, or `redis` (whose windows live in Redis, shared by the replicas).
    pub backend: &'static str,
    pub lanes: Vec<LaneStatus>,
    /// Users with a call in their window; `None` with Redis, which keeps the windows.
    pub users_in_window: Option<usize>,
    pub user_limit_per_minute: u32,
}

#[derive(Debug, Serialize)]
pub struct LaneStatus {
    pub route: &'static str,
    /// The configured limit, as this replica applies it.
    pub rate: u32,
    pub burst: u32,
    /// Calls per second let through now: lower than `rate` after Easemob's 429s.
    pub rate_now: u32,
    /// Calls waiting for a slot.
    pub waiting: usize,
}

/// `app`'s lanes, in route order.
pub fn lanes(limits: &Limits, app: AppIndex) -> Vec<LaneStatus> {
    Route::ALL
        .iter()
        .map(|&route| limits.lane(app, route))
        .map(|lane| LaneStatus {
            route: lane.route.name(),
            rate: lane.configured.rate.get(),
            burst: lane.configured.burst.get(),
            rate_now: lane.current().rate(),
            waiting: lane.waiting.load(Ordering::Relaxed),
        })
        .collect()
}
