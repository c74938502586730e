//! `[server]`: the listeners, the limits on connections and requests, the workers, and their checks.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The data plane. Loopback by default: callers present no credential.
    pub listen: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub admin_listen: SocketAddr,
    /// A client must finish sending request headers within this time (slow-loris guard).
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    /// A client must finish sending a request body (only `delete_conversation` has one) within this.
    #[serde(with = "duration")]
    pub body_read_timeout: Duration,
    /// Networks that may call the data plane; required when `listen` is not a loopback address.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_from: Vec<ipnet::IpNet>,
    /// Requests handled at once; more are answered 503 at once instead of queueing without bound.
    pub max_in_flight: usize,
    /// Client connections open at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// Data-plane threads, each serving its own connections start to finish; 0 = one per CPU the process may use.
    /// At most 256.
    pub workers: usize,
    /// How often the config file, and every `client_secret_file` it names, is checked for a change (Kubernetes
    /// updates a mounted ConfigMap or Secret in place); a change reloads the whole config, as SIGHUP does.
    /// `0s`: only on SIGHUP.
    #[serde(with = "duration")]
    pub reload_poll: Duration,
}

/// Far beyond any CPU count a sidecar gets; above it, a typo (threads are not free).
const MAX_WORKERS: usize = 256;

impl ServerConfig {
    /// `workers`, with 0 resolved to the CPUs this process may use (cgroup quotas included).
    pub fn worker_threads(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            allow_from: Vec::new(),
            // Far above what a 100/s quota with a 250 ms wait can keep busy; a bound, not a tuning knob.
            max_in_flight: 1024,
            max_connections: 4096,
            // Kubernetes' default terminationGracePeriodSeconds is 30 s; finish before it kills us.
            shutdown_grace: Duration::from_secs(25),
            workers: 0,
            reload_poll: Duration::from_secs(10),
        }
    }
}

impl ServerConfig {
    /// What is wrong with these settings, one line each.
    pub(super) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, d) in [
            ("server.header_read_timeout", self.header_read_timeout),
            ("server.body_read_timeout", self.body_read_timeout),
        ] {
            if d.is_zero() {
                problems.push(format!("{name} must be above 0"));
            }
        }
        if !self.listen.ip().is_loopback() && self.allow_from.is_empty() {
            problems.push(format!(
                "server.listen {} is not a loopback address and callers present no credential: set \
                 server.allow_from to the networks that may call it",
                self.listen
            ));
        }
        if self.max_in_flight == 0 || self.max_connections == 0 {
            problems.push("server.max_in_flight and server.max_connections must be above 0".to_owned());
        }
        if self.workers > MAX_WORKERS {
            problems.push(format!(
                "server.workers is {}; at most {MAX_WORKERS} (0: one per CPU the process may use)",
                self.workers
            ));
        }
        if self.listen == self.admin_listen && self.listen.port() != 0 {
            problems.push("server.listen and server.admin_listen must differ".to_owned());
        }
        problems
    }
}
