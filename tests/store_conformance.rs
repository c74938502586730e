//! The job queue's contract (`src/jobs/queue.rs`), one suite run against each store: the SQLite file of one
//! process, a real redis-server on 127.0.0.1 (a free port) shared by replicas, and a real Redis Cluster of three
//! masters with a replica each (one cluster for the whole suite, each test under a key prefix of its own). A
//! behaviour that differs between them fails here. A crash is the holder of the store gone without a word: with SQLite the next process
//! opens the same file; with Redis another replica takes over what the first held once its lease has passed.

// The end-to-end tests' harness, for its redis-server; the rest of it is not used here.
#[path = "gateway/support.rs"]
#[allow(dead_code, unused_imports)]
mod support;
// The cluster's harness; killing a master is the end-to-end tests' concern.
#[path = "gateway/redis_cluster.rs"]
#[allow(dead_code)]
mod redis_cluster;

use std::sync::Arc;
use std::time::Duration;

use easemob_gateway::config::RedisConfig;
use easemob_gateway::jobs::Store;
use easemob_gateway::jobs::records::{
    AttemptNote, Counts, Created, Due, JobRecord, JobState, LaneUse, NewJob, NewOperation, Next, OpRecord, OpState,
    Outcome,
};
use easemob_gateway::jobs::shared::SharedStore;
use easemob_gateway::jobs::store::LocalStore;
use easemob_gateway::redis_conn::{self, Patience};

/// The lease of a Redis claim here: short, so that a take-over after a crash is quick to test.
const LEASE: Duration = Duration::from_millis(200);

enum Keeper {
    Sqlite(tempfile::TempDir),
    /// The store's Redis: the redis-server the backend started (kept running while it lives), or a cluster its
    /// test holds.
    Redis {
        _server: Option<Box<support::Redis>>,
        config: RedisConfig,
    },
}

struct Backend {
    keeper: Keeper,
    store: Store,
}

impl Backend {
    async fn sqlite() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::open(&dir.path().join("jobs.db")).unwrap());
        Backend { keeper: Keeper::Sqlite(dir), store }
    }

    async fn redis() -> Backend {
        let redis = support::Redis::start().await;
        let config = RedisConfig { url: redis.url(), ..RedisConfig::default() };
        Backend::on_redis(Some(Box::new(redis)), config)
    }

    /// On a cluster the caller holds, under `key_prefix`.
    fn cluster(cluster: &redis_cluster::RedisCluster, key_prefix: &str) -> Backend {
        let config =
            RedisConfig { url: cluster.url(), cluster: true, key_prefix: key_prefix.to_owned(), ..Default::default() };
        Backend::on_redis(None, config)
    }

    fn on_redis(server: Option<Box<support::Redis>>, config: RedisConfig) -> Backend {
        let config = RedisConfig { timeout: Duration::from_secs(5), ..config };
        let store = shared(&config);
        Backend { keeper: Keeper::Redis { _server: server, config }, store }
    }

    /// The process holding the store dies at once, and another takes its place: whatever the first held and did
    /// not record or release is due again for it (with Redis once the lease has passed, at the next reap).
    async fn crash(&mut self) {
        self.store = match &self.keeper {
            Keeper::Sqlite(dir) => Arc::new(LocalStore::open(&dir.path().join("jobs.db")).unwrap()),
            Keeper::Redis { config, .. } => {
                tokio::time::sleep(LEASE * 2).await;
                shared(config)
            }
        };
        self.store.reap().await.unwrap();
    }

    /// What the store keeps for good of a job's staged operations: SQLite's rows of them, or Redis keys of the job
    /// that will not expire.
    async fn kept_for_good(&self, job_id: &str) -> usize {
        match &self.keeper {
            Keeper::Sqlite(dir) => {
                let db = rusqlite::Connection::open(dir.path().join("jobs.db")).unwrap();
                db.query_row("SELECT COUNT(*) FROM staged WHERE job_id = ?1", [job_id], |row| row.get::<_, i64>(0))
                    .unwrap() as usize
            }
            Keeper::Redis { config, .. } => {
                let patience = Patience {
                    connect: config.timeout,
                    response: config.timeout,
                    retries: 1,
                    max_delay: config.timeout,
                };
                let mut conn = redis_conn::connect(config, patience).unwrap();
                let pattern = format!("{}:*:{job_id}*", config.key_prefix);
                let keys: Vec<String> = ::redis::cmd("KEYS").arg(pattern).query_async(&mut conn).await.unwrap();
                let mut kept = 0;
                for key in keys {
                    let ttl: i64 = ::redis::cmd("PTTL").arg(&key).query_async(&mut conn).await.unwrap();
                    kept += usize::from(ttl == -1);
                }
                kept
            }
        }
    }
}

