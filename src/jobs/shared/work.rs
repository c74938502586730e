//! The queue's work across apps: each app keeps its own queues in its own slot, so a claim, a sweep or a count
//! goes through the apps that have jobs, one script or pipeline each.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;

use redis::AsyncCommands;

use super::{JobFields, Op, SharedStore, record as record_of};
use crate::jobs::records::{Due, JobState, LaneUse, Next, Outcome, StoreError, Totals};
use crate::routes::Route;

impl SharedStore {
    /// Claims up to `limit` operations of each route due at `now_ms` for this replica, each leased for
    /// `jobs.lease`. The apps take turns at being first, so that one app's long job never holds back another's.
    pub async fn claim(&self, now_ms: i64, limit: usize) -> Result<Vec<Due>, StoreError> {
        let apps = self.apps().await?;
        let first = self.turn.fetch_add(1, Ordering::Relaxed) % apps.len().max(1);
        let mut left: HashMap<&str, usize> = Route::ALL.iter().map(|route| (route.name(), limit)).collect();
        let mut out = Vec::new();
        for app in apps[first..].iter().chain(&apps[..first]) {
            if left.values().all(|n| *n == 0) {
                break;
            }
            let claimed = self.claim_in(app, now_ms, &left).await?;
            for due in &claimed {
                if let Some(n) = left.get_mut(due.route.as_str()) {
                    *n = n.saturating_sub(1);
                }
            }
            out.extend(claimed);
        }
        Ok(out)
    }

    /// Claims up to `left` of each route's operations of `app` due at `now_ms`, in one script.
    async fn claim_in(&self, app: &str, now_ms: i64, left: &HashMap<&str, usize>) -> Result<Vec<Due>, StoreError> {
        let routes: Vec<&str> = Route::ALL.iter().map(|r| r.name()).filter(|r| left[r] > 0).collect();
        let mut keys: Vec<String> = routes.iter().map(|route| self.key(app, &format!("due:{route}"))).collect();
        keys.push(self.key(app, "leases"));
        let mut args = vec![now_ms.to_string(), self.lease.as_millis().to_string()];
        args.extend(routes.iter().map(|route| left[route].to_string()));
        let claimed: Vec<String> = self.script(&self.scripts.claim, &keys, &args).await?;
        let claimed: Vec<(&str, i64)> = claimed
            .iter()
            .filter_map(|member| member.rsplit_once(':').and_then(|(id, n)| Some((id, n.parse().ok()?))))
            .collect();
        if claimed.is_empty() {
            return Ok(Vec::new());
        }
        // Two round trips for the whole claim: the jobs it touches, then its operations.
        let ids: Vec<&str> = claimed.iter().map(|(id, _)| *id).collect::<BTreeSet<_>>().into_iter().collect();
        let mut jobs_read = redis::pipe();
        for id in &ids {
            jobs_read.cmd("HMGET").arg(self.key(app, &format!("job:{id}"))).arg("seq").arg("app").arg("caller");
        }
        let fields: Vec<JobFields> = jobs_read.query_async(&mut self.conn()).await?;
        let jobs: HashMap<&str, JobFields> = ids.into_iter().zip(fields).collect();
        let mut ops_read = redis::pipe();
        for (id, n) in &claimed {
            ops_read.hget(self.key(app, &format!("ops:{id}")), n);
        }
        let ops: Vec<Option<String>> = ops_read.query_async(&mut self.conn()).await?;
        let mut out = Vec::with_capacity(claimed.len());
        for ((id, n), op) in claimed.into_iter().zip(ops) {
            let (Some((Some(seq), Some(app), caller)), Some(op)) =
                (jobs.get(id), op.and_then(|raw| serde_json::from_str::<Op>(&raw).ok()))
            else {
                continue; // the job expired meanwhile
            };
            out.push(Due {
                job: *seq,
                job_id: id.to_owned(),
                app: app.clone(),
                caller: caller.clone().filter(|c| !c.is_empty()),
                n,
                route: op.route,
                path: op.path,
                body: op.body.map(String::into_bytes),
                user: op.user,
                attempts: op.attempts,
            });
        }
        Ok(out)
    }

    pub async fn next_due(&self, now_ms: i64) -> Result<Option<i64>, StoreError> {
        let mut next = None;
        for app in self.apps().await? {
            let mut firsts = redis::pipe();
            for key in self.due_keys(&app) {
                firsts.zrangebyscore_limit_withscores(key, format!("({now_ms}"), "+inf", 0, 1);
            }
            let firsts: Vec<Vec<(String, f64)>> = firsts.query_async(&mut self.conn()).await?;
            let first = firsts.iter().filter_map(|first| first.first()).map(|(_, at)| *at as i64).min();
            next = next.into_iter().chain(first).min();
        }
        Ok(next)
    }

    /// Each of `app`'s routes' set of operations due to run.
    fn due_keys(&self, app: &str) -> Vec<String> {
        Route::ALL.iter().map(|route| self.key(app, &format!("due:{}", route.name()))).collect()
    }

    /// Gives a claimed operation back, due again at `until_ms`.
    pub async fn release(&self, due: &Due, until_ms: i64) -> Result<(), StoreError> {
        let member = format!("{}:{}", due.job_id, due.n);
        let args = [self.app_prefix(&due.app), member, until_ms.to_string()];
        let _: i64 = self.script(&self.scripts.release, &self.routing(&due.app), &args).await?;
        Ok(())
    }

