//! The quota's vocabulary, below every part of it: which limit decided a call, a refusal as numbers, an app's
//! index, and Easemob's windows.

use std::time::Duration;

use crate::config::AppKey;
use crate::routes::Route;

/// Easemob's windows: the route and AppKey limits count calls per second, the per-user limit per minute.
pub const SECOND: Duration = Duration::from_secs(1);
pub const MINUTE: Duration = Duration::from_secs(60);

/// The limit that decided: a refusal names it, with the time to its next free slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Route,
    App,
    User,
}

/// Why a request was not admitted: the limit, and how long until it has room.
pub type Refusal = (Scope, Duration);

/// An app's position in the configuration: the index of its lanes, its cap and its users' windows here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppIndex(pub usize);

impl AppIndex {
    /// The index of this app's lane for `route`.
    pub fn lane(self, route: Route) -> usize {
        self.0 * Route::ALL.len() + route.index()
    }

    /// Where `app` stood in `keys` (a set a reload replaces), if it was there.
    pub fn of(keys: &[AppKey], app: &AppKey) -> Option<AppIndex> {
        keys.iter().position(|k| k == app).map(AppIndex)
    }
}
