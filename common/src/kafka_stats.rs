//! librdkafka statistics and error callbacks as Prometheus metrics, and readiness.
//!
//! A client created with this context (and `statistics.interval.ms` > 0, which
//! [`crate::kafka::KafkaConfig`] sets) reports every interval: the producer queue depth,
//! the round-trip time to each broker, and how many brokers are connected. The service
//! is ready (`/readyz`) only while at least one broker connection is up.

use std::sync::Arc;

use prometheus::{GaugeVec, IntCounter, IntGauge, Opts, Registry};
use rdkafka::client::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;

use crate::ops::Health;

#[derive(Debug)]
struct Inner {
    rtt_seconds: GaugeVec,
    brokers_up: IntGauge,
    queue_messages: IntGauge,
    errors: IntCounter,
    health: Health,
}

/// Client context that turns statistics into metrics; cheap to clone.
#[derive(Debug, Clone)]
pub struct KafkaStats(Arc<Inner>);

impl KafkaStats {
    /// Registers `<component>_kafka_*` metrics; `health` follows broker connectivity.
    pub fn new(registry: &Registry, component: &str, health: Health) -> prometheus::Result<Self> {
        let inner = Inner {
            rtt_seconds: GaugeVec::new(
                Opts::new(
                    format!("{component}_kafka_broker_rtt_seconds"),
                    "Mean round-trip time to each broker over the last statistics interval.",
                ),
                &["broker"],
            )?,
            brokers_up: IntGauge::new(
                format!("{component}_kafka_brokers_up"),
                "Brokers with an established connection.",
            )?,
            queue_messages: IntGauge::new(
                format!("{component}_kafka_producer_queue_messages"),
                "Messages waiting in the producer queue (not yet acknowledged).",
            )?,
            errors: IntCounter::new(
                format!("{component}_kafka_client_errors_total"),
                "Errors reported by librdkafka (connection failures, broker down, ...).",
            )?,
            health,
        };
        registry.register(Box::new(inner.rtt_seconds.clone()))?;
        registry.register(Box::new(inner.brokers_up.clone()))?;
        registry.register(Box::new(inner.queue_messages.clone()))?;
        registry.register(Box::new(inner.errors.clone()))?;
        Ok(KafkaStats(Arc::new(inner)))
    }

    /// Applies one statistics report.
    fn apply(&self, s: &Statistics) {
        let i = &self.0;
        i.queue_messages
            .set(i64::try_from(s.msg_cnt).unwrap_or(i64::MAX));
        let mut up = 0;
        // Bootstrap entries (nodeid -1) are placeholders until metadata names the brokers.
        for b in s.brokers.values().filter(|b| b.nodeid >= 0) {
            if b.state == "UP" {
                up += 1;
            }
            if let Some(rtt) = &b.rtt {
                i.rtt_seconds
                    .with_label_values(&[&b.nodeid.to_string()])
                    .set(rtt.avg as f64 / 1e6);
            }
        }
        i.brokers_up.set(up);
        i.health.set_ready(up > 0);
    }
}

impl ClientContext for KafkaStats {
    fn stats(&self, statistics: Statistics) {
        self.apply(&statistics);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.0.errors.inc();
        tracing::warn!(%error, reason, "kafka client error");
    }
}
