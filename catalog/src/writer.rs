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
//! A deposed writer that does not know it yet (paused, cut off from the group) is the
//! case the election alone cannot close; [`Writer::transactional`] closes it on a broker
//! with transactions: every writer of a catalog uses one fixed `transactional.id`, a
//! newly elected writer's `init_transactions` fences every earlier producer with that ID
//! (and settles its open transaction) before it reads the catalog to its end, and each
//! change is appended with its audit record in one transaction — so a deposed writer's
//! change fails to commit, and readers (`read_committed`) never see it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
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
    #[error(
        "the catalog's transaction failed: {0}; nothing changed (another writer may have been \
         elected and fenced this one)"
    )]
    Transaction(KafkaError),
    #[error(
        "another writer was elected after this one and fenced it: this instance no longer \
         writes the catalog; nothing changed"
    )]
    Fenced,
    #[error("encoding: {0}")]
    Encode(#[from] serde_json::Error),
}

/// How long a transaction's steps may take.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);

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
    kafka: KafkaConfig,
    /// `None`: records are appended with the idempotent producer, no transactions.
    transactional_id: Option<String>,
    topic: String,
    audit_topic: String,
    follower: Arc<Follower>,
    /// How long a change may take to come back through the follower.
    apply_within: Duration,
    /// One change at a time: each is checked against a catalog that holds the previous.
    /// Holds the producer of the current term.
    turn: Mutex<Term>,
}

/// The producer of a writer's term: the plain one for good, a transactional one from the
/// election it was initialised after (a new election, or a failed transaction, makes a
/// new one, which fences the old).
struct Term {
    producer: Option<FutureProducer>,
    since: Option<Instant>,
    /// The term a successor fenced: it writes no more (a new election starts a new one).
    fenced: Option<Instant>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("topic", &self.topic)
            .field("audit_topic", &self.audit_topic)
            .field("transactional_id", &self.transactional_id)
            .finish_non_exhaustive()
    }
}

impl Writer {
    /// A writer without transactions (brokers without them, like the test broker).
    pub fn new(
        kafka: &KafkaConfig,
        topic: &str,
        audit_topic: &str,
        follower: Arc<Follower>,
        apply_within: Duration,
    ) -> Result<Self, KafkaError> {
        let producer =
            s2s_common::kafka::without_statistics(&mut kafka.producer_config()).create()?;
        Ok(Self::with(
            kafka,
            None,
            topic,
            audit_topic,
            follower,
            apply_within,
            Some(producer),
        ))
    }

    /// A writer that fences its predecessors: every writer of the catalog must use the
    /// same `transactional_id` (see the module's documentation).
    pub fn transactional(
        kafka: &KafkaConfig,
        transactional_id: &str,
        topic: &str,
        audit_topic: &str,
        follower: Arc<Follower>,
        apply_within: Duration,
    ) -> Self {
        Self::with(
            kafka,
            Some(transactional_id.to_string()),
            topic,
            audit_topic,
            follower,
            apply_within,
            None,
        )
    }

    fn with(
        kafka: &KafkaConfig,
        transactional_id: Option<String>,
        topic: &str,
        audit_topic: &str,
        follower: Arc<Follower>,
        apply_within: Duration,
        producer: Option<FutureProducer>,
    ) -> Self {
        Writer {
            kafka: kafka.clone(),
            transactional_id,
            topic: topic.to_string(),
            audit_topic: audit_topic.to_string(),
            follower,
            apply_within,
            turn: Mutex::new(Term {
                producer,
                since: None,
                fenced: None,
            }),
        }
    }

    /// The producer of the term that began at `since`: for a transactional writer, a new
    /// one initialised (fencing every earlier one) when the term is new.
    async fn producer(
        &self,
        term: &mut Term,
        since: Instant,
    ) -> Result<FutureProducer, WriteError> {
        let Some(id) = &self.transactional_id else {
            return term
                .producer
                .clone()
                .ok_or_else(|| WriteError::Transaction(KafkaError::Canceled));
        };
        if term.fenced == Some(since) {
            return Err(WriteError::Fenced);
        }
        if let (Some(p), Some(s)) = (&term.producer, term.since) {
            if s == since {
                return Ok(p.clone());
            }
        }
        term.producer = None;
        let mut config = self.kafka.producer_config();
        s2s_common::kafka::without_statistics(&mut config).set("transactional.id", id);
        let producer: FutureProducer = config.create().map_err(WriteError::Transaction)?;
        blocking(&producer, |p| p.init_transactions(TXN_TIMEOUT))
            .await
            .map_err(WriteError::Transaction)?;
        term.producer = Some(producer.clone());
        term.since = Some(since);
        Ok(producer)
    }

