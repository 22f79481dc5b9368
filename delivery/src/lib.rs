//! Delivery: sends attributed conversions to affiliate postback URLs, reliably.
//!
//! For each conversion (and each status update, where a postback asks for updates), every
//! matching configured postback gets one *delivery*, identified by a stable ID per
//! (conversion, version, postback) that is sent as `webhook-id` on every attempt. A
//! delivery is scheduled durably in the partition's RocksDB store ([`schedule`]) before it
//! is attempted; attempts run concurrently under a per-endpoint limit and circuit breaker
//! ([`circuit`]); a failure is retried per the schedule ([`policy`]) or dead-lettered; every
//! attempt goes to the delivery-log topic. Operators re-deliver dead letters with the
//! `replay` subcommand ([`replay`]), which sends commands through Kafka to the instance
//! that owns the delivery. The loop itself, and the guarantees, are in [`worker`].
//!
//! Guarantees: an input offset is committed only once its deliveries are durably
//! scheduled (or done); a crash re-sends at most the attempts that were in flight —
//! at-least-once towards HTTP endpoints, deduplicable by `webhook-id`. A conversion that
//! reaches delivery twice (an at-least-once replay upstream) is recognised by its delivery
//! IDs and not sent again while they are remembered (`finished_retention_seconds`).

pub mod circuit;
pub mod config;
pub mod endpoint;
pub mod job;
pub mod metrics;
pub mod policy;
pub mod replay;
pub mod schedule;
pub mod sender;
pub mod signing;
mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use s2s_common::kafka::{ensure_topics, KafkaSetupError};
use s2s_common::kafka_stats::KafkaStats;
use s2s_common::ops::{Admin, BindError};
use s2s_state::{Ownership, OwnershipContext, StoreError};
use tokio_util::sync::CancellationToken;

pub use config::DeliveryConfig;
use endpoint::Endpoint;
use policy::RetryPolicy;
use schedule::{Cf, StoreSet};
use sender::Sender;

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Kafka(#[from] KafkaSetupError),
    #[error("kafka: {0}")]
    Client(#[from] KafkaError),
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("state store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("publishing failed, nothing committed: {0}")]
    Publish(String),
    #[error("{0}")]
    Ownership(String),
}

type Consumer_ = StreamConsumer<OwnershipContext<Cf>>;

/// A started delivery worker: config checked, topics provisioned, clients created, admin
/// bound.
pub struct Delivery {
    config: DeliveryConfig,
    policy: RetryPolicy,
    endpoints: Vec<Endpoint>,
    ownership: Arc<Ownership<Cf>>,
    consumer: Consumer_,
    producer: FutureProducer<KafkaStats>,
    sender: Sender,
    /// Taken by [`Delivery::run`] to serve it.
    admin: Option<Admin>,
    metrics: metrics::Metrics,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("group", &self.config.group_id)
            .field("endpoints", &self.endpoints.len())
            .finish()
    }
}

impl Delivery {
    pub async fn bind(config: DeliveryConfig) -> Result<Self, DeliveryError> {
        let endpoints = config.validate().map_err(DeliveryError::Config)?;
        if endpoints.is_empty() {
            tracing::warn!(
                "no [[postbacks]] configured: conversions will be consumed and committed \
                 without notifying anyone"
            );
        }
        ensure_topics(&config.kafka, &config.topics, Duration::from_secs(30)).await?;
        std::fs::create_dir_all(&config.state_dir).map_err(|e| {
            DeliveryError::Config(format!(
                "state_dir {}: {e}; point it at a writable persistent directory",
                config.state_dir.display()
            ))
        })?;
        let admin = Admin::bind(config.admin_listen).await?;
        let metrics = metrics::Metrics::new(&admin.registry)?;
        let stores = StoreSet::new(&config.state_dir, config.rocksdb.limits());
        let topics = &config.topics;
        let ownership = Arc::new(Ownership::new(
            stores,
            vec![
                topics.conversions.name.clone(),
                topics.delivery_commands.name.clone(),
            ],
            Some(metrics.state.changelog(
                &config.kafka,
                &config.group_id,
                &topics.delivery_changelog.name,
            )),
        ));
        let consumer: Consumer_ = config
            .kafka
            .consumer_config(&config.group_id)
            .create_with_context(OwnershipContext(Arc::clone(&ownership)))?;
        consumer.subscribe(&[&topics.conversions.name, &topics.delivery_commands.name])?;
        let stats = KafkaStats::new(&admin.registry, "delivery", admin.health.clone())?;
        let producer: FutureProducer<KafkaStats> =
            config.kafka.producer_config().create_with_context(stats)?;
        let per_host = endpoints
            .iter()
            .map(|e| e.max_in_flight)
            .max()
            .unwrap_or(config.endpoint_max_in_flight);
        let sender = Sender::new(Duration::from_millis(config.connect_timeout_ms), per_host)?;
        Ok(Delivery {
            policy: config.retry_policy(),
            config,
            endpoints,
            ownership,
            consumer,
            producer,
            sender,
            admin: Some(admin),
            metrics,
        })
    }

    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.admin {
            Some(a) => a.local_addr(),
            None => Err(std::io::Error::other("the admin server is running")),
        }
    }

    /// Delivers until `shutdown`, then lets requests in flight finish (up to
    /// `shutdown_grace_ms`) and commits what they did.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), DeliveryError> {
        tracing::info!(admin = ?self.admin_addr().ok(), endpoints = self.endpoints.len(),
            group = %self.config.group_id, "delivery running");
        let admin = self
            .admin
            .take()
            .ok_or_else(|| DeliveryError::Config("run called twice".into()))?;
        let health = admin.health.clone();
        let admin_task = admin.spawn(shutdown.clone());
        let result = worker::Worker::new(&self).run(&shutdown).await;
        health.drain();
        if let Err(e) = &result {
            tracing::error!(error = %e, "delivery stopped on error");
        }
        shutdown.cancel();
        let _ = admin_task.await;
        tracing::info!("delivery stopped");
        result
    }
}

/// Binds and runs until `shutdown`.
pub async fn run(config: DeliveryConfig, shutdown: CancellationToken) -> Result<(), DeliveryError> {
    Delivery::bind(config).await?.run(shutdown).await
}
