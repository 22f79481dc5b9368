//! Partition ownership for a stateful consumer. When the group assigns a partition, the
//! consumer context opens the partition's store, brings it up to date from the changelog
//! topic (nothing to read when the local store is current; everything after the store's
//! changelog position when another instance owned the partition meanwhile, or when the
//! store is new), and starts consumption at the input offsets committed *with the state*
//! (an input the state holds nothing of: from its start). The store is the truth, the
//! group's committed offsets only serve lag monitoring; a stored position the broker does
//! not have stops the service ([`crate::reach`]). It also keeps the high watermarks that
//! librdkafka's statistics report (consumer lag; the attributor's timer asks whether a
//! partition's clicks are caught up).
//!
//! The restore runs inside the rebalance callback, so consumption of every partition waits
//! for it; it must finish within `max.poll.interval.ms` (librdkafka default 300 s), which
//! large states may need to raise.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntGauge};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use s2s_common::kafka::KafkaConfig;

use crate::reach;
use crate::store::{Family, Store, StoreSet};

/// Changelog records applied per RocksDB batch during a restore.
const RESTORE_BATCH: usize = 10_000;

/// A restore that reads nothing for this long (the broker unreachable, say) gives up and
/// stops the service; shorter interruptions are waited out (librdkafka reconnects).
const RESTORE_STALL: Duration = Duration::from_secs(60);

/// Where a partition's state is rebuilt from.
#[derive(Debug)]
pub struct Changelog {
    pub kafka: KafkaConfig,
    pub group_id: String,
    pub topic: String,
    /// `<component>_restored_records_total`.
    pub restored: IntCounter,
    /// `<component>_restoring_partitions`.
    pub restoring: IntGauge,
}

/// The partitions this instance owns and their open stores.
#[derive(Debug)]
pub struct Ownership<F: Family> {
    stores: StoreSet<F>,
    /// The co-partitioned input topics whose partition N is state partition N.
    inputs: Vec<String>,
    /// `None` for a store derived from its inputs alone (a read model): a partition new to
    /// this instance is rebuilt by reading its inputs from the start.
    changelog: Option<Changelog>,
    inner: Mutex<Inner<F>>,
}

#[derive(Debug)]
struct Inner<F: Family> {
    /// Stores stay open once opened: an eager rebalance revokes and re-assigns mostly the
    /// same partitions, and RocksDB refuses a second open of a directory in one process.
    open: BTreeMap<i32, Arc<Store<F>>>,
    assigned: BTreeSet<i32>,
    high: BTreeMap<(String, i32), i64>,
    failure: Option<String>,
    /// The statistics showed an owned input's fetch position beyond the log's end.
    suspect: bool,
}

impl<F: Family> Ownership<F> {
    /// `inputs`: the input topics, co-partitioned.
    pub fn new(stores: StoreSet<F>, inputs: Vec<String>, changelog: Option<Changelog>) -> Self {
        Ownership {
            stores,
            inputs,
            changelog,
            inner: Mutex::new(Inner {
                open: BTreeMap::new(),
                assigned: BTreeSet::new(),
                high: BTreeMap::new(),
                failure: None,
                suspect: false,
            }),
        }
    }

