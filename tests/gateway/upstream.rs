//! Upstream failures become definite answers: 502 when Easemob cannot be reached, 504 at the timeout.

use std::time::{Duration, Instant};

use http::Method;
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn unreachable_easemob_is_502() {
    let sim = Sim::start().await;
    // No waiting for quota: the retry after a refused connection must reuse the first slot, not ask for another.
    let options = GatewayOptions { extra: "[rate_limit]\nmax_wait = \"0s\"\n".into(), ..Default::default() };
    let gw = Gateway::ready_with(&sim, options).await;
    drop(sim);
    let a = send(Method::POST, &gw.url("/rest/message/roaming/user/dave/delete/all"), &[], "").await;
    assert_eq!(a.status, 502, "{}", a.text());
    assert_eq!(a.header("x-easemob-gateway"), Some("upstream-error"));
    let error = a.json()["error"].as_str().unwrap().to_owned();
    assert!(error == "upstream_unreachable" || error == "upstream_failed", "{error}");
}

#[tokio::test]
async fn silent_easemob_is_504_at_the_configured_timeout() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    sim.faults(json!({"delay_ms": 20_000})).await;
    let started = Instant::now();
    let a = send(Method::POST, &gw.url("/rest/message/roaming/user/dave/delete/all"), &[], "").await;
    // Answered by the gateway, not after Easemob's 20 s; and not before the test config's upstream.timeout (3 s),
    // which a loaded machine can only make later.
    a.assert_error(504, "upstream_timeout");
    assert!(started.elapsed() >= Duration::from_secs(3), "{:?}", started.elapsed());
    assert_eq!(sim.business_requests().await, 1, "a timed-out call may have been carried out: never retried");
}

#[tokio::test]
async fn easemob_5xx_and_429_pass_through_unchanged() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    // 503 is retried once (see resilience.rs), so it is forced twice here to reach the caller.
    for (status, error, count) in
        [(503, "service_unavailable", 2), (500, "internal_server_error", 1), (429, "reach_limit", 1)]
    {
        sim.faults(json!({"status": status, "status_count": count})).await;
        let a = send(Method::POST, &gw.url("/rest/message/roaming/user/dave/delete/all"), &[], "").await;
        a.assert_error(status, error);
        assert!(!a.gateway_made());
    }
}

#[tokio::test]
async fn an_answer_cut_off_mid_body_is_502_and_not_retried() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    sim.faults(json!({"reset_count": 1})).await;
    let a = send(Method::POST, &gw.url("/rest/message/roaming/user/dave/delete/all"), &[], "").await;
    a.assert_error(502, "upstream_failed");
    assert_eq!(a.header("x-easemob-gateway"), Some("upstream-error"));
    assert_eq!(sim.business_requests().await, 1, "the deletion may have happened: never retried");
    assert_eq!(send(Method::POST, &gw.url("/rest/message/roaming/user/dave/delete/all"), &[], "").await.status, 200);
}

#[tokio::test]
async fn connections_easemob_closed_while_idle_fail_no_request() {
    let sim = Sim::start().await;
    // Easemob closes a keep-alive connection it no longer wants; the gateway's pool still holds it.
    sim.faults(json!({"idle_close_ms": 50})).await;
    let gw = Gateway::ready(&sim).await;
    // Open: only the one asking.
    let all_closed = || async { sim.stats().await["connections_open"] == 1 };
    let mut sent = 0;
    for round in 0..5 {
        // Every pooled connection is stale now: each request must still be answered by Easemob, once.
        eventually(Duration::from_secs(10), "Easemob closed every idle connection", all_closed).await;
        let answers = burst(&clear_url(&gw, "dave"), 1 + round * 4).await;
        sent += answers.len();
        for a in &answers {
            assert_eq!(a.status, 200, "round {round}: {}", a.text());
            assert!(!a.gateway_made());
        }
    }
    assert_eq!(sim.business_requests().await, sent as u64, "each sent once: none lost, none twice");
    let retries = metric(&gw.metrics().await, "easemob_gateway_upstream_retries_total{");
    assert_eq!(retries, 0, "a stale connection is the pool's to handle, not the retry budget's");
    assert!(sim.stats().await["connections_closed_idle"].as_u64().unwrap() >= 5);
}

#[tokio::test]
async fn a_1xx_handed_up_as_final_is_502_of_unknown_outcome_and_the_next_call_is_served() {
    let sim = Sim::start().await;
    let audit_dir = tempfile::tempdir().unwrap();
    let audit_file = audit_dir.path().join("audit.jsonl");
    let extra = format!("[audit]\nfile = \"{}\"\n", audit_file.display());
    let gw = Gateway::ready_with(&sim, GatewayOptions { extra, ..Default::default() }).await;
    // Easemob (or a front before it) switches the deletion's connection to another protocol: no final answer.
    sim.faults(json!({"status": 101, "status_count": 1})).await;
    let a = send(Method::POST, &clear_url(&gw, "dave"), &[], "").await;
    a.assert_error(502, "upstream_failed");
    assert_eq!(a.header("x-easemob-gateway"), Some("upstream-error"));
    assert_eq!(a.header("upgrade"), None);
    assert_eq!(sim.business_requests().await, 1, "the deletion may have happened: never retried");
    let events = std::fs::read_to_string(&audit_file).unwrap();
    let event: serde_json::Value = serde_json::from_str(events.trim()).unwrap();
    assert_eq!((event["outcome"].as_str(), &event["upstream_status"]), (Some("unknown"), &serde_json::Value::Null));
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(&metrics, "easemob_gateway_upstream_requests_total{app=\"1122161011178276#demo\",code=\"failed\""),
        1
    );
    // The switched connection is not reused: the next deletion is Easemob's answer.
    let next = send(Method::POST, &clear_url(&gw, "dave"), &[], "").await;
    assert_eq!(next.status, 200, "{}", next.text());
}

#[tokio::test]
async fn easemobs_answer_never_carries_the_gateways_own_marker() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    sim.faults(json!({"answer_headers": {"x-easemob-gateway": "rejected", "x-front": "kept"}})).await;
    let a = send(Method::POST, &clear_url(&gw, "dave"), &[], "").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert!(!a.gateway_made(), "Easemob's answer passed as the gateway's");
    assert_eq!(a.header("x-easemob-gateway"), None);
    assert_eq!(a.header("x-front"), Some("kept"), "other end-to-end headers pass");
}

#[tokio::test]
async fn an_easemob_answer_at_its_cap_is_passed_on_and_one_byte_more_is_502() {
    use easemob_gateway::upstream::MAX_ANSWER_BYTES;
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    let url = gw.url("/rest/message/roaming/user/dave/delete/all");
    sim.faults(json!({"answer_bytes": MAX_ANSWER_BYTES})).await;
    let a = send(Method::POST, &url, &[], "").await;
    assert!(!a.gateway_made(), "Easemob's own answer: {}", a.status);
    assert_eq!(a.body.len(), MAX_ANSWER_BYTES);
    sim.faults(json!({"answer_bytes": MAX_ANSWER_BYTES + 1})).await;
    let a = send(Method::POST, &url, &[], "").await;
    a.assert_error(502, "upstream_failed");
    assert_eq!(a.header("x-easemob-gateway"), Some("upstream-error"));
}
