//! The edge of the typed world: for a request the router resolved to one of the six operations, finds the app,
//! reads the body (`delete_conversation` only) and validates, so that everything below sees an [`Exchange`]
//! holding a [`Call`] and nothing else. Every answer and failure leaves with the [`Labels`] it was resolved to.

use std::future::{Future, Ready, ready};
use std::num::NonZeroU128;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::future::Either;
use http::request::Parts;
use http_body_util::BodyExt;
use tower::{BoxError, Layer, Service, ServiceExt};

use crate::access::Caller;
use crate::apps::{App, Apps, Unfound};
use crate::error::{Failure, GatewayError, unix_millis};
use crate::exchange::{Answer, Exchange, Labels, Validated, Waiting};
use crate::request_id::X_REQUEST_ID;
use crate::routes::validate::{Call, ValidationError};
use crate::routes::{Located, Route, Routed};
use crate::trace::TraceContext;
use crate::trace::export::{Export, Recording};

const PREFER: http::HeaderName = http::HeaderName::from_static("prefer");

/// Easemob's `delete_conversation` body is three fields; anything this large is not one.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Clone)]
pub struct ValidateLayer {
    apps: Apps,
    /// A client that stops sending its body cannot hold a request open longer than this.
    body_read_timeout: Duration,
    /// Deletion jobs are on: a call's `Prefer: respond-async` is noted (otherwise not even looked up).
    respond_async: bool,
    /// Spans are exported: a sampled request gets a [`Recording`] (otherwise nothing is decided or noted).
    export: Option<Export>,
}

impl ValidateLayer {
    pub fn new(apps: Apps, body_read_timeout: Duration) -> ValidateLayer {
        ValidateLayer { apps, body_read_timeout, respond_async: false, export: None }
    }

    /// Notes `Prefer: respond-async` when `enabled` (deletion jobs are on).
    pub fn respond_async(self, enabled: bool) -> ValidateLayer {
        ValidateLayer { respond_async: enabled, ..self }
    }

    /// Records the spans of sampled requests for `export`, when spans are exported.
    pub fn export(self, export: Option<Export>) -> ValidateLayer {
        ValidateLayer { export, ..self }
    }
}

impl<S> Layer<S> for ValidateLayer {
    type Service = Validate<S>;

    fn layer(&self, inner: S) -> Validate<S> {
        Validate {
            inner,
            apps: self.apps.clone(),
            body_read_timeout: self.body_read_timeout,
            respond_async: self.respond_async,
            export: self.export.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Validate<S> {
    inner: S,
    apps: Apps,
    body_read_timeout: Duration,
    respond_async: bool,
    export: Option<Export>,
}

impl<S, B> Service<Routed<B>> for Validate<S>
where
    S: Service<Exchange, Response = Answer, Error = GatewayError> + Clone + Send + 'static,
    S::Future: Send,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Answer;
    type Error = Failure;
    /// Decided from the request line (five routes of six, and every refusal there): a named future, no box.
    /// With a body to read first (`delete_conversation`): boxed.
    type Future = Labelled<Either<Either<S::Future, Ready<Result<Answer, GatewayError>>>, Waiting<GatewayError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        self.inner.poll_ready(cx).map_err(Failure::from)
    }

    fn call(&mut self, routed: Routed<B>) -> Self::Future {
        let Routed { request, located } = routed;
        let (parts, body) = request.into_parts();
        let mut asked = Asked {
            trace: TraceContext::from_headers(&parts.headers),
            spans: None,
            respond_async: self.respond_async && prefers_async(&parts.headers),
        };
        if let Some(export) = &self.export {
            asked.spans = export.record(&mut asked.trace, &parts.headers, Instant::now());
        }
        let mut labels = Labels {
            trace_id: NonZeroU128::new(asked.trace.trace_id),
            spans: asked.spans.clone(),
            route: Some(located.route),
            ..Labels::default()
        };
        let answer = match edge(&parts, &located, &self.apps, &asked, &mut labels) {
            Err(e) => Either::Left(Either::Right(ready(Err(e)))),
            Ok(Some(exchange)) => Either::Left(Either::Left(self.inner.call(exchange))),
            Ok(None) => {
                let (inner, timeout) = (self.inner.clone(), self.body_read_timeout);
                let app = labels.app.clone().expect("named before the body is read");
                Either::Right(Box::pin(async move {
                    let body = read_body(body, timeout, MAX_BODY_BYTES).await?;
                    let owner = located.owner(parts.uri.path());
                    let exchange = call(&parts, located.route, owner, &body, &app, asked)?;
                    inner.oneshot(exchange).await
                }) as Waiting<GatewayError>)
            }
        };
        Labelled { answer, labels: Some(labels) }
    }
}

/// Checks the method and finds the app, filling in `labels` as it does, and validates what the request line says:
/// the call, or `None` when its body must be read first.
fn edge(
    parts: &Parts,
    located: &Located,
    apps: &Apps,
    asked: &Asked,
    labels: &mut Labels,
) -> Result<Option<Exchange>, GatewayError> {
    let route = located.route;
    if parts.method != route.method() {
        return Err(GatewayError::MethodNotAllowed { allow: route.method() });
    }
    let path = parts.uri.path();
    let app = find(apps, located.app(path))?;
    labels.app = Some(Arc::clone(app));
    match route {
        Route::DeleteConversation => Ok(None),
        // The five roaming routes take no body: whatever was sent is ignored, never forwarded.
        _ => Ok(Some(call(parts, route, located.owner(path), b"", app, asked.clone())?)),
    }
}

/// What a request's headers ask of its exchange besides the call.
#[derive(Clone)]
struct Asked {
    /// The W3C trace it belongs to (its own, or a new one).
    trace: TraceContext,
    /// Where its spans are noted, when they are exported and the trace is sampled.
    spans: Option<Arc<Recording>>,
    /// `Prefer: respond-async`, with jobs on.
    respond_async: bool,
}

/// The app the request names, or why there is none.
pub fn find<'a>(apps: &'a Apps, named: Option<(&str, &str)>) -> Result<&'a Arc<App>, GatewayError> {
    apps.find(named).map_err(|unfound| match unfound {
        Unfound::NotConfigured => GatewayError::UnknownApp,
        Unfound::NotNamed => GatewayError::UnknownRoute {
            hint: "several apps are configured: prefix the path with /{org_name}/{app_name}",
        },
    })
}

