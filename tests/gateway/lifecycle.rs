//! Shutdown: SIGTERM drains in-flight requests while /readyz reports 503, then the process exits 0.

use std::time::Duration;

use http::Method;
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish_and_turns_readyz_503() {
    let sim = Sim::start().await;
    let mut gw = Gateway::ready(&sim).await;
    sim.faults(json!({"delay_ms": 1500})).await;
    let url = gw.url("/rest/message/roaming/user/dave/delete/all");
    let in_flight = tokio::spawn(async move { send(Method::POST, &url, &[], "").await });
    eventually(Duration::from_secs(10), "the request to reach the simulator", || async {
        sim.business_requests().await == 1
    })
    .await;
    gw.terminate();
    eventually(Duration::from_secs(10), "/readyz to report draining", || async {
        let ready = gw.readyz().await;
        ready.status == 503 && ready.json()["draining"] == true
    })
    .await;
    let answer = in_flight.await.unwrap();
    assert_eq!(answer.status, 200, "the in-flight deletion completed: {}", answer.text());
    assert_eq!(gw.exit_code().await, Some(0));
}

#[tokio::test]
async fn every_data_plane_worker_serves_and_all_concurrent_connections_are_answered() {
    let sim = Sim::start().await;
    let options = GatewayOptions {
        server: "workers = 3".into(),
        extra: "[rate_limit]\nroute = { rate = 10000, burst = 100 }\n".into(),
        ..Default::default()
    };
    let gw = Gateway::ready_with(&sim, options).await;
    assert!(gw.log().contains("workers=3"), "{}", gw.log());
    let url = gw.url("/rest/message/roaming/user/dave/delete/all");
    // Each send opens its own connection: the three workers share them.
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..30 {
        let url = url.clone();
        calls.spawn(async move { send(Method::POST, &url, &[], "").await });
    }
    while let Some(answer) = calls.join_next().await {
        let answer = answer.unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    assert_eq!(sim.business_requests().await, 30);
}
