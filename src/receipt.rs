//! A job's receipt, as a document of its own: what was deleted, when, by whom, with what answer, and where each
//! attempt's audit events are. Written a page of operations at a time (a job may hold 100,000), as JSON or CSV,
//! each with the SHA-256 of its content, so that a copy kept elsewhere can be checked later (`audit verify
//! --receipt`, which reads it back here).
//!
//! JSON: `{"receipt":R,"sha256":H}`, where H is the hex SHA-256 of R's bytes exactly as written (compact, keys in
//! the order below). CSV: a header, one row per attempt (or per operation never attempted), then a last line
//! `# sha256 H` with the SHA-256 of every byte before it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `format` of the receipts this version writes.
pub const FORMAT: &str = "easemob-gateway job receipt 1";

/// The job, at the head of its receipt.
#[derive(Serialize)]
pub struct Job<'a> {
    pub id: &'a str,
    pub app: &'a str,
    pub state: &'a str,
    pub created: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
    /// The caller key's name or `X-Caller`, else the peer address it was created from.
    pub caller: &'a str,
    pub operations: i64,
}

/// One operation: what it asked Easemob to delete, and what became of it.
#[derive(Serialize)]
pub struct Operation<'a> {
    pub index: i64,
    pub route: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<&'a serde_json::Value>,
    /// The route's parameters, as validation read them: owner, peer or group or channel, message IDs, time, …
    pub params: serde_json::Map<String, serde_json::Value>,
    pub state: &'a str,
    pub caller: &'a str,
    pub attempts: Vec<Attempt<'a>>,
}

#[derive(Serialize)]
pub struct Attempt<'a> {
    /// 1, 2, …: the scheduler's attempt, as the audit event's `job_attempt` numbers it.
    pub attempt: u32,
    pub at: String,
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub easemob_request_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub easemob_timestamp: Option<i64>,
    /// The replica whose audit chain holds its events.
    pub replica: &'a str,
    pub audit_seqs: &'a [u64],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
}

/// Writes a receipt in pieces, hashing what it writes.
pub struct Writer {
    format: Format,
    hash: Sha256,
    operations: usize,
}

const CSV_HEADER: &[&str] = &[
    "job_id",
    "app",
    "job_state",
    "index",
    "route",
    "method",
    "path",
    "body",
    "params",
    "state",
    "caller",
    "attempt",
    "at",
    "status",
    "easemob_request_id",
    "easemob_timestamp",
    "replica",
    "audit_seqs",
];

impl Writer {
    /// The receipt's start: the job.
    pub fn start(format: Format, job: &Job<'_>, generated: String) -> (Writer, Vec<u8>) {
        let mut writer = Writer { format, hash: Sha256::new(), operations: 0 };
        let bytes = match format {
            Format::Json => {
                #[derive(Serialize)]
                struct Head<'a> {
                    format: &'a str,
                    generated: String,
                    gateway: &'a str,
                    job: &'a Job<'a>,
                }
                let head = Head { format: FORMAT, generated, gateway: env!("CARGO_PKG_VERSION"), job };
                let mut head = serde_json::to_vec(&head).expect("a receipt serializes");
                head.pop(); // the closing brace: the operations follow
                head.extend_from_slice(b",\"operations\":[");
                writer.hash.update(&head);
                let mut bytes = b"{\"receipt\":".to_vec();
                bytes.extend_from_slice(&head);
                bytes
            }
            Format::Csv => {
                let mut header = csv_rows();
                header.write_record(CSV_HEADER).expect("writing to memory");
                writer.hashed(header.into_inner().expect("writing to memory"))
            }
        };
        (writer, bytes)
    }

    /// A page of operations, of `job`.
    pub fn operations(&mut self, job: &Job<'_>, operations: &[Operation<'_>]) -> Vec<u8> {
        let bytes = match self.format {
            Format::Json => {
                let mut bytes = Vec::new();
                for op in operations {
                    if self.operations > 0 {
                        bytes.push(b',');
                    }
                    serde_json::to_writer(&mut bytes, op).expect("a receipt serializes");
                    self.operations += 1;
                }
                bytes
            }
            Format::Csv => {
                let mut rows = csv_rows();
                for op in operations {
                    let (index, params) = (op.index.to_string(), serde_json::to_string(&op.params).expect("JSON"));
                    let body = op.body.map(|b| b.to_string()).unwrap_or_default();
                    let the_op = [job.id, job.app, job.state, &index, op.route, op.method, op.path, &body, &params];
                    let the_op = the_op.into_iter().chain([op.state, op.caller]);
                    // One row per attempt; an operation never attempted has one of its own.
                    let attempts: Vec<Option<&Attempt<'_>>> = match op.attempts.is_empty() {
                        true => vec![None],
                        false => op.attempts.iter().map(Some).collect(),
                    };
                    for attempt in attempts {
                        let cells = attempt_cells(attempt);
                        let row = the_op.clone().chain(cells.iter().map(String::as_str));
                        rows.write_record(row).expect("writing to memory");
                    }
                }
                rows.into_inner().expect("writing to memory")
            }
        };
        self.hashed(bytes)
    }

    /// The receipt's end, with its SHA-256.
    pub fn finish(self) -> Vec<u8> {
        match self.format {
            Format::Json => {
                let hash = self.hash.chain_update(b"]}").finalize();
                format!("]}},\"sha256\":\"{}\"}}\n", hex::encode(hash)).into_bytes()
            }
            Format::Csv => format!("# sha256 {}\n", hex::encode(self.hash.finalize())).into_bytes(),
        }
    }

    fn hashed(&mut self, bytes: Vec<u8>) -> Vec<u8> {
        self.hash.update(&bytes);
        bytes
    }
}

