//! The attributor's Prometheus metrics.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry};

#[derive(Debug, Clone)]
pub struct Metrics {
    /// `attributor_records_consumed_total{kind}`: click, postback.
    pub consumed: IntCounterVec,
    /// `attributor_outcomes_total{outcome, reason}`: attributed (reason "none") or rejected.
    pub outcomes: IntCounterVec,
    /// `attributor_cycle_duration_seconds`: consume, publish, acknowledge, commit.
    pub cycle_seconds: Histogram,
    /// `attributor_state_keys{cf}`: RocksDB's estimate per column family.
    pub state_keys: IntGaugeVec,
}

impl Metrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Metrics {
            consumed: IntCounterVec::new(
                Opts::new("attributor_records_consumed_total", "Input records by kind."),
                &["kind"],
            )?,
            outcomes: IntCounterVec::new(
                Opts::new(
                    "attributor_outcomes_total",
                    "Postback outcomes: attributed, or rejected with a reason.",
                ),
                &["outcome", "reason"],
            )?,
            cycle_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "attributor_cycle_duration_seconds",
                    "One processing cycle: consume, publish, wait for acks, commit state and offsets.",
                )
                .buckets(prometheus::exponential_buckets(0.001, 2.0, 14)?),
            )?,
            state_keys: IntGaugeVec::new(
                Opts::new("attributor_state_keys", "Estimated keys per RocksDB column family."),
                &["cf"],
            )?,
        };
        registry.register(Box::new(m.consumed.clone()))?;
        registry.register(Box::new(m.outcomes.clone()))?;
        registry.register(Box::new(m.cycle_seconds.clone()))?;
        registry.register(Box::new(m.state_keys.clone()))?;
        Ok(m)
    }
}
