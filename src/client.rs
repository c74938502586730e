//! `easemob-gateway jobs …`: the command-line client of a running gateway's jobs API, for the person running a
//! bulk erasure by hand. Submit a file of operations, watch it with a progress bar, show, list and cancel jobs.
//! A job that ends with failed operations makes the command exit 2 and print them on standard output as JSON
//! lines, ready to be submitted again; a cancelled job makes it exit 3 ([`Failure::exit_code`]).

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use serde_json::{Value, json};

/// How often `watch` reads the job.
const POLL: Duration = Duration::from_secs(1);
/// Operations read per page when listing failures.
const PAGE: u32 = 1000;

/// Why a command did not end well; its exit status says which ([`Failure::exit_code`]).
pub enum Failure {
    /// The gateway could not be reached, or refused the request.
    Error(String),
    /// The job ended with operations that failed (printed on standard output).
    OperationsFailed,
    /// The job was cancelled before all its operations ran (and none failed).
    Cancelled,
}

impl Failure {
    /// The command's exit status (0 is a job whose every operation succeeded, or a command that did what it was
    /// asked); docs/jobs.md lists them.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Error(_) => 1,
            Failure::OperationsFailed => 2,
            Failure::Cancelled => 3,
        }
    }
}

impl From<String> for Failure {
    fn from(e: String) -> Failure {
        Failure::Error(e)
    }
}

/// A running gateway's jobs API for one app.
pub struct Client {
    http: HttpClient<HttpConnector, Full<Bytes>>,
    /// `{gateway}/{org}/{app}/_gateway/jobs`, or `{gateway}/_gateway/jobs` for a gateway with one app.
    jobs: String,
    gateway: String,
    key: Option<String>,
}

impl Client {
    /// `gateway` is the data plane's base URL; `app` is `org#app` when the gateway serves several apps.
    pub fn new(gateway: &str, app: Option<&str>, key: Option<String>) -> Result<Client, String> {
        let gateway = gateway.trim_end_matches('/').to_owned();
        if !gateway.starts_with("http://") {
            return Err(format!("--gateway {gateway}: the gateway's data plane is plain http://"));
        }
        let jobs = match app {
            Some(app) => {
                let (org, name) =
                    app.split_once('#').ok_or_else(|| format!("--app {app:?}: an AppKey is org_name#app_name"))?;
                format!("{gateway}/{org}/{name}/_gateway/jobs")
            }
            None => format!("{gateway}/_gateway/jobs"),
        };
        let http = HttpClient::builder(TokioExecutor::new()).build(HttpConnector::new());
        Ok(Client { http, jobs, gateway, key })
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        body: Option<Vec<u8>>,
        extra: &[(&str, &str)],
    ) -> Result<(StatusCode, Value), String> {
        let (status, body) = self.send_raw(method, url, body, extra).await?;
        let value = serde_json::from_slice(&body).unwrap_or_else(|_| json!({ "body": String::from_utf8_lossy(&body) }));
        Ok((status, value))
    }

