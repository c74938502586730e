//! The shared quota: every replica draws from one GCRA per key in Redis, through one atomic Lua script that
//! uses Redis's own clock (`TIME`), so clock skew between replicas does not matter. Calls have a tight timeout;
//! while Redis is slow or down, each replica falls back to a local limiter at its share of the quota, and
//! probes Redis once a second to return to it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::RedisConfig;
use crate::metrics::Metrics;

/// While in fallback, Redis is tried again at most this often, so requests do not each pay its timeout.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Reserves one slot in every gate, or none. KEYS: the gates. ARGV[1]: the longest acceptable wait (µs); then
/// per gate its emission interval and tolerance (µs). Returns {admitted, wait µs, remaining burst, new TATs…}.
const RESERVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local max_wait = tonumber(ARGV[1])
local tats, wait = {}, 0
for i, key in ipairs(KEYS) do
  local tau = tonumber(ARGV[2 * i + 1])
  local stored = redis.call('GET', key)
  local tat = now
  if stored then tat = math.max(tonumber(stored), now) end
  tats[i] = tat
  wait = math.max(wait, tat - tau - now)
end
if wait > max_wait then return {0, wait, 0} end
local at = now + wait
local result = {1, wait, 0}
for i, key in ipairs(KEYS) do
  local emission, tau = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local new_tat = math.max(tats[i], at) + emission
  redis.call('SET', key, string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
  if i == 1 then result[3] = math.floor((tau + emission - (new_tat - at)) / emission) end
  result[3 + i] = string.format('%.0f', new_tat)
end
return result
"#;

/// Gives back slots reserved by a caller that hung up before its turn, where nobody has reserved after it.
/// KEYS: the gates; ARGV: per gate the TAT it set and its emission interval.
const RELEASE: &str = r#"
for i, key in ipairs(KEYS) do
  local stored = redis.call('GET', key)
  if stored == ARGV[2 * i - 1] then
    local previous = tonumber(ARGV[2 * i - 1]) - tonumber(ARGV[2 * i])
    redis.call('SET', key, string.format('%.0f', previous), 'KEEPTTL')
  end
end
return 1
"#;

/// One gate of a request: its Redis key and GCRA parameters.
pub struct Gate {
    pub key: String,
    pub emission: Duration,
    pub tolerance: Duration,
}

pub enum Reservation {
    /// Go after `wait`; `remaining` is the first gate's burst left.
    Admitted {
        wait: Duration,
        remaining: u32,
        release: Release,
    },
    Refused {
        retry_after: Duration,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

pub struct SharedQuota {
    connection: ConnectionManager,
    reserve: redis::Script,
    release: redis::Script,
    prefix: String,
    timeout: Duration,
    healthy: AtomicBool,
    last_probe: Mutex<Option<Instant>>,
    metrics: Metrics,
}

impl SharedQuota {
    pub fn new(config: &RedisConfig, metrics: Metrics) -> Result<SharedQuota, String> {
        let client = redis::Client::open(config.url.as_str()).map_err(|e| format!("rate_limit.redis.url: {e}"))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(PROBE_INTERVAL);
        let connection = ConnectionManager::new_lazy_with_config(client, manager_config)
            .map_err(|e| format!("rate_limit.redis: {e}"))?;
        metrics.rate_limit_backend_fallback.set(0);
        Ok(SharedQuota {
            connection,
            reserve: redis::Script::new(RESERVE),
            release: redis::Script::new(RELEASE),
            prefix: config.key_prefix.clone(),
            timeout: config.timeout,
            healthy: AtomicBool::new(true),
            last_probe: Mutex::new(None),
            metrics,
        })
    }

    /// `{prefix}:{org#app}:{name}`: the braces keep one app's keys in one Redis Cluster slot, as a multi-key
    /// script requires.
    pub fn key(&self, app: &str, name: &str) -> String {
        format!("{}:{{{app}}}:{name}", self.prefix)
    }

    /// Whether to ask Redis now: always while it is healthy, once per probe interval while it is not.
    pub fn should_try(&self) -> bool {
        if self.healthy.load(Ordering::Relaxed) {
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
        invocation.arg(max_wait.as_micros() as u64);
        for gate in gates {
            invocation.key(&gate.key).arg(gate.emission.as_micros() as u64).arg(gate.tolerance.as_micros() as u64);
        }
        let mut connection = self.connection.clone();
        let answer: Result<Vec<redis::Value>, _> =
            match tokio::time::timeout(self.timeout, invocation.invoke_async(&mut connection)).await {
                Ok(answer) => answer,
                Err(_) => return Err(self.down(SharedError::Timeout(self.timeout))),
            };
        let answer = answer.map_err(|e| self.down(SharedError::Redis(e)))?;
        self.up();
        let int = |i: usize| -> i64 {
            match answer.get(i) {
                Some(redis::Value::Int(n)) => *n,
                Some(redis::Value::BulkString(b)) => {
                    std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()).unwrap_or(0)
                }
                _ => 0,
            }
        };
        let wait = Duration::from_micros(int(1).max(0) as u64);
        if int(0) == 0 {
            return Ok(Reservation::Refused { retry_after: wait });
        }
        let release = Release {
            keys: gates.iter().map(|g| g.key.clone()).collect(),
            args: gates
                .iter()
                .enumerate()
                .flat_map(|(i, g)| [int(3 + i).to_string(), g.emission.as_micros().to_string()])
                .collect(),
            connection: self.connection.clone(),
            script: self.release.clone(),
            armed: !wait.is_zero(),
        };
        Ok(Reservation::Admitted { wait, remaining: int(2).max(0) as u32, release })
    }

    fn down(&self, error: SharedError) -> SharedError {
        if self.healthy.swap(false, Ordering::Relaxed) {
            *self.last_probe.lock().expect("probe lock") = Some(Instant::now());
            self.metrics.rate_limit_backend_fallback.set(1);
            warn!(error = %error, "redis unavailable: enforcing this replica's share of the quota locally");
        }
        error
    }

    fn up(&self) {
        if !self.healthy.swap(true, Ordering::Relaxed) {
            self.metrics.rate_limit_backend_fallback.set(0);
            info!("redis answers again: back to the shared quota");
        }
    }
}

/// Slots reserved for a caller that is still waiting: given back if it hangs up before its turn.
pub struct Release {
    keys: Vec<String>,
    args: Vec<String>,
    connection: ConnectionManager,
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
