//! Delivery: sends attributed conversions to affiliate postback URLs.
//!
//! For each conversion, every matching endpoint is called; each attempt is published to
//! the delivery-log topic; a retryable failure waits per `retry_schedule_ms`; an attempt
//! that cannot succeed, or the last one, puts a record on the dead-letter topic. The
//! conversion's offset is committed only after all its endpoints were delivered or
//! dead-lettered and those records were acknowledged.
//!
//! Guarantee towards HTTP endpoints: at-least-once. A crash or shutdown in the middle of a
//! conversion re-sends its deliveries after restart, with the same `webhook-id` header
//! (stable per conversion, version and endpoint) so the affiliate can deduplicate.
//!
//! In this version retries wait in process and one conversion is handled at a time, so a
//! slow endpoint delays the others; durable retry scheduling comes with the delivery issue.

pub mod config;
pub mod endpoint;
pub mod metrics;
pub mod policy;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use s2s_common::contract::{
    self, AttemptOutcome, Conversion, DeadLetter, DeliveryAttempt, SCHEMA_VERSION,
};
use s2s_common::kafka::{ensure_topics, send_and_wait, KafkaSetupError};
use s2s_common::kafka_stats::KafkaStats;
use s2s_common::ops::{Admin, BindError};
use s2s_common::topics::partition_key;
use tokio_util::sync::CancellationToken;

pub use config::DeliveryConfig;
use endpoint::{classify, status_class, Endpoint};
use policy::{parse_retry_after, RetryPolicy};

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
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Why handling a conversion stopped before it was complete.
enum Interrupted {
    Shutdown,
    Kafka(KafkaError),
}

pub struct Delivery {
    config: DeliveryConfig,
    endpoints: Vec<Endpoint>,
    consumer: StreamConsumer,
    producer: FutureProducer<KafkaStats>,
    client: reqwest::Client,
    admin: Admin,
    metrics: metrics::Metrics,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("group", &self.config.group_id)
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
        let consumer: StreamConsumer = config.kafka.consumer_config(&config.group_id).create()?;
        consumer.subscribe(&[&config.topics.conversions.name])?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.request_timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("s2s-postback-delivery/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let admin = Admin::bind(config.admin_listen).await?;
        let metrics = metrics::Metrics::new(&admin.registry)?;
        let stats = KafkaStats::new(&admin.registry, "delivery", admin.health.clone())?;
        let producer: FutureProducer<KafkaStats> =
            config.kafka.producer_config().create_with_context(stats)?;
        Ok(Delivery {
            config,
            endpoints,
            consumer,
            producer,
            client,
            admin,
            metrics,
        })
    }

    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// Delivers until `shutdown`. A conversion interrupted by shutdown is not committed
    /// and is delivered again after restart.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), DeliveryError> {
        tracing::info!(admin = ?self.admin_addr().ok(), endpoints = self.endpoints.len(), "delivery running");
        let health = self.admin.health.clone();
        let admin_task = self.admin.spawn(shutdown.clone());
        let policy = self.config.retry_policy();
        let worker = Worker {
            config: &self.config,
            policy: &policy,
            endpoints: &self.endpoints,
            producer: &self.producer,
            client: &self.client,
            metrics: &self.metrics,
            shutdown: &shutdown,
        };
        let result = loop {
            let msg = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(()),
                m = self.consumer.recv() => m,
            };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "consumer error");
                    continue;
                }
            };
            match contract::decode::<Conversion>(msg.payload().unwrap_or_default()) {
                Ok(conversion) => match worker.handle(&conversion).await {
                    Ok(()) => {}
                    Err(Interrupted::Shutdown) => break Ok(()),
                    Err(Interrupted::Kafka(e)) => break Err(DeliveryError::Client(e)),
                },
                Err(e) => {
                    // Log and count in one place; the record stays in the topic for replay.
                    self.metrics.malformed.inc();
                    tracing::error!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), error = %e, "malformed conversion skipped");
                }
            }
            if let Err(e) = self.consumer.commit_message(&msg, CommitMode::Async) {
                tracing::warn!(error = %e, "offset commit failed; the conversion may be delivered again");
            }
        };
        health.drain();
        shutdown.cancel();
        let _ = admin_task.await;
        tracing::info!("delivery stopped");
        result
    }
}

struct Worker<'a> {
    config: &'a DeliveryConfig,
    policy: &'a RetryPolicy,
    endpoints: &'a [Endpoint],
    producer: &'a FutureProducer<KafkaStats>,
    client: &'a reqwest::Client,
    metrics: &'a metrics::Metrics,
    shutdown: &'a CancellationToken,
}

