//! The metrics every stateful service has, named after the service
//! (`<component>_state_keys{cf}` …): state size per column family, consumer lag, partitions
//! owned, and restore progress. Restore progress is counted where it happens
//! ([`crate::ownership`]); the gauges are set by [`StateMetrics::refresh`].

use prometheus::{IntCounter, IntGauge, IntGaugeVec, Opts, Registry};
use s2s_common::kafka::KafkaConfig;

use crate::input::Positions;
use crate::ownership::{Changelog, Ownership};
use crate::store::{Family, Store};

#[derive(Debug, Clone)]
pub struct StateMetrics {
    /// `<component>_state_keys{cf}`, `<component>_state_bytes{cf}`: RocksDB's estimates
    /// summed over the owned partitions.
    pub state_keys: IntGaugeVec,
    pub state_bytes: IntGaugeVec,
    /// `<component>_consumer_lag_records{topic}`: records the broker has that are not
    /// taken in yet, summed over the owned partitions (from librdkafka statistics, ~1 s old).
    pub lag: IntGaugeVec,
    /// `<component>_partitions_owned`.
    pub partitions: IntGauge,
    /// `<component>_restored_records_total`: changelog records applied to local stores.
    pub restored: IntCounter,
    /// `<component>_restoring_partitions`: partitions being rebuilt from the changelog now.
    pub restoring: IntGauge,
}

impl StateMetrics {
    pub fn new(registry: &Registry, component: &str) -> prometheus::Result<Self> {
        let name = |what: &str| format!("{component}_{what}");
        let m = StateMetrics {
            state_keys: IntGaugeVec::new(
                Opts::new(
                    name("state_keys"),
                    "Keys in the state stores per column family (RocksDB estimate).",
                ),
                &["cf"],
            )?,
            state_bytes: IntGaugeVec::new(
                Opts::new(
                    name("state_bytes"),
                    "Bytes of the state stores per column family (SST files and memtables).",
                ),
                &["cf"],
            )?,
            lag: IntGaugeVec::new(
                Opts::new(
                    name("consumer_lag_records"),
                    "Records the broker has that are not taken in yet, over owned partitions.",
                ),
                &["topic"],
            )?,
            partitions: IntGauge::new(name("partitions_owned"), "Input partitions owned.")?,
            restored: IntCounter::new(
                name("restored_records_total"),
                "Changelog records applied to local state stores.",
            )?,
            restoring: IntGauge::new(
                name("restoring_partitions"),
                "Partitions being rebuilt from the changelog now.",
            )?,
        };
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
