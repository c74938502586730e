//! A job's receipt (`crate::receipt`), from its store: its operations a page at a time, each with its parameters as
//! validation reads them and its attempts as the store noted them.

use std::time::{Duration, UNIX_EPOCH};

use serde_json::{Map, Value};

use super::Jobs;
use super::records::{JobRecord, OpRecord, StoreError};
use crate::receipt::{self, Attempt, Format, Operation, Writer};
use crate::routes::validate::Call;

/// Operations read from the store at once.
const PAGE: u32 = 1000;

/// The receipt of `job`, whole.
pub async fn write(jobs: &Jobs, job: &JobRecord, format: Format) -> Result<Vec<u8>, StoreError> {
    let now_ms = jobs.clock().now_ms();
    let caller = job.caller.as_deref().or(job.peer.as_deref()).unwrap_or("unknown");
    let head = receipt::Job {
        id: &job.id,
        app: &job.app,
        state: job.state.as_str(),
        created: time(job.created_ms),
        finished: job.finished_ms.map(time),
        caller,
        operations: job.counts.total,
    };
    let (mut writer, mut out) = Writer::start(format, &head, time(now_ms));
    let mut from = 0;
    loop {
        let page = jobs.store().operations(job, from, PAGE, None).await?;
        let bodies: Vec<Option<Vec<u8>>> =
            page.iter().map(|op| op.body.as_ref().map(Value::to_string).map(String::into_bytes)).collect();
        let operations: Vec<Operation<'_>> =
            page.iter().zip(&bodies).map(|(op, body)| operation(op, body.as_deref(), caller, now_ms)).collect();
        out.extend(writer.operations(&head, &operations));
        match page.last() {
            Some(last) if page.len() == PAGE as usize => from = last.index + 1,
            _ => break,
        }
    }
    out.extend(writer.finish());
    Ok(out)
}

fn operation<'a>(op: &'a OpRecord, body: Option<&[u8]>, caller: &'a str, now_ms: i64) -> Operation<'a> {
    let attempts = op.history.iter().enumerate().map(|(i, note)| Attempt {
        // Noted since the field exists; before it, the history's own order.
        attempt: if note.attempt > 0 { note.attempt } else { i as u32 + 1 },
        at: time(note.at_ms),
        status: note.status,
        easemob_request_id: note.easemob_request_id.as_deref(),
        easemob_timestamp: note.easemob_timestamp,
        replica: &note.replica,
        audit_seqs: &note.audit_seqs,
    });
    Operation {
        index: op.index,
        route: &op.route,
        method: op.method,
        path: &op.path,
        body: op.body.as_ref(),
        params: super::call_of(&op.path, body, now_ms).map(|call| params(&call)).unwrap_or_default(),
        state: op.state.as_str(),
        caller,
        attempts: attempts.collect(),
    }
}

/// A call's parameters, by Easemob's names where it has them.
fn params(call: &Call) -> Map<String, Value> {
    let mut params = Map::new();
    params.insert("owner".into(), call.owner().to_string().into());
    let mut put = |name: &str, value: Value| drop(params.insert(name.into(), value));
    match call {
        Call::DeleteChatMessages { peer, msg_ids, notify, .. } => {
            put("peer", peer.to_string().into());
            put("msgIdList", msg_ids.iter().collect::<Vec<_>>().into());
            put("isNotify", notify.map_or(Value::Null, Value::from));
        }
        Call::DeleteGroupMessages { group, msg_ids, notify, .. } => {
            put("groupId", group.to_string().into());
            put("msgIdList", msg_ids.iter().collect::<Vec<_>>().into());
            put("isNotify", notify.map_or(Value::Null, Value::from));
        }
        Call::ClearUserMessages { .. } => {}
        Call::ClearChatMessagesBefore { peer, del_time, notify, .. } => {
            put("peer", peer.to_string().into());
            put("delTime", del_time.millis().into());
            put("isNotify", notify.map_or(Value::Null, Value::from));
        }
        Call::ClearGroupMessagesBefore { group, del_time, notify, .. } => {
            put("groupId", group.to_string().into());
            put("delTime", del_time.millis().into());
            put("isNotify", notify.map_or(Value::Null, Value::from));
        }
        Call::DeleteConversation { conversation, .. } => {
            put("channel", conversation.channel.to_string().into());
            put("type", serde_json::to_value(conversation.kind).expect("a type serializes"));
            put("delete_roam", conversation.delete_roam.into());
        }
    }
    params
}

/// A time in ms since the epoch, as the audit trail writes times.
fn time(ms: i64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)).to_string()
}
