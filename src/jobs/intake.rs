//! A job request read as it arrives: the body goes chunk by chunk to a parser on a thread of its own, which takes
//! the operations one at a time, validates each into the calls the store will keep, counts them, and stops the
//! moment the job is over `jobs.max_operations`. The valid ones go on to be staged in the store in batches as they
//! come. Neither the whole body, nor a generic JSON tree of it, nor the list of its operations is ever held: what a
//! request costs is a batch of operations and one operation's text at a time, whatever its size.

use std::cell::Cell;
use std::fmt;
use std::future::Future;
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
use crate::error::GatewayError;
use crate::layers::validate::read_chunks;

/// One operation's text, with the spaces around it, is at most this long: far more than any operation needs (a
/// `msgIdList` of 10,000 IDs is about 200 KB), and what bounds the text the parser holds at once.
pub const MAX_OPERATION_BYTES: usize = 1024 * 1024;
/// Chunks read ahead of the parser: enough to keep it busy, few enough that they stay a few hundred KB.
const CHUNKS_AHEAD: usize = 8;
/// Bad operations named in one refusal; the count says how many more.
const MAX_REPORTED: usize = 20;
/// Operations staged in the store at once: a few hundred KB, and few enough writes for the largest job.
const BATCH: usize = 1000;

/// What the request asked for, validated, its operations staged.
pub struct Intake {
    /// How many operations were staged.
    pub operations: usize,
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

/// The thread job requests are parsed on, one at a time: one thread, so the memory one request's batches took
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
/// refused (413) as soon as it passes `limits.max_operations`. Its valid operations are handed to `stage` in order,
/// a batch at a time, as they are read; when the request is refused, some may have been staged already. A failure
/// to read the body wins over a failure to stage, which wins over what the parser made of the part it saw.
pub async fn read<B, S, Staged>(
    parser: &Parser,
    body: B,
    limits: &Limits,
    app: Arc<App>,
    now_ms: i64,
    digest: bool,
    mut stage: S,
) -> Result<Intake, GatewayError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    S: FnMut(usize, Vec<NewOperation>) -> Staged,
    Staged: Future<Output = Result<(), GatewayError>>,
{
    let (sender, received) = mpsc::channel::<Bytes>(CHUNKS_AHEAD);
    let (batches_out, mut batches) = mpsc::channel::<Vec<NewOperation>>(1);
    let max_operations = limits.max_operations;
    let parsed = parser.run(move || parse(Chunks::new(received, digest), &app, now_ms, max_operations, batches_out));
    // Staging ends when the parser drops its sender.
    let staging = async move {
        let mut staged = 0;
        while let Some(batch) = batches.recv().await {
            let n = batch.len();
            stage(staged, batch).await?;
            staged += n;
        }
        Ok::<(), GatewayError>(())
    };
    // A failure to stage is the answer at once, whatever the parser is doing.
    let stored = async {
        let ((), intake) = tokio::try_join!(staging, async { parsed.await.ok_or(GatewayError::Internal)? })?;
        Ok(intake)
    };
    tokio::pin!(stored);
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
            stored.await
        }
        // The parser ended before the body did: it has its answer (a refusal), and the rest is not read.
        stored = &mut stored => stored,
    }
}

