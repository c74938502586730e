//! The command line: parse, then hand over to the library. Failures print one line per problem and exit 1.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use easemob_gateway::client::{Client, Failure};
use easemob_gateway::config::{Config, LogConfig, SecretPolicy};
use easemob_gateway::server::{Server, shutdown_signal};
use easemob_gateway::sim::{self, Simulator, state};
use easemob_gateway::{audit, demo, logging};

/// jemalloc: glibc's malloc and free were a fifth of the instructions per forwarded request (hyper takes a fresh
/// 8 KiB read buffer per request on each side); jemalloc cuts instructions per request by 7% and keeps RSS with
/// 1,000 connections lower than glibc did (mimalloc was as fast but doubled it). bench/instructions measures this.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "easemob-gateway",
    version,
    about = "An authenticating gateway for Easemob's one-way deletion REST routes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    #[command(after_long_help = SERVE_HELP)]
    Serve {
        /// The config file (TOML); `check-config` shows what it means.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run the gateway in front of the built-in Easemob simulator, seeded with demo data.
    Demo {
        /// Where the data plane listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where /metrics, /healthz and /readyz are served.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: SocketAddr,
    },
    /// Run the Easemob simulator alone (for your own integration tests).
    Sim {
        /// Where the simulator listens (port 0: any free port, printed on the first line).
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// Serve HTTPS with this PEM certificate chain (and --tls-key).
        #[arg(long, requires = "tls_key", value_name = "FILE")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert", value_name = "FILE")]
        tls_key: Option<PathBuf>,
    },
    /// Print the SHA-256 of a caller key read from standard input, for `[[callers]] key_sha256`.
    HashKey,
    /// Check a config file: print the effective config (secrets redacted), or one line per problem.
    CheckConfig {
        /// The config file (TOML), read with the EASEMOB_GW__… overrides of this environment.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Submit, watch, show, list and cancel deletion jobs on a running gateway.
    Jobs {
        /// The gateway's data plane.
        #[arg(
            long,
            global = true,
            default_value = "http://127.0.0.1:8080",
            env = "EASEMOB_GW_URL",
            hide_env_values = true
        )]
        gateway: String,
        /// The app (`org_name#app_name`), when the gateway serves several.
        #[arg(long, global = true, env = "EASEMOB_GW_APP", hide_env_values = true)]
        app: Option<String>,
        /// A caller key, when the gateway requires one (sent as X-Gateway-Key).
        #[arg(long, global = true, env = "EASEMOB_GW_KEY", hide_env_values = true)]
        key: Option<String>,
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// Check the audit trail's hash chain.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Print a shell completion script: `easemob-gateway completions bash > /etc/bash_completion.d/easemob-gateway`.
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `easemob-gateway man > easemob-gateway.1`.
    Man,
}

/// `serve --help`: what the options cannot say.
const SERVE_HELP: &str = "\
Reloading:
  The whole config is read again on SIGHUP, and when server.reload_poll (default 10s; 0s: only on SIGHUP) finds
  that the file or a client_secret_file it names has changed. It is checked as check-config checks it; a config
  with any problem changes nothing (its problems are logged and counted). Settings a running gateway cannot
  change (listen addresses, workers, pools, the quota backend, [jobs], ...) keep their values until the next start
  and are named in the log and in easemob_gateway_config_restart_required.

Environment overrides:
  EASEMOB_GW__<SECTION>__<KEY> overrides a key of the file, read as that key's type:
  EASEMOB_GW__UPSTREAM__TIMEOUT=10s, EASEMOB_GW__RATE_LIMIT__REPLICAS=2. A reload reads them from the environment
  the process started with. A client secret comes from client_secret_env or client_secret_file.

See docs/configuration.md and docs/operations.md.";

