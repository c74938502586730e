//! The one router: sends each request to its handler by what its path resolves to (`routes::resolve`, the one
//! resolver): one of the six operations to the Easemob stack below it, the SDK token endpoint to its placeholder,
//! a path under `…/_gateway/` to the jobs API. Any other path is refused here.

use std::future::{Ready, ready};
use std::num::NonZeroU128;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::Either;
use http::{HeaderMap, Method, Request};
use tower::{BoxError, Layer, Service};

use crate::apps::Apps;
use crate::error::{Failure, GatewayError};
use crate::exchange::{Answer, Labels, Waiting};
use crate::jobs::api::JobsApi;
use crate::layers::placeholder;
use crate::layers::validate::find;
use crate::routes::{Endpoint, Located, Resolved, Routed, resolve};
use crate::trace::TraceContext;

#[derive(Clone)]
pub struct RouterLayer {
    apps: Apps,
    jobs: JobsApi,
}

impl RouterLayer {
    pub fn new(apps: Apps, jobs: JobsApi) -> RouterLayer {
        RouterLayer { apps, jobs }
    }
}

impl<S> Layer<S> for RouterLayer {
    type Service = Router<S>;

    fn layer(&self, easemob: S) -> Router<S> {
        Router { easemob, apps: self.apps.clone(), jobs: self.jobs.clone() }
    }
}

/// The router, with the Easemob stack as its inner service and the other handlers beside it.
#[derive(Clone)]
pub struct Router<S> {
    easemob: S,
    apps: Apps,
    jobs: JobsApi,
}

impl<S, B> Service<Request<B>> for Router<S>
where
    S: Service<Routed<B>, Response = Answer, Error = Failure>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Answer;
    type Error = Failure;
    /// The Easemob stack's own future; answered here, ready; the jobs API, boxed.
    type Future = Either<S::Future, Either<Ready<Result<Answer, Failure>>, Waiting<Failure>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        self.easemob.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let path = request.uri().path();
        let answered = match resolve(path) {
            Some(Resolved { app, endpoint: Endpoint::Operation { route, owner } }) => {
                let located = Located::new(path, route, owner, app);
                return Either::Left(self.easemob.call(Routed { request, located }));
            }
            Some(Resolved { app, endpoint: Endpoint::Jobs(jobs_path) }) => match self.jobs.target(app, jobs_path) {
                Ok(target) => return Either::Right(Either::Right(self.jobs.call(target, request))),
                Err(e) => Err(e.into()),
            },
            Some(Resolved { app, endpoint: Endpoint::Token }) => {
                let mut labels = traced(request.headers());
                let answered = token(&self.apps, app, request.method(), &mut labels);
                Failure::labelled(answered, labels)
            }
            None => Err(Failure {
                error: GatewayError::UnknownRoute { hint: "no route has this path" },
                labels: traced(request.headers()),
            }),
        };
        Either::Right(Either::Left(ready(answered)))
    }
}

/// The SDK drop-in's answer: the placeholder for the app named, to a `POST`; `labels` name the app once found.
fn token(
    apps: &Apps,
    named: Option<(&str, &str)>,
    method: &Method,
    labels: &mut Labels,
) -> Result<Answer, GatewayError> {
    if method != Method::POST {
        return Err(GatewayError::MethodNotAllowed { allow: Method::POST });
    }
    let app = find(apps, named)?;
    labels.app = Some(Arc::clone(app));
    Ok(placeholder::answer(app))
}

/// The labels of a request that named no operation: its trace id alone, for its log line.
fn traced(headers: &HeaderMap) -> Labels {
    Labels { trace_id: NonZeroU128::new(TraceContext::from_headers(headers).trace_id), ..Labels::default() }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use http::StatusCode;
    use http_body_util::{BodyExt, Full};
    use tower::ServiceExt;

    use super::*;
    use crate::exchange::ErrorKind;
    use crate::exchange::Marks;
    use crate::rescue::RescueLayer;
    use crate::routes::Route;
    use crate::testing::{self, ScriptedFetch};

    /// The router, with a jobs API that has no store, over an Easemob stack that answers 200; and how many
    /// requests that stack got.
    fn router() -> (
        impl Service<Request<Full<Bytes>>, Response = Answer, Error = std::convert::Infallible>,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let apps = Apps::new(vec![testing::app(&ScriptedFetch::granting(3600), &testing::quota(Default::default()))]);
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let easemob = tower::service_fn(move |routed: Routed<Full<Bytes>>| {
            counted.fetch_add(1, Ordering::SeqCst);
            assert_eq!(routed.located.route, Route::ClearUserMessages);
            assert_eq!(routed.located.owner(routed.request.uri().path()), "Dave");
            std::future::ready(Ok::<_, Failure>(testing::easemob(200)))
        });
        let jobs = JobsApi::new(apps.clone(), None, Duration::from_secs(1), None);
        (RescueLayer.layer(RouterLayer::new(apps, jobs).layer(easemob)), calls)
    }

    async fn send(method: Method, path: &str) -> (Answer, usize) {
        let (router, calls) = router();
        let request = Request::builder().method(method).uri(path).body(Full::default()).unwrap();
        let answer = router.oneshot(request).await.unwrap();
        (answer, calls.load(Ordering::SeqCst))
    }

    #[tokio::test(start_paused = true)]
    async fn each_path_goes_to_its_handler_and_others_are_refused_here() {
        let (answer, calls) = send(Method::POST, "/o/a/rest/message/roaming/user/Dave/delete/all").await;
        assert_eq!((answer.status(), calls), (StatusCode::OK, 1), "the Easemob stack");
        let (answer, calls) = send(Method::GET, "/o/a/users/u/contacts").await;
        assert_eq!((answer.status().as_u16(), answer.rejection(), calls), (404, Some(ErrorKind::UnknownRoute), 0));
        assert_eq!((answer.stamp().labels.app.is_none(), answer.stamp().labels.route), (true, None));
        assert!(answer.stamp().labels.trace_id.is_some(), "its log line names a trace");
        let (answer, calls) = send(Method::GET, "/o/a/_gateway/jobs").await;
        assert_eq!((answer.status().as_u16(), answer.rejection(), calls), (404, Some(ErrorKind::JobsDisabled), 0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_sdk_token_request_gets_a_placeholder_and_never_the_real_token() {
        let (answer, calls) = send(Method::POST, "/o/a/token").await;
        assert_eq!((answer.status(), calls), (StatusCode::OK, 0));
        assert_eq!(answer.stamp().labels.app.as_ref().map(|app| app.key.as_str()), Some("o#a"));
        let body = answer.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["access_token"], placeholder::PLACEHOLDER_TOKEN);
        let (answer, _) = send(Method::GET, "/o/a/token").await;
        assert_eq!((answer.status().as_u16(), answer.rejection()), (405, Some(ErrorKind::MethodNotAllowed)));
    }
}
