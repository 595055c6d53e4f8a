//! OTLP export of spans, and the sampling decision that goes with it.
//!
//! Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; then finished spans go to
//! the OpenTelemetry SDK's `BatchSpanProcessor` (a bounded queue and a
//! thread of its own: the request path only enqueues) and out through the
//! OTLP/HTTP protobuf exporter. `OTEL_TRACES_SAMPLER` / `_ARG` choose which
//! traces are sampled (default `parentbased_always_on`), `OTEL_BSP_*` tune
//! the batches, `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` the
//! resource, as the specification names them.
//!
//! Spans are recorded whole when they end, with the ids the process
//! already chose and sent on (`trace::TraceContext`): the SDK's tracer
//! would pick its own span ids, and a proxy must know the id it names as
//! the parent before the attempt starts. So this module builds the SDK's
//! `SpanData` itself and hands it to the processor. Propagation does not
//! depend on any of this: with export off, a process passes the caller's
//! sampled flag on unchanged and starts unsampled traces.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use opentelemetry::InstrumentationScope;
use opentelemetry::trace::{SpanContext, SpanId, Status, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SamplingDecision, ShouldSample, SpanData,
    SpanEvents, SpanLinks, SpanProcessor,
};

use crate::trace::{self, TraceContext};

pub use opentelemetry::KeyValue;
pub use opentelemetry::trace::SpanKind;

/// The running exporter, once [`init_from_env`] found an endpoint.
static EXPORTER: OnceLock<Exporter> = OnceLock::new();

struct Exporter {
    processor: BatchSpanProcessor,
    scope: InstrumentationScope,
    sampling: Sampling,
}

/// `OTEL_TRACES_SAMPLER`, read once.
#[derive(Debug)]
struct Sampling {
    /// For a trace this process starts (and any, unless parent-based).
    root: Root,
    /// A continued trace keeps its caller's decision.
    parent_based: bool,
}

#[derive(Debug)]
enum Root {
    On,
    Off,
    Ratio(Sampler),
}

impl Sampling {
    fn from_env(
        sampler: Option<&str>,
        argument: Option<&str>,
    ) -> Result<Sampling, ExportSetupError> {
        let ratio = || -> Result<Root, ExportSetupError> {
            let ratio = match argument.map(str::trim).filter(|a| !a.is_empty()) {
                None => 1.0,
                Some(text) => text
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| {
                        ExportSetupError(format!(
                            "OTEL_TRACES_SAMPLER_ARG={text:?}: expected a ratio from 0 to 1"
                        ))
                    })?,
            };
            Ok(Root::Ratio(Sampler::TraceIdRatioBased(ratio)))
        };
        let name = sampler.map_or("parentbased_always_on", str::trim);
        let (root, parent_based) = match name {
            "always_on" => (Root::On, false),
            "always_off" => (Root::Off, false),
            "traceidratio" => (ratio()?, false),
            "" | "parentbased_always_on" => (Root::On, true),
            "parentbased_always_off" => (Root::Off, true),
            "parentbased_traceidratio" => (ratio()?, true),
            other => {
                return Err(ExportSetupError(format!(
                    "OTEL_TRACES_SAMPLER={other:?} is not supported (always_on, always_off, \
                     traceidratio, parentbased_always_on, parentbased_always_off, \
                     parentbased_traceidratio)"
                )));
            }
        };
        Ok(Sampling { root, parent_based })
    }

    fn sample_root(&self, trace_id: &[u8; 16]) -> bool {
        match &self.root {
            Root::On => true,
            Root::Off => false,
            Root::Ratio(sampler) => matches!(
                sampler
                    .should_sample(
                        None,
                        TraceId::from_bytes(*trace_id),
                        "",
                        &SpanKind::Server,
                        &[],
                        &[],
                    )
                    .decision,
                SamplingDecision::RecordAndSample
            ),
        }
    }
}

/// Why export could not be set up from the environment.
#[derive(Debug, thiserror::Error)]
#[error("OpenTelemetry export: {0}")]
pub struct ExportSetupError(String);

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Starts exporting if the environment asks for it; `service` is the
/// resource's `service.name` unless `OTEL_SERVICE_NAME` says otherwise.
/// Returns whether export is on. Call once, at start-up, from any thread.
pub fn init_from_env(service: &'static str) -> Result<bool, ExportSetupError> {
    let endpoint =
        env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"));
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    if endpoint.is_none() || disabled {
        return Ok(false);
    }
    let protocol =
        env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"));
    if let Some(protocol) = protocol.filter(|p| p != "http/protobuf") {
        return Err(ExportSetupError(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={protocol:?}: only http/protobuf is built in"
        )));
    }
    let sampling = Sampling::from_env(
        env("OTEL_TRACES_SAMPLER").as_deref(),
        env("OTEL_TRACES_SAMPLER_ARG").as_deref(),
    )?;
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_timeout(Duration::from_secs(10))
        .build()
        .map_err(|err| ExportSetupError(err.to_string()))?;
    let mut processor = BatchSpanProcessor::new(exporter, BatchConfigBuilder::default().build());
    let mut resource = Resource::builder();
    if env("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service);
    }
    processor.set_resource(&resource.build());
    let scope = InstrumentationScope::builder(service)
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    EXPORTER
        .set(Exporter {
            processor,
            scope,
            sampling,
        })
        .map_err(|_| ExportSetupError("set up twice".into()))?;
    Ok(true)
}

