//! The shared quota and the jobs on a real Redis Cluster (three masters, a replica each), and a master killed with
//! `kill -9` while a job runs: its replica takes over, and each replica's share holds the quota meanwhile.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::Method;

use crate::redis_cluster::{RedisCluster, Tls};
use crate::support::*;

/// A gateway whose quota (`quota` goes into `[rate_limit]`) is shared through `cluster`.
fn on_cluster(cluster: &RedisCluster, quota: &str) -> GatewayOptions {
    let extra = format!(
        "[rate_limit]\nbackend = \"redis\"\n{quota}\n[rate_limit.redis]\nurl = \"{}\"\ncluster = true\n\
         timeout = \"500ms\"\n",
        cluster.url()
    );
    GatewayOptions { extra, ..Default::default() }
}

/// On a cluster as managed services run one, TLS only with a password (read from a file, never shown).
#[tokio::test]
async fn two_gateways_share_one_quota_through_a_redis_cluster_with_tls_and_a_password() {
    const PASSWORD: &str = "cluster-pw-7e1d";
    let RedisSecrets { dir: _dir, cert, key, password } = RedisSecrets::new(PASSWORD);
    let tls = Tls { cert: cert.clone(), key, password: PASSWORD.to_owned() };
    let (sim, cluster) = (Sim::start().await, RedisCluster::start_tls(tls).await);
    assert!(cluster.url().starts_with("rediss://"));
    let quota = "replicas = 2\nmax_wait = \"0s\"\nroute = { rate = 1, burst = 6 }";
    let options = || {
        let mut options = on_cluster(&cluster, quota);
        options.extra += &format!("password_file = \"{}\"\nca_file = \"{}\"\n", password.display(), cert.display());
        options
    };
    let gateways = [Gateway::ready_with(&sim, options()).await, Gateway::ready_with(&sim, options()).await];
    let (admitted, took) = burst_all(&gateways, 6).await;
    // One quota of 6 at once (plus a refill a second), not 6 per gateway.
    let bound = 6 + took.as_secs() as usize + 1;
    assert!((6..=bound).contains(&admitted), "{admitted} of 12 admitted in {took:?}");
    assert_eq!(sim.business_requests().await as usize, admitted);
    for gw in &gateways {
        assert!(gw.metrics().await.contains("easemob_gateway_rate_limit_backend_fallback 0"), "on the cluster");
        assert!(!gw.log().contains(PASSWORD), "no password in the log");
    }
}

#[tokio::test]
async fn a_job_runs_to_its_end_while_its_apps_master_is_killed_and_a_replica_takes_over() {
    const OPERATIONS: usize = 150;
    const RATE: u64 = 20;
    const CONCURRENCY: usize = 8;
    let (sim, mut cluster) = (Sim::start().await, RedisCluster::start().await);
    let users: Vec<String> = (0..OPERATIONS).map(|i| format!("user{i}")).collect();
    sim.add_users(&users).await;
    // One call more per gateway than the quota: on a loaded machine a call can reach the simulator later than the
    // gateway's margin for the trip (see shared_quota.rs), which is not what this test is about.
    sim.limits(serde_json::json!({ "route_per_second": RATE + 2 })).await;
    let quota = format!("replicas = 2\nroute = {{ rate = {RATE} }}");
    let mut gateways = Vec::new();
    for _ in 0..2 {
        let mut options = on_cluster(&cluster, &quota);
        options.shared_jobs = Some(format!("concurrency = {CONCURRENCY}\nlease = \"20s\""));
        gateways.push(Gateway::ready_with(&sim, options).await);
    }
    // Direct calls beside the job, light enough to leave it most of the quota (they go first): they find the
    // cluster failing over, and take each gateway's share meanwhile.
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = gateways
        .iter()
        .map(|gw| {
            let (url, stop) = (clear_url(gw, "dave"), Arc::clone(&stop));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let _ = try_send(Method::POST, &url, &[], "").await;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
        })
        .collect();

    let operations: Vec<serde_json::Value> = users.iter().map(|u| clear_op(u)).collect();
    let body = serde_json::json!({ "operations": operations }).to_string();
    let created = send(Method::POST, &gateways[0].url("/_gateway/jobs"), &[], &body).await;
    assert_eq!(created.status, 202, "{}", created.text());
    let location = created.header("location").unwrap().to_owned();
    let job_url = format!("{}{location}", gateways[0].data);
    eventually(Duration::from_secs(60), "the job under way", || async {
        send(Method::GET, &job_url, &[], "").await.json()["counts"]["succeeded"].as_u64() >= Some(20)
    })
    .await;

    // The master of the app's slot, which holds its quota and its jobs alike.
    let slot_key = format!("easemob-gateway:{{{ORG}#{APP}}}:jobs:states");
    let killed = cluster.kill_master_of(&slot_key).await;
    eventually(Duration::from_secs(30), "a gateway on its own share while the cluster fails over", || async {
        let mut any = false;
        for gw in &gateways {
            any |= gw.metrics().await.contains("easemob_gateway_rate_limit_backend_fallback 1");
        }
        any
    })
    .await;
    cluster.wait_failed_over(&slot_key, killed).await;

    let job = finished(&gateways[1], Duration::from_secs(120), &location).await;
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        caller.await.unwrap();
    }
    assert_eq!(job["state"], "done", "{}", job["counts"]);
    assert_eq!(job["counts"]["succeeded"], OPERATIONS, "each operation recorded once: {}", job["counts"]);
    let sent = sim.clears_received(&users).await;
    assert!(sent.iter().all(|n| *n >= 1), "every operation reached Easemob: {sent:?}");
    // At least once: what was in flight, or claimed in a write the replica had not yet received, may go again.
    let again: u64 = sent.iter().map(|n| n - 1).sum();
    println!("{OPERATIONS} operations, the master of port {killed} killed: {again} sent twice");
    assert!(again <= (2 * 2 * CONCURRENCY) as u64, "only what the gateways held at the kill may go twice: {again}");
    assert_eq!(sim.over_limit().await, 0, "the gateways kept to the quota, shared or each on its share");
    for gw in &gateways {
        eventually(Duration::from_secs(30), "back on the shared quota", || async {
            let _ = try_send(Method::POST, &clear_url(gw, "dave"), &[], "").await;
            gw.metrics().await.contains("easemob_gateway_rate_limit_backend_fallback 0")
        })
        .await;
    }
}
