//! The attributor's Prometheus metrics. Each is updated in one place: restore progress in
//! `ownership.rs`, everything else in `lib.rs` after the
//! cycle that produced the event was committed.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

#[derive(Debug, Clone)]
pub struct Metrics {
    /// `attributor_records_consumed_total{kind}`: click, postback.
    pub consumed: IntCounterVec,
    /// `attributor_outcomes_total{outcome, reason}`: attributed, updated (reason "none") or
    /// rejected (unknown_click, outside_window, duplicate).
    pub outcomes: IntCounterVec,
    /// `attributor_suspicious_conversions_total`: sooner after the click than the offer's
    /// minimum.
    pub suspicious: IntCounter,
    /// `attributor_poison_records_total{kind}`: undecodable inputs set aside.
    pub poison: IntCounterVec,
    /// `attributor_cycle_duration_seconds`: process, publish, wait for acks, commit.
    pub cycle_seconds: Histogram,
    /// `attributor_postback_latency_seconds`: from ingest accepting a postback to its
    /// outcome being committed (includes the wait of postbacks held for their click).
    pub postback_latency: Histogram,
    /// `attributor_click_to_conversion_seconds`: event time minus click time of new
    /// conversions.
    pub click_to_conversion: Histogram,
    /// `attributor_state_keys{cf}`, `attributor_state_bytes{cf}`: RocksDB's estimates
    /// summed over the owned partitions.
    pub state_keys: IntGaugeVec,
    pub state_bytes: IntGaugeVec,
    /// `attributor_consumer_lag_records{topic}`: records the broker has that are not taken
    /// in yet, summed over the owned partitions (from librdkafka statistics, ~1 s old).
    pub lag: IntGaugeVec,
    /// `attributor_partitions_owned`.
    pub partitions: IntGauge,
    /// `attributor_restored_records_total`: changelog records applied to local stores.
    pub restored: IntCounter,
    /// `attributor_restoring_partitions`: partitions being rebuilt from the changelog now.
    pub restoring: IntGauge,
    /// `attributor_transactions_total{result}`: committed, aborted (exactly_once).
    pub transactions: IntCounterVec,
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
                    "Postback outcomes: attributed, updated, or rejected with a reason.",
                ),
                &["outcome", "reason"],
            )?,
            suspicious: IntCounter::new(
                "attributor_suspicious_conversions_total",
                "Conversions flagged as sooner after their click than the offer's minimum.",
            )?,
            poison: IntCounterVec::new(
                Opts::new(
                    "attributor_poison_records_total",
                    "Undecodable input records copied to the poison topic.",
                ),
                &["kind"],
            )?,
            cycle_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "attributor_cycle_duration_seconds",
                    "One processing cycle: process, publish, wait for acks, commit state and offsets.",
                )
                .buckets(prometheus::exponential_buckets(0.001, 2.0, 14)?),
            )?,
            postback_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "attributor_postback_latency_seconds",
                    "From ingest accepting a postback to its committed outcome.",
                )
                .buckets(prometheus::exponential_buckets(0.005, 2.0, 16)?),
            )?,
            click_to_conversion: Histogram::with_opts(
                HistogramOpts::new(
                    "attributor_click_to_conversion_seconds",
                    "Time from click to conversion event of new conversions.",
                )
                .buckets(vec![
                    1.0, 10.0, 60.0, 600.0, 3600.0, 21600.0, 86400.0, 259200.0, 604800.0,
                    1209600.0, 2592000.0, 7776000.0,
                ]),
            )?,
            state_keys: IntGaugeVec::new(
                Opts::new(
                    "attributor_state_keys",
                    "Estimated keys per RocksDB column family, all owned partitions.",
                ),
                &["cf"],
            )?,
            state_bytes: IntGaugeVec::new(
                Opts::new(
                    "attributor_state_bytes",
                    "SST files plus memtables per RocksDB column family, all owned partitions.",
                ),
                &["cf"],
            )?,
            lag: IntGaugeVec::new(
                Opts::new(
                    "attributor_consumer_lag_records",
                    "Input records on the broker not yet taken in, all owned partitions.",
                ),
                &["topic"],
            )?,
            partitions: IntGauge::new(
                "attributor_partitions_owned",
                "Input partitions this instance owns.",
            )?,
            restored: IntCounter::new(
                "attributor_restored_records_total",
                "Changelog records applied to local stores when partitions were assigned.",
            )?,
            restoring: IntGauge::new(
                "attributor_restoring_partitions",
                "Partitions whose state is being rebuilt from the changelog now.",
            )?,
            transactions: IntCounterVec::new(
                Opts::new(
                    "attributor_transactions_total",
                    "Cycle transactions by result (exactly_once).",
                ),
                &["result"],
            )?,
        };
        registry.register(Box::new(m.transactions.clone()))?;
        registry.register(Box::new(m.restored.clone()))?;
        registry.register(Box::new(m.restoring.clone()))?;
        registry.register(Box::new(m.consumed.clone()))?;
        registry.register(Box::new(m.outcomes.clone()))?;
        registry.register(Box::new(m.suspicious.clone()))?;
        registry.register(Box::new(m.poison.clone()))?;
        registry.register(Box::new(m.cycle_seconds.clone()))?;
        registry.register(Box::new(m.postback_latency.clone()))?;
        registry.register(Box::new(m.click_to_conversion.clone()))?;
        registry.register(Box::new(m.state_keys.clone()))?;
        registry.register(Box::new(m.state_bytes.clone()))?;
        registry.register(Box::new(m.lag.clone()))?;
        registry.register(Box::new(m.partitions.clone()))?;
        Ok(m)
    }
}
