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
    /// Heads copied elsewhere, each of which a chain must hold.
    pub anchors: Vec<Anchor>,
    /// A job receipt (JSON or CSV) whose every attempt must be found in the chains.
    pub receipt: Option<PathBuf>,
}

/// A head copied elsewhere, `[REPLICA@]SEQ:HASH`: with several replicas' files, the replica says whose chain
/// must hold it (the anchor metric's `replica` label, the log line's `replica` field).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Anchor {
    pub replica: Option<String>,
    pub head: Head,
}

impl std::str::FromStr for Anchor {
    type Err = String;

    fn from_str(s: &str) -> Result<Anchor, String> {
        match s.split_once('@') {
            Some((replica, head)) => Ok(Anchor { replica: Some(replica.to_owned()), head: head.parse()? }),
            None => Ok(Anchor { replica: None, head: s.parse()? }),
        }
    }
}

impl std::fmt::Display for Anchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.replica {
            Some(replica) => write!(f, "{replica}@{}", self.head),
            None => write!(f, "{}", self.head),
        }
    }
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
    Anchor { anchor: Anchor, found: Option<Head> },
    /// An anchor in a range the gateway recorded as lost after a crash: the events it vouched for are gone.
    AnchorLost { anchor: Anchor, from: u64, to: u64 },
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
            Break::OutOfOrder { seq, after } if self.line == 1 => write!(
                f,
                "{at}: the file starts at seq {seq}, but the one given before it ends at seq {after}: the files are \
                 out of order, or the gateway resumed this file from a stale saved head (a rotation while it was \
                 stopped after a crash)"
            ),
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
                anchor.head.seq
            ),
            Break::AnchorLost { anchor, from, to } => write!(
                f,
                "anchor {anchor}: the gateway recorded seq {from}..={to} as lost after a crash (a power loss without \
                 audit.fsync, or a replaced file): the files no longer hold the events the anchor vouched for"
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
    /// Chains whose first line given follows lines not given (an older file left out): where, and its seq.
    pub starts: Vec<String>,
    /// Ranges the gateway recorded as lost after a crash: replica, from, to, and where.
    pub lost: Vec<(String, u64, u64, String)>,
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
        for start in &self.starts {
            writeln!(f, "start: {start}: it follows lines not given, which are not checked")?;
        }
        for (replica, from, to, at) in &self.lost {
            writeln!(f, "lost: replica {replica}: seq {from}..={to}, recorded at {at} after a crash")?;
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

/// Why `verify` has no summary to give.
#[derive(Debug)]
pub enum Failed {
    /// The chain is broken, or an anchor or a receipt does not match: exit 1.
    Broken(Box<Broken>),
    /// A file could not be read: exit 2.
    Unreadable(Unreadable),
}

impl From<Broken> for Failed {
    fn from(broken: Broken) -> Failed {
        Failed::Broken(Box::new(broken))
    }
}

impl From<Unreadable> for Failed {
    fn from(unreadable: Unreadable) -> Failed {
        Failed::Unreadable(unreadable)
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
#[derive(Default)]
struct Chain {
    head: Option<Head>,
    /// A line a crash cut short, read just before its record: where it is, and its bytes.
    pending_torn: Option<(String, Vec<u8>)>,
}

/// What the lines read so far in one file say.
#[derive(Default)]
struct InFile {
    /// The last line written before the chain began, which the first chained line links to.
    legacy: Option<Head>,
    /// The last chained line: a replica first seen after it (renamed) goes on from it.
    previous: Option<Head>,
}

/// The chains of the files given, followed line by line.
struct Follower<'a> {
    chains: HashMap<String, Chain>,
    summary: Summary,
    /// The seqs anchors name, and the chains' heads found there.
    anchored: Vec<u64>,
    at_anchors: Vec<(String, Head)>,
    /// With a receipt: the prefix of its job's request ids, and their events.
    wanted: Option<&'a str>,
    seen: HashMap<(String, u64), Seen>,
}

impl Follower<'_> {
    /// Follows one line (`at`, as `file:line`), with the line after it, which may record it as torn.
    fn line(&mut self, at: String, line: &[u8], next: Option<&[u8]>, file: &mut InFile) -> Result<(), Break> {
        let Ok(link) = serde_json::from_slice::<Link>(line) else {
            if chain::head_of(line).is_some() {
                // Written before the chain began: only before its first line.
                if file.previous.is_some() {
                    return Err(Break::NotAnEvent);
                }
                self.summary.unchained += 1;
                file.legacy = Some(Head::of(0, line));
                return Ok(());
            }
            return match next.and_then(|next| serde_json::from_slice::<Link>(next).ok()) {
                Some(next) if next.torn_bytes == Some(line.len()) => {
                    self.chains.entry(next.replica).or_default().pending_torn = Some((at, line.to_vec()));
                    Ok(())
                }
                _ => Err(Break::NotAnEvent),
            };
        };
        let chain = self.chains.entry(link.replica.clone()).or_default();
        let before = chain.head.or(file.previous).or(file.legacy);
        let (expected_prev, expected_seq) = match (chain.pending_torn.take(), before) {
            (Some((torn_at, torn)), head) => {
                self.summary.torn.push(torn_at);
                (Some(Head::of(0, &torn).hash), head.map(|head| head.seq + 1))
            }
            (None, Some(head)) => (Some(head.hash), Some(head.seq + 1)),
            (None, None) => {
                if link.prev != hex::encode(Head::GENESIS.hash) {
                    self.summary.starts.push(format!("{at}: replica {} at seq {}", link.replica, link.seq));
                }
                (None, None)
            }
        };
        if let Some(expected) = expected_seq {
            let lost = link.event.as_deref() == Some("lost")
                && link.from == Some(expected)
                && link.to.is_some_and(|to| to + 1 == link.seq);
            if lost {
                self.summary.lost.push((link.replica.clone(), expected, link.seq - 1, at.clone()));
            } else if link.seq < expected {
                return Err(Break::OutOfOrder { seq: link.seq, after: expected - 1 });
            } else if link.seq > expected {
                return Err(Break::Missing { from: expected, to: link.seq - 1 });
            }
        }
        if expected_prev.is_some_and(|prev| hex::encode(prev) != link.prev) {
            return Err(Break::Changed { seq: link.seq });
        }
        let head = Head::of(link.seq, line);
        chain.head = Some(head);
        file.previous = Some(head);
        if self.anchored.contains(&link.seq) {
            self.at_anchors.push((link.replica.clone(), head));
        }
        count(&mut self.summary, &link, line);
        if let Some(prefix) = self.wanted {
            keep(&mut self.seen, &link, line, prefix);
        }
        Ok(())
    }
}

/// Checks the chain(s) of `request.files`.
pub fn verify(request: &Request) -> Result<Summary, Failed> {
    let receipt = match &request.receipt {
        Some(path) => Some((path, read_receipt(path)?)),
        None => None,
    };
    // Only the events a receipt names are kept.
    let wanted = receipt.as_ref().and_then(|(_, lines)| lines.first()).map(|line| format!("job-{}.", line.job_id));
    // The head files beside the files are anchors too (on the same machine: they catch a file cut short, not a
    // rewrite). Before the first event, every chain holds its head.
    let mut anchors = request.anchors.clone();
    let saved = request.files.iter().filter_map(|path| chain::read_head_file(path));
    anchors.extend(saved.map(|(head, replica)| Anchor { replica: Some(replica), head }));
    anchors.retain(|anchor| anchor.head != Head::GENESIS);
    let mut follower = Follower {
        chains: HashMap::new(),
        summary: Summary::default(),
        anchored: anchors.iter().map(|anchor| anchor.head.seq).collect(),
        at_anchors: Vec::new(),
        wanted: wanted.as_deref(),
        seen: HashMap::new(),
    };
    for path in &request.files {
        let unreadable = |source| Unreadable { path: path.clone(), source };
        // Read as a stream (a file may hold months of events), one line ahead: the next may record this one as torn.
        let mut reader = std::io::BufReader::new(std::fs::File::open(path).map_err(unreadable)?);
        let mut file = InFile::default();
        let (mut line, mut next) = (Vec::new(), Vec::new());
        let mut ended = read_line(&mut reader, &mut line).map_err(unreadable)?;
        for number in 1.. {
            let at = format!("{}:{number}", path.display());
            if !ended {
                if !line.is_empty() {
                    follower.summary.unrecorded_torn = Some(at);
                }
                break;
            }
            let next_ended = read_line(&mut reader, &mut next).map_err(unreadable)?;
            follower.line(at, &line, Some(&next), &mut file).map_err(|what| Broken {
                file: path.clone(),
                line: number,
                what,
            })?;
            std::mem::swap(&mut line, &mut next);
            ended = next_ended;
        }
    }
    let Follower { mut summary, at_anchors, seen, .. } = follower;
    let last_file = request.files.last().cloned().unwrap_or_default();
    check_anchors(&mut summary, &anchors, &at_anchors).map_err(|what| Broken { file: last_file, line: 0, what })?;
    if let Some((path, lines)) = receipt {
        summary.receipt = Some(check_receipt(path, &lines, &seen)?);
    }
    Ok(summary)
}

/// Reads the next line into `line`, without its newline; whether it had one (the last of a file a crash cut short
/// has none, and the end of the file is an empty line without one).
fn read_line(reader: &mut impl std::io::BufRead, line: &mut Vec<u8>) -> std::io::Result<bool> {
    line.clear();
    reader.read_until(b'\n', line)?;
    let ended = line.last() == Some(&b'\n');
    if ended {
        line.pop();
    }
    Ok(ended)
}

/// A receipt's attempts, once its checksum holds.
fn read_receipt(path: &PathBuf) -> Result<Vec<ReceiptLine>, Failed> {
    let bytes = std::fs::read(path).map_err(|source| Unreadable { path: path.clone(), source })?;
    let lines = receipt::lines(&bytes).map_err(|why| Broken {
        file: path.clone(),
        line: 0,
        what: Break::Receipt { line: "the file".into(), why },
    })?;
    Ok(lines)
}

/// Checks that a chain holds each anchor: `at_anchors` are the chains' heads at the anchors' seqs.
fn check_anchors(summary: &mut Summary, anchors: &[Anchor], at_anchors: &[(String, Head)]) -> Result<(), Break> {
    for anchor in anchors {
        let ours = |replica: &String| anchor.replica.as_ref().is_none_or(|r| r == replica);
        let mut heads = at_anchors.iter().filter(|(replica, head)| ours(replica) && head.seq == anchor.head.seq);
        if let Some((replica, _)) = heads.clone().find(|(_, head)| *head == anchor.head) {
            summary.anchors.push(format!("anchor {anchor}: held by replica {replica}'s chain"));
            continue;
        }
        let lost = summary
            .lost
            .iter()
            .find(|(replica, from, to, _)| ours(replica) && (*from..=*to).contains(&anchor.head.seq));
        if let Some((_, from, to, _)) = lost {
            return Err(Break::AnchorLost { anchor: anchor.clone(), from: *from, to: *to });
        }
        let found = heads.next().map(|(_, head)| *head);
        let earliest = summary.chains.iter().filter(|(replica, _)| ours(replica)).map(|(_, span)| span.first).min();
        // From before the files given (a head saved before the last rotation, say): nothing to check it with.
        if found.is_none() && earliest.is_some_and(|first| anchor.head.seq < first) {
            summary.anchors.push(format!("anchor {anchor}: before the first file given, not checked"));
            continue;
        }
        return Err(Break::Anchor { anchor: anchor.clone(), found });
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
fn check_receipt(path: &Path, lines: &[ReceiptLine], seen: &HashMap<(String, u64), Seen>) -> Result<String, Failed> {
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
                return Err(Failed::from(broken(format!(
                    "replica {}'s seq {seq} is not in the audit files given",
                    line.replica
                ))));
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
                return Err(Failed::from(broken(format!("replica {}'s seq {seq} says{wrong}", line.replica))));
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
    use std::io::Write;
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
        open_as(file, "gw-0")
    }

    fn open_as(file: &Path, replica: &str) -> Arc<Audit> {
        let config = AuditConfig { file: Some(file.to_owned()), replica: Some(replica.into()), ..Default::default() };
        Audit::open(&config, Metrics::new()).unwrap().unwrap()
    }

    fn anchor(head: Head) -> Anchor {
        Anchor { replica: None, head }
    }

    /// Writes events `from..=to` to `file`.
    fn write(file: &Path, from: u32, to: u32) -> Arc<Audit> {
        let audit = open(file);
        for n in from..=to {
            audit.write(&event(n)).unwrap();
        }
        audit
    }

    fn check(files: &[&Path], anchors: &[Head]) -> Result<Summary, Box<Broken>> {
        let request = Request {
            files: files.iter().map(|f| f.to_path_buf()).collect(),
            anchors: anchors.iter().copied().map(anchor).collect(),
            receipt: None,
        };
        verify(&request).map_err(|failed| match failed {
            Failed::Broken(broken) => broken,
            Failed::Unreadable(e) => panic!("{e}"),
        })
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
        assert_eq!(broken.what, Break::Anchor { anchor: anchor(audit.head()), found: None });
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
        assert_eq!(
            broken.what,
            Break::Anchor { anchor: super::Anchor { replica: None, head: anchor }, found: Some(audit.head()) }
        );
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

    #[test]
    fn events_lost_in_a_crash_are_recorded_as_lost_and_an_anchor_among_them_fails() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.jsonl");
        let audit = write(&file, 1, 5);
        let anchored = audit.head();
        audit.sync(); // the head file says 5
        drop(audit);
        // A power loss without audit.fsync: the file lost its last two lines.
        rewrite(&file, |l| l.truncate(3));
        let audit = write(&file, 6, 6);
        audit.anchor(); // as the first anchor after the restart does
        let summary = check(&[&file], &[]).unwrap();
        assert_eq!(summary.lost, vec![("gw-0".into(), 4, 5, format!("{}:4", file.display()))]);
        assert_eq!((summary.chains["gw-0"].last, audit.head().seq), (7, 7), "no seq is used twice");
        let broken = check(&[&file], &[anchored]).unwrap_err();
        assert_eq!(broken.what, Break::AnchorLost { anchor: anchor(anchored), from: 4, to: 5 });
    }

    #[test]
    fn a_cut_line_whose_record_a_second_crash_prevented_is_recorded_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.jsonl");
        drop(write(&file, 1, 3));
        let mut bytes = std::fs::read(&file).unwrap();
        bytes.extend_from_slice(b"{\"seq\":4,\"pr\n");
        std::fs::write(&file, &bytes).unwrap();
        let audit = write(&file, 5, 5);
        let summary = check(&[&file], &[audit.head()]).unwrap();
        assert_eq!((summary.torn.len(), summary.chains["gw-0"].last), (1, 5));
    }

    #[test]
    fn a_write_that_failed_part_way_is_ended_and_recorded_before_the_next_event() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.jsonl");
        let audit = write(&file, 1, 2);
        // What a write cut short by a full disk leaves, and the writer's note of it.
        std::fs::OpenOptions::new().append(true).open(&file).unwrap().write_all(b"{\"seq\":3,\"prev").unwrap();
        audit.writer.lock().unwrap().unended = true;
        audit.write(&event(3)).unwrap();
        let summary = check(&[&file], &[audit.head()]).unwrap();
        assert_eq!((summary.torn, summary.chains["gw-0"].last), (vec![format!("{}:3", file.display())], 4));
    }

    #[test]
    fn a_renamed_replica_goes_on_from_the_chain_before_it_in_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.jsonl");
        drop(write(&file, 1, 3));
        let renamed = open_as(&file, "gw-1");
        renamed.write(&event(4)).unwrap();
        let summary = check(&[&file], &[]).unwrap();
        assert_eq!((summary.chains["gw-0"].last, summary.chains["gw-1"].first), (3, 4));
        rewrite(&file, |l| drop(l.remove(2)));
        assert_eq!(check(&[&file], &[]).unwrap_err().what, Break::Missing { from: 3, to: 3 });
    }

    #[test]
    fn each_replicas_files_start_their_own_chain_after_lines_written_before_it_and_anchors_name_their_replica() {
        let dir = tempfile::tempdir().unwrap();
        let old = |n| serde_json::to_string(&event(n)).unwrap() + "\n";
        let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
        for (path, replica) in [(&a, "gw-0"), (&b, "gw-1")] {
            std::fs::write(path, old(1) + &old(2)).unwrap();
            let audit = open_as(path, replica);
            for n in 3..=4 {
                audit.write(&event(n)).unwrap();
            }
        }
        let summary = check(&[&a, &b], &[]).unwrap();
        assert_eq!((summary.unchained, summary.chains.len()), (4, 2));
        // An anchor of gw-1's chain, checked against gw-1's alone: gw-0's seq 2 says nothing of it.
        let head_b = chain::head_of(std::fs::read_to_string(&b).unwrap().lines().nth(3).unwrap().as_bytes()).unwrap();
        let request =
            |anchor: Anchor| Request { files: vec![a.clone(), b.clone()], anchors: vec![anchor], receipt: None };
        let named = Anchor { replica: Some("gw-1".into()), head: head_b };
        assert!(verify(&request(named.clone())).is_ok());
        assert!(verify(&request(Anchor { replica: Some("gw-0".into()), ..named })).is_err());
        assert_eq!(
            "gw-1@2:".to_owned() + &hex::encode(head_b.hash),
            request(Anchor { replica: Some("gw-1".into()), head: head_b }).anchors[0].to_string()
        );
    }
}
