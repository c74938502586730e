//! Load shedding: at most `server.max_in_flight` requests are handled at once, and past that a newcomer is
//! answered 503 at once rather than queued without bound; a fast refusal lets callers back off while we recover.
//! tower's concurrency limit and load shed do the work (readiness is the in-flight permit); this layer turns
//! tower's overload signal into the gateway's answer.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::sync::Semaphore;
use tower::limit::ConcurrencyLimit;
use tower::load_shed::LoadShed;
use tower::load_shed::error::Overloaded;
use tower::{BoxError, Layer, Service};
use tracing::error;

use crate::error::GatewayError;
use crate::exchange::Answer;

#[derive(Clone)]
pub struct ShedLayer {
    /// Shared by every connection and worker: the limit is the process's.
    in_flight: Arc<Semaphore>,
}

impl ShedLayer {
    pub fn new(in_flight: Arc<Semaphore>) -> ShedLayer {
        ShedLayer { in_flight }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Shed<S> {
        Shed { inner: LoadShed::new(ConcurrencyLimit::with_semaphore(inner, Arc::clone(&self.in_flight))) }
    }
}

#[derive(Clone)]
pub struct Shed<S> {
    inner: LoadShed<ConcurrencyLimit<S>>,
}

impl<S, R> Service<R> for Shed<S>
where
    S: Service<R, Response = Answer, Error = Infallible>,
{
    type Response = Answer;
    type Error = Infallible;
    type Future = Shedding<<LoadShed<ConcurrencyLimit<S>> as Service<R>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Load shed is always ready: without a permit it answers the next call with `Overloaded`.
        let _ = ready!(self.inner.poll_ready(cx));
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: R) -> Self::Future {
        Shedding { inner: self.inner.call(request) }
    }
}

pin_project_lite::pin_project! {
    pub struct Shedding<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Future for Shedding<F>
where
    F: Future<Output = Result<Answer, BoxError>>,
{
    type Output = Result<Answer, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(Ok(match ready!(self.project().inner.poll(cx)) {
            Ok(answer) => answer,
            Err(e) if e.is::<Overloaded>() => GatewayError::Overloaded.into_response(std::time::Instant::now()),
            // The layers below answer everything themselves: their error type is `Infallible`.
            Err(e) => {
                error!(error = %e, "unexpected error below load shedding");
                GatewayError::Internal.into_response(std::time::Instant::now())
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::Marks;
    use tower::ServiceExt;

    #[tokio::test]
    async fn past_the_limit_a_request_is_answered_503_at_once_and_a_freed_permit_serves_again() {
        let in_flight = Arc::new(Semaphore::new(1));
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let released = Arc::new(tokio::sync::Mutex::new(Some(released)));
        let slow = tower::service_fn(move |_: ()| {
            let released = Arc::clone(&released);
            async move {
                if let Some(wait) = released.lock().await.take() {
                    let _ = wait.await;
                }
                Ok::<_, Infallible>(Answer::default())
            }
        });
        let service = ShedLayer::new(Arc::clone(&in_flight)).layer(slow);
        let holding = tokio::spawn(service.clone().oneshot(()));
        while in_flight.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        let shed = service.clone().oneshot(()).await.unwrap();
        assert_eq!(shed.status(), 503);
        assert_eq!(shed.rejection(), Some("overloaded"));
        assert_eq!(shed.headers()["retry-after"], "1");
        release.send(()).unwrap();
        assert_eq!(holding.await.unwrap().unwrap().status(), 200);
        assert_eq!(service.oneshot(()).await.unwrap().status(), 200, "the permit came back");
    }
}
