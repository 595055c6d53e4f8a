//! The request line: one log line per request a service answers, written
//! by `serve`'s middleware once the response is ready, within the request
//! (`telemetry::request`), so it reads
//! `request{request_id=.. trace_id=.. span_id=..}: service_kit::serve: request method=..`.
//!
//! With the plain text format (no colours: the usual case, stdout is not a
//! terminal) the line is formatted here, byte for byte as `tracing`'s text
//! format writes the same event (`telemetry::plain`), and appended to the
//! log buffer: it is written on every request, three or four times per
//! order, and through `tracing`'s formatter it cost as much as a
//! primary-key read (`bench/notes.md`). Otherwise (JSON lines, colours) it
//! goes through `tracing` like every other line.

use telemetry::log_buffer;
use telemetry::plain::{push_debug, push_hex, write_timestamp};
use telemetry::trace::TraceContext;
use tracing::Level;

/// What the line says of one request.
pub struct RequestLine<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// The route template, `unmatched` if none.
    pub route: &'a str,
    pub status: u16,
    pub duration_ms: f64,
    pub request_id: &'a str,
    pub trace: &'a TraceContext,
}

/// The target of the line: `serve`'s, as before it was written by hand.
const TARGET: &str = "service_kit::serve";

thread_local! {
    /// Where a thread formats its lines (no allocation per request once it
    /// has grown).
    static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

impl RequestLine<'_> {
    /// Writes the line at `level` (`INFO`, or `DEBUG` for a successful
    /// health check or scrape); called within the request's context.
    pub fn log(&self, level: Level) {
        let enabled = if level == Level::INFO {
            tracing::enabled!(target: TARGET, Level::INFO)
        } else {
            tracing::enabled!(target: TARGET, Level::DEBUG)
        };
        if !enabled {
            return;
        }
        if log_buffer::plain() {
            LINE.with_borrow_mut(|line| {
                line.clear();
                self.format(line, level, std::time::SystemTime::now());
                log_buffer::append(line.as_bytes());
            });
        } else {
            self.trace(level);
        }
    }

    /// Through `tracing`, like every other line.
    fn trace(&self, level: Level) {
        let (method, path, route, status, duration_ms) = (
            self.method,
            self.path,
            self.route,
            self.status,
            self.duration_ms,
        );
        if level == Level::INFO {
            tracing::info!(target: TARGET, %method, %path, route, status, duration_ms, "request");
        } else {
            tracing::debug!(target: TARGET, %method, %path, route, status, duration_ms, "request");
        }
    }

    /// Byte for byte what [`Self::trace`] makes `telemetry::log`'s text
    /// format write within the request, its `request{..}` included.
    fn format(&self, line: &mut String, level: Level, now: std::time::SystemTime) {
        use std::fmt::Write as _;
        write_timestamp(line, now);
        line.push_str(if level == Level::INFO {
            "  INFO request{request_id="
        } else {
            " DEBUG request{request_id="
        });
        line.push_str(self.request_id);
        line.push_str(" trace_id=");
        push_hex(line, &self.trace.trace_id);
        line.push_str(" span_id=");
        push_hex(line, &self.trace.span_id);
        line.push_str("}: ");
        line.push_str(TARGET);
        line.push_str(": request method=");
        line.push_str(self.method);
        line.push_str(" path=");
        line.push_str(self.path);
        line.push_str(" route=");
        push_debug(line, self.route);
        line.push_str(" status=");
        telemetry::plain::push_number(line, u64::from(self.status));
        line.push_str(" duration_ms=");
        let _ = write!(line, "{:?}", self.duration_ms);
        line.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemetry::testing::Captured;

    #[test]
    fn the_hand_made_line_is_the_one_tracing_writes() {
        let trace = TraceContext::root(true);
        let lines = [
            (
                Level::INFO,
                "POST",
                "/orders",
                "/orders",
                201,
                1.25,
                "rid-1",
            ),
            (
                Level::INFO,
                "GET",
                "/users/7",
                "/users/{id}",
                404,
                0.000_123,
                "x",
            ),
            (
                Level::DEBUG,
                "GET",
                "/health",
                "/health",
                200,
                12_345.678,
                "r",
            ),
            // Escaped through `fmt`, as `tracing` does.
            (
                Level::INFO,
                "GET",
                "/we%22ird",
                "unmatched \"é\"",
                65535,
                0.0,
                "a-b",
            ),
        ];
        for (level, method, path, route, status, duration_ms, request_id) in lines {
            let line = RequestLine {
                method,
                path,
                route,
                status,
                duration_ms,
                request_id,
                trace: &trace,
            };
            let captured = Captured::default();
            let sink = captured.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_max_level(Level::DEBUG)
                .with_writer(move || sink.clone())
                .event_format(telemetry::log::TextLines)
                .finish();
            let context = telemetry::request::RequestContext {
                request_id: request_id.into(),
                trace,
            };
            tracing::subscriber::with_default(subscriber, || {
                telemetry::request::within_sync(context, || line.trace(level));
            });
            let traced = captured.text();
            let mut made = String::new();
            line.format(&mut made, level, std::time::SystemTime::now());
            // Equal after the timestamp (the two were taken at different times).
            let after_time = |s: &str| s.split_once(' ').map(|(_, rest)| rest.to_owned());
            assert_eq!(after_time(&made), after_time(&traced), "{made}{traced}");
            assert_eq!(made.split_once(' ').unwrap().0.len(), 27, "{made}");
        }
    }
}
