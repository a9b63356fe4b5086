//! Logs and traces.
//!
//! - **Logs**: `tracing` to stderr, filtered by `RUST_LOG` (default `info`).
//!   A line logged inside a traced operation carries its `trace_id`.
//! - **Traces** (OpenTelemetry): when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, the spans below are
//!   batched and exported over OTLP/gRPC; the standard variables are
//!   honoured (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//!   `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_HEADERS`,
//!   `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_SDK_DISABLED`). Unset, nothing is
//!   exported and the spans are disabled where they are written (a cached
//!   check, no allocation).
//! - **Propagation**: W3C trace context (`traceparent`, `tracestate`) in bus
//!   headers ([`inject`], [`follow`]) and gRPC metadata (the client
//!   interceptor and the server's token check in [`crate::grpc`]), so one
//!   client push is one trace from the gateway through the services to their
//!   stores, Redis and the push providers.
//!
//! Spans use the target [`TRACE`] and are named for what they do
//! (`gateway.push`, `chat.message:send`, `store.append_message`,
//! `redis.<op>`, `push.fcm`); their attributes are kinds, events and
//! outcomes — never tokens, ids of people or message content.

use std::sync::OnceLock;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::bus::Headers;

/// The target of every span meant for traces.
pub const TRACE: &str = "quckchat::trace";

/// Where traces go (OTLP/gRPC); unset: no traces.
pub const OTEL_EXPORTER_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// Where traces go, overriding [`OTEL_EXPORTER_OTLP_ENDPOINT`] for traces.
pub const OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
/// `grpc` (the default); other OTLP protocols are refused at start.
pub const OTEL_EXPORTER_OTLP_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
/// The service name in traces (default: the process's, e.g. `chat-svc`).
pub const OTEL_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
/// `true`: no traces even with an endpoint.
pub const OTEL_SDK_DISABLED: &str = "OTEL_SDK_DISABLED";

/// The exporting provider, when traces are on (flushed by [`shutdown`]).
static PROVIDER: OnceLock<Option<SdkTracerProvider>> = OnceLock::new();

/// Whether spans are exported (set once by [`init`]).
pub fn enabled() -> bool {
    matches!(PROVIDER.get(), Some(Some(_)))
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Installs the global subscriber once (later calls do nothing): logs, and
/// traces when an OTLP endpoint is configured. `service` names the process
/// in traces unless `OTEL_SERVICE_NAME` does. Must run inside a Tokio
/// runtime (the exporter's gRPC client). A bad OTLP setting is a config
/// error naming the variable.
pub fn init(service: &str) -> Result<(), crate::config::ConfigError> {
    if PROVIDER.get().is_some() {
        return Ok(());
    }
    let provider = tracer_provider(service)?;
    let traced = provider.is_some();
    let mut logs = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Trace spans reach the log lines only when they are exported (then a
    // line inside one shows its trace_id); otherwise they are off at their
    // callsites.
    logs = logs.add_directive(
        format!("{TRACE}={}", if traced { "info" } else { "off" })
            .parse()
            .unwrap_or_else(|_| LevelFilter::OFF.into()),
    );
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_filter(logs);
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("quckchat"))
            .with_filter(Targets::new().with_target(TRACE, LevelFilter::TRACE))
    });
    let installed = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .is_ok();
    let _ = PROVIDER.set(provider.filter(|_| installed));
    Ok(())
}

fn tracer_provider(service: &str) -> Result<Option<SdkTracerProvider>, crate::config::ConfigError> {
    use crate::config::ConfigError;
    let endpoint =
        env(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT).or_else(|| env(OTEL_EXPORTER_OTLP_ENDPOINT));
    let disabled = env(OTEL_SDK_DISABLED).is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let Some(endpoint) = endpoint.filter(|_| !disabled) else {
        return Ok(None);
    };
    if let Some(protocol) = env(OTEL_EXPORTER_OTLP_PROTOCOL).filter(|p| p != "grpc") {
        return Err(ConfigError::new(
            OTEL_EXPORTER_OTLP_PROTOCOL,
            format!("{protocol:?}: only \"grpc\" is supported (OTLP over gRPC, usually port 4317)"),
        ));
    }
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(ConfigError::new(
            OTEL_EXPORTER_OTLP_ENDPOINT,
            format!("{endpoint:?} is not an http:// or https:// URL"),
        ));
    }
    // The builder reads the endpoint, headers and timeout from the
    // standard variables itself.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| ConfigError::new(OTEL_EXPORTER_OTLP_ENDPOINT, e.to_string()))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if env(OTEL_SERVICE_NAME).is_none() {
        resource = resource.with_service_name(service.to_owned());
    }
    let provider = SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_batch_exporter(exporter)
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    Ok(Some(provider))
}

/// Exports what is still batched (at most a few seconds); for the end of
/// the process.
pub fn shutdown() {
    if let Some(Some(provider)) = PROVIDER.get() {
        if let Err(err) = provider.shutdown() {
            eprintln!("traces not all exported: {err}");
        }
    }
}

/// Writes the current span's trace context into bus `headers`.
pub fn inject(headers: &mut Headers) {
    if !enabled() {
        return;
    }
    let cx = Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

/// The current span's trace context as headers (`traceparent`,
/// `tracestate`); empty when traces are off.
pub fn current_headers() -> Headers {
    let mut headers = Headers::new();
    inject(&mut headers);
    headers
}

/// Makes `span` a child of the trace context in `headers` (if any), and
/// records its trace id in its `trace_id` field for log lines.
pub fn follow(span: &Span, headers: &Headers) {
    if !enabled() || span.is_disabled() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    record_trace_id(span);
}

/// Records `span`'s trace id in its `trace_id` field (declared `Empty`).
pub fn record_trace_id(span: &Span) {
    if !enabled() || span.is_disabled() {
        return;
    }
    let id = span.context().span().span_context().trace_id();
    span.record("trace_id", tracing::field::display(id));
}

struct HeaderInjector<'a>(&'a mut Headers);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.retain(|(k, _)| !k.eq_ignore_ascii_case(key));
        self.0.push((key.to_owned(), value));
    }
}

struct HeaderExtractor<'a>(&'a Headers);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}
