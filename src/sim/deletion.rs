//! The deletion routes' own checks, in Easemob's order and with its answers, and what each deletion does to its
//! owner's view once admitted.

use std::collections::HashMap;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::state::{App, ConvKey, Kind};
use super::{Refused, header_host, now_ms, ok};

/// A checked deletion, applied only once the call is admitted under the limits.
pub enum Deletion<'q> {
    Messages(ConvKey, Vec<&'q str>),
    Before(ConvKey, i64),
    User,
    Conversation(ConvKey, bool),
}

impl<'q> Deletion<'q> {
    /// `delete_conversation`'s JSON body, checked as Easemob checks it.
    pub fn of_conversation(body: &[u8]) -> Result<Deletion<'static>, Refused> {
        let invalid_body = || {
            Refused(
                StatusCode::BAD_REQUEST,
                "invalid_request_body",
                "Request body is invalid. Please check body is correct.",
            )
        };
        let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
            return Err(invalid_body());
        };
        // Easemob's order: a wrongly typed field is an invalid body; then missing or empty fields.
        let field = |name: &str| fields.get(name).filter(|v| !v.is_null());
        let wrongly_typed = field("channel").is_some_and(|v| !v.is_string())
            || field("type").is_some_and(|v| !v.is_string())
            || field("delete_roam").is_some_and(|v| !v.is_boolean());
        if wrongly_typed {
            return Err(invalid_body());
        }
        let channel = field("channel").and_then(Value::as_str).filter(|s| !s.is_empty());
        let kind = field("type").and_then(Value::as_str).filter(|s| !s.is_empty());
        let delete_roam = field("delete_roam").and_then(Value::as_bool);
        let (Some(channel), Some(kind), Some(delete_roam)) = (channel, kind, delete_roam) else {
            let text = match (channel, kind) {
                (None, _) => "field channel cannot be null or empty",
                (_, None) => "field type cannot be null or empty",
                _ => "field delete_roam cannot be null",
            };
            return Err(Refused(StatusCode::BAD_REQUEST, "illegal_argument", text));
        };
        let kind = match kind {
            "chat" => Kind::Chat,
            "groupchat" => Kind::Groupchat,
            // Not documented by Easemob; the gateway refuses it before it gets here.
            _ => return Err(Refused(StatusCode::BAD_REQUEST, "illegal_argument", "field type is invalid")),
        };
        Ok(Deletion::Conversation((kind, channel.to_owned()), delete_roam))
    }

    /// The roaming-message routes' query, checked as Easemob checks it.
    pub fn of_messages(route: &str, query: &'q HashMap<String, String>) -> Result<Deletion<'q>, Refused> {
        let bad_request = || Refused(StatusCode::BAD_REQUEST, "Bad Request", "Bad Request");
        if query.get("isNotify").is_some_and(|v| v != "true" && v != "false") {
            return Err(bad_request());
        }
        let peer = query.get("userId").filter(|v| !v.is_empty()).map(|p| (Kind::Chat, p.clone()));
        let group = query.get("groupId").filter(|v| !v.is_empty()).map(|g| (Kind::Groupchat, g.clone()));
        let ids: Option<Vec<&str>> = query.get("msgIdList").filter(|v| !v.is_empty()).map(|v| v.split(',').collect());
        let del_time: Option<i64> = query.get("delTime").and_then(|v| v.parse().ok());
        match route {
            "delete_chat_messages" | "delete_group_messages" => {
                let conversation = if route == "delete_chat_messages" { peer } else { group };
                let (Some(conversation), Some(ids)) = (conversation, ids) else { return Err(bad_request()) };
                if ids.len() > 50 {
                    let text = "delete msg list limit can not greater than 50";
                    return Err(Refused(StatusCode::BAD_REQUEST, "param exception", text));
                }
                Ok(Deletion::Messages(conversation, ids))
            }
            "clear_chat_messages_before" | "clear_group_messages_before" => {
                let conversation = if route == "clear_chat_messages_before" { peer } else { group };
                let (Some(conversation), Some(del_time)) = (conversation, del_time) else { return Err(bad_request()) };
                Ok(Deletion::Before(conversation, del_time))
            }
            _ => Ok(Deletion::User),
        }
    }

    /// Carries out an admitted deletion on `owner`'s view, and answers as Easemob does.
    pub fn carry_out(
        self,
        app: &mut App,
        owner: &str,
        parts: &http::request::Parts,
        started: Instant,
    ) -> Response<Full<Bytes>> {
        match self {
            Deletion::Messages(conversation, ids) => app.delete_messages(owner, conversation, &ids),
            Deletion::Before(conversation, del_time) => app.delete_before(owner, conversation, del_time),
            Deletion::User => app.clear_user(owner),
            Deletion::Conversation(conversation, delete_roam) => {
                app.delete_conversation(owner, conversation, delete_roam);
                let uri = format!("http://{}{}", header_host(parts), parts.uri.path());
                return ok(json!({
                    "path": "/users/user_channel", "uri": uri, "timestamp": now_ms(), "organization": app.org,
                    "application": app.uuid, "entities": [], "action": "delete", "data": { "result": "ok" },
                    "duration": started.elapsed().as_millis() as u64, "applicationName": app.name,
                }));
            }
        }
        ok(json!({ "requestStatusCode": "ok", "timestamp": now_ms() }))
    }
}
