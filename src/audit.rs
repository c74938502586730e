//! The audit trail: one JSON line per attempt at a deletion that reached Easemob (a request's first attempt, its
//! retry, its replay with a new token, a job's attempt), each with its own outcome (accepted, refused, or unknown
//! when Easemob's answer was lost), appended to a file before the answer goes back, so that a user's erasure can be
//! proven later and every call Easemob received has its line. Only validated fields are written: never a token, a
//! secret or a raw request.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::SystemTime;

use futures_util::future::Either;
use serde::Serialize;
use tower::{Layer, Service};
use tracing::error;

use crate::config::{AuditConfig, is_plain_label};
use crate::error::GatewayError;
use crate::exchange::{Answer, AttemptKind, Exchange, Waiting};
use crate::metrics::Metrics;
use crate::routes::validate::{Call, ConversationType};

/// The audit file could not be opened for appending.
#[derive(Debug, thiserror::Error)]
#[error("audit.file {}: {source}", path.display())]
pub struct AuditOpenError {
    path: std::path::PathBuf,
    source: std::io::Error,
}

pub struct Audit {
    file: Mutex<File>,
    fsync: bool,
    default_caller: String,
    metrics: Metrics,
}

/// One attempt at a deletion, as written to the audit file.
#[derive(Debug, Serialize)]
pub struct Event {
    pub time: String,
    pub request_id: String,
    /// The W3C trace id of the request (the caller's, or the one the gateway started).
    pub trace_id: String,
    pub caller: String,
    pub app: String,
    pub route: &'static str,
    pub owner: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conversation_type: Option<ConversationType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delete_roam: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_ids: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub del_time: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_notify: Option<bool>,
    /// Easemob's status; absent when its answer was lost (timeout, reset): the deletion may have happened.
    pub upstream_status: Option<u16>,
    /// `accepted` (2xx), `refused` (any other status) or `unknown` (no answer).
    pub outcome: &'static str,
    /// The attempt's number among its request's attempts that reached Easemob (1, 2, …): with `request_id`, it
    /// orders the events of one request.
    pub attempt: u32,
    /// Why it was sent: `first`, `retry`, `token_replay` or `job`.
    pub attempt_kind: AttemptKind,
    /// For a job's operation: which of the scheduler's attempts at it this is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_attempt: Option<u32>,
}

impl Event {
    /// The event of `sent`, the `attempt`-th of its request to reach Easemob, which answered `upstream_status`
    /// (`None`: the answer was lost).
    pub fn new(sent: &Exchange, caller: &str, attempt: u32, upstream_status: Option<u16>) -> Event {
        let call = &sent.call;
        let mut event = Event {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            request_id: sent.request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("").to_owned(),
            trace_id: sent.trace.trace_id_hex().as_str().to_owned(),
            caller: caller.to_owned(),
            app: sent.app.key.as_str().to_owned(),
            route: call.route().name(),
            owner: call.owner().to_string(),
            peer: None,
            group: None,
            channel: None,
            conversation_type: None,
            delete_roam: None,
            message_ids: None,
            del_time: None,
            is_notify: None,
            upstream_status,
            outcome: match upstream_status {
                Some(s) if (200..300).contains(&s) => "accepted",
                Some(_) => "refused",
                None => "unknown",
            },
            attempt,
            attempt_kind: sent.kind(),
            job_attempt: sent.job_attempt,
        };
        match call {
            Call::DeleteChatMessages { peer, msg_ids, notify, .. } => {
                (event.peer, event.message_ids, event.is_notify) =
                    (Some(peer.to_string()), Some(msg_ids.len()), *notify);
            }
            Call::DeleteGroupMessages { group, msg_ids, notify, .. } => {
                (event.group, event.message_ids, event.is_notify) =
                    (Some(group.to_string()), Some(msg_ids.len()), *notify);
            }
            Call::ClearUserMessages { .. } => {}
            Call::ClearChatMessagesBefore { peer, del_time, notify, .. } => {
                (event.peer, event.del_time, event.is_notify) =
                    (Some(peer.to_string()), Some(del_time.millis()), *notify);
            }
            Call::ClearGroupMessagesBefore { group, del_time, notify, .. } => {
                (event.group, event.del_time, event.is_notify) =
                    (Some(group.to_string()), Some(del_time.millis()), *notify);
            }
            Call::DeleteConversation { conversation, .. } => {
                event.channel = Some(conversation.channel.to_string());
                event.conversation_type = Some(conversation.kind);
                event.delete_roam = Some(conversation.delete_roam);
            }
        }
        event
    }
}

impl Audit {
    /// Opens (creating if needed) the audit file for appending; `None` when no file is configured.
    pub fn open(config: &AuditConfig, metrics: Metrics) -> Result<Option<Arc<Audit>>, AuditOpenError> {
        let Some(path) = &config.file else { return Ok(None) };
        let file = open_append(path).map_err(|source| AuditOpenError { path: path.clone(), source })?;
        Ok(Some(Arc::new(Audit {
            file: Mutex::new(file),
            fsync: config.fsync,
            default_caller: config.default_caller.clone().unwrap_or_else(|| "unknown".to_owned()),
            metrics,
        })))
    }

