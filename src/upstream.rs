//! The client towards Easemob: one host, reached from a handful of threads, so a pool of hyper's own HTTP/1
//! connections (`hyper::client::conn::http1`) per thread rather than a general-purpose client for many hosts. A
//! request and the connection that carries it are driven by the same thread: no lock, no cross-thread wake-up, no
//! key hashed per request. TLS by rustls, a connect timeout, a total timeout per exchange, and answers read whole
//! (they are small JSON) so a cut-off answer becomes a definite 502.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderValue, Method, Request, Response, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use thread_local::ThreadLocal;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::config::{BaseUrl, UpstreamConfig};
use crate::redact::{REDACTED, Redactor};

/// The host and path prefix (without its trailing slash) of a base URL, and whether it is `https`.
fn origin(base_url: &BaseUrl) -> (Authority, String, bool) {
    let uri: Uri = base_url.as_str().parse().expect("checked when the config was read");
    let parts = uri.into_parts();
    let tls = parts.scheme.as_ref().is_some_and(|s| s.as_str() == "https");
    let prefix = parts.path_and_query.map(|p| p.path().trim_end_matches('/').to_owned()).unwrap_or_default();
    (parts.authority.expect("checked: a host"), prefix, tls)
}

const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");
const USER_AGENT: HeaderValue = HeaderValue::from_static(crate::USER_AGENT);

/// Easemob's answers on these routes (and its token endpoint's) are a few hundred bytes; anything larger than this
/// is not one of them (502).
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// Why the client towards Easemob could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    #[error("upstream.ca_file {}: {reason}", path.display())]
    CaFile { path: std::path::PathBuf, reason: String },
    #[error("TLS setup: {0}")]
    Tls(rustls::Error),
    #[error("upstream.base_url: not a TLS server name: {0}")]
    Name(String),
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

#[derive(Clone)]
pub struct Upstream {
    pool: Arc<Pool>,
    /// The path prefix of `base_url`, without its trailing slash.
    prefix: Arc<str>,
    /// `Host` for every call, worked out once.
    host: HeaderValue,
    /// `upstream.timeout` in nanoseconds, shared by every clone: a reload changes it for calls not yet sent.
    timeout: Arc<AtomicU64>,
    /// The secrets every answer is scrubbed of, shared by every clone (the workers' and the token fetches'): one
    /// for the process, across reloads, so a rotated-out secret is still scrubbed.
    redactor: Redactor,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("host", &self.host).finish_non_exhaustive()
    }
}

/// Connections to Easemob: each thread keeps its own idle ones.
struct Pool {
    idle: ThreadLocal<RefCell<Vec<Idle>>>,
    /// `host:port` to connect to.
    address: String,
    /// For `https`: the TLS connector and the name the certificate must carry.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
}

