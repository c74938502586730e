//! A real Redis Cluster on 127.0.0.1 for the tests: three masters, each with one replica, on ports the OS chose
//! (`redis-server --cluster-enabled yes`, then `redis-cli --cluster create`), optionally TLS only with a password
//! as managed services run it, and a master killed with `kill -9`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::support::eventually;

/// Masters, each with one replica.
const MASTERS: usize = 3;
/// How long a node may be silent before the others call it failed and its replica takes over: short for a quick
/// test, long enough that a busy machine's pauses do not look like failures.
const NODE_TIMEOUT_MS: &str = "3000";

pub struct RedisCluster {
    nodes: Vec<Node>,
    /// TLS only (clients, the cluster bus and replication), with this certificate and key (PEM files) and a
    /// password.
    tls: Option<Tls>,
    _dir: tempfile::TempDir,
}

pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub password: String,
}

struct Node {
    port: u16,
    child: Option<Child>,
}

impl Node {
    /// A node on two ports the OS chose (clients, cluster bus), answering; started again on new ones if another
    /// process took one of them between the choice and the start.
    async fn start(dir: &Path, tls: Option<&Tls>) -> Node {
        for _ in 0..5 {
            // Both bound before either is let go, so that they differ.
            let listeners = [0, 1].map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
            let [port, bus] = listeners.map(|l| l.local_addr().unwrap().port());
            let mut child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--cluster-port", &bus.to_string()])
                .args(listen_flags(port, tls))
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", NODE_TIMEOUT_MS])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf"), "--dir", dir.to_str().unwrap()])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("redis-server is installed (tests/run installs it)");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while child.try_wait().unwrap().is_none() && tokio::time::Instant::now() < deadline {
                if cli(tls, port, &["PING"]).await.starts_with("PONG") {
                    return Node { port, child: Some(child) };
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("no redis-server of the cluster would start");
    }
}

/// `redis-cli`, with the cluster's TLS settings and password.
fn redis_cli(tls: Option<&Tls>) -> Command {
    let mut command = Command::new("redis-cli");
    if let Some(tls) = tls {
        command.args(["--tls", "--cacert", tls.cert.to_str().unwrap(), "--no-auth-warning", "-a", &tls.password]);
    }
    command.stdin(Stdio::null());
    command
}

/// `redis-cli -p <port> <args>`'s answer, empty if it could not get one.
async fn cli(tls: Option<&Tls>, port: u16, args: &[&str]) -> String {
    let output = redis_cli(tls)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .await
        .expect("redis-cli is installed (tests/run installs it)");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl RedisCluster {
    /// Six nodes made one cluster, waited on until every slot is served and every replica is in sync.
    pub async fn start() -> RedisCluster {
        RedisCluster::start_with(None).await
    }

    /// A cluster as managed services run one: TLS only, and a password.
    pub async fn start_tls(tls: Tls) -> RedisCluster {
        RedisCluster::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<Tls>) -> RedisCluster {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for _ in 0..2 * MASTERS {
            nodes.push(Node::start(dir.path(), tls.as_ref()).await);
        }
        let addresses: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let created = redis_cli(tls.as_ref())
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .await
            .unwrap();
        assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stdout));
        let cluster = RedisCluster { nodes, tls, _dir: dir };
        cluster.wait_settled().await;
        cluster
    }

    /// A seed node's URL: the gateway finds the others from it.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.nodes[0].port)
    }

    async fn cli(&self, port: u16, args: &[&str]) -> String {
        cli(self.tls.as_ref(), port, args).await
    }

    /// Waits until every live node sees every slot served and every replica is in sync with its master.
    async fn wait_settled(&self) {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            eventually(Duration::from_secs(60), "the cluster to serve every slot, replicas in sync", || async {
                let info = self.cli(node.port, &["CLUSTER", "INFO"]).await;
                let replication = self.cli(node.port, &["INFO", "replication"]).await;
                info.contains("cluster_state:ok")
                    && (replication.contains("master_link_status:up")
                        || replication.contains("role:master") && !replication.contains("connected_slaves:0"))
            })
            .await;
        }
    }

    /// The port of the master serving `key`'s slot, as a live node sees it: none while no node does.
    pub async fn master_of(&self, key: &str) -> Option<u16> {
        let live = self.nodes.iter().find(|n| n.child.is_some())?.port;
        let slot: u16 = self.cli(live, &["CLUSTER", "KEYSLOT", key]).await.trim().parse().ok()?;
        let nodes = self.cli(live, &["CLUSTER", "NODES"]).await;
        nodes
            .lines()
            .map(|line| line.split(' ').collect::<Vec<_>>())
            .filter(|f| f.len() > 8 && f[2].contains("master") && !f[2].contains("fail"))
            .find(|f| f[8..].iter().any(|range| serves(range, slot)))
            .and_then(|f| f[1].split(['@', ':']).nth(1)?.parse().ok())
    }

    /// Kills the master of `key`'s slot with SIGKILL (`kill -9`): no goodbye to its replica or clients.
    pub async fn kill_master_of(&mut self, key: &str) -> u16 {
        let port = self.master_of(key).await.expect("a master serves the key");
        let node = self.nodes.iter_mut().find(|n| n.port == port).unwrap();
        node.child.take().unwrap().kill().await.unwrap();
        port
    }

    /// Waits until `key`'s slot is served again, by a master other than `killed`.
    pub async fn wait_failed_over(&self, key: &str, killed: u16) {
        eventually(Duration::from_secs(60), "a replica to take over the killed master's slots", || async {
            self.master_of(key).await.is_some_and(|port| port != killed)
        })
        .await;
    }
}

/// How a node listens: on `port`, or TLS only on it (clients, the cluster bus and replication) with a password.
fn listen_flags(port: u16, tls: Option<&Tls>) -> Vec<String> {
    let port = port.to_string();
    let flags = match tls {
        None => vec!["--port", &port],
        Some(tls) => {
            let (cert, key, password) = (tls.cert.to_str().unwrap(), tls.key.to_str().unwrap(), tls.password.as_str());
            #[rustfmt::skip]
            let flags = vec![
                "--port", "0", "--tls-port", &port, "--tls-cluster", "yes", "--tls-replication", "yes",
                "--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file", cert, "--tls-auth-clients", "no",
                "--requirepass", password, "--masterauth", password,
            ];
            flags
        }
    };
    flags.into_iter().map(str::to_owned).collect()
}

/// Whether a `CLUSTER NODES` slot field (`5461-10922`, or one slot) holds `slot`.
fn serves(range: &str, slot: u16) -> bool {
    let mut ends = range.split('-').map(|n| n.parse::<u16>());
    match (ends.next(), ends.next()) {
        (Some(Ok(start)), Some(Ok(end))) => (start..=end).contains(&slot),
        (Some(Ok(only)), None) => only == slot,
        _ => false,
    }
}
