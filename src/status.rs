//! The admin port's status page: `/` (a page that refreshes itself) and `/status.json` (what it shows). Per app: the
//! token's life, each route's lane (its limit, the pace in force, calls waiting, calls sent and refused lately,
//! with five minutes of history), the users in their window and the jobs in progress; and the process's last
//! reload. Never a token or a secret.
//!
//! The counts come from the metrics registry, sampled once a second, so the page shows what `/metrics` shows; the
//! rest is read from the quota, the tokens and the jobs store when asked.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus::core::Collector;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::jobs::records::JobState;
use crate::metrics::Metrics;
use crate::stack::Shared;

/// The page itself: plain HTML, CSS and script, served from the binary.
pub const PAGE: &str = include_str!("status/page.html");
/// How often the counters are sampled, and how many samples are kept (five minutes).
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
const SAMPLES: usize = 300;
/// The history's bars: one per this many samples.
const BAR: usize = 5;
/// Jobs shown per app and state.
const JOBS_SHOWN: u32 = 20;
/// How long the jobs shown are reused: an estimate reads the job's pending operations, so a page left open (it
/// asks every 2 s) reads the store at most this often.
const JOBS_FRESH: Duration = Duration::from_secs(10);

/// What the status page remembers between requests: the counters' recent history and the last reload.
pub struct StatusBoard {
    started: SystemTime,
    history: Mutex<VecDeque<Sample>>,
    last_reload: Mutex<Option<ReloadRecord>>,
    /// Per app, its jobs as last read, and when.
    jobs: tokio::sync::Mutex<HashMap<String, (tokio::time::Instant, Value)>>,
}

/// The counters at one moment, by (app, route) and (app, route, reason).
#[derive(Default)]
struct Sample {
    sent: HashMap<(String, String), u64>,
    refused: HashMap<(String, String, String), u64>,
}

#[derive(Clone, Serialize)]
struct ReloadRecord {
    at_unix_seconds: u64,
    applied: bool,
    /// Why it was rejected, or the settings it changed that wait for a restart.
    problems: Vec<String>,
    waiting_for_restart: Vec<String>,
}

