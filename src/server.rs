//! Listeners, the data-plane middleware stack, the admin endpoints, and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tracing::{debug, info, warn};

use crate::access::Access;
use crate::audit::Audit;
use crate::config::{Config, SecretPolicy};
use crate::error::{GatewayError, json_response};
use crate::metrics::Metrics;
use crate::proxy::{App, Proxy, ProxyService, X_REQUEST_ID, is_plain_label};
use crate::ratelimit::QuotaSet;
use crate::token::{Credentials, TokenSource};
use crate::upstream::Upstream;

/// A gateway whose listeners are bound and whose token fetches have started.
pub struct Server {
    config: Config,
    proxy: Arc<Proxy>,
    metrics: Metrics,
    audit: Option<Arc<Audit>>,
    /// Shared by the data-plane workers: each accepts from it on its own thread.
    data: std::net::TcpListener,
    admin: TcpListener,
}

impl Server {
    /// Checks the config, binds both listeners and starts fetching every app's token.
    pub async fn bind(config: Config, policy: SecretPolicy) -> Result<Server, String> {
        let problems = config.problems(policy);
        if !problems.is_empty() {
            return Err(problems.join("\n"));
        }
        if !config.server.listen.ip().is_loopback() {
            warn!(listen = %config.server.listen, "the data plane listens beyond loopback: callers present no credential");
        }
        let metrics = Metrics::new();
        let upstream = Upstream::new(&config.upstream)?;
        let apps = config
            .apps
            .iter()
            .enumerate()
            .map(|(index, app)| {
                let credentials = Credentials {
                    org: app.org_name.clone(),
                    app: app.app_name.clone(),
                    client_id: app.client_id.clone(),
                    client_secret: std::sync::RwLock::new(app.resolve_secret()?),
                };
                let token = TokenSource::spawn(credentials, config.token.clone(), upstream.clone(), metrics.clone());
                Ok(App { index, org: app.org_name.clone(), app: app.app_name.clone(), key: app.app_key(), token })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let data = TcpListener::bind(config.server.listen)
            .await
            .and_then(TcpListener::into_std)
            .map_err(|e| format!("server.listen {}: {e}", config.server.listen))?;
        let admin = TcpListener::bind(config.server.admin_listen)
            .await
            .map_err(|e| format!("server.admin_listen {}: {e}", config.server.admin_listen))?;
        let keys: Vec<String> = apps.iter().map(|a| a.key.clone()).collect();
        let quota = QuotaSet::new(&config.rate_limit, &keys, metrics.clone())?;
        let audit = Audit::open(&config.audit, metrics.clone())?;
        if audit.is_none() {
            warn!("audit.file is not set: deletions are not recorded in an audit trail");
        }
        let proxy = Arc::new(Proxy::new(
            apps,
            upstream,
            quota,
            metrics.clone(),
            &config.server,
            Access::new(&config),
            audit.clone(),
        ));
        Ok(Server { config, proxy, metrics, audit, data, admin })
    }

    pub fn data_addr(&self) -> SocketAddr {
        self.data.local_addr().expect("bound listener has an address")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("bound listener has an address")
    }

    /// Serves until `shutdown` completes, then drains: `/readyz` turns 503, listeners close, in-flight requests
    /// get up to `server.shutdown_grace` to finish.
    ///
    /// The data plane runs on `server.workers` threads, each with a single-threaded runtime, its own upstream
    /// connection pool and its own share of the accepted connections, so a request is read, forwarded and answered
    /// without leaving its thread (nginx's worker model). Quota, tokens, metrics and limits are shared. The admin
    /// listener, token refreshes, Redis and signals run on the calling runtime.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Server { config, proxy, metrics, audit, data, admin } = self;
        let draining = Arc::new(AtomicBool::new(false));
        let (stop_data, data_stopped) = watch::channel(false);
        let (stop_admin, admin_stopped) = watch::channel(false);
        let (release_workers, workers_released) = watch::channel(false);
        let (data_graceful, admin_graceful) = (Arc::new(GracefulShutdown::new()), Arc::new(GracefulShutdown::new()));

        // HTTP/1 only: the header-read timeout and the header-size cap are HTTP/1 settings, and callers of a
        // loopback sidecar gain nothing from h2c.
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(config.server.header_read_timeout)
            // Request line and headers together; the six routes need a fraction of this.
            .max_buf_size(MAX_HEADER_BYTES);

        // Each worker holds a sender; the channel closes once every accept loop has ended.
        let (accepting, mut accept_loops_ended) = tokio::sync::mpsc::channel::<()>(1);
        let connections = Connections {
            limit: Arc::new(Semaphore::new(config.server.max_connections)),
            open: Some(metrics.open_connections.clone()),
        };
        let mut workers = Vec::new();
        for index in 0..config.server.worker_threads() {
            // Built here so that a worker that cannot start stops the gateway rather than leaving it short-handed.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for a data-plane worker");
            let listener = data
                .try_clone()
                .and_then(|listener| {
                    let _in_runtime = runtime.enter();
                    TcpListener::from_std(listener)
                })
                .expect("the data listener registered with a worker's runtime");
            let worker = DataWorker {
                listener,
                proxy: proxy.with_own_pool(),
                http: http.clone(),
                graceful: Arc::clone(&data_graceful),
                stop: data_stopped.clone(),
                connections: connections.clone(),
                released: workers_released.clone(),
                accepting: accepting.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("data-worker-{index}"))
                .spawn(move || runtime.block_on(worker.run()))
                .expect("a data-plane worker thread");
            workers.push(thread);
        }
        drop((data, accepting));
        info!(workers = workers.len(), "data plane running");

        let admin_service =
            AdminService { proxy: Arc::clone(&proxy), metrics: metrics.clone(), draining: Arc::clone(&draining) };
        let admin_loop = tokio::spawn(accept_loop(
            admin,
            http,
            move |_| {
                let admin = admin_service.clone();
                hyper::service::service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.handle(req)) }
                })
            },
            Arc::clone(&admin_graceful),
            admin_stopped,
            Connections { limit: Arc::new(Semaphore::new(ADMIN_MAX_CONNECTIONS)), open: None },
        ));

        let reload = tokio::spawn(reload_secrets_on_sighup(config.clone(), Arc::clone(&proxy)));
        shutdown.await;
        reload.abort();
        info!(grace = ?config.server.shutdown_grace, "shutting down: refusing new connections, draining in-flight requests");
        // The admin listener stays up while draining, so probes see /readyz turn 503 rather than a refused port.
        draining.store(true, Ordering::SeqCst);
        let _ = stop_data.send(true);
        let _ = accept_loops_ended.recv().await;
        let data_graceful = Arc::into_inner(data_graceful).expect("every data accept loop has ended");
        match tokio::time::timeout(config.server.shutdown_grace, data_graceful.shutdown()).await {
            Ok(()) => info!("all in-flight requests finished"),
            Err(_) => warn!("shutdown grace elapsed with requests still in flight"),
        }
        let _ = release_workers.send(true);
        for worker in workers {
            let _ = tokio::task::spawn_blocking(move || worker.join()).await;
        }
        if let Some(audit) = &audit {
            audit.sync();
        }
        let _ = stop_admin.send(true);
        let _ = admin_loop.await;
        let admin_graceful = Arc::into_inner(admin_graceful).expect("the admin accept loop has ended");
        let _ = tokio::time::timeout(Duration::from_secs(1), admin_graceful.shutdown()).await;
    }
}

