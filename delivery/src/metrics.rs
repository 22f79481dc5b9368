//! Delivery's Prometheus metrics.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

#[derive(Debug, Clone)]
pub struct Metrics {
    /// `delivery_attempts_total{endpoint, outcome, status_class}`.
    pub attempts: IntCounterVec,
    /// `delivery_attempt_duration_seconds{endpoint}`.
    pub attempt_seconds: HistogramVec,
    /// `delivery_retries_scheduled_total{endpoint}`.
    pub retries: IntCounterVec,
    /// `delivery_dead_lettered_total{endpoint}`.
    pub dead_lettered: IntCounterVec,
    /// `delivery_attributed_to_delivered_seconds`: conversion attributed → 2xx received.
    pub end_to_end_seconds: Histogram,
    /// `delivery_malformed_records_total`: conversions that could not be decoded.
    pub malformed: IntCounter,
}

impl Metrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Metrics {
            attempts: IntCounterVec::new(
                Opts::new(
                    "delivery_attempts_total",
                    "HTTP attempts by endpoint, outcome and status class.",
                ),
                &["endpoint", "outcome", "status_class"],
            )?,
            attempt_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "delivery_attempt_duration_seconds",
                    "Latency of one HTTP attempt.",
                )
                .buckets(prometheus::exponential_buckets(0.001, 2.5, 12)?),
                &["endpoint"],
            )?,
            retries: IntCounterVec::new(
                Opts::new(
                    "delivery_retries_scheduled_total",
                    "Retries scheduled after a retryable failure.",
                ),
                &["endpoint"],
            )?,
            dead_lettered: IntCounterVec::new(
                Opts::new(
                    "delivery_dead_lettered_total",
                    "Deliveries sent to the dead-letter topic.",
                ),
                &["endpoint"],
            )?,
            end_to_end_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "delivery_attributed_to_delivered_seconds",
                    "From attribution to the affiliate's 2xx.",
                )
                .buckets(prometheus::exponential_buckets(0.005, 2.0, 16)?),
            )?,
            malformed: IntCounter::new(
                "delivery_malformed_records_total",
                "Conversion records that could not be decoded (skipped, logged with their offset).",
            )?,
        };
        registry.register(Box::new(m.attempts.clone()))?;
        registry.register(Box::new(m.attempt_seconds.clone()))?;
        registry.register(Box::new(m.retries.clone()))?;
        registry.register(Box::new(m.dead_lettered.clone()))?;
        registry.register(Box::new(m.end_to_end_seconds.clone()))?;
        registry.register(Box::new(m.malformed.clone()))?;
        Ok(m)
    }
}
