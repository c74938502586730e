//! Typed configuration: a TOML file overridden by `EASEMOB_GW__…` environment variables, read strictly once
//! (`load.rs`) into the types below, then checked as a whole so every problem is reported on its own line.
//!
//! Each section owns its type, its defaults and its checks, in a file of its own: `server`, `upstream`, `token`,
//! `rate_limit` (with Redis), `jobs`, `apps`, `callers`, `audit`, `log`, `trace`. This module only combines them:
//! the [`Config`] they make up, and [`Config::problems`], every section's problems in one list. Beside them:
//! `load` (strict reading, which knows no section), `secret` (how a secret is held), `duration` (how durations read
//! and print). What a reload may not change is the reload's own rule (`reload.rs`).

mod apps;
mod audit;
mod callers;
mod duration;
mod jobs;
mod load;
mod log;
mod rate_limit;
mod secret;
mod server;
mod strict;
mod token;
mod trace;
mod upstream;

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use apps::{AppConfig, AppKey, SecretError};
pub use audit::AuditConfig;
pub use callers::{CallerConfig, is_plain_label};
pub use duration::format_duration;
pub use jobs::JobsConfig;
pub use load::ENV_PREFIX;
pub use log::{LogConfig, LogFormat};
pub use rate_limit::{Limit, RateLimitBackend, RateLimitConfig, RedisConfig};
pub use secret::{InlineSecret, SecretPolicy};
pub use server::ServerConfig;
pub use token::{MAX_TOKEN_WAIT, TokenConfig};
pub use trace::TraceConfig;
pub use upstream::{BaseUrl, UpstreamConfig};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub token: TokenConfig,
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub trace: TraceConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub jobs: JobsConfig,
    /// Callers known by key: when any is configured, every request must present one in `X-Gateway-Key`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub callers: Vec<CallerConfig>,
    #[serde(default)]
    pub apps: Vec<AppConfig>,
    /// The values as the file and the environment wrote them, so the effective config shows durations as written.
    #[serde(skip)]
    pub written: Written,
}

/// The values a config was read from, kept only to print durations as written; never printed themselves.
#[derive(Clone, Default)]
pub struct Written(Option<toml::Value>);

impl fmt::Debug for Written {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Written(..)")
    }
}

/// What reading a config file gave: the config, with the default of any key that did not fit in its place
/// (none when a required key did not fit), and the problems found so far, one line each.
pub struct Loaded {
    config: Option<Config>,
    problems: Vec<String>,
}

impl Loaded {
    /// The config, if every value fit its key; the checks of `Config::problems` are left to the caller.
    pub fn parsed(self) -> Result<Config, String> {
        match self.config {
            Some(config) if self.problems.is_empty() => Ok(config),
            _ => Err(self.problems.join("\n")),
        }
    }

    /// The config, if every value fit its key and it passes `Config::problems`; else every problem of both,
    /// one per line, in one run: a key that did not fit hides none of the other checks.
    pub fn checked(self, policy: SecretPolicy) -> Result<Config, String> {
        let mut problems = self.problems;
        if let Some(config) = &self.config {
            problems.extend(config.problems(policy));
        }
        match self.config {
            Some(config) if problems.is_empty() => Ok(config),
            _ => Err(problems.join("\n")),
        }
    }
}

impl Config {
    /// Reads `path` (TOML) with the process's `EASEMOB_GW__…` overrides: the types only, as `Loaded::parsed`.
    pub fn load(path: &Path) -> Result<Config, String> {
        Config::read(path, std::env::vars()).parsed()
    }

    /// Reads `path` with the process's overrides and checks it in full, as `Loaded::checked`: what `serve`,
    /// `check-config` and a reload use.
    pub fn load_checked(path: &Path, policy: SecretPolicy) -> Result<Config, String> {
        Config::read(path, std::env::vars()).checked(policy)
    }

    /// Reads `path` (TOML), applies the `EASEMOB_GW__…` overrides among `env` and deserializes, strictly, as
    /// `load::strictly` says: every value that does not fit its key is a problem, and its key's default stands in
    /// for it, so that the checks of `problems` still run.
    pub fn read(path: &Path, env: impl IntoIterator<Item = (String, String)>) -> Loaded {
        let (read, problems) = load::strictly::<Config>(path, env, &[rate_limit::MOVED, token::MOVED].concat());
        let config = read.map(|(config, values)| Config { written: Written(Some(values)), ..config });
        Loaded { config, problems }
    }