/// The parse, on its blocking thread: the operations, or why the job is refused.
fn parse(
    mut chunks: Chunks,
    app: &App,
    now_ms: i64,
    max_operations: usize,
    batches: mpsc::Sender<Vec<NewOperation>>,
) -> Result<Intake, GatewayError> {
    let mut taken = Taken::new(app, now_ms, max_operations, Rc::clone(&chunks.left), batches);
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
    if taken.counted == 0 {
        return Err(invalid("illegal_argument", "a job needs at least one operation".to_owned()));
    }
    taken.send()?;
    let sha256 = chunks.digest.map(|digest| hex::encode(digest.finalize()));
    Ok(Intake { operations: taken.counted, sha256 })
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
    /// Valid operations not yet sent to be staged, and where they go.
    batch: Vec<NewOperation>,
    batches: mpsc::Sender<Vec<NewOperation>>,
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
        batches: mpsc::Sender<Vec<NewOperation>>,
    ) -> Taken<'a> {
        left.set(MAX_OPERATION_BYTES);
        Taken {
            app,
            now_ms,
            max_operations,
            left,
            seen: 0,
            counted: 0,
            batch: Vec::with_capacity(BATCH),
            batches,
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
                    self.batch.extend(batch);
                    if self.batch.len() >= BATCH && self.send().is_err() {
                        // Nothing more is read; the staging's failure is the answer.
                        self.left.set(0);
                        return Err("the store stopped taking operations".to_owned());
                    }
                }
            }
            Err(problem) => {
                self.bad += 1;
                self.batch = Vec::new();
                if self.reported.len() < MAX_REPORTED {
                    self.reported.push((index, problem));
                }
            }
        }
        if self.counted.max(self.seen) > self.max_operations {
            self.too_many = Some(self.counted.max(self.seen));
            self.batch = Vec::new();
            // Nothing more is read: after a visitor's error serde_json still looks for the array's end.
            self.left.set(0);
            return Err("too many operations".to_owned());
        }
        Ok(())
    }

    /// Sends the operations taken since the last batch to be staged. If staging has stopped, the parse stops too
    /// (the staging's failure is the answer).
    fn send(&mut self) -> Result<(), GatewayError> {
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH));
        if batch.is_empty() {
            return Ok(());
        }
        self.batches.blocking_send(batch).map_err(|_| GatewayError::Internal)
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

    /// Reads `body` under a cap of `max_operations`, staging with `stage`: answered within two minutes, far longer
    /// than a parse takes (a stalled body would wait an hour).
    async fn read_within<B, S, Staged>(body: B, max_operations: usize, stage: S) -> Result<Intake, GatewayError>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
        S: FnMut(usize, Vec<NewOperation>) -> Staged,
        Staged: Future<Output = Result<(), GatewayError>>,
    {
        let app = testing::app(&ScriptedFetch::granting(3600), &testing::quota(Default::default()));
        let limits = Limits { max_operations, max_body_bytes: 4 << 20, body_read_timeout: Duration::from_secs(3600) };
        let parser = Parser::start();
        let read = read(&parser, body, &limits, app, 0, true, stage);
        tokio::time::timeout(Duration::from_secs(120), read).await.expect("answered before the body ends")
    }

    async fn read_stalled(text: String) -> Result<Intake, GatewayError> {
        read_within(stalled(text), 5, |_, _| async { Ok(()) }).await
    }

    #[tokio::test]
    async fn operations_are_staged_in_order_a_batch_at_a_time() {
        let body = http_body_util::Full::new(Bytes::from(format!(r#"{{"operations": [{}]}}"#, clears(0..2500))));
        let batches = std::sync::Mutex::new(Vec::new());
        let stage = |from, batch: Vec<NewOperation>| {
            batches.lock().unwrap().push((from, batch.len(), batch[0].path.clone()));
            async { Ok(()) }
        };
        let intake = read_within(body, 5000, stage).await.unwrap();
        assert_eq!(intake.operations, 2500);
        assert!(intake.sha256.is_some());
        let batches = batches.into_inner().unwrap();
        let sizes: Vec<(usize, usize)> = batches.iter().map(|(from, n, _)| (*from, *n)).collect();
        assert_eq!(sizes, [(0, BATCH), (BATCH, BATCH), (2 * BATCH, 500)]);
        assert!(batches[1].2.contains(&format!("/u{BATCH}/")), "{}", batches[1].2);
    }

    #[tokio::test]
    async fn a_failure_to_stage_stops_the_read_and_is_the_answer() {
        let body = stalled(format!(r#"{{"operations": [{},"#, clears(0..1500)));
        let refused = read_within(body, 5000, |_, _| async { Err(GatewayError::JobsUnavailable) }).await;
        assert!(matches!(refused, Err(GatewayError::JobsUnavailable)), "{:?}", refused.err());
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
