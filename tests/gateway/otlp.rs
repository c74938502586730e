//! Span export over OTLP, against a receiver that decodes what arrives with the protocol's own definitions.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;

use crate::support::*;

/// An OTLP/HTTP receiver on a free loopback port: `POST /v1/traces` with a protobuf body, as a collector takes it.
struct Collector {
    url: String,
    /// Every body received, as sent.
    bodies: Arc<Mutex<Vec<Bytes>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&bodies);
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let kept = Arc::clone(&kept);
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let kept = Arc::clone(&kept);
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = body.collect().await?.to_bytes();
                        let otlp = parts.method == Method::POST
                            && parts.uri.path() == "/v1/traces"
                            && parts.headers.get("content-type").is_some_and(|v| v == "application/x-protobuf");
                        if otlp {
                            kept.lock().unwrap().push(body);
                        }
                        let answer = ExportTraceServiceResponse::default().encode_to_vec();
                        Ok::<_, hyper::Error>(
                            Response::builder()
                                .status(if otlp { 200 } else { 400 })
                                .header("content-type", "application/x-protobuf")
                                .body(Full::new(Bytes::from(answer)))
                                .unwrap(),
                        )
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Collector { url, bodies, server }
    }

    /// Every request received, decoded.
    fn requests(&self) -> Vec<ExportTraceServiceRequest> {
        let bodies = self.bodies.lock().unwrap();
        bodies.iter().map(|body| ExportTraceServiceRequest::decode(body.as_ref()).expect("an OTLP request")).collect()
    }

    /// Every span received.
    fn spans(&self) -> Vec<Span> {
        let requests = self.requests();
        let scopes = requests.iter().flat_map(|r| &r.resource_spans).flat_map(|r| &r.scope_spans);
        scopes.flat_map(|s| s.spans.clone()).collect()
    }

    /// The spans of trace `trace_id` (hex), once the receiver has some.
    async fn trace(&self, trace_id: &str) -> Vec<Span> {
        let of_trace = || self.spans().into_iter().filter(|s| hex(&s.trace_id) == trace_id).collect::<Vec<_>>();
        eventually(Duration::from_secs(20), "the trace's spans", || async { !of_trace().is_empty() }).await;
        of_trace()
    }

    /// Everything received, as text: for what must never be in it.
    fn raw(&self) -> String {
        self.bodies.lock().unwrap().iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()?;
    Some(match value {
        any_value::Value::StringValue(s) => s.clone(),
        any_value::Value::IntValue(i) => i.to_string(),
        other => format!("{other:?}"),
    })
}

/// The span named `name` among `spans`.
fn named<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    spans.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no {name} span in {spans:#?}"))
}

/// The `traceparent` each business request the simulator received carried, in order.
async fn traceparents(sim: &Sim) -> Vec<String> {
    let requests = sim.requests().await;
    let header = |r: &serde_json::Value| {
        let headers = r["headers"].as_array().unwrap();
        headers.iter().find(|h| h[0] == "traceparent").map(|h| h[1].as_str().unwrap().to_owned()).unwrap()
    };
    requests.iter().map(header).collect()
}

