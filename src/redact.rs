//! Secrets out of what Easemob says: the [`Redactor`] knows every client secret and App Token the process holds or
//! has held recently, and `Upstream` scrubs every answer's body with it as the answer arrives, so that Easemob's
//! text (a token endpoint that repeats the request in its error, a route that echoes the `Authorization` header)
//! reaches no log line, error, job result, span or metric with a secret in it.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use aho_corasick::{AhoCorasick, MatchKind};
use bytes::Bytes;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use secrecy::{ExposeSecret, SecretString};

/// At most this many secrets are remembered. Every app's current client secret and token are held again at each
/// fetch, so only retired ones (a rotated secret, a replaced token) fall off, oldest first.
const HELD: usize = 256;
/// A secret shorter than this can occur by chance in ordinary text, where blanking it in place would show which
/// words it matched: an answer that contains one is withheld whole instead.
pub const MIN_REDACTABLE: usize = 8;
/// What replaces a secret.
pub const REDACTED: &str = "[redacted]";
/// What replaces a whole answer that contains a secret shorter than [`MIN_REDACTABLE`]: a JSON string, so that a
/// body the caller reads as JSON still parses.
const WITHHELD: &str = "\"[withheld: it contained a secret too short to redact in place]\"";

/// RFC 3986's unreserved characters stay as they are; the rest is percent-encoded (a query's or a URL's encoding).
const URL_RESERVED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// The secrets to scrub from Easemob's answers. Cheap to clone: every clone shares what is held.
#[derive(Clone, Default)]
pub struct Redactor {
    known: Arc<RwLock<Known>>,
}

#[derive(Default)]
struct Known {
    /// Oldest first.
    held: VecDeque<SecretString>,
    /// Every encoding of every held secret; `None` while nothing is held.
    matcher: Option<AhoCorasick>,
    /// Per pattern of `matcher`: its secret is shorter than [`MIN_REDACTABLE`].
    short: Vec<bool>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let held = self.known.read().map(|k| k.held.len()).unwrap_or_default();
        f.debug_struct("Redactor").field("held", &held).finish()
    }
}

impl Redactor {
    /// Remembers `secret` (a client secret about to be sent, a token just granted) so that Easemob's answers are
    /// scrubbed of it from now on. Holding one already held only makes it the most recent.
    pub fn hold(&self, secret: &str) {
        if secret.is_empty() {
            return;
        }
        let mut known = self.known.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(at) = known.held.iter().position(|s| s.expose_secret() == secret) {
            let again = known.held.remove(at).expect("found");
            known.held.push_back(again);
            return;
        }
        known.held.push_back(SecretString::from(secret));
        while known.held.len() > HELD {
            known.held.pop_front();
        }
        let (patterns, short): (Vec<String>, Vec<bool>) = known
            .held
            .iter()
            .flat_map(|s| {
                let s = s.expose_secret();
                encodings(s).into_iter().map(move |e| (e, s.chars().count() < MIN_REDACTABLE))
            })
            .unzip();
        known.matcher =
            Some(AhoCorasick::builder().match_kind(MatchKind::LeftmostLongest).build(patterns).expect("plain strings"));
        known.short = short;
    }

    /// What is held now, to scrub one answer's body and headers with.
    pub fn scrubber(&self) -> Scrubber<'_> {
        Scrubber { known: self.known.read().unwrap_or_else(|poisoned| poisoned.into_inner()) }
    }
}

/// The secrets held when an answer arrived, to scrub all of it with.
pub struct Scrubber<'a> {
    known: RwLockReadGuard<'a, Known>,
}

impl Scrubber<'_> {
    /// `body` with every held secret, in each of its encodings, replaced by [`REDACTED`]; withheld whole when it
    /// holds a secret too short to replace in place. Unchanged (not copied) when it holds none: the usual case.
    pub fn scrub(&self, body: Bytes) -> Bytes {
        match self.scrub_slice(&body) {
            Some(scrubbed) => Bytes::from(scrubbed),
            None => body,
        }
    }

    /// `text` scrubbed as [`Scrubber::scrub`] does; `None` when it holds no secret.
    pub fn scrub_slice(&self, text: &[u8]) -> Option<Vec<u8>> {
        let matcher = self.known.matcher.as_ref()?;
        let mut found = matcher.find_iter(text).peekable();
        found.peek()?;
        let mut scrubbed = Vec::with_capacity(text.len());
        let mut from = 0;
        for m in found {
            if self.known.short[m.pattern().as_usize()] {
                return Some(WITHHELD.as_bytes().to_vec());
            }
            scrubbed.extend_from_slice(&text[from..m.start()]);
            scrubbed.extend_from_slice(REDACTED.as_bytes());
            from = m.end();
        }
        scrubbed.extend_from_slice(&text[from..]);
        Some(scrubbed)
    }
}