/// Whether spans are exported (sampled ones).
pub fn enabled() -> bool {
    EXPORTER.get().is_some()
}

/// This process's span for a request that came with `traceparent`: the
/// caller's trace continued (a malformed header is replaced by a new
/// trace, never followed), sampled as `OTEL_TRACES_SAMPLER` says. With
/// export off, a continued trace keeps the caller's flag and a new one is
/// not sampled.
pub fn begin(traceparent: Option<&[u8]>) -> TraceContext {
    let exporter = EXPORTER.get();
    match traceparent.and_then(trace::parse) {
        Some(parent) => {
            let mut here = parent.child();
            if let Some(exporter) = exporter
                && !exporter.sampling.parent_based
            {
                here.set_sampled(exporter.sampling.sample_root(&here.trace_id));
            }
            here
        }
        None => {
            let mut here = TraceContext::root(false);
            here.set_sampled(exporter.is_some_and(|e| e.sampling.sample_root(&here.trace_id)));
            here
        }
    }
}

/// A finished span.
pub struct Span<'a> {
    /// Its ids and its parent's.
    pub context: &'a TraceContext,
    /// The parent is in another process (it came in a `traceparent`).
    pub remote_parent: bool,
    pub name: Cow<'static, str>,
    pub kind: SpanKind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<KeyValue>,
    /// Set when the span's work failed, with a description.
    pub error: Option<Cow<'static, str>>,
}

/// Hands a finished span to the exporter if it is sampled and export is
/// on; never blocks (a full queue drops the span, as the SDK counts).
pub fn record(span: Span<'_>) {
    let Some(exporter) = EXPORTER.get() else {
        return;
    };
    if !span.context.sampled() {
        return;
    }
    exporter.processor.on_end(SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes(span.context.trace_id),
            SpanId::from_bytes(span.context.span_id),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: span
            .context
            .parent_id
            .map_or(SpanId::INVALID, SpanId::from_bytes),
        parent_span_is_remote: span.remote_parent,
        span_kind: span.kind,
        name: span.name,
        start_time: span.start,
        end_time: span.end,
        attributes: span.attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: match span.error {
            Some(description) => Status::Error { description },
            None => Status::Unset,
        },
        instrumentation_scope: exporter.scope.clone(),
    });
}

/// Sends what is queued and stops the exporter (at process exit; waits at
/// most the export timeout).
pub fn shutdown() {
    if let Some(exporter) = EXPORTER.get() {
        let _ = exporter.processor.force_flush();
        let _ = exporter.processor.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_names_follow_the_specification() {
        let id = [7u8; 16];
        let always = Sampling::from_env(Some("always_on"), None).unwrap();
        assert!(always.sample_root(&id) && !always.parent_based);
        let never = Sampling::from_env(Some("parentbased_always_off"), None).unwrap();
        assert!(!never.sample_root(&id) && never.parent_based);
        let default = Sampling::from_env(None, None).unwrap();
        assert!(default.sample_root(&id) && default.parent_based);
        let none = Sampling::from_env(Some("traceidratio"), Some("0")).unwrap();
        assert!(!none.sample_root(&id));
        let all = Sampling::from_env(Some("parentbased_traceidratio"), Some("1")).unwrap();
        assert!(all.sample_root(&id));
        // A ratio samples about that share of traces.
        let half = Sampling::from_env(Some("traceidratio"), Some("0.5")).unwrap();
        let sampled = (0..2000)
            .filter(|_| half.sample_root(&TraceContext::root(false).trace_id))
            .count();
        assert!((800..1200).contains(&sampled), "{sampled} of 2000");
        for (name, argument) in [
            ("jaeger_remote", None),
            ("traceidratio", Some("1.5")),
            ("traceidratio", Some("half")),
        ] {
            assert!(Sampling::from_env(Some(name), argument).is_err(), "{name}");
        }
    }

    #[test]
    fn without_export_the_callers_decision_is_kept() {
        let sampled = begin(Some(
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ));
        assert!(sampled.sampled());
        let unsampled = begin(Some(
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        ));
        assert!(!unsampled.sampled());
        assert!(!begin(None).sampled());
        assert!(!begin(Some(b"garbage")).sampled());
    }
}
