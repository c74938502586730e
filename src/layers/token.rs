//! The token as a layer: every call leaves with the app's token, and a call Easemob refuses with 401 is replayed
//! once with a fresh one.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::future::Either;
use http::StatusCode;
use prometheus::IntCounterVec;
use tower::{Layer, Service, ServiceExt};

use crate::apps::App;
use crate::error::GatewayError;
use crate::exchange::{Answer, AttemptKind, Exchange, Waiting};
use crate::metrics::Metrics;
use crate::token::{Token, TokenSource};
use crate::trace::export::TokenWait;

/// Puts the app's token on every call, and when Easemob refuses it (401) replaces it once and replays the call;
/// a second 401 goes to the caller. Sits outside the quota: a call that cannot get a token costs no slot, and a
/// replay pays for its own (Easemob counts it).
#[derive(Clone)]
pub struct TokenLayer {
    /// Each app's token source, by its index: handed over when the stack is built, not read off each request.
    tokens: Arc<[Arc<TokenSource>]>,
    replays: IntCounterVec,
}

impl TokenLayer {
    /// For `apps`, in their config order (their [`App::index`]).
    pub fn new<'a>(metrics: &Metrics, apps: impl IntoIterator<Item = &'a Arc<App>>) -> TokenLayer {
        let tokens = apps.into_iter().map(|app| Arc::clone(&app.token)).collect();
        TokenLayer { tokens, replays: metrics.token_replays.clone() }
    }
}

impl<S> Layer<S> for TokenLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize { inner, tokens: Arc::clone(&self.tokens), replays: self.replays.clone() }
    }
}

#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    tokens: Arc<[Arc<TokenSource>]>,
    replays: IntCounterVec,
}

impl<S> Service<Exchange> for Authorize<S>
where
    S: Service<Exchange, Response = Answer, Error = GatewayError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Answer;
    type Error = GatewayError;
    /// With a token at hand (the common case) a named future, no box; waiting for a fetch, boxed.
    type Future = Either<Attempt<S>, Waiting<GatewayError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, exchange: Exchange) -> Self::Future {
        let replays = self.replays.clone();
        let source = Arc::clone(&self.tokens[exchange.app.index.0]);
        if let Some(token) = source.try_get() {
            if let Some(spans) = &exchange.spans {
                spans.token(Instant::now(), TokenWait::Cached);
            }
            let exchange = exchange.with_token(Arc::clone(&token));
            // The ready service takes this call; a replay readies a clone of it.
            let replay = Replay { inner: self.inner.clone(), exchange: exchange.clone(), source, token, replays };
            return Either::Left(Attempt::First { answer: self.inner.call(exchange), replay: Some(replay) });
        }
        let inner = self.inner.clone();
        Either::Right(Box::pin(async move {
            let token = wait_for_token(&source, &exchange).await?;
            let exchange = exchange.with_token(Arc::clone(&token));
            let mut first = inner.clone();
            let answer = first.ready().await?.call(exchange.clone());
            Attempt::First { answer, replay: Some(Replay { inner, exchange, source, token, replays }) }.await
        }))
    }
}

pin_project_lite::pin_project! {
    /// A call with a token, and its one replay if Easemob refuses the token.
    #[project = AttemptProj]
    pub enum Attempt<S> where S: Service<Exchange> {
        First { #[pin] answer: S::Future, replay: Option<Replay<S>> },
        Replaying { answer: Waiting<GatewayError> },
    }
}

impl<S> Future for Attempt<S>
where
    S: Service<Exchange, Response = Answer, Error = GatewayError> + Send + 'static,
    S::Future: Send,
{
    type Output = Result<Answer, GatewayError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project() {
                AttemptProj::First { answer, replay } => {
                    let result = std::task::ready!(answer.poll(cx));
                    let replay = replay.take().expect("polled after completion");
                    match replay.after(result) {
                        Ok(result) => return Poll::Ready(result),
                        Err(replaying) => self.set(Attempt::Replaying { answer: replaying }),
                    }
                }
                AttemptProj::Replaying { answer } => return answer.as_mut().poll(cx),
            }
        }
    }
}

/// What a replay needs: the service, the call, the app's token source, and the token Easemob may refuse.
pub struct Replay<S> {
    inner: S,
    exchange: Exchange,
    source: Arc<TokenSource>,
    token: Arc<Token>,
    replays: IntCounterVec,
}

