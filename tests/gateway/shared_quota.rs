//! One quota for several replicas through a real redis-server, and each replica's share while Redis is down.

use std::time::Duration;

use http::Method;

use crate::support::*;

const REPLICAS: usize = 3;

/// A gateway whose quota is shared through `redis`: `quota` goes into `[rate_limit]`, `settings` into
/// `[rate_limit.redis]` (beside the URL).
fn on_redis(redis: &Redis, quota: &str, settings: &str) -> GatewayOptions {
    let extra = format!(
        "[rate_limit]\nbackend = \"redis\"\n{quota}\n[rate_limit.redis]\nurl = \"{}\"\n{settings}\n",
        redis.url()
    );
    GatewayOptions { extra, ..Default::default() }
}

/// Three replicas sharing one Redis, with no waiting and a route quota of 6 at once, refilling once a second.
async fn replicas(sim: &Sim, redis: &Redis) -> Vec<Gateway> {
    let quota = format!("replicas = {REPLICAS}\nmax_wait = \"0s\"\nroute = {{ rate = 1, burst = 6 }}");
    let mut gateways = Vec::new();
    for _ in 0..REPLICAS {
        let options = on_redis(redis, &quota, "timeout = \"200ms\"");
        gateways.push(Gateway::ready_with(sim, options).await);
    }
    gateways
}

/// Waits until every replica's `rate_limit_backend_fallback` gauge reads `value`.
async fn all_in_fallback(gateways: &[Gateway], value: u8) {
    let line = format!("easemob_gateway_rate_limit_backend_fallback {value}");
    for gw in gateways {
        eventually(Duration::from_secs(15), &line, || async { gw.metrics().await.contains(&line) }).await;
    }
}

#[tokio::test]
async fn three_replicas_share_one_quota() {
    let redis = Redis::start().await;
    let sim = Sim::start().await;
    let gateways = replicas(&sim, &redis).await;
    let (admitted, took) = burst_all(&gateways, 6).await;
    // One quota of 6 at once (plus a refill a second), not 6 per replica.
    let bound = 6 + took.as_secs() as usize + 1;
    assert!((6..=bound).contains(&admitted), "{admitted} of 18 admitted in {took:?}");
    assert_eq!(sim.business_requests().await as usize, admitted);
    all_in_fallback(&gateways, 0).await;
}

#[tokio::test]
async fn replicas_keep_answering_at_their_share_while_redis_is_down_and_return_to_it() {
    let mut redis = Redis::start().await;
    let sim = Sim::start().await;
    let gateways = replicas(&sim, &redis).await;
    redis.kill().await;
    // Each replica notices on its next call, then enforces its share: 6 / 3 = 2 at once, from an interval (a
    // second at this rate) after the loss, once no call Redis granted can still be going out.
    let _ = burst_all(&gateways, 1).await;
    all_in_fallback(&gateways, 1).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (admitted, took) = burst_all(&gateways, 6).await;
    let bound = REPLICAS * (2 + took.as_secs() as usize + 1);
    assert!(admitted > 0 && admitted <= bound, "{admitted} admitted during the outage, bound {bound}");

    redis.restart().await;
    // Back on Redis once a probe (at most one a second per replica) gets through.
    eventually(Duration::from_secs(15), "every replica back on Redis", || async {
        let _ = burst_all(&gateways, 1).await;
        let mut back = true;
        for gw in &gateways {
            back &= gw.metrics().await.contains("easemob_gateway_rate_limit_backend_fallback 0");
        }
        back
    })
    .await;
}

#[tokio::test]
async fn through_redis_a_caller_that_hangs_up_gives_its_reserved_slot_back() {
    let redis = Redis::start().await;
    let sim = Sim::start().await;
    let options = on_redis(&redis, "max_wait = \"5s\"\nroute = { rate = 1, burst = 1 }", "timeout = \"200ms\"");
    let gw = Gateway::ready_with(&sim, options).await;
    let url = clear_url(&gw, "dave");
    // The lane's state in Redis: the time its next slot becomes free.
    let redis_addr = format!("127.0.0.1:{}", redis.port);
    let key = "easemob-gateway:{1122161011178276#demo}:clear_user_messages";
    let next_slot = || async {
        let answer = raw(&redis_addr, format!("GET {key}\r\n").as_bytes(), Duration::from_millis(500)).await;
        answer.lines().nth(1).unwrap_or_default().to_owned()
    };
    assert_eq!(send(Method::POST, &url, &[], "").await.status, 200);
    let after_first = next_slot().await;
    // The next slot is a second away: this caller reserves it in Redis, then hangs up.
    let quitter = tokio::time::timeout(Duration::from_millis(200), send(Method::POST, &url, &[], "")).await;
    assert!(quitter.is_err());
    eventually(Duration::from_secs(10), "the reserved slot to be given back", || async {
        next_slot().await == after_first
    })
    .await;
    assert_eq!(send(Method::POST, &url, &[], "").await.status, 200);
    assert_eq!(sim.business_requests().await, 2, "the caller that hung up never reached Easemob");
}

