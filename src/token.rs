//! The App Token, one [`TokenSource`] per app: fetched by a background task at start-up and refreshed once a
//! configured fraction of its lifetime has passed, never by the request path; one fetch in flight per app
//! whatever the concurrency; invalidated (compare-before-replace) when Easemob answers 401. `layers/token.rs` puts
//! it on every call; `layers/placeholder.rs` answers SDKs that ask for one themselves.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::{AppKey, TokenConfig};
use crate::metrics::Metrics;
use crate::upstream::{Upstream, UpstreamError};

/// A token is no longer used this long before Easemob says it expires (at most a tenth of its lifetime),
/// so a request never leaves with a token that dies on the way.
const EXPIRY_MARGIN: Duration = Duration::from_secs(60);
/// Longer lifetimes are treated as this: an absurd `expires_in` must not overflow the clock arithmetic.
const MAX_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// A token fetched because its predecessor got a 401, and refused itself before any success, is not replaced
/// again for this long: the credentials or the account are at fault, and fetching in a loop can get the account
/// banned. Meanwhile the 401s go to the callers.
const REFETCH_GUARD: Duration = Duration::from_secs(30);
/// A request waits at most this long for a first fetch in flight, then gets 503 like any tokenless request.
/// The jobs' lease is checked against it (`config::MAX_TOKEN_WAIT`).
const MAX_FETCH_WAIT: Duration = crate::config::MAX_TOKEN_WAIT;

/// A token Easemob issued. Holds only the ready `Authorization` value, marked sensitive; `Debug` shows no secret.
pub struct Token {
    authorization: HeaderValue,
    generation: u64,
    /// `None`: the token does not expire (`expires_in: 0`).
    usable_until: Option<Instant>,
    refresh_at: Instant,
    fetched_at: Instant,
    /// Fetched to replace a token Easemob refused.
    after_refusal: bool,
    /// Easemob accepted it at least once.
    proven: AtomicBool,
    /// Easemob's app UUID, echoed in the SDK drop-in answer.
    pub application: Option<String>,
}

impl Token {
    pub fn authorization(&self) -> &HeaderValue {
        &self.authorization
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Easemob answered something other than 401 with this token.
    pub fn mark_proven(&self) {
        if !self.proven.load(Ordering::Relaxed) {
            self.proven.store(true, Ordering::Relaxed);
        }
    }

    fn usable(&self, now: Instant) -> bool {
        self.usable_until.is_none_or(|until| now < until)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token").field("generation", &self.generation).finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token endpoint unreachable: {0}")]
    Transport(#[from] UpstreamError),
    #[error("token endpoint answered {status}: {error}: {description}")]
    Rejected { status: StatusCode, error: String, description: String },
    #[error("token endpoint answer unusable: {0}")]
    Malformed(String),
}

impl TokenError {
    fn result_label(&self) -> &'static str {
        match self {
            TokenError::Transport(_) => "unreachable",
            TokenError::Rejected { .. } => "rejected",
            TokenError::Malformed(_) => "malformed",
        }
    }
}

/// No usable token: the request is answered 503 at once, with this `Retry-After`.
#[derive(Debug)]
pub struct NoToken {
    pub retry_after: Duration,
}

/// What `/readyz` reports per app.
#[derive(Debug, serde::Serialize)]
pub struct TokenStatus {
    pub state: &'static str,
    /// Seconds until the current token stops being used; absent when there is none or it never expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in_seconds: Option<u64>,
}

/// What the admin status page shows of an app's token: its life, never the token itself.
#[derive(Debug, serde::Serialize)]
pub struct TokenDetail {
    /// `valid`, `failing` or `fetching`, as `/readyz` says.
    pub state: &'static str,
    /// Seconds since the token in use was fetched.
    pub age_seconds: Option<u64>,
    /// Seconds until it stops being used; `None` when there is none or it never expires.
    pub expires_in_seconds: Option<u64>,
    /// Seconds until the next refresh is due (0: due now, or a fetch is in flight).
    pub refresh_in_seconds: Option<u64>,
    /// Tokens fetched since start-up (or since the app's credentials changed).
    pub generation: u64,
    /// `ok`, or why the last fetch failed (Easemob's text already redacted).
    pub last_fetch: String,
}

