//! Partition ownership. The consumer context opens a partition's store when the group
//! assigns the partition and starts consumption at the offsets committed *with the state*:
//! the store is the truth, the group's committed offsets only serve lag monitoring and
//! instances that have no state yet. It also keeps the high watermarks that librdkafka's
//! statistics report, which tell the timer whether a partition's clicks are caught up.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::store::{Store, StoreSet};

/// The partitions this instance owns and their open stores.
#[derive(Debug)]
pub struct Ownership {
    stores: StoreSet,
    inputs: [String; 2],
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Stores stay open once opened: an eager rebalance revokes and re-assigns mostly the
    /// same partitions, and RocksDB refuses a second open of a directory in one process.
    open: BTreeMap<i32, Arc<Store>>,
    assigned: BTreeSet<i32>,
    high: BTreeMap<(String, i32), i64>,
    failure: Option<String>,
}

impl Ownership {
    /// `inputs`: the clicks and postbacks topics, co-partitioned.
    pub fn new(stores: StoreSet, inputs: [String; 2]) -> Self {
        Ownership {
            stores,
            inputs,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` half-updated in a way that
        // matters more than stopping would; keep going with what is there.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The partitions owned now, with their stores.
    pub fn assigned(&self) -> Vec<(i32, Arc<Store>)> {
        let inner = self.lock();
        inner
            .assigned
            .iter()
            .filter_map(|p| inner.open.get(p).map(|s| (*p, Arc::clone(s))))
            .collect()
    }

    /// The high watermark of a partition as of librdkafka's last statistics.
    pub fn high_watermark(&self, topic: &str, partition: i32) -> Option<i64> {
        self.lock()
            .high
            .get(&(topic.to_string(), partition))
            .copied()
    }

    /// Why a store could not be opened, if one could not: the service must stop.
    pub fn failure(&self) -> Option<String> {
        self.lock().failure.clone()
    }

    /// Opens the stores of newly assigned partitions and sets each input's start offset to
    /// the one stored with its state.
    fn on_assign(&self, tpl: &mut TopicPartitionList) {
        let partitions: BTreeSet<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        let mut inner = self.lock();
        for p in partitions {
            let store = match inner.open.get(&p) {
                Some(s) => Arc::clone(s),
                None => match self.stores.open(p) {
                    Ok(s) => {
                        let s = Arc::new(s);
                        inner.open.insert(p, Arc::clone(&s));
                        s
                    }
                    Err(e) => {
                        tracing::error!(partition = p, error = %e, "cannot open the partition's state store");
                        inner.failure = Some(format!("state store of partition {p}: {e}"));
                        continue;
                    }
                },
            };
            for topic in &self.inputs {
                match store.offset(topic) {
                    Ok(Some(next)) => {
                        if let Err(e) = tpl.set_partition_offset(topic, p, Offset::Offset(next)) {
                            tracing::warn!(topic, partition = p, error = %e, "cannot set the start offset");
                        }
                    }
                    Ok(None) => {}
                    Err(e) => inner.failure = Some(format!("offsets of partition {p}: {e}")),
                }
            }
            inner.assigned.insert(p);
            tracing::info!(partition = p, "partition assigned");
        }
    }

    fn on_revoke(&self, tpl: &TopicPartitionList) {
        let mut inner = self.lock();
        for e in tpl.elements() {
            if inner.assigned.remove(&e.partition()) {
                tracing::info!(partition = e.partition(), "partition revoked");
            }
        }
    }

    fn on_stats(&self, stats: &Statistics) {
        let mut inner = self.lock();
        for (name, topic) in &stats.topics {
            for (p, part) in &topic.partitions {
                if *p >= 0 && part.hi_offset >= 0 {
                    inner.high.insert((name.clone(), *p), part.hi_offset);
                }
            }
        }
    }
}

/// The consumer's context: ownership on rebalance, watermarks from statistics.
#[derive(Debug, Clone)]
pub struct OwnershipContext(pub Arc<Ownership>);

impl ClientContext for OwnershipContext {
    fn stats(&self, statistics: Statistics) {
        self.0.on_stats(&statistics);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka consumer error");
    }
}

impl ConsumerContext for OwnershipContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.0.on_assign(tpl);
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.0.on_revoke(tpl);
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; dropping the assignment");
                self.0.on_revoke(tpl);
                consumer.unassign()
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "applying the rebalance failed");
        }
    }
}
