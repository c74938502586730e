//! `[rate_limit]`: Easemob's quota as the gateway enforces it (limits, backend, Redis), and its checks.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::duration;
use super::secret::trimmed_secret;

/// A per-second quota: `rate` calls in any one-second window, `burst` of them at once (a burst above 1 lets up to
/// `burst - 1` more through one window).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    pub rate: NonZeroU32,
    #[serde(default = "defaults::burst")]
    pub burst: NonZeroU32,
}

impl Limit {
    /// This limit's share for one of `replicas`: rate and burst each divided, never below 1.
    pub fn divided(self, replicas: u32) -> Limit {
        Limit { rate: divided(self.rate, replicas), burst: divided(self.burst, replicas) }
    }
}

/// Keys that moved, and where: a config still using one is refused with a line naming the new key.
pub(super) const MOVED: [(&str, &str); 1] =
    [("rate_limit.redis.expected_replicas", "rate_limit.replicas (one setting for the local and the Redis backend)")];

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// `local`: each replica enforces its share of the quota (`replicas`); `redis`: all replicas share one quota.
    pub backend: RateLimitBackend,
    /// How long a request over quota may wait for its slot, in arrival order; `0s` refuses at once.
    #[serde(with = "duration")]
    pub max_wait: Duration,
    /// Per AppKey and route: Easemob's published default.
    pub route: Limit,
    /// Overrides by route name (paid packs raise a route's limit).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub routes: BTreeMap<String, Limit>,
    /// An optional cap per AppKey across all routes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app: Option<Limit>,
    /// `delete_conversation` calls per user and minute (Easemob's per-user limit); user IDs compare case-insensitively.
    pub user_conversation_per_minute: NonZeroU32,
    /// On Easemob's own 429, halve the route's local rate and recover it slowly.
    pub adaptive: bool,
    /// The most of each route's rate (and of the app cap) deletion jobs may use, from 0 to 1. Direct calls go
    /// first whatever it is: a job never takes a slot while a direct call waits for one.
    pub jobs_share: f64,
    /// How many replicas share the AppKeys. Each enforces every limit divided by this (rounded down, at least 1):
    /// always with the local backend, and while Redis is unreachable with the Redis one.
    pub replicas: NonZeroU32,
    pub redis: RedisConfig,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            backend: RateLimitBackend::Local,
            // A burst of a route's own quota needs about a second to pass at the quota's pace; half a second more
            // absorbs timer slack. Still short against a caller's own timeouts.
            max_wait: Duration::from_millis(1500),
            route: Limit { rate: NonZeroU32::new(100).expect("non-zero"), burst: defaults::burst() },
            routes: BTreeMap::new(),
            app: None,
            user_conversation_per_minute: NonZeroU32::new(5).expect("non-zero"),
            adaptive: true,
            jobs_share: 1.0,
            // One gateway enforces the whole quota; a deployment of several says how many.
            replicas: NonZeroU32::MIN,
            redis: RedisConfig::default(),
        }
    }
}

impl RateLimitConfig {
    /// The limit of `route` (by name), with its override if any.
    pub fn route_limit(&self, route: &str) -> Limit {
        self.routes.get(route).copied().unwrap_or(self.route)
    }

    /// The limits one replica enforces on its own: every Easemob limit divided by `replicas`, so that the replicas
    /// together never exceed it.
    pub fn per_replica(&self) -> RateLimitConfig {
        let n = self.replicas.get();
        RateLimitConfig {
            route: self.route.divided(n),
            routes: self.routes.iter().map(|(name, limit)| (name.clone(), limit.divided(n))).collect(),
            app: self.app.map(|cap| cap.divided(n)),
            user_conversation_per_minute: divided(self.user_conversation_per_minute, n),
            ..self.clone()
        }
    }

    /// What `check-config` adds below the effective config: the limits each replica enforces, as TOML comments.
    pub fn per_replica_note(&self) -> String {
        let mine = self.per_replica();
        let when = match self.backend {
            RateLimitBackend::Local => "",
            RateLimitBackend::Redis => " while Redis is unreachable",
        };
        let mut note = format!(
            "\n# Each of rate_limit.replicas = {} enforces{when} (every limit divided by the replicas, at least 1):\n",
            self.replicas
        );
        let limit = |l: Limit| format!("{} calls/s, burst {}", l.rate, l.burst);
        note.push_str(&format!("#   route: {}\n", limit(mine.route)));
        for (name, l) in &mine.routes {
            note.push_str(&format!("#   routes.{name}: {}\n", limit(*l)));
        }
        if let Some(cap) = mine.app {
            note.push_str(&format!("#   app: {}\n", limit(cap)));
        }
        note.push_str(&format!("#   user_conversation_per_minute: {}\n", mine.user_conversation_per_minute));
        note
    }
}

