//! The App Token: single flight, background refresh, 401 → refresh → replay, and an endpoint that is down.

use std::time::Duration;

use http::Method;
use serde_json::json;

use crate::support::*;

async fn clear(gw: &Gateway) -> Answer {
    send(Method::POST, &clear_url(gw, "dave"), &[], "").await
}

#[tokio::test]
async fn a_hundred_concurrent_first_requests_cause_one_fetch() {
    let sim = Sim::start().await;
    // A slow token endpoint, so all hundred requests arrive while the first fetch is in flight.
    sim.faults(json!({"token_delay_ms": 1500})).await;
    // The quota is raised out of the way: this test is about the token.
    let extra = "[rate_limit]\nroute = { rate = 10000, burst = 100 }\n".to_owned();
    let gw = Gateway::start(&sim, GatewayOptions { extra, ..Default::default() }).await;
    for answer in burst(&clear_url(&gw, "dave"), 100).await {
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    assert_eq!(sim.token_requests().await, 1);
    assert_eq!(sim.business_requests().await, 100);
}

#[tokio::test]
async fn token_is_refreshed_in_the_background_before_it_expires() {
    let sim = Sim::start().await;
    let options =
        GatewayOptions { extra: "[token]\nttl = \"4s\"\nmin_interval = \"100ms\"\n".into(), ..Default::default() };
    let gw = Gateway::ready_with(&sim, options).await;
    // Keep calling across two refreshes: never a 401 upstream, never a 503.
    eventually(Duration::from_secs(20), "two background refreshes", || async {
        let a = clear(&gw).await;
        assert_eq!(a.status, 200, "{}", a.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
        sim.token_requests().await >= 3
    })
    .await;
    let stats = sim.stats().await;
    assert!(stats["by_status"].get("401").is_none(), "a refresh came too late: {stats}");
    // Fetched on demand after expiry, the count would stay 0: these were background refreshes.
    assert!(stats["tokens_issued_before_expiry"].as_u64().unwrap() >= 2, "{stats}");
}

#[tokio::test]
async fn expired_token_is_refreshed_once_and_the_request_replayed() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    sim.expire_tokens().await;
    let a = clear(&gw).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let stats = sim.stats().await;
    assert_eq!(stats["by_status"]["401"], 1);
    assert_eq!(stats["by_status"]["200"], 1);
    assert_eq!(stats["token_requests"], 2);
    assert!(gw.metrics().await.contains("easemob_gateway_token_replays_total{app=\"1122161011178276#demo\"} 1"));
}

#[tokio::test]
async fn a_second_401_is_passed_to_the_caller() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    sim.faults(json!({"status": 401, "status_count": 2})).await;
    let a = clear(&gw).await;
    a.assert_error(401, "unauthorized");
    assert!(!a.gateway_made(), "Easemob's own 401");
    assert_eq!(sim.business_requests().await, 2, "replayed exactly once");
    assert_eq!(sim.token_requests().await, 2, "one new token for the replay");
}

#[tokio::test]
async fn a_refused_replacement_token_is_not_replaced_in_a_loop() {
    let sim = Sim::start().await;
    let extra = "[token]\nmin_interval = \"10ms\"\n".to_owned();
    let gw = Gateway::ready_with(&sim, GatewayOptions { extra, ..Default::default() }).await;
    // Easemob refuses every call (as for revoked credentials): one replacement token, then 401s pass on.
    sim.faults(json!({"status": 401})).await;
    for _ in 0..10 {
        clear(&gw).await.assert_error(401, "unauthorized");
    }
    assert_eq!(sim.token_requests().await, 2, "the start-up token and one replacement, not one per request");
    assert_eq!(sim.business_requests().await, 11, "one replay, then no more");
}

/// A gateway that retries token fetches quickly, once its readiness says a fetch has failed.
async fn started_after_a_failed_fetch(sim: &Sim) -> Gateway {
    let options = GatewayOptions {
        extra: "[token]\nretry_min = \"100ms\"\nretry_max = \"400ms\"\nmin_interval = \"50ms\"\n".into(),
        ..Default::default()
    };
    let gw = Gateway::start(sim, options).await;
    eventually(Duration::from_secs(20), "a failed fetch", || async {
        gw.readyz().await.json()["apps"].to_string().contains("failing")
    })
    .await;
    gw
}

#[tokio::test]
async fn token_endpoint_down_at_start_up_then_recovering() {
    let sim = Sim::start().await;
    sim.faults(json!({"token_status": 503})).await;
    let gw = started_after_a_failed_fetch(&sim).await;
    assert_eq!(gw.readyz().await.status, 503);
    let a = clear(&gw).await;
    a.assert_error(503, "service_unavailable");
    assert!(a.gateway_made());
    let retry_after: u64 = a.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!(retry_after >= 1);
    assert_eq!(sim.business_requests().await, 0);

    sim.faults(json!({})).await;
    gw.wait_ready().await;
    assert_eq!(clear(&gw).await.status, 200);
}

