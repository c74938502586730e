//! One (AppKey, route) lane: its pace, which Easemob's 429s slow down and pause, and the queue its waiting calls
//! stand in, in arrival order.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{AppKey, Limit};
use crate::metrics::Metrics;
use crate::routes::Route;

use super::decision::{Refusal, SECOND, Scope};
use super::pace::{Pace, scaled};

/// A lane never slows below this share of its configured rate, however many 429s Easemob sends.
const MIN_ADAPTIVE_FACTOR: f64 = 0.1;
/// Several 429s within this window count as one signal: one halving, not a collapse.
const DECREASE_COOLDOWN: Duration = Duration::from_secs(1);
/// After this long without a 429, the rate climbs back by a tenth of the configured rate per step.
const RECOVERY_QUIET: Duration = Duration::from_secs(5);
pub(super) const RECOVERY_STEP: Duration = Duration::from_secs(2);

pub struct Lane {
    pub app: AppKey,
    pub route: Route,
    pub configured: Limit,
    pace: RwLock<Arc<Pace>>,
    adaptive: Mutex<Adaptive>,
    /// Waiters line up here, in arrival order.
    pub queue: tokio::sync::Mutex<()>,
    pub waiting: AtomicUsize,
    /// `rate_limit_wait_seconds` for this lane, looked up once.
    pub wait: prometheus::Histogram,
}

#[derive(Debug)]
struct Adaptive {
    factor: f64,
    last_decrease: Option<Instant>,
    last_throttle: Option<Instant>,
    /// Easemob's `Retry-After`: nothing leaves this lane before it.
    paused_until: Option<Instant>,
}

impl Lane {
    /// `spent`: the lane replaces one whose limit changed, so it must not hand out a fresh burst.
    pub fn new(app: &AppKey, route: Route, limit: Limit, spent: bool, metrics: &Metrics) -> Lane {
        let pace = match spent {
            true => Pace::spent(limit.rate, limit.burst, SECOND),
            false => Pace::new(limit.rate, limit.burst, SECOND),
        };
        Lane {
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
            wait: metrics.rate_limit_wait.with_label_values(&[app.as_str(), route.name()]),
        }
    }

    pub fn current(&self) -> Arc<Pace> {
        Arc::clone(&self.pace.read().expect("pace lock"))
    }

    pub fn interval(&self) -> Duration {
        self.current().interval()
    }

    /// How long Easemob's `Retry-After` still holds this lane, if it does.
    pub fn pause_left(&self) -> Option<Duration> {
        let paused = self.adaptive.lock().expect("adaptive lock").paused_until?;
        let left = paused.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Easemob answered 429: pause for its `Retry-After`, and (if `adapt`) halve the rate, once per cooldown.
    /// Returns the new rate when it was lowered.
    pub fn throttled(&self, retry_after: Option<Duration>, adapt: bool) -> Option<u32> {
        let now = Instant::now();
        let mut adaptive = self.adaptive.lock().expect("adaptive lock");
        adaptive.last_throttle = Some(now);
        if let Some(wait) = retry_after {
            adaptive.paused_until = Some(adaptive.paused_until.map_or(now + wait, |p| p.max(now + wait)));
        }
        let cooling = adaptive.last_decrease.is_some_and(|t| now.duration_since(t) < DECREASE_COOLDOWN);
        if !adapt || cooling || adaptive.factor <= MIN_ADAPTIVE_FACTOR {
            return None;
        }
        adaptive.factor = (adaptive.factor / 2.0).max(MIN_ADAPTIVE_FACTOR);
        adaptive.last_decrease = Some(now);
        Some(self.set_factor(adaptive.factor))
    }

    /// One recovery step after a quiet spell without 429s; returns the new rate when it rose.
    pub fn recover(&self) -> Option<u32> {
        let mut adaptive = self.adaptive.lock().expect("adaptive lock");
        let quiet = adaptive.last_throttle.is_none_or(|t| Instant::now().duration_since(t) >= RECOVERY_QUIET);
        if adaptive.factor >= 1.0 || !quiet {
            return None;
        }
        adaptive.factor = (adaptive.factor + 0.1).min(1.0);
        Some(self.set_factor(adaptive.factor))
    }

    /// Replaces the pace at `factor` of the configured rate, its burst spent; returns the new rate.
    fn set_factor(&self, factor: f64) -> u32 {
        let pace = Pace::spent(scaled(self.configured, factor), self.configured.burst, SECOND);
        let rate = pace.rate();
        *self.pace.write().expect("pace lock") = Arc::new(pace);
        rate
    }
}

/// The per-second limits one request must pass: its lane and the AppKey cap.
pub struct Gates<'a> {
    pub lane: &'a Lane,
    pub app: Option<&'a Pace>,
}

impl Gates<'_> {
    /// Takes a slot from the lane, then from the AppKey cap, at the same moment, so each counts the call when it
    /// leaves. `governor` cannot give a slot back: when the cap refuses, the lane's slot is lost (the cap is then
    /// the scarcer limit anyway), which can waste quota but never overspend it.
    pub fn check(&self) -> Result<u32, Refusal> {
        let remaining = self.lane.current().check().map_err(|wait| (Scope::Route, wait))?;
        if let Some(app) = self.app {
            app.check().map_err(|wait| (Scope::App, wait))?;
        }
        Ok(remaining)
    }
}

/// Counts a request in its lane's queue for exactly as long as it waits, even if the caller hangs up.
pub struct Waiter<'a>(&'a AtomicUsize);

impl<'a> Waiter<'a> {
    pub fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Waiter(count)
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
