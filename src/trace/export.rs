//! Span export over OTLP/HTTP (protobuf), on when `trace.otlp_endpoint` is set. A sampled request's spans are built
//! once, from its final answer (in `observe.rs`) and the few instants the layers noted on its [`Recording`] on the
//! way down: a SERVER span named after the route, with a child for the quota wait, the token wait and each call to
//! Easemob (a CLIENT span, whose id is the parent id Easemob received in `traceparent`). They queue for a task on
//! the main runtime that sends them in batches; a full queue drops them, counted. With export off none of this
//! runs: the layers find no `Recording` on the request.
//!
//! Attributes are bounded like the metric labels: the AppKey, the route, statuses and closed sets of outcomes.
//! Never a user ID, a message ID, a path or query, a header, a token.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http::HeaderMap;
use hyper_util::client::legacy::connect::HttpConnector;
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use prometheus::IntCounter;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::{Sampler, TraceContext, new_span_id};
use crate::config::TraceConfig;
use crate::metrics::Metrics;
use crate::routes::Route;

/// Requests whose spans may wait for the next batch: 2,048 sampled requests a second get through (the quota lets
/// at most 600 a second per app reach Easemob; refusal floods are where the bound bites), in at most a few MB.
const QUEUE: usize = 2048;
/// How often the queue is sent: a trace shows within a few seconds, and the main runtime wakes once a second
/// rather than once per request (the queue is only looked at then).
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Spans per OTLP request: the OpenTelemetry SDK's default batch.
const MAX_BATCH: usize = 512;
/// One OTLP request, connection included: a collector that does not answer costs the spans of a batch or two
/// (counted), never a stalled gateway.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the span export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ExportSetupError {
    #[error("trace.otlp_endpoint: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("trace.otlp_endpoint: TLS setup: {0}")]
    Tls(#[from] rustls::Error),
}

/// The span export. Cheap to clone: every connection's stack holds one.
#[derive(Clone)]
pub struct Export(Arc<Pipeline>);

struct Pipeline {
    sampler: Sampler,
    queue: mpsc::Sender<Vec<SpanData>>,
    scope: InstrumentationScope,
    /// `spans_dropped_total{reason="queue_full"}`.
    queue_full: IntCounter,
    /// The batching task, and what tells it to send what is queued and stop; taken by [`Export::shutdown`].
    batcher: Mutex<Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>>,
}

impl Export {
    /// Starts the export on the current runtime when `trace.otlp_endpoint` is set; `None` when it is not.
    pub fn start(config: &TraceConfig, metrics: &Metrics) -> Result<Option<Export>, ExportSetupError> {
        let Some(endpoint) = &config.otlp_endpoint else { return Ok(None) };
        let exporter = exporter(endpoint, &config.service_name)?;
        let (queue, queued) = mpsc::channel(QUEUE);
        let (stop, stopped) = oneshot::channel();
        let counts = Counts {
            exported: metrics.spans_exported.clone(),
            failed: metrics.spans_dropped.with_label_values(&["export_failed"]),
        };
        let task = tokio::spawn(send_batches(queued, exporter, stopped, counts));
        info!(endpoint, sample_ratio = config.sample_ratio, "exporting spans over OTLP");
        let pipeline = Pipeline::new(Sampler::new(config.sample_ratio), queue, metrics);
        *pipeline.batcher.lock().expect("not poisoned") = Some((stop, task));
        Ok(Some(Export(Arc::new(pipeline))))
    }

    /// The recording of the spans of a request that arrived at `arrived` with `headers`, if its trace is sampled:
    /// the sampler decides here for a trace the gateway started (and Easemob is told, in `traceparent`).
    ///
    /// Never inlined, like the recording's methods: the layers' code stays as it is without export, but for the
    /// `Option` they check.
    #[inline(never)]
    pub fn record(&self, trace: &mut TraceContext, headers: &HeaderMap, arrived: Instant) -> Option<Arc<Recording>> {
        let caller_span = TraceContext::caller_span(headers);
        self.0.sampler.sample(trace, caller_span.is_some()).then(|| {
            Arc::new(Recording {
                pipeline: Arc::clone(&self.0),
                trace_id: trace.trace_id,
                parent_id: caller_span.unwrap_or(0),
                span_id: new_span_id(),
                clock: (arrived, SystemTime::now()),
                steps: Mutex::new(Vec::new()),
            })
        })
    }

