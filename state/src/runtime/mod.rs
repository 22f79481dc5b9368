//! The stream runtime: the machinery every stateful service of the pipeline shares, in the
//! spirit of Kafka Streams' Processor API. A service implements [`Processor`] — what one
//! partition's records do to its state and which records they produce — and the
//! [`Runtime`] does the rest: the state directory, the admin server (health, metrics), the
//! partitioned stores and their ownership (restore on assignment), the consumer group, the
//! producer, the processing cycle, the commit sequence and the runtime metrics.
//!
//! A cycle:
//! 1. consume records from the inputs (and the processor's own wake-ups, such as
//!    delivery's attempt reports) until `max_batch`, `commit_interval` after the first
//!    piece of work, or the processor's idle wait; records of partitions no longer owned
//!    are dropped, records already reflected by a partition's state are skipped;
//! 2. per owned partition, against a staged overlay of its store: the processor applies
//!    the partition's records ([`Processor::process`]), then its timers
//!    ([`Processor::tick`]) when [`Processor::timers_ready`] allows, producing output
//!    records and events; undecodable records are set aside ([`Cx::poison`]);
//! 3. publish, by the processing guarantee ([`Guarantee`]):
//!    - `at_least_once`: write the partition's journal (its input range, `now`, whether
//!      timers ran) before anything is visible; publish the outputs and wait for every
//!      acknowledgement; then the staged changes to the changelog topic, and wait again;
//!    - `exactly_once`: outputs, changelog records and input offsets in one transaction;
//! 4. write each partition's staged state, its next input offsets and its changelog
//!    position in one atomic RocksDB batch, which also closes the journal;
//! 5. under `at_least_once`, commit the offsets to the consumer group asynchronously (they
//!    serve monitoring; an owner starts at the offsets in its store); then hand the events
//!    to the processor ([`Processor::committed`]) to count and log, each in one place.
//!
//! A crash before 4 leaves the store as of the previous cycle. Under `at_least_once` the
//! journal makes the partition's first cycle after a restart replay exactly the crashed
//! one — the same records, the same `now`, the same timer decision — so a deterministic
//! processor publishes again the same records with the same IDs; consumers deduplicate by
//! them. If the changelog already holds the cycle, the restore on assignment applies it
//! and drops the journal. A produce or transaction failure that outlasts librdkafka's own
//! retries stops the service with an error instead of committing.

mod cycle;
mod processor;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use s2s_common::kafka::{KafkaConfig, KafkaSetupError};
use s2s_common::kafka_stats::KafkaStats;
use s2s_common::ops::{Admin, BindError};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

pub use cycle::Journal;
pub use processor::{Cx, Output, Processor, View};

use crate::metrics::RuntimeMetrics;
use crate::ownership::{Ownership, OwnershipContext};
use crate::store::{Family, Limits, StoreError, StoreSet};

/// Timeout of each transactional call (init, send offsets, commit, abort).
const TXN_TIMEOUT: Duration = Duration::from_secs(30);

/// How outputs, state and input offsets are committed, like Kafka Streams'
/// `processing.guarantee`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    /// One Kafka transaction per cycle covers the outputs, the changelog records and the
    /// input offsets; zombie instances are fenced. Needs a broker with transactions.
    ExactlyOnce,
    /// Outputs and changelog acknowledged (idempotent producer) before state and offsets
    /// are committed; a crash can repeat outputs, identically.
    AtLeastOnce,
}

/// The runtime's one error type, for every stateful service.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
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
    #[error("binding {addr}: {error}")]
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("publishing failed, nothing committed: {0}")]
    Publish(String),
    #[error("{0}")]
    Ownership(String),
    /// The broker does not have an input position stored with the state.
    #[error("input offset out of range: {0}")]
    OutOfRange(String),
    #[error("transaction failed, aborted, nothing committed: {0}")]
    Transaction(String),
}

/// One input topic and the name it has in metrics and logs (`click`, `conversion`, …).
#[derive(Debug, Clone)]
pub struct Input {
    pub topic: String,
    pub kind: &'static str,
}

/// What a service tells the runtime about itself.
#[derive(Debug, Clone)]
pub struct Settings<F: Family> {
    /// The service's name: the `service` label of the runtime metrics, the prefix of its
    /// client metrics.
    pub service: &'static str,
    pub kafka: KafkaConfig,
    pub group_id: String,
    /// The co-partitioned input topics: partition N of each is state partition N.
    pub inputs: Vec<Input>,
    pub state_dir: PathBuf,
    pub limits: Limits<F>,
    /// Where the stores' changes are logged; `None` for a store derived from its inputs
    /// alone (a read model), which is rebuilt by reading them again.
    pub changelog: Option<String>,
    /// Where undecodable input is set aside byte for byte; `None`: counted, logged and
    /// skipped (for a service whose inputs the pipeline's other services produce and set
    /// aside themselves).
    pub poison: Option<String>,
    pub guarantee: Guarantee,
    /// Under exactly_once: this instance's `transactional.id`, unique per instance and
    /// stable across its restarts.
    pub transactional_id: Option<String>,
    pub commit_interval: Duration,
    pub max_batch: usize,
    pub admin_listen: SocketAddr,
}

