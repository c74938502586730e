//! A job request read as it arrives: the body goes chunk by chunk to a parser on a blocking thread, which takes
//! the operations one at a time, validates each into the calls the store will keep, counts them, and stops the
//! moment the job is over `jobs.max_operations`. Neither the whole body nor a generic JSON tree of it is ever held:
//! what a request costs is the operations it is allowed to have, and one operation's text at a time.

use std::cell::Cell;
use std::fmt;
use std::io::{self, Read};
use std::ops::ControlFlow;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tower::BoxError;

use super::OperationRequest;
use super::records::NewOperation;
use crate::apps::App;
use crate::config::JobsConfig;
use crate::error::GatewayError;
use crate::routes::layer::read_chunks;

/// One operation's text, with the spaces around it, is at most this long: far more than any operation needs (a
/// `msgIdList` of 10,000 IDs is about 200 KB), and what bounds the text the parser holds at once.
pub const MAX_OPERATION_BYTES: usize = 1024 * 1024;
/// Chunks read ahead of the parser: enough to keep it busy, few enough that they stay a few hundred KB.
const CHUNKS_AHEAD: usize = 8;
/// Bad operations named in one refusal; the count says how many more.
const MAX_REPORTED: usize = 20;

/// What the request asked for, validated.
pub struct Intake {
    pub operations: Vec<NewOperation>,
    /// SHA-256 of the request body in hex, when asked for (an `Idempotency-Key` compares requests by it).
    pub sha256: Option<String>,
}

/// The limits a job request is read under.
pub struct Limits {
    pub max_operations: usize,
    pub max_body_bytes: usize,
    /// A client that stops sending its body cannot hold the request open longer than this.
    pub body_read_timeout: Duration,
}

/// The thread job requests are parsed on, one at a time: one thread, so the memory one request's operations took
/// (which the allocator keeps for the thread that took it) is what the next request reuses, instead of each landing
/// on another of tokio's blocking threads.
pub struct Parser(std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>);

impl Parser {
    /// Starts the thread; it ends when the parser is dropped.
    pub fn start() -> Parser {
        let (sender, work) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        std::thread::Builder::new()
            .name("job-intake".to_owned())
            .spawn(move || work.iter().for_each(|parse| parse()))
            .expect("a thread for job requests");
        Parser(sender)
    }

    /// Runs `parse` on the thread; its result, or `None` if the thread is gone.
    async fn run<T: Send + 'static>(&self, parse: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (done, result) = tokio::sync::oneshot::channel();
        self.0.send(Box::new(move || drop(done.send(parse())))).ok()?;
        result.await.ok()
    }
}

/// Reads and validates a job request for `app`: at most `limits.max_body_bytes` within `limits.body_read_timeout`,
/// refused (413) as soon as it passes `limits.max_operations`. A failure to read the body wins over what the parser
/// made of the part it saw.
pub async fn read<B>(
    parser: &Parser,
    body: B,
    limits: &Limits,
    app: Arc<App>,
    now_ms: i64,
    digest: bool,
) -> Result<Intake, GatewayError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let (sender, received) = mpsc::channel::<Bytes>(CHUNKS_AHEAD);
    let max_operations = limits.max_operations;
    // As many operations as the declared length can hold, at most the cap: reserved at once, so the list never
    // moves (doubling would leave each smaller copy behind); pages not yet written are not resident.
    let room = body.size_hint().upper().map_or(usize::MAX, |n| n as usize / JobsConfig::MIN_OPERATION_BYTES + 1);
    let operations = Vec::with_capacity(max_operations.min(room));
    let parsed = parser.run(move || parse(Chunks::new(received, digest), &app, now_ms, max_operations, operations));
    tokio::pin!(parsed);
    // The sender goes with the reading: once it ends (the body's end, or a failure), the parser sees the end.
    let reading = read_chunks(body, limits.body_read_timeout, limits.max_body_bytes, move |chunk| {
        let sender = sender.clone();
        async move { if sender.send(chunk).await.is_ok() { ControlFlow::Continue(()) } else { ControlFlow::Break(()) } }
    });
    tokio::pin!(reading);
    tokio::select! {
        // The reading first: a failure to read wins over what the parser made of the part it saw.
        biased;
        read = &mut reading => {
            read?;
            parsed.await.ok_or(GatewayError::Internal)?
        }
        // The parser ended before the body did: it has its answer (a refusal), and the rest is not read.
        parsed = &mut parsed => parsed.ok_or(GatewayError::Internal)?,
    }
}

