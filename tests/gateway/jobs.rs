//! Deletion jobs end to end: the jobs API and `Prefer: respond-async` on a real gateway with a real store, run
//! against the simulator; `kill -9` in the middle of a job.

use std::time::Duration;

use http::Method;
use serde_json::{Value, json};

use crate::support::*;

/// How long a job in these tests may take to finish.
const JOB_LIMIT: Duration = Duration::from_secs(120);

fn with_jobs() -> GatewayOptions {
    GatewayOptions { jobs: Some(String::new()), ..Default::default() }
}

async fn create(gw: &Gateway, body: &Value, headers: &[(&str, &str)]) -> Answer {
    send(Method::POST, &gw.url("/_gateway/jobs"), headers, &body.to_string()).await
}

async fn create_text(gw: &Gateway, body: &str) -> Answer {
    send(Method::POST, &gw.url("/_gateway/jobs"), &[], body).await
}

#[tokio::test]
async fn a_spam_message_is_removed_from_every_recipient_by_one_job() {
    let sim = Sim::start().await;
    let recipients: Vec<String> = (0..30).map(|i| format!("recipient{i}")).collect();
    for to in &recipients {
        for id in ["1100000000000000001", "1100000000000000002"] {
            let message = json!({"type": "chat", "from": "spammer", "to": to, "id": id});
            let url = format!("{}/_sim/apps/{ORG}/{APP}/messages", sim.url);
            assert_eq!(send(Method::POST, &url, &[], &message.to_string()).await.status, 200);
        }
    }
    let gw = Gateway::ready_with(&sim, with_jobs()).await;
    let operations: Vec<Value> = recipients
        .iter()
        .map(|to| {
            let path = format!("/rest/message/roaming/chat/user/{to}?userId=spammer&msgIdList=1100000000000000001");
            json!({"method": "DELETE", "path": path})
        })
        .collect();
    let created = create(&gw, &json!({ "operations": operations }), &[("X-Caller", "moderation")]).await;
    assert_eq!(created.status, 202, "{}", created.text());
    assert_eq!(created.header("x-easemob-gateway"), Some("local"));
    let location = created.header("location").unwrap().to_owned();
    assert_eq!(created.json()["location"], location.as_str());
    assert_eq!(created.json()["counts"]["total"], 30);

    let job = finished(&gw, JOB_LIMIT, &location).await;
    assert_eq!(job["state"], "done", "{}", job["counts"]);
    assert_eq!(job["counts"]["succeeded"], 30);
    assert_eq!(job["caller"], "moderation");
    let operations = job["operations"].as_array().unwrap();
    assert!(operations.iter().all(|op| op["status"] == 200 && op["attempts"] == 1), "{job}");
    for to in &recipients {
        assert_eq!(sim.messages(APP, to, "spammer").await, ["1100000000000000002"], "only the spam is gone for {to}");
    }
    assert_eq!(sim.over_limit().await, 0);

    let metrics = gw.metrics().await;
    let line = format!(
        "easemob_gateway_job_operations_total{{app=\"{ORG}#{APP}\",outcome=\"succeeded\",route=\"delete_chat_messages\"}} 30"
    );
    assert!(metrics.contains(&line), "{line}");
    assert!(metrics.contains("easemob_gateway_job_duration_seconds_count 1"));
    eventually(Duration::from_secs(15), "the jobs gauges to be refreshed", || async {
        let metrics = gw.metrics().await;
        metrics.contains("easemob_gateway_jobs{state=\"done\"} 1")
            && metrics.contains("easemob_gateway_job_operations_pending 0")
    })
    .await;

    let listed = send(Method::GET, &gw.url("/_gateway/jobs?state=done"), &[], "").await.json();
    assert_eq!(listed["jobs"][0]["location"], location.as_str());
    let running = send(Method::GET, &gw.url("/_gateway/jobs?state=running"), &[], "").await.json();
    assert_eq!(running["jobs"], json!([]));
}

