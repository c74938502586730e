//! The client towards Easemob: hyper-util's pooled client over rustls, with a connect timeout, a total timeout
//! per exchange, and answers read whole (they are small JSON) so a cut-off answer becomes a definite 502.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use prometheus::IntCounterVec;
use tower::Service;
use tracing::warn;

use crate::config::{BaseUrl, UpstreamConfig};
use crate::error::GatewayError;
use crate::exchange::{Answer, Exchange, Marks, Waiting};
use crate::metrics::Metrics;
use crate::observe::X_REQUEST_ID;

const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");
const USER_AGENT: HeaderValue = HeaderValue::from_static(crate::USER_AGENT);

/// Easemob's answers on these routes are a few hundred bytes; anything this large is not one of them.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// Why the client towards Easemob could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    #[error("upstream.ca_file {}: {reason}", path.display())]
    CaFile { path: std::path::PathBuf, reason: String },
    #[error("TLS setup: {0}")]
    Tls(rustls::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The connection could not be made (refused, unreachable, TLS failure): nothing was sent.
    #[error("connect failed: {0}")]
    Connect(String),
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    /// The exchange broke after the request may have been sent (reset, malformed or oversized answer).
    #[error("exchange failed: {0}")]
    Failed(String),
}

type Connector = HttpsConnector<HttpConnector>;

#[derive(Clone, Debug)]
pub struct Upstream {
    client: Client<Connector, Full<Bytes>>,
    connector: Connector,
    pool_idle_timeout: Duration,
    pool_max_idle_per_host: usize,
    base_url: BaseUrl,
    /// `Host` for every call, worked out once (hyper would format it again for each request).
    host: HeaderValue,
    timeout: Duration,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig) -> Result<Upstream, UpstreamSetupError> {
        let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        if let Some(path) = &config.ca_file {
            let ca_file = |reason| UpstreamSetupError::CaFile { path: path.clone(), reason };
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_file_iter(path).and_then(|it| it.collect()).map_err(|e| ca_file(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_file("no PEM certificate found".to_owned()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| ca_file(e.to_string()))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
            .with_safe_default_protocol_versions()
            .map_err(UpstreamSetupError::Tls)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = pooled_client(&connector, config.pool_idle_timeout, config.pool_max_idle_per_host);
        Ok(Upstream {
            client,
            connector,
            pool_idle_timeout: config.pool_idle_timeout,
            pool_max_idle_per_host: config.pool_max_idle_per_host,
            host: config.base_url.host_header(),
            base_url: config.base_url.clone(),
            timeout: config.timeout,
        })
    }

    /// The same upstream with a connection pool of its own. Each data-plane worker uses one, so a request and the
    /// connection that carries it are driven by the same thread (no cross-thread wake-ups per request).
    pub fn with_own_pool(&self) -> Upstream {
        Upstream {
            client: pooled_client(&self.connector, self.pool_idle_timeout, self.pool_max_idle_per_host),
            ..self.clone()
        }
    }

    /// `base_url` + `/{org}/{app}` + what `tail` appends (a path and query), built in one buffer and handed to
    /// `Uri` without a copy.
    pub fn uri(&self, org: &str, app: &str, tail: impl FnOnce(&mut String)) -> Result<Uri, http::uri::InvalidUri> {
        let base = self.base_url.as_str();
        let mut url = String::with_capacity(base.len() + org.len() + app.len() + 160);
        url.push_str(base);
        url.push('/');
        url.push_str(org);
        url.push('/');
        url.push_str(app);
        tail(&mut url);
        Uri::try_from(url)
    }

    /// A request to Easemob with the headers every call carries; the caller adds `Authorization`.
    pub fn request(&self, method: Method, uri: Uri, body: Bytes) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        headers.reserve(6);
        headers.insert(header::HOST, self.host.clone());
        headers.insert(header::CONTENT_TYPE, APPLICATION_JSON);
        headers.insert(header::ACCEPT, APPLICATION_JSON);
        headers.insert(header::USER_AGENT, USER_AGENT);
        request
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends one request and reads the whole answer, all within the configured timeout.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> Result<Response<Bytes>, UpstreamError> {
        self.send_until(request, tokio::time::Instant::now() + self.timeout).await
    }

    /// Sends one request and reads the whole answer, all before `deadline`.
    pub async fn send_until(
        &self,
        request: Request<Full<Bytes>>,
        deadline: tokio::time::Instant,
    ) -> Result<Response<Bytes>, UpstreamError> {
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                if e.is_connect() {
                    UpstreamError::Connect(error_chain(&e))
                } else {
                    UpstreamError::Failed(error_chain(&e))
                }
            })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| UpstreamError::Failed(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok(Response::from_parts(parts, body))
        };
        tokio::time::timeout_at(deadline, exchange).await.unwrap_or(Err(UpstreamError::Timeout(self.timeout)))
    }
}

