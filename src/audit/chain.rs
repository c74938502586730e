//! The audit trail's hash chain, as the writer makes it and `audit verify` checks it.
//!
//! The canonical form of an event is its line exactly as written, without the newline: UTF-8 JSON with no
//! whitespace, beginning `{"seq":<n>,"prev":"<64 hex digits>","replica":"<name>",`. `seq` counts the replica's
//! events from 1; `prev` is the SHA-256 of the previous line's canonical form (64 zeros before the first event),
//! so each line vouches for every one before it, across files: a new file starts from the last hash of the one
//! before it. The chain's head (the last `seq` and the hash of its line) is what an anchor copies elsewhere, as
//! `SEQ:HASH`.

use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ring::digest::{SHA256, digest};

/// The last event of a chain: its sequence number and the SHA-256 of its line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: [u8; 32],
}

impl Head {
    /// Before the first event.
    pub const GENESIS: Head = Head { seq: 0, hash: [0; 32] };

    /// The head after `line` (its canonical form), the event numbered `seq`.
    pub fn of(seq: u64, line: &[u8]) -> Head {
        let hash = digest(&SHA256, line);
        Head { seq, hash: hash.as_ref().try_into().expect("SHA-256 is 32 bytes") }
    }
}

impl fmt::Display for Head {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.seq, hex::encode(self.hash))
    }
}

impl FromStr for Head {
    type Err = String;

    /// `SEQ:HASH`, as the anchor log line, the metric and the head file give it.
    fn from_str(s: &str) -> Result<Head, String> {
        let bad = || format!("{s:?} is not SEQ:HASH (a sequence number, a colon and 64 hex digits)");
        let (seq, hash) = s.split_once(':').ok_or_else(bad)?;
        let seq = seq.parse().map_err(|_| bad())?;
        let hash = hex::decode(hash).ok().and_then(|h| <[u8; 32]>::try_from(h).ok()).ok_or_else(bad)?;
        Ok(Head { seq, hash })
    }
}

/// The fields of a chained line that the chain itself reads.
#[derive(serde::Deserialize)]
pub struct Link {
    pub seq: u64,
    pub prev: String,
    pub replica: String,
    /// `torn` or `lost` for the records of what a crash did to the file; absent for a deletion.
    #[serde(default)]
    pub event: Option<String>,
    /// For `lost`: the sequence numbers of the events the file no longer holds.
    #[serde(default)]
    pub from: Option<u64>,
    #[serde(default)]
    pub to: Option<u64>,
    /// For a `torn` event (the record of a line a crash cut short): the length in bytes of the line that was cut short.
    #[serde(default)]
    pub torn_bytes: Option<usize>,
}

/// The start of the line of the event after `head`, up to the event's own fields: `{"seq":…,"prev":"…","replica":…,`.
pub fn prefix(head: &Head, replica_json: &str) -> Vec<u8> {
    let mut line = Vec::with_capacity(512);
    line.extend_from_slice(b"{\"seq\":");
    line.extend_from_slice(itoa::Buffer::new().format(head.seq + 1).as_bytes());
    line.extend_from_slice(b",\"prev\":\"");
    let mut hex = [0; 64];
    hex::encode_to_slice(head.hash, &mut hex).expect("64 hex digits for 32 bytes");
    line.extend_from_slice(&hex);
    line.extend_from_slice(b"\",\"replica\":");
    line.extend_from_slice(replica_json.as_bytes());
    line.push(b',');
    line
}

/// The end of an existing audit file, where the chain goes on.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tail {
    /// Its last two complete lines, oldest first (fewer in a shorter file).
    pub lines: Vec<Vec<u8>>,
    /// Bytes after the last newline: a line a crash cut short.
    pub torn: Option<Vec<u8>>,
}

/// Read from the end at first: lines are far shorter.
const TAIL_WINDOW: u64 = 64 * 1024;
/// Never further back than this (a file whose end is a long run without a newline, such as zeros a power loss left).
const MAX_TAIL_WINDOW: u64 = 16 * 1024 * 1024;

/// Reads the end of `file`, further back as far as it takes to find two whole lines.
pub fn read_tail(file: &mut File) -> std::io::Result<Tail> {
    let len = file.seek(SeekFrom::End(0))?;
    let mut window = TAIL_WINDOW;
    loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start))?;
        let mut bytes = Vec::with_capacity((len - start) as usize);
        file.read_to_end(&mut bytes)?;
        let newlines: Vec<usize> = bytes.iter().enumerate().filter(|(_, b)| **b == b'\n').map(|(i, _)| i).collect();
        // A window that starts mid-line holds whole lines only after its first newline.
        if start > 0 && newlines.len() < 3 && window < MAX_TAIL_WINDOW {
            window *= 4;
            continue;
        }
        let ends = &newlines[newlines.len().saturating_sub(2)..];
        let mut lines = Vec::new();
        for (i, end) in ends.iter().enumerate() {
            let from = match (i, newlines.len() - ends.len()) {
                (0, 0) => 0,
                (0, before) => newlines[before - 1] + 1,
                _ => ends[i - 1] + 1,
            };
            lines.push(bytes[from..*end].to_vec());
        }
        let complete = newlines.last().map_or(0, |i| i + 1);
        let torn = (complete < bytes.len()).then(|| bytes[complete..].to_vec());
        return Ok(Tail { lines, torn });
    }
}

