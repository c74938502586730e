//! Test harness: the real binary, started as separate processes (the simulator and the gateway) on
//! 127.0.0.1:0, talked to over real HTTP.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

// The simulator's demo world, under the short names the tests use.
pub use easemob_gateway::sim::state::{
    DEMO_APP as APP, DEMO_APP_2 as APP2, DEMO_CLIENT_ID as CLIENT_ID, DEMO_CLIENT_SECRET as CLIENT_SECRET,
    DEMO_GROUP as GROUP, DEMO_ORG as ORG,
};

const BIN: &str = env!("CARGO_BIN_EXE_easemob-gateway");

/// Starts `command` and returns it with its first stdout line (the "listening …" line).
async fn spawn(command: &mut Command) -> (Child, String) {
    let mut child =
        command.env("NO_COLOR", "1").stdout(Stdio::piped()).kill_on_drop(true).spawn().expect("binary starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("process prints its listening line in time")
        .expect("stdout readable")
        .unwrap_or_else(|| panic!("{command:?} exited before listening"));
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, line)
}

fn field(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|part| part.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .to_owned()
}

/// The Easemob simulator, as its own process.
pub struct Sim {
    _child: Child,
    pub url: String,
}

impl Sim {
    pub async fn start() -> Sim {
        Sim::start_with(&[]).await
    }

    /// With extra `sim` flags, e.g. `--tls-cert`.
    pub async fn start_with(flags: &[&str]) -> Sim {
        let mut command = Command::new(BIN);
        command.args(["sim", "--listen", "127.0.0.1:0"]).args(flags).stderr(Stdio::null());
        let (child, line) = spawn(&mut command).await;
        Sim { _child: child, url: field(&line, "sim") }
    }

    pub async fn stats(&self) -> Value {
        send(Method::GET, &format!("{}/_sim/stats", self.url), &[], "").await.json()
    }

    pub async fn business_requests(&self) -> u64 {
        self.stats().await["business_requests"].as_u64().unwrap()
    }

    pub async fn token_requests(&self) -> u64 {
        self.stats().await["token_requests"].as_u64().unwrap()
    }

    pub async fn requests(&self) -> Vec<Value> {
        send(Method::GET, &format!("{}/_sim/requests", self.url), &[], "").await.json().as_array().unwrap().clone()
    }

    /// Every App Token the simulator received in `Authorization`, in the order of its recorded requests.
    pub async fn tokens(&self) -> Vec<String> {
        self.requests()
            .await
            .iter()
            .flat_map(|r| r["headers"].as_array().unwrap().clone())
            .filter(|h| h[0] == "authorization")
            .map(|h| h[1].as_str().unwrap().trim_start_matches("Bearer ").to_owned())
            .collect()
    }

    /// Every business request received, as `METHOD path?query`, with how many times.
    pub async fn received(&self) -> serde_json::Map<String, Value> {
        send(Method::GET, &format!("{}/_sim/received", self.url), &[], "").await.json().as_object().unwrap().clone()
    }

    /// How many times each of `users`' `clear_user_messages` in the demo app reached the simulator.
    pub async fn clears_received(&self, users: &[String]) -> Vec<u64> {
        let received = self.received().await;
        users
            .iter()
            .map(|u| received.get(&format!("POST /{ORG}/{APP}/rest/message/roaming/user/{u}/delete/all")))
            .map(|count| count.and_then(|c| c.as_u64()).unwrap_or(0))
            .collect()
    }

    pub async fn faults(&self, faults: Value) {
        let a = send(Method::PUT, &format!("{}/_sim/faults", self.url), &[], &faults.to_string()).await;
        assert_eq!(a.status, 200, "{}", a.text());
    }

    /// Replaces the simulator's rate limits (`GET /_sim/limits` shows the shape; absent fields take defaults).
    pub async fn limits(&self, limits: Value) {
        let a = send(Method::PUT, &format!("{}/_sim/limits", self.url), &[], &limits.to_string()).await;
        assert_eq!(a.status, 200, "{}", a.text());
    }

    /// Calls the simulator refused as over Easemob's limits: anything but 0 means a gateway let too much through.
    pub async fn over_limit(&self) -> u64 {
        self.stats().await["over_limit"].as_u64().unwrap()
    }

    /// Registers users in the demo app, so calls for them are not answered 404.
    pub async fn add_users(&self, users: &[String]) {
        let url = format!("{}/_sim/apps/{ORG}/{APP}/users", self.url);
        let a = send(Method::POST, &url, &[], &serde_json::json!({ "users": users }).to_string()).await;
        assert_eq!(a.status, 200, "{}", a.text());
    }