    /// The caller to record: `X-Caller` when it is 1–64 plain characters, else the configured default.
    pub fn caller<'a>(&'a self, header: Option<&'a str>) -> &'a str {
        header.filter(|v| is_plain_label(v, 64)).unwrap_or(&self.default_caller)
    }

    /// Appends one event. Runs on the blocking pool, so a slow disk never stalls the request threads; the caller
    /// gets its answer only after this returns.
    pub async fn record(self: &Arc<Self>, event: Event) {
        let audit = Arc::clone(self);
        let written = tokio::task::spawn_blocking(move || audit.write(&event)).await;
        if let Err(e) | Ok(Err(e)) = written.map_err(std::io::Error::other) {
            self.metrics.audit_write_errors.inc();
            error!(error = %e, "audit event could not be written");
        }
    }

    fn write(&self, event: &Event) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(event).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // One write of the whole line to an O_APPEND file: lines from concurrent requests never interleave.
        file.write_all(&line)?;
        if self.fsync {
            file.sync_data()?;
        }
        Ok(())
    }

    /// Forces everything written so far to disk: at shutdown.
    pub fn sync(&self) {
        let file = self.file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(e) = file.sync_all() {
            error!(error = %e, "audit file could not be synced");
        }
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Writes the audit event of every attempt sent to Easemob, before its answer goes up: with Easemob's status for
/// it, or with no status when the answer was lost (the deletion may have happened). It sits right above the
/// call's forwarding, beneath the retry and the token replay, so each of their attempts is seen on its own. Nothing
/// is written for an attempt that never reached Easemob (refused by the quota, no token, connection failed).
#[derive(Clone)]
pub struct AuditLayer {
    audit: Option<Arc<Audit>>,
}

impl AuditLayer {
    pub fn new(audit: Option<Arc<Audit>>) -> AuditLayer {
        AuditLayer { audit }
    }
}

impl<S> Layer<S> for AuditLayer {
    type Service = Audited<S>;

    fn layer(&self, inner: S) -> Audited<S> {
        Audited { inner, audit: self.audit.clone() }
    }
}

#[derive(Clone)]
pub struct Audited<S> {
    inner: S,
    audit: Option<Arc<Audit>>,
}

impl<S> Service<Exchange> for Audited<S>
where
    S: Service<Exchange, Response = Answer, Error = GatewayError> + Send,
    S::Future: Send + 'static,
{
    type Response = Answer;
    type Error = GatewayError;
    /// Without an audit trail, the inner future itself: nothing to box.
    type Future = Either<S::Future, Waiting<GatewayError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, exchange: Exchange) -> Self::Future {
        let Some(audit) = self.audit.clone() else {
            return Either::Left(self.inner.call(exchange));
        };
        let sent = exchange.clone();
        let answer = self.inner.call(exchange);
        Either::Right(Box::pin(async move {
            let result = answer.await;
            // Easemob's status; none when its answer was lost (the deletion may have happened).
            let upstream_status = match &result {
                Ok(answer) => Some(Some(answer.status().as_u16())),
                Err(GatewayError::UpstreamTimeout | GatewayError::UpstreamFailed) => Some(None),
                Err(_) => None,
            };
            if let Some(upstream_status) = upstream_status {
                let caller = audit.caller(sent.caller.as_deref());
                let attempt = sent.audited.fetch_add(1, Ordering::Relaxed) + 1;
                audit.record(Event::new(&sent, caller, attempt, upstream_status)).await;
            }
            result
        }))
    }
}

#[cfg(test)]
mod tests {
    use tower::{Layer, ServiceExt};

    use super::*;
    use crate::testing::{self, ScriptedFetch};

    #[tokio::test]
    async fn one_event_per_attempt_that_reached_easemob_and_none_for_one_that_did_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.jsonl");
        let config = AuditConfig { file: Some(file.clone()), fsync: false, default_caller: Some("svc".into()) };
        let audit = Audit::open(&config, Metrics::new()).unwrap();
        let app = testing::app(&ScriptedFetch::granting(3600), &testing::quota(Default::default()));
        let (inner, _) = testing::upstream(|n, _| match n {
            0 => Ok(testing::easemob(200)),
            1 => Err(GatewayError::UpstreamTimeout),
            2 => Err(GatewayError::UpstreamUnreachable { unused_slot: None }),
            _ => Err(GatewayError::NoToken { retry_after: std::time::Duration::from_secs(1) }),
        });
        let service = AuditLayer::new(audit).layer(inner);
        for _ in 0..4 {
            let _ = service.clone().oneshot(testing::exchange(&app, testing::clear("dave"))).await;
        }
        let lines: Vec<serde_json::Value> =
            std::fs::read_to_string(&file).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!((&lines[0]["outcome"], &lines[0]["upstream_status"]), (&"accepted".into(), &200.into()));
        assert_eq!((&lines[1]["outcome"], &lines[1]["upstream_status"]), (&"unknown".into(), &serde_json::Value::Null));
        assert_eq!((&lines[0]["owner"], &lines[0]["caller"]), (&"dave".into(), &"svc".into()));
        assert_eq!((&lines[0]["attempt"], &lines[0]["attempt_kind"]), (&1.into(), &"first".into()));
    }
}
