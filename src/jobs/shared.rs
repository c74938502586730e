//! The jobs' shared store, in Redis (one server or a cluster): with `rate_limit.backend = "redis"` every replica
//! works one queue.
//!
//! Each app keeps its jobs under its own keys, `<key_prefix>:{<app>}:jobs:…`: the hash tag of its quota, so that
//! one app's keys share a Redis Cluster slot (every change of state is one Lua script, which a cluster runs only
//! on keys of one slot) and apps spread over the shards. An operation due to run sits in its app's sorted set of
//! its route (`due:<route>`, by when it is due). A replica *claims* it atomically, moving it to the app's `leases`
//! with a deadline (`jobs.lease`), so no two replicas hold it at once; its outcome removes the lease. A replica
//! that dies holding operations loses them to any other once their leases expire (every replica sweeps expired
//! leases back to `due`); the scheduler gives back what it could not send well before its lease ends, so an
//! operation is never sent by two replicas at once. Jobs and operations are hashes (one JSON document per
//! operation). Two keys are not an app's: the set of apps that have jobs (`<key_prefix>:jobs:apps`, which the
//! claims go through) and the counter that numbers jobs (`<key_prefix>:jobs:seq`). Durability is Redis's: run it
//! with AOF (`appendonly yes`; `appendfsync always` for no loss at all if Redis itself dies).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use super::records::{
    AttemptNote, Counts, Created, JobRecord, JobState, NewJob, NewOperation, OpRecord, OpState, Remaining, StoreError,
    UserUse, method_of,
};
use crate::config::RedisConfig;
use crate::redis_conn::{Connection, Patience};

mod work;

/// Redis calls of the jobs store may carry a whole job (100,000 operations): a generous timeout of their own.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Operations written per command when a job is created.
const CHUNK: usize = 1000;
/// How long an Idempotency-Key is reserved before its job is written (if the process dies in between, it frees).
const IDEMPOTENCY_RESERVATION: Duration = Duration::from_secs(60);
/// A create retried while the first is being stored looks for its job this many times, 100 ms apart.
const IDEMPOTENCY_POLLS: usize = 30;
/// Operations one cancel script goes through, so that no single call holds Redis (which the quota shares) long.
const CANCEL_CHUNK: usize = 5000;
/// How long the operations of a job still being read are kept if it is never created: far longer than reading one
/// takes (`server.body_read_timeout` bounds each read).
const STAGED_FOR_MS: i64 = 60 * 60 * 1000;

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> StoreError {
        StoreError::new(format!("redis: {e}"))
    }
}

/// Whether a call reads or writes, for the store's health.
#[derive(Clone, Copy)]
pub(super) enum Access {
    Read,
    Write,
}

/// What a claimed operation needs of its job: its `seq`, app and caller.
type JobFields = (Option<i64>, Option<String>, Option<String>);

/// One operation as it is kept in Redis.
#[derive(Serialize, Deserialize)]
struct Op {
    route: String,
    path: String,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    user: Option<String>,
    state: String,
    attempts: u32,
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
    #[serde(default)]
    finished_ms: Option<i64>,
    /// Absent until the first attempt is recorded: cjson would write an empty one as `{}`, which is no array.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    history: Vec<AttemptNote>,
}

impl Op {
    /// An operation as it is first stored: pending, never tried.
    fn pending(op: &NewOperation) -> Op {
        Op {
            route: op.route.to_owned(),
            path: op.path.clone(),
            body: op.body.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()),
            user: op.user.clone(),
            state: "pending".to_owned(),
            attempts: 0,
            status: None,
            error: None,
            error_description: None,
            finished_ms: None,
            history: Vec::new(),
        }
    }
}

/// The jobs store shared by every replica, in Redis.
#[derive(Clone)]
pub struct SharedStore {
    connection: Connection,
    /// `rate_limit.redis.key_prefix`: every key starts with it.
    prefix: String,
    lease: Duration,
    /// Which app the next claim starts with: they take turns.
    turn: Arc<AtomicUsize>,
    /// The last call failed, or no write has succeeded since: what readiness reports.
    healthy: Arc<AtomicBool>,
    scripts: Arc<Scripts>,
}