    /// Sends what is queued and stops, waiting for it at most `grace`.
    pub async fn shutdown(&self, grace: Duration) {
        let Some((stop, task)) = self.0.batcher.lock().expect("not poisoned").take() else { return };
        let _ = stop.send(());
        if tokio::time::timeout(grace, task).await.is_err() {
            warn!(grace = ?grace, "the last spans were not sent in time");
        }
    }
}

impl Pipeline {
    fn new(sampler: Sampler, queue: mpsc::Sender<Vec<SpanData>>, metrics: &Metrics) -> Pipeline {
        Pipeline {
            sampler,
            queue,
            scope: InstrumentationScope::builder("easemob-gateway").with_version(env!("CARGO_PKG_VERSION")).build(),
            queue_full: metrics.spans_dropped.with_label_values(&["queue_full"]),
            batcher: Mutex::new(None),
        }
    }

    /// Queues one request's spans without waiting: a full queue (or one no longer sent) drops them.
    fn queue(&self, spans: Vec<SpanData>) {
        let count = spans.len() as u64;
        if self.queue.try_send(spans).is_err() {
            self.queue_full.inc_by(count);
        }
    }
}

/// The OTLP/HTTP exporter, over opentelemetry-http's hyper client with the same rustls and webpki roots as the
/// client towards Easemob. It runs on the main runtime (the batching task's), as that client needs.
fn exporter(endpoint: &str, service_name: &str) -> Result<opentelemetry_otlp::SpanExporter, ExportSetupError> {
    let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let tls = rustls::ClientConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(EXPORT_TIMEOUT));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let client = opentelemetry_http::hyper::HyperClient::new(connector, EXPORT_TIMEOUT, None);
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_endpoint(endpoint)
        .with_protocol(Protocol::HttpBinary)
        .with_timeout(EXPORT_TIMEOUT)
        .build()?;
    exporter.set_resource(
        &Resource::builder_empty()
            .with_service_name(service_name.to_owned())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build(),
    );
    Ok(exporter)
}

/// What the batching task counts.
struct Counts {
    /// `spans_exported_total`.
    exported: IntCounter,
    /// `spans_dropped_total{reason="export_failed"}`.
    failed: IntCounter,
}

/// Sends the queue every [`FLUSH_EVERY`] in batches of at most [`MAX_BATCH`] spans, one batch at a time, until
/// told to stop (or the export is dropped): then sends what is left and stops.
async fn send_batches(
    mut queued: mpsc::Receiver<Vec<SpanData>>,
    exporter: opentelemetry_otlp::SpanExporter,
    mut stop: oneshot::Receiver<()>,
    counts: Counts,
) {
    let mut failing = false;
    loop {
        let stopping = tokio::select! {
            () = tokio::time::sleep(FLUSH_EVERY) => false,
            _ = &mut stop => true,
        };
        let mut batch = Vec::new();
        while let Ok(spans) = queued.try_recv() {
            batch.extend(spans);
            if batch.len() >= MAX_BATCH {
                send(&exporter, std::mem::take(&mut batch), &counts, &mut failing).await;
            }
        }
        if !batch.is_empty() {
            send(&exporter, batch, &counts, &mut failing).await;
        }
        if stopping {
            let _ = exporter.shutdown();
            return;
        }
    }
}

/// One OTLP request; a failure is logged when it starts and when it ends, not for every batch.
async fn send(exporter: &opentelemetry_otlp::SpanExporter, batch: Vec<SpanData>, counts: &Counts, failing: &mut bool) {
    let count = batch.len() as u64;
    match exporter.export(batch).await {
        Ok(()) => {
            counts.exported.inc_by(count);
            if std::mem::take(failing) {
                info!("span export works again");
            }
        }
        Err(e) => {
            counts.failed.inc_by(count);
            if !std::mem::replace(failing, true) {
                warn!(error = %e, "span export failed: spans are dropped until the collector takes them");
            }
        }
    }
}