fn shared(config: &RedisConfig) -> Store {
    Arc::new(SharedStore::new(config, LEASE).unwrap())
}

fn op(route: &'static str, user: Option<&str>) -> NewOperation {
    let path = match route {
        "delete_conversation" => format!("/users/{}/user_channel", user.unwrap_or("u")),
        _ => "/rest/message/roaming/user/u/delete/all".to_owned(),
    };
    NewOperation { route, path, body: None, user: user.map(|u| format!("o#a/{u}")) }
}

fn clears(n: usize) -> Vec<NewOperation> {
    (0..n).map(|_| op("clear_user_messages", None)).collect()
}

/// A job and its operations, to stage and create as the jobs API does.
fn job(id: &str, key: Option<&str>, operations: Vec<NewOperation>) -> (NewJob, Vec<NewOperation>) {
    let new = NewJob {
        id: id.to_owned(),
        app: "o#a".to_owned(),
        caller: Some("ops".to_owned()),
        idempotency_key: key.map(str::to_owned),
        request_sha256: Some("h".to_owned()),
        peer: Some("127.0.0.1:50312".to_owned()),
        now_ms: 1_000,
    };
    (new, operations)
}

async fn submit(store: &Store, (new, operations): (NewJob, Vec<NewOperation>)) -> Created {
    store.stage(&new.app, &new.id, 0, operations).await.unwrap();
    store.create(new).await.unwrap()
}

async fn create(store: &Store, new: (NewJob, Vec<NewOperation>)) -> JobRecord {
    match submit(store, new).await {
        Created::New(job) => job,
        Created::Existing { .. } => panic!("a new job"),
    }
}

fn outcome(due: &Due, next: Next) -> Outcome {
    Outcome {
        job: due.job,
        app: due.app.clone(),
        job_id: due.job_id.clone(),
        n: due.n,
        attempts: due.attempts + 1,
        status: Some(if next == Next::Done(OpState::Succeeded) { 200 } else { 503 }),
        error: None,
        error_description: None,
        next,
        note: None,
    }
}

/// An attempt that reached Easemob, sent by `replica` at `at_ms`, with two audit events.
fn answered(at_ms: i64, status: u16, replica: &str, audit_seqs: [u64; 2]) -> AttemptNote {
    AttemptNote {
        attempt: 1,
        at_ms,
        status: Some(status),
        easemob_request_id: Some(format!("req-{at_ms}")),
        easemob_timestamp: Some(1_765_000_000_000 + at_ms),
        replica: replica.to_owned(),
        audit_seqs: audit_seqs.to_vec(),
    }
}

/// `outcome` with the note of its attempt.
fn noted(due: &Due, next: Next, note: AttemptNote) -> Outcome {
    Outcome { note: Some(note), ..outcome(due, next) }
}

/// The indexes of what a claim returned, in order.
fn indexes(claimed: &[Due]) -> Vec<i64> {
    let mut n: Vec<i64> = claimed.iter().map(|due| due.n).collect();
    n.sort();
    n
}

