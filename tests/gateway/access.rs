//! Who may call: source networks and per-caller keys, refused before anything else happens.

use http::Method;

use crate::support::*;

fn hash(key: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_easemob-gateway"))
        .arg("hash-key")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(key.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn a_source_outside_allow_from_is_refused() {
    let sim = Sim::start().await;
    let options = GatewayOptions { server: "allow_from = [\"10.0.0.0/8\"]".into(), ..Default::default() };
    let gw = Gateway::ready_with(&sim, options).await;
    let a = send(Method::POST, &gw.url("/rest/message/roaming/user/dave/delete/all"), &[], "").await;
    a.assert_error(403, "forbidden");
    assert_eq!(a.header("x-easemob-gateway"), Some("rejected"));
    assert_eq!(sim.business_requests().await, 0);
}

#[tokio::test]
async fn configured_keys_are_required_and_name_the_caller_in_the_audit() {
    let sim = Sim::start().await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let extra = format!(
        "[audit]\nfile = \"{}\"\n\n[[callers]]\nname = \"billing\"\nkey_sha256 = \"{}\"\n",
        audit.display(),
        hash("billing-key-123")
    );
    let gw = Gateway::ready_with(&sim, GatewayOptions { extra, ..Default::default() }).await;
    let url = gw.url("/rest/message/roaming/user/dave/delete/all");
    send(Method::POST, &url, &[], "").await.assert_error(401, "gateway_key_required");
    send(Method::POST, &url, &[("x-gateway-key", "wrong")], "").await.assert_error(401, "gateway_key_required");
    // Two keys are ambiguous, whichever comes first.
    for (first, second) in [("wrong", "billing-key-123"), ("billing-key-123", "wrong")] {
        let keys = [("x-gateway-key", first), ("x-gateway-key", second)];
        send(Method::POST, &url, &keys, "").await.assert_error(401, "gateway_key_required");
    }
    assert_eq!(sim.business_requests().await, 0);
    let a = send(Method::POST, &url, &[("x-gateway-key", "billing-key-123"), ("x-caller", "impostor")], "").await;
    assert_eq!(a.status, 200, "{}", a.text());
    let event: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&audit).unwrap().trim()).unwrap();
    assert_eq!(event["caller"], "billing", "the key's name, not the caller's claim");
    let forwarded = serde_json::to_string(&sim.requests().await[0]).unwrap();
    assert!(!forwarded.contains("billing-key-123"), "the key is never forwarded");
    assert!(!gw.log().contains("billing-key-123"), "nor logged");
}
