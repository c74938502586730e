//! The audit trail: one JSON line per attempt at a deletion that reached Easemob (a request's first attempt, its
//! retry, its replay with a new token, a job's attempt), each with its own outcome (accepted, refused, or unknown
//! when Easemob's answer was lost), appended to a file before the answer goes back, so that a user's erasure can be
//! proven later and every call Easemob received has its line. Only validated fields are written: never a token, a
//! secret or a raw request.
//!
//! The lines form a hash chain (`audit/chain.rs`): each carries its sequence number and the SHA-256 of the line
//! before it, so that an edited, deleted, reordered or truncated line shows (`audit verify`, `audit/verify.rs`).
//! Its head leaves the machine every `audit.anchor_interval`, in a log line and a metric, since whoever can rewrite
//! the file can rebuild the chain too.

mod chain;
pub mod verify;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures_util::future::Either;
use serde::Serialize;
use tower::{Layer, Service};
use tracing::{error, info, warn};

pub use self::chain::Head;
use self::chain::Repair;

use crate::config::{AuditConfig, is_plain_label};
use crate::error::GatewayError;
use crate::exchange::{Answer, AttemptKind, Exchange, Waiting};
use crate::metrics::Metrics;
use crate::routes::validate::{Call, ConversationType};

/// The audit file could not be opened for appending.
#[derive(Debug, thiserror::Error)]
#[error("audit.file {}: {source}", path.display())]
pub struct AuditOpenError {
    path: PathBuf,
    source: std::io::Error,
}

pub struct Audit {
    path: PathBuf,
    writer: Mutex<Writer>,
    fsync: bool,
    /// This replica's name, and as the JSON string every line carries.
    replica: String,
    replica_json: String,
    default_caller: String,
    metrics: Metrics,
}

/// The file and the chain's head, changed together under one lock: lines go to the file in `seq` order.
struct Writer {
    file: File,
    head: Head,
    /// A write failed, perhaps part-way: the next one first ends and records what it left.
    unended: bool,
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
            time: now(),
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
    /// Opens (creating if needed) the audit file for appending, and goes on with its chain: from its last line,
    /// or from the head saved beside it when the file is new (rotated while the gateway was stopped). A line a
    /// crash cut short is recorded as such first. `None` when no file is configured.
    pub fn open(config: &AuditConfig, metrics: Metrics) -> Result<Option<Arc<Audit>>, AuditOpenError> {
        let Some(path) = &config.file else { return Ok(None) };
        let failed = |source| AuditOpenError { path: path.clone(), source };
        let replica = config.replica();
        let audit = Audit {
            path: path.clone(),
            writer: Mutex::new(Writer {
                file: open_append(path).map_err(failed)?,
                head: Head::GENESIS,
                unended: false,
            }),
            fsync: config.fsync,
            replica_json: serde_json::to_string(&replica).expect("a string serializes"),
            replica,
            default_caller: config.default_caller.clone().unwrap_or_else(|| "unknown".to_owned()),
            metrics,
        };
        audit.resume().map_err(failed)?;
        Ok(Some(Arc::new(audit)))
    }

    /// Finds where the chain goes on, and records what a crash did to the file: a line cut short, events lost.
    fn resume(&self) -> std::io::Result<()> {
        let saved = chain::read_head_file(&self.path).map(|(head, _)| head);
        let mut writer = self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (head, repairs) = chain::resume(&chain::read_tail(&mut writer.file)?, saved);
        writer.head = head;
        for repair in repairs {
            self.repair(&mut writer, repair)?;
        }
        Ok(())
    }

    /// Records a repair of the file as an event of the chain, in one write.
    fn repair(&self, writer: &mut Writer, repair: Repair) -> std::io::Result<()> {
        let file = self.path.display().to_string();
        let (mut bytes, line, head) = match &repair {
            Repair::Torn { bytes: torn, unended } => {
                warn!(
                    file,
                    bytes = torn.len(),
                    "the audit file's last line was cut short (a crash, or a write that failed part-way); recorded \
                     as torn"
                );
                // The record links to the torn bytes themselves, so that they cannot be dropped unnoticed either.
                let event = serde_json::json!({ "time": now(), "event": "torn", "torn_bytes": torn.len() });
                let after = Head::of(writer.head.seq, torn);
                let ending = if *unended { b"\n".to_vec() } else { Vec::new() };
                (ending, self.line(&after, &event)?, after)
            }
            Repair::Lost { saved } if saved.seq > writer.head.seq => {
                let (from, to) = (writer.head.seq + 1, saved.seq);
                warn!(
                    file,
                    from,
                    to,
                    "the audit file ends before the head saved beside it: these events were lost (a crash without \
                     audit.fsync, or the file was replaced); recorded as lost"
                );
                let event = serde_json::json!({ "time": now(), "event": "lost", "from": from, "to": to });
                // Numbered after what was lost, so that no seq is ever used twice.
                let after = Head { seq: saved.seq, hash: writer.head.hash };
                (Vec::new(), self.line(&after, &event)?, after)
            }
            Repair::Lost { .. } => return Ok(()),
        };
        bytes.extend_from_slice(&line);
        writer.file.write_all(&bytes)?;
        writer.head = Head::of(head.seq + 1, &line[..line.len() - 1]);
        Ok(())
    }