#[tokio::test]
async fn prefer_respond_async_runs_a_valid_call_as_a_job_and_refuses_an_invalid_one_at_once() {
    let sim = Sim::start().await;
    let gw = Gateway::ready_with(&sim, with_jobs()).await;
    let prefer = [("Prefer", "respond-async, wait=10")];
    let accepted = send(Method::POST, &clear_url(&gw, "dave"), &prefer, "").await;
    assert_eq!(accepted.status, 202, "{}", accepted.text());
    assert_eq!(accepted.header("preference-applied"), Some("respond-async"));
    let job = finished(&gw, JOB_LIMIT, accepted.header("location").unwrap()).await;
    assert_eq!((job["state"].as_str(), job["counts"]["succeeded"].as_u64()), (Some("done"), Some(1)));
    assert_eq!(sim.business_requests().await, 1);

    let refused = send(Method::POST, &clear_url(&gw, "da%20ve"), &prefer, "").await;
    refused.assert_error(400, "illegal_argument");
    let jobs = send(Method::GET, &gw.url("/_gateway/jobs"), &[], "").await.json();
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 1, "nothing stored for the invalid call");

    // Without a jobs store the preference is ignored (RFC 7240 allows it): the call is answered as always.
    let plain = Gateway::ready(&sim).await;
    let direct = send(Method::POST, &clear_url(&plain, "dave"), &prefer, "").await;
    assert_eq!((direct.status, direct.header("preference-applied")), (200, None));
    send(Method::GET, &plain.url("/_gateway/jobs"), &[], "").await.assert_error(404, "jobs_disabled");
}

#[tokio::test]
async fn a_bad_job_is_refused_whole_with_each_bad_operation_named_and_nothing_reaches_easemob() {
    let sim = Sim::start().await;
    let gw =
        Gateway::ready_with(&sim, GatewayOptions { jobs: Some("max_operations = 5".into()), ..Default::default() })
            .await;
    let body = json!({"operations": [
        {"method": "DELETE", "path": "/rest/message/roaming/user/ann/delete/all"},
        clear_op("bob"),
        {"method": "POST", "path": "/rest/message/roaming/user/a!b/delete/all"},
        {"verb": "POST"},
    ]});
    let refused = create(&gw, &body, &[]).await;
    let description = refused.assert_error(400, "illegal_argument");
    assert!(description.starts_with("3 operations are invalid, so nothing was accepted"), "{description}");
    for index in ["operations[0]: ", "operations[2]: ", "operations[3]: "] {
        assert!(description.contains(index), "{description}");
    }
    assert!(!description.contains("operations[1]"), "{description}");

    create(&gw, &json!({"operations": []}), &[]).await.assert_error(400, "illegal_argument");
    create(&gw, &json!({"ops": []}), &[]).await.assert_error(400, "invalid_request_body");
    let six: Vec<Value> = (0..6).map(|i| clear_op(&format!("u{i}"))).collect();
    create(&gw, &json!({ "operations": six }), &[]).await.assert_error(413, "request_entity_too_large");
    // One ID list of 120 is three calls to Easemob: over max_operations once split.
    let ids: Vec<String> = (0..260).map(|i| format!("{}", 1_100_000_000_000_000_000u64 + i)).collect();
    let long = format!("/rest/message/roaming/chat/user/ann?userId=bob&msgIdList={}", ids.join(","));
    create(&gw, &json!({"operations": [{"method": "DELETE", "path": long}]}), &[])
        .await
        .assert_error(413, "request_entity_too_large");
    send(Method::GET, &gw.url("/_gateway/jobs/nope"), &[], "").await.assert_error(404, "job_not_found");
    send(Method::DELETE, &gw.url("/_gateway/jobs"), &[], "").await.assert_error(405, "method_not_allowed");
    assert_eq!(sim.business_requests().await, 0);
    // Refusals on a configured app's jobs path count under that app, not under `none`.
    let metrics = gw.metrics().await;
    for reason in ["invalid_job", "too_many_operations", "job_not_found", "method_not_allowed"] {
        let series =
            format!("easemob_gateway_rejected_total{{app=\"{ORG}#{APP}\",reason=\"{reason}\",route=\"none\"}}");
        assert!(metric(&metrics, &series) > 0, "{series} in\n{metrics}");
    }
}

