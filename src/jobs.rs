//! Deletion jobs: deletions the gateway carries out itself, durably, at the pace every quota allows.
//!
//! A job is a list of operations in the six routes' own terms, each validated by the same code as a direct call
//! before anything is stored (`msgIdList`s longer than Easemob's 50 are split into batches). A direct call sent
//! with `Prefer: respond-async` becomes a job of one (`jobs/defer.rs`). Jobs (`jobs/records.rs`) are kept in a
//! queue with one interface (`jobs/queue.rs`) and two stores: an embedded one (`jobs/store.rs`, SQLite) or Redis
//! (`jobs/shared.rs`, its scripts in `jobs/shared/*.lua`). One scheduler per process (`jobs/runner.rs`) runs them
//! through the same token, quota and client layers as direct calls, one attempt at a time per operation
//! (`jobs/attempt.rs`); the jobs API (`jobs/api.rs`) reads, lists and cancels them, and parses a job request as
//! it arrives (`jobs/intake.rs`).

pub mod api;
mod attempt;
pub mod defer;
pub mod intake;
pub mod queue;
mod receipt;
pub mod records;
pub mod runner;
pub mod shared;
pub mod store;

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::{Notify, Semaphore, SemaphorePermit};
use tracing::warn;

use crate::apps::App;
use crate::config::JobsConfig;
use crate::routes::validate::{Call, MAX_MSG_IDS, ValidationError};
use crate::routes::{Endpoint, Route, resolve};

pub use self::queue::{JobStore, Store};
use self::records::{Created, JobRecord, NewJob, NewOperation, StoreError};

/// Job requests read at once: each holds up to `jobs.max_operations` operations until they are stored (about 50 MB
/// for 100,000 of the widest), so this bounds what they hold together; the next waits its turn, its body unread. A
/// slow sender holds up the next for at most `server.body_read_timeout`.
const INTAKES_AT_ONCE: usize = 1;

/// The jobs of this process: the store, and what the scheduler must hear about.
#[derive(Clone)]
pub struct Jobs(Arc<JobsInner>);

struct JobsInner {
    store: Store,
    config: JobsConfig,
    clock: Clock,
    /// This replica's name, in its attempts' notes: whose audit chain holds their events.
    replica: Arc<str>,
    /// New work or a cancellation: the scheduler looks again.
    wake: Notify,
    /// Jobs cancelled since start-up (by `seq`): what the scheduler already holds of them is dropped.
    cancelled: Mutex<HashSet<i64>>,
    /// Turns to read a job request ([`INTAKES_AT_ONCE`]).
    intakes: Semaphore,
    parser: intake::Parser,
}

/// A job being read: its operations are staged under its id as they come. Dropped before it is submitted (the
/// request refused, or its client gone), what it staged is discarded.
pub struct Staging {
    jobs: Jobs,
    /// The AppKey the job is for: a shared store keeps an app's jobs under keys of its own.
    app: String,
    id: String,
    /// The address of the client creating it, for its receipt when it names no caller.
    peer: Option<IpAddr>,
    created: bool,
}

impl Staging {
    /// Stages operations `from..` of the job.
    pub async fn stage(&self, from: usize, operations: Vec<NewOperation>) -> Result<(), StoreError> {
        self.jobs.store().stage(&self.app, &self.id, from, operations).await
    }

    /// Creates the job of what was staged (or finds the one its idempotency key made), and tells the scheduler.
    pub async fn submit(
        mut self,
        app: &App,
        caller: Option<&str>,
        idempotency_key: Option<&str>,
        request_sha256: Option<String>,
    ) -> Result<Created, StoreError> {
        let created = self.jobs.create(self.id.clone(), app, caller, self.peer, idempotency_key, request_sha256).await;
        self.created = created.is_ok();
        created
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.created {
            return;
        }
        let (store, app, id) = (self.jobs.store().clone(), std::mem::take(&mut self.app), std::mem::take(&mut self.id));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = store.discard(&app, &id).await {
                    warn!(job = %id, error = %e, "could not discard the operations of a job that was not created");
                }
            });
        }
    }
}

impl Jobs {
    pub fn new(store: Store, config: JobsConfig, clock: Clock, replica: &str) -> Jobs {
        let (wake, cancelled, intakes) = (Notify::new(), Mutex::new(HashSet::new()), Semaphore::new(INTAKES_AT_ONCE));
        let parser = intake::Parser::start();
        let replica = Arc::from(replica);
        Jobs(Arc::new(JobsInner { store, config, clock, replica, wake, cancelled, intakes, parser }))
    }