#[tokio::test]
async fn through_redis_one_users_window_is_shared_by_every_replica() {
    let redis = Redis::start().await;
    let sim = Sim::start().await;
    let (a, b) = (
        Gateway::ready_with(&sim, on_redis(&redis, "", "timeout = \"500ms\"")).await,
        Gateway::ready_with(&sim, on_redis(&redis, "", "timeout = \"500ms\"")).await,
    );
    let body = serde_json::json!({"channel": "bob", "type": "chat", "delete_roam": false}).to_string();
    // Five at once, spread over both replicas: all go (Easemob takes five together).
    let calls: Vec<_> = ["alice", "ALICE", "Alice", "alice", "aLiCe"]
        .iter()
        .enumerate()
        .map(|(i, user)| {
            let url = [&a, &b][i % 2].url(&format!("/users/{user}/user_channel"));
            let body = body.clone();
            tokio::spawn(async move { send(Method::DELETE, &url, &[], &body).await.status })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), 200);
    }
    for gw in [&a, &b] {
        let sixth = send(Method::DELETE, &gw.url("/users/alice/user_channel"), &[], &body).await;
        sixth.assert_error(429, "reach_limit");
        let field = sixth.header("ratelimit").unwrap().to_owned();
        assert!(field == "\"user\";r=0;t=61" || field == "\"user\";r=0;t=60", "names the per-user limit: {field}");
    }
    assert!(a.metrics().await.contains("easemob_gateway_rate_limit_backend_fallback 0"), "decided in Redis");
    assert_eq!(sim.business_requests().await, 5);
    assert_eq!(sim.over_limit().await, 0);
}

#[tokio::test]
async fn through_redis_a_burst_of_a_routes_quota_is_served_in_full() {
    let redis = Redis::start().await;
    let sim = Sim::start().await;
    let gw = Gateway::ready_with(&sim, on_redis(&redis, "", "timeout = \"500ms\"")).await;
    for answer in burst(&clear_url(&gw, "dave"), 100).await {
        assert_eq!(answer.status, 200);
    }
    assert!(gw.metrics().await.contains("easemob_gateway_rate_limit_backend_fallback 0"), "decided in Redis");
    assert_eq!(sim.over_limit().await, 0);
}