#[tokio::test]
async fn an_idempotency_key_makes_a_retried_create_return_the_first_job() {
    let sim = Sim::start().await;
    sim.add_users(&["ann".to_owned(), "bob".to_owned()]).await;
    let gw = Gateway::ready_with(&sim, with_jobs()).await;
    let body = json!({"operations": [clear_op("ann")]});
    let key = [("Idempotency-Key", "erase-ann-2026-12-01")];
    let first = create(&gw, &body, &key).await;
    assert_eq!(first.status, 202);
    let again = create(&gw, &body, &key).await;
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.header("location"), first.header("location"));
    create(&gw, &json!({"operations": [clear_op("bob")]}), &key).await.assert_error(422, "idempotency_key_reused");
    finished(&gw, JOB_LIMIT, first.header("location").unwrap()).await;
    assert_eq!(sim.business_requests().await, 1, "one job, run once");
}

#[tokio::test]
async fn a_cancelled_job_stops_sending() {
    let sim = Sim::start().await;
    let options = GatewayOptions { extra: "[rate_limit]\nroute = { rate = 5 }\n".into(), ..with_jobs() };
    let gw = Gateway::ready_with(&sim, options).await;
    let users: Vec<String> = (0..100).map(|i| format!("u{i}")).collect();
    sim.add_users(&users).await;
    let operations: Vec<Value> = users.iter().map(|u| clear_op(u)).collect();
    let created = create(&gw, &json!({ "operations": operations }), &[]).await;
    let location = created.header("location").unwrap().to_owned();
    eventually(Duration::from_secs(30), "a few operations sent", || async { sim.business_requests().await >= 3 }).await;
    let cancelled = send(Method::POST, &format!("{}{location}/cancel", gw.data), &[], "").await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.text());
    let job = finished(&gw, JOB_LIMIT, &location).await;
    let counts = &job["counts"];
    assert_eq!(job["state"], "cancelled", "{counts}");
    let succeeded = counts["succeeded"].as_u64().unwrap();
    assert_eq!(succeeded + counts["cancelled"].as_u64().unwrap(), 100, "{counts}");
    assert_eq!(sim.business_requests().await, succeeded, "nothing sent after the cancel but what was in flight");
    let again = send(Method::POST, &format!("{}{location}/cancel", gw.data), &[], "").await;
    assert_eq!((again.status, again.json()["state"].as_str()), (200, Some("cancelled")), "{}", again.text());
}

