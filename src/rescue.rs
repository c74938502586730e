//! The one layer that turns failures into answers (linkerd2-proxy's `ServerRescue`): every layer below it fails
//! with a typed error, and here each becomes Easemob's error envelope with the gateway's marker, labelled with the
//! app and route the request named. Right under observe, so observe sees every answer, refusals included.

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::future::Either;
use http::Request;
use tower::{Layer, Service};

use crate::error::Failure;
use crate::exchange::Answer;

#[derive(Clone, Copy, Debug, Default)]
pub struct RescueLayer;

impl<S> Layer<S> for RescueLayer {
    type Service = Rescue<S>;

    fn layer(&self, inner: S) -> Rescue<S> {
        Rescue { inner, unready: None }
    }
}

pub struct Rescue<S> {
    inner: S,
    /// Why the layers below could not take a request: the answer to the next one.
    unready: Option<Failure>,
}

impl<S: Clone> Clone for Rescue<S> {
    fn clone(&self) -> Rescue<S> {
        Rescue { inner: self.inner.clone(), unready: None }
    }
}

impl<S, B> Service<Request<B>> for Rescue<S>
where
    S: Service<Request<B>, Response = Answer, Error = Failure>,
{
    type Response = Answer;
    type Error = Infallible;
    type Future = Rescued<Either<S::Future, Ready<Result<Answer, Failure>>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.unready.is_none()
            && let Err(failure) = std::task::ready!(self.inner.poll_ready(cx))
        {
            self.unready = Some(failure);
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let inner = match self.unready.take() {
            None => Either::Left(self.inner.call(request)),
            Some(failure) => Either::Right(ready(Err(failure))),
        };
        Rescued { inner, started: Instant::now() }
    }
}

pin_project_lite::pin_project! {
    pub struct Rescued<F> {
        #[pin]
        inner: F,
        // When the request arrived, for the envelope's `duration`.
        started: Instant,
    }
}

impl<F> Future for Rescued<F>
where
    F: Future<Output = Result<Answer, Failure>>,
{
    type Output = Result<Answer, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        Poll::Ready(Ok(match std::task::ready!(this.inner.poll(cx)) {
            Ok(answer) => answer,
            Err(Failure { error, labels }) => {
                let mut answer = error.into_response(*this.started);
                labels.apply(&mut answer);
                answer
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderValue, StatusCode};
    use tower::{ServiceExt, service_fn};

    use super::*;
    use crate::error::{GATEWAY_HEADER, GatewayError};
    use crate::exchange::ErrorKind;
    use crate::exchange::{Labels, Marks};
    use crate::ratelimit::{RATELIMIT_POLICY, RateLimitHeaders};
    use crate::routes::Route;
    use crate::testing::{self, ScriptedFetch};

    #[tokio::test(start_paused = true)]
    async fn an_error_becomes_an_enveloped_answer_labelled_with_its_lane_and_an_answer_passes_unchanged() {
        let app = testing::app(&ScriptedFetch::granting(3600), &testing::quota(Default::default()));
        let labels = Labels { app: Some(app), route: Some(Route::ClearUserMessages), ..Labels::default() };
        let inner = service_fn(move |failing: Request<bool>| {
            let labels = labels.clone();
            async move {
                match *failing.body() {
                    true => Err(Failure { error: GatewayError::UpstreamTimeout, labels }),
                    false => Ok(testing::easemob(200)),
                }
            }
        });
        let service = RescueLayer.layer(inner);
        let failed = service.clone().oneshot(Request::new(true)).await.unwrap();
        assert_eq!(
            (failed.status(), failed.rejection()),
            (StatusCode::GATEWAY_TIMEOUT, Some(ErrorKind::UpstreamTimeout))
        );
        assert_eq!(failed.headers()[GATEWAY_HEADER], "upstream-error");
        assert_eq!(failed.headers()[RATELIMIT_POLICY], "\"clear_user_messages\";q=100;w=1", "the lane's policy");
        assert_eq!(failed.stamp().labels.route, Some(Route::ClearUserMessages));
        let passed = service.oneshot(Request::new(false)).await.unwrap();
        assert_eq!((passed.status(), passed.rejection(), passed.is_from_easemob()), (StatusCode::OK, None, true));
        assert!(!passed.headers().contains_key(GATEWAY_HEADER));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_naming_its_own_limit_keeps_it() {
        let limit = RateLimitHeaders { policy: HeaderValue::from_static("p"), limit: HeaderValue::from_static("l") };
        let app = testing::app(&ScriptedFetch::granting(3600), &testing::quota(Default::default()));
        let labels = Labels { app: Some(app), route: Some(Route::ClearUserMessages), ..Labels::default() };
        let inner = service_fn(move |_: Request<()>| {
            let (limit, labels) = (limit.clone(), labels.clone());
            let error = GatewayError::RateLimited { retry_after: std::time::Duration::from_secs(1), limit };
            async move { Err::<Answer, _>(Failure { error, labels }) }
        });
        let refused = RescueLayer.layer(inner).oneshot(Request::new(())).await.unwrap();
        assert_eq!((refused.status().as_u16(), refused.headers()[RATELIMIT_POLICY].to_str().unwrap()), (429, "p"));
        assert_eq!(refused.headers()["retry-after"], "1");
    }
}
