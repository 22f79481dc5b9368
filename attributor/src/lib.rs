//! Attributor: the stateful core. It joins postbacks to clicks by click ID in windowed
//! RocksDB stores (one per input partition) and publishes attributed conversions, status
//! updates and reason-coded rejections.
//!
//! Processing cycle:
//! 1. consume up to `max_batch` records from clicks and postbacks, or for
//!    `commit_interval_ms`; records of partitions no longer owned are dropped, records
//!    already reflected by a partition's state are skipped;
//! 2. per partition, apply them to a staged overlay of its store, collecting outcomes; then
//!    release postbacks whose grace period ended (a wall-clock timer, so an idle partition
//!    still emits) — but only once the partition's clicks are caught up, so that a backlog
//!    after downtime is read before anything is declared `unknown_click`;
//! 3. publish:
//!    - `at_least_once`: write the partition's journal (its input range, `now`, whether
//!      timers ran); publish the outcomes and wait for every acknowledgement; then the
//!      staged changes to the changelog topic, and wait again;
//!    - `exactly_once`: outcomes, changelog records and input offsets in one transaction;
//! 4. write each partition's staged state, its next input offsets and its changelog
//!    position in one atomic RocksDB batch, which also closes the journal;
//! 5. under `at_least_once`, commit the offsets to the consumer group asynchronously (they
//!    only serve monitoring; an owner starts at the offsets in its store).
//!
//! A crash before 4 leaves the store as of the previous cycle. Under `at_least_once` the
//! journal makes the partition's first cycle after a restart replay exactly the crashed one
//! — the same records, the same `now`, the same timer decision — so outcomes it may already
//! have published come out again with the same IDs, decisions and fields; consumers
//! deduplicate by `outcome_id`. If the changelog already holds the cycle, the restore on
//! assignment (see [`s2s_state::ownership`]) applies it and drops the journal. A produce or
//! transaction failure that outlasts librdkafka's own retries stops the service with an
//! error instead of committing.
//!
//! Undecodable input (bad JSON, unknown schema version) is copied byte for byte to the
//! poison topic, with the reason and its origin in headers; it never stops the stream.

pub mod config;
pub mod join;
pub mod metrics;
pub mod process;
pub mod store;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::future_producer::Delivery;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{Offset, TopicPartitionList};
use s2s_common::contract::{self, Click, PayoutRule, Postback};
use s2s_common::kafka::{ensure_topics, produce_all, KafkaSetupError, OutRecord};
use s2s_common::kafka_stats::KafkaStats;
use s2s_common::ops::{Admin, BindError};
use s2s_common::topics::partition_key;
use tokio_util::sync::CancellationToken;

pub use config::{AttributorConfig, Guarantee};
use process::{Joiner, Outcome};
use s2s_state::{Ownership, OwnershipContext, Positions};
use store::{Cf, Journal, Staged, Store, StoreError, StoreLimits, StoreSet};

#[derive(Debug, thiserror::Error)]
pub enum AttributorError {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Kafka(#[from] KafkaSetupError),
    #[error("kafka: {0}")]
    Client(#[from] KafkaError),
    #[error("state store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("publishing outcomes failed, nothing committed: {0}")]
    Publish(String),
    #[error("{0}")]
    Ownership(String),
    #[error("transaction failed, aborted, nothing committed: {0}")]
    Transaction(String),
}

/// Upper bound of grace-period expiries handled per partition and cycle, to keep cycles
/// short.
const TIMER_BATCH: usize = 10_000;

/// Timeout of each transactional call (init, send offsets, commit, abort).
const TXN_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the state-size gauges are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);

type Consumer_ = StreamConsumer<OwnershipContext<Cf>>;

/// A started attributor: topics provisioned, clients created, admin bound.
pub struct Attributor {
    config: AttributorConfig,
    joiner: Joiner,
    ownership: Arc<Ownership<Cf>>,
    consumer: Consumer_,
    producer: FutureProducer<KafkaStats>,
    admin: Admin,
    metrics: metrics::Metrics,
}

impl std::fmt::Debug for Attributor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attributor")
            .field("group", &self.config.group_id)
            .finish()
    }
}