    /// Puts the operations of expired leases (a replica died holding them) back in the queue.
    pub async fn reap(&self) -> Result<usize, StoreError> {
        let mut reaped = 0;
        for app in self.apps().await? {
            let n: i64 = self.script(&self.scripts.reap, &self.routing(&app), &[self.app_prefix(&app)]).await?;
            reaped += n as usize;
        }
        Ok(reaped)
    }

    /// Records, before any of its calls go, that jobs may send on `app`'s `route` until `until_ms` (never
    /// moved back, whichever replica writes).
    pub async fn use_lane(&self, app: &str, route: &str, until_ms: i64) -> Result<(), StoreError> {
        self.register(app).await?;
        let _: i64 = redis::cmd("ZADD")
            .arg(self.key(app, "lanes"))
            .arg("GT")
            .arg(until_ms)
            .arg(route)
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// The lanes jobs have used on any replica, each with the end of its last record.
    pub async fn lanes_used(&self) -> Result<Vec<LaneUse>, StoreError> {
        let mut used = Vec::new();
        for app in self.apps().await? {
            let lanes: Vec<(String, f64)> = self.conn().zrange_withscores(self.key(&app, "lanes"), 0, -1).await?;
            used.extend(lanes.into_iter().map(|(route, until)| LaneUse {
                app: app.clone(),
                route,
                until_ms: until as i64,
            }));
        }
        Ok(used)
    }

    /// Records outcomes, one script per app they belong to.
    pub async fn record(&self, outcomes: Vec<Outcome>, now_ms: i64) -> Result<Vec<i64>, StoreError> {
        let mut by_app: HashMap<String, Vec<String>> = HashMap::new();
        for o in outcomes {
            let args = by_app.entry(o.app).or_default();
            let (next, at) = match o.next {
                Next::Done(state) => (state.as_str().to_owned(), String::new()),
                Next::RetryAt(at) => ("retry".to_owned(), at.to_string()),
            };
            args.extend([
                o.job_id,
                o.n.to_string(),
                next,
                o.attempts.to_string(),
                o.status.map(|s| s.to_string()).unwrap_or_default(),
                o.error.unwrap_or_default(),
                o.error_description.unwrap_or_default(),
                at,
                o.note.map(|note| serde_json::to_string(&note).expect("a note serializes")).unwrap_or_default(),
            ]);
        }
        let mut finished = Vec::new();
        for (app, outcomes) in by_app {
            let mut args = vec![self.app_prefix(&app), now_ms.to_string()];
            args.extend(outcomes);
            finished.extend(self.script::<Vec<i64>>(&self.scripts.record, &self.routing(&app), &args).await?);
        }
        Ok(finished)
    }

    pub async fn totals(&self) -> Result<Totals, StoreError> {
        let mut totals = Totals { jobs: Vec::new(), pending: 0, oldest_ms: None };
        for app in self.apps().await? {
            let mut read = redis::pipe();
            read.zcard(self.key(&app, "leases"));
            for key in self.due_keys(&app) {
                read.zcard(key);
            }
            let counts: Vec<i64> = read.query_async(&mut self.conn()).await?;
            totals.pending += counts.iter().sum::<i64>();
            let mut conn = self.conn();
            let states: HashMap<String, i64> = conn.hgetall(self.key(&app, "states")).await?;
            for (state, n) in states.into_iter().filter_map(|(state, n)| Some((JobState::parse(&state)?, n))) {
                match totals.jobs.iter_mut().find(|(s, _)| *s == state) {
                    Some((_, total)) => *total += n,
                    None => totals.jobs.push((state, n)),
                }
            }
            let oldest: Vec<(String, f64)> = conn.zrange_withscores(self.key(&app, "open"), 0, 0).await?;
            totals.oldest_ms = totals.oldest_ms.into_iter().chain(oldest.first().map(|(_, ms)| *ms as i64)).min();
        }
        Ok(totals)
    }

    pub async fn expire(&self, before_ms: i64) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let mut expired = 0;
        for app in self.apps().await? {
            // Finished before `before_ms`, not at it (an exclusive bound, as with SQLite).
            let finished = self.key(&app, "finished");
            let ids: Vec<String> = conn.zrangebyscore(&finished, "-inf", format!("({before_ms}")).await?;
            for id in &ids {
                let jobk = self.key(&app, &format!("job:{id}"));
                let fields: HashMap<String, String> = conn.hgetall(&jobk).await?;
                let mut pipe = redis::pipe();
                pipe.atomic();
                if let Some(job) = record_of(&fields) {
                    pipe.zrem(self.key(&app, "all"), id).ignore();
                    pipe.hincr(self.key(&app, "states"), job.state.as_str(), -1).ignore();
                    if let Some(key) = &job.idempotency_key {
                        pipe.del(self.idempotency_key(&app, key)).ignore();
                    }
                }
                pipe.del(&[jobk, self.key(&app, &format!("ops:{id}")), self.left_key(&app, id)]).ignore();
                pipe.zrem(&finished, id).ignore();
                let _: () = pipe.query_async(&mut conn).await?;
            }
            expired += ids.len();
        }
        Ok(expired)
    }
}
