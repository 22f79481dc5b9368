//! Attributor: the stateful core. It joins postbacks to clicks by click ID in a windowed
//! RocksDB store and publishes attributed conversions and reason-coded rejections.
//!
//! Processing cycle (at-least-once in this version):
//! 1. consume up to `max_batch` records from clicks and postbacks, or for
//!    `commit_interval_ms`;
//! 2. apply them to a staged overlay of the store, collecting outcomes; release postbacks
//!    whose grace period ended (a wall-clock timer, so an idle partition still emits);
//! 3. publish the outcomes and wait until the broker acknowledged every one;
//! 4. write the staged state and the next input offsets in one atomic RocksDB batch;
//! 5. commit the offsets to the consumer group.
//!
//! A crash before 4 leaves state and offsets as of the previous cycle: the batch is
//! consumed again and yields the same outcomes with the same deterministic IDs. A crash
//! between 4 and 5 replays the batch over state that already holds it; the outcomes are
//! again the same IDs (clicks are idempotent puts, an attributed postback re-attributes
//! identically). Consumers deduplicate by `outcome_id`. A produce failure that outlasts
//! librdkafka's own retries stops the service with an error instead of committing.

pub mod config;
pub mod join;
pub mod metrics;
pub mod process;
pub mod store;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use s2s_common::contract::{self, Click, Postback};
use s2s_common::kafka::{ensure_topics, KafkaSetupError};
use s2s_common::kafka_stats::KafkaStats;
use s2s_common::ops::{Admin, BindError};
use s2s_common::topics::partition_key;
use tokio_util::sync::CancellationToken;

pub use config::AttributorConfig;
use process::{Joiner, Outcome};
use store::{Cf, Store, StoreError, StoreLimits};

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
}

/// Upper bound of grace-period expiries handled per cycle, to keep cycles short.
const TIMER_BATCH: usize = 10_000;