/// CSV rows as RFC 4180 writes them (a cell with a comma, a quote or a line break is quoted; CRLF ends a row).
fn csv_rows() -> csv::Writer<Vec<u8>> {
    csv::WriterBuilder::new().terminator(csv::Terminator::CRLF).from_writer(Vec::new())
}

/// An attempt's cells of its row (empty for an operation never attempted).
fn attempt_cells(attempt: Option<&Attempt<'_>>) -> [String; 7] {
    let Some(a) = attempt else { return Default::default() };
    [
        a.attempt.to_string(),
        a.at.clone(),
        a.status.map(|s| s.to_string()).unwrap_or_default(),
        a.easemob_request_id.unwrap_or_default().to_owned(),
        a.easemob_timestamp.map(|t| t.to_string()).unwrap_or_default(),
        a.replica.to_owned(),
        a.audit_seqs.iter().map(u64::to_string).collect::<Vec<_>>().join(" "),
    ]
}

/// One attempt of a receipt, as `audit verify --receipt` checks it.
#[derive(Debug, PartialEq, Eq)]
pub struct ReceiptLine {
    pub job_id: String,
    pub app: String,
    pub index: i64,
    pub route: String,
    pub attempt: u32,
    pub status: Option<u16>,
    pub replica: String,
    pub audit_seqs: Vec<u64>,
}

/// Reads a receipt (JSON or CSV) back, once its SHA-256 holds: its attempts.
pub fn lines(bytes: &[u8]) -> Result<Vec<ReceiptLine>, String> {
    if bytes.first() == Some(&b'{') { json_lines(bytes) } else { csv_lines(bytes) }
}

fn json_lines(bytes: &[u8]) -> Result<Vec<ReceiptLine>, String> {
    #[derive(Deserialize)]
    struct Signed<'a> {
        #[serde(borrow)]
        receipt: &'a serde_json::value::RawValue,
        sha256: String,
    }
    #[derive(Deserialize)]
    struct Receipt {
        job: JobRef,
        operations: Vec<OperationRef>,
    }
    #[derive(Deserialize)]
    struct JobRef {
        id: String,
        app: String,
    }
    #[derive(Deserialize)]
    struct OperationRef {
        index: i64,
        route: String,
        attempts: Vec<AttemptRef>,
    }
    #[derive(Deserialize)]
    struct AttemptRef {
        attempt: u32,
        status: Option<u16>,
        replica: String,
        audit_seqs: Vec<u64>,
    }
    let signed: Signed<'_> = serde_json::from_slice(bytes).map_err(|e| format!("not a JSON receipt: {e}"))?;
    let sha256 = hex::encode(Sha256::digest(signed.receipt.get().as_bytes()));
    if sha256 != signed.sha256 {
        return Err(format!("its sha256 {} is not that of its content ({sha256}): it was changed", signed.sha256));
    }
    let receipt: Receipt = serde_json::from_str(signed.receipt.get()).map_err(|e| format!("not a receipt: {e}"))?;
    let mut lines = Vec::new();
    for op in receipt.operations {
        for a in op.attempts {
            lines.push(ReceiptLine {
                job_id: receipt.job.id.clone(),
                app: receipt.job.app.clone(),
                index: op.index,
                route: op.route.clone(),
                attempt: a.attempt,
                status: a.status,
                replica: a.replica,
                audit_seqs: a.audit_seqs,
            });
        }
    }
    Ok(lines)
}