    /// The line (with its newline) of the event after `head`: the chain's fields, then the event's own.
    fn line(&self, head: &Head, event: &impl Serialize) -> std::io::Result<Vec<u8>> {
        let mut line = chain::prefix(head, &self.replica_json);
        let fields = line.len();
        serde_json::to_writer(&mut line, event).map_err(std::io::Error::other)?;
        line.remove(fields); // the event's own `{`: its fields follow the chain's
        line.push(b'\n');
        Ok(line)
    }

    /// The caller to record: `X-Caller` when it is 1–64 plain characters, else the configured default.
    pub fn caller<'a>(&'a self, header: Option<&'a str>) -> &'a str {
        header.filter(|v| is_plain_label(v, 64)).unwrap_or(&self.default_caller)
    }

    /// Appends one event and returns its sequence number (`None`: it could not be written). Runs on the blocking
    /// pool, so a slow disk never stalls the request threads; the caller gets its answer only after this returns.
    pub async fn record(self: &Arc<Self>, event: Event) -> Option<u64> {
        let audit = Arc::clone(self);
        let written = tokio::task::spawn_blocking(move || audit.write(&event)).await;
        match written.map_err(std::io::Error::other) {
            Ok(Ok(seq)) => Some(seq),
            Err(e) | Ok(Err(e)) => {
                self.metrics.audit.write_errors.inc();
                error!(error = %e, "audit event could not be written");
                None
            }
        }
    }

    fn write(&self, event: &Event) -> std::io::Result<u64> {
        let mut writer = self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if writer.unended {
            // A write failed part-way: end what it left and record it as torn before going on.
            if let Some(torn) = chain::read_tail(&mut writer.file)?.torn {
                self.repair(&mut writer, Repair::Torn { bytes: torn, unended: true })?;
            }
            writer.unended = false;
        }
        let line = self.line(&writer.head, event)?;
        // One write of the whole line to an O_APPEND file; the lock keeps lines in `seq` order.
        if let Err(e) = writer.file.write_all(&line) {
            writer.unended = true;
            return Err(e);
        }
        // In the file, so in the chain, whether or not the disk then keeps it.
        writer.head = Head::of(writer.head.seq + 1, &line[..line.len() - 1]);
        self.metrics.audit.events.inc();
        if self.fsync
            && let Err(e) = writer.file.sync_data()
        {
            self.metrics.audit.write_errors.inc();
            error!(error = %e, seq = writer.head.seq, "audit event written but not synced to disk");
        }
        Ok(writer.head.seq)
    }

    /// The chain's head now.
    pub fn head(&self) -> Head {
        self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).head
    }

    /// Sends the head where a rewrite of the file cannot reach it: a log line, the metric, and the head file
    /// beside the audit file (for the next file after a rotation).
    pub fn anchor(&self) {
        let head = self.head();
        info!(replica = %self.replica, seq = head.seq, head = %head, "audit chain anchor");
        self.metrics.audit.anchor(&self.replica, head.seq, &head.to_string());
        let saved = chain::HeadFile { head: head.to_string(), replica: self.replica.clone(), time: now() };
        if let Err(e) = chain::write_head_file(&self.path, &saved) {
            error!(error = %e, file = %chain::head_path(&self.path).display(), "audit chain head could not be saved");
        }
    }

    /// Anchors the chain every `interval`, for as long as the process lives.
    pub fn spawn_anchors(self: &Arc<Self>, interval: Duration) {
        let audit = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(interval);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let Some(audit) = audit.upgrade() else { return };
                tokio::task::spawn_blocking(move || audit.anchor()).await.ok();
            }
        });
    }

    /// Opens the file at its path again, so that a file renamed away (rotated) is followed by a new one, which
    /// goes on from the same chain. On SIGHUP.
    pub fn reopen(&self) {
        match open_append(&self.path) {
            Ok(file) => {
                let mut writer = self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                (writer.file, writer.unended) = (file, false);
                info!(file = %self.path.display(), seq = writer.head.seq, "audit file reopened");
            }
            Err(e) => {
                error!(error = %e, file = %self.path.display(), "audit file could not be reopened; still writing to the old one")
            }
        }
    }

    /// Forces everything written so far to disk, and anchors the chain: at shutdown.
    pub fn sync(&self) {
        let file = self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(e) = file.file.sync_all() {
            error!(error = %e, "audit file could not be synced");
        }
        drop(file);
        self.anchor();
    }
}

/// Now, as the audit trail writes times.
fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).read(true).append(true).open(path)
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
                let attempt = sent.audited.next_attempt();
                let seq = audit.record(Event::new(&sent, caller, attempt, upstream_status)).await;
                // Only a job's receipt lists them.
                if let Some(seq) = seq.filter(|_| sent.job_attempt.is_some()) {
                    sent.audited.written(seq);
                }
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
        let config = AuditConfig {
            file: Some(file.clone()),
            fsync: false,
            default_caller: Some("svc".into()),
            ..Default::default()
        };
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
