//! One log format for every process: `text` (the `tracing` default, as
//! before) or `json`, one object per line with the same field names in all
//! four processes.
//!
//! JSON lines carry `ts` (RFC 3339, UTC), `level`, `service`, `msg`,
//! `target`, the request the line is written for (`request_id`,
//! `trace_id`, `span_id`, from [`crate::request`]), the fields of the spans
//! the event is in, and the event's own fields. A span field and an event
//! field of the same name: the event's wins. A field named like one of the
//! line's own (`ts`, `level`, `service`, `target`) is written as
//! `event_<name>`: the gateway's `service` field (an upstream) is
//! `event_service`, and `service` always names the process.
//!
//! Text lines are `tracing_subscriber`'s own format, byte for byte
//! ([`TextLines`]), with the request a line is written for shown as the
//! outermost span, `request{request_id=.. trace_id=.. span_id=..}:`, as a
//! span of that name and those fields would be.

use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// The environment variable for the format (the `--log-format` flags read
/// it too).
pub const ENV: &str = "LOG_FORMAT";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// `tracing`'s plain text lines (the default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format {other:?}: use text or json")),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Installs the process's subscriber: `RUST_LOG` (default `info`) and
/// `format`, written through `writer` (colours only with `ansi`, text
/// only). `false` if a subscriber was already installed (tests).
pub fn init<W>(service: &'static str, format: LogFormat, ansi: bool, writer: W) -> bool
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(ansi)
            .with_writer(writer)
            .event_format(TextLines)
            .try_init()
            .is_ok(),
        LogFormat::Json => Registry::default()
            .with(filter)
            .with(SpanFields)
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(JsonLines { service })
                    .with_writer(writer),
            )
            .try_init()
            .is_ok(),
    }
}

/// The JSON value fields of a span, kept in its extensions.
struct Fields(Map<String, Value>);

/// Records each span's fields as JSON values, for [`JsonLines`].
struct SpanFields;

impl<S> Layer<S> for SpanFields
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Map::new();
        attrs.record(&mut JsonVisitor(&mut fields));
        span.extensions_mut().insert(Fields(fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(Fields(fields)) = extensions.get_mut::<Fields>() {
            values.record(&mut JsonVisitor(fields));
        }
    }
}

/// Collects fields as JSON values (`message` as `msg`).
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

/// The line's own fields, which no span or event field may replace.
const OWN: [&str; 4] = ["ts", "level", "service", "target"];

impl JsonVisitor<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        let name = match field.name() {
            "message" => "msg".to_owned(),
            name if OWN.contains(&name) => format!("event_{name}"),
            name => name.to_owned(),
        };
        self.0.insert(name, value);
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_owned()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }
}

/// The JSON line format.
pub struct JsonLines {
    pub service: &'static str,
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = Map::new();
        line.insert("ts".into(), Value::String(timestamp()));
        let level = event.metadata().level().as_str().to_ascii_lowercase();
        line.insert("level".into(), Value::String(level));
        line.insert("service".into(), Value::String(self.service.to_owned()));
        crate::request::visit(|request| {
            line.insert(
                "request_id".into(),
                Value::String(request.request_id.to_string()),
            );
            line.insert(
                "trace_id".into(),
                Value::String(request.trace.trace_id_hex()),
            );
            line.insert("span_id".into(), Value::String(request.trace.span_id_hex()));
        });
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                if let Some(Fields(fields)) = span.extensions().get::<Fields>() {
                    for (name, value) in fields {
                        line.insert(name.clone(), value.clone());
                    }
                }
            }
        }
        event.record(&mut JsonVisitor(&mut line));
        line.insert(
            "target".into(),
            Value::String(event.metadata().target().to_owned()),
        );
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// The text line format: `tracing_subscriber`'s default (`Full`: time,
/// level, the spans from the outermost, target, fields), with the request
/// the line is written for ([`crate::request`]) as the outermost span,
/// `request{request_id=.. trace_id=.. span_id=..}:`, written as
/// `tracing_subscriber` would write a span of that name and those fields.
/// Colours as its own, when the writer has them.
pub struct TextLines;

