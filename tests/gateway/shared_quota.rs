//! One quota for several replicas through a real redis-server, and each replica's share while Redis is down.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::Method;

use crate::support::*;

const RATE: u64 = 40;
const BURST: u64 = 4;
const REPLICAS: u64 = 3;

async fn replicas(sim: &Sim, redis: &Redis) -> Vec<Gateway> {
    let extra = format!(
        "[rate_limit]\nbackend = \"redis\"\nmax_wait = \"0s\"\nroute = {{ rate = {RATE}, burst = {BURST} }}\n\
         [rate_limit.redis]\nurl = \"{}\"\ntimeout = \"100ms\"\nexpected_replicas = {REPLICAS}\n",
        redis.url()
    );
    let mut gateways = Vec::new();
    for _ in 0..REPLICAS {
        let gw = Gateway::ready_with(sim, GatewayOptions { extra: extra.clone(), ..Default::default() }).await;
        gateways.push(gw);
    }
    gateways
}

/// Callers hammering every replica until `stop`; counts answers by status.
struct Flood {
    stop: Arc<AtomicBool>,
    by_status: Arc<std::sync::Mutex<BTreeMap<u16, u64>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Flood {
    fn start(gateways: &[Gateway]) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let by_status = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let mut tasks = Vec::new();
        for gw in gateways {
            for _ in 0..4 {
                let (url, stop, by_status) =
                    (gw.url("/rest/message/roaming/user/dave/delete/all"), stop.clone(), by_status.clone());
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let a = send(Method::POST, &url, &[], "").await;
                        *by_status.lock().unwrap().entry(a.status).or_default() += 1;
                        // Bounded load: a refused caller backs off a little, as a real one would.
                        if a.status == 429 {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }));
            }
        }
        Flood { stop, by_status, tasks }
    }

    async fn stop(self) -> BTreeMap<u16, u64> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        self.by_status.lock().unwrap().clone()
    }
}

/// Arrivals per whole second at the simulator, leaving out the partial first and last seconds.
async fn full_seconds(sim: &Sim) -> Vec<u64> {
    let stats = sim.stats().await;
    let seconds: Vec<u64> = stats["by_second"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).collect();
    if seconds.len() <= 2 { Vec::new() } else { seconds[1..seconds.len() - 1].to_vec() }
}

#[tokio::test]
async fn three_replicas_share_one_quota() {
    let redis = Redis::start().await;
    let sim = Sim::start().await;
    let gateways = replicas(&sim, &redis).await;
    let flood = Flood::start(&gateways);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let answers = flood.stop().await;
    assert!(answers.keys().all(|s| *s == 200 || *s == 429), "only admitted or refused: {answers:?}");
    let seconds = full_seconds(&sim).await;
    eprintln!("arrivals per second: {seconds:?}, answers: {answers:?}");
    assert!(seconds.len() >= 2, "{seconds:?}");
    for arrivals in &seconds {
        // GCRA's bound per second is rate + burst; a couple more may land in a second from network jitter.
        assert!(*arrivals <= RATE + BURST + 2, "one second saw {arrivals}: {seconds:?}");
        assert!(*arrivals >= RATE / 2, "the shared quota was used, not starved: {seconds:?}");
    }
    for gw in &gateways {
        assert!(gw.metrics().await.contains("easemob_gateway_rate_limit_backend_fallback 0"));
    }
}

/// Waits until every replica's `rate_limit_backend_fallback` gauge reads `value`.
async fn all_in_fallback(gateways: &[Gateway], value: u8) {
    let line = format!("easemob_gateway_rate_limit_backend_fallback {value}");
    for gw in gateways {
        eventually(Duration::from_secs(15), &line, || async { gw.metrics().await.contains(&line) }).await;
    }
}