/// A started attributor: store open, topics provisioned, clients created, admin bound.
pub struct Attributor {
    config: AttributorConfig,
    joiner: Joiner,
    store: Store,
    consumer: StreamConsumer,
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
        let store = Store::open(
            &config.state_dir,
            StoreLimits {
                block_cache_bytes: config.rocksdb.block_cache_bytes,
                write_buffer_bytes: config.rocksdb.write_buffer_bytes,
                click_retention_ms: rules
                    .max_window_ms()
                    .saturating_add(i64::try_from(config.grace_period_ms).unwrap_or(i64::MAX)),
            },
        )?;
        let consumer: StreamConsumer = config.kafka.consumer_config(&config.group_id).create()?;
        consumer.subscribe(&[&config.topics.clicks.name, &config.topics.postbacks.name])?;
        let admin = Admin::bind(config.admin_listen).await?;
        let metrics = metrics::Metrics::new(&admin.registry)?;
        let stats = KafkaStats::new(&admin.registry, "attributor", admin.health.clone())?;
        let producer: FutureProducer<KafkaStats> =
            config.kafka.producer_config().create_with_context(stats)?;
        Ok(Attributor {
            joiner: Joiner {
                rules,
                grace_ms: i64::try_from(config.grace_period_ms).unwrap_or(i64::MAX),
            },
            config,
            store,
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
        let worker = Worker {
            config: &self.config,
            joiner: &self.joiner,
            store: &self.store,
            consumer: &self.consumer,
            producer: &self.producer,
            metrics: &self.metrics,
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

struct Worker<'a> {
    config: &'a AttributorConfig,
    joiner: &'a Joiner,
    store: &'a Store,
    consumer: &'a StreamConsumer,
    producer: &'a FutureProducer<KafkaStats>,
    metrics: &'a metrics::Metrics,
}

impl Worker<'_> {
    async fn run(&self, shutdown: &CancellationToken) -> Result<(), AttributorError> {
        let interval = Duration::from_millis(self.config.commit_interval_ms);
        loop {
            let (batch, stopping) = self.gather(shutdown, interval).await;
            let started = Instant::now();
            if self.cycle(batch).await? {
                self.metrics
                    .cycle_seconds
                    .observe(started.elapsed().as_secs_f64());
            }
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

    /// One cycle over `batch` and the due timers; `false` when there was nothing to do.
    async fn cycle(&self, batch: Vec<OwnedMessage>) -> Result<bool, AttributorError> {
        let topics = &self.config.topics;
        let now = s2s_common::now_ms();
        let mut st = self.store.stage();
        let mut outcomes = Vec::new();
        let mut offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for msg in &batch {
            offsets.insert((msg.topic().to_string(), msg.partition()), msg.offset() + 1);
            let payload = msg.payload().unwrap_or_default();
            let kind = if msg.topic() == topics.clicks.name {
                "click"
            } else {
                "postback"
            };
            self.metrics.consumed.with_label_values(&[kind]).inc();
            let malformed = |e: &dyn std::fmt::Display| {
                tracing::warn!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), error = %e, "malformed input record");
                Outcome::Rejected(join::reject_malformed(
                    msg.topic(),
                    msg.partition(),
                    msg.offset(),
                    payload,
                    &e.to_string(),
                    now,
                ))
            };
            if kind == "click" {
                match contract::decode::<Click>(payload) {
                    Ok(click) => outcomes.extend(self.joiner.on_click(&mut st, &click, now)?),
                    Err(e) => outcomes.push(malformed(&e)),
                }
            } else {
                match contract::decode::<Postback>(payload) {
                    Ok(pb) => outcomes.extend(self.joiner.on_postback(&mut st, &pb, now)?),
                    Err(e) => outcomes.push(malformed(&e)),
                }
            }
        }
        outcomes.extend(self.joiner.on_timer(&mut st, now, TIMER_BATCH)?);

        if st.is_empty() && offsets.is_empty() {
            return Ok(false);
        }
        self.publish(&outcomes).await?;
        self.store.commit(st, &offsets)?;
        if !offsets.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for ((topic, partition), next) in &offsets {
                tpl.add_partition_offset(topic, *partition, Offset::Offset(*next))?;
            }
            // Async: the offsets are already durable in the store; a lost commit only
            // means a replay with the same outcome IDs.
            if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
                tracing::warn!(error = %e, "offset commit failed; the batch may be replayed");
            }
        }
        for o in &outcomes {
            match o {
                Outcome::Attributed(_) => self
                    .metrics
                    .outcomes
                    .with_label_values(&["attributed", "none"])
                    .inc(),
                Outcome::Rejected(r) => self
                    .metrics
                    .outcomes
                    .with_label_values(&["rejected", r.reason.as_str()])
                    .inc(),
            }
        }
        for cf in Cf::ALL {
            if let Ok(n) = self.store.estimate_keys(cf) {
                self.metrics
                    .state_keys
                    .with_label_values(&[cf.name()])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        Ok(true)
    }

    /// Publishes every outcome and waits for all acknowledgements. A full producer queue
    /// is backpressure: wait for the oldest record in flight, then try again.
    async fn publish(&self, outcomes: &[Outcome]) -> Result<(), AttributorError> {
        let topics = &self.config.topics;
        let mut in_flight = VecDeque::with_capacity(outcomes.len());
        for o in outcomes {
            let (topic, payload) = match o {
                Outcome::Attributed(c) => (&topics.conversions.name, contract::encode(c)),
                Outcome::Rejected(r) => (&topics.rejections.name, contract::encode(r)),
            };
            let mut record = FutureRecord::to(topic)
                .key(partition_key(o.key()))
                .payload(&payload);
            loop {
                match self.producer.send_result(record) {
                    Ok(f) => {
                        in_flight.push_back(f);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        match in_flight.pop_front() {
                            Some(f) => acknowledged(f.await)?,
                            None => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                    Err((e, _)) => return Err(AttributorError::Publish(e.to_string())),
                }
            }
        }
        for f in in_flight {
            acknowledged(f.await)?;
        }
        Ok(())
    }
}

fn acknowledged(
    r: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
) -> Result<(), AttributorError> {
    match r {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(AttributorError::Publish(e.to_string())),
        Err(_) => Err(AttributorError::Publish("delivery report dropped".into())),
    }
}

/// Binds and runs until `shutdown`.
pub async fn run(
    config: AttributorConfig,
    shutdown: CancellationToken,
) -> Result<(), AttributorError> {
    Attributor::bind(config).await?.run(shutdown).await
}