impl Worker<'_> {
    async fn handle(&self, c: &Conversion) -> Result<(), Interrupted> {
        for ep in self.endpoints.iter().filter(|e| e.wants(c)) {
            self.deliver(ep, c).await?;
        }
        Ok(())
    }

    /// Attempts until delivered, permanently failed, or out of attempts.
    async fn deliver(&self, ep: &Endpoint, c: &Conversion) -> Result<(), Interrupted> {
        let delivery_id = ep.delivery_id(c);
        let url = ep.url_for(c);
        let mut attempt = 1;
        loop {
            let (a, retry_after) = self.attempt(ep, c, &delivery_id, &url, attempt).await;
            self.publish(
                &self.config.topics.delivery_log.name,
                &c.click_id,
                &contract::encode(&a),
            )
            .await?;
            let next_delay = match a.outcome {
                AttemptOutcome::Delivered => {
                    let e2e = (s2s_common::now_ms() - c.attributed_at_ms).max(0) as f64 / 1000.0;
                    self.metrics.end_to_end_seconds.observe(e2e);
                    return Ok(());
                }
                AttemptOutcome::Permanent => None,
                AttemptOutcome::Retryable => {
                    self.policy.delay(attempt + 1, retry_after, fastrand::f64())
                }
            };
            let Some(delay) = next_delay else {
                let dl = DeadLetter {
                    schema_version: SCHEMA_VERSION,
                    delivery_id,
                    endpoint: ep.name.clone(),
                    conversion: c.clone(),
                    attempts: attempt,
                    last_status: a.status_code,
                    last_error: a.error,
                    dead_lettered_at_ms: s2s_common::now_ms(),
                };
                self.publish(
                    &self.config.topics.dead_letter.name,
                    &c.click_id,
                    &contract::encode(&dl),
                )
                .await?;
                self.metrics
                    .dead_lettered
                    .with_label_values(&[&ep.name])
                    .inc();
                tracing::warn!(endpoint = %ep.name, conversion_id = %c.conversion_id, attempts = attempt, "delivery dead-lettered");
                return Ok(());
            };
            self.metrics.retries.with_label_values(&[&ep.name]).inc();
            tokio::select! {
                _ = self.shutdown.cancelled() => return Err(Interrupted::Shutdown),
                _ = tokio::time::sleep(delay) => {}
            }
            attempt += 1;
        }
    }

    /// One HTTP attempt, counted and logged here, with the endpoint's `Retry-After`.
    async fn attempt(
        &self,
        ep: &Endpoint,
        c: &Conversion,
        delivery_id: &str,
        url: &str,
        attempt: u32,
    ) -> (DeliveryAttempt, Option<Duration>) {
        let started = Instant::now();
        let result = self
            .client
            .get(url)
            .header("webhook-id", delivery_id)
            .send()
            .await;
        let latency = started.elapsed();
        let (status, error, retry_after) = match result {
            Ok(resp) => {
                let retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
                (Some(resp.status().as_u16()), None, retry_after)
            }
            Err(e) => (None, Some(error_chain(&e)), None),
        };
        let outcome = classify(status);
        self.metrics
            .attempt_seconds
            .with_label_values(&[&ep.name])
            .observe(latency.as_secs_f64());
        self.metrics
            .attempts
            .with_label_values(&[&ep.name, outcome.as_str(), status_class(status)])
            .inc();
        tracing::debug!(endpoint = %ep.name, conversion_id = %c.conversion_id, attempt, ?status, ?error, ?retry_after, "delivery attempt");
        let record = DeliveryAttempt {
            schema_version: SCHEMA_VERSION,
            delivery_id: delivery_id.to_string(),
            conversion_id: c.conversion_id.clone(),
            conversion_version: c.version,
            click_id: c.click_id.clone(),
            endpoint: ep.name.clone(),
            attempt,
            url: url.to_string(),
            status_code: status,
            latency_ms: u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
            outcome,
            error,
            ts_ms: s2s_common::now_ms(),
        };
        (record, retry_after)
    }

    async fn publish(
        &self,
        topic: &str,
        click_id: &str,
        payload: &[u8],
    ) -> Result<(), Interrupted> {
        send_and_wait(self.producer, topic, partition_key(click_id), payload)
            .await
            .map_err(Interrupted::Kafka)
    }
}

/// The error with its causes, which reqwest keeps in `source()`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// Binds and runs until `shutdown`.
pub async fn run(config: DeliveryConfig, shutdown: CancellationToken) -> Result<(), DeliveryError> {
    Delivery::bind(config).await?.run(shutdown).await
}
