//! The daemons' web plumbing (feature `web`): what lab-server's web port
//! (`/metrics` and the dashboard) and the agent's metrics port share.
//!
//! - [`histogram`]: [`AtomicHistogram`], a prometheus-client metric whose
//!   `observe` is a few relaxed atomic adds (prometheus-client's own
//!   histogram takes a mutex), for hot paths such as the core actor's.
//! - [`process`]: `process_*` metrics read from `/proc/self` at scrape time.
//! - [`mod@serve`]: the HTTP/1.1 server loop over an axum router: a cap on open
//!   connections (more are reset at once, and logged once per interval), a
//!   timeout for a request's head (which also ends an idle keep-alive
//!   connection), a bounded TLS handshake when a certificate is given, and
//!   graceful shutdown.
//! - [`encode`]: a registry as OpenMetrics text; [`metrics_response`]
//!   answers `/metrics` in OpenMetrics text when the scraper accepts it (as
//!   Prometheus does) and in the Prometheus text format 0.0.4 otherwise (as
//!   `promtool check metrics` and curl get).

pub mod histogram;
pub mod process;
pub mod serve;

pub use histogram::AtomicHistogram;
pub use process::ProcessCollector;
pub use serve::{ServeError, WebLimits, WebTls, serve};

/// The content type of OpenMetrics text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `registry` as OpenMetrics text (ends with `# EOF`).
pub fn encode(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::with_capacity(8 * 1024);
    // Writing into a String cannot fail; a metric's own encode error would
    // be a bug in it, and leaves the text cut short.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::error!(error = %e, "metrics encoding failed");
    }
    out
}

/// The content type of the Prometheus text format.
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `registry` in the Prometheus text format 0.0.4.
pub fn encode_prometheus_text(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::with_capacity(8 * 1024);
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        tracing::error!(error = %e, "metrics encoding failed");
    }
    out
}

/// The answer to `GET /metrics` with this `Accept` header: OpenMetrics text
/// when it names `application/openmetrics-text`, else the Prometheus text
/// format.
pub fn metrics_response(
    registry: &prometheus_client::registry::Registry,
    accept: Option<&str>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let openmetrics = accept.is_some_and(|a| a.contains("application/openmetrics-text"));
    let (content_type, body) = if openmetrics {
        (OPENMETRICS_CONTENT_TYPE, encode(registry))
    } else {
        (
            PROMETHEUS_TEXT_CONTENT_TYPE,
            encode_prometheus_text(registry),
        )
    };
    ([(axum::http::header::CONTENT_TYPE, content_type)], body).into_response()
}