    /// The effective config as TOML, with every secret redacted.
    pub fn to_redacted_toml(&self) -> String {
        let mut effective = toml::Value::try_from(self).expect("config serializes to TOML");
        if let Some(written) = &self.written.0 {
            duration::as_written(&mut effective, written);
        }
        toml::to_string_pretty(&effective).expect("config serializes to TOML")
    }

    /// Every problem with this config, one line each, section by section; empty when it can run. Sections that
    /// name files or environment variables (apps' secrets, CA files, the jobs' store) look for them.
    pub fn problems(&self, policy: SecretPolicy) -> Vec<String> {
        let mut problems = apps::problems(&self.apps, policy);
        problems.extend(self.token.problems());
        problems.extend(self.upstream.problems());
        problems.extend(self.server.problems());
        problems.extend(callers::problems(&self.callers));
        problems.extend(self.rate_limit.problems());
        problems.extend(self.jobs.problems(self.rate_limit.backend, &self.upstream));
        problems.extend(self.audit.problems());
        problems.extend(self.log.problems());
        problems.extend(self.trace.problems());
        problems
    }
}

#[cfg(test)]
/// Configs for the unit tests of the config and of what reads it (the reload's restart-only rule).
pub(crate) mod fixtures {
    use std::io::Write;
    use std::path::PathBuf;
    use std::time::Duration;

    use secrecy::SecretString;

    use super::{CallerConfig, Config, InlineSecret};

    pub(crate) fn write(contents: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(contents.as_bytes()).unwrap();
        f
    }

    pub(crate) const MINIMAL: &str = r#"
        [upstream]
        base_url = "https://a1.easemob.com/"
        [[apps]]
        org_name = "1122161011178276"
        app_name = "demo"
        client_id = "YXA6id"
        client_secret_file = "/nonexistent/secret"
    "#;

    /// `MINIMAL` with every optional key set, so that each shows in the effective config.
    pub(crate) fn every_key_set() -> Config {
        let mut c = Config::load(write(MINIMAL).path()).unwrap();
        // Every optional key set, so that each shows in the effective config.
        c.server.allow_from = vec!["10.0.0.0/8".parse().unwrap()];
        c.upstream.ca_file = Some(PathBuf::from("ca.pem"));
        c.token.ttl = Some(Duration::from_secs(60));
        c.rate_limit.routes.insert("delete_chat_messages".to_owned(), c.rate_limit.route);
        c.rate_limit.app = Some(c.rate_limit.route);
        let redis = &mut c.rate_limit.redis;
        (redis.username, redis.password_env) = (Some("u".to_owned()), Some("P".to_owned()));
        (redis.password_file, redis.ca_file) = (Some(PathBuf::from("p")), Some(PathBuf::from("c")));
        (c.audit.file, c.audit.default_caller) = (Some(PathBuf::from("a")), Some("x".to_owned()));
        c.audit.replica = Some("gw-0".to_owned());
        c.jobs.store = Some(PathBuf::from("jobs.db"));
        c.trace.otlp_endpoint = Some("http://127.0.0.1:4318/v1/traces".to_owned());
        c.callers = vec![CallerConfig { name: "n".to_owned(), key_sha256: "0".repeat(64) }];
        c.jobs.max_body_bytes = Some(1 << 20);
        let app = &mut c.apps[0];
        (app.client_secret_env, app.client_secret) =
            (Some("S".to_owned()), Some(InlineSecret(SecretString::from("s"))));
        c
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{MINIMAL, every_key_set, write};
    use super::*;
    use std::num::NonZeroU32;
    use std::path::PathBuf;
    use std::time::Duration;

    #[test]
    fn defaults_fill_everything_but_upstream_and_apps() {
        let c = Config::load(write(MINIMAL).path()).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.upstream.base_url.as_str(), "https://a1.easemob.com");
        assert_eq!(c.upstream.timeout, Duration::from_secs(10));
        assert_eq!(c.apps[0].org_name, "1122161011178276");
        assert_eq!(c.problems(SecretPolicy::ExternalOnly).len(), 1, "only the unreadable secret file");
    }