#[derive(Debug, Default)]
struct State {
    token: Option<Arc<Token>>,
    /// A fetch is in flight.
    fetching: bool,
    /// Someone needs a fetch now (a 401 invalidated the token, or it ran out).
    wanted: bool,
    /// Set when the last fetch failed: when the next attempt is due. Cleared by a success.
    failed_until: Option<Instant>,
    generation: u64,
    /// The next token replaces one Easemob refused.
    replacing_refused: bool,
    /// Why the last fetch failed, while it is the last word: for a reload that waits for a new app's first token.
    last_error: Option<String>,
}

impl State {
    /// `valid`, `failing` or `fetching`.
    fn label(&self, now: Instant) -> &'static str {
        match self.usable(now) {
            Some(_) => "valid",
            None if self.failed_until.is_some() => "failing",
            None => "fetching",
        }
    }

    /// Seconds until the usable token stops being used; `None` when there is none or it never expires.
    fn expires_in(&self, now: Instant) -> Option<u64> {
        self.usable(now)?.usable_until.map(|u| u.saturating_duration_since(now).as_secs())
    }

    /// The current token, if it may still be used at `now`.
    fn usable(&self, now: Instant) -> Option<&Arc<Token>> {
        self.token.as_ref().filter(|t| t.usable(now))
    }
}

/// The client credentials of one app, and where to send them.
pub struct Credentials {
    pub org: String,
    pub app: String,
    pub client_id: String,
    pub client_secret: SecretString,
}

/// What a token endpoint granted, before the source turns it into a usable [`Token`].
#[derive(Debug, Deserialize)]
pub struct Grant {
    pub access_token: String,
    pub expires_in: u64,
    pub application: Option<String>,
}

type Fetching<'a> = Pin<Box<dyn Future<Output = Result<Grant, TokenError>> + Send + 'a>>;

/// Where grants come from: Easemob's token endpoint ([`EasemobFetch`]), or a stand-in in tests.
pub trait Fetch: Send + Sync + 'static {
    fn fetch(&self) -> Fetching<'_>;
    /// How long one fetch may take.
    fn timeout(&self) -> Duration;
}

/// Client credentials sent to `POST /{org}/{app}/token`.
pub struct EasemobFetch {
    pub credentials: Credentials,
    pub upstream: Upstream,
    /// Asked of Easemob as the token's lifetime; Easemob's default when absent.
    pub ttl: Option<Duration>,
}

pub struct TokenSource {
    app_key: AppKey,
    fetcher: Box<dyn Fetch>,
    config: TokenConfig,
    metrics: Metrics,
    state: watch::Sender<State>,
}

impl TokenSource {
    /// Creates the source and starts its background task, which fetches the first token at once and ends once
    /// the source is dropped (a reload removed the app or changed its credentials).
    pub fn spawn(app_key: AppKey, fetcher: impl Fetch, config: TokenConfig, metrics: Metrics) -> Arc<Self> {
        // Series exist from the start at 0, so rate() and alerts work before the first event.
        metrics.token_replays.with_label_values(&[app_key.as_str()]);
        for result in ["ok", "rejected", "unreachable", "malformed"] {
            metrics.token_fetches.with_label_values(&[app_key.as_str(), result]);
        }
        let source = Arc::new(TokenSource {
            app_key,
            fetcher: Box::new(fetcher),
            config,
            metrics,
            state: watch::Sender::new(State { wanted: true, ..State::default() }),
        });
        tokio::spawn(TokenSource::run(Arc::downgrade(&source), source.state.subscribe()));
        source
    }