/// A connection waiting for its next request.
struct Idle {
    sender: SendRequest<Full<Bytes>>,
    since: Instant,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig) -> Result<Upstream, UpstreamSetupError> {
        let (authority, prefix, https) = origin(&config.base_url);
        let tls = match https {
            false => None,
            true => {
                let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
                if let Some(path) = &config.ca_file {
                    let ca_file = |reason| UpstreamSetupError::CaFile { path: path.clone(), reason };
                    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                        .and_then(|it| it.collect())
                        .map_err(|e| ca_file(e.to_string()))?;
                    if certs.is_empty() {
                        return Err(ca_file("no PEM certificate found".to_owned()));
                    }
                    for cert in certs {
                        roots.add(cert).map_err(|e| ca_file(e.to_string()))?;
                    }
                }
                let mut tls =
                    rustls::ClientConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
                        .with_safe_default_protocol_versions()
                        .map_err(UpstreamSetupError::Tls)?
                        .with_root_certificates(roots)
                        .with_no_client_auth();
                tls.alpn_protocols = vec![b"http/1.1".to_vec()];
                let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
                let name = ServerName::try_from(host).map_err(|e| UpstreamSetupError::Name(e.to_string()))?;
                Some((TlsConnector::from(Arc::new(tls)), name))
            }
        };
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let pool = Pool {
            idle: ThreadLocal::new(),
            address: format!("{}:{port}", authority.host()),
            tls,
            connect_timeout: config.connect_timeout,
            idle_timeout: config.pool_idle_timeout,
            max_idle: config.pool_max_idle_per_host,
        };
        Ok(Upstream {
            pool: Arc::new(pool),
            prefix: prefix.into(),
            host: config.base_url.host_header(),
            timeout: Arc::new(AtomicU64::new(config.timeout.as_nanos() as u64)),
            redactor: Redactor::default(),
        })
    }

    /// `base_url`'s path + `/{org}/{app}` + what `tail` appends (a path and query), in origin form: the host goes
    /// in `Host`. When that is exactly what the caller sent (`received`: the usual case, a caller that already
    /// writes the canonical form), the received one is shared, neither copied nor checked again; otherwise it is
    /// copied out of this thread's scratch buffer and checked.
    pub fn uri(
        &self,
        org: &str,
        app: &str,
        received: Option<&PathAndQuery>,
        tail: impl FnOnce(&mut String),
    ) -> Result<Uri, http::Error> {
        thread_local! {
            static SCRATCH: RefCell<String> = RefCell::new(String::with_capacity(256));
        }
        SCRATCH.with_borrow_mut(|path| {
            path.clear();
            path.push_str(&self.prefix);
            path.push('/');
            path.push_str(org);
            path.push('/');
            path.push_str(app);
            tail(path);
            let path_and_query = match received {
                Some(received) if received.as_str() == path.as_str() => received.clone(),
                _ => PathAndQuery::from_maybe_shared(Bytes::copy_from_slice(path.as_bytes()))?,
            };
            Ok(Uri::from(path_and_query))
        })
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
        Duration::from_nanos(self.timeout.load(Ordering::Relaxed))
    }

    /// A reloaded `upstream.timeout`, for every clone of this upstream (every worker's and the token fetches').
    pub fn set_timeout(&self, timeout: Duration) {
        self.timeout.store(timeout.as_nanos() as u64, Ordering::Relaxed);
    }

    /// What every answer is scrubbed of: whoever sends a secret to Easemob holds it here first.
    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }

    /// Sends one request and reads the whole answer, all within the configured timeout.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> Result<Response<Bytes>, UpstreamError> {
        self.send_until(request, Instant::now() + self.timeout()).await
    }

    /// Sends one request and reads the whole answer, all before `deadline`. On a pooled connection that turns out
    /// to have closed before the request was written (Easemob closes idle connections), the request goes again on
    /// another: nothing was sent, so nothing can happen twice. The answer's body and headers are scrubbed of every
    /// held secret (`redact.rs`) here, the one door through which Easemob's words come in: no reader can forget to.
    pub async fn send_until(
        &self,
        mut request: Request<Full<Bytes>>,
        deadline: Instant,
    ) -> Result<Response<Bytes>, UpstreamError> {
        let exchange = async {
            loop {
                let (mut sender, pooled) = match self.pool.checkout() {
                    Some(sender) => (sender, true),
                    // Boxed: connecting (DNS, TCP, a TLS session) is a large future and a rare one; inline, its size
                    // would be every request's future's size, moved into the forward layer's box each time.
                    None => (Box::pin(self.pool.connect()).await?, false),
                };
                match sender.try_send_request(request).await {
                    Ok(response) => {
                        // hyper hands up a 101 as if final (other 1xx it skips): a deletion's connection switched
                        // to another protocol has no answer, and its outcome is unknown. The connection is dropped.
                        if response.status().is_informational() {
                            return Err(UpstreamError::Failed(format!(
                                "answered {} instead of a final answer",
                                response.status()
                            )));
                        }
                        let (parts, body) = response.into_parts();
                        let body = Limited::new(body, MAX_ANSWER_BYTES)
                            .collect()
                            .await
                            .map_err(|e| UpstreamError::Failed(format!("reading the answer: {e}")))?
                            .to_bytes();
                        self.pool.checkin(sender);
                        return Ok(self.scrubbed(Response::from_parts(parts, body)));
                    }
                    Err(mut failed) => match failed.take_message() {
                        Some(unsent) if pooled => {
                            debug!(error = %failed.error(), "a pooled connection to Easemob had closed; sending on another");
                            request = unsent;
                        }
                        Some(_) => return Err(UpstreamError::Connect(error_chain(failed.error()))),
                        None => return Err(UpstreamError::Failed(error_chain(failed.error()))),
                    },
                }
            }
        };
        tokio::time::timeout_at(deadline, exchange).await.unwrap_or(Err(UpstreamError::Timeout(self.timeout())))
    }

    /// `answer` with its body and header values scrubbed of every held secret; a body that changed length says
    /// its new one.
    fn scrubbed(&self, answer: Response<Bytes>) -> Response<Bytes> {
        let (mut parts, body) = answer.into_parts();
        let scrubber = self.redactor.scrubber();
        for value in parts.headers.values_mut() {
            if let Some(scrubbed) = scrubber.scrub_slice(value.as_bytes()) {
                *value = HeaderValue::from_bytes(&scrubbed).unwrap_or(HeaderValue::from_static(REDACTED));
            }
        }
        let length = body.len();
        let body = scrubber.scrub(body);
        if body.len() != length {
            parts.headers.insert(header::CONTENT_LENGTH, body.len().into());
        }
        Response::from_parts(parts, body)
    }
}

impl Pool {
    /// This thread's most recently used connection that can take a request now; closed and expired ones are
    /// dropped on the way.
    fn checkout(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.get_or_default().borrow_mut();
        while let Some(Idle { sender, since }) = idle.pop() {
            if sender.is_ready() && since.elapsed() < self.idle_timeout {
                return Some(sender);
            }
        }
        None
    }

