//! The audit chain's one cost, natively: the SHA-256 of each audit line (`cargo bench --bench chain-hash`).
//!
//! `bench/instructions --audit` counts instructions under callgrind, which hides the CPU's SHA extensions, so it
//! measures the software path a CPU without them takes. This measures the hash as this machine runs it, on a line
//! of the size the gateway writes for a forwarded `delete_chat_messages` (436 bytes), and says which path ran.

use std::time::Instant;

use easemob_gateway::audit::Head;

fn main() {
    const LINES: u32 = 200_000;
    let line = format!(
        "{{\"seq\":1,\"prev\":\"{}\",\"replica\":\"vm\",\"time\":\"2026-12-06T09:42:08.335Z\",\"request_id\":\
         \"cb949c8b-5df5-4036-8914-342a2e1333bc\",\"trace_id\":\"20e8126e3099c8d22a4a216619622c03\",\"caller\":\
         \"unknown\",\"app\":\"1122161011178276#demo\",\"route\":\"delete_chat_messages\",\"owner\":\"alice\",\
         \"peer\":\"bob\",\"message_ids\":1,\"upstream_status\":200,\"outcome\":\"accepted\",\"attempt\":1,\
         \"attempt_kind\":\"first\"}}",
        "0".repeat(64)
    );
    let mut head = Head::GENESIS;
    for _ in 0..10_000 {
        head = Head::of(head.seq + 1, line.as_bytes());
    }
    let started = Instant::now();
    for _ in 0..LINES {
        head = Head::of(head.seq + 1, line.as_bytes());
    }
    let per_line = started.elapsed() / LINES;
    #[cfg(target_arch = "x86_64")]
    let extensions = std::is_x86_feature_detected!("sha");
    #[cfg(not(target_arch = "x86_64"))]
    let extensions = false;
    println!(
        "SHA-256 of a {}-byte audit line: {per_line:?} (SHA extensions {}; head {})",
        line.len(),
        if extensions { "present" } else { "absent or not x86_64" },
        head.seq
    );
}
