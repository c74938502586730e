//! The jobs' share of the quota (`jobs.quota_share`): a deletion job's call takes a slot only when it costs direct
//! calls nothing, and never more than the share of its lane or of the AppKey cap. Paced like the limits
//! themselves, beside them: a share less than the whole is one more gate a job's call must pass.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{AppKey, Limit, RateLimitConfig};
use crate::routes::Route;

use super::decision::{AppIndex, Refusal, SECOND, Scope};
use super::pace::{Pace, scaled};

pub struct JobsShare {
    /// Per lane (indexed as the limits' lanes), the jobs' part of it, when less than the whole.
    lanes: Vec<Option<Arc<Pace>>>,
    /// Per app, the jobs' part of its cap (when both exist and the share is less than the whole).
    apps: Vec<Option<Arc<Pace>>>,
}

impl JobsShare {
    /// `config.jobs_share` of every limit in `config`, for `apps`. `previous`: the share a reload replaces (with
    /// its apps), whose unchanged paces carry over, so a reload hands the jobs no fresh burst of the cap.
    pub fn new(config: &RateLimitConfig, apps: &[AppKey], previous: Option<(&[AppKey], &JobsShare)>) -> JobsShare {
        let share = config.jobs_share;
        let before = |app: &AppKey| previous.and_then(|(keys, p)| Some((p, AppIndex::of(keys, app)?)));
        let part = |limit: Limit| (share < 1.0).then(|| Limit { rate: scaled(limit, share), burst: NonZeroU32::MIN });
        let lanes = apps.iter().flat_map(|app| {
            Route::ALL.map(|route| {
                let part = part(config.route_limit(route.name()))?;
                let kept = before(app).and_then(|(p, i)| p.lanes[i.lane(route)].as_ref());
                Some(match kept {
                    Some(pace) if pace.rate() == part.rate.get() => Arc::clone(pace),
                    _ => Arc::new(Pace::new(part.rate, part.burst, SECOND)),
                })
            })
        });
        let cap = config.app.and_then(part);
        JobsShare {
            lanes: lanes.collect(),
            apps: apps.iter().map(|app| Pace::carried(before(app).map(|(p, i)| &p.apps[i.0]), cap, SECOND)).collect(),
        }
    }

    /// Takes a slot of the jobs' share of the route and of the cap, or says which is full and when to try again.
    pub fn check(&self, app: AppIndex, route: Route) -> Result<(), Refusal> {
        if let Some(jobs) = &self.lanes[app.lane(route)] {
            jobs.check().map_err(|wait| (Scope::Route, wait))?;
        }
        if let Some(jobs) = &self.apps[app.0] {
            jobs.check().map_err(|wait| (Scope::App, wait))?;
        }
        Ok(())
    }

    /// The spacing of the jobs' calls on a route, when their share is less than the whole.
    pub fn interval(&self, app: AppIndex, route: Route) -> Option<Duration> {
        self.lanes[app.lane(route)].as_ref().map(|jobs| jobs.interval())
    }

    /// The jobs' part of the AppKey cap, when there is one.
    pub fn cap(&self, app: AppIndex) -> Option<&Pace> {
        self.apps[app.0].as_deref()
    }

    /// Resumes the share after a restart, as [`Limits::resume`](super::local::Limits::resume) does the limits.
    pub fn resume(&self, app: AppIndex, used: &[(Route, Duration)]) {
        for (route, ago) in used {
            self.lanes[app.lane(*route)].iter().for_each(|jobs| jobs.resume(*ago));
        }
        if let (Some(cap), Some(latest)) = (self.cap(app), used.iter().map(|(_, ago)| *ago).min()) {
            cap.resume(latest);
        }
    }
}