impl<S> Replay<S>
where
    S: Service<Exchange, Response = Answer, Error = GatewayError> + Send + 'static,
    S::Future: Send,
{
    /// The first result, or the replay to wait for instead: when Easemob refused (401) a token that is still the
    /// current one (it died early, as Easemob warns it can), it is replaced once and the call replayed.
    fn after(
        self,
        result: Result<Answer, GatewayError>,
    ) -> Result<Result<Answer, GatewayError>, Waiting<GatewayError>> {
        let Replay { mut inner, exchange, source, token, replays } = self;
        // The gateway's own failure: Easemob said nothing of the token.
        let Ok(answer) = result else { return Ok(result) };
        if answer.status() != StatusCode::UNAUTHORIZED {
            token.mark_proven();
            return Ok(Ok(answer));
        }
        if !source.invalidate(token.generation()) {
            return Ok(Ok(answer));
        }
        replays.with_label_values(&[exchange.app.key.as_str()]).inc();
        Err(Box::pin(async move {
            let token = wait_for_token(&source, &exchange).await?;
            let replay = exchange.again(AttemptKind::TokenReplay, None).with_token(Arc::clone(&token));
            match inner.ready().await?.call(replay).await {
                // The quota had no slot for the replay in time: Easemob's own answer stands.
                Err(GatewayError::RateLimited { .. }) => Ok(answer),
                Ok(replayed) => {
                    if replayed.status() != StatusCode::UNAUTHORIZED {
                        token.mark_proven();
                    }
                    Ok(replayed)
                }
                Err(e) => Err(e),
            }
        }))
    }
}

/// Waits for the app's token (the first one, or the replacement of one Easemob refused), noting the wait on the
/// request's spans when they are recorded; without a valid token, the gateway's 503.
async fn wait_for_token(source: &TokenSource, exchange: &Exchange) -> Result<Arc<Token>, GatewayError> {
    let since = exchange.spans.is_some().then(Instant::now);
    let token = source.get().await;
    if let (Some(spans), Some(since)) = (&exchange.spans, since) {
        spans.token(since, if token.is_ok() { TokenWait::Fetched } else { TokenWait::Unavailable });
    }
    token.map_err(|e| GatewayError::NoToken { retry_after: e.retry_after })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use http::HeaderValue;

    use super::*;
    use crate::exchange::ErrorKind;
    use crate::exchange::Marks;
    use crate::ratelimit::RateLimitHeaders;
    use crate::testing::{self, ScriptedFetch, refused};
    use crate::token::tests::settle;

    #[tokio::test(start_paused = true)]
    async fn the_token_layer_replays_once_with_a_new_token_after_a_401() {
        let fetch = ScriptedFetch::granting(3600);
        let app = testing::app(&fetch, &testing::quota(Default::default()));
        let (easemob, calls) = testing::upstream(|n, exchange| {
            let token = exchange.token().unwrap().generation();
            Ok(testing::easemob(if n == 0 {
                assert_eq!(token, 1);
                401
            } else {
                assert_eq!(token, 2);
                200
            }))
        });
        let answer = TokenLayer::new(&Metrics::new(), [&app])
            .layer(easemob)
            .oneshot(testing::exchange(&app, testing::clear("u")))
            .await;
        assert_eq!(answer.unwrap().status(), 200);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_401_or_a_replay_the_quota_refuses_gives_the_caller_easemobs_401() {
        let fetch = ScriptedFetch::granting(3600);
        let app = testing::app(&fetch, &testing::quota(Default::default()));
        let (easemob, calls) = testing::upstream(|_, _| Ok(testing::easemob(401)));
        let layer = TokenLayer::new(&Metrics::new(), [&app]);
        let answer = layer.layer(easemob).oneshot(testing::exchange(&app, testing::clear("u"))).await.unwrap();
        assert_eq!((answer.status(), calls.load(Ordering::SeqCst)), (StatusCode::UNAUTHORIZED, 2), "one replay only");

        let (quota_refuses, _) = testing::upstream(|n, _| match n {
            0 => Ok(testing::easemob(401)),
            _ => Err(GatewayError::RateLimited {
                retry_after: Duration::from_secs(1),
                limit: RateLimitHeaders { policy: HeaderValue::from_static("p"), limit: HeaderValue::from_static("l") },
            }),
        });
        let answer = layer.layer(quota_refuses).oneshot(testing::exchange(&app, testing::clear("u"))).await.unwrap();
        assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
        assert!(answer.is_from_easemob());
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_token_the_layer_answers_503_and_sends_nothing() {
        let fetch = ScriptedFetch::new(Duration::ZERO, |_| Err(refused()));
        let app = testing::app(&fetch, &testing::quota(Default::default()));
        settle().await;
        let (easemob, calls) = testing::upstream(|_, _| Ok(testing::easemob(200)));
        let failed = TokenLayer::new(&Metrics::new(), [&app])
            .layer(easemob)
            .oneshot(testing::exchange(&app, testing::clear("u")))
            .await;
        let Err(GatewayError::NoToken { retry_after }) = failed else { panic!("{:?}", failed.map(|a| a.status())) };
        let answer = GatewayError::NoToken { retry_after }.into_response(std::time::Instant::now());
        assert_eq!((answer.status(), answer.rejection()), (StatusCode::SERVICE_UNAVAILABLE, Some(ErrorKind::NoToken)));
        assert!(answer.headers().contains_key("retry-after"));
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }
}