/// Jobs in Redis: three replicas work one queue at the shared quota; one killed mid-job has its claimed operations
/// taken over by the others once their leases expire. Each replica keeps its own audit chain, and the job's receipt
/// names the replica whose chain holds each attempt: `audit verify` finds them all in the three files.
#[tokio::test]
async fn replicas_share_a_job_through_redis_and_finish_a_killed_replicas_work() {
    const OPERATIONS: usize = 600;
    let (sim, redis) = (Sim::start().await, Redis::start().await);
    let users: Vec<String> = (0..OPERATIONS).map(|i| format!("user{i}")).collect();
    sim.add_users(&users).await;
    let mut gateways = Vec::new();
    let audit_dir = tempfile::tempdir().unwrap();
    let audit_file = |i: usize| audit_dir.path().join(format!("audit-{i}.jsonl"));
    for i in 0..REPLICAS {
        let mut options = on_redis(&redis, "replicas = 3", "timeout = \"200ms\"");
        options.extra += &format!("[audit]\nfile = \"{}\"\nreplica = \"replica-{i}\"\n", audit_file(i).display());
        options.shared_jobs = Some("lease = \"13s\"".into());
        gateways.push(Gateway::ready_with(&sim, options).await);
    }
    let operations: Vec<serde_json::Value> = users.iter().map(|u| clear_op(u)).collect();
    let body = serde_json::json!({ "operations": operations }).to_string();
    let started = std::time::Instant::now();
    let created = send(Method::POST, &gateways[0].url("/_gateway/jobs"), &[], &body).await;
    assert_eq!(created.status, 202, "{}", created.text());
    let location = created.header("location").unwrap().to_owned();
    // Every replica works on it (the others find it at their next look at the queue, within a second); then one dies
    // holding the operations it claimed.
    for gw in &gateways {
        eventually(Duration::from_secs(30), "every replica at work on the job", || async {
            gw.metrics()
                .await
                .lines()
                .any(|l| l.starts_with("easemob_gateway_job_operations_total") && !l.ends_with(" 0"))
        })
        .await;
    }
    gateways[2].kill().await;

    // Read through a replica left.
    let job = finished(&gateways[1], Duration::from_secs(60), &location).await;
    assert_eq!(job["state"], "done", "{}", job["counts"]);
    assert_eq!(job["counts"]["succeeded"], OPERATIONS, "each operation recorded once: {}", job["counts"]);
    let sent = sim.clears_received(&users).await;
    assert!(sent.iter().all(|n| *n >= 1), "every operation reached Easemob");
    let again: u64 = sent.iter().map(|n| n - 1).sum();
    assert!(again <= 32, "only what the killed replica had in flight may go twice: {again}");
    let took_over = gateways[..2].iter().any(|gw| gw.log().contains("took over job operations whose lease expired"));
    assert!(took_over, "the killed replica's claimed operations were taken over after their lease");
    println!("{OPERATIONS} operations on 3 replicas, one killed: done in {:?}, {again} sent twice", started.elapsed());
    assert_eq!(sim.over_limit().await, 0, "the replicas together kept to the quota");
    for gw in &gateways[..2] {
        let metrics = gw.metrics().await;
        assert!(
            metrics.lines().any(|l| l.starts_with("easemob_gateway_job_operations_total") && !l.ends_with(" 0")),
            "every replica left worked on the job"
        );
    }

    let receipt = send(Method::GET, &format!("{}{location}/receipt", gateways[0].data), &[], "").await.text();
    let document: serde_json::Value = serde_json::from_str(&receipt).unwrap();
    let replicas: std::collections::BTreeSet<&str> = document["receipt"]["operations"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|op| op["attempts"].as_array().unwrap())
        .map(|attempt| attempt["replica"].as_str().unwrap())
        .collect();
    assert!(replicas.len() >= 2, "the receipt names each replica that sent an attempt: {replicas:?}");
    let saved = audit_dir.path().join("receipt.json");
    std::fs::write(&saved, &receipt).unwrap();
    let files: Vec<String> = (0..REPLICAS).map(|i| audit_file(i).display().to_string()).collect();
    let mut args: Vec<&str> = files.iter().map(String::as_str).collect();
    args.extend(["--receipt", saved.to_str().unwrap()]);
    let (code, out) = crate::receipts::verify(&args);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("audit events found and matching") && out.contains("intact: replica replica-1"), "{out}");
    // Without the files of a replica named in it, the receipt is not borne out.
    let named = replicas.iter().next().unwrap().trim_start_matches("replica-").parse::<usize>().unwrap();
    let others: Vec<&str> = (0..REPLICAS).filter(|i| *i != named).map(|i| files[i].as_str()).collect();
    let (code, out) = crate::receipts::verify(&[others.as_slice(), &["--receipt", saved.to_str().unwrap()]].concat());
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("is not in the audit files given"), "{out}");
}

