//! Turns a matched request into a typed [`Call`], enforcing Easemob's rules before any quota or upstream call,
//! and renders the one canonical upstream request for it.
//!
//! Parse, don't re-validate: the newtypes below can only hold values Easemob accepts, so later code cannot forward
//! anything Easemob would refuse.

use std::borrow::Cow;
use std::fmt::{self, Write as _};

use bytes::Bytes;
use compact_str::CompactString;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use serde::Serialize;
use serde_json::{Map, Value};
use smallvec::SmallVec;

use super::Route;

/// Easemob's published cap on message IDs per deletion call.
pub const MAX_MSG_IDS: usize = 50;
/// Easemob's user ID rule: 1 to 64 bytes.
const MAX_ID_LEN: usize = 64;
/// 1973-01-01T00:00:00Z in milliseconds: a smaller `delTime` can only be a value in seconds (or a mistake).
const EARLIEST_DEL_TIME_MS: i64 = 94_694_400_000;
/// How far in the future a `delTime` may be before it is taken for a unit mistake (clock skew is far smaller).
const MAX_DEL_TIME_AHEAD_MS: i64 = 24 * 60 * 60 * 1000;

/// Everything outside the unreserved set is encoded; IDs are validated to that set, so this is a safety net.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// A request Easemob would refuse, in Easemob's error vocabulary.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{error}: {description}")]
pub struct ValidationError {
    /// Easemob's `error` type, so existing client code recognises it.
    pub error: &'static str,
    pub description: String,
}

impl ValidationError {
    fn new(error: &'static str, description: impl Into<String>) -> Self {
        ValidationError { error, description: description.into() }
    }
    fn illegal(description: impl Into<String>) -> Self {
        Self::new("illegal_argument", description)
    }
    fn missing(param: &str) -> Self {
        Self::new("Bad Request", format!("required query parameter {param} is missing"))
    }
    /// Easemob's own text comes first, so client code matching it still does; what was wrong follows.
    fn invalid_body(detail: fmt::Arguments) -> Self {
        Self::new("invalid_request_body", format!("Request body is invalid. Please check body is correct. {detail}"))
    }
    /// Names the unknown query parameters or body fields (a bounded preview of each, and of how many) and the
    /// ones `route` accepts.
    fn unknown(what: &str, names: &[&str], route: Route, accepted: &[&str]) -> Self {
        /// Enough to show a pattern (e.g. a wrong case); the count says the rest.
        const MAX_NAMED: usize = 5;
        let plural = if names.len() > 1 { "s" } else { "" };
        let mut description = format!("unknown {what}{plural} ");
        for (i, name) in names.iter().take(MAX_NAMED).enumerate() {
            let separator = if i > 0 { ", " } else { "" };
            let _ = write!(description, "{separator}{:?}", preview(name));
        }
        if names.len() > MAX_NAMED {
            let _ = write!(description, " and {} more", names.len() - MAX_NAMED);
        }
        let accepted = if accepted.is_empty() { "none".to_owned() } else { accepted.join(", ") };
        let _ = write!(description, "; {} accepts: {accepted}", route.name());
        Self::illegal(description)
    }
}

