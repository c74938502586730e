//! The listeners and what serves them: the data plane's worker threads, the admin listener, each listener's
//! connection limit, and the graceful drain at shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tracing::{debug, info, warn};

use crate::admin::{ADMIN_HEADER_READ_TIMEOUT, ADMIN_MAX_CONNECTIONS, AdminService};
use crate::bootstrap::StartError;
use crate::config::ServerConfig;
use crate::connection::PerConnection;
use crate::head::READ_BUFFER_BYTES;
use crate::layers::forward::Forward;
use crate::metrics::Metrics;
use crate::stack::{Shared, data_plane};
use crate::upstream::Upstream;

/// Both listening sockets, bound before anything else starts.
pub struct Listeners {
    /// Shared by the data-plane workers: each accepts from it on its own thread.
    pub data: std::net::TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &ServerConfig) -> Result<Listeners, StartError> {
        let bind = |setting, addr| move |source| StartError::Bind { setting, addr, source };
        let data = TcpListener::bind(config.listen)
            .await
            .and_then(TcpListener::into_std)
            .map_err(bind("server.listen", config.listen))?;
        let admin =
            TcpListener::bind(config.admin_listen).await.map_err(bind("server.admin_listen", config.admin_listen))?;
        Ok(Listeners { data, admin })
    }

    pub fn data_addr(&self) -> SocketAddr {
        self.data.local_addr().expect("bound listener has an address")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("bound listener has an address")
    }
}

/// The data plane's worker threads, serving until drained.
///
/// The data plane runs on `server.workers` threads, each with a single-threaded runtime, its own upstream
/// connection pool and its own share of the accepted connections, so a request is read, forwarded and answered
/// without leaving its thread (nginx's worker model). Quota, tokens, metrics and limits are shared.
pub struct DataPlane {
    workers: Vec<JoinHandle<()>>,
    stop: Stopper,
    /// Closes once every worker's accept loop has ended.
    accept_loops_ended: mpsc::Receiver<()>,
    /// Lets the workers stop driving whatever connections are left, once the grace is over.
    release: watch::Sender<bool>,
}

impl DataPlane {
    /// Starts the workers; each connection is served by a stack built from the config `live` holds.
    pub fn start(
        config: &ServerConfig,
        listener: std::net::TcpListener,
        upstream: &Upstream,
        live: &watch::Sender<Arc<Shared>>,
        metrics: &Metrics,
    ) -> DataPlane {
        let (stop, signal) = Stopper::new();
        let (release, released) = watch::channel(false);
        // Each worker holds a sender; the channel closes once every accept loop has ended.
        let (accepting, accept_loops_ended) = mpsc::channel::<()>(1);
        let connections = Connections {
            limit: Arc::new(Semaphore::new(config.max_connections)),
            open: Some(metrics.open_connections.clone()),
        };
        let http = data_http(config);
        let mut workers = Vec::new();
        for index in 0..config.worker_threads() {
            // Built here so that a worker that cannot start stops the gateway rather than leaving it short-handed.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for a data-plane worker");
            let listener = listener
                .try_clone()
                .and_then(|listener| {
                    let _in_runtime = runtime.enter();
                    TcpListener::from_std(listener)
                })
                .expect("the data listener registered with a worker's runtime");
            let worker = DataWorker {
                listener,
                forward: Forward::new(upstream.clone(), metrics),
                live: live.subscribe(),
                http: http.clone(),
                signal: signal.clone(),
                connections: connections.clone(),
                released: released.clone(),
                accepting: accepting.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("data-worker-{index}"))
                .spawn(move || runtime.block_on(worker.run()))
                .expect("a data-plane worker thread");
            workers.push(thread);
        }
        info!(workers = workers.len(), "data plane running");
        DataPlane { workers, stop, accept_loops_ended, release }
    }

    /// Stops accepting, gives the requests in flight up to `grace` to finish, then ends the workers.
    pub async fn drain(mut self, grace: Duration) {
        let graceful = self.stop.stop_accepting();
        let _ = self.accept_loops_ended.recv().await;
        let graceful = Arc::into_inner(graceful).expect("every data accept loop has ended");
        match tokio::time::timeout(grace, graceful.shutdown()).await {
            Ok(()) => info!("all in-flight requests finished"),
            Err(_) => warn!("shutdown grace elapsed with requests still in flight"),
        }
        let _ = self.release.send(true);
        for worker in self.workers {
            let _ = tokio::task::spawn_blocking(move || worker.join()).await;
        }
    }
}

