//! `[audit]`: the audit trail's file, the name of its chain and how often its head leaves the machine.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::callers::is_plain_label;
use super::duration::{self, format_duration};

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Append-only JSON-lines file with one event per deletion sent to Easemob; absent: no audit trail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// Also fsync each event before answering (survives a power loss; costs a disk flush per deletion).
    pub fsync: bool,
    /// Recorded as the caller when a request has no usable `X-Caller` header (e.g. the service's name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_caller: Option<String>,
    /// This replica's name in its audit events and in job receipts: each replica keeps a chain of its own.
    /// Absent: the host's name (a pod's name in Kubernetes). Keep it stable across restarts and unique.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// How often the chain's head is logged, exported as a metric and saved beside the file.
    #[serde(with = "duration")]
    pub anchor_interval: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            file: None,
            fsync: false,
            default_caller: None,
            replica: None,
            anchor_interval: Duration::from_secs(60),
        }
    }
}

impl AuditConfig {
    /// The replica's name: as set, else the host's.
    pub fn replica(&self) -> String {
        self.replica.clone().unwrap_or_else(|| {
            let host = gethostname::gethostname().to_string_lossy().into_owned();
            if is_plain_label(&host, 64) { host } else { "gateway".to_owned() }
        })
    }

    pub(super) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(replica) = &self.replica
            && !is_plain_label(replica, 64)
        {
            problems.push(format!("audit.replica {replica:?} must be 1 to 64 characters of A-Z a-z 0-9 - _ . :"));
        }
        // At most half the window of the alert that watches the anchor (EasemobGatewayAuditAnchorStalled, 10 minutes).
        if self.anchor_interval < Duration::from_secs(1) || self.anchor_interval > Duration::from_secs(300) {
            problems
                .push(format!("audit.anchor_interval {} must be from 1s to 5m", format_duration(self.anchor_interval)));
        }
        problems
    }
}