/// Checks an ID against Easemob's rule (1–64 bytes of `A-Z a-z 0-9 _ - .`); `what` names the parameter, and is
/// only formatted when the ID is refused.
fn check_id(what: &dyn fmt::Display, value: &str) -> Result<(), ValidationError> {
    const RULE: &str = "IDs are 1 to 64 characters of A-Z a-z 0-9 _ - .";
    if value.is_empty() {
        return Err(ValidationError::illegal(format!("{what} is empty; {RULE}")));
    }
    if let Some(bad) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))) {
        return Err(ValidationError::illegal(format!("{what} contains {bad:?}, which is not allowed; {RULE}")));
    }
    if value.len() > MAX_ID_LEN {
        return Err(ValidationError::illegal(format!("{what} is {} characters long; {RULE}", value.len())));
    }
    if value.chars().all(|c| c == '.') {
        return Err(ValidationError::illegal(format!("{what} consists only of dots; {RULE}")));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash)]
        pub struct $name(CompactString);

        impl $name {
            /// `what` names the parameter in the error, e.g. "query parameter userId (the peer)".
            pub fn parse(what: &str, value: &str) -> Result<Self, ValidationError> {
                check_id(&what, value)?;
                Ok(Self(CompactString::from(value)))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// A user ID. Easemob compares them case-insensitively; the caller's spelling is forwarded as given.
    UserId
);
id_type!(
    /// A group or chat-room ID. Numeric in every example, but no format is documented, so the user ID rule applies.
    GroupId
);
id_type!(
    /// A conversation's other side in `delete_conversation`: the peer's user ID for `chat`, the group ID for
    /// `groupchat`; both follow the same rule.
    Channel
);

impl Serialize for Channel {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// 1 to 50 distinct message IDs, in the caller's order. A single ID (the usual call) takes no allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MsgIds(SmallVec<[CompactString; 1]>);

impl MsgIds {
    /// Parses Easemob's comma-separated `msgIdList`: items are trimmed, duplicates dropped, empty items refused.
    pub fn parse(list: &str) -> Result<Self, ValidationError> {
        if list.trim().is_empty() {
            return Err(ValidationError::new("Bad Request", "required query parameter msgIdList is empty"));
        }
        let mut ids: SmallVec<[CompactString; 1]> = SmallVec::new();
        for (position, item) in list.split(',').enumerate() {
            let id = item.trim();
            if id.is_empty() {
                return Err(ValidationError::illegal(format!(
                    "msgIdList has an empty message ID at position {}",
                    position + 1
                )));
            }
            check_id(&format_args!("message ID {} of msgIdList", position + 1), id)?;
            if !ids.iter().any(|seen| seen == id) {
                ids.push(CompactString::from(id));
            }
        }
        if ids.len() > MAX_MSG_IDS {
            return Err(ValidationError::new("param exception", "delete msg list limit can not greater than 50"));
        }
        Ok(MsgIds(ids))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(CompactString::as_str)
    }
}

/// `msgIdList` as sent upstream: the IDs, percent-encoded, comma-separated.
/// Appends `value` percent-encoded as a path segment or query value: the encoder's pieces, without formatting.
fn push_encoded(out: &mut String, value: &str) {
    out.extend(utf8_percent_encode(value, COMPONENT));
}

/// Appends message IDs as Easemob takes them: comma-separated, each encoded.
fn push_ids(out: &mut String, ids: &MsgIds) {
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_encoded(out, id);
    }
}

/// A Unix time in milliseconds that cannot be a unit mistake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DelTime(i64);

impl DelTime {
    pub fn parse(value: &str, now_ms: i64) -> Result<Self, ValidationError> {
        let ms: i64 = value.parse().ok().filter(|_| value.bytes().all(|b| b.is_ascii_digit())).ok_or_else(|| {
            ValidationError::illegal(format!(
                "delTime must be a Unix time in milliseconds (digits only); got {:?}",
                preview(value)
            ))
        })?;
        if ms < EARLIEST_DEL_TIME_MS {
            return Err(ValidationError::illegal(format!(
                "delTime {ms} is before 1973 when read as milliseconds; it looks like Unix seconds \
                 (Easemob would clear nothing): send {} instead",
                ms.saturating_mul(1000)
            )));
        }
        if ms > now_ms + MAX_DEL_TIME_AHEAD_MS {
            let hint = if ms > 100_000_000_000_000 {
                "it looks like microseconds or nanoseconds; send milliseconds"
            } else {
                "check the clock and the unit (milliseconds)"
            };
            return Err(ValidationError::illegal(format!("delTime {ms} is more than a day in the future; {hint}")));
        }
        Ok(DelTime(ms))
    }

    pub fn millis(self) -> i64 {
        self.0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConversationType {
    Chat,
    Groupchat,
}

/// The body of `delete_conversation`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Conversation {
    /// The peer's user ID for `chat`, the group ID for `groupchat`; both follow the same ID rule.
    pub channel: Channel,
    #[serde(rename = "type")]
    pub kind: ConversationType,
    pub delete_roam: bool,
}

impl Conversation {
    /// The body fields Easemob reads; any other is refused rather than silently dropped.
    const FIELDS: [&str; 3] = ["channel", "type", "delete_roam"];
    /// What a body must be, for the errors that cannot point at one field.
    const SHAPE: &str =
        "a JSON object with channel (a string), type (\"chat\" or \"groupchat\") and delete_roam (a boolean)";

    /// Validates in Easemob's order: malformed JSON or a wrongly typed field first, then missing fields. Unknown
    /// fields come in between: a misspelt name is the likely reason a field is missing, so it is the better answer.
    pub fn parse(body: &[u8]) -> Result<Self, ValidationError> {
        if body.trim_ascii().is_empty() {
            return Err(ValidationError::invalid_body(format_args!("The body is empty; it must be {}", Self::SHAPE)));
        }
        // serde_json's messages are fixed texts with a line and column: they never echo the caller's bytes.
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| ValidationError::invalid_body(format_args!("The body is not valid JSON: {e}")))?;
        let Value::Object(fields) = value else {
            let got = json_type(&value);
            return Err(ValidationError::invalid_body(format_args!("The body must be {}; got {got}", Self::SHAPE)));
        };
        let channel = typed_field(&fields, "channel", "a string", Value::as_str)?;
        let kind = typed_field(&fields, "type", "a string", Value::as_str)?;
        let delete_roam = typed_field(&fields, "delete_roam", "a boolean", Value::as_bool)?;
        let unknown: Vec<&str> = fields.keys().map(String::as_str).filter(|k| !Self::FIELDS.contains(k)).collect();
        if !unknown.is_empty() {
            return Err(ValidationError::unknown("body field", &unknown, Route::DeleteConversation, &Self::FIELDS));
        }
        let channel = channel.filter(|s| !s.is_empty());
        let channel = channel.ok_or_else(|| ValidationError::illegal("field channel cannot be null or empty"))?;
        let kind = kind.filter(|s| !s.is_empty());
        let kind = kind.ok_or_else(|| ValidationError::illegal("field type cannot be null or empty"))?;
        let delete_roam = delete_roam.ok_or_else(|| ValidationError::illegal("field delete_roam cannot be null"))?;
        let kind = match kind {
            "chat" => ConversationType::Chat,
            "groupchat" => ConversationType::Groupchat,
            other => {
                return Err(ValidationError::illegal(format!(
                    "field type must be \"chat\" or \"groupchat\"; got {:?}",
                    preview(other)
                )));
            }
        };
        let what = match kind {
            ConversationType::Chat => "field channel (the peer's user ID)",
            ConversationType::Groupchat => "field channel (the group ID)",
        };
        Ok(Conversation { channel: Channel::parse(what, channel)?, kind, delete_roam })
    }
}

/// One body field, or `None` when absent or null (Easemob counts null as missing). A value `read` cannot take is
/// Easemob's `invalid_request_body`, naming the field and both types.
fn typed_field<'v, T>(
    fields: &'v Map<String, Value>,
    name: &str,
    expected: &str,
    read: impl Fn(&'v Value) -> Option<T>,
) -> Result<Option<T>, ValidationError> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => read(value).map(Some).ok_or_else(|| {
            let got = json_type(value);
            ValidationError::invalid_body(format_args!("The field {name} must be {expected}; got {got}"))
        }),
    }
}