/// One data-plane thread: accepts from the shared listener and serves its connections on its own runtime.
struct DataWorker {
    /// The shared listening socket, registered with this worker's runtime.
    listener: TcpListener,
    proxy: Proxy,
    http: http1::Builder,
    graceful: Arc<GracefulShutdown>,
    stop: watch::Receiver<bool>,
    connections: Connections,
    /// Set once draining is over: the worker then stops driving whatever connections are left.
    released: watch::Receiver<bool>,
    /// Dropped when this worker stops accepting.
    accepting: tokio::sync::mpsc::Sender<()>,
}

impl DataWorker {
    async fn run(self) {
        let DataWorker { listener, proxy, http, graceful, stop, connections, mut released, accepting } = self;
        let proxy = Arc::new(proxy);
        // Outermost first. A caller's request id is kept only if it is short and plain (it is logged and
        // forwarded); then one is set before anything can answer, so every answer, rejections included, carries
        // one; panics become an enveloped 500, not a dropped connection; the proxy does the rest (access, route,
        // validation, quota, token, upstream) in one place. Built per connection: the proxy knows its peer (for
        // server.allow_from) without a per-request extension.
        let make_service = move |peer: SocketAddr| {
            let service = ServiceBuilder::new()
                .map_request(drop_unfit_request_id)
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(CatchPanicLayer::custom(|_| GatewayError::Internal.into_response(std::time::Instant::now())))
                .service(ProxyService::new(Arc::clone(&proxy), peer.ip()));
            TowerToHyperService::new(service)
        };
        accept_loop(listener, http, make_service, graceful, stop, connections).await;
        drop(accepting);
        // This thread's connections are still draining: keep driving them until the grace is over.
        let _ = released.wait_for(|released| *released).await;
    }
}