    /// `send`, with the answer's body as it came.
    async fn send_raw(
        &self,
        method: Method,
        url: &str,
        body: Option<Vec<u8>>,
        extra: &[(&str, &str)],
    ) -> Result<(StatusCode, Bytes), String> {
        let mut request = Request::builder().method(method).uri(url);
        if let Some(key) = &self.key {
            request = request.header("x-gateway-key", key);
        }
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request =
            request.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| format!("{url}: {e}"))?;
        let response = self.http.request(request).await.map_err(|e| self.unreachable(url, &e))?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(|e| format!("{url}: {e}"))?.to_bytes();
        Ok((status, body))
    }

    /// A request that got no answer, said so that the person at the terminal knows what to check: the deepest
    /// cause (`connection refused`), and whether the gateway could be reached at all.
    fn unreachable(&self, url: &str, e: &hyper_util::client::legacy::Error) -> String {
        let mut cause: &dyn std::error::Error = e;
        while let Some(source) = cause.source() {
            cause = source;
        }
        let cause = cause.to_string();
        let cause = cause.split(" (os error").next().unwrap_or_default().to_lowercase();
        match e.is_connect() {
            true => format!("cannot reach the gateway at {}: is it running? ({cause})", self.gateway),
            false => format!("{url}: the gateway did not answer ({cause})"),
        }
    }

    /// An answer that is not the expected one, as Easemob's envelope says it.
    fn refused(status: StatusCode, body: &Value) -> String {
        match (body["error"].as_str(), body["error_description"].as_str()) {
            (Some(error), Some(description)) => format!("{status}: {error}: {description}"),
            _ => format!("{status}: {body}"),
        }
    }

    /// Reads operations from `file` (`-`: standard input): JSON lines, one `{"method", "path", "body"}` each, or one
    /// `{"operations": [...]}` document; submits them as one job and returns its URL.
    pub async fn submit(&self, file: &Path, idempotency_key: Option<&str>) -> Result<String, String> {
        let mut text = String::new();
        let read = match file.to_str() {
            Some("-") => std::io::stdin().read_to_string(&mut text),
            _ => std::fs::File::open(file).and_then(|mut f| f.read_to_string(&mut text)),
        };
        read.map_err(|e| format!("{}: {e}", file.display()))?;
        let operations = operations(&text).map_err(|e| format!("{}: {e}", file.display()))?;
        let count = operations.len();
        let body = serde_json::to_vec(&json!({ "operations": operations })).expect("JSON serializes");
        let extra: Vec<(&str, &str)> = idempotency_key.map(|k| ("idempotency-key", k)).into_iter().collect();
        let (status, job) = self.send(Method::POST, &self.jobs, Some(body), &extra).await?;
        if !matches!(status, StatusCode::ACCEPTED | StatusCode::OK) {
            return Err(Client::refused(status, &job));
        }
        let again = if status == StatusCode::OK { " (already submitted with this idempotency key)" } else { "" };
        eprintln!(
            "job {} accepted{again}: {count} operations as {} calls to Easemob, about {}s at the quotas' pace",
            job["id"].as_str().unwrap_or("?"),
            job["counts"]["total"],
            job["estimated_seconds"].as_u64().unwrap_or(0),
        );
        Ok(format!("{}{}", self.gateway, job["location"].as_str().unwrap_or_default()))
    }

    fn job_url(&self, id: &str) -> String {
        match id.starts_with("http://") {
            true => id.to_owned(),
            false => format!("{}/{id}", self.jobs),
        }
    }

    async fn job(&self, url: &str, query: &str) -> Result<Value, String> {
        let (status, job) = self.send(Method::GET, &format!("{url}{query}"), None, &[]).await?;
        match status {
            StatusCode::OK => Ok(job),
            _ => Err(Client::refused(status, &job)),
        }
    }

    /// Follows a job until it ends, with a progress bar on standard error; then its failures, if any.
    pub async fn watch(&self, id: &str) -> Result<(), Failure> {
        let url = self.job_url(id);
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{bar:40}] {pos}/{len} {rate} · {msg}")
                .expect("a valid template")
                .with_key("rate", |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = w.write_str(&rate(state.per_sec()));
                })
                .progress_chars("=> "),
        );
        let job = loop {
            let job = self.job(&url, "?limit=1").await?;
            let counts = &job["counts"];
            let count = |key: &str| counts[key].as_u64().unwrap_or(0);
            bar.set_length(count("total"));
            bar.set_position(count("succeeded") + count("failed") + count("cancelled"));
            let eta = job["estimated_seconds"].as_u64().map(|s| format!(" · about {s}s left")).unwrap_or_default();
            bar.set_message(format!(
                "{} · {} succeeded, {} failed{eta}",
                job["state"].as_str().unwrap_or("?"),
                count("succeeded"),
                count("failed")
            ));
            if !job["finished_ms"].is_null() {
                break job;
            }
            tokio::time::sleep(POLL).await;
        };
        bar.finish();
        self.report(&url, &job).await
    }

    /// Prints a finished job's outcome: a summary on standard error, its failures as JSON lines on standard output.
    async fn report(&self, url: &str, job: &Value) -> Result<(), Failure> {
        let counts = &job["counts"];
        let took = job["finished_ms"].as_i64().zip(job["created_ms"].as_i64()).map_or(0, |(f, c)| f - c);
        eprintln!(
            "job {} {}: {} succeeded, {} failed, {} cancelled, in {:.1}s",
            job["id"].as_str().unwrap_or("?"),
            job["state"].as_str().unwrap_or("?"),
            counts["succeeded"],
            counts["failed"],
            counts["cancelled"],
            took as f64 / 1000.0
        );
        if counts["failed"].as_u64().unwrap_or(0) > 0 {
            self.print_failures(url).await?;
            return Err(Failure::OperationsFailed);
        }
        match job["state"].as_str() {
            Some("cancelled") => Err(Failure::Cancelled),
            _ => Ok(()),
        }
    }

    /// Every failed operation: why on standard error, the operation itself on standard output.
    async fn print_failures(&self, url: &str) -> Result<(), String> {
        let mut from = 0;
        loop {
            let page = self.job(url, &format!("?operations=failed&from={from}&limit={PAGE}")).await?;
            let ops = page["operations"].as_array().cloned().unwrap_or_default();
            for op in &ops {
                eprintln!(
                    "operations[{}]: {} {}: {}",
                    op["index"],
                    op["status"],
                    op["error"].as_str().unwrap_or("-"),
                    op["error_description"].as_str().unwrap_or("-")
                );
                let mut again = json!({ "method": op["method"], "path": op["path"] });
                if !op["body"].is_null() {
                    again["body"] = op["body"].clone();
                }
                println!("{again}");
            }
            match (page.get("next"), ops.last()) {
                (Some(_), Some(last)) => from = last["index"].as_i64().unwrap_or(0) + 1,
                _ => return Ok(()),
            }
        }
    }

    /// The job as the gateway describes it (without its operations); `failed` prints its failures too.
    pub async fn show(&self, id: &str, failed: bool) -> Result<(), Failure> {
        let url = self.job_url(id);
        let mut job = self.job(&url, "?limit=1").await?;
        if let Some(fields) = job.as_object_mut() {
            fields.remove("operations");
            fields.remove("next");
        }
        println!("{}", serde_json::to_string_pretty(&job).expect("JSON serializes"));
        if failed {
            self.print_failures(&url).await?;
        }
        Ok(())
    }

    pub async fn list(&self, state: Option<&str>) -> Result<(), String> {
        let query = state.map(|s| format!("?state={s}")).unwrap_or_default();
        let (status, page) = self.send(Method::GET, &format!("{}{query}", self.jobs), None, &[]).await?;
        if status != StatusCode::OK {
            return Err(Client::refused(status, &page));
        }
        for job in page["jobs"].as_array().into_iter().flatten() {
            let counts = &job["counts"];
            println!(
                "{}  {:<9}  {} of {} done, {} failed",
                job["id"].as_str().unwrap_or("?"),
                job["state"].as_str().unwrap_or("?"),
                counts["succeeded"].as_u64().unwrap_or(0) + counts["failed"].as_u64().unwrap_or(0),
                counts["total"],
                counts["failed"]
            );
        }
        Ok(())
    }

    /// Prints a job's receipt, byte for byte as the gateway wrote it (its checksum covers them): JSON, or CSV.
    pub async fn receipt(&self, id: &str, csv: bool) -> Result<(), String> {
        let url = format!("{}/receipt{}", self.job_url(id), if csv { "?format=csv" } else { "" });
        let (status, body) = self.send_raw(Method::GET, &url, None, &[]).await?;
        if status != StatusCode::OK {
            let value =
                serde_json::from_slice(&body).unwrap_or_else(|_| json!({ "body": String::from_utf8_lossy(&body) }));
            return Err(Client::refused(status, &value));
        }
        std::io::stdout().write_all(&body).map_err(|e| format!("writing the receipt: {e}"))
    }

    /// Cancels a job, and says what that dropped: a job cancelled or finished before is left as it was.
    pub async fn cancel(&self, id: &str) -> Result<(), String> {
        let url = self.job_url(id);
        let before = self.job(&url, "?limit=1").await?;
        let id = before["id"].as_str().unwrap_or("?");
        if !before["finished_ms"].is_null() || before["state"] == "cancelled" {
            eprintln!("job {id} was already {}: nothing to cancel", before["state"].as_str().unwrap_or("?"));
            return Ok(());
        }
        let (status, job) = self.send(Method::POST, &format!("{url}/cancel"), None, &[]).await?;
        if status != StatusCode::OK {
            return Err(Client::refused(status, &job));
        }
        let dropped = |job: &Value| job["counts"]["cancelled"].as_u64().unwrap_or(0);
        eprintln!("job {id} cancelled: {} operations dropped", dropped(&job).saturating_sub(dropped(&before)));
        Ok(())
    }
}

