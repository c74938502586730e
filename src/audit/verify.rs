//! `easemob-gateway audit verify FILE…`: checks the audit chain across the files given (oldest first, each
//! replica's files forming a chain of their own), against anchors kept elsewhere and the head files beside them,
//! and optionally a job receipt against the events it names.
//!
//! Exit codes: 0 the chain is intact (and every anchor and receipt line matches); 1 it is broken, or an anchor or
//! a receipt line does not match; 2 a file could not be read.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::chain::{self, Head, Link};
use crate::receipt::{self, ReceiptLine};

/// What `verify` was asked to check.
pub struct Request {
    /// The audit files, oldest first.
    pub files: Vec<PathBuf>,
    /// Heads copied elsewhere (`SEQ:HASH`), each of which some chain must hold.
    pub anchors: Vec<Head>,
    /// A job receipt (JSON or CSV) whose every attempt must be found in the chains.
    pub receipt: Option<PathBuf>,
}

/// Why the chain is not intact: where, and what was found there.
#[derive(Debug, PartialEq, Eq)]
pub struct Broken {
    pub file: PathBuf,
    /// 1-based; 0 when the break is not at one line (a file missing, an anchor beyond the end).
    pub line: usize,
    pub what: Break,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Break {
    /// The line's `prev` is not the hash of the line before it: one of them was changed.
    Changed { seq: u64 },
    /// Sequence numbers skipped: lines deleted here, or (at a file's start) a file missing or cut short before it.
    Missing { from: u64, to: u64 },
    /// A sequence number at or below the last one: lines reordered or repeated.
    OutOfOrder { seq: u64, after: u64 },
    /// Not an audit event, and not a line cut short that the gateway recorded as torn.
    NotAnEvent,
    /// An anchor the chains do not hold: the event at its `seq` differs, or the chain ends before it.
    Anchor { anchor: Head, found: Option<Head> },
    /// A receipt's line that its audit events do not bear out.
    Receipt { line: String, why: String },
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = match self.line {
            0 => self.file.display().to_string(),
            line => format!("{}:{line}", self.file.display()),
        };
        match &self.what {
            Break::Changed { seq } => write!(
                f,
                "{at}: seq {seq} does not follow the line before it (its prev is not that line's hash): one of the two \
                 was changed after it was written"
            ),
            Break::Missing { from, to } if self.line == 1 => write!(
                f,
                "{at}: the file starts at seq {} but seq {from}..={to} are missing before it: a file is missing \
                 between it and the one given before it, or that one was cut short",
                to + 1
            ),
            Break::Missing { from, to } => write!(f, "{at}: seq {from}..={to} are missing here: lines were deleted"),
            Break::OutOfOrder { seq, after } => {
                write!(f, "{at}: seq {seq} comes after seq {after}: lines were reordered or repeated")
            }
            Break::NotAnEvent => write!(f, "{at}: not an audit event of the chain"),
            Break::Anchor { anchor, found: Some(found) } => write!(
                f,
                "anchor {anchor}: the chain holds {found} at that seq instead: it was rewritten after the anchor was taken"
            ),
            Break::Anchor { anchor, found: None } => write!(
                f,
                "anchor {anchor}: no chain given reaches seq {}: the files end before it (cut short, or a newer file \
                 is missing)",
                anchor.seq
            ),
            Break::Receipt { line, why } => write!(f, "receipt {at}, {line}: {why}"),
        }
    }
}

/// An intact check's summary.
#[derive(Debug, Default)]
pub struct Summary {
    /// Per replica: its chain's first and last seq, and the time span.
    pub chains: BTreeMap<String, Span>,
    /// Events per route and outcome.
    pub deletions: BTreeMap<(String, String), u64>,
    /// Lines a crash cut short, as recorded by the gateway when it next started (file:line).
    pub torn: Vec<String>,
    /// A last line cut short that no restart has recorded yet (file:line).
    pub unrecorded_torn: Option<String>,
    /// Lines written before the chain began (an older gateway's), not covered by it.
    pub unchained: u64,
    pub anchors: Vec<String>,
    pub receipt: Option<String>,
}