fn exporting(collector: &str, trace: &str) -> GatewayOptions {
    GatewayOptions { extra: format!("[trace]\notlp_endpoint = \"{collector}\"\n{trace}\n"), ..Default::default() }
}

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn a_sampled_request_is_one_span_tree_under_the_callers_span_joined_by_easemobs_side() {
    let collector = Collector::start().await;
    let sim = Sim::start().await;
    let user = "otlp-user-7731";
    sim.add_users(&[user.to_owned()]).await;
    let gw = Gateway::ready_with(&sim, exporting(&collector.url, "service_name = \"gateway-under-test\"")).await;
    let clear = clear_url(&gw, user);
    let sampled = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    let refused = "00-11111111111111111111111111111111-b7ad6b7169203331-01";

    assert_eq!(send(Method::POST, &clear, &[("traceparent", unsampled)], "").await.status, 200);
    assert_eq!(send(Method::POST, &clear, &[("traceparent", &sampled)], "").await.status, 200);
    assert_eq!(send(Method::POST, &clear, &[], "").await.status, 200);
    // Refused by validation (no peer `userId`): a span of its own, without children.
    let bad = gw.url(&format!("/rest/message/roaming/chat/user/{user}?msgIdList=1"));
    assert_eq!(send(Method::DELETE, &bad, &[("traceparent", refused)], "").await.status, 400);

    let sent = traceparents(&sim).await;
    assert_eq!(sent.len(), 3, "{sent:?}");
    // The caller's trace, continued: the SERVER span is the child of the caller's span, with three children.
    let spans = collector.trace(CALLER_TRACE).await;
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let server = named(&spans, "clear_user_messages");
    assert_eq!((server.kind, hex(&server.parent_span_id)), (SpanKind::Server as i32, CALLER_SPAN.to_owned()));
    for (name, kind) in [("quota", SpanKind::Internal), ("token", SpanKind::Internal), ("easemob", SpanKind::Client)] {
        let child = named(&spans, name);
        assert_eq!((child.kind, &child.parent_span_id), (kind as i32, &server.span_id), "{name}");
        assert!(server.start_time_unix_nano <= child.start_time_unix_nano, "{name}");
        assert!(child.end_time_unix_nano <= server.end_time_unix_nano, "{name}");
    }
    // Easemob received the CLIENT span as its parent: its side of the trace joins this tree.
    let upstream = named(&spans, "easemob");
    assert_eq!(sent[1], format!("00-{CALLER_TRACE}-{}-01", hex(&upstream.span_id)));
    assert_eq!(attribute(&server.attributes, "easemob_gateway.route").as_deref(), Some("clear_user_messages"));
    assert_eq!(attribute(&server.attributes, "easemob_gateway.app"), Some(format!("{ORG}#{APP}")));
    assert_eq!(attribute(&server.attributes, "http.response.status_code").as_deref(), Some("200"));
    assert_eq!(attribute(&upstream.attributes, "http.response.status_code").as_deref(), Some("200"));
    // At once, or after waiting its turn: the quota paces a lane's calls 10 ms apart, and the unsampled call just
    // went.
    let quota = attribute(&named(&spans, "quota").attributes, "easemob_gateway.quota");
    assert!(matches!(quota.as_deref(), Some("admitted" | "waited")), "{quota:?}");
    assert_eq!(attribute(&named(&spans, "token").attributes, "easemob_gateway.token").as_deref(), Some("cached"));

    // A trace the gateway started is sampled (ratio 1 by default), Easemob is told so, and it is exported too.
    let started = &sent[2];
    assert!(started.ends_with("-01"), "{started}");
    let spans = collector.trace(&started[3..35]).await;
    let server = named(&spans, "clear_user_messages");
    assert!(server.parent_span_id.is_empty(), "a root: {server:#?}");
    assert_eq!(hex(&named(&spans, "easemob").span_id), started[36..52]);

    let spans = collector.trace(&refused[3..35]).await;
    assert_eq!(spans.len(), 1, "validation refused it: nothing below ran {spans:#?}");
    assert_eq!(attribute(&spans[0].attributes, "easemob_gateway.reason").as_deref(), Some("invalid"));
    assert_eq!(attribute(&spans[0].attributes, "http.response.status_code").as_deref(), Some("400"));

    // Every request was exported in order: the caller's unsampled trace, sent first, was left out.
    assert!(sent[0].ends_with("-00"), "the caller's decision goes on: {}", sent[0]);
    assert!(collector.spans().iter().all(|s| hex(&s.trace_id) != unsampled[3..35]));
    let resources: Vec<_> = collector.requests().into_iter().flat_map(|r| r.resource_spans).collect();
    for resource in &resources {
        let attributes = &resource.resource.as_ref().unwrap().attributes;
        assert_eq!(attribute(attributes, "service.name").as_deref(), Some("gateway-under-test"));
    }
    // No user ID and no token anywhere in what was exported, attributes or otherwise.
    let token = sim.tokens().await.remove(0);
    let raw = collector.raw();
    assert!(raw.contains("clear_user_messages") && raw.contains(ORG), "the text of what was exported is searched");
    for secret in [user, &token, "msgIdList"] {
        assert!(!raw.contains(secret), "{secret} was exported");
    }
    eventually(Duration::from_secs(10), "the exported spans counted", || async {
        gw.metrics().await.contains("easemob_gateway_spans_exported_total 9")
    })
    .await;
    assert!(gw.metrics().await.contains("easemob_gateway_spans_dropped_total{reason=\"queue_full\"} 0"));
}

