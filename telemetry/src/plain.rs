//! Log lines formatted by hand, byte for byte as `tracing_subscriber`'s
//! plain text format (no colours) writes them, for the lines written once
//! per request: the gateway's access line and the services' request line.
//! Going through `tracing`'s formatter costs about twice as much (numbers
//! and strings through `fmt`, the timestamp formatted whole every time).
//! Each user keeps a test that compares its line with the one `tracing`
//! writes for the same event. The helpers are `#[inline]`: they were the
//! gateway's own, inlined into its access line, before they moved here.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `now` in RFC 3339 with microseconds, as `humantime` (and so `tracing`'s
/// default format) writes it; the part to the second is formatted once a
/// second per thread, the rest by hand.
#[inline]
pub fn write_timestamp(line: &mut String, now: SystemTime) {
    let _ = timestamp(line, now);
}

/// [`write_timestamp`] into any `fmt::Write`.
#[inline]
pub fn timestamp(out: &mut impl std::fmt::Write, now: SystemTime) -> std::fmt::Result {
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, String)> =
            const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since_epoch.as_secs();
    SECOND.with_borrow_mut(|(cached, prefix)| {
        if *cached != seconds {
            prefix.clear();
            let second = UNIX_EPOCH + Duration::from_secs(seconds);
            let _ = write!(prefix, "{}", humantime::format_rfc3339_seconds(second));
            prefix.pop(); // its 'Z': the fraction comes first
            *cached = seconds;
        }
        out.write_str(prefix)
    })?;
    let mut micros = since_epoch.subsec_micros();
    let mut digits = [b'.', b'0', b'0', b'0', b'0', b'0', b'0', b'Z'];
    for digit in digits[1..7].iter_mut().rev() {
        *digit = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    out.write_str(std::str::from_utf8(&digits).unwrap_or_default())
}

/// `n` in decimal.
#[inline]
pub fn push_number(line: &mut String, n: u64) {
    line.push_str(itoa::Buffer::new().format(n));
}

/// `text` as `{:?}` writes it (a `&str` field); without `fmt` when nothing
/// needs escaping.
#[inline]
pub fn push_debug(line: &mut String, text: &str) {
    if text
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
    {
        line.push('"');
        line.push_str(text);
        line.push('"');
    } else {
        let _ = write!(line, "{text:?}");
    }
}

/// An id (at most 16 bytes) in lowercase hex.
#[inline]
pub fn push_hex(line: &mut String, bytes: &[u8]) {
    let mut digits = [0; 32];
    let digits = &mut digits[..2 * bytes.len().min(16)];
    crate::trace::hex_into(bytes, digits);
    line.push_str(std::str::from_utf8(digits).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hand_made_timestamp_is_the_one_humantime_writes() {
        let start = SystemTime::now();
        let mut line = String::new();
        for step_micros in [
            0,
            1,
            999_999,
            1_000_000,
            1_234_567,
            59_999_999,
            86_400_000_001,
        ] {
            let at = start + Duration::from_micros(step_micros);
            line.clear();
            write_timestamp(&mut line, at);
            assert_eq!(line, humantime::format_rfc3339_micros(at).to_string());
        }
        let at = UNIX_EPOCH + Duration::from_micros(42);
        line.clear();
        write_timestamp(&mut line, at);
        assert_eq!(line, "1970-01-01T00:00:00.000042Z");
    }

    #[test]
    fn strings_and_ids_are_written_as_fmt_would() {
        for text in ["/api/users", "", "we\"ird\\ é\t", "-"] {
            let mut line = String::new();
            push_debug(&mut line, text);
            assert_eq!(line, format!("{text:?}"));
        }
        let mut line = String::new();
        push_hex(&mut line, &[0x00, 0xab, 0x7f]);
        push_number(&mut line, 18_446_744_073_709_551_615);
        assert_eq!(line, "00ab7f18446744073709551615");
    }
}
