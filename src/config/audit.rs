//! `[audit]`: the audit trail's file. Nothing to check: a file that cannot be opened stops the start.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
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
}
