//! The access log: one line per request, after its response.
//!
//! With the plain text format (no colours: the usual case, stdout is not a
//! terminal), the line is formatted here (`telemetry::plain`), byte for
//! byte as `tracing_subscriber`'s plain format would write it, and appended
//! to the log buffer (`engine::log_buffer`), for about half of what going
//! through `tracing` costs (`bench/notes.md`). Otherwise it goes through
//! `tracing` like every other line.

use std::net::SocketAddr;

use pingora::protocols::http::ServerSession;

use super::ctx::RequestCtx;
use crate::engine::log_buffer;
use crate::errors::Failure;
use crate::policy::forwarding;
use crate::policy::plugins::Consumer;
use telemetry::plain::{push_debug, push_hex, push_number, write_timestamp};
use telemetry::trace::TraceContext;

/// Writes the access line of the request `ctx` describes; `failure`, if it
/// failed.
pub fn log(
    session: &ServerSession,
    ctx: &RequestCtx<'_>,
    failure: Option<&Failure>,
    status: u16,
    elapsed: std::time::Duration,
) {
    if !tracing::enabled!(target: "access", tracing::Level::INFO) {
        return;
    }
    let request = session.req_header();
    let line = AccessLine {
        method: request.method.as_str(),
        path: request.uri.path(),
        route: ctx.route.map_or("-", |r| r.prefix.as_str()),
        upstream: LoggedUpstream(ctx.attempts.last()),
        attempts: ctx.attempts.count(),
        status,
        micros: elapsed.as_micros() as u64,
        request_id: &ctx.request_id,
        trace: &ctx.trace,
        consumer: ctx
            .extensions
            .get::<Consumer>()
            .map_or("-", |consumer| &consumer.0),
        error: failure
            .and_then(|f| f.cause.as_ref())
            .map_or("-", |e| e.etype().as_str()),
        timeout: ctx.timeout.unwrap_or("-"),
    };
    if log_buffer::json() {
        line.append_json();
    } else if log_buffer::plain() {
        line.append();
    } else {
        line.trace();
    }
}

/// The access log's line for one request.
struct AccessLine<'a> {
    method: &'a str,
    path: &'a str,
    route: &'a str,
    upstream: LoggedUpstream<'a>,
    attempts: usize,
    status: u16,
    micros: u64,
    request_id: &'a forwarding::RequestId,
    trace: &'a TraceContext,
    consumer: &'a str,
    error: &'a str,
    timeout: &'a str,
}

thread_local! {
    /// Where a worker thread formats its access lines (no allocation per
    /// request once it has grown).
    static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

impl AccessLine<'_> {
    /// Through `tracing`, like every other line.
    fn trace(&self) {
        tracing::info!(
            target: "access",
            method = %self.method,
            path = %self.path,
            route = self.route,
            upstream = %self.upstream,
            attempts = self.attempts,
            status = self.status,
            micros = self.micros,
            request_id = %self.request_id,
            trace_id = %Hex(&self.trace.trace_id),
            span_id = %Hex(&self.trace.span_id),
            consumer = self.consumer,
            error = self.error,
            timeout = self.timeout,
            "request"
        );
    }

    /// Formatted here, byte for byte as `tracing_subscriber`'s plain format
    /// writes [`Self::trace`], and appended to the log buffer. No `fmt` on the common path: numbers through `itoa`, an IPv4
    /// upstream by hand, strings quoted as `{:?}` would when nothing in
    /// them needs escaping (else `fmt` escapes them).
    fn append(&self) {
        LINE.with_borrow_mut(|line| {
            line.clear();
            self.format(line, std::time::SystemTime::now());
            log_buffer::append(line.as_bytes());
        });
    }

    fn format(&self, line: &mut String, now: std::time::SystemTime) {
        write_timestamp(line, now);
        line.push_str("  INFO access: request method=");
        line.push_str(self.method);
        line.push_str(" path=");
        line.push_str(self.path);
        line.push_str(" route=");
        push_debug(line, self.route);
        line.push_str(" upstream=");
        match self.upstream.0 {
            Some(SocketAddr::V4(addr)) => {
                for (i, octet) in addr.ip().octets().into_iter().enumerate() {
                    if i > 0 {
                        line.push('.');
                    }
                    push_number(line, u64::from(octet));
                }
                line.push(':');
                push_number(line, u64::from(addr.port()));
            }
            _ => {
                use std::fmt::Write as _;
                let _ = write!(line, "{}", self.upstream);
            }
        }
        line.push_str(" attempts=");
        push_number(line, self.attempts as u64);
        line.push_str(" status=");
        push_number(line, u64::from(self.status));
        line.push_str(" micros=");
        push_number(line, self.micros);
        line.push_str(" request_id=");
        line.push_str(self.request_id.as_str());
        line.push_str(" trace_id=");
        push_hex(line, &self.trace.trace_id);
        line.push_str(" span_id=");
        push_hex(line, &self.trace.span_id);
        line.push_str(" consumer=");
        push_debug(line, self.consumer);
        line.push_str(" error=");
        push_debug(line, self.error);
        line.push_str(" timeout=");
        push_debug(line, self.timeout);
        line.push('\n');
    }
}

/// `bytes` in lowercase hex, for `Display`.
struct Hex<'a>(&'a [u8]);