/// The parse, on its blocking thread: the operations, or why the job is refused.
fn parse(
    mut chunks: Chunks,
    app: &App,
    now_ms: i64,
    max_operations: usize,
    operations: Vec<NewOperation>,
) -> Result<Intake, GatewayError> {
    let mut taken = Taken::new(app, now_ms, max_operations, Rc::clone(&chunks.left), operations);
    let mut json = serde_json::Deserializer::from_reader(&mut chunks);
    let parsed = Job(&mut taken).deserialize(&mut json).and_then(|()| json.end());
    if let Some(got) = taken.too_many {
        return Err(GatewayError::TooManyOperations { max: max_operations, got });
    }
    if taken.left.get() == 0 {
        return Err(GatewayError::OperationTooLarge { index: taken.seen, limit: MAX_OPERATION_BYTES });
    }
    parsed.map_err(|e| {
        invalid(
            "invalid_request_body",
            format!("a job is {{\"operations\": [{{\"method\", \"path\", \"body\"}}, …]}}: {e}"),
        )
    })?;
    if taken.bad > 0 {
        return Err(invalid("illegal_argument", report(&taken.reported, taken.bad)));
    }
    if taken.operations.is_empty() {
        return Err(invalid("illegal_argument", "a job needs at least one operation".to_owned()));
    }
    let sha256 = chunks.digest.map(|digest| hex::encode(digest.finalize()));
    Ok(Intake { operations: taken.operations, sha256 })
}

fn invalid(error: &'static str, description: String) -> GatewayError {
    GatewayError::InvalidJob { error, description }
}

/// The operations taken so far, and what stopped the parse.
struct Taken<'a> {
    app: &'a App,
    now_ms: i64,
    max_operations: usize,
    /// Bytes the current operation may still take (shared with the reader, which stops at none).
    left: Rc<Cell<usize>>,
    /// Operations seen in the request.
    seen: usize,
    /// Operations they come to (each batch of 50 message IDs counted).
    counted: usize,
    operations: Vec<NewOperation>,
    /// Bad operations: how many, and the first few by index.
    bad: usize,
    reported: Vec<(usize, String)>,
    /// Set when the job passed `max_operations`: how many it had come to by then.
    too_many: Option<usize>,
}

impl<'a> Taken<'a> {
    fn new(
        app: &'a App,
        now_ms: i64,
        max_operations: usize,
        left: Rc<Cell<usize>>,
        operations: Vec<NewOperation>,
    ) -> Taken<'a> {
        left.set(MAX_OPERATION_BYTES);
        Taken {
            app,
            now_ms,
            max_operations,
            left,
            seen: 0,
            counted: 0,
            operations,
            bad: 0,
            reported: Vec::new(),
            too_many: None,
        }
    }

    /// Validates one operation; `Err` stops the parse (the job is over `max_operations`).
    fn take(&mut self, text: &str) -> Result<(), String> {
        let index = self.seen;
        self.seen += 1;
        let checked = serde_json::from_str::<OperationRequest>(text)
            .map_err(|e| format!("not an operation ({{\"method\", \"path\", \"body\"}}): {e}"))
            .and_then(|op| super::operations(self.app, &op, self.now_ms).map_err(|e| e.to_string()));
        match checked {
            Ok(batch) => {
                self.counted += batch.len();
                // Once one is bad nothing will be accepted: the rest are only checked.
                if self.bad == 0 && self.counted <= self.max_operations {
                    self.operations.extend(batch);
                }
            }
            Err(problem) => {
                self.bad += 1;
                self.operations = Vec::new();
                if self.reported.len() < MAX_REPORTED {
                    self.reported.push((index, problem));
                }
            }
        }
        if self.counted.max(self.seen) > self.max_operations {
            self.too_many = Some(self.counted.max(self.seen));
            self.operations = Vec::new();
            // Nothing more is read: after a visitor's error serde_json still looks for the array's end.
            self.left.set(0);
            return Err("too many operations".to_owned());
        }
        Ok(())
    }
}

/// Every bad operation counted, the first few named by index.
fn report(reported: &[(usize, String)], bad: usize) -> String {
    let plural = if bad == 1 { "operation is" } else { "operations are" };
    let mut out = format!("{bad} {plural} invalid, so nothing was accepted: ");
    for (i, (index, problem)) in reported.iter().enumerate() {
        let separator = if i > 0 { "; " } else { "" };
        out.push_str(&format!("{separator}operations[{index}]: {problem}"));
    }
    if bad > reported.len() {
        out.push_str(&format!("; and {} more", bad - reported.len()));
    }
    out
}

/// `{"operations": [...]}`, and nothing else.
struct Job<'t, 'a>(&'t mut Taken<'a>);

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum Field {
    Operations,
}

impl<'de> DeserializeSeed<'de> for Job<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_struct("Job", &["operations"], self)
    }
}