    /// Applies the changelog of `partition` from the store's changelog position to its end;
    /// returns the number of records applied.
    fn restore(&self, store: &Store<F>, partition: i32) -> Result<u64, String> {
        let Some(c) = &self.changelog else {
            return Ok(0);
        };
        let stored = store.offset(&c.topic).map_err(|e| e.to_string())?;
        let from = stored.unwrap_or(0);
        let mut config = c.kafka.consumer_config(&format!("{}.restore", c.group_id));
        // A stored position the broker does not have is an error, never a silent restart
        // from the beginning: the topic was re-created or the broker lost data. A new
        // store starts at the log's beginning, wherever that is.
        config
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "error")
            .set("statistics.interval.ms", reach::READER_STATISTICS_MS);
        let consumer: BaseConsumer<ReaderContext> = config
            .create_with_context(ReaderContext::default())
            .map_err(|e| e.to_string())?;
        let mut tpl = TopicPartitionList::new();
        let start = stored.map_or(Offset::Beginning, Offset::Offset);
        tpl.add_partition_offset(&c.topic, partition, start)
            .map_err(|e| e.to_string())?;
        consumer.assign(&tpl).map_err(|e| e.to_string())?;
        c.restoring.inc();
        let started = Instant::now();
        let mut batch = Vec::new();
        let mut applied = 0u64;
        let mut next = from;
        let mut progress_at = Instant::now();
        let result = loop {
            match consumer.poll(Duration::from_secs(1)) {
                Some(Ok(m)) => {
                    progress_at = Instant::now();
                    batch.push((
                        m.key().unwrap_or_default().to_vec(),
                        m.payload().map(<[u8]>::to_vec),
                    ));
                    next = m.offset() + 1;
                    if batch.len() >= RESTORE_BATCH {
                        if let Err(e) = store.restore(&batch, &c.topic, next) {
                            break Err(e.to_string());
                        }
                        applied += batch.len() as u64;
                        c.restored.inc_by(batch.len() as u64);
                        batch.clear();
                        tracing::info!(partition, applied, "restoring from the changelog");
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => {
                    if !batch.is_empty() {
                        if let Err(e) = store.restore(&batch, &c.topic, next) {
                            break Err(e.to_string());
                        }
                        applied += batch.len() as u64;
                        c.restored.inc_by(batch.len() as u64);
                    }
                    break Ok(applied);
                }
                Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset))) => {
                    let extent = log_extent(&consumer, &c.topic, partition, next);
                    break Err(self.beyond_the_log(c, partition, next, &extent));
                }
                other => {
                    // A broker that answers a fetch beyond the end with nothing (Tansu).
                    if let Some((low, high)) = consumer.context().beyond_end(&c.topic, partition) {
                        let extent = format!(
                            "its fetch answers offsets {low}..{high} for {} partition \
                             {partition}, the store's position is {next}",
                            c.topic
                        );
                        break Err(self.beyond_the_log(c, partition, next, &extent));
                    }
                    // A broker restarting or a connection lost: librdkafka reconnects and
                    // the read goes on (the restore consumer's context logs the error).
                    if progress_at.elapsed() >= RESTORE_STALL {
                        let why = match other {
                            Some(Err(e)) => format!(", last error: {e}"),
                            _ => " (is the broker reachable?)".to_string(),
                        };
                        break Err(format!(
                            "reading the changelog: nothing read for {RESTORE_STALL:?}{why}; {}",
                            log_extent(&consumer, &c.topic, partition, next)
                        ));
                    }
                }
            }
        };
        c.restoring.dec();
        if let Ok(n) = result {
            if n > 0 {
                tracing::info!(
                    partition,
                    records = n,
                    seconds = started.elapsed().as_secs_f64(),
                    "partition state restored from the changelog"
                );
            }
        }
        result
    }

    /// The error when the broker does not have the store's changelog position.
    fn beyond_the_log(&self, c: &Changelog, partition: i32, position: i64, extent: &str) -> String {
        format!(
            "the store {dir}/partition-{partition} was restored from changelog {topic} \
             partition {partition} up to offset {position}, which the broker does not have \
             (out of range; {extent}). The topic was re-created or the broker lost its data, \
             so this state no longer matches the broker. If the topics were re-created on \
             purpose (a new or reset environment), stop the service, delete {dir} and \
             start it again: the state is rebuilt from the broker. Otherwise restore the \
             broker's data first: the store may be the only copy of this state.",
            dir = self.stores.dir().display(),
            topic = c.topic,
        )
    }

    fn lock(&self) -> MutexGuard<'_, Inner<F>> {
        // A panic while holding the lock cannot leave `Inner` half-updated in a way that
        // matters more than stopping would; keep going with what is there.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The partitions owned now, with their stores.
    pub fn assigned(&self) -> Vec<(i32, Arc<Store<F>>)> {
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

    /// Whether the statistics showed an owned input's fetch position beyond the log's end
    /// since the last call (a suspicion: [`Ownership::outside`] checks it).
    pub fn take_suspect(&self) -> bool {
        std::mem::take(&mut self.lock().suspect)
    }

    /// The input positions stored with the owned partitions' state that the broker does
    /// not have (blocking: it asks the broker about each).
    pub fn outside(
        &self,
        kafka: &KafkaConfig,
        group_id: &str,
    ) -> Result<Vec<reach::Outside>, KafkaError> {
        let mut stored = Vec::new();
        for (partition, store) in self.assigned() {
            for topic in &self.inputs {
                if let Ok(Some(offset)) = store.offset(topic) {
                    stored.push(reach::Stored {
                        topic: topic.clone(),
                        partition,
                        offset,
                    });
                }
            }
        }
        reach::probe(kafka, group_id, &stored)
    }

    /// What to tell the operator about positions the broker does not have.
    pub fn explain(&self, outside: &[reach::Outside]) -> String {
        let changelog = self.changelog.as_ref().map(|c| c.topic.as_str());
        reach::explain(self.stores.dir(), changelog, outside)
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
            if let Err(e) = self.restore(&store, p) {
                tracing::error!(partition = p, error = %e, "cannot restore the partition's state");
                inner.failure = Some(format!("restoring partition {p}: {e}"));
                continue;
            }
            for topic in &self.inputs {
                match store.offset(topic) {
                    Ok(stored) => {
                        // Nothing stored: nothing of this input is in the state yet, so it
                        // is read from its start (never from the group's committed offset).
                        let start = stored.map_or(Offset::Beginning, Offset::Offset);
                        if let Err(e) = tpl.set_partition_offset(topic, p, start) {
                            tracing::warn!(topic, partition = p, error = %e, "cannot set the start offset");
                        }
                    }
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
                // A partition re-assigned here may show the end its last fetch answered
                // before: a suspicion for a fresh reader to check, not a verdict.
                if inner.assigned.contains(p)
                    && self.inputs.contains(name)
                    && reach::beyond_end(part).is_some()
                {
                    inner.suspect = true;
                }
            }
        }
    }
}

