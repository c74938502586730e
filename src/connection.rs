//! One connection's stack as hyper's service: built from the config in force, borrowed for each request, rebuilt
//! after a reload, and waited for when it is not ready.

use std::cell::RefCell;
use std::task::{Context, Poll, Waker};

use futures_util::future::{Either, Ready, ready};
use tokio::sync::watch;
use tower::ServiceExt;
use tower::util::Oneshot;

/// A connection's stack as hyper's service. hyper calls a service through `&self`; an HTTP/1 connection's requests
/// are handled one at a time, so the stack is borrowed for each call instead of cloned (hyper-util's adapter
/// clones the whole stack per request) whenever it is ready at once, which load shedding makes the usual case.
/// After a reload, the next request is served by a stack built anew from the new config (one atomic load per
/// request tells); a request in flight keeps the stack it started with.
pub struct PerConnection<S, F, C> {
    service: RefCell<S>,
    live: RefCell<watch::Receiver<C>>,
    build: F,
}

impl<S, F: Fn(&C) -> S, C> PerConnection<S, F, C> {
    /// `build` makes the stack from the config `live` holds, now and after each change.
    pub fn new(mut live: watch::Receiver<C>, build: F) -> PerConnection<S, F, C> {
        let service = build(&live.borrow_and_update());
        PerConnection { service: RefCell::new(service), live: RefCell::new(live), build }
    }
}

/// Called at once on the borrowed stack; or a stack that was not ready, taken along to be waited for; or the error
/// of a stack that failed.
type Respond<S, R> = Either<
    <S as tower::Service<R>>::Future,
    Either<Oneshot<S, R>, Ready<Result<<S as tower::Service<R>>::Response, <S as tower::Service<R>>::Error>>>,
>;

impl<S, F, C, R> hyper::service::Service<R> for PerConnection<S, F, C>
where
    S: tower::Service<R>,
    F: Fn(&C) -> S,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Respond<S, R>;

    fn call(&self, request: R) -> Self::Future {
        let mut service = self.service.borrow_mut();
        let mut live = self.live.borrow_mut();
        if live.has_changed().unwrap_or(false) {
            *service = (self.build)(&live.borrow_and_update());
        }
        // A first look without waiting (hyper's `call` has no task context to wait in). Whatever the stack did
        // not finish here, it finishes below, polled again with the waiting task's own waker.
        match service.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => Either::Left(service.call(request)),
            // Not ready: this stack goes with the request, which waits for it to become ready and then calls it;
            // the connection builds another for its next request.
            Poll::Pending => {
                let waiting = std::mem::replace(&mut *service, (self.build)(&live.borrow_and_update()));
                Either::Right(Either::Left(waiting.oneshot(request)))
            }
            // A stack that failed is not called again (tower's contract): the connection builds another.
            Poll::Ready(Err(error)) => {
                *service = (self.build)(&live.borrow_and_update());
                Either::Right(Either::Right(ready(Err(error))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll, ready};
    use std::time::Duration;

    use hyper::service::Service as _;
    use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

    use super::PerConnection;

    type Acquiring = Pin<Box<dyn Future<Output = OwnedSemaphorePermit> + Send>>;

    /// Ready once it holds one of `permits`, which each call uses up: a concurrency limit's shape. Waiting
    /// for a permit queues it behind earlier waiters, so a stack left waiting with nobody to wake it would hold
    /// up every later one.
    struct Gate {
        permits: Arc<Semaphore>,
        acquiring: Option<Acquiring>,
        held: Option<OwnedSemaphorePermit>,
    }

    impl Gate {
        fn new(permits: &Arc<Semaphore>) -> Gate {
            Gate { permits: Arc::clone(permits), acquiring: None, held: None }
        }
    }

    impl tower::Service<&'static str> for Gate {
        type Response = &'static str;
        type Error = Infallible;
        type Future = std::future::Ready<Result<&'static str, Infallible>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            if self.held.is_none() {
                let permits = Arc::clone(&self.permits);
                let acquiring = self.acquiring.get_or_insert_with(|| {
                    Box::pin(async move { permits.acquire_owned().await.expect("never closed") })
                });
                self.held = Some(ready!(acquiring.as_mut().poll(cx)));
                self.acquiring = None;
            }
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: &'static str) -> Self::Future {
            self.held.take().expect("called when ready").forget();
            std::future::ready(Ok(request))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stack_not_ready_at_first_is_waited_for_not_failed() {
        let permits = Arc::new(Semaphore::new(0));
        let (_config, live) = watch::channel(());
        let connection = PerConnection::new(live, |_: &()| Gate::new(&permits));
        let answer = tokio::spawn(connection.call("first"));
        tokio::task::yield_now().await;
        assert!(!answer.is_finished(), "no permit yet: the request waits");
        permits.add_permits(1);
        let answer = tokio::time::timeout(Duration::from_secs(1), answer).await;
        assert_eq!(answer.expect("answered once ready").unwrap(), Ok("first"));

        // The connection serves its next request with a stack of its own.
        permits.add_permits(1);
        assert_eq!(connection.call("second").await, Ok("second"));
    }

    #[tokio::test]
    async fn a_ready_stack_is_kept_between_requests_and_rebuilt_after_a_reload() {
        let permits = Arc::new(Semaphore::new(Semaphore::MAX_PERMITS));
        let built = AtomicUsize::new(0);
        let (config, live) = watch::channel(1);
        let connection = PerConnection::new(live, |_: &u32| {
            built.fetch_add(1, Ordering::Relaxed);
            Gate::new(&permits)
        });
        assert_eq!(connection.call("a").await, Ok("a"));
        assert_eq!(connection.call("b").await, Ok("b"));
        assert_eq!(built.load(Ordering::Relaxed), 1, "one stack for the connection");
        config.send_replace(2);
        assert_eq!(connection.call("c").await, Ok("c"));
        assert_eq!(built.load(Ordering::Relaxed), 2, "and one more after the reload");
    }
}