    /// Checks `change` against the catalog as read to its end after `since` (a writer's
    /// election: everything its predecessor appended), appends it and its audit record,
    /// and waits until the follower has applied it.
    pub async fn write(&self, change: Change, since: Instant) -> Result<Written, WriteError> {
        let mut term = self.turn.lock().await;
        // Fence first (a new term), then read to the end: whatever a predecessor
        // committed is in the catalog the change is checked against.
        let producer = self.producer(&mut term, since).await?;
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
        let audit = |revision| AuditRecord {
            key: key.clone(),
            revision,
            previous,
            document: change.document.clone(),
            changed_by: change.changed_by.clone(),
            changed_at_ms: change.changed_at_ms,
            reason: change.reason.clone(),
        };
        let appended = self
            .in_transaction(&mut term, &producer, async {
                let revision = append(&producer, &self.topic, &key, value.as_deref())
                    .await
                    .map_err(|error| WriteError::Append {
                        topic: self.topic.clone(),
                        error,
                    })?;
                let record = serde_json::to_vec(&audit(revision))?;
                let audit_offset = append(&producer, &self.audit_topic, &key, Some(&record))
                    .await
                    .map_err(|error| WriteError::Audit {
                        revision,
                        topic: self.audit_topic.clone(),
                        error,
                    })?;
                Ok((revision, audit_offset))
            })
            .await?;
        let (revision, audit_offset) = appended;
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

    /// Runs `appends` in one transaction for a transactional writer (committed, or aborted
    /// and the term's producer dropped), as they are otherwise.
    async fn in_transaction<T>(
        &self,
        term: &mut Term,
        producer: &FutureProducer,
        appends: impl std::future::Future<Output = Result<T, WriteError>>,
    ) -> Result<T, WriteError> {
        if self.transactional_id.is_none() {
            return appends.await;
        }
        let result = async {
            producer
                .begin_transaction()
                .map_err(WriteError::Transaction)?;
            let out = appends.await?;
            blocking(producer, |p| p.commit_transaction(TXN_TIMEOUT))
                .await
                .map_err(WriteError::Transaction)?;
            Ok(out)
        }
        .await;
        let Err(e) = result else {
            return result;
        };
        if let Err(error) = blocking(producer, |p| p.abort_transaction(TXN_TIMEOUT)).await {
            tracing::warn!(%error, "aborting the catalog's transaction failed");
        }
        // A failed producer is not used again. Fenced: this term is over — starting a
        // new producer would fence the writer elected since. Otherwise (a timeout, say)
        // the next change starts a new one.
        let fenced = is_fenced(&e);
        if fenced {
            term.fenced = term.since;
        }
        term.producer = None;
        term.since = None;
        Err(if fenced { WriteError::Fenced } else { e })
    }

    /// Says where this writer answers (after its election), so that the other instances
    /// can forward changes to it; returns once the follower applied it.
    pub async fn announce(&self, url: &str, since: Instant) -> Result<i64, WriteError> {
        let mut term = self.turn.lock().await;
        let producer = self.producer(&mut term, since).await?;
        let value = serde_json::to_vec(&crate::catalog::Announcement {
            url: url.to_string(),
            at_ms: s2s_common::now_ms(),
        })?;
        let offset = self
            .in_transaction(&mut term, &producer, async {
                append(
                    &producer,
                    &self.topic,
                    crate::catalog::WRITER_KEY,
                    Some(&value),
                )
                .await
                .map_err(|error| WriteError::Append {
                    topic: self.topic.clone(),
                    error,
                })
            })
            .await?;
        self.follower
            .reached(offset + 1, self.apply_within)
            .await
            .map_err(|error| WriteError::NotApplied {
                revision: offset,
                error,
            })?;
        Ok(offset)
    }
}

/// Appends one record and returns its offset once the broker acknowledged it.
async fn append(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    value: Option<&[u8]>,
) -> Result<i64, KafkaError> {
    let mut record = FutureRecord::<str, [u8]>::to(topic).key(key);
    if let Some(v) = value {
        record = record.payload(v);
    }
    match producer.send(record, Timeout::Never).await {
        Ok(delivery) => Ok(delivery.offset),
        Err((error, _)) => Err(error),
    }
}

/// Whether `e` says that another producer with this transactional ID took over.
fn is_fenced(e: &WriteError) -> bool {
    use rdkafka::error::RDKafkaErrorCode as Code;
    let kafka = match e {
        WriteError::Transaction(k)
        | WriteError::Append { error: k, .. }
        | WriteError::Audit { error: k, .. } => k,
        _ => return false,
    };
    // librdkafka makes a fenced transactional producer fatal: later calls on it fail with
    // `Fatal` rather than the fencing code itself.
    matches!(
        kafka.rdkafka_error_code(),
        Some(Code::Fenced | Code::ProducerFenced | Code::InvalidProducerEpoch | Code::Fatal)
    )
}

/// A blocking producer call (the transactional API waits on the broker) off the async
/// threads.
async fn blocking(
    producer: &FutureProducer,
    call: impl FnOnce(&FutureProducer) -> rdkafka::error::KafkaResult<()> + Send + 'static,
) -> Result<(), KafkaError> {
    let producer = producer.clone();
    tokio::task::spawn_blocking(move || call(&producer))
        .await
        .map_err(|_| KafkaError::Canceled)?
}
