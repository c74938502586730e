//! The simulator's in-memory Easemob: apps, tokens, users, groups, each user's own view of their
//! conversations (so that one-way deletions change only the owner's view), and the calls each app was admitted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::limits::Meter;

/// Easemob's historical default token lifetime (60 days), used when the caller sends no `ttl`.
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 60 * 24 * 3600;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Chat,
    Groupchat,
}

/// A conversation as one owner sees it: `(kind, peer user or group ID)`.
pub type ConvKey = (Kind, String);

#[derive(Clone, Debug, Serialize)]
pub struct Message {
    pub id: String,
    pub from: String,
    pub timestamp: i64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Conversation {
    /// False once the owner deleted the conversation but kept its roaming messages (`delete_roam: false`).
    pub listed: bool,
    pub messages: Vec<Message>,
}

pub struct App {
    pub org: String,
    pub name: String,
    pub uuid: String,
    pub client_id: String,
    pub client_secret: String,
    pub roaming_enabled: bool,
    /// Issued tokens and when each expires (`None`: never).
    tokens: HashMap<String, Option<Instant>>,
    users: BTreeSet<String>,
    groups: BTreeMap<String, BTreeSet<String>>,
    views: HashMap<String, BTreeMap<ConvKey, Conversation>>,
    /// Easemob counts every limit per AppKey.
    pub meter: Meter,
}

pub enum TokenCheck {
    Valid,
    Expired,
    Unknown,
}

impl App {
    pub fn new(org: &str, name: &str, client_id: &str, client_secret: &str) -> App {
        App {
            org: org.to_owned(),
            name: name.to_owned(),
            uuid: format!("{:08x}-sim0-4000-8000-{:012x}", fastrand::u32(..), fastrand::u64(..1 << 48)),
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            roaming_enabled: true,
            tokens: HashMap::new(),
            users: BTreeSet::new(),
            groups: BTreeMap::new(),
            views: HashMap::new(),
            meter: Meter::default(),
        }
    }

    /// Issues a token; `ttl_secs == 0` is a token that never expires.
    pub fn issue_token(&mut self, ttl_secs: u64) -> String {
        let token: String = std::iter::repeat_with(fastrand::alphanumeric).take(48).collect();
        let token = format!("YWMt{token}");
        let expiry = (ttl_secs > 0).then(|| Instant::now() + Duration::from_secs(ttl_secs));
        self.tokens.insert(token.clone(), expiry);
        token
    }

    pub fn check_token(&self, token: &str) -> TokenCheck {
        match self.tokens.get(token) {
            None => TokenCheck::Unknown,
            Some(Some(expiry)) if *expiry <= Instant::now() => TokenCheck::Expired,
            Some(_) => TokenCheck::Valid,
        }
    }

    pub fn holds_valid_token(&self) -> bool {
        self.tokens.values().any(|expiry| expiry.is_some_and(|e| e > Instant::now()))
    }

    /// Every issued token stops working at once: what an early expiry or a credential reset looks like.
    pub fn expire_tokens(&mut self) {
        let now = Instant::now();
        for expiry in self.tokens.values_mut() {
            *expiry = Some(now);
        }
    }

    pub fn add_user(&mut self, user: &str) {
        self.users.insert(user.to_lowercase());
    }

    pub fn has_user(&self, user: &str) -> bool {
        self.users.contains(&user.to_lowercase())
    }

    pub fn add_group(&mut self, group: &str, members: &[&str]) {
        self.groups.insert(group.to_owned(), members.iter().map(|m| m.to_lowercase()).collect());
    }

    /// Delivers a message: it appears in the sender's and every recipient's own view.
    pub fn send(&mut self, kind: Kind, from: &str, to: &str, id: &str, timestamp: i64) {
        let from = from.to_lowercase();
        let message = Message { id: id.to_owned(), from: from.clone(), timestamp };
        let deliveries: Vec<(String, ConvKey)> = match kind {
            Kind::Chat => {
                let to = to.to_lowercase();
                vec![(from.clone(), (Kind::Chat, to.clone())), (to, (Kind::Chat, from.clone()))]
            }
            Kind::Groupchat => self
                .groups
                .get(to)
                .into_iter()
                .flatten()
                .map(|member| (member.clone(), (Kind::Groupchat, to.to_owned())))
                .collect(),
        };
        for (owner, key) in deliveries {
            let conversation = self.views.entry(owner).or_default().entry(key).or_default();
            conversation.listed = true;
            conversation.messages.push(message.clone());
            conversation.messages.sort_by_key(|m| m.timestamp);
        }
    }

