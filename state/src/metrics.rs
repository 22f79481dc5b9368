//! The metrics of the stream runtime, the same for every stateful service and told apart by
//! a `service` label: records consumed and set aside, cycle duration, transactions, state
//! size per column family, consumer lag, partitions owned and restore progress. Restore
//! progress is counted where it happens ([`crate::ownership`]); the gauges are set by
//! [`RuntimeMetrics::refresh`].

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use s2s_common::kafka::KafkaConfig;

use crate::input::Positions;
use crate::ownership::{Changelog, Ownership};
use crate::store::{Family, Store};

#[derive(Debug, Clone)]
pub struct RuntimeMetrics {
    /// `stream_records_consumed_total{input}`: input records taken in by committed cycles.
    pub consumed: IntCounterVec,
    /// `stream_poison_records_total{input}`: undecodable input records set aside.
    pub poison: IntCounterVec,
    /// `stream_cycle_duration_seconds`: process, publish, wait for acks, commit.
    pub cycle_seconds: Histogram,
    /// `stream_transactions_total{result}`: under exactly_once, committed or aborted.
    pub transactions: IntCounterVec,
    /// `stream_state_keys{cf}`, `stream_state_bytes{cf}`: RocksDB's estimates summed over
    /// the owned partitions.
    pub state_keys: IntGaugeVec,
    pub state_bytes: IntGaugeVec,
    /// `stream_consumer_lag_records{topic}`: records the broker has that are not taken in
    /// yet, summed over the owned partitions (from librdkafka statistics, ~1 s old).
    pub lag: IntGaugeVec,
    /// `stream_partitions_owned`.
    pub partitions: IntGauge,
    /// `stream_restored_records_total`: changelog records applied to local stores.
    pub restored: IntCounter,
    /// `stream_restoring_partitions`: partitions being rebuilt from the changelog now.
    pub restoring: IntGauge,
}

impl RuntimeMetrics {
    /// Registers the runtime's metrics with the constant label `service`.
    pub fn new(registry: &Registry, service: &str) -> prometheus::Result<Self> {
        let opts = |name: &str, help: &str| Opts::new(name, help).const_label("service", service);
        let m = RuntimeMetrics {
            consumed: IntCounterVec::new(
                opts(
                    "stream_records_consumed_total",
                    "Input records taken in by committed cycles, per input.",
                ),
                &["input"],
            )?,
            poison: IntCounterVec::new(
                opts(
                    "stream_poison_records_total",
                    "Undecodable input records set aside (on the poison topic where the \
                     service has one), per input.",
                ),
                &["input"],
            )?,
            cycle_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "stream_cycle_duration_seconds",
                    "One processing cycle: process, publish, wait for acks, commit state and \
                     offsets.",
                )
                .const_label("service", service)
                .buckets(prometheus::exponential_buckets(0.001, 2.0, 14)?),
            )?,
            transactions: IntCounterVec::new(
                opts(
                    "stream_transactions_total",
                    "Kafka transactions under exactly_once, by result (committed, aborted).",
                ),
                &["result"],
            )?,
            state_keys: IntGaugeVec::new(
                opts(
                    "stream_state_keys",
                    "Keys in the state stores per column family (RocksDB estimate).",
                ),
                &["cf"],
            )?,
            state_bytes: IntGaugeVec::new(
                opts(
                    "stream_state_bytes",
                    "Bytes of the state stores per column family (SST files and memtables).",
                ),
                &["cf"],
            )?,
            lag: IntGaugeVec::new(
                opts(
                    "stream_consumer_lag_records",
                    "Records the broker has that are not taken in yet, over owned partitions.",
                ),
                &["topic"],
            )?,
            partitions: IntGauge::with_opts(opts(
                "stream_partitions_owned",
                "Input partitions owned.",
            ))?,
            restored: IntCounter::with_opts(opts(
                "stream_restored_records_total",
                "Changelog records applied to local state stores.",
            ))?,
            restoring: IntGauge::with_opts(opts(
                "stream_restoring_partitions",
                "Partitions being rebuilt from the changelog now.",
            ))?,
        };
        // Every bounded label value starts at 0, so that rate() sees the first event.
        for result in ["committed", "aborted"] {
            m.transactions.with_label_values(&[result]);
        }
        registry.register(Box::new(m.consumed.clone()))?;
        registry.register(Box::new(m.poison.clone()))?;
        registry.register(Box::new(m.cycle_seconds.clone()))?;
        registry.register(Box::new(m.transactions.clone()))?;
        registry.register(Box::new(m.state_keys.clone()))?;
        registry.register(Box::new(m.state_bytes.clone()))?;
        registry.register(Box::new(m.lag.clone()))?;
        registry.register(Box::new(m.partitions.clone()))?;
        registry.register(Box::new(m.restored.clone()))?;
        registry.register(Box::new(m.restoring.clone()))?;
        Ok(m)
    }

    /// Where partitions are restored from, counting into these metrics.
    pub fn changelog(&self, kafka: &KafkaConfig, group_id: &str, topic: &str) -> Changelog {
        Changelog {
            kafka: kafka.clone(),
            group_id: group_id.to_string(),
            topic: topic.to_string(),
            restored: self.restored.clone(),
            restoring: self.restoring.clone(),
        }
    }

    /// Sets the gauges from the owned partitions' stores and input positions.
    pub fn refresh<'s, F: Family>(
        &self,
        parts: impl Iterator<Item = (i32, &'s Store<F>, &'s Positions)> + Clone,
        ownership: &Ownership<F>,
        inputs: &[&str],
    ) {
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for &cf in F::ALL {
            let (mut keys, mut bytes) = (0u64, 0u64);
            for (_, store, _) in parts.clone() {
                if let Ok((k, b)) = store.size(cf) {
                    keys += k;
                    bytes += b;
                }
            }
            self.state_keys
                .with_label_values(&[cf.name()])
                .set(gauge(keys));
            self.state_bytes
                .with_label_values(&[cf.name()])
                .set(gauge(bytes));
        }
        for topic in inputs {
            let lag: i64 = parts
                .clone()
                .filter_map(|(p, _, positions)| {
                    let high = ownership.high_watermark(topic, p)?;
                    Some((high - positions.next(topic)).max(0))
                })
                .sum();
            self.lag.with_label_values(&[topic]).set(lag);
        }
        self.partitions
            .set(i64::try_from(parts.count()).unwrap_or(i64::MAX));
    }
}
