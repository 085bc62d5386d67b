//! Logs, traces and metrics.
//!
//! * Logs: `tracing` to stderr, text or JSON lines.
//! * Traces: every request path runs in a `tracing` span; with `otlp_endpoint` set, spans are
//!   exported over OTLP/gRPC through `tracing-opentelemetry`.
//! * Metrics: a Prometheus registry served on `GET /metrics` (plain HTTP); names follow
//!   `meridian_<area>_<name>_<unit>`.

use std::sync::OnceLock;

use opentelemetry::trace::TracerProvider as _;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::ObservabilitySection;

/// Keeps the OTLP pipeline alive; dropping it flushes pending spans.
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Installs the global `tracing` subscriber. Call once per process (the binary does).
pub fn init_tracing(config: &ObservabilitySection) -> anyhow::Result<TelemetryGuard> {
    let filter = EnvFilter::try_new(&config.log_filter)?;
    let fmt_layer = if config.json_logs {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    };
    let (otel_layer, provider) = match &config.otlp_endpoint {
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()?;
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name("meridian")
                        .build(),
                )
                .build();
            let tracer = provider.tracer("meridian");
            (
                Some(tracing_opentelemetry::layer().with_tracer(tracer)),
                Some(provider),
            )
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer)
        .with(otel_layer)
        .try_init()?;
    Ok(TelemetryGuard { provider })
}

/// The node's Prometheus metrics.
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// `meridian_api_requests_total{method,route,status}`.
    pub api_requests: IntCounterVec,
    /// `meridian_api_request_duration_seconds{method,route}`.
    pub api_latency: HistogramVec,
    /// `meridian_raft_current_term`.
    pub raft_term: IntGauge,
    /// `meridian_raft_last_applied_index`.
    pub raft_last_applied: IntGauge,
    /// `meridian_raft_is_leader` (1 or 0).
    pub raft_is_leader: IntGauge,
    /// `meridian_registry_devices` (devices in the registry, as applied locally).
    pub registry_devices: IntGauge,
    /// `meridian_gossip_peers_up` (other nodes gossip sees alive).
    pub gossip_peers_up: IntGauge,
    /// `meridian_partition_is_leader{partition}` (1 when this node leads the partition's group).
    pub partition_is_leader: prometheus::IntGaugeVec,
    /// `meridian_partition_is_replica{partition}` (1 when this node is a voter of the group).
    pub partition_is_replica: prometheus::IntGaugeVec,
    /// `meridian_region_replication_lag_ms` (how far this secondary region's copy is behind the
    /// primary's; 0 on the primary).
    pub region_lag_ms: IntGauge,
}

impl Metrics {
    fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let api_requests = IntCounterVec::new(
            Opts::new(
                "meridian_api_requests_total",
                "Service API requests by route and status",
            ),
            &["method", "route", "status"],
        )?;
        let api_latency = HistogramVec::new(
            HistogramOpts::new(
                "meridian_api_request_duration_seconds",
                "Service API request latency",
            )
            .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16)?),
            &["method", "route"],
        )?;
        let raft_term = IntGauge::new("meridian_raft_current_term", "Raft term of this node")?;
        let raft_last_applied = IntGauge::new(
            "meridian_raft_last_applied_index",
            "Last log index applied to the hub state machine",
        )?;
        let raft_is_leader = IntGauge::new(
            "meridian_raft_is_leader",
            "1 when this node leads the hub group",
        )?;
        let registry_devices = IntGauge::new(
            "meridian_registry_devices",
            "Devices in the identity registry",
        )?;
        registry.register(Box::new(api_requests.clone()))?;
        registry.register(Box::new(api_latency.clone()))?;
        registry.register(Box::new(raft_term.clone()))?;
        registry.register(Box::new(raft_last_applied.clone()))?;
        registry.register(Box::new(raft_is_leader.clone()))?;
        registry.register(Box::new(registry_devices.clone()))?;
        let partition_is_leader = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "meridian_partition_is_leader",
                "1 when this node leads the telemetry partition's Raft group",
            ),
            &["partition"],
        )?;
        let partition_is_replica = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "meridian_partition_is_replica",
                "1 when this node is a voter of the telemetry partition's Raft group",
            ),
            &["partition"],
        )?;
        registry.register(Box::new(partition_is_leader.clone()))?;
        let gossip_peers_up = IntGauge::new(
            "meridian_gossip_peers_up",
            "Other nodes that gossip sees alive",
        )?;
        registry.register(Box::new(gossip_peers_up.clone()))?;
        registry.register(Box::new(partition_is_replica.clone()))?;
        let region_lag_ms = IntGauge::new(
            "meridian_region_replication_lag_ms",
            "How far this secondary region's copy of the hub is behind the primary, in ms",
        )?;
        registry.register(Box::new(region_lag_ms.clone()))?;
        Ok(Self {
            region_lag_ms,
            registry,
            api_requests,
            api_latency,
            raft_term,
            raft_last_applied,
            raft_is_leader,
            registry_devices,
            partition_is_leader,
            partition_is_replica,
            gossip_peers_up,
        })
    }

    /// Renders the registry in the Prometheus text format.
    pub fn render(&self) -> String {
        let encoder = prometheus::TextEncoder::new();
        encoder
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encode error: {e}\n"))
    }
}

/// The process-wide metrics (one node per process in production; tests running several nodes in
/// one process share it, which only merges their counters).
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        // The metric definitions are static and valid; a failure here is a programming error.
        Metrics::new().unwrap_or_else(|e| panic!("metric definitions are invalid: {e}"))
    })
}
