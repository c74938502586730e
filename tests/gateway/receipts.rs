//! Evidence of deletion end to end: a job's receipt from the API and the command line, checked by `audit verify`
//! against the gateway's hash-chained audit trail, and the chain's anchor as the metric and the log give it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use http::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::support::*;

/// `easemob-gateway audit verify ARGS…`: its exit code and what it printed.
pub fn verify(args: &[&str]) -> (Option<i32>, String) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_easemob-gateway")).arg("audit").arg("verify").args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test]
async fn a_finished_jobs_receipt_is_borne_out_by_the_audit_chain_and_a_change_to_either_shows() {
    let sim = Sim::start().await;
    sim.add_users(&["ann".to_owned(), "bob".to_owned()]).await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let extra = format!("[audit]\nfile = \"{}\"\nreplica = \"gw-a\"\nanchor_interval = \"1s\"\n", audit.display());
    let gw = Gateway::ready_with(&sim, GatewayOptions { extra, jobs: Some(String::new()), ..Default::default() }).await;

    // `ghost` does not exist at Easemob: its operation fails (404).
    let conversation = json!({"method": "DELETE", "path": "/users/bob/user_channel",
                              "body": {"channel": "ann", "type": "chat", "delete_roam": true}});
    let body = json!({ "operations": [clear_op("ann"), clear_op("ghost"), conversation] });
    let created = send(Method::POST, &gw.url("/_gateway/jobs"), &[], &body.to_string()).await;
    assert_eq!(created.status, 202, "{}", created.text());
    let location = created.header("location").unwrap().to_owned();
    let job = finished(&gw, Duration::from_secs(60), &location).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["peer"], "127.0.0.1", "no caller named: the client's address");

    let answer = send(Method::GET, &format!("{}{location}/receipt", gw.data), &[], "").await;
    assert_eq!((answer.status, answer.header("x-easemob-gateway")), (200, Some("local")));
    let text = answer.text();
    let document: Value = serde_json::from_str(&text).unwrap();
    let inner = &text[text.find(":").unwrap() + 1..text.rfind(",\"sha256\"").unwrap()];
    assert_eq!(document["sha256"], hex::encode(Sha256::digest(inner.as_bytes())), "its own checksum");
    let receipt = &document["receipt"];
    assert_eq!((&receipt["job"]["id"], &receipt["job"]["caller"]), (&job["id"], &json!("127.0.0.1")));
    let ops = receipt["operations"].as_array().unwrap();
    let events: Vec<Value> =
        std::fs::read_to_string(&audit).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for (op, (state, status)) in ops.iter().zip([("succeeded", 200), ("failed", 404), ("succeeded", 200)]) {
        assert_eq!((op["state"].as_str(), op["caller"].as_str()), (Some(state), Some("127.0.0.1")), "{op}");
        let attempt = &op["attempts"][0];
        assert_eq!((attempt["attempt"].as_u64(), attempt["status"].as_u64()), (Some(1), Some(status)), "{op}");
        assert_eq!(attempt["replica"], "gw-a");
        assert!(attempt["easemob_timestamp"].as_i64().unwrap() > 1_700_000_000_000, "Easemob's own time: {op}");
        assert!(attempt["at"].as_str().unwrap().ends_with('Z'));
        // Its audit event is the one the chain holds at that seq.
        let seq = attempt["audit_seqs"][0].as_u64().unwrap();
        let event = events.iter().find(|e| e["seq"] == seq).unwrap();
        assert_eq!(event["request_id"], format!("job-{}.{}", job["id"].as_str().unwrap(), op["index"]));
        assert_eq!(event["upstream_status"], status);
    }
    assert_eq!(ops[0]["params"], json!({"owner": "ann"}));
    assert_eq!(ops[2]["params"], json!({"owner": "bob", "channel": "ann", "type": "chat", "delete_roam": true}));

    let saved = dir.path().join("receipt.json");
    std::fs::write(&saved, &text).unwrap();
    let (code, out) = verify(&[path(&audit), "--receipt", path(&saved)]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("intact: replica gw-a: 3 events, seq 1..=3"), "{out}");
    assert!(out.contains("clear_user_messages refused: 1"), "{out}");
    assert!(out.contains("3 attempts, 3 audit events found and matching"), "{out}");

    // The same receipt as CSV, from the command line.
    let out = Command::new(env!("CARGO_BIN_EXE_easemob-gateway"))
        .args(["jobs", "receipt", job["id"].as_str().unwrap(), "--csv", "--gateway", &gw.data])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let csv = String::from_utf8(out.stdout).unwrap();
    assert!(csv.starts_with("job_id,app,job_state,index,route,"), "{csv}");
    assert!(
        csv.contains(r#""{""channel"":""ann"",""delete_roam"":true,""owner"":""bob"""#),
        "quoted JSON in a cell: {csv}"
    );
    let saved_csv = dir.path().join("receipt.csv");
    std::fs::write(&saved_csv, &csv).unwrap();
    let (code, out) = verify(&[path(&audit), "--receipt", path(&saved_csv)]);
    assert_eq!(code, Some(0), "{out}");

    // A receipt changed after it was written, or whose checksum was redone to match: both show.
    std::fs::write(&saved, text.replacen("\"status\":404", "\"status\":200", 1)).unwrap();
    let (code, out) = verify(&[path(&audit), "--receipt", path(&saved)]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("was changed"), "{out}");
    let forged = inner.replacen("\"status\":404", "\"status\":200", 1);
    let forged = format!("{{\"receipt\":{forged},\"sha256\":\"{}\"}}", hex::encode(Sha256::digest(forged.as_bytes())));
    std::fs::write(&saved, forged).unwrap();
    let (code, out) = verify(&[path(&audit), "--receipt", path(&saved)]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("operation 1 attempt 1") && out.contains("status Some(404) (not Some(200))"), "{out}");

    // The anchor leaves the machine as a metric and a log line, and the file holds it.
    let head = std::sync::Mutex::new(String::new());
    eventually(Duration::from_secs(10), "the anchor metric", || async {
        let metrics = gw.metrics().await;
        let line = metrics.lines().find(|l| l.starts_with("easemob_gateway_audit_anchor_info{")).map(str::to_owned);
        let found = line.and_then(|l| l.split("head=\"").nth(1).map(|h| h[..h.find('"').unwrap()].to_owned()));
        *head.lock().unwrap() = found.unwrap_or_default();
        head.lock().unwrap().starts_with("3:")
    })
    .await;
    let head = head.into_inner().unwrap();
    assert!(gw.log().contains(&head) && gw.log().contains("audit chain anchor"), "the anchor's log line");
    assert_eq!(verify(&[path(&audit), "--anchor", &head]).0, Some(0));

    // An edited audit line breaks the chain where it is; a file that cannot be read is exit 2.
    let mut lines: Vec<String> = std::fs::read_to_string(&audit).unwrap().lines().map(str::to_owned).collect();
    lines[1] = lines[1].replace("\"attempt\":1", "\"attempt\":2");
    std::fs::write(&audit, lines.join("\n") + "\n").unwrap();
    let (code, out) = verify(&[path(&audit)]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("{}:3: seq 3 does not follow", audit.display())), "{out}");
    assert_eq!(verify(&[path(&dir.path().join("nothing"))]).0, Some(2));
}

#[tokio::test]
async fn after_logrotate_renames_the_audit_file_sighup_starts_a_new_one_that_goes_on_with_the_chain() {
    let sim = Sim::start().await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let extra = format!("[audit]\nfile = \"{}\"\nreplica = \"gw-a\"\n", audit.display());
    let gw = Gateway::ready_with(&sim, GatewayOptions { extra, ..Default::default() }).await;
    let clear = gw.url("/rest/message/roaming/user/alice/delete/all");
    assert_eq!(send(Method::POST, &clear, &[], "").await.status, 200);
    let rotated = dir.path().join("audit.jsonl.1");
    std::fs::rename(&audit, &rotated).unwrap();
    gw.signal("HUP");
    eventually(Duration::from_secs(10), "the audit file to be reopened", || async {
        gw.log().contains("audit file reopened")
    })
    .await;
    assert_eq!(send(Method::POST, &clear, &[], "").await.status, 200);
    let new: Value = serde_json::from_str(std::fs::read_to_string(&audit).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(new["seq"], 2, "the new file goes on from the renamed one");
    let (code, out) = verify(&[path(&rotated), path(&audit)]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("intact: replica gw-a: 2 events, seq 1..=2"), "{out}");
}
