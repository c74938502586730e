//! Easemob's rate limits, enforced by the simulator as Easemob would: counts per sliding window ("at most N calls
//! in any window"), per AppKey and route, and per user for `delete_conversation`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// The six routes, by this project's names: the keys `Limits::routes` accepts.
pub const ROUTES: [&str; 6] = [
    "delete_chat_messages",
    "delete_group_messages",
    "clear_user_messages",
    "clear_chat_messages_before",
    "clear_group_messages_before",
    "delete_conversation",
];

/// The route that also has a per-user limit.
const PER_USER_ROUTE: &str = "delete_conversation";

/// Easemob's published per-AppKey limit for each of the six routes.
const ROUTE_PER_SECOND: u32 = 100;
/// Easemob's published per-user limit on `delete_conversation`, on top of the per-AppKey one.
const USER_CONVERSATION_PER_MINUTE: u32 = 5;

/// The windows Easemob states its limits over ("per second", "per minute"), read as any such window.
const ROUTE_WINDOW: Duration = Duration::from_secs(1);
const USER_WINDOW: Duration = Duration::from_secs(60);

/// The limits in force, replaced as a whole by `PUT /_sim/limits`: tests that configure the gateway above
/// Easemob's defaults (a paid pack) raise them to match.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Calls per AppKey and route in any 1 s.
    pub route_per_second: u32,
    /// Per-route overrides of `route_per_second`, as a paid pack raises one route's limit.
    pub routes: BTreeMap<String, u32>,
    /// `delete_conversation` calls per AppKey and user in any 60 s.
    pub user_conversation_per_minute: u32,
    /// False: nothing is counted or refused.
    pub enforce: bool,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            route_per_second: ROUTE_PER_SECOND,
            routes: BTreeMap::new(),
            user_conversation_per_minute: USER_CONVERSATION_PER_MINUTE,
            enforce: true,
        }
    }
}

impl Limits {
    /// An override naming no route would silently change nothing: say so instead.
    pub fn check(&self) -> Result<(), String> {
        match self.routes.keys().find(|name| !ROUTES.contains(&name.as_str())) {
            Some(name) => Err(format!("unknown route {name:?}; routes are {}", ROUTES.join(", "))),
            None => Ok(()),
        }
    }

    fn route_limit(&self, route: &str) -> u32 {
        self.routes.get(route).copied().unwrap_or(self.route_per_second)
    }
}

/// The arrival instants of the calls admitted within the last window.
#[derive(Debug, Default)]
struct SlidingLog(VecDeque<Instant>);

impl SlidingLog {
    /// Whether a call arriving at `now` fits: fewer than `limit` admitted calls arrived within `window` before it.
    fn admits(&mut self, now: Instant, window: Duration, limit: u32) -> bool {
        self.prune(now, window);
        self.0.len() < limit as usize
    }

    /// Drops the calls that have left the window.
    fn prune(&mut self, now: Instant, window: Duration) {
        while self.0.front().is_some_and(|&t| now.duration_since(t) >= window) {
            self.0.pop_front();
        }
    }

    fn record(&mut self, now: Instant) {
        self.0.push_back(now);
    }
}

/// One app's admitted calls: a log per route, and one per user for `delete_conversation`.
#[derive(Debug, Default)]
pub struct Meter {
    routes: HashMap<&'static str, SlidingLog>,
    /// Keyed by the lowercased user ID: Easemob compares user IDs case-insensitively.
    users: HashMap<String, SlidingLog>,
    swept: Option<Instant>,
}

impl Meter {
    /// Admits a call on `route` for `user` arriving at `now` and records it, or says it is over a limit (and
    /// records nothing: a refused call takes no slot).
    pub fn admit(&mut self, limits: &Limits, route: &'static str, user: &str, now: Instant) -> bool {
        if !limits.enforce {
            return true;
        }
        if route == PER_USER_ROUTE {
            self.sweep(now);
        }
        let route_log = self.routes.entry(route).or_default();
        if !route_log.admits(now, ROUTE_WINDOW, limits.route_limit(route)) {
            return false;
        }
        if route == PER_USER_ROUTE {
            let user_log = self.users.entry(user.to_lowercase()).or_default();
            if !user_log.admits(now, USER_WINDOW, limits.user_conversation_per_minute) {
                return false;
            }
            user_log.record(now);
        }
        route_log.record(now);
        true
    }