#[derive(Debug, Default)]
pub struct Span {
    pub events: u64,
    pub first: u64,
    pub last: u64,
    pub from: String,
    pub to: String,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (replica, span) in &self.chains {
            writeln!(
                f,
                "intact: replica {replica}: {} events, seq {}..={}, {} to {}",
                span.events, span.first, span.last, span.from, span.to
            )?;
        }
        if self.unchained > 0 {
            writeln!(
                f,
                "{} lines before the chain began (written by a gateway without it): not covered",
                self.unchained
            )?;
        }
        for at in &self.torn {
            writeln!(f, "torn: {at}: a line cut short by a crash, recorded by the gateway's next start")?;
        }
        if let Some(at) = &self.unrecorded_torn {
            writeln!(
                f,
                "torn: {at}: the last line is cut short (a crash); the gateway records it when it next starts"
            )?;
        }
        writeln!(f, "deletions by route and outcome:")?;
        for ((route, outcome), n) in &self.deletions {
            writeln!(f, "  {route} {outcome}: {n}")?;
        }
        for anchor in &self.anchors {
            writeln!(f, "{anchor}")?;
        }
        if let Some(receipt) = &self.receipt {
            writeln!(f, "{receipt}")?;
        }
        Ok(())
    }
}

/// Why `verify` could not tell.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct Unreadable {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// The parts of an event a receipt is checked against.
struct Seen {
    request_id: String,
    app: String,
    route: String,
    job_attempt: Option<u32>,
    upstream_status: Option<u16>,
}

/// One chain being followed.
struct Chain {
    head: Option<Head>,
    /// The last line read, should the next one record it as torn.
    pending_torn: Option<(PathBuf, usize, Vec<u8>)>,
}