async fn a_job_runs_to_its_end_and_an_outcome_counts_once(b: &mut Backend) {
    let created = create(&b.store, job("j1", None, clears(3))).await;
    assert_eq!((created.state, created.counts.pending, created.caller.as_deref()), (JobState::Queued, 3, Some("ops")));
    let claimed = b.store.claim(1_000, 10).await.unwrap();
    assert_eq!(indexes(&claimed), [0, 1, 2]);
    assert_eq!((claimed[0].app.as_str(), claimed[0].caller.as_deref()), ("o#a", Some("ops")));
    assert!(b.store.claim(1_000, 10).await.unwrap().is_empty(), "a claimed operation is held");

    let [first, second, third] = <[Due; 3]>::try_from(claimed).unwrap();
    b.store.record(vec![outcome(&first, Next::Done(OpState::Succeeded))], 2_000).await.unwrap();
    b.store.record(vec![outcome(&second, Next::Done(OpState::Failed))], 2_000).await.unwrap();
    b.store.record(vec![outcome(&third, Next::RetryAt(5_000))], 2_000).await.unwrap();
    let running = b.store.job("o#a", "j1").await.unwrap().unwrap();
    assert_eq!(running.state, JobState::Running);
    assert_eq!(b.store.next_due(2_000).await.unwrap(), Some(5_000));
    assert!(b.store.claim(4_999, 10).await.unwrap().is_empty(), "a retry waits for its time");

    let retry = b.store.claim(5_000, 10).await.unwrap();
    assert_eq!(retry.iter().map(|due| (due.n, due.attempts)).collect::<Vec<_>>(), [(2, 1)]);
    let last = vec![outcome(&retry[0], Next::Done(OpState::Succeeded))];
    assert_eq!(b.store.record(last.clone(), 6_000).await.unwrap(), [5_000], "the job took 5 s from acceptance");
    assert!(b.store.record(last, 7_000).await.unwrap().is_empty(), "a replay finishes nothing again");
    let done = b.store.job("o#a", "j1").await.unwrap().unwrap();
    assert_eq!((done.state, done.finished_ms), (JobState::Failed, Some(6_000)));
    assert_eq!(done.counts, Counts { total: 3, pending: 0, succeeded: 2, failed: 1, cancelled: 0 });
    assert_eq!(b.store.next_due(0).await.unwrap(), None);

    let totals = b.store.totals().await.unwrap();
    assert_eq!((totals.pending, totals.oldest_ms), (0, None));
    assert!(totals.jobs.contains(&(JobState::Failed, 1)), "{:?}", totals.jobs);
    assert_eq!(b.store.expire(6_000).await.unwrap(), 0, "finished at 6 s, not before");
    assert_eq!(b.store.expire(6_001).await.unwrap(), 1);
    assert!(b.store.job("o#a", "j1").await.unwrap().is_none());
}

async fn an_operations_history_keeps_each_attempt_it_recorded_once(b: &mut Backend) {
    let created = create(&b.store, job("j1", None, clears(1))).await;
    let given_back = b.store.claim(1_000, 10).await.unwrap();
    b.store.release(&given_back[0], 1_000).await.unwrap();
    let history = |ops: Vec<OpRecord>| ops.into_iter().map(|op| op.history).collect::<Vec<_>>();
    assert_eq!(history(b.store.operations(&created, 0, 10, None).await.unwrap()), [[]], "a release is no attempt");

    let first = b.store.claim(1_000, 10).await.unwrap();
    let a = answered(1_000, 503, "r1", [11, 12]);
    b.store.record(vec![noted(&first[0], Next::RetryAt(5_000), a.clone())], 2_000).await.unwrap();
    let second = b.store.claim(5_000, 10).await.unwrap();
    let b_note = answered(5_000, 200, "r2", [40, 41]);
    b.store.record(vec![noted(&second[0], Next::Done(OpState::Succeeded), b_note.clone())], 6_000).await.unwrap();
    let replay = noted(&second[0], Next::Done(OpState::Succeeded), answered(7_000, 200, "r3", [50, 51]));
    b.store.record(vec![replay], 7_000).await.unwrap();

    let ops = b.store.operations(&created, 0, 10, None).await.unwrap();
    assert!(serde_json::to_value(&ops[0]).unwrap().get("history").is_none(), "the listing does not show it");
    assert_eq!(history(ops), [[a, b_note]], "a replayed outcome adds nothing");

    // An operation that fails before it can be sent (its app gone) records no attempt.
    let created = create(&b.store, job("j2", None, clears(1))).await;
    let unsendable = b.store.claim(8_000, 10).await.unwrap();
    b.store.record(vec![outcome(&unsendable[0], Next::Done(OpState::Failed))], 8_000).await.unwrap();
    let ops = b.store.operations(&created, 0, 10, None).await.unwrap();
    assert_eq!((ops[0].state, history(ops)), (OpState::Failed, vec![vec![]]));
}

