//! Whole-config reload. On SIGHUP, or when the config file or a secret file it names changes, the config is read
//! again and checked in full: as `check-config` checks it, then every new app's (or changed credentials') first
//! App Token. A config with any problem changes nothing; its problems are logged with `check-config`'s messages
//! and counted. A good one is applied at once: each connection serves its next request with a stack built from
//! it, while requests in flight finish under the config they started with. A reload keeps the token of every app
//! whose credentials are unchanged, what the quota has counted (`QuotaSet::reloaded`: no fresh burst), every
//! connection, the jobs and the audit trail. Settings it cannot change (sockets, threads, pools, stores) keep
//! their values and are reported as waiting for a restart.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::apps::digest_parts;
use crate::bootstrap;
use crate::config::{Config, SecretPolicy};
use crate::logging::LogLevel;
use crate::stack::Shared;
use crate::status::StatusBoard;
use crate::upstream::Upstream;

/// Watches for reasons to reload, and reloads.
pub struct Reloader {
    /// The config file; without one (`demo`) there is nothing to reload.
    pub path: Option<PathBuf>,
    pub policy: SecretPolicy,
    /// The config in force, its restart-only settings as the gateway started with them.
    pub current: Config,
    /// What every connection's stack is built from.
    pub live: watch::Sender<Arc<Shared>>,
    /// Every worker's upstream shares its timeout with this one.
    pub upstream: Upstream,
    pub log: Option<LogLevel>,
    /// Where the status page reads the last reload's outcome.
    pub status: Arc<StatusBoard>,
}

/// Why a reload changed nothing: every problem, one per line.
#[derive(Debug)]
pub struct Rejected {
    pub problems: Vec<String>,
    /// Easemob did not grant a token with new credentials (perhaps only for now): tried again at the next poll.
    pub credentials: bool,
}

impl Reloader {
    /// Reloads on SIGHUP, and whenever `server.reload_poll` finds the config file or a secret file changed.
    pub async fn run(mut self) {
        let mut hangups = signal(SignalKind::hangup())
            .inspect_err(|e| warn!(error = %e, "no SIGHUP handler: reload by signal is off"))
            .ok();
        let Some(path) = self.path.clone() else {
            // SIGHUP's default action would end the process.
            while let Some(hangups) = hangups.as_mut() {
                hangups.recv().await;
                warn!("SIGHUP received, but there is no config file to reload (demo mode)");
            }
            return;
        };
        let mut seen = inputs(&path, &self.current);
        loop {
            let poll = self.current.server.reload_poll;
            let hangup = tokio::select! {
                Some(()) = async { hangups.as_mut()?.recv().await } => true,
                _ = tokio::time::sleep(poll), if !poll.is_zero() => false,
                else => return,
            };
            let now = inputs(&path, &self.current);
            if hangup {
                info!(config = %path.display(), "SIGHUP received: reopening the audit file, reloading the config");
                // After logrotate renamed it away: the chain goes on in a new file.
                let audit = self.live.borrow().audit.clone();
                if let Some(audit) = audit {
                    let _ = tokio::task::spawn_blocking(move || audit.reopen()).await;
                }
            } else if now == seen {
                continue;
            } else {
                info!(config = %path.display(), "the config file or a secret file changed: reloading the config");
            }
            seen = now;
            if let Err(rejected) = self.reload().await
                && rejected.credentials
            {
                seen = None;
            }
        }
    }

    /// Reads, checks and applies the config file; logged and counted either way.
    pub async fn reload(&mut self) -> Result<(), Rejected> {
        let metrics = self.live.borrow().metrics.clone();
        let result = self.apply().await;
        match &result {
            Ok(restart) => {
                metrics.config_reloads.with_label_values(&["applied"]).inc();
                metrics.config_last_reload_successful.set(1);
                metrics.config_restart_required.set(i64::from(!restart.is_empty()));
                self.status.reloaded(true, &[], restart);
                if !restart.is_empty() {
                    warn!(settings = restart.join(", "), "config reloaded; these settings take effect after a restart");
                }
            }
            Err(rejected) => {
                metrics.config_reloads.with_label_values(&["rejected"]).inc();
                metrics.config_last_reload_successful.set(0);
                self.status.reloaded(false, &rejected.problems, &[]);
                for problem in &rejected.problems {
                    warn!(problem = %problem, "config not reloaded; the running config stays in force");
                }
            }
        }
        result.map(drop)
    }

