//! What every process of the system shares so that it can be seen from
//! outside, whichever process it is:
//!
//! - [`trace`]: W3C Trace Context (`traceparent`), parsed, continued and
//!   written; ids made without a lock or a system call.
//! - [`log`]: one log format for all four processes: today's text lines, or
//!   JSON lines (`--log-format json`, `LOG_FORMAT=json`) whose field names
//!   are the same everywhere: `ts level service msg request_id trace_id
//!   span_id` and, for access lines, `method path route status duration_ms
//!   upstream attempts error timeout`.
//! - [`log_buffer`]: log lines appended to a buffer that a thread writes
//!   to stdout every 100 ms: no system call per line on the request path.
//! - [`plain`]: the once-per-request lines (the gateway's access line, the
//!   services' request line) formatted by hand, byte for byte as the text
//!   format writes them.
//! - [`request`]: the request a piece of work is done for (its id and
//!   trace context), in a task-local that log lines and outgoing calls
//!   read.
//! - [`export`]: OTLP export of finished spans (off unless
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` is set) and the sampling decision.
//! - `receiver` (feature `receiver`, for tests): an OTLP/HTTP receiver that
//!   keeps what it is sent.
//! - `testing` (feature `testing`): a log writer that keeps its lines.

pub mod export;
pub mod log;
pub mod log_buffer;
pub mod plain;
#[cfg(feature = "receiver")]
pub mod receiver;
pub mod request;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod trace;
