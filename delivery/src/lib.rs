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
//! that owns the delivery. It runs on the stream runtime ([`s2s_state::runtime`]); the
//! processor and the guarantees are in [`processor`], attempts are started by
//! [`dispatch`] and settled by [`settle`].
//!
//! Guarantees: an input offset is committed only once its deliveries are durably
//! scheduled (or done); a crash re-sends at most the attempts that were in flight —
//! at-least-once towards HTTP endpoints, deduplicable by `webhook-id`. A conversion that
//! reaches delivery twice (an at-least-once replay upstream) is recognised by its delivery
//! IDs and not sent again while they are remembered (`finished_retention`).

pub mod catalog;
pub mod circuit;
pub mod config;
pub mod dispatch;
pub mod endpoint;
pub mod events;
pub mod job;
pub mod metrics;
pub mod policy;
pub mod processor;
pub mod replay;
pub mod sample;
pub mod schedule;
pub mod sender;
pub mod settle;
pub mod signing;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use s2s_common::kafka::ensure_topics;
use s2s_state::runtime::{Input, Runtime, RuntimeError, Settings};
use tokio_util::sync::CancellationToken;

pub use config::DeliveryConfig;
use dispatch::Dispatcher;
use processor::{Deliveries, LivePostbacks, Rules};
use schedule::Cf;
use sender::Sender;

/// A started delivery worker: config checked, topics provisioned, clients created, admin
/// bound.
#[derive(Debug)]
pub struct Delivery {
    runtime: Runtime<Cf>,
    processor: Deliveries,
}

impl Delivery {
    /// Validates the config, provisions topics, reads the catalog to its end (and
    /// follows its postbacks until `shutdown`) and binds the runtime.
    pub async fn bind(
        config: DeliveryConfig,
        shutdown: &CancellationToken,
    ) -> Result<Self, RuntimeError> {
        let file = config.validate().map_err(RuntimeError::Config)?;
        ensure_topics(
            &config.pipeline.kafka,
            &config.pipeline.topics,
            Duration::from_secs(30),
        )
        .await?;
        let topics = &config.pipeline.topics;
        let runtime = Runtime::bind(Settings {
            service: "delivery",
            kafka: config.pipeline.kafka.clone(),
            group_id: config.group_id.clone(),
            inputs: vec![
                Input {
                    topic: topics.conversions.name.clone(),
                    kind: "conversion",
                },
                Input {
                    topic: topics.delivery_commands.name.clone(),
                    kind: "command",
                },
            ],
            state_dir: config.state_dir.clone(),
            limits: config.rocksdb.limits(),
            changelog: Some(topics.delivery_changelog.name.clone()),
            poison: Some(topics.poison.name.clone()),
            guarantee: s2s_state::Guarantee::AtLeastOnce,
            transactional_id: None,
            commit_interval: config.commit_interval,
            max_batch: config.max_batch,
            admin_listen: config.admin_listen,
        })
        .await?;
        // The file's postbacks are labelled by name, the catalog's together.
        let metrics = metrics::Metrics::new(runtime.registry())?
            .with_own_endpoints(file.iter().map(|e| e.name.clone()));
        let taken: BTreeSet<String> = file.iter().map(|e| e.name.clone()).collect();
        let compile_config = config.clone();
        let secret_key = s2s_catalog::secrets::SecretKey::of(&config.pipeline)
            .map_err(|e| RuntimeError::Config(e.to_string()))?;
        let catalog = s2s_catalog::Live::follow(
            &config.pipeline.kafka,
            &topics.catalog.name,
            "delivery",
            runtime.registry(),
            shutdown,
            move |c, previous| {
                catalog::compile(&compile_config, secret_key.as_ref(), &taken, c, previous)
            },
        )
        .await
        .map_err(|e| RuntimeError::Config(e.to_string()))?;
        let from_catalog = catalog.current().endpoints.len();
        if file.is_empty() && from_catalog == 0 {
            tracing::warn!(
                "no postbacks in the catalog or in [[postbacks]]: conversions are consumed \
                 and committed without notifying anyone until one is added"
            );
        }
        let endpoints = file.clone();
        // Connections per host: enough for the largest max_in_flight at start-up (a
        // catalog postback added later with a larger one shares this pool).
        let per_host = endpoints
            .iter()
            .map(|e| e.max_in_flight)
            .chain(catalog.current().endpoints.iter().map(|e| e.max_in_flight))
            .fold(config.endpoint_max_in_flight, usize::max);
        let sender = Sender::new(config.connect_timeout, per_host)
            .map_err(|e| RuntimeError::Config(format!("http client: {e}")))?;
        tracing::info!(
            from_file = endpoints.len(),
            from_catalog,
            "delivery endpoints configured"
        );
        let dispatcher = Dispatcher::new(
            endpoints,
            config.circuit(),
            config.max_in_flight,
            dispatch::http(sender),
            metrics.clone(),
        );
        let rules = Rules {
            policy: config.retry_policy(),
            finished_retention_ms: config.finished_retention_ms(),
            shutdown_grace: config.shutdown_grace,
            conversions: topics.conversions.name.clone(),
            delivery_log: Arc::from(topics.delivery_log.name.as_str()),
            dead_letter: Arc::from(topics.dead_letter.name.as_str()),
        };
        Ok(Delivery {
            runtime,
            processor: Deliveries::new(rules, dispatcher, metrics).with_postbacks(LivePostbacks {
                catalog,
                file: file.into_iter().map(Arc::new).collect(),
            }),
        })
    }

    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.runtime.admin_addr()
    }

    /// Delivers until `shutdown`, then lets requests in flight finish (up to
    /// `shutdown_grace`) and commits what they did.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RuntimeError> {
        self.runtime.run(self.processor, shutdown).await
    }
}

/// Binds and runs until `shutdown`.
pub async fn run(config: DeliveryConfig, shutdown: CancellationToken) -> Result<(), RuntimeError> {
    Delivery::bind(config, &shutdown).await?.run(shutdown).await
}
