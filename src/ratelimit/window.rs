//! A limit per key counted the way Easemob counts it: at most `limit` calls in any window, kept as a log of each
//! key's last calls. A token bucket cannot do this: with room for `limit` calls at once it lets `limit` more
//! through as it refills within the same window, and with less room it refuses calls Easemob would take.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::pace::guarded;

pub struct WindowLog {
    limit: usize,
    /// Easemob's window plus the arrival margin.
    window: Duration,
    /// Per key, the times of its calls within the window (reserved or sent), at most `limit` of them.
    keys: Mutex<HashMap<Box<str>, Vec<Instant>>>,
}

impl WindowLog {
    pub fn new(limit: NonZeroU32, window: Duration) -> WindowLog {
        WindowLog { limit: limit.get() as usize, window: guarded(window), keys: Mutex::default() }
    }

    /// A log with another limit holding the calls this one counted: a reload that changes the limit must not
    /// forget the calls already made in the window.
    pub fn with_limit(&self, limit: NonZeroU32) -> WindowLog {
        let keys = self.keys.lock().expect("window lock").clone();
        WindowLog { limit: limit.get() as usize, window: self.window, keys: Mutex::new(keys) }
    }

    /// Takes a place for `key` now, or says how long until the window frees one. The place is given back if the
    /// [`Place`] is dropped before it is [`sent`](Place::sent): a call refused by a later gate costs nothing here.
    pub fn reserve(&self, key: &str) -> Result<Place<'_>, Duration> {
        let now = Instant::now();
        let mut keys = self.keys.lock().expect("window lock");
        let times = match keys.get_mut(key) {
            Some(times) => times,
            None => keys.entry(key.into()).or_default(),
        };
        times.retain(|t| now.saturating_duration_since(*t) < self.window);
        let wait = room_after(times, now, self.window, self.limit);
        if !wait.is_zero() {
            return Err(wait);
        }
        times.push(now);
        Ok(Place { log: self, key: key.into(), at: now, sent: false })
    }

    /// How long from now until `calls` more calls for `key` have all gone, each as soon as its window has room.
    pub fn time_for(&self, key: &str, calls: usize) -> Duration {
        let times = self.keys.lock().expect("window lock").get(key).cloned().unwrap_or_default();
        time_for(times, calls, self.window, self.limit)
    }

    /// Counts a call for `key` made `ago` (before a restart): it keeps its place in the window as Easemob counts it.
    pub fn resume(&self, key: &str, ago: Duration) {
        let Some(at) = Instant::now().checked_sub(ago).filter(|_| ago < self.window) else { return };
        let mut keys = self.keys.lock().expect("window lock");
        let times = keys.entry(key.into()).or_default();
        times.push(at);
        // Only the newest `limit` calls can decide when the window has room.
        if times.len() > self.limit {
            times.sort_unstable();
            times.remove(0);
        }
    }

    /// How many keys have a call in the window now.
    pub fn active(&self) -> usize {
        let now = Instant::now();
        let keys = self.keys.lock().expect("window lock");
        keys.values().filter(|times| times.iter().any(|t| now.saturating_duration_since(*t) < self.window)).count()
    }

    /// Forgets keys with no call left in the window, so memory follows the active users, not all users ever seen.
    pub fn evict_idle(&self) {
        let now = Instant::now();
        let mut keys = self.keys.lock().expect("window lock");
        keys.retain(|_, times| times.iter().any(|t| now.saturating_duration_since(*t) < self.window));
        keys.shrink_to_fit();
    }

    #[cfg(test)]
    pub fn keys(&self) -> usize {
        self.keys.lock().expect("window lock").len()
    }

    fn settle(&self, key: &str, at: Instant, sent: Option<Instant>) {
        let mut keys = self.keys.lock().expect("window lock");
        let Some(times) = keys.get_mut(key) else { return };
        let Some(i) = times.iter().position(|t| *t == at) else { return };
        match sent {
            // The window runs from when the call actually left, which may be after a wait for the route's slot.
            Some(sent) => times[i] = sent,
            None => {
                times.swap_remove(i);
            }
        }
    }
}

/// How long after `at` a window (`limit` calls in any `window`) holding `times` has room for one more call: when
/// enough of them have left it. What [`WindowLog::reserve`] waits for, and [`time_for`] counts with.
fn room_after(times: &[Instant], at: Instant, window: Duration, limit: usize) -> Duration {
    let is_live = |t: &&Instant| at.saturating_duration_since(**t) < window;
    if times.iter().filter(is_live).count() < limit {
        return Duration::ZERO;
    }
    let mut live: Vec<Instant> = times.iter().filter(is_live).copied().collect();
    live.sort_unstable();
    // The call that must leave for the window to hold one less than its limit.
    (live[live.len() - limit] + window).saturating_duration_since(at)
}