/// Checks the chain(s) of `request.files`; `Err(Ok(broken))` for a broken one, `Err(Err(e))` when a file could not
/// be read.
pub fn verify(request: &Request) -> Result<Summary, Result<Broken, Unreadable>> {
    let mut summary = Summary::default();
    let mut chains: HashMap<String, Chain> = HashMap::new();
    let receipt = match &request.receipt {
        Some(path) => Some((path, read_receipt(path)?)),
        None => None,
    };
    // Only the events a receipt names are kept.
    let wanted = receipt.as_ref().map(|(_, lines)| lines.first().map(|l| format!("job-{}.", l.job_id)));
    let mut seen: HashMap<(String, u64), Seen> = HashMap::new();
    // The head files beside the files are anchors too (on the same machine: they catch a file cut short, not a
    // rewrite).
    let mut anchors: Vec<Head> = request.anchors.clone();
    anchors.extend(request.files.iter().filter_map(|path| chain::read_head_file(path)).map(|(head, _)| head));
    // Before the first event, every chain holds it.
    anchors.retain(|anchor| *anchor != Head::GENESIS);
    // The chains' heads at the anchors' seqs.
    let mut at_anchors: Vec<(String, Head)> = Vec::new();
    for path in &request.files {
        let bytes = std::fs::read(path).map_err(|source| Err(Unreadable { path: path.clone(), source }))?;
        let mut lines = bytes.split(|&b| b == b'\n').enumerate().peekable();
        while let Some((index, line)) = lines.next() {
            let number = index + 1;
            if lines.peek().is_none() {
                if !line.is_empty() {
                    summary.unrecorded_torn = Some(format!("{}:{number}", path.display()));
                }
                break;
            }
            let broken = |what| Err(Ok(Broken { file: path.clone(), line: number, what }));
            let Ok(link) = serde_json::from_slice::<Link>(line) else {
                // A line a crash cut short (its record follows it), or one written before the chain began.
                if serde_json::from_slice::<serde_json::Value>(line).is_ok_and(|v| v.get("seq").is_none()) {
                    if chains.iter().any(|(replica, c)| !replica.is_empty() && c.head.is_some()) {
                        return broken(Break::NotAnEvent);
                    }
                    summary.unchained += 1;
                    chains.entry(String::new()).or_insert(Chain { head: None, pending_torn: None }).head =
                        Some(Head::of(0, line));
                    continue;
                }
                let next = lines.peek().and_then(|(_, next)| serde_json::from_slice::<Link>(next).ok());
                match next {
                    Some(next) if next.torn_bytes == Some(line.len()) => {
                        let chain = chains.entry(next.replica).or_insert(Chain { head: None, pending_torn: None });
                        chain.pending_torn = Some((path.clone(), number, line.to_vec()));
                        continue;
                    }
                    _ => return broken(Break::NotAnEvent),
                }
            };
            // Lines before the chain began belong to the first replica's chain.
            let legacy = chains.remove("").and_then(|c| c.head);
            let chain = chains.entry(link.replica.clone()).or_insert(Chain { head: legacy, pending_torn: None });
            let (expected_prev, expected_seq) = match (chain.pending_torn.take(), chain.head) {
                (Some((file, line_no, torn)), head) => {
                    summary.torn.push(format!("{}:{line_no}", file.display()));
                    (Some(Head::of(0, &torn).hash), head.map(|h| h.seq + 1))
                }
                (None, Some(head)) => (Some(head.hash), Some(head.seq + 1)),
                // The first line given: it may follow a file not given.
                (None, None) => (None, None),
            };
            if let Some(expected) = expected_seq {
                if link.seq < expected {
                    return broken(Break::OutOfOrder { seq: link.seq, after: expected - 1 });
                }
                if link.seq > expected {
                    return broken(Break::Missing { from: expected, to: link.seq - 1 });
                }
            }
            if expected_prev.is_some_and(|prev| hex::encode(prev) != link.prev) {
                return broken(Break::Changed { seq: link.seq });
            }
            let head = Head::of(link.seq, line);
            chain.head = Some(head);
            if anchors.iter().any(|anchor| anchor.seq == link.seq) {
                at_anchors.push((link.replica.clone(), head));
            }
            count(&mut summary, &link, line);
            if let Some(Some(prefix)) = &wanted {
                keep(&mut seen, &link, line, prefix);
            }
        }
    }
    let last_file = request.files.last().cloned().unwrap_or_default();
    check_anchors(&mut summary, &anchors, &at_anchors).map_err(|what| Ok(Broken { file: last_file, line: 0, what }))?;
    if let Some((path, lines)) = receipt {
        summary.receipt = Some(check_receipt(path, &lines, &seen).map_err(Ok)?);
    }
    Ok(summary)
}

/// A receipt's attempts, once its checksum holds.
fn read_receipt(path: &PathBuf) -> Result<Vec<ReceiptLine>, Result<Broken, Unreadable>> {
    let bytes = std::fs::read(path).map_err(|source| Err(Unreadable { path: path.clone(), source }))?;
    receipt::lines(&bytes).map_err(|why| {
        Ok(Broken { file: path.clone(), line: 0, what: Break::Receipt { line: "the file".into(), why } })
    })
}

/// Checks that a chain holds each anchor: `at_anchors` are the chains' heads at the anchors' seqs.
fn check_anchors(summary: &mut Summary, anchors: &[Head], at_anchors: &[(String, Head)]) -> Result<(), Break> {
    let earliest = summary.chains.values().map(|span| span.first).min();
    for &anchor in anchors {
        let found = at_anchors.iter().find(|(_, head)| head.seq == anchor.seq).map(|(_, head)| *head);
        match at_anchors.iter().find(|(_, head)| *head == anchor) {
            Some((replica, _)) => summary.anchors.push(format!("anchor {anchor}: held by replica {replica}'s chain")),
            // From before the files given (a head saved before the last rotation, say): nothing to check it with.
            None if found.is_none() && earliest.is_some_and(|first| anchor.seq < first) => {
                summary.anchors.push(format!("anchor {anchor}: before the first file given, not checked"))
            }
            None => return Err(Break::Anchor { anchor, found }),
        }
    }
    Ok(())
}

