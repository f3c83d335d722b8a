//! Prometheus metrics (no patient data, no user names in labels).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label: outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// e.g. "delivered", "failed".
    pub outcome: String,
}

/// Label: route template and status class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// Matched route template (never the concrete path).
    pub route: String,
    /// HTTP method.
    pub method: String,
    /// Status code.
    pub status: u16,
}

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Uploads created.
    pub uploads_created: Counter,
    /// Bytes made durable.
    pub upload_bytes: Counter,
    /// Chunks refused by checksum verification.
    pub chunk_verifications_failed: Counter,
    /// Files that failed DICOM validation or whole-file verification.
    pub files_refused: Counter,
    /// Forwards by outcome.
    pub forwards: Family<Outcome, Counter>,
    /// Requests by route, method and status.
    pub requests: Family<RouteLabel, Counter>,
    /// Request latency (seconds) by route.
    pub latency: Family<RouteLabel, Histogram>,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("relaypacs");
        let m = Self {
            uploads_created: Counter::default(),
            upload_bytes: Counter::default(),
            chunk_verifications_failed: Counter::default(),
            files_refused: Counter::default(),
            forwards: Family::default(),
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            registry: Registry::default(),
        };
        registry.register(
            "uploads_created",
            "tus uploads created",
            m.uploads_created.clone(),
        );
        registry.register(
            "upload_bytes",
            "Upload bytes made durable",
            m.upload_bytes.clone(),
        );
        registry.register(
            "chunk_verifications_failed",
            "Chunks refused by checksum verification",
            m.chunk_verifications_failed.clone(),
        );
        registry.register(
            "files_refused",
            "Files refused at completion",
            m.files_refused.clone(),
        );
        registry.register("forwards", "PACS forwards by outcome", m.forwards.clone());
        registry.register("http_requests", "HTTP requests", m.requests.clone());
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency",
            m.latency.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    /// Count a delivery step (`queued`, `retrying`, `delivered`, …).
    pub fn forward(&self, outcome: &str) {
        self.forwards
            .get_or_create(&Outcome {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
