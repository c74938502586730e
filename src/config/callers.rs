//! `[[callers]]`: the callers known by key, and the rule for a plain label (a caller's name, a request id).

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CallerConfig {
    /// Recorded as the caller in the audit trail.
    pub name: String,
    /// SHA-256 of the caller's key, in hex (`easemob-gateway hash-key` prints it): the key itself is never stored.
    pub key_sha256: String,
}

/// What is wrong with the callers, one line each.
pub(super) fn problems(callers: &[CallerConfig]) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, caller) in callers.iter().enumerate() {
        if !is_plain_label(&caller.name, 64) {
            problems.push(format!("callers[{i}].name must be 1-64 characters of A-Z a-z 0-9 - _ . :"));
        }
        if caller.key_sha256.len() != 64 || hex::decode(&caller.key_sha256).is_err() {
            problems.push(format!("callers[{i}].key_sha256 must be 64 hex digits (easemob-gateway hash-key)"));
        }
    }
    problems
}

/// 1 to `max_len` characters of `A-Z a-z 0-9 - _ . :`: safe to log, forward and record as a label, whether it
/// comes from the config (a caller's name) or from a caller's header (a request id, `X-Caller`).
pub fn is_plain_label(value: &str, max_len: usize) -> bool {
    (1..=max_len).contains(&value.len())
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}
