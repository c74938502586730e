//! Every validation rule: answered 400/413 in Easemob's envelope before any upstream call.

use std::time::Duration;

use http::Method;
use serde_json::json;

use crate::support::*;

/// (method, tail, body, status, error type, text the description must contain)
type Case = (Method, String, String, u16, &'static str, &'static str);

fn cases() -> Vec<Case> {
    let chat = "/rest/message/roaming/chat/user";
    let group = "/rest/message/roaming/group/user";
    let ids51 = (0..51).map(|i| (1_000_000 + i).to_string()).collect::<Vec<_>>().join(",");
    let d = |tail: String, status, error, text| (Method::DELETE, tail, String::new(), status, error, text);
    let conv = |body: serde_json::Value, error, text| {
        (Method::DELETE, "/users/alice/user_channel".to_owned(), body.to_string(), 400, error, text)
    };
    vec![
        d(format!("{chat}/..?userId=bob&msgIdList=1"), 400, "illegal_argument", "path parameter userId"),
        d(format!("{chat}/a%2Fb?userId=bob&msgIdList=1"), 400, "illegal_argument", "path parameter userId"),
        d(format!("{chat}/a%252Fb?userId=bob&msgIdList=1"), 400, "illegal_argument", "path parameter userId"),
        d(format!("{chat}/a%20b?userId=bob&msgIdList=1"), 400, "illegal_argument", "path parameter userId"),
        d(format!("{chat}/a%00b?userId=bob&msgIdList=1"), 400, "illegal_argument", "path parameter userId"),
        d(format!("{chat}/%C0%AF?userId=bob&msgIdList=1"), 400, "illegal_argument", "path parameter userId"),
        d(format!("{chat}/{}?userId=bob&msgIdList=1", "a".repeat(65)), 400, "illegal_argument", "65 characters"),
        d(format!("{chat}/alice?userId=b%2Fob&msgIdList=1"), 400, "illegal_argument", "query parameter userId"),
        d(format!("{chat}/alice?userId=&msgIdList=1"), 400, "illegal_argument", "query parameter userId"),
        d(format!("{chat}/alice?msgIdList=1"), 400, "Bad Request", "userId is missing"),
        d(format!("{chat}/alice?userId=bob"), 400, "Bad Request", "msgIdList is missing"),
        d(format!("{chat}/alice?userId=bob&msgIdList={ids51}"), 400, "param exception", "can not greater than 50"),
        d(format!("{chat}/alice?userId=bob&msgIdList=1,,2"), 400, "illegal_argument", "empty message ID"),
        d(format!("{chat}/alice?userId=bob&msgIdList=1&isNotify=yes"), 400, "illegal_argument", "isNotify must be"),
        d(format!("{chat}/alice?userId=bob&userId=carol&msgIdList=1"), 400, "illegal_argument", "more than once"),
        d(format!("{chat}/alice?userId=bob&msgIdList=1&extra=1"), 400, "illegal_argument", "unknown query parameter"),
        d(format!("{group}/alice?msgIdList=1"), 400, "Bad Request", "groupId is missing"),
        d(format!("{group}/alice?groupId=1%2F2&msgIdList=1"), 400, "illegal_argument", "groupId"),
        d(
            format!("{chat}/alice/time?userId=bob&delTime=1659014868"),
            400,
            "illegal_argument",
            "looks like Unix seconds",
        ),
        d(
            format!("{chat}/alice/time?userId=bob&delTime=99999999999999999"),
            400,
            "illegal_argument",
            "more than a day",
        ),
        d(format!("{group}/alice/time?groupId=1&delTime=abc"), 400, "illegal_argument", "milliseconds"),
        d(format!("{group}/alice/time?groupId=1"), 400, "Bad Request", "delTime is missing"),
        (
            Method::POST,
            "/rest/message/roaming/user/alice/delete/all?x=1".into(),
            String::new(),
            400,
            "illegal_argument",
            "unknown query parameter",
        ),
        (
            Method::DELETE,
            "/users/alice/user_channel".into(),
            "not json".into(),
            400,
            "invalid_request_body",
            "Request body is invalid. Please check body is correct. The body is not valid JSON: expected ident at line \
             1 column 2",
        ),
        (
            Method::DELETE,
            "/users/alice/user_channel".into(),
            String::new(),
            400,
            "invalid_request_body",
            "Request body is invalid. Please check body is correct. The body is empty; it must be a JSON object with \
             channel (a string), type (\"chat\" or \"groupchat\") and delete_roam (a boolean)",
        ),
        conv(
            json!([{"channel": "bob", "type": "chat", "delete_roam": true}]),
            "invalid_request_body",
            "Request body is invalid. Please check body is correct. The body must be a JSON object with channel (a \
             string), type (\"chat\" or \"groupchat\") and delete_roam (a boolean); got an array",
        ),
        conv(
            json!({"channel": 5, "type": "chat", "delete_roam": true}),
            "invalid_request_body",
            "Request body is invalid. Please check body is correct. The field channel must be a string; got a number",
        ),
        conv(
            json!({"channel": "bob", "type": "chat", "delete_roam": "false"}),
            "invalid_request_body",
            "Request body is invalid. Please check body is correct. The field delete_roam must be a boolean; got a \
             string",
        ),
        conv(
            json!({"channel": "bob", "type": "chat", "delete_roam": true, "extra": 1}),
            "illegal_argument",
            "unknown body field \"extra\"; delete_conversation accepts: channel, type, delete_roam",
        ),
        conv(
            json!({"channel": "bob", "type": "chat", "deleteRoam": true}),
            "illegal_argument",
            "unknown body field \"deleteRoam\"; delete_conversation accepts: channel, type, delete_roam",
        ),
        conv(json!({"type": "chat", "delete_roam": true}), "illegal_argument", "field channel cannot be null or empty"),
        conv(
            json!({"channel": "", "type": "chat", "delete_roam": true}),
            "illegal_argument",
            "field channel cannot be null or empty",
        ),
        conv(json!({"channel": "bob", "delete_roam": true}), "illegal_argument", "field type cannot be null or empty"),
        conv(json!({"channel": "bob", "type": "chat"}), "illegal_argument", "field delete_roam cannot be null"),
        conv(
            json!({"channel": "bob", "type": "room", "delete_roam": true}),
            "illegal_argument",
            "\"chat\" or \"groupchat\"",
        ),
        conv(
            json!({"channel": "x".repeat(65), "type": "chat", "delete_roam": true}),
            "illegal_argument",
            "65 characters",
        ),
        (
            Method::DELETE,
            "/users/..%2F/user_channel".into(),
            json!({"channel":"bob","type":"chat","delete_roam":true}).to_string(),
            400,
            "illegal_argument",
            "path parameter username",
        ),
        (
            Method::DELETE,
            "/users/alice/user_channel".into(),
            "x".repeat(64 * 1024 + 1),
            413,
            "request_entity_too_large",
            "larger than 65536 bytes",
        ),
    ]
}

