//! Prometheus metrics: one registry owned by the server state (no global recorder), scraped at `/metrics` in
//! the OpenMetrics text format. Counters and histograms are updated where things happen; the gauges of queues,
//! in-flight work and sessions are read from their owners at scrape time.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::annotate::Latencies;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    /// The route as declared (`/session/{id}`), never the raw path: ids must not make new series.
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub name: String,
    pub version: String,
    pub model_type: String,
    pub kernels: String,
}

fn seconds_histogram() -> Histogram {
    // 1 ms .. 65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub click_stage_seconds: Family<StageLabels, Histogram, fn() -> Histogram>,
    /// Requests admitted to a pool and waiting for a worker.
    pub queued: Family<PoolLabels, Gauge>,
    /// Requests running on a worker.
    pub working: Family<PoolLabels, Gauge>,
    pub inflight_bytes: Gauge,
    pub inflight_budget_bytes: Gauge,
    /// Volumes this process holds (all sessions in memory, or the local cache of a shared store).
    pub sessions: Gauge,
    pub session_bytes: Gauge,
    /// A session volume found in this process, or fetched from the shared store.
    pub session_cache: Family<ResultLabels, Counter>,
    pub session_fetch_seconds: Histogram,
    pub session_store_errors: Family<OperationLabels, Counter>,
    pub models: Family<ModelLabels, Gauge>,
    pub ready: Gauge,
    pub uptime_seconds: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut metrics = Metrics {
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(seconds_histogram),
            click_stage_seconds: Family::new_with_constructor(seconds_histogram),
            queued: Family::default(),
            working: Family::default(),
            inflight_bytes: Gauge::default(),
            inflight_budget_bytes: Gauge::default(),
            sessions: Gauge::default(),
            session_bytes: Gauge::default(),
            session_cache: Family::default(),
            session_fetch_seconds: seconds_histogram(),
            session_store_errors: Family::default(),
            models: Family::default(),
            ready: Gauge::default(),
            uptime_seconds: Gauge::default(),
            registry: Registry::with_prefix("deepgrow"),
        };
        metrics.registry.register(
            "http_requests",
            "HTTP requests answered, by route and status",
            metrics.requests.clone(),
        );
        metrics.registry.register(
            "http_request_seconds",
            "Time from request to response, by route and status",
            metrics.request_seconds.clone(),
        );
        metrics.registry.register(
            "click_stage_seconds",
            "Time a click spends in each stage (wait, decode, pre, infer, post, write, total)",
            metrics.click_stage_seconds.clone(),
        );
        metrics.registry.register(
            "queued_requests",
            "Requests admitted to a worker pool and waiting for a worker",
            metrics.queued.clone(),
        );
        metrics.registry.register(
            "working_requests",
            "Requests running on a worker of the pool",
            metrics.working.clone(),
        );
        metrics.registry.register(
            "inflight_bytes",
            "Bytes held in flight by uploads and volumes being decoded",
            metrics.inflight_bytes.clone(),
        );
        metrics.registry.register(
            "inflight_budget_bytes",
            "The in-flight byte budget (--max-inflight-bytes)",
            metrics.inflight_budget_bytes.clone(),
        );
        metrics.registry.register(
            "sessions",
            "Session volumes held by this process (with a shared store: its local cache)",
            metrics.sessions.clone(),
        );
        metrics.registry.register(
            "session_bytes",
            "Bytes of session volumes held by this process",
            metrics.session_bytes.clone(),
        );
        metrics.registry.register(
            "session_cache",
            "Session volume lookups: hit (held here), miss (fetched from the shared store), gone (unknown or expired)",
            metrics.session_cache.clone(),
        );
        metrics.registry.register(
            "session_fetch_seconds",
            "Time to fetch and rebuild a session volume from the shared store on a cache miss",
            metrics.session_fetch_seconds.clone(),
        );
        metrics.registry.register(
            "session_store_errors",
            "Failed or timed-out operations on the shared session store, by operation",
            metrics.session_store_errors.clone(),
        );
        metrics.registry.register(
            "model_info",
            "The models served (value 1), with their version, type and kernels",
            metrics.models.clone(),
        );
        metrics.registry.register(
            "ready",
            "1 while the server takes traffic, 0 once it is draining for shutdown",
            metrics.ready.clone(),
        );
        metrics.registry.register(
            "uptime_seconds",
            "Seconds since the server started",
            metrics.uptime_seconds.clone(),
        );
        metrics
    }

    /// Records a click's stage latencies (milliseconds in [`Latencies`]).
    pub fn observe_click(&self, latencies: &Latencies) {
        for (stage, millis) in [
            ("wait", latencies.wait),
            ("decode", latencies.decode),
            ("pre", latencies.pre),
            ("infer", latencies.infer),
            ("post", latencies.post),
            ("write", latencies.write),
            ("total", latencies.total),
        ] {
            self.click_stage_seconds
                .get_or_create(&StageLabels { stage })
                .observe(millis.max(0.0) / 1000.0);
        }
    }

    /// Counts a failed operation on the shared session store.
    pub fn store_error(&self, operation: &'static str) {
        self.session_store_errors
            .get_or_create(&OperationLabels { operation })
            .inc();
    }

    /// Counts a session volume lookup: `hit`, `miss` or `gone`.
    pub fn session_lookup(&self, result: &'static str) {
        self.session_cache
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // writing into a String cannot fail
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
