//! Listeners, data-plane workers and graceful shutdown. The stack each connection is served by is built in
//! `stack.rs`; the admin endpoints live in `admin.rs`.

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_util::future::Either;
use tower::ServiceExt;
use tower::util::Oneshot;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info, warn};

use crate::access::Access;
use crate::admin::{ADMIN_HEADER_READ_TIMEOUT, ADMIN_MAX_CONNECTIONS, AdminService};
use crate::apps::Apps;
use crate::audit::{Audit, AuditOpenError};
use crate::config::{AppKey, Config, SecretPolicy, format_duration};
use crate::head::READ_BUFFER_BYTES;
use crate::jobs::records::StoreError;
use crate::jobs::runner::{Plane, Runner};
use crate::jobs::shared::SharedStore;
use crate::jobs::store::LocalStore;
use crate::jobs::{Clock, Jobs, Store};
use crate::logging::LogLevel;
use crate::metrics::Metrics;
use crate::ratelimit::{QuotaSet, RedisError};
use crate::reload::Reloader;
use crate::retry::SafeRetry;
use crate::stack::{Shared, data_plane, job_plane};
use crate::status::StatusBoard;
use crate::trace::export::{Export, ExportSetupError};
use crate::upstream::forward::Forward;
use crate::upstream::{Upstream, UpstreamSetupError};

