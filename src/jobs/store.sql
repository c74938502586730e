-- The jobs' embedded store (src/jobs/store.rs): created on first open, kept as it is after (a column added since
-- the first version is also added to an older file when it is opened: `ADDED_COLUMNS` in store.rs).
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    app TEXT NOT NULL,
    state TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    finished_ms INTEGER,
    caller TEXT,
    idempotency_key TEXT,
    request_sha256 TEXT,
    total INTEGER NOT NULL,
    pending INTEGER NOT NULL,
    succeeded INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    cancelled INTEGER NOT NULL DEFAULT 0,
    -- The address of the client that created the job.
    peer TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs(app, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_by_app ON jobs(app, seq);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished_ms) WHERE finished_ms IS NOT NULL;
CREATE TABLE IF NOT EXISTS operations (
    job INTEGER NOT NULL REFERENCES jobs(seq) ON DELETE CASCADE,
    n INTEGER NOT NULL,
    route TEXT NOT NULL,
    path TEXT NOT NULL,
    body BLOB,
    user TEXT,
    state TEXT NOT NULL,
    not_before_ms INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    status INTEGER,
    error TEXT,
    error_description TEXT,
    finished_ms INTEGER,
    -- Its attempts, oldest first: a JSON array of notes (`AttemptNote`), NULL before the first.
    history TEXT,
    PRIMARY KEY (job, n)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS operations_due_by_route ON operations(route, not_before_ms, job, n) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS operations_by_user ON operations(user) WHERE state = 'pending' AND user IS NOT NULL;
CREATE TABLE IF NOT EXISTS staged (
    job_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    route TEXT NOT NULL,
    path TEXT NOT NULL,
    body BLOB,
    user TEXT,
    PRIMARY KEY (job_id, n)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS lanes (
    app TEXT NOT NULL,
    route TEXT NOT NULL,
    until_ms INTEGER NOT NULL,
    PRIMARY KEY (app, route)
) WITHOUT ROWID;