/// Adds an event to the summary.
fn count(summary: &mut Summary, link: &Link, line: &[u8]) {
    #[derive(serde::Deserialize)]
    struct Fields {
        time: Option<String>,
        route: Option<String>,
        outcome: Option<String>,
    }
    let fields: Fields = serde_json::from_slice(line).unwrap_or(Fields { time: None, route: None, outcome: None });
    let span = summary.chains.entry(link.replica.clone()).or_default();
    if span.events == 0 {
        (span.first, span.from) = (link.seq, fields.time.clone().unwrap_or_default());
    }
    span.events += 1;
    (span.last, span.to) = (link.seq, fields.time.unwrap_or_default());
    if let (Some(route), Some(outcome)) = (fields.route, fields.outcome) {
        *summary.deletions.entry((route, outcome)).or_default() += 1;
    }
}

/// Keeps what a receipt is checked against, for the events of its job.
fn keep(seen: &mut HashMap<(String, u64), Seen>, link: &Link, line: &[u8], job_prefix: &str) {
    #[derive(serde::Deserialize)]
    struct Fields {
        request_id: String,
        app: String,
        route: String,
        job_attempt: Option<u32>,
        upstream_status: Option<u16>,
    }
    if let Ok(f) = serde_json::from_slice::<Fields>(line)
        && f.request_id.starts_with(job_prefix)
    {
        let event = Seen {
            request_id: f.request_id,
            app: f.app,
            route: f.route,
            job_attempt: f.job_attempt,
            upstream_status: f.upstream_status,
        };
        seen.insert((link.replica.clone(), link.seq), event);
    }
}