/// The jobs API on the Redis store: idempotency, cancel, listing by state and reading operations by state.
#[tokio::test]
async fn the_jobs_api_works_the_same_with_jobs_in_redis() {
    let (sim, redis) = (Sim::start().await, Redis::start().await);
    let users: Vec<String> = (0..50).map(|i| format!("user{i}")).collect();
    sim.add_users(&users).await;
    let mut options = on_redis(&redis, "route = { rate = 5 }", "timeout = \"200ms\"");
    options.shared_jobs = Some(String::new());
    let gw = Gateway::ready_with(&sim, options).await;
    let operations: Vec<serde_json::Value> = users.iter().map(|u| clear_op(u)).collect();
    let body = serde_json::json!({ "operations": operations }).to_string();
    let key = [("Idempotency-Key", "cleanup-1")];
    let created = send(Method::POST, &gw.url("/_gateway/jobs"), &key, &body).await;
    assert_eq!(created.status, 202, "{}", created.text());
    let location = created.header("location").unwrap().to_owned();
    let again = send(Method::POST, &gw.url("/_gateway/jobs"), &key, &body).await;
    assert_eq!((again.status, again.header("location")), (200, Some(location.as_str())));
    send(Method::POST, &gw.url("/_gateway/jobs"), &key, "{\"operations\":[]}")
        .await
        .assert_error(400, "illegal_argument");
    let other = serde_json::json!({"operations": [operations[0].clone()]}).to_string();
    send(Method::POST, &gw.url("/_gateway/jobs"), &key, &other).await.assert_error(422, "idempotency_key_reused");

    eventually(Duration::from_secs(30), "a few operations sent", || async { sim.business_requests().await >= 5 }).await;
    let cancelled = send(Method::POST, &format!("{}{location}/cancel", gw.data), &[], "").await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.text());
    let url = format!("{}{location}", gw.data);
    finished(&gw, Duration::from_secs(30), &location).await;
    let job = send(Method::GET, &format!("{url}?operations=succeeded&limit=1000"), &[], "").await.json();
    let succeeded = job["counts"]["succeeded"].as_u64().unwrap();
    assert_eq!(job["state"], "cancelled", "{}", job["counts"]);
    assert_eq!(succeeded + job["counts"]["cancelled"].as_u64().unwrap(), 50, "{}", job["counts"]);
    assert_eq!(job["operations"].as_array().unwrap().len() as u64, succeeded);
    assert_eq!(sim.business_requests().await, succeeded, "nothing sent after the cancel but what was in flight");
    let page = send(Method::GET, &format!("{url}?operations=cancelled&limit=2"), &[], "").await.json();
    let ops = page["operations"].as_array().unwrap();
    assert_eq!((ops.len(), ops[0]["state"].as_str(), ops[0]["method"].as_str()), (2, Some("cancelled"), Some("POST")));
    assert!(page["next"].as_str().unwrap().contains("operations=cancelled"), "{page}");
    let listed = send(Method::GET, &gw.url("/_gateway/jobs?state=cancelled"), &[], "").await.json();
    assert_eq!(listed["jobs"][0]["location"], location.as_str());
    // Cancelling again changes nothing, and the store stays healthy.
    let again = send(Method::POST, &format!("{}{location}/cancel", gw.data), &[], "").await;
    assert_eq!((again.status, again.json()["state"].as_str()), (200, Some("cancelled")), "{}", again.text());
    assert_eq!(gw.readyz().await.status, 200);
}

/// A managed Redis: TLS with a private CA and a password from a file. The shared quota works through it (not this
/// replica's fallback share), and the password appears in no log line and no `check-config` output.
#[tokio::test]
async fn a_managed_redis_with_tls_and_a_password_is_used_and_the_password_never_shown() {
    const PASSWORD: &str = "redis-pw-s3cret-9f2c";
    let RedisSecrets { dir, cert, key, password } = RedisSecrets::new(PASSWORD);
    let (sim, redis) = (Sim::start().await, Redis::start_tls(cert.clone(), key, PASSWORD).await);
    assert!(redis.url().starts_with("rediss://"));
    let settings = |password: &std::path::Path| {
        format!("timeout = \"500ms\"\npassword_file = \"{}\"\nca_file = \"{}\"", password.display(), cert.display())
    };
    // A burst of 3 through Redis; a replica on its fallback share (3 / 3 replicas) would admit 1.
    let quota = "replicas = 3\nmax_wait = \"0s\"\nroute = { rate = 1, burst = 3 }";
    let gw = Gateway::ready_with(&sim, on_redis(&redis, quota, &settings(&password))).await;
    let admitted = burst(&clear_url(&gw, "dave"), 6).await.iter().filter(|a| a.status == 200).count();
    assert_eq!(admitted, 3, "the burst the shared quota allows");
    assert!(gw.metrics().await.contains("easemob_gateway_rate_limit_backend_fallback 0"));

    // A wrong password: Redis refuses, the replica falls back to its share, and says why without the password.
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let refused = Gateway::ready_with(&sim, on_redis(&redis, quota, &settings(&wrong))).await;
    // The first call finds Redis refusing; the share opens an interval (a second at this rate) later.
    send(Method::POST, &clear_url(&refused, "dave"), &[], "").await.assert_error(429, "reach_limit");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let admitted = burst(&clear_url(&refused, "dave"), 6).await.iter().filter(|a| a.status == 200).count();
    assert_eq!(admitted, 1, "this replica's share while Redis refuses it");
    assert!(refused.metrics().await.contains("easemob_gateway_rate_limit_backend_fallback 1"));
    for log in [gw.log(), refused.log()] {
        assert!(!log.contains(PASSWORD) && !log.contains("not-the-password"), "no password in the log");
    }
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_easemob-gateway"))
        .args(["check-config", "--config", gw.dir.path().join("gateway.toml").to_str().unwrap()])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success() && printed.contains("password_file") && !printed.contains(PASSWORD), "{printed}");
}

