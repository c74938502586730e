//! The curl examples from Easemob's own doc pages, quirks included, pointed at the gateway: run with real curl.

use std::process::Command;

use serde_json::json;

use crate::support::*;

/// Runs curl with `args` (the seed's flags, with the placeholders filled in) and returns status and body.
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl is installed");
    assert!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_owned())
}

#[tokio::test]
async fn the_seed_curl_examples_work_against_the_gateway() {
    let sim = Sim::start().await;
    let gw = Gateway::ready(&sim).await;
    let base = gw.url("");
    let token = "Authorization: Bearer <YourAppToken>";

    let url =
        format!("{base}/rest/message/roaming/chat/user/alice?userId=bob&msgIdList=1100000000000000001&isNotify=false");
    let (code, body) = curl(&[
        "-L",
        "-X",
        "DELETE",
        &url,
        "-H",
        token,
        "-H",
        "Content-Type: application/json",
        "-H",
        "Accept: application/json",
    ]);
    assert_eq!(code, 200, "{body}");

    // The missing `&` of the group example: msgIdList=XXXXisNotify=false.
    let url = format!(
        "{base}/rest/message/roaming/group/user/alice?groupId={GROUP}&msgIdList=1100000000000000006isNotify=false"
    );
    let (code, body) = curl(&[
        "-L",
        "-X",
        "DELETE",
        &url,
        "-H",
        token,
        "-H",
        "Content-Type: application/json",
        "-H",
        "Accept: application/json",
    ]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(sim.messages(APP, "alice", GROUP).await, ["1100000000000000007", "1100000000000000008"]);

    // The doubled header values of the clear-all example.
    let url = format!("{base}/rest/message/roaming/user/dave/delete/all");
    let (code, body) = curl(&[
        "-L",
        "-X",
        "POST",
        &url,
        "-H",
        token,
        "-H",
        "Content-Type: Content-Type: application/json",
        "-H",
        "Accept: Accept: application/json",
    ]);
    assert_eq!(code, 200, "{body}");

    // The time examples send only the Authorization header.
    let url =
        format!("{base}/rest/message/roaming/chat/user/alice/time?userId=carol&delTime=1659014868000&isNotify=false");
    assert_eq!(curl(&["-L", "-X", "DELETE", &url, "-H", token]).0, 200);
    let url =
        format!("{base}/rest/message/roaming/group/user/bob/time?groupId={GROUP}&delTime=1659014868000&isNotify=false");
    assert_eq!(curl(&["-L", "-X", "DELETE", &url, "-H", token]).0, 200);

    // The conversation example, with its body spread over lines, for users u1 and u2.
    let send_url = format!("{}/_sim/apps/{ORG}/{APP}/messages", sim.url);
    let message = json!({"type": "chat", "from": "u1", "to": "u2", "id": "1200000000000000001"}).to_string();
    assert_eq!(curl(&["-X", "POST", &send_url, "-d", &message]).0, 200);
    let url = format!("{base}/users/u1/user_channel");
    let body = "\n{ \"channel\": \"u2\", \"type\": \"chat\", \"delete_roam\": true }\n";
    let (code, answer) = curl(&[
        "-X",
        "DELETE",
        &url,
        "-H",
        token,
        "-H",
        "Content-Type: application/json",
        "-H",
        "Accept: application/json",
        "-d",
        body,
    ]);
    assert_eq!(code, 200, "{answer}");
    assert!(sim.conversation(APP, "u1", "u2").await.is_none());
    assert_eq!(sim.messages(APP, "u2", "u1").await, ["1200000000000000001"]);

    // The placeholder token in the examples never reaches Easemob.
    for request in sim.requests().await {
        assert!(!request["headers"].to_string().contains("YourAppToken"));
    }
}
