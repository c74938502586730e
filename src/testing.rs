//! Test doubles for the layers' unit tests, so each layer is tested alone with `oneshot`, no sockets, and paused
//! time where it matters: a scripted token endpoint, an app built around it, exchanges and answers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Response, StatusCode};
use tokio::time::Instant;

use crate::apps::App;
use crate::config::{AppKey, RateLimitConfig, TokenConfig};
use crate::error::GatewayError;
use crate::exchange::{Answer, Exchange, Marks, Validated};
use crate::metrics::Metrics;
use crate::ratelimit::{AppIndex, QuotaSet};
use crate::routes::Route;
use crate::routes::validate::Call;
use crate::token::{Fetch, Grant, TokenError, TokenSource};

type Script = Box<dyn FnMut(usize) -> Result<Grant, TokenError> + Send>;

/// A token endpoint answering from a script (called with the fetch's number, from 0), after `delay`.
#[derive(Clone)]
pub struct ScriptedFetch {
    script: Arc<Mutex<Script>>,
    delay: Duration,
    /// When each fetch started.
    pub fetches: Arc<Mutex<Vec<Instant>>>,
}

impl ScriptedFetch {
    pub fn new(delay: Duration, script: impl FnMut(usize) -> Result<Grant, TokenError> + Send + 'static) -> Self {
        ScriptedFetch { script: Arc::new(Mutex::new(Box::new(script))), delay, fetches: Arc::default() }
    }

    /// Grants `tok-N` tokens living `expires_in` seconds, at once.
    pub fn granting(expires_in: u64) -> Self {
        ScriptedFetch::new(Duration::ZERO, move |n| Ok(grant(&format!("tok-{n}"), expires_in)))
    }

    pub fn count(&self) -> usize {
        self.fetches.lock().unwrap().len()
    }
}

impl Fetch for ScriptedFetch {
    fn fetch(&self) -> std::pin::Pin<Box<dyn Future<Output = Result<Grant, TokenError>> + Send + '_>> {
        Box::pin(async move {
            let n = {
                let mut fetches = self.fetches.lock().unwrap();
                fetches.push(Instant::now());
                fetches.len() - 1
            };
            tokio::time::sleep(self.delay).await;
            (self.script.lock().unwrap())(n)
        })
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(10)
    }
}

pub fn grant(token: &str, expires_in: u64) -> Grant {
    Grant { access_token: token.to_owned(), expires_in, application: None }
}

pub fn refused() -> TokenError {
    TokenError::Rejected { status: StatusCode::UNAUTHORIZED, error: "invalid_grant".into(), description: String::new() }
}

/// A token source on a scripted endpoint (`min_interval` out of the way unless the config says otherwise).
pub fn source(fetch: &ScriptedFetch, config: TokenConfig) -> Arc<TokenSource> {
    TokenSource::spawn(AppKey::new("o", "a"), fetch.clone(), config, Metrics::new())
}

/// The app `o#a` with the default quota (unless `quota` says otherwise) and a token from `fetch`.
pub fn app(fetch: &ScriptedFetch, quota: &Arc<QuotaSet>) -> Arc<App> {
    measured_app(fetch, quota, &Metrics::new())
}

/// [`app`], its lanes counted in `metrics`.
pub fn measured_app(fetch: &ScriptedFetch, quota: &Arc<QuotaSet>, metrics: &Metrics) -> Arc<App> {
    let token = TokenSource::spawn(AppKey::new("o", "a"), fetch.clone(), TokenConfig::default(), metrics.clone());
    Arc::new(App::new(AppIndex(0), ("o", "a"), token, [0; 32], quota, metrics))
}

pub fn quota(config: RateLimitConfig) -> Arc<QuotaSet> {
    QuotaSet::new(&config, &[AppKey::new("o", "a")], Metrics::new()).unwrap()
}

/// `clear_user_messages` for `user`.
pub fn clear(user: &str) -> Call {
    Call::parse(Route::ClearUserMessages, user, None, b"", 0).unwrap()
}

/// A job operation's body as the jobs API receives it: its JSON text.
pub fn raw(body: serde_json::Value) -> Box<serde_json::value::RawValue> {
    serde_json::value::to_raw_value(&body).expect("a JSON value serializes")
}

pub fn exchange(app: &Arc<App>, call: Call) -> Exchange {
    Exchange::new(Validated {
        app: Arc::clone(app),
        call,
        request_id: None,
        received: None,
        caller: None,
        respond_async: false,
        trace: crate::trace::TraceContext::start(),
        spans: None,
        job_attempt: None,
        audited: Default::default(),
        deadline: Default::default(),
    })
}

/// The error a layer failed with; a test that expected one fails on an answer.
pub fn failed(result: Result<Answer, GatewayError>) -> GatewayError {
    match result {
        Ok(answer) => panic!("answered {} where a failure was expected", answer.status()),
        Err(e) => e,
    }
}

/// A request with nothing in it, for layers that look at none of it.
pub fn request() -> http::Request<()> {
    http::Request::new(())
}

/// An answer as Easemob's would come up the stack.
pub fn easemob(status: u16) -> Answer {
    easemob_with_body(status, bytes::Bytes::new())
}

/// An answer as Easemob's would come up the stack, with this body.
pub fn easemob_with_body(status: u16, body: bytes::Bytes) -> Answer {
    let mut answer = Response::new(crate::exchange::Stamped::new(body));
    *answer.status_mut() = StatusCode::from_u16(status).unwrap();
    answer.stamp_mut().from_easemob = true;
    answer
}

/// A service answering (or failing) from a script (called with the call's number, from 0) and counting its calls.
/// Each call starts its request's deadline, as the forwarding does.
pub fn upstream<F>(
    mut script: F,
) -> (
    impl tower::Service<Exchange, Response = Answer, Error = GatewayError, Future: Send> + Clone + Send + 'static,
    Arc<AtomicUsize>,
)
where
    F: FnMut(usize, &Exchange) -> Result<Answer, GatewayError> + Send + 'static,
{
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let script = Arc::new(Mutex::new(move |n: usize, e: &Exchange| script(n, e)));
    let service = tower::service_fn(move |exchange: Exchange| {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        exchange.deadline.start(Duration::from_secs(10));
        // A script that panicked (as a test may make it) answers the next call all the same.
        std::future::ready((script.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))(n, &exchange))
    });
    (service, calls)
}