impl StatusBoard {
    /// Starts sampling the counters of the config in force.
    pub fn start(live: watch::Receiver<Arc<Shared>>) -> Arc<StatusBoard> {
        let board = Arc::new(StatusBoard {
            started: SystemTime::now(),
            history: Mutex::new(VecDeque::with_capacity(SAMPLES + 1)),
            last_reload: Mutex::new(None),
            jobs: tokio::sync::Mutex::default(),
        });
        let sampling = Arc::downgrade(&board);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(SAMPLE_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let Some(board) = sampling.upgrade() else { return };
                let sample = Sample::of(&live.borrow().metrics);
                let mut history = board.history.lock().expect("history lock");
                history.push_back(sample);
                if history.len() > SAMPLES + 1 {
                    history.pop_front();
                }
            }
        });
        board
    }

    /// Records a reload's outcome: applied (with the settings that wait for a restart) or rejected (and why).
    pub fn reloaded(&self, applied: bool, problems: &[String], waiting_for_restart: &[&str]) {
        let at_unix_seconds = unix_seconds(SystemTime::now());
        let record = ReloadRecord {
            at_unix_seconds,
            applied,
            problems: problems.to_vec(),
            waiting_for_restart: waiting_for_restart.iter().map(|s| (*s).to_owned()).collect(),
        };
        *self.last_reload.lock().expect("reload lock") = Some(record);
    }

    /// What the page shows, as JSON.
    pub async fn json(&self, live: &Shared, ready: bool, draining: bool) -> Value {
        let reloads = |result: &str| live.metrics.config_reloads.with_label_values(&[result]).get();
        let mut apps = Vec::new();
        for app in live.apps.iter() {
            let key = app.key.as_str();
            let quota = app.quota.status(app.index);
            let routes: Vec<Value> = quota.lanes.iter().map(|lane| self.lane(key, lane)).collect();
            apps.push(json!({
                "app": key,
                "token": app.token.detail(),
                "backend": quota.backend,
                "users_in_window": quota.users_in_window,
                "user_limit_per_minute": quota.user_limit_per_minute,
                "routes": routes,
                "jobs": self.jobs(live, app).await,
            }));
        }
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": SystemTime::now().duration_since(self.started).unwrap_or_default().as_secs(),
            "ready": ready,
            "draining": draining,
            "reloads": {
                "applied": reloads("applied"),
                "rejected": reloads("rejected"),
                "restart_required": live.metrics.config_restart_required.get() > 0,
                "last": self.last_reload.lock().expect("reload lock").clone(),
            },
            "apps": apps,
        })
    }

    /// `app`'s jobs in progress, read again once they are [`JOBS_FRESH`] old (one reader at a time).
    async fn jobs(&self, live: &Shared, app: &crate::apps::App) -> Value {
        let mut cache = self.jobs.lock().await;
        let now = tokio::time::Instant::now();
        match cache.get(app.key.as_str()) {
            Some((read, jobs)) if now.duration_since(*read) < JOBS_FRESH => jobs.clone(),
            _ => {
                let jobs = jobs(live, app).await;
                cache.insert(app.key.as_str().to_owned(), (now, jobs.clone()));
                jobs
            }
        }
    }

    /// One lane: its limits and pace, and what the samples say of it.
    fn lane(&self, app: &str, lane: &crate::ratelimit::LaneStatus) -> Value {
        let history = self.history.lock().expect("history lock");
        let key = (app.to_owned(), lane.route.to_owned());
        let sent = |sample: &Sample| sample.sent.get(&key).copied().unwrap_or(0);
        let newest = history.back();
        let ago = |n: usize| history.len().checked_sub(n + 1).and_then(|i| history.get(i));
        let since = |n: usize| match (newest, ago(n).or(history.front())) {
            (Some(new), Some(old)) => sent(new).saturating_sub(sent(old)),
            _ => 0,
        };
        let mut refused: HashMap<&str, u64> = HashMap::new();
        if let (Some(new), Some(old)) = (newest, ago(60).or(history.front())) {
            for ((a, route, reason), &count) in &new.refused {
                if *a == app && *route == lane.route {
                    let before = old.refused.get(&(a.clone(), route.clone(), reason.clone())).copied().unwrap_or(0);
                    if count > before {
                        refused.insert(reason, count - before);
                    }
                }
            }
        }
        // Bars of BAR seconds, oldest first, over the samples kept.
        let sent_per_bar: Vec<u64> = history
            .iter()
            .collect::<Vec<_>>()
            .windows(BAR + 1)
            .step_by(BAR)
            .map(|w| sent(w[BAR]).saturating_sub(sent(w[0])))
            .collect();
        json!({
            "route": lane.route,
            "rate": lane.rate,
            "burst": lane.burst,
            "rate_now": lane.rate_now,
            "waiting": lane.waiting,
            "sent_total": newest.map(sent).unwrap_or(0),
            "sent_last_second": since(1),
            "refused_last_minute": refused,
            "bar_seconds": BAR,
            "sent_per_bar": sent_per_bar,
        })
    }
}

impl Sample {
    /// The two counter families the page shows, read alone: sampling once a second costs the data plane nothing
    /// measurable (no other family is encoded).
    fn of(metrics: &Metrics) -> Sample {
        let mut sample = Sample::default();
        for family in metrics.upstream_requests.collect().iter().chain(&metrics.rejected.collect()) {
            for metric in family.get_metric() {
                let label =
                    |wanted: &str| metric.get_label().iter().find(|l| l.name() == wanted).map(|l| l.value().to_owned());
                let (Some(app), Some(route)) = (label("app"), label("route")) else { continue };
                let value = metric.get_counter().get_value() as u64;
                match label("reason") {
                    Some(reason) => *sample.refused.entry((app, route, reason)).or_default() += value,
                    None => *sample.sent.entry((app, route)).or_default() += value,
                }
            }
        }
        sample
    }
}