/// The context of a one-off reader (a restore, a position probe): the end of a partition
/// (partition EOF) is how it knows it is done, not an error worth a log line; its
/// statistics tell whether a fetch position is beyond the log's end ([`reach::beyond_end`]).
#[derive(Default)]
pub(crate) struct ReaderContext {
    beyond: Mutex<BTreeMap<(String, i32), (i64, i64)>>,
}

impl ReaderContext {
    /// The log's extent, if the last statistics showed the fetch position of `topic`
    /// `partition` beyond its end.
    pub(crate) fn beyond_end(&self, topic: &str, partition: i32) -> Option<(i64, i64)> {
        self.beyond
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(topic.to_string(), partition))
            .copied()
    }
}

impl ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let eof = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        );
        if !eof {
            tracing::warn!(%error, reason, "kafka reader error");
        }
    }

    fn stats(&self, statistics: Statistics) {
        let mut beyond = self
            .beyond
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (name, topic) in &statistics.topics {
            for (p, part) in &topic.partitions {
                match reach::beyond_end(part) {
                    Some(extent) => beyond.insert((name.clone(), *p), extent),
                    None => beyond.remove(&(name.clone(), *p)),
                };
            }
        }
    }
}

impl ConsumerContext for ReaderContext {}

/// What the broker says a changelog partition holds, for an error message. (Tansu, the
/// test broker, answers the end offset wrongly: facts for a person, never a decision.)
fn log_extent(
    consumer: &BaseConsumer<ReaderContext>,
    topic: &str,
    partition: i32,
    position: i64,
) -> String {
    match consumer.fetch_watermarks(topic, partition, Duration::from_secs(5)) {
        Ok((low, high)) => format!(
            "the broker reports offsets {low}..{high} for {topic} partition {partition}, the \
             store's position is {position}"
        ),
        Err(e) => format!("the broker's offsets are unknown ({e})"),
    }
}

/// The consumer's context: ownership on rebalance, watermarks from statistics.
#[derive(Debug, Clone)]
pub struct OwnershipContext<F: Family>(pub Arc<Ownership<F>>);

impl<F: Family> ClientContext for OwnershipContext<F> {
    fn stats(&self, statistics: Statistics) {
        self.0.on_stats(&statistics);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka consumer error");
    }
}

impl<F: Family> ConsumerContext for OwnershipContext<F> {
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
