//! `[upstream]`: Easemob's address and the client's timeouts and pool, and their checks.

use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderValue, Uri};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::duration;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Easemob's REST host, e.g. `https://a1.easemob.com`; `/{org}/{app}/…` is appended.
    pub base_url: BaseUrl,
    #[serde(with = "duration", default = "defaults::connect_timeout")]
    pub connect_timeout: Duration,
    /// The whole exchange with Easemob (connect, send, complete answer), from the first send, retry included.
    #[serde(with = "duration", default = "defaults::timeout")]
    pub timeout: Duration,
    /// Extra PEM root certificates, for private deployments and tests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(with = "duration", default = "defaults::pool_idle_timeout")]
    pub pool_idle_timeout: Duration,
    #[serde(default = "defaults::pool_max_idle_per_host")]
    pub pool_max_idle_per_host: usize,
}

impl UpstreamConfig {
    /// What is wrong with these settings, one line each (the CA file is looked for on disk).
    pub(super) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, d) in [("upstream.connect_timeout", self.connect_timeout), ("upstream.timeout", self.timeout)] {
            if d.is_zero() {
                problems.push(format!("{name} must be above 0"));
            }
        }
        if let Some(ca) = &self.ca_file
            && let Err(e) = std::fs::metadata(ca)
        {
            problems.push(format!("upstream.ca_file {} cannot be read: {e}", ca.display()));
        }
        problems
    }
}

/// `http://` or `https://` plus a host (and optionally a path prefix), without a trailing slash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseUrl(String);

impl BaseUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let trimmed = s.trim_end_matches('/');
        let uri: Uri = trimmed.parse().map_err(|e| format!("upstream.base_url {s:?} is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(format!("upstream.base_url {s:?} must start with http:// or https://")),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("upstream.base_url {s:?} has no host"));
        }
        if uri.query().is_some() {
            return Err(format!("upstream.base_url {s:?} must not have a query"));
        }
        Ok(BaseUrl(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The `Host` header for this URL: the host, and the port unless it is the scheme's default.
    pub fn host_header(&self) -> HeaderValue {
        let uri: Uri = self.0.parse().expect("checked in parse");
        let host = uri.host().expect("checked in parse");
        let default_port = if uri.scheme_str() == Some("https") { 443 } else { 80 };
        let value = match uri.port_u16() {
            Some(port) if port != default_port => format!("{host}:{port}"),
            _ => host.to_owned(),
        };
        HeaderValue::from_str(&value).expect("a URI's host is a valid header value")
    }
}

impl<'de> Deserialize<'de> for BaseUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BaseUrl::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl Serialize for BaseUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

mod defaults {
    use std::time::Duration;

    pub fn connect_timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn timeout() -> Duration {
        Duration::from_secs(10)
    }
    /// Below common load-balancer idle timeouts (60 s) minus a margin, so we close before they do.
    pub fn pool_idle_timeout() -> Duration {
        Duration::from_secs(50)
    }
    pub fn pool_max_idle_per_host() -> usize {
        64
    }
}
