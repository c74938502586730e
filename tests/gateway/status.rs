//! The admin port's status page in a real browser: Debian's chromium, headless, driven by chromedriver over the W3C
//! WebDriver protocol (both installed by tests/run). The page must load, show what `/metrics` shows, and update
//! itself after calls are made; a screenshot is kept as the test's artefact.

use std::process::Stdio;
use std::time::Duration;

use http::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::*;

/// Where the screenshot is kept, in cargo's target directory (docs/operations.md shows a copy of it).
const SCREENSHOT: &str = concat!(env!("CARGO_TARGET_TMPDIR"), "/status-page.png");

/// A headless chromium session, through a chromedriver of its own on a port the OS chose.
struct Browser {
    _driver: Child,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let missing =
            |tool: &str| format!("{tool} is needed for the status page's browser test (tests/run installs it)");
        let mut driver = Command::new("chromedriver")
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", missing("chromedriver")));
        let mut lines = BufReader::new(driver.stdout.take().unwrap()).lines();
        let port = loop {
            let line = lines.next_line().await.unwrap().expect("chromedriver says its port");
            if let Some(port) = line.strip_prefix("ChromeDriver was started successfully on port ") {
                break port.trim_end_matches('.').to_owned();
            }
        };
        let driver_url = format!("http://127.0.0.1:{port}");
        let profile = tempfile::tempdir().unwrap();
        // The flags a sandboxed, offline machine needs (see the environment notes): no sandbox as root, no GPU, and
        // no background connections, which this machine's closed network would refuse.
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,1100",
            &format!("--user-data-dir={}", profile.path().display()),
        ];
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args},
        }}});
        let created = send(Method::POST, &format!("{driver_url}/session"), &[], &capabilities.to_string()).await;
        let session = created.json()["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: {}", missing("chromium"), created.text()))
            .to_owned();
        Browser { _driver: driver, session: format!("{driver_url}/session/{session}"), _profile: profile }
    }

    async fn command(&self, method: Method, tail: &str, body: Value) -> Value {
        let body = if body.is_null() { String::new() } else { body.to_string() };
        let answer = send(method, &format!("{}/{tail}", self.session), &[], &body).await;
        assert_eq!(answer.status, 200, "webdriver {tail}: {}", answer.text());
        answer.json()["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.command(Method::POST, "url", json!({ "url": url })).await;
    }

    /// Runs `script` in the page and returns what it returns.
    async fn eval(&self, script: &str) -> Value {
        self.command(Method::POST, "execute/sync", json!({ "script": script, "args": [] })).await
    }

    /// The text of the first element matching `selector`, or null.
    async fn text(&self, selector: &str) -> Value {
        self.eval(&format!("const e = document.querySelector({}); return e ? e.textContent : null;", json!(selector)))
            .await
    }

    async fn screenshot(&self, path: &str) {
        use base64::Engine;
        let png = self.command(Method::GET, "screenshot", Value::Null).await;
        let png = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}

/// The text the page shows for `app`'s `route` in the cell of class `cell`.
fn cell(route: &str, cell: &str) -> String {
    format!("[data-app='{ORG}#{APP}'] tr[data-route='{route}'] .{cell}")
}

/// The sum of a family's series for one route, whatever their other labels.
fn of_route(metrics: &str, family: &str, route: &str) -> u64 {
    let lines = metrics.lines().filter(|l| l.starts_with(&format!("easemob_gateway_{family}{{")));
    lines.filter(|l| l.contains(&format!("route=\"{route}\""))).map(|l| metric(l, l)).sum()
}

#[tokio::test]
async fn the_status_page_shows_what_metrics_shows_and_updates_itself() {
    let sim = Sim::start().await;
    sim.add_users(&["ann".to_owned()]).await;
    let gw = Gateway::ready_with(&sim, GatewayOptions { jobs: Some(String::new()), ..Default::default() }).await;
    let browser = Browser::start().await;
    browser.open(&format!("{}/", gw.admin)).await;
    eventually(Duration::from_secs(30), "the page's first render", || async {
        browser.text(".token-state").await == json!("valid")
    })
    .await;
    assert_eq!(browser.text(&cell("delete_chat_messages", "sent-total")).await, json!("0"));

    // Calls made after the page loaded: it shows them without being reloaded.
    let chat = format!("/rest/message/roaming/chat/user/ann?userId=bob&msgIdList={}", 1_100_000_000_000_000_001u64);
    for _ in 0..3 {
        assert_eq!(send(Method::DELETE, &gw.url(&chat), &[], "").await.status, 200);
    }
    let wrong = "/rest/message/roaming/group/user/ann/time?groupId=172839405612345&delTime=1659014868";
    send(Method::DELETE, &gw.url(wrong), &[], "").await.assert_error(400, "illegal_argument");
    let conversations: Vec<Value> = (0..8)
        .map(|p| {
            json!({"method": "DELETE", "path": "/users/ann/user_channel",
                        "body": {"channel": format!("p{p}"), "type": "chat", "delete_roam": true}})
        })
        .collect();
    let created =
        send(Method::POST, &gw.url("/_gateway/jobs"), &[], &json!({ "operations": conversations }).to_string()).await;
    assert_eq!(created.status, 202, "{}", created.text());
    let job = created.json()["id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(30), "the page to show the calls", || async {
        browser.text(&cell("delete_chat_messages", "sent-total")).await == json!("3")
    })
    .await;

    let metrics = gw.metrics().await;
    assert_eq!(of_route(&metrics, "upstream_requests_total", "delete_chat_messages"), 3);
    let refused = browser.text(&cell("clear_group_messages_before", "refused")).await;
    assert_eq!(of_route(&metrics, "rejected_total", "clear_group_messages_before"), 1);
    assert_eq!(refused, json!("invalid 1"), "the refusals of the last minute");
    // The job runs at the per-user limit (5 a minute): it is in progress, with a link to its JSON.
    eventually(Duration::from_secs(30), "the page to show the job", || async {
        browser
            .eval("return [...document.querySelectorAll('a')].map(a => a.textContent)")
            .await
            .to_string()
            .contains(&job)
    })
    .await;
    let link = browser
        .eval(&format!("return [...document.querySelectorAll('a')].find(a => a.textContent === {}).href", json!(job)))
        .await;
    let linked = send(Method::GET, link.as_str().unwrap(), &[], "").await;
    assert_eq!((linked.status, linked.json()["id"].as_str()), (200, Some(job.as_str())), "{}", linked.text());
    let sent = of_route(&metrics, "upstream_requests_total", "delete_conversation");
    let shown = browser.text(&cell("delete_conversation", "sent-total")).await;
    assert!(shown.as_str().unwrap().parse::<u64>().unwrap() >= sent, "{shown} against /metrics' {sent}");

    browser.screenshot(SCREENSHOT).await;
    // Nothing secret on the page or in its data.
    let page = browser.eval("return document.documentElement.outerHTML").await.to_string();
    let data = send(Method::GET, &format!("{}/status.json", gw.admin), &[], "").await.text();
    for text in [&page, &data] {
        assert!(!text.contains(CLIENT_SECRET) && !text.contains("YWMt"), "a secret or token on the status page");
    }
}