#[tokio::test]
async fn with_a_ratio_of_zero_only_the_callers_sampled_traces_are_exported() {
    let collector = Collector::start().await;
    let sim = Sim::start().await;
    let gw = Gateway::ready_with(&sim, exporting(&collector.url, "sample_ratio = 0.0")).await;
    let clear = clear_url(&gw, "alice");
    assert_eq!(send(Method::POST, &clear, &[], "").await.status, 200);
    let sampled = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    assert_eq!(send(Method::POST, &clear, &[("traceparent", &sampled)], "").await.status, 200);
    assert_eq!(collector.trace(CALLER_TRACE).await.len(), 4);
    let started = &traceparents(&sim).await[0];
    assert!(started.ends_with("-00"), "not sampled, and Easemob is told: {started}");
    assert!(collector.spans().iter().all(|s| hex(&s.trace_id) == CALLER_TRACE), "queued in order, so none was sent");
}

/// Off means off: with no `trace.otlp_endpoint` nothing is exported, even with OpenTelemetry's standard variables
/// pointing at a collector, and the traces the gateway starts go to Easemob unsampled, as before.
#[tokio::test]
async fn with_no_endpoint_nothing_is_exported_whatever_the_environment_says() {
    let collector = Collector::start().await;
    let sim = Sim::start().await;
    let env = ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .map(|var| (var.to_owned(), collector.url.clone()))
        .to_vec();
    let options = GatewayOptions { extra: "[trace]\nservice_name = \"off\"\n".into(), env, ..Default::default() };
    let mut gw = Gateway::ready_with(&sim, options).await;
    let clear = clear_url(&gw, "alice");
    let sampled = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    assert_eq!(send(Method::POST, &clear, &[("traceparent", &sampled)], "").await.status, 200);
    assert_eq!(send(Method::POST, &clear, &[], "").await.status, 200);
    assert!(traceparents(&sim).await[1].ends_with("-00"));
    let metrics = gw.metrics().await;
    let (exported, dropped) = (
        metric(&metrics, "easemob_gateway_spans_exported_total"),
        metric(&metrics, "easemob_gateway_spans_dropped_total{"),
    );
    assert_eq!((exported, dropped), (0, 0), "no export: nothing sent, nothing dropped");
    // Shutting down sends whatever spans are queued: there are none.
    gw.terminate();
    assert_eq!(gw.exit_code().await, Some(0));
    assert!(collector.bodies.lock().unwrap().is_empty());
}

/// A collector that is down costs the requests nothing: their spans are dropped and counted.
#[tokio::test]
async fn a_collector_that_is_down_loses_spans_not_requests() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let sim = Sim::start().await;
    let gw = Gateway::ready_with(&sim, exporting(&format!("http://{closed}/v1/traces"), "")).await;
    for user in ["alice", "bob"] {
        assert_eq!(send(Method::POST, &clear_url(&gw, user), &[], "").await.status, 200);
    }
    eventually(Duration::from_secs(20), "the failed export counted", || async {
        gw.metrics().await.contains("easemob_gateway_spans_dropped_total{reason=\"export_failed\"} 8")
    })
    .await;
    eventually(Duration::from_secs(5), "the failure logged", || async { gw.log().contains("span export failed") })
        .await;
}