    /// Where job requests are parsed.
    pub fn parser(&self) -> &intake::Parser {
        &self.0.parser
    }

    /// A turn to read a job request and store its operations: hold it until they are stored.
    pub async fn intake_turn(&self) -> SemaphorePermit<'_> {
        self.0.intakes.acquire().await.expect("the intake semaphore is never closed")
    }

    pub fn store(&self) -> &Store {
        &self.0.store
    }

    pub fn config(&self) -> &JobsConfig {
        &self.0.config
    }

    pub fn clock(&self) -> Clock {
        self.0.clock
    }

    pub fn replica(&self) -> &Arc<str> {
        &self.0.replica
    }

    pub fn is_ready(&self) -> bool {
        self.0.store.is_healthy()
    }

    /// Creates the job `id` of the operations staged under it (or finds the one its idempotency key made), and
    /// tells the scheduler.
    async fn create(
        &self,
        id: String,
        app: &App,
        caller: Option<&str>,
        peer: Option<IpAddr>,
        idempotency_key: Option<&str>,
        request_sha256: Option<String>,
    ) -> Result<Created, StoreError> {
        let job = NewJob {
            id,
            app: app.key.as_str().to_owned(),
            caller: caller.map(str::to_owned),
            idempotency_key: idempotency_key.map(str::to_owned),
            request_sha256,
            peer: peer.map(|peer| peer.to_canonical().to_string()),
            now_ms: self.0.clock.now_ms(),
        };
        let created = self.0.store.create(job).await?;
        self.0.wake.notify_one();
        Ok(created)
    }

    /// Stores one call as a job of its own.
    pub async fn submit_one(
        &self,
        app: &App,
        caller: Option<&str>,
        peer: Option<IpAddr>,
        operation: NewOperation,
    ) -> Result<Created, StoreError> {
        let staging = self.staging(app, peer);
        staging.stage(0, vec![operation]).await?;
        staging.submit(app, caller, None, None).await
    }

    /// A new job of `app`, created from `peer`, to stage its operations under as they are read.
    pub fn staging(&self, app: &App, peer: Option<IpAddr>) -> Staging {
        let (app, id) = (app.key.as_str().to_owned(), uuid::Uuid::new_v4().simple().to_string());
        Staging { jobs: self.clone(), app, id, peer, created: false }
    }

    /// Cancels a job; `None` if `app` has no such job.
    pub async fn cancel(&self, app: &App, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let cancelled = self.0.store.cancel(app.key.as_str(), id, self.0.clock.now_ms()).await?;
        if let Some(job) = &cancelled {
            self.0.cancelled.lock().expect("cancelled lock").insert(job.seq);
            self.0.wake.notify_one();
        }
        Ok(cancelled)
    }

    /// Resolves when there is new work or a cancellation: the scheduler looks again.
    fn woken(&self) -> tokio::sync::futures::Notified<'_> {
        self.0.wake.notified()
    }

    fn is_cancelled(&self, job: i64) -> bool {
        self.0.cancelled.lock().expect("cancelled lock").contains(&job)
    }

    /// How long the job's pending operations need on their own, counted on the lanes and per-user windows the
    /// scheduler takes their slots from, as they stand now.
    pub async fn estimate(&self, app: &App, job: &JobRecord) -> Result<Duration, StoreError> {
        if job.counts.pending == 0 {
            return Ok(Duration::ZERO);
        }
        let remaining = self.0.store.remaining(job).await?;
        let calls = |n: &i64| u32::try_from(*n).unwrap_or(u32::MAX);
        let routes: Vec<(Route, u32)> =
            remaining.by_route.iter().filter_map(|(route, n)| Some((Route::named(route)?, calls(n)))).collect();
        // The store keys a user by app (`user_key`); the app's windows by the user alone.
        let users: Vec<(&str, u32)> =
            remaining.by_user.iter().filter_map(|(key, n)| Some((user_in_app(app, key)?, calls(n)))).collect();
        Ok(app.quota.jobs_time(app.index, &routes, &users).await)
    }
}

impl Jobs {
    /// What the API says of a job: its record, where to read it, and the estimated time to finish.
    pub async fn describe(&self, app: &App, job: &JobRecord) -> Result<serde_json::Value, StoreError> {
        let left = self.estimate(app, job).await?;
        let mut view = view(app, job);
        let fields = view.as_object_mut().expect("a job view is an object");
        if job.counts.pending > 0 {
            fields.insert("estimated_seconds".to_owned(), (left.as_secs_f64().ceil() as u64).into());
            let done_ms = self.0.clock.now_ms() + left.as_millis() as i64;
            fields.insert("estimated_completion_ms".to_owned(), done_ms.into());
        }
        Ok(view)
    }
}