    pub async fn expire_tokens(&self) {
        send(Method::POST, &format!("{}/_sim/expire-tokens", self.url), &[], "").await;
    }

    /// The message IDs `user` still sees in conversation `id` (empty when the conversation is gone).
    pub async fn messages(&self, app: &str, user: &str, id: &str) -> Vec<String> {
        self.conversation(app, user, id)
            .await
            .map(|c| c["messages"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    }

    pub async fn conversation(&self, app: &str, user: &str, id: &str) -> Option<Value> {
        let url = format!("{}/_sim/apps/{ORG}/{app}/users/{user}", self.url);
        let view = send(Method::GET, &url, &[], "").await.json();
        view["conversations"].as_array().unwrap().iter().find(|c| c["id"] == id).cloned()
    }
}

/// A real redis-server on a free loopback port, with nothing persisted.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    /// TLS only, with this certificate and key (PEM files) and a password (`requirepass`).
    tls: Option<(PathBuf, PathBuf, String)>,
}

impl Redis {
    pub async fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut redis = Redis { child: None, port, tls: None };
        redis.restart().await;
        redis
    }

    /// A managed Redis as cloud providers run it: TLS only (`cert` and `key`, PEM) and a password.
    pub async fn start_tls(cert: PathBuf, key: PathBuf, password: &str) -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut redis = Redis { child: None, port, tls: Some((cert, key, password.to_owned())) };
        redis.restart().await;
        redis
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Starts redis-server (again) on the same port and waits until it answers (PING, or a TLS connection).
    pub async fn restart(&mut self) {
        let port = self.port.to_string();
        let mut args = vec!["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"];
        match &self.tls {
            None => args.extend(["--port", &port]),
            Some((cert, key, password)) => args.extend([
                "--port",
                "0",
                "--tls-port",
                &port,
                "--tls-cert-file",
                cert.to_str().unwrap(),
                "--tls-key-file",
                key.to_str().unwrap(),
                "--tls-ca-cert-file",
                cert.to_str().unwrap(),
                "--tls-auth-clients",
                "no",
                "--requirepass",
                password,
            ]),
        }
        let child = Command::new("redis-server")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is installed (tests/run installs it)");
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        let tls = self.tls.is_some();
        eventually(Duration::from_secs(20), "redis-server to answer", || async {
            match tls {
                false => raw(&addr, b"PING\r\n", Duration::from_millis(200)).await.starts_with("+PONG"),
                true => tokio::net::TcpStream::connect(&addr).await.is_ok(),
            }
        })
        .await;
    }

    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }
}

/// What a client of a managed Redis holds, in files: a self-signed certificate for 127.0.0.1 (the CA to trust),
/// its key (for the server), and a password.
pub struct RedisSecrets {
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub password: PathBuf,
}

impl RedisSecrets {
    pub fn new(password: &str) -> RedisSecrets {
        let dir = tempfile::tempdir().unwrap();
        let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
        let password_file = dir.path().join("password");
        std::fs::write(&password_file, format!("{password}\n")).unwrap();
        RedisSecrets { dir, cert, key, password: password_file }
    }
}

/// A gateway process with a config written for the test.
pub struct Gateway {
    _child: Child,
    pub data: String,
    pub admin: String,
    pub dir: tempfile::TempDir,
    /// The process's environment besides the test's own: `RUST_LOG` and [`GatewayOptions::env`].
    env: Vec<(String, String)>,
}

#[derive(Default)]
pub struct GatewayOptions {
    /// TOML appended to the generated config right after the `[upstream]` keys: bare keys land in `[upstream]`,
    /// later sections (such as `[token]`) start their own.
    pub extra: String,
    /// Lines added to `[server]`.
    pub server: String,
    /// `RUST_LOG` for the gateway (default `easemob_gateway=debug`).
    pub rust_log: Option<String>,
    /// More environment variables for the gateway.
    pub env: Vec<(String, String)>,
    /// Configure `demo2` as well as `demo`.
    pub two_apps: bool,
    /// Deletion jobs on, with a store in the gateway's directory (kept across [`Gateway::kill_and_restart`]) and
    /// these lines added to `[jobs]`.
    pub jobs: Option<String>,
    /// Deletion jobs on, kept in the Redis of `rate_limit.redis` (set it in `extra`), these lines added to `[jobs]`.
    pub shared_jobs: Option<String>,
}

impl Gateway {
    /// A gateway in front of `sim`, waited on until `/readyz` says every app has a token.
    pub async fn ready(sim: &Sim) -> Gateway {
        Gateway::ready_with(sim, GatewayOptions::default()).await
    }