fn pooled_client(connector: &Connector, idle_timeout: Duration, max_idle: usize) -> Client<Connector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(idle_timeout)
        .pool_max_idle_per_host(max_idle)
        .build(connector.clone())
}

/// An error and its sources on one line: hyper's top-level messages alone ("client error (Connect)") say little.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The innermost service: sends one exchange to Easemob and hands back its answer unchanged but for hop-by-hop
/// headers, or the gateway's answer for the failure to get one. Every answer carries the deadline it ran under.
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
    type Error = Infallible;
    type Future = Waiting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The pool is the readiness here, and it waits inside the call (bounded by the deadline).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, exchange: Exchange) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let upstream = &inner.upstream;
            let app = &exchange.app;
            let route = exchange.route();
            let Ok(uri) = upstream.uri(&app.org, &app.app, |url| exchange.call.write_upstream_path_and_query(url))
            else {
                return Ok(GatewayError::Internal.into_response(exchange.started));
            };
            let mut request = upstream.request(route.method(), uri, exchange.call.upstream_body().unwrap_or_default());
            let headers = request.headers_mut();
            if let Some(token) = &exchange.token {
                headers.insert(header::AUTHORIZATION, token.authorization().clone());
            }
            if let Some(id) = &exchange.request_id {
                headers.insert(X_REQUEST_ID, id.clone());
            }
            // One deadline for the request's exchanges with Easemob, from the first send: a retry never stretches
            // the caller's wait, and waiting for the token or the quota does not eat into Easemob's time.
            let deadline = exchange.deadline.unwrap_or_else(|| tokio::time::Instant::now() + upstream.timeout);
            let sent = std::time::Instant::now();
            let result = upstream.send_until(request, deadline).await;
            let lane = exchange.lane();
            lane.metrics.upstream_duration.observe(sent.elapsed().as_secs_f64());
            let status = result.as_ref().map(|response| response.status());
            let code = match &status {
                Ok(StatusCode::OK) => None,
                Ok(status) => Some(status.as_str()),
                Err(UpstreamError::Connect(_)) => Some("connect_error"),
                Err(UpstreamError::Timeout(_)) => Some("timeout"),
                Err(UpstreamError::Failed(_)) => Some("failed"),
            };
            match code {
                None => lane.metrics.upstream_ok.inc(),
                Some(code) => inner.upstream_requests.with_label_values(&[app.key.as_str(), route.name(), code]).inc(),
            }
            let mut answer = match result {
                Ok(response) => pass_through(response),
                Err(e) => {
                    warn!(app = %app.key, route = route.name(), error = %e, "easemob call failed");
                    match e {
                        // Nothing was sent.
                        UpstreamError::Connect(_) => GatewayError::UpstreamUnreachable,
                        // The deletion may have been carried out.
                        UpstreamError::Timeout(_) => GatewayError::UpstreamTimeout,
                        UpstreamError::Failed(_) => GatewayError::UpstreamFailed,
                    }
                    .into_response(exchange.started)
                }
            };
            answer.stamp_mut().deadline = Some(deadline);
            Ok(answer)
        })
    }
}

/// Easemob's answer as the caller's: status, headers (minus hop-by-hop ones) and body unchanged.
fn pass_through(response: Response<Bytes>) -> Answer {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let mut answer = Response::from_parts(parts, Full::new(body));
    answer.stamp_mut().from_easemob = true;
    answer
}

/// RFC 9110 §7.6.1: `Connection` and the headers it names, plus the classic hop-by-hop set.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Usually there are none (and the headers `Connection` names only count if it is there): look before removing.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
}

const HOP_BY_HOP: [HeaderName; 8] = [
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
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_stripped() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("close, x-trace-hop"));
        headers.insert("x-trace-hop", HeaderValue::from_static("1"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");

        let mut end_to_end = HeaderMap::new();
        end_to_end.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        end_to_end.insert("x-trace-hop", HeaderValue::from_static("1"));
        let before = end_to_end.clone();
        strip_hop_by_hop(&mut end_to_end);
        assert_eq!(end_to_end, before, "without Connection, other headers pass");
    }
}
