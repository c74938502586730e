//! The gateway's life: start-up (`bootstrap.rs` builds what it serves with), serving until told to stop, then the
//! drain. The listeners and their workers are `listener.rs`; each connection's stack is built in `stack.rs`; the
//! admin endpoints live in `admin.rs`.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::admin::AdminService;
use crate::bootstrap::{self, StartError};
use crate::config::{Config, SecretPolicy, format_duration};
use crate::jobs::Jobs;
use crate::jobs::runner::{Plane, Runner};
use crate::layers::forward::Forward;
use crate::listener::{AdminPlane, DataPlane, Listeners};
use crate::logging::LogLevel;
use crate::reload::Reloader;
use crate::stack::{Shared, job_plane};
use crate::status::StatusBoard;
use crate::upstream::Upstream;

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
    listeners: Listeners,
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
        let listeners = Listeners::bind(&config.server).await?;
        let (shared, upstream) = bootstrap::start(&config).await?;
        Ok(Server { config, policy, path: None, log: None, shared, upstream, listeners })
    }

    /// Reloads the whole config from `path` on SIGHUP, and when it (or a secret file it names) changes.
    /// `log` is the log filter's handle, for `log.level`.
    pub fn reloading_from(self, path: PathBuf, log: Option<LogLevel>) -> Server {
        Server { path: Some(path), log, ..self }
    }

    pub fn data_addr(&self) -> SocketAddr {
        self.listeners.data_addr()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.listeners.admin_addr()
    }

    /// Serves until `shutdown` completes, then drains: `/readyz` turns 503, listeners close, in-flight requests
    /// get up to `server.shutdown_grace` to finish.
    ///
    /// The data plane runs on worker threads of its own (`listener.rs`); the admin listener, the jobs, token
    /// refreshes, Redis, reloads and signals run on the calling runtime.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Server { config, policy, path, log, shared, upstream, listeners } = self;
        // The config in force, swapped whole by a reload; every connection builds its stack from the latest.
        let live = watch::Sender::new(Arc::new(shared.clone()));
        let draining = Arc::new(AtomicBool::new(false));
        let data = DataPlane::start(&config.server, listeners.data, &upstream, &live, &shared.metrics);
        let status = StatusBoard::start(live.subscribe());
        let admin =
            AdminService { live: live.subscribe(), draining: Arc::clone(&draining), status: Arc::clone(&status) };
        let admin = AdminPlane::start(listeners.admin, admin);
        let jobs = shared.jobs.clone().map(|jobs| Scheduler::start(jobs, &shared, &upstream, &live));
        let reload = Reloader { path, policy, current: config.clone(), live, upstream, log, status };
        let reload = tokio::spawn(reload.run());

        shutdown.await;
        reload.abort();
        if let Some(jobs) = jobs {
            jobs.stop();
        }
        let grace = format_duration(config.server.shutdown_grace);
        info!(grace = %grace, "shutting down: refusing new connections, draining in-flight requests");
        // The admin listener stays up while draining, so probes see /readyz turn 503 rather than a refused port.
        draining.store(true, Ordering::SeqCst);
        data.drain(config.server.shutdown_grace).await;
        if let Some(audit) = &shared.audit {
            audit.sync();
        }
        if let Some(export) = &shared.export {
            export.shutdown(SPANS_GRACE).await;
        }
        admin.stop().await;
    }
}

/// The jobs scheduler, and the task that hands it each reloaded config.
///
/// Jobs run on the calling runtime (with its own connections to Easemob), through the config in force. At
/// shutdown the scheduler simply stops: an operation in flight then is still pending in the store and runs again
/// after the restart.
struct Scheduler {
    runner: JoinHandle<()>,
    follow: JoinHandle<()>,
}

impl Scheduler {
    fn start(jobs: Jobs, shared: &Shared, upstream: &Upstream, live: &watch::Sender<Arc<Shared>>) -> Scheduler {
        let forward = Forward::new(upstream.clone(), &shared.metrics);
        let plane_of = move |shared: &Shared| Plane { apps: shared.apps.clone(), send: job_plane(shared, &forward) };
        let (planes, plane) = watch::channel(plane_of(shared));
        let mut reloads = live.subscribe();
        let follow = tokio::spawn(async move {
            while reloads.changed().await.is_ok() {
                let shared = Arc::clone(&reloads.borrow_and_update());
                planes.send_replace(plane_of(&shared));
            }
        });
        Scheduler { runner: tokio::spawn(Runner::new(jobs, plane, shared.metrics.clone()).run()), follow }
    }

    fn stop(self) {
        self.follow.abort();
        self.runner.abort();
    }
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