#[tokio::test]
async fn cached_token_keeps_serving_while_refresh_fails() {
    let sim = Sim::start().await;
    let options = GatewayOptions {
        extra: "[token]\nttl = \"6s\"\nrefresh_at = 0.2\nmin_interval = \"50ms\"\nretry_min = \"200ms\"\nretry_max = \"200ms\"\n".into(),
        ..Default::default()
    };
    let gw = Gateway::ready_with(&sim, options).await;
    sim.faults(json!({"token_status": 500})).await;
    eventually(Duration::from_secs(20), "a failed refresh", || async { sim.token_requests().await >= 3 }).await;
    let a = clear(&gw).await;
    assert_eq!(a.status, 200, "the cached token is still valid: {}", a.text());
    assert_eq!(gw.readyz().await.status, 200);
}

#[tokio::test]
async fn a_token_that_never_expires_is_handled() {
    let sim = Sim::start().await;
    let options = GatewayOptions { extra: "[token]\nttl = \"0s\"\n".into(), ..Default::default() };
    let gw = Gateway::ready_with(&sim, options).await;
    let ready = gw.readyz().await.json();
    assert_eq!(ready["apps"]["1122161011178276#demo"]["state"], "valid");
    assert_eq!(clear(&gw).await.status, 200);
    assert!(gw.metrics().await.contains("easemob_gateway_token_expires_at_seconds{app=\"1122161011178276#demo\"} 0"));
}

#[tokio::test]
async fn sighup_rereads_a_rotated_secret_and_fetches_a_fresh_token() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    // Kubernetes rotates the Secret: Easemob now wants the new one, and the mounted file holds it.
    let rotated = "YXA6rotated-secret-0042";
    gw.rotate_secret(&sim, rotated).await;
    gw.signal("HUP");
    eventually(Duration::from_secs(10), "the config reloaded with the new secret", || async {
        gw.metrics().await.contains("easemob_gateway_config_reloads_total{result=\"applied\"} 1")
    })
    .await;
    assert_eq!(sim.stats().await["tokens_issued"], 2, "a token fetched with the new secret");
    // The old tokens are revoked too: the fresh one carries on.
    sim.expire_tokens().await;
    let a = clear(&gw).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert!(!gw.log().contains(rotated), "the secret is never logged");
}

#[tokio::test]
async fn a_secret_file_rotated_in_place_is_picked_up_without_a_signal() {
    let sim = Sim::start().await;
    let options = GatewayOptions { server: "reload_poll = \"200ms\"".into(), ..Default::default() };
    let gw = Gateway::ready_with(&sim, options).await;
    // As Kubernetes does for a mounted Secret: the file changes, nobody tells the gateway.
    let rotated = "YXA6rotated-secret-0043";
    gw.rotate_secret(&sim, rotated).await;
    eventually(Duration::from_secs(10), "the config reloaded with the new secret", || async {
        gw.metrics().await.contains("easemob_gateway_config_reloads_total{result=\"applied\"} 1")
    })
    .await;
    assert_eq!(sim.stats().await["tokens_issued"], 2, "a token fetched with the new secret");
    sim.expire_tokens().await;
    assert_eq!(clear(&gw).await.status, 200, "the new secret serves the fetch after a 401 too");
    assert_eq!(gw.log().matches("config reloaded").count(), 1, "once, for the one change");
    assert!(!gw.log().contains(rotated), "the secret is never logged");
}

#[tokio::test]
async fn a_token_endpoint_that_hangs_at_start_up_gets_a_definite_503_then_recovers() {
    let sim = Sim::start().await;
    sim.faults(json!({"token_delay_ms": 60_000})).await;
    let options = GatewayOptions {
        extra: "[token]\nretry_min = \"100ms\"\nretry_max = \"200ms\"\n".into(),
        ..Default::default()
    };
    let gw = Gateway::start(&sim, options).await;
    assert_eq!(gw.readyz().await.status, 503);
    // The first fetch hangs for 60 s: a request waits for it a short while (3 s), then gets a definite answer.
    clear(&gw).await.assert_error(503, "service_unavailable");
    assert_eq!(sim.business_requests().await, 0);
    // The hung fetch times out (upstream.timeout, 3 s here); the next attempt, with the endpoint back, succeeds.
    sim.faults(json!({})).await;
    gw.wait_ready().await;
    assert_eq!(clear(&gw).await.status, 200);
}

/// The ways a secret can appear in text that echoes a request: as it is, JSON-escaped (once, and once more inside
/// a JSON string), URL-encoded (as a form or a query carries it).
fn encodings(secret: &str) -> Vec<String> {
    let json = |s: &str| serde_json::to_string(s).unwrap().trim_matches('"').to_owned();
    let url: String = form_urlencoded::byte_serialize(secret.as_bytes()).collect();
    let percent = percent_encoding::utf8_percent_encode(secret, percent_encoding::NON_ALPHANUMERIC).to_string();
    vec![secret.to_owned(), json(secret), json(&json(secret)), url, percent]
}