#[derive(Subcommand)]
enum JobsCommand {
    /// Submit a file of operations (JSON lines of {"method", "path", "body"}; `-` reads standard input) as one
    /// job, then watch it to the end.
    Submit {
        /// The operations: JSON lines, or one {"operations": [...]} document; `-` for standard input.
        file: PathBuf,
        /// Submitting again with the same key returns the first job instead of making a second.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Print the job's URL and return at once.
        #[arg(long)]
        no_watch: bool,
    },
    /// Follow a job to its end with a progress bar; exit 2 and print its failed operations if any failed, exit 3 if
    /// it was cancelled.
    Watch {
        /// The job's id, or its URL.
        job: String,
    },
    /// Print a job; with --failed, its failed operations too (as JSON lines that can be submitted again).
    Show {
        /// The job's id, or its URL.
        job: String,
        /// Also print the failed operations, as JSON lines ready for `jobs submit`.
        #[arg(long)]
        failed: bool,
    },
    /// List the app's jobs, newest first.
    List {
        /// queued, running, done, failed or cancelled.
        #[arg(long)]
        state: Option<String>,
    },
    /// Cancel a job: what has not been sent is dropped, what is in flight finishes.
    Cancel {
        /// The job's id, or its URL.
        job: String,
    },
    /// Print a job's receipt: each operation's parameters, final state, attempts, Easemob's answers and the audit
    /// events that record them, with the receipt's own SHA-256 (`audit verify --receipt` checks it).
    Receipt {
        /// The job's id, or its URL.
        job: String,
        /// As CSV (one row per attempt) for a spreadsheet, instead of JSON.
        #[arg(long)]
        csv: bool,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the chain across audit files (oldest first; rotated files before the live one): exit 0 if intact, 1
    /// if broken (the first broken link is printed by file and line) or an anchor or receipt does not match, 2 if
    /// a file cannot be read.
    Verify {
        /// The audit files, oldest first. Each replica's files form a chain of their own.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// A chain head copied elsewhere (the anchor log line's or metric's `head`, SEQ:HASH) that the files must
        /// hold; REPLICA@SEQ:HASH names the replica whose chain it is (needed with several replicas' files); may be
        /// given more than once.
        #[arg(long, value_name = "[REPLICA@]SEQ:HASH")]
        anchor: Vec<audit::verify::Anchor>,
        /// A job receipt (JSON or CSV) whose checksum and every attempt must match the audit events.
        #[arg(long, value_name = "FILE")]
        receipt: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The gateway's data plane runs on worker threads of its own (see `Server::serve`); the main runtime only
    // carries the admin listener, token refreshes, Redis and signals, for which one thread is plenty.
    let runtime = match cli.command {
        Command::Sim { .. } => tokio::runtime::Runtime::new(),
        _ => tokio::runtime::Builder::new_current_thread().enable_all().build(),
    }
    .expect("tokio runtime");
    let result = match cli.command {
        Command::Serve { config } => runtime.block_on(serve(config)),
        Command::Demo { listen, admin_listen } => {
            logging::init(&LogConfig::default());
            runtime.block_on(demo::run(listen, admin_listen))
        }
        Command::Sim { listen, tls_cert, tls_key } => {
            logging::init(&LogConfig::default());
            runtime.block_on(sim(listen, tls_cert.zip(tls_key)))
        }
        Command::CheckConfig { config } => check_config(config),
        Command::Jobs { gateway, app, key, command } => {
            return match runtime.block_on(jobs(&gateway, app.as_deref(), key, command)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(failure) => {
                    if let Failure::Error(e) = &failure {
                        eprintln!("error: {e}");
                    }
                    ExitCode::from(failure.exit_code())
                }
            };
        }
        Command::Audit { command: AuditCommand::Verify { files, anchor, receipt } } => {
            let request = audit::verify::Request { files, anchors: anchor, receipt };
            return match audit::verify::verify(&request) {
                Ok(summary) => {
                    print!("{summary}");
                    ExitCode::SUCCESS
                }
                Err(audit::verify::Failed::Broken(broken)) => {
                    println!("broken: {broken}");
                    ExitCode::from(1)
                }
                Err(audit::verify::Failed::Unreadable(unreadable)) => {
                    eprintln!("error: {unreadable}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "easemob-gateway", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map_err(|e| format!("writing the man page: {e}")),
        Command::HashKey => {
            let mut key = String::new();
            match std::io::stdin().read_line(&mut key) {
                Ok(_) if !key.trim().is_empty() => {
                    println!("{}", easemob_gateway::access::hash_key(&key));
                    Ok(())
                }
                _ => Err("hash-key reads the key from standard input: echo -n KEY | easemob-gateway hash-key".into()),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(problems) => {
            for line in problems.lines() {
                eprintln!("error: {line}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn serve(path: PathBuf) -> Result<(), String> {
    let config = Config::load_checked(&path, SecretPolicy::ExternalOnly)?;
    let log = logging::init(&config.log);
    let server = Server::bind(config, SecretPolicy::ExternalOnly).await.map_err(|e| e.to_string())?;
    let server = server.reloading_from(path, log);
    // Scripts and tests read this line to find ports bound as :0.
    println!("listening data=http://{} admin=http://{}", server.data_addr(), server.admin_addr());
    server.serve(shutdown_signal()).await;
    Ok(())
}

async fn sim(listen: SocketAddr, tls: Option<(PathBuf, PathBuf)>) -> Result<(), String> {
    let acceptor = tls.as_ref().map(|(cert, key)| sim::transport::tls_acceptor(cert, key)).transpose()?;
    let scheme = if acceptor.is_some() { "https" } else { "http" };
    let (addr, serve) =
        Simulator::demo().bind(listen, acceptor).await.map_err(|e| format!("--listen {listen}: {e}"))?;
    println!("listening sim={scheme}://{addr}");
    println!(
        "apps {org}#{} and {org}#{}: client_id {} client_secret {}",
        state::DEMO_APP,
        state::DEMO_APP_2,
        state::DEMO_CLIENT_ID,
        state::DEMO_CLIENT_SECRET,
        org = state::DEMO_ORG,
    );
    tokio::select! {
        _ = serve => {}
        _ = shutdown_signal() => {}
    }
    Ok(())
}

async fn jobs(gateway: &str, app: Option<&str>, key: Option<String>, command: JobsCommand) -> Result<(), Failure> {
    let client = Client::new(gateway, app, key)?;
    match command {
        JobsCommand::Submit { file, idempotency_key, no_watch } => {
            let url = client.submit(&file, idempotency_key.as_deref()).await?;
            if no_watch {
                println!("{url}");
                return Ok(());
            }
            client.watch(&url).await
        }
        JobsCommand::Watch { job } => client.watch(&job).await,
        JobsCommand::Show { job, failed } => client.show(&job, failed).await,
        JobsCommand::List { state } => Ok(client.list(state.as_deref()).await?),
        JobsCommand::Cancel { job } => Ok(client.cancel(&job).await?),
        JobsCommand::Receipt { job, csv } => Ok(client.receipt(&job, csv).await?),
    }
}

fn check_config(path: PathBuf) -> Result<(), String> {
    let config = Config::load_checked(&path, SecretPolicy::ExternalOnly)?;
    print!("{}", config.to_redacted_toml());
    print!("{}", config.rate_limit.per_replica_note());
    eprintln!("config OK");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument and option of every command says what it is for.
    #[test]
    fn every_argument_has_a_help_text() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "easemob-gateway", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
        Cli::command().debug_assert();
    }
}
