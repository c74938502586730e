//! `[jobs]`: deletion jobs, their store and their pace, and their checks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration::{self, format_duration};
use super::rate_limit::RateLimitBackend;
use super::token::MAX_TOKEN_WAIT;
use super::upstream::UpstreamConfig;

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

    /// What is wrong with these settings, one line each. The store must suit the quota's `backend` (its directory
    /// is looked for on disk), and the lease must outlast two attempts at the `upstream`.
    pub(super) fn problems(&self, backend: RateLimitBackend, upstream: &UpstreamConfig) -> Vec<String> {
        let mut problems = Vec::new();
        match (&self.store, backend) {
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
            (None, RateLimitBackend::Local) if self.enabled => problems.push(
                "jobs.enabled: set jobs.store to the jobs' SQLite file (or use rate_limit.backend = \"redis\")"
                    .to_owned(),
            ),
            (Some(_), RateLimitBackend::Redis) => problems.push(
                "jobs.store: with rate_limit.backend = \"redis\" jobs live in Redis, shared by every replica; remove it"
                    .to_owned(),
            ),
            _ => {}
        }
        if self.lease <= 2 * upstream_attempt(upstream) {
            problems.push(format!(
                "jobs.lease {} must be more than 2 × (upstream.timeout + {}) = {}: one attempt at an operation is a \
                 token wait then the exchange, and an operation may wait half its lease before it is sent",
                format_duration(self.lease),
                format_duration(MAX_TOKEN_WAIT),
                format_duration(2 * upstream_attempt(upstream))
            ));
        }
        if !(1..=1_000_000).contains(&self.max_operations) {
            problems.push(format!("jobs.max_operations {} must be from 1 to 1000000", self.max_operations));
        }
        match self.max_body_bytes {
            Some(bytes) if bytes < 1024 => {
                problems.push(format!("jobs.max_body_bytes {bytes} must be at least 1024"));
            }
            Some(bytes) if bytes < self.max_operations.saturating_mul(JobsConfig::MIN_OPERATION_BYTES) => {
                problems.push(format!(
                    "jobs.max_body_bytes {bytes} cannot hold jobs.max_operations {} operations (each takes at least \
                     {} bytes): raise it, or leave it out to derive it from jobs.max_operations",
                    self.max_operations,
                    JobsConfig::MIN_OPERATION_BYTES
                ));
            }
            _ => {}
        }
        if !(1..=1024).contains(&self.concurrency) {
            problems.push(format!("jobs.concurrency {} must be from 1 to 1024", self.concurrency));
        }
        if self.max_attempts == 0 {
            problems.push("jobs.max_attempts must be at least 1".to_owned());
        }
        if self.retry_min.is_zero() || self.retry_max < self.retry_min {
            problems.push("jobs.retry_min must be above 0 and not above jobs.retry_max".to_owned());
        }
        if self.retention < Duration::from_secs(60) {
            problems.push("jobs.retention must be at least 1m".to_owned());
        }
        problems
    }
}

/// The longest one attempt at a job's operation can take: a token wait, then the exchange.
fn upstream_attempt(upstream: &UpstreamConfig) -> Duration {
    upstream.timeout + MAX_TOKEN_WAIT
}
