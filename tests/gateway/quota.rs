//! The in-process quota: counted at the simulator, the only place that sees what Easemob would see.

use std::time::Duration;

use http::Method;
use serde_json::json;

use crate::support::*;

fn with_quota(quota: &str) -> GatewayOptions {
    GatewayOptions { extra: format!("[rate_limit]\n{quota}\n"), ..Default::default() }
}

async fn gateway(sim: &Sim, quota: &str) -> Gateway {
    Gateway::ready_with(sim, with_quota(quota)).await
}

#[tokio::test]
async fn a_burst_beyond_the_quota_is_refused_with_429_and_what_passed_reached_easemob() {
    let sim = Sim::start().await;
    let gw = gateway(&sim, "max_wait = \"0s\"\nroute = { rate = 1, burst = 3 }").await;
    let answers = burst(&clear_url(&gw, "dave"), 30).await;
    let passed = answers.iter().filter(|a| a.status == 200).count();
    assert_eq!(passed, sim.business_requests().await as usize, "every admitted request reached the simulator");
    assert!(passed >= 3, "the burst went through: {passed}");
    // The exact counts per window are the quota's unit tests' business (ratelimit.rs, paused time); here, the
    // wiring: refusals are Easemob-shaped, marked, and say when to come back.
    for a in answers.iter().filter(|a| a.status != 200) {
        assert_eq!(a.assert_error(429, "reach_limit"), "This request has reached api limit");
        assert_eq!(a.header("x-easemob-gateway"), Some("rejected"));
        assert!(a.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
        assert!(a.header("ratelimit").unwrap().starts_with("\"clear_user_messages\";r=0;t="));
    }
    assert!(gw.metrics().await.contains("reason=\"rate_limited\""));
    assert_eq!(sim.over_limit().await, 0);
}

#[tokio::test]
async fn routes_and_apps_do_not_share_a_bucket() {
    let sim = Sim::start().await;
    let options = GatewayOptions {
        extra: "[rate_limit]\nmax_wait = \"0s\"\nroute = { rate = 1, burst = 1 }\n".into(),
        two_apps: true,
        ..Default::default()
    };
    let gw = Gateway::ready_with(&sim, options).await;
    let chat = gw.url("/rest/message/roaming/chat/user/alice?userId=bob&msgIdList=1");
    assert_eq!(send(Method::POST, &clear_url(&gw, "dave"), &[], "").await.status, 200);
    assert_eq!(send(Method::POST, &clear_url(&gw, "dave"), &[], "").await.status, 429, "same lane: refused");
    assert_eq!(delete(&chat).await.status, 200, "another route has its own bucket");
    let other_app = format!("{}/{ORG}/{APP2}/rest/message/roaming/user/dave/delete/all", gw.data);
    assert_eq!(send(Method::POST, &other_app, &[], "").await.status, 200, "another app has its own bucket");
    assert_eq!(sim.business_requests().await, 3);
}

#[tokio::test]
async fn within_max_wait_a_burst_waits_for_its_slots_instead_of_being_refused() {
    let sim = Sim::start().await;
    let gw = gateway(&sim, "max_wait = \"10s\"\nroute = { rate = 20, burst = 1 }").await;
    let answers = burst(&clear_url(&gw, "dave"), 30).await;
    assert!(answers.iter().all(|a| a.status == 200), "no 429 while waiting fits in max_wait");
    assert_eq!(sim.business_requests().await, 30);
    let waited = gw.metrics().await;
    assert!(waited.contains("easemob_gateway_rate_limit_wait_seconds_count{app=\"1122161011178276#demo\",route=\"clear_user_messages\"} 30"), "{waited}");
}

#[tokio::test]
async fn a_caller_that_hangs_up_while_waiting_never_reaches_easemob() {
    let sim = Sim::start().await;
    let gw = gateway(&sim, "max_wait = \"5s\"\nroute = { rate = 1, burst = 1 }").await;
    let url = clear_url(&gw, "dave");
    assert_eq!(send(Method::POST, &url, &[], "").await.status, 200);
    // This caller's slot is a second away; it gives up first. That its place goes to the next caller is the
    // quota's unit test (a_caller_that_hangs_up_while_waiting_gives_its_turn_to_the_next).
    let quitter = tokio::time::timeout(Duration::from_millis(200), send(Method::POST, &url, &[], "")).await;
    assert!(quitter.is_err());
    assert_eq!(send(Method::POST, &url, &[], "").await.status, 200);
    assert_eq!(sim.business_requests().await, 2, "the caller that hung up never reached Easemob");
}

#[tokio::test]
async fn delete_conversation_is_limited_per_user_case_insensitively() {
    let sim = Sim::start().await;
    let gw = gateway(&sim, "max_wait = \"0s\"\nroute = { rate = 100, burst = 10 }").await;
    let body = json!({"channel": "bob", "type": "chat", "delete_roam": false}).to_string();
    let conv = |user: &str| gw.url(&format!("/users/{user}/user_channel"));
    for user in ["alice", "ALICE", "Alice", "alice", "aLiCe"] {
        assert_eq!(send(Method::DELETE, &conv(user), &[], &body).await.status, 200, "{user}");
    }
    let sixth = send(Method::DELETE, &conv("alice"), &[], &body).await;
    sixth.assert_error(429, "reach_limit");
    assert!(sixth.gateway_made());
    // Not a slot every 12 s: the first call's place in the 60-second window frees in a minute.
    assert_eq!(sixth.header("retry-after"), Some("61"));
    assert_eq!(sixth.header("ratelimit"), Some("\"user\";r=0;t=61"), "the refusal names the per-user limit");
    let body = json!({"channel": "alice", "type": "chat", "delete_roam": false}).to_string();
    assert_eq!(send(Method::DELETE, &conv("bob"), &[], &body).await.status, 200, "another user is not limited");
    assert_eq!(sim.business_requests().await, 6);
    assert_eq!(sim.over_limit().await, 0, "Easemob's own count was never exceeded");
}

#[tokio::test]
async fn a_burst_of_a_routes_quota_is_served_in_full_with_the_default_configuration() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    let answers = burst(&clear_url(&gw, "dave"), 100).await;
    let refused: Vec<_> = answers.iter().filter(|a| a.status != 200).map(|a| (a.status, a.text())).collect();
    assert!(refused.is_empty(), "Easemob would take all 100 in one second: {refused:?}");
    assert_eq!(sim.business_requests().await, 100);
    assert_eq!(sim.over_limit().await, 0, "paced: no window over Easemob's count");
}

