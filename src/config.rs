//! Typed configuration: a TOML file overridden by `EASEMOB_GW__…` environment variables, parsed once with the
//! `config` crate into the types below, then checked as a whole so every problem is reported on its own line.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderValue, Uri};
use secrecy::SecretString;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Environment variables with this prefix override file keys: `EASEMOB_GW__UPSTREAM__BASE_URL`.
pub const ENV_PREFIX: &str = "EASEMOB_GW";
const ENV_SEPARATOR: &str = "__";
/// Keys that moved, and where: a config still using one is refused with a line naming the new key.
const MOVED: [(&str, &str); 2] = [
    ("rate_limit.redis.expected_replicas", "rate_limit.replicas (one setting for the local and the Redis backend)"),
    ("token.secret_file_poll", "server.reload_poll (it watches the config file and every client_secret_file)"),
];

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub token: TokenConfig,
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub trace: TraceConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub jobs: JobsConfig,
    /// Callers known by key: when any is configured, every request must present one in `X-Gateway-Key`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub callers: Vec<CallerConfig>,
    #[serde(default)]
    pub apps: Vec<AppConfig>,
    /// The values as the file and the environment wrote them, so the effective config shows durations as written.
    #[serde(skip)]
    pub written: Written,
}

/// The values a config was read from, kept only to print durations as written; never printed themselves.
#[derive(Clone, Default)]
pub struct Written(Option<toml::Value>);

impl fmt::Debug for Written {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Written(..)")
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CallerConfig {
    /// Recorded as the caller in the audit trail.
    pub name: String,
    /// SHA-256 of the caller's key, in hex (`easemob-gateway hash-key` prints it): the key itself is never stored.
    pub key_sha256: String,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Append-only JSON-lines file with one event per deletion sent to Easemob; absent: no audit trail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// Also fsync each event before answering (survives a power loss; costs a disk flush per deletion).
    pub fsync: bool,
    /// Recorded as the caller when a request has no usable `X-Caller` header (e.g. the service's name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_caller: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Deletion jobs: the jobs API and `Prefer: respond-async`. Off: neither (calls are answered as always).
    pub enabled: bool,
    /// With the local quota backend, the jobs' store: a SQLite file, created if missing (keep it on a persistent
    /// volume). With `rate_limit.backend = "redis"` jobs live in that Redis, shared by every replica.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<PathBuf>,
    /// How long a replica may hold an operation it claimed from the shared (Redis) queue; past it, another
    /// replica takes the operation over. More than twice one attempt (`upstream.timeout` and a token wait): an
    /// operation may wait half its lease before it is sent.
    #[serde(with = "duration")]
    pub lease: Duration,
    /// Operations one job may hold (after splitting long message ID lists).
    pub max_operations: usize,
    /// The largest request that creates a job, in bytes; absent: derived from `max_operations`
    /// ([`JobsConfig::max_body_bytes`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<usize>,
    /// Job operations in flight to Easemob at once, across all jobs.
    pub concurrency: usize,
    /// Attempts per operation before it fails with its last answer.
    pub max_attempts: u32,
    /// The first retry delay after a 429, 5xx, timeout or connection error; doubles (with jitter) up to
    /// `retry_max`. Easemob's `Retry-After` wins when longer.
    #[serde(with = "duration")]
    pub retry_min: Duration,
    #[serde(with = "duration")]
    pub retry_max: Duration,
    /// Finished jobs are deleted this long after they finish, so the store cannot grow without bound.
    #[serde(with = "duration")]
    pub retention: Duration,
    /// Whether a failing jobs store makes `/readyz` answer 503. Off: direct deletions do not need the store, so a
    /// replica that can serve them stays in service; the failure shows in `/readyz`'s body, a metric and an alert.
    pub ready_requires_store: bool,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            enabled: false,
            store: None,
            lease: Duration::from_secs(60),
            max_operations: 100_000,
            max_body_bytes: None,
            // Enough to keep 100 calls/s per route going at Easemob's usual latency, with room for several routes.
            concurrency: 32,
            max_attempts: 10,
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            retention: Duration::from_secs(7 * 24 * 3600),
            // A store shared by every replica (Redis) fails for all of them at once: taking them all out of service
            // would stop the direct deletions that still work.
            ready_requires_store: false,
        }
    }
}

impl JobsConfig {
    /// Request bytes allowed per operation when `max_body_bytes` is derived: the largest operation on one user or
    /// conversation, IDs at their 64-character limit, is 238 bytes of compact JSON (a `delete_conversation` with its
    /// body). Jobs of longer message ID lists hold fewer operations.
    pub const BYTES_PER_OPERATION: usize = 256;
    /// The fewest bytes an operation can take (`{"method":"POST","path":"/rest/message/roaming/user/a/delete/all"}`
    /// is 66): a `max_body_bytes` below `max_operations` of these makes the operation cap unreachable.
    pub const MIN_OPERATION_BYTES: usize = 64;

    /// The largest request that creates a job: as set, or the largest valid job of `max_operations` operations and
    /// 64 KiB for the envelope and spacing.
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
            .unwrap_or_else(|| self.max_operations.saturating_mul(JobsConfig::BYTES_PER_OPERATION) + 64 * 1024)
    }
}

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
    /// `redis://host:port[/db]`, or `rediss://…` for TLS (a managed Redis); never with a password in it.
    pub url: String,
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

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".to_owned(),
            username: None,
            password_env: None,
            password_file: None,
            ca_file: None,
            timeout: Duration::from_millis(50),
            key_prefix: "easemob-gateway".to_owned(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The data plane. Loopback by default: callers present no credential.
    pub listen: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub admin_listen: SocketAddr,
    /// A client must finish sending request headers within this time (slow-loris guard).
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    /// A client must finish sending a request body (only `delete_conversation` has one) within this.
    #[serde(with = "duration")]
    pub body_read_timeout: Duration,
    /// Networks that may call the data plane; required when `listen` is not a loopback address.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_from: Vec<ipnet::IpNet>,
    /// Requests handled at once; more are answered 503 at once instead of queueing without bound.
    pub max_in_flight: usize,
    /// Client connections open at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// Data-plane threads, each serving its own connections start to finish; 0 = one per CPU the process may use.
    /// At most 256.
    pub workers: usize,
    /// How often the config file, and every `client_secret_file` it names, is checked for a change (Kubernetes
    /// updates a mounted ConfigMap or Secret in place); a change reloads the whole config, as SIGHUP does.
    /// `0s`: only on SIGHUP.
    #[serde(with = "duration")]
    pub reload_poll: Duration,
}

/// Far beyond any CPU count a sidecar gets; above it, a typo (threads are not free).
const MAX_WORKERS: usize = 256;

impl ServerConfig {
    /// `workers`, with 0 resolved to the CPUs this process may use (cgroup quotas included).
    pub fn worker_threads(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            allow_from: Vec::new(),
            // Far above what a 100/s quota with a 250 ms wait can keep busy; a bound, not a tuning knob.
            max_in_flight: 1024,
            max_connections: 4096,
            // Kubernetes' default terminationGracePeriodSeconds is 30 s; finish before it kills us.
            shutdown_grace: Duration::from_secs(25),
            workers: 0,
            reload_poll: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Easemob's REST host, e.g. `https://a1.easemob.com`; `/{org}/{app}/…` is appended.
    pub base_url: BaseUrl,
    #[serde(with = "duration", default = "defaults::connect_timeout")]
    pub connect_timeout: Duration,
    /// The whole exchange with Easemob (connect, send, complete answer), from the first send, retry included.
    #[serde(with = "duration", default = "defaults::timeout")]
    pub timeout: Duration,
    /// Extra PEM root certificates, for private deployments and tests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(with = "duration", default = "defaults::pool_idle_timeout")]
    pub pool_idle_timeout: Duration,
    #[serde(default = "defaults::pool_max_idle_per_host")]
    pub pool_max_idle_per_host: usize,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// Requested token lifetime, sent as `ttl`; absent means the console's setting. `0s` asks for a token that
    /// never expires.
    #[serde(with = "duration::option", skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
    /// Refresh once this fraction of the token's lifetime has passed.
    pub refresh_at: f64,
    /// How often a token that never expires (`expires_in: 0`) is replaced anyway.
    #[serde(with = "duration")]
    pub permanent_refresh: Duration,
    /// Never call the token endpoint more often than this per app: Easemob may ban accounts that do.
    #[serde(with = "duration")]
    pub min_interval: Duration,
    /// First retry delay after a failed fetch; doubles (with jitter) up to `retry_max`.
    #[serde(with = "duration")]
    pub retry_min: Duration,
    #[serde(with = "duration")]
    pub retry_max: Duration,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            ttl: None,
            refresh_at: 0.5,
            permanent_refresh: Duration::from_secs(24 * 3600),
            min_interval: Duration::from_secs(1),
            retry_min: Duration::from_millis(500),
            retry_max: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter such as `info` or `easemob_gateway=debug`; `RUST_LOG` wins when set.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".to_owned(), format: LogFormat::Text }
    }
}