async fn an_operation_cancelled_in_flight_keeps_its_attempts(b: &mut Backend) {
    create(&b.store, job("j1", None, clears(2))).await;
    let claimed = b.store.claim(1_000, 10).await.unwrap();
    let (first, other) = (&claimed[0], &claimed[1]);
    // Easemob was not reached: the gateway's own status, no request id, no audit events (an empty list the cancel
    // and the outcome below write again: on Redis, cjson would make it `{}` and the operation unreadable).
    let unreached = AttemptNote { at_ms: 1_000, status: Some(504), replica: "r1".to_owned(), ..Default::default() };
    b.store.record(vec![noted(first, Next::RetryAt(3_000), unreached.clone())], 1_500).await.unwrap();
    b.store.release(other, 10_000).await.unwrap();
    let in_flight = b.store.claim(3_000, 10).await.unwrap();
    assert_eq!(indexes(&in_flight), [first.n]);
    b.store.cancel("o#a", "j1", 3_500).await.unwrap();
    let sent = answered(3_000, 200, "r2", [7, 8]);
    b.store.record(vec![noted(&in_flight[0], Next::Done(OpState::Succeeded), sent.clone())], 4_000).await.unwrap();

    let cancelled = b.store.job("o#a", "j1").await.unwrap().unwrap();
    assert_eq!((cancelled.counts.succeeded, cancelled.counts.cancelled), (1, 1));
    let ops = b.store.operations(&cancelled, 0, 10, None).await.unwrap();
    let op = |n: i64| ops.iter().find(|op| op.index == n).unwrap();
    assert_eq!((op(first.n).state, &op(first.n).history), (OpState::Succeeded, &vec![unreached, sent]));
    assert_eq!((op(other.n).state, op(other.n).history.len()), (OpState::Cancelled, 0), "never attempted");
}

async fn a_retry_recorded_twice_or_after_a_cancel_counts_its_attempt_once(b: &mut Backend) {
    let created = create(&b.store, job("j1", None, clears(1))).await;
    let first = b.store.claim(1_000, 10).await.unwrap();
    let busy = answered(1_000, 503, "r1", [1, 2]);
    // The first record's answer was lost, so the scheduler sends the same outcome again.
    for _ in 0..2 {
        b.store.record(vec![noted(&first[0], Next::RetryAt(2_000), busy.clone())], 1_500).await.unwrap();
    }
    let ops = b.store.operations(&created, 0, 10, None).await.unwrap();
    assert_eq!((ops[0].attempts, &ops[0].history), (1, &vec![busy.clone()]), "once");

    // Cancelled while its second attempt is in flight, which Easemob answers 503: the attempt is kept, and the
    // operation stays cancelled, never due again.
    let second = b.store.claim(2_000, 10).await.unwrap();
    b.store.cancel("o#a", "j1", 2_500).await.unwrap();
    let again = AttemptNote { attempt: 2, ..answered(2_000, 503, "r2", [3, 4]) };
    b.store.record(vec![noted(&second[0], Next::RetryAt(9_000), again.clone())], 3_000).await.unwrap();
    let job = b.store.job("o#a", "j1").await.unwrap().unwrap();
    let ops = b.store.operations(&job, 0, 10, None).await.unwrap();
    assert_eq!((ops[0].state, ops[0].attempts, &ops[0].history), (OpState::Cancelled, 2, &vec![busy, again]));
    assert!(b.store.claim(10_000, 10).await.unwrap().is_empty());
    assert_eq!(b.store.next_due(10_000).await.unwrap(), None);
}

