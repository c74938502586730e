//! Each route's happy path, with the simulator's state checked afterwards, and the exact request Easemob receives.

use http::Method;
use serde_json::json;

use crate::support::*;

const BOB_MSGS: [&str; 3] = ["1100000000000000001", "1100000000000000002", "1100000000000000003"];
const GROUP_MSGS: [&str; 3] = ["1100000000000000006", "1100000000000000007", "1100000000000000008"];

#[tokio::test]
async fn delete_chat_messages_removes_them_for_the_owner_only() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    let url =
        gw.url("/rest/message/roaming/chat/user/alice?userId=bob&msgIdList=1100000000000000001,1100000000000000003");
    let a = delete(&url).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["requestStatusCode"], "ok");
    assert!(!a.gateway_made());
    assert_eq!(sim.messages(APP, "alice", "bob").await, ["1100000000000000002"]);
    assert_eq!(sim.messages(APP, "bob", "alice").await, BOB_MSGS, "the peer keeps every message");
}

#[tokio::test]
async fn delete_group_messages_removes_them_for_the_owner_only() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    let url = gw.url(&format!(
        "/rest/message/roaming/group/user/bob?groupId={GROUP}&msgIdList=1100000000000000007&isNotify=false"
    ));
    assert_eq!(delete(&url).await.status, 200);
    assert_eq!(sim.messages(APP, "bob", GROUP).await, ["1100000000000000006", "1100000000000000008"]);
    assert_eq!(sim.messages(APP, "alice", GROUP).await, GROUP_MSGS);
}

#[tokio::test]
async fn clear_user_messages_empties_every_conversation_of_the_owner() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    let a = send(Method::POST, &gw.url("/rest/message/roaming/user/alice/delete/all"), &[], "").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert!(sim.conversation(APP, "alice", "bob").await.is_none());
    assert!(sim.conversation(APP, "alice", GROUP).await.is_none());
    assert_eq!(sim.messages(APP, "bob", "alice").await, BOB_MSGS);
}

#[tokio::test]
async fn clear_before_a_time_keeps_later_messages_and_drops_an_emptied_conversation() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    let conversation = sim.conversation(APP, "alice", "bob").await.unwrap();
    let second = conversation["messages"][1]["timestamp"].as_i64().unwrap();
    let url = gw.url(&format!("/rest/message/roaming/chat/user/alice/time?userId=bob&delTime={second}"));
    assert_eq!(delete(&url).await.status, 200);
    assert_eq!(sim.messages(APP, "alice", "bob").await, ["1100000000000000003"]);
    assert_eq!(sim.messages(APP, "bob", "alice").await, BOB_MSGS);

    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let url =
        gw.url(&format!("/rest/message/roaming/group/user/carol/time?groupId={GROUP}&delTime={now}&isNotify=true"));
    assert_eq!(delete(&url).await.status, 200);
    assert!(sim.conversation(APP, "carol", GROUP).await.is_none(), "an emptied conversation leaves the list");
    assert_eq!(sim.messages(APP, "alice", GROUP).await, GROUP_MSGS);
}

#[tokio::test]
async fn delete_conversation_with_and_without_roaming_messages() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    let body = json!({"channel": "bob", "type": "chat", "delete_roam": false}).to_string();
    let a = send(Method::DELETE, &gw.url("/users/alice/user_channel"), &[("content-type", "application/json")], &body)
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let v = a.json();
    assert_eq!((v["action"].as_str(), v["data"]["result"].as_str()), (Some("delete"), Some("ok")));
    let kept = sim.conversation(APP, "alice", "bob").await.unwrap();
    assert_eq!(kept["listed"], false, "delisted, roaming messages kept");
    assert_eq!(kept["messages"].as_array().unwrap().len(), 3);

    let body = json!({"channel": GROUP, "type": "groupchat", "delete_roam": true}).to_string();
    assert_eq!(send(Method::DELETE, &gw.url("/users/alice/user_channel"), &[], &body).await.status, 200);
    assert!(sim.conversation(APP, "alice", GROUP).await.is_none());
    assert_eq!(sim.messages(APP, "bob", GROUP).await, GROUP_MSGS);
}

#[tokio::test]
async fn easemob_receives_exactly_the_canonical_request() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    let url = gw.url("/rest/message/roaming/chat/user/alice?msgIdList=%201100000000000000001%20,1100000000000000001&userId=bob&isNotify=false");
    let a = send(
        Method::DELETE,
        &url,
        &[
            ("authorization", "Bearer caller-token-must-not-pass"),
            ("cookie", "session=abc"),
            ("x-request-id", "req-123"),
            ("x-custom", "dropped"),
            ("connection", "keep-alive"),
        ],
        "ignored body",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.header("x-request-id"), Some("req-123"), "request id returned");
    let requests = sim.requests().await;
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r["method"], "DELETE");
    assert_eq!(r["path"], format!("/{ORG}/{APP}/rest/message/roaming/chat/user/alice"));
    assert_eq!(r["query"], "userId=bob&msgIdList=1100000000000000001&isNotify=false");
    assert_eq!(r["body"], "", "a body sent to a roaming route is not forwarded");
    let headers: Vec<(String, String)> = serde_json::from_value(r["headers"].clone()).unwrap();
    let get = |name: &str| headers.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str()).collect::<Vec<_>>();
    let auth = get("authorization");
    assert_eq!(auth.len(), 1);
    assert!(auth[0].starts_with("Bearer YWMt"), "the gateway's own token: {auth:?}");
    assert_eq!(get("content-type"), ["application/json"]);
    assert_eq!(get("accept"), ["application/json"]);
    assert_eq!(get("x-request-id"), ["req-123"]);
    assert!(get("cookie").is_empty() && get("x-custom").is_empty());
}