/// Span export over OTLP: off unless `otlp_endpoint` is set.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceConfig {
    /// Where spans are sent: OTLP over HTTP with protobuf bodies, the whole URL (a collector's is usually
    /// `http://127.0.0.1:4318/v1/traces`). Absent: no spans are recorded or sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// The `service.name` the spans are exported under.
    pub service_name: String,
    /// The share of the traces the gateway starts (the caller sent no valid `traceparent`) whose spans are
    /// exported, from 0 to 1. A caller's trace follows the caller's own decision, its W3C `sampled` flag.
    pub sample_ratio: f64,
}

impl Default for TraceConfig {
    fn default() -> Self {
        // All of them, as OpenTelemetry's default sampler does: the gateway's own traffic is bounded by the quota,
        // and the export queue bounds the rest (refusal floods), counting what it drops.
        TraceConfig { otlp_endpoint: None, service_name: "easemob-gateway".to_owned(), sample_ratio: 1.0 }
    }
}

impl TraceConfig {
    /// What is wrong with these settings, one line each.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(endpoint) = &self.otlp_endpoint {
            match endpoint.parse::<Uri>() {
                Ok(uri) if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() => problems
                    .push(format!("trace.otlp_endpoint {endpoint:?} must be an http:// or https:// URL with a host")),
                // It is printed by check-config; a collector's credentials belong in OTEL_EXPORTER_OTLP_HEADERS.
                Ok(uri) if uri.authority().is_some_and(|a| a.as_str().contains('@')) || uri.query().is_some() => {
                    problems.push(
                        "trace.otlp_endpoint must hold no credentials or query: set headers (an API key) in \
                         OTEL_EXPORTER_OTLP_HEADERS"
                            .to_owned(),
                    )
                }
                Ok(_) => {}
                Err(e) => problems.push(format!("trace.otlp_endpoint {endpoint:?} is not a URL: {e}")),
            }
        }
        if self.service_name.trim().is_empty() {
            problems.push("trace.service_name is empty".to_owned());
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            problems.push(format!("trace.sample_ratio {} must be from 0 to 1", self.sample_ratio));
        }
        problems
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    pub org_name: String,
    pub app_name: String,
    pub client_id: String,
    /// Inline secret: accepted by `demo` only, never printed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<InlineSecret>,
    /// Name of the environment variable holding the secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_env: Option<String>,
    /// File holding the secret (trailing newline ignored), e.g. a mounted Kubernetes Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
}

impl AppConfig {
    /// Easemob's AppKey for this app.
    pub fn app_key(&self) -> AppKey {
        AppKey::new(&self.org_name, &self.app_name)
    }

    /// Reads the client secret from wherever it is configured.
    pub fn resolve_secret(&self) -> Result<SecretString, SecretError> {
        let app = self.app_key();
        match (&self.client_secret, &self.client_secret_env, &self.client_secret_file) {
            (Some(inline), None, None) => Ok(inline.0.clone()),
            (None, Some(var), None) => match std::env::var(var) {
                Ok(value) => trimmed_secret(&value).ok_or(SecretError::EmptyEnv { app, var: var.clone() }),
                Err(_) => Err(SecretError::UnsetEnv { app, var: var.clone() }),
            },
            (None, None, Some(path)) => match std::fs::read_to_string(path) {
                Ok(value) => trimmed_secret(&value).ok_or(SecretError::EmptyFile { app, path: path.clone() }),
                Err(source) => Err(SecretError::UnreadableFile { app, path: path.clone(), source }),
            },
            (None, None, None) => Err(SecretError::Missing { app }),
            _ => Err(SecretError::Ambiguous { app }),
        }
    }
}

/// An AppKey, `org_name#app_name`: how Easemob names an app, and the scope of every limit; the `app` label of
/// metrics, log lines and the audit trail.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AppKey(String);

impl AppKey {
    pub fn new(org: &str, app: &str) -> AppKey {
        AppKey(format!("{org}#{app}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AppKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why an app's client secret could not be read. Never holds the secret itself.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("apps[{app}]: environment variable {var} (client_secret_env) is empty")]
    EmptyEnv { app: AppKey, var: String },
    #[error("apps[{app}]: environment variable {var} (client_secret_env) is not set")]
    UnsetEnv { app: AppKey, var: String },
    #[error("apps[{app}]: client_secret_file {} is empty", path.display())]
    EmptyFile { app: AppKey, path: PathBuf },
    #[error("apps[{app}]: client_secret_file {} cannot be read: {source}", path.display())]
    UnreadableFile { app: AppKey, path: PathBuf, source: std::io::Error },
    #[error("apps[{app}]: no client secret: set client_secret_env or client_secret_file")]
    Missing { app: AppKey },
    #[error("apps[{app}]: set exactly one of client_secret_env, client_secret_file (and client_secret only in demo)")]
    Ambiguous { app: AppKey },
}

/// A SHA-256 digest of `parts`, each prefixed with its length (so that no two lists of parts digest alike): how a
/// reload tells that credentials or files changed without keeping them.
pub fn digest_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> [u8; 32] {
    use sha2::Digest;
    let mut digest = sha2::Sha256::new();
    for part in parts {
        digest.update((part.len() as u64).to_le_bytes());
        digest.update(part);
    }
    digest.finalize().into()
}

/// A secret as a variable or a file holds it, trailing newline and spaces trimmed; `None` if that leaves nothing.
fn trimmed_secret(value: &str) -> Option<SecretString> {
    let value = value.trim();
    (!value.is_empty()).then(|| SecretString::from(value.to_owned()))
}

/// A secret written in the config file: deserializes from a string, serializes and prints as `<redacted>`.
#[derive(Clone)]
pub struct InlineSecret(pub SecretString);

impl fmt::Debug for InlineSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl<'de> Deserialize<'de> for InlineSecret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| InlineSecret(SecretString::from(s)))
    }
}

impl Serialize for InlineSecret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// `http://` or `https://` plus a host (and optionally a path prefix), without a trailing slash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseUrl(String);

impl BaseUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let trimmed = s.trim_end_matches('/');
        let uri: Uri = trimmed.parse().map_err(|e| format!("upstream.base_url {s:?} is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(format!("upstream.base_url {s:?} must start with http:// or https://")),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("upstream.base_url {s:?} has no host"));
        }
        if uri.query().is_some() {
            return Err(format!("upstream.base_url {s:?} must not have a query"));
        }
        Ok(BaseUrl(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The `Host` header for this URL: the host, and the port unless it is the scheme's default.
    pub fn host_header(&self) -> HeaderValue {
        let uri: Uri = self.0.parse().expect("checked in parse");
        let host = uri.host().expect("checked in parse");
        let default_port = if uri.scheme_str() == Some("https") { 443 } else { 80 };
        let value = match uri.port_u16() {
            Some(port) if port != default_port => format!("{host}:{port}"),
            _ => host.to_owned(),
        };
        HeaderValue::from_str(&value).expect("a URI's host is a valid header value")
    }
}

impl<'de> Deserialize<'de> for BaseUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BaseUrl::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl Serialize for BaseUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Durations in the config: read as humantime reads them (`"1500ms"`, `"1s 500ms"`), printed by `format_duration`.
mod duration {
    use std::time::Duration;

    use serde::Serializer;

    pub use humantime_serde::deserialize;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::config::format_duration(*d))
    }

    pub mod option {
        use std::time::Duration;

        use serde::Serializer;

        pub use humantime_serde::deserialize;

        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_some(&crate::config::format_duration(*d)),
                None => s.serialize_none(),
            }
        }
    }
}

mod defaults {
    use std::num::NonZeroU32;
    use std::time::Duration;

    /// No burst above the rate: GCRA then lets through at most `rate` calls in any one-second window, which is
    /// what Easemob counts, so its own 429 never reaches a caller.
    pub fn burst() -> NonZeroU32 {
        NonZeroU32::MIN
    }

    pub fn connect_timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn timeout() -> Duration {
        Duration::from_secs(10)
    }
    /// Below common load-balancer idle timeouts (60 s) minus a margin, so we close before they do.
    pub fn pool_idle_timeout() -> Duration {
        Duration::from_secs(50)
    }
    pub fn pool_max_idle_per_host() -> usize {
        64
    }
}

/// Where the effective config holds a duration the sources wrote too, it takes the sources' spelling ("1500ms"
/// rather than "1s 500ms"). Only durations: a value is replaced only if both read as the same duration, so no
/// redacted value can come back.
fn durations_as_written(effective: &mut toml::Value, written: &toml::Value) {
    match (effective, written) {
        (toml::Value::Table(table), toml::Value::Table(sources)) => {
            for (key, value) in table.iter_mut() {
                if let Some(source) = sources.get(key) {
                    durations_as_written(value, source);
                }
            }
        }
        (toml::Value::Array(items), toml::Value::Array(sources)) => {
            for (item, source) in items.iter_mut().zip(sources) {
                durations_as_written(item, source);
            }
        }
        (toml::Value::String(shown), toml::Value::String(source)) => {
            let same = humantime::parse_duration(shown).ok().zip(humantime::parse_duration(source).ok());
            if same.is_some_and(|(a, b)| a == b) {
                *shown = source.clone();
            }
        }
        _ => {}
    }
}

