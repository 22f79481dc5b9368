//! Materializes the catalog topic: from its start to its end before [`Follower::start`]
//! returns (every service reads the whole catalog before it reports ready or processes
//! input), then live. The end is where the fetch says it is (partition EOF, which
//! librdkafka derives from the fetch's high watermark): the test broker's ListOffsets
//! answer for the end is wrong, so nothing here asks it.
//!
//! The reader is a plain consumer assigned the topic's one partition from its start, on
//! a thread of its own; it publishes a new [`Catalog`] each time it reaches the end with
//! something applied, so readers see whole batches of changes, never half of one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use s2s_common::kafka::KafkaConfig;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::catalog::Catalog;
use crate::record::{Key, Stored};

/// How long one poll of the reader waits: its reaction time to a shutdown.
const POLL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum FollowerError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error(
        "the catalog topic {topic} was not read to its end within {waited:?}: is the broker \
         reachable, and does the topic exist?"
    )]
    NotReady { topic: String, waited: Duration },
    #[error("starting the catalog reader thread: {0}")]
    Thread(std::io::Error),
    #[error("the catalog reader stopped")]
    Stopped,
    #[error("the catalog did not reach offset {offset} within {waited:?}")]
    Behind { offset: i64, waited: Duration },
}

/// The catalog as read so far, kept up to date by a reader thread (stopped when the
/// follower is dropped or `shutdown` is cancelled).
#[derive(Debug)]
pub struct Follower {
    rx: watch::Receiver<Arc<Catalog>>,
    /// When the reader last reached the end of the topic.
    ends: watch::Receiver<Instant>,
    _stop: DropGuard,
}

impl Follower {
    /// Reads `topic` to its end and returns; follows it from then on.
    pub async fn start(
        kafka: &KafkaConfig,
        topic: &str,
        ready_within: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Self, FollowerError> {
        let mut config = kafka.consumer_config(&format!("{topic}.reader"));
        config
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            // A change must reach every service within a second: a broker that holds an
            // idle fetch for its whole wait (Tansu does, even when a record arrives) would
            // otherwise add up to 500 ms per reader. One small fetch per 100 ms is cheap.
            .set("fetch.wait.max.ms", "100");
        let consumer: BaseConsumer<Quiet> = config.create_with_context(Quiet)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
        consumer.assign(&tpl)?;
        let (tx, rx) = watch::channel(Arc::new(Catalog::default()));
        let (ends_tx, ends) = watch::channel(Instant::now());
        let (ready_tx, ready_rx) = oneshot::channel();
        let stop = shutdown.child_token();
        let reader = Reader {
            consumer,
            topic: topic.to_string(),
            tx,
            ends: ends_tx,
            ready: Some(ready_tx),
            stop: stop.clone(),
        };
        std::thread::Builder::new()
            .name("catalog-reader".into())
            .spawn(move || reader.run())
            .map_err(FollowerError::Thread)?;
        let guard = stop.drop_guard();
        match tokio::time::timeout(ready_within, ready_rx).await {
            Ok(Ok(())) => Ok(Follower {
                rx,
                ends,
                _stop: guard,
            }),
            Ok(Err(_)) => Err(FollowerError::Stopped),
            Err(_) => Err(FollowerError::NotReady {
                topic: topic.to_string(),
                waited: ready_within,
            }),
        }
    }

    /// The catalog as of the last end reached.
    pub fn catalog(&self) -> Arc<Catalog> {
        Arc::clone(&self.rx.borrow())
    }

    /// Every new catalog, as it is published.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Catalog>> {
        self.rx.clone()
    }

    /// The catalog once the reader has reached the topic's end after `since`: it then
    /// holds every change appended before `since` (a writer just elected waits for this,
    /// so that it checks changes against everything its predecessor appended).
    pub async fn caught_up_since(
        &self,
        since: Instant,
        within: Duration,
    ) -> Result<Arc<Catalog>, FollowerError> {
        let mut ends = self.ends.clone();
        let ended = tokio::time::timeout(within, async {
            ends.wait_for(|end| *end > since).await.map(|_| ())
        })
        .await;
        match ended {
            Ok(Ok(())) => Ok(self.catalog()),
            Ok(Err(_)) => Err(FollowerError::Stopped),
            Err(_) => Err(FollowerError::Behind {
                offset: self.catalog().next_offset(),
                waited: within,
            }),
        }
    }

    /// The catalog once it has applied everything before `next_offset`.
    pub async fn reached(
        &self,
        next_offset: i64,
        within: Duration,
    ) -> Result<Arc<Catalog>, FollowerError> {
        let mut rx = self.rx.clone();
        let reached = tokio::time::timeout(within, async {
            rx.wait_for(|c| c.next_offset() >= next_offset)
                .await
                .map(|c| Arc::clone(&c))
        })
        .await;
        match reached {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(_)) => Err(FollowerError::Stopped),
            Err(_) => Err(FollowerError::Behind {
                offset: next_offset,
                waited: within,
            }),
        }
    }
}

struct Reader {
    consumer: BaseConsumer<Quiet>,
    topic: String,
    tx: watch::Sender<Arc<Catalog>>,
    ends: watch::Sender<Instant>,
    ready: Option<oneshot::Sender<()>>,
    stop: CancellationToken,
}

impl Reader {
    fn run(mut self) {
        let mut working = Catalog::default();
        let mut changed = false;
        while !self.stop.is_cancelled() {
            match self.consumer.poll(POLL) {
                Some(Ok(m)) => {
                    apply(&mut working, &self.topic, &m);
                    changed = true;
                }
                Some(Err(KafkaError::PartitionEOF(_))) => {
                    if changed || self.ready.is_some() {
                        self.tx.send_replace(Arc::new(working.clone()));
                        changed = false;
                    }
                    self.ends.send_replace(Instant::now());
                    if let Some(ready) = self.ready.take() {
                        tracing::info!(topic = %self.topic, entities = working.len(),
                            next_offset = working.next_offset(), "catalog read to its end");
                        let _ = ready.send(());
                    }
                }
                // librdkafka retries and reconnects by itself; its context logs.
                Some(Err(_)) | None => {}
            }
        }
    }
}

/// Applies one record of the catalog topic; one that is not an entity's (a key or value
/// no writer of ours produces) is logged and passed over.
fn apply<M: Message>(catalog: &mut Catalog, topic: &str, m: &M) {
    let key = m
        .key()
        .and_then(|k| std::str::from_utf8(k).ok())
        .map(str::parse::<Key>);
    let value = m
        .payload()
        .map(serde_json::from_slice::<Stored>)
        .transpose();
    match (key, value) {
        (Some(Ok(key)), Ok(value)) => catalog.apply(key, m.offset(), value),
        (key, value) => {
            tracing::error!(topic, offset = m.offset(),
                key_error = ?key.map(|k| k.err()), value_error = ?value.err().map(|e| e.to_string()),
                "a catalog record that is not an entity's; passed over");
            catalog.skip(m.offset());
        }
    }
}

/// The reader's context: reaching the end is how it knows where the end is, not an error.
struct Quiet;

impl ClientContext for Quiet {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(error, KafkaError::PartitionEOF(_)) {
            tracing::warn!(%error, reason, "catalog reader error");
        }
    }
}

impl ConsumerContext for Quiet {}
