//! The simulator's own rate limits, talked to directly (no gateway): what Easemob would refuse, it refuses, so a
//! test that drives traffic through the gateway notices a gateway that lets too much through.

use std::time::{Duration, Instant};

use http::Method;
use serde_json::{Value, json};

use crate::support::*;

/// A seeded message alice sent bob.
const ALICE_TO_BOB: &str = "1100000000000000001";

/// A caller of the simulator itself, with an App Token from its token endpoint.
struct Direct {
    sim: Sim,
    auth: String,
}

impl Direct {
    async fn start() -> Direct {
        let sim = Sim::start().await;
        let body =
            json!({ "grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET });
        let url = format!("{}/{ORG}/{APP}/token", sim.url);
        let token = send(Method::POST, &url, &[("content-type", "application/json")], &body.to_string()).await;
        let auth = format!("Bearer {}", token.json()["access_token"].as_str().expect("a token"));
        Direct { sim, auth }
    }

    async fn call(&self, method: Method, tail: &str, body: &str) -> Answer {
        let url = format!("{}/{ORG}/{APP}{tail}", self.sim.url);
        send(method, &url, &[("authorization", &self.auth), ("content-type", "application/json")], body).await
    }

    async fn delete_messages(&self, owner: &str, peer: &str, ids: &str) -> Answer {
        let tail = format!("/rest/message/roaming/chat/user/{owner}?userId={peer}&msgIdList={ids}");
        self.call(Method::DELETE, &tail, "").await
    }

    /// Clears nothing (`delTime` 0), but is a valid call on its own route.
    async fn clear_chat_before_epoch(&self, owner: &str, peer: &str) -> Answer {
        let tail = format!("/rest/message/roaming/chat/user/{owner}/time?userId={peer}&delTime=0");
        self.call(Method::DELETE, &tail, "").await
    }

    async fn delete_conversation(&self, owner: &str, peer: &str) -> Answer {
        let body = json!({ "channel": peer, "type": "chat", "delete_roam": true }).to_string();
        self.call(Method::DELETE, &format!("/users/{owner}/user_channel"), &body).await
    }

    async fn limits(&self) -> Answer {
        send(Method::GET, &format!("{}/_sim/limits", self.sim.url), &[], "").await
    }

    async fn put_limits(&self, limits: &str) -> Answer {
        send(Method::PUT, &format!("{}/_sim/limits", self.sim.url), &[], limits).await
    }
}

/// Runs `calls` on a fresh simulator with `limits` until one run takes less than a second, so that every call
/// fell in one route window whatever the machine's speed (a slower run proves nothing and is tried again).
async fn in_one_second<T>(limits: Value, mut calls: impl AsyncFnMut(&Direct) -> T) -> (Direct, T) {
    for _ in 0..5 {
        let api = Direct::start().await;
        api.sim.limits(limits.clone()).await;
        let started = Instant::now();
        let out = calls(&api).await;
        if started.elapsed() < Duration::from_secs(1) {
            return (api, out);
        }
    }
    panic!("no run of the calls fit in one second in five tries");
}

/// Easemob's answer over a limit: 429 `reach_limit`, and no Retry-After (Easemob documents none).
#[track_caller]
fn assert_reach_limit(answer: &Answer) {
    assert_eq!(answer.assert_error(429, "reach_limit"), "This request has reached api limit");
    assert_eq!(answer.json()["exception"], "EasemobRequestLimitException");
    assert_eq!(answer.header("retry-after"), None);
}

fn statuses(answers: &[Answer]) -> Vec<u16> {
    answers.iter().map(|a| a.status).collect()
}

#[tokio::test]
async fn the_defaults_are_easemobs_and_a_bad_put_changes_nothing() {
    let api = Direct::start().await;
    let defaults = json!({ "route_per_second": 100, "routes": {}, "user_conversation_per_minute": 5, "enforce": true });
    assert_eq!(api.limits().await.json(), defaults);
    assert_eq!(api.put_limits(r#"{"route_per_sec": 1}"#).await.status, 400);
    let typo = api.put_limits(r#"{"routes": {"delete_conversations": 1}}"#).await;
    assert_eq!(typo.status, 400, "an override naming no route is refused: {}", typo.text());
    assert_eq!(api.limits().await.json(), defaults);
}

#[tokio::test]
async fn a_users_sixth_conversation_deletion_in_a_minute_is_refused_and_not_applied() {
    let api = Direct::start().await;
    // Five spellings of one user, as Easemob compares user IDs; conversations she does not have, so nothing
    // changes yet. Seven calls take far less than the 60 s window on any machine that runs this suite.
    for (i, owner) in ["alice", "Alice", "ALICE", "aLiCe", "alicE"].into_iter().enumerate() {
        let answer = api.delete_conversation(owner, &format!("nobody{i}")).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    assert_reach_limit(&api.delete_conversation("Alice", "carol").await);
    assert!(!api.sim.messages(APP, "alice", "carol").await.is_empty(), "the refused deletion was not applied");
    // Another user has a limit of their own.
    assert_eq!(api.delete_conversation("bob", "alice").await.status, 200);
    assert!(api.sim.messages(APP, "bob", "alice").await.is_empty());
    let stats = api.sim.stats().await;
    assert_eq!(stats["over_limit"], 1);
    assert_eq!(stats["over_limit_by_route"], json!({ "delete_conversation": 1 }));
}

#[tokio::test]
async fn a_routes_call_over_its_limit_within_a_second_is_refused_while_another_route_is_fine() {
    // Limit 3 instead of 100: a handful of calls in one second, which any machine manages.
    let (api, answers) = in_one_second(json!({ "route_per_second": 3 }), async |api: &Direct| {
        vec![
            api.delete_messages("alice", "bob", "1").await,
            api.delete_messages("alice", "bob", "2").await,
            api.delete_messages("alice", "bob", "3").await,
            api.clear_chat_before_epoch("alice", "carol").await,
            api.delete_messages("alice", "bob", ALICE_TO_BOB).await,
        ]
    })
    .await;
    assert_eq!(statuses(&answers), [200, 200, 200, 200, 429]);
    assert_reach_limit(&answers[4]);
    assert!(api.sim.messages(APP, "alice", "bob").await.contains(&ALICE_TO_BOB.to_owned()), "not applied");
    assert_eq!(api.sim.stats().await["over_limit_by_route"], json!({ "delete_chat_messages": 1 }));
}

#[tokio::test]
async fn raising_a_routes_limit_lets_more_through_on_that_route_alone() {
    let limits = json!({ "route_per_second": 2, "routes": { "delete_chat_messages": 4 } });
    let (api, answers) = in_one_second(limits.clone(), async |api: &Direct| {
        let mut answers = Vec::new();
        for id in 1..=5 {
            answers.push(api.delete_messages("alice", "bob", &id.to_string()).await);
        }
        for _ in 0..3 {
            answers.push(api.clear_chat_before_epoch("alice", "carol").await);
        }
        answers
    })
    .await;
    assert_eq!(statuses(&answers), [200, 200, 200, 200, 429, 200, 200, 429]);
    let shown = api.limits().await.json();
    assert_eq!(
        shown,
        json!({ "route_per_second": 2, "routes": { "delete_chat_messages": 4 },
                              "user_conversation_per_minute": 5, "enforce": true })
    );
    // A raise takes effect at once: at most 2 calls are in the window, whenever this one arrives.
    api.sim.limits(json!({ "route_per_second": 3 })).await;
    assert_eq!(api.clear_chat_before_epoch("alice", "carol").await.status, 200);
}

#[tokio::test]
async fn enforce_false_turns_the_limits_off() {
    let api = Direct::start().await;
    api.sim.limits(json!({ "enforce": false, "route_per_second": 0, "user_conversation_per_minute": 0 })).await;
    for _ in 0..3 {
        assert_eq!(api.delete_conversation("alice", "nobody").await.status, 200);
    }
    api.sim.limits(json!({ "route_per_second": 0 })).await;
    assert_reach_limit(&api.delete_conversation("alice", "nobody").await);
    assert_eq!(api.sim.over_limit().await, 1);
}

#[tokio::test]
async fn only_a_call_that_would_be_carried_out_counts() {
    let api = Direct::start().await;
    api.sim.limits(json!({ "user_conversation_per_minute": 1 })).await;
    let tail = "/users/alice/user_channel";
    let body = json!({ "channel": "nobody", "type": "chat", "delete_roam": true }).to_string();
    // Unauthenticated, no such route (wrong method), invalid bodies: refused before they would be carried out.
    let url = format!("{}/{ORG}/{APP}{tail}", api.sim.url);
    assert_eq!(send(Method::DELETE, &url, &[("authorization", "Bearer YWMtforged")], &body).await.status, 401);
    assert_eq!(api.call(Method::POST, tail, &body).await.status, 404);
    assert_eq!(api.call(Method::DELETE, tail, "{}").await.status, 400);
    assert_eq!(api.call(Method::DELETE, tail, r#"{"channel":"bob","type":"chat"}"#).await.status, 400);
    // So alice's one slot is still free, and then taken.
    assert_eq!(api.delete_conversation("alice", "carol").await.status, 200);
    assert_reach_limit(&api.delete_conversation("alice", "bob").await);
    assert_eq!(api.sim.over_limit().await, 1);
}