/// The figure with 10,000 operations and three kills is `bench/jobs`; here, the same wiring at 2,000.
#[tokio::test]
async fn kill_9_during_a_job_loses_no_operation_and_records_each_once() {
    const OPERATIONS: usize = 2_000;
    let sim = Sim::start().await;
    sim.limits(json!({"route_per_second": 1000})).await;
    let options = GatewayOptions { extra: "[rate_limit]\nroute = { rate = 1000 }\n".into(), ..with_jobs() };
    let mut gw = Gateway::ready_with(&sim, options).await;
    let users: Vec<String> = (0..OPERATIONS).map(|i| format!("user{i}")).collect();
    sim.add_users(&users).await;
    let operations: Vec<Value> = users.iter().map(|u| clear_op(u)).collect();
    let created = create(&gw, &json!({ "operations": operations }), &[]).await;
    assert_eq!(created.status, 202, "{}", created.text());
    let location = created.header("location").unwrap().to_owned();
    for at in [300, 900, 1500] {
        eventually(Duration::from_secs(60), "the job to make progress", || async {
            sim.business_requests().await >= at
        })
        .await;
        gw.kill_and_restart().await;
    }
    let job = finished(&gw, JOB_LIMIT, &location).await;
    assert_eq!(job["state"], "done", "{}", job["counts"]);
    assert_eq!(
        job["counts"],
        json!({"total": OPERATIONS, "pending": 0, "succeeded": OPERATIONS, "failed": 0, "cancelled": 0})
    );
    let received = sim.received().await;
    let missing: Vec<&String> = users
        .iter()
        .filter(|u| !received.contains_key(&format!("POST /{ORG}/{APP}/rest/message/roaming/user/{u}/delete/all")))
        .collect();
    assert!(missing.is_empty(), "every operation reached Easemob at least once; not: {missing:?}");
    let again = received.values().filter(|n| n.as_u64() > Some(1)).count();
    println!("{again} operations were sent twice: in flight at a kill, their answer lost");
    assert_eq!(sim.over_limit().await, 0);
}

/// The route's limit in the restart tests: small, so that a second is quickly full.
const RESTART_RATE: usize = 5;

/// A job at its route's full pace, the gateway killed with `kill -9` right after a call reached the simulator and
/// started again at once, twice: the restarted gateway resumes the lane where the killed one left it, so no second
/// across a restart holds more than the route's limit. The calls are counted as Easemob counts them, when they
/// arrive, in windows 50 ms short of a second: room for a trip slowed on a loaded machine (the gateway's own margin
/// is 5 ms), far less than a restart that forgot the lane gives back (its first call goes as soon as it is up).
async fn a_restart_mid_job_keeps_the_route_within_its_limit(sim: &Sim, mut gw: Gateway) {
    let users: Vec<String> = (0..4 * RESTART_RATE).map(|i| format!("u{i}")).collect();
    sim.add_users(&users).await;
    let operations: Vec<Value> = users.iter().map(|u| clear_op(u)).collect();
    let created = create(&gw, &json!({ "operations": operations }), &[]).await;
    assert_eq!(created.status, 202, "{}", created.text());
    let location = created.header("location").unwrap().to_owned();
    for at in [RESTART_RATE as u64 + 1, 2 * RESTART_RATE as u64 + 1] {
        // Polled without a pause, so the kill follows the call by a millisecond or two.
        while sim.business_requests().await < at {}
        gw.kill_and_restart().await;
    }
    let job = finished(&gw, JOB_LIMIT, &location).await;
    assert_eq!(job["counts"]["succeeded"], users.len(), "{}", job["counts"]);
    let mut arrived: Vec<u64> = sim.requests().await.iter().map(|r| r["arrived_us"].as_u64().unwrap()).collect();
    arrived.sort_unstable();
    let window = 950_000;
    let busiest = (0..arrived.len())
        .map(|i| arrived[i..].iter().take_while(|t| **t < arrived[i] + window).count())
        .max()
        .unwrap();
    let gaps: Vec<u64> = arrived.windows(2).map(|w| (w[1] - w[0]) / 1000).collect();
    println!("gaps between calls (ms), two restarts among them: {gaps:?}");
    assert!(busiest <= RESTART_RATE, "{busiest} calls within 950 ms; gaps between calls (ms): {gaps:?}");
}

#[tokio::test]
async fn a_restart_mid_job_keeps_the_route_within_its_limit_with_a_sqlite_store() {
    let sim = Sim::start().await;
    let extra = format!("[rate_limit]\nroute = {{ rate = {RESTART_RATE} }}\n");
    let gw = Gateway::ready_with(&sim, GatewayOptions { extra, ..with_jobs() }).await;
    a_restart_mid_job_keeps_the_route_within_its_limit(&sim, gw).await;
}