async fn a_jobs_peer_is_kept_with_it(b: &mut Backend) {
    let peer = Some("127.0.0.1:50312");
    let created = create(&b.store, job("j1", None, clears(1))).await;
    assert_eq!(created.peer.as_deref(), peer);
    assert_eq!(b.store.job("o#a", "j1").await.unwrap().unwrap().peer.as_deref(), peer);
    let listed = b.store.list("o#a", None, None, 10).await.unwrap();
    assert_eq!(listed.iter().map(|job| job.peer.as_deref()).collect::<Vec<_>>(), [peer]);
    assert_eq!(b.store.cancel("o#a", "j1", 2_000).await.unwrap().unwrap().peer.as_deref(), peer);

    let mut unknown = job("j2", None, clears(1));
    unknown.0.peer = None;
    create(&b.store, unknown).await;
    assert_eq!(b.store.job("o#a", "j2").await.unwrap().unwrap().peer, None);
}

async fn an_idempotency_key_returns_the_first_job(b: &mut Backend) {
    let first = create(&b.store, job("j1", Some("k"), clears(1))).await;
    let Created::Existing { job: again, same_request } = submit(&b.store, job("j2", Some("k"), clears(1))).await else {
        panic!("the first job")
    };
    assert_eq!((again.id.as_str(), same_request), (first.id.as_str(), true));
    let mut different = job("j3", Some("k"), clears(1));
    different.0.request_sha256 = Some("other".to_owned());
    assert!(matches!(submit(&b.store, different).await, Created::Existing { same_request: false, .. }));
    assert!(b.store.job("o#a", "j2").await.unwrap().is_none());
}

async fn a_release_gives_back_that_operation_alone(b: &mut Backend) {
    let ops = vec![
        op("delete_conversation", Some("ann")),
        op("delete_conversation", Some("ann")),
        op("delete_conversation", Some("bob")),
    ];
    create(&b.store, job("j1", None, ops)).await;
    let claimed = b.store.claim(1_000, 10).await.unwrap();
    assert_eq!(indexes(&claimed), [0, 1, 2]);
    let at = |n: i64| claimed.iter().find(|due| due.n == n).unwrap();
    b.store.release(at(0), 5_000).await.unwrap();
    assert!(b.store.claim(1_000, 10).await.unwrap().is_empty(), "released for later, the others still held");
    b.store.release(at(1), 1_000).await.unwrap();
    b.store.release(at(2), 1_000).await.unwrap();
    assert_eq!(indexes(&b.store.claim(1_000, 10).await.unwrap()), [1, 2], "ann's other operation is not held back");
    assert_eq!(b.store.next_due(1_000).await.unwrap(), Some(5_000));
    assert_eq!(indexes(&b.store.claim(5_000, 10).await.unwrap()), [0]);
}

async fn each_route_is_claimed_up_to_the_limit_of_its_own(b: &mut Backend) {
    let mut ops = clears(5);
    ops.push(op("delete_conversation", Some("ann")));
    create(&b.store, job("j1", None, ops)).await;
    let claimed = b.store.claim(1_000, 2).await.unwrap();
    let routes: Vec<(&str, i64)> = claimed.iter().map(|due| (due.route.as_str(), due.n)).collect();
    assert_eq!(routes.len(), 3, "{routes:?}");
    assert!(routes.contains(&("delete_conversation", 5)), "the long job holds back no other route: {routes:?}");
    assert!(routes.contains(&("clear_user_messages", 0)) && routes.contains(&("clear_user_messages", 1)));
    assert_eq!(indexes(&b.store.claim(1_000, 2).await.unwrap()), [2, 3], "the next ones, in order");
}

