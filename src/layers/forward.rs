//! The innermost service of the stack: one exchange with Easemob through the [`Upstream`] client.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Response, StatusCode, header};
use prometheus::IntCounterVec;
use tower::Service;
use tracing::warn;

use crate::error::{GATEWAY_HEADER, GatewayError};
use crate::exchange::{Answer, Exchange, Marks, Stamped, Waiting};
use crate::metrics::Metrics;
use crate::request_id::X_REQUEST_ID;
use crate::trace::{TRACEPARENT, TRACESTATE, new_span_id};
use crate::upstream::{Upstream, UpstreamError};

/// The innermost service: sends one exchange to Easemob and hands back its answer unchanged but for hop-by-hop
/// headers, or fails with why it could not get one: whether anything was sent decides what the layers above do.
#[derive(Clone)]
pub struct Forward {
    /// Shared: the stack is cloned for every request, and this is the only layer with more than a pointer.
    inner: Arc<ForwardInner>,
}

struct ForwardInner {
    upstream: Upstream,
    /// `upstream_requests_total`, for the codes a lane's handles do not cover.
    upstream_requests: IntCounterVec,
}

impl Forward {
    pub fn new(upstream: Upstream, metrics: &Metrics) -> Forward {
        Forward { inner: Arc::new(ForwardInner { upstream, upstream_requests: metrics.upstream_requests.clone() }) }
    }
}

impl Service<Exchange> for Forward {
    type Response = Answer;
    type Error = GatewayError;
    type Future = Waiting<GatewayError>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        // The pool is the readiness here, and it waits inside the call (bounded by the deadline).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, exchange: Exchange) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let upstream = &inner.upstream;
            let app = &exchange.app;
            let route = exchange.route();
            let received = exchange.received.as_ref();
            let Ok(uri) =
                upstream.uri(&app.org, &app.app, received, |url| exchange.call.write_upstream_path_and_query(url))
            else {
                return Err(GatewayError::Internal);
            };
            let mut request = upstream.request(route.method(), uri, exchange.call.upstream_body().unwrap_or_default());
            let headers = request.headers_mut();
            if let Some(token) = exchange.token() {
                headers.insert(header::AUTHORIZATION, token.authorization().clone());
            }
            if let Some(id) = &exchange.request_id {
                headers.insert(X_REQUEST_ID, id.clone());
            }
            // This call's span: its id is the one its spans are exported under, when they are.
            let span_id = new_span_id();
            headers.insert(TRACEPARENT, exchange.trace.child(span_id));
            if let Some(state) = &exchange.trace.state {
                headers.insert(TRACESTATE, state.clone());
            }
            let deadline = exchange.deadline.start(upstream.timeout());
            let sent = std::time::Instant::now();
            let result = upstream.send_until(request, deadline).await;
            let took = sent.elapsed();
            let lane = exchange.lane();
            lane.metrics.upstream_duration.observe(took.as_secs_f64());
            let status = result.as_ref().map(|response| response.status());
            if let Some(spans) = &exchange.spans {
                spans.upstream(span_id, sent, took, status.map(|s| s.as_u16()).map_err(|e| e.kind()));
            }
            let code = match &status {
                Ok(StatusCode::OK) => None,
                Ok(status) => Some(status.as_str()),
                Err(e) => Some(e.kind()),
            };
            match code {
                None => lane.metrics.upstream_ok.inc(),
                Some(code) => inner.upstream_requests.with_label_values(&[app.key.as_str(), route.name(), code]).inc(),
            }
            match result {
                Ok(response) => Ok(pass_through(response)),
                Err(e) => {
                    warn!(app = %app.key, route = route.name(), error = %e, "easemob call failed");
                    Err(match e {
                        UpstreamError::Connect(_) => GatewayError::UpstreamUnreachable { unused_slot: None },
                        UpstreamError::Timeout(_) => GatewayError::UpstreamTimeout,
                        UpstreamError::Failed(_) => GatewayError::UpstreamFailed,
                    })
                }
            }
        })
    }
}

/// Easemob's answer as the caller's: status, headers (minus hop-by-hop ones) and body unchanged.
fn pass_through(response: Response<Bytes>) -> Answer {
    let (mut parts, body) = response.into_parts();
    strip_not_passed(&mut parts.headers);
    let mut answer = Response::from_parts(parts, Stamped::new(body));
    answer.stamp_mut().from_easemob = true;
    answer
}

/// RFC 9110 §7.6.1: `Connection` and the headers it names, plus the classic hop-by-hop set; and the gateway's own
/// marker, which only the gateway may set: an answer from Easemob never passes as one the gateway made.
fn strip_not_passed(headers: &mut HeaderMap) {
    // Usually there are none (and the headers `Connection` names only count if it is there): look before removing.
    if !headers.keys().any(|name| NOT_PASSED.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&NOT_PASSED) {
        headers.remove(name);
    }
}

const NOT_PASSED: [HeaderName; 9] = [
    HeaderName::from_static(GATEWAY_HEADER),
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_stripped() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("close, x-trace-hop"));
        headers.insert("x-trace-hop", HeaderValue::from_static("1"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(GATEWAY_HEADER, HeaderValue::from_static("rejected"));
        strip_not_passed(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");

        let mut end_to_end = HeaderMap::new();
        end_to_end.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        end_to_end.insert("x-trace-hop", HeaderValue::from_static("1"));
        let before = end_to_end.clone();
        strip_not_passed(&mut end_to_end);
        assert_eq!(end_to_end, before, "without Connection, other headers pass");
    }
}