/// Finds every audited attempt of the receipt among the events, and checks it is what they say.
fn check_receipt(path: &Path, lines: &[ReceiptLine], seen: &HashMap<(String, u64), Seen>) -> Result<String, Broken> {
    let mut events = 0;
    let mut unaudited = 0;
    for line in lines {
        let broken = |why: String| Broken {
            file: path.to_owned(),
            line: 0,
            what: Break::Receipt { line: format!("operation {} attempt {}", line.index, line.attempt), why },
        };
        if line.audit_seqs.is_empty() {
            unaudited += 1;
            continue;
        }
        let request_id = format!("job-{}.{}", line.job_id, line.index);
        for (i, seq) in line.audit_seqs.iter().enumerate() {
            let Some(event) = seen.get(&(line.replica.clone(), *seq)) else {
                return Err(broken(format!("replica {}'s seq {seq} is not in the audit files given", line.replica)));
            };
            let mut wrong = String::new();
            if event.request_id != request_id {
                let _ = write!(wrong, " request_id {} (not {request_id})", event.request_id);
            }
            if event.app != line.app || event.route != line.route {
                let _ = write!(wrong, " app/route {}/{} (not {}/{})", event.app, event.route, line.app, line.route);
            }
            if event.job_attempt != Some(line.attempt) {
                let _ = write!(wrong, " job_attempt {:?} (not {})", event.job_attempt, line.attempt);
            }
            let last = i + 1 == line.audit_seqs.len();
            if last && event.upstream_status.is_some() && event.upstream_status != line.status {
                let _ = write!(wrong, " status {:?} (not {:?})", event.upstream_status, line.status);
            }
            if !wrong.is_empty() {
                return Err(broken(format!("replica {}'s seq {seq} says{wrong}", line.replica)));
            }
            events += 1;
        }
    }
    Ok(format!(
        "receipt {}: its checksum holds; {} attempts, {events} audit events found and matching; {unaudited} attempts \
         without audit events (not sent to Easemob, or audit off)",
        path.display(),
        lines.len()
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::audit::{Audit, Event};
    use crate::config::AuditConfig;
    use crate::exchange::AttemptKind;
    use crate::metrics::Metrics;

    fn event(n: u32) -> Event {
        Event {
            time: format!("2026-12-06T10:00:{n:02}.000Z"),
            request_id: format!("r{n}"),
            trace_id: "0".repeat(32),
            caller: "svc".into(),
            app: "org#app".into(),
            route: "clear_user_messages",
            owner: format!("user{n}"),
            peer: None,
            group: None,
            channel: None,
            conversation_type: None,
            delete_roam: None,
            message_ids: None,
            del_time: None,
            is_notify: None,
            upstream_status: Some(200),
            outcome: "accepted",
            attempt: 1,
            attempt_kind: AttemptKind::First,
            job_attempt: None,
        }
    }

    fn open(file: &Path) -> Arc<Audit> {
        let config = AuditConfig { file: Some(file.to_owned()), replica: Some("gw-0".into()), ..Default::default() };
        Audit::open(&config, Metrics::new()).unwrap().unwrap()
    }

    /// Writes events `from..=to` to `file`.
    fn write(file: &Path, from: u32, to: u32) -> Arc<Audit> {
        let audit = open(file);
        for n in from..=to {
            audit.write(&event(n)).unwrap();
        }
        audit
    }

    fn check(files: &[&Path], anchors: &[Head]) -> Result<Summary, Broken> {
        let request = Request {
            files: files.iter().map(|f| f.to_path_buf()).collect(),
            anchors: anchors.to_vec(),
            receipt: None,
        };
        verify(&request).map_err(|e| e.unwrap())
    }

    fn rewrite(file: &Path, change: impl FnOnce(&mut Vec<String>)) {
        let mut lines: Vec<String> = std::fs::read_to_string(file).unwrap().lines().map(str::to_owned).collect();
        change(&mut lines);
        std::fs::write(file, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    }

    #[test]
    fn an_intact_chain_is_summed_up() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.jsonl");
        write(&file, 1, 5);
        // A restart goes on with the same chain.
        let audit = write(&file, 6, 7);
        let summary = check(&[&file], &[audit.head()]).unwrap();
        let span = &summary.chains["gw-0"];
        assert_eq!((span.events, span.first, span.last), (7, 1, 7));
        assert_eq!((span.from.as_str(), span.to.as_str()), ("2026-12-06T10:00:01.000Z", "2026-12-06T10:00:07.000Z"));
        assert_eq!(summary.deletions[&("clear_user_messages".into(), "accepted".into())], 7);
        let first: serde_json::Value =
            serde_json::from_str(std::fs::read_to_string(&file).unwrap().lines().next().unwrap()).unwrap();
        assert_eq!(
            (&first["seq"], &first["prev"], &first["replica"]),
            (&1.into(), &"0".repeat(64).into(), &"gw-0".into())
        );
    }

    #[test]
    fn an_edited_deleted_or_reordered_line_breaks_the_chain_where_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.jsonl");
        type Tamper = fn(&mut Vec<String>);
        let cases: [(&str, Tamper, usize, Break); 4] = [
            ("edited", |l| l[2] = l[2].replace("user3", "user9"), 4, Break::Changed { seq: 4 }),
            ("deleted", |l| drop(l.remove(2)), 3, Break::Missing { from: 3, to: 3 }),
            ("reordered", |l| l.swap(2, 3), 3, Break::Missing { from: 3, to: 3 }),
            ("repeated", |l| l.insert(3, l[2].clone()), 4, Break::OutOfOrder { seq: 3, after: 3 }),
        ];
        for (what, change, line, expected) in cases {
            write(&file, 1, 5);
            rewrite(&file, change);
            let broken = check(&[&file], &[]).unwrap_err();
            assert_eq!((broken.line, broken.what), (line, expected), "{what}");
            std::fs::remove_file(&file).unwrap();
            std::fs::remove_file(chain::head_path(&file)).ok();
        }
    }

    #[test]
    fn a_rotated_file_goes_on_with_the_chain_and_a_missing_one_shows() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.jsonl");
        let rotated = |n: u32| dir.path().join(format!("audit.jsonl.{n}"));
        // Rotation while running: renamed away, then reopened (SIGHUP).
        let audit = write(&file, 1, 3);
        std::fs::rename(&file, rotated(2)).unwrap();
        audit.reopen();
        for n in 4..=6 {
            audit.write(&event(n)).unwrap();
        }
        // Rotation while stopped: the head saved at shutdown carries the chain into the new file.
        audit.sync();
        drop(audit);
        std::fs::rename(&file, rotated(1)).unwrap();
        let audit = write(&file, 7, 8);
        let summary = check(&[&rotated(2), &rotated(1), &file], &[audit.head()]).unwrap();
        assert_eq!((summary.chains["gw-0"].first, summary.chains["gw-0"].last), (1, 8));
        let alone = check(&[&file], &[Head { seq: 3, hash: [1; 32] }]).unwrap();
        assert!(alone.anchors[0].ends_with("before the first file given, not checked"), "{:?}", alone.anchors);
        let broken = check(&[&rotated(2), &file], &[]).unwrap_err();
        assert_eq!((broken.file, broken.line, broken.what), (file.clone(), 1, Break::Missing { from: 4, to: 6 }));
        // A file cut short at its end: only an anchor (or the head file) shows it.
        rewrite(&file, |l| drop(l.pop()));
        let broken = check(&[&rotated(2), &rotated(1), &file], &[audit.head()]).unwrap_err();
        assert_eq!(broken.what, Break::Anchor { anchor: audit.head(), found: None });
    }

    #[test]
    fn a_chain_rebuilt_after_an_anchor_fails_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.jsonl");
        let anchor = write(&file, 1, 3).head();
        // Someone rewrites the file from scratch with a consistent chain that says something else.
        std::fs::remove_file(&file).unwrap();
        std::fs::remove_file(chain::head_path(&file)).ok();
        let audit = open(&file);
        for n in [1, 2, 9] {
            audit.write(&event(n)).unwrap();
        }
        let broken = check(&[&file], &[anchor]).unwrap_err();
        assert_eq!(broken.what, Break::Anchor { anchor, found: Some(audit.head()) });
        assert!(check(&[&file], &[]).is_ok(), "without the anchor nothing shows: the chain is consistent");
    }

    #[test]
    fn a_line_cut_short_by_a_crash_is_recorded_at_the_next_start_and_the_chain_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.jsonl");
        drop(write(&file, 1, 3));
        let mut bytes = std::fs::read(&file).unwrap();
        bytes.extend_from_slice(br#"{"seq":4,"prev":"ab"#);
        std::fs::write(&file, &bytes).unwrap();
        let summary = check(&[&file], &[]).unwrap();
        assert_eq!(summary.unrecorded_torn, Some(format!("{}:4", file.display())));
        let audit = write(&file, 5, 5);
        let summary = check(&[&file], &[audit.head()]).unwrap();
        assert_eq!(summary.torn, vec![format!("{}:4", file.display())]);
        assert_eq!(summary.chains["gw-0"].last, 5, "the torn record is seq 4, the next event 5");
        // The torn bytes are in the chain: changing them shows.
        rewrite(&file, |l| l[3] = l[3].replace("ab", "cd"));
        assert_eq!(check(&[&file], &[]).unwrap_err().what, Break::Changed { seq: 4 });
    }

    #[test]
    fn lines_written_before_the_chain_began_are_counted_apart_and_the_chain_starts_from_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.jsonl");
        let old = |n| serde_json::to_string(&event(n)).unwrap() + "\n";
        std::fs::write(&file, old(1) + &old(2)).unwrap();
        write(&file, 3, 4);
        let summary = check(&[&file], &[]).unwrap();
        assert_eq!((summary.unchained, summary.chains["gw-0"].first), (2, 1));
        rewrite(&file, |l| l[1] = l[1].replace("user2", "user9"));
        assert_eq!(check(&[&file], &[]).unwrap_err().what, Break::Changed { seq: 1 });
    }
}