async fn the_apps_take_turns_at_a_routes_claims(b: &mut Backend) {
    let (mut first, mut second) = (job("j1", None, clears(3)), job("j2", None, clears(3)));
    second.0.app = "o#b".to_owned();
    first.0.now_ms = 500; // the older job: the earliest due of all
    create(&b.store, first).await;
    create(&b.store, second).await;
    let apps: Vec<String> = {
        let mut apps = Vec::new();
        for _ in 0..4 {
            let claimed = b.store.claim(1_000, 1).await.unwrap();
            assert_eq!(claimed.len(), 1, "one route, a limit of 1: {claimed:?}");
            apps.push(claimed[0].app.clone());
        }
        apps
    };
    assert_ne!(apps[0], apps[1], "neither app's job holds back the other's: {apps:?}");
    assert_eq!((&apps[0], &apps[1]), (&apps[2], &apps[3]), "in turn: {apps:?}");
}

async fn a_cancel_drops_what_is_pending_and_an_operation_in_flight_still_counts(b: &mut Backend) {
    let other = create(&b.store, job("j0", None, clears(1))).await;
    create(&b.store, job("j1", None, clears(3))).await;
    let in_flight = b.store.claim(1_000, 2).await.unwrap().into_iter().find(|due| due.job_id == "j1").unwrap();
    let cancelled = b.store.cancel("o#a", "j1", 2_000).await.unwrap().unwrap();
    assert_eq!((cancelled.state, cancelled.counts.cancelled, cancelled.counts.pending), (JobState::Cancelled, 3, 0));
    assert!(b.store.is_cancelled("o#a", "j1").await.unwrap());
    assert!(!b.store.is_cancelled("o#a", &other.id).await.unwrap());
    assert!(b.store.claim(10_000, 10).await.unwrap().iter().all(|due| due.job_id != "j1"));

    b.store.record(vec![outcome(&in_flight, Next::Done(OpState::Succeeded))], 2_500).await.unwrap();
    let after = b.store.job("o#a", "j1").await.unwrap().unwrap();
    assert_eq!(after.state, JobState::Cancelled);
    assert_eq!((after.counts.succeeded, after.counts.cancelled), (1, 2));
    assert!(b.store.cancel("o#a", "nope", 0).await.unwrap().is_none());
    assert!(b.store.cancel("x#y", "j1", 0).await.unwrap().is_none(), "another app's job is not found");
}

async fn what_a_crashed_holder_claimed_is_due_again(b: &mut Backend) {
    create(&b.store, job("j1", None, clears(3))).await;
    let claimed = b.store.claim(1_000, 10).await.unwrap();
    b.store.record(vec![outcome(&claimed[0], Next::Done(OpState::Succeeded))], 1_500).await.unwrap();
    b.crash().await;
    let again = b.store.claim(2_000, 10).await.unwrap();
    let mut left: Vec<(i64, u32)> = again.iter().map(|due| (due.n, due.attempts)).collect();
    left.sort();
    let recorded = claimed[0].n;
    let expected: Vec<(i64, u32)> = [0, 1, 2].into_iter().filter(|n| *n != recorded).map(|n| (n, 0)).collect();
    assert_eq!(left, expected, "what was recorded stays recorded, the rest runs again");
    assert_eq!(b.store.job("o#a", "j1").await.unwrap().unwrap().counts.succeeded, 1);
}