/// The Lua scripts, each in `shared/` with what it takes and returns, after the helpers of `shared/settle.lua`.
struct Scripts {
    claim: redis::Script,
    release: redis::Script,
    reap: redis::Script,
    record: redis::Script,
    cancel: redis::Script,
    /// Settles a job after a cancel.
    settle: redis::Script,
}

impl SharedStore {
    pub fn new(config: &RedisConfig, lease: Duration) -> Result<SharedStore, StoreError> {
        let connect = config.timeout.max(Duration::from_secs(1));
        let patience = Patience { connect, response: TIMEOUT, retries: 1, max_delay: connect };
        let connection = crate::redis_conn::connect(config, patience)?;
        let script = |lua: &str| redis::Script::new(&format!("{}\n{lua}", include_str!("shared/settle.lua")));
        let scripts = Scripts {
            claim: script(include_str!("shared/claim.lua")),
            release: script(include_str!("shared/release.lua")),
            reap: script(include_str!("shared/reap.lua")),
            record: script(include_str!("shared/record.lua")),
            cancel: script(include_str!("shared/cancel.lua")),
            settle: script(include_str!("shared/settle_job.lua")),
        };
        Ok(SharedStore {
            connection,
            prefix: config.key_prefix.clone(),
            lease,
            turn: Arc::new(AtomicUsize::new(0)),
            healthy: Arc::new(AtomicBool::new(true)),
            scripts: Arc::new(scripts),
        })
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// `call`, marking the store's health by its result: any failure marks it unhealthy; only a write that
    /// succeeds marks it healthy again.
    pub(super) async fn marked<T>(
        &self,
        access: Access,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let result = call.await;
        match (&result, access) {
            (Err(_), _) => self.healthy.store(false, Ordering::Relaxed),
            (Ok(_), Access::Write) => self.healthy.store(true, Ordering::Relaxed),
            (Ok(_), Access::Read) => {}
        }
        result
    }

    /// What every key of `app`'s jobs starts with, in the slot of its quota: the scripts build keys on it.
    fn app_prefix(&self, app: &str) -> String {
        format!("{}:jobs", crate::redis_conn::app_keys(&self.prefix, app))
    }

    fn key(&self, app: &str, name: &str) -> String {
        format!("{}:{name}", self.app_prefix(app))
    }

    /// A key of no app: `apps` or `seq`.
    fn global(&self, name: &str) -> String {
        format!("{}:jobs:{name}", self.prefix)
    }

    /// The apps that have had jobs, whose queues the claims go through.
    async fn apps(&self) -> Result<Vec<String>, StoreError> {
        let mut apps: Vec<String> = self.conn().smembers(self.global("apps")).await?;
        apps.sort();
        Ok(apps)
    }

    /// Adds `app` to the apps that have jobs, before anything of it is written: from then on the claims, sweeps
    /// and counts go through its keys.
    async fn register(&self, app: &str) -> Result<(), StoreError> {
        Ok(self.conn().sadd(self.global("apps"), app).await?)
    }

    fn conn(&self) -> Connection {
        self.connection.clone()
    }

    async fn script<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        keys: &[String],
        args: &[String],
    ) -> Result<T, StoreError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        Ok(invocation.invoke_async(&mut self.conn()).await?)
    }

    /// Reserves the job's Idempotency-Key, if it has one, for a while first (it expires if this process dies
    /// before the job is written, and is kept for good with the job); a create retried meanwhile waits for the
    /// first job to appear, and finds it.
    async fn reserve_idempotency_key(&self, job: &NewJob) -> Result<Option<Created>, StoreError> {
        let Some(key) = &job.idempotency_key else { return Ok(None) };
        let mut conn = self.conn();
        let idem = self.idempotency_key(&job.app, key);
        let reserved: Option<String> = redis::cmd("SET")
            .arg(&idem)
            .arg(&job.id)
            .arg("NX")
            .arg("PX")
            .arg(IDEMPOTENCY_RESERVATION.as_millis() as u64)
            .query_async(&mut conn)
            .await?;
        if reserved.is_some() {
            return Ok(None);
        }
        let first: String = conn.get(&idem).await?;
        for _ in 0..IDEMPOTENCY_POLLS {
            if let Some(record) = self.job(&job.app, &first).await? {
                let sha: Option<String> =
                    conn.hget(self.key(&job.app, &format!("job:{first}")), "request_sha256").await?;
                return Ok(Some(Created::Existing { job: record, same_request: sha == job.request_sha256 }));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(StoreError::new("a create with this Idempotency-Key is still being stored".into()))
    }

    /// Adds operations `from..` to job `job_id`, which no one sees until `create` makes it: they go under keys of
    /// the job's own, which expire unless `create` keeps them (a process that dies while reading a job leaves
    /// nothing for good).
    pub async fn stage(
        &self,
        app: &str,
        job_id: &str,
        from: usize,
        operations: Vec<NewOperation>,
    ) -> Result<(), StoreError> {
        if operations.is_empty() {
            return Ok(());
        }
        let (opsk, leftk, routesk) =
            (self.key(app, &format!("ops:{job_id}")), self.left_key(app, job_id), self.staged_routes(app, job_id));
        let mut fields = Vec::with_capacity(operations.len());
        let mut left: HashMap<String, i64> = HashMap::new();
        let mut due: HashMap<&str, Vec<(i64, String)>> = HashMap::new();
        for (n, op) in (from..).zip(&operations) {
            *left.entry(format!("route:{}", op.route)).or_default() += 1;
            if let Some(user) = &op.user {
                *left.entry(format!("user:{user}")).or_default() += 1;
            }
            fields.push((n.to_string(), serde_json::to_string(&Op::pending(op)).expect("an operation serializes")));
            due.entry(op.route).or_default().push((0, format!("{job_id}:{n}")));
        }
        let mut pipe = redis::pipe();
        pipe.atomic().hset_multiple(&opsk, &fields).ignore();
        for (field, count) in left {
            pipe.hincr(&leftk, field, count).ignore();
        }
        for (route, members) in due {
            let staged = self.staged_due(app, job_id, route);
            pipe.zadd_multiple(&staged, &members).ignore().pexpire(&staged, STAGED_FOR_MS).ignore();
            pipe.sadd(&routesk, route).ignore();
        }
        for key in [&opsk, &leftk, &routesk] {
            pipe.pexpire(key, STAGED_FOR_MS).ignore();
        }
        Ok(pipe.query_async(&mut self.conn()).await?)
    }

    /// Drops what was staged for a job that will not be created.
    pub async fn discard(&self, app: &str, job_id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let routes: Vec<String> = conn.smembers(self.staged_routes(app, job_id)).await?;
        let mut keys =
            vec![self.key(app, &format!("ops:{job_id}")), self.left_key(app, job_id), self.staged_routes(app, job_id)];
        keys.extend(routes.iter().map(|route| self.staged_due(app, job_id, route)));
        Ok(conn.del(keys).await?)
    }

    /// Makes a job of the operations staged under its id, at once (one MULTI), or finds the job its idempotency
    /// key already made (and drops what was staged).
    pub async fn create(&self, job: NewJob) -> Result<Created, StoreError> {
        if let Some(existing) = self.reserve_idempotency_key(&job).await? {
            self.discard(&job.app, &job.id).await?;
            return Ok(existing);
        }
        let (app, mut conn) = (job.app.as_str(), self.conn());
        self.register(app).await?;
        let seq: i64 = conn.incr(self.global("seq"), 1).await?;
        let opsk = self.key(app, &format!("ops:{}", job.id));
        let total: i64 = conn.hlen(&opsk).await?;
        let routes: Vec<String> = conn.smembers(self.staged_routes(app, &job.id)).await?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.hset_multiple(
            self.key(app, &format!("job:{}", job.id)),
            &[
                ("seq", seq.to_string()),
                ("id", job.id.clone()),
                ("app", job.app.clone()),
                ("state", "queued".to_owned()),
                ("created_ms", job.now_ms.to_string()),
                ("finished_ms", String::new()),
                ("caller", job.caller.clone().unwrap_or_default()),
                ("idempotency_key", job.idempotency_key.clone().unwrap_or_default()),
                ("request_sha256", job.request_sha256.clone().unwrap_or_default()),
                ("peer", job.peer.clone().unwrap_or_default()),
                ("total", total.to_string()),
                ("pending", total.to_string()),
                ("succeeded", "0".to_owned()),
                ("failed", "0".to_owned()),
                ("cancelled", "0".to_owned()),
                ("cancel_requested", "0".to_owned()),
            ],
        )
        .ignore();
        // The staged operations join their routes' queues, due at once, and their keys are kept.
        for route in &routes {
            let (due, staged) = (self.key(app, &format!("due:{route}")), self.staged_due(app, &job.id, route));
            pipe.zunionstore(&due, &[&due, &staged]).ignore().del(&staged).ignore();
        }
        let (leftk, routesk) = (self.left_key(app, &job.id), self.staged_routes(app, &job.id));
        pipe.persist(&opsk).ignore().persist(leftk).ignore().del(routesk).ignore();
        pipe.zadd(self.key(app, "all"), &job.id, seq).ignore();
        pipe.zadd(self.key(app, "open"), &job.id, job.now_ms).ignore();
        pipe.hincr(self.key(app, "states"), "queued", 1).ignore();
        if let Some(key) = &job.idempotency_key {
            pipe.persist(self.idempotency_key(app, key)).ignore();
        }
        let stored: Result<(), _> = pipe.query_async(&mut conn).await;
        if let Err(e) = stored {
            if let Some(key) = &job.idempotency_key {
                let _: Result<(), _> = conn.del(self.idempotency_key(app, key)).await;
            }
            return Err(e.into());
        }
        let record = self.job(app, &job.id).await?.ok_or_else(|| StoreError::new("a job just stored".into()))?;
        Ok(Created::New(record))
    }

    fn left_key(&self, app: &str, job_id: &str) -> String {
        self.key(app, &format!("left:{job_id}"))
    }

    fn idempotency_key(&self, app: &str, key: &str) -> String {
        self.key(app, &format!("idem:{key}"))
    }

    /// The routes a job being read has operations on.
    fn staged_routes(&self, app: &str, job_id: &str) -> String {
        self.key(app, &format!("staged:{job_id}"))
    }

    /// A job's operations on `route` while it is read: its own queue, merged into the route's at `create`.
    fn staged_due(&self, app: &str, job_id: &str, route: &str) -> String {
        self.key(app, &format!("staged:{job_id}:{route}"))
    }

    pub async fn job(&self, app: &str, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let fields: HashMap<String, String> = self.conn().hgetall(self.key(app, &format!("job:{id}"))).await?;
        Ok(record(&fields).filter(|job| job.app == app))
    }

    pub async fn operations(
        &self,
        job: &JobRecord,
        from: i64,
        limit: u32,
        state: Option<OpState>,
    ) -> Result<Vec<OpRecord>, StoreError> {
        let opsk = self.key(&job.app, &format!("ops:{}", job.id));
        let mut out = Vec::new();
        let mut n = from;
        while out.len() < limit as usize && n < job.counts.total {
            let upto = (n + CHUNK as i64).min(job.counts.total);
            let fields: Vec<String> = (n..upto).map(|i| i.to_string()).collect();
            let raw: Vec<Option<String>> =
                redis::cmd("HMGET").arg(&opsk).arg(&fields).query_async(&mut self.conn()).await?;
            for (i, raw) in (n..upto).zip(raw) {
                let Some(op) = raw.and_then(|raw| serde_json::from_str::<Op>(&raw).ok()) else { continue };
                let op_state = OpState::parse(&op.state).unwrap_or(OpState::Pending);
                if state.is_some_and(|s| s != op_state) || out.len() >= limit as usize {
                    continue;
                }
                out.push(OpRecord {
                    index: i,
                    method: method_of(&op.route),
                    route: op.route,
                    path: op.path,
                    body: op.body.and_then(|b| serde_json::from_str(&b).ok()),
                    state: op_state,
                    attempts: op.attempts,
                    status: op.status,
                    error: op.error,
                    error_description: op.error_description,
                    finished_ms: op.finished_ms,
                    history: op.history,
                });
            }
            n = upto;
        }
        Ok(out)
    }

    pub async fn list(
        &self,
        app: &str,
        state: Option<JobState>,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let index = self.key(app, "all");
        let mut out = Vec::new();
        let mut max = before.map_or("+inf".to_owned(), |b| format!("({b}"));
        loop {
            let ids: Vec<(String, i64)> = redis::cmd("ZREVRANGEBYSCORE")
                .arg(&index)
                .arg(&max)
                .arg("-inf")
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .query_async(&mut self.conn())
                .await?;
            let Some((_, last)) = ids.last() else { return Ok(out) };
            max = format!("({last}");
            for (id, _) in &ids {
                if let Some(job) = self.job(app, id).await?
                    && state.is_none_or(|s| s == job.state)
                {
                    out.push(job);
                    if out.len() == limit as usize {
                        return Ok(out);
                    }
                }
            }
        }
    }

    pub async fn cancel(&self, app: &str, id: &str, now_ms: i64) -> Result<Option<JobRecord>, StoreError> {
        let Some(job) = self.job(app, id).await? else { return Ok(None) };
        if job.finished_ms.is_some() {
            return Ok(Some(job)); // nothing left to drop; a finished job keeps its state
        }
        let p = self.app_prefix(app);
        let args =
            |from: i64, to: i64| [p.clone(), id.to_owned(), now_ms.to_string(), from.to_string(), to.to_string()];
        for from in (0..job.counts.total).step_by(CANCEL_CHUNK) {
            let to = (from + CANCEL_CHUNK as i64).min(job.counts.total) - 1;
            let _: i64 = self.script(&self.scripts.cancel, &self.routing(app), &args(from, to)).await?;
        }
        let settle = [p.clone(), id.to_owned(), now_ms.to_string()];
        let _: i64 = self.script(&self.scripts.settle, &self.routing(app), &settle).await?;
        self.job(app, id).await
    }

    /// The key a script on `app`'s jobs names for Redis Cluster's routing: all of them share its hash tag.
    fn routing(&self, app: &str) -> [String; 1] {
        [self.key(app, "states")]
    }

    /// Users' windows live in Redis with this store (it comes with the shared quota): they survive a restart there,
    /// so nothing needs resuming from the jobs.
    pub async fn users_sent(&self, _since_ms: i64) -> Result<Vec<UserUse>, StoreError> {
        Ok(Vec::new())
    }

    pub async fn is_cancelled(&self, app: &str, job_id: &str) -> Result<bool, StoreError> {
        let flag: Option<String> =
            self.conn().hget(self.key(app, &format!("job:{job_id}")), "cancel_requested").await?;
        Ok(flag.as_deref() == Some("1"))
    }

    pub async fn remaining(&self, job: &JobRecord) -> Result<Remaining, StoreError> {
        let left: HashMap<String, i64> = self.conn().hgetall(self.left_key(&job.app, &job.id)).await?;
        let by_route = left
            .iter()
            .filter_map(|(k, n)| Some((k.strip_prefix("route:")?.to_owned(), *n)))
            .filter(|(_, n)| *n > 0)
            .collect();
        let by_user = left
            .iter()
            .filter_map(|(k, n)| Some((k.strip_prefix("user:")?.to_owned(), *n)))
            .filter(|(_, n)| *n > 0)
            .collect();
        Ok(Remaining { by_route, by_user })
    }
}

fn record(fields: &HashMap<String, String>) -> Option<JobRecord> {
    let number = |key: &str| fields.get(key).and_then(|v| v.parse::<i64>().ok());
    let text = |key: &str| fields.get(key).filter(|v| !v.is_empty()).cloned();
    Some(JobRecord {
        seq: number("seq")?,
        id: text("id")?,
        app: text("app")?,
        state: JobState::parse(fields.get("state")?)?,
        created_ms: number("created_ms")?,
        finished_ms: number("finished_ms"),
        caller: text("caller"),
        idempotency_key: text("idempotency_key"),
        peer: text("peer"),
        counts: Counts {
            total: number("total")?,
            pending: number("pending")?,
            succeeded: number("succeeded")?,
            failed: number("failed")?,
            cancelled: number("cancelled")?,
        },
    })
}
