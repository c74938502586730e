//! W3C Trace Context: a caller's `traceparent` is checked, never echoed blindly, and the call to Easemob carries
//! a child of it (or of a trace the gateway starts when the caller sent none, or a bad one); a `tracestate`
//! travels with a valid `traceparent` only. The trace id is in the request's log line and its audit event.
//! Whether the gateway records spans of a request is the [`Sampler`]'s decision; `export.rs` sends them.

pub mod export;

use http::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The W3C limits on `tracestate`: at most 32 list members, and vendors may drop it beyond 512 bytes.
const MAX_TRACESTATE_BYTES: usize = 512;
const MAX_TRACESTATE_MEMBERS: usize = 32;

/// The trace a request belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    /// The `trace-flags` (bit 0: sampled), kept from the caller.
    pub flags: u8,
    pub state: Option<HeaderValue>,
}

impl TraceContext {
    /// The caller's trace if its `traceparent` is valid, else a new one.
    pub fn from_headers(headers: &HeaderMap) -> TraceContext {
        let Some((trace_id, _, flags)) = headers.get(TRACEPARENT).and_then(|v| parse(v.as_bytes())) else {
            return TraceContext::start();
        };
        let state = headers.get(TRACESTATE).filter(|v| valid_state(v.as_bytes())).cloned();
        TraceContext { trace_id, flags, state }
    }

    /// A new trace, not sampled unless a [`Sampler`] decides otherwise.
    pub fn start() -> TraceContext {
        TraceContext { trace_id: fastrand::u128(1..), flags: 0, state: None }
    }

    /// The caller's span, the parent id of a valid `traceparent`: `Some` when [`TraceContext::from_headers`]
    /// continues the caller's trace. Read again only for span export, so that this context, which every request
    /// carries, does not grow for it.
    pub fn caller_span(headers: &HeaderMap) -> Option<u64> {
        headers.get(TRACEPARENT).and_then(|v| parse(v.as_bytes())).map(|(_, parent_id, _)| parent_id)
    }

    /// The `traceparent` of a call this request makes as span `span_id` (see [`new_span_id`]): the same trace, the
    /// same flags.
    pub fn child(&self, span_id: u64) -> HeaderValue {
        let mut out = [0u8; 55];
        out[..3].copy_from_slice(b"00-");
        hex(&self.trace_id.to_be_bytes(), &mut out[3..35]);
        out[35] = b'-';
        hex(&span_id.to_be_bytes(), &mut out[36..52]);
        out[52] = b'-';
        hex(&[self.flags], &mut out[53..55]);
        HeaderValue::from_bytes(&out).expect("hex digits and dashes")
    }

    /// The trace id as 32 lowercase hex digits, for the audit trail.
    pub fn trace_id_hex(&self) -> TraceId {
        TraceId::of(self.trace_id)
    }

    /// The `sampled` flag: whoever decided wants this trace's spans recorded.
    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }
}

/// `trace-flags` bit 0.
const SAMPLED: u8 = 0x01;

/// A span id of the gateway's own: random, never 0 (the W3C "invalid" id).
pub fn new_span_id() -> u64 {
    fastrand::u64(1..)
}

/// Which traces the gateway records spans of: for a trace it continues, the caller's decision (the W3C `sampled`
/// flag, so the caller's and the gateway's spans are kept or dropped together); for one it starts, `ratio` of
/// them, decided on the trace id as OpenTelemetry's `TraceIdRatioBased` does, so a service downstream that
/// samples by the same rule keeps the same traces.
#[derive(Clone, Copy, Debug)]
pub struct Sampler {
    /// A started trace is sampled when the lower 63 bits of the low half of its id are below this.
    threshold: u64,
}

impl Sampler {
    /// `ratio` from 0 (none of the traces the gateway starts) to 1 (all of them).
    pub fn new(ratio: f64) -> Sampler {
        Sampler { threshold: (ratio.clamp(0.0, 1.0) * (1u64 << 63) as f64) as u64 }
    }

    /// Decides for `trace`, `continued` from a caller or started by the gateway (which then sets its `sampled`
    /// flag here, for Easemob to receive), and says whether its spans are recorded.
    pub fn sample(&self, trace: &mut TraceContext, continued: bool) -> bool {
        if !continued && ((trace.trace_id as u64) >> 1) < self.threshold {
            trace.flags |= SAMPLED;
        }
        trace.sampled()
    }
}

/// A trace id, displayed as 32 lowercase hex digits (for a log line: formatted only if it is written).
pub struct TraceHex(pub u128);

impl std::fmt::Display for TraceHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(TraceId::of(self.0).as_str())
    }
}

/// A trace id in hex, without an allocation.
#[derive(Clone, Copy)]
pub struct TraceId([u8; 32]);

impl TraceId {
    fn of(trace_id: u128) -> TraceId {
        let mut out = [0u8; 32];
        hex(&trace_id.to_be_bytes(), &mut out);
        TraceId(out)
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits")
    }
}

fn hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
}

