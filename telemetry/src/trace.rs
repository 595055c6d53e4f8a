//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): the
//! `traceparent` header, `00-<trace id>-<parent span id>-<flags>`.
//!
//! A process continues a valid incoming context (same trace id, the
//! caller's span as parent) or starts a new trace, and sends its own span
//! id as the parent of what it calls. A malformed `traceparent` is
//! replaced, never forwarded. Ids are random per process (a seed from the
//! OS once) mixed with a per-thread counter: unique within the process, unguessable
//! across processes, no lock and no system call per id.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The header name.
pub const TRACEPARENT: &str = "traceparent";
/// The vendor-specific companion header, forwarded as received when the
/// `traceparent` is valid.
pub const TRACESTATE: &str = "tracestate";

/// One span's place in a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// This span's id.
    pub span_id: [u8; 8],
    /// The span this one continues (the caller's), if any.
    pub parent_id: Option<[u8; 8]>,
    /// W3C trace flags; bit 0: sampled.
    pub flags: u8,
}

impl TraceContext {
    /// A new trace, this span its root.
    pub fn root(sampled: bool) -> TraceContext {
        let (high, low) = random_pair();
        let mut trace_id = [0; 16];
        trace_id[..8].copy_from_slice(&high.to_be_bytes());
        trace_id[8..].copy_from_slice(&low.to_be_bytes());
        TraceContext {
            trace_id,
            span_id: new_span_id(),
            parent_id: None,
            flags: u8::from(sampled),
        }
    }

    /// The span that continues `traceparent`, or a new root if it is
    /// absent or malformed.
    pub fn continue_or_start(traceparent: Option<&[u8]>, sample_new: bool) -> TraceContext {
        traceparent
            .and_then(parse)
            .map_or_else(|| TraceContext::root(sample_new), |parent| parent.child())
    }

    /// A span whose parent is this one (a call this span makes).
    pub fn child(&self) -> TraceContext {
        TraceContext {
            trace_id: self.trace_id,
            span_id: new_span_id(),
            parent_id: Some(self.span_id),
            flags: self.flags,
        }
    }

    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// Sets or clears the sampled flag (the other flags are kept).
    pub fn set_sampled(&mut self, sampled: bool) {
        self.flags = (self.flags & !1) | u8::from(sampled);
    }

    /// `traceparent` naming this span as the parent (what goes to a
    /// callee): 55 bytes.
    pub fn header(&self) -> String {
        ascii(&self.header_bytes())
    }

    /// [`Self::header`] without an allocation.
    pub fn header_bytes(&self) -> [u8; 55] {
        let mut out = [b'-'; 55];
        out[..2].copy_from_slice(b"00");
        hex_into(&self.trace_id, &mut out[3..35]);
        hex_into(&self.span_id, &mut out[36..52]);
        hex_into(&[self.flags], &mut out[53..]);
        out
    }

    pub fn trace_id_hex(&self) -> String {
        ascii(&self.trace_id_bytes())
    }

    /// The trace id's 32 hex digits without an allocation.
    pub fn trace_id_bytes(&self) -> [u8; 32] {
        let mut out = [0; 32];
        hex_into(&self.trace_id, &mut out);
        out
    }

    /// The span id's 16 hex digits without an allocation.
    pub fn span_id_bytes(&self) -> [u8; 16] {
        let mut out = [0; 16];
        hex_into(&self.span_id, &mut out);
        out
    }

    pub fn span_id_hex(&self) -> String {
        ascii(&self.span_id_bytes())
    }
}

/// The context a `traceparent` value names (its span being the parent of
/// the receiver's): version `00` exactly, or a later version read by its
/// `00` prefix as the specification asks. All-zero ids and version `ff`
/// are invalid.
pub fn parse(value: &[u8]) -> Option<TraceContext> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let bytes = text.as_bytes();
    if bytes.len() < 55 {
        return None;
    }
    let version = from_hex::<1>(&bytes[0..2])?[0];
    if version == 0xff || (version == 0 && bytes.len() != 55) {
        return None;
    }
    if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
        return None;
    }
    if version > 0 && bytes.len() > 55 && bytes[55] != b'-' {
        return None;
    }
    let trace_id = from_hex::<16>(&bytes[3..35])?;
    let span_id = from_hex::<8>(&bytes[36..52])?;
    let flags = from_hex::<1>(&bytes[53..55])?[0];
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(TraceContext {
        trace_id,
        span_id,
        parent_id: None,
        flags,
    })
}