#[tokio::test]
async fn a_restart_mid_job_keeps_the_route_within_its_limit_with_jobs_in_redis() {
    let redis = Redis::start().await;
    let sim = Sim::start().await;
    let extra = format!(
        "[rate_limit]\nbackend = \"redis\"\nroute = {{ rate = {RESTART_RATE} }}\n[rate_limit.redis]\nurl = \"{}\"\n",
        redis.url()
    );
    // Few operations claimed at once, so that the restarted gateway finds most of them free at once rather than
    // under the killed one's leases.
    let jobs = "lease = \"13s\"\nconcurrency = 1".to_owned();
    let gw = Gateway::ready_with(&sim, GatewayOptions { extra, shared_jobs: Some(jobs), ..Default::default() }).await;
    a_restart_mid_job_keeps_the_route_within_its_limit(&sim, gw).await;
}

/// `easemob-gateway jobs …` against a running gateway, as a person running a bulk erasure would use it.
async fn cli(gw: &Gateway, args: &[&str], stdin: Option<&str>) -> (Option<i32>, String, String) {
    use tokio::io::AsyncWriteExt;
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_easemob-gateway"));
    command
        .arg("jobs")
        .args(args)
        .args(["--gateway", &gw.data, "--app", &format!("{ORG}#{APP}")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default().as_bytes()).await.unwrap();
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await.unwrap().unwrap();
    (out.status.code(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[tokio::test]
async fn the_command_line_client_submits_watches_and_prints_failures_to_resubmit() {
    let sim = Sim::start().await;
    sim.add_users(&["ann".to_owned(), "bob".to_owned()]).await;
    let gw = Gateway::ready_with(&sim, with_jobs()).await;
    // `ghost` does not exist at Easemob: its operation fails for good (404).
    let file = ["ann", "ghost", "bob"].map(|u| clear_op(u).to_string()).join("\n");
    let (code, out, err) = cli(&gw, &["submit", "-"], Some(&format!("# cleanup\n{file}\n"))).await;
    assert_eq!(code, Some(2), "a failed operation makes the command fail: {err}");
    assert!(err.contains("2 succeeded, 1 failed, 0 cancelled"), "{err}");
    assert!(err.contains("404 service_resource_not_found"), "{err}");
    assert_eq!(out.trim(), clear_op("ghost").to_string(), "the failure, ready to submit again");

    let (code, out, _) = cli(&gw, &["list", "--state", "failed"], None).await;
    assert_eq!(code, Some(0));
    let id = out.split_whitespace().next().unwrap().to_owned();
    assert!(out.contains("3 of 3 done, 1 failed"), "{out}");
    let (code, out, _) = cli(&gw, &["show", &id, "--failed"], None).await;
    assert_eq!(code, Some(0));
    assert!(out.contains("\"state\": \"failed\"") && out.ends_with(&format!("{}\n", clear_op("ghost"))), "{out}");

    let (code, url, err) = cli(&gw, &["submit", "--no-watch", "-"], Some(&clear_op("ann").to_string())).await;
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = cli(&gw, &["watch", url.trim()], None).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("1 succeeded, 0 failed"), "{err}");
    let (code, _, err) = cli(&gw, &["cancel", "nope"], None).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("job_not_found"), "{err}");
}

#[tokio::test]
async fn a_cancelled_job_exits_3_from_submit_and_watch_and_a_second_cancel_says_it_was_cancelled() {
    let sim = Sim::start().await;
    let users: Vec<String> = (0..12).map(|i| format!("u{i}")).collect();
    sim.add_users(&users).await;
    let options = GatewayOptions { extra: "[rate_limit]\nroute = { rate = 2 }\n".into(), ..with_jobs() };
    let gw = Gateway::ready_with(&sim, options).await;
    let file = users.iter().map(|u| clear_op(u).to_string()).collect::<Vec<_>>().join("\n");
    let submitting = cli(&gw, &["submit", "-"], Some(&file));
    let cancelling = async {
        eventually(Duration::from_secs(30), "a few operations sent", || async { sim.business_requests().await >= 2 })
            .await;
        let (_, listed, _) = cli(&gw, &["list", "--state", "running"], None).await;
        let id = listed.split_whitespace().next().expect("the running job").to_owned();
        let cancelled = cli(&gw, &["cancel", &id], None).await;
        (id, cancelled)
    };
    let ((code, _, err), (id, (cancel_code, _, cancel_err))) = tokio::join!(submitting, cancelling);
    assert_eq!(code, Some(3), "a cancelled job has an exit status of its own: {err}");
    assert!(err.contains(&format!("job {id} cancelled:")), "{err}");
    assert_eq!(cancel_code, Some(0), "{cancel_err}");
    // What was not sent, and the one in flight at the cancel if there was one (it is recorded when it answers).
    let unsent = 12 - sim.business_requests().await;
    let dropped: u64 = cancel_err
        .split_once(&format!("job {id} cancelled: "))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{cancel_err}"));
    assert!((unsent..=unsent + 1).contains(&dropped), "{cancel_err}: {unsent} not sent");

    let (code, _, err) = cli(&gw, &["watch", &id], None).await;
    assert_eq!(code, Some(3), "{err}");
    let (code, _, err) = cli(&gw, &["cancel", &id], None).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains(&format!("job {id} was already cancelled: nothing to cancel")), "{err}");
}

#[tokio::test]
async fn with_jobs_off_the_jobs_api_and_the_client_say_so_and_name_the_key() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    for (method, tail) in [
        (Method::POST, "/_gateway/jobs".to_owned()),
        (Method::GET, format!("/{ORG}/{APP}/_gateway/jobs/some-id")),
        (Method::POST, "/_gateway/jobs/some-id/cancel".to_owned()),
    ] {
        let answer = send(method, &format!("{}{tail}", gw.data), &[], "{}").await;
        let description = answer.assert_error(404, "jobs_disabled");
        assert!(description.contains("jobs.enabled = true"), "{tail}: {description}");
        assert_eq!(answer.header("x-easemob-gateway"), Some("rejected"), "{tail}");
    }
    let (code, _, err) = cli(&gw, &["list"], None).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("jobs_disabled") && err.contains("jobs.enabled = true"), "{err}");
    assert_eq!(sim.business_requests().await, 0);
}