    /// Keeps a connection whose exchange is over for the next request, up to `pool_max_idle_per_host`. The oldest
    /// idle connections are at the front: once the first has expired, every expired one is closed.
    fn checkin(&self, sender: SendRequest<Full<Bytes>>) {
        let mut idle = self.idle.get_or_default().borrow_mut();
        let now = Instant::now();
        if idle.first().is_some_and(|oldest| now - oldest.since >= self.idle_timeout) {
            idle.retain(|entry| now - entry.since < self.idle_timeout);
        }
        if !sender.is_closed() && idle.len() < self.max_idle {
            idle.push(Idle { sender, since: now });
        }
    }

    /// A new connection, its I/O driven by a task on this thread.
    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, UpstreamError> {
        let connect = async {
            let tcp = TcpStream::connect(&self.address).await.map_err(|e| format!("{}: {e}", self.address))?;
            let _ = tcp.set_nodelay(true);
            let sender = match &self.tls {
                None => spawn_connection(tcp).await,
                Some((tls, name)) => {
                    let tls = tls.connect(name.clone(), tcp).await.map_err(|e| format!("TLS: {e}"))?;
                    spawn_connection(tls).await
                }
            };
            sender.map_err(|e| error_chain(&e))
        };
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(connected) => {
                debug!(address = %self.address, ok = connected.is_ok(), "new connection to Easemob");
                connected.map_err(UpstreamError::Connect)
            }
            Err(_) => Err(UpstreamError::Connect(format!(
                "{}: no connection within {:?}",
                self.address, self.connect_timeout
            ))),
        }
    }
}

/// The HTTP/1 handshake on `io`; the connection's task runs until it closes.
async fn spawn_connection<T>(io: T) -> hyper::Result<SendRequest<Full<Bytes>>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    // Flattened writes, as on the data plane's side (`server.rs`): requests are small.
    let (sender, connection) = http1::Builder::new().writev(false).handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(error = %e, "connection to Easemob ended with an error");
        }
    });
    Ok(sender)
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

    fn upstream(base_url: &str) -> Upstream {
        let config = UpstreamConfig {
            base_url: BaseUrl::parse(base_url).unwrap(),
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            ca_file: None,
            pool_idle_timeout: Duration::from_secs(1),
            pool_max_idle_per_host: 1,
        };
        Upstream::new(&config).unwrap()
    }

    #[test]
    fn a_call_uri_is_the_base_urls_path_then_org_app_and_the_tail() {
        for (base, want) in
            [("https://a1.easemob.com", "/o/a/rest/x?y=1"), ("http://127.0.0.1:8081/prefix/", "/prefix/o/a/rest/x?y=1")]
        {
            let upstream = upstream(base);
            let uri = upstream.uri("o", "a", None, |path| path.push_str("/rest/x?y=1")).unwrap();
            assert_eq!(uri.to_string(), want);
        }
    }

    #[test]
    fn a_received_path_that_is_already_canonical_is_shared_and_any_other_is_rebuilt() {
        let upstream = upstream("https://a1.easemob.com");
        let canonical = |path: &mut String| path.push_str("/rest/x?y=1");
        let received = PathAndQuery::from_static("/o/a/rest/x?y=1");
        let uri = upstream.uri("o", "a", Some(&received), canonical).unwrap();
        assert_eq!(uri.path_and_query().unwrap().as_str().as_ptr(), received.as_str().as_ptr(), "shared");
        for other in ["/rest/x?y=1", "/o/a/rest/x?y=%31", "/o/a/rest/x?y=1&"] {
            let received = PathAndQuery::try_from(other).unwrap();
            let uri = upstream.uri("o", "a", Some(&received), canonical).unwrap();
            assert_eq!(uri.path_and_query().unwrap(), "/o/a/rest/x?y=1", "{other} is rebuilt");
        }
    }

    #[test]
    fn an_answer_that_repeats_a_held_secret_arrives_scrubbed_in_its_body_and_headers() {
        let upstream = upstream("https://a1.easemob.com");
        upstream.redactor().hold("YWMt-the-app-token");
        let body = Bytes::from_static(b"{\"error_description\":\"Bearer YWMt-the-app-token refused\"}");
        let answer = Response::builder()
            .header(header::CONTENT_LENGTH, body.len())
            .header(header::WWW_AUTHENTICATE, "Bearer error=\"invalid_token\", token=YWMt-the-app-token")
            .body(body)
            .unwrap();
        let answer = upstream.scrubbed(answer);
        assert_eq!(answer.body(), "{\"error_description\":\"Bearer [redacted] refused\"}");
        assert_eq!(answer.headers()[header::CONTENT_LENGTH], answer.body().len().to_string().as_str());
        assert_eq!(answer.headers()[header::WWW_AUTHENTICATE], "Bearer error=\"invalid_token\", token=[redacted]");
    }
}