/// On SIGHUP, re-reads every `client_secret_file` (Kubernetes updates mounted secrets in place) and fetches a
/// fresh token with each secret that changed; a file that cannot be read keeps the old secret.
async fn reload_secrets_on_sighup(config: Config, proxy: Arc<Proxy>) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        warn!("SIGHUP handler unavailable: client secrets are read at start-up only");
        return;
    };
    while hangups.recv().await.is_some() {
        info!("SIGHUP received: re-reading client secret files");
        for (app, runtime) in config.apps.iter().zip(proxy.apps()) {
            if app.client_secret_file.is_none() {
                continue;
            }
            match app.resolve_secret() {
                Ok(secret) => runtime.token.replace_secret(secret),
                Err(e) => warn!(app = %runtime.key, error = %e, "client secret not reloaded; keeping the current one"),
            }
        }
    }
}

/// A caller's `X-Request-Id` is logged and forwarded to Easemob: keep it only if it is 1–128 characters of
/// `A-Z a-z 0-9 - _ . :`, otherwise drop it so a fresh one is generated.
fn drop_unfit_request_id<B>(mut request: Request<B>) -> Request<B> {
    let fit = |v: &http::HeaderValue| v.to_str().is_ok_and(|v| is_plain_label(v, 128));
    if request.headers().get(X_REQUEST_ID).is_some_and(|v| !fit(v)) {
        request.headers_mut().remove(X_REQUEST_ID);
    }
    request
}

async fn accept_loop<S, B>(
    listener: TcpListener,
    http: http1::Builder,
    make_service: impl Fn(SocketAddr) -> S + Send + 'static,
    graceful: Arc<GracefulShutdown>,
    mut stop: watch::Receiver<bool>,
    connections: Connections,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        // At the connection limit, stop accepting: newcomers wait in the kernel's backlog, not in our memory.
        let permit = tokio::select! {
            permit = Arc::clone(&connections.limit).acquire_owned() => permit.expect("never closed"),
            _ = stop.changed() => return,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Usually EMFILE: back off briefly instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let connection = http.serve_connection(TokioIo::new(stream), make_service(peer));
        let connection = graceful.watch(connection);
        let open = connections.open.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(open) = &open {
                open.inc();
            }
            if let Err(e) = connection.await {
                debug!(error = %e, "connection ended with an error");
            }
            if let Some(open) = &open {
                open.dec();
            }
        });
    }
}

/// How many connections a listener keeps open, and the gauge that counts them (data plane only).
#[derive(Clone)]
struct Connections {
    limit: Arc<Semaphore>,
    open: Option<prometheus::IntGauge>,
}

/// The request line and headers of one request: far above what the six routes need, far below a memory risk.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// The data plane's contract, served on the admin listener (and kept true by tests/schemathesis).
const OPENAPI: &str = include_str!("../docs/openapi.yaml");
/// Probes and a scraper or two.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// `/healthz`, `/readyz`, `/metrics`, `/openapi.yaml`: the admin listener, never the data plane.
#[derive(Clone)]
struct AdminService {
    proxy: Arc<Proxy>,
    metrics: Metrics,
    draining: Arc<AtomicBool>,
}

impl AdminService {
    fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
        }
        match request.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => self.readiness(),
            "/openapi.yaml" => Response::builder()
                .header(header::CONTENT_TYPE, "application/yaml")
                .body(Full::new(Bytes::from_static(OPENAPI.as_bytes())))
                .expect("static response parts are valid"),
            "/metrics" => Response::builder()
                .header(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)
                .body(Full::new(Bytes::from(self.metrics.render())))
                .expect("static response parts are valid"),
            _ => text(StatusCode::NOT_FOUND, "not found: /healthz, /readyz, /metrics, /openapi.yaml\n"),
        }
    }

    /// Ready when not draining and every app holds a usable token. Per-app detail, no secrets.
    fn readiness(&self) -> Response<Full<Bytes>> {
        let draining = self.draining.load(Ordering::SeqCst);
        let apps: serde_json::Map<String, serde_json::Value> = self
            .proxy
            .apps()
            .iter()
            .map(|app| (app.key.clone(), serde_json::to_value(app.token.status()).expect("status serializes")))
            .collect();
        let ready = !draining && self.proxy.apps().iter().all(|app| app.token.is_ready());
        let body = serde_json::json!({ "ready": ready, "draining": draining, "apps": apps });
        let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        json_response(status, body.to_string().into_bytes(), "local")
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("static response parts are valid")
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
    }
}