/// Lowercase hex only, as the specification requires.
fn from_hex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0; N];
    for (byte, pair) in out.iter_mut().zip(text.chunks(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// `bytes` in lowercase hex into `out` (twice as long).
pub fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (byte, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0xf)];
    }
}

/// `bytes` in lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0; bytes.len() * 2];
    hex_into(bytes, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// Hex digits (ASCII) as a `String`.
fn ascii(digits: &[u8]) -> String {
    String::from_utf8_lossy(digits).into_owned()
}

fn new_span_id() -> [u8; 8] {
    loop {
        let id = random_pair().1;
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

/// Two 64-bit values no other call returns: the process's random seed
/// mixed through SplitMix64 (a bijection) with a counter that is unique in
/// the process: each thread takes a block of 2^40 values once and counts
/// in it alone, so no cache line is shared between threads per id.
fn random_pair() -> (u64, u64) {
    static SEED: OnceLock<(u64, u64)> = OnceLock::new();
    static BLOCKS: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static NEXT: Cell<u64> = Cell::new(BLOCKS.fetch_add(1, Ordering::Relaxed) << 40);
    }
    let (a, b) = *SEED.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair());
    let n = NEXT.with(|next| {
        let n = next.get();
        // A thread that used its whole block takes a new one.
        next.set(if (n + 1) & ((1 << 40) - 1) == 0 {
            BLOCKS.fetch_add(1, Ordering::Relaxed) << 40
        } else {
            n + 1
        });
        n
    });
    (
        splitmix64(n ^ a),
        splitmix64(n.wrapping_add(b) ^ a.rotate_left(17)),
    )
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn ids_made_on_many_threads_are_all_different() {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    (0..10_000)
                        .map(|_| TraceContext::root(false))
                        .flat_map(|t| {
                            [
                                t.trace_id[..8].to_vec(),
                                t.trace_id[8..].to_vec(),
                                t.span_id.to_vec(),
                            ]
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut seen = std::collections::HashSet::new();
        for thread in threads {
            for id in thread.join().unwrap() {
                assert!(seen.insert(id), "an id was made twice");
            }
        }
        assert_eq!(seen.len(), 4 * 10_000 * 3);
    }

    #[test]
    fn the_header_and_the_hex_ids_agree() {
        let here = TraceContext::continue_or_start(Some(VALID), false);
        let header = here.header_bytes();
        assert_eq!(&header[3..35], here.trace_id_hex().as_bytes());
        assert_eq!(&header[36..52], here.span_id_hex().as_bytes());
        assert_eq!(&header[..3], b"00-");
        assert_eq!(&header[52..], b"-01");
        assert_eq!(here.header().as_bytes(), &header[..]);
    }

    #[test]
    fn a_valid_traceparent_is_continued_with_a_new_span() {
        let parent = parse(VALID).unwrap();
        assert_eq!(parent.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parent.span_id_hex(), "00f067aa0ba902b7");
        assert!(parent.sampled());
        let here = TraceContext::continue_or_start(Some(VALID), false);
        assert_eq!(here.trace_id, parent.trace_id);
        assert_eq!(here.parent_id, Some(parent.span_id));
        assert_ne!(here.span_id, parent.span_id);
        assert!(here.sampled(), "the caller's decision is kept");
        let header = here.header();
        assert_eq!(header.len(), 55);
        assert_eq!(parse(header.as_bytes()).unwrap().span_id, here.span_id);
    }

    #[test]
    fn malformed_traceparents_start_a_new_trace() {
        let parent = parse(VALID).unwrap();
        for bad in [
            &b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0"[..],
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"",
        ] {
            assert!(parse(bad).is_none(), "{}", String::from_utf8_lossy(bad));
            let here = TraceContext::continue_or_start(Some(bad), true);
            assert_ne!(here.trace_id, parent.trace_id);
            assert_eq!(here.parent_id, None);
        }
        // A later version is read by its version-00 prefix.
        let future = b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        assert_eq!(parse(future).unwrap().trace_id, parent.trace_id);
    }

    #[test]
    fn ids_are_unique_and_never_zero() {
        let ids: std::collections::HashSet<[u8; 16]> = (0..10_000)
            .map(|_| TraceContext::root(true).trace_id)
            .collect();
        assert_eq!(ids.len(), 10_000);
        assert!(!TraceContext::root(false).sampled());
    }
}