/// What a whole line says of the chain: a chained event's head, a line written before the chain began (seq 0), or
/// nothing (bytes a crash left).
pub fn head_of(line: &[u8]) -> Option<Head> {
    match serde_json::from_slice::<Link>(line) {
        Ok(link) => Some(Head::of(link.seq, line)),
        Err(_) => serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(line)
            .ok()
            .filter(|fields| !fields.contains_key("seq"))
            .map(|_| Head::of(0, line)),
    }
}

/// What the writer records before its next event, so that the chain says what a crash did to the file.
#[derive(Debug, PartialEq, Eq)]
pub enum Repair {
    /// Bytes a crash cut short (`unended`: not yet followed by a newline): the record links to them.
    Torn { bytes: Vec<u8>, unended: bool },
    /// The head saved beside the file is ahead of it: the events after the file's last are lost.
    Lost { saved: Head },
}

/// Where a file's chain goes on, and what to record first, from its tail and the head saved beside it.
pub fn resume(tail: &Tail, saved: Option<Head>) -> (Head, Vec<Repair>) {
    let fallback = saved.unwrap_or(Head::GENESIS);
    let last = tail.lines.last();
    let before_last = tail.lines.len().checked_sub(2).map(|i| &tail.lines[i]);
    let (head, mut repairs) = match (&tail.torn, last.map(|line| (line, head_of(line)))) {
        (Some(torn), Some((_, Some(head)))) => (head, vec![Repair::Torn { bytes: torn.clone(), unended: true }]),
        (Some(torn), _) => (fallback, vec![Repair::Torn { bytes: torn.clone(), unended: true }]),
        // A cut line ended, but its record never written (a crash in between).
        (None, Some((line, None))) => {
            let head = before_last.and_then(|line| head_of(line)).unwrap_or(fallback);
            (head, vec![Repair::Torn { bytes: line.clone(), unended: false }])
        }
        (None, Some((_, Some(head)))) => (head, vec![]),
        // A new file (rotated while the gateway was stopped): the saved head carries the chain into it.
        (None, None) => return (fallback, vec![]),
    };
    if let Some(saved) = saved.filter(|saved| saved.seq > head.seq) {
        repairs.push(Repair::Lost { saved });
    }
    (head, repairs)
}

/// Where the chain's head is kept beside `file` (at each anchor and at shutdown), for the next file after a
/// rotation made while the gateway was stopped.
pub fn head_path(file: &Path) -> PathBuf {
    let mut path = file.as_os_str().to_owned();
    path.push(".head");
    PathBuf::from(path)
}

/// The head file's content.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct HeadFile {
    pub head: String,
    pub replica: String,
    pub time: String,
}

/// Reads a head file, if there is one that makes sense.
pub fn read_head_file(file: &Path) -> Option<(Head, String)> {
    let text = std::fs::read_to_string(head_path(file)).ok()?;
    let saved: HeadFile = serde_json::from_str(&text).ok()?;
    Some((saved.head.parse().ok()?, saved.replica))
}

/// Replaces the head file at once (written aside, then renamed over it): never half written.
pub fn write_head_file(file: &Path, saved: &HeadFile) -> std::io::Result<()> {
    let path = head_path(file);
    let mut aside = path.as_os_str().to_owned();
    aside.push(".tmp");
    std::fs::write(&aside, serde_json::to_vec(saved).map_err(std::io::Error::other)?)?;
    std::fs::rename(&aside, &path)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn a_head_reads_back_from_its_text() {
        let head = Head::of(42, b"{\"seq\":42}");
        assert_eq!(head.to_string().parse::<Head>(), Ok(head));
        assert!("42".parse::<Head>().is_err());
        assert!("x:00".parse::<Head>().is_err());
        assert!(format!("1:{}", "0".repeat(63)).parse::<Head>().is_err());
    }

    #[test]
    fn the_tail_is_the_last_complete_line_and_what_follows_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let tail = |content: &[u8]| {
            std::fs::write(&path, content).unwrap();
            read_tail(&mut File::open(&path).unwrap()).unwrap()
        };
        let lines = |lines: &[&[u8]]| lines.iter().map(|l| l.to_vec()).collect::<Vec<_>>();
        assert_eq!(tail(b""), Tail::default());
        assert_eq!(tail(b"a\nb\nc\n"), Tail { lines: lines(&[b"b", b"c"]), torn: None });
        assert_eq!(tail(b"a\n"), Tail { lines: lines(&[b"a"]), torn: None });
        assert_eq!(tail(b"a\nb\n{\"se"), Tail { lines: lines(&[b"a", b"b"]), torn: Some(b"{\"se".to_vec()) });
        assert_eq!(tail(b"{\"se"), Tail { lines: vec![], torn: Some(b"{\"se".to_vec()) });
        // Longer lines than the window, and an end with no newline longer than it: read further back.
        let mut long = vec![b'x'; TAIL_WINDOW as usize];
        long.extend_from_slice(b"\nfirst\n");
        long.extend(vec![b'y'; TAIL_WINDOW as usize * 2]);
        long.extend_from_slice(b"\n");
        long.extend(vec![0; TAIL_WINDOW as usize * 3]);
        let mut file = File::create(&path).unwrap();
        file.write_all(&long).unwrap();
        let read = read_tail(&mut File::open(&path).unwrap()).unwrap();
        assert_eq!((read.lines[0].as_slice(), read.lines[1].len()), (&b"first"[..], TAIL_WINDOW as usize * 2));
        assert_eq!(read.torn.map(|t| t.len()), Some(TAIL_WINDOW as usize * 3));
    }
}