impl Attributor {
    pub async fn bind(config: AttributorConfig) -> Result<Self, AttributorError> {
        let rules = config.validate().map_err(AttributorError::Config)?;
        ensure_topics(&config.kafka, &config.topics, Duration::from_secs(30)).await?;
        std::fs::create_dir_all(&config.state_dir).map_err(|e| {
            AttributorError::Config(format!(
                "state_dir {}: {e}; point it at a writable persistent directory",
                config.state_dir.display()
            ))
        })?;
        let grace_ms = i64::try_from(config.grace_period_ms).unwrap_or(i64::MAX);
        let stores = StoreSet::new(
            &config.state_dir,
            StoreLimits {
                block_cache_bytes: config.rocksdb.block_cache_bytes,
                write_buffer_bytes: config.rocksdb.write_buffer_bytes,
                click_retention_ms: config.click_retention_ms(&rules),
                conversion_retention_ms: config.conversion_retention_ms(),
            },
        );
        let admin = Admin::bind(config.admin_listen).await?;
        let metrics = metrics::Metrics::new(&admin.registry)?;
        let ownership = Arc::new(Ownership::new(
            stores,
            vec![
                config.topics.clicks.name.clone(),
                config.topics.postbacks.name.clone(),
            ],
            Some(metrics.state.changelog(
                &config.kafka,
                &config.group_id,
                &config.topics.changelog.name,
            )),
        ));
        let consumer: Consumer_ = config
            .kafka
            .consumer_config(&config.group_id)
            .create_with_context(OwnershipContext(Arc::clone(&ownership)))?;
        consumer.subscribe(&[&config.topics.clicks.name, &config.topics.postbacks.name])?;
        let stats = KafkaStats::new(&admin.registry, "attributor", admin.health.clone())?;
        let mut producer_config = config.kafka.producer_config();
        let transactional_id = config.transactional_id().map_err(AttributorError::Config)?;
        if let Some(id) = &transactional_id {
            producer_config.set("transactional.id", id);
        }
        let producer: FutureProducer<KafkaStats> = producer_config.create_with_context(stats)?;
        if transactional_id.is_some() {
            // Fences any earlier instance with this transactional.id (a zombie).
            blocking(&producer, |p| p.init_transactions(TXN_TIMEOUT)).await?;
        }
        Ok(Attributor {
            joiner: Joiner {
                click_retention_ms: config.click_retention_ms(&rules),
                conversion_retention_ms: config.conversion_retention_ms(),
                rules,
                grace_ms,
            },
            config,
            ownership,
            consumer,
            producer,
            admin,
            metrics,
        })
    }

    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// Runs cycles until `shutdown`; the cycle in progress is completed and committed.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AttributorError> {
        let admin_addr = self.admin_addr().ok();
        let health = self.admin.health.clone();
        let admin_task = self.admin.spawn(shutdown.clone());
        tracing::info!(admin = ?admin_addr, group = %self.config.group_id, "attributor running");
        let mut worker = Worker {
            config: &self.config,
            joiner: &self.joiner,
            ownership: &self.ownership,
            consumer: &self.consumer,
            producer: &self.producer,
            metrics: &self.metrics,
            parts: BTreeMap::new(),
            gauges_at: Instant::now(),
        };
        let result = worker.run(&shutdown).await;
        health.drain();
        if let Err(e) = &result {
            tracing::error!(error = %e, "attributor stopped on error");
        }
        shutdown.cancel();
        let _ = admin_task.await;
        tracing::info!("attributor stopped");
        result
    }
}

/// What the worker holds for one owned partition between cycles.
struct Part {
    store: Arc<Store>,
    /// Per input topic: the offset after the last record taken in (buffered or processed).
    next: Positions,
    /// Records taken in, not yet processed (held back while a journal is replayed).
    buffer: Vec<OwnedMessage>,
    /// The crashed cycle to replay first, from the store.
    journal: Option<Journal>,
}

/// One partition's share of a cycle.
struct Work {
    partition: i32,
    store: Arc<Store>,
    records: Vec<OwnedMessage>,
    journal: Journal,
}

