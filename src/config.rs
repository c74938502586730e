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
pub struct Written(Option<config::Value>);

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
    #[serde(with = "humantime_serde")]
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
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Finished jobs are deleted this long after they finish, so the store cannot grow without bound.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
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

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// `local`: each replica enforces the whole quota; `redis`: all replicas share one quota.
    pub backend: RateLimitBackend,
    /// How long a request over quota may wait for its slot, in arrival order; `0s` refuses at once.
    #[serde(with = "humantime_serde")]
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
            redis: RedisConfig::default(),
        }
    }
}

impl RateLimitConfig {
    /// The limit of `route` (by name), with its override if any.
    pub fn route_limit(&self, route: &str) -> Limit {
        self.routes.get(route).copied().unwrap_or(self.route)
    }
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
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Keys are `{key_prefix}:{{org#app}}:{route}` (and `:app`, `:user:{id}`); the braces are a Redis Cluster hash tag.
    pub key_prefix: String,
    /// How many replicas share the AppKey: while Redis is unreachable each enforces quota / this.
    pub expected_replicas: NonZeroU32,
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
            expected_replicas: NonZeroU32::new(2).expect("non-zero"),
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
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A client must finish sending a request body (only `delete_conversation` has one) within this.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Networks that may call the data plane; required when `listen` is not a loopback address.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_from: Vec<ipnet::IpNet>,
    /// Requests handled at once; more are answered 503 at once instead of queueing without bound.
    pub max_in_flight: usize,
    /// Client connections open at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Data-plane threads, each serving its own connections start to finish; 0 = one per CPU the process may use.
    /// At most 256.
    pub workers: usize,
    /// How often the config file, and every `client_secret_file` it names, is checked for a change (Kubernetes
    /// updates a mounted ConfigMap or Secret in place); a change reloads the whole config, as SIGHUP does.
    /// `0s`: only on SIGHUP.
    #[serde(with = "humantime_serde")]
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
    #[serde(with = "humantime_serde", default = "defaults::connect_timeout")]
    pub connect_timeout: Duration,
    /// The whole exchange with Easemob (connect, send, complete answer), from the first send, retry included.
    #[serde(with = "humantime_serde", default = "defaults::timeout")]
    pub timeout: Duration,
    /// Extra PEM root certificates, for private deployments and tests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(with = "humantime_serde", default = "defaults::pool_idle_timeout")]
    pub pool_idle_timeout: Duration,
    #[serde(default = "defaults::pool_max_idle_per_host")]
    pub pool_max_idle_per_host: usize,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// Requested token lifetime, sent as `ttl`; absent means the console's setting. `0s` asks for a token that
    /// never expires.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
    /// Refresh once this fraction of the token's lifetime has passed.
    pub refresh_at: f64,
    /// How often a token that never expires (`expires_in: 0`) is replaced anyway.
    #[serde(with = "humantime_serde")]
    pub permanent_refresh: Duration,
    /// Never call the token endpoint more often than this per app: Easemob may ban accounts that do.
    #[serde(with = "humantime_serde")]
    pub min_interval: Duration,
    /// First retry delay after a failed fetch; doubles (with jitter) up to `retry_max`.
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    #[serde(with = "humantime_serde")]
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
fn durations_as_written(effective: &mut toml::Value, written: &config::Value) {
    match (effective, &written.kind) {
        (toml::Value::Table(table), config::ValueKind::Table(sources)) => {
            for (key, value) in table.iter_mut() {
                if let Some(source) = sources.get(key) {
                    durations_as_written(value, source);
                }
            }
        }
        (toml::Value::Array(items), config::ValueKind::Array(sources)) => {
            for (item, source) in items.iter_mut().zip(sources) {
                durations_as_written(item, source);
            }
        }
        (toml::Value::String(shown), config::ValueKind::String(source)) => {
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

/// The `EASEMOB_GW__…` variable that set `key` (`upstream.timeout`), if one is set.
fn override_of(key: &str) -> Option<String> {
    let var = format!("{ENV_PREFIX}{ENV_SEPARATOR}{}", key.to_ascii_uppercase().replace('.', ENV_SEPARATOR));
    std::env::var_os(&var).map(|_| var)
}

/// Removes the value at `key` (dotted, as serde_path_to_error names it); false if there is none.
fn set_aside(values: &mut config::Value, key: &str) -> bool {
    let mut parts: Vec<&str> = key.split('.').filter(|p| !p.is_empty()).collect();
    let Some(last) = parts.pop() else { return false };
    let mut at = values;
    for part in parts {
        let next = match &mut at.kind {
            config::ValueKind::Table(table) => table.get_mut(part),
            config::ValueKind::Array(items) => {
                part.trim_matches(['[', ']']).parse::<usize>().ok().and_then(|i| items.get_mut(i))
            }
            _ => None,
        };
        match next {
            Some(next) => at = next,
            None => return false,
        }
    }
    match &mut at.kind {
        config::ValueKind::Table(table) => table.remove(last).is_some(),
        _ => false,
    }
}

/// Parser errors span several lines (a source excerpt with a caret): keep the words, drop the excerpt.
fn one_line(message: &str) -> String {
    message.lines().map(str::trim).filter(|l| !l.is_empty() && !l.contains('|')).collect::<Vec<_>>().join(": ")
}

/// Where secrets may come from: `demo` builds its config in code with an inline secret; files may not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretPolicy {
    InlineAllowed,
    ExternalOnly,
}

impl Config {
    /// Reads `path` (TOML), applies `EASEMOB_GW__…` overrides and deserializes. One line on failure.
    ///
    /// Every problem is reported, one line each, naming its key (or, for an `EASEMOB_GW__…` override, the
    /// variable): a value that does not fit is set aside and the rest checked on.
    pub fn load(path: &Path) -> Result<Config, String> {
        let file = path.display();
        let text = std::fs::read_to_string(path).map_err(|e| format!("{file}: {e}"))?;
        toml::from_str::<toml::Table>(&text).map_err(|e| format!("{file}: {}", toml_problem(&text, &e)))?;
        let source = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(config::Environment::with_prefix(ENV_PREFIX).separator(ENV_SEPARATOR))
            .build()
            .map_err(|e| format!("{file}: {}", one_line(&e.to_string())))?;
        let mut values: config::Value =
            source.try_deserialize().map_err(|e| format!("{file}: {}", one_line(&e.to_string())))?;
        let mut problems = Vec::new();
        loop {
            match serde_path_to_error::deserialize::<_, Config>(values.clone()) {
                Ok(config) if problems.is_empty() => return Ok(Config { written: Written(Some(values)), ..config }),
                Ok(_) => break,
                Err(e) => {
                    let key = e.path().to_string();
                    let message = one_line(&e.into_inner().to_string());
                    let message = message.split(" for key `").next().unwrap_or_default().to_owned();
                    problems.push(match override_of(&key) {
                        Some(var) => format!("{var} (overriding {key}): {message}"),
                        None if key == "." || key.is_empty() => format!("{file}: {message}"),
                        None => format!("{file}: {key}: {message}"),
                    });
                    // A missing key cannot be set aside; anything else can, to check the rest.
                    if message.starts_with("missing field") || !set_aside(&mut values, &key) {
                        break;
                    }
                }
            }
        }
        Err(problems.join("\n"))
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
                "jobs.lease {:?} must be longer than twice one attempt at an operation (upstream.timeout plus a token \
                 wait: {:?}): an operation may wait half its lease before it is sent",
                j.lease,
                upstream_attempt(&self.upstream)
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

/// The longest one attempt at a job's operation can take: a token wait (at most 3 s), then the exchange.
fn upstream_attempt(upstream: &UpstreamConfig) -> Duration {
    upstream.timeout + Duration::from_secs(3)
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
    fn inline_secret_is_refused_outside_demo_and_never_printed() {
        let toml =
            MINIMAL.replace("client_secret_file = \"/nonexistent/secret\"", "client_secret = \"hunter2-secret\"");
        let c = Config::load(write(&toml).path()).unwrap();
        let problems = c.problems(SecretPolicy::ExternalOnly);
        assert!(problems[0].contains("for `demo` only"), "{problems:?}");
        assert!(c.problems(SecretPolicy::InlineAllowed).is_empty());
        assert!(!c.to_redacted_toml().contains("hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"));
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
        c.jobs.lease = Duration::from_secs(5);
        let problems = c.problems(SecretPolicy::InlineAllowed);
        assert!(problems.iter().any(|p| p.starts_with("jobs.lease 5s must be longer")), "{problems:?}");
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
        for key in ["upstream.timeout: invalid value", "server.listen_addr: unknown field", "server.max_in_flight"] {
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

    #[test]
    fn the_configuration_reference_documents_every_key_and_no_other() {
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
        let mut code = std::collections::BTreeSet::new();
        keys(&toml::Value::try_from(&c).unwrap(), "", &mut code);
        let documented = documented();
        let undocumented: Vec<_> = code.difference(&documented).collect();
        let unknown: Vec<_> = documented.difference(&code).collect();
        assert!(
            undocumented.is_empty() && unknown.is_empty(),
            "not in docs/configuration.md: {undocumented:?}; not in the code: {unknown:?}"
        );
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