    /// The owner's conversations, as `GET /_sim/…/users/{user}` shows them.
    pub fn view(&self, owner: &str) -> Vec<(ConvKey, Conversation)> {
        self.views
            .get(&owner.to_lowercase())
            .map(|v| v.iter().map(|(k, c)| (k.clone(), c.clone())).collect())
            .unwrap_or_default()
    }

    /// Removes the owner's messages in one conversation that match `doomed`; an emptied conversation is dropped.
    fn delete_where(&mut self, owner: &str, key: ConvKey, doomed: impl Fn(&Message) -> bool) {
        let Some(view) = self.views.get_mut(&owner.to_lowercase()) else { return };
        let key = normalize(key);
        if let Some(conversation) = view.get_mut(&key) {
            conversation.messages.retain(|m| !doomed(m));
            if conversation.messages.is_empty() {
                view.remove(&key);
            }
        }
    }

    pub fn delete_messages(&mut self, owner: &str, key: ConvKey, ids: &[&str]) {
        self.delete_where(owner, key, |m| ids.contains(&m.id.as_str()));
    }

    pub fn delete_before(&mut self, owner: &str, key: ConvKey, del_time: i64) {
        self.delete_where(owner, key, |m| m.timestamp <= del_time);
    }

    pub fn clear_user(&mut self, owner: &str) {
        self.views.remove(&owner.to_lowercase());
    }

    pub fn delete_conversation(&mut self, owner: &str, key: ConvKey, delete_roam: bool) {
        if delete_roam {
            self.delete_where(owner, key, |_| true);
        } else if let Some(conversation) =
            self.views.get_mut(&owner.to_lowercase()).and_then(|view| view.get_mut(&normalize(key)))
        {
            conversation.listed = false;
        }
    }
}

/// User IDs compare case-insensitively (Easemob lowercases them); group IDs as given.
fn normalize((kind, id): ConvKey) -> ConvKey {
    match kind {
        Kind::Chat => (kind, id.to_lowercase()),
        Kind::Groupchat => (kind, id),
    }
}

/// The demo's AppKey and credentials: also what `sim` serves by default, so callers' tests can use them.
pub const DEMO_ORG: &str = "1122161011178276";
pub const DEMO_APP: &str = "demo";
pub const DEMO_CLIENT_ID: &str = "YXA6demo-client-id";
pub const DEMO_CLIENT_SECRET: &str = "YXA6demo-client-secret";
/// A second app, so multi-app behaviour can be tried against one simulator.
pub const DEMO_APP_2: &str = "demo2";
pub const DEMO_GROUP: &str = "172839405612345";

/// The seeded world: users alice, bob, carol, dave; a group of alice, bob and carol; a few messages an hour
/// to a few minutes old, with IDs `1100000000000000001`… so printed curl lines can name them; and one spam
/// message sent to all four.
pub fn seed(app: &mut App, now_ms: i64) {
    for user in ["alice", "bob", "carol", "dave"] {
        app.add_user(user);
    }
    app.add_group(DEMO_GROUP, &["alice", "bob", "carol"]);
    let messages: [(Kind, &str, &str); 8] = [
        (Kind::Chat, "alice", "bob"),
        (Kind::Chat, "bob", "alice"),
        (Kind::Chat, "alice", "bob"),
        (Kind::Chat, "alice", "carol"),
        (Kind::Chat, "carol", "alice"),
        (Kind::Groupchat, "alice", DEMO_GROUP),
        (Kind::Groupchat, "bob", DEMO_GROUP),
        (Kind::Groupchat, "carol", DEMO_GROUP),
    ];
    for (i, (kind, from, to)) in messages.into_iter().enumerate() {
        let age_minutes = 60 - 5 * i as i64;
        app.send(kind, from, to, &format!("11000000000000000{:02}", i + 1), now_ms - age_minutes * 60_000);
    }
    // One spam message to everyone: what a deletion job removes from every recipient in one go.
    app.add_user(DEMO_SPAMMER);
    for to in ["alice", "bob", "carol", "dave"] {
        app.send(Kind::Chat, DEMO_SPAMMER, to, DEMO_SPAM, now_ms - 60_000);
    }
}

/// Who sent [`DEMO_SPAM`] to every demo user.
pub const DEMO_SPAMMER: &str = "spammer";
pub const DEMO_SPAM: &str = "1100000000000000099";