async fn a_release_and_a_retry_outlive_a_crash(b: &mut Backend) {
    create(&b.store, job("j1", None, clears(2))).await;
    let claimed = b.store.claim(1_000, 10).await.unwrap();
    b.store.release(&claimed[0], 5_000).await.unwrap();
    b.store.record(vec![outcome(&claimed[1], Next::RetryAt(7_000))], 1_000).await.unwrap();
    b.crash().await;
    assert!(b.store.claim(4_000, 10).await.unwrap().is_empty());
    assert_eq!(b.store.next_due(4_000).await.unwrap(), Some(5_000));
    assert_eq!(indexes(&b.store.claim(7_000, 10).await.unwrap()), [0, 1]);
}

async fn a_lanes_use_only_moves_forward_and_outlives_a_crash(b: &mut Backend) {
    b.store.use_lane("o#a", "delete_conversation", 5_000).await.unwrap();
    b.store.use_lane("o#a", "delete_conversation", 4_000).await.unwrap();
    b.store.use_lane("o#a", "clear_user_messages", 3_000).await.unwrap();
    b.crash().await;
    let mut used = b.store.lanes_used().await.unwrap();
    used.sort_by_key(|lane| lane.until_ms);
    let lane = |route: &str, until_ms| LaneUse { app: "o#a".to_owned(), route: route.to_owned(), until_ms };
    assert_eq!(used, [lane("clear_user_messages", 3_000), lane("delete_conversation", 5_000)]);
}

async fn what_remains_is_counted_by_route_and_by_user(b: &mut Backend) {
    let ops = vec![
        op("delete_conversation", Some("ann")),
        op("delete_conversation", Some("ann")),
        op("clear_user_messages", None),
    ];
    let created = create(&b.store, job("j1", None, ops)).await;
    let claimed = b.store.claim(1_000, 10).await.unwrap();
    let first = claimed.iter().find(|due| due.n == 0).unwrap();
    b.store.record(vec![outcome(first, Next::Done(OpState::Succeeded))], 1_500).await.unwrap();
    let remaining = b.store.remaining(&created).await.unwrap();
    let mut by_route = remaining.by_route.clone();
    by_route.sort();
    assert_eq!(by_route, [("clear_user_messages".to_owned(), 1), ("delete_conversation".to_owned(), 1)]);
    assert_eq!(remaining.by_user, [("o#a/ann".to_owned(), 1)]);
    let totals = b.store.totals().await.unwrap();
    assert_eq!((totals.pending, totals.oldest_ms), (2, Some(1_000)));
}

async fn jobs_and_operations_are_read_in_pages(b: &mut Backend) {
    for id in ["j1", "j2", "j3"] {
        create(&b.store, job(id, None, clears(3))).await;
    }
    b.store.cancel("o#a", "j2", 2_000).await.unwrap();
    let newest: Vec<String> = b.store.list("o#a", None, None, 2).await.unwrap().into_iter().map(|j| j.id).collect();
    assert_eq!(newest, ["j3", "j2"]);
    let j2 = b.store.job("o#a", "j2").await.unwrap().unwrap();
    let older: Vec<String> =
        b.store.list("o#a", None, Some(j2.seq), 10).await.unwrap().into_iter().map(|j| j.id).collect();
    assert_eq!(older, ["j1"]);
    let cancelled = b.store.list("o#a", Some(JobState::Cancelled), None, 10).await.unwrap();
    assert_eq!(cancelled.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), ["j2"]);
    assert!(b.store.list("x#y", None, None, 10).await.unwrap().is_empty());

    let j1 = b.store.job("o#a", "j1").await.unwrap().unwrap();
    let page = b.store.operations(&j1, 1, 10, None).await.unwrap();
    assert_eq!(page.iter().map(|op| op.index).collect::<Vec<_>>(), [1, 2]);
    assert_eq!((page[0].method, page[0].state), ("POST", OpState::Pending));
    assert_eq!(b.store.operations(&j2, 0, 2, Some(OpState::Cancelled)).await.unwrap().len(), 2);
    assert!(b.store.operations(&j1, 0, 10, Some(OpState::Succeeded)).await.unwrap().is_empty());
}