/// With the shared quota, users' windows live in Redis: a job's estimate reads them there.
#[tokio::test]
async fn through_redis_a_jobs_estimate_counts_the_calls_a_users_window_holds() {
    let (sim, redis) = (Sim::start().await, Redis::start().await);
    sim.add_users(&["ann".to_owned()]).await;
    let mut options = on_redis(&redis, "", "timeout = \"500ms\"");
    options.shared_jobs = Some(String::new());
    let gw = Gateway::ready_with(&sim, options).await;
    let conversation =
        |peer: usize| serde_json::json!({"channel": format!("p{peer}"), "type": "chat", "delete_roam": false});
    for peer in 0..5 {
        let direct =
            send(Method::DELETE, &gw.url("/users/ann/user_channel"), &[], &conversation(peer).to_string()).await;
        assert_eq!(direct.status, 200, "{}", direct.text());
    }
    let operations: Vec<_> = (5..7)
        .map(|peer| serde_json::json!({"method": "DELETE", "path": "/users/ann/user_channel", "body": conversation(peer)}))
        .collect();
    let body = serde_json::json!({ "operations": operations }).to_string();
    let created = send(Method::POST, &gw.url("/_gateway/jobs"), &[], &body).await;
    assert_eq!(created.status, 202, "{}", created.text());
    let estimate = created.json()["estimated_seconds"].as_u64().unwrap();
    assert!((55..=61).contains(&estimate), "ann's window frees a minute after her five direct calls: {estimate}");
}

/// Jobs in Redis, and Redis killed: the jobs store fails on every replica at once, but direct deletions still work
/// (each replica's share of the quota), so `/readyz` stays 200 and says the store is failing, as the metric does.
/// `jobs.ready_requires_store` makes the store count for readiness again.
#[tokio::test]
async fn a_failing_jobs_store_shows_in_readyz_and_metrics_but_leaves_the_replica_ready() {
    let (sim, mut redis) = (Sim::start().await, Redis::start().await);
    let gateway = |jobs: &str| {
        let mut options = on_redis(&redis, "replicas = 2", "timeout = \"200ms\"");
        options.shared_jobs = Some(jobs.to_owned());
        Gateway::ready_with(&sim, options)
    };
    let (serving, strict) = (gateway("").await, gateway("ready_requires_store = true").await);
    assert!(serving.metrics().await.contains("easemob_gateway_jobs_store_failing 0"));
    redis.kill().await;
    eventually(Duration::from_secs(15), "the jobs store to fail", || async {
        serving.readyz().await.json()["jobs_store"] == "failing"
    })
    .await;
    let ready = serving.readyz().await;
    assert_eq!((ready.status, &ready.json()["ready"]), (200, &serde_json::json!(true)), "{}", ready.text());
    assert!(serving.metrics().await.contains("easemob_gateway_jobs_store_failing 1"));
    // Direct calls work on this replica's share (the call that finds the quota's Redis gone may be refused: the
    // share opens once the calls Redis granted have gone out).
    eventually(Duration::from_secs(15), "a direct call to go through", || async {
        send(Method::POST, &clear_url(&serving, "dave"), &[], "").await.status == 200
    })
    .await;
    eventually(Duration::from_secs(15), "the strict replica to turn unready", || async {
        strict.readyz().await.status == 503
    })
    .await;
    redis.restart().await;
    eventually(Duration::from_secs(15), "the store to write again", || async {
        serving.readyz().await.json()["jobs_store"] == "ok" && strict.readyz().await.status == 200
    })
    .await;
    assert!(serving.metrics().await.contains("easemob_gateway_jobs_store_failing 0"));
}

