//! Load shedding: at most `server.max_in_flight` requests are handled at once, and past that a newcomer is
//! answered 503 at once rather than queued without bound; a fast refusal lets callers back off while we recover.
//! Readiness is the in-flight permit: `poll_ready` takes one if there is one, never waits for one.
//!
//! Not tower's `LoadShed` over `ConcurrencyLimit`, though together they shed the same requests: the concurrency
//! limit's `poll_ready` registers a waiter on the semaphore when it finds no permit, so a connection that sheds
//! one request keeps a place in the queue for a request it may never send (and is woken, and takes a permit, when
//! one frees), and load shed fails with a boxed `Overloaded` that the rescue layer would have to downcast back
//! into a type. This layer is the one `try_acquire` those two would make, and a typed refusal.

use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use crate::error::{Failure, GatewayError};
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
        Shed { inner, in_flight: Arc::clone(&self.in_flight), permit: None }
    }
}

pub struct Shed<S> {
    inner: S,
    in_flight: Arc<Semaphore>,
    /// Taken by `poll_ready`, spent by `call`.
    permit: Option<OwnedSemaphorePermit>,
}

impl<S: Clone> Clone for Shed<S> {
    /// A clone holds no permit of its own until it is made ready.
    fn clone(&self) -> Shed<S> {
        Shed { inner: self.inner.clone(), in_flight: Arc::clone(&self.in_flight), permit: None }
    }
}

impl<S, R> Service<R> for Shed<S>
where
    S: Service<R, Response = Answer, Error = Failure>,
{
    type Response = Answer;
    type Error = Failure;
    type Future = Either<Held<S::Future>, Ready<Result<Answer, Failure>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        if self.permit.is_none() {
            self.permit = Arc::clone(&self.in_flight).try_acquire_owned().ok();
        }
        // Without a permit the service is still ready: its answer is the 503.
        match self.permit {
            Some(_) => self.inner.poll_ready(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, request: R) -> Self::Future {
        match self.permit.take() {
            Some(permit) => Either::Left(Held { answer: self.inner.call(request), _permit: permit }),
            None => Either::Right(ready(Err(GatewayError::Overloaded.into()))),
        }
    }
}

pin_project_lite::pin_project! {
    /// A request in flight, holding its permit until its answer is ready (or it is dropped).
    pub struct Held<F> {
        #[pin]
        answer: F,
        _permit: OwnedSemaphorePermit,
    }
}

impl<F: std::future::Future> std::future::Future for Held<F> {
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().answer.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::Marks;
    use crate::rescue::RescueLayer;
    use crate::testing::request;
    use tower::ServiceExt;

    #[tokio::test]
    async fn past_the_limit_a_request_is_answered_503_at_once_and_a_freed_permit_serves_again() {
        let in_flight = Arc::new(Semaphore::new(1));
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let released = Arc::new(tokio::sync::Mutex::new(Some(released)));
        let slow = tower::service_fn(move |_: http::Request<()>| {
            let released = Arc::clone(&released);
            async move {
                if let Some(wait) = released.lock().await.take() {
                    let _ = wait.await;
                }
                Ok::<_, Failure>(Answer::default())
            }
        });
        let service = RescueLayer.layer(ShedLayer::new(Arc::clone(&in_flight)).layer(slow));
        let holding = tokio::spawn(service.clone().oneshot(request()));
        while in_flight.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        let shed = service.clone().oneshot(request()).await.unwrap();
        assert_eq!(shed.status(), 503);
        assert_eq!(shed.rejection(), Some(crate::exchange::ErrorKind::Overloaded));
        assert_eq!(shed.headers()["retry-after"], "1");
        release.send(()).unwrap();
        assert_eq!(holding.await.unwrap().unwrap().status(), 200);
        assert_eq!(service.oneshot(request()).await.unwrap().status(), 200, "the permit came back");
    }
}