/// The level as `tracing_subscriber` pads and colours it.
fn level_text(level: tracing::Level) -> (&'static str, nu_ansi_term::Color) {
    use nu_ansi_term::Color;
    match level {
        tracing::Level::TRACE => ("TRACE", Color::Purple),
        tracing::Level::DEBUG => ("DEBUG", Color::Blue),
        tracing::Level::INFO => (" INFO", Color::Green),
        tracing::Level::WARN => (" WARN", Color::Yellow),
        tracing::Level::ERROR => ("ERROR", Color::Red),
    }
}

impl<S, N> FormatEvent<S, N> for TextLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        use nu_ansi_term::Style;
        use tracing_log::NormalizeEvent;
        use tracing_subscriber::fmt::FormattedFields;
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let ansi = writer.has_ansi_escapes();
        let style = |style: Style| if ansi { style } else { Style::new() };
        let (dimmed, bold, italic) = (
            style(Style::new().dimmed()),
            style(Style::new().bold()),
            style(Style::new().italic()),
        );
        if ansi {
            write!(writer, "{}", dimmed.prefix())?;
        }
        crate::plain::timestamp(&mut writer, std::time::SystemTime::now())?;
        if ansi {
            write!(writer, "{}", dimmed.suffix())?;
        }
        let (level, colour) = level_text(*meta.level());
        if ansi {
            write!(writer, " {} ", colour.paint(level))?;
        } else {
            write!(writer, " {level} ")?;
        }
        let mut seen = false;
        let mut result = Ok(());
        crate::request::visit(|request| {
            seen = true;
            let mut trace_id = String::with_capacity(32);
            crate::plain::push_hex(&mut trace_id, &request.trace.trace_id);
            let mut span_id = String::with_capacity(16);
            crate::plain::push_hex(&mut span_id, &request.trace.span_id);
            result = write!(
                writer,
                "{}{}{}{}{} {}{}{} {}{}{}{}{}",
                bold.paint("request"),
                bold.paint("{"),
                italic.paint("request_id"),
                dimmed.paint("="),
                request.request_id,
                italic.paint("trace_id"),
                dimmed.paint("="),
                trace_id,
                italic.paint("span_id"),
                dimmed.paint("="),
                span_id,
                bold.paint("}"),
                dimmed.paint(":"),
            );
        });
        result?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                write!(writer, "{}", bold.paint(span.metadata().name()))?;
                seen = true;
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    write!(writer, "{}{}{}", bold.paint("{"), fields, bold.paint("}"))?;
                }
                write!(writer, "{}", dimmed.paint(":"))?;
            }
        }
        if seen {
            writer.write_char(' ')?;
        }
        write!(
            writer,
            "{}{} ",
            dimmed.paint(meta.target()),
            dimmed.paint(":")
        )?;
        ctx.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Now, RFC 3339 UTC with microseconds.