async fn staged_operations_are_seen_by_no_one_until_the_job_is_created(b: &mut Backend) {
    b.store.stage("o#a", "j1", 0, clears(2)).await.unwrap();
    b.store.stage("o#a", "j1", 2, vec![op("delete_conversation", Some("ann"))]).await.unwrap();
    assert!(b.store.claim(1_000, 10).await.unwrap().is_empty());
    assert!(b.store.job("o#a", "j1").await.unwrap().is_none());
    assert!(b.store.list("o#a", None, None, 10).await.unwrap().is_empty());
    assert_eq!(b.store.totals().await.unwrap().pending, 0);

    let Created::New(created) = b.store.create(job("j1", None, vec![]).0).await.unwrap() else { panic!("a new job") };
    assert_eq!((created.counts.total, created.counts.pending), (3, 3));
    assert_eq!(indexes(&b.store.claim(1_000, 10).await.unwrap()), [0, 1, 2]);
    assert_eq!(b.store.remaining(&created).await.unwrap().by_user, [("o#a/ann".to_owned(), 1)]);
}

async fn a_job_that_is_not_created_leaves_nothing_behind(b: &mut Backend) {
    // Refused after some of its operations were staged.
    b.store.stage("o#a", "j1", 0, clears(2)).await.unwrap();
    b.store.discard("o#a", "j1").await.unwrap();
    assert_eq!(b.kept_for_good("j1").await, 0);
    // Its reader died while staging.
    b.store.stage("o#a", "j2", 0, clears(2)).await.unwrap();
    b.crash().await;
    assert_eq!(b.kept_for_good("j2").await, 0);
    assert!(b.store.claim(1_000, 10).await.unwrap().is_empty());
    // A create retried under its Idempotency-Key finds the first job, and drops what it staged itself.
    create(&b.store, job("j3", Some("k"), clears(1))).await;
    assert!(matches!(submit(&b.store, job("j4", Some("k"), clears(2))).await, Created::Existing { .. }));
    assert_eq!(b.kept_for_good("j4").await, 0);
    assert_eq!(indexes(&b.store.claim(1_000, 10).await.unwrap()), [0]);
}

/// Each test above, once on each store.
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $test() {
                super::$test(&mut super::Backend::sqlite().await).await;
            })*
        }
        mod redis {
            $(#[tokio::test]
            async fn $test() {
                super::$test(&mut super::Backend::redis().await).await;
            })*
        }
        /// One cluster (six redis-servers) for the suite, so the tests run one after another on it.
        #[tokio::test]
        async fn on_a_redis_cluster() {
            let cluster = redis_cluster::RedisCluster::start().await;
            $($test(&mut Backend::cluster(&cluster, stringify!($test))).await;)*
        }
    };
}

conformance!(
    a_job_runs_to_its_end_and_an_outcome_counts_once,
    an_operations_history_keeps_each_attempt_it_recorded_once,
    an_operation_cancelled_in_flight_keeps_its_attempts,
    a_retry_recorded_twice_or_after_a_cancel_counts_its_attempt_once,
    a_jobs_peer_is_kept_with_it,
    an_idempotency_key_returns_the_first_job,
    a_release_gives_back_that_operation_alone,
    each_route_is_claimed_up_to_the_limit_of_its_own,
    the_apps_take_turns_at_a_routes_claims,
    a_cancel_drops_what_is_pending_and_an_operation_in_flight_still_counts,
    what_a_crashed_holder_claimed_is_due_again,
    a_release_and_a_retry_outlive_a_crash,
    a_lanes_use_only_moves_forward_and_outlives_a_crash,
    what_remains_is_counted_by_route_and_by_user,
    jobs_and_operations_are_read_in_pages,
    staged_operations_are_seen_by_no_one_until_the_job_is_created,
    a_job_that_is_not_created_leaves_nothing_behind,
);