/// A job's record and where to read it.
pub fn view(app: &App, job: &JobRecord) -> serde_json::Value {
    let mut view = serde_json::to_value(job).expect("a job record serializes");
    view["location"] = location(app, &job.id).into();
    view
}

/// Where `app`'s jobs are: under the app's own base path, where Easemob has no route (`_` never starts one).
pub fn collection(app: &App) -> String {
    format!("/{}/{}/_gateway/jobs", app.org, app.app)
}

/// Where a job of `app` is read.
pub fn location(app: &App, id: &str) -> String {
    format!("{}/{id}", collection(app))
}

/// Wall-clock milliseconds (for what is stored) that follow tokio's time (so paused tests control them too).
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    wall_ms: i64,
    at: tokio::time::Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock { wall_ms: crate::error::unix_millis() as i64, at: tokio::time::Instant::now() }
    }

    pub fn now_ms(&self) -> i64 {
        self.wall_ms + self.at.elapsed().as_millis() as i64
    }

    /// How long ago a wall-clock time was (zero for one still ahead).
    pub fn since(&self, ms: i64) -> Duration {
        Duration::from_millis((self.now_ms() - ms).max(0) as u64)
    }

    /// The tokio instant of a wall-clock time.
    pub fn instant(&self, ms: i64) -> tokio::time::Instant {
        self.at + Duration::from_millis((ms - self.wall_ms).max(0) as u64)
    }
}

impl Default for Clock {
    fn default() -> Clock {
        Clock::new()
    }
}

/// One operation of a job, as the caller would have sent it directly.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperationRequest {
    pub method: String,
    /// The path and query, with or without the `/{org_name}/{app_name}` prefix.
    pub path: String,
    /// The JSON body (`delete_conversation` only), as it was written: validated by the same code as a direct
    /// call's body, without a JSON tree in between.
    #[serde(default)]
    pub body: Option<Box<serde_json::value::RawValue>>,
}

/// Validates one requested operation for `app` as a direct call would be, splitting a long `msgIdList` into
/// batches; the error says what is wrong, as a direct call's would.
pub fn operations(app: &App, op: &OperationRequest, now_ms: i64) -> Result<Vec<NewOperation>, ValidationError> {
    let (path, query) = match op.path.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (op.path.as_str(), None),
    };
    let bad = |description: String| ValidationError { error: "illegal_argument", description };
    let resolved = resolve(path)
        .filter(|resolved| !matches!(resolved.endpoint, Endpoint::Jobs(_)))
        .ok_or_else(|| bad(format!("{path:?} is not one of the six deletion routes")))?;
    if let Some((org, name)) = resolved.app
        && !(org.eq_ignore_ascii_case(&app.org) && name.eq_ignore_ascii_case(&app.app))
    {
        return Err(bad(format!("the path names {org}#{name}; this job is for {}", app.key)));
    }
    let Endpoint::Operation { route, owner } = resolved.endpoint else {
        return Err(bad("the token endpoint is not a deletion".to_owned()));
    };
    if !op.method.eq_ignore_ascii_case(route.method().as_str()) {
        return Err(bad(format!("{} takes {}, not {:?}", route.name(), route.method(), op.method)));
    }
    let body = match (&op.body, route) {
        (Some(body), Route::DeleteConversation) => body.get().as_bytes(),
        (None, Route::DeleteConversation) => &[],
        (Some(_), _) => return Err(bad(format!("{} takes no body", route.name()))),
        (None, _) => &[],
    };
    batches(route, query)
        .iter()
        .map(|query| Ok(operation(app, &Call::parse(route, owner, query.as_deref(), body, now_ms)?)))
        .collect()
}

/// The query as it is, or one query per batch of [`MAX_MSG_IDS`] message IDs (Easemob's cap on one call) when its
/// `msgIdList` is longer.
fn batches(route: Route, query: Option<&str>) -> Vec<Option<String>> {
    let whole = vec![query.map(str::to_owned)];
    if !matches!(route, Route::DeleteChatMessages | Route::DeleteGroupMessages) {
        return whole;
    }
    let Some(query) = query else { return whole };
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    let ids: Vec<&str> = match pairs.iter().find(|(k, _)| k == "msgIdList") {
        Some((_, list)) => list.split(',').collect(),
        None => return whole,
    };
    if ids.len() <= MAX_MSG_IDS {
        return whole;
    }
    ids.chunks(MAX_MSG_IDS)
        .map(|chunk| {
            let mut batch = form_urlencoded::Serializer::new(String::new());
            for (key, value) in &pairs {
                match key.as_str() {
                    "msgIdList" => batch.append_pair(key, &chunk.join(",")),
                    _ => batch.append_pair(key, value),
                };
            }
            Some(batch.finish())
        })
        .collect()
}