/// Why the gateway could not start: each names the setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Every problem the configuration has, one per line.
    #[error("{}", .0.join("\n"))]
    Config(Vec<String>),
    #[error(transparent)]
    Upstream(#[from] UpstreamSetupError),
    #[error("rate_limit.redis: {0}")]
    Redis(RedisError),
    #[error("{setting} {addr}: {source}")]
    Bind { setting: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Audit(#[from] AuditOpenError),
    #[error("jobs ({store}): {source}")]
    Jobs { store: String, source: StoreError },
    #[error(transparent)]
    Export(#[from] ExportSetupError),
}

/// A gateway whose listeners are bound and whose token fetches have started.
pub struct Server {
    config: Config,
    policy: SecretPolicy,
    /// The config file, re-read on reload.
    path: Option<PathBuf>,
    /// The log filter, which a reload may change.
    log: Option<LogLevel>,
    shared: Shared,
    upstream: Upstream,
    /// Shared by the data-plane workers: each accepts from it on its own thread.
    data: std::net::TcpListener,
    admin: TcpListener,
}

impl Server {
    /// Checks the config, binds both listeners and starts fetching every app's token.
    pub async fn bind(config: Config, policy: SecretPolicy) -> Result<Server, StartError> {
        let problems = config.problems(policy);
        if !problems.is_empty() {
            return Err(StartError::Config(problems));
        }
        if !config.server.listen.ip().is_loopback() {
            warn!(listen = %config.server.listen, "the data plane listens beyond loopback: callers present no credential");
        }
        let metrics = Metrics::new();
        let upstream = Upstream::new(&config.upstream)?;
        let keys: Vec<AppKey> = config.apps.iter().map(|app| app.app_key()).collect();
        let quota = QuotaSet::new(&config.rate_limit, &keys, metrics.clone()).map_err(StartError::Redis)?;
        // Readiness waits for the first tokens; start-up does not.
        let apps =
            Apps::assemble(&config, &quota, &upstream, &metrics, None, None).await.map_err(StartError::Config)?;
        let bind = |setting, addr| move |source| StartError::Bind { setting, addr, source };
        let data = TcpListener::bind(config.server.listen)
            .await
            .and_then(TcpListener::into_std)
            .map_err(bind("server.listen", config.server.listen))?;
        let admin = TcpListener::bind(config.server.admin_listen)
            .await
            .map_err(bind("server.admin_listen", config.server.admin_listen))?;
        let audit = Audit::open(&config.audit, metrics.clone())?;
        if audit.is_none() {
            warn!("audit.file is not set: deletions are not recorded in an audit trail");
        }
        let store = match (config.jobs.enabled, &config.jobs.store) {
            (false, _) => None,
            (true, Some(path)) => Some(Arc::new(
                LocalStore::open(path)
                    .map_err(|source| StartError::Jobs { store: path.display().to_string(), source })?,
            ) as Store),
            (true, None) => Some(Arc::new(
                SharedStore::new(&config.rate_limit.redis, config.jobs.lease)
                    .map_err(|source| StartError::Jobs { store: "redis".to_owned(), source })?,
            ) as Store),
        };
        let jobs = store.map(|store| Jobs::new(store, config.jobs.clone(), Clock::new()));
        let export = Export::start(&config.trace, &metrics)?;
        let shared = Shared {
            jobs,
            export,
            apps,
            access: Arc::new(Access::new(&config)),
            in_flight: Arc::new(Semaphore::new(config.server.max_in_flight)),
            quota,
            audit,
            retry: SafeRetry::new(&metrics),
            metrics,
            body_read_timeout: config.server.body_read_timeout,
        };
        Ok(Server { config, policy, path: None, log: None, shared, upstream, data, admin })
    }

    /// Reloads the whole config from `path` on SIGHUP, and when it (or a secret file it names) changes.
    /// `log` is the log filter's handle, for `log.level`.
    pub fn reloading_from(self, path: PathBuf, log: Option<LogLevel>) -> Server {
        Server { path: Some(path), log, ..self }
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
        let Server { config, policy, path, log, shared, upstream, data, admin } = self;
        // The config in force, swapped whole by a reload; every connection builds its stack from the latest.
        let live = watch::Sender::new(Arc::new(shared.clone()));
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
            // A bound on each connection's read buffer; the head's own cap is the head layer's (head.rs).
            .max_buf_size(READ_BUFFER_BYTES)
            // Answers are a few hundred bytes: copied behind the head and written at once, which costs less than
            // queueing both for one vectored write (with the pool's side, about 1,000 instructions per forwarded
            // request, by bench/instructions).
            .writev(false);

        // Each worker holds a sender; the channel closes once every accept loop has ended.
        let (accepting, mut accept_loops_ended) = tokio::sync::mpsc::channel::<()>(1);
        let connections = Connections {
            limit: Arc::new(Semaphore::new(config.server.max_connections)),
            open: Some(shared.metrics.open_connections.clone()),
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
                forward: Forward::new(upstream.clone(), &shared.metrics),
                live: live.subscribe(),
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

        let status = StatusBoard::start(live.subscribe());
        let admin_service =
            AdminService { live: live.subscribe(), draining: Arc::clone(&draining), status: Arc::clone(&status) };
        // The admin listener's own limits, not the data plane's: probes must be answered while idle connections
        // pile up, which a short header timeout and a small cap of its own ensure.
        let mut admin_http = http1::Builder::new();
        admin_http.timer(TokioTimer::new()).header_read_timeout(ADMIN_HEADER_READ_TIMEOUT);
        let admin_loop = tokio::spawn(accept_loop(
            admin,
            admin_http,
            move |_| {
                let admin = admin_service.clone();
                hyper::service::service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.handle(req).await) }
                })
            },
            Arc::clone(&admin_graceful),
            admin_stopped,
            Connections { limit: Arc::new(Semaphore::new(ADMIN_MAX_CONNECTIONS)), open: None },
        ));

        // Jobs run on this runtime (with this thread's connections to Easemob), through the config in force. At
        // shutdown the scheduler simply stops: an operation in flight then is still pending in the store and runs
        // again after the restart.
        let scheduler = shared.jobs.clone().map(|jobs| {
            let forward = Forward::new(upstream.clone(), &shared.metrics);
            let plane_of =
                move |shared: &Shared| Plane { apps: shared.apps.clone(), send: job_plane(shared, &forward) };
            let (planes, plane) = watch::channel(plane_of(&shared));
            let mut reloads = live.subscribe();
            let follow = tokio::spawn(async move {
                while reloads.changed().await.is_ok() {
                    let shared = Arc::clone(&reloads.borrow_and_update());
                    planes.send_replace(plane_of(&shared));
                }
            });
            (follow, tokio::spawn(Runner::new(jobs, plane, shared.metrics.clone()).run()))
        });
        let reload = Reloader { path, policy, current: config.clone(), live, upstream: upstream.clone(), log, status };
        let reload = tokio::spawn(reload.run());
        shutdown.await;
        reload.abort();
        if let Some((follow, scheduler)) = scheduler {
            follow.abort();
            scheduler.abort();
        }
        let grace = format_duration(config.server.shutdown_grace);
        info!(grace = %grace, "shutting down: refusing new connections, draining in-flight requests");
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
        if let Some(audit) = &shared.audit {
            audit.sync();
        }
        if let Some(export) = &shared.export {
            export.shutdown(SPANS_GRACE).await;
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
    /// The config in force: each connection builds its stack from the latest.
    live: watch::Receiver<Arc<Shared>>,
    /// The stack's innermost service; its connections to Easemob are this thread's own (`upstream.rs`).
    forward: Forward,
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
        let DataWorker { listener, live, forward, http, graceful, stop, connections, mut released, accepting } = self;
        // Built per connection: the access layer knows its peer (for server.allow_from) without a per-request
        // extension.
        let make_service = move |peer: SocketAddr| {
            let forward = forward.clone();
            PerConnection::new(live.clone(), move |shared: &Shared| data_plane(shared, &forward, peer.ip()))
        };
        accept_loop(listener, http, make_service, graceful, stop, connections).await;
        drop(accepting);
        // This thread's connections are still draining: keep driving them until the grace is over.
        let _ = released.wait_for(|released| *released).await;
    }
}

/// A connection's stack as hyper's service. hyper calls a service through `&self`; an HTTP/1 connection's requests
/// are handled one at a time, so the stack is borrowed for each call instead of cloned (hyper-util's adapter
/// clones the whole stack per request) whenever it is ready at once, which load shedding makes the usual case;
/// otherwise a clone waits for readiness. After a reload, the next request is served by a stack built anew from
/// the new config (one atomic load per request tells); a request in flight keeps the stack it started with.
struct PerConnection<S, F> {
    service: RefCell<S>,
    live: RefCell<watch::Receiver<Arc<Shared>>>,
    build: F,
}

impl<S, F: Fn(&Shared) -> S> PerConnection<S, F> {
    fn new(mut live: watch::Receiver<Arc<Shared>>, build: F) -> PerConnection<S, F> {
        let service = build(&live.borrow_and_update());
        PerConnection { service: RefCell::new(service), live: RefCell::new(live), build }
    }
}

impl<S, F, R> hyper::service::Service<R> for PerConnection<S, F>
where
    S: tower::Service<R> + Clone,
    F: Fn(&Shared) -> S,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Oneshot<S, R>>;

    fn call(&self, request: R) -> Self::Future {
        let mut service = self.service.borrow_mut();
        let mut live = self.live.borrow_mut();
        if live.has_changed().unwrap_or(false) {
            *service = (self.build)(&live.borrow_and_update());
        }
        match service.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => Either::Left(service.call(request)),
            _ => Either::Right(service.clone().oneshot(request)),
        }
    }
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

/// At shutdown, how long the last spans may take to be sent.
const SPANS_GRACE: Duration = Duration::from_secs(5);
/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
    }
}