/// How long from now until `calls` more calls have all gone through a window holding `times`, each as soon as the
/// window has room (the shared quota's windows in Redis are counted with it too).
pub fn time_for(mut times: Vec<Instant>, calls: usize, window: Duration, limit: usize) -> Duration {
    times.sort_unstable();
    let now = Instant::now();
    let mut at = now;
    for _ in 0..calls {
        at += room_after(&times, at, window, limit);
        times.push(at);
        // Only the newest calls can decide when the window has room.
        if times.len() > limit {
            times.remove(0);
        }
    }
    at - now
}

/// A place in a key's window, held while the call waits for its other gates.
pub struct Place<'a> {
    log: &'a WindowLog,
    key: Box<str>,
    at: Instant,
    sent: bool,
}

impl Place<'_> {
    /// The call leaves now: its place counts from this moment.
    pub fn sent(mut self) {
        self.sent = true;
        self.log.settle(&self.key, self.at, Some(Instant::now()));
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if !self.sent {
            self.log.settle(&self.key, self.at, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> WindowLog {
        WindowLog::new(NonZeroU32::new(5).unwrap(), Duration::from_secs(60))
    }

    #[tokio::test(start_paused = true)]
    async fn five_at_once_then_none_until_the_first_leaves_the_window() {
        let log = log();
        for _ in 0..5 {
            log.reserve("ann").unwrap().sent();
        }
        let wait = log.reserve("ann").err().expect("a sixth is refused");
        assert_eq!(wait, Duration::from_millis(60_300), "the whole window, margin included");
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(log.reserve("ann").err(), Some(Duration::from_millis(30_300)));
        assert!(log.reserve("bob").is_ok(), "another key has its own window");
        tokio::time::advance(Duration::from_millis(30_300)).await;
        for _ in 0..5 {
            log.reserve("ann").unwrap().sent();
        }
        assert!(log.reserve("ann").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn calls_spread_over_a_minute_never_put_six_in_one_window() {
        let log = log();
        let mut sent = Vec::new();
        // One attempt every 7 seconds for five minutes: whatever the spacing, no 60 s window holds six.
        for _ in 0..43 {
            if let Ok(place) = log.reserve("ann") {
                place.sent();
                sent.push(Instant::now());
            }
            tokio::time::advance(Duration::from_secs(7)).await;
        }
        for (i, first) in sent.iter().enumerate() {
            let in_window = sent[i..].iter().take_while(|t| t.duration_since(*first) <= Duration::from_secs(60));
            assert!(in_window.count() <= 5);
        }
        assert!(sent.len() >= 20, "and the limit is used: {} calls", sent.len());
    }

    #[tokio::test(start_paused = true)]
    async fn a_place_not_sent_is_given_back_and_a_late_send_counts_from_when_it_left() {
        let log = log();
        drop(log.reserve("ann").unwrap());
        let places: Vec<_> = (0..5).map(|_| log.reserve("ann").unwrap()).collect();
        assert!(log.reserve("ann").is_err(), "places held by waiting calls count");
        tokio::time::advance(Duration::from_secs(1)).await;
        places.into_iter().for_each(Place::sent);
        tokio::time::advance(Duration::from_millis(59_500)).await;
        assert_eq!(log.reserve("ann").err(), Some(Duration::from_millis(800)), "counted from the send, a second late");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keys_are_evicted_and_memory_stays_bounded() {
        // The resident memory 100,000 users' windows take (run with --nocapture to see it; Linux only).
        let rss_kib = || {
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap_or("VmRSS: 0 kB").to_owned();
            line.split_whitespace().nth(1).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0)
        };
        let before = rss_kib();
        let log = log();
        for user in 0..100_000 {
            log.reserve(&format!("user-{user:05}")).unwrap().sent();
        }
        assert_eq!(log.keys(), 100_000);
        eprintln!("100,000 users' windows: {} KiB resident", rss_kib().saturating_sub(before));
        tokio::time::advance(Duration::from_secs(30)).await;
        log.evict_idle();
        assert_eq!(log.keys(), 100_000, "still within their window");
        tokio::time::advance(Duration::from_secs(31)).await;
        log.evict_idle();
        assert_eq!(log.keys(), 0);
    }
}