/// `n` divided among `replicas`, rounding down, never below 1: a replica's share must never be "unlimited" (0).
fn divided(n: NonZeroU32, replicas: u32) -> NonZeroU32 {
    NonZeroU32::new(n.get() / replicas).unwrap_or(NonZeroU32::MIN)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitBackend {
    #[default]
    Local,
    Redis,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://host:port[/db]`, or `rediss://…` for TLS (a managed Redis); never with a password in it. In a
    /// cluster, one node (or the service's configuration endpoint) the others are found from.
    pub url: String,
    /// The URL leads to a Redis Cluster (cluster mode enabled): keys are spread across its shards by AppKey.
    pub cluster: bool,
    /// The ACL user, when the Redis has users (Redis 6+); absent: the default user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Name of the environment variable holding the password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// File holding the password (trailing newline ignored), e.g. a mounted Kubernetes Secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Extra PEM roots for `rediss://` (a private CA), in place of the built-in webpki roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Every Redis call must answer within this, or the replica falls back to its local share.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Keys are `{key_prefix}:{{org#app}}:{route}` (and `:app`, `:user:{id}`); the braces are a Redis Cluster hash tag.
    pub key_prefix: String,
}

impl RedisConfig {
    /// The password, from `password_env` or `password_file`; `None` when neither is set.
    pub fn password(&self) -> Result<Option<SecretString>, String> {
        let secret = |value: String, from: String| {
            trimmed_secret(&value).map(Some).ok_or_else(|| format!("rate_limit.redis: {from} is empty"))
        };
        match (&self.password_env, &self.password_file) {
            (None, None) => Ok(None),
            (Some(var), None) => match std::env::var(var) {
                Ok(value) => secret(value, format!("password_env {var}")),
                Err(_) => Err(format!("rate_limit.redis.password_env: the environment variable {var} is not set")),
            },
            (None, Some(path)) => match std::fs::read_to_string(path) {
                Ok(value) => secret(value, format!("password_file {}", path.display())),
                Err(e) => Err(format!("rate_limit.redis.password_file {} cannot be read: {e}", path.display())),
            },
            (Some(_), Some(_)) => Err("rate_limit.redis: set password_env or password_file, not both".to_owned()),
        }
    }

    /// What is wrong with this Redis's settings, one line each.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let tls = self.url.starts_with("rediss://");
        if !(tls || self.url.starts_with("redis://")) {
            problems.push("rate_limit.redis.url must start with redis:// or rediss:// (TLS)".to_owned());
        }
        let authority = self.url.split("://").nth(1).unwrap_or_default().split('/').next().unwrap_or_default();
        if authority.contains('@') {
            problems.push(
                "rate_limit.redis.url must not hold credentials: set username, and password_env or password_file"
                    .to_owned(),
            );
        }
        if let Err(e) = self.password() {
            problems.push(e);
        }
        let database = authority_rest(&self.url).trim_matches('/');
        if self.cluster && !matches!(database, "" | "0") {
            problems.push("rate_limit.redis.url: a Redis Cluster has only database 0".to_owned());
        }
        match &self.ca_file {
            Some(_) if !tls => problems.push("rate_limit.redis.ca_file is for rediss:// (TLS) URLs".to_owned()),
            Some(path) if std::fs::metadata(path).is_err() => {
                problems.push(format!("rate_limit.redis.ca_file {} cannot be read", path.display()))
            }
            _ => {}
        }
        problems
    }
}

/// What follows the URL's host and port: the database, if any.
fn authority_rest(url: &str) -> &str {
    let rest = url.split("://").nth(1).unwrap_or_default();
    rest.find('/').map_or("", |at| &rest[at..])
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".to_owned(),
            cluster: false,
            username: None,
            password_env: None,
            password_file: None,
            ca_file: None,
            timeout: Duration::from_millis(50),
            key_prefix: "easemob-gateway".to_owned(),
        }
    }
}

impl RateLimitConfig {
    /// What is wrong with these settings, one line each (with the Redis backend, its password and CA files are
    /// read).
    pub(super) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for name in self.routes.keys() {
            if crate::routes::Route::named(name).is_none() {
                problems.push(format!("rate_limit.routes.{name}: no such route"));
            }
        }
        if self.backend == RateLimitBackend::Redis {
            problems.extend(self.redis.problems());
        }
        let share = self.jobs_share;
        if !(share > 0.0 && share <= 1.0) {
            problems.push(format!("rate_limit.jobs_share {share} must be above 0 and at most 1"));
        }
        problems
    }
}

mod defaults {
    use std::num::NonZeroU32;

    /// No burst above the rate: GCRA then lets through at most `rate` calls in any one-second window, which is
    /// what Easemob counts, so its own 429 never reaches a caller.
    pub fn burst() -> NonZeroU32 {
        NonZeroU32::MIN
    }
}