impl std::fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl AccessLine<'_> {
    /// The JSON line (`--log-format json`): the field names every process
    /// uses, formatted here and appended to the log buffer like the text
    /// one (strings escaped by `serde_json`).
    fn append_json(&self) {
        thread_local! {
            static JSON: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        JSON.with_borrow_mut(|line| {
            line.clear();
            self.format_json(line, std::time::SystemTime::now());
            log_buffer::append(line);
        });
    }

    fn format_json(&self, line: &mut Vec<u8>, now: std::time::SystemTime) {
        let mut text = String::with_capacity(32);
        write_timestamp(&mut text, now);
        let string = |line: &mut Vec<u8>, key: &str, value: &str| {
            line.extend_from_slice(b",\"");
            line.extend_from_slice(key.as_bytes());
            line.extend_from_slice(b"\":");
            let _ = serde_json::to_writer(&mut *line, value);
        };
        line.extend_from_slice(b"{\"ts\":\"");
        line.extend_from_slice(text.as_bytes());
        line.extend_from_slice(b"\",\"level\":\"info\",\"service\":\"gateway\",\"msg\":\"request\",\"target\":\"access\"");
        string(line, "request_id", self.request_id.as_str());
        let mut hex = String::with_capacity(32);
        push_hex(&mut hex, &self.trace.trace_id);
        string(line, "trace_id", &hex);
        hex.clear();
        push_hex(&mut hex, &self.trace.span_id);
        string(line, "span_id", &hex);
        string(line, "method", self.method);
        string(line, "path", self.path);
        string(line, "route", self.route);
        line.extend_from_slice(b",\"status\":");
        line.extend_from_slice(itoa::Buffer::new().format(self.status).as_bytes());
        line.extend_from_slice(b",\"duration_ms\":");
        let millis = self.micros as f64 / 1000.0;
        line.extend_from_slice(format!("{millis:.3}").as_bytes());
        string(line, "upstream", &self.upstream.to_string());
        line.extend_from_slice(b",\"attempts\":");
        line.extend_from_slice(itoa::Buffer::new().format(self.attempts).as_bytes());
        string(line, "error", self.error);
        string(line, "timeout", self.timeout);
        string(line, "consumer", self.consumer);
        line.extend_from_slice(b"}\n");
    }
}

/// `Option<SocketAddr>` for the access log, `-` when absent, without
/// formatting it into a string first.
struct LoggedUpstream<'a>(Option<&'a SocketAddr>);

impl std::fmt::Display for LoggedUpstream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("-"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemetry::testing::Captured;

    #[test]
    fn the_hand_made_access_line_is_the_one_tracing_writes() {
        let addr: SocketAddr = "127.0.0.1:8001".parse().unwrap();
        let v6: SocketAddr = "[::1]:443".parse().unwrap();
        let v4: SocketAddr = "255.0.10.200:65535".parse().unwrap();
        let mut header = pingora::http::RequestHeader::build("GET", b"/", None).unwrap();
        header
            .insert_header(forwarding::REQUEST_ID, "rid-1")
            .unwrap();
        let id = forwarding::request_id(&header);
        let trace = TraceContext::root(true);
        let lines = [
            AccessLine {
                method: "GET",
                path: "/api/users/7",
                route: "/api/users",
                upstream: LoggedUpstream(Some(&addr)),
                attempts: 1,
                status: 200,
                micros: 1234,
                request_id: &id,
                trace: &trace,
                consumer: "-",
                error: "-",
                timeout: "-",
            },
            AccessLine {
                method: "POST",
                path: "/x",
                route: "-",
                upstream: LoggedUpstream(None),
                attempts: 0,
                status: 504,
                micros: 0,
                request_id: &id,
                trace: &trace,
                consumer: "shop-frontend",
                error: "ReadTimedout",
                timeout: "read",
            },
            // Escaped through `fmt`, as `tracing` does.
            AccessLine {
                method: "DELETE",
                path: "/we%22ird",
                route: "/we\"ird\\ é\t",
                upstream: LoggedUpstream(Some(&v6)),
                attempts: 3,
                status: 65535,
                micros: u64::MAX,
                request_id: &id,
                trace: &trace,
                consumer: "we\"ird é",
                error: "",
                timeout: "total",
            },
            AccessLine {
                method: "GET",
                path: "/",
                route: "/",
                upstream: LoggedUpstream(Some(&v4)),
                attempts: 10,
                status: 100,
                micros: 10_000_000,
                request_id: &id,
                trace: &trace,
                consumer: "-",
                error: "-",
                timeout: "-",
            },
        ];
        for line in lines {
            let captured = Captured::default();
            let sink = captured.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_writer(move || sink.clone())
                .finish();
            tracing::subscriber::with_default(subscriber, || line.trace());
            let traced = captured.text();
            let mut made = String::new();
            line.format(&mut made, std::time::SystemTime::now());
            // Equal after the timestamp (the two were taken at different times).
            let after_time = |s: &str| s.split_once(' ').map(|(_, rest)| rest.to_owned());
            assert_eq!(after_time(&made), after_time(&traced), "{made}{traced}");
            assert_eq!(made.split_once(' ').unwrap().0.len(), 27, "{made}");
            assert_eq!(traced.split_once(' ').unwrap().0.len(), 27, "{traced}");
        }
    }
}