/// Two replicas loaded through one Redis, which is killed (`kill -9`) and restarted (empty) under that load: neither
/// switch, to each replica's share and back to Redis, lets the replicas together put more than the route's limit
/// into any one-second window at the simulator (which counts Easemob's sliding windows: `over_limit`). Before the
/// switches were timed (`Phase`), 21 calls went over: the shared quota's reservations and the fresh shares together
/// after the loss, the shares' queued calls and Redis together after the return.
#[tokio::test]
async fn losing_and_regaining_redis_under_load_never_overspends_a_window() {
    const RATE: u64 = 20;
    let (sim, mut redis) = (Sim::start().await, Redis::start().await);
    // A low limit keeps the load light on a busy machine. The simulator allows one call more per replica: on a
    // loaded machine a call can reach it more than the gateway's 5 ms margin later than the next one (see
    // docs/quota.md, "A margin for the trip"), while the switches this test is about overspent by the dozen.
    sim.limits(serde_json::json!({ "route_per_second": RATE + 2 })).await;
    let quota = format!("replicas = 2\nroute = {{ rate = {RATE} }}");
    let gateways = [
        Gateway::ready_with(&sim, on_redis(&redis, &quota, "timeout = \"500ms\"")).await,
        Gateway::ready_with(&sim, on_redis(&redis, &quota, "timeout = \"500ms\"")).await,
    ];
    // Ten callers per replica, each sending as soon as its last call was answered: a second of quota queued.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = gateways
        .iter()
        .flat_map(|gw| std::iter::repeat_n(clear_url(gw, "dave"), 10))
        .map(|url| {
            let stop = std::sync::Arc::clone(&stop);
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if try_send(Method::POST, &url, &[], "").await.map_or(true, |a| a.status != 200) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = sim.business_requests().await;
    redis.kill().await;
    all_in_fallback(&gateways, 1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = sim.business_requests().await;
    redis.restart().await;
    all_in_fallback(&gateways, 0).await;
    // Past the return's settling (a probe interval, the Redis timeout and max_wait), on Redis alone again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for caller in callers {
        caller.await.unwrap();
    }
    let after = sim.business_requests().await;
    println!("calls to Easemob: {before} before the loss, {} while down, {} after", during - before, after - during);
    assert!(before > RATE && during > before && after > during + RATE, "the load used the quota in each phase");
    assert_eq!(sim.over_limit().await, 0, "no window held more than {RATE} calls and one per replica for the trip");
}

/// One user's five calls a minute taken through Redis by two replicas, then Redis killed: the replicas' shares
/// of the user's window must not add to what Redis counted in it, so the user waits for that window to pass.
#[tokio::test]
async fn after_losing_redis_the_shares_do_not_refill_a_users_window() {
    let (sim, mut redis) = (Sim::start().await, Redis::start().await);
    let gateways = [
        Gateway::ready_with(&sim, on_redis(&redis, "replicas = 2", "timeout = \"500ms\"")).await,
        Gateway::ready_with(&sim, on_redis(&redis, "replicas = 2", "timeout = \"500ms\"")).await,
    ];
    let body = serde_json::json!({"channel": "bob", "type": "chat", "delete_roam": false}).to_string();
    let urls = gateways.each_ref().map(|gw| gw.url("/users/alice/user_channel"));
    let call = |i: usize| send(Method::DELETE, &urls[i % 2], &[], &body);
    for i in 0..5 {
        assert_eq!(call(i).await.status, 200);
    }
    redis.kill().await;
    let _ = tokio::join!(call(0), call(1));
    all_in_fallback(&gateways, 1).await;
    // Past max_wait (1.5 s), when the shares open for the route: not for this user, whose window may be full.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..6 {
        let refused = call(i).await;
        assert!(refused.gateway_made(), "refused by the gateway, not sent for Easemob to refuse");
        refused.assert_error(429, "reach_limit");
        assert!(refused.header("ratelimit").unwrap().starts_with("\"user\";r=0"), "{:?}", refused.header("ratelimit"));
    }
    assert_eq!(sim.business_requests().await, 5);
    assert_eq!(sim.over_limit().await, 0);
}