    /// A gateway with `options`, waited on until `/readyz` says every app has a token.
    pub async fn ready_with(sim: &Sim, options: GatewayOptions) -> Gateway {
        let gw = Gateway::start(sim, options).await;
        gw.wait_ready().await;
        gw
    }

    pub async fn start(sim: &Sim, options: GatewayOptions) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, format!("{CLIENT_SECRET}\n")).unwrap();
        let app = |name: &str| {
            format!(
                "[[apps]]\norg_name = \"{ORG}\"\napp_name = \"{name}\"\nclient_id = \"{CLIENT_ID}\"\n\
                 client_secret_file = \"{}\"\n",
                secret.display()
            )
        };
        let mut apps = app(APP);
        if options.two_apps {
            apps.push_str(&app(APP2));
        }
        if let Some(jobs) = &options.jobs {
            let store = dir.path().join("jobs.db");
            apps.insert_str(0, &format!("[jobs]\nenabled = true\nstore = \"{}\"\n{jobs}\n\n", store.display()));
        }
        if let Some(jobs) = &options.shared_jobs {
            apps.insert_str(0, &format!("[jobs]\nenabled = true\n{jobs}\n\n"));
        }
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n{}\n\
             [upstream]\nbase_url = \"{}\"\nconnect_timeout = \"1s\"\ntimeout = \"3s\"\n\n{}\n{apps}",
            options.server, sim.url, options.extra
        );
        std::fs::write(dir.path().join("gateway.toml"), config).unwrap();
        let rust_log = options.rust_log.unwrap_or_else(|| "easemob_gateway=debug".to_owned());
        let mut env = vec![("RUST_LOG".to_owned(), rust_log)];
        env.extend(options.env);
        let (child, line) = Gateway::spawn(&dir, &env).await;
        Gateway { _child: child, data: field(&line, "data"), admin: field(&line, "admin"), dir, env }
    }

    async fn spawn(dir: &tempfile::TempDir, env: &[(String, String)]) -> (Child, String) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.path().join("gateway.log")).unwrap();
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--config", dir.path().join("gateway.toml").to_str().unwrap()])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stderr(Stdio::from(log));
        spawn(&mut command).await
    }

    /// `kill -9`, and the gateway stays down.
    pub async fn kill(&mut self) {
        self._child.kill().await.unwrap();
    }

    /// `kill -9`, then the same gateway (config, store, secret) started again, on new ports.
    pub async fn kill_and_restart(&mut self) {
        self._child.kill().await.unwrap();
        let (child, line) = Gateway::spawn(&self.dir, &self.env).await;
        (self._child, self.data, self.admin) = (child, field(&line, "data"), field(&line, "admin"));
        self.wait_ready().await;
    }

    /// Polls `/readyz` (no sleeps on a timer alone): every app holds a token.
    pub async fn wait_ready(&self) {
        eventually(Duration::from_secs(30), "a ready gateway", || async { self.readyz().await.status == 200 }).await;
    }

    pub async fn readyz(&self) -> Answer {
        send(Method::GET, &format!("{}/readyz", self.admin), &[], "").await
    }

    pub async fn metrics(&self) -> String {
        send(Method::GET, &format!("{}/metrics", self.admin), &[], "").await.text()
    }

    /// `{data}/{org}/{app}{tail}`
    pub fn url(&self, tail: &str) -> String {
        format!("{}/{ORG}/{APP}{tail}", self.data)
    }

    /// Sends SIGTERM, as Kubernetes does on a rolling restart.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends a signal by name (`TERM`, `HUP`).
    pub fn signal(&self, name: &str) {
        let pid = self._child.id().expect("gateway still running");
        let status = std::process::Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// The file the gateway reads its client secret from.
    pub fn secret_file(&self) -> PathBuf {
        self.dir.path().join("secret")
    }

    /// Rotates the demo app's client secret as Kubernetes does: Easemob (`sim`) now wants `secret`, and the mounted
    /// file holds it; nobody tells the gateway.
    pub async fn rotate_secret(&self, sim: &Sim, secret: &str) {
        let url = format!("{}/_sim/apps/{ORG}/{APP}/secret", sim.url);
        let body = serde_json::json!({ "client_secret": secret }).to_string();
        assert_eq!(send(Method::PUT, &url, &[], &body).await.status, 200);
        std::fs::write(self.secret_file(), format!("{secret}\n")).unwrap();
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn exit_code(&mut self) -> Option<i32> {
        tokio::time::timeout(Duration::from_secs(30), self._child.wait()).await.expect("exits in time").unwrap().code()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }
}

/// Polls `check` every 50 ms until it holds, for at most `limit`.
/// `n` POSTs to `url` at once (each on its own connection); their answers.
pub async fn burst(url: &str, n: usize) -> Vec<Answer> {
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let url = url.to_owned();
            tokio::spawn(async move { send(Method::POST, &url, &[], "").await })
        })
        .collect();
    let mut answers = Vec::new();
    for h in handles {
        answers.push(h.await.unwrap());
    }
    answers
}

