//! The console's own Prometheus metrics (the read model's are the runtime's,
//! `stream_*{service="console"}`): API requests where they are answered, re-fires, live
//! feeds, catalog changes, backfills,
//! postback tests.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Debug, Clone)]
pub struct Metrics {
    /// `console_api_requests_total{route, status}`.
    pub requests: IntCounterVec,
    /// `console_api_request_duration_seconds{route}`.
    pub request_seconds: HistogramVec,
    /// `console_refires_total{result}`: commands sent, or refused (not found, delivered).
    pub refires: IntCounterVec,
    /// `console_feed_subscribers`: live feeds open now.
    pub feed_subscribers: IntGauge,
    /// `console_catalog_changes_total{kind, result}`: catalog changes asked of this
    /// instance, by what became of them.
    pub catalog_changes: IntCounterVec,
    /// `console_catalog_writer`: 1 while this instance writes the catalog.
    pub catalog_writer: IntGauge,
    /// `console_backfills_total{state}`: backfills this instance ran, by how they ended
    /// (`done`, `failed`, `stopped`).
    pub backfills: IntCounterVec,
    /// `console_backfill_commands_total`: backfill commands the broker acknowledged.
    pub backfill_commands: prometheus::IntCounter,
    /// `console_postback_tests_total{result}`: postback tests sent, `answered` (any
    /// status) or `no_answer` (connect error, timeout).
    pub postback_tests: IntCounterVec,
}

/// What became of a catalog change: `accepted`, `conflict` (stale revision, exists,
/// missing), `not_the_writer`, `failed` (the broker; see the log).
pub const CATALOG_RESULTS: [&str; 4] = ["accepted", "conflict", "not_the_writer", "failed"];

impl Metrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Metrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "console_api_requests_total",
                    "API requests by route and status.",
                ),
                &["route", "status"],
            )?,
            request_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "console_api_request_duration_seconds",
                    "API request latency.",
                )
                .buckets(prometheus::exponential_buckets(0.0005, 2.5, 12)?),
                &["route"],
            )?,
            refires: IntCounterVec::new(
                Opts::new("console_refires_total", "Re-fire requests by result."),
                &["result"],
            )?,
            feed_subscribers: IntGauge::new("console_feed_subscribers", "Live feeds open now.")?,
            catalog_changes: IntCounterVec::new(
                Opts::new(
                    "console_catalog_changes_total",
                    "Catalog changes asked of this instance, by entity kind and result.",
                ),
                &["kind", "result"],
            )?,
            catalog_writer: IntGauge::new(
                "console_catalog_writer",
                "1 while this instance is the elected catalog writer.",
            )?,
            backfills: IntCounterVec::new(
                Opts::new(
                    "console_backfills_total",
                    "Postback backfills this instance ran, by how they ended.",
                ),
                &["state"],
            )?,
            postback_tests: IntCounterVec::new(
                Opts::new(
                    "console_postback_tests_total",
                    "Postback tests sent, by whether the endpoint answered.",
                ),
                &["result"],
            )?,
            backfill_commands: prometheus::IntCounter::new(
                "console_backfill_commands_total",
                "Backfill commands the broker acknowledged.",
            )?,
        };
        // Every route from the start, so dashboards and rules find the series at once.
        for (route, _) in crate::api::ROUTES {
            m.request_seconds.with_label_values(&[route]);
        }
        for result in ["sent", "not_found", "already_delivered"] {
            m.refires.with_label_values(&[result]);
        }
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.request_seconds.clone()))?;
        registry.register(Box::new(m.refires.clone()))?;
        registry.register(Box::new(m.feed_subscribers.clone()))?;
        for kind in s2s_catalog::Kind::ALL {
            for result in CATALOG_RESULTS {
                m.catalog_changes
                    .with_label_values(&[kind.as_str(), result]);
            }
        }
        registry.register(Box::new(m.catalog_changes.clone()))?;
        registry.register(Box::new(m.catalog_writer.clone()))?;
        for state in ["done", "failed", "stopped"] {
            m.backfills.with_label_values(&[state]);
        }
        registry.register(Box::new(m.backfills.clone()))?;
        registry.register(Box::new(m.backfill_commands.clone()))?;
        for result in ["answered", "no_answer"] {
            m.postback_tests.with_label_values(&[result]);
        }
        registry.register(Box::new(m.postback_tests.clone()))?;
        Ok(m)
    }
}
