//! Log output: `tracing` lines into a shared in-memory buffer that a
//! background thread writes to stdout every [`FLUSH_INTERVAL`] (or at once
//! when [`FLUSH_BYTES`] are waiting).
//!
//! The gateway's access log and the services' request log write a line
//! per request. Writing it to stdout directly
//! costs a system call per request; handing it to a writer thread through a
//! channel costs a thread wake-up per request when traffic is light. Here a
//! request only appends its line to a buffer under a short lock; lines stay
//! whole and in order, and appear within [`FLUSH_INTERVAL`] (as nginx's
//! `access_log ... buffer= flush=`). [`flush`] writes out what is left
//! before the process exits.
//!
//! Not a Pingora workaround: `tracing-appender`'s non-blocking writer is
//! the channel-and-thread design above. A buffered, timer-flushed writer in
//! `tracing-appender` would delete this file.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How stale a buffered line may get before it is written.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// A buffer this full is written by the thread that filled it.
pub const FLUSH_BYTES: usize = 64 * 1024;

static BUFFER: Mutex<Vec<u8>> = Mutex::new(Vec::new());
/// The subscriber writes plain text (no colours) into [`BUFFER`].
static PLAIN: AtomicBool = AtomicBool::new(false);

/// Records that the installed subscriber writes plain lines into the
/// buffer, so [`append`]ed lines look like its own.
pub fn set_plain(plain: bool) {
    PLAIN.store(plain, Ordering::Relaxed);
}

/// Whether lines may be formatted by hand and [`append`]ed (the gateway's
/// access log's fast path; see its `proxy::access_log`).
pub fn plain() -> bool {
    PLAIN.load(Ordering::Relaxed)
}

/// The subscriber writes JSON lines into the buffer (`--log-format json`).
static JSON: AtomicBool = AtomicBool::new(false);

/// Records that lines are JSON, so the access log appends JSON lines.
pub fn set_json(json: bool) {
    JSON.store(json, Ordering::Relaxed);
}

/// Whether the access log writes JSON lines.
pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// Appends whole lines to the buffer; writes it out if it is full.
pub fn append(bytes: &[u8]) {
    append_or_write(bytes, write_out);
}

/// [`append`], with `write` for a full buffer.
fn append_or_write(bytes: &[u8], write: impl FnOnce(&[u8])) {
    let full = {
        let mut buffer = BUFFER.lock().unwrap_or_else(PoisonError::into_inner);
        buffer.extend_from_slice(bytes);
        (buffer.len() >= FLUSH_BYTES).then(|| take_lines(&mut buffer))
    };
    if let Some(full) = full {
        write(&full);
    }
}

/// Writes out every buffered line.
pub fn flush() {
    let pending = {
        let mut buffer = BUFFER.lock().unwrap_or_else(PoisonError::into_inner);
        if buffer.is_empty() {
            return;
        }
        take_lines(&mut buffer)
    };
    write_out(&pending);
}

/// The buffered lines, the buffer left empty with its capacity kept: the
/// next lines do not grow a new buffer from nothing, copying it at each
/// step.
fn take_lines(buffer: &mut Vec<u8>) -> Vec<u8> {
    let capacity = buffer.capacity();
    std::mem::replace(buffer, Vec::with_capacity(capacity))
}

fn write_out(bytes: &[u8]) {
    if !bytes.is_empty() {
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(bytes);
        let _ = stdout.flush();
    }
}

/// The `MakeWriter` for `tracing_subscriber::fmt`.
#[derive(Debug, Clone, Copy, Default)]
pub struct BufferedStdout;

/// One event's writer: appends to the shared buffer.
pub struct LineWriter;

impl Write for LineWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        append(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BufferedStdout {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter
    }
}

/// Installs the process's subscriber for `service` in `format` writing into
/// the buffer (colours only with `ansi`, text only), records which lines
/// may be [`append`]ed by hand ([`plain`], [`json`]), and starts the
/// thread that writes the buffer out. `false` if a subscriber was already
/// installed (tests): nothing else is done then.
pub fn install(service: &'static str, format: crate::log::LogFormat, ansi: bool) -> bool {
    use crate::log::LogFormat;
    let ansi = ansi && format == LogFormat::Text;
    if !crate::log::init(service, format, ansi, BufferedStdout) {
        return false;
    }
    set_plain(!ansi && format == LogFormat::Text);
    set_json(format == LogFormat::Json);
    if let Err(err) = start_flusher() {
        eprintln!("{service}: cannot start the log writer thread: {err}");
    }
    true
}

/// Starts the thread that writes the buffer out every [`FLUSH_INTERVAL`].
pub fn start_flusher() -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("log-writer".to_owned())
        .spawn(|| {
            loop {
                std::thread::sleep(FLUSH_INTERVAL);
                flush();
            }
        })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_buffer_is_written_at_once_and_keeps_its_capacity() {
        // Other tests may log meanwhile: start from an empty buffer and
        // count only what this test appends.
        let line = [b'x'; 1024];
        let mut written = 0;
        let mut appended = 0;
        while written == 0 {
            append_or_write(&line, |bytes| written = bytes.len());
            appended += line.len();
            assert!(appended <= 2 * FLUSH_BYTES, "never written");
        }
        assert!(written >= FLUSH_BYTES);
        let buffer = BUFFER.lock().unwrap();
        assert!(buffer.capacity() >= FLUSH_BYTES, "its capacity is lost");
    }
}
