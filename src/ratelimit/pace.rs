//! A per-second limit as `governor` paces it: calls spaced so that no window ever holds more than the limit,
//! while a waiting call that wakes a little late (tokio's timers have millisecond ticks) keeps its slot.
//!
//! Why not plain GCRA with a burst of 1? It keeps every window within the limit, but it re-derives each slot from
//! when the previous call actually went: a timer that fires 1 ms late on a 10 ms spacing loses that millisecond
//! for good, and a saturated lane drifts to about 91 % of its quota. A GCRA with a tolerance of one slot would keep
//! the slot but lets one call too many into a window. So each call costs `cells` governor cells of about
//! [`LATENESS`] each, with one cell of tolerance: a call may go up to one cell early or late without either losing
//! its slot or crowding a window, and the spacing is stretched just enough that `limit` calls never fit in a window
//! (plus [`guarded`]'s margin).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::config::Limit;

/// How late a waiting call may be admitted without losing its slot: one governor cell.
const LATENESS: Duration = Duration::from_millis(2);

/// Easemob counts calls when they arrive; we count when we admit them. A call can take a few milliseconds more to
/// arrive than the one before it, so every window is counted this much longer than Easemob's own (0.5 %).
pub fn guarded(window: Duration) -> Duration {
    window + window / 200
}

/// `factor` of `limit`'s rate, at least one call.
pub fn scaled(limit: Limit, factor: f64) -> NonZeroU32 {
    NonZeroU32::new((limit.rate.get() as f64 * factor).round() as u32).unwrap_or(NonZeroU32::MIN)
}

/// `governor`'s clock, following tokio's: the same time as the rest of the gateway, and paused in tests.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    type Instant = std::time::Instant;

    fn now(&self) -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, StateInformationMiddleware>;

/// One paced limit: `rate` calls per `window`, `burst` of them at once.
pub struct Pace {
    limiter: Limiter,
    /// Governor cells one call costs.
    cells: NonZeroU32,
    cell: Duration,
    burst: NonZeroU32,
    rate: u32,
}

impl Pace {
    pub fn new(rate: NonZeroU32, burst: NonZeroU32, window: Duration) -> Pace {
        let guarded = guarded(window).as_nanos();
        let (n, b) = (u128::from(rate.get()), burst.get());
        let cells = (guarded / n / LATENESS.as_nanos()).clamp(1, u128::from(u32::MAX / (b + 1))) as u32;
        // n calls of `cells` cells, less the one cell of tolerance, must span at least the guarded window:
        // (n·cells − 1)·cell ≥ window.
        let cell = guarded.div_ceil(n * u128::from(cells) - 1).max(1);
        let cell = Duration::from_nanos(u64::try_from(cell).unwrap_or(u64::MAX));
        let capacity = NonZeroU32::new(b * cells + 1).expect("at least one cell");
        let quota = Quota::with_period(cell).expect("a cell is never zero").allow_burst(capacity);
        Pace {
            limiter: RateLimiter::direct_with_clock(quota, TokioClock).with_middleware(),
            cells: NonZeroU32::new(cells).expect("at least one cell per call"),
            cell,
            burst,
            rate: rate.get(),
        }
    }

    /// Like [`Pace::new`], with its burst already spent: a lane whose rate changes must not let a burst through
    /// (least of all right after Easemob said 429).
    pub fn spent(rate: NonZeroU32, burst: NonZeroU32, window: Duration) -> Pace {
        let pace = Pace::new(rate, burst, window);
        let burst_cells = NonZeroU32::new(burst.get() * pace.cells.get()).expect("non-zero");
        let _ = pace.limiter.check_n(burst_cells);
        pace
    }

    /// The pace of a limit a reload asks for, given what the previous set had (`before`: `None` if it did not
    /// serve the app): kept when unchanged, otherwise new, its burst spent if the app was already being served.
    pub fn carried(before: Option<&Option<Arc<Pace>>>, limit: Option<Limit>, window: Duration) -> Option<Arc<Pace>> {
        let limit = limit?;
        Some(match before {
            None => Arc::new(Pace::new(limit.rate, limit.burst, window)),
            Some(Some(pace)) if pace.rate() == limit.rate.get() && pace.burst() == limit.burst => Arc::clone(pace),
            Some(_) => Arc::new(Pace::spent(limit.rate, limit.burst, window)),
        })
    }

    /// Takes what calls made `ago` by a process before this one would still hold: as if the whole burst had gone
    /// then, the most any calls up to that moment can have left taken. A restarted gateway so resumes the pace
    /// where the last one may have left it, rather than with a fresh burst.
    pub fn resume(&self, ago: Duration) {
        let capacity = self.burst.get() * self.cells.get() + 1;
        let refilled = (ago.as_nanos() / self.cell.as_nanos()).min(u128::from(capacity)) as u32;
        // Calls this pace admitted since start-up hold cells too: take as much of the rest as still fits.
        for cells in (1..=capacity - refilled).rev() {
            let cells = NonZeroU32::new(cells).expect("counting down from above zero");
            if matches!(self.limiter.check_n(cells), Ok(Ok(_))) {
                return;
            }
        }
    }