impl<'de> Visitor<'de> for Job<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object with operations")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut found = false;
        while let Some(Field::Operations) = map.next_key()? {
            if found {
                return Err(de::Error::duplicate_field("operations"));
            }
            found = true;
            map.next_value_seed(Operations(&mut *self.0))?;
        }
        if !found {
            return Err(de::Error::missing_field("operations"));
        }
        Ok(())
    }
}

/// The operations array, taken one element at a time: each is held as its own text only while it is validated.
struct Operations<'t, 'a>(&'t mut Taken<'a>);

impl<'de> DeserializeSeed<'de> for Operations<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Operations<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of operations")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let taken = self.0;
        loop {
            taken.left.set(MAX_OPERATION_BYTES);
            let Some(operation) = seq.next_element::<Box<RawValue>>()? else { break };
            taken.take(operation.get()).map_err(de::Error::custom)?;
        }
        // What follows the array has a budget of its own.
        taken.left.set(MAX_OPERATION_BYTES);
        Ok(())
    }
}

/// The body's chunks as the parser reads them, stopping at the current operation's budget; each chunk is added to
/// the digest as it arrives (a request parsed to its end has had every chunk).
struct Chunks {
    received: mpsc::Receiver<Bytes>,
    current: Bytes,
    left: Rc<Cell<usize>>,
    digest: Option<Sha256>,
}

impl Chunks {
    fn new(received: mpsc::Receiver<Bytes>, digest: bool) -> Chunks {
        let left = Rc::new(Cell::new(MAX_OPERATION_BYTES));
        Chunks { received, current: Bytes::new(), left, digest: digest.then(Sha256::new) }
    }
}

impl Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.received.blocking_recv() {
                Some(chunk) => {
                    if let Some(digest) = &mut self.digest {
                        digest.update(&chunk);
                    }
                    self.current = chunk;
                }
                // The body's end, or the reader stopped (its error is the answer).
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len()).min(self.left.get());
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::other(format!("an operation is over {MAX_OPERATION_BYTES} bytes")));
        }
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        self.left.set(self.left.get() - n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use futures_util::{Stream, StreamExt, stream};
    use http_body::Frame;
    use http_body_util::StreamBody;

    use super::*;
    use crate::testing::{self, ScriptedFetch};

    /// A body that sends `text`, then nothing more and never ends.
    fn stalled(text: String) -> StreamBody<impl Stream<Item = Result<Frame<Bytes>, Infallible>>> {
        StreamBody::new(stream::iter([Ok(Frame::data(Bytes::from(text)))]).chain(stream::pending()))
    }

    fn clears(users: std::ops::Range<usize>) -> String {
        let ops: Vec<String> = users
            .map(|i| format!(r#"{{"method":"POST","path":"/rest/message/roaming/user/u{i}/delete/all"}}"#))
            .collect();
        ops.join(",")
    }

    async fn read_stalled(text: String) -> Result<Intake, GatewayError> {
        let app = testing::app(&ScriptedFetch::granting(3600), &testing::quota(Default::default()));
        let limits =
            Limits { max_operations: 5, max_body_bytes: 4 << 20, body_read_timeout: Duration::from_secs(3600) };
        // Far longer than a parse takes; the body itself would stall for an hour.
        tokio::time::timeout(Duration::from_secs(120), read(&Parser::start(), stalled(text), &limits, app, 0, false))
            .await
            .expect("answered before the body ends")
    }

    #[tokio::test]
    async fn a_job_is_refused_the_moment_it_passes_its_operation_cap_without_waiting_for_the_rest() {
        let refused = read_stalled(format!(r#"{{"operations": [{},"#, clears(0..6))).await;
        assert!(matches!(refused, Err(GatewayError::TooManyOperations { max: 5, got: 6 })), "{:?}", refused.err());
    }

    #[tokio::test]
    async fn one_operation_longer_than_any_can_be_is_refused_without_reading_it_whole() {
        let long = format!(r#"{{"operations": [{},{{"method": "POST", "path": "{}"#, clears(0..1), "x".repeat(2 << 20));
        let refused = read_stalled(long).await;
        assert!(
            matches!(refused, Err(GatewayError::OperationTooLarge { index: 1, limit: MAX_OPERATION_BYTES })),
            "{:?}",
            refused.err()
        );
    }

    #[test]
    fn bad_operations_are_reported_by_index_and_bounded() {
        let reported: Vec<(usize, String)> = (0..MAX_REPORTED).map(|i| (i * 2, "bad".to_owned())).collect();
        let report = report(&reported, 25);
        assert!(report.starts_with("25 operations are invalid"), "{report}");
        assert!(report.contains("operations[38]: bad") && !report.contains("operations[40]"), "{report}");
        assert!(report.ends_with("and 5 more"), "{report}");
    }
}
