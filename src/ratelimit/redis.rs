//! The shared quota: every replica draws from one set of limits in Redis, through one atomic Lua script that
//! uses Redis's own clock (`TIME`), so clock skew between replicas does not matter. The per-second limits are
//! GCRA states (the same spacing and tolerance as the local `Pace`), the per-user limit a list of the user's last
//! calls (the same window as the local `WindowLog`). A call is given a slot in every gate at one moment, possibly
//! in the near future (it then sleeps until it): slots follow the quota's own schedule, not the moment a timer
//! fired. Calls have a tight timeout; while Redis is slow or down, each replica falls back to a local limiter at
//! its share of the quota, and probes Redis once a second to return to it. [`Standing`] times both switches, as
//! each leaves calls granted under one quota still to go out under the other.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::RedisConfig;
use crate::metrics::Metrics;
use crate::redis_conn::{Connection, Patience};

use super::pace::guarded;

/// While in fallback, Redis is tried again at most this often, so requests do not each pay its timeout.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Reserves one slot in every gate at one moment, or none. KEYS: the gates. ARGV[1]: the longest acceptable wait
/// (µs); then per gate its kind and two numbers: `p` (a pace: emission interval and tolerance, µs) or `w` (a
/// window: its length in µs and the most calls it may hold). Returns {admitted, wait µs, the first gate's calls
/// left at once, the gate that decided the wait (1-based), then per gate the value to give back on release}.
const RESERVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local max_wait = tonumber(ARGV[1])
local seen, wait, which = {}, 0, 1
local function later(w, i)
  if w > wait then wait, which = w, i end