/// What a sampled request's layers note for its spans on the way down: when each step began and ended, and how.
/// Shared by every attempt at the request (a replay, a retry), and by its answer's [`Labels`], which brings it to
/// `observe.rs` to be finished.
///
/// [`Labels`]: crate::exchange::Labels
pub struct Recording {
    pipeline: Arc<Pipeline>,
    trace_id: u128,
    /// The caller's span, 0 when the gateway started the trace.
    parent_id: u64,
    /// The request's own, SERVER span.
    span_id: u64,
    /// An instant and the wall-clock time at it: the layers note instants, spans carry wall-clock times.
    clock: (Instant, SystemTime),
    steps: Mutex<Vec<Step>>,
}

/// One child span's worth: a quota wait, a token wait, a call to Easemob.
struct Step {
    start: Instant,
    end: Instant,
    what: What,
}

enum What {
    Quota(QuotaWait),
    Token(TokenWait),
    /// A call to Easemob as span `span_id`: its status, or why there was none (`UpstreamError::kind`).
    Upstream {
        span_id: u64,
        answer: Result<u16, &'static str>,
    },
}

/// How a wait for a quota slot ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuotaWait {
    /// A slot at once.
    Admitted,
    /// A slot after waiting in turn.
    Waited,
    /// No slot within `rate_limit.max_wait`: 429.
    Refused,
}

/// How a wait for the App Token ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenWait {
    /// The current token, at hand.
    Cached,
    /// After a fetch (the first one, or a replacement after Easemob's 401).
    Fetched,
    /// No valid token: 503.
    Unavailable,
}

impl QuotaWait {
    fn as_str(self) -> &'static str {
        match self {
            QuotaWait::Admitted => "admitted",
            QuotaWait::Waited => "waited",
            QuotaWait::Refused => "refused",
        }
    }
}

impl TokenWait {
    fn as_str(self) -> &'static str {
        match self {
            TokenWait::Cached => "cached",
            TokenWait::Fetched => "fetched",
            TokenWait::Unavailable => "unavailable",
        }
    }
}

/// A request's final answer, as its SERVER span tells it.
pub struct Answered<'a> {
    /// The route it was resolved to; a request that named none has no span.
    pub route: Option<Route>,
    /// The AppKey, when the request named a configured app.
    pub app: Option<&'a str>,
    pub status: u16,
    /// Why the gateway answered itself (`GatewayError::kind`); `None` for Easemob's answer.
    pub rejection: Option<&'static str>,
    /// When the request arrived, and when it was answered.
    pub started: Instant,
    pub ended: Instant,
}

impl Recording {
    /// A wait for a quota slot that began at `since` and ended now.
    #[inline(never)]
    pub fn quota(&self, since: Instant, outcome: QuotaWait) {
        self.note(since, Instant::now(), What::Quota(outcome));
    }

    /// A wait for the token that began at `since` and ended now.
    #[inline(never)]
    pub fn token(&self, since: Instant, outcome: TokenWait) {
        self.note(since, Instant::now(), What::Token(outcome));
    }

    /// A call to Easemob sent at `sent` as span `span_id` (the parent id in its `traceparent`), which took `took`.
    #[inline(never)]
    pub fn upstream(&self, span_id: u64, sent: Instant, took: Duration, answer: Result<u16, &'static str>) {
        self.note(sent, sent + took, What::Upstream { span_id, answer });
    }

    fn note(&self, start: Instant, end: Instant, what: What) {
        self.steps.lock().expect("not poisoned").push(Step { start, end, what });
    }

    /// Builds the request's spans from its final answer and queues them for export.
    #[inline(never)]
    pub fn finish(&self, answered: &Answered<'_>) {
        // Only the six routes' requests have spans: named after the route, span names stay a closed set.
        let Some(route) = answered.route else { return };
        let steps = std::mem::take(&mut *self.steps.lock().expect("not poisoned"));
        let mut spans = Vec::with_capacity(1 + steps.len());
        spans.push(self.server_span(route, answered));
        let mut calls = 0;
        for step in steps {
            spans.push(self.child_span(route, step, &mut calls));
        }
        self.pipeline.queue(spans);
    }