#[tokio::test]
async fn every_rule_is_enforced_before_any_upstream_call() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    for (method, tail, body, status, error, text) in cases() {
        let a = send(method.clone(), &gw.url(&tail), &[], &body).await;
        assert_eq!(a.status, status, "{method} {tail}: {}", a.text());
        let description = a.assert_error(status, error);
        assert!(description.contains(text), "{method} {tail}: {description:?} lacks {text:?}");
        assert_eq!(a.header("x-easemob-gateway"), Some("rejected"), "{tail}");
        assert!(a.header("ratelimit-policy").is_some(), "every answer of a limited route states its policy: {tail}");
    }
    assert_eq!(sim.business_requests().await, 0, "nothing reached Easemob: {:?}", sim.requests().await);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("easemob_gateway_rejected_total{app=\"1122161011178276#demo\",reason=\"invalid\""),
        "{metrics}"
    );
}

#[tokio::test]
async fn fifty_ids_pass_and_duplicates_count_once() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    let fifty = (0..50).map(|i| (1_000_000 + i).to_string()).collect::<Vec<_>>();
    let with_dups = format!("{},{}", fifty.join(","), fifty[..10].join(","));
    let a = delete(&gw.url(&format!("/rest/message/roaming/chat/user/alice?userId=bob&msgIdList={with_dups}"))).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let query = sim.requests().await[0]["query"].as_str().unwrap().to_owned();
    assert_eq!(query, format!("userId=bob&msgIdList={}", fifty.join(",")));
}

#[tokio::test]
async fn an_oversized_declared_body_is_413_at_once_and_a_stalled_body_408() {
    let sim = Sim::start().await;
    let options = GatewayOptions { server: "body_read_timeout = \"1s\"".into(), ..Default::default() };
    let gw = Gateway::ready_with(&sim, options).await;
    let path = format!("/{ORG}/{APP}/users/alice/user_channel");
    let head = |length: &str| format!("DELETE {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n");
    let answer = raw(&gw.data, head("99999999999").as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // Ten bytes of a promised hundred, then silence: answered when server.body_read_timeout (1 s here) passes.
    let stalled = format!("{}{{\"channel\"", head("100"));
    let answer = raw(&gw.data, stalled.as_bytes(), Duration::from_secs(15)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"));
    assert_eq!(sim.business_requests().await, 0);
}

#[tokio::test]
async fn an_unfit_request_id_is_replaced() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    let long = "a".repeat(200);
    for bad in [long.as_str(), "has space", "quote\"d"] {
        let a = send(Method::POST, &gw.url("/rest/message/roaming/user/dave/delete/all"), &[("x-request-id", bad)], "")
            .await;
        let id = a.header("x-request-id").unwrap();
        assert_ne!(id, bad);
        assert_eq!(id.len(), 36, "a generated UUID: {id}");
    }
}