/// The validated call, with what travels with it. `owner` is the raw path segment.
fn call(
    parts: &Parts,
    route: Route,
    owner: &str,
    body: &[u8],
    app: &Arc<App>,
    asked: Asked,
) -> Result<Exchange, ValidationError> {
    let call = Call::parse(route, owner, parts.uri.query(), body, unix_millis() as i64)?;
    let Caller(caller) = parts.extensions.get::<Caller>().cloned().unwrap_or_default();
    Ok(Exchange::new(Validated {
        app: Arc::clone(app),
        call,
        request_id: parts.headers.get(X_REQUEST_ID).cloned(),
        received: parts.uri.path_and_query().cloned(),
        caller,
        respond_async: asked.respond_async,
        trace: asked.trace,
        spans: asked.spans,
        job_attempt: None,
        audited: Default::default(),
        deadline: Default::default(),
    }))
}

/// RFC 7240: `Prefer: respond-async`, among any other preferences, in any of the header's lines.
fn prefers_async(headers: &http::HeaderMap) -> bool {
    headers.get_all(PREFER).iter().any(|value| {
        value.to_str().is_ok_and(|value| {
            value.split(',').any(|preference| {
                let token = preference.split([';', '=']).next().unwrap_or_default();
                token.trim().eq_ignore_ascii_case("respond-async")
            })
        })
    })
}

pin_project_lite::pin_project! {
    /// Every answer or failure leaves labelled with what the request was resolved to (a lane's answer with its
    /// policy).
    pub struct Labelled<F> {
        #[pin]
        answer: F,
        labels: Option<Labels>,
    }
}

impl<F> Future for Labelled<F>
where
    F: Future<Output = Result<Answer, GatewayError>>,
{
    type Output = Result<Answer, Failure>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.answer.poll(cx));
        Poll::Ready(Failure::labelled(result, this.labels.take().expect("polled after completion")))
    }
}

/// Reads a request body of at most `limit` bytes: refused early when its declared length is larger, and bounded in
/// time so a client that stops sending cannot hold the request open.
pub async fn read_body<B>(body: B, timeout: Duration, limit: usize) -> Result<Bytes, GatewayError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    // One chunk (the usual small body) is kept as it came; more are copied together.
    let (mut first, mut more) = (None, BytesMut::new());
    read_chunks(body, timeout, limit, |chunk| {
        match &first {
            None => first = Some(chunk),
            Some(_) => more.extend_from_slice(&chunk),
        }
        ready(ControlFlow::Continue(()))
    })
    .await?;
    Ok(match first {
        None => Bytes::new(),
        Some(first) if more.is_empty() => first,
        Some(first) => {
            let mut whole = BytesMut::with_capacity(first.len() + more.len());
            whole.extend_from_slice(&first);
            whole.extend_from_slice(&more);
            whole.freeze()
        }
    })
}