/// A TOML syntax error with its line and the text it is about (`duplicate key` names the key).
fn toml_problem(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else { return one_line(e.message()) };
    let line = text[..span.start].matches('\n').count() + 1;
    let at = text.get(span).map(str::trim).filter(|t| !t.is_empty() && t.len() <= 80);
    match at {
        Some(at) => format!("line {line}: {} (at `{at}`)", one_line(e.message())),
        None => format!("line {line}: {}", one_line(e.message())),
    }
}

/// The `EASEMOB_GW__…` variable that set `key` (`upstream.timeout`), if `env` has one.
fn override_of(key: &str, env: &config::Map<String, String>) -> Option<String> {
    let var = format!("{ENV_PREFIX}{ENV_SEPARATOR}{}", key.to_ascii_uppercase().replace('.', ENV_SEPARATOR));
    env.contains_key(&var).then_some(var)
}

/// The merged values as TOML: the file's values keep their TOML types, and an override is the string the
/// environment holds (see `retype_override`). Nothing is coerced.
fn as_toml(value: config::Value) -> Option<toml::Value> {
    use config::ValueKind;
    Some(match value.kind {
        ValueKind::Nil => return None,
        ValueKind::Boolean(b) => toml::Value::Boolean(b),
        ValueKind::I64(n) => toml::Value::Integer(n),
        ValueKind::I128(n) => toml::Value::Integer(i64::try_from(n).ok()?),
        ValueKind::U64(n) => toml::Value::Integer(i64::try_from(n).ok()?),
        ValueKind::U128(n) => toml::Value::Integer(i64::try_from(n).ok()?),
        ValueKind::Float(x) => toml::Value::Float(x),
        ValueKind::String(s) => toml::Value::String(s),
        ValueKind::Table(table) => {
            toml::Value::Table(table.into_iter().filter_map(|(k, v)| Some((k, as_toml(v)?))).collect())
        }
        ValueKind::Array(items) => toml::Value::Array(items.into_iter().filter_map(as_toml).collect()),
    })
}

/// One step of a key as serde_path_to_error names it: `apps[0].client_id` is `apps`, `[0]`, `client_id`.
enum Step<'k> {
    Key(&'k str),
    Index(usize),
}

fn steps(key: &str) -> Vec<Step<'_>> {
    let mut steps = Vec::new();
    for part in key.split('.').filter(|p| !p.is_empty()) {
        let mut pieces = part.split('[');
        steps.extend(pieces.next().filter(|name| !name.is_empty()).map(Step::Key));
        steps.extend(pieces.filter_map(|i| i.trim_end_matches(']').parse().ok()).map(Step::Index));
    }
    steps
}

/// The value at `steps`, if there is one.
fn value_at<'v>(mut at: &'v mut toml::Value, steps: &[Step]) -> Option<&'v mut toml::Value> {
    for step in steps {
        at = match (at, step) {
            (toml::Value::Table(table), Step::Key(key)) => table.get_mut(*key)?,
            (toml::Value::Array(items), Step::Index(i)) => items.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(at)
}

/// Removes the value at `key`, so that its default stands in for it; false if there is none.
fn set_aside(values: &mut toml::Value, key: &str) -> bool {
    let steps = steps(key);
    let Some((last, parent)) = steps.split_last() else { return false };
    match (value_at(values, parent), last) {
        (Some(toml::Value::Table(table)), Step::Key(key)) => table.remove(*key).is_some(),
        (Some(toml::Value::Array(items)), Step::Index(i)) if *i < items.len() => {
            items.remove(*i);
            true
        }
        _ => false,
    }
}

/// An override is a string by nature; where its key takes another type it is read as a TOML value, so that
/// `2` is an integer and `2.5` a float (and refused where an integer is expected). False if it reads as no
/// other type.
fn retype_override(values: &mut toml::Value, key: &str) -> bool {
    let Some(value) = value_at(values, &steps(key)) else { return false };
    let toml::Value::String(text) = value else { return false };
    let read = toml::from_str::<toml::Table>(&format!("v = {text}")).ok().filter(|t| t.len() == 1);
    match read.and_then(|mut t| t.remove("v")) {
        Some(typed) if !typed.is_str() => {
            *value = typed;
            true
        }
        _ => false,
    }
}

/// Where a problem is (the file and the key, or the variable that overrode the key), then what it is.
fn located(file: &str, key: &str, var: Option<&str>, what: &str) -> String {
    match var {
        Some(var) => format!("{var} (overriding {key}): {what}"),
        None if key == "." => format!("{file}: {what}"),
        None => format!("{file}: {key}: {what}"),
    }
}

/// serde's `invalid type: floating point `2.5`, expected usize` as `expected an integer from 0, found a float
/// (2.5)`: TOML's names for what was found, plain words for what was expected, and for a duration, an address
/// or a size, the value to write instead, as the file or the variable `var` would hold it. `None` for other
/// messages (an unknown key, a bad URL).
fn type_problem(message: &str, key: &str, var: Option<&str>, found: &toml::Value) -> Option<String> {
    let expected = match message {
        // How std's address parsers refuse a string.
        "invalid socket address syntax" => "socket address",
        _ => {
            let rest = message.strip_prefix("invalid type: ").or_else(|| message.strip_prefix("invalid value: "))?;
            rest.rsplit_once(", expected ")?.1
        }
    };
    let expected = match expected {
        "usize" | "u64" | "u32" | "u16" | "u8" => "an integer from 0",
        e if e.starts_with("a nonzero u") => "an integer above 0",
        "isize" | "i64" | "i32" => "an integer",
        "f64" | "f32" => "a number",
        "socket address" => "a socket address",
        e if e.ends_with("network address") => "a network address in CIDR form",
        e if e.starts_with("struct ") || e == "a map" => "a table",
        // An enum's name (`rate_limit.backend`): the unknown-variant message lists the names.
        "string only" => "a string",
        "a sequence" => "an array",
        e => e,
    };
    // The literal is left out for a secret written inline: it may be the secret itself.
    let literal = match found {
        _ if key.ends_with("client_secret") => String::new(),
        toml::Value::String(s) => format!(" ({s:?})"),
        toml::Value::Table(_) | toml::Value::Array(_) => String::new(),
        other => format!(" ({other})"),
    };
    let found_type = match found {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date-time",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    };
    let write = match (example(key, expected, found), var) {
        (None, _) => String::new(),
        (Some(toml::Value::String(example)), Some(var)) => format!(": write {var}={example}"),
        (Some(example), Some(var)) => format!(": write {var}={example}"),
        (Some(example), None) => format!(": write {key} = {example}"),
    };
    Some(format!("expected {expected}, found {found_type}{literal}{write}"))
}

/// The value to write for a duration, an address or a size given in the wrong form: the one meant where it can
/// be told (`10` seconds, port `8080`, `"64MiB"`), else a sample of the form.
fn example(key: &str, expected: &str, found: &toml::Value) -> Option<toml::Value> {
    let number = match found {
        toml::Value::Integer(n) => Some(*n as f64),
        toml::Value::Float(x) => Some(*x),
        toml::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|n: &f64| n.is_finite() && *n >= 0.0);
    let example = match expected {
        "a duration" => {
            let duration = number.and_then(|n| Duration::try_from_secs_f64(n).ok()).unwrap_or(Duration::from_secs(10));
            toml::Value::String(format_duration(duration))
        }
        "a socket address" => {
            let port = number.filter(|n| n.fract() == 0.0 && *n <= f64::from(u16::MAX)).unwrap_or(8080.0);
            toml::Value::String(format!("127.0.0.1:{port}"))
        }
        e if e.starts_with("an integer") && key.ends_with("_bytes") => {
            let bytes = match found {
                toml::Value::String(s) => bytes_of(s),
                _ => number.map(|n| n.round() as u64),
            };
            toml::Value::Integer(bytes.unwrap_or(1024 * 1024) as i64)
        }
        _ => return None,
    };
    Some(example)
}

/// `64MiB`, `64MB`, `512KiB`: the bytes a size written with a unit means.
fn bytes_of(size: &str) -> Option<u64> {
    let size = size.trim();
    let digits = size.find(|c: char| !c.is_ascii_digit()).unwrap_or(size.len());
    let (number, unit) = size.split_at(digits);
    let unit: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1000 * 1000,
        "MiB" => 1 << 20,
        "GB" => 1000 * 1000 * 1000,
        "GiB" => 1 << 30,
        _ => return None,
    };
    number.parse::<u64>().ok()?.checked_mul(unit)
}

/// How the config prints a duration, everywhere: in the largest unit that holds it whole (`1500ms`, `5m`, `7d`),
/// as the configuration reference writes defaults; humantime reads each back.
pub fn format_duration(d: Duration) -> String {
    const UNITS: [(&str, u128); 7] = [
        ("d", 86_400_000_000_000),
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
        ("ns", 1),
    ];
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    let (unit, size) =
        UNITS.iter().find(|(_, size)| nanos.is_multiple_of(*size)).expect("a whole number of nanoseconds");
    format!("{}{unit}", nanos / size)
}

/// Parser errors span several lines (a source excerpt with a caret): keep the words, drop the excerpt.
fn one_line(message: &str) -> String {
    message.lines().map(str::trim).filter(|l| !l.is_empty() && !l.contains('|')).collect::<Vec<_>>().join(": ")
}

/// What reading a config file gave: the config, with the default of any key that did not fit in its place
/// (none when a required key did not fit), and the problems found so far, one line each.
pub struct Loaded {
    config: Option<Config>,
    problems: Vec<String>,
}

impl Loaded {
    /// The config, if every value fit its key; the checks of `Config::problems` are left to the caller.
    pub fn parsed(self) -> Result<Config, String> {
        match self.config {
            Some(config) if self.problems.is_empty() => Ok(config),
            _ => Err(self.problems.join("\n")),
        }
    }

    /// The config, if every value fit its key and it passes `Config::problems`; else every problem of both,
    /// one per line, in one run: a key that did not fit hides none of the other checks.
    pub fn checked(self, policy: SecretPolicy) -> Result<Config, String> {
        let mut problems = self.problems;
        if let Some(config) = &self.config {
            problems.extend(config.problems(policy));
        }
        match self.config {
            Some(config) if problems.is_empty() => Ok(config),
            _ => Err(problems.join("\n")),
        }
    }
}

/// Where secrets may come from: `demo` builds its config in code with an inline secret; files may not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretPolicy {
    InlineAllowed,
    ExternalOnly,
}