#[tokio::test]
async fn a_request_id_is_generated_when_the_caller_sends_none() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    let a = send(Method::POST, &gw.url("/rest/message/roaming/user/dave/delete/all"), &[], "").await;
    let id = a.header("x-request-id").expect("generated id returned").to_owned();
    assert!(!id.is_empty());
    let forwarded = &sim.requests().await[0]["headers"];
    assert!(forwarded.as_array().unwrap().iter().any(|h| h[0] == "x-request-id" && h[1] == id.as_str()));
}

#[tokio::test]
async fn upstream_errors_pass_through_unchanged() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    // An unknown owner: Easemob's own 404, not the gateway's.
    let a = send(Method::POST, &gw.url("/rest/message/roaming/user/nobody/delete/all"), &[], "").await;
    a.assert_error(404, "service_resource_not_found");
    assert!(!a.gateway_made());
    sim.faults(json!({"roaming_disabled": true})).await;
    let a = delete(&gw.url("/rest/message/roaming/chat/user/alice?userId=bob&msgIdList=1")).await;
    assert_eq!(a.assert_error(400, "service open exception"), "this appKey not open message roaming");
    assert!(!a.gateway_made());
}

#[tokio::test]
async fn prefix_may_be_left_out_with_one_app() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    let a =
        delete(&format!("{}/rest/message/roaming/chat/user/alice?userId=bob&msgIdList=1100000000000000001", gw.data))
            .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(sim.requests().await[0]["path"], format!("/{ORG}/{APP}/rest/message/roaming/chat/user/alice"));
}

#[tokio::test]
async fn several_apps_are_each_their_own_appkey() {
    let sim = Sim::start().await;
    let gw = Gateway::ready_with(&sim, GatewayOptions { two_apps: true, ..Default::default() }).await;
    let url = format!(
        "{}/{ORG}/{APP2}/rest/message/roaming/chat/user/alice?userId=bob&msgIdList=1100000000000000001",
        gw.data
    );
    assert_eq!(delete(&url).await.status, 200);
    assert_eq!(sim.messages(APP2, "alice", "bob").await.len(), 2);
    assert_eq!(sim.messages(APP, "alice", "bob").await.len(), 3, "the other app is untouched");
    // Without a prefix the app is ambiguous.
    let a = delete(&format!("{}/rest/message/roaming/chat/user/alice?userId=bob&msgIdList=1", gw.data)).await;
    a.assert_error(404, "service_resource_not_found");
    assert_eq!(sim.token_requests().await, 2, "one token per app");
}

/// deploy/example/caller.py, an unmodified Easemob caller (token first, then the call), pointed at the gateway by
/// its base URL alone.
#[tokio::test]
async fn the_example_caller_works_unchanged_through_the_sidecar() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/example/caller.py");
    let out = tokio::process::Command::new("python3")
        .args([script, "alice", "bob", "1100000000000000001"])
        .env("EASEMOB_BASE_URL", gw.url(""))
        .output()
        .await
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && printed.starts_with("200 "), "{printed} {}", String::from_utf8_lossy(&out.stderr));
    assert!(!sim.messages(APP, "alice", "bob").await.contains(&"1100000000000000001".to_owned()));
    assert_eq!(sim.token_requests().await, 1, "only the gateway's own fetch reached Easemob");
}

/// W3C Trace Context: Easemob receives a child of the caller's trace, or of one the gateway starts when the caller
/// sent none or a bad one; the trace id is in the request's log line.
#[tokio::test]
async fn easemob_receives_a_child_of_the_callers_trace() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    let url = gw.url("/rest/message/roaming/user/dave/delete/all");
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let cases: [&[(&str, &str)]; 3] = [
        &[("traceparent", parent), ("tracestate", "congo=t61rcWkgMzE")],
        &[],
        &[("traceparent", "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"), ("tracestate", "congo=x")],
    ];
    for headers in cases {
        assert_eq!(send(Method::POST, &url, headers, "").await.status, 200);
    }
    let requests = sim.requests().await;
    let header = |i: usize, name: &str| {
        requests[i]["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h[0] == name)
            .map(|h| h[1].as_str().unwrap().to_owned())
    };
    let continued = header(0, "traceparent").unwrap();
    assert!(continued.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && continued.ends_with("-01"), "{continued}");
    assert_ne!(&continued[36..52], "00f067aa0ba902b7", "a span of the gateway's own");
    assert_eq!(header(0, "tracestate").as_deref(), Some("congo=t61rcWkgMzE"));
    for i in [1, 2] {
        let started = header(i, "traceparent").unwrap();
        assert_eq!(started.len(), 55, "{started}");
        assert!(
            !started.contains("4bf92f3577b34da6a3ce929d0e0e4736") && !started.contains("4BF9"),
            "never echoed: {started}"
        );
        assert_eq!(header(i, "tracestate"), None, "a tracestate goes only with a valid traceparent");
    }
    assert!(gw.log().contains("4bf92f3577b34da6a3ce929d0e0e4736"), "the trace id in the log line");
}