/// A job is parsed as it arrives: a request that passes a limit is answered 413 then, without waiting for the rest of
/// its body (these bodies stall part-way; their declared length is within `jobs.max_body_bytes`).
#[tokio::test]
async fn a_job_request_is_refused_as_soon_as_it_passes_a_limit() {
    let sim = Sim::start().await;
    let options = GatewayOptions {
        server: "body_read_timeout = \"120s\"".into(),
        jobs: Some("max_operations = 5\nmax_body_bytes = 4194304".into()),
        ..Default::default()
    };
    let gw = Gateway::ready_with(&sim, options).await;
    let head = |length: usize| {
        format!("POST /{ORG}/{APP}/_gateway/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n")
    };
    let wait = Duration::from_secs(60);

    // A request that stalls holds the one turn to read a job; one declaring too much is refused without waiting.
    let (addr, stalled) = (gw.data.clone(), format!("{}{{\"operations\": [", head(3_000_000)));
    let holding = tokio::spawn(async move { raw(&addr, stalled.as_bytes(), Duration::from_secs(300)).await });
    eventually(Duration::from_secs(30), "the stalled request in flight", || async {
        metric(&gw.metrics().await, "easemob_gateway_in_flight_requests") >= 1
    })
    .await;
    let declared = raw(&gw.data, head(4194305).as_bytes(), wait).await;
    assert!(declared.starts_with("HTTP/1.1 413"), "{declared}");
    assert!(declared.contains("larger than 4194304 bytes"), "{declared}");
    holding.abort();

    let six: Vec<String> = (0..6).map(|i| clear_op(&format!("u{i}")).to_string()).collect();
    let started = format!("{}{{\"operations\": [{},", head(3_000_000), six.join(","));
    let answer = raw(&gw.data, started.as_bytes(), wait).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("at most 5 operations") && answer.contains("at least 6"), "{answer}");

    let long =
        format!("{}{{\"operations\": [{{\"method\": \"POST\", \"path\": \"{}", head(3_000_000), "x".repeat(1 << 20));
    let answer = raw(&gw.data, long.as_bytes(), wait).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("operations[0] is over 1048576 bytes"), "{answer}");
    assert_eq!(sim.business_requests().await, 0);
}