#[tokio::test]
async fn ratelimit_fields_parse_as_structured_field_lists() {
    let sim = Sim::start().await;
    let gw = gateway(&sim, "max_wait = \"0s\"\nroute = { rate = 100, burst = 3 }").await;
    let body = json!({"channel": "bob", "type": "chat", "delete_roam": false}).to_string();
    let a = send(Method::DELETE, &gw.url("/users/alice/user_channel"), &[], &body).await;
    assert_eq!(a.status, 200);
    let policy: sfv::List = sfv::Parser::new(a.header("ratelimit-policy").unwrap()).parse().unwrap();
    let names: Vec<String> = policy
        .iter()
        .map(|entry| match entry {
            sfv::ListEntry::Item(item) => {
                let q = item.params.get("q").and_then(|q| q.as_integer()).expect("q");
                let w = item.params.get("w").and_then(|w| w.as_integer()).expect("w");
                assert!(i64::from(q) > 0 && i64::from(w) > 0);
                item.bare_item.as_string().expect("a string item").as_str().to_owned()
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(names, ["delete_conversation", "user"]);
    let limit: sfv::List = sfv::Parser::new(a.header("ratelimit").unwrap()).parse().unwrap();
    let sfv::ListEntry::Item(item) = &limit[0] else { panic!() };
    assert_eq!(i64::from(item.params.get("r").and_then(|r| r.as_integer()).unwrap()), 2, "burst 3, one used");
}

#[tokio::test]
async fn easemob_429s_slow_the_route_down() {
    let sim = Sim::start().await;
    let gw = gateway(&sim, "max_wait = \"0s\"\nroute = { rate = 100, burst = 1 }").await;
    let rate = || async {
        let metrics = gw.metrics().await;
        let line = metrics
            .lines()
            .find(|l| l.starts_with("easemob_gateway_rate_limit_rate{") && l.contains("clear_user_messages"))
            .unwrap()
            .to_owned();
        line.rsplit(' ').next().unwrap().parse::<u32>().unwrap()
    };
    assert_eq!(rate().await, 100);
    sim.faults(json!({"status": 429, "status_count": 1})).await;
    let a = send(Method::POST, &clear_url(&gw, "dave"), &[], "").await;
    a.assert_error(429, "reach_limit");
    assert!(!a.gateway_made(), "Easemob's own 429 is passed on");
    assert_eq!(rate().await, 50, "halved (its recovery is the quota's unit test, in paused time)");
    assert!(gw.metrics().await.contains(
        "easemob_gateway_upstream_throttled_total{app=\"1122161011178276#demo\",route=\"clear_user_messages\"} 1"
    ));
}

#[tokio::test]
async fn a_per_user_refusal_costs_no_route_quota() {
    let sim = Sim::start().await;
    // Six route slots and no refill to speak of: if alice's refused sixth call took one, bob would get 429.
    let gw = gateway(&sim, "max_wait = \"0s\"\nroute = { rate = 1, burst = 6 }").await;
    let conv = |user: &str, peer: &str| {
        (
            gw.url(&format!("/users/{user}/user_channel")),
            json!({"channel": peer, "type": "chat", "delete_roam": false}).to_string(),
        )
    };
    for _ in 0..5 {
        let (url, body) = conv("alice", "bob");
        assert_eq!(send(Method::DELETE, &url, &[], &body).await.status, 200);
    }
    let (url, body) = conv("alice", "bob");
    send(Method::DELETE, &url, &[], &body).await.assert_error(429, "reach_limit");
    let (url, body) = conv("bob", "alice");
    assert_eq!(send(Method::DELETE, &url, &[], &body).await.status, 200, "the route's sixth slot is still there");
}

/// Two replicas on the local backend with `replicas = 2`: one user's calls alternate between them, then a flood of
/// one route reaches both. The simulator counts Easemob's sliding windows: never more than 5 calls for the user in
/// 60 s, never more than 100 of the route in a second.
#[tokio::test]
async fn two_local_replicas_together_keep_to_easemobs_limits() {
    let sim = Sim::start().await;
    let (a, b) = (gateway(&sim, "replicas = 2").await, gateway(&sim, "replicas = 2").await);
    let body = json!({"channel": "bob", "type": "chat", "delete_roam": false}).to_string();
    let mut admitted = 0;
    for i in 0..10 {
        let answer = send(Method::DELETE, &[&a, &b][i % 2].url("/users/alice/user_channel"), &[], &body).await;
        match answer.status {
            200 => admitted += 1,
            _ => assert!(answer.assert_error(429, "reach_limit").contains("api limit")),
        }
    }
    assert_eq!(admitted, 4, "5 a minute shared by 2 replicas: 2 each");
    // Each replica keeps its 50 calls within a second and 5 ms (docs/quota.md, "A margin for the trip"); on a
    // loaded machine a call can arrive later than that, so the simulator allows one call more per replica. Without
    // the division the replicas send twice the limit.
    sim.limits(json!({ "route_per_second": 102 })).await;
    let (url_a, url_b) = (clear_url(&a, "dave"), clear_url(&b, "dave"));
    let (to_a, to_b) = tokio::join!(burst(&url_a, 150), burst(&url_b, 150));
    let passed = to_a.iter().chain(&to_b).filter(|answer| answer.status == 200).count();
    assert!(passed >= 100, "each replica's 50/s for its max_wait of 1.5 s: {passed} of 300");
    assert_eq!(sim.over_limit().await, 0, "the replicas together kept to Easemob's windows");
}
