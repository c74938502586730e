//! The scheduler: runs every job's operations at the highest rate the quotas allow, through the same audit,
//! token, quota and client layers as a direct call.
//!
//! - A job operation takes a quota slot only when it costs direct calls nothing (`QuotaSet::background`): never
//!   while a direct call waits in its lane, and within `rate_limit.jobs_share`.
//! - A route lane that is full holds back that lane only; a user whose per-user window is full has each of their
//!   operations given back to the store until it frees, so other users go on.
//! - Easemob's 429 (honouring `Retry-After`), its 5xx, timeouts and connection errors are retried with exponential
//!   backoff and jitter; an answer that was lost is retried too (the deletions are idempotent upstream); any other
//!   4xx is final.
//! - Outcomes are recorded in batches; an operation is held from the moment it is claimed until its outcome is
//!   committed, so it is never sent twice at once. One that cannot be sent soon (a full lane, a full user window,
//!   a cancelled job) is given back well before a shared store's lease ends, so no other replica ever sends it at
//!   the same time.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::Service;
use tracing::{info, warn};

use super::attempt::{self, Held, attempt, backoff};
use super::records::{AttemptNote, Due, JobState, LaneUse, Next, OpState, Outcome};
use super::{Clock, Jobs, call_of};
use crate::apps::Apps;
use crate::config::JobsConfig;
use crate::error::GatewayError;
use crate::exchange::{Answer, Exchange};
use crate::metrics::Metrics;
use crate::ratelimit::{MINUTE, RateLimitHeaders, Scope};
use crate::routes::Route;

/// Operations fetched ahead of dispatch, at most.
const BATCH: usize = 256;
/// Even with nothing to wake it, the scheduler looks at the store this often (another process may have added work).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Finished jobs past their retention are deleted this often.
const EXPIRY_EVERY: Duration = Duration::from_secs(60);
/// Even with a full queue, the store is looked at this often for other routes' operations that fell due.
const REFETCH_EVERY: Duration = Duration::from_secs(1);
/// The jobs gauges are refreshed this often.
const REPORT_EVERY: Duration = Duration::from_secs(5);
/// With a shared store, whether another replica cancelled a job is looked up at most this often.
const CANCEL_CHECK: Duration = Duration::from_secs(1);
/// After a store failure, the scheduler tries again this much later.
const STORE_RETRY: Duration = Duration::from_secs(1);
/// How far ahead the store records that jobs may send on a lane, renewed when half is left: one write per busy
/// lane every half second, and after a restart a lane resumes at worst one call's interval later than it had to.
const LANE_AHEAD: Duration = Duration::from_secs(1);

pub struct Runner<S> {
    jobs: Jobs,
    config: JobsConfig,
    clock: Clock,
    /// The config in force, replaced by a reload.
    plane: watch::Receiver<Plane<S>>,
    current: Plane<S>,
    metrics: Metrics,
    /// Claimed and waiting to be sent, in order.
    queue: VecDeque<Held>,
    /// Claimed and not yet recorded or given back: in the queue, in flight, or with an outcome not yet committed.
    held: HashSet<(i64, i64)>,
    /// Lanes whose quota is full, until when.
    lanes_full: HashMap<(usize, Route), Instant>,
    /// Users whose per-user window is full, until when.
    users_full: HashMap<String, Instant>,
    /// Per lane, until when the store records that jobs may send on it.
    lanes_recorded: HashMap<(usize, Route), Instant>,
    /// Cancellation as another replica may have made it, looked up at most once a second per job.
    cancels: HashMap<String, (Instant, bool)>,
    in_flight: JoinSet<Outcome>,
    /// Each attempt in flight, with the outcome to record should it panic.
    panicked: HashMap<tokio::task::Id, (Outcome, Exchange)>,
    /// Outcomes not yet committed to the store.
    unrecorded: Vec<Outcome>,
    next_expiry: Instant,
    next_report: Instant,
    last_claim: Instant,
    /// New work or a reload: claim at once.
    new_work: bool,
}

/// What the scheduler sends through, as the config in force has it.
#[derive(Clone)]
pub struct Plane<S> {
    pub apps: Apps,
    /// The stack below validation, as a direct call goes through it: audit, token, quota, client.
    pub send: S,
}

