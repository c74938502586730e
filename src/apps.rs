//! The configured apps, each with its AppKey, its App Token and one [`Lane`] per route: the table every layer
//! reads (the quota by the app's index, metrics and `RateLimit-Policy` by lane). Built at start-up and again by
//! each reload, which keeps the token of every app whose credentials did not change.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use secrecy::ExposeSecret;

use crate::config::{AppKey, Config};
use crate::metrics::{LaneMetrics, Metrics};
use crate::ratelimit::{AppIndex, QuotaSet};
use crate::routes::Route;
use crate::token::{Credentials, EasemobFetch, TokenSource};
use crate::upstream::Upstream;

pub struct App {
    /// Position in the config, which is also its index in `quota`.
    pub index: AppIndex,
    pub org: String,
    pub app: String,
    pub key: AppKey,
    pub token: Arc<TokenSource>,
    /// The quota set the app's lanes belong to (the one built with it, by start-up or a reload).
    pub quota: Arc<QuotaSet>,
    /// A digest of the credentials the token was fetched with (client ID, secret): a reload keeps the token when
    /// they and the token settings are unchanged. Never the secret itself.
    fetched_with: [u8; 32],
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
        fetched_with: [u8; 32],
        quota: &Arc<QuotaSet>,
        metrics: &Metrics,
    ) -> App {
        let key = AppKey::new(org, app);
        let lanes = Route::ALL.map(|route| Lane {
            route,
            policy: quota.policy(index, route),
            metrics: metrics.lane(key.as_str(), route),
        });
        App {
            index,
            org: org.to_owned(),
            app: app.to_owned(),
            key,
            token,
            quota: Arc::clone(quota),
            fetched_with,
            lanes,
        }
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

    /// The apps `config` names, on `quota`. An app that `previous` served with the same credentials and token
    /// settings keeps its token source, and so its token; any other gets a new source, fetching at once. With
    /// `verify_within`, every new source must have been granted a token within that time, or nothing is kept and
    /// the reasons are returned: a reload adds an app, or new credentials, only once Easemob accepts them.
    pub async fn assemble(
        config: &Config,
        quota: &Arc<QuotaSet>,
        upstream: &Upstream,
        metrics: &Metrics,
        previous: Option<&Apps>,
        verify_within: Option<Duration>,
    ) -> Result<Apps, Vec<String>> {
        let mut apps = Vec::with_capacity(config.apps.len());
        let mut fresh = Vec::new();
        for (index, app) in config.apps.iter().enumerate() {
            let secret = app.resolve_secret().map_err(|e| vec![e.to_string()])?;
            let fetched_with = digest_parts([app.client_id.as_bytes(), secret.expose_secret().as_bytes()]);
            let key = app.app_key();
            let kept = previous.and_then(|apps| {
                apps.iter()
                    .find(|a| a.key == key && a.fetched_with == fetched_with && *a.token.config() == config.token)
            });
            let token = match kept {
                Some(kept) => Arc::clone(&kept.token),
                None => {
                    let credentials = Credentials {
                        org: app.org_name.clone(),
                        app: app.app_name.clone(),
                        client_id: app.client_id.clone(),
                        client_secret: secret,
                    };
                    let fetch = EasemobFetch { credentials, upstream: upstream.clone(), ttl: config.token.ttl };
                    let token = TokenSource::spawn(key.clone(), fetch, config.token.clone(), metrics.clone());
                    fresh.push((key, Arc::clone(&token)));
                    token
                }
            };
            let names = (app.org_name.as_str(), app.app_name.as_str());
            apps.push(Arc::new(App::new(AppIndex(index), names, token, fetched_with, quota, metrics)));
        }
        if let Some(within) = verify_within {
            // The sources fetch side by side; waiting for each in turn waits for the slowest.
            let mut refused = Vec::new();
            for (key, token) in &fresh {
                if let Err(reason) = token.first_outcome(within).await {
                    refused.push(format!("apps[{key}]: no App Token with these credentials: {reason}"));
                }
            }
            if !refused.is_empty() {
                return Err(refused);
            }
        }
        Ok(Apps::new(apps))
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

/// A SHA-256 digest of `parts`, each prefixed with its length (so that no two lists of parts digest alike): how a
/// reload tells that credentials or files changed without keeping them.
pub fn digest_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> [u8; 32] {
    use sha2::Digest;
    let mut digest = sha2::Sha256::new();
    for part in parts {
        digest.update((part.len() as u64).to_le_bytes());
        digest.update(part);
    }
    digest.finalize().into()
}
