//! Whole-config reload, end to end: SIGHUP while callers keep their connections busy.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::support::*;

async fn reloads(gw: &Gateway, result: &str) -> u64 {
    metric(&gw.metrics().await, &format!("easemob_gateway_config_reloads_total{{result=\"{result}\"}}"))
}

/// The gateway's config file.
fn config_file(gw: &Gateway) -> std::path::PathBuf {
    gw.dir.path().join("gateway.toml")
}

/// Writes `config` as the gateway's file, sends SIGHUP, and waits until `count` reloads ended with `result`.
async fn reload(gw: &Gateway, config: &str, result: &str, count: u64) {
    std::fs::write(config_file(gw), config).unwrap();
    gw.signal("HUP");
    eventually(Duration::from_secs(10), &format!("reload number {count} {result}"), || async {
        reloads(gw, result).await == count
    })
    .await;
}

/// One caller on one keep-alive connection, sending `clear_user_messages` every `every` until `stop`: each
/// answer's status and `RateLimit-Policy`, or the error that ended the connection.
async fn caller(
    data: String,
    path: String,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> Result<Vec<(u16, String)>, String> {
    let stream = TcpStream::connect(data.trim_start_matches("http://")).await.map_err(|e| e.to_string())?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut answers = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        sender.ready().await.map_err(|e| format!("connection lost after {} answers: {e}", answers.len()))?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(&path)
            .header("host", "gateway")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request failed after {} answers: {e}", answers.len()))?;
        let status = response.status().as_u16();
        let policy = response.headers().get("ratelimit-policy").map(|v| v.to_str().unwrap().to_owned());
        let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        assert!(status == 200, "{status}: {}", String::from_utf8_lossy(&body));
        answers.push((status, policy.unwrap_or_default()));
        tokio::time::sleep(every).await;
    }
    Ok(answers)
}

#[tokio::test]
async fn reloads_under_load_change_a_quota_add_an_app_and_refuse_a_broken_file_without_a_failed_request() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    let original = std::fs::read_to_string(config_file(&gw)).unwrap();
    let path = format!("/{ORG}/{APP}/rest/message/roaming/user/dave/delete/all");

    // Four callers on their own keep-alive connections, about 60 calls a second together: under Easemob's 100.
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..4)
        .map(|_| tokio::spawn(caller(gw.data.clone(), path.clone(), Duration::from_millis(60), Arc::clone(&stop))))
        .collect();
    // Calls on the wire before the first reload (counted where they land, not waited for by the clock).
    let load_seen = |more: u64| {
        let sim = &sim;
        async move {
            let from = sim.business_requests().await;
            eventually(Duration::from_secs(10), "the callers' calls", || async {
                sim.business_requests().await >= from + more
            })
            .await;
        }
    };
    load_seen(8).await;

    // 1. A changed quota: the next answers on the same connections state it.
    let lowered = format!("{original}\n[rate_limit.routes.clear_user_messages]\nrate = 90\n");
    reload(&gw, &lowered, "applied", 1).await;
    let answer = send(Method::POST, &clear_url(&gw, "erin"), &[], "").await;
    assert_eq!(answer.header("ratelimit-policy"), Some("\"clear_user_messages\";q=90;w=1"));
    let rate = format!("easemob_gateway_rate_limit_rate{{app=\"{ORG}#{APP}\",route=\"clear_user_messages\"}}");
    assert_eq!(metric(&gw.metrics().await, &rate), 90);

    // 2. An added app: served once its token is granted, the first app's token kept.
    let added = format!(
        "{lowered}\n[[apps]]\norg_name = \"{ORG}\"\napp_name = \"{APP2}\"\nclient_id = \"{CLIENT_ID}\"\n\
         client_secret_file = \"{}\"\n",
        gw.secret_file().display()
    );
    reload(&gw, &added, "applied", 2).await;
    let other = format!("{}/{ORG}/{APP2}/rest/message/roaming/user/dave/delete/all", gw.data);
    assert_eq!(send(Method::POST, &other, &[], "").await.status, 200);
    assert_eq!(sim.stats().await["tokens_issued"], 2, "one token per app: the first app's was kept");

    // 3. A broken file: nothing changes, the problem is logged as check-config states it, and counted.
    reload(&gw, &added.replace("rate = 90", "rate = 0"), "rejected", 1).await;
    assert_eq!(metric(&gw.metrics().await, "easemob_gateway_config_last_reload_successful"), 0);
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_easemob-gateway"))
        .args(["check-config", "--config", config_file(&gw).to_str().unwrap()])
        .output()
        .unwrap();
    let problem = String::from_utf8(check.stderr).unwrap();
    let problem = problem.lines().next().unwrap().trim_start_matches("error: ");
    assert!(problem.contains("rate"), "{problem}");
    assert!(gw.log().contains(problem), "the log says what check-config says: {problem}");
    let status = send(Method::GET, &format!("{}/status.json", gw.admin), &[], "").await.json();
    let last = &status["reloads"]["last"];
    assert_eq!(last["applied"], false, "{status}");
    assert!(last["problems"].to_string().contains(problem), "the status page says why: {last}");
    assert_eq!(send(Method::POST, &other, &[], "").await.status, 200, "the running config stays in force");
    let answer = send(Method::POST, &clear_url(&gw, "erin"), &[], "").await;
    assert_eq!(answer.header("ratelimit-policy"), Some("\"clear_user_messages\";q=90;w=1"));

    // And calls after the last reload, on the same connections.
    load_seen(8).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for caller in callers {
        let answers = caller.await.unwrap().expect("no connection dropped, no request failed");
        assert!(answers.iter().all(|(status, _)| *status == 200));
        let last = &answers.last().expect("answers on every connection").1;
        assert_eq!(last, "\"clear_user_messages\";q=90;w=1", "kept-alive connections see the new quota");
        total += answers.len();
    }
    assert!(total >= 20, "the callers kept calling throughout: {total}");
    assert_eq!(sim.over_limit().await, 0);
}