/// HTTP/1 only: the header-read timeout and the header-size cap are HTTP/1 settings, and callers of a loopback
/// sidecar gain nothing from h2c.
fn data_http(config: &ServerConfig) -> http1::Builder {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        // A bound on each connection's read buffer; the head's own cap is the head layer's (head.rs).
        .max_buf_size(READ_BUFFER_BYTES)
        // Answers are a few hundred bytes: copied behind the head and written at once, which costs less than
        // queueing both for one vectored write (with the pool's side, about 1,000 instructions per forwarded
        // request, by bench/instructions).
        .writev(false);
    http
}

/// One data-plane thread: accepts from the shared listener and serves its connections on its own runtime.
struct DataWorker {
    /// The shared listening socket, registered with this worker's runtime.
    listener: TcpListener,
    /// The config in force: each connection builds its stack from the latest.
    live: watch::Receiver<Arc<Shared>>,
    /// The stack's innermost service; its connections to Easemob are this thread's own (`upstream.rs`).
    forward: Forward,
    http: http1::Builder,
    signal: StopSignal,
    connections: Connections,
    /// Set once draining is over: the worker then stops driving whatever connections are left.
    released: watch::Receiver<bool>,
    /// Dropped when this worker stops accepting.
    accepting: mpsc::Sender<()>,
}

impl DataWorker {
    async fn run(self) {
        let DataWorker { listener, live, forward, http, signal, connections, mut released, accepting } = self;
        // Built per connection: the access layer knows its peer (for server.allow_from) without a per-request
        // extension.
        let make_service = move |peer: SocketAddr| {
            let forward = forward.clone();
            PerConnection::new(live.clone(), move |shared: &Arc<Shared>| data_plane(shared, &forward, peer.ip()))
        };
        accept_loop(listener, http, make_service, signal, connections).await;
        drop(accepting);
        // This thread's connections are still draining: keep driving them until the grace is over.
        let _ = released.wait_for(|released| *released).await;
    }
}

/// The admin endpoints' listener, on the calling runtime, with limits of its own.
pub struct AdminPlane {
    accepting: tokio::task::JoinHandle<()>,
    stop: Stopper,
}

impl AdminPlane {
    pub fn start(listener: TcpListener, admin: AdminService) -> AdminPlane {
        let (stop, signal) = Stopper::new();
        // Not the data plane's limits: probes must be answered while idle connections pile up, which a short
        // header timeout and a small cap of its own ensure.
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new()).header_read_timeout(ADMIN_HEADER_READ_TIMEOUT);
        let make_service = move |_| {
            let admin = admin.clone();
            hyper::service::service_fn(move |request| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(request).await) }
            })
        };
        let connections = Connections { limit: Arc::new(Semaphore::new(ADMIN_MAX_CONNECTIONS)), open: None };
        let accepting = tokio::spawn(accept_loop(listener, http, make_service, signal, connections));
        AdminPlane { accepting, stop }
    }

    /// Closes the listener and gives its connections a moment to finish.
    pub async fn stop(self) {
        let graceful = self.stop.stop_accepting();
        let _ = self.accepting.await;
        let graceful = Arc::into_inner(graceful).expect("the admin accept loop has ended");
        let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
    }
}

/// A listener's stop signal, and the connections it has to drain.
struct Stopper {
    stop: watch::Sender<bool>,
    graceful: Arc<GracefulShutdown>,
}

/// What an accept loop watches: when to stop, and where its connections are registered for the drain.
#[derive(Clone)]
struct StopSignal {
    stop: watch::Receiver<bool>,
    graceful: Arc<GracefulShutdown>,
}

impl Stopper {
    fn new() -> (Stopper, StopSignal) {
        let (stop, stopping) = watch::channel(false);
        let graceful = Arc::new(GracefulShutdown::new());
        (Stopper { stop, graceful: Arc::clone(&graceful) }, StopSignal { stop: stopping, graceful })
    }

    /// Tells the accept loops to stop; the connections to drain, once every loop has ended and let go of them.
    fn stop_accepting(self) -> Arc<GracefulShutdown> {
        let _ = self.stop.send(true);
        self.graceful
    }
}

async fn accept_loop<S, B>(
    listener: TcpListener,
    http: http1::Builder,
    make_service: impl Fn(SocketAddr) -> S + Send + 'static,
    signal: StopSignal,
    connections: Connections,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let StopSignal { mut stop, graceful } = signal;
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
