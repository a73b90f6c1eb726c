//! OpenTelemetry export of the tracing spans (feature `otel`): with `OTEL_EXPORTER_OTLP_ENDPOINT`
//! set (for example `http://collector:4318`), every span (requests with their request id,
//! GraphQL resolvers, ingestion batches, jobs) goes to that collector over OTLP/HTTP in batches,
//! as service `cdp` (or `OTEL_SERVICE_NAME`). The standard `OTEL_EXPORTER_OTLP_*` variables
//! (headers, timeout) apply.

use std::sync::OnceLock;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// The exporting layer, or `None` without an endpoint (or when the exporter cannot be built,
/// which is reported on standard error: logging is not up yet).
pub fn layer<S>() -> Option<impl Layer<S>>
where
    S: Subscriber + for<'span> LookupSpan<'span>,
{
    std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT")?;
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(exporter) => exporter,
        Err(error) => {
            eprintln!("OpenTelemetry export is off: {error}");
            return None;
        }
    };
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "cdp".to_owned());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build();
    let tracer = provider.tracer("cdp");
    let _ = PROVIDER.set(provider);
    Some(tracing_opentelemetry::layer().with_tracer(tracer))
}

/// Sends the spans still buffered; called once before the process exits.
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get() {
        if let Err(error) = provider.shutdown() {
            eprintln!("OpenTelemetry export did not finish: {error}");
        }
    }
}