#[tokio::test]
async fn replicas_keep_answering_at_their_share_while_redis_is_down() {
    let mut redis = Redis::start().await;
    let sim = Sim::start().await;
    let gateways = replicas(&sim, &redis).await;
    let flood = Flood::start(&gateways);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    redis.kill().await;
    all_in_fallback(&gateways, 1).await;
    let before = sim.stats().await["business_requests"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = sim.stats().await["business_requests"].as_u64().unwrap() - before;
    // Each replica enforces rate / replicas (and burst / replicas, at least one) on its own.
    let share = RATE / REPLICAS + (BURST / REPLICAS).max(1);
    assert!(during > 0, "replicas kept admitting during the outage");
    assert!(during <= REPLICAS * share * 3 + REPLICAS * 2, "{during} calls in 3 s of outage");

    redis.restart().await;
    all_in_fallback(&gateways, 0).await;
    let before = sim.stats().await["business_requests"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = sim.stats().await["business_requests"].as_u64().unwrap() - before;
    let answers = flood.stop().await;
    eprintln!("outage: {during} in 3 s; after: {after} in 2 s; answers {answers:?}");
    assert!(answers.keys().all(|s| *s == 200 || *s == 429), "every request answered: {answers:?}");
    assert!(after <= 2 * RATE + BURST + 4, "the shared quota holds again: {after} in 2 s");
}

#[tokio::test]
async fn through_redis_callers_wait_in_turn_and_a_caller_that_hangs_up_gives_its_slot_back() {
    let redis = Redis::start().await;
    let sim = Sim::start().await;
    let extra = format!(
        "[rate_limit]\nbackend = \"redis\"\nmax_wait = \"5s\"\nroute = {{ rate = 1, burst = 1 }}\n\
         [rate_limit.redis]\nurl = \"{}\"\ntimeout = \"200ms\"\n",
        redis.url()
    );
    let gw = Gateway::ready_with(&sim, GatewayOptions { extra, ..Default::default() }).await;
    let url = gw.url("/rest/message/roaming/user/dave/delete/all");
    assert_eq!(send(Method::POST, &url, &[], "").await.status, 200);
    // The next slot is a second away: this caller reserves it in Redis, then hangs up after 200 ms.
    let quitter = tokio::time::timeout(Duration::from_millis(200), send(Method::POST, &url, &[], "")).await;
    assert!(quitter.is_err());
    // The gateway gives the slot back once it notices the hang-up; the next caller then gets that slot (about
    // 1 s after the first call, so about 0.5 s from now), not the one after it (2 s).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    assert_eq!(send(Method::POST, &url, &[], "").await.status, 200);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(150), "it did wait for the shared slot: {waited:?}");
    assert!(waited < Duration::from_millis(1200), "it took the released slot: {waited:?}");
    assert_eq!(sim.business_requests().await, 2, "the caller that hung up never reached Easemob");
}

#[tokio::test]
async fn through_redis_one_users_window_is_shared_by_every_replica() {
    let redis = Redis::start().await;
    let sim = Sim::start().await;
    let extra = format!(
        "[rate_limit]\nbackend = \"redis\"\n[rate_limit.redis]\nurl = \"{}\"\ntimeout = \"500ms\"\n",
        redis.url()
    );
    let (a, b) = (
        Gateway::ready_with(&sim, GatewayOptions { extra: extra.clone(), ..Default::default() }).await,
        Gateway::ready_with(&sim, GatewayOptions { extra, ..Default::default() }).await,
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
    let extra = format!(
        "[rate_limit]\nbackend = \"redis\"\n[rate_limit.redis]\nurl = \"{}\"\ntimeout = \"500ms\"\n",
        redis.url()
    );
    let gw = Gateway::ready_with(&sim, GatewayOptions { extra, ..Default::default() }).await;
    let url = gw.url("/rest/message/roaming/user/dave/delete/all");
    let calls: Vec<_> = (0..100)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { send(Method::POST, &url, &[], "").await.status })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), 200);
    }
    assert!(gw.metrics().await.contains("easemob_gateway_rate_limit_backend_fallback 0"), "decided in Redis");
    assert_eq!(sim.over_limit().await, 0);
}