#[tokio::test]
async fn a_reload_with_credentials_easemob_refuses_changes_nothing() {
    let sim = Sim::start().await;
    let options = GatewayOptions { server: "reload_poll = \"200ms\"".into(), ..Default::default() };
    let gw = Gateway::ready_with(&sim, options).await;
    // The secret file changes to a secret Easemob does not know: the reload waits for a token and gets none.
    std::fs::write(gw.secret_file(), "YXA6wrong-secret\n").unwrap();
    eventually(Duration::from_secs(10), "the reload rejected", || async { reloads(&gw, "rejected").await >= 1 }).await;
    assert!(gw.log().contains("no App Token with these credentials"), "{}", gw.log());
    sim.expire_tokens().await;
    // The old token was revoked: the app's source still holds the good secret and fetches again with it.
    assert_eq!(send(Method::POST, &clear_url(&gw, "dave"), &[], "").await.status, 200);
    assert!(!gw.log().contains("YXA6wrong-secret"), "a secret is never logged");
}

#[tokio::test]
async fn settings_that_need_a_restart_are_reported_not_ignored() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    let config = std::fs::read_to_string(config_file(&gw)).unwrap();
    let config = config.replace("shutdown_grace = \"5s\"", "shutdown_grace = \"7s\"");
    reload(&gw, &config, "applied", 1).await;
    assert_eq!(metric(&gw.metrics().await, "easemob_gateway_config_restart_required"), 1);
    assert!(gw.log().contains("server.shutdown_grace"), "{}", gw.log());
    // The status page names them too.
    let status = send(Method::GET, &format!("{}/status.json", gw.admin), &[], "").await.json();
    let reloads = &status["reloads"];
    assert_eq!((reloads["applied"].as_u64(), reloads["restart_required"].as_bool()), (Some(1), Some(true)));
    assert_eq!(reloads["last"]["applied"], true);
    assert_eq!(reloads["last"]["waiting_for_restart"], serde_json::json!(["server.shutdown_grace"]));
}

#[tokio::test]
async fn caller_keys_and_allow_from_apply_to_the_next_request_after_a_reload() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    let original = std::fs::read_to_string(config_file(&gw)).unwrap();
    let url = clear_url(&gw, "dave");
    assert_eq!(send(Method::POST, &url, &[], "").await.status, 200);

    // Caller keys: from now on a request needs one.
    let key_sha256 = easemob_gateway::access::hash_key("billing-key-123");
    let keyed = format!("{original}\n[[callers]]\nname = \"billing\"\nkey_sha256 = \"{key_sha256}\"\n");
    reload(&gw, &keyed, "applied", 1).await;
    send(Method::POST, &url, &[], "").await.assert_error(401, "gateway_key_required");
    assert_eq!(send(Method::POST, &url, &[("x-gateway-key", "billing-key-123")], "").await.status, 200);

    // allow_from: loopback is no longer among the callers' networks.
    let fenced = keyed.replacen("[server]\n", "[server]\nallow_from = [\"10.0.0.0/8\"]\n", 1);
    reload(&gw, &fenced, "applied", 2).await;
    send(Method::POST, &url, &[("x-gateway-key", "billing-key-123")], "").await.assert_error(403, "forbidden");
    assert!(gw.readyz().await.status == 200, "the admin listener is not fenced");
}