end
for i, key in ipairs(KEYS) do
  local kind, a, b = ARGV[3 * i - 1], tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
  if kind == 'p' then
    local stored = redis.call('GET', key)
    local tat = now
    if stored then tat = math.max(tonumber(stored), now) end
    seen[i] = tat
    later(tat - b - now, i)
  else
    -- Newest first, at most b entries. A new call goes after the newest one and a full window after the oldest.
    local calls = redis.call('LRANGE', key, 0, b - 1)
    local live = {}
    for _, v in ipairs(calls) do
      if tonumber(v) > now - a then live[#live + 1] = tonumber(v) end
    end
    if #live > 0 then later(live[1] - now, i) end
    if #live >= b then later(live[b] + a - now, i) end
  end
end
if wait > max_wait then return {0, wait, 0, which} end
local at = now + wait
local result = {1, wait, 0, which}
for i, key in ipairs(KEYS) do
  local kind, a, b = ARGV[3 * i - 1], tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
  if kind == 'p' then
    local new_tat = math.max(seen[i], at) + a
    redis.call('SET', key, string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
    if i == 1 then result[3] = math.floor((b + a - (new_tat - at)) / a) end
    result[4 + i] = string.format('%.0f', new_tat)
  else
    local call = string.format('%.0f', at)
    redis.call('LPUSH', key, call)
    redis.call('LTRIM', key, 0, b - 1)
    redis.call('PEXPIRE', key, math.ceil((at + a - now) / 1000) + 1000)
    result[4 + i] = call
  end
end
return result
"#;

/// Gives back the slots of a caller that hung up before its turn. A pace is rolled back only where nobody has
/// reserved after it; a window simply loses the call. KEYS: the gates; ARGV: per gate its kind, the value the
/// reservation returned for it, and its emission interval (µs; unused for a window).
const RELEASE: &str = r#"
for i, key in ipairs(KEYS) do
  local kind, value, emission = ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i]
  if kind == 'p' then
    if redis.call('GET', key) == value then
      redis.call('SET', key, string.format('%.0f', tonumber(value) - tonumber(emission)), 'KEEPTTL')
    end
  else
    redis.call('LREM', key, 1, value)
  end
end
return 1
"#;

/// One gate of a request: its Redis key and its limit.
pub enum Gate {
    /// A per-second limit as GCRA: the emission interval and tolerance of the local `Pace`.
    Pace { key: String, emission: Duration, tolerance: Duration },
    /// At most `limit` calls in any `window`.
    Window { key: String, window: Duration, limit: NonZeroU32 },
}

impl Gate {
    fn key(&self) -> &str {
        match self {
            Gate::Pace { key, .. } | Gate::Window { key, .. } => key,
        }
    }

    /// The script's arguments for this gate: its kind and two numbers.
    fn args(&self) -> (&'static str, u64, u64) {
        match self {
            Gate::Pace { emission, tolerance, .. } => ("p", micros(*emission), micros(*tolerance)),
            Gate::Window { window, limit, .. } => ("w", micros(*window), u64::from(limit.get())),
        }
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros() as u64
}

pub enum Reservation {
    /// Go after `wait`; `remaining` is the first gate's calls left at once.
    Admitted { wait: Duration, remaining: u32, release: Release },
    /// `gate` (an index into the gates) has no room within the acceptable wait.
    Refused { retry_after: Duration, gate: usize },
}

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

pub struct SharedQuota {
    connection: Connection,
    reserve: redis::Script,
    release: redis::Script,
    prefix: String,
    timeout: Duration,
    standing: Mutex<Standing>,
    last_probe: Mutex<Option<Instant>>,
    metrics: Metrics,
}

/// Which quota a replica's calls take, at a moment: see [`Standing::phase`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Redis answers: it alone decides.
    Shared,
    /// Redis answers again, but other replicas may still send calls that only their share granted: a call takes a
    /// slot in this replica's share and one in Redis.
    Returning,
    /// Redis alone for the per-second limits; but for a user window's length after the return, the windows hold
    /// calls only the replicas' shares counted, so a user's call takes a place in this replica's share as well.
    UsersReturning,
    /// Redis failed when it was found down at `since`: this replica's share alone, and none of it before the calls
    /// Redis granted (up to `max_wait` ahead, to any replica) have gone out.
    Fallback { since: Instant },
}

/// This replica's standing with Redis: whether it answers, and when that last changed.
#[derive(Debug)]
pub struct Standing {
    answers: bool,
    since: Option<Instant>,
}

impl Standing {
    pub fn new() -> Standing {
        Standing { answers: true, since: None }
    }

    /// Redis failed, found at `at`; true if it was answering until then.
    pub fn lost(&mut self, at: Instant) -> bool {
        let switched = self.answers;
        if switched {
            (self.answers, self.since) = (false, Some(at));
        }
        switched
    }

    /// Redis answered at `at`; true if it was failing until then.
    pub fn regained(&mut self, at: Instant) -> bool {
        let switched = !self.answers;
        if switched {
            (self.answers, self.since) = (true, Some(at));
        }
        switched
    }

    /// The phase at `now`. `settle`: after Redis answers again, how long other replicas may still send calls their
    /// share alone granted (they notice the return within a probe interval and a Redis timeout, and their queued
    /// calls leave within `max_wait`); the users' windows take `user_window` more.
    pub fn phase(&self, now: Instant, settle: Duration, user_window: Duration) -> Phase {
        let back_for = |since: Instant| now.saturating_duration_since(since);
        match (self.answers, self.since) {
            (false, since) => Phase::Fallback { since: since.unwrap_or(now) },
            (true, Some(since)) if back_for(since) < settle => Phase::Returning,
            (true, Some(since)) if back_for(since) < settle + user_window => Phase::UsersReturning,
            (true, _) => Phase::Shared,
        }
    }
}

impl SharedQuota {
    pub fn new(config: &RedisConfig, metrics: Metrics) -> Result<SharedQuota, redis::RedisError> {
        let patience =
            Patience { connect: config.timeout, response: config.timeout, retries: 1, max_delay: PROBE_INTERVAL };
        let connection = crate::redis_conn::connect(config, patience)?;
        metrics.rate_limit_backend_fallback.set(0);
        Ok(SharedQuota {
            connection,
            reserve: redis::Script::new(RESERVE),
            release: redis::Script::new(RELEASE),
            prefix: config.key_prefix.clone(),
            timeout: config.timeout,
            standing: Mutex::new(Standing::new()),
            last_probe: Mutex::new(None),
            metrics,
        })
    }

    /// `{prefix}:{org#app}:{name}`, in the app's slot with its jobs ([`crate::redis_conn::app_keys`]).
    pub fn key(&self, app: &str, name: &str) -> String {
        format!("{}:{name}", crate::redis_conn::app_keys(&self.prefix, app))
    }

    /// Which quota calls take now, for requests that wait at most `max_wait`.
    pub fn phase(&self, max_wait: Duration) -> Phase {
        let settle = PROBE_INTERVAL + self.timeout + max_wait;
        self.standing.lock().expect("standing lock").phase(Instant::now(), settle, guarded(super::decision::MINUTE))
    }

    /// Whether to ask Redis now: always while it answers, once per probe interval while it does not.
    pub fn should_try(&self) -> bool {
        if !matches!(self.phase(Duration::ZERO), Phase::Fallback { .. }) {
            return true;
        }
        let mut last = self.last_probe.lock().expect("probe lock");
        let due = last.is_none_or(|t| t.elapsed() >= PROBE_INTERVAL);
        if due {
            *last = Some(Instant::now());
        }
        due
    }

    /// Reserves a slot in every gate (or none), waiting at most `max_wait` for it.
    pub async fn reserve(&self, gates: &[Gate], max_wait: Duration) -> Result<Reservation, SharedError> {
        let mut invocation = self.reserve.prepare_invoke();
        invocation.arg(micros(max_wait));
        for gate in gates {
            let (kind, a, b) = gate.args();
            invocation.key(gate.key()).arg(kind).arg(a).arg(b);
        }
        let mut connection = self.connection.clone();
        let answer: Result<Vec<redis::Value>, _> =
            match tokio::time::timeout(self.timeout, invocation.invoke_async(&mut connection)).await {
                Ok(answer) => answer,
                Err(_) => return Err(self.down(SharedError::Timeout(self.timeout))),
            };
        let answer = answer.map_err(|e| self.down(SharedError::Redis(e)))?;
        self.up();
        let text = |i: usize| -> Option<String> {
            match answer.get(i)? {
                redis::Value::Int(n) => Some(n.to_string()),
                redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
                _ => None,
            }
        };
        let int = |i: usize| -> i64 { text(i).and_then(|s| s.parse().ok()).unwrap_or(0) };
        let wait = Duration::from_micros(int(1).max(0) as u64);
        if int(0) == 0 {
            let gate = (int(3).max(1) as usize - 1).min(gates.len() - 1);
            return Ok(Reservation::Refused { retry_after: wait, gate });
        }
        let release = Release {
            keys: gates.iter().map(|g| g.key().to_owned()).collect(),
            args: gates
                .iter()
                .enumerate()
                .flat_map(|(i, gate)| {
                    let (kind, a, _) = gate.args();
                    [kind.to_owned(), text(4 + i).unwrap_or_default(), a.to_string()]
                })
                .collect(),
            connection: self.connection.clone(),
            script: self.release.clone(),
            armed: !wait.is_zero(),
        };
        Ok(Reservation::Admitted { wait, remaining: int(2).max(0) as u32, release })
    }

    /// The calls each window in `keys` holds (its newest `limit`), as instants of this process's clock (Redis
    /// keeps them on its own). Read for an estimate: a failure here changes nothing else.
    pub async fn window_calls(&self, keys: &[String], limit: u32) -> Result<Vec<Vec<Instant>>, SharedError> {
        let mut pipe = redis::pipe();
        pipe.cmd("TIME");
        for key in keys {
            pipe.lrange(key, 0, limit as isize - 1);
        }
        let mut connection = self.connection.clone();
        let answer = tokio::time::timeout(self.timeout, pipe.query_async::<Vec<redis::Value>>(&mut connection))
            .await
            .map_err(|_| SharedError::Timeout(self.timeout))??;
        let now = Instant::now();
        fn parse<T: redis::FromRedisValue>(value: redis::Value) -> Result<T, SharedError> {
            redis::from_redis_value(value).map_err(|e| SharedError::Redis(e.into()))
        }
        let mut answer = answer.into_iter();
        let (secs, micros): (i64, i64) = parse(answer.next().unwrap_or(redis::Value::Nil))?;
        let redis_now = secs * 1_000_000 + micros;
        let at = |call: i64| match call - redis_now {
            ahead if ahead >= 0 => now + Duration::from_micros(ahead as u64),
            ago => now.checked_sub(Duration::from_micros(ago.unsigned_abs())).unwrap_or(now),
        };
        answer.map(|calls| Ok(parse::<Vec<i64>>(calls)?.into_iter().map(at).collect())).collect()
    }

    fn down(&self, error: SharedError) -> SharedError {
        if self.standing.lock().expect("standing lock").lost(Instant::now()) {
            *self.last_probe.lock().expect("probe lock") = Some(Instant::now());
            self.metrics.rate_limit_backend_fallback.set(1);
            warn!(error = %error, "redis unavailable: enforcing this replica's share of the quota locally");
        }
        error
    }

    fn up(&self) {
        if self.standing.lock().expect("standing lock").regained(Instant::now()) {
            self.metrics.rate_limit_backend_fallback.set(0);
            info!("redis answers again: back to the shared quota");
        }
    }
}

/// Slots reserved for a caller that is still waiting: given back if it hangs up before its turn.
pub struct Release {
    keys: Vec<String>,
    args: Vec<String>,
    connection: Connection,
    script: redis::Script,
    armed: bool,
}

impl Release {
    /// The caller's turn came: the slots are used.
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (keys, args, mut connection, script) = (
            std::mem::take(&mut self.keys),
            std::mem::take(&mut self.args),
            self.connection.clone(),
            self.script.clone(),
        );
        tokio::spawn(async move {
            let mut invocation = script.prepare_invoke();
            for key in &keys {
                invocation.key(key);
            }
            for arg in &args {
                invocation.arg(arg);
            }
            let _: Result<i64, _> = invocation.invoke_async(&mut connection).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_switches_are_timed_from_the_loss_and_from_the_return() {
        let settle = Duration::from_secs(3);
        const USERS: Duration = Duration::from_secs(60);
        let mut standing = Standing::new();
        assert_eq!(standing.phase(Instant::now(), settle, USERS), Phase::Shared, "never lost: nothing to settle");
        let lost = Instant::now();
        assert!(standing.lost(lost));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(!standing.lost(Instant::now()), "a later failure belongs to the same outage");
        assert_eq!(standing.phase(Instant::now(), settle, USERS), Phase::Fallback { since: lost });
        tokio::time::advance(Duration::from_secs(15)).await;
        assert!(standing.regained(Instant::now()));
        assert!(!standing.regained(Instant::now()), "one return");
        tokio::time::advance(Duration::from_millis(2999)).await;
        assert_eq!(
            standing.phase(Instant::now(), settle, USERS),
            Phase::Returning,
            "other replicas' shares may still send"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(standing.phase(Instant::now(), settle, USERS), Phase::UsersReturning, "calls the shares counted");
        tokio::time::advance(USERS).await;
        assert_eq!(standing.phase(Instant::now(), settle, USERS), Phase::Shared);
    }
}
