//! `[token]`: how the App Token is requested and refreshed, and its checks.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration;

/// Keys that moved, and where: a config still using one is refused with a line naming the new key.
pub(super) const MOVED: [(&str, &str); 1] =
    [("token.secret_file_poll", "server.reload_poll (it watches the config file and every client_secret_file)")];

/// The longest a request waits for an app's first token (then it is answered 503 like any tokenless request).
pub const MAX_TOKEN_WAIT: Duration = Duration::from_secs(3);

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

impl TokenConfig {
    /// What is wrong with these settings, one line each.
    pub(super) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !(self.refresh_at > 0.0 && self.refresh_at < 1.0) {
            problems.push(format!(
                "token.refresh_at {} must be between 0 and 1 (a fraction of the lifetime)",
                self.refresh_at
            ));
        }
        if self.retry_min.is_zero() || self.retry_max < self.retry_min {
            problems.push("token.retry_min must be above 0 and not above token.retry_max".to_owned());
        }
        if self.ttl.is_some_and(|ttl| !ttl.is_zero() && ttl < Duration::from_secs(1)) {
            problems
                .push("token.ttl must be 0s (never expires) or at least 1s: Easemob counts whole seconds".to_owned());
        }
        if self.permanent_refresh < Duration::from_secs(60) {
            problems.push("token.permanent_refresh must be at least 1m".to_owned());
        }
        problems
    }
}
