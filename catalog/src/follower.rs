//! Materializes the catalog topic: from its start to its end before [`Follower::start`]
//! returns (every service reads the whole catalog before it reports ready or processes
//! input), then live. The end is where the fetch says it is (partition EOF, which
//! librdkafka derives from the fetch's high watermark): the test broker's ListOffsets
//! answer for the end is wrong, so nothing here asks it.
//!
//! The reader is a plain consumer assigned the topic's one partition from its start, on
//! a thread of its own; it publishes a new [`Catalog`] each time it reaches the end with
//! something applied, so readers see whole batches of changes, never half of one.

use std::sync::atomic::{AtomicBool, Ordering};
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

/// What a [`Follower`] builds from a topic, record by record, in offset order.
pub trait Materialized: Clone + Default + Send + Sync + 'static {
    /// Applies the record at `offset` of `topic` (`value` `None`: a tombstone).
    fn apply_record(&mut self, topic: &str, offset: i64, key: Option<&[u8]>, value: Option<&[u8]>);
    /// The offset after the last record applied.
    fn next_offset(&self) -> i64;
}

/// How long a service may take to read the catalog to its end at start-up.
pub const READY_WITHIN: Duration = Duration::from_secs(60);

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

/// A topic's one partition as read so far (the catalog, by default), kept up to date by a
/// reader thread (stopped when the follower is dropped or `shutdown` is cancelled).
#[derive(Debug)]
pub struct Follower<S = Catalog> {
    rx: watch::Receiver<Arc<S>>,
    /// When the reader last reached the end of the topic.
    ends: watch::Receiver<Instant>,
    /// Asks the reader for a fresh end (see [`Follower::caught_up_since`]).
    sync: Arc<AtomicBool>,
    _stop: DropGuard,
}

impl<S: Materialized> Follower<S> {
    /// Reads `topic` to its end and returns; follows it from then on.
    pub async fn start(
        kafka: &KafkaConfig,
        topic: &str,
        ready_within: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Self, FollowerError> {
        let mut config = kafka.consumer_config(&format!("{topic}.reader"));
        s2s_common::kafka::without_statistics(&mut config)
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
        let (tx, rx) = watch::channel(Arc::new(S::default()));
        let (ends_tx, ends) = watch::channel(Instant::now());
        let (ready_tx, ready_rx) = oneshot::channel();
        let sync = Arc::new(AtomicBool::new(false));
        let stop = shutdown.child_token();
        let reader = Reader {
            consumer,
            topic: topic.to_string(),
            tx,
            ends: ends_tx,
            sync: Arc::clone(&sync),
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
                sync,
                _stop: guard,
            }),
            Ok(Err(_)) => Err(FollowerError::Stopped),
            Err(_) => Err(FollowerError::NotReady {
                topic: topic.to_string(),
                waited: ready_within,
            }),
        }
    }

    /// A follower that holds `state` and reads nothing (for tests and tools without a
    /// broker).
    pub fn fixed(state: S) -> Self {
        let (_, rx) = watch::channel(Arc::new(state));
        let (_, ends) = watch::channel(Instant::now());
        Follower {
            rx,
            ends,
            sync: Arc::new(AtomicBool::new(false)),
            _stop: CancellationToken::new().drop_guard(),
        }
    }

    /// What was read as of the last end reached.
    pub fn catalog(&self) -> Arc<S> {
        Arc::clone(&self.rx.borrow())
    }

    /// Each new catalog, as the reader publishes it (it reads while the follower lives).
    pub fn changes(&self) -> watch::Receiver<Arc<S>> {
        self.rx.clone()
    }

    /// The catalog once the reader has reached the topic's end after `since`: it then
    /// holds every change appended before `since` (a writer just elected waits for this,
    /// so that it checks changes against everything its predecessor appended). An idle
    /// reader reports the end once, so it is asked to fetch again from where it is: the
    /// end of that fetch is one the broker answered after the question.
    pub async fn caught_up_since(
        &self,
        since: Instant,
        within: Duration,
    ) -> Result<Arc<S>, FollowerError> {
        let mut ends = self.ends.clone();
        if *ends.borrow() <= since {
            self.sync.store(true, Ordering::Release);
        }
        let offset = self.catalog().next_offset();
        wait_until(&mut ends, within, |end| *end > since, offset).await?;
        Ok(self.catalog())
    }

    /// The catalog once it has applied everything before `next_offset`.
    pub async fn reached(
        &self,
        next_offset: i64,
        within: Duration,
    ) -> Result<Arc<S>, FollowerError> {
        let mut rx = self.rx.clone();
        wait_until(
            &mut rx,
            within,
            |c| c.next_offset() >= next_offset,
            next_offset,
        )
        .await?;
        Ok(self.catalog())
    }
}

