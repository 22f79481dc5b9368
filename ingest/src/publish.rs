//! Publishing a record and waiting for the broker's acknowledgement.
//!
//! The request that carries a record is answered only after this returns `Ok`: the
//! producer is idempotent with `acks=all`, so `Ok` means the record is on every in-sync
//! replica. A full producer queue fails at once (backpressure, the caller answers 503);
//! an unreachable broker fails after `message.timeout.ms`.

use std::time::{Duration, Instant};

use prometheus::HistogramVec;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use s2s_common::contract::{encode, WireRecord};
use s2s_common::kafka::wire_headers;
use s2s_common::kafka_stats::KafkaStats;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("producer queue is full")]
    QueueFull,
    #[error("broker did not acknowledge the record: {0}")]
    NotAcknowledged(KafkaError),
    #[error("producer dropped the record before its delivery report")]
    Dropped,
}

#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer<KafkaStats>,
    produce_seconds: HistogramVec,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Publisher")
    }
}

impl Publisher {
    pub fn new(producer: FutureProducer<KafkaStats>, produce_seconds: HistogramVec) -> Self {
        Publisher {
            producer,
            produce_seconds,
        }
    }

    /// Sends one record of the contract (encoded, with its headers) and waits for its
    /// acknowledgement.
    pub async fn send<R: WireRecord>(
        &self,
        topic: &str,
        key: &[u8],
        record: &R,
    ) -> Result<(), PublishError> {
        let kind = R::KIND;
        let payload = encode(record);
        let started = Instant::now();
        let record = FutureRecord::to(topic)
            .key(key)
            .payload(&payload)
            .headers(wire_headers(record));
        let result = match self.producer.send_result(record) {
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                return Err(PublishError::QueueFull)
            }
            Err((e, _)) => return Err(PublishError::NotAcknowledged(e)),
            Ok(delivery) => match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(PublishError::NotAcknowledged(e)),
                Err(_) => Err(PublishError::Dropped),
            },
        };
        self.produce_seconds
            .with_label_values(&[kind])
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Waits for every record in flight, up to `timeout`. Blocks the calling thread.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }
}