/// Hands a request body to `each` chunk by chunk as it arrives, until its end or until `each` breaks: at most
/// `limit` bytes (refused at once when the declared length is larger), all within `timeout` (the time `each` takes
/// is not the client's and does not count).
pub async fn read_chunks<B, F, Fut>(body: B, timeout: Duration, limit: usize, mut each: F) -> Result<(), GatewayError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    F: FnMut(Bytes) -> Fut,
    Fut: Future<Output = ControlFlow<()>>,
{
    refuse_declared_over(&body, limit)?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut body = std::pin::pin!(body);
    let mut read = 0;
    let mut waited = Duration::ZERO;
    loop {
        let frame = match tokio::time::timeout_at(deadline + waited, body.as_mut().frame()).await {
            Err(_) => return Err(GatewayError::BodyTimeout),
            Ok(None) => return Ok(()),
            Ok(Some(Err(_))) => return Err(GatewayError::BodyUnreadable),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(chunk) = frame.into_data() else { continue };
        read += chunk.len();
        if read > limit {
            return Err(GatewayError::BodyTooLarge { limit });
        }
        let handing = tokio::time::Instant::now();
        if each(chunk).await.is_break() {
            return Ok(());
        }
        waited += handing.elapsed();
    }
}

/// A body whose declared length is over `limit` is refused before any of it is read.
pub fn refuse_declared_over<B: http_body::Body>(body: &B, limit: usize) -> Result<(), GatewayError> {
    match body.size_hint().lower() > limit as u64 {
        true => Err(GatewayError::BodyTooLarge { limit }),
        false => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use http::{Method, Request, StatusCode};
    use http_body_util::Full;
    use tower::util::MapRequestLayer;

    use super::*;
    use crate::exchange::ErrorKind;
    use crate::exchange::Marks;
    use crate::ratelimit::RATELIMIT_POLICY;
    use crate::rescue::RescueLayer;
    use crate::routes::{Endpoint, Resolved, resolve};
    use crate::testing::{self, ScriptedFetch};

    /// The request as the router hands it on, resolved to its operation.
    fn routed<B>(request: Request<B>) -> Routed<B> {
        let path = request.uri().path();
        let Some(Resolved { app, endpoint: Endpoint::Operation { route, owner } }) = resolve(path) else {
            panic!("{path} names no operation")
        };
        let located = Located::new(path, route, owner, app);
        Routed { request, located }
    }

    async fn validate(method: Method, path: &str, body: &str) -> (Answer, usize) {
        let app = testing::app(&ScriptedFetch::granting(3600), &testing::quota(Default::default()));
        let (inner, calls) = testing::upstream(|_, exchange| {
            assert_eq!(exchange.caller.as_deref(), Some("orders"));
            assert_eq!(exchange.request_id.as_ref().unwrap(), "r-1");
            Ok(testing::easemob(200))
        });
        let mut request = Request::builder().method(method).uri(path).header(X_REQUEST_ID, "r-1");
        request.extensions_mut().unwrap().insert(Caller(Some("orders".into())));
        let request = request.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
        let layer = ValidateLayer::new(Apps::new(vec![app]), Duration::from_secs(1));
        // Its failures as the rescue layer answers them.
        let service = RescueLayer.layer(MapRequestLayer::new(routed).layer(layer.layer(inner)));
        (service.oneshot(request).await.unwrap(), calls.load(Ordering::SeqCst))
    }

    fn labels(answer: &Answer) -> (Option<&str>, Option<Route>) {
        let labels = &answer.stamp().labels;
        (labels.app.as_ref().map(|app| app.key.as_str()), labels.route)
    }

    #[tokio::test]
    async fn a_valid_call_goes_down_typed_and_comes_back_labelled_with_its_policy() {
        let (answer, calls) = validate(Method::POST, "/o/a/rest/message/roaming/user/Dave/delete/all", "ignored").await;
        assert_eq!((answer.status(), calls), (StatusCode::OK, 1));
        assert_eq!(labels(&answer), (Some("o#a"), Some(Route::ClearUserMessages)));
        assert_eq!(answer.headers()[RATELIMIT_POLICY], "\"clear_user_messages\";q=100;w=1");
    }

    #[tokio::test]
    async fn what_easemob_would_refuse_never_goes_down() {
        let cases = [
            (
                Method::GET,
                "/o/a/users/u/user_channel",
                "",
                405,
                "method_not_allowed",
                (None, Some(Route::DeleteConversation)),
            ),
            (
                Method::DELETE,
                "/x/y/users/u/user_channel",
                "",
                404,
                "unknown_app",
                (None, Some(Route::DeleteConversation)),
            ),
            (
                Method::DELETE,
                "/o/a/users/u/user_channel",
                "{",
                400,
                "invalid",
                (Some("o#a"), Some(Route::DeleteConversation)),
            ),
            (
                Method::DELETE,
                "/o/a/rest/message/roaming/chat/user/u?userId=v",
                "",
                400,
                "invalid",
                (Some("o#a"), Some(Route::DeleteChatMessages)),
            ),
        ];
        for (method, path, body, status, reason, named) in cases {
            let (answer, calls) = validate(method, path, body).await;
            let rejection = answer.rejection().map(ErrorKind::label);
            assert_eq!((answer.status().as_u16(), rejection, calls), (status, Some(reason), 0), "{path}");
            assert_eq!(labels(&answer), named, "{path}");
            assert_eq!(
                answer.headers().contains_key(RATELIMIT_POLICY),
                named.0.is_some(),
                "a lane's answers state its policy"
            );
        }
        let too_large = "x".repeat(MAX_BODY_BYTES + 1);
        let (answer, _) = validate(Method::DELETE, "/o/a/users/u/user_channel", &too_large).await;
        assert_eq!(answer.rejection(), Some(ErrorKind::BodyTooLarge));
    }
}
