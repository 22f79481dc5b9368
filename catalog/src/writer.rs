//! Makes catalog changes: one at a time, each checked against the followed catalog before
//! it is appended, so the topic only ever holds accepted changes. That matters because
//! compaction keeps the last record per key: a refused change left in the log would
//! replace the accepted one for any reader that starts from scratch.
//!
//! A change is appended to the catalog topic (its offset is the entity's new revision),
//! then to the audit topic with that revision, who, when and why; [`Writer::write`]
//! returns once the follower has applied the change, so a caller that reads the catalog
//! next sees its own write.
//!
//! One writer per catalog at a time is the caller's part (the console elects one through
//! a consumer group): two writers could each accept a change against the same revision.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use s2s_common::kafka::KafkaConfig;
use tokio::sync::Mutex;

use crate::catalog::Conflict;
use crate::follower::{Follower, FollowerError};
use crate::record::{AuditRecord, Change, Entry, Stored};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Conflict(#[from] Conflict),
    #[error("appending the change to {topic}: {error}; nothing changed")]
    Append { topic: String, error: KafkaError },
    #[error(
        "the change is revision {revision} of the catalog, but its audit record could not \
         be appended to {topic}: {error}"
    )]
    Audit {
        revision: i64,
        topic: String,
        error: KafkaError,
    },
    #[error("the change is revision {revision}, but was not seen applied: {error}")]
    NotApplied { revision: i64, error: FollowerError },
    #[error("the catalog is not read to its end: {0}; nothing changed")]
    Behind(FollowerError),
    #[error("encoding: {0}")]
    Encode(#[from] serde_json::Error),
}

/// What a write did.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    /// The offset of the change in the catalog topic.
    pub revision: i64,
    /// The offset of its audit record in the audit topic.
    pub audit_offset: i64,
    /// The entity as the catalog now holds it; `None` after a delete.
    pub entry: Option<Entry>,
}

pub struct Writer {
    producer: FutureProducer,
    topic: String,
    audit_topic: String,
    follower: Arc<Follower>,
    /// How long a change may take to come back through the follower.
    apply_within: Duration,
    /// One change at a time: each is checked against a catalog that holds the previous.
    turn: Mutex<()>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("topic", &self.topic)
            .field("audit_topic", &self.audit_topic)
            .finish_non_exhaustive()
    }
}

impl Writer {
    pub fn new(
        kafka: &KafkaConfig,
        topic: &str,
        audit_topic: &str,
        follower: Arc<Follower>,
        apply_within: Duration,
    ) -> Result<Self, KafkaError> {
        Ok(Writer {
            producer: kafka.producer_config().create()?,
            topic: topic.to_string(),
            audit_topic: audit_topic.to_string(),
            follower,
            apply_within,
            turn: Mutex::new(()),
        })
    }

    /// Checks `change` against the catalog as read to its end after `since` (a writer's
    /// election: everything its predecessor appended), appends it and its audit record,
    /// and waits until the follower has applied it.
    pub async fn write(&self, change: Change, since: Instant) -> Result<Written, WriteError> {
        let _turn = self.turn.lock().await;
        let catalog = self
            .follower
            .caught_up_since(since, self.apply_within)
            .await
            .map_err(WriteError::Behind)?;
        let previous = catalog.check(&change)?;
        let key = change.key.to_string();
        let value = match &change.document {
            Some(document) => Some(serde_json::to_vec(&Stored {
                document: document.clone(),
                changed_by: change.changed_by.clone(),
                changed_at_ms: change.changed_at_ms,
                reason: change.reason.clone(),
            })?),
            None => None,
        };
        let revision = self
            .append(&self.topic, &key, value.as_deref())
            .await
            .map_err(|error| WriteError::Append {
                topic: self.topic.clone(),
                error,
            })?;
        let audit = serde_json::to_vec(&AuditRecord {
            key: key.clone(),
            revision,
            previous,
            document: change.document,
            changed_by: change.changed_by,
            changed_at_ms: change.changed_at_ms,
            reason: change.reason,
        })?;
        let audit_offset = self
            .append(&self.audit_topic, &key, Some(&audit))
            .await
            .map_err(|error| WriteError::Audit {
                revision,
                topic: self.audit_topic.clone(),
                error,
            })?;
        let catalog = self
            .follower
            .reached(revision + 1, self.apply_within)
            .await
            .map_err(|error| WriteError::NotApplied { revision, error })?;
        Ok(Written {
            revision,
            audit_offset,
            entry: catalog.get(&change.key).cloned(),
        })
    }

    /// Says where this writer answers (after its election), so that the other instances
    /// can forward changes to it; returns once the follower applied it.
    pub async fn announce(&self, url: &str) -> Result<i64, WriteError> {
        let _turn = self.turn.lock().await;
        let value = serde_json::to_vec(&crate::catalog::Announcement {
            url: url.to_string(),
            at_ms: s2s_common::now_ms(),
        })?;
        let offset = self
            .append(&self.topic, crate::catalog::WRITER_KEY, Some(&value))
            .await
            .map_err(|error| WriteError::Append {
                topic: self.topic.clone(),
                error,
            })?;
        self.follower
            .reached(offset + 1, self.apply_within)
            .await
            .map_err(|error| WriteError::NotApplied {
                revision: offset,
                error,
            })?;
        Ok(offset)
    }

    /// Appends one record and returns its offset once the broker acknowledged it.
    async fn append(
        &self,
        topic: &str,
        key: &str,
        value: Option<&[u8]>,
    ) -> Result<i64, KafkaError> {
        let mut record = FutureRecord::<str, [u8]>::to(topic).key(key);
        if let Some(v) = value {
            record = record.payload(v);
        }
        match self.producer.send(record, Timeout::Never).await {
            Ok(delivery) => Ok(delivery.offset),
            Err((error, _)) => Err(error),
        }
    }
}