    /// The current token if it is usable now: the request path's usual case, decided without a future.
    pub fn try_get(&self) -> Option<Arc<Token>> {
        self.state.borrow().usable(Instant::now()).map(Arc::clone)
    }

    /// A usable token. Waits (at most [`MAX_FETCH_WAIT`]) only while a fetch that has not failed yet is in flight
    /// (start-up, after a 401); once fetching has failed and no usable token is left, answers at once.
    pub async fn get(&self) -> Result<Arc<Token>, NoToken> {
        let mut rx = self.state.subscribe();
        let deadline = Instant::now() + MAX_FETCH_WAIT.min(self.fetcher.timeout());
        loop {
            {
                let state = rx.borrow_and_update();
                let now = Instant::now();
                if let Some(token) = state.usable(now) {
                    return Ok(Arc::clone(token));
                }
                if let Some(until) = state.failed_until {
                    return Err(NoToken { retry_after: until.saturating_duration_since(now) });
                }
            }
            // The token ran out between refreshes (a refresh that is not due yet): ask for a fetch now.
            self.state.send_if_modified(|s| {
                let idle = !s.fetching && !s.wanted && s.usable(Instant::now()).is_none();
                if idle {
                    s.wanted = true;
                }
                idle
            });
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return Err(NoToken { retry_after: Duration::from_secs(1) });
            }
        }
    }

    /// Easemob refused this token (401). Drops it if it is still the current one and asks for a new one.
    /// Returns whether a replay is worth it: false when the refused token is itself brand new.
    pub fn invalidate(&self, generation: u64) -> bool {
        let mut replace = true;
        self.state.send_if_modified(|s| {
            let Some(current) = s.token.as_ref().filter(|t| t.generation == generation) else {
                return false; // already replaced, or being replaced: the replay will get the new one
            };
            let suspect = current.after_refusal && !current.proven.load(Ordering::Relaxed);
            if suspect && current.fetched_at.elapsed() < REFETCH_GUARD {
                replace = false;
                return false;
            }
            warn!(app = %self.app_key, "easemob refused the app token; fetching a new one");
            s.token = None;
            s.replacing_refused = true;
            if !s.fetching {
                s.wanted = true;
            }
            true
        });
        if !replace {
            warn!(app = %self.app_key, "easemob refused the replacement token too; passing the 401 on");
        }
        replace
    }

    /// Waits for the first fetch's outcome, at most `within`: `Err` with the reason when it failed. A reload
    /// applies a new app or new credentials only once Easemob has granted a token with them.
    pub async fn first_outcome(&self, within: Duration) -> Result<(), String> {
        let mut rx = self.state.subscribe();
        let outcome = rx.wait_for(|s| s.token.is_some() || s.failed_until.is_some());
        match tokio::time::timeout(within, outcome).await {
            Ok(Ok(state)) if state.token.is_some() => Ok(()),
            Ok(Ok(state)) => Err(state.last_error.clone().unwrap_or_else(|| "the token fetch failed".to_owned())),
            Ok(Err(_)) => unreachable!("the sender lives in self"),
            Err(_) => Err(format!("no answer from the token endpoint within {within:?}")),
        }
    }

    /// The settings the source refreshes by.
    pub fn config(&self) -> &TokenConfig {
        &self.config
    }

    pub fn is_ready(&self) -> bool {
        self.state.borrow().usable(Instant::now()).is_some()
    }

    pub fn status(&self) -> TokenStatus {
        let state = self.state.borrow();
        let now = Instant::now();
        TokenStatus { state: state.label(now), expires_in_seconds: state.expires_in(now) }
    }

    /// The token's life for the status page.
    pub fn detail(&self) -> TokenDetail {
        let state = self.state.borrow();
        let now = Instant::now();
        let token = state.token.as_deref();
        TokenDetail {
            state: state.label(now),
            age_seconds: token.map(|t| now.saturating_duration_since(t.fetched_at).as_secs()),
            expires_in_seconds: state.expires_in(now),
            refresh_in_seconds: token.map(|t| t.refresh_at.saturating_duration_since(now).as_secs()),
            generation: state.generation,
            last_fetch: state.last_error.clone().unwrap_or_else(|| "ok".to_owned()),
        }
    }

    /// Easemob's app UUID from the last token answer, if any.
    pub fn application(&self) -> Option<String> {
        self.state.borrow().token.as_ref().and_then(|t| t.application.clone())
    }

    /// The background task. Holds the source only while it fetches, so that dropping the source ends it.
    async fn run(source: Weak<Self>, mut rx: watch::Receiver<State>) {
        let Some(config) = source.upgrade().map(|s| s.config.clone()) else { return };
        let mut backoff = config.retry_min;
        let mut last_fetch: Option<Instant> = None;
        loop {
            if let Some(last) = last_fetch {
                tokio::time::sleep_until(last + config.min_interval).await;
            }
            let Some(this) = source.upgrade() else { return };
            this.state.send_modify(|s| {
                s.fetching = true;
                s.wanted = false;
            });
            last_fetch = Some(Instant::now());
            let next_fetch = match this.fetch().await {
                Ok(token) => {
                    backoff = config.retry_min;
                    let refresh_at = token.refresh_at;
                    this.state.send_modify(|s| {
                        s.token = Some(Arc::new(token));
                        s.fetching = false;
                        s.failed_until = None;
                        s.last_error = None;
                    });
                    refresh_at
                }
                Err(e) => {
                    this.metrics.token_fetches.with_label_values(&[this.app_key.as_str(), e.result_label()]).inc();
                    // Equal jitter: half fixed, half random, so replicas that failed together spread out.
                    let delay = backoff / 2 + backoff.mul_f64(fastrand::f64() / 2.0);
                    backoff = (backoff * 2).min(config.retry_max);
                    let retry_at = Instant::now() + delay;
                    let still_serving = this.is_ready();
                    warn!(app = %this.app_key, error = %e, retry_in = ?delay, still_serving, "app token fetch failed");
                    this.state.send_modify(|s| {
                        s.fetching = false;
                        s.failed_until = Some(retry_at);
                        s.last_error = Some(e.to_string());
                    });
                    retry_at
                }
            };
            drop(this);
            tokio::select! {
                _ = tokio::time::sleep_until(next_fetch) => {}
                wanted = rx.wait_for(|s| s.wanted) => if wanted.is_err() { return },
            }
        }
    }

    async fn fetch(&self) -> Result<Token, TokenError> {
        let sent_at = Instant::now();
        let answer = self.fetcher.fetch().await?;
        if answer.access_token.is_empty() {
            return Err(TokenError::Malformed("empty access_token".to_owned()));
        }
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", answer.access_token))
            .map_err(|_| TokenError::Malformed("access_token is not a valid header value".to_owned()))?;
        authorization.set_sensitive(true);
        let (usable_until, refresh_at, expires_at_unix) = if answer.expires_in == 0 {
            (None, sent_at + self.config.permanent_refresh, 0)
        } else {
            let lifetime = Duration::from_secs(answer.expires_in).min(MAX_LIFETIME);
            let margin = EXPIRY_MARGIN.min(lifetime / 10);
            let unix_now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            (
                Some(sent_at + lifetime - margin),
                sent_at + lifetime.mul_f64(self.config.refresh_at),
                (unix_now + lifetime).as_secs() as i64,
            )
        };
        let mut after_refusal = false;
        let mut generation = 0;
        self.state.send_modify(|s| {
            s.generation += 1;
            generation = s.generation;
            after_refusal = std::mem::take(&mut s.replacing_refused);
        });
        self.metrics.token_fetches.with_label_values(&[self.app_key.as_str(), "ok"]).inc();
        self.metrics.token_expires_at.with_label_values(&[self.app_key.as_str()]).set(expires_at_unix);
        info!(app = %self.app_key, expires_in = answer.expires_in, generation, "app token fetched");
        Ok(Token {
            authorization,
            generation,
            usable_until,
            refresh_at,
            fetched_at: sent_at,
            after_refusal,
            proven: AtomicBool::new(false),
            application: answer.application,
        })
    }
}