#[tokio::test]
async fn secrets_the_token_endpoint_echoes_reach_no_log_answer_metric_or_audit_line() {
    for format in ["text", "json"] {
        let sim = Sim::start().await;
        sim.faults(json!({"token_echo": true})).await;
        let audit = tempfile::tempdir().unwrap();
        let audit_file = audit.path().join("audit.jsonl");
        let extra = format!(
            "[token]\nretry_min = \"100ms\"\nretry_max = \"200ms\"\nmin_interval = \"50ms\"\n\n[log]\nformat = \
             \"{format}\"\n\n[audit]\nfile = \"{}\"\n",
            audit_file.display()
        );
        // Every target at trace level: hyper's, the gateway's, everything.
        let options = GatewayOptions { extra, rust_log: Some("trace".into()), ..Default::default() };
        let gw = Gateway::start(&sim, options).await;
        eventually(Duration::from_secs(20), "a refused fetch", || async {
            gw.log().contains("app token fetch failed")
        })
        .await;
        let mut answers = vec![clear(&gw).await, gw.readyz().await];
        answers[0].assert_error(503, "service_unavailable");

        // Rotated mid-run, to a secret with characters that every encoding changes: the new one is redacted too.
        let rotated = "YXA6rot\"ated\\secret/+&= %42";
        gw.rotate_secret(&sim, rotated).await;
        gw.signal("HUP");
        eventually(Duration::from_secs(20), "the reload refused for the refused fetch", || async {
            gw.metrics().await.contains("easemob_gateway_config_reloads_total{result=\"rejected\"} 1")
        })
        .await;
        answers.push(clear(&gw).await);
        answers.push(gw.readyz().await);
        let log = gw.log();
        let bodies: String = answers.iter().map(Answer::text).collect();
        let outputs = [
            ("log", log),
            ("answers", bodies),
            ("metrics", gw.metrics().await),
            ("audit", std::fs::read_to_string(&audit_file).unwrap_or_default()),
        ];
        for secret in [CLIENT_SECRET, rotated] {
            for encoded in encodings(secret) {
                for (name, text) in &outputs {
                    assert!(!text.contains(&encoded), "{format}: {encoded:?} in the {name}");
                }
            }
        }
        let log = &outputs[0].1;
        assert!(log.contains("invalid_grant") && log.contains("[redacted]"), "the refusal is logged, redacted");
        assert!(log.contains("config not reloaded"), "the rotated secret was tried and refused");
    }
}

#[tokio::test]
async fn app_tokens_a_route_echoes_are_scrubbed_from_answers_job_results_and_logs() {
    let sim = Sim::start().await;
    // One attempt per operation: the job's result is Easemob's answer to it.
    let jobs = Some("max_attempts = 1".to_owned());
    let options = GatewayOptions { rust_log: Some("trace".into()), jobs, ..Default::default() };
    let gw = Gateway::ready_with(&sim, options).await;
    // Easemob refuses the token and repeats the request, `Authorization: Bearer …` included: the replay's new token
    // is refused and echoed too, and that answer goes to the caller.
    sim.faults(json!({"status": 401, "echo": true})).await;
    let refused = clear(&gw).await;
    let description = refused.assert_error(401, "unauthorized");
    assert!(description.contains("authorization: Bearer [redacted]"), "{description}");
    let job = json!({"operations": [clear_op("dave")]}).to_string();
    let created = send(Method::POST, &gw.url("/_gateway/jobs"), &[], &job).await;
    assert_eq!(created.status, 202, "{}", created.text());
    let job = finished(&gw, Duration::from_secs(60), created.header("location").unwrap()).await;
    let job_description = job["operations"][0]["error_description"].as_str().unwrap().to_owned();
    assert!(job_description.contains("[redacted]"), "{job}");

    let tokens = sim.tokens().await;
    assert!(tokens.len() >= 3, "the first token, its replacement, and the job's: {tokens:?}");
    let log = gw.log();
    for token in &tokens {
        for (name, text) in [("answer", &refused.text()), ("job", &job.to_string()), ("log", &log)] {
            assert!(!text.contains(token.as_str()), "a token in the {name}");
        }
    }
}

#[tokio::test]
async fn a_token_answer_one_byte_over_its_cap_is_refused_and_one_at_its_cap_is_used() {
    use easemob_gateway::upstream::MAX_ANSWER_BYTES;
    let sim = Sim::start().await;
    sim.faults(json!({"answer_bytes": MAX_ANSWER_BYTES + 1})).await;
    let gw = started_after_a_failed_fetch(&sim).await;
    clear(&gw).await.assert_error(503, "service_unavailable");
    assert_eq!(sim.business_requests().await, 0);

    sim.faults(json!({"answer_bytes": MAX_ANSWER_BYTES})).await;
    gw.wait_ready().await;
    let a = clear(&gw).await;
    assert!(!a.gateway_made(), "{}", a.status);
}
