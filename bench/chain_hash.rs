//! The audit chain's one cost: the SHA-256 of each audit line (`cargo bench --bench chain-hash`).
//!
//! `bench/instructions --audit` counts instructions under callgrind, which hides the CPU's SHA extensions, so it
//! measures the software path a CPU without them takes. This measures the hash as this machine runs it, on a line
//! of the size the gateway writes for a forwarded `delete_chat_messages` (433 bytes), with `ring` (what the chain
//! uses) and with `sha2` (what it used first), and says which path ran. Under callgrind, one implementation at a
//! time, it counts each one's instructions per line in software:
//!
//!     cargo bench --bench chain-hash --no-run
//!     valgrind --tool=callgrind target/release/deps/chain_hash-* ring 10000   # then sha2, and none (the loop)
//!
//! (the difference between `ring` or `sha2` and `none`, over 10,000, is the hash's count per line).

use std::time::Instant;

use sha2::Digest;

fn line() -> String {
    format!(
        "{{\"seq\":1,\"prev\":\"{}\",\"replica\":\"vm\",\"time\":\"2026-12-06T09:42:08.335Z\",\"request_id\":\
         \"cb949c8b-5df5-4036-8914-342a2e1333bc\",\"trace_id\":\"20e8126e3099c8d22a4a216619622c03\",\"caller\":\
         \"unknown\",\"app\":\"1122161011178276#demo\",\"route\":\"delete_chat_messages\",\"owner\":\"alice\",\
         \"peer\":\"bob\",\"message_ids\":1,\"upstream_status\":200,\"outcome\":\"accepted\",\"attempt\":1,\
         \"attempt_kind\":\"first\"}}",
        "0".repeat(64)
    )
}

/// Hashes `line` `n` times with `with`; returns the time per line.
fn run(with: &str, line: &[u8], n: u32) -> std::time::Duration {
    let mut sum = 0u8;
    let started = Instant::now();
    for i in 0..n {
        let first = match with {
            "ring" => ring::digest::digest(&ring::digest::SHA256, line).as_ref()[0],
            "sha2" => sha2::Sha256::digest(line)[0],
            _ => line[i as usize % line.len()],
        };
        sum = sum.wrapping_add(first);
    }
    std::hint::black_box(sum);
    started.elapsed() / n
}

fn main() {
    let line = line();
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    if let [with, n] = args.as_slice() {
        // One implementation, for callgrind.
        run(with, line.as_bytes(), n.parse().expect("a count"));
        return;
    }
    #[cfg(target_arch = "x86_64")]
    let extensions = std::is_x86_feature_detected!("sha");
    #[cfg(not(target_arch = "x86_64"))]
    let extensions = false;
    let extensions = if extensions { "present" } else { "absent or not x86_64" };
    for with in ["ring", "sha2"] {
        run(with, line.as_bytes(), 10_000);
        let per_line = run(with, line.as_bytes(), 200_000);
        println!("SHA-256 of a {}-byte audit line with {with}: {per_line:?} (SHA extensions {extensions})", line.len());
    }
}