impl Fetch for EasemobFetch {
    fn fetch(&self) -> Fetching<'_> {
        Box::pin(async move {
            let c = &self.credentials;
            let redactor = self.upstream.redactor();
            // Held before it is sent: an answer that repeats it is scrubbed as it arrives.
            redactor.hold(c.client_secret.expose_secret());
            let mut body = serde_json::json!({
                "grant_type": "client_credentials",
                "client_id": c.client_id,
                "client_secret": c.client_secret.expose_secret(),
            });
            if let Some(ttl) = self.ttl {
                body["ttl"] = ttl.as_secs().into();
            }
            let uri = self
                .upstream
                .uri(&c.org, &c.app, None, |url| url.push_str("/token"))
                .map_err(|e| TokenError::Malformed(format!("building the request: {e}")))?;
            let response =
                self.upstream.send(self.upstream.request(Method::POST, uri, Bytes::from(body.to_string()))).await?;
            if response.status() != StatusCode::OK {
                #[derive(Deserialize, Default)]
                struct Envelope {
                    #[serde(default)]
                    error: String,
                    #[serde(default)]
                    error_description: String,
                }
                let envelope: Envelope = serde_json::from_slice(response.body()).unwrap_or_default();
                return Err(TokenError::Rejected {
                    status: response.status(),
                    error: envelope.error,
                    description: envelope.error_description,
                });
            }
            // serde's message can quote the answer, and a grant that does not parse holds a token not held yet: only
            // where it went wrong is reported.
            let grant: Grant = serde_json::from_slice(response.body()).map_err(|e| {
                TokenError::Malformed(format!(
                    "unexpected JSON ({:?} error at line {} column {})",
                    e.classify(),
                    e.line(),
                    e.column()
                ))
            })?;
            // Held before any call carries it: an answer that echoes it (`Authorization`) is scrubbed.
            redactor.hold(&grant.access_token);
            Ok(grant)
        })
    }

    fn timeout(&self) -> Duration {
        self.upstream.timeout()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing::{self, ScriptedFetch, grant, refused};

    fn config() -> TokenConfig {
        TokenConfig { min_interval: Duration::from_millis(10), ..TokenConfig::default() }
    }

    /// Lets the source's background task run what is due now.
    pub(crate) async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_fetch() {
        let fetch = ScriptedFetch::new(Duration::from_millis(200), |n| Ok(grant(&format!("tok-{n}"), 3600)));
        let source = testing::source(&fetch, config());
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let source = Arc::clone(&source);
                tokio::spawn(async move { source.get().await.map(|t| t.generation()) })
            })
            .collect();
        for caller in callers {
            assert_eq!(caller.await.unwrap().unwrap(), 1);
        }
        assert_eq!(fetch.count(), 1, "one fetch in flight per app, whatever the concurrency");
    }

    #[tokio::test(start_paused = true)]
    async fn the_token_is_refreshed_once_the_configured_fraction_of_its_life_has_passed() {
        let fetch = ScriptedFetch::granting(100);
        let source = testing::source(&fetch, TokenConfig { refresh_at: 0.75, ..config() });
        assert_eq!(source.get().await.unwrap().generation(), 1);
        tokio::time::sleep(Duration::from_millis(74_900)).await;
        assert_eq!(fetch.count(), 1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        settle().await;
        assert_eq!(fetch.count(), 2, "refreshed at 75 s, before it expires");
        assert_eq!(source.get().await.unwrap().generation(), 2);
        let times = fetch.fetches.lock().unwrap().clone();
        assert_eq!(times[1] - times[0], Duration::from_secs(75));
    }

    #[tokio::test(start_paused = true)]
    async fn failed_fetches_back_off_with_jitter_up_to_the_maximum() {
        let fetch = ScriptedFetch::new(Duration::ZERO, |_| Err(refused()));
        let config = TokenConfig { retry_min: Duration::from_secs(1), retry_max: Duration::from_secs(8), ..config() };
        let _source = testing::source(&fetch, config);
        tokio::time::sleep(Duration::from_secs(60)).await;
        let times = fetch.fetches.lock().unwrap().clone();
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.len() >= 7, "{gaps:?}");
        let mut backoff = Duration::from_secs(1);
        for gap in &gaps {
            // Equal jitter: between half the backoff and all of it.
            assert!(*gap >= backoff / 2 && *gap <= backoff, "{gap:?} for a backoff of {backoff:?}: {gaps:?}");
            backoff = (backoff * 2).min(Duration::from_secs(8));
        }
        assert!(gaps.windows(2).any(|w| w[0] != w[1] && w[0] >= Duration::from_secs(4)), "jittered: {gaps:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_token_and_after_a_failure_callers_are_answered_at_once() {
        let fetch = ScriptedFetch::new(Duration::ZERO, |_| Err(refused()));
        let source = testing::source(&fetch, TokenConfig { retry_min: Duration::from_secs(4), ..config() });
        settle().await;
        let asked = Instant::now();
        let no_token = source.get().await.unwrap_err();
        assert_eq!(asked.elapsed(), Duration::ZERO, "a fast 503, not a wait");
        assert!(no_token.retry_after > Duration::ZERO && no_token.retry_after <= Duration::from_secs(4));
        assert_eq!(source.status().state, "failing");
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_source_stops_fetching() {
        let fetch = ScriptedFetch::granting(100);
        let source = testing::source(&fetch, config());
        assert_eq!(source.first_outcome(Duration::from_secs(1)).await, Ok(()));
        drop(source);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(fetch.count(), 1, "no refresh for an app a reload removed");
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_outcome_says_why_no_token_was_granted() {
        let fetch = ScriptedFetch::new(Duration::ZERO, |_| Err(refused()));
        let source = testing::source(&fetch, config());
        let reason = source.first_outcome(Duration::from_secs(1)).await.unwrap_err();
        assert!(reason.contains("401") && reason.contains("invalid_grant"), "{reason}");
        let slow = ScriptedFetch::new(Duration::from_secs(5), |_| Ok(grant("t", 100)));
        let source = testing::source(&slow, config());
        assert!(source.first_outcome(Duration::from_secs(1)).await.unwrap_err().contains("within"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_401_replaces_the_current_token_only() {
        let fetch = ScriptedFetch::granting(3600);
        let source = testing::source(&fetch, config());
        let first = source.get().await.unwrap();
        first.mark_proven();
        assert!(source.invalidate(first.generation()), "a replay is worth it");
        assert_eq!(source.get().await.unwrap().generation(), 2);
        assert_eq!(fetch.count(), 2);
        // A late 401 for the token already replaced: the replay will use the new one, nothing is fetched.
        assert!(source.invalidate(first.generation()));
        settle().await;
        assert_eq!(fetch.count(), 2, "compare before replace");
    }

    #[tokio::test(start_paused = true)]
    async fn a_replacement_refused_before_any_success_is_not_replaced_again_for_a_while() {
        let fetch = ScriptedFetch::granting(3600);
        let source = testing::source(&fetch, config());
        let first = source.get().await.unwrap();
        assert!(source.invalidate(first.generation()));
        let replacement = source.get().await.unwrap();
        assert!(!source.invalidate(replacement.generation()), "no fetch loop when the credentials are at fault");
        settle().await;
        assert_eq!(fetch.count(), 2);
        tokio::time::sleep(REFETCH_GUARD).await;
        assert!(source.invalidate(replacement.generation()), "tried again after the guard");
    }
}