    #[test]
    fn unknown_keys_and_bad_durations_are_one_line_errors() {
        let e = Config::load(write(&format!("{MINIMAL}\n[server]\nlisten_addr = \"x\"")).path()).unwrap_err();
        assert!(e.contains("listen_addr"), "{e}");
        let e = Config::load(write(&MINIMAL.replace("[upstream]", "[upstream]\ntimeout = \"10 parsecs\"")).path())
            .unwrap_err();
        assert!(e.contains("timeout") || e.contains("parsecs"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn each_replica_enforces_every_limit_divided_by_the_replicas_never_below_one() {
        let toml = format!(
            "{MINIMAL}\n[rate_limit]\nreplicas = 3\nroute = {{ rate = 100, burst = 10 }}\napp = {{ rate = 2 }}\n\
             routes.delete_chat_messages = {{ rate = 200 }}\n"
        );
        let c = Config::load(write(&toml).path()).unwrap().rate_limit;
        let mine = c.per_replica();
        let limit =
            |rate, burst| Limit { rate: NonZeroU32::new(rate).unwrap(), burst: NonZeroU32::new(burst).unwrap() };
        assert_eq!(mine.route, limit(33, 3));
        assert_eq!(mine.route_limit("delete_chat_messages"), limit(66, 1), "an override is divided too");
        assert_eq!(mine.app, Some(limit(1, 1)), "2 / 3 rounds down, but never to 0 (unlimited)");
        assert_eq!(mine.user_conversation_per_minute.get(), 1, "5 / 3");
        let note = c.per_replica_note();
        assert!(note.contains("#   route: 33 calls/s, burst 3\n"), "{note}");
        assert!(note.contains("#   user_conversation_per_minute: 1\n"), "{note}");
        assert!(note.lines().all(|l| l.is_empty() || l.starts_with('#')), "TOML comments only: {note}");
    }

    #[test]
    fn the_old_expected_replicas_key_is_refused_with_a_line_naming_its_new_place() {
        let toml = format!("{MINIMAL}\n[rate_limit.redis]\nexpected_replicas = 2\n");
        let e = Config::load(write(&toml).path()).unwrap_err();
        assert!(e.contains("rate_limit.redis.expected_replicas: moved: set rate_limit.replicas"), "{e}");
    }

    #[test]
    fn the_old_secret_file_poll_key_is_refused_with_a_line_naming_the_reload_poll() {
        let toml = format!("{MINIMAL}\n[token]\nsecret_file_poll = \"10s\"\n");
        let e = Config::load(write(&toml).path()).unwrap_err();
        assert!(e.contains("token.secret_file_poll: moved: set server.reload_poll"), "{e}");
    }

    #[test]
    fn inline_secret_is_refused_outside_demo_and_never_printed() {
        let toml =
            MINIMAL.replace("client_secret_file = \"/nonexistent/secret\"", "client_secret = \"hunter2-secret\"");
        let c = Config::load(write(&toml).path()).unwrap();
        let problems = c.problems(SecretPolicy::ExternalOnly);
        assert!(problems[0].contains("for `demo` only"), "{problems:?}");
        assert!(c.problems(SecretPolicy::InlineAllowed).is_empty());
        assert!(!c.to_redacted_toml().contains("hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"));
        // Of the wrong type, it is refused without being shown.
        let toml = MINIMAL.replace("client_secret_file = \"/nonexistent/secret\"", "client_secret = 20240607");
        let e = Config::load(write(&toml).path()).unwrap_err();
        assert!(e.ends_with("apps[0].client_secret: expected a string, found an integer"), "{e}");
    }

    #[test]
    fn workers_default_to_the_cpus_and_a_typo_is_refused() {
        let mut c = Config::load(write(MINIMAL).path()).unwrap();
        assert_eq!(c.server.workers, 0);
        assert_eq!(c.server.worker_threads(), std::thread::available_parallelism().unwrap().get());
        c.server.workers = 3;
        assert_eq!(c.server.worker_threads(), 3);
        c.server.workers = 10_000;
        assert!(c.problems(SecretPolicy::ExternalOnly).iter().any(|p| p.contains("server.workers is 10000")));
    }

    #[test]
    fn jobs_need_a_store_of_their_own_backend_and_a_lease_longer_than_an_attempt() {
        let mut c = Config::load(write(MINIMAL).path()).unwrap();
        c.jobs.enabled = true;
        let problems = c.problems(SecretPolicy::InlineAllowed);
        assert!(problems.iter().any(|p| p.starts_with("jobs.enabled: set jobs.store")), "{problems:?}");
        c.rate_limit.backend = RateLimitBackend::Redis;
        c.jobs.store = Some(PathBuf::from("jobs.db"));
        let problems = c.problems(SecretPolicy::InlineAllowed);
        assert!(problems.iter().any(|p| p.starts_with("jobs.store: with rate_limit.backend")), "{problems:?}");
        c.jobs.store = None;
        c.jobs.lease = Duration::from_secs(26);
        let problems = c.problems(SecretPolicy::InlineAllowed);
        let lease = "jobs.lease 26s must be more than 2 × (upstream.timeout + 3s) = 26s:";
        assert!(problems.iter().any(|p| p.starts_with(lease)), "{problems:?}");
        c.jobs.lease = Duration::from_secs(27);
        let problems = c.problems(SecretPolicy::InlineAllowed);
        assert!(!problems.iter().any(|p| p.starts_with("jobs.lease")), "{problems:?}");
    }

    #[test]
    fn the_largest_job_request_follows_max_operations_unless_set_and_a_pair_that_contradicts_itself_is_refused() {
        let mut c = Config::load(write(MINIMAL).path()).unwrap();
        assert_eq!(c.jobs.max_body_bytes(), 100_000 * 256 + 65_536);
        c.jobs.max_operations = 10;
        assert_eq!(c.jobs.max_body_bytes(), 10 * 256 + 65_536);
        let about_size = |c: &Config| {
            c.problems(SecretPolicy::InlineAllowed)
                .into_iter()
                .filter(|p| p.starts_with("jobs.max_"))
                .collect::<Vec<_>>()
        };
        assert_eq!(about_size(&c), Vec::<String>::new());
        c.jobs.max_operations = 100_000;
        c.jobs.max_body_bytes = Some(1_000_000);
        assert_eq!(c.jobs.max_body_bytes(), 1_000_000);
        let cannot = "jobs.max_body_bytes 1000000 cannot hold jobs.max_operations 100000 operations";
        assert!(about_size(&c).iter().any(|p| p.starts_with(cannot)), "{:?}", about_size(&c));
        c.jobs.max_body_bytes = Some(6_400_000);
        assert_eq!(about_size(&c), Vec::<String>::new());
    }

    #[test]
    fn a_redis_password_comes_from_a_file_or_the_environment_never_the_url() {
        let mut c = Config::load(write(MINIMAL).path()).unwrap();
        c.rate_limit.backend = RateLimitBackend::Redis;
        let problems = |c: &Config| c.problems(SecretPolicy::InlineAllowed);
        c.rate_limit.redis.url = "redis://:hunter2@10.0.0.1:6379".to_owned();
        assert!(problems(&c).iter().any(|p| p.contains("must not hold credentials")), "{:?}", problems(&c));
        c.rate_limit.redis.url = "rediss://redis.example:6380".to_owned();
        c.rate_limit.redis.password_env = Some("TEST_REDIS_PASSWORD_UNSET".to_owned());
        c.rate_limit.redis.password_file = Some(PathBuf::from("/nonexistent"));
        assert!(problems(&c).iter().any(|p| p.contains("not both")), "{:?}", problems(&c));
        c.rate_limit.redis.password_file = None;
        assert!(problems(&c).iter().any(|p| p.contains("TEST_REDIS_PASSWORD_UNSET is not set")), "{:?}", problems(&c));
        c.rate_limit.redis.password_env = None;
        c.rate_limit.redis.url = "redis://10.0.0.1:6379".to_owned();
        c.rate_limit.redis.ca_file = Some(PathBuf::from("/etc/hostname"));
        assert!(problems(&c).iter().any(|p| p.contains("ca_file is for rediss://")), "{:?}", problems(&c));
        c.rate_limit.redis.ca_file = None;
        assert!(problems(&c).iter().all(|p| !p.contains("rate_limit")), "{:?}", problems(&c));
    }

    #[test]
    fn a_redis_cluster_is_a_flag_beside_the_url_and_has_only_database_0() {
        let toml = format!("{MINIMAL}\n[rate_limit]\nbackend = \"redis\"\n[rate_limit.redis]\ncluster = true\n");
        let mut c = Config::load(write(&toml).path()).unwrap();
        assert!(c.rate_limit.redis.cluster);
        let problems = |c: &Config| c.problems(SecretPolicy::InlineAllowed);
        for url in ["redis://10.0.0.1:6379", "rediss://cfg.example:6379/0"] {
            c.rate_limit.redis.url = url.to_owned();
            assert!(problems(&c).iter().all(|p| !p.contains("rate_limit")), "{url}: {:?}", problems(&c));
        }
        c.rate_limit.redis.url = "redis://10.0.0.1:6379/2".to_owned();
        assert!(problems(&c).iter().any(|p| p.contains("only database 0")), "{:?}", problems(&c));
        c.rate_limit.redis.cluster = false;
        assert!(problems(&c).iter().all(|p| !p.contains("rate_limit")), "{:?}", problems(&c));
    }

    #[test]
    fn every_problem_names_its_key_and_durations_print_as_written() {
        let toml = MINIMAL.replace("[upstream]", "[upstream]\ntimeout = \"10 parsecs\"\nconnect_timeout = \"1500ms\"")
            + "\n[server]\nlisten_addr = \"x\"\nmax_in_flight = \"lots\"\n";
        let e = Config::load(write(&toml).path()).unwrap_err();
        for key in [
            "upstream.timeout: expected a duration, found a string (\"10 parsecs\"): write upstream.timeout = \"10s\"",
            "server.listen_addr: unknown field",
            "server.max_in_flight",
        ] {
            assert!(e.contains(key), "{key} in {e}");
        }
        assert_eq!(e.lines().count(), 3, "{e}");
        let e = Config::load(write(&format!("{MINIMAL}\n[log]\nlevel = \"info\"\nlevel = \"debug\"\n")).path())
            .unwrap_err();
        assert!(e.contains("duplicate key (at `level`)"), "{e}");
        let fine = MINIMAL.replace("[upstream]", "[upstream]\nconnect_timeout = \"1500ms\"");
        let printed = Config::load(write(&fine).path()).unwrap().to_redacted_toml();
        assert!(printed.contains("connect_timeout = \"1500ms\""), "{printed}");
    }

    /// `MINIMAL` with `extra` added, read with `env` as the environment and checked in full (an inline secret
    /// allowed, so that only the problems the test makes are reported).
    fn check(extra: &str, env: &[(&str, &str)]) -> Result<Config, String> {
        let toml = MINIMAL.replace("client_secret_file = \"/nonexistent/secret\"", "client_secret = \"s\"");
        let file = write(&format!("{extra}\n{toml}"));
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::read(file.path(), env).checked(SecretPolicy::InlineAllowed)
    }

    #[test]
    fn a_float_is_not_an_integer() {
        for key in ["workers", "max_in_flight"] {
            let e = check(&format!("[server]\n{key} = 2.5"), &[]).unwrap_err();
            assert_eq!(e.lines().count(), 1, "{e}");
            assert!(e.ends_with(&format!("server.{key}: expected an integer from 0, found a float (2.5)")), "{e}");
        }
        assert_eq!(check("[server]\nworkers = 3", &[]).unwrap().server.workers, 3);
    }

    #[test]
    fn a_string_is_neither_a_number_nor_a_boolean() {
        let e = check("[server]\nworkers = \"2\"", &[]).unwrap_err();
        assert!(e.ends_with("server.workers: expected an integer from 0, found a string (\"2\")"), "{e}");
        let e = check("[jobs]\nenabled = \"no\"", &[]).unwrap_err();
        assert!(e.ends_with("jobs.enabled: expected a boolean, found a string (\"no\")"), "{e}");
        let e = check("[token]\nrefresh_at = \"0.5\"", &[]).unwrap_err();
        assert!(e.ends_with("token.refresh_at: expected a number, found a string (\"0.5\")"), "{e}");
    }

    #[test]
    fn durations_sizes_and_addresses_of_the_wrong_type_show_the_form_to_write() {
        for (extra, message) in [
            (
                "[server]\nheader_read_timeout = 10",
                "server.header_read_timeout: expected a duration, found an integer (10): write \
                 server.header_read_timeout = \"10s\"",
            ),
            (
                "[rate_limit]\nmax_wait = 1.5",
                "rate_limit.max_wait: expected a duration, found a float (1.5): write rate_limit.max_wait = \"1500ms\"",
            ),
            (
                "[server]\nlisten = 8080",
                "server.listen: expected a socket address, found an integer (8080): write \
                 server.listen = \"127.0.0.1:8080\"",
            ),
            (
                "[server]\nlisten = \"localhost\"",
                "server.listen: expected a socket address, found a string (\"localhost\"): write \
                 server.listen = \"127.0.0.1:8080\"",
            ),
            (
                "[jobs]\nmax_body_bytes = \"64MiB\"",
                "jobs.max_body_bytes: expected an integer from 0, found a string (\"64MiB\"): write \
                 jobs.max_body_bytes = 67108864",
            ),
        ] {
            let e = check(extra, &[]).unwrap_err();
            assert!(e.ends_with(message), "{message} in {e}");
        }
        let toml = MINIMAL.replace("[upstream]", "[upstream]\ntimeout = 10");
        let e = Config::load(write(&toml).path()).unwrap_err();
        assert!(e.ends_with(
            "upstream.timeout: expected a duration, found an integer (10): write upstream.timeout = \"10s\""
        ));
    }

    #[test]
    fn one_run_reports_a_misspelt_key_a_wrong_type_and_an_unreadable_secret_file() {
        let toml = format!("[server]\nlisten_adr = \"127.0.0.1:8080\"\nworkers = 2.5\n{MINIMAL}");
        let file = write(&toml);
        let e = Config::read(file.path(), []).checked(SecretPolicy::ExternalOnly).unwrap_err();
        let lines: Vec<_> = e.lines().collect();
        assert_eq!(lines.len(), 3, "{e}");
        assert!(
            lines[0].ends_with(
                "server.listen_adr: unknown field `listen_adr`, expected one of `listen`, \
             `admin_listen`, `header_read_timeout`, `body_read_timeout`, `allow_from`, `max_in_flight`, \
             `max_connections`, `shutdown_grace`, `workers`, `reload_poll`"
            ),
            "{e}"
        );
        assert!(lines[1].ends_with("server.workers: expected an integer from 0, found a float (2.5)"), "{e}");
        assert!(
            lines[2].starts_with("apps[1122161011178276#demo]: client_secret_file /nonexistent/secret cannot be read"),
            "{e}"
        );
    }

    #[test]
    fn a_required_key_that_does_not_fit_hides_no_other_key() {
        let e =
            check("[rate_limit.route]\nrate = 0\n[server]\nworkers = 2.5\n[token]\nrefresh_at = 2.0", &[]).unwrap_err();
        let lines: Vec<_> = e.lines().collect();
        assert_eq!(lines.len(), 3, "{e}");
        assert!(lines[0].ends_with("rate_limit.route.rate: expected an integer above 0, found an integer (0)"), "{e}");
        assert!(lines[1].ends_with("server.workers: expected an integer from 0, found a float (2.5)"), "{e}");
        assert!(lines[2].starts_with("token.refresh_at 2 must be between 0 and 1"), "{e}");
    }

    #[test]
    fn the_problems_the_configuration_reference_shows_are_the_ones_printed() {
        let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md")).unwrap();
        let shown = page.split("## Checking a file").nth(1).unwrap().split("```text\n").nth(1).unwrap();
        let shown: Vec<&str> = shown.split("```").next().unwrap().lines().collect();
        let toml = MINIMAL
            .replace("[upstream]", "[server]\nmax_in_flight = \"lots\"\n[upstream]\ntimeout = 10")
            .replace("client_secret_file = \"/nonexistent/secret\"", "client_secret_env = \"EASEMOB_CLIENT_SECRET\"");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, toml).unwrap();
        let env = [("EASEMOB_GW__JOBS__ENABLED".to_owned(), "no".to_owned())];
        let e = Config::read(&path, env).checked(SecretPolicy::ExternalOnly).unwrap_err();
        let printed: Vec<String> =
            e.replace(&path.display().to_string(), "gateway.toml").lines().map(|l| format!("error: {l}")).collect();
        assert_eq!(printed, shown);
    }

    #[test]
    fn an_override_is_read_by_its_key_s_type_and_a_bad_one_names_its_variable() {
        let c = check(
            "",
            &[
                ("EASEMOB_GW__SERVER__WORKERS", "2"),
                ("EASEMOB_GW__JOBS__ENABLED", "true"),
                ("EASEMOB_GW__JOBS__STORE", "/tmp/jobs.db"),
                ("EASEMOB_GW__RATE_LIMIT__REDIS__KEY_PREFIX", "123"),
                ("EASEMOB_GW__TOKEN__REFRESH_AT", "0.25"),
                ("EASEMOB_GW__UPSTREAM__TIMEOUT", "7s"),
            ],
        )
        .unwrap();
        assert_eq!((c.server.workers, c.jobs.enabled, c.token.refresh_at), (2, true, 0.25));
        assert_eq!((c.rate_limit.redis.key_prefix.as_str(), c.upstream.timeout), ("123", Duration::from_secs(7)));
        for (var, value, message) in [
            ("EASEMOB_GW__SERVER__WORKERS", "2.5", "expected an integer from 0, found a float (2.5)"),
            ("EASEMOB_GW__JOBS__ENABLED", "no", "expected a boolean, found a string (\"no\")"),
            (
                "EASEMOB_GW__UPSTREAM__TIMEOUT",
                "10",
                "expected a duration, found a string (\"10\"): write EASEMOB_GW__UPSTREAM__TIMEOUT=10s",
            ),
        ] {
            let e = check("", &[(var, value)]).unwrap_err();
            let key = var.trim_start_matches("EASEMOB_GW__").replace("__", ".").to_ascii_lowercase();
            assert_eq!(e, format!("{var} (overriding {key}): {message}"));
        }
    }

    /// Every key of the config, as `section.key` (`apps.org_name` for `[[apps]] org_name`); a `{ rate, burst }`
    /// limit and a map of them are one key each (`rate_limit.routes.<route>`).
    fn keys(value: &toml::Value, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
        let toml::Value::Table(table) = value else { return };
        for (key, value) in table {
            let key = match prefix {
                "" => key.clone(),
                "rate_limit.routes" => "rate_limit.routes.<route>".to_owned(),
                prefix => format!("{prefix}.{key}"),
            };
            match value {
                toml::Value::Table(_) if !matches!(key.as_str(), "rate_limit.route" | "rate_limit.app") => {
                    if key == "rate_limit.routes" {
                        out.insert("rate_limit.routes.<route>".to_owned());
                    } else {
                        keys(value, &key, out);
                    }
                }
                toml::Value::Array(items) if items.first().is_some_and(toml::Value::is_table) => {
                    items.iter().for_each(|item| keys(item, &key, out));
                }
                _ => {
                    out.insert(key);
                }
            }
        }
    }

    /// The keys the configuration reference's table names (docs/configuration.md, under `## Keys`):
    /// `section.key`, with the bare names that follow in a cell taking the first one's section
    /// (`` `[[apps]] org_name`, `app_name` ``).
    fn documented() -> std::collections::BTreeSet<String> {
        let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md")).unwrap();
        let table = page.split("\n## Keys\n").nth(1).expect("a `## Keys` section").split("\n## ").next().unwrap();
        let mut out = std::collections::BTreeSet::new();
        for row in table.lines().filter(|l| l.starts_with("| `")) {
            let cell = row.split('|').nth(1).unwrap();
            let mut section = String::new();
            for (i, name) in cell.split('`').skip(1).step_by(2).enumerate() {
                let name = match name.strip_prefix("[[").and_then(|n| n.split_once("]] ")) {
                    Some((array, key)) => format!("{array}.{key}"),
                    None => name.to_owned(),
                };
                let key = if i > 0 && !name.contains('.') { format!("{section}.{name}") } else { name };
                section = key.rsplit_once('.').map_or(String::new(), |(s, _)| s.to_owned());
                out.insert(key);
            }
        }
        out
    }

    #[test]
    fn the_configuration_reference_documents_every_key_and_no_other() {
        let mut code = std::collections::BTreeSet::new();
        keys(&toml::Value::try_from(every_key_set()).unwrap(), "", &mut code);
        let documented = documented();
        let undocumented: Vec<_> = code.difference(&documented).collect();
        let unknown: Vec<_> = documented.difference(&code).collect();
        assert!(
            undocumented.is_empty() && unknown.is_empty(),
            "not in docs/configuration.md: {undocumented:?}; not in the code: {unknown:?}"
        );
    }

    /// The defaults the configuration reference's table states, by key: the backquoted values of a row's
    /// second cell, paired with its keys (`token.retry_min`, `token.retry_max` | `500ms`, `60s`).
    fn documented_defaults() -> Vec<(String, String)> {
        let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md")).unwrap();
        let table = page.split("\n## Keys\n").nth(1).unwrap().split("\n## ").next().unwrap();
        let quoted = |cell: &str| cell.split('`').skip(1).step_by(2).map(str::to_owned).collect::<Vec<_>>();
        let mut out = Vec::new();
        for row in table.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = row.split('|').collect();
            let (keys, defaults) = (quoted(cells[1]), quoted(cells[2]));
            if keys.len() == defaults.len() {
                let section = keys[0].rsplit_once('.').map_or("", |(s, _)| s).to_owned();
                let keys = keys.iter().map(|k| if k.contains('.') { k.clone() } else { format!("{section}.{k}") });
                out.extend(keys.zip(defaults));
            }
        }
        out
    }

    #[test]
    fn the_effective_config_prints_each_default_as_the_configuration_reference_states_it() {
        let printed = Config::load(write(MINIMAL).path()).unwrap().to_redacted_toml();
        let effective: toml::Value = toml::from_str(&printed).unwrap();
        let mut compared = 0;
        for (key, default) in documented_defaults() {
            let at = key.split('.').try_fold(&effective, |at, part| at.get(part));
            let shown = match at {
                Some(toml::Value::String(s)) => s.clone(),
                Some(toml::Value::Table(_)) | None => continue,
                Some(other) => other.to_string(),
            };
            assert_eq!(shown, default, "{key} in the effective config and in docs/configuration.md");
            compared += 1;
        }
        assert!(compared >= 40, "only {compared} defaults compared");
    }

    #[test]
    fn span_export_is_off_by_default_and_its_settings_are_checked() {
        let mut c = Config::load(write(MINIMAL).path()).unwrap();
        assert_eq!((&c.trace.otlp_endpoint, c.trace.sample_ratio), (&None, 1.0));
        let problems = |c: &Config| c.problems(SecretPolicy::InlineAllowed);
        assert!(problems(&c).iter().all(|p| !p.starts_with("trace.")), "{:?}", problems(&c));
        c.trace.otlp_endpoint = Some("https://otel.example:4318/v1/traces".to_owned());
        assert!(problems(&c).iter().all(|p| !p.starts_with("trace.")), "{:?}", problems(&c));
        for (endpoint, problem) in [
            ("127.0.0.1:4318", "must be an http:// or https:// URL"),
            ("grpc://127.0.0.1:4317", "must be an http:// or https:// URL"),
            ("https://user:hunter2@otel.example/v1/traces", "no credentials"),
            ("https://otel.example/v1/traces?api_key=hunter2", "no credentials"),
            ("http://exa mple", "is not a URL"),
        ] {
            c.trace.otlp_endpoint = Some(endpoint.to_owned());
            let problems = problems(&c);
            assert!(
                problems.iter().any(|p| p.starts_with("trace.otlp_endpoint") && p.contains(problem)),
                "{problems:?}"
            );
        }
        (c.trace.service_name, c.trace.sample_ratio) = (" ".to_owned(), 1.5);
        let problems = problems(&c);
        for key in ["trace.service_name is empty", "trace.sample_ratio 1.5 must be from 0 to 1"] {
            assert!(problems.iter().any(|p| p == key), "{key} in {problems:?}");
        }
        assert!(!problems.iter().any(|p| p.contains("hunter2")), "never printed back: {problems:?}");
    }

    #[test]
    fn bad_base_url_is_refused() {
        for url in ["a1.easemob.com", "ftp://x", "https://x/?a=b"] {
            assert!(BaseUrl::parse(url).is_err(), "{url}");
        }
    }
}
