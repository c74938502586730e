//! `demo`, tried as a new user would: start it, paste the printed curl lines, read the answers.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::support::eventually;

#[tokio::test]
async fn the_printed_curl_lines_work_as_printed() {
    let mut demo = Command::new(env!("CARGO_BIN_EXE_easemob-gateway"))
        .args(["demo", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut curls = Vec::new();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.unwrap().unwrap().unwrap();
        if line.starts_with("curl ") {
            curls.push(line);
        } else if line.starts_with("Ctrl-C") {
            break;
        }
    }
    assert!(curls.len() >= 4, "{curls:?}");
    // The gateway serves at once but fetches its token in the background: wait for /readyz like a user would.
    let readyz = curls.iter().find(|c| c.contains("/readyz")).unwrap().split(';').next().unwrap().to_owned();
    eventually(Duration::from_secs(20), "the demo to be ready", || async { run(&readyz).contains("\"ready\":true") })
        .await;
    let answers: Vec<String> = curls[..6].iter().map(|c| run(c)).collect();
    assert!(answers[0].contains("1100000000000000001"), "alice starts with the message: {}", answers[0]);
    assert!(answers[1].contains("\"requestStatusCode\":\"ok\""), "{}", answers[1]);
    assert!(answers[2].contains("\"result\":\"ok\""), "{}", answers[2]);
    assert!(answers[3].contains("looks like Unix seconds"), "{}", answers[3]);
    let (alice, bob) = answers[4].split_once('\n').unwrap();
    assert!(!alice.contains("1100000000000000001") && !alice.contains("\"id\":\"carol\""), "alice lost them: {alice}");
    assert!(bob.contains("1100000000000000001"), "bob kept them: {bob}");
    assert!(answers[5].contains("easemob_gateway_requests_total"), "{}", answers[5]);

    // The spam cleanup job: accepted, then done within seconds, and the spam gone from dave's view.
    let job = run(&curls[6]);
    assert!(job.contains("\"state\":\"queued\"") && job.contains("\"total\":4"), "{job}");
    eventually(Duration::from_secs(20), "the spam cleanup job to finish", || async {
        run(&curls[7]).lines().next().is_some_and(|jobs| jobs.contains("\"state\":\"done\""))
    })
    .await;
    let dave = run(&curls[7]).lines().nth(1).unwrap_or_default().to_owned();
    assert!(dave.contains("\"user\":\"dave\"") && !dave.contains("1100000000000000099"), "spam gone: {dave}");
}

fn run(line: &str) -> String {
    let out = std::process::Command::new("bash").args(["-c", line]).output().unwrap();
    String::from_utf8(out.stdout).unwrap()
}