fn csv_lines(bytes: &[u8]) -> Result<Vec<ReceiptLine>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not a receipt: not UTF-8".to_owned())?;
    let body_end = text.trim_end_matches('\n').rfind('\n').map_or(0, |i| i + 1);
    let claimed =
        text[body_end..].trim_end().strip_prefix("# sha256 ").ok_or("not a CSV receipt: no `# sha256` line")?;
    let sha256 = hex::encode(Sha256::digest(&bytes[..body_end]));
    if sha256 != claimed {
        return Err(format!("its sha256 {claimed} is not that of its content ({sha256}): it was changed"));
    }
    let mut reader = csv::Reader::from_reader(&bytes[..body_end]);
    let headers = reader.headers().map_err(|e| format!("not a CSV receipt: {e}"))?.clone();
    let column = |name: &str| headers.iter().position(|h| h == name).ok_or(format!("no {name} column"));
    let [job, app, index, route, attempt, status, replica, seqs] =
        ["job_id", "app", "index", "route", "attempt", "status", "replica", "audit_seqs"].map(column);
    let (job, app, index, route, attempt, status, replica, seqs) =
        (job?, app?, index?, route?, attempt?, status?, replica?, seqs?);
    let mut lines = Vec::new();
    for (n, row) in reader.records().enumerate() {
        let row = row.map_err(|e| format!("row {}: {e}", n + 2))?;
        let bad = |what: &str| format!("row {}: bad {what}", n + 2);
        if row[attempt].is_empty() {
            continue;
        }
        lines.push(ReceiptLine {
            job_id: row[job].to_owned(),
            app: row[app].to_owned(),
            index: row[index].parse().map_err(|_| bad("index"))?,
            route: row[route].to_owned(),
            attempt: row[attempt].parse().map_err(|_| bad("attempt"))?,
            status: match &row[status] {
                "" => None,
                s => Some(s.parse().map_err(|_| bad("status"))?),
            },
            replica: row[replica].to_owned(),
            audit_seqs: row[seqs]
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .map_err(|_| bad("audit_seqs"))?,
        });
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job<'static> {
        Job {
            id: "j1",
            app: "org#app",
            state: "done",
            created: "2026-12-06T10:00:00.000Z".into(),
            finished: None,
            caller: "billing",
            operations: 1,
        }
    }

    fn write(format: Format) -> Vec<u8> {
        let job = job();
        let seqs = [7, 8];
        let body = serde_json::json!({"channel": "b, c", "type": "chat", "delete_roam": true});
        let op = Operation {
            index: 0,
            route: "delete_conversation",
            method: "DELETE",
            path: "/users/a/user_channel",
            body: Some(&body),
            params: serde_json::Map::new(),
            state: "succeeded",
            caller: "billing",
            attempts: vec![Attempt {
                attempt: 1,
                at: "2026-12-06T10:00:01.000Z".into(),
                status: Some(200),
                easemob_request_id: None,
                easemob_timestamp: Some(1),
                replica: "gw-0",
                audit_seqs: &seqs,
            }],
        };
        let (mut writer, mut bytes) = Writer::start(format, &job, "now".into());
        bytes.extend(writer.operations(&job, &[op]));
        bytes.extend(writer.finish());
        bytes
    }

    #[test]
    fn a_receipt_reads_back_in_either_format_and_a_change_shows() {
        for format in [Format::Json, Format::Csv] {
            let bytes = write(format);
            let lines =
                lines(&bytes).unwrap_or_else(|e| panic!("{format:?}: {e}\n{}", String::from_utf8_lossy(&bytes)));
            let expected = ReceiptLine {
                job_id: "j1".into(),
                app: "org#app".into(),
                index: 0,
                route: "delete_conversation".into(),
                attempt: 1,
                status: Some(200),
                replica: "gw-0".into(),
                audit_seqs: vec![7, 8],
            };
            assert_eq!(lines, vec![expected], "{format:?}");
            let text = String::from_utf8(bytes).unwrap();
            let changed = text.replacen("200", "500", 1);
            assert!(super::lines(changed.as_bytes()).unwrap_err().contains("was changed"), "{format:?}");
        }
    }
}
