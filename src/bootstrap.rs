//! From a checked config to what every connection's stack shares (`Shared`), built in one place for start-up and
//! for each reload. Start-up also makes the parts that last the process's life (the metrics, the upstream client,
//! the in-flight limit, the retry budget, the audit trail, the jobs' store, span export), which every reload keeps;
//! the parts a config remakes (the apps and their tokens, the access rules, the quota) are made the same way both
//! times.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tracing::warn;

use crate::access::Access;
use crate::apps::Apps;
use crate::audit::{Audit, AuditOpenError};
use crate::config::{AppKey, Config};
use crate::jobs::records::StoreError;
use crate::jobs::shared::SharedStore;
use crate::jobs::store::LocalStore;
use crate::jobs::{Clock, Jobs, Store};
use crate::metrics::Metrics;
use crate::ratelimit::{QuotaSet, RedisError};
use crate::retry::SafeRetry;
use crate::stack::Shared;
use crate::trace::export::{Export, ExportSetupError};
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

/// The parts of `Shared` made once at start-up and kept by every reload.
struct Lasting {
    metrics: Metrics,
    in_flight: Arc<Semaphore>,
    retry: SafeRetry,
    audit: Option<Arc<Audit>>,
    jobs: Option<Jobs>,
    export: Option<Export>,
}

impl Lasting {
    /// Opens what the process keeps whatever the config becomes.
    fn open(config: &Config, metrics: Metrics) -> Result<Lasting, StartError> {
        let audit = Audit::open(&config.audit, metrics.clone())?;
        match &audit {
            Some(audit) => audit.spawn_anchors(config.audit.anchor_interval),
            None => warn!("audit.file is not set: deletions are not recorded in an audit trail"),
        }
        let jobs = open_jobs_store(config)?
            .map(|store| Jobs::new(store, config.jobs.clone(), Clock::new(), &config.audit.replica()));
        Ok(Lasting {
            in_flight: Arc::new(Semaphore::new(config.server.max_in_flight)),
            retry: SafeRetry::new(&metrics),
            audit,
            jobs,
            export: Export::start(&config.trace, &metrics)?,
            metrics,
        })
    }

    /// What the config in force holds of them, for a reload to keep.
    fn kept_from(shared: &Shared) -> Lasting {
        Lasting {
            metrics: shared.metrics.clone(),
            in_flight: Arc::clone(&shared.in_flight),
            retry: shared.retry.clone(),
            audit: shared.audit.clone(),
            jobs: shared.jobs.clone(),
            export: shared.export.clone(),
        }
    }
}

/// Start-up: the process's lasting parts, then the config's own. Every app's first token is being fetched when
/// this returns; readiness waits for it, start-up does not.
pub async fn start(config: &Config) -> Result<(Shared, Upstream), StartError> {
    let metrics = Metrics::new();
    let upstream = Upstream::new(&config.upstream)?;
    let quota = QuotaSet::new(&config.rate_limit, &app_keys(config), metrics.clone()).map_err(StartError::Redis)?;
    let lasting = Lasting::open(config, metrics)?;
    let shared = configure(config, lasting, quota, &upstream, None).await.map_err(StartError::Config)?;
    Ok((shared, upstream))
}

/// A reload: the config's own parts made anew from `config`, the lasting ones kept from `previous`. The quota
/// keeps what it has counted, and an app whose credentials are unchanged keeps its token; a new token source's
/// first fetch must succeed, or the reload changes nothing.
pub async fn reconfigure(config: &Config, previous: &Shared, upstream: &Upstream) -> Result<Shared, Vec<String>> {
    let quota = previous.quota.reloaded(&config.rate_limit, &app_keys(config));
    configure(config, Lasting::kept_from(previous), quota, upstream, Some(previous)).await
}

/// The one place `Shared` is put together.
async fn configure(
    config: &Config,
    lasting: Lasting,
    quota: Arc<QuotaSet>,
    upstream: &Upstream,
    previous: Option<&Shared>,
) -> Result<Shared, Vec<String>> {
    // A new token source's first fetch answers within the upstream timeout; a moment more for its task to run.
    let verify_within = previous.map(|_| config.upstream.timeout + Duration::from_secs(1));
    let previous_apps = previous.map(|previous| &previous.apps);
    let apps = Apps::assemble(config, &quota, upstream, &lasting.metrics, previous_apps, verify_within).await?;
    let Lasting { metrics, in_flight, retry, audit, jobs, export } = lasting;
    Ok(Shared {
        apps,
        access: Arc::new(Access::new(config)),
        in_flight,
        quota,
        audit,
        retry,
        metrics,
        body_read_timeout: config.server.body_read_timeout,
        jobs,
        export,
    })
}

fn app_keys(config: &Config) -> Vec<AppKey> {
    config.apps.iter().map(|app| app.app_key()).collect()
}

/// The deletion jobs' store, when jobs are enabled: the SQLite file `jobs.store` names, or else Redis.
fn open_jobs_store(config: &Config) -> Result<Option<Store>, StartError> {
    let store: Store = match (config.jobs.enabled, &config.jobs.store) {
        (false, _) => return Ok(None),
        (true, Some(path)) => Arc::new(
            LocalStore::open(path).map_err(|source| StartError::Jobs { store: path.display().to_string(), source })?,
        ),
        (true, None) => Arc::new(
            SharedStore::new(&config.rate_limit.redis, config.jobs.lease)
                .map_err(|source| StartError::Jobs { store: "redis".to_owned(), source })?,
        ),
    };
    Ok(Some(store))
}