/// An app's jobs in progress, newest first: running, then queued.
async fn jobs(live: &Shared, app: &crate::apps::App) -> Value {
    let Some(jobs) = &live.jobs else { return json!({ "enabled": false }) };
    let mut shown = Vec::new();
    for state in [JobState::Running, JobState::Queued] {
        match jobs.store().list(app.key.as_str(), Some(state), None, JOBS_SHOWN).await {
            Ok(page) => {
                for job in &page {
                    let view = jobs.describe(app, job).await.unwrap_or_else(|_| crate::jobs::view(app, job));
                    shown.push(json!({
                        "id": job.id,
                        "state": state.as_str(),
                        "counts": job.counts,
                        "estimated_seconds": view.get("estimated_seconds"),
                        "json": format!("status/jobs/{}/{}/{}", app.org, app.app, job.id),
                    }));
                }
            }
            Err(e) => return json!({ "enabled": true, "error": format!("the jobs store failed: {e}") }),
        }
    }
    json!({ "enabled": true, "active": shown })
}

/// `status/jobs/{org}/{app}/{id}`: a job's JSON, as the jobs API shows it.
pub async fn job(live: &Shared, path: &str) -> Option<Value> {
    let mut parts = path.strip_prefix("/status/jobs/")?.split('/');
    let (org, name, id) = (parts.next()?, parts.next()?, parts.next()?);
    let app = live.apps.iter().find(|app| app.org == org && app.app == name)?;
    let jobs = live.jobs.as_ref()?;
    let job = jobs.store().job(app.key.as_str(), id).await.ok()??;
    Some(jobs.describe(app, &job).await.unwrap_or_else(|_| crate::jobs::view(app, &job)))
}

fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::LaneStatus;

    fn board() -> StatusBoard {
        StatusBoard {
            started: SystemTime::now(),
            history: Mutex::default(),
            last_reload: Mutex::new(None),
            jobs: tokio::sync::Mutex::default(),
        }
    }

    fn lane() -> LaneStatus {
        LaneStatus { route: "delete_conversation", rate: 100, burst: 1, rate_now: 100, waiting: 0 }
    }

    #[test]
    fn a_lane_shows_the_counters_lately_as_metrics_counts_them() {
        let (metrics, board) = (Metrics::new(), board());
        let sent = metrics.upstream_requests.with_label_values(&["o#a", "delete_conversation", "200"]);
        let refused = metrics.rejected.with_label_values(&["o#a", "delete_conversation", "user_rate_limited"]);
        // Eleven samples a second apart: one call sent each second, and two refused in the last second.
        for second in 0..=10 {
            if second > 0 {
                sent.inc();
            }
            if second == 10 {
                refused.inc_by(2);
            }
            board.history.lock().unwrap().push_back(Sample::of(&metrics));
        }
        let shown = board.lane("o#a", &lane());
        assert_eq!(shown["sent_total"], 10);
        assert_eq!(shown["sent_last_second"], 1);
        assert_eq!(shown["sent_per_bar"], json!([5, 5]));
        assert_eq!(shown["refused_last_minute"], json!({"user_rate_limited": 2}));
        assert_eq!(board.lane("x#y", &lane())["sent_total"], 0, "another app's lane");
    }

    #[test]
    fn the_history_is_sampled_under_names_metrics_exports() {
        let metrics = Metrics::new();
        metrics.upstream_requests.with_label_values(&["o#a", "clear_user_messages", "200"]).inc();
        metrics.upstream_requests.with_label_values(&["o#a", "clear_user_messages", "503"]).inc();
        let sample = Sample::of(&metrics);
        assert_eq!(sample.sent.get(&("o#a".to_owned(), "clear_user_messages".to_owned())), Some(&2));
    }
}