    /// Forgets users with no call in the last window, at most once a window: memory stays bounded by the users
    /// seen in the last two windows.
    fn sweep(&mut self, now: Instant) {
        if self.swept.is_some_and(|t| now.duration_since(t) < USER_WINDOW) {
            return;
        }
        self.users.retain(|_, log| {
            log.prune(now, USER_WINDOW);
            !log.0.is_empty()
        });
        self.swept = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONV: &str = "delete_conversation";
    const CHAT: &str = "delete_chat_messages";

    fn admitted(meter: &mut Meter, limits: &Limits, route: &'static str, user: &str, now: Instant, n: usize) -> usize {
        (0..n).filter(|_| meter.admit(limits, route, user, now)).count()
    }

    #[test]
    fn a_route_admits_its_limit_in_any_second_and_no_more() {
        let (mut meter, limits, t0) = (Meter::default(), Limits::default(), Instant::now());
        assert_eq!(admitted(&mut meter, &limits, CHAT, "alice", t0, 150), 100);
        // Still inside the window that started at t0: nothing, however long the caller waited.
        let almost = t0 + Duration::from_millis(999);
        assert!(!meter.admit(&limits, CHAT, "alice", almost));
        // Another route has its own log.
        assert!(meter.admit(&limits, "clear_user_messages", "alice", almost));
        // A full second after t0 the 100 calls have left the window.
        assert_eq!(admitted(&mut meter, &limits, CHAT, "alice", t0 + ROUTE_WINDOW, 150), 100);
    }

    #[test]
    fn the_window_slides_instead_of_resetting() {
        let (mut meter, t0) = (Meter::default(), Instant::now());
        let limits = Limits { route_per_second: 2, ..Limits::default() };
        assert!(meter.admit(&limits, CHAT, "alice", t0));
        assert!(meter.admit(&limits, CHAT, "alice", t0 + Duration::from_millis(900)));
        // A fixed one-second counter would reset here; the sliding window still holds the call at 900 ms.
        assert!(meter.admit(&limits, CHAT, "alice", t0 + Duration::from_millis(1000)));
        assert!(!meter.admit(&limits, CHAT, "alice", t0 + Duration::from_millis(1100)));
        assert!(meter.admit(&limits, CHAT, "alice", t0 + Duration::from_millis(1900)));
    }

    #[test]
    fn a_user_gets_five_conversation_deletions_a_minute_whatever_the_case() {
        let (mut meter, limits, t0) = (Meter::default(), Limits::default(), Instant::now());
        for (i, user) in ["alice", "Alice", "ALICE", "alice", "aLiCe"].into_iter().enumerate() {
            assert!(meter.admit(&limits, CONV, user, t0 + Duration::from_secs(i as u64)), "call {i}");
        }
        assert!(!meter.admit(&limits, CONV, "Alice", t0 + Duration::from_secs(59)));
        assert!(meter.admit(&limits, CONV, "bob", t0 + Duration::from_secs(59)));
        assert!(meter.admit(&limits, CONV, "alice", t0 + USER_WINDOW));
        // The per-user limit is for delete_conversation only.
        assert_eq!(admitted(&mut meter, &limits, CHAT, "alice", t0, 10), 10);
    }

    #[test]
    fn a_refused_call_takes_no_slot() {
        let (mut meter, t0) = (Meter::default(), Instant::now());
        let limits = Limits { route_per_second: 1, ..Limits::default() };
        // Refused by the route limit: the user's log is untouched.
        assert!(meter.admit(&limits, CONV, "alice", t0));
        assert_eq!(admitted(&mut meter, &limits, CONV, "bob", t0, 10), 0);
        assert!(!meter.users.contains_key("bob"));
        let limits = Limits { user_conversation_per_minute: 1, ..Limits::default() };
        assert!(meter.admit(&limits, CONV, "bob", t0 + ROUTE_WINDOW));
        // Refused by the user limit: the route's log is untouched, so the route's whole limit is left for others.
        let later = t0 + 2 * ROUTE_WINDOW;
        assert_eq!(admitted(&mut meter, &limits, CONV, "bob", later, 10), 0);
        assert!(meter.admit(&limits, CONV, "carol", later));
        assert_eq!(meter.routes[CONV].0.len(), 1);
    }

    #[test]
    fn overrides_and_enforce() {
        let (mut meter, t0) = (Meter::default(), Instant::now());
        let limits = Limits { routes: BTreeMap::from([(CHAT.to_owned(), 300)]), ..Limits::default() };
        assert_eq!(admitted(&mut meter, &limits, CHAT, "alice", t0, 400), 300);
        assert_eq!(admitted(&mut meter, &limits, "clear_user_messages", "alice", t0, 400), 100);
        let off = Limits { enforce: false, ..Limits::default() };
        assert_eq!(admitted(&mut meter, &off, CONV, "alice", t0, 400), 400);
        assert!(meter.users.is_empty(), "nothing is counted while limits are off");
    }

    #[test]
    fn unknown_route_overrides_are_refused() {
        let limits = Limits { routes: BTreeMap::from([("delete_conversations".to_owned(), 9)]), ..Limits::default() };
        assert!(limits.check().unwrap_err().contains("delete_conversations"));
        assert!(Limits::default().check().is_ok());
    }

    #[test]
    fn idle_users_are_forgotten() {
        let (mut meter, limits, t0) = (Meter::default(), Limits::default(), Instant::now());
        for i in 0..50 {
            assert!(meter.admit(&limits, CONV, &format!("u{i}"), t0 + Duration::from_millis(20 * i)));
        }
        assert_eq!(meter.users.len(), 50);
        assert!(meter.admit(&limits, CONV, "late", t0 + USER_WINDOW + Duration::from_secs(1)));
        assert_eq!(meter.users.keys().collect::<Vec<_>>(), ["late"]);
    }
}
