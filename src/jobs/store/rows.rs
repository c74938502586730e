//! The embedded store's rows as Rust reads them: a job, and a claimed operation.

use rusqlite::Row;

use crate::jobs::records::{Counts, Due, JobRecord, JobState};

pub(super) const JOB_COLUMNS: &str = "seq, id, app, state, created_ms, finished_ms, caller, idempotency_key, total, pending, \
                           succeeded, failed, cancelled, peer";
/// How many columns `JOB_COLUMNS` names: the index of one selected after them.
pub(super) const JOB_COLUMN_COUNT: usize = 14;

/// A claimed operation, from the claim's row.
pub(super) fn due(row: &Row<'_>) -> rusqlite::Result<Due> {
    Ok(Due {
        job: row.get(0)?,
        job_id: row.get(1)?,
        app: row.get(2)?,
        caller: row.get(3)?,
        n: row.get(4)?,
        route: row.get(5)?,
        path: row.get(6)?,
        body: row.get(7)?,
        user: row.get(8)?,
        attempts: row.get(9)?,
    })
}

pub(super) fn job_record(row: &Row<'_>) -> rusqlite::Result<JobRecord> {
    Ok(JobRecord {
        seq: row.get(0)?,
        id: row.get(1)?,
        app: row.get(2)?,
        state: JobState::parse(&row.get::<_, String>(3)?).unwrap_or(JobState::Queued),
        created_ms: row.get(4)?,
        finished_ms: row.get(5)?,
        caller: row.get(6)?,
        idempotency_key: row.get(7)?,
        peer: row.get(13)?,
        counts: Counts {
            total: row.get(8)?,
            pending: row.get(9)?,
            succeeded: row.get(10)?,
            failed: row.get(11)?,
            cancelled: row.get(12)?,
        },
    })
}
