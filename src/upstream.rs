//! The client towards Easemob: hyper-util's pooled client over rustls, with a connect timeout, a total timeout
//! per exchange, and answers read whole (they are small JSON) so a cut-off answer becomes a definite 502.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Method, Request, Response, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::config::{BaseUrl, UpstreamConfig};

/// The scheme, host and path prefix (without its trailing slash) of a base URL.
fn origin(base_url: &BaseUrl) -> (Scheme, Authority, String) {
    let uri: Uri = base_url.as_str().parse().expect("checked when the config was read");
    let parts = uri.into_parts();
    let prefix = parts.path_and_query.map(|p| p.path().trim_end_matches('/').to_owned()).unwrap_or_default();
    (parts.scheme.expect("checked: http or https"), parts.authority.expect("checked: a host"), prefix)
}

pub mod forward;

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

impl UpstreamError {
    /// A stable label for the failure: `upstream_requests_total`'s code, a span's `error.type`.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "connect_error",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::Failed(_) => "failed",
        }
    }
}

type Connector = HttpsConnector<HttpConnector>;

#[derive(Clone, Debug)]
pub struct Upstream {
    client: Client<Connector, Full<Bytes>>,
    connector: Connector,
    pool_idle_timeout: Duration,
    pool_max_idle_per_host: usize,
    /// `base_url`'s scheme, host and path prefix, parsed once.
    origin: Arc<(Scheme, Authority, String)>,
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
            origin: Arc::new(origin(&config.base_url)),
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

    /// `base_url` + `/{org}/{app}` + what `tail` appends (a path and query). The scheme and the host were parsed
    /// once, with the base URL; only the path and query are built (in one buffer, handed over without a copy) and
    /// checked for each call.
    pub fn uri(&self, org: &str, app: &str, tail: impl FnOnce(&mut String)) -> Result<Uri, http::Error> {
        let (scheme, authority, base_path) = &*self.origin;
        let mut path = String::with_capacity(base_path.len() + org.len() + app.len() + 160);
        path.push_str(base_path);
        path.push('/');
        path.push_str(org);
        path.push('/');
        path.push_str(app);
        tail(&mut path);
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(scheme.clone());
        parts.authority = Some(authority.clone());
        parts.path_and_query = Some(PathAndQuery::from_maybe_shared(Bytes::from(path))?);
        Ok(Uri::from_parts(parts)?)
    }

    /// A request to Easemob with the headers every call carries; the caller adds `Authorization`.
    pub fn request(&self, method: Method, uri: Uri, body: Bytes) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        // Room for these four, the token, the request id, the trace context (two) and the length hyper adds,
        // so that no insert grows the map.
        headers.reserve(9);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_uri_is_the_base_url_then_org_app_and_the_tail() {
        for (base, want) in [
            ("https://a1.easemob.com", "https://a1.easemob.com/o/a/rest/x?y=1"),
            ("http://127.0.0.1:8081/prefix/", "http://127.0.0.1:8081/prefix/o/a/rest/x?y=1"),
        ] {
            let config = UpstreamConfig {
                base_url: BaseUrl::parse(base).unwrap(),
                connect_timeout: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                ca_file: None,
                pool_idle_timeout: Duration::from_secs(1),
                pool_max_idle_per_host: 1,
            };
            let upstream = Upstream::new(&config).unwrap();
            let uri = upstream.uri("o", "a", |path| path.push_str("/rest/x?y=1")).unwrap();
            assert_eq!(uri.to_string(), want);
        }
    }
}