/// The forms `secret` takes in text that repeats a request: as it is; JSON-escaped, once (a JSON body) and twice (a
/// JSON body quoted inside a JSON string), with `/` escaped too as some encoders do; URL-encoded as a form, a query
/// or a path carries it, with upper- or lower-case hex digits. The `Authorization: Bearer` value holds the token
/// as it is.
fn encodings(secret: &str) -> Vec<String> {
    let json = |s: &str| {
        let quoted = serde_json::to_string(s).expect("a string serializes");
        quoted[1..quoted.len() - 1].to_owned()
    };
    let once = json(secret);
    let twice = json(&once);
    let url = [
        form_urlencoded::byte_serialize(secret.as_bytes()).collect::<String>(),
        utf8_percent_encode(secret, NON_ALPHANUMERIC).to_string(),
        utf8_percent_encode(secret, URL_RESERVED).to_string(),
    ];
    let lower_hex = url.iter().map(|encoded| lowercase_percent_escapes(encoded)).collect::<Vec<_>>();
    let mut all = vec![secret.to_owned(), once.replace('/', "\\/"), once, twice];
    all.extend(url);
    all.extend(lower_hex);
    all.sort_unstable();
    all.dedup();
    all
}

/// `%2F` as `%2f`: percent-encoders differ in the case of their hex digits.
fn lowercase_percent_escapes(encoded: &str) -> String {
    let mut out = String::with_capacity(encoded.len());
    let mut hex_left = 0;
    for c in encoded.chars() {
        if hex_left > 0 {
            out.push(c.to_ascii_lowercase());
            hex_left -= 1;
        } else {
            hex_left = if c == '%' { 2 } else { 0 };
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrub(redactor: &Redactor, text: &str) -> String {
        String::from_utf8(redactor.scrubber().scrub(Bytes::copy_from_slice(text.as_bytes())).to_vec()).unwrap()
    }

    #[test]
    fn every_encoding_of_every_held_secret_is_replaced() {
        let redactor = Redactor::default();
        let secret = "YXA6a\"b\\c/d+e&f g%h";
        redactor.hold(secret);
        redactor.hold("token-abcdefgh");
        for encoded in encodings(secret) {
            let text = format!("refused {{\"echo\":\"{encoded}\"}} and Bearer token-abcdefgh.");
            assert_eq!(
                scrub(&redactor, &text),
                "refused {\"echo\":\"[redacted]\"} and Bearer [redacted].",
                "{encoded}"
            );
        }
        assert!(encodings(secret).contains(&"YXA6a%22b%5cc%2fd%2be%26f+g%25h".to_owned()), "{:?}", encodings(secret));
        assert!(encodings(secret).contains(&"YXA6a\\\\\\\"b\\\\\\\\c/d+e&f g%h".to_owned()), "escaped twice");
    }

    #[test]
    fn text_without_a_secret_is_passed_as_it_is() {
        let redactor = Redactor::default();
        let body = Bytes::from_static(b"{\"error\":\"unauthorized\"}");
        assert_eq!(redactor.scrubber().scrub(body.clone()).as_ptr(), body.as_ptr(), "nothing held: not looked at");
        redactor.hold("YXA6long-enough-secret");
        assert_eq!(redactor.scrubber().scrub(body.clone()).as_ptr(), body.as_ptr(), "no secret in it: not copied");
    }

    #[test]
    fn a_short_secret_withholds_the_whole_text() {
        let redactor = Redactor::default();
        redactor.hold("abc12");
        assert_eq!(scrub(&redactor, "a label abc123"), WITHHELD);
        assert_eq!(scrub(&redactor, "nothing here"), "nothing here");
        assert!(serde_json::from_str::<String>(WITHHELD).is_ok(), "still JSON");
    }

    #[test]
    fn retired_secrets_are_remembered_until_many_newer_ones_displace_them() {
        let redactor = Redactor::default();
        redactor.hold("YXA6the-rotated-out-secret");
        for n in 0..HELD - 1 {
            redactor.hold(&format!("token-number-{n:04}"));
        }
        assert_eq!(scrub(&redactor, "YXA6the-rotated-out-secret"), REDACTED);
        redactor.hold("token-number-9999");
        assert_eq!(scrub(&redactor, "YXA6the-rotated-out-secret"), "YXA6the-rotated-out-secret");
    }
}