/// A JSON value's type with its article, as in "got an array".
fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A validated request for one of the six operations: the only thing the gateway forwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    DeleteChatMessages { owner: UserId, peer: UserId, msg_ids: MsgIds, notify: Option<bool> },
    DeleteGroupMessages { owner: UserId, group: GroupId, msg_ids: MsgIds, notify: Option<bool> },
    ClearUserMessages { owner: UserId },
    ClearChatMessagesBefore { owner: UserId, peer: UserId, del_time: DelTime, notify: Option<bool> },
    ClearGroupMessagesBefore { owner: UserId, group: GroupId, del_time: DelTime, notify: Option<bool> },
    DeleteConversation { owner: UserId, conversation: Conversation },
}

impl Call {
    /// Builds the call from the route, the raw owner path segment, the raw query string and, for
    /// `delete_conversation` only, the body. Bodies sent to the five roaming routes are ignored.
    pub fn parse(
        route: Route,
        raw_owner: &str,
        query: Option<&str>,
        body: &[u8],
        now_ms: i64,
    ) -> Result<Call, ValidationError> {
        // The owner's path parameter, named as Easemob's docs spell it.
        let owner_what = match route {
            Route::DeleteConversation => "path parameter username (the owner)",
            _ => "path parameter userId (the owner)",
        };
        let owner = percent_decode_str(raw_owner)
            .decode_utf8()
            .map_err(|_| ValidationError::illegal(format!("{owner_what} is not valid UTF-8 once percent-decoded")))?;
        let owner = UserId::parse(owner_what, &owner)?;
        let mut q = Query::parse(route, query.unwrap_or(""))?;
        let peer = |q: &mut Query| -> Result<UserId, ValidationError> {
            UserId::parse("query parameter userId (the peer)", &q.required("userId")?)
        };
        let group = |q: &mut Query| -> Result<GroupId, ValidationError> {
            GroupId::parse("query parameter groupId", &q.required("groupId")?)
        };
        let call = match route {
            Route::DeleteChatMessages => Call::DeleteChatMessages {
                peer: peer(&mut q)?,
                msg_ids: MsgIds::parse(&q.required("msgIdList")?)?,
                notify: q.notify()?,
                owner,
            },
            Route::DeleteGroupMessages => Call::DeleteGroupMessages {
                group: group(&mut q)?,
                msg_ids: MsgIds::parse(&q.required("msgIdList")?)?,
                notify: q.notify()?,
                owner,
            },
            Route::ClearUserMessages => Call::ClearUserMessages { owner },
            Route::ClearChatMessagesBefore => Call::ClearChatMessagesBefore {
                peer: peer(&mut q)?,
                del_time: DelTime::parse(&q.required("delTime")?, now_ms)?,
                notify: q.notify()?,
                owner,
            },
            Route::ClearGroupMessagesBefore => Call::ClearGroupMessagesBefore {
                group: group(&mut q)?,
                del_time: DelTime::parse(&q.required("delTime")?, now_ms)?,
                notify: q.notify()?,
                owner,
            },
            Route::DeleteConversation => Call::DeleteConversation { owner, conversation: Conversation::parse(body)? },
        };
        Ok(call)
    }

    pub fn route(&self) -> Route {
        match self {
            Call::DeleteChatMessages { .. } => Route::DeleteChatMessages,
            Call::DeleteGroupMessages { .. } => Route::DeleteGroupMessages,
            Call::ClearUserMessages { .. } => Route::ClearUserMessages,
            Call::ClearChatMessagesBefore { .. } => Route::ClearChatMessagesBefore,
            Call::ClearGroupMessagesBefore { .. } => Route::ClearGroupMessagesBefore,
            Call::DeleteConversation { .. } => Route::DeleteConversation,
        }
    }

