//! The job queue's one interface, as both stores keep it: the embedded one (`jobs/store.rs`, SQLite, one process)
//! and the shared one (`jobs/shared.rs`, Redis, every replica). `tests/store_conformance.rs` runs the same tests
//! against each, so a difference in behaviour is a failing test.
//!
//! The life of a job: its operations are `stage`d as they are read, in batches no one else sees, and `create`
//! makes the job of them at once (or `discard` drops them when the request is refused). A process that dies
//! before `create` leaves nothing behind: SQLite drops what was staged when the file is next opened, Redis lets it
//! expire.
//!
//! The life of an operation: `create` stores it pending, due at once. `claim` hands it to one scheduler, which
//! holds it until it `record`s its outcome (final, or a retry due later) or `release`s it (due again later,
//! without an outcome). While it is held no other `claim` returns it. A claim lasts while its holder does: when a
//! process dies holding operations, they are due again for the next one (the next process on the SQLite file;
//! with Redis, any replica's `reap` once their lease has passed). `cancel` drops what is pending, held or not; an
//! operation in flight still records its outcome. Every write is durable once it returns.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::records::{
    Created, Due, JobRecord, JobState, LaneUse, NewJob, NewOperation, OpRecord, OpState, Outcome, Remaining,
    StoreError, Totals, UserUse,
};
use super::shared::{Access, SharedStore};
use super::store::LocalStore;

/// What a store's call returns: its answer, later.
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Where jobs are kept, whichever backend keeps them.
pub type Store = Arc<dyn JobStore>;

/// The jobs' store. Any failure makes it unhealthy (readiness says so); only a write that succeeds makes it
/// healthy again, since reads may still work on a full or read-only store.
pub trait JobStore: Send + Sync {
    fn is_healthy(&self) -> bool;

    /// Adds operations `from..` (`ops`) to `app`'s job `job_id` that `create` will make; until then no other
    /// call sees them.
    fn stage<'a>(&'a self, app: &'a str, job_id: &'a str, from: usize, ops: Vec<NewOperation>) -> Pending<'a, ()>;

    /// Drops what was staged for `app`'s job that will not be created.
    fn discard<'a>(&'a self, app: &'a str, job_id: &'a str) -> Pending<'a, ()>;

    /// Makes a job of the operations staged under its id, all at once, or finds the job its idempotency key
    /// already made (and drops what was staged).
    fn create(&self, job: NewJob) -> Pending<'_, Created>;

    /// `app`'s job `id`, if there is one.
    fn job<'a>(&'a self, app: &'a str, id: &'a str) -> Pending<'a, Option<JobRecord>>;

    /// A page of a job's operations from index `from`, optionally only those in `state`.
    fn operations<'a>(
        &'a self,
        job: &'a JobRecord,
        from: i64,
        limit: u32,
        state: Option<OpState>,
    ) -> Pending<'a, Vec<OpRecord>>;

    /// An app's jobs, newest first, from `before` (a job's `seq`, exclusive), optionally only those in `state`.
    fn list<'a>(
        &'a self,
        app: &'a str,
        state: Option<JobState>,
        before: Option<i64>,
        limit: u32,
    ) -> Pending<'a, Vec<JobRecord>>;

    /// Cancels a job: its pending operations are dropped (held ones too). `None` if there is no such job; a
    /// finished job keeps its state.
    fn cancel<'a>(&'a self, app: &'a str, id: &'a str, now_ms: i64) -> Pending<'a, Option<JobRecord>>;

    /// Whether `app`'s job was cancelled, by this process or another.
    fn is_cancelled<'a>(&'a self, app: &'a str, job_id: &'a str) -> Pending<'a, bool>;

    /// Claims up to `limit` operations of each route due at `now_ms` and held by no one, so that one route's long
    /// job never holds back the others (they have quotas of their own). The apps take turns at being first (one
    /// app's long job never holds back another's), and within an app each route's earliest due comes first.
    fn claim(&self, now_ms: i64, limit: usize) -> Pending<'_, Vec<Due>>;

    /// When the next pending operation falls due after `now_ms`, if one does.
    fn next_due(&self, now_ms: i64) -> Pending<'_, Option<i64>>;

    /// Gives back a claimed operation without an outcome, due again at `until_ms` (if it is still pending).
    fn release<'a>(&'a self, due: &'a Due, until_ms: i64) -> Pending<'a, ()>;

    /// Makes the operations whose holder is gone due again; returns how many. With SQLite a claim dies with the
    /// process that made it, so there is never one to take over; with Redis, those whose lease has passed.
    fn reap(&self) -> Pending<'_, usize>;

    /// Records outcomes: a final one counts once (a replay after a crash changes nothing), a retry is due again
    /// at its time. Returns how long each job finished here took, from acceptance (ms).
    fn record(&self, outcomes: Vec<Outcome>, now_ms: i64) -> Pending<'_, Vec<i64>>;

    /// Records, before any of its calls go, that jobs may send on `app`'s `route` until `until_ms`; never moved
    /// back. After a restart the scheduler resumes the lane from it.
    fn use_lane<'a>(&'a self, app: &'a str, route: &'a str, until_ms: i64) -> Pending<'a, ()>;

    /// The lanes jobs have used (before a restart, or on another replica), each with the end of its last record.
    fn lanes_used(&self) -> Pending<'_, Vec<LaneUse>>;

    /// The calls jobs made for each user since `since_ms` that a restart must count again in the users' windows:
    /// with SQLite those that reached Easemob (the windows were the process's own); with Redis none (the windows
    /// live in Redis with the shared quota, and outlive the process).
    fn users_sent(&self, since_ms: i64) -> Pending<'_, Vec<UserUse>>;

    /// A job's pending operations by route, and by user (for the estimate).
    fn remaining<'a>(&'a self, job: &'a JobRecord) -> Pending<'a, Remaining>;

    /// Jobs by state and operations still pending, for the metrics.
    fn totals(&self) -> Pending<'_, Totals>;

    /// Deletes jobs finished before `before_ms`, with their operations; returns how many.
    fn expire(&self, before_ms: i64) -> Pending<'_, usize>;
}

