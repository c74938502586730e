//! The connection to the shared Redis (the quota and the jobs), one server or a Redis Cluster (`cluster = true`,
//! the URL then a seed the cluster's other nodes are found from): `redis://` or `rediss://` (TLS, the built-in
//! webpki roots or `ca_file`), with an ACL user and a password read from a file or an environment variable, never
//! from the URL and never logged.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, Value};
use secrecy::ExposeSecret;

use crate::config::RedisConfig;

/// How long a connection waits for Redis, and how hard it tries again.
pub struct Patience {
    pub connect: Duration,
    pub response: Duration,
    /// Tries after a failed one, within one call.
    pub retries: u32,
    /// The longest pause between tries.
    pub max_delay: Duration,
}

/// A connection to the configured Redis, shared by clones; it connects on first use and reconnects by itself (in
/// a cluster it follows slots that move and replicas that take over).
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// A connection to the configured Redis; nothing connects until it is used.
pub fn connect(config: &RedisConfig, patience: Patience) -> Result<Connection, RedisError> {
    let invalid = |what: &'static str, detail: String| RedisError::from((ErrorKind::InvalidClientConfig, what, detail));
    let password = config.password().map_err(|e| invalid("password", e))?;
    let root_cert = match &config.ca_file {
        Some(path) => Some(std::fs::read(path).map_err(|e| invalid("ca_file", format!("{}: {e}", path.display())))?),
        None => None,
    };
    let certificates = root_cert.map(|pem| redis::TlsCertificates { client_tls: None, root_cert: Some(pem) });
    if config.cluster {
        let mut builder = ClusterClientBuilder::new([config.url.as_str()])
            .retries(patience.retries)
            .max_retry_wait(patience.max_delay.as_millis() as u64);
        if let Some(user) = &config.username {
            builder = builder.username(user);
        }
        if let Some(password) = password {
            builder = builder.password(password.expose_secret());
        }
        if let Some(certificates) = certificates {
            builder = builder.certs(certificates);
        }
        let cluster_config =
            ClusterConfig::new().set_connection_timeout(patience.connect).set_response_timeout(patience.response);
        return Ok(Connection::Cluster(builder.build()?.get_pending_async_connection_with_config(cluster_config)));
    }
    let info = config.url.as_str().into_connection_info()?;
    let mut settings = info.redis_settings().clone();
    if let Some(user) = &config.username {
        settings = settings.set_username(user);
    }
    if let Some(password) = password {
        settings = settings.set_password(password.expose_secret());
    }
    let info = info.set_redis_settings(settings);
    let client = match certificates {
        Some(certificates) => redis::Client::build_with_tls(info, certificates)?,
        None => redis::Client::open(info)?,
    };
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(patience.connect))
        .set_response_timeout(Some(patience.response))
        .set_number_of_retries(patience.retries as usize)
        .set_max_delay(patience.max_delay);
    Ok(Connection::Single(ConnectionManager::new_lazy_with_config(client, manager_config)?))
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// The start of every key of `app` (its quota and its jobs): `<prefix>:{<app>}`. The braces are a Redis Cluster
/// hash tag: one app's keys share a slot, as a script over several of them requires, and apps spread over shards.
pub fn app_keys(prefix: &str, app: &str) -> String {
    format!("{prefix}:{{{app}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash tag Redis Cluster places a key by: what lies between its first `{` and the next `}`.
    fn hash_tag(key: &str) -> &str {
        let open = key.find('{').expect("a tag") + 1;
        &key[open..open + key[open..].find('}').expect("a closed tag")]
    }

    #[test]
    fn an_apps_keys_share_one_hash_tag_and_other_apps_have_their_own() {
        let quota = format!("{}:delete_conversation", app_keys("easemob-gateway", "org#a"));
        let job = format!("{}:jobs:ops:4f2a", app_keys("easemob-gateway", "org#a"));
        assert_eq!(hash_tag(&quota), "org#a");
        assert_eq!(hash_tag(&job), hash_tag(&quota), "one slot for an app's quota and its jobs");
        assert_ne!(hash_tag(&app_keys("easemob-gateway", "org#b")), hash_tag(&quota), "apps spread over slots");
    }
}
