//! `check-config`: the effective config with secrets redacted, or one line per problem and a non-zero exit.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_easemob-gateway");

fn check(config: &str, env: &[(&str, &str)]) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config", path.to_str().unwrap()])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

const GOOD: &str = r#"
[upstream]
base_url = "https://a1.easemob.com"

[[apps]]
org_name = "1122161011178276"
app_name = "demo"
client_id = "YXA6id"
client_secret_env = "TEST_EASEMOB_SECRET"
"#;

#[test]
fn a_valid_config_is_printed_with_env_overrides_and_no_secret() {
    let (ok, out, err) = check(
        GOOD,
        &[
            ("TEST_EASEMOB_SECRET", "s3cr3t-value-xyz"),
            ("EASEMOB_GW__UPSTREAM__TIMEOUT", "7s"),
            ("EASEMOB_GW__SERVER__LISTEN", "127.0.0.1:18080"),
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("timeout = \"7s\""), "{out}");
    assert!(out.contains("listen = \"127.0.0.1:18080\""), "{out}");
    assert!(out.contains("client_secret_env = \"TEST_EASEMOB_SECRET\""));
    assert!(!out.contains("s3cr3t") && !err.contains("s3cr3t"));
}

#[test]
fn every_problem_is_reported_on_its_own_line() {
    let config = GOOD.replace("app_name = \"demo\"", "app_name = \"bad name\"").replace("YXA6id", "")
        + "\n[token]\nrefresh_at = 1.5\n";
    let (ok, out, err) = check(&config, &[]);
    assert!(!ok);
    assert!(out.is_empty());
    let lines: Vec<&str> = err.lines().collect();
    assert!(lines.len() >= 4, "{err}");
    assert!(lines.iter().all(|l| l.starts_with("error: ")), "{err}");
    for needle in ["app_name", "client_id is empty", "TEST_EASEMOB_SECRET", "refresh_at"] {
        assert!(err.contains(needle), "{needle} missing from {err}");
    }
}

#[test]
fn an_inline_secret_is_refused_and_not_echoed() {
    let config = GOOD.replace("client_secret_env = \"TEST_EASEMOB_SECRET\"", "client_secret = \"inline-s3cr3t\"");
    let (ok, out, err) = check(&config, &[]);
    assert!(!ok);
    assert!(err.contains("for `demo` only"), "{err}");
    assert!(!out.contains("inline-s3cr3t") && !err.contains("inline-s3cr3t"));
}

#[test]
fn a_malformed_file_is_one_clear_line() {
    let (ok, _, err) = check("[upstream\nbase_url = 1", &[]);
    assert!(!ok);
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn the_shipped_example_config_is_valid() {
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/gateway.example.toml")).unwrap();
    let (ok, out, err) = check(&example, &[("EASEMOB_CLIENT_SECRET", "example-secret")]);
    assert!(ok, "{err}");
    assert!(out.contains("base_url = \"https://a1.easemob.com\""));
    assert!(!out.contains("example-secret"));
}

#[test]
fn listening_beyond_loopback_requires_allow_from() {
    let config = GOOD.replace("[upstream]", "[server]\nlisten = \"0.0.0.0:8080\"\n\n[upstream]");
    let (ok, _, err) = check(&config, &[("TEST_EASEMOB_SECRET", "x")]);
    assert!(!ok);
    assert!(err.contains("server.allow_from"), "{err}");
    let config =
        config.replace("listen = \"0.0.0.0:8080\"", "listen = \"0.0.0.0:8080\"\nallow_from = [\"10.0.0.0/8\"]");
    let (ok, _, err) = check(&config, &[("TEST_EASEMOB_SECRET", "x")]);
    assert!(ok, "{err}");
}

#[test]
fn one_run_lists_every_problem_of_every_phase_with_the_types_and_the_variable() {
    // A misspelt key, a float for an integer, a number for a duration, a bad override and a missing secret file.
    let config = GOOD
        .replace("client_secret_env = \"TEST_EASEMOB_SECRET\"", "client_secret_file = \"/nonexistent/s\"")
        .replace("[upstream]", "[server]\nlisten_adr = \"127.0.0.1:8080\"\nworkers = 2.5\n\n[upstream]\ntimeout = 10");
    let (ok, out, err) = check(&config, &[("EASEMOB_GW__JOBS__ENABLED", "no")]);
    assert!(!ok, "{out}");
    assert!(out.is_empty(), "{out}");
    for needle in [
        "server.listen_adr: unknown field",
        "server.workers: expected an integer from 0, found a float (2.5)",
        "upstream.timeout: expected a duration, found an integer (10): write upstream.timeout = \"10s\"",
        "EASEMOB_GW__JOBS__ENABLED (overriding jobs.enabled): expected a boolean, found a string (\"no\")",
        "client_secret_file /nonexistent/s cannot be read",
    ] {
        assert!(err.contains(needle), "{needle} missing from {err}");
    }
    assert_eq!(err.lines().count(), 5, "{err}");
    assert!(err.lines().all(|l| l.starts_with("error: ")), "{err}");
}

#[test]
fn check_config_prints_what_each_replica_enforces() {
    let (ok, out, err) = check(&format!("{GOOD}\n[rate_limit]\nreplicas = 2\n"), &[("TEST_EASEMOB_SECRET", "x")]);
    assert!(ok, "{err}");
    assert!(out.contains("#   route: 50 calls/s, burst 1\n#   user_conversation_per_minute: 2\n"), "{out}");
}

#[test]
fn a_job_size_pair_that_contradicts_itself_is_refused() {
    let config = format!("{GOOD}\n[jobs]\nmax_operations = 100000\nmax_body_bytes = 1048576\n");
    let (ok, _, err) = check(&config, &[("TEST_EASEMOB_SECRET", "x")]);
    assert!(!ok);
    assert!(err.contains("jobs.max_body_bytes 1048576 cannot hold jobs.max_operations 100000 operations"), "{err}");
    let (ok, _, err) = check(&format!("{GOOD}\n[jobs]\nmax_operations = 1000\n"), &[("TEST_EASEMOB_SECRET", "x")]);
    assert!(ok, "derived from max_operations: {err}");
}

/// Runs the binary with `args`: its exit code, standard output and standard error.
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (out.status.code(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn a_gateway_that_is_not_running_is_named_with_what_to_check() {
    // A port nothing listens on any more.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let url = format!("http://{closed}");
    let (code, _, err) = run(&["jobs", "list", "--gateway", &url]);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.trim(), format!("error: cannot reach the gateway at {url}: is it running? (connection refused)"));
}

#[test]
fn a_bad_operations_line_is_named_by_the_files_line_alone() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ops.jsonl");
    std::fs::write(&file, "# cleanup\n{\"method\": \"POST\", \"path\": \"/a\"}\nnot json\n").unwrap();
    let (code, _, err) = run(&["jobs", "submit", file.to_str().unwrap(), "--gateway", "http://127.0.0.1:9"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("ops.jsonl: line 3, column 2: expected ident"), "{err}");
    assert!(!err.contains("line 1"), "one line number, the file's: {err}");
}

#[test]
fn completions_and_the_man_page_come_from_the_same_definitions_as_help() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = run(&["completions", shell]);
        assert_eq!(code, Some(0), "{err}");
        for word in ["check-config", "submit", "gateway", "idempotency-key"] {
            assert!(out.contains(word), "{shell} completion lacks {word}");
        }
    }
    let (code, man, err) = run(&["man"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(man.starts_with(".ie") || man.contains(".TH easemob-gateway"), "{}", &man[..200.min(man.len())]);
    let (_, help, _) = run(&["jobs", "--help"]);
    assert!(!help.contains("EASEMOB_GW_URL=]"), "no stray `=` after an unset variable: {help}");
}