// Each store answers with its own methods, of the same names.

impl JobStore for LocalStore {
    fn is_healthy(&self) -> bool {
        LocalStore::is_healthy(self)
    }

    fn stage<'a>(&'a self, _app: &'a str, job_id: &'a str, from: usize, ops: Vec<NewOperation>) -> Pending<'a, ()> {
        Box::pin(self.stage(job_id, from, ops))
    }

    fn discard<'a>(&'a self, _app: &'a str, job_id: &'a str) -> Pending<'a, ()> {
        Box::pin(self.discard(job_id))
    }

    fn create(&self, job: NewJob) -> Pending<'_, Created> {
        Box::pin(self.create(job))
    }

    fn job<'a>(&'a self, app: &'a str, id: &'a str) -> Pending<'a, Option<JobRecord>> {
        Box::pin(self.job(app, id))
    }

    fn operations<'a>(
        &'a self,
        job: &'a JobRecord,
        from: i64,
        limit: u32,
        state: Option<OpState>,
    ) -> Pending<'a, Vec<OpRecord>> {
        Box::pin(self.operations(job, from, limit, state))
    }

    fn list<'a>(
        &'a self,
        app: &'a str,
        state: Option<JobState>,
        before: Option<i64>,
        limit: u32,
    ) -> Pending<'a, Vec<JobRecord>> {
        Box::pin(self.list(app, state, before, limit))
    }

    fn cancel<'a>(&'a self, app: &'a str, id: &'a str, now_ms: i64) -> Pending<'a, Option<JobRecord>> {
        Box::pin(self.cancel(app, id, now_ms))
    }

    fn is_cancelled<'a>(&'a self, _app: &'a str, job_id: &'a str) -> Pending<'a, bool> {
        Box::pin(self.is_cancelled(job_id))
    }

    fn claim(&self, now_ms: i64, limit: usize) -> Pending<'_, Vec<Due>> {
        Box::pin(self.claim(now_ms, limit))
    }

    fn next_due(&self, now_ms: i64) -> Pending<'_, Option<i64>> {
        Box::pin(self.next_due(now_ms))
    }

    fn release<'a>(&'a self, due: &'a Due, until_ms: i64) -> Pending<'a, ()> {
        Box::pin(self.release(due, until_ms))
    }

    fn reap(&self) -> Pending<'_, usize> {
        // A claim lives in this process's memory: when the process is gone, so is the claim.
        Box::pin(std::future::ready(Ok(0)))
    }

    fn record(&self, outcomes: Vec<Outcome>, now_ms: i64) -> Pending<'_, Vec<i64>> {
        Box::pin(self.record(outcomes, now_ms))
    }

    fn use_lane<'a>(&'a self, app: &'a str, route: &'a str, until_ms: i64) -> Pending<'a, ()> {
        Box::pin(self.use_lane(app, route, until_ms))
    }

    fn lanes_used(&self) -> Pending<'_, Vec<LaneUse>> {
        Box::pin(self.lanes_used())
    }

    fn users_sent(&self, since_ms: i64) -> Pending<'_, Vec<UserUse>> {
        Box::pin(self.users_sent(since_ms))
    }

    fn remaining<'a>(&'a self, job: &'a JobRecord) -> Pending<'a, Remaining> {
        Box::pin(self.remaining(job))
    }

    fn totals(&self) -> Pending<'_, Totals> {
        Box::pin(self.totals())
    }

    fn expire(&self, before_ms: i64) -> Pending<'_, usize> {
        Box::pin(self.expire(before_ms))
    }
}

