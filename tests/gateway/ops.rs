//! Operations: the audit trail, and metrics that Prometheus's own linter accepts.

use std::process::{Command, Stdio};
use std::time::Duration;

use http::Method;
use serde_json::{Value, json};

use crate::support::*;

#[tokio::test]
async fn every_deletion_sent_to_easemob_is_audited_and_nothing_else() {
    let sim = Sim::start().await;
    let audit_dir = tempfile::tempdir().unwrap();
    let audit_file = audit_dir.path().join("audit.jsonl");
    let extra = format!("[audit]\nfile = \"{}\"\ndefault_caller = \"orders-service\"\n", audit_file.display());
    let gw = Gateway::ready_with(&sim, GatewayOptions { extra, ..Default::default() }).await;

    let chat = gw.url("/rest/message/roaming/chat/user/alice?userId=bob&msgIdList=1100000000000000001,1100000000000000002&isNotify=false");
    let traced = [
        ("x-caller", "billing"),
        ("x-request-id", "audit-1"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ];
    let a = send(Method::DELETE, &chat, &traced, "").await;
    assert_eq!(a.status, 200);
    let body = json!({"channel": "carol", "type": "chat", "delete_roam": true}).to_string();
    assert_eq!(send(Method::DELETE, &gw.url("/users/alice/user_channel"), &[], &body).await.status, 200);
    let group = gw.url(&format!("/rest/message/roaming/group/user/bob/time?groupId={GROUP}&delTime=1659014868000"));
    assert_eq!(delete(&group).await.status, 200);
    // Refused by Easemob (unknown user): audited as refused. Refused by the gateway: not sent, not audited.
    assert_eq!(send(Method::POST, &gw.url("/rest/message/roaming/user/nobody/delete/all"), &[], "").await.status, 404);
    assert_eq!(delete(&gw.url("/rest/message/roaming/chat/user/alice?userId=bob")).await.status, 400);

    let text = std::fs::read_to_string(&audit_file).unwrap();
    let events: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events.len(), 4, "{text}");
    let first = &events[0];
    assert_eq!(first["request_id"], "audit-1");
    assert_eq!(first["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736", "the caller's trace");
    assert_eq!(events[1]["trace_id"].as_str().unwrap().len(), 32, "a trace the gateway started");
    assert_eq!(first["caller"], "billing");
    assert_eq!(first["app"], "1122161011178276#demo");
    assert_eq!(first["route"], "delete_chat_messages");
    assert_eq!((first["owner"].as_str(), first["peer"].as_str()), (Some("alice"), Some("bob")));
    assert_eq!((first["message_ids"].as_u64(), first["is_notify"].as_bool()), (Some(2), Some(false)));
    assert_eq!((first["upstream_status"].as_u64(), first["outcome"].as_str()), (Some(200), Some("accepted")));
    assert!(first["time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(events[1]["caller"], "orders-service", "the configured default caller");
    assert_eq!((events[1]["channel"].as_str(), events[1]["delete_roam"].as_bool()), (Some("carol"), Some(true)));
    assert_eq!((events[2]["group"].as_str(), events[2]["del_time"].as_i64()), (Some(GROUP), Some(1659014868000)));
    assert_eq!((events[3]["upstream_status"].as_u64(), events[3]["outcome"].as_str()), (Some(404), Some("refused")));
    let token = sim.tokens().await.remove(0);
    for secret in [token.as_str(), CLIENT_SECRET] {
        assert!(!text.contains(secret), "a secret in the audit file");
        assert!(!gw.log().contains(secret), "a secret in the log");
        assert!(!gw.metrics().await.contains(secret), "a secret in the metrics");
    }
}

/// Every attempt that reaches Easemob has its own event, with its own outcome, linked to its request by the
/// request id: the audit file and what the simulator received agree one for one, retries and replays included.
#[tokio::test]
async fn every_attempt_sent_to_easemob_is_audited_retries_and_token_replays_included() {
    let sim = Sim::start().await;
    let audit_dir = tempfile::tempdir().unwrap();
    let audit_file = audit_dir.path().join("audit.jsonl");
    let options = GatewayOptions {
        // Token replays close together: no wait for the token endpoint's minimum interval.
        extra: format!("[audit]\nfile = \"{}\"\n\n[token]\nmin_interval = \"50ms\"\n", audit_file.display()),
        jobs: Some(String::new()),
        ..Default::default()
    };
    let gw = Gateway::ready_with(&sim, options).await;
    let url = clear_url(&gw, "dave");
    let clear = |id: &'static str| {
        let url = url.clone();
        async move { send(Method::POST, &url, &[("x-request-id", id)], "").await }
    };
    // A 503, retried: the retry succeeds.
    sim.faults(json!({"status": 503, "status_count": 1})).await;
    assert_eq!(clear("r-503").await.status, 200);
    // A 401: a new token, and the call replayed with it.
    sim.faults(json!({"status": 401, "status_count": 1})).await;
    assert_eq!(clear("r-401").await.status, 200);
    // An answer cut off after the deletion was applied: not retried, audited as of unknown outcome.
    sim.faults(json!({"reset_count": 1})).await;
    assert_eq!(clear("r-cut").await.status, 502);
    // A job's operation under a 401: the job's attempt and its replay.
    sim.faults(json!({"status": 401, "status_count": 1})).await;
    let created =
        send(Method::POST, &gw.url("/_gateway/jobs"), &[], &json!({"operations": [clear_op("dave")]}).to_string())
            .await;
    assert_eq!(created.status, 202, "{}", created.text());
    let job = finished(&gw, Duration::from_secs(60), created.header("location").unwrap()).await;
    assert_eq!(job["operations"][0]["status"], 200, "{job}");

    let events: Vec<Value> =
        std::fs::read_to_string(&audit_file).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // One for one: each call the simulator received, by its request id, is one event.
    let mut sent: Vec<String> = sim
        .requests()
        .await
        .iter()
        .map(|r| {
            let headers = r["headers"].as_array().unwrap();
            let id = headers.iter().find(|h| h[0] == "x-request-id").expect("a request id");
            id[1].as_str().unwrap().to_owned()
        })
        .collect();
    let mut audited: Vec<String> = events.iter().map(|e| e["request_id"].as_str().unwrap().to_owned()).collect();
    sent.sort();
    audited.sort();
    assert_eq!(audited, sent, "{events:#?}");
    let attempts = |id: &str| -> Vec<(u64, String, Option<u64>, String)> {
        events
            .iter()
            .filter(|e| e["request_id"] == id)
            .map(|e| {
                let kind = e["attempt_kind"].as_str().unwrap().to_owned();
                (
                    e["attempt"].as_u64().unwrap(),
                    kind,
                    e["upstream_status"].as_u64(),
                    e["outcome"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let row = |n, kind: &str, status: Option<u64>, outcome: &str| (n, kind.to_owned(), status, outcome.to_owned());
    assert_eq!(attempts("r-503"), [row(1, "first", Some(503), "refused"), row(2, "retry", Some(200), "accepted")]);
    assert_eq!(
        attempts("r-401"),
        [row(1, "first", Some(401), "refused"), row(2, "token_replay", Some(200), "accepted")]
    );
    assert_eq!(attempts("r-cut"), [row(1, "first", None, "unknown")]);
    let job_id = events.iter().map(|e| e["request_id"].as_str().unwrap()).find(|id| id.starts_with("job-")).unwrap();
    assert_eq!(attempts(job_id), [row(1, "job", Some(401), "refused"), row(2, "token_replay", Some(200), "accepted")]);
    let job_attempts: Vec<&Value> =
        events.iter().filter(|e| e["request_id"] == job_id).map(|e| &e["job_attempt"]).collect();
    assert_eq!(job_attempts, [1, 1], "both in the scheduler's first attempt");
}

#[tokio::test]
async fn metrics_pass_promtool() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    // Touch every family: a success, a rejection, a token fetch.
    assert_eq!(send(Method::POST, &gw.url("/rest/message/roaming/user/dave/delete/all"), &[], "").await.status, 200);
    assert_eq!(delete(&gw.url("/nope")).await.status, 404);
    let metrics = gw.metrics().await;
    for family in [
        "requests_total",
        "request_duration_seconds",
        "upstream_requests_total",
        "upstream_duration_seconds",
        "rejected_total",
        "rate_limit_wait_seconds",
        "rate_limit_backend_fallback",
        "token_fetches_total",
        "token_expires_at_seconds",
        "token_replays_total",
        "in_flight_requests",
        "build_info",
    ] {
        assert!(metrics.contains(&format!("# TYPE easemob_gateway_{family} ")), "{family} missing");
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (tests/run installs Debian's prometheus package)");
    use std::io::Write;
    promtool.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && report.trim().is_empty(), "promtool: {report}");
}

#[tokio::test]
async fn every_documented_family_is_exported_from_the_start() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    // No request yet, no job, no span export: a dashboard or an alert still finds every family.
    let metrics = gw.metrics().await;
    let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md")).unwrap();
    let table = page.split("\n## Metrics\n").nth(1).unwrap().split("\n## ").next().unwrap();
    // A family documented as existing only with the audit trail on has nothing to say without it.
    let documented: Vec<&str> = table
        .lines()
        .filter(|row| !row.contains("(with `audit.file` set)"))
        .filter_map(|row| row.strip_prefix("| `")?.split('`').next())
        .filter(|name| name.starts_with("easemob_gateway_"))
        .collect();
    assert!(documented.len() > 20, "{documented:?}");
    let missing: Vec<_> = documented.iter().filter(|name| !metrics.contains(&format!("# TYPE {name} "))).collect();
    assert!(missing.is_empty(), "documented but not exported at start: {missing:?}");
    // Labelled counters start at 0 for their known label values.
    for series in [
        "easemob_gateway_spans_dropped_total{reason=\"queue_full\"} 0",
        "easemob_gateway_spans_dropped_total{reason=\"export_failed\"} 0",
        "easemob_gateway_jobs{state=\"cancelled\"} 0",
        "easemob_gateway_job_operations_total{app=\"1122161011178276#demo\",outcome=\"retried\",route=\"delete_conversation\"} 0",
    ] {
        assert!(metrics.contains(series), "{series} missing");
    }
}

#[tokio::test]
async fn json_logs_have_one_structured_line_per_request() {
    let sim = Sim::start().await;
    let gw =
        Gateway::ready_with(&sim, GatewayOptions { extra: "[log]\nformat = \"json\"\n".into(), ..Default::default() })
            .await;
    let headers = [("x-request-id", "log-1")];
    send(Method::POST, &gw.url("/rest/message/roaming/user/dave/delete/all"), &headers, "").await;
    send(Method::DELETE, &gw.url("/rest/message/roaming/chat/user/alice?userId=bob"), &[("x-request-id", "log-2")], "")
        .await;
    let lines: Vec<Value> = gw.log().lines().map(|l| serde_json::from_str(l).expect("every line is JSON")).collect();
    let request =
        |id: &str| lines.iter().find(|l| l["message"] == "request" && l["request_id"] == id).cloned().unwrap();
    let ok = request("log-1");
    assert_eq!((ok["status"].as_u64(), ok["upstream_status"].as_u64()), (Some(200), Some(200)));
    assert_eq!(
        (ok["app"].as_str(), ok["route"].as_str()),
        (Some("1122161011178276#demo"), Some("clear_user_messages"))
    );
    assert!(ok["duration_ms"].as_f64().is_some());
    let refused = request("log-2");
    assert_eq!((refused["status"].as_u64(), refused["reason"].as_str()), (Some(400), Some("invalid")));
}

#[tokio::test]
async fn no_secret_or_token_appears_anywhere_even_at_trace_level() {
    let sim = Sim::start().await;
    let dir = tempfile::tempdir().unwrap();
    let audit_file = dir.path().join("audit.jsonl");
    let options = GatewayOptions {
        extra: format!("[audit]\nfile = \"{}\"\n", audit_file.display()),
        rust_log: Some("trace".into()),
        ..Default::default()
    };
    let gw = Gateway::ready_with(&sim, options).await;
    let clear = gw.url("/rest/message/roaming/user/dave/delete/all");
    let mut bodies = Vec::new();
    // Every flow: success, refusal, the SDK drop-in, 401 → replay, Easemob errors, a failing token endpoint.
    bodies.push(send(Method::POST, &clear, &[], "").await.text());
    bodies.push(delete(&gw.url("/rest/message/roaming/chat/user/alice?userId=bob")).await.text());
    bodies.push(send(Method::POST, &gw.url("/token"), &[], "{}").await.text());
    sim.expire_tokens().await;
    bodies.push(send(Method::POST, &clear, &[], "").await.text());
    sim.faults(json!({"status": 500, "status_count": 1})).await;
    bodies.push(send(Method::POST, &clear, &[], "").await.text());
    sim.faults(json!({"token_status": 400})).await;
    sim.expire_tokens().await;
    bodies.push(send(Method::POST, &clear, &[], "").await.text());
    bodies.push(gw.readyz().await.text());
    let metrics = gw.metrics().await;

    // Every token the simulator ever saw from this gateway, and the client secret.
    let mut secrets = sim.tokens().await;
    assert!(secrets.len() >= 2, "at least two different tokens were used");
    secrets.push(CLIENT_SECRET.to_owned());
    let log = gw.log();
    assert!(log.contains("DEBUG") && log.lines().filter(|l| l.contains(" request ")).count() >= 6, "{log}");
    let audit = std::fs::read_to_string(&audit_file).unwrap();
    for secret in &secrets {
        assert!(!log.contains(secret.as_str()), "secret in the trace log");
        assert!(!metrics.contains(secret.as_str()), "secret in the metrics");
        assert!(!audit.contains(secret.as_str()), "secret in the audit file");
        for body in &bodies {
            assert!(!body.contains(secret.as_str()), "secret in an answer: {body}");
        }
    }
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_gateway_and_answers_promql_and_loads_the_alerts() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    for _ in 0..3 {
        assert_eq!(
            send(Method::POST, &gw.url("/rest/message/roaming/user/dave/delete/all"), &[], "").await.status,
            200
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yml");
    let config = format!(
        "global:\n  scrape_interval: 1s\nrule_files: [\"{rules}\"]\nscrape_configs:\n  - job_name: gateway\n    \
         static_configs:\n      - targets: [\"{}\"]\n",
        gw.admin.trim_start_matches("http://")
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let _prometheus = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus is installed (tests/run installs Debian's prometheus package)");
    let api = format!("http://127.0.0.1:{port}/api/v1");
    let query = |q: &str| format!("{api}/query?query={}", percent_encode(q));
    eventually(std::time::Duration::from_secs(60), "prometheus to scrape the gateway", || async {
        let url = query("sum(easemob_gateway_requests_total{route=\"clear_user_messages\",code=\"200\"})");
        let Ok(a) = try_send(Method::GET, &url, &[], "").await else { return false };
        a.status == 200 && a.json()["data"]["result"][0]["value"][1] == "3"
    })
    .await;
    let expiry = send(Method::GET, &query("easemob_gateway_token_expires_at_seconds - time() > 86400"), &[], "").await;
    assert_eq!(expiry.json()["data"]["result"].as_array().unwrap().len(), 1, "{}", expiry.text());
    let rules = send(Method::GET, &format!("{api}/rules"), &[], "").await.json();
    let alerts =
        rules["data"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap().clone());
    assert!(alerts.count() >= 5, "the alerting rules loaded: {rules}");
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
