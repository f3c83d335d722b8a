//! Prometheus metrics (no patient data, no user names in labels). Every
//! label value comes from a closed set, never from a client's text, so
//! the exposition stays bounded in size whatever clients send.

use axum::http::{Method, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label: outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// e.g. "delivered", "failed" (a literal of ours, never input).
    pub outcome: &'static str,
}

/// The methods that get their own label value; any other is `other`.
pub const KNOWN_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
];

/// Label value of the route when no route matched.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// The label value of a request method: one of [`KNOWN_METHODS`] or
/// `other` (never the client's text).
pub fn method_label(method: &Method) -> &'static str {
    KNOWN_METHODS
        .iter()
        .find(|m| **m == method.as_str())
        .copied()
        .unwrap_or("other")
}

/// The label value of a status: its class, `1xx` to `5xx`.
pub fn status_label(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Labels of the request counter: every value from a closed set (route
/// templates of the router, [`KNOWN_METHODS`] or `other`, status classes),
/// so the number of series is bounded whatever clients send.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// Matched route template (never the concrete path), or `unmatched`.
    pub route: String,
    /// [`method_label`].
    pub method: &'static str,
    /// [`status_label`].
    pub status: &'static str,
}

/// Label of the latency histogram: the route template only.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabel {
    /// Matched route template, or `unmatched`.
    pub route: String,
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
    pub latency: Family<LatencyLabel, Histogram>,
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
    pub fn forward(&self, outcome: &'static str) {
        self.forwards.get_or_create(&Outcome { outcome }).inc();
    }

    /// Count one answered request and its latency.
    pub fn request(&self, route: Option<&str>, method: &Method, status: StatusCode, secs: f64) {
        let route = route.unwrap_or(UNMATCHED_ROUTE).to_owned();
        self.requests
            .get_or_create(&RouteLabel {
                route: route.clone(),
                method: method_label(method),
                status: status_label(status),
            })
            .inc();
        self.latency
            .get_or_create(&LatencyLabel { route })
            .observe(secs);
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
