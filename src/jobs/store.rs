//! The jobs' embedded store: one SQLite file. A job is accepted only once its operations are committed (WAL,
//! `synchronous = FULL`: a commit survives `kill -9` and a power loss), and an outcome counts once it is committed
//! too. An operation in flight when the process dies is still `pending` here, so it runs again after a restart:
//! the six deletions are idempotent upstream, and the job records its outcome exactly once.
//!
//! SQLite calls block, so each runs on tokio's blocking pool (which also keeps paused test time from jumping while
//! one runs); one connection, behind a mutex, serialises them.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::records::{
    Created, Due, JobRecord, JobState, LaneUse, NewJob, NewOperation, Next, OpRecord, OpState, Outcome, Remaining,
    StoreError, Totals, UserUse, method_of,
};
use crate::routes::Route;

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        StoreError::new(e.to_string())
    }
}

/// The tables, created when the file is first opened.
const SCHEMA: &str = include_str!("store.sql");

mod rows;
use rows::{JOB_COLUMN_COUNT, JOB_COLUMNS, due, job_record};

/// Columns added to `SCHEMA` since the first version, which a file made before them gets when it is opened
/// (`CREATE TABLE IF NOT EXISTS` leaves a table that exists as it was): table, column, type.
const ADDED_COLUMNS: [(&str, &str, &str); 2] = [("jobs", "peer", "TEXT"), ("operations", "history", "TEXT")];

#[derive(Clone, Copy)]
enum Access {
    Read,
    Write,
}

/// The embedded store: one SQLite file, for one process.
#[derive(Clone)]
pub struct LocalStore {
    conn: Arc<Mutex<Connection>>,
    /// The last write succeeded: what readiness reports.
    healthy: Arc<AtomicBool>,
    /// Operations claimed (by job `seq` and index) and not yet recorded or released. Kept in memory: a claim dies
    /// with the process, and the next one finds the operation due again.
    claimed: Arc<Mutex<HashSet<(i64, i64)>>>,
    /// Which app the next claim starts with: they take turns.
    turn: Arc<AtomicUsize>,
}