    /// Returns the settings that changed but wait for a restart.
    async fn apply(&mut self) -> Result<Vec<&'static str>, Rejected> {
        let path = self.path.as_ref().expect("a config file to reload");
        let problems = |problems, credentials| Rejected { problems, credentials };
        let mut config = Config::load_checked(path, self.policy)
            .map_err(|e| problems(e.lines().map(str::to_owned).collect(), false))?;
        let restart = keep_restart_only(&mut config, &self.current);
        // The settings kept must agree with the new ones (a data plane beyond loopback still needs `allow_from`).
        let found = config.problems(self.policy);
        if !found.is_empty() {
            return Err(problems(found, false));
        }
        let previous = Arc::clone(&self.live.borrow());
        let shared =
            bootstrap::reconfigure(&config, &previous, &self.upstream).await.map_err(|found| problems(found, true))?;

        // Checked in full: from here on nothing fails.
        let (apps, was) = (&shared.apps, &previous.apps);
        let kept = apps.iter().filter(|app| was.iter().any(|p| Arc::ptr_eq(&p.token, &app.token))).count();
        let (added, removed) = (
            apps.iter().filter(|app| was.iter().all(|p| p.key != app.key)).count(),
            was.iter().filter(|p| apps.iter().all(|app| app.key != p.key)).count(),
        );
        self.upstream.set_timeout(config.upstream.timeout);
        if config.log.level != self.current.log.level
            && let Some(log) = &self.log
        {
            match log.set(&config.log.level) {
                Ok(true) => {}
                Ok(false) => warn!("log.level changed, but RUST_LOG is set and wins"),
                Err(e) => warn!(error = %e, "log.level could not be applied"),
            }
        }
        shared.quota.report();
        self.live.send_replace(Arc::new(shared));
        info!(apps = config.apps.len(), added, removed, tokens_kept = kept, "config reloaded");
        self.current = config;
        Ok(restart)
    }
}

/// A digest of what a reload reads from files: the config file and every `client_secret_file` it names. `None`
/// when one cannot be read (a reload will say why).
fn inputs(path: &std::path::Path, config: &Config) -> Option<[u8; 32]> {
    let files = std::iter::once(path).chain(config.apps.iter().filter_map(|app| app.client_secret_file.as_deref()));
    let contents: Vec<Vec<u8>> = files.map(std::fs::read).collect::<Result<_, _>>().ok()?;
    Some(digest_parts(contents.iter().map(Vec::as_slice)))
}

/// Takes from `running` every setting a running gateway cannot change (its sockets, threads, pools, stores) into
/// `new`, and returns the keys of those `new` had changed: a reload applies the rest, and reports these as waiting
/// for a restart.
pub fn keep_restart_only(new: &mut Config, running: &Config) -> Vec<&'static str> {
    let mut waiting = Vec::new();
    let mut keep = |key, changed| {
        if changed {
            waiting.push(key);
        }
    };
    let (server, was) = (&mut new.server, &running.server);
    keep("server.listen", kept(&mut server.listen, &was.listen));
    keep("server.admin_listen", kept(&mut server.admin_listen, &was.admin_listen));
    keep("server.header_read_timeout", kept(&mut server.header_read_timeout, &was.header_read_timeout));
    keep("server.max_in_flight", kept(&mut server.max_in_flight, &was.max_in_flight));
    keep("server.max_connections", kept(&mut server.max_connections, &was.max_connections));
    keep("server.shutdown_grace", kept(&mut server.shutdown_grace, &was.shutdown_grace));
    keep("server.workers", kept(&mut server.workers, &was.workers));
    let (upstream, was) = (&mut new.upstream, &running.upstream);
    keep("upstream.base_url", kept(&mut upstream.base_url, &was.base_url));
    keep("upstream.connect_timeout", kept(&mut upstream.connect_timeout, &was.connect_timeout));
    keep("upstream.ca_file", kept(&mut upstream.ca_file, &was.ca_file));
    keep("upstream.pool_idle_timeout", kept(&mut upstream.pool_idle_timeout, &was.pool_idle_timeout));
    keep("upstream.pool_max_idle_per_host", kept(&mut upstream.pool_max_idle_per_host, &was.pool_max_idle_per_host));
    keep("rate_limit.backend", kept(&mut new.rate_limit.backend, &running.rate_limit.backend));
    keep("rate_limit.redis", kept(&mut new.rate_limit.redis, &running.rate_limit.redis));
    keep("log.format", kept(&mut new.log.format, &running.log.format));
    keep("audit", kept(&mut new.audit, &running.audit));
    keep("jobs", kept(&mut new.jobs, &running.jobs));
    keep("trace", kept(&mut new.trace, &running.trace));
    waiting
}