#[tokio::test]
async fn a_job_request_of_max_body_bytes_is_read_and_one_byte_more_is_refused() {
    let sim = Sim::start().await;
    sim.add_users(&["ann".to_owned()]).await;
    let options =
        GatewayOptions { jobs: Some("max_operations = 5\nmax_body_bytes = 2048".into()), ..Default::default() };
    let gw = Gateway::ready_with(&sim, options).await;
    let padded = |length: usize| {
        let job = json!({"operations": [clear_op("ann")]}).to_string();
        format!("{job}{}", " ".repeat(length - job.len()))
    };
    let accepted = create_text(&gw, &padded(2048)).await;
    assert_eq!(accepted.status, 202, "{}", accepted.text());
    let refused = create_text(&gw, &padded(2049)).await;
    assert!(refused.assert_error(413, "request_entity_too_large").contains("larger than 2048 bytes"));
    // Without a declared length, counted as it arrives.
    let body = padded(2049);
    let chunked = format!(
        "POST /{ORG}/{APP}/_gateway/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    let answer = raw(&gw.data, chunked.as_bytes(), Duration::from_secs(30)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("larger than 2048 bytes"), "{answer}");
}

/// Operations are staged in the store as they are read (no request holds its whole list), so a request refused
/// part-way, or abandoned by its client, must leave none of them behind.
#[tokio::test]
async fn a_job_request_refused_or_abandoned_part_way_leaves_nothing_in_the_store() {
    let sim = Sim::start().await;
    let options = GatewayOptions { jobs: Some("max_operations = 3000".into()), ..Default::default() };
    let gw = Gateway::ready_with(&sim, options).await;
    let mut operations: Vec<Value> = (0..2500).map(|i| clear_op(&format!("u{i}"))).collect();
    operations.push(json!({"method": "DELETE", "path": "/rest/message/roaming/user/ann/delete/all"}));
    create(&gw, &json!({ "operations": operations }), &[]).await.assert_error(400, "illegal_argument");

    let valid: Vec<String> = (0..1500).map(|i| clear_op(&format!("u{i}")).to_string()).collect();
    let started = format!(
        "POST /{ORG}/{APP}/_gateway/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 800000\r\n\r\n{{\"operations\": [{},",
        valid.join(",")
    );
    let mut client = tokio::net::TcpStream::connect(gw.data.trim_start_matches("http://")).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut client, started.as_bytes()).await.unwrap();
    eventually(Duration::from_secs(30), "the abandoned request staged its first batch", || async { staged(&gw) > 0 })
        .await;
    drop(client);

    eventually(Duration::from_secs(30), "nothing staged is left", || async { staged(&gw) == 0 }).await;
    let listed = send(Method::GET, &gw.url("/_gateway/jobs"), &[], "").await;
    assert_eq!(listed.json()["jobs"], json!([]), "{}", listed.text());
    assert_eq!(sim.business_requests().await, 0);
}

/// Operations staged in the gateway's SQLite store and not (yet) made a job.
fn staged(gw: &Gateway) -> i64 {
    let db = rusqlite::Connection::open(gw.dir.path().join("jobs.db")).unwrap();
    db.query_row("SELECT COUNT(*) FROM staged", [], |row| row.get(0)).unwrap()
}