/// A validated call as the store keeps it: what Easemob will receive.
pub fn operation(app: &App, call: &Call) -> NewOperation {
    NewOperation {
        route: call.route().name(),
        path: call.upstream_path_and_query(),
        body: call.upstream_body().map(|b| b.to_vec()),
        user: match call {
            Call::DeleteConversation { owner, .. } => Some(user_key(app, owner.as_str())),
            _ => None,
        },
    }
}

/// A user's key across apps: their per-user limit is the app's.
fn user_key(app: &App, user: &str) -> String {
    format!("{}/{}", app.key, user.to_ascii_lowercase())
}

/// The user a stored key (`user_key`) names, if it is one of `app`'s: the key of the app's own windows.
pub fn user_in_app<'a>(app: &App, key: &'a str) -> Option<&'a str> {
    key.strip_prefix(app.key.as_str())?.strip_prefix('/')
}

/// The stored operation as a call again (it was validated when accepted, so this only fails if the rules changed).
pub fn call_of(path: &str, body: Option<&[u8]>, now_ms: i64) -> Result<Call, ValidationError> {
    let (path, query) = path.split_once('?').map_or((path, None), |(p, q)| (p, Some(q)));
    let Some(Endpoint::Operation { route, owner }) = resolve(path).map(|r| r.endpoint) else {
        return Err(ValidationError { error: "illegal_argument", description: format!("{path:?} is no route") });
    };
    Call::parse(route, owner, query, body.unwrap_or_default(), now_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{self, ScriptedFetch};

    fn op(method: &str, path: &str) -> OperationRequest {
        OperationRequest { method: method.to_owned(), path: path.to_owned(), body: None }
    }

    #[tokio::test]
    async fn operations_are_validated_as_direct_calls_and_long_id_lists_are_split() {
        let app = testing::app(&ScriptedFetch::granting(3600), &testing::quota(Default::default()));
        let ids: Vec<String> = (0..120).map(|i| format!("{}", 1_100_000_000_000_000_000u64 + i)).collect();
        let path =
            format!("/o/a/rest/message/roaming/chat/user/Ann?userId=bob&msgIdList={}&isNotify=false", ids.join(","));
        let split = operations(&app, &op("DELETE", &path), 0).unwrap();
        assert_eq!(split.len(), 3, "50 + 50 + 20");
        assert!(split[2].path.ends_with("&isNotify=false"), "{}", split[2].path);
        assert!(split[2].path.contains(&ids[100..].join("%2C")) || split[2].path.contains(&ids[100..].join(",")));

        let clear = operations(&app, &op("post", "/rest/message/roaming/user/ann/delete/all"), 0).unwrap();
        assert_eq!(clear[0].path, "/rest/message/roaming/user/ann/delete/all");

        for (method, path, says) in [
            ("DELETE", "/rest/message/roaming/user/ann/delete/all", "takes POST"),
            ("POST", "/x/y/rest/message/roaming/user/ann/delete/all", "this job is for o#a"),
            ("POST", "/rest/message/roaming/user/a b/delete/all", "not allowed"),
            ("DELETE", "/rest/message/roaming/chat/user/ann?msgIdList=1", "userId is missing"),
            ("GET", "/users/ann", "not one of the six"),
        ] {
            let e = operations(&app, &op(method, path), 0).unwrap_err();
            assert!(e.description.contains(says), "{path}: {e}");
        }
    }

    #[tokio::test]
    async fn a_conversation_counts_against_its_owner_and_round_trips() {
        let app = testing::app(&ScriptedFetch::granting(3600), &testing::quota(Default::default()));
        let request = OperationRequest {
            method: "DELETE".to_owned(),
            path: "/users/Ann/user_channel".to_owned(),
            body: Some(testing::raw(serde_json::json!({"channel": "bob", "type": "chat", "delete_roam": true}))),
        };
        let [stored] = <[NewOperation; 1]>::try_from(operations(&app, &request, 0).unwrap()).unwrap();
        assert_eq!(stored.user.as_deref(), Some("o#a/ann"));
        let call = call_of(&stored.path, stored.body.as_deref(), 0).unwrap();
        assert_eq!(call.route(), Route::DeleteConversation);
        assert_eq!(operation(&app, &call).body, stored.body);
    }
}
