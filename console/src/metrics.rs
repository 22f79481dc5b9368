//! The console's Prometheus metrics. Records are counted after the cycle that applied them
//! was committed; API requests where they are answered; restore metrics by the shared
//! state crate (unused: the read model has no changelog).

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};
use s2s_state::StateMetrics;

#[derive(Debug, Clone)]
pub struct Metrics {
    /// `console_records_consumed_total{kind}`: click, postback, conversion, rejection,
    /// attempt, dead_letter, command.
    pub consumed: IntCounterVec,
    /// `console_poison_records_total{kind}`: records that could not be decoded (skipped).
    pub poison: IntCounterVec,
    /// `console_cycle_duration_seconds`.
    pub cycle_seconds: Histogram,
    /// `console_api_requests_total{route, status}`.
    pub requests: IntCounterVec,
    /// `console_api_request_duration_seconds{route}`.
    pub request_seconds: HistogramVec,
    /// `console_refires_total{result}`: commands sent, or refused (not found, delivered).
    pub refires: IntCounterVec,
    /// `console_feed_subscribers`: live feeds open now.
    pub feed_subscribers: IntGauge,
    /// `console_state_keys{cf}`, `console_state_bytes{cf}`, `console_consumer_lag_records{topic}`,
    /// `console_partitions_owned`, `console_restored_records_total`, `console_restoring_partitions`.
    pub state: StateMetrics,
}

impl Metrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Metrics {
            consumed: IntCounterVec::new(
                Opts::new(
                    "console_records_consumed_total",
                    "Input records applied to the read model, by kind.",
                ),
                &["kind"],
            )?,
            poison: IntCounterVec::new(
                Opts::new(
                    "console_poison_records_total",
                    "Input records that could not be decoded, skipped.",
                ),
                &["kind"],
            )?,
            cycle_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "console_cycle_duration_seconds",
                    "One cycle: apply and commit a batch.",
                )
                .buckets(prometheus::exponential_buckets(0.001, 2.0, 14)?),
            )?,
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
            state: StateMetrics::new(registry, "console")?,
        };
        for kind in [
            "click",
            "postback",
            "conversion",
            "rejection",
            "attempt",
            "dead_letter",
            "command",
            "refusal",
        ] {
            m.consumed.with_label_values(&[kind]);
            m.poison.with_label_values(&[kind]);
        }
        // Every route from the start, so dashboards and rules find the series at once.
        for (route, _) in crate::api::ROUTES {
            m.request_seconds.with_label_values(&[route]);
        }
        for result in ["sent", "not_found", "already_delivered"] {
            m.refires.with_label_values(&[result]);
        }
        registry.register(Box::new(m.consumed.clone()))?;
        registry.register(Box::new(m.poison.clone()))?;
        registry.register(Box::new(m.cycle_seconds.clone()))?;
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.request_seconds.clone()))?;
        registry.register(Box::new(m.refires.clone()))?;
        registry.register(Box::new(m.feed_subscribers.clone()))?;
        Ok(m)
    }
}
