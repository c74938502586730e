//! `X-Request-Id`, before anything can answer: a caller's is kept if it is short and plain (it is logged and
//! forwarded to Easemob), otherwise a fresh UUID v4 takes its place; every answer, refusals included, carries it
//! back. tower-http's request-id layers do the same through the request's and the answer's extensions, which costs
//! four allocations per request; here the header alone carries it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{HeaderValue, Request, Response};
use tower::{Layer, Service};

use crate::config::is_plain_label;

pub const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

#[derive(Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestId<S>;

    fn layer(&self, inner: S) -> RequestId<S> {
        RequestId { inner }
    }
}

#[derive(Clone)]
pub struct RequestId<S> {
    inner: S,
}

impl<S, B, ResBody> Service<Request<B>> for RequestId<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Answered<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let id = match request.headers().get(X_REQUEST_ID).filter(|id| is_fit(id)) {
            Some(id) => id.clone(),
            None => {
                let id = fresh();
                request.headers_mut().insert(X_REQUEST_ID, id.clone());
                id
            }
        };
        Answered { inner: self.inner.call(request), id: Some(id) }
    }
}

/// 1–128 characters of `A-Z a-z 0-9 - _ . :`.
fn is_fit(id: &HeaderValue) -> bool {
    id.to_str().is_ok_and(|id| is_plain_label(id, 128))
}

/// A UUID v4 from a thread-local CSPRNG (uuid's `fast-rng`), written without formatting.
fn fresh() -> HeaderValue {
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
    HeaderValue::from_bytes(&text).expect("a UUID is a header value")
}

pin_project_lite::pin_project! {
    /// The answer, given the request's id unless it set one of its own.
    pub struct Answered<F> {
        #[pin]
        inner: F,
        id: Option<HeaderValue>,
    }
}

impl<F, ResBody, E> Future for Answered<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let mut answer = ready!(this.inner.poll(cx))?;
        if let Some(id) = this.id.take() {
            answer.headers_mut().entry(X_REQUEST_ID).or_insert(id);
        }
        Poll::Ready(Ok(answer))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tower::ServiceExt;

    use super::*;

    /// Echoes the request id it was given in its answer's body, and sets none of its own.
    fn echo() -> impl Service<Request<()>, Response = Response<String>, Error = Infallible> {
        tower::service_fn(|request: Request<()>| async move {
            let id = request.headers().get(X_REQUEST_ID).map(|id| id.to_str().unwrap().to_owned());
            Ok(Response::new(id.unwrap_or_default()))
        })
    }

    async fn send(id: Option<&str>) -> Response<String> {
        let mut request = Request::new(());
        if let Some(id) = id {
            request.headers_mut().insert(X_REQUEST_ID, HeaderValue::from_str(id).unwrap());
        }
        RequestIdLayer.layer(echo()).oneshot(request).await.unwrap()
    }

    #[tokio::test]
    async fn a_plain_id_is_kept_and_returned() {
        let answer = send(Some("orders-42:retry.1")).await;
        assert_eq!(answer.body(), "orders-42:retry.1");
        assert_eq!(answer.headers()[X_REQUEST_ID], "orders-42:retry.1");
    }

    #[tokio::test]
    async fn a_missing_or_unfit_id_is_replaced_by_a_fresh_uuid_seen_below_and_returned() {
        for id in [None, Some("has space"), Some(&*"x".repeat(129))] {
            let answer = send(id).await;
            let seen = answer.body();
            assert!(uuid::Uuid::parse_str(seen).is_ok_and(|u| u.get_version_num() == 4), "{seen}");
            assert_eq!(answer.headers()[X_REQUEST_ID], seen.as_str());
        }
        assert_ne!(send(None).await.body(), send(None).await.body(), "fresh each time");
    }

    #[tokio::test]
    async fn an_answer_that_set_its_own_id_keeps_it() {
        let own = tower::service_fn(|_: Request<()>| async {
            let mut answer = Response::new(String::new());
            answer.headers_mut().insert(X_REQUEST_ID, HeaderValue::from_static("own"));
            Ok::<_, Infallible>(answer)
        });
        let answer = RequestIdLayer.layer(own).oneshot(Request::new(())).await.unwrap();
        assert_eq!(answer.headers().get_all(X_REQUEST_ID).iter().collect::<Vec<_>>(), ["own"]);
    }
}
