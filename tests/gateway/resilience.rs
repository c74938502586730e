//! Upstream faults and overload: bounded retries, load shedding, and recovery.

use std::time::Duration;

use http::Method;
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn a_503_from_easemob_is_retried_once_and_then_succeeds() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    sim.faults(json!({"status": 503, "status_count": 1})).await;
    let a = send(Method::POST, &clear_url(&gw, "dave"), &[], "").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(sim.business_requests().await, 2);
    assert_eq!(metric(&gw.metrics().await, "easemob_gateway_upstream_retries_total{"), 1);
}

#[tokio::test]
async fn retries_stay_within_the_budget_during_an_outage() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    sim.faults(json!({"status": 503})).await;
    for _ in 0..30 {
        let a = send(Method::POST, &clear_url(&gw, "dave"), &[], "").await;
        a.assert_error(503, "service_unavailable");
        assert!(!a.gateway_made(), "Easemob's own 503 is passed on after the retry");
    }
    let retries = metric(&gw.metrics().await, "easemob_gateway_upstream_retries_total{");
    assert_eq!(sim.business_requests().await, 30 + retries, "at most one retry per request");
    // tower's TpsBudget: 1/s over a 10 s window plus a fifth of the requests: far fewer than one per request.
    assert!((1..=20).contains(&retries), "{retries} retries for 30 requests");
}

#[tokio::test]
async fn no_retry_after_a_4xx() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    sim.faults(json!({"status": 400, "status_count": 1})).await;
    assert_eq!(send(Method::POST, &clear_url(&gw, "dave"), &[], "").await.status, 400);
    assert_eq!(sim.business_requests().await, 1);
}

#[tokio::test]
async fn past_max_in_flight_requests_are_shed_at_once_and_the_gateway_recovers() {
    let sim = Sim::start().await;
    let options = GatewayOptions {
        server: "max_in_flight = 2".into(),
        extra: "[rate_limit]\nroute = { rate = 100, burst = 10 }\n".into(),
        ..Default::default()
    };
    let gw = Gateway::ready_with(&sim, options).await;
    sim.faults(json!({"delay_ms": 2000})).await;
    let held: Vec<_> = (0..2)
        .map(|_| {
            let url = clear_url(&gw, "dave");
            tokio::spawn(async move { send(Method::POST, &url, &[], "").await })
        })
        .collect();
    eventually(Duration::from_secs(10), "two held requests", || async { sim.business_requests().await == 2 }).await;
    let shed = send(Method::POST, &clear_url(&gw, "dave"), &[], "").await;
    shed.assert_error(503, "service_unavailable");
    assert_eq!(shed.header("x-easemob-gateway"), Some("rejected"));
    assert_eq!(shed.header("retry-after"), Some("1"));
    assert!(held.iter().all(|h| !h.is_finished()), "shed at once, not after waiting for a held request to end");
    assert_eq!(sim.business_requests().await, 2, "the shed request never reached Easemob");
    for h in held {
        assert_eq!(h.await.unwrap().status, 200);
    }
    sim.faults(json!({})).await;
    assert_eq!(send(Method::POST, &clear_url(&gw, "dave"), &[], "").await.status, 200, "recovered");
    assert!(gw.metrics().await.contains("reason=\"overloaded\""));
}

#[tokio::test]
async fn slow_or_foreign_clients_cannot_hold_a_connection() {
    let sim = Sim::start().await;
    let options = GatewayOptions { server: "header_read_timeout = \"1s\"".into(), ..Default::default() };
    let gw = Gateway::ready_with(&sim, options).await;
    // Half a request line, then silence: closed at the header timeout (1 s), not held.
    let half_line = b"DELETE /1122161011178276/demo/users/al";
    raw_until_closed(&gw.data, half_line, Duration::from_secs(30)).await.expect("closed by the gateway");
    // An HTTP/2 preface gets no HTTP/2 session (the data plane is HTTP/1 only, where the limits apply).
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let answer = raw_until_closed(&gw.data, preface, Duration::from_secs(30)).await.expect("closed by the gateway");
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 4") || answer.starts_with("HTTP/1.1 5"), "{answer}");
    // Headers far over the 64 KiB cap are refused.
    let huge = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(256 * 1024));
    let answer = raw(&gw.data, huge.as_bytes(), Duration::from_secs(15)).await;
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert_eq!(sim.business_requests().await, 0);
}

/// A deletion whose request line and headers are exactly `size` bytes, padded by one header.
fn head_of(size: usize) -> Vec<u8> {
    let start = format!(
        "POST /{ORG}/{APP}/rest/message/roaming/user/dave/delete/all HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\
         content-length: 0\r\nx-pad: "
    );
    let pad = size - start.len() - "\r\n\r\n".len();
    format!("{start}{}\r\n\r\n", "a".repeat(pad)).into_bytes()
}

/// Writes `request` to `addr` in pieces of `piece` bytes, each its own write, and reads the answer to its end.
async fn in_pieces(addr: &str, request: &[u8], piece: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr.trim_start_matches("http://")).await.unwrap();
    stream.set_nodelay(true).unwrap();
    for chunk in request.chunks(piece) {
        if stream.write_all(chunk).await.is_err() {
            break; // refused before the end: the answer is already there to read
        }
        // Let each piece arrive as a read of its own.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn the_head_cap_is_64_kib_in_one_write_or_many() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    const CAP: usize = 64 * 1024;
    let mut served = 0;
    for piece in [usize::MAX, 4096] {
        let at_cap = in_pieces(&gw.data, &head_of(CAP), piece).await;
        assert!(at_cap.starts_with("HTTP/1.1 200"), "{piece}: {at_cap}");
        served += 1;
        let over = in_pieces(&gw.data, &head_of(CAP + 1), piece).await;
        assert!(over.starts_with("HTTP/1.1 431"), "{piece}: {over}");
        let (head, body) = over.split_once("\r\n\r\n").unwrap();
        assert!(head.to_ascii_lowercase().contains("x-easemob-gateway: rejected"), "{head}");
        let envelope: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(envelope["error"], "request_header_fields_too_large", "{body}");
    }
    assert_eq!(sim.business_requests().await, served);
    assert!(gw.metrics().await.contains("reason=\"head_too_large\""));
}

#[tokio::test]
async fn probes_are_answered_while_idle_connections_pile_up_on_the_admin_port() {
    let sim = Sim::start().await;
    // The data plane's header timeout is long; the admin port must not inherit it.
    let options = GatewayOptions { server: "header_read_timeout = \"30s\"".into(), ..Default::default() };
    let gw = Gateway::ready_with(&sim, options).await;
    let admin = gw.admin.trim_start_matches("http://").to_owned();
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(tokio::net::TcpStream::connect(&admin).await.unwrap());
    }
    // Past the admin's own connection cap, these connections send nothing; a probe still gets its answer, well
    // within the 30 s they could otherwise hold it.
    let healthz = format!("{}/healthz", gw.admin);
    for _ in 0..3 {
        let probe = tokio::time::timeout(Duration::from_secs(10), send(Method::GET, &healthz, &[], "")).await;
        assert_eq!(probe.expect("the probe answered while idle connections are held").status, 200);
    }
    drop(idle);
}