impl LocalStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<LocalStore, StoreError> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::new(format!("{} does not support WAL (journal_mode is {mode})", path.display())));
        }
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
        conn.execute_batch(SCHEMA)?;
        add_missing_columns(&mut conn)?;
        // One process keeps the file: what an earlier one staged and never created died with it.
        conn.execute("DELETE FROM staged", [])?;
        Ok(LocalStore {
            conn: Arc::new(Mutex::new(conn)),
            healthy: Arc::new(AtomicBool::new(true)),
            claimed: Arc::default(),
            turn: Arc::default(),
        })
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Runs `f` on the connection on the blocking pool. Any failure marks the store unhealthy; only a write that
    /// succeeds marks it healthy again (reads still work on a full or read-only disk).
    async fn run<T: Send + 'static>(
        &self,
        access: Access,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = Arc::clone(&self.conn);
        let result = tokio::task::spawn_blocking(move || f(&mut conn.lock().expect("store lock")))
            .await
            .map_err(|e| StoreError::new(format!("store task: {e}")))
            .and_then(|result| result);
        match (&result, access) {
            (Err(_), _) => self.healthy.store(false, Ordering::Relaxed),
            (Ok(_), Access::Write) => self.healthy.store(true, Ordering::Relaxed),
            (Ok(_), Access::Read) => {}
        }
        result
    }

    /// Adds operations `from..` to job `job_id`, which no one sees until `create` makes it.
    pub async fn stage(&self, job_id: &str, from: usize, operations: Vec<NewOperation>) -> Result<(), StoreError> {
        let job_id = job_id.to_owned();
        self.run(Access::Write, move |conn| {
            let tx = conn.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO staged (job_id, n, route, path, body, user) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?;
                for (n, op) in (from..).zip(&operations) {
                    insert.execute(params![job_id, n as i64, op.route, op.path, op.body, op.user])?;
                }
            }
            Ok(tx.commit()?)
        })
        .await
    }

    /// Drops what was staged for a job that will not be created.
    pub async fn discard(&self, job_id: &str) -> Result<(), StoreError> {
        let job_id = job_id.to_owned();
        self.run(Access::Write, move |conn| {
            conn.execute("DELETE FROM staged WHERE job_id = ?1", [job_id])?;
            Ok(())
        })
        .await
    }

    /// Makes a job of the operations staged under its id, in one transaction, or finds the job its idempotency key
    /// already made (and drops what was staged).
    pub async fn create(&self, job: NewJob) -> Result<Created, StoreError> {
        self.run(Access::Write, move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if let Some(key) = &job.idempotency_key {
                let existing = tx
                    .query_row(
                        &format!(
                            "SELECT {JOB_COLUMNS}, request_sha256 FROM jobs WHERE app = ?1 AND idempotency_key = ?2"
                        ),
                        params![job.app, key],
                        |row| Ok((job_record(row)?, row.get::<_, Option<String>>(JOB_COLUMN_COUNT)?)),
                    )
                    .optional()?;
                if let Some((record, sha)) = existing {
                    tx.execute("DELETE FROM staged WHERE job_id = ?1", [&job.id])?;
                    tx.commit()?;
                    return Ok(Created::Existing { job: record, same_request: sha == job.request_sha256 });
                }
            }
            let total: i64 =
                tx.query_row("SELECT COUNT(*) FROM staged WHERE job_id = ?1", [&job.id], |row| row.get(0))?;
            tx.execute(
                "INSERT INTO jobs (id, app, state, created_ms, caller, idempotency_key, request_sha256, total, pending,
                     peer)
                 VALUES (?1, ?2, 'queued', ?3, ?4, ?5, ?6, ?7, ?7, ?8)",
                params![
                    job.id,
                    job.app,
                    job.now_ms,
                    job.caller,
                    job.idempotency_key,
                    job.request_sha256,
                    total,
                    job.peer
                ],
            )?;
            let seq = tx.last_insert_rowid();
            tx.execute(
                "INSERT INTO operations (job, n, route, path, body, user, state)
                 SELECT ?1, n, route, path, body, user, 'pending' FROM staged WHERE job_id = ?2",
                params![seq, job.id],
            )?;
            tx.execute("DELETE FROM staged WHERE job_id = ?1", [&job.id])?;
            let record = tx.query_row(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE seq = ?1"), [seq], job_record)?;
            tx.commit()?;
            Ok(Created::New(record))
        })
        .await
    }

    pub async fn job(&self, app: &str, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let (app, id) = (app.to_owned(), id.to_owned());
        self.run(Access::Read, move |conn| {
            Ok(conn
                .query_row(
                    &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE app = ?1 AND id = ?2"),
                    params![app, id],
                    job_record,
                )
                .optional()?)
        })
        .await
    }

    /// A page of a job's operations from index `from`, optionally only those in `state`.
    pub async fn operations(
        &self,
        job: &JobRecord,
        from: i64,
        limit: u32,
        state: Option<OpState>,
    ) -> Result<Vec<OpRecord>, StoreError> {
        let job = job.seq;
        self.run(Access::Read, move |conn| {
            let mut select = conn.prepare_cached(
                "SELECT n, route, path, body, state, attempts, status, error, error_description, finished_ms, history
                 FROM operations WHERE job = ?1 AND n >= ?2 AND (?3 IS NULL OR state = ?3) ORDER BY n LIMIT ?4",
            )?;
            let rows = select.query_map(params![job, from, state.map(OpState::as_str), limit], |row| {
                let body: Option<Vec<u8>> = row.get(3)?;
                let route: String = row.get(1)?;
                Ok(OpRecord {
                    index: row.get(0)?,
                    method: method_of(&route),
                    route,
                    path: row.get(2)?,
                    body: body.and_then(|b| serde_json::from_slice(&b).ok()),
                    state: OpState::parse(&row.get::<_, String>(4)?).unwrap_or(OpState::Pending),
                    attempts: row.get(5)?,
                    status: row.get(6)?,
                    error: row.get(7)?,
                    error_description: row.get(8)?,
                    finished_ms: row.get(9)?,
                    // A damaged history costs the receipt its attempts, not the listing its operation.
                    history: row
                        .get::<_, Option<String>>(10)?
                        .and_then(|history| serde_json::from_str(&history).ok())
                        .unwrap_or_default(),
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// An app's jobs, newest first, from `before` (a job's `seq`, exclusive), optionally only those in `state`.
    pub async fn list(
        &self,
        app: &str,
        state: Option<JobState>,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let app = app.to_owned();
        self.run(Access::Read, move |conn| {
            let mut select = conn.prepare_cached(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE app = ?1 AND (?2 IS NULL OR state = ?2) AND seq < ?3
                 ORDER BY seq DESC LIMIT ?4"
            ))?;
            let rows = select
                .query_map(params![app, state.map(JobState::as_str), before.unwrap_or(i64::MAX), limit], job_record)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Cancels a job: its pending operations are dropped. `None` if there is no such job.
    pub async fn cancel(&self, app: &str, id: &str, now_ms: i64) -> Result<Option<JobRecord>, StoreError> {
        let (app, id) = (app.to_owned(), id.to_owned());
        self.run(Access::Write, move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some(seq) = tx
                .query_row("SELECT seq FROM jobs WHERE app = ?1 AND id = ?2", params![app, id], |row| {
                    row.get::<_, i64>(0)
                })
                .optional()?
            else {
                return Ok(None);
            };
            let dropped = tx.execute(
                "UPDATE operations SET state = 'cancelled', finished_ms = ?2 WHERE job = ?1 AND state = 'pending'",
                params![seq, now_ms],
            )? as i64;
            tx.execute(
                "UPDATE jobs SET cancel_requested = CASE WHEN finished_ms IS NULL THEN 1 ELSE cancel_requested END,
                     pending = pending - ?2, cancelled = cancelled + ?2,
                     state = CASE WHEN pending - ?2 = 0 AND finished_ms IS NULL THEN 'cancelled' ELSE state END,
                     finished_ms = CASE WHEN pending - ?2 = 0 THEN COALESCE(finished_ms, ?3) ELSE finished_ms END
                 WHERE seq = ?1",
                params![seq, dropped, now_ms],
            )?;
            let record = tx.query_row(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE seq = ?1"), [seq], job_record)?;
            tx.commit()?;
            Ok(Some(record))
        })
        .await
    }

    /// Claims up to `limit` operations of each route due at `now_ms` and not claimed already, each route's in
    /// order (the earliest due first, then by job and index).
    pub async fn claim(&self, now_ms: i64, limit: usize) -> Result<Vec<Due>, StoreError> {
        let claimed = Arc::clone(&self.claimed);
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        self.run(Access::Read, move |conn| {
            let mut claimed = claimed.lock().expect("claims lock");
            let mut apps: Vec<String> = conn
                .prepare_cached("SELECT DISTINCT app FROM jobs WHERE state IN ('queued', 'running') ORDER BY app")?
                .query_map([], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            // The apps take turns at being first, so that one app's long job never holds back another's.
            let first = turn % apps.len().max(1);
            apps.rotate_left(first);
            // Enough rows that `limit` of them are not claimed yet, whatever is.
            let rows = (limit + claimed.len()) as i64;
            let mut select = conn.prepare_cached(
                "SELECT o.job, j.id, j.app, j.caller, o.n, o.route, o.path, o.body, o.user, o.attempts
                 FROM operations o JOIN jobs j ON j.seq = o.job
                 WHERE o.state = 'pending' AND o.route = ?1 AND o.not_before_ms <= ?2 AND j.app = ?4
                 ORDER BY o.not_before_ms, o.job, o.n LIMIT ?3",
            )?;
            let mut claims = Vec::new();
            for route in Route::ALL {
                let mut taken = 0;
                for app in &apps {
                    for row in select.query_map(params![route.name(), now_ms, rows, app], due)? {
                        let row = row?;
                        if taken < limit && claimed.insert(row.key()) {
                            taken += 1;
                            claims.push(row);
                        }
                    }
                }
            }
            Ok(claims)
        })
        .await
    }

    /// When the next pending operation falls due after `now_ms`, if one does (those due already are being sent).
    pub async fn next_due(&self, now_ms: i64) -> Result<Option<i64>, StoreError> {
        self.run(Access::Read, move |conn| {
            let mut first = conn.prepare_cached(
                "SELECT MIN(not_before_ms) FROM operations
                 WHERE state = 'pending' AND route = ?1 AND not_before_ms > ?2",
            )?;
            let mut next: Option<i64> = None;
            for route in Route::ALL {
                let at: Option<i64> = first.query_row(params![route.name(), now_ms], |row| row.get(0))?;
                next = match (next, at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            Ok(next)
        })
        .await
    }

    /// Records, before any of its calls go, that jobs may send on `app`'s `route` until `until_ms`. After a
    /// restart the scheduler resumes the lane from it ([`LocalStore::lanes_used`]): a call whose outcome died with
    /// the process is covered too.
    pub async fn use_lane(&self, app: &str, route: &str, until_ms: i64) -> Result<(), StoreError> {
        let (app, route) = (app.to_owned(), route.to_owned());
        self.run(Access::Write, move |conn| {
            conn.prepare_cached(
                "INSERT INTO lanes (app, route, until_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (app, route) DO UPDATE SET until_ms = MAX(until_ms, excluded.until_ms)",
            )?
            .execute(params![app, route, until_ms])?;
            Ok(())
        })
        .await
    }

    /// The lanes jobs have used, each with the end of its last record.
    pub async fn lanes_used(&self) -> Result<Vec<LaneUse>, StoreError> {
        self.run(Access::Read, move |conn| {
            let mut select = conn.prepare_cached("SELECT app, route, until_ms FROM lanes")?;
            let rows = select
                .query_map([], |row| Ok(LaneUse { app: row.get(0)?, route: row.get(1)?, until_ms: row.get(2)? }))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// The calls jobs made for each user since `since_ms` that reached Easemob, with when their outcome was
    /// recorded (just after the call went): what each user's window held before a restart.
    pub async fn users_sent(&self, since_ms: i64) -> Result<Vec<UserUse>, StoreError> {
        self.run(Access::Read, move |conn| {
            let mut select = conn.prepare_cached(
                "SELECT user, finished_ms FROM operations
                 WHERE user IS NOT NULL AND status IS NOT NULL AND finished_ms >= ?1",
            )?;
            let rows = select.query_map([since_ms], |row| Ok(UserUse { user: row.get(0)?, at_ms: row.get(1)? }))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Gives back a claimed operation, due again at `until_ms` if it is still pending.
    pub async fn release(&self, due: &Due, until_ms: i64) -> Result<(), StoreError> {
        let (job, n) = due.key();
        let result = self
            .run(Access::Write, move |conn| {
                conn.prepare_cached(
                    "UPDATE operations SET not_before_ms = ?3 WHERE job = ?1 AND n = ?2 AND state = 'pending'",
                )?
                .execute(params![job, n, until_ms])?;
                Ok(())
            })
            .await;
        self.claimed.lock().expect("claims lock").remove(&(job, n));
        result
    }

    /// Whether the job was cancelled.
    pub async fn is_cancelled(&self, job_id: &str) -> Result<bool, StoreError> {
        let id = job_id.to_owned();
        self.run(Access::Read, move |conn| {
            let flag: Option<bool> = conn
                .query_row("SELECT cancel_requested = 1 FROM jobs WHERE id = ?1", [id], |row| row.get(0))
                .optional()?;
            Ok(flag.unwrap_or(false))
        })
        .await
    }

    /// Records outcomes in one transaction, and finishes the jobs whose last operation this was; returns how long
    /// each job finished here took, from acceptance (ms). An operation cancelled while in flight gets its outcome
    /// all the same (it was sent).
    pub async fn record(&self, outcomes: Vec<Outcome>, now_ms: i64) -> Result<Vec<i64>, StoreError> {
        let keys: Vec<(i64, i64)> = outcomes.iter().map(|o| (o.job, o.n)).collect();
        let recorded = self
            .run(Access::Write, move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let mut finished = Vec::new();
                for o in &outcomes {
                    let note = o.note.as_ref().map(|note| serde_json::to_string(note).expect("a note serializes"));
                    let Some(was) = tx
                        .query_row(
                            "SELECT state FROM operations WHERE job = ?1 AND n = ?2",
                            params![o.job, o.n],
                            |row| row.get::<_, String>(0),
                        )
                        .optional()?
                        .and_then(|s| OpState::parse(&s))
                    else {
                        continue; // the job expired meanwhile
                    };
                    match o.next {
                        Next::RetryAt(at) => {
                            tx.execute(
                                "UPDATE operations SET attempts = ?3, not_before_ms = ?4, status = ?5, error = ?6,
                                 error_description = ?7,
                                 history = iif(?8 IS NULL, history, json_insert(coalesce(history, '[]'), '$[#]', json(?8)))
                             WHERE job = ?1 AND n = ?2 AND state IN ('pending', 'cancelled') AND attempts < ?3",
                                params![o.job, o.n, o.attempts, at, o.status, o.error, o.error_description, note],
                            )?;
                        }
                        Next::Done(state) => {
                            let from = match was {
                                OpState::Pending => "pending",
                                OpState::Cancelled => "cancelled",
                                OpState::Succeeded | OpState::Failed => continue, // recorded before
                            };
                            tx.execute(
                                "UPDATE operations SET state = ?3, attempts = ?4, status = ?5, error = ?6,
                                 error_description = ?7, finished_ms = ?8,
                                 history = iif(?9 IS NULL, history, json_insert(coalesce(history, '[]'), '$[#]', json(?9)))
                             WHERE job = ?1 AND n = ?2",
                                params![
                                    o.job,
                                    o.n,
                                    state.as_str(),
                                    o.attempts,
                                    o.status,
                                    o.error,
                                    o.error_description,
                                    now_ms,
                                    note
                                ],
                            )?;
                            let to = state.as_str();
                            tx.execute(
                                &format!("UPDATE jobs SET {from} = {from} - 1, {to} = {to} + 1 WHERE seq = ?1"),
                                [o.job],
                            )?;
                        }
                    }
                    let open: bool =
                        tx.query_row("SELECT finished_ms IS NULL FROM jobs WHERE seq = ?1", [o.job], |row| row.get(0))?;
                    tx.execute(
                        "UPDATE jobs SET
                         state = CASE
                             WHEN pending > 0 THEN 'running'
                             WHEN cancel_requested = 1 THEN 'cancelled'
                             WHEN failed > 0 THEN 'failed'
                             ELSE 'done' END,
                         finished_ms = CASE WHEN pending = 0 THEN COALESCE(finished_ms, ?2) ELSE NULL END
                     WHERE seq = ?1",
                        params![o.job, now_ms],
                    )?;
                    if open {
                        let took: Option<i64> =
                            tx.query_row("SELECT finished_ms - created_ms FROM jobs WHERE seq = ?1", [o.job], |row| {
                                row.get(0)
                            })?;
                        finished.extend(took);
                    }
                }
                tx.commit()?;
                Ok(finished)
            })
            .await;
        if recorded.is_ok() {
            let mut claimed = self.claimed.lock().expect("claims lock");
            for key in &keys {
                claimed.remove(key);
            }
        }
        recorded
    }

    /// Pending operations of a job by route, and by user (for the estimate).
    pub async fn remaining(&self, job: &JobRecord) -> Result<Remaining, StoreError> {
        let job = job.seq;
        self.run(Access::Read, move |conn| {
            let mut by_route = conn.prepare_cached(
                "SELECT route, COUNT(*) FROM operations WHERE job = ?1 AND state = 'pending' GROUP BY route",
            )?;
            let by_route = by_route
                .query_map([job], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            let mut by_user = conn.prepare_cached(
                "SELECT user, COUNT(*) FROM operations WHERE job = ?1 AND state = 'pending' AND user IS NOT NULL
                 GROUP BY user",
            )?;
            let by_user = by_user
                .query_map([job], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Remaining { by_route, by_user })
        })
        .await
    }

    /// Jobs by state and operations still pending, for the metrics.
    pub async fn totals(&self) -> Result<Totals, StoreError> {
        self.run(Access::Read, |conn| {
            let mut by_state = conn.prepare_cached("SELECT state, COUNT(*) FROM jobs GROUP BY state")?;
            let jobs = by_state
                .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)))?
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .filter_map(|(state, n)| Some((JobState::parse(&state)?, n)))
                .collect();
            let (pending, oldest_ms) = conn.query_row(
                "SELECT COUNT(*), MIN(j.created_ms) FROM operations o JOIN jobs j ON j.seq = o.job
                 WHERE o.state = 'pending'",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )?;
            Ok(Totals { jobs, pending, oldest_ms })
        })
        .await
    }

    /// Deletes jobs finished before `before_ms`, with their operations; returns how many.
    pub async fn expire(&self, before_ms: i64) -> Result<usize, StoreError> {
        self.run(Access::Write, move |conn| {
            Ok(conn.execute("DELETE FROM jobs WHERE finished_ms IS NOT NULL AND finished_ms < ?1", [before_ms])?)
        })
        .await
    }
}

/// Adds the columns of `ADDED_COLUMNS` that the file's tables lack (it was made by an earlier version).
fn add_missing_columns(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for (table, column, kind) in ADDED_COLUMNS {
        let present: bool = tx.query_row(
            "SELECT COUNT(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
            params![table, column],
            |row| row.get(0),
        )?;
        if !present {
            tx.execute(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"), [])?;
        }
    }
    Ok(tx.commit()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::records::{AttemptNote, Counts};

    #[test]
    fn the_job_states_are_the_ones_the_metrics_export_from_the_start() {
        assert_eq!(JobState::ALL.map(JobState::as_str), crate::metrics::JOB_STATES);
    }

    fn op(user: Option<&str>) -> NewOperation {
        NewOperation {
            route: "clear_user_messages",
            path: "/rest/message/roaming/user/u/delete/all".to_owned(),
            body: None,
            user: user.map(str::to_owned),
        }
    }

    /// A job of `ops` operations, as the jobs API makes it: staged, then created.
    fn job(id: &str, key: Option<&str>, ops: usize) -> (NewJob, Vec<NewOperation>) {
        let new = NewJob {
            id: id.to_owned(),
            app: "o#a".to_owned(),
            caller: None,
            idempotency_key: key.map(str::to_owned),
            request_sha256: Some("h".to_owned()),
            peer: None,
            now_ms: 1_000,
        };
        (new, (0..ops).map(|_| op(None)).collect())
    }

    async fn create(store: &LocalStore, (new, ops): (NewJob, Vec<NewOperation>)) -> Result<Created, StoreError> {
        store.stage(&new.id, 0, ops).await?;
        store.create(new).await
    }

    fn done(job: i64, n: i64, state: OpState) -> Outcome {
        Outcome {
            job,
            app: "o#a".to_owned(),
            job_id: String::new(),
            n,
            attempts: 1,
            status: Some(200),
            error: None,
            error_description: None,
            next: Next::Done(state),
            note: None,
        }
    }

    #[tokio::test]
    async fn a_job_runs_to_done_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let store = LocalStore::open(&path).unwrap();
        let Created::New(record) = create(&store, job("j1", None, 3)).await.unwrap() else { panic!("new") };
        assert_eq!((record.state, record.counts.pending), (JobState::Queued, 3));
        let due = store.claim(1_000, 10).await.unwrap();
        assert_eq!(due.len(), 3);
        store.record(vec![done(record.seq, 0, OpState::Succeeded)], 2_000).await.unwrap();
        drop(store);

        let store = LocalStore::open(&path).unwrap();
        let running = store.job("o#a", "j1").await.unwrap().unwrap();
        assert_eq!((running.state, running.counts.succeeded, running.counts.pending), (JobState::Running, 1, 2));
        let outcomes = vec![done(running.seq, 1, OpState::Succeeded), done(running.seq, 2, OpState::Failed)];
        store.record(outcomes.clone(), 3_000).await.unwrap();
        store.record(outcomes, 3_500).await.unwrap(); // recorded twice (a replay after a crash): counted once
        let finished = store.job("o#a", "j1").await.unwrap().unwrap();
        assert_eq!((finished.state, finished.finished_ms), (JobState::Failed, Some(3_000)));
        assert_eq!(finished.counts, Counts { total: 3, pending: 0, succeeded: 2, failed: 1, cancelled: 0 });
        assert!(store.claim(10_000, 10).await.unwrap().is_empty());
        assert_eq!(store.expire(3_001).await.unwrap(), 1);
        assert!(store.job("o#a", "j1").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn an_idempotency_key_returns_the_first_job() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&dir.path().join("jobs.db")).unwrap();
        assert!(matches!(create(&store, job("j1", Some("k"), 1)).await.unwrap(), Created::New(_)));
        let Created::Existing { job: first, same_request } = create(&store, job("j2", Some("k"), 1)).await.unwrap()
        else {
            panic!("existing")
        };
        assert_eq!((first.id.as_str(), same_request), ("j1", true));
        let mut different = job("j3", Some("k"), 1);
        different.0.request_sha256 = Some("other".to_owned());
        assert!(matches!(create(&store, different).await.unwrap(), Created::Existing { same_request: false, .. }));
    }

    #[tokio::test]
    async fn cancel_drops_what_is_pending_and_an_operation_in_flight_still_records_its_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&dir.path().join("jobs.db")).unwrap();
        let Created::New(record) = create(&store, job("j1", None, 3)).await.unwrap() else { panic!("new") };
        let cancelled = store.cancel("o#a", "j1", 2_000).await.unwrap().unwrap();
        assert_eq!((cancelled.state, cancelled.counts.cancelled), (JobState::Cancelled, 3));
        // Operation 0 was in flight: its outcome arrives after the cancel.
        store.record(vec![done(record.seq, 0, OpState::Succeeded)], 2_500).await.unwrap();
        let after = store.job("o#a", "j1").await.unwrap().unwrap();
        assert_eq!(after.state, JobState::Cancelled);
        assert_eq!((after.counts.succeeded, after.counts.cancelled), (1, 2));
        assert!(store.cancel("o#a", "nope", 0).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_full_disk_refuses_new_work_and_keeps_the_store_unhealthy_until_a_write_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&dir.path().join("jobs.db")).unwrap();
        let pages: i64 = store.conn.lock().unwrap().query_row("PRAGMA page_count", [], |row| row.get(0)).unwrap();
        store.conn.lock().unwrap().query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(())).unwrap();
        let full = create(&store, job("j1", None, 5_000)).await.unwrap_err();
        assert!(full.to_string().contains("full"), "{full}");
        assert!(!store.is_healthy());
        assert!(store.job("o#a", "j1").await.unwrap().is_none(), "nothing half-stored");
        assert!(!store.is_healthy(), "a read does not make a full store healthy");
        store.conn.lock().unwrap().query_row("PRAGMA max_page_count = 1000000", [], |_| Ok(())).unwrap();
        assert!(matches!(create(&store, job("j2", None, 1)).await.unwrap(), Created::New(_)));
        assert!(store.is_healthy());
    }

    #[tokio::test]
    async fn a_lanes_use_is_only_moved_forward_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let store = LocalStore::open(&path).unwrap();
        store.use_lane("o#a", "delete_conversation", 5_000).await.unwrap();
        store.use_lane("o#a", "delete_conversation", 4_000).await.unwrap();
        store.use_lane("o#a", "clear_user_messages", 3_000).await.unwrap();
        drop(store);
        let mut used = LocalStore::open(&path).unwrap().lanes_used().await.unwrap();
        used.sort_by_key(|lane| lane.until_ms);
        let lane = |route: &str, until_ms| LaneUse { app: "o#a".to_owned(), route: route.to_owned(), until_ms };
        assert_eq!(used, [lane("clear_user_messages", 3_000), lane("delete_conversation", 5_000)]);
    }

    #[tokio::test]
    async fn a_retry_waits_and_a_postponed_user_is_not_due() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&dir.path().join("jobs.db")).unwrap();
        let mut new = job("j1", None, 0);
        new.1 = vec![op(Some("o#a/ann")), op(Some("o#a/bob"))];
        let Created::New(record) = create(&store, new).await.unwrap() else { panic!("new") };
        // Ann's window is full: her operation is given back until it frees; Bob's is given back due now.
        for due in store.claim(1_000, 10).await.unwrap() {
            let until_ms = if due.user.as_deref() == Some("o#a/ann") { 5_000 } else { 1_000 };
            store.release(&due, until_ms).await.unwrap();
        }
        let due: Vec<i64> = store.claim(1_000, 10).await.unwrap().iter().map(|d| d.n).collect();
        assert_eq!(due, [1]);
        let retry = Outcome {
            job: record.seq,
            app: "o#a".to_owned(),
            job_id: "j1".to_owned(),
            n: 1,
            attempts: 1,
            status: Some(503),
            error: Some("service_unavailable".to_owned()),
            error_description: None,
            next: Next::RetryAt(7_000),
            note: None,
        };
        store.record(vec![retry], 1_500).await.unwrap();
        assert_eq!(store.next_due(1_500).await.unwrap(), Some(5_000));
        assert_eq!(store.next_due(6_000).await.unwrap(), Some(7_000), "what is due already is not next");
        let due: Vec<(i64, u32)> = store.claim(7_000, 10).await.unwrap().iter().map(|d| (d.n, d.attempts)).collect();
        assert_eq!(due, [(0, 0), (1, 1)]);
        assert_eq!(store.job("o#a", "j1").await.unwrap().unwrap().state, JobState::Running);
    }

    /// The tables of jobs and operations as the version before attempt histories made them.
    const SCHEMA_BEFORE_HISTORIES: &str = "
        CREATE TABLE jobs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, app TEXT NOT NULL, state TEXT NOT NULL,
            cancel_requested INTEGER NOT NULL DEFAULT 0, created_ms INTEGER NOT NULL, finished_ms INTEGER,
            caller TEXT, idempotency_key TEXT, request_sha256 TEXT, total INTEGER NOT NULL, pending INTEGER NOT NULL,
            succeeded INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
            cancelled INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE operations (
            job INTEGER NOT NULL REFERENCES jobs(seq) ON DELETE CASCADE, n INTEGER NOT NULL, route TEXT NOT NULL,
            path TEXT NOT NULL, body BLOB, user TEXT, state TEXT NOT NULL, not_before_ms INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0, status INTEGER, error TEXT, error_description TEXT,
            finished_ms INTEGER, PRIMARY KEY (job, n)
        ) WITHOUT ROWID;";

    #[tokio::test]
    async fn a_file_made_before_attempt_histories_gets_them_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        {
            let old = Connection::open(&path).unwrap();
            old.execute_batch(SCHEMA_BEFORE_HISTORIES).unwrap();
            old.execute_batch(
                "INSERT INTO jobs (id, app, state, created_ms, caller, total, pending)
                     VALUES ('j1', 'o#a', 'queued', 1000, 'ops', 1, 1);
                 INSERT INTO operations (job, n, route, path, state)
                     VALUES (1, 0, 'clear_user_messages', '/rest/message/roaming/user/u/delete/all', 'pending');",
            )
            .unwrap();
        }
        let store = LocalStore::open(&path).unwrap();
        let job = store.job("o#a", "j1").await.unwrap().unwrap();
        assert_eq!((job.state, job.caller.as_deref(), job.peer.as_deref()), (JobState::Queued, Some("ops"), None));
        assert!(store.operations(&job, 0, 10, None).await.unwrap()[0].history.is_empty());

        let note = |at_ms| AttemptNote { at_ms, status: Some(503), replica: "r1".to_owned(), ..Default::default() };
        let due = store.claim(1_000, 10).await.unwrap();
        let retry = Outcome {
            next: Next::RetryAt(2_000),
            note: Some(note(1_000)),
            ..done(job.seq, due[0].n, OpState::Pending)
        };
        store.record(vec![retry], 1_000).await.unwrap();
        drop(store);
        // Opened again: the columns are there already.
        let store = LocalStore::open(&path).unwrap();
        let due = store.claim(2_000, 10).await.unwrap();
        let last = Outcome { note: Some(note(2_000)), ..done(job.seq, due[0].n, OpState::Succeeded) };
        store.record(vec![last], 2_000).await.unwrap();
        let done_job = store.job("o#a", "j1").await.unwrap().unwrap();
        assert_eq!(done_job.state, JobState::Done);
        let history = &store.operations(&done_job, 0, 10, None).await.unwrap()[0].history;
        assert_eq!(history, &[note(1_000), note(2_000)]);
    }
}