/// `version-traceid-parentid-flags` as the W3C specifies it: lowercase hex, neither id all zeros, version `ff`
/// invalid, and a later version read by its first four fields. Returns the trace id, the parent id and the flags.
fn parse(value: &[u8]) -> Option<(u128, u64, u8)> {
    if value.len() < 55 || (value.len() > 55 && value[55] != b'-') {
        return None;
    }
    let version = field(&value[0..2])?;
    if version == 0xff || (version == 0 && value.len() != 55) {
        return None;
    }
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let trace_id = field(&value[3..35])?;
    let parent_id = field(&value[36..52])? as u64;
    let flags = field(&value[53..55])? as u8;
    (trace_id != 0 && parent_id != 0).then_some((trace_id, parent_id, flags))
}

/// Lowercase hex digits (at most 32) as a number.
fn field(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0u128, |n, d| match d {
        b'0'..=b'9' => Some(n << 4 | u128::from(d - b'0')),
        b'a'..=b'f' => Some(n << 4 | u128::from(d - b'a' + 10)),
        _ => None,
    })
}

/// A `tracestate` within the W3C limits: printable ASCII, at most 512 bytes and 32 `key=value` members.
fn valid_state(value: &[u8]) -> bool {
    value.len() <= MAX_TRACESTATE_BYTES
        && value.iter().all(|b| (0x20..0x7f).contains(b))
        && value.split(|b| *b == b',').filter(|m| !m.iter().all(|b| *b == b' ')).count() <= MAX_TRACESTATE_MEMBERS
        && value.split(|b| *b == b',').all(|m| m.iter().all(|b| *b == b' ') || m.contains(&b'='))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(traceparent: &str, tracestate: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_str(traceparent).unwrap());
        if let Some(state) = tracestate {
            headers.insert(TRACESTATE, HeaderValue::from_str(state).unwrap());
        }
        headers
    }

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_continued_with_a_new_span() {
        let trace = TraceContext::from_headers(&headers(VALID, Some("congo=t61rcWkgMzE")));
        assert_eq!(trace.trace_id_hex().as_str(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!((trace.flags, trace.state.as_ref().map(|s| s.to_str().unwrap())), (1, Some("congo=t61rcWkgMzE")));
        assert_eq!(TraceContext::caller_span(&headers(VALID, None)), Some(0x00f067aa0ba902b7));
        let child = trace.child(0xb7ad6b7169203331);
        assert_eq!(child, "00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01", "a span of its own");
        assert_eq!(parse(child.as_bytes()), Some((trace.trace_id, 0xb7ad6b7169203331, 1)));
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds";
        assert_eq!(TraceContext::from_headers(&headers(later, None)).trace_id, trace.trace_id);
    }

    #[test]
    fn a_bad_traceparent_starts_a_new_trace_and_drops_its_tracestate() {
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "hello",
        ] {
            let trace = TraceContext::from_headers(&headers(bad, Some("congo=t61rcWkgMzE")));
            assert_ne!(trace.trace_id_hex().as_str(), "4bf92f3577b34da6a3ce929d0e0e4736", "{bad}");
            assert_eq!((trace.flags, trace.state), (0, None), "{bad}");
            assert_eq!(TraceContext::caller_span(&headers(bad, None)), None, "{bad}");
        }
        let fresh = TraceContext::from_headers(&HeaderMap::new());
        assert!(parse(fresh.child(new_span_id()).as_bytes()).is_some());
    }

    #[test]
    fn a_tracestate_outside_the_limits_is_dropped() {
        let many = (0..33).map(|i| format!("k{i}=v")).collect::<Vec<_>>().join(",");
        for state in [many.as_str(), "novalue", &"k=".repeat(300)] {
            assert_eq!(TraceContext::from_headers(&headers(VALID, Some(state))).state, None, "{state}");
        }
    }

    #[test]
    fn a_continued_trace_keeps_the_callers_decision_and_a_started_one_follows_the_ratio() {
        let (all, none, half) = (Sampler::new(1.0), Sampler::new(0.0), Sampler::new(0.5));
        for (flags, sampled) in [("01", true), ("00", false)] {
            let traceparent = format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}");
            for sampler in [all, none, half] {
                let mut trace = TraceContext::from_headers(&headers(&traceparent, None));
                assert_eq!(sampler.sample(&mut trace, true), sampled, "{traceparent} {sampler:?}");
                assert!(trace.child(1).to_str().unwrap().ends_with(flags), "the caller's flags go on");
            }
        }
        let started = |sampler: Sampler| {
            (0..10_000)
                .filter(|_| {
                    let mut trace = TraceContext::start();
                    let sampled = sampler.sample(&mut trace, false);
                    assert_eq!(trace.child(1).to_str().unwrap().ends_with("-01"), sampled, "Easemob is told");
                    sampled
                })
                .count()
        };
        assert_eq!((started(all), started(none)), (10_000, 0));
        let halved = started(half);
        assert!((4_500..5_500).contains(&halved), "{halved} of 10,000 at 0.5");
        // Decided on the trace id alone (the low half's upper 63 bits), as OpenTelemetry's TraceIdRatioBased does.
        let mut low = TraceContext { trace_id: 0x4bf9_0000_0000_0000_3fff_ffff_ffff_ffff, ..TraceContext::start() };
        let mut high = TraceContext { trace_id: 0x4bf9_0000_0000_0000_8000_0000_0000_0000, ..TraceContext::start() };
        assert!(half.sample(&mut low, false) && !half.sample(&mut high, false));
    }
}