impl Config {
    /// Reads `path` (TOML) with the process's `EASEMOB_GW__…` overrides: the types only, as `Loaded::parsed`.
    pub fn load(path: &Path) -> Result<Config, String> {
        Config::read(path, std::env::vars()).parsed()
    }

    /// Reads `path` with the process's overrides and checks it in full, as `Loaded::checked`: what `serve`,
    /// `check-config` and a reload use.
    pub fn load_checked(path: &Path, policy: SecretPolicy) -> Result<Config, String> {
        Config::read(path, std::env::vars()).checked(policy)
    }

    /// Reads `path` (TOML), applies the `EASEMOB_GW__…` overrides among `env` and deserializes, strictly: a value
    /// of another TOML type than its key's is a problem (a float is no integer, a string no number or boolean),
    /// and an override is read by its key's type. Every such problem is reported, naming its key (or, for an
    /// override, the variable); the key's default stands in for it, so that the checks of `problems` still run.
    pub fn read(path: &Path, env: impl IntoIterator<Item = (String, String)>) -> Loaded {
        let file = path.display().to_string();
        let failed = |problem| Loaded { config: None, problems: vec![problem] };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => return failed(format!("{file}: {e}")),
        };
        if let Err(e) = toml::from_str::<toml::Table>(&text) {
            return failed(format!("{file}: {}", toml_problem(&text, &e)));
        }
        let env: config::Map<String, String> = env.into_iter().collect();
        let merged = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(config::Environment::with_prefix(ENV_PREFIX).separator(ENV_SEPARATOR).source(Some(env.clone())))
            .build()
            .and_then(|source| source.try_deserialize::<config::Value>());
        let mut values = match merged {
            Ok(merged) => as_toml(merged).unwrap_or_else(|| toml::Value::Table(toml::Table::new())),
            Err(e) => return failed(format!("{file}: {}", one_line(&e.to_string()))),
        };
        let mut problems = Vec::new();
        let mut set_aside_keys = Vec::new();
        let config = loop {
            let error = match serde_path_to_error::deserialize::<_, Config>(values.clone()) {
                Ok(config) => break Some(config),
                Err(error) => error,
            };
            let key = error.path().to_string();
            // The message alone: the error's `Display` adds the key, which the problem names itself.
            let message = one_line(error.into_inner().message());
            let message = match MOVED.iter().find(|(old, _)| *old == key) {
                Some((_, new)) => format!("moved: set {new}"),
                None => message,
            };
            let var = override_of(&key, &env);
            if var.is_some() && message.starts_with("invalid type: string") && retype_override(&mut values, &key) {
                continue;
            }
            if let Some(field) = message.strip_prefix("missing field `").and_then(|m| m.strip_suffix('`')) {
                // A required key set aside has been reported already.
                let missing = if key == "." { field.to_owned() } else { format!("{key}.{field}") };
                if !set_aside_keys.contains(&missing) {
                    problems.push(located(&file, &key, None, &message));
                }
                // Without a required key its table cannot be built: the table is set aside in turn (its default,
                // or an `[[apps]]` entry fewer, stands in) so that the other keys are still checked.
                if key == "." || !set_aside(&mut values, &key) {
                    break None;
                }
                set_aside_keys.push(key);
                continue;
            }
            let found = value_at(&mut values, &steps(&key)).cloned();
            let what = found.and_then(|found| type_problem(&message, &key, var.as_deref(), &found));
            problems.push(located(&file, &key, var.as_deref(), &what.unwrap_or(message)));
            if !set_aside(&mut values, &key) {
                break None;
            }
            set_aside_keys.push(key);
        };
        let config = config.map(|config| Config { written: Written(Some(values)), ..config });
        Loaded { config, problems }
    }

    /// Every problem with this config, one line each; empty when it can run.
    pub fn problems(&self, policy: SecretPolicy) -> Vec<String> {
        let mut problems = Vec::new();
        if self.apps.is_empty() {
            problems.push("apps: configure at least one [[apps]] entry".to_owned());
        }
        for (i, app) in self.apps.iter().enumerate() {
            for (field, value) in [("org_name", &app.org_name), ("app_name", &app.app_name)] {
                let ok = !value.is_empty()
                    && value.len() <= 64
                    && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if !ok {
                    problems.push(format!("apps[{i}].{field} {value:?} must be 1-64 characters of A-Z a-z 0-9 _ -"));
                }
            }
            if app.client_id.trim().is_empty() {
                problems.push(format!("apps[{}].client_id is empty", app.app_key()));
            }
            if app.client_secret.is_some() && policy == SecretPolicy::ExternalOnly {
                problems.push(format!(
                    "apps[{}].client_secret: inline secrets are for `demo` only; use client_secret_env or \
                     client_secret_file",
                    app.app_key()
                ));
            } else if let Err(e) = app.resolve_secret() {
                problems.push(e.to_string());
            }
            let duplicate = self.apps[..i].iter().any(|other| {
                other.org_name.eq_ignore_ascii_case(&app.org_name) && other.app_name.eq_ignore_ascii_case(&app.app_name)
            });
            if duplicate {
                problems.push(format!("apps[{i}]: {} is configured twice", app.app_key()));
            }
        }
        let t = &self.token;
        if !(t.refresh_at > 0.0 && t.refresh_at < 1.0) {
            problems.push(format!(
                "token.refresh_at {} must be between 0 and 1 (a fraction of the lifetime)",
                t.refresh_at
            ));
        }
        if t.retry_min.is_zero() || t.retry_max < t.retry_min {
            problems.push("token.retry_min must be above 0 and not above token.retry_max".to_owned());
        }
        if t.ttl.is_some_and(|ttl| !ttl.is_zero() && ttl < Duration::from_secs(1)) {
            problems
                .push("token.ttl must be 0s (never expires) or at least 1s: Easemob counts whole seconds".to_owned());
        }
        if t.permanent_refresh < Duration::from_secs(60) {
            problems.push("token.permanent_refresh must be at least 1m".to_owned());
        }
        let u = &self.upstream;
        for (name, d) in [("upstream.connect_timeout", u.connect_timeout), ("upstream.timeout", u.timeout)] {
            if d.is_zero() {
                problems.push(format!("{name} must be above 0"));
            }
        }
        if let Some(ca) = &u.ca_file
            && let Err(e) = std::fs::metadata(ca)
        {
            problems.push(format!("upstream.ca_file {} cannot be read: {e}", ca.display()));
        }
        for (name, d) in [
            ("server.header_read_timeout", self.server.header_read_timeout),
            ("server.body_read_timeout", self.server.body_read_timeout),
        ] {
            if d.is_zero() {
                problems.push(format!("{name} must be above 0"));
            }
        }
        if !self.server.listen.ip().is_loopback() && self.server.allow_from.is_empty() {
            problems.push(format!(
                "server.listen {} is not a loopback address and callers present no credential: set \
                 server.allow_from to the networks that may call it",
                self.server.listen
            ));
        }
        for (i, caller) in self.callers.iter().enumerate() {
            if !is_plain_label(&caller.name, 64) {
                problems.push(format!("callers[{i}].name must be 1-64 characters of A-Z a-z 0-9 - _ . :"));
            }
            if caller.key_sha256.len() != 64 || hex::decode(&caller.key_sha256).is_err() {
                problems.push(format!("callers[{i}].key_sha256 must be 64 hex digits (easemob-gateway hash-key)"));
            }
        }
        if self.server.max_in_flight == 0 || self.server.max_connections == 0 {
            problems.push("server.max_in_flight and server.max_connections must be above 0".to_owned());
        }
        if self.server.workers > MAX_WORKERS {
            problems.push(format!(
                "server.workers is {}; at most {MAX_WORKERS} (0: one per CPU the process may use)",
                self.server.workers
            ));
        }
        if self.server.listen == self.server.admin_listen && self.server.listen.port() != 0 {
            problems.push("server.listen and server.admin_listen must differ".to_owned());
        }
        for name in self.rate_limit.routes.keys() {
            if crate::routes::Route::named(name).is_none() {
                problems.push(format!("rate_limit.routes.{name}: no such route"));
            }
        }
        if self.rate_limit.backend == RateLimitBackend::Redis {
            problems.extend(self.rate_limit.redis.problems());
        }
        let share = self.rate_limit.jobs_share;
        if !(share > 0.0 && share <= 1.0) {
            problems.push(format!("rate_limit.jobs_share {share} must be above 0 and at most 1"));
        }
        let j = &self.jobs;
        match (&j.store, self.rate_limit.backend) {
            (Some(store), RateLimitBackend::Local) => {
                let dir = store.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
                if !dir.is_dir() {
                    problems.push(format!(
                        "jobs.store {}: the directory {} does not exist",
                        store.display(),
                        dir.display()
                    ));
                }
            }
            (None, RateLimitBackend::Local) if j.enabled => problems.push(
                "jobs.enabled: set jobs.store to the jobs' SQLite file (or use rate_limit.backend = \"redis\")"
                    .to_owned(),
            ),
            (Some(_), RateLimitBackend::Redis) => problems.push(
                "jobs.store: with rate_limit.backend = \"redis\" jobs live in Redis, shared by every replica; remove it"
                    .to_owned(),
            ),
            _ => {}
        }
        if j.lease <= 2 * upstream_attempt(&self.upstream) {
            problems.push(format!(
                "jobs.lease {} must be more than 2 × (upstream.timeout + {}) = {}: one attempt at an operation is a \
                 token wait then the exchange, and an operation may wait half its lease before it is sent",
                format_duration(j.lease),
                format_duration(MAX_TOKEN_WAIT),
                format_duration(2 * upstream_attempt(&self.upstream))
            ));
        }
        if !(1..=1_000_000).contains(&j.max_operations) {
            problems.push(format!("jobs.max_operations {} must be from 1 to 1000000", j.max_operations));
        }
        match j.max_body_bytes {
            Some(bytes) if bytes < 1024 => {
                problems.push(format!("jobs.max_body_bytes {bytes} must be at least 1024"));
            }
            Some(bytes) if bytes < j.max_operations.saturating_mul(JobsConfig::MIN_OPERATION_BYTES) => {
                problems.push(format!(
                    "jobs.max_body_bytes {bytes} cannot hold jobs.max_operations {} operations (each takes at least \
                     {} bytes): raise it, or leave it out to derive it from jobs.max_operations",
                    j.max_operations,
                    JobsConfig::MIN_OPERATION_BYTES
                ));
            }
            _ => {}
        }
        if !(1..=1024).contains(&j.concurrency) {
            problems.push(format!("jobs.concurrency {} must be from 1 to 1024", j.concurrency));
        }
        if j.max_attempts == 0 {
            problems.push("jobs.max_attempts must be at least 1".to_owned());
        }
        if j.retry_min.is_zero() || j.retry_max < j.retry_min {
            problems.push("jobs.retry_min must be above 0 and not above jobs.retry_max".to_owned());
        }
        if j.retention < Duration::from_secs(60) {
            problems.push("jobs.retention must be at least 1m".to_owned());
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            problems.push(format!("log.level {:?} is not a valid tracing filter", self.log.level));
        }
        problems.extend(self.trace.problems());
        problems
    }

    /// Takes from `running` every setting a running gateway cannot change (its sockets, threads, pools, stores),
    /// and returns the keys of those this config had changed: a reload applies the rest, and reports these as
    /// waiting for a restart.
    pub fn keep_restart_only(&mut self, running: &Config) -> Vec<&'static str> {
        let mut waiting = Vec::new();
        macro_rules! keep {
            ($($key:literal => $($field:ident).+;)*) => {$(
                if self.$($field).+ != running.$($field).+ {
                    waiting.push($key);
                    self.$($field).+ = running.$($field).+.clone();
                }
            )*};
        }
        keep! {
            "server.listen" => server.listen;
            "server.admin_listen" => server.admin_listen;
            "server.header_read_timeout" => server.header_read_timeout;
            "server.max_in_flight" => server.max_in_flight;
            "server.max_connections" => server.max_connections;
            "server.shutdown_grace" => server.shutdown_grace;
            "server.workers" => server.workers;
            "upstream.base_url" => upstream.base_url;
            "upstream.connect_timeout" => upstream.connect_timeout;
            "upstream.ca_file" => upstream.ca_file;
            "upstream.pool_idle_timeout" => upstream.pool_idle_timeout;
            "upstream.pool_max_idle_per_host" => upstream.pool_max_idle_per_host;
            "rate_limit.backend" => rate_limit.backend;
            "rate_limit.redis" => rate_limit.redis;
            "log.format" => log.format;
            "audit" => audit;
            "jobs" => jobs;
            "trace" => trace;
        }
        waiting
    }

    /// The effective config as TOML, with every secret redacted.
    pub fn to_redacted_toml(&self) -> String {
        let mut effective = toml::Value::try_from(self).expect("config serializes to TOML");
        if let Some(written) = &self.written.0 {
            durations_as_written(&mut effective, written);
        }
        toml::to_string_pretty(&effective).expect("config serializes to TOML")
    }
}