impl JobStore for SharedStore {
    fn is_healthy(&self) -> bool {
        SharedStore::is_healthy(self)
    }

    fn stage<'a>(&'a self, app: &'a str, job_id: &'a str, from: usize, ops: Vec<NewOperation>) -> Pending<'a, ()> {
        Box::pin(self.marked(Access::Write, self.stage(app, job_id, from, ops)))
    }

    fn discard<'a>(&'a self, app: &'a str, job_id: &'a str) -> Pending<'a, ()> {
        Box::pin(self.marked(Access::Write, self.discard(app, job_id)))
    }

    fn create(&self, job: NewJob) -> Pending<'_, Created> {
        Box::pin(self.marked(Access::Write, self.create(job)))
    }

    fn job<'a>(&'a self, app: &'a str, id: &'a str) -> Pending<'a, Option<JobRecord>> {
        Box::pin(self.marked(Access::Read, self.job(app, id)))
    }

    fn operations<'a>(
        &'a self,
        job: &'a JobRecord,
        from: i64,
        limit: u32,
        state: Option<OpState>,
    ) -> Pending<'a, Vec<OpRecord>> {
        Box::pin(self.marked(Access::Read, self.operations(job, from, limit, state)))
    }

    fn list<'a>(
        &'a self,
        app: &'a str,
        state: Option<JobState>,
        before: Option<i64>,
        limit: u32,
    ) -> Pending<'a, Vec<JobRecord>> {
        Box::pin(self.marked(Access::Read, self.list(app, state, before, limit)))
    }

    fn cancel<'a>(&'a self, app: &'a str, id: &'a str, now_ms: i64) -> Pending<'a, Option<JobRecord>> {
        Box::pin(self.marked(Access::Write, self.cancel(app, id, now_ms)))
    }

    fn is_cancelled<'a>(&'a self, app: &'a str, job_id: &'a str) -> Pending<'a, bool> {
        Box::pin(self.marked(Access::Read, self.is_cancelled(app, job_id)))
    }

    fn claim(&self, now_ms: i64, limit: usize) -> Pending<'_, Vec<Due>> {
        Box::pin(self.marked(Access::Write, self.claim(now_ms, limit)))
    }

    fn next_due(&self, now_ms: i64) -> Pending<'_, Option<i64>> {
        Box::pin(self.marked(Access::Read, self.next_due(now_ms)))
    }

    fn release<'a>(&'a self, due: &'a Due, until_ms: i64) -> Pending<'a, ()> {
        Box::pin(self.marked(Access::Write, self.release(due, until_ms)))
    }

    fn reap(&self) -> Pending<'_, usize> {
        Box::pin(self.marked(Access::Write, self.reap()))
    }

    fn record(&self, outcomes: Vec<Outcome>, now_ms: i64) -> Pending<'_, Vec<i64>> {
        Box::pin(self.marked(Access::Write, self.record(outcomes, now_ms)))
    }

    fn use_lane<'a>(&'a self, app: &'a str, route: &'a str, until_ms: i64) -> Pending<'a, ()> {
        Box::pin(self.marked(Access::Write, self.use_lane(app, route, until_ms)))
    }

    fn lanes_used(&self) -> Pending<'_, Vec<LaneUse>> {
        Box::pin(self.marked(Access::Read, self.lanes_used()))
    }

    fn users_sent(&self, since_ms: i64) -> Pending<'_, Vec<UserUse>> {
        Box::pin(self.marked(Access::Read, self.users_sent(since_ms)))
    }

    fn remaining<'a>(&'a self, job: &'a JobRecord) -> Pending<'a, Remaining> {
        Box::pin(self.marked(Access::Read, self.remaining(job)))
    }

    fn totals(&self) -> Pending<'_, Totals> {
        Box::pin(self.marked(Access::Read, self.totals()))
    }

    fn expire(&self, before_ms: i64) -> Pending<'_, usize> {
        Box::pin(self.marked(Access::Write, self.expire(before_ms)))
    }
}