/// Puts `running` back in place of `new`; true if they differed.
fn kept<T: PartialEq + Clone>(new: &mut T, running: &T) -> bool {
    let changed = new != running;
    if changed {
        new.clone_from(running);
    }
    changed
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::num::NonZeroU32;
    use std::time::Duration;

    use serde::Deserialize;

    use super::keep_restart_only;
    use crate::config::fixtures::{MINIMAL, every_key_set, write};
    use crate::config::{Config, format_duration};

    #[test]
    fn a_reload_keeps_the_settings_that_need_a_restart_and_names_them() {
        let running = Config::load(write(MINIMAL).path()).unwrap();
        let mut new = running.clone();
        new.server.listen = "127.0.0.1:1".parse().unwrap();
        new.jobs.concurrency = 7;
        new.rate_limit.route.rate = NonZeroU32::new(50).unwrap();
        new.upstream.timeout = Duration::from_secs(3);
        assert_eq!(keep_restart_only(&mut new, &running), ["server.listen", "jobs"]);
        assert_eq!(new.server.listen, running.server.listen);
        assert_eq!(new.jobs, running.jobs);
        assert_eq!(new.rate_limit.route.rate.get(), 50, "a quota is reloaded");
        assert_eq!(new.upstream.timeout, Duration::from_secs(3), "and so is the upstream timeout");
        assert!(keep_restart_only(&mut new.clone(), &new).is_empty());
    }

    /// What a page names as waiting for a restart, in its list between `after` and `before`: keys
    /// (`server.listen`), key prefixes (`upstream.pool_`, from `upstream.pool_*`) and sections (`jobs`, from `[jobs]`).
    fn documented_restart_only(page: &str, after: &str, before: &str) -> Vec<String> {
        let page = std::fs::read_to_string(format!("{}/docs/{page}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let list = page.split(after).nth(1).unwrap().split(before).next().unwrap();
        list.split('`').skip(1).step_by(2).map(|name| name.trim_matches(['[', ']', '*']).to_owned()).collect()
    }

    /// Every key of `value` that holds no table, as `section.key` (arrays left out).
    fn leaves(value: &toml::Value, prefix: &str, out: &mut Vec<String>) {
        let toml::Value::Table(table) = value else { return };
        for (key, value) in table {
            let key = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
            match value {
                toml::Value::Table(_) => leaves(value, &key, out),
                toml::Value::Array(_) => {}
                _ => out.push(key),
            }
        }
    }

    #[test]
    fn the_configuration_reference_names_exactly_the_settings_a_reload_keeps_for_a_restart() {
        let written = toml::Value::try_from(every_key_set()).unwrap();
        let running = Config::deserialize(written.clone()).unwrap();
        let documented = documented_restart_only("configuration.md", "named in the log:", ". See");
        let operations = documented_restart_only("operations.md", "**What needs a restart.**", ". A reload");
        assert_eq!(documented, operations, "configuration.md and operations.md name the same settings");
        let mut keys = Vec::new();
        leaves(&written, "", &mut keys);
        for key in keys {
            let mut values = written.clone();
            let old = at(&mut values, &key).clone();
            // Another value the key accepts: the first of these that the config reads.
            let candidates = match &old {
                toml::Value::Integer(n) => vec![toml::Value::Integer(n + 1)],
                toml::Value::Float(x) => vec![toml::Value::Float(x / 2.0)],
                toml::Value::Boolean(b) => vec![toml::Value::Boolean(!b)],
                toml::Value::String(s) => {
                    let duration =
                        humantime::parse_duration(s).ok().map(|d| format_duration(d + Duration::from_secs(1)));
                    let addr = s.parse::<SocketAddr>().ok().map(|a| SocketAddr::new(a.ip(), a.port() + 1).to_string());
                    let others = ["redis".to_owned(), "json".to_owned(), format!("{s}x")];
                    duration.into_iter().chain(addr).chain(others).map(toml::Value::String).collect()
                }
                other => panic!("{key} = {other}: no other value to try"),
            };
            let changed = candidates.into_iter().find_map(|candidate| {
                *at(&mut values, &key) = candidate;
                Config::deserialize(values.clone()).ok()
            });
            let mut changed = changed.unwrap_or_else(|| panic!("no other value of {key} reads"));
            let waits = !keep_restart_only(&mut changed, &running).is_empty();
            let named = documented.iter().any(|d| {
                key == *d || key.starts_with(&format!("{d}.")) || (d.ends_with('_') && key.starts_with(d.as_str()))
            });
            assert_eq!(waits, named, "{key}: waits for a restart, and configuration.md says so");
        }
    }

    /// The value at `key` (`section.key`) in `values`.
    fn at<'v>(values: &'v mut toml::Value, key: &str) -> &'v mut toml::Value {
        key.split('.').fold(values, |at, part| at.get_mut(part).expect("a key of the config"))
    }
}