/// The longest a request waits for an app's first token (then it is answered 503 like any tokenless request).
pub const MAX_TOKEN_WAIT: Duration = Duration::from_secs(3);

/// The longest one attempt at a job's operation can take: a token wait, then the exchange.
fn upstream_attempt(upstream: &UpstreamConfig) -> Duration {
    upstream.timeout + MAX_TOKEN_WAIT
}

/// 1 to `max_len` characters of `A-Z a-z 0-9 - _ . :`: safe to log, forward and record as a label, whether it
/// comes from the config (a caller's name) or from a caller's header (a request id, `X-Caller`).
pub fn is_plain_label(value: &str, max_len: usize) -> bool {
    (1..=max_len).contains(&value.len())
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(contents: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(contents.as_bytes()).unwrap();
        f
    }

    const MINIMAL: &str = r#"
        [upstream]
        base_url = "https://a1.easemob.com/"
        [[apps]]
        org_name = "1122161011178276"
        app_name = "demo"
        client_id = "YXA6id"
        client_secret_file = "/nonexistent/secret"
    "#;

    #[test]
    fn a_reload_keeps_the_settings_that_need_a_restart_and_names_them() {
        let running = Config::load(write(MINIMAL).path()).unwrap();
        let mut new = running.clone();
        new.server.listen = "127.0.0.1:1".parse().unwrap();
        new.jobs.concurrency = 7;
        new.rate_limit.route.rate = NonZeroU32::new(50).unwrap();
        new.upstream.timeout = Duration::from_secs(3);
        assert_eq!(new.keep_restart_only(&running), ["server.listen", "jobs"]);
        assert_eq!(new.server.listen, running.server.listen);
        assert_eq!(new.jobs, running.jobs);
        assert_eq!(new.rate_limit.route.rate.get(), 50, "a quota is reloaded");
        assert_eq!(new.upstream.timeout, Duration::from_secs(3), "and so is the upstream timeout");
        assert!(new.clone().keep_restart_only(&new).is_empty());
    }

    #[test]
    fn defaults_fill_everything_but_upstream_and_apps() {
        let c = Config::load(write(MINIMAL).path()).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.upstream.base_url.as_str(), "https://a1.easemob.com");
        assert_eq!(c.upstream.timeout, Duration::from_secs(10));
        assert_eq!(c.apps[0].org_name, "1122161011178276");
        assert_eq!(c.problems(SecretPolicy::ExternalOnly).len(), 1, "only the unreadable secret file");
    }

    #[test]
    fn unknown_keys_and_bad_durations_are_one_line_errors() {
        let e = Config::load(write(&format!("{MINIMAL}\n[server]\nlisten_addr = \"x\"")).path()).unwrap_err();
        assert!(e.contains("listen_addr"), "{e}");
        let e = Config::load(write(&MINIMAL.replace("[upstream]", "[upstream]\ntimeout = \"10 parsecs\"")).path())
            .unwrap_err();
        assert!(e.contains("timeout") || e.contains("parsecs"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn each_replica_enforces_every_limit_divided_by_the_replicas_never_below_one() {
        let toml = format!(
            "{MINIMAL}\n[rate_limit]\nreplicas = 3\nroute = {{ rate = 100, burst = 10 }}\napp = {{ rate = 2 }}\n\
             routes.delete_chat_messages = {{ rate = 200 }}\n"
        );
        let c = Config::load(write(&toml).path()).unwrap().rate_limit;
        let mine = c.per_replica();
        let limit =
            |rate, burst| Limit { rate: NonZeroU32::new(rate).unwrap(), burst: NonZeroU32::new(burst).unwrap() };
        assert_eq!(mine.route, limit(33, 3));
        assert_eq!(mine.route_limit("delete_chat_messages"), limit(66, 1), "an override is divided too");
        assert_eq!(mine.app, Some(limit(1, 1)), "2 / 3 rounds down, but never to 0 (unlimited)");
        assert_eq!(mine.user_conversation_per_minute.get(), 1, "5 / 3");
        let note = c.per_replica_note();
        assert!(note.contains("#   route: 33 calls/s, burst 3\n"), "{note}");
        assert!(note.contains("#   user_conversation_per_minute: 1\n"), "{note}");
        assert!(note.lines().all(|l| l.is_empty() || l.starts_with('#')), "TOML comments only: {note}");
    }

    #[test]
    fn the_old_expected_replicas_key_is_refused_with_a_line_naming_its_new_place() {
        let toml = format!("{MINIMAL}\n[rate_limit.redis]\nexpected_replicas = 2\n");
        let e = Config::load(write(&toml).path()).unwrap_err();
        assert!(e.contains("rate_limit.redis.expected_replicas: moved: set rate_limit.replicas"), "{e}");
    }

    #[test]
    fn the_old_secret_file_poll_key_is_refused_with_a_line_naming_the_reload_poll() {
        let toml = format!("{MINIMAL}\n[token]\nsecret_file_poll = \"10s\"\n");
        let e = Config::load(write(&toml).path()).unwrap_err();
        assert!(e.contains("token.secret_file_poll: moved: set server.reload_poll"), "{e}");
    }

    #[test]
    fn inline_secret_is_refused_outside_demo_and_never_printed() {
        let toml =
            MINIMAL.replace("client_secret_file = \"/nonexistent/secret\"", "client_secret = \"hunter2-secret\"");
        let c = Config::load(write(&toml).path()).unwrap();
        let problems = c.problems(SecretPolicy::ExternalOnly);
        assert!(problems[0].contains("for `demo` only"), "{problems:?}");
        assert!(c.problems(SecretPolicy::InlineAllowed).is_empty());
        assert!(!c.to_redacted_toml().contains("hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"));
        // Of the wrong type, it is refused without being shown.
        let toml = MINIMAL.replace("client_secret_file = \"/nonexistent/secret\"", "client_secret = 20240607");
        let e = Config::load(write(&toml).path()).unwrap_err();
        assert!(e.ends_with("apps[0].client_secret: expected a string, found an integer"), "{e}");
    }

    #[test]
    fn workers_default_to_the_cpus_and_a_typo_is_refused() {
        let mut c = Config::load(write(MINIMAL).path()).unwrap();
        assert_eq!(c.server.workers, 0);
        assert_eq!(c.server.worker_threads(), std::thread::available_parallelism().unwrap().get());
        c.server.workers = 3;
        assert_eq!(c.server.worker_threads(), 3);
        c.server.workers = 10_000;
        assert!(c.problems(SecretPolicy::ExternalOnly).iter().any(|p| p.contains("server.workers is 10000")));
    }

    #[test]
    fn jobs_need_a_store_of_their_own_backend_and_a_lease_longer_than_an_attempt() {
        let mut c = Config::load(write(MINIMAL).path()).unwrap();
        c.jobs.enabled = true;
        let problems = c.problems(SecretPolicy::InlineAllowed);
        assert!(problems.iter().any(|p| p.starts_with("jobs.enabled: set jobs.store")), "{problems:?}");
        c.rate_limit.backend = RateLimitBackend::Redis;
        c.jobs.store = Some(PathBuf::from("jobs.db"));
        let problems = c.problems(SecretPolicy::InlineAllowed);
        assert!(problems.iter().any(|p| p.starts_with("jobs.store: with rate_limit.backend")), "{problems:?}");
        c.jobs.store = None;
        c.jobs.lease = Duration::from_secs(26);
        let problems = c.problems(SecretPolicy::InlineAllowed);
        let lease = "jobs.lease 26s must be more than 2 × (upstream.timeout + 3s) = 26s:";
        assert!(problems.iter().any(|p| p.starts_with(lease)), "{problems:?}");
        c.jobs.lease = Duration::from_secs(27);
        let problems = c.problems(SecretPolicy::InlineAllowed);
        assert!(!problems.iter().any(|p| p.starts_with("jobs.lease")), "{problems:?}");
    }

    #[test]
    fn the_largest_job_request_follows_max_operations_unless_set_and_a_pair_that_contradicts_itself_is_refused() {
        let mut c = Config::load(write(MINIMAL).path()).unwrap();
        assert_eq!(c.jobs.max_body_bytes(), 100_000 * 256 + 65_536);
        c.jobs.max_operations = 10;
        assert_eq!(c.jobs.max_body_bytes(), 10 * 256 + 65_536);
        let about_size = |c: &Config| {
            c.problems(SecretPolicy::InlineAllowed)
                .into_iter()
                .filter(|p| p.starts_with("jobs.max_"))
                .collect::<Vec<_>>()
        };
        assert_eq!(about_size(&c), Vec::<String>::new());
        c.jobs.max_operations = 100_000;
        c.jobs.max_body_bytes = Some(1_000_000);
        assert_eq!(c.jobs.max_body_bytes(), 1_000_000);
        let cannot = "jobs.max_body_bytes 1000000 cannot hold jobs.max_operations 100000 operations";
        assert!(about_size(&c).iter().any(|p| p.starts_with(cannot)), "{:?}", about_size(&c));
        c.jobs.max_body_bytes = Some(6_400_000);
        assert_eq!(about_size(&c), Vec::<String>::new());
    }

    #[test]
    fn a_redis_password_comes_from_a_file_or_the_environment_never_the_url() {
        let mut c = Config::load(write(MINIMAL).path()).unwrap();
        c.rate_limit.backend = RateLimitBackend::Redis;
        let problems = |c: &Config| c.problems(SecretPolicy::InlineAllowed);
        c.rate_limit.redis.url = "redis://:hunter2@10.0.0.1:6379".to_owned();
        assert!(problems(&c).iter().any(|p| p.contains("must not hold credentials")), "{:?}", problems(&c));
        c.rate_limit.redis.url = "rediss://redis.example:6380".to_owned();
        c.rate_limit.redis.password_env = Some("TEST_REDIS_PASSWORD_UNSET".to_owned());
        c.rate_limit.redis.password_file = Some(PathBuf::from("/nonexistent"));
        assert!(problems(&c).iter().any(|p| p.contains("not both")), "{:?}", problems(&c));
        c.rate_limit.redis.password_file = None;
        assert!(problems(&c).iter().any(|p| p.contains("TEST_REDIS_PASSWORD_UNSET is not set")), "{:?}", problems(&c));
        c.rate_limit.redis.password_env = None;
        c.rate_limit.redis.url = "redis://10.0.0.1:6379".to_owned();
        c.rate_limit.redis.ca_file = Some(PathBuf::from("/etc/hostname"));
        assert!(problems(&c).iter().any(|p| p.contains("ca_file is for rediss://")), "{:?}", problems(&c));
        c.rate_limit.redis.ca_file = None;
        assert!(problems(&c).iter().all(|p| !p.contains("rate_limit")), "{:?}", problems(&c));
    }

    #[test]
    fn every_problem_names_its_key_and_durations_print_as_written() {
        let toml = MINIMAL.replace("[upstream]", "[upstream]\ntimeout = \"10 parsecs\"\nconnect_timeout = \"1500ms\"")
            + "\n[server]\nlisten_addr = \"x\"\nmax_in_flight = \"lots\"\n";
        let e = Config::load(write(&toml).path()).unwrap_err();
        for key in [
            "upstream.timeout: expected a duration, found a string (\"10 parsecs\"): write upstream.timeout = \"10s\"",
            "server.listen_addr: unknown field",
            "server.max_in_flight",
        ] {
            assert!(e.contains(key), "{key} in {e}");
        }
        assert_eq!(e.lines().count(), 3, "{e}");
        let e = Config::load(write(&format!("{MINIMAL}\n[log]\nlevel = \"info\"\nlevel = \"debug\"\n")).path())
            .unwrap_err();
        assert!(e.contains("duplicate key (at `level`)"), "{e}");
        let fine = MINIMAL.replace("[upstream]", "[upstream]\nconnect_timeout = \"1500ms\"");
        let printed = Config::load(write(&fine).path()).unwrap().to_redacted_toml();
        assert!(printed.contains("connect_timeout = \"1500ms\""), "{printed}");
    }

    /// `MINIMAL` with `extra` added, read with `env` as the environment and checked in full (an inline secret
    /// allowed, so that only the problems the test makes are reported).
    fn check(extra: &str, env: &[(&str, &str)]) -> Result<Config, String> {
        let toml = MINIMAL.replace("client_secret_file = \"/nonexistent/secret\"", "client_secret = \"s\"");
        let file = write(&format!("{extra}\n{toml}"));
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::read(file.path(), env).checked(SecretPolicy::InlineAllowed)
    }

    #[test]
    fn a_float_is_not_an_integer() {
        for key in ["workers", "max_in_flight"] {
            let e = check(&format!("[server]\n{key} = 2.5"), &[]).unwrap_err();
            assert_eq!(e.lines().count(), 1, "{e}");
            assert!(e.ends_with(&format!("server.{key}: expected an integer from 0, found a float (2.5)")), "{e}");
        }
        assert_eq!(check("[server]\nworkers = 3", &[]).unwrap().server.workers, 3);
    }

    #[test]
    fn a_string_is_neither_a_number_nor_a_boolean() {
        let e = check("[server]\nworkers = \"2\"", &[]).unwrap_err();
        assert!(e.ends_with("server.workers: expected an integer from 0, found a string (\"2\")"), "{e}");
        let e = check("[jobs]\nenabled = \"no\"", &[]).unwrap_err();
        assert!(e.ends_with("jobs.enabled: expected a boolean, found a string (\"no\")"), "{e}");
        let e = check("[token]\nrefresh_at = \"0.5\"", &[]).unwrap_err();
        assert!(e.ends_with("token.refresh_at: expected a number, found a string (\"0.5\")"), "{e}");
    }

    #[test]
    fn durations_sizes_and_addresses_of_the_wrong_type_show_the_form_to_write() {
        for (extra, message) in [
            (
                "[server]\nheader_read_timeout = 10",
                "server.header_read_timeout: expected a duration, found an integer (10): write \
                 server.header_read_timeout = \"10s\"",
            ),
            (
                "[rate_limit]\nmax_wait = 1.5",
                "rate_limit.max_wait: expected a duration, found a float (1.5): write rate_limit.max_wait = \"1500ms\"",
            ),
            (
                "[server]\nlisten = 8080",
                "server.listen: expected a socket address, found an integer (8080): write \
                 server.listen = \"127.0.0.1:8080\"",
            ),
            (
                "[server]\nlisten = \"localhost\"",
                "server.listen: expected a socket address, found a string (\"localhost\"): write \
                 server.listen = \"127.0.0.1:8080\"",
            ),
            (
                "[jobs]\nmax_body_bytes = \"64MiB\"",
                "jobs.max_body_bytes: expected an integer from 0, found a string (\"64MiB\"): write \
                 jobs.max_body_bytes = 67108864",
            ),
        ] {
            let e = check(extra, &[]).unwrap_err();
            assert!(e.ends_with(message), "{message} in {e}");
        }
        let toml = MINIMAL.replace("[upstream]", "[upstream]\ntimeout = 10");
        let e = Config::load(write(&toml).path()).unwrap_err();
        assert!(e.ends_with(
            "upstream.timeout: expected a duration, found an integer (10): write upstream.timeout = \"10s\""
        ));
    }

    #[test]
    fn one_run_reports_a_misspelt_key_a_wrong_type_and_an_unreadable_secret_file() {
        let toml = format!("[server]\nlisten_adr = \"127.0.0.1:8080\"\nworkers = 2.5\n{MINIMAL}");
        let file = write(&toml);
        let e = Config::read(file.path(), []).checked(SecretPolicy::ExternalOnly).unwrap_err();
        let lines: Vec<_> = e.lines().collect();
        assert_eq!(lines.len(), 3, "{e}");
        assert!(
            lines[0].ends_with(
                "server.listen_adr: unknown field `listen_adr`, expected one of `listen`, \
             `admin_listen`, `header_read_timeout`, `body_read_timeout`, `allow_from`, `max_in_flight`, \
             `max_connections`, `shutdown_grace`, `workers`, `reload_poll`"
            ),
            "{e}"
        );
        assert!(lines[1].ends_with("server.workers: expected an integer from 0, found a float (2.5)"), "{e}");
        assert!(
            lines[2].starts_with("apps[1122161011178276#demo]: client_secret_file /nonexistent/secret cannot be read"),
            "{e}"
        );
    }

    #[test]
    fn a_required_key_that_does_not_fit_hides_no_other_key() {
        let e =
            check("[rate_limit.route]\nrate = 0\n[server]\nworkers = 2.5\n[token]\nrefresh_at = 2.0", &[]).unwrap_err();
        let lines: Vec<_> = e.lines().collect();
        assert_eq!(lines.len(), 3, "{e}");
        assert!(lines[0].ends_with("rate_limit.route.rate: expected an integer above 0, found an integer (0)"), "{e}");
        assert!(lines[1].ends_with("server.workers: expected an integer from 0, found a float (2.5)"), "{e}");
        assert!(lines[2].starts_with("token.refresh_at 2 must be between 0 and 1"), "{e}");
    }

    #[test]
    fn the_problems_the_configuration_reference_shows_are_the_ones_printed() {
        let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md")).unwrap();
        let shown = page.split("## Checking a file").nth(1).unwrap().split("```text\n").nth(1).unwrap();
        let shown: Vec<&str> = shown.split("```").next().unwrap().lines().collect();
        let toml = MINIMAL
            .replace("[upstream]", "[server]\nmax_in_flight = \"lots\"\n[upstream]\ntimeout = 10")
            .replace("client_secret_file = \"/nonexistent/secret\"", "client_secret_env = \"EASEMOB_CLIENT_SECRET\"");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, toml).unwrap();
        let env = [("EASEMOB_GW__JOBS__ENABLED".to_owned(), "no".to_owned())];
        let e = Config::read(&path, env).checked(SecretPolicy::ExternalOnly).unwrap_err();
        let printed: Vec<String> =
            e.replace(&path.display().to_string(), "gateway.toml").lines().map(|l| format!("error: {l}")).collect();
        assert_eq!(printed, shown);
    }

    #[test]
    fn an_override_is_read_by_its_key_s_type_and_a_bad_one_names_its_variable() {
        let c = check(
            "",
            &[
                ("EASEMOB_GW__SERVER__WORKERS", "2"),
                ("EASEMOB_GW__JOBS__ENABLED", "true"),
                ("EASEMOB_GW__JOBS__STORE", "/tmp/jobs.db"),
                ("EASEMOB_GW__RATE_LIMIT__REDIS__KEY_PREFIX", "123"),
                ("EASEMOB_GW__TOKEN__REFRESH_AT", "0.25"),
                ("EASEMOB_GW__UPSTREAM__TIMEOUT", "7s"),
            ],
        )
        .unwrap();
        assert_eq!((c.server.workers, c.jobs.enabled, c.token.refresh_at), (2, true, 0.25));
        assert_eq!((c.rate_limit.redis.key_prefix.as_str(), c.upstream.timeout), ("123", Duration::from_secs(7)));
        for (var, value, message) in [
            ("EASEMOB_GW__SERVER__WORKERS", "2.5", "expected an integer from 0, found a float (2.5)"),
            ("EASEMOB_GW__JOBS__ENABLED", "no", "expected a boolean, found a string (\"no\")"),
            (
                "EASEMOB_GW__UPSTREAM__TIMEOUT",
                "10",
                "expected a duration, found a string (\"10\"): write EASEMOB_GW__UPSTREAM__TIMEOUT=10s",
            ),
        ] {
            let e = check("", &[(var, value)]).unwrap_err();
            let key = var.trim_start_matches("EASEMOB_GW__").replace("__", ".").to_ascii_lowercase();
            assert_eq!(e, format!("{var} (overriding {key}): {message}"));
        }
    }

    /// Every key of the config, as `section.key` (`apps.org_name` for `[[apps]] org_name`); a `{ rate, burst }`
    /// limit and a map of them are one key each (`rate_limit.routes.<route>`).
    fn keys(value: &toml::Value, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
        let toml::Value::Table(table) = value else { return };
        for (key, value) in table {
            let key = match prefix {
                "" => key.clone(),
                "rate_limit.routes" => "rate_limit.routes.<route>".to_owned(),
                prefix => format!("{prefix}.{key}"),
            };
            match value {
                toml::Value::Table(_) if !matches!(key.as_str(), "rate_limit.route" | "rate_limit.app") => {
                    if key == "rate_limit.routes" {
                        out.insert("rate_limit.routes.<route>".to_owned());
                    } else {
                        keys(value, &key, out);
                    }
                }
                toml::Value::Array(items) if items.first().is_some_and(toml::Value::is_table) => {
                    items.iter().for_each(|item| keys(item, &key, out));
                }
                _ => {
                    out.insert(key);
                }
            }
        }
    }

    /// The keys the configuration reference's table names (docs/configuration.md, under `## Keys`):
    /// `section.key`, with the bare names that follow in a cell taking the first one's section
    /// (`` `[[apps]] org_name`, `app_name` ``).
    fn documented() -> std::collections::BTreeSet<String> {
        let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md")).unwrap();
        let table = page.split("\n## Keys\n").nth(1).expect("a `## Keys` section").split("\n## ").next().unwrap();
        let mut out = std::collections::BTreeSet::new();
        for row in table.lines().filter(|l| l.starts_with("| `")) {
            let cell = row.split('|').nth(1).unwrap();
            let mut section = String::new();
            for (i, name) in cell.split('`').skip(1).step_by(2).enumerate() {
                let name = match name.strip_prefix("[[").and_then(|n| n.split_once("]] ")) {
                    Some((array, key)) => format!("{array}.{key}"),
                    None => name.to_owned(),
                };
                let key = if i > 0 && !name.contains('.') { format!("{section}.{name}") } else { name };
                section = key.rsplit_once('.').map_or(String::new(), |(s, _)| s.to_owned());
                out.insert(key);
            }
        }
        out
    }

    /// `MINIMAL` with every optional key set, so that each shows in the effective config.
    fn every_key_set() -> Config {
        let mut c = Config::load(write(MINIMAL).path()).unwrap();
        // Every optional key set, so that each shows in the effective config.
        c.server.allow_from = vec!["10.0.0.0/8".parse().unwrap()];
        c.upstream.ca_file = Some(PathBuf::from("ca.pem"));
        c.token.ttl = Some(Duration::from_secs(60));
        c.rate_limit.routes.insert("delete_chat_messages".to_owned(), c.rate_limit.route);
        c.rate_limit.app = Some(c.rate_limit.route);
        let redis = &mut c.rate_limit.redis;
        (redis.username, redis.password_env) = (Some("u".to_owned()), Some("P".to_owned()));
        (redis.password_file, redis.ca_file) = (Some(PathBuf::from("p")), Some(PathBuf::from("c")));
        (c.audit.file, c.audit.default_caller) = (Some(PathBuf::from("a")), Some("x".to_owned()));
        c.jobs.store = Some(PathBuf::from("jobs.db"));
        c.trace.otlp_endpoint = Some("http://127.0.0.1:4318/v1/traces".to_owned());
        c.callers = vec![CallerConfig { name: "n".to_owned(), key_sha256: "0".repeat(64) }];
        c.jobs.max_body_bytes = Some(1 << 20);
        let app = &mut c.apps[0];
        (app.client_secret_env, app.client_secret) =
            (Some("S".to_owned()), Some(InlineSecret(SecretString::from("s"))));
        c
    }

    #[test]
    fn the_configuration_reference_documents_every_key_and_no_other() {
        let mut code = std::collections::BTreeSet::new();
        keys(&toml::Value::try_from(every_key_set()).unwrap(), "", &mut code);
        let documented = documented();
        let undocumented: Vec<_> = code.difference(&documented).collect();
        let unknown: Vec<_> = documented.difference(&code).collect();
        assert!(
            undocumented.is_empty() && unknown.is_empty(),
            "not in docs/configuration.md: {undocumented:?}; not in the code: {unknown:?}"
        );
    }

    /// The defaults the configuration reference's table states, by key: the backquoted values of a row's
    /// second cell, paired with its keys (`token.retry_min`, `token.retry_max` | `500ms`, `60s`).
    fn documented_defaults() -> Vec<(String, String)> {
        let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md")).unwrap();
        let table = page.split("\n## Keys\n").nth(1).unwrap().split("\n## ").next().unwrap();
        let quoted = |cell: &str| cell.split('`').skip(1).step_by(2).map(str::to_owned).collect::<Vec<_>>();
        let mut out = Vec::new();
        for row in table.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = row.split('|').collect();
            let (keys, defaults) = (quoted(cells[1]), quoted(cells[2]));
            if keys.len() == defaults.len() {
                let section = keys[0].rsplit_once('.').map_or("", |(s, _)| s).to_owned();
                let keys = keys.iter().map(|k| if k.contains('.') { k.clone() } else { format!("{section}.{k}") });
                out.extend(keys.zip(defaults));
            }
        }
        out
    }

    #[test]
    fn the_effective_config_prints_each_default_as_the_configuration_reference_states_it() {
        let printed = Config::load(write(MINIMAL).path()).unwrap().to_redacted_toml();
        let effective: toml::Value = toml::from_str(&printed).unwrap();
        let mut compared = 0;
        for (key, default) in documented_defaults() {
            let at = key.split('.').try_fold(&effective, |at, part| at.get(part));
            let shown = match at {
                Some(toml::Value::String(s)) => s.clone(),
                Some(toml::Value::Table(_)) | None => continue,
                Some(other) => other.to_string(),
            };
            assert_eq!(shown, default, "{key} in the effective config and in docs/configuration.md");
            compared += 1;
        }
        assert!(compared >= 40, "only {compared} defaults compared");
    }

    /// What a page names as waiting for a restart, in its list between `after` and `before`: keys
    /// (`server.listen`), key prefixes (`upstream.pool_`, from `upstream.pool_*`) and sections (`jobs`, from `[jobs]`).
    fn documented_restart_only(page: &str, after: &str, before: &str) -> Vec<String> {
        let page = std::fs::read_to_string(format!("{}/docs/{page}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let list = page.split(after).nth(1).unwrap().split(before).next().unwrap();
        list.split('`').skip(1).step_by(2).map(|name| name.trim_matches(['[', ']', '*']).to_owned()).collect()
    }

    /// Every key of `value` that holds no table, as `section.key` (arrays left out).
    fn leaves(value: &toml::Value, prefix: &str, out: &mut Vec<String>) {
        let toml::Value::Table(table) = value else { return };
        for (key, value) in table {
            let key = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
            match value {
                toml::Value::Table(_) => leaves(value, &key, out),
                toml::Value::Array(_) => {}
                _ => out.push(key),
            }
        }
    }

    #[test]
    fn the_configuration_reference_names_exactly_the_settings_a_reload_keeps_for_a_restart() {
        let written = toml::Value::try_from(every_key_set()).unwrap();
        let running = Config::deserialize(written.clone()).unwrap();
        let documented = documented_restart_only("configuration.md", "named in the log:", ". See");
        let operations = documented_restart_only("operations.md", "**What needs a restart.**", ". A reload");
        assert_eq!(documented, operations, "configuration.md and operations.md name the same settings");
        let mut keys = Vec::new();
        leaves(&written, "", &mut keys);
        for key in keys {
            let steps: Vec<Step> = key.split('.').map(Step::Key).collect();
            let mut values = written.clone();
            let old = value_at(&mut values, &steps).unwrap().clone();
            // Another value the key accepts: the first of these that the config reads.
            let candidates = match &old {
                toml::Value::Integer(n) => vec![toml::Value::Integer(n + 1)],
                toml::Value::Float(x) => vec![toml::Value::Float(x / 2.0)],
                toml::Value::Boolean(b) => vec![toml::Value::Boolean(!b)],
                toml::Value::String(s) => {
                    let duration =
                        humantime::parse_duration(s).ok().map(|d| format_duration(d + Duration::from_secs(1)));
                    let addr = s.parse::<SocketAddr>().ok().map(|a| SocketAddr::new(a.ip(), a.port() + 1).to_string());
                    let others = ["redis".to_owned(), "json".to_owned(), format!("{s}x")];
                    duration.into_iter().chain(addr).chain(others).map(toml::Value::String).collect()
                }
                other => panic!("{key} = {other}: no other value to try"),
            };
            let changed = candidates.into_iter().find_map(|candidate| {
                *value_at(&mut values, &steps).unwrap() = candidate;
                Config::deserialize(values.clone()).ok()
            });
            let mut changed = changed.unwrap_or_else(|| panic!("no other value of {key} reads"));
            let waits = !changed.keep_restart_only(&running).is_empty();
            let named = documented.iter().any(|d| {
                key == *d || key.starts_with(&format!("{d}.")) || (d.ends_with('_') && key.starts_with(d.as_str()))
            });
            assert_eq!(waits, named, "{key}: waits for a restart, and configuration.md says so");
        }
    }

    #[test]
    fn span_export_is_off_by_default_and_its_settings_are_checked() {
        let mut c = Config::load(write(MINIMAL).path()).unwrap();
        assert_eq!((&c.trace.otlp_endpoint, c.trace.sample_ratio), (&None, 1.0));
        let problems = |c: &Config| c.problems(SecretPolicy::InlineAllowed);
        assert!(problems(&c).iter().all(|p| !p.starts_with("trace.")), "{:?}", problems(&c));
        c.trace.otlp_endpoint = Some("https://otel.example:4318/v1/traces".to_owned());
        assert!(problems(&c).iter().all(|p| !p.starts_with("trace.")), "{:?}", problems(&c));
        for (endpoint, problem) in [
            ("127.0.0.1:4318", "must be an http:// or https:// URL"),
            ("grpc://127.0.0.1:4317", "must be an http:// or https:// URL"),
            ("https://user:hunter2@otel.example/v1/traces", "no credentials"),
            ("https://otel.example/v1/traces?api_key=hunter2", "no credentials"),
            ("http://exa mple", "is not a URL"),
        ] {
            c.trace.otlp_endpoint = Some(endpoint.to_owned());
            let problems = problems(&c);
            assert!(
                problems.iter().any(|p| p.starts_with("trace.otlp_endpoint") && p.contains(problem)),
                "{problems:?}"
            );
        }
        (c.trace.service_name, c.trace.sample_ratio) = (" ".to_owned(), 1.5);
        let problems = problems(&c);
        for key in ["trace.service_name is empty", "trace.sample_ratio 1.5 must be from 0 to 1"] {
            assert!(problems.iter().any(|p| p == key), "{key} in {problems:?}");
        }
        assert!(!problems.iter().any(|p| p.contains("hunter2")), "never printed back: {problems:?}");
    }

    #[test]
    fn bad_base_url_is_refused() {
        for url in ["a1.easemob.com", "ftp://x", "https://x/?a=b"] {
            assert!(BaseUrl::parse(url).is_err(), "{url}");
        }
    }
}