    pub fn owner(&self) -> &UserId {
        match self {
            Call::DeleteChatMessages { owner, .. }
            | Call::DeleteGroupMessages { owner, .. }
            | Call::ClearUserMessages { owner }
            | Call::ClearChatMessagesBefore { owner, .. }
            | Call::ClearGroupMessagesBefore { owner, .. }
            | Call::DeleteConversation { owner, .. } => owner,
        }
    }

    /// The canonical path and query under `/{org}/{app}`, rebuilt from the validated values only.
    pub fn upstream_path_and_query(&self) -> String {
        let mut out = String::new();
        self.write_upstream_path_and_query(&mut out);
        out
    }

    /// Appends the canonical path and query to `out` (no intermediate strings: this runs on every request).
    pub fn write_upstream_path_and_query(&self, out: &mut String) {
        // Pushed piece by piece: this runs for every forwarded call, and `write!` costs more than the pieces.
        let owner = self.owner().as_str();
        let mut segments = |before: &str, after: &str| {
            out.push_str(before);
            push_encoded(out, owner);
            out.push_str(after);
        };
        match self {
            Call::DeleteChatMessages { peer, msg_ids, .. } => {
                segments("/rest/message/roaming/chat/user/", "?userId=");
                push_encoded(out, peer.as_str());
                out.push_str("&msgIdList=");
                push_ids(out, msg_ids);
            }
            Call::DeleteGroupMessages { group, msg_ids, .. } => {
                segments("/rest/message/roaming/group/user/", "?groupId=");
                push_encoded(out, group.as_str());
                out.push_str("&msgIdList=");
                push_ids(out, msg_ids);
            }
            Call::ClearUserMessages { .. } => segments("/rest/message/roaming/user/", "/delete/all"),
            Call::ClearChatMessagesBefore { peer, del_time, .. } => {
                segments("/rest/message/roaming/chat/user/", "/time?userId=");
                push_encoded(out, peer.as_str());
                out.push_str("&delTime=");
                out.push_str(itoa::Buffer::new().format(del_time.millis()));
            }
            Call::ClearGroupMessagesBefore { group, del_time, .. } => {
                segments("/rest/message/roaming/group/user/", "/time?groupId=");
                push_encoded(out, group.as_str());
                out.push_str("&delTime=");
                out.push_str(itoa::Buffer::new().format(del_time.millis()));
            }
            Call::DeleteConversation { .. } => segments("/users/", "/user_channel"),
        }
        match self.notify() {
            Some(true) => out.push_str("&isNotify=true"),
            Some(false) => out.push_str("&isNotify=false"),
            None => {}
        }
    }

    fn notify(&self) -> Option<bool> {
        match self {
            Call::DeleteChatMessages { notify, .. }
            | Call::DeleteGroupMessages { notify, .. }
            | Call::ClearChatMessagesBefore { notify, .. }
            | Call::ClearGroupMessagesBefore { notify, .. } => *notify,
            Call::ClearUserMessages { .. } | Call::DeleteConversation { .. } => None,
        }
    }

    /// The JSON body to send upstream, for `delete_conversation` only.
    pub fn upstream_body(&self) -> Option<Bytes> {
        match self {
            Call::DeleteConversation { conversation, .. } => {
                Some(Bytes::from(serde_json::to_vec(conversation).expect("conversation serializes")))
            }
            _ => None,
        }
    }
}

/// The query parameters of one request: each allowed key at most once, unknown keys refused. Values borrow from
/// the query string unless they had to be percent-decoded.
struct Query<'a> {
    /// At most the route's three keys, and `isNotify` split back out of a glued value: no allocation.
    values: SmallVec<[(&'static str, Cow<'a, str>); 4]>,
}

impl<'a> Query<'a> {
    fn parse(route: Route, raw: &'a str) -> Result<Query<'a>, ValidationError> {
        let allowed: &[&'static str] = match route {
            Route::DeleteChatMessages => &["userId", "msgIdList", "isNotify"],
            Route::DeleteGroupMessages => &["groupId", "msgIdList", "isNotify"],
            Route::ClearChatMessagesBefore => &["userId", "delTime", "isNotify"],
            Route::ClearGroupMessagesBefore => &["groupId", "delTime", "isNotify"],
            Route::ClearUserMessages | Route::DeleteConversation => &[],
        };
        let mut values = SmallVec::new();
        for (key, value) in pairs(raw) {
            let Some(&key) = allowed.iter().find(|k| **k == key) else {
                return Err(ValidationError::unknown("query parameter", &[&*key], route, allowed));
            };
            if values.iter().any(|(k, _)| *k == key) {
                return Err(ValidationError::illegal(format!("query parameter {key} is given more than once")));
            }
            values.push((key, value));
        }
        let mut query = Query { values };
        query.repair_glued_is_notify()?;
        Ok(query)
    }

    /// Easemob's own curl example reads `msgIdList=XXXXisNotify=false`: an `&` is missing, and callers copy it.
    /// IDs cannot contain `=`, so a value ending in `isNotify=true|false` is split back into two parameters.
    fn repair_glued_is_notify(&mut self) -> Result<(), ValidationError> {
        for suffix in ["isNotify=true", "isNotify=false"] {
            let glued = self.values.iter_mut().find(|(k, v)| *k != "isNotify" && v.ends_with(suffix));
            if let Some((_, value)) = glued {
                let kept = value.len() - suffix.len();
                match value {
                    Cow::Borrowed(v) => *v = &v[..kept],
                    Cow::Owned(v) => v.truncate(kept),
                }
                let notify = &suffix["isNotify=".len()..];
                match self.values.iter().find(|(k, _)| *k == "isNotify") {
                    Some((_, given)) if given != notify => {
                        return Err(ValidationError::illegal("isNotify is given twice with different values"));
                    }
                    Some(_) => {}
                    None => self.values.push(("isNotify", Cow::Borrowed(notify))),
                }
            }
        }
        Ok(())
    }

    fn required(&mut self, key: &str) -> Result<Cow<'a, str>, ValidationError> {
        let at = self.values.iter().position(|(k, _)| *k == key).ok_or_else(|| ValidationError::missing(key))?;
        Ok(self.values.swap_remove(at).1)
    }