/// Waits until `rx` holds a value `ok` accepts; `Behind { offset }` after `within`.
async fn wait_until<T>(
    rx: &mut watch::Receiver<T>,
    within: Duration,
    ok: impl FnMut(&T) -> bool,
    offset: i64,
) -> Result<(), FollowerError> {
    match tokio::time::timeout(within, async { rx.wait_for(ok).await.map(|_| ()) }).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(FollowerError::Stopped),
        Err(_) => Err(FollowerError::Behind {
            offset,
            waited: within,
        }),
    }
}

struct Reader<S> {
    consumer: BaseConsumer<Quiet>,
    topic: String,
    tx: watch::Sender<Arc<S>>,
    ends: watch::Sender<Instant>,
    sync: Arc<AtomicBool>,
    ready: Option<oneshot::Sender<()>>,
    stop: CancellationToken,
}

impl<S: Materialized> Reader<S> {
    fn run(mut self) {
        let mut working = S::default();
        let mut changed = false;
        while !self.stop.is_cancelled() {
            if self.sync.swap(false, Ordering::AcqRel) {
                // A new fetch from the same position: librdkafka drops what the old one
                // still brings, and reports the end again when the new one reaches it.
                let at = Offset::Offset(working.next_offset());
                if let Err(e) = self.consumer.seek(&self.topic, 0, at, POLL) {
                    tracing::warn!(topic = %self.topic, error = %e, "cannot fetch the end again");
                    self.sync.store(true, Ordering::Release);
                }
            }
            match self.consumer.poll(POLL) {
                Some(Ok(m)) => {
                    working.apply_record(&self.topic, m.offset(), m.key(), m.payload());
                    changed = true;
                }
                Some(Err(KafkaError::PartitionEOF(_))) => {
                    if changed || self.ready.is_some() {
                        self.tx.send_replace(Arc::new(working.clone()));
                        changed = false;
                    }
                    self.ends.send_replace(Instant::now());
                    if let Some(ready) = self.ready.take() {
                        tracing::info!(topic = %self.topic,
                            next_offset = working.next_offset(), "read to its end");
                        let _ = ready.send(());
                    }
                }
                // librdkafka retries and reconnects by itself; its context logs.
                Some(Err(_)) | None => {}
            }
        }
    }
}

impl Materialized for Catalog {
    /// A record that is not an entity's (a key or value no writer of ours produces) is
    /// logged and passed over.
    fn apply_record(&mut self, topic: &str, offset: i64, key: Option<&[u8]>, value: Option<&[u8]>) {
        if key == Some(crate::catalog::WRITER_KEY.as_bytes()) {
            match value.map(serde_json::from_slice::<crate::catalog::Announcement>) {
                Some(Ok(a)) => self.announce(offset, a),
                _ => self.skip(offset),
            }
            return;
        }
        let key = key
            .and_then(|k| std::str::from_utf8(k).ok())
            .map(str::parse::<Key>);
        let value = value.map(serde_json::from_slice::<Stored>).transpose();
        match (key, value) {
            (Some(Ok(key)), Ok(value)) => self.apply(key, offset, value),
            (key, value) => {
                tracing::error!(topic, offset,
                    key_error = ?key.map(|k| k.err()), value_error = ?value.err().map(|e| e.to_string()),
                    "a catalog record that is not an entity's; passed over");
                self.skip(offset);
            }
        }
    }

    fn next_offset(&self) -> i64 {
        Catalog::next_offset(self)
    }
}

/// The reader's context: reaching the end is how it knows where the end is, not an error.
struct Quiet;

impl ClientContext for Quiet {
    fn error(&self, error: KafkaError, reason: &str) {
        // As a partition's error or as a global one, depending on where librdkafka saw it.
        let eof = matches!(error, KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(rdkafka::error::RDKafkaErrorCode::PartitionEOF);
        if !eof {
            tracing::warn!(%error, reason, "catalog reader error");
        }
    }
}

impl ConsumerContext for Quiet {}