type Consumer_<F> = StreamConsumer<OwnershipContext<F>>;

/// A started runtime: state directory ready, admin bound, clients created, the group
/// subscribed. [`Runtime::run`] drives a [`Processor`] until shutdown.
pub struct Runtime<F: Family> {
    settings: Settings<F>,
    ownership: Arc<Ownership<F>>,
    consumer: Consumer_<F>,
    producer: FutureProducer<KafkaStats>,
    admin: Option<Admin>,
    registry: prometheus::Registry,
    metrics: RuntimeMetrics,
}

impl<F: Family> std::fmt::Debug for Runtime<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("service", &self.settings.service)
            .field("group", &self.settings.group_id)
            .finish()
    }
}

impl<F: Family> Runtime<F> {
    pub async fn bind(settings: Settings<F>) -> Result<Self, RuntimeError> {
        if settings.max_batch == 0 || settings.commit_interval.is_zero() {
            return Err(RuntimeError::Config(
                "commit_interval and max_batch must be > 0".into(),
            ));
        }
        if settings.guarantee == Guarantee::ExactlyOnce && settings.transactional_id.is_none() {
            return Err(RuntimeError::Config(
                "exactly_once needs a transactional_id".into(),
            ));
        }
        std::fs::create_dir_all(&settings.state_dir).map_err(|e| {
            RuntimeError::Config(format!(
                "state_dir {}: {e}; point it at a writable persistent directory",
                settings.state_dir.display()
            ))
        })?;
        let admin = Admin::bind(settings.admin_listen).await?;
        let registry = admin.registry.clone();
        let metrics = RuntimeMetrics::new(&registry, settings.service)?;
        let stores = StoreSet::new(&settings.state_dir, settings.limits.clone());
        let topics: Vec<String> = settings.inputs.iter().map(|i| i.topic.clone()).collect();
        let changelog = settings
            .changelog
            .as_ref()
            .map(|t| metrics.changelog(&settings.kafka, &settings.group_id, t));
        let ownership = Arc::new(Ownership::new(stores, topics.clone(), changelog));
        let mut consumer_config = settings.kafka.consumer_config(&settings.group_id);
        match settings.kafka.properties.get("auto.offset.reset") {
            // Every partition starts at an explicit offset (ownership); one the broker does
            // not have stops the service with what to do (reach).
            None => {
                consumer_config.set("auto.offset.reset", "error");
            }
            Some(reset) => tracing::warn!(
                service = settings.service,
                reset = reset.as_str(),
                "auto.offset.reset is set: an input position stored with the state that the \
                 broker does not have moves to that end of the log without stopping; remove \
                 the property once this start is done"
            ),
        }
        let consumer: Consumer_<F> =
            consumer_config.create_with_context(OwnershipContext(Arc::clone(&ownership)))?;
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&refs)?;
        let stats = KafkaStats::new(&registry, settings.service, admin.health.clone())?;
        let mut producer_config = settings.kafka.producer_config();
        let transactional = match (&settings.guarantee, &settings.transactional_id) {
            (Guarantee::ExactlyOnce, Some(id)) => {
                producer_config.set("transactional.id", id);
                true
            }
            _ => false,
        };
        let producer: FutureProducer<KafkaStats> = producer_config.create_with_context(stats)?;
        if transactional {
            // Fences any earlier instance with this transactional.id (a zombie).
            cycle::blocking(&producer, |p| p.init_transactions(TXN_TIMEOUT)).await?;
        }
        Ok(Runtime {
            settings,
            ownership,
            consumer,
            producer,
            admin: Some(admin),
            registry,
            metrics,
        })
    }

    /// Where the service registers its own metrics.
    pub fn registry(&self) -> &prometheus::Registry {
        &self.registry
    }

    /// The partitions owned and their stores (for services that also answer queries).
    pub fn ownership(&self) -> &Arc<Ownership<F>> {
        &self.ownership
    }

    /// The runtime's producer (idempotent; transactional under exactly_once).
    pub fn producer(&self) -> &FutureProducer<KafkaStats> {
        &self.producer
    }

    pub fn settings(&self) -> &Settings<F> {
        &self.settings
    }

    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.admin {
            Some(a) => a.local_addr(),
            None => Err(std::io::Error::other("the admin server is running")),
        }
    }

    /// Runs cycles of `processor` until `shutdown`; then waits for the processor's work in
    /// flight (up to its grace), and completes and commits a last cycle.
    pub async fn run<P: Processor<F>>(
        mut self,
        processor: P,
        shutdown: CancellationToken,
    ) -> Result<(), RuntimeError> {
        let admin = self
            .admin
            .take()
            .ok_or_else(|| RuntimeError::Config("run called twice".into()))?;
        let service = self.settings.service;
        tracing::info!(service, admin = ?admin.local_addr().ok(), group = %self.settings.group_id, "running");
        let health = admin.health.clone();
        let admin_task = admin.spawn(shutdown.clone());
        let result = cycle::Loop::new(&self, processor).run(&shutdown).await;
        health.drain();
        if let Err(e) = &result {
            tracing::error!(service, error = %e, "stopped on error");
        }
        shutdown.cancel();
        let _ = admin_task.await;
        tracing::info!(service, "stopped");
        result
    }
}