    fn notify(&mut self) -> Result<Option<bool>, ValidationError> {
        let Some(at) = self.values.iter().position(|(k, _)| *k == "isNotify") else {
            return Ok(None);
        };
        match &*self.values.swap_remove(at).1 {
            "true" => Ok(Some(true)),
            "false" => Ok(Some(false)),
            other => Err(ValidationError::illegal(format!("isNotify must be true or false; got {:?}", preview(other)))),
        }
    }
}

/// A query's `key=value` pairs as `form_urlencoded` reads them (empty pairs skipped, a missing `=` an empty
/// value). The usual query needs no decoding (no `%`, no `+`): its pairs are borrowed as they are, which costs
/// a fifth of decoding them; any other goes through `form_urlencoded`.
fn pairs(raw: &str) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    let plain = !raw.bytes().any(|b| b == b'%' || b == b'+');
    let borrowed = plain.then(|| {
        raw.split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
            .map(|(key, value)| (Cow::Borrowed(key), Cow::Borrowed(value)))
    });
    let decoded = (!plain).then(|| form_urlencoded::parse(raw.as_bytes()));
    borrowed.into_iter().flatten().chain(decoded.into_iter().flatten())
}

/// At most 32 characters of caller input, for error descriptions.
fn preview(s: &str) -> String {
    let mut out: String = s.chars().take(32).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod pairs_tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn borrowed_pairs_read_as_form_urlencoded_does(raw in "[a-zA-Z0-9=&%+._-]{0,40}") {
            let ours: Vec<(String, String)> = pairs(&raw).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
            let theirs: Vec<(String, String)> = form_urlencoded::parse(raw.as_bytes()).into_owned().collect();
            prop_assert_eq!(ours, theirs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_760_000_000_000;

    fn parse(route: Route, owner: &str, query: &str) -> Result<Call, ValidationError> {
        Call::parse(route, owner, Some(query), b"", NOW)
    }

    fn err(route: Route, owner: &str, query: &str) -> ValidationError {
        parse(route, owner, query).expect_err("should be refused")
    }

    #[test]
    fn chat_deletion_is_rebuilt_canonically() {
        let call = parse(Route::DeleteChatMessages, "u1", "msgIdList=%201%20,2,1&userId=u2&isNotify=false").unwrap();
        assert_eq!(
            call.upstream_path_and_query(),
            "/rest/message/roaming/chat/user/u1?userId=u2&msgIdList=1,2&isNotify=false"
        );
        assert_eq!(call.upstream_body(), None);
    }

    #[test]
    fn is_notify_is_omitted_when_absent() {
        let call = parse(Route::DeleteGroupMessages, "u1", "groupId=123&msgIdList=9").unwrap();
        assert_eq!(call.upstream_path_and_query(), "/rest/message/roaming/group/user/u1?groupId=123&msgIdList=9");
    }

    #[test]
    fn time_routes_keep_milliseconds() {
        let call = parse(Route::ClearChatMessagesBefore, "u1", "userId=u2&delTime=1659014868000").unwrap();
        assert_eq!(
            call.upstream_path_and_query(),
            "/rest/message/roaming/chat/user/u1/time?userId=u2&delTime=1659014868000"
        );
        let call =
            parse(Route::ClearGroupMessagesBefore, "u1", "groupId=g1&delTime=1659014868000&isNotify=true").unwrap();
        assert_eq!(
            call.upstream_path_and_query(),
            "/rest/message/roaming/group/user/u1/time?groupId=g1&delTime=1659014868000&isNotify=true"
        );
    }

    #[test]
    fn clear_user_messages_takes_no_query() {
        let call = parse(Route::ClearUserMessages, "u1", "").unwrap();
        assert_eq!(call.upstream_path_and_query(), "/rest/message/roaming/user/u1/delete/all");
        assert_eq!(err(Route::ClearUserMessages, "u1", "isNotify=true").error, "illegal_argument");
    }

    #[test]
    fn owner_ids_are_checked_after_percent_decoding() {
        for owner in ["", "..", "a%2Fb", "a%252Fb", "a%20b", "a%00b", "%C0%AF", "%FF", "a b", "ü"] {
            let e = err(Route::ClearUserMessages, owner, "");
            assert_eq!(e.error, "illegal_argument", "{owner}");
            assert!(e.description.contains("path parameter userId"), "{owner}: {}", e.description);
        }
        assert!(err(Route::ClearUserMessages, &"a".repeat(65), "").description.contains("65 characters"));
        assert!(parse(Route::ClearUserMessages, &"a".repeat(64), "").is_ok());
        assert!(parse(Route::ClearUserMessages, "User_1-a.b", "").is_ok());
        assert!(parse(Route::ClearUserMessages, "u%31", "").is_ok());
    }

    #[test]
    fn missing_parameters_are_easemobs_bad_request() {
        let e = err(Route::DeleteChatMessages, "u1", "msgIdList=1");
        assert_eq!((e.error, e.description.as_str()), ("Bad Request", "required query parameter userId is missing"));
        assert_eq!(err(Route::DeleteChatMessages, "u1", "userId=u2").error, "Bad Request");
        assert_eq!(err(Route::DeleteGroupMessages, "u1", "msgIdList=1").error, "Bad Request");
        assert_eq!(err(Route::ClearChatMessagesBefore, "u1", "userId=u2").error, "Bad Request");
        assert_eq!(err(Route::DeleteChatMessages, "u1", "userId=u2&msgIdList=").error, "Bad Request");
    }

    #[test]
    fn fifty_ids_pass_and_fifty_one_are_easemobs_param_exception() {
        let ids = |n: usize| (0..n).map(|i| (1_000_000 + i).to_string()).collect::<Vec<_>>().join(",");
        assert!(parse(Route::DeleteChatMessages, "u1", &format!("userId=u2&msgIdList={}", ids(50))).is_ok());
        let e = err(Route::DeleteChatMessages, "u1", &format!("userId=u2&msgIdList={}", ids(51)));
        assert_eq!(e, ValidationError::new("param exception", "delete msg list limit can not greater than 50"));
        let dup = format!("{},{}", ids(50), ids(10));
        let call = parse(Route::DeleteChatMessages, "u1", &format!("userId=u2&msgIdList={dup}")).unwrap();
        let Call::DeleteChatMessages { msg_ids, .. } = call else { unreachable!() };
        assert_eq!(msg_ids.len(), 50);
    }

    #[test]
    fn empty_or_malformed_message_ids_are_refused() {
        for list in ["1,,2", "1,2,", ",1", "1,a=b", "1,a/b"] {
            assert_eq!(
                err(Route::DeleteChatMessages, "u1", &format!("userId=u2&msgIdList={list}")).error,
                "illegal_argument"
            );
        }
    }

    #[test]
    fn is_notify_must_be_a_boolean() {
        for v in ["", "yes", "1", "TRUE", "false "] {
            let e = err(Route::DeleteChatMessages, "u1", &format!("userId=u2&msgIdList=1&isNotify={v}"));
            assert!(e.description.starts_with("isNotify must be true or false"), "{v}: {e}");
        }
    }

    #[test]
    fn seed_example_with_a_missing_ampersand_is_repaired() {
        let call = parse(Route::DeleteGroupMessages, "u1", "groupId=g1&msgIdList=XXXXisNotify=false").unwrap();
        assert_eq!(
            call.upstream_path_and_query(),
            "/rest/message/roaming/group/user/u1?groupId=g1&msgIdList=XXXX&isNotify=false"
        );
        let e = err(Route::DeleteGroupMessages, "u1", "groupId=g1&msgIdList=1isNotify=false&isNotify=true");
        assert!(e.description.contains("different values"));
    }

    #[test]
    fn unknown_and_repeated_parameters_are_refused() {
        let e = err(Route::DeleteChatMessages, "u1", "userId=u2&msgIdList=1&isnotify=false");
        assert_eq!(
            e.description,
            r#"unknown query parameter "isnotify"; delete_chat_messages accepts: userId, msgIdList, isNotify"#
        );
        let e = err(Route::ClearUserMessages, "u1", "a=1&b=2");
        assert_eq!(e.description, r#"unknown query parameter "a"; clear_user_messages accepts: none"#);
        let e = err(Route::DeleteChatMessages, "u1", "userId=u2&userId=u3&msgIdList=1");
        assert_eq!(e.description, "query parameter userId is given more than once");
    }

    #[test]
    fn del_time_in_seconds_or_far_future_is_refused_with_the_likely_mistake() {
        let q = |t: &str| format!("userId=u2&delTime={t}");
        assert!(
            err(Route::ClearChatMessagesBefore, "u1", &q("1659014868")).description.contains("looks like Unix seconds")
        );
        assert!(err(Route::ClearChatMessagesBefore, "u1", &q("0")).description.contains("before 1973"));
        let micro = (NOW * 1000).to_string();
        assert!(err(Route::ClearChatMessagesBefore, "u1", &q(&micro)).description.contains("microseconds"));
        let tomorrow = (NOW + MAX_DEL_TIME_AHEAD_MS + 1).to_string();
        assert!(err(Route::ClearChatMessagesBefore, "u1", &q(&tomorrow)).description.contains("more than a day"));
        for bad in ["-5", "1.5e12", "abc", "+1659014868000", ""] {
            assert!(err(Route::ClearChatMessagesBefore, "u1", &q(bad)).description.contains("digits only"), "{bad}");
        }
        assert!(parse(Route::ClearChatMessagesBefore, "u1", &q(&NOW.to_string())).is_ok());
    }

    fn conv(body: &str) -> Result<Conversation, ValidationError> {
        Conversation::parse(body.as_bytes())
    }

    /// Easemob's `invalid_request_body` with its own text first, so its clients still match it, then `detail`.
    fn invalid(detail: &str) -> ValidationError {
        let text = format!("Request body is invalid. Please check body is correct. {detail}");
        ValidationError::new("invalid_request_body", text)
    }

    #[test]
    fn an_empty_body_says_what_it_must_contain() {
        let empty = invalid(
            "The body is empty; it must be a JSON object with channel (a string), type (\"chat\" or \"groupchat\") \
             and delete_roam (a boolean)",
        );
        for body in ["", " \r\n\t"] {
            assert_eq!(conv(body), Err(empty.clone()), "{body:?}");
        }
    }

    #[test]
    fn malformed_json_gets_serde_jsons_error_with_line_and_column() {
        let cases = [
            ("x", "expected value at line 1 column 1"),
            ("{", "EOF while parsing an object at line 1 column 1"),
            (r#"{"channel":"u2",}"#, "trailing comma at line 1 column 17"),
            ("{\n  \"channel\": \"u2\"\n  \"type\": \"chat\"\n}", "expected `,` or `}` at line 3 column 3"),
            (r#"{"channel":"u2"} {}"#, "trailing characters at line 1 column 18"),
        ];
        for (body, error) in cases {
            assert_eq!(conv(body), Err(invalid(&format!("The body is not valid JSON: {error}"))), "{body}");
        }
    }

    #[test]
    fn a_body_that_is_not_an_object_names_its_type() {
        for (body, got) in [("[]", "an array"), ("null", "null"), ("\"x\"", "a string"), ("5", "a number")] {
            let e = conv(body).unwrap_err();
            assert_eq!(e, invalid(&format!("The body must be {}; got {got}", Conversation::SHAPE)), "{body}");
        }
    }

    #[test]
    fn a_wrongly_typed_field_names_the_field_and_both_types() {
        let cases = [
            (r#"{"channel":1,"type":"chat","delete_roam":true}"#, "The field channel must be a string; got a number"),
            (r#"{"channel":"u2","type":["chat"],"delete_roam":true}"#, "The field type must be a string; got an array"),
            (
                r#"{"channel":"u2","type":"chat","delete_roam":"true"}"#,
                "The field delete_roam must be a boolean; got a string",
            ),
            // Easemob's order: a type error comes before an unknown or a missing field.
            (r#"{"channel":{},"chanel":"u2"}"#, "The field channel must be a string; got an object"),
        ];
        for (body, detail) in cases {
            assert_eq!(conv(body), Err(invalid(detail)), "{body}");
        }
    }

    #[test]
    fn a_missing_or_empty_field_gets_easemobs_own_text() {
        let cases = [
            (r#"{"type":"chat","delete_roam":true}"#, "field channel cannot be null or empty"),
            (r#"{"channel":null,"type":"chat","delete_roam":true}"#, "field channel cannot be null or empty"),
            (r#"{"channel":"","type":"chat","delete_roam":true}"#, "field channel cannot be null or empty"),
            (r#"{"channel":"u2","delete_roam":true}"#, "field type cannot be null or empty"),
            (r#"{"channel":"u2","type":"","delete_roam":true}"#, "field type cannot be null or empty"),
            (r#"{"channel":"u2","type":"chat","delete_roam":null}"#, "field delete_roam cannot be null"),
        ];
        for (body, text) in cases {
            assert_eq!(conv(body), Err(ValidationError::illegal(text)), "{body}");
        }
        assert!(conv(r#"{"channel":"u2","type":"room","delete_roam":true}"#).unwrap_err().description.contains("chat"));
        assert!(conv(r#"{"channel":"a/b","type":"chat","delete_roam":true}"#).is_err());
    }

    #[test]
    fn unknown_body_fields_are_named_before_missing_ones() {
        let accepts = "delete_conversation accepts: channel, type, delete_roam";
        let e = conv(r#"{"channel":"u2","type":"chat","delete_roam":true,"extra":null}"#).unwrap_err();
        assert_eq!(e, ValidationError::illegal(format!(r#"unknown body field "extra"; {accepts}"#)));
        // The misspelt name explains the missing field better than "field delete_roam cannot be null" would.
        let e = conv(r#"{"channel":"u2","type":"chat","deleteRoam":true}"#).unwrap_err();
        assert_eq!(e, ValidationError::illegal(format!(r#"unknown body field "deleteRoam"; {accepts}"#)));
    }

    #[test]
    fn many_or_long_unknown_fields_are_previewed_in_bounded_text() {
        let e = conv(r#"{"a":1,"b":2,"c":3,"d":4,"e":5,"f":6,"g":7}"#).unwrap_err();
        let expected = r#"unknown body fields "a", "b", "c", "d", "e" and 2 more; delete_conversation accepts: "#;
        assert!(e.description.starts_with(expected), "{e}");
        let long = "k".repeat(1000);
        let fields = (0..100).map(|i| format!(r#""{long}{i}":{i}"#)).collect::<Vec<_>>().join(",");
        let e = conv(&format!("{{{fields}}}")).unwrap_err();
        assert!(e.description.contains(&format!("\"{}…\"", "k".repeat(32))), "{e}");
        assert!(e.description.len() < 300, "{} bytes: {e}", e.description.len());
    }

    #[test]
    fn conversation_is_forwarded_canonically() {
        let seed_example = b"\n{ \"channel\": \"u2\", \"type\": \"chat\", \"delete_roam\": true }\n";
        let call = Call::parse(Route::DeleteConversation, "u1", None, seed_example, NOW).unwrap();
        assert_eq!(call.upstream_path_and_query(), "/users/u1/user_channel");
        assert_eq!(call.upstream_body().unwrap(), &br#"{"channel":"u2","type":"chat","delete_roam":true}"#[..]);
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    const NOW: i64 = 1_760_000_000_000;

    fn id() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_.-]{1,64}".prop_filter("not only dots", |s| !s.chars().all(|c| c == '.'))
    }

    fn route() -> impl Strategy<Value = Route> {
        prop::sample::select(Route::ALL.to_vec())
    }

    /// A valid request for `route`: (owner, query, body).
    fn valid(route: Route) -> BoxedStrategy<(String, String, Vec<u8>)> {
        let notify = prop::option::of(any::<bool>());
        let ids = prop::collection::vec("[0-9]{1,19}", 1..=50);
        let del_time = EARLIEST_DEL_TIME_MS..NOW;
        let with_notify = |q: String, n: Option<bool>| match n {
            Some(n) => format!("{q}&isNotify={n}"),
            None => q,
        };
        match route {
            Route::DeleteChatMessages | Route::DeleteGroupMessages => {
                let key = if route == Route::DeleteChatMessages { "userId" } else { "groupId" };
                (id(), id(), ids, notify)
                    .prop_map(move |(o, p, ids, n)| {
                        (o, with_notify(format!("{key}={p}&msgIdList={}", ids.join(",")), n), vec![])
                    })
                    .boxed()
            }
            Route::ClearChatMessagesBefore | Route::ClearGroupMessagesBefore => {
                let key = if route == Route::ClearChatMessagesBefore { "userId" } else { "groupId" };
                (id(), id(), del_time, notify)
                    .prop_map(move |(o, p, t, n)| (o, with_notify(format!("{key}={p}&delTime={t}"), n), vec![]))
                    .boxed()
            }
            Route::ClearUserMessages => id().prop_map(|o| (o, String::new(), vec![])).boxed(),
            Route::DeleteConversation => (id(), id(), any::<bool>(), any::<bool>())
                .prop_map(|(o, c, group, roam)| {
                    let kind = if group { "groupchat" } else { "chat" };
                    let body = format!(r#"{{"channel":"{c}","type":"{kind}","delete_roam":{roam}}}"#);
                    (o, String::new(), body.into_bytes())
                })
                .boxed(),
        }
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_input(
            route in route(),
            owner in ".{0,80}",
            query in prop::option::of(".{0,200}"),
            body in prop::collection::vec(any::<u8>(), 0..200),
        ) {
            let _ = Call::parse(route, &owner, query.as_deref(), &body, NOW);
        }

        #[test]
        fn valid_requests_are_accepted_and_what_is_forwarded_reparses_to_the_same_call(
            (route, (owner, query, body)) in route().prop_flat_map(|r| (Just(r), valid(r)))
        ) {
            let call = Call::parse(route, &owner, Some(&query), &body, NOW).expect("valid by construction");
            let forwarded = call.upstream_path_and_query();
            let (path, query) = forwarded.split_once('?').map_or((forwarded.as_str(), None), |(p, q)| (p, Some(q)));
            let forwarded_owner = path.rsplit('/').find(|s| owner == *s);
            prop_assert_eq!(forwarded_owner, Some(owner.as_str()));
            let body = call.upstream_body().unwrap_or_default();
            let again = Call::parse(route, &owner, query, &body, NOW).expect("the forwarded call is valid");
            prop_assert_eq!(again, call);
        }

        #[test]
        fn an_owner_with_any_character_outside_the_rule_is_refused(
            route in route(),
            prefix in "[a-z]{0,5}",
            bad in "[^A-Za-z0-9_.-]",
        ) {
            let owner = percent_encoding::utf8_percent_encode(&format!("{prefix}{bad}"), NON_ALPHANUMERIC).to_string();
            let error = Call::parse(route, &owner, None, b"", NOW).unwrap_err();
            prop_assert!(error.description.contains("path parameter"), "{}", error.description);
        }
    }
}