pub fn timestamp() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Captured;

    #[test]
    fn json_lines_carry_the_shared_fields_and_the_span_ones() {
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = Registry::default().with(SpanFields).with(
            tracing_subscriber::fmt::layer()
                .event_format(JsonLines {
                    service: "order-service",
                })
                .with_writer(move || sink.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "request",
                request_id = "rid-1",
                trace_id = "t1",
                span_id = tracing::field::Empty
            );
            span.record("span_id", "s1");
            let _in = span.enter();
            tracing::info!(
                status = 201u64,
                duration_ms = 1.5,
                service = "users",
                "order placed"
            );
        });
        let text = captured.text();
        let line: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["level"], "info");
        assert_eq!(line["service"], "order-service");
        assert_eq!(
            line["event_service"], "users",
            "an event's own service field"
        );
        assert_eq!(line["msg"], "order placed");
        assert_eq!(line["request_id"], "rid-1");
        assert_eq!(line["trace_id"], "t1");
        assert_eq!(line["span_id"], "s1");
        assert_eq!(line["status"], 201);
        assert_eq!(line["duration_ms"], 1.5);
        let ts = line["ts"].as_str().unwrap();
        assert!(humantime::parse_rfc3339(ts).is_ok(), "{ts}");
    }

    /// Lines written by `subscriber` while `emit` runs.
    fn written<S>(subscriber: impl FnOnce(Captured) -> S, emit: impl FnOnce()) -> String
    where
        S: Subscriber + Send + Sync + 'static,
    {
        let captured = Captured::default();
        tracing::subscriber::with_default(subscriber(captured.clone()), emit);
        captured.text()
    }

    /// Everything after the timestamp (the two lines were written at
    /// different times), the timestamp's length checked.
    fn after_time(line: &str, ansi: bool) -> String {
        let skip = if ansi {
            "\x1b[2m".len() + 27 + "\x1b[0m".len()
        } else {
            27
        };
        assert!(line.len() > skip, "{line:?}");
        line[skip..].to_owned()
    }

    #[test]
    fn text_lines_are_tracings_own_with_the_request_as_outermost_span() {
        use crate::request::{RequestContext, within_sync};
        use crate::trace::TraceContext;
        let trace = TraceContext::root(true);
        let context = RequestContext {
            request_id: "rid-1".into(),
            trace,
        };
        for ansi in [false, true] {
            let ours = |sink: Captured| {
                tracing_subscriber::fmt()
                    .with_ansi(ansi)
                    .with_max_level(tracing::Level::TRACE)
                    .with_writer(move || sink.clone())
                    .event_format(TextLines)
                    .finish()
            };
            let theirs = |sink: Captured| {
                tracing_subscriber::fmt()
                    .with_ansi(ansi)
                    .with_max_level(tracing::Level::TRACE)
                    .with_writer(move || sink.clone())
                    .finish()
            };
            let plain = || {
                tracing::warn!(answer = 42, text = "a \"b\"", "outside any request");
                let span = tracing::info_span!("call", peer = %"127.0.0.1:1", attempt = 2);
                let _in = span.enter();
                let inner = tracing::debug_span!("inner");
                let _inner = inner.enter();
                tracing::error!(reason = ?Some(3), "in two spans");
            };
            let (made, traced) = (written(ours, plain), written(theirs, plain));
            assert_eq!(made.lines().count(), 2, "{made}");
            for (made, traced) in made.lines().zip(traced.lines()) {
                assert_eq!(
                    after_time(made, ansi),
                    after_time(traced, ansi),
                    "ansi {ansi}"
                );
            }
            let in_request = || {
                within_sync(context.clone(), || {
                    tracing::info!(order = 7, "in a request");
                    let span = tracing::trace_span!("db", op = "insert");
                    span.in_scope(|| tracing::trace!("in a request and a span"));
                })
            };
            let as_span = || {
                let request = tracing::info_span!(
                    "request",
                    request_id = %"rid-1",
                    trace_id = %trace.trace_id_hex(),
                    span_id = %trace.span_id_hex(),
                );
                let _in = request.enter();
                tracing::info!(order = 7, "in a request");
                let span = tracing::trace_span!("db", op = "insert");
                span.in_scope(|| tracing::trace!("in a request and a span"));
            };
            let ours = written(ours, in_request);
            assert_eq!(ours.lines().count(), 2, "{ours}");
            for (made, traced) in ours.lines().zip(written(theirs, as_span).lines()) {
                assert_eq!(
                    after_time(made, ansi),
                    after_time(traced, ansi),
                    "ansi {ansi}"
                );
            }
        }
    }

    #[test]
    fn json_lines_carry_the_request_they_are_written_for() {
        use crate::request::{RequestContext, within_sync};
        let context = RequestContext {
            request_id: "rid-2".into(),
            trace: crate::trace::TraceContext::root(false),
        };
        let json = |sink: Captured| {
            Registry::default().with(SpanFields).with(
                tracing_subscriber::fmt::layer()
                    .event_format(JsonLines {
                        service: "user-service",
                    })
                    .with_writer(move || sink.clone()),
            )
        };
        let text = written(json, || {
            within_sync(context.clone(), || {
                tracing::info!(status = 200u64, "request")
            })
        });
        let line: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["request_id"], "rid-2");
        assert_eq!(line["trace_id"], context.trace.trace_id_hex());
        assert_eq!(line["span_id"], context.trace.span_id_hex());
        assert_eq!(line["status"], 200);
    }

    #[test]
    fn formats_parse_and_name_themselves() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!(" Text ".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert!("xml".parse::<LogFormat>().is_err());
        assert_eq!(LogFormat::Json.to_string(), "json");
    }
}
