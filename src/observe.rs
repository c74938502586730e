//! One log line and one set of metrics per request, read off the final answer (its status and the marks the
//! layers below left on it: who made it, why, for which app and route), whichever layer produced it. A sampled
//! request's spans are finished here too, when spans are exported. A request whose handling panics is recorded
//! as the 500 the panic guard above answers it with.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http::{HeaderValue, Request, StatusCode};
use tower::{Layer, Service};
use tracing::info;

use crate::error::GatewayError;
use crate::exchange::ErrorKind;
use crate::exchange::{Answer, Marks, Stamp};
use crate::metrics::{Metrics, NONE};
use crate::request_id::X_REQUEST_ID;
use crate::trace::TraceHex;
use crate::trace::export::Answered;

#[derive(Clone)]
pub struct ObserveLayer {
    metrics: Arc<Metrics>,
}

impl ObserveLayer {
    pub fn new(metrics: Metrics) -> ObserveLayer {
        ObserveLayer { metrics: Arc::new(metrics) }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner, metrics: Arc::clone(&self.metrics) }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B> Service<Request<B>> for Observe<S>
where
    S: Service<Request<B>, Response = Answer, Error = Infallible>,
{
    type Response = Answer;
    type Error = Infallible;
    type Future = Observed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let mut seen = Some(Seen {
            started: Instant::now(),
            request_id: request.headers().get(X_REQUEST_ID).cloned(),
            _in_flight: InFlight::enter(&self.metrics),
            metrics: Arc::clone(&self.metrics),
        });
        let inner = {
            let _guard = IfItPanics(&mut seen);
            self.inner.call(request)
        };
        Observed { inner, seen }
    }
}

pin_project_lite::pin_project! {
    pub struct Observed<F> {
        #[pin]
        inner: F,
        seen: Option<Seen>,
    }
}

/// What the request's log line needs besides its answer.
struct Seen {
    started: Instant,
    request_id: Option<HeaderValue>,
    /// Counted in `in_flight_requests` for as long as the request lives, even if the caller hangs up.
    _in_flight: InFlight,
    metrics: Arc<Metrics>,
}

impl<F> Future for Observed<F>
where
    F: Future<Output = Result<Answer, Infallible>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let polled = {
            let _guard = IfItPanics(this.seen);
            this.inner.poll(cx)
        };
        let Ok(answer) = ready!(polled);
        if let Some(seen) = this.seen.take() {
            seen.record(answer.status(), answer.stamp());
        }
        Poll::Ready(Ok(answer))
    }
}

/// While the layers below run: should they panic, the request is recorded as the 500 the panic guard above this
/// layer answers it with (a panic unwinds through here before the guard catches it).
struct IfItPanics<'a>(&'a mut Option<Seen>);

impl Drop for IfItPanics<'_> {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(seen) = self.0.take()
        {
            let stamp = Stamp { rejection: Some(ErrorKind::Internal), ..Stamp::default() };
            seen.record(GatewayError::Internal.shape().status, &stamp);
        }
    }
}

