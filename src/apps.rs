//! The configured apps, each with its AppKey, its App Token and one [`Lane`] per route: the table every layer
//! reads (the quota by the app's index, metrics and `RateLimit-Policy` by lane).

use std::sync::Arc;

use http::HeaderValue;

use crate::config::AppKey;
use crate::metrics::{LaneMetrics, Metrics};
use crate::ratelimit::{AppIndex, QuotaSet};
use crate::routes::Route;
use crate::token::TokenSource;

pub struct App {
    /// Position in the config, which is also its index in the quota set.
    pub index: AppIndex,
    pub org: String,
    pub app: String,
    pub key: AppKey,
    pub token: Arc<TokenSource>,
    lanes: [Lane; Route::ALL.len()],
}

/// One (app, route): what every request of that lane touches, resolved once.
pub struct Lane {
    pub route: Route,
    /// Every answer of the lane states its quota, even one the quota never decided on.
    pub policy: HeaderValue,
    pub metrics: LaneMetrics,
}

impl App {
    pub fn new(
        index: AppIndex,
        (org, app): (&str, &str),
        token: Arc<TokenSource>,
        quota: &QuotaSet,
        metrics: &Metrics,
    ) -> App {
        let key = AppKey::new(org, app);
        let lanes = Route::ALL.map(|route| Lane {
            route,
            policy: quota.policy(index, route),
            metrics: metrics.lane(key.as_str(), route),
        });
        App { index, org: org.to_owned(), app: app.to_owned(), key, token, lanes }
    }

    pub fn lane(&self, route: Route) -> &Lane {
        &self.lanes[route.index()]
    }
}

/// The apps in config order.
#[derive(Clone)]
pub struct Apps(Arc<[Arc<App>]>);

impl Apps {
    pub fn new(apps: Vec<Arc<App>>) -> Apps {
        Apps(apps.into())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<App>> {
        self.0.iter()
    }

    /// The app a path's `/{org}/{app}` prefix names (case-insensitively, as Easemob compares them), or the only
    /// app when the prefix is left out.
    pub fn find(&self, named: Option<(&str, &str)>) -> Result<&Arc<App>, Unfound> {
        match named {
            Some((org, app)) => self
                .0
                .iter()
                .find(|a| a.org.eq_ignore_ascii_case(org) && a.app.eq_ignore_ascii_case(app))
                .ok_or(Unfound::NotConfigured),
            None => match &*self.0 {
                [only] => Ok(only),
                _ => Err(Unfound::NotNamed),
            },
        }
    }
}

/// Why a request is for no configured app.
#[derive(Debug, PartialEq, Eq)]
pub enum Unfound {
    /// The path names an app that is not configured.
    NotConfigured,
    /// Several apps are configured and the path names none.
    NotNamed,
}