    /// Takes a slot now and says how many calls are left at once, or says how long until the next slot.
    pub fn check(&self) -> Result<u32, Duration> {
        match self.limiter.check_n(self.cells).expect("a call fits the capacity") {
            Ok(snapshot) => Ok(snapshot.remaining_burst_capacity() / self.cells.get()),
            Err(not_until) => Err(not_until.wait_time_from(TokioClock.now())),
        }
    }

    pub fn rate(&self) -> u32 {
        self.rate
    }

    pub fn burst(&self) -> NonZeroU32 {
        self.burst
    }

    /// The spacing of calls.
    pub fn interval(&self) -> Duration {
        self.cell * self.cells.get()
    }

    /// The same limit as GCRA parameters (emission interval, tolerance), for the shared quota in Redis. Redis
    /// gives each call its slot in advance, so no call is late for it: no cell of tolerance for lateness, and two
    /// more milliseconds of margin for the trip.
    pub fn gcra(&self) -> (Duration, Duration) {
        (self.interval(), self.interval() * (self.burst.get() - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    /// Runs a saturated lane for `secs` seconds of paused time, each waiting call waking when its timer fires
    /// (tokio rounds a timer up to its next millisecond tick: the lateness that used to cost a tenth of the quota);
    /// returns the admission times.
    async fn saturate(pace: &Pace, secs: u64) -> Vec<Instant> {
        let (start, mut admitted) = (Instant::now(), Vec::new());
        while start.elapsed() < Duration::from_secs(secs) {
            match pace.check() {
                Ok(_) => admitted.push(Instant::now()),
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
        admitted
    }

    /// The most calls in any window of `window` (closed: a call exactly `window` after another counts too).
    fn busiest(times: &[Instant], window: Duration) -> usize {
        let mut first = 0;
        (0..times.len())
            .map(|last| {
                while times[last] - times[first] > window {
                    first += 1;
                }
                last - first + 1
            })
            .max()
            .unwrap_or(0)
    }

    #[tokio::test(start_paused = true)]
    async fn a_saturated_lane_uses_over_99_percent_of_its_quota_and_never_crowds_a_window() {
        for rate in [1, 5, 30, 100, 250, 1000] {
            let pace = Pace::new(nz(rate), nz(1), Duration::from_secs(1));
            let times = saturate(&pace, 20).await;
            let used = times.len() as f64 / (20.0 * rate as f64);
            assert!(used >= 0.99, "rate {rate}: {} calls in 20 s ({:.2} %)", times.len(), used * 100.0);
            // Easemob's window and then some: the margin for calls that take longer to arrive.
            assert!(busiest(&times, Duration::from_millis(1004)) <= rate as usize, "rate {rate}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_never_crowds_a_window_beyond_rate_plus_burst_minus_one() {
        let pace = Pace::new(nz(10), nz(4), Duration::from_secs(1));
        let times = saturate(&pace, 10).await;
        assert_eq!(times.iter().filter(|t| **t == times[0]).count(), 4, "the burst goes at once");
        assert!(busiest(&times, Duration::from_secs(1)) <= 13);
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_slot_is_one_interval_away() {
        let pace = Pace::new(nz(100), nz(1), Duration::from_secs(1));
        assert_eq!(pace.check(), Ok(0));
        let wait = pace.check().unwrap_err();
        assert!(wait < pace.interval() && wait >= pace.interval() - LATENESS * 2, "{wait:?}");
        assert!(pace.interval() > Duration::from_millis(10) && pace.interval() < Duration::from_micros(10_100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_resumed_pace_keeps_the_window_its_last_call_went_in() {
        for burst in [1, 4] {
            // One process saturates the lane for 3 s, then is killed; another resumes it 1 ms later.
            let before = Pace::new(nz(10), nz(burst), Duration::from_secs(1));
            let mut times = saturate(&before, 3).await;
            while before.check().is_err() {
                tokio::time::advance(Duration::from_millis(1)).await;
            }
            times.push(Instant::now());
            let last = Instant::now();
            tokio::time::advance(Duration::from_millis(1)).await;
            let after = Pace::new(nz(10), nz(burst), Duration::from_secs(1));
            after.resume(Instant::now() - last);
            times.extend(saturate(&after, 3).await);
            assert!(
                busiest(&times, Duration::from_millis(1004)) < 10 + burst as usize,
                "burst {burst}: rate + burst - 1 at most"
            );
        }
        let idle = Pace::new(nz(10), nz(1), Duration::from_secs(1));
        idle.resume(Duration::from_secs(2));
        assert_eq!(idle.check(), Ok(0), "a lane last used more than a window ago is free");
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_pace_starts_with_no_burst() {
        let pace = Pace::spent(nz(10), nz(5), Duration::from_secs(1));
        assert!(pace.check().is_err());
    }
}
