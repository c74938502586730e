//! The connection to the shared Redis (the quota and the jobs): `redis://` or `rediss://` (TLS, the built-in
//! webpki roots or `ca_file`), with an ACL user and a password read from a file or an environment variable, never
//! from the URL and never logged.

use redis::{ErrorKind, IntoConnectionInfo, RedisError};
use secrecy::ExposeSecret;

use crate::config::RedisConfig;

/// A client for the configured Redis; nothing connects until it is used.
pub fn client(config: &RedisConfig) -> Result<redis::Client, RedisError> {
    let invalid = |what: &'static str, detail: String| RedisError::from((ErrorKind::InvalidClientConfig, what, detail));
    let info = config.url.as_str().into_connection_info()?;
    let mut settings = info.redis_settings().clone();
    if let Some(user) = &config.username {
        settings = settings.set_username(user);
    }
    if let Some(password) = config.password().map_err(|e| invalid("password", e))? {
        settings = settings.set_password(password.expose_secret());
    }
    let info = info.set_redis_settings(settings);
    match &config.ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| invalid("ca_file", format!("{}: {e}", path.display())))?;
            let certificates = redis::TlsCertificates { client_tls: None, root_cert: Some(pem) };
            redis::Client::build_with_tls(info, certificates)
        }
        None => redis::Client::open(info),
    }
}
