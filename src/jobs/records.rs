//! What the jobs' stores keep and hand out: jobs, their operations, claims and outcomes, in the same terms on
//! every backend (`jobs/store.rs`, SQLite; `jobs/shared.rs`, Redis).

use crate::routes::Route;

/// Why the store could not do what was asked: the disk is full or read-only, the file is damaged, …
#[derive(Debug, thiserror::Error)]
#[error("jobs store: {0}")]
pub struct StoreError(String);

impl StoreError {
    pub fn new(message: String) -> StoreError {
        StoreError(message)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Nothing attempted yet.
    Queued,
    Running,
    /// Every operation succeeded.
    Done,
    /// Every operation finished, at least one failed.
    Failed,
    /// Cancelled: what had not been sent was dropped.
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] =
        [JobState::Queued, JobState::Running, JobState::Done, JobState::Failed, JobState::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|state| state.as_str() == s)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OpState {
    Pending,
    Succeeded,
    Failed,
    Cancelled,
}

impl OpState {
    pub const ALL: [OpState; 4] = [OpState::Pending, OpState::Succeeded, OpState::Failed, OpState::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            OpState::Pending => "pending",
            OpState::Succeeded => "succeeded",
            OpState::Failed => "failed",
            OpState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<OpState> {
        OpState::ALL.into_iter().find(|state| state.as_str() == s)
    }
}

/// A job to create from the operations staged under its id (validated as they were read).
pub struct NewJob {
    pub id: String,
    pub app: String,
    pub caller: Option<String>,
    pub idempotency_key: Option<String>,
    /// What the create request said, to tell a retried create from a different one under the same key.
    pub request_sha256: Option<String>,
    /// The address of the client that created it, e.g. "127.0.0.1".
    pub peer: Option<String>,
    pub now_ms: i64,
}

/// One operation as Easemob will receive it: the canonical path and query under `/{org}/{app}`, and the body.
#[derive(Debug)]
pub struct NewOperation {
    pub route: &'static str,
    pub path: String,
    pub body: Option<Vec<u8>>,
    /// The user whose per-user limit it counts against (`delete_conversation`), lower-cased.
    pub user: Option<String>,
}

#[derive(Debug)]
pub enum Created {
    New(JobRecord),
    /// The idempotency key was used before: that job, and whether the request was the same.
    Existing {
        job: JobRecord,
        same_request: bool,
    },
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct JobRecord {
    #[serde(skip)]
    pub seq: i64,
    pub id: String,
    pub app: String,
    pub state: JobState,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The address of the client that created it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    pub counts: Counts,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub total: i64,
    pub pending: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub cancelled: i64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct OpRecord {
    pub index: i64,
    pub route: String,
    /// With `path` and `body`, the operation as it can be submitted again.
    pub method: &'static str,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
    pub state: OpState,
    pub attempts: u32,
    /// Easemob's (or the gateway's) status of the last attempt.
    pub status: Option<u16>,
    pub error: Option<String>,
    pub error_description: Option<String>,
    pub finished_ms: Option<i64>,
    /// Its attempts, oldest first: the receipt lists them, the listing of operations does not.
    #[serde(skip)]
    pub history: Vec<AttemptNote>,
}

/// One attempt at an operation, as its receipt lists it: when it went, what came back, and where its audit events are.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AttemptNote {
    /// Which of the scheduler's attempts at the operation it is (1, 2, …), as its audit events' `job_attempt` says.
    #[serde(default)]
    pub attempt: u32,
    /// When it was sent (ms since the Unix epoch).
    pub at_ms: i64,
    /// Easemob's status, or the gateway's own when Easemob was not reached or its answer was lost.
    pub status: Option<u16>,
    /// Easemob's request id, when its answer carried one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub easemob_request_id: Option<String>,
    /// The `timestamp` of Easemob's answer (ms), when it carried one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub easemob_timestamp: Option<i64>,
    /// The replica that sent it: the one whose audit chain holds its events.
    pub replica: String,
    /// Its events' sequence numbers in that replica's audit chain (empty: audit is off, or it never reached Easemob).
    #[serde(default)]
    pub audit_seqs: Vec<u64>,
}

/// An operation that may run now.
#[derive(Clone, Debug)]
pub struct Due {
    pub job: i64,
    pub job_id: String,
    pub app: String,
    pub caller: Option<String>,
    pub n: i64,
    pub route: String,
    pub path: String,
    pub body: Option<Vec<u8>>,
    pub user: Option<String>,
    pub attempts: u32,
}

impl Due {
    pub fn key(&self) -> (i64, i64) {
        (self.job, self.n)
    }
}

/// What became of one attempt at an operation.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub job: i64,
    /// The job's AppKey: a shared store keeps an app's jobs under keys of its own.
    pub app: String,
    pub job_id: String,
    pub n: i64,
    pub attempts: u32,
    pub status: Option<u16>,
    pub error: Option<String>,
    pub error_description: Option<String>,
    pub next: Next,
    /// The attempt this is the outcome of, for the operation's history; none when nothing was attempted (the
    /// operation failed before it could be sent).
    pub note: Option<AttemptNote>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Final: succeeded or failed.
    Done(OpState),
    /// Try again at this time.
    RetryAt(i64),
}

/// A job's pending operations by route, and by user (their per-user limit's key) among them.
pub struct Remaining {
    pub by_route: Vec<(String, i64)>,
    pub by_user: Vec<(String, i64)>,
}

/// A lane jobs may have sent on until `until_ms`: no call of theirs went on it later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaneUse {
    pub app: String,
    pub route: String,
    pub until_ms: i64,
}

/// A call a job made for a user (their key, `app/user`), at `at_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserUse {
    pub user: String,
    pub at_ms: i64,
}

pub struct Totals {
    pub jobs: Vec<(JobState, i64)>,
    pub pending: i64,
    /// When the job of the oldest pending operation was accepted.
    pub oldest_ms: Option<i64>,
}

/// The method of a stored operation's route, for submitting it again.
pub fn method_of(route: &str) -> &'static str {
    match Route::named(route).map(Route::method) {
        Some(http::Method::POST) => "POST",
        _ => "DELETE",
    }
}