/// `clear_user_messages` for `user`: the simplest of the six routes, the tests' usual call.
pub fn clear_url(gw: &Gateway, user: &str) -> String {
    gw.url(&format!("/rest/message/roaming/user/{user}/delete/all"))
}

/// `per_replica` calls to each replica, all at once; returns how many were admitted and how long it took.
pub async fn burst_all(gateways: &[Gateway], per_replica: usize) -> (usize, Duration) {
    let started = std::time::Instant::now();
    let calls: Vec<_> = gateways
        .iter()
        .flat_map(|gw| std::iter::repeat_n(clear_url(gw, "dave"), per_replica))
        .map(|url| tokio::spawn(async move { send(Method::POST, &url, &[], "").await.status }))
        .collect();
    let mut admitted = 0;
    for call in calls {
        match call.await.unwrap() {
            200 => admitted += 1,
            status => assert_eq!(status, 429, "only admitted or refused"),
        }
    }
    (admitted, started.elapsed())
}

pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An answer, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Made by the gateway itself (not passed through from Easemob).
    pub fn gateway_made(&self) -> bool {
        self.headers.contains_key("x-easemob-gateway")
    }

    /// Asserts Easemob's error envelope with this status and `error` type; returns the description.
    #[track_caller]
    pub fn assert_error(&self, status: u16, error: &str) -> String {
        assert_eq!(self.status, status, "{}", self.text());
        let v = self.json();
        assert_eq!(v["error"], error, "{}", self.text());
        for key in ["exception", "timestamp", "duration", "error_description"] {
            assert!(v.get(key).is_some(), "envelope lacks {key}: {}", self.text());
        }
        v["error_description"].as_str().unwrap().to_owned()
    }
}

pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    try_send(method, url, headers, body).await.unwrap_or_else(|e| panic!("request to {url} failed: {e}"))
}

/// Like [`send`], but a failed connection is an error instead of a panic (for servers still starting).
pub async fn try_send(method: Method, url: &str, headers: &[(&str, &str)], body: &str) -> Result<Answer, String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = request.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .map_err(|_| "no answer within 30 s".to_owned())?
        .map_err(|e| format!("{e:?}"))?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| format!("{e:?}"))?.to_bytes();
    Ok(Answer { status: parts.status.as_u16(), headers: parts.headers, body })
}

/// Writes `request` as raw bytes to `addr` (`http://host:port`) and reads until the server closes or `wait` passes.
/// An empty answer when nothing listens there.
pub async fn raw(addr: &str, request: &[u8], wait: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr.trim_start_matches("http://")).await else {
        return String::new();
    };
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Like [`raw`], for a connection the gateway must close itself: what it sent before closing, or `None` if it
/// still held the connection open after `wait`.
pub async fn raw_until_closed(addr: &str, request: &[u8], wait: Duration) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr.trim_start_matches("http://")).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    match tokio::time::timeout(wait, stream.read_to_end(&mut out)).await {
        Ok(_) => Some(String::from_utf8_lossy(&out).into_owned()),
        Err(_) => None,
    }
}

pub async fn delete(url: &str) -> Answer {
    send(Method::DELETE, url, &[], "").await
}

/// The sum of every series in the gateway's exposition `metrics` whose line starts with `prefix` (one series, or
/// every series of a family); 0 if there is none.
pub fn metric(metrics: &str, prefix: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap_or_else(|e| panic!("{l}: {e}")))
        .sum()
}

/// A `clear_user_messages` operation of a deletion job.
pub fn clear_op(user: &str) -> Value {
    serde_json::json!({"method": "POST", "path": format!("/rest/message/roaming/user/{user}/delete/all")})
}

/// Reads the job at `location` (through `gw`) until it has finished, for at most `limit`.
pub async fn finished(gw: &Gateway, limit: Duration, location: &str) -> Value {
    let url = format!("{}{location}", gw.data);
    let job = std::sync::Mutex::new(Value::Null);
    eventually(limit, "the job to finish", || async {
        let read = send(Method::GET, &url, &[], "").await.json();
        let done = !read["finished_ms"].is_null();
        *job.lock().unwrap() = read;
        done
    })
    .await;
    job.into_inner().unwrap()
}
