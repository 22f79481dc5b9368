//! The reporting console: operators watch conversions and postback deliveries live, look
//! up the whole story of a click, see what fails and why, and re-fire failed deliveries —
//! from a web page or its JSON API.
//!
//! **Why a service of its own.** It reads every topic of the pipeline (clicks, postbacks,
//! outcomes, delivery attempts, dead letters, commands), keeps a read model sized by the
//! history operators want to look at, and answers people, not the flow: none of which
//! belongs in a stage of the pipeline, whose state and failures it must not share. It
//! scales like the rest: a consumer group over the partitions, one RocksDB store per
//! partition ([`schema`]), each instance answering for the partitions it owns.
//!
//! - [`model`]: how each record changes the read model (idempotent);
//! - [`query`]: the story of a click (one prefix read), lists with cursor pagination,
//!   totals per hour or day;
//! - [`api`]: the page, the API, the live feed, re-fire (a command to the delivery
//!   worker, never a second HTTP sender);
//! - `worker`: the consumer loop, committing read model and offsets atomically.

pub mod api;
pub mod config;
pub mod metrics;
pub mod model;
pub mod query;
pub mod schema;
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
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

pub use config::ConsoleConfig;
use model::LiveEvent;
use schema::{Cf, StoreSet};

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
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
    #[error("{0}")]
    Ownership(String),
}

type Consumer_ = StreamConsumer<OwnershipContext<Cf>>;

/// A started console: topics checked, stores ready, API and admin listeners bound.
pub struct Console {
    config: ConsoleConfig,
    ownership: Arc<Ownership<Cf>>,
    consumer: Consumer_,
    metrics: metrics::Metrics,
    feed: broadcast::Sender<LiveEvent>,
    api: Arc<api::ApiState>,
    listener: Option<TcpListener>,
    admin: Option<Admin>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("group", &self.config.group_id)
            .finish()
    }
}

impl Console {
    pub async fn bind(config: ConsoleConfig) -> Result<Self, ConsoleError> {
        config.validate().map_err(ConsoleError::Config)?;
        let counts = ensure_topics(&config.kafka, &config.topics, Duration::from_secs(30)).await?;
        let inputs = inputs(&config);
        let n = |t: &String| counts.get(t).copied().unwrap_or_default();
        if let Some(odd) = inputs.iter().find(|t| n(t) != n(&inputs[0])) {
            return Err(ConsoleError::Config(format!(
                "topic '{odd}' has {} partitions and '{}' has {}: the console keeps everything \
                 about a click in one store, so every topic it reads needs the same partition \
                 count (they are all keyed by click ID); set topics.*.partitions alike",
                n(odd),
                inputs[0],
                n(&inputs[0])
            )));
        }
        std::fs::create_dir_all(&config.state_dir).map_err(|e| {
            ConsoleError::Config(format!(
                "state_dir {}: {e}; point it at a writable persistent directory",
                config.state_dir.display()
            ))
        })?;
        let admin = Admin::bind(config.admin_listen).await?;
        let metrics = metrics::Metrics::new(&admin.registry)?;
        let stores = StoreSet::new(&config.state_dir, config.limits());
        let ownership = Arc::new(Ownership::new(stores, inputs.clone(), None));
        let consumer: Consumer_ = config
            .kafka
            .consumer_config(&config.group_id)
            .create_with_context(OwnershipContext(Arc::clone(&ownership)))?;
        let topic_refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        consumer.subscribe(&topic_refs)?;
        let stats = KafkaStats::new(&admin.registry, "console", admin.health.clone())?;
        let producer: FutureProducer<KafkaStats> =
            config.kafka.producer_config().create_with_context(stats)?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|error| ConsoleError::Listen {
                    addr: config.listen,
                    error,
                })?;
        let feed = worker::feed();
        let api = Arc::new(api::ApiState {
            ownership: ownership.clone(),
            producer,
            commands_topic: config.topics.delivery_commands.name.clone(),
            inputs: inputs.clone(),
            operators: config.operators.clone().into_iter().collect(),
            metrics: metrics.clone(),
            feed: feed.clone(),
        });
        Ok(Console {
            config,
            ownership,
            consumer,
            metrics,
            feed,
            api,
            listener: Some(listener),
            admin: Some(admin),
        })
    }

    /// Where the API and the page are served.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.listener {
            Some(l) => l.local_addr(),
            None => Err(std::io::Error::other("already serving")),
        }
    }

    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.admin {
            Some(a) => a.local_addr(),
            None => Err(std::io::Error::other("already serving")),
        }
    }

    fn inputs(&self) -> Vec<String> {
        inputs(&self.config)
    }

    /// Serves and keeps the read model current until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), ConsoleError> {
        let (Some(listener), Some(admin)) = (self.listener.take(), self.admin.take()) else {
            return Err(ConsoleError::Config("run called twice".into()));
        };
        tracing::info!(addr = ?listener.local_addr().ok(), admin = ?admin.local_addr().ok(), "console serving");
        let health = admin.health.clone();
        let admin_task = admin.spawn(shutdown.clone());
        let app = api::router(self.api.clone());
        let stop = shutdown.clone();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        });
        let result = worker::run(&self, &shutdown).await;
        health.drain();
        if let Err(e) = &result {
            tracing::error!(error = %e, "console stopped on error");
        }
        shutdown.cancel();
        let _ = admin_task.await;
        let _ = server.await;
        tracing::info!("console stopped");
        result
    }
}

/// The topics the console reads, all keyed by click ID.
fn inputs(c: &ConsoleConfig) -> Vec<String> {
    let t = &c.topics;
    [
        &t.clicks,
        &t.postbacks,
        &t.conversions,
        &t.rejections,
        &t.delivery_log,
        &t.dead_letter,
        &t.delivery_commands,
        &t.refusals,
    ]
    .iter()
    .map(|t| t.name.clone())
    .collect()
}

/// Binds and runs until `shutdown`.
pub async fn run(config: ConsoleConfig, shutdown: CancellationToken) -> Result<(), ConsoleError> {
    Console::bind(config).await?.run(shutdown).await
}