/// Operations per second as a person reads them: whole numbers, a decimal only below 10.
fn rate(per_sec: f64) -> String {
    match per_sec {
        r if !r.is_finite() || r <= 0.0 => "0/s".to_owned(),
        r if r < 10.0 => format!("{r:.1}/s"),
        r => format!("{r:.0}/s"),
    }
}

/// JSON lines (blank lines and `#` comments skipped), or one `{"operations": [...]}` document.
fn operations(text: &str) -> Result<Vec<Value>, String> {
    if let Ok(Value::Object(document)) = serde_json::from_str::<Value>(text)
        && let Some(Value::Array(operations)) = document.get("operations")
    {
        return Ok(operations.clone());
    }
    let mut operations = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // The file's line, and where on it: serde's own message would add its line within this one line.
        let parsed = serde_json::from_str(line).map_err(|e| {
            let message = e.to_string();
            let message = message.rsplit_once(" at line ").map_or(message.as_str(), |(m, _)| m);
            format!("line {}, column {}: {message}", n + 1, e.column())
        })?;
        operations.push(parsed);
    }
    if operations.is_empty() {
        return Err("no operations".to_owned());
    }
    Ok(operations)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_come_as_json_lines_or_one_document() {
        let lines = "# spam cleanup\n{\"method\":\"POST\",\"path\":\"/a\"}\n\n{\"method\":\"POST\",\"path\":\"/b\"}\n";
        assert_eq!(operations(lines).unwrap().len(), 2);
        assert_eq!(operations("{\"operations\": [{\"method\":\"POST\",\"path\":\"/a\"}]}").unwrap().len(), 1);
        let bad = operations("{\"method\": 1}\nnot json").unwrap_err();
        assert_eq!(bad, "line 2, column 2: expected ident", "the file's line alone");
        assert_eq!(operations("\n# nothing\n").unwrap_err(), "no operations");
    }

    #[test]
    fn rates_are_rounded() {
        assert_eq!(rate(1201.3282), "1201/s");
        assert_eq!(rate(99.5), "100/s");
        assert_eq!(rate(4.26), "4.3/s");
        assert_eq!(rate(0.0), "0/s");
    }
}