impl<S> Runner<S>
where
    S: Service<Exchange, Response = Answer, Error = GatewayError> + Clone + Send + 'static,
    S::Future: Send,
{
    pub fn new(jobs: Jobs, mut plane: watch::Receiver<Plane<S>>, metrics: Metrics) -> Runner<S> {
        let current = plane.borrow_and_update().clone();
        let (config, clock, now) = (jobs.config().clone(), jobs.clock(), Instant::now());
        Runner {
            jobs,
            config,
            clock,
            plane,
            current,
            metrics,
            queue: VecDeque::new(),
            held: HashSet::new(),
            lanes_full: HashMap::new(),
            users_full: HashMap::new(),
            lanes_recorded: HashMap::new(),
            cancels: HashMap::new(),
            in_flight: JoinSet::new(),
            panicked: HashMap::new(),
            unrecorded: Vec::new(),
            next_expiry: now,
            next_report: now,
            last_claim: now,
            new_work: true,
        }
    }

    /// The scheduler's loop: housekeeping, record, refill, dispatch, join; for as long as the process runs.
    pub async fn run(mut self) {
        self.resume_lanes().await;
        self.resume_users().await;
        loop {
            let now = Instant::now();
            self.housekeeping(now).await;
            if !self.record().await {
                tokio::time::sleep(STORE_RETRY).await;
                continue;
            }
            let mut wake_at = now + IDLE_POLL;
            self.refill(now, &mut wake_at).await;
            self.dispatch(now, &mut wake_at).await;
            if self.unrecorded.is_empty() {
                self.join(wake_at).await;
            }
        }
    }

    /// A reload, expiring old jobs, the gauges and taking over expired leases, each when it is time.
    async fn housekeeping(&mut self, now: Instant) {
        if self.plane.has_changed().unwrap_or(false) {
            self.reload().await;
        }
        if now >= self.next_expiry {
            let before = self.clock.now_ms() - self.config.retention.as_millis() as i64;
            match self.jobs.store().expire(before).await {
                Ok(0) => {}
                Ok(n) => info!(jobs = n, "expired finished jobs past jobs.retention"),
                Err(e) => warn!(error = %e, "expiring finished jobs failed"),
            }
            self.next_expiry = now + EXPIRY_EVERY;
        }
        if now >= self.next_report {
            self.report().await;
            match self.jobs.store().reap().await {
                Ok(0) => {}
                Ok(n) => info!(operations = n, "took over job operations whose lease expired (a replica gone)"),
                Err(e) => warn!(error = %e, "sweeping expired job leases failed"),
            }
            self.next_report = now + REPORT_EVERY;
        }
    }

    /// A reload: what is queued goes back to the store, to be claimed again under the new config (an app may be
    /// gone, a quota changed). What is in flight finishes under the old one.
    async fn reload(&mut self) {
        self.current = self.plane.borrow_and_update().clone();
        while let Some(op) = self.queue.pop_front() {
            self.give_back(&op.due, self.clock.now_ms()).await;
        }
        self.lanes_full.clear();
        self.lanes_recorded.clear();
        self.new_work = true;
    }

    /// Commits the outcomes not yet recorded; false if the store failed (they are kept, to try again).
    async fn record(&mut self) -> bool {
        if self.unrecorded.is_empty() {
            return true;
        }
        let outcomes = std::mem::take(&mut self.unrecorded);
        match self.jobs.store().record(outcomes.clone(), self.clock.now_ms()).await {
            Ok(finished) => {
                for took in finished {
                    self.metrics.job_duration.observe(took as f64 / 1000.0);
                }
            }
            Err(e) => {
                warn!(error = %e, "recording job outcomes failed; trying again");
                self.unrecorded = outcomes;
                return false;
            }
        }
        for outcome in &outcomes {
            self.held.remove(&(outcome.job, outcome.n));
        }
        true
    }

    /// Claims what can be sent soon: when the queue is half used (the claim is not free, so not on every event),
    /// whenever new work arrived, and at least once a second: another route's job, a retry or a user's freed
    /// window must not wait behind a queue full of one route.
    async fn refill(&mut self, now: Instant, wake_at: &mut Instant) {
        let fresh = std::mem::take(&mut self.new_work);
        if self.queue.len() >= BATCH / 2 && !fresh && now < self.last_claim + REFETCH_EVERY {
            return;
        }
        self.last_claim = now;
        // Only what can be sent soon: with a shared store the rest stays free for the other replicas.
        let limit = (2 * self.config.concurrency).saturating_sub(self.queue.len());
        match self.jobs.store().claim(self.clock.now_ms(), limit).await {
            Ok(due) => {
                for due in due {
                    if !self.held.insert(due.key()) {
                        continue;
                    }
                    match self.prepare(due, now) {
                        Ok(op) => self.queue.push_back(op),
                        Err(outcome) => self.unrecorded.push(*outcome),
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "reading due job operations failed");
                *wake_at = (*wake_at).min(now + STORE_RETRY);
            }
        }
        if self.queue.is_empty()
            && let Ok(Some(next)) = self.jobs.store().next_due(self.clock.now_ms()).await
        {
            *wake_at = (*wake_at).min(self.clock.instant(next));
        }
    }

    /// Sends what may go now, in order; what waits for its lane or a free place stays queued.
    async fn dispatch(&mut self, now: Instant, wake_at: &mut Instant) {
        let mut waiting = VecDeque::with_capacity(self.queue.len());
        while let Some(op) = self.queue.pop_front() {
            if let Some(op) = self.try_send(op, now, wake_at).await {
                waiting.push_back(op);
            }
        }
        self.queue = waiting;
        self.users_full.retain(|_, until| *until > now);
        self.lanes_full.retain(|_, until| *until > now);
    }

    /// Sends `op` if it may go now, or gives it back if it cannot go soon; returns it if it waits in the queue.
    async fn try_send(&mut self, op: Held, now: Instant, wake_at: &mut Instant) -> Option<Held> {
        if self.cancelled(&op.due, now).await {
            // The store dropped it already; the claim on it is let go.
            self.give_back(&op.due, 0).await;
            return None;
        }
        let user_full = op.due.user.as_ref().and_then(|user| self.users_full.get(user)).copied();
        if let Some(until) = user_full.filter(|until| *until > now) {
            // Due again when the user's window frees, which may be a moment from now.
            *wake_at = (*wake_at).min(until);
            self.give_back(&op.due, self.clock.now_ms() + (until - now).as_millis() as i64 + 1).await;
            return None;
        }
        if now >= op.held_since + self.config.lease / 2 {
            // Held too long behind a full lane: given back well before its lease could pass to another replica,
            // so that no two ever send it.
            self.give_back(&op.due, self.clock.now_ms()).await;
            return None;
        }
        let lane = (op.app.index.0, op.call.route());
        if let Some(until) = self.lanes_full.get(&lane).filter(|until| **until > now) {
            *wake_at = (*wake_at).min(*until);
            return Some(op);
        }
        if self.in_flight.len() >= self.config.concurrency {
            return Some(op);
        }
        if !self.record_lane(&op, now).await {
            *wake_at = (*wake_at).min(now + STORE_RETRY);
            return Some(op);
        }
        match op.app.quota.background(op.app.index, &op.call).await {
            Ok(slot) => {
                self.spawn(op, slot);
                None
            }
            Err((Scope::User, wait)) => {
                let user = op.due.user.clone().expect("only a user's call meets their window");
                self.give_back(&op.due, self.clock.now_ms() + wait.as_millis() as i64 + 1).await;
                self.users_full.insert(user, now + wait);
                *wake_at = (*wake_at).min(now + wait);
                None
            }
            Err((_, wait)) => {
                self.lanes_full.insert(lane, now + wait);
                *wake_at = (*wake_at).min(now + wait);
                Some(op)
            }
        }
    }

    /// Starts an attempt at `op` with the slot taken for it.
    fn spawn(&mut self, op: Held, slot: RateLimitHeaders) {
        let (due, exchange) = attempt::exchange(op, slot);
        let attempts = due.attempts + 1;
        let if_it_panics = Outcome {
            job: due.job,
            app: due.app.clone(),
            job_id: due.job_id.clone(),
            n: due.n,
            attempts,
            status: None,
            error: Some("internal_error".to_owned()),
            error_description: Some("the attempt failed inside the gateway; see its log".to_owned()),
            // Like any failure: tried again, up to `jobs.max_attempts`.
            next: match attempts >= self.config.max_attempts {
                true => Next::Done(OpState::Failed),
                false => Next::RetryAt(self.clock.now_ms() + backoff(&self.config, attempts, None).as_millis() as i64),
            },
            // It may have been sent: when, by whom, and its audit events (read once it has panicked).
            note: Some(AttemptNote {
                attempt: attempts,
                at_ms: self.clock.now_ms(),
                replica: self.jobs.replica().to_string(),
                ..Default::default()
            }),
        };
        let (send, counted) = (self.current.send.clone(), self.metrics.job_operations.clone());
        let replica = std::sync::Arc::clone(self.jobs.replica());
        let sent = exchange.clone();
        let task =
            self.in_flight.spawn(attempt(send, due, exchange, self.config.clone(), self.clock, replica, counted));
        self.panicked.insert(task.id(), (if_it_panics, sent));
    }

    /// Waits until an attempt finishes (then takes every one finished), `wake_at`, or new work.
    async fn join(&mut self, wake_at: Instant) {
        let first = tokio::select! {
            Some(done) = self.in_flight.join_next_with_id(), if !self.in_flight.is_empty() => Some(done),
            _ = tokio::time::sleep_until(wake_at) => None,
            _ = self.jobs.woken() => {
                self.new_work = true;
                None
            }
        };
        let mut done = first;
        while let Some(result) = done.take().or_else(|| self.in_flight.try_join_next_with_id()) {
            // A bug in an attempt costs that attempt (retried later), not the scheduler.
            let (id, outcome) = match result {
                Ok(finished) => finished,
                Err(e) => {
                    warn!(error = %e, "a job attempt panicked; the operation will be retried");
                    let (mut outcome, sent) = self.panicked.remove(&e.id()).expect("every attempt is known");
                    if let Some(note) = &mut outcome.note {
                        note.audit_seqs = sent.audited.seqs();
                    }
                    (e.id(), outcome)
                }
            };
            self.panicked.remove(&id);
            self.unrecorded.push(outcome);
        }
    }

    /// Whether the operation's job was cancelled: here, or (with a shared store) by another replica.
    async fn cancelled(&mut self, due: &Due, now: Instant) -> bool {
        if self.jobs.is_cancelled(due.job) {
            return true;
        }
        if let Some((checked, cancelled)) = self.cancels.get(&due.job_id)
            && now < *checked + CANCEL_CHECK
        {
            return *cancelled;
        }
        let cancelled = self.jobs.store().is_cancelled(&due.app, &due.job_id).await.unwrap_or(false);
        self.cancels.retain(|_, (checked, _)| now < *checked + CANCEL_CHECK);
        self.cancels.insert(due.job_id.clone(), (now, cancelled));
        cancelled
    }

    /// After a start, resumes each lane from the store's record of the jobs' use of it (`record_lane`): as if
    /// their last calls went when the record ends, or now if it reaches past now, so that what the process before
    /// sent keeps its place in Easemob's window. Without the record, every lane resumes as if used just now.
    async fn resume_lanes(&self) {
        let now_ms = self.clock.now_ms();
        let used = self.jobs.store().lanes_used().await.unwrap_or_else(|e| {
            warn!(error = %e, "reading the jobs' last use of each lane failed; resuming every lane as if used now");
            let apps = self.current.apps.iter();
            apps.flat_map(|app| {
                Route::ALL.map(|route| LaneUse {
                    app: app.key.to_string(),
                    route: route.name().to_owned(),
                    until_ms: now_ms,
                })
            })
            .collect()
        });
        for app in self.current.apps.iter() {
            let lanes: Vec<(Route, Duration)> = used
                .iter()
                .filter(|lane| lane.app == app.key.as_str())
                .filter_map(|lane| Some((Route::named(&lane.route)?, self.clock.since(lane.until_ms))))
                .collect();
            app.quota.resume(app.index, &lanes);
        }
    }

    /// After a start, counts in each user's window the calls jobs made for them in the last minute (as the store
    /// recorded them), so that a user whose window the process before filled is not given it again. Calls whose
    /// outcome died with that process are not among them: they run again (at least once, as documented).
    async fn resume_users(&self) {
        let sent = match self.jobs.store().users_sent(self.clock.now_ms() - MINUTE.as_millis() as i64).await {
            Ok(sent) => sent,
            Err(e) => {
                warn!(error = %e, "reading the calls jobs made for each user failed; their windows start empty");
                return;
            }
        };
        for app in self.current.apps.iter() {
            let users: Vec<(&str, Duration)> = sent
                .iter()
                .filter_map(|used| Some((super::user_in_app(app, &used.user)?, self.clock.since(used.at_ms))))
                .collect();
            app.quota.resume_users(app.index, &users);
        }
    }

    /// Whether the store records, before `op` goes, that jobs may send on its lane past now: renewed
    /// [`LANE_AHEAD`] ahead once half of the last record is used. Not when the store cannot write it.
    async fn record_lane(&mut self, op: &Held, now: Instant) -> bool {
        let lane = (op.app.index.0, op.call.route());
        let until = self.lanes_recorded.get(&lane).copied();
        if until.is_some_and(|until| until > now + LANE_AHEAD / 2) {
            return true;
        }
        let until_ms = self.clock.now_ms() + LANE_AHEAD.as_millis() as i64;
        match self.jobs.store().use_lane(op.app.key.as_str(), lane.1.name(), until_ms).await {
            Ok(()) => {
                self.lanes_recorded.insert(lane, now + LANE_AHEAD);
                true
            }
            Err(e) => {
                warn!(error = %e, "recording a lane's use by jobs failed");
                until.is_some_and(|until| until > now)
            }
        }
    }

    /// Gives an operation back to the store, due again at `until_ms`, without an outcome; it is held no more.
    async fn give_back(&mut self, due: &Due, until_ms: i64) {
        if let Err(e) = self.jobs.store().release(due, until_ms).await {
            warn!(error = %e, "giving a job operation back failed; its lease will");
        }
        self.held.remove(&due.key());
    }

    /// Jobs by state, the queue's depth and the age of its oldest operation, for the metrics.
    async fn report(&self) {
        let Ok(totals) = self.jobs.store().totals().await else { return };
        for state in JobState::ALL {
            let count = totals.jobs.iter().find(|(s, _)| *s == state).map_or(0, |(_, n)| *n);
            self.metrics.jobs.with_label_values(&[state.as_str()]).set(count);
        }
        self.metrics.job_operations_pending.set(totals.pending);
        let age = totals.oldest_ms.map_or(0, |oldest| (self.clock.now_ms() - oldest).max(0) / 1000);
        self.metrics.job_oldest_pending.set(age);
    }

    /// The app and the call of a stored operation; an operation that can no longer run fails at once.
    fn prepare(&self, due: Due, now: Instant) -> Result<Held, Box<Outcome>> {
        let fail = |error: &str, description: String| {
            Box::new(Outcome {
                job: due.job,
                app: due.app.clone(),
                job_id: due.job_id.clone(),
                n: due.n,
                attempts: due.attempts,
                status: None,
                error: Some(error.to_owned()),
                error_description: Some(description),
                next: Next::Done(OpState::Failed),
                // Nothing was sent: no attempt to note.
                note: None,
            })
        };
        let Some(app) = self.current.apps.iter().find(|app| app.key.as_str() == due.app).cloned() else {
            return Err(fail("app_not_configured", format!("{} is no longer configured here", due.app)));
        };
        match call_of(&due.path, due.body.as_deref(), self.clock.now_ms()) {
            Ok(call) => Ok(Held { due, app, call, held_since: now }),
            Err(e) => Err(fail(e.error, e.description)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http::HeaderValue;
    use tower::ServiceBuilder;

    use super::*;
    use crate::apps::App;
    use crate::config::RateLimitConfig;
    use crate::jobs::Store;
    use crate::jobs::records::{Created, JobRecord, JobState, NewOperation};
    use crate::jobs::store::LocalStore;
    use crate::jobs::{Clock, OperationRequest};
    use crate::layers::quota::QuotaLayer;
    use crate::layers::token::TokenLayer;
    use crate::metrics::Metrics;
    use crate::routes::validate::Call;
    use crate::testing::{self, ScriptedFetch};

    type Sent = Arc<Mutex<Vec<(Instant, Call)>>>;

    struct Harness {
        jobs: Jobs,
        app: Arc<App>,
        sent: Sent,
        runner: tokio::task::JoinHandle<()>,
        dir: tempfile::TempDir,
    }

    /// A scheduler over a real store, the real token and quota layers, and a scripted Easemob.
    async fn start(
        jobs_config: JobsConfig,
        rate_limit: RateLimitConfig,
        script: impl FnMut(usize) -> Answer + Send + 'static,
    ) -> Harness {
        launch(tempfile::tempdir().unwrap(), Clock::new(), jobs_config, rate_limit, None, script).await
    }

    /// [`start`], over the store in `dir`, on `clock`, with `audit` above the token layer as in the job plane.
    async fn launch(
        dir: tempfile::TempDir,
        clock: Clock,
        jobs_config: JobsConfig,
        rate_limit: RateLimitConfig,
        audit: Option<Arc<crate::audit::Audit>>,
        mut script: impl FnMut(usize) -> Answer + Send + 'static,
    ) -> Harness {
        let store: Store = Arc::new(LocalStore::open(&dir.path().join("jobs.db")).unwrap());
        let quota = testing::quota(rate_limit);
        let app = testing::app(&ScriptedFetch::granting(3600), &quota);
        let sent: Sent = Arc::default();
        let log = Arc::clone(&sent);
        let (easemob, _) = testing::upstream(move |n, exchange| {
            log.lock().unwrap().push((Instant::now(), exchange.call.clone()));
            Ok(script(n))
        });
        let send = ServiceBuilder::new()
            .layer(TokenLayer::new(&Metrics::new(), [&app]))
            .layer(QuotaLayer::new(Arc::clone(&quota)))
            .layer(crate::audit::AuditLayer::new(audit))
            .service(easemob);
        let jobs = Jobs::new(store, jobs_config, clock, "r1");
        let (_, plane) = watch::channel(Plane { apps: Apps::new(vec![Arc::clone(&app)]), send });
        let runner = tokio::spawn(Runner::new(jobs.clone(), plane, Metrics::new()).run());
        Harness { jobs, app, sent, runner, dir }
    }

    impl Harness {
        /// The process stopped at once and started again: a new scheduler, quota and token over the same store.
        async fn restart(self) -> Harness {
            self.runner.abort();
            let _ = self.runner.await;
            let (config, clock) = (self.jobs.config().clone(), self.jobs.clock());
            drop(self.jobs);
            launch(self.dir, clock, config, RateLimitConfig::default(), None, ok).await
        }

        async fn submit(&self, operations: Vec<OperationRequest>) -> JobRecord {
            let ops: Vec<NewOperation> =
                operations.iter().flat_map(|op| super::super::operations(&self.app, op, 0).unwrap()).collect();
            let staging = self.jobs.staging(&self.app, None);
            staging.stage(0, ops).await.unwrap();
            match staging.submit(&self.app, None, None, None).await.unwrap() {
                Created::New(job) => job,
                Created::Existing { .. } => panic!("a new job"),
            }
        }

        async fn job(&self, id: &str) -> JobRecord {
            self.jobs.store().job("o#a", id).await.unwrap().unwrap()
        }

        /// Waits (in paused time) until the job has finished; returns it and how long that took.
        async fn finished(&self, id: &str) -> (JobRecord, Duration) {
            let started = Instant::now();
            loop {
                let job = self.job(id).await;
                if job.finished_ms.is_some() {
                    return (job, started.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        fn sent_times(&self) -> Vec<Duration> {
            let sent = self.sent.lock().unwrap();
            let first = sent.first().map(|(at, _)| *at).unwrap();
            sent.iter().map(|(at, _)| *at - first).collect()
        }
    }

    fn clear(user: &str) -> OperationRequest {
        OperationRequest {
            method: "POST".to_owned(),
            path: format!("/rest/message/roaming/user/{user}/delete/all"),
            body: None,
        }
    }

    fn conversation(owner: &str, peer: &str) -> OperationRequest {
        OperationRequest {
            method: "DELETE".to_owned(),
            path: format!("/users/{owner}/user_channel"),
            body: Some(testing::raw(serde_json::json!({"channel": peer, "type": "chat", "delete_roam": true}))),
        }
    }

    fn ok(_: usize) -> Answer {
        testing::easemob(200)
    }

    /// The most calls in any window of `window` starting at a call.
    fn busiest(times: &[Duration], window: Duration) -> usize {
        (0..times.len()).map(|i| times[i..].iter().take_while(|t| **t < times[i] + window).count()).max().unwrap_or(0)
    }

    #[tokio::test(start_paused = true)]
    async fn a_thousand_calls_run_at_the_routes_quota_and_no_faster() {
        let h = start(JobsConfig::default(), RateLimitConfig::default(), ok).await;
        let job = h.submit((0..1000).map(|i| clear(&format!("u{i}"))).collect()).await;
        let (done, took) = h.finished(&job.id).await;
        assert_eq!((done.state, done.counts.succeeded), (JobState::Done, 1000));
        assert!(took <= Duration::from_millis(10_500), "1.05 × the quota's 10 s at most: {took:?}");
        let times = h.sent_times();
        assert_eq!(times.len(), 1000, "each operation sent once");
        assert_eq!(busiest(&times, Duration::from_secs(1)), 100, "never more than Easemob's 100 in a second");
    }

    #[tokio::test(start_paused = true)]
    async fn one_users_full_window_holds_back_only_that_user() {
        let h = start(JobsConfig::default(), RateLimitConfig::default(), ok).await;
        let twenty: Vec<_> = (0..100).map(|i| conversation(&format!("owner{}", i % 20), &format!("p{i}"))).collect();
        let (done, took) = h.finished(&h.submit(twenty).await.id).await;
        assert_eq!(done.counts.succeeded, 100);
        assert!(took < Duration::from_millis(1_500), "5 for each of 20 users go in about a second: {took:?}");

        let h = start(JobsConfig::default(), RateLimitConfig::default(), ok).await;
        let twelve: Vec<_> = (0..12).map(|i| conversation("ann", &format!("p{i}"))).collect();
        let (done, took) = h.finished(&h.submit(twelve).await.id).await;
        assert_eq!(done.counts.succeeded, 12);
        assert!(
            (Duration::from_secs(120)..Duration::from_secs(122)).contains(&took),
            "just over two minutes: {took:?}"
        );
        let times = h.sent_times();
        let minute = |m: u64| times.iter().filter(|t| (m * 60..m * 60 + 60).contains(&t.as_secs())).count();
        assert_eq!((minute(0), minute(1), minute(2)), (5, 5, 2), "{times:?}");
        assert_eq!(busiest(&times, Duration::from_secs(60)), 5, "never six in a minute");
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_restart_a_users_window_still_holds_the_calls_of_the_last_minute() {
        let h = start(JobsConfig::default(), RateLimitConfig::default(), ok).await;
        let five: Vec<_> = (0..5).map(|i| conversation("ann", &format!("p{i}"))).collect();
        let (done, _) = h.finished(&h.submit(five).await.id).await;
        assert_eq!(done.counts.succeeded, 5);
        let first = h.sent.lock().unwrap()[0].0;
        tokio::time::sleep(Duration::from_secs(10)).await;

        let h = h.restart().await;
        let (done, _) = h.finished(&h.submit(vec![conversation("ann", "p5")]).await.id).await;
        assert_eq!(done.counts.succeeded, 1);
        let sixth = h.sent.lock().unwrap()[0].0;
        assert!(sixth - first >= Duration::from_secs(60), "a sixth call within the minute: {:?}", sixth - first);
        assert!(sixth - first < Duration::from_secs(62), "held back no longer than the window: {:?}", sixth - first);
    }

    fn envelope(status: u16, error: &str, retry_after: Option<&str>) -> Answer {
        let body = serde_json::json!({"error": error, "error_description": format!("{error} happened")});
        let mut answer = testing::easemob_with_body(status, bytes::Bytes::from(body.to_string()));
        if let Some(secs) = retry_after {
            answer.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from_str(secs).unwrap());
        }
        answer
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_with_backoff_and_other_4xx_are_final() {
        let config = JobsConfig { retry_min: Duration::from_secs(1), ..JobsConfig::default() };
        let h = start(config, RateLimitConfig::default(), |n| match n {
            0 => envelope(503, "service_unavailable", None),
            1 => envelope(429, "reach_limit", Some("3")),
            2 => testing::easemob(200),
            _ => envelope(404, "service_resource_not_found", None),
        })
        .await;
        let (done, _) = h.finished(&h.submit(vec![clear("ann")]).await.id).await;
        assert_eq!((done.state, done.counts.succeeded), (JobState::Done, 1));
        let ops = h.jobs.store().operations(&done, 0, 10, None).await.unwrap();
        assert_eq!((ops[0].attempts, ops[0].status), (3, Some(200)));
        let times = h.sent_times();
        assert!(times[1] - times[0] >= Duration::from_millis(500), "backoff: {times:?}");
        assert!(times[2] - times[1] >= Duration::from_secs(3), "Retry-After honoured: {times:?}");

        let (failed, _) = h.finished(&h.submit(vec![clear("bob")]).await.id).await;
        assert_eq!((failed.state, failed.counts.failed), (JobState::Failed, 1));
        let ops = h.jobs.store().operations(&failed, 0, 10, None).await.unwrap();
        assert_eq!((ops[0].attempts, ops[0].status), (1, Some(404)));
        assert_eq!(ops[0].error.as_deref(), Some("service_resource_not_found"));
        assert_eq!(ops[0].error_description.as_deref(), Some("service_resource_not_found happened"));
    }

    #[tokio::test(start_paused = true)]
    async fn each_attempt_is_noted_with_its_audit_events_one_that_panicked_included() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.jsonl");
        let config = crate::config::AuditConfig { file: Some(file), replica: Some("r1".into()), ..Default::default() };
        let audit = crate::audit::Audit::open(&config, Metrics::new()).unwrap();
        // Easemob refuses the token (401, audited), the replay with a new one panics inside the gateway; the
        // scheduler's next attempt succeeds.
        let script = |n| match n {
            0 => envelope(401, "unauthorized", None),
            1 => panic!("a bug in the attempt"),
            _ => testing::easemob(200),
        };
        let (jobs, clock) = (JobsConfig::default(), Clock::new());
        let h = launch(dir, clock, jobs, RateLimitConfig::default(), audit, script).await;
        let (done, _) = h.finished(&h.submit(vec![clear("ann")]).await.id).await;
        assert_eq!(done.state, JobState::Done);
        let ops = h.jobs.store().operations(&done, 0, 10, None).await.unwrap();
        let noted: Vec<_> = ops[0].history.iter().map(|n| (n.attempt, n.status, n.audit_seqs.clone())).collect();
        assert_eq!(noted, [(1, None, vec![1]), (2, Some(200), vec![2])]);
        assert!(ops[0].history.iter().all(|n| n.replica == "r1"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_that_always_panics_stops_at_max_attempts_like_any_failure() {
        let config = JobsConfig { max_attempts: 3, retry_max: Duration::from_secs(2), ..JobsConfig::default() };
        let h = start(config, RateLimitConfig::default(), |_| panic!("a bug in the attempt")).await;
        let (failed, _) = h.finished(&h.submit(vec![clear("ann")]).await.id).await;
        assert_eq!(failed.state, JobState::Failed);
        let ops = h.jobs.store().operations(&failed, 0, 10, None).await.unwrap();
        assert_eq!((ops[0].attempts, ops[0].error.as_deref()), (3, Some("internal_error")));
    }

    #[tokio::test(start_paused = true)]
    async fn an_operation_that_keeps_failing_stops_at_max_attempts() {
        let config = JobsConfig { max_attempts: 3, retry_max: Duration::from_secs(2), ..JobsConfig::default() };
        let h = start(config, RateLimitConfig::default(), |_| envelope(502, "bad_gateway", None)).await;
        let (done, _) = h.finished(&h.submit(vec![clear("ann")]).await.id).await;
        assert_eq!((done.state, done.counts.failed), (JobState::Failed, 1));
        assert_eq!(h.sent_times().len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_job_sends_nothing_more() {
        let h = start(JobsConfig::default(), RateLimitConfig::default(), ok).await;
        let job = h.submit((0..500).map(|i| clear(&format!("u{i}"))).collect()).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let cancelled = h.jobs.cancel(&h.app, &job.id).await.unwrap().unwrap();
        let sent_then = h.sent.lock().unwrap().len();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(h.sent.lock().unwrap().len(), sent_then, "nothing sent after the cancel");
        let after = h.job(&job.id).await;
        assert_eq!(after.state, JobState::Cancelled);
        assert_eq!(after.counts.succeeded + after.counts.cancelled, 500);
        assert!(after.counts.cancelled >= cancelled.counts.cancelled - 1);
        assert!((90..=110).contains(&after.counts.succeeded), "about a second's worth ran: {:?}", after.counts);
    }

    #[tokio::test(start_paused = true)]
    async fn one_routes_long_job_does_not_hold_back_another_routes_job() {
        let h = start(JobsConfig::default(), RateLimitConfig::default(), ok).await;
        let long = h.submit((0..2000).map(|i| clear(&format!("u{i}"))).collect()).await;
        let short = h.submit((0..10).map(|i| conversation(&format!("owner{i}"), "peer")).collect()).await;
        let (done, took) = h.finished(&short.id).await;
        assert_eq!(done.counts.succeeded, 10);
        assert!(took < Duration::from_secs(1), "at its own route's pace, beside the long job: {took:?}");
        assert!(h.job(&long.id).await.finished_ms.is_none(), "the long job is still running");
    }

    /// The job's estimate now, checked against the time the scheduler then takes to finish it: within a tenth.
    async fn estimate_holds(h: &Harness, id: &str) -> Duration {
        let estimate = h.jobs.estimate(&h.app, &h.job(id).await).await.unwrap();
        let (_, took) = h.finished(id).await;
        let off = (estimate.as_secs_f64() - took.as_secs_f64()).abs();
        assert!(off <= took.as_secs_f64() / 10.0, "estimated {estimate:?}, took {took:?}");
        estimate
    }

    #[tokio::test(start_paused = true)]
    async fn the_estimate_counts_what_a_users_window_already_holds() {
        let h = start(JobsConfig::default(), RateLimitConfig::default(), ok).await;
        let five = h.submit((0..5).map(|i| conversation("ann", &format!("p{i}"))).collect()).await;
        h.finished(&five.id).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let two = h.submit((5..7).map(|i| conversation("ann", &format!("p{i}"))).collect()).await;
        let estimate = estimate_holds(&h, &two.id).await;
        assert_eq!(estimate.as_secs(), 57, "ann's window frees a minute after her five: {estimate:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_estimate_of_one_users_twelve_counts_the_five_already_sent() {
        let h = start(JobsConfig::default(), RateLimitConfig::default(), ok).await;
        let job = h.submit((0..12).map(|i| conversation("ann", &format!("p{i}"))).collect()).await;
        let at_creation = h.jobs.estimate(&h.app, &job).await.unwrap();
        assert_eq!(at_creation.as_secs(), 120, "5 now, 5 a minute later, 2 a minute after that: {at_creation:?}");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(h.job(&job.id).await.counts.pending, 7);
        let estimate = estimate_holds(&h, &job.id).await;
        assert_eq!(estimate.as_secs(), 117, "{estimate:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_estimate_of_a_thousand_calls_on_one_route_follows_the_lane() {
        let h = start(JobsConfig::default(), RateLimitConfig::default(), ok).await;
        let job = h.submit((0..1000).map(|i| clear(&format!("u{i}"))).collect()).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let estimate = estimate_holds(&h, &job.id).await;
        assert_eq!(estimate.as_secs(), 8, "800 left at 100 a second: {estimate:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn jobs_use_only_their_share_of_a_route() {
        let rate_limit = RateLimitConfig { jobs_share: 0.5, ..RateLimitConfig::default() };
        let h = start(JobsConfig::default(), rate_limit, ok).await;
        let job = h.submit((0..200).map(|i| clear(&format!("u{i}"))).collect()).await;
        let (_, took) = h.finished(&job.id).await;
        assert!(took >= Duration::from_secs(3), "about 50 a second: {took:?}");
        assert!(busiest(&h.sent_times(), Duration::from_secs(1)) <= 50);
    }
}
