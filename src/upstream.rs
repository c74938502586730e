//! The client towards Easemob: hyper-util's pooled client over rustls, with a connect timeout, a total timeout
//! per exchange, and answers read whole (they are small JSON) so a cut-off answer becomes a definite 502.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::config::{BaseUrl, UpstreamConfig};

/// Easemob's answers on these routes are a few hundred bytes; anything this large is not one of them.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

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

#[derive(Clone, Debug)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base_url: BaseUrl,
    timeout: Duration,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig) -> Result<Upstream, String> {
        let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        if let Some(path) = &config.ca_file {
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_file_iter(path)
                    .and_then(|it| it.collect())
                    .map_err(|e| format!("upstream.ca_file {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("upstream.ca_file {}: no PEM certificate found", path.display()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| format!("upstream.ca_file {}: {e}", path.display()))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
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
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .build(connector);
        Ok(Upstream { client, base_url: config.base_url.clone(), timeout: config.timeout })
    }

    /// `base_url` + `/{org}/{app}` + `path_and_query`.
    pub fn url(&self, org: &str, app: &str, path_and_query: &str) -> String {
        format!("{}/{org}/{app}{path_and_query}", self.base_url.as_str())
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
