//! Shared library of the S2S postback pipeline.
//!
//! Everything two services must agree on lives here, so that it is written once: the wire
//! contract ([`contract`]) and an example of each of its records ([`fixtures`]), topic
//! names and the partition key ([`topics`]), Kafka client settings and topic provisioning
//! ([`kafka`]), macro templates ([`template`]), the `/metrics` + `/healthz` + `/readyz`
//! admin server ([`ops`]), configuration loading ([`config`]), logging set-up
//! ([`telemetry`]) and the shutdown signal ([`shutdown`]).

pub mod config;
pub mod contract;
pub mod fixtures;
pub mod ids;
pub mod kafka;
pub mod kafka_stats;
pub mod ops;
pub mod pipeline;
pub mod shutdown;
pub mod telemetry;
pub mod template;
pub mod topics;

/// Milliseconds since the Unix epoch, the timestamp unit of every record.
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}
