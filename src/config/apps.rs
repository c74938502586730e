//! `[[apps]]`: the Easemob apps served, each with its credentials, and their checks.

use std::fmt;
use std::path::PathBuf;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::secret::{InlineSecret, SecretPolicy, trimmed_secret};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    pub org_name: String,
    pub app_name: String,
    pub client_id: String,
    /// Inline secret: accepted by `demo` only, never printed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<InlineSecret>,
    /// Name of the environment variable holding the secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_env: Option<String>,
    /// File holding the secret (trailing newline ignored), e.g. a mounted Kubernetes Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
}

impl AppConfig {
    /// Easemob's AppKey for this app.
    pub fn app_key(&self) -> AppKey {
        AppKey::new(&self.org_name, &self.app_name)
    }

    /// Reads the client secret from wherever it is configured.
    pub fn resolve_secret(&self) -> Result<SecretString, SecretError> {
        let app = self.app_key();
        match (&self.client_secret, &self.client_secret_env, &self.client_secret_file) {
            (Some(inline), None, None) => Ok(inline.0.clone()),
            (None, Some(var), None) => match std::env::var(var) {
                Ok(value) => trimmed_secret(&value).ok_or(SecretError::EmptyEnv { app, var: var.clone() }),
                Err(_) => Err(SecretError::UnsetEnv { app, var: var.clone() }),
            },
            (None, None, Some(path)) => match std::fs::read_to_string(path) {
                Ok(value) => trimmed_secret(&value).ok_or(SecretError::EmptyFile { app, path: path.clone() }),
                Err(source) => Err(SecretError::UnreadableFile { app, path: path.clone(), source }),
            },
            (None, None, None) => Err(SecretError::Missing { app }),
            _ => Err(SecretError::Ambiguous { app }),
        }
    }
}

/// An AppKey, `org_name#app_name`: how Easemob names an app, and the scope of every limit; the `app` label of
/// metrics, log lines and the audit trail.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AppKey(String);

impl AppKey {
    pub fn new(org: &str, app: &str) -> AppKey {
        AppKey(format!("{org}#{app}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AppKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why an app's client secret could not be read. Never holds the secret itself.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("apps[{app}]: environment variable {var} (client_secret_env) is empty")]
    EmptyEnv { app: AppKey, var: String },
    #[error("apps[{app}]: environment variable {var} (client_secret_env) is not set")]
    UnsetEnv { app: AppKey, var: String },
    #[error("apps[{app}]: client_secret_file {} is empty", path.display())]
    EmptyFile { app: AppKey, path: PathBuf },
    #[error("apps[{app}]: client_secret_file {} cannot be read: {source}", path.display())]
    UnreadableFile { app: AppKey, path: PathBuf, source: std::io::Error },
    #[error("apps[{app}]: no client secret: set client_secret_env or client_secret_file")]
    Missing { app: AppKey },
    #[error("apps[{app}]: set exactly one of client_secret_env, client_secret_file (and client_secret only in demo)")]
    Ambiguous { app: AppKey },
}

/// What is wrong with the apps, one line each: names Easemob would refuse, a missing or unreadable secret (the
/// environment and the files are read here), an app configured twice.
pub(super) fn problems(apps: &[AppConfig], policy: SecretPolicy) -> Vec<String> {
    let mut problems = Vec::new();
    if apps.is_empty() {
        problems.push("apps: configure at least one [[apps]] entry".to_owned());
    }
    for (i, app) in apps.iter().enumerate() {
        for (field, value) in [("org_name", &app.org_name), ("app_name", &app.app_name)] {
            let ok = !value.is_empty()
                && value.len() <= 64
                && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !ok {
                problems.push(format!("apps[{i}].{field} {value:?} must be 1-64 characters of A-Z a-z 0-9 _ -"));
            }
        }
        if app.client_id.trim().is_empty() {
            problems.push(format!("apps[{}].client_id is empty", app.app_key()));
        }
        if app.client_secret.is_some() && policy == SecretPolicy::ExternalOnly {
            problems.push(format!(
                "apps[{}].client_secret: inline secrets are for `demo` only; use client_secret_env or \
                 client_secret_file",
                app.app_key()
            ));
        } else if let Err(e) = app.resolve_secret() {
            problems.push(e.to_string());
        }
        let duplicate = apps[..i].iter().any(|other| {
            other.org_name.eq_ignore_ascii_case(&app.org_name) && other.app_name.eq_ignore_ascii_case(&app.app_name)
        });
        if duplicate {
            problems.push(format!("apps[{i}]: {} is configured twice", app.app_key()));
        }
    }
    problems
}