    fn server_span(&self, route: Route, answered: &Answered<'_>) -> SpanData {
        let mut attributes = vec![
            KeyValue::new("easemob_gateway.route", route.name()),
            KeyValue::new("http.route", route.template()),
            KeyValue::new("http.response.status_code", i64::from(answered.status)),
        ];
        if let Some(app) = answered.app {
            attributes.push(KeyValue::new("easemob_gateway.app", app.to_owned()));
        }
        if let Some(reason) = answered.rejection {
            attributes.push(KeyValue::new("easemob_gateway.reason", reason));
        }
        // A server's 4xx is the caller's mistake, not the span's error (OpenTelemetry's HTTP conventions).
        let status = match (answered.status >= 500, answered.rejection) {
            (false, _) => Status::Unset,
            (true, Some(reason)) => {
                attributes.push(KeyValue::new("error.type", reason));
                Status::error(reason)
            }
            (true, None) => {
                attributes.push(KeyValue::new("error.type", answered.status.to_string()));
                Status::error("")
            }
        };
        let times = (answered.started, answered.ended);
        let mut span = self.span((self.span_id, self.parent_id), SpanKind::Server, route.name(), times, attributes);
        span.parent_span_is_remote = self.parent_id != 0;
        span.status = status;
        span
    }

    /// A step's span; `calls` counts the calls to Easemob so far (a replay or a retry is a resend).
    fn child_span(&self, route: Route, step: Step, calls: &mut i64) -> SpanData {
        let times = (step.start, step.end);
        let parent = self.span_id;
        match step.what {
            What::Quota(outcome) => {
                let attributes = vec![KeyValue::new("easemob_gateway.quota", outcome.as_str())];
                self.span((new_span_id(), parent), SpanKind::Internal, "quota", times, attributes)
            }
            What::Token(outcome) => {
                let attributes = vec![KeyValue::new("easemob_gateway.token", outcome.as_str())];
                let mut span = self.span((new_span_id(), parent), SpanKind::Internal, "token", times, attributes);
                if outcome == TokenWait::Unavailable {
                    span.status = Status::error("no valid token");
                }
                span
            }
            What::Upstream { span_id, answer } => {
                let method = if route.method() == http::Method::POST { "POST" } else { "DELETE" };
                let mut attributes = vec![KeyValue::new("http.request.method", method)];
                if *calls > 0 {
                    attributes.push(KeyValue::new("http.request.resend_count", *calls));
                }
                *calls += 1;
                // A client's 4xx is an error too (OpenTelemetry's HTTP conventions).
                let error = match answer {
                    Ok(status) => {
                        attributes.push(KeyValue::new("http.response.status_code", i64::from(status)));
                        (status >= 400).then(|| status.to_string())
                    }
                    Err(kind) => Some(kind.to_owned()),
                };
                let status = match error {
                    Some(error) => {
                        attributes.push(KeyValue::new("error.type", error));
                        Status::error("")
                    }
                    None => Status::Unset,
                };
                let mut span = self.span((span_id, parent), SpanKind::Client, "easemob", times, attributes);
                span.status = status;
                span
            }
        }
    }

    /// A span of this trace, `(id, parent id)`, from and to the given instants.
    fn span(
        &self,
        (span_id, parent_id): (u64, u64),
        span_kind: SpanKind,
        name: &'static str,
        (start, end): (Instant, Instant),
        attributes: Vec<KeyValue>,
    ) -> SpanData {
        let context = SpanContext::new(
            TraceId::from(self.trace_id),
            SpanId::from(span_id),
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        );
        SpanData {
            span_context: context,
            parent_span_id: SpanId::from(parent_id),
            parent_span_is_remote: false,
            span_kind,
            name: name.into(),
            start_time: self.wall(start),
            end_time: self.wall(end),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: self.pipeline.scope.clone(),
        }
    }