/// Something to publish, and how to count it once acknowledged.
enum Output {
    Outcome(Box<Outcome>),
    Poison {
        msg: OwnedMessage,
        kind: &'static str,
        reason: String,
    },
}

struct Worker<'a> {
    config: &'a AttributorConfig,
    joiner: &'a Joiner,
    ownership: &'a Ownership<Cf>,
    consumer: &'a Consumer_,
    producer: &'a FutureProducer<KafkaStats>,
    metrics: &'a metrics::Metrics,
    parts: BTreeMap<i32, Part>,
    gauges_at: Instant,
}

impl Worker<'_> {
    async fn run(&mut self, shutdown: &CancellationToken) -> Result<(), AttributorError> {
        let interval = Duration::from_millis(self.config.commit_interval_ms);
        loop {
            let (batch, stopping) = self.gather(shutdown, interval).await;
            if let Some(failure) = self.ownership.failure() {
                return Err(AttributorError::Ownership(failure));
            }
            let started = Instant::now();
            self.take_in(batch)?;
            if self.cycle().await? {
                self.metrics
                    .cycle_seconds
                    .observe(started.elapsed().as_secs_f64());
            }
            self.refresh_gauges();
            if stopping {
                return Ok(());
            }
        }
    }

    /// Consumes until the batch is full, the interval ends, or shutdown.
    async fn gather(
        &self,
        shutdown: &CancellationToken,
        interval: Duration,
    ) -> (Vec<OwnedMessage>, bool) {
        let deadline = tokio::time::Instant::now() + interval;
        let mut batch = Vec::new();
        while batch.len() < self.config.max_batch {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return (batch, true),
                _ = tokio::time::sleep_until(deadline) => break,
                msg = self.consumer.recv() => match msg {
                    Ok(m) => batch.push(m.detach()),
                    Err(e) => {
                        tracing::warn!(error = %e, "consumer error");
                        break;
                    }
                },
            }
        }
        (batch, false)
    }

    /// Brings the partitions in line with the assignment and buffers the new records:
    /// records of partitions not owned are dropped (their new owner reads them), records
    /// at offsets already taken in (a rebalance re-fetches from the stored offsets) are
    /// skipped.
    fn take_in(&mut self, batch: Vec<OwnedMessage>) -> Result<(), AttributorError> {
        let assigned = self.ownership.assigned();
        self.parts
            .retain(|p, _| assigned.iter().any(|(a, _)| a == p));
        for (p, store) in assigned {
            if self.parts.contains_key(&p) {
                continue;
            }
            let next = Positions::load(
                &store,
                &[
                    &self.config.topics.clicks.name,
                    &self.config.topics.postbacks.name,
                ],
            )?;
            let journal = store.journal::<Journal>()?;
            if let Some(j) = &journal {
                tracing::info!(partition = p, ends = ?j.ends, "replaying the cycle that was in flight");
            }
            self.parts.insert(
                p,
                Part {
                    store,
                    next,
                    buffer: Vec::new(),
                    journal,
                },
            );
        }
        for msg in batch {
            let Some(part) = self.parts.get_mut(&msg.partition()) else {
                continue;
            };
            if part.next.admit(msg.topic(), msg.offset()) {
                part.buffer.push(msg);
            }
        }
        Ok(())
    }

    /// Whether every click of the partition that the broker has is taken in.
    fn clicks_caught_up(&self, partition: i32, part: &Part) -> bool {
        let topic = &self.config.topics.clicks.name;
        match self.ownership.high_watermark(topic, partition) {
            Some(high) => part.next.next(topic) >= high,
            None => false,
        }
    }

    /// Picks each partition's work for this cycle: the journal's range when one is being
    /// replayed (once all of it is buffered), else everything buffered.
    fn plan(&mut self, now_ms: i64) -> Vec<Work> {
        let partitions: Vec<i32> = self.parts.keys().copied().collect();
        let mut work = Vec::new();
        for p in partitions {
            let caught_up = self
                .parts
                .get(&p)
                .is_some_and(|part| self.clicks_caught_up(p, part));
            let Some(part) = self.parts.get_mut(&p) else {
                continue;
            };
            let (records, journal) = match part.journal.take() {
                Some(j) => {
                    let complete = j.ends.iter().all(|(t, end)| part.next.next(t) >= *end);
                    if !complete {
                        part.journal = Some(j);
                        continue;
                    }
                    let (take, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut part.buffer)
                        .into_iter()
                        .partition(|m| j.ends.get(m.topic()).is_some_and(|end| m.offset() < *end));
                    part.buffer = keep;
                    (take, j)
                }
                None => {
                    let records = std::mem::take(&mut part.buffer);
                    let mut ends = BTreeMap::new();
                    for m in &records {
                        ends.insert(m.topic().to_string(), m.offset() + 1);
                    }
                    let journal = Journal {
                        now_ms,
                        timers: caught_up,
                        ends,
                    };
                    (records, journal)
                }
            };
            work.push(Work {
                partition: p,
                store: Arc::clone(&part.store),
                records,
                journal,
            });
        }
        work
    }

    /// One cycle over the buffered records and the due timers; `false` when there was
    /// nothing to do.
    async fn cycle(&mut self) -> Result<bool, AttributorError> {
        let works = self.plan(s2s_common::now_ms());
        let mut staged: Vec<(Staged<'_>, &Work)> = Vec::new();
        let mut outputs = Vec::new();
        for w in &works {
            let mut st = w.store.stage();
            let before = outputs.len();
            self.process(w, &mut st, &mut outputs)?;
            if st.is_empty() && outputs.len() == before {
                continue;
            }
            for (topic, next) in &w.journal.ends {
                st.set_offset(topic, *next);
            }
            if outputs.len() > before && self.config.processing_guarantee == Guarantee::AtLeastOnce
            {
                // Outputs will be visible before the commit: record what produced them.
                // (Under exactly_once they stay invisible until the transaction commits, and
                // a committed cycle the store missed comes back from the changelog.)
                w.store.begin(&w.journal)?;
            }
            staged.push((st, w));
        }
        if staged.is_empty() {
            return Ok(false);
        }
        let changelog = &self.config.topics.changelog.name;
        let changes: Vec<OutRecord<'_>> = staged
            .iter()
            .flat_map(|(st, w)| {
                st.changelog().map(|(key, value)| OutRecord {
                    topic: changelog,
                    partition: Some(w.partition),
                    key,
                    payload: value.map(<[u8]>::to_vec),
                    headers: None,
                })
            })
            .collect();
        let mut offsets = TopicPartitionList::new();
        for (_, w) in &staged {
            for (topic, next) in &w.journal.ends {
                offsets.add_partition_offset(topic, w.partition, Offset::Offset(*next))?;
            }
        }
        let changelog_deliveries = match self.config.processing_guarantee {
            Guarantee::AtLeastOnce => {
                // Outputs first, then the changelog: the changelog only ever holds cycles
                // whose outputs are all acknowledged, so a store rebuilt from it never skips
                // an output.
                self.produce(self.outputs_to_records(&outputs)).await?;
                self.produce(changes).await?
            }
            Guarantee::ExactlyOnce => {
                let result = self.transaction(&outputs, changes, &offsets).await;
                let label = if result.is_ok() {
                    "committed"
                } else {
                    "aborted"
                };
                self.metrics.transactions.with_label_values(&[label]).inc();
                result?
            }
        };
        let mut logged: BTreeMap<i32, i64> = BTreeMap::new();
        for d in changelog_deliveries {
            let next = logged.entry(d.partition).or_insert(0);
            *next = (*next).max(d.offset + 1);
        }
        for (st, w) in staged {
            let position = logged.get(&w.partition).map(|n| (changelog.as_str(), *n));
            w.store.commit(st, position)?;
            for m in &w.records {
                self.metrics
                    .consumed
                    .with_label_values(&[self.kind(m)])
                    .inc();
            }
        }
        if self.config.processing_guarantee == Guarantee::AtLeastOnce && offsets.count() > 0 {
            // Async: the offsets are already durable in the stores.
            if let Err(e) = self.consumer.commit(&offsets, CommitMode::Async) {
                tracing::warn!(error = %e, "offset commit to the group failed; stores hold the offsets");
            }
        }
        self.count(&outputs);
        Ok(true)
    }

    /// One transaction: outputs, changelog records and input offsets, committed together
    /// or aborted together. Returns the changelog deliveries. On any failure the
    /// transaction is aborted and the error returned (the service stops; on restart the
    /// cycle is read again from the offsets in the store).
    async fn transaction(
        &self,
        outputs: &[Output],
        changes: Vec<OutRecord<'_>>,
        offsets: &TopicPartitionList,
    ) -> Result<Vec<Delivery>, AttributorError> {
        blocking(self.producer, |p| p.begin_transaction()).await?;
        let inner = async {
            // One batch: inside a transaction the order of outputs and changelog records
            // does not matter, both become visible at the commit. Deliveries come back in
            // record order, so the changelog's are the tail.
            let mut records = self.outputs_to_records(outputs);
            let first_change = records.len();
            records.extend(changes);
            let mut deliveries = self.produce(records).await?;
            let deliveries = deliveries.split_off(first_change.min(deliveries.len()));
            let group = self
                .consumer
                .group_metadata()
                .ok_or_else(|| AttributorError::Transaction("no consumer group metadata".into()))?;
            let offsets = offsets.clone();
            blocking(self.producer, move |p| {
                p.send_offsets_to_transaction(&offsets, &group, TXN_TIMEOUT)
            })
            .await?;
            blocking(self.producer, |p| p.commit_transaction(TXN_TIMEOUT)).await?;
            Ok(deliveries)
        };
        match inner.await {
            Ok(d) => Ok(d),
            Err(e) => {
                if let Err(abort) =
                    blocking(self.producer, |p| p.abort_transaction(TXN_TIMEOUT)).await
                {
                    tracing::error!(error = %abort, "aborting the transaction failed");
                }
                Err(e)
            }
        }
    }

    /// `click` or `postback`: which input a record came from (a metric label).
    fn kind(&self, msg: &OwnedMessage) -> &'static str {
        if msg.topic() == self.config.topics.clicks.name {
            "click"
        } else {
            "postback"
        }
    }

    /// Applies one partition's records, then its due timers, to its staged state.
    fn process(
        &self,
        w: &Work,
        st: &mut Staged<'_>,
        outputs: &mut Vec<Output>,
    ) -> Result<(), AttributorError> {
        let now = w.journal.now_ms;
        for msg in &w.records {
            let payload = msg.payload().unwrap_or_default();
            let kind = self.kind(msg);
            let decoded = if kind == "click" {
                contract::decode::<Click>(payload)
                    .map(|click| self.joiner.on_click(st, &click, now))
            } else {
                contract::decode::<Postback>(payload).map(|pb| {
                    self.joiner
                        .on_postback(st, &pb, msg.offset(), now)
                        .map(|o| o.into_iter().collect())
                })
            };
            match decoded {
                Ok(outcomes) => {
                    outputs.extend(outcomes?.into_iter().map(|o| Output::Outcome(Box::new(o))))
                }
                Err(e) => outputs.push(Output::Poison {
                    msg: msg.clone(),
                    kind,
                    reason: e.to_string(),
                }),
            }
        }
        if w.journal.timers {
            outputs.extend(
                self.joiner
                    .on_timer(st, now, TIMER_BATCH)?
                    .into_iter()
                    .map(|o| Output::Outcome(Box::new(o))),
            );
        }
        Ok(())
    }

    /// The records that publish `outputs`: outcomes to conversions or rejections keyed by
    /// click ID, poison records byte for byte to the poison topic with their origin.
    fn outputs_to_records<'o>(&'o self, outputs: &'o [Output]) -> Vec<OutRecord<'o>> {
        let topics = &self.config.topics;
        outputs
            .iter()
            .map(|o| match o {
                Output::Outcome(o) => {
                    let (topic, payload) = match &**o {
                        Outcome::Attributed(c) | Outcome::Updated(c) => {
                            (&topics.conversions.name, contract::encode(c))
                        }
                        Outcome::Rejected(r) => (&topics.rejections.name, contract::encode(r)),
                    };
                    OutRecord {
                        topic,
                        partition: None,
                        key: partition_key(o.key()).to_vec(),
                        payload: Some(payload),
                        headers: None,
                    }
                }
                Output::Poison { msg, reason, .. } => {
                    OutRecord::poison(&topics.poison.name, msg, reason)
                }
            })
            .collect()
    }

    /// Produces every record and waits for all acknowledgements (see
    /// [`s2s_common::kafka::produce_all`]).
    async fn produce(&self, records: Vec<OutRecord<'_>>) -> Result<Vec<Delivery>, AttributorError> {
        produce_all(self.producer, &records)
            .await
            .map_err(|e| AttributorError::Publish(e.to_string()))
    }

    /// Logs and counts what a committed cycle produced: each event in this one place.
    fn count(&self, outputs: &[Output]) {
        let m = self.metrics;
        let now = s2s_common::now_ms();
        for o in outputs {
            match o {
                Output::Outcome(o) => {
                    let (reason, pb_ts) = match &**o {
                        Outcome::Attributed(c) => {
                            m.click_to_conversion
                                .observe(ms_to_secs(c.event_ts_ms - c.click_ts_ms));
                            if c.suspicious {
                                m.suspicious.inc();
                            }
                            if c.payout_rule != PayoutRule::OfferEvent {
                                tracing::warn!(
                                    conversion_id = %c.conversion_id,
                                    offer_id = %c.offer_id,
                                    event = %c.event,
                                    rule = c.payout_rule.as_str(),
                                    "conversion priced at 0: no payout configured for it"
                                );
                                m.unpriced
                                    .with_label_values(&[c.payout_rule.as_str()])
                                    .inc();
                            }
                            ("none", c.received_ts_ms)
                        }
                        Outcome::Updated(c) => (
                            c.status_reason.map_or("none", |r| r.as_str()),
                            c.received_ts_ms,
                        ),
                        Outcome::Rejected(r) => (
                            r.reason.as_str(),
                            r.postback.as_ref().map_or(now, |p| p.ts_ms),
                        ),
                    };
                    m.outcomes.with_label_values(&[o.label(), reason]).inc();
                    let automatic =
                        matches!(&**o, Outcome::Updated(c) if c.status_reason.is_some());
                    if !automatic && !matches!(&**o, Outcome::Rejected(r) if r.postback.is_none()) {
                        m.postback_latency.observe(ms_to_secs(now - pb_ts));
                    }
                }
                Output::Poison { msg, kind, reason } => {
                    tracing::warn!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), reason = %reason, "undecodable input record set aside on the poison topic");
                    m.poison.with_label_values(&[kind]).inc();
                }
            }
        }
    }

    /// State size per column family (summed over owned partitions) and consumer lag.
    fn refresh_gauges(&mut self) {
        if self.gauges_at.elapsed() < GAUGE_INTERVAL {
            return;
        }
        self.gauges_at = Instant::now();
        self.metrics.state.refresh(
            self.parts
                .iter()
                .map(|(p, part)| (*p, &*part.store, &part.next)),
            self.ownership,
            &[
                &self.config.topics.clicks.name,
                &self.config.topics.postbacks.name,
            ],
        );
    }
}

fn ms_to_secs(ms: i64) -> f64 {
    ms.max(0) as f64 / 1000.0
}

/// Runs a blocking producer call (the transactional API) off the async worker threads.
async fn blocking<T: Send + 'static>(
    producer: &FutureProducer<KafkaStats>,
    call: impl FnOnce(&FutureProducer<KafkaStats>) -> rdkafka::error::KafkaResult<T> + Send + 'static,
) -> Result<T, AttributorError> {
    let producer = producer.clone();
    tokio::task::spawn_blocking(move || call(&producer))
        .await
        .map_err(|e| AttributorError::Transaction(e.to_string()))?
        .map_err(|e| AttributorError::Transaction(e.to_string()))
}

/// Binds and runs until `shutdown`.
pub async fn run(
    config: AttributorConfig,
    shutdown: CancellationToken,
) -> Result<(), AttributorError> {
    Attributor::bind(config).await?.run(shutdown).await
}