impl Seen {
    fn record(self, status: StatusCode, stamp: &Stamp) {
        let elapsed = self.started.elapsed();
        let labels = &stamp.labels;
        let lane = labels.lane();
        let app = labels.app.as_deref().map_or(NONE, |app| app.key.as_str());
        let route = labels.route.map_or(NONE, |route| route.name());
        let reason = stamp.rejection.map(ErrorKind::label);
        // A lane's common series are resolved once (see `Metrics::lane`); anything else is looked up by label.
        let metrics = &self.metrics;
        if let Some(kind) = stamp.rejection {
            match (lane, kind) {
                (Some(lane), ErrorKind::RateLimited) => lane.metrics.rate_limited.inc(),
                _ => metrics.rejected.with_label_values(&[app, route, kind.label()]).inc(),
            }
        }
        let counted = lane.and_then(|lane| match status {
            StatusCode::OK => Some(&lane.metrics.answered_ok),
            StatusCode::TOO_MANY_REQUESTS => Some(&lane.metrics.answered_429),
            _ => None,
        });
        match counted {
            Some(counter) => counter.inc(),
            None => metrics.requests.with_label_values(&[app, route, status.as_str()]).inc(),
        }
        match lane {
            Some(lane) => lane.metrics.request_duration.observe(elapsed.as_secs_f64()),
            None => metrics.request_duration.with_label_values(&[app, route]).observe(elapsed.as_secs_f64()),
        }
        if let Some(spans) = labels.spans.as_deref() {
            let (route, app) = (labels.route, labels.app.as_deref());
            let (started, ended) = (self.started, self.started + elapsed);
            let app = app.map(|app| app.key.as_str());
            spans.finish(&Answered { route, app, status: status.as_u16(), rejection: reason, started, ended });
        }
        let upstream_status = stamp.from_easemob.then_some(status.as_u16());
        // Written out only if the line is.
        let trace_id = labels.trace_id.map(|id| tracing::field::display(TraceHex(id.get())));
        info!(
            request_id = self.request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or(""),
            trace_id,
            app,
            route,
            status = status.as_u16(),
            upstream_status,
            reason,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
    }
}

struct InFlight(prometheus::IntGauge);

impl InFlight {
    fn enter(metrics: &Metrics) -> InFlight {
        metrics.in_flight.inc();
        InFlight(metrics.in_flight.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use tower::{ServiceExt, service_fn};

    use super::*;
    use crate::exchange::{Answer, Labels};
    use crate::routes::Route;
    use crate::testing::{self, ScriptedFetch};

    #[tokio::test]
    async fn the_final_answer_is_counted_by_its_marks_and_the_request_leaves_the_in_flight_gauge() {
        let metrics = Metrics::new();
        let app = testing::measured_app(&ScriptedFetch::granting(3600), &testing::quota(Default::default()), &metrics);
        let labelled = move |mut answer: Answer| {
            answer.stamp_mut().labels =
                Labels { app: Some(Arc::clone(&app)), route: Some(Route::ClearUserMessages), ..Labels::default() };
            answer
        };
        let in_flight = metrics.in_flight.clone();
        let inner = service_fn(move |ok: bool| {
            assert_eq!(in_flight.get(), 1, "counted while in flight");
            let answer = match ok {
                true => testing::easemob(200),
                false => GatewayError::UpstreamTimeout.into_response(std::time::Instant::now()),
            };
            std::future::ready(Ok::<_, Infallible>(labelled(answer)))
        });
        let service = ObserveLayer::new(metrics.clone())
            .layer(tower::util::MapRequestLayer::new(|r: Request<bool>| *r.body()).layer(inner));
        service.clone().oneshot(Request::new(true)).await.unwrap();
        service.oneshot(Request::new(false)).await.unwrap();
        assert_eq!(metrics.in_flight.get(), 0);
        let text = String::from_utf8(metrics.render()).unwrap();
        let route = "route=\"clear_user_messages\"";
        for series in [
            format!("easemob_gateway_requests_total{{app=\"o#a\",code=\"200\",{route}}} 1"),
            format!("easemob_gateway_requests_total{{app=\"o#a\",code=\"504\",{route}}} 1"),
            format!("easemob_gateway_rejected_total{{app=\"o#a\",reason=\"upstream_timeout\",{route}}} 1"),
        ] {
            assert!(text.contains(&series), "{series} in {text}");
        }
    }

    #[tokio::test]
    async fn a_panic_below_is_recorded_as_the_500_the_guard_above_answers() {
        let metrics = Metrics::new();
        let panics_in = |in_call: bool| {
            let inner = service_fn(move |_: Request<()>| {
                assert!(!in_call, "a bug in a layer's call");
                async { panic!("a bug in a layer's future") }
            });
            tower_http::catch_panic::CatchPanicLayer::custom(|_| {
                GatewayError::Internal.into_response(std::time::Instant::now())
            })
            .layer(ObserveLayer::new(metrics.clone()).layer(inner))
        };
        for in_call in [true, false] {
            let answer = panics_in(in_call).oneshot(Request::new(())).await.unwrap();
            assert_eq!(answer.status(), StatusCode::INTERNAL_SERVER_ERROR);
        }
        assert_eq!(metrics.in_flight.get(), 0);
        let text = String::from_utf8(metrics.render()).unwrap();
        for series in [
            format!("easemob_gateway_requests_total{{app=\"{NONE}\",code=\"500\",route=\"{NONE}\"}} 2"),
            format!("easemob_gateway_rejected_total{{app=\"{NONE}\",reason=\"internal\",route=\"{NONE}\"}} 2"),
        ] {
            assert!(text.contains(&series), "{series} in {text}");
        }
    }
}