    /// The wall-clock time at `at`.
    fn wall(&self, at: Instant) -> SystemTime {
        let (instant, system) = self.clock;
        match at.checked_duration_since(instant) {
            Some(after) => system + after,
            None => system - (instant - at),
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::Value;

    use super::*;

    /// An export whose queue the test reads, holding `capacity` requests.
    fn export(ratio: f64, capacity: usize, metrics: &Metrics) -> (Export, mpsc::Receiver<Vec<SpanData>>) {
        let (queue, queued) = mpsc::channel(capacity);
        (Export(Arc::new(Pipeline::new(Sampler::new(ratio), queue, metrics))), queued)
    }

    /// The headers of a caller continuing its trace, sampled (`01`) or not (`00`).
    fn continued(flags: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let traceparent = format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}");
        headers.insert(super::super::TRACEPARENT, traceparent.parse().unwrap());
        headers
    }

    /// The recording of a request with these headers, if its trace is sampled.
    fn record(export: &Export, headers: &HeaderMap) -> Option<Arc<Recording>> {
        export.record(&mut TraceContext::from_headers(headers), headers, Instant::now())
    }

    fn answered(
        route: Option<Route>,
        status: u16,
        rejection: Option<&'static str>,
        started: Instant,
    ) -> Answered<'static> {
        Answered { route, app: Some("o#a"), status, rejection, started, ended: Instant::now() }
    }

    fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
        span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| &kv.value)
    }

    #[test]
    fn a_sampled_request_is_one_server_span_with_a_child_per_step_under_the_callers_span() {
        let metrics = Metrics::new();
        let (export, mut queued) = export(1.0, 8, &metrics);
        let arrived = Instant::now();
        let headers = continued("01");
        let recording =
            export.record(&mut TraceContext::from_headers(&headers), &headers, arrived).expect("the caller sampled it");
        recording.token(Instant::now(), TokenWait::Cached);
        recording.quota(Instant::now(), QuotaWait::Waited);
        recording.upstream(0xaa, Instant::now(), Duration::from_millis(2), Err("connect_error"));
        recording.quota(Instant::now(), QuotaWait::Admitted);
        recording.upstream(0xbb, Instant::now(), Duration::from_millis(3), Ok(200));
        // The calls' durations above are made up: the answer comes after them.
        let ended = Instant::now() + Duration::from_millis(10);
        recording.finish(&Answered { ended, ..answered(Some(Route::ClearUserMessages), 200, None, arrived) });

        let spans = queued.try_recv().expect("queued once answered");
        let server = &spans[0];
        assert_eq!((server.name.as_ref(), server.span_kind.clone()), ("clear_user_messages", SpanKind::Server));
        assert_eq!(server.span_context.trace_id(), TraceId::from(0x4bf92f3577b34da6a3ce929d0e0e4736));
        assert_eq!((server.parent_span_id, server.parent_span_is_remote), (SpanId::from(0x00f067aa0ba902b7), true));
        assert!(server.span_context.is_sampled());
        let children: Vec<_> = spans[1..].iter().map(|s| (s.name.as_ref(), s.span_kind.clone())).collect();
        assert_eq!(
            children,
            [
                ("token", SpanKind::Internal),
                ("quota", SpanKind::Internal),
                ("easemob", SpanKind::Client),
                ("quota", SpanKind::Internal),
                ("easemob", SpanKind::Client)
            ]
        );
        for child in &spans[1..] {
            assert_eq!(child.span_context.trace_id(), server.span_context.trace_id());
            assert_eq!((child.parent_span_id, child.parent_span_is_remote), (server.span_context.span_id(), false));
            assert!(server.start_time <= child.start_time && child.start_time <= child.end_time, "{child:?}");
            assert!(child.end_time <= server.end_time, "{child:?}");
        }
        let (failed, retried) = (&spans[3], &spans[5]);
        assert_eq!(
            (failed.span_context.span_id(), retried.span_context.span_id()),
            (SpanId::from(0xaa), SpanId::from(0xbb))
        );
        assert_eq!(attribute(failed, "error.type"), Some(&Value::from("connect_error")));
        assert!(matches!(failed.status, Status::Error { .. }));
        assert_eq!(attribute(retried, "http.request.resend_count"), Some(&Value::I64(1)));
        assert_eq!(attribute(retried, "http.response.status_code"), Some(&Value::I64(200)));
        assert_eq!(attribute(&spans[2], "easemob_gateway.quota"), Some(&Value::from("waited")));
        assert_eq!(attribute(server, "easemob_gateway.app"), Some(&Value::from("o#a")));
    }

    #[test]
    fn a_started_trace_is_a_root_and_an_unsampled_one_records_nothing() {
        let metrics = Metrics::new();
        let (export, mut queued) = export(1.0, 8, &metrics);
        let mut started = TraceContext::start();
        let recording =
            export.record(&mut started, &HeaderMap::new(), Instant::now()).expect("a ratio of 1 samples every trace");
        assert!(started.sampled(), "Easemob is told it is sampled");
        recording.finish(&answered(Some(Route::DeleteConversation), 429, Some("rate_limited"), Instant::now()));
        let spans = queued.try_recv().unwrap();
        assert_eq!((spans.len(), spans[0].parent_span_id, spans[0].parent_span_is_remote), (1, SpanId::INVALID, false));
        assert_eq!(spans[0].status, Status::Unset, "a 429 is the caller's, not the gateway's error");

        assert!(record(&export, &continued("00")).is_none(), "the caller's decision stands");
        let (none, _) = self::export(0.0, 8, &metrics);
        assert!(record(&none, &HeaderMap::new()).is_none());
        assert!(record(&none, &continued("01")).is_some(), "the ratio is for started traces");

        let unnamed = record(&export, &HeaderMap::new()).unwrap();
        unnamed.finish(&answered(None, 404, Some("unknown_route"), Instant::now()));
        assert!(queued.try_recv().is_err(), "a request that named no route has no span");
    }

    #[test]
    fn attributes_come_from_closed_sets_and_5xx_are_errors() {
        let metrics = Metrics::new();
        let (export, mut queued) = export(1.0, 8, &metrics);
        let recording = record(&export, &continued("01")).unwrap();
        recording.token(Instant::now(), TokenWait::Unavailable);
        recording.finish(&answered(Some(Route::DeleteChatMessages), 503, Some("no_token"), Instant::now()));
        let recording = record(&export, &continued("01")).unwrap();
        recording.token(Instant::now(), TokenWait::Fetched);
        recording.quota(Instant::now(), QuotaWait::Refused);
        recording.upstream(1, Instant::now(), Duration::ZERO, Ok(404));
        recording.finish(&answered(Some(Route::DeleteChatMessages), 502, None, Instant::now()));
        let spans: Vec<SpanData> = [queued.try_recv().unwrap(), queued.try_recv().unwrap()].concat();

        assert!(matches!(&spans[0].status, Status::Error { description } if description == "no_token"));
        assert_eq!(attribute(&spans[0], "error.type"), Some(&Value::from("no_token")));
        assert!(matches!(spans[1].status, Status::Error { .. }), "the token span says where it failed");
        assert_eq!(attribute(&spans[2], "error.type"), Some(&Value::from("502")));
        assert!(matches!(spans[5].status, Status::Error { .. }), "a client's 4xx is an error");
        let allowed = [
            "easemob_gateway.route",
            "easemob_gateway.app",
            "easemob_gateway.reason",
            "easemob_gateway.quota",
            "easemob_gateway.token",
            "http.route",
            "http.request.method",
            "http.request.resend_count",
            "http.response.status_code",
            "error.type",
        ];
        for span in &spans {
            for kv in &span.attributes {
                assert!(allowed.contains(&kv.key.as_str()), "{} is not one of the bounded attributes", kv.key);
            }
        }
    }

    #[test]
    fn a_full_queue_drops_the_spans_and_counts_them() {
        let metrics = Metrics::new();
        let (export, _queued) = export(1.0, 1, &metrics);
        for _ in 0..3 {
            let recording = record(&export, &continued("01")).unwrap();
            recording.quota(Instant::now(), QuotaWait::Admitted);
            recording.finish(&answered(Some(Route::ClearUserMessages), 200, None, Instant::now()));
        }
        let dropped = metrics.spans_dropped.with_label_values(&["queue_full"]).get();
        assert_eq!(dropped, 4, "two requests of two spans each found the queue full");
    }
}
