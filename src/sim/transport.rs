//! The simulator's transport: binding, TLS, serving connections with hyper, and the answer body that can be cut
//! off mid-way (the `reset_count` fault).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{CutOff, Simulator};

/// A TLS acceptor from a PEM certificate chain and key: `sim --tls-cert … --tls-key …`, for testing `ca_file`.
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> Result<TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|e| format!("TLS: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

impl Simulator {
    /// Binds `addr` and returns the bound address and the serving future; with `tls`, it serves HTTPS.
    pub async fn bind(
        self,
        addr: SocketAddr,
        tls: Option<TlsAcceptor>,
    ) -> std::io::Result<(SocketAddr, impl Future<Output = ()> + Send + 'static)> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let serve = async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (sim, tls) = (self.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                sim.serve_connection(stream).await;
                            }
                        }
                        None => sim.serve_connection(stream).await,
                    }
                });
            }
        };
        Ok((local, serve))
    }

    async fn serve_connection<S>(self, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let idle_close = self.connection_accepted();
        // Requests in flight on this connection, and when the last one finished.
        let activity = Arc::new(std::sync::Mutex::new((0usize, tokio::time::Instant::now())));
        let sim = self.clone();
        let busy = Arc::clone(&activity);
        let service = hyper::service::service_fn(move |req| {
            let sim = sim.clone();
            let busy = Arc::clone(&busy);
            busy.lock().expect("activity lock").0 += 1;
            async move {
                let _done = Finished(busy);
                let response = sim.handle(req).await;
                Ok::<_, Infallible>(match response.extensions().get::<CutOff>() {
                    None => response.map(SimBody::Whole),
                    Some(CutOff) => {
                        let (parts, body) = response.into_parts();
                        let whole = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                        let first = whole.slice(..whole.len() / 2);
                        Response::from_parts(parts, SimBody::CutOff(Some(first)))
                    }
                })
            }
        });
        let builder = auto::Builder::new(TokioExecutor::new());
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let Some(idle_close) = idle_close else {
            let _ = connection.await;
            self.connection_closed(false);
            return;
        };
        tokio::pin!(connection);
        loop {
            let (in_flight, last) = *activity.lock().expect("activity lock");
            let close_at = last + idle_close;
            if in_flight == 0 && tokio::time::Instant::now() >= close_at {
                // An idle HTTP/1 connection closes at once.
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
                self.connection_closed(true);
                return;
            }
            tokio::select! {
                _ = connection.as_mut() => {
                    self.connection_closed(false);
                    return;
                }
                _ = tokio::time::sleep_until(close_at.max(tokio::time::Instant::now() + Duration::from_millis(5))) => {}
            }
        }
    }
}

/// Marks a request's end on its connection, however the request ends.
struct Finished(Arc<std::sync::Mutex<(usize, tokio::time::Instant)>>);

impl Drop for Finished {
    fn drop(&mut self) {
        let mut activity = self.0.lock().expect("activity lock");
        *activity = (activity.0 - 1, tokio::time::Instant::now());
    }
}

/// The simulator's answer body: whole, or its first bytes and then a broken connection.
enum SimBody {
    Whole(Full<Bytes>),
    CutOff(Option<Bytes>),
}

impl http_body::Body for SimBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            SimBody::Whole(full) => std::pin::Pin::new(full).poll_frame(cx).map_err(|never| match never {}),
            SimBody::CutOff(first) => std::task::Poll::Ready(Some(match first.take() {
                Some(bytes) => Ok(http_body::Frame::data(bytes)),
                None => Err(std::io::Error::other("fault: connection reset mid-answer")),
            })),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            SimBody::Whole(full) => full.size_hint(),
            // Announce more than will come, as a peer that dies mid-answer does.
            SimBody::CutOff(_) => http_body::SizeHint::with_exact(52),
        }
    }
}
