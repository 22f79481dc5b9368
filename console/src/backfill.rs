//! Backfills: a postback created after the fact is sent the conversions it would have
//! been sent since a given time.
//!
//! The conversions topic is read from that time (`offsets_for_times` per partition; the
//! beginning where the broker cannot answer it) to its end as it is when the read reaches
//! it; each conversion attributed in the range that the postback wants (its filter, as
//! delivery applies it) becomes one `backfill` command on the delivery-commands topic,
//! keyed by click ID. The delivery instance that owns the click schedules it as it would
//! a new conversion — unless a delivery of that conversion to that postback exists in any
//! state, so a backfill run twice, or overlapping the live flow, sends nothing twice.
//!
//! A backfill runs on the console instance that accepted it (the catalog's writer: the
//! API forwards there) and its progress is kept there, in memory: after that instance
//! stops, run it again — what was scheduled is not scheduled twice.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use s2s_common::contract::{self, CommandAction, Conversion, DeliveryCommand};
use s2s_common::kafka::{produce_all, KafkaConfig, OutRecord};
use s2s_common::kafka_stats::KafkaStats;
use s2s_common::topics::partition_key;
use s2s_delivery::endpoint::Filter;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Commands sent per broker round trip.
const BATCH: usize = 1_000;
/// Finished backfills kept for their progress to be read (per instance).
const KEEP_FINISHED: usize = 100;
/// How long the broker may take to answer a metadata or offsets request.
const ASK_WITHIN: Duration = Duration::from_secs(30);

/// What a backfill is asked to do.
#[derive(Debug, Clone)]
pub struct Request {
    pub postback: String,
    /// The postback's catalog revision the backfill was asked against.
    pub postback_revision: i64,
    pub filter: Filter,
    /// Conversions attributed at or after (ms since the epoch) …
    pub since_ms: i64,
    /// … and before.
    pub until_ms: Option<i64>,
    pub requested_by: String,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Running,
    Done,
    Failed,
    /// The console stopped before the end: run it again.
    Stopped,
}

/// A backfill and how far it has come, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub id: String,
    pub postback: String,
    pub postback_revision: i64,
    pub since_ms: i64,
    pub until_ms: Option<i64>,
    pub requested_by: String,
    pub requested_at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub state: State,
    /// Conversion records read.
    pub read: u64,
    /// Undecodable records skipped.
    pub undecodable: u64,
    /// Conversions in the range the postback wants.
    pub matched: u64,
    /// Commands the broker acknowledged (delivery then schedules each once).
    pub sent: u64,
    pub partitions: usize,
    pub partitions_done: usize,
    /// Where the read started: from each partition's offset for `since_ms`, or from the
    /// beginning where the broker did not answer that.
    pub started_from: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The backfills of this instance.
pub struct Backfills {
    kafka: KafkaConfig,
    conversions_topic: String,
    commands_topic: String,
    producer: FutureProducer<KafkaStats>,
    all: Mutex<VecDeque<Arc<Mutex<Status>>>>,
    stop: CancellationToken,
    metrics: crate::metrics::Metrics,
}

impl std::fmt::Debug for Backfills {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backfills")
            .field("conversions_topic", &self.conversions_topic)
            .finish_non_exhaustive()
    }
}

impl Backfills {
    pub fn new(
        kafka: KafkaConfig,
        conversions_topic: String,
        commands_topic: String,
        producer: FutureProducer<KafkaStats>,
        metrics: crate::metrics::Metrics,
    ) -> Self {
        Backfills {
            kafka,
            conversions_topic,
            commands_topic,
            producer,
            all: Mutex::new(VecDeque::new()),
            stop: CancellationToken::new(),
            metrics,
        }
    }

    /// Starts a backfill in the background; its status from the start.
    pub fn start(self: &Arc<Self>, req: Request, now_ms: i64) -> Status {
        let status = Status {
            id: s2s_common::ids::new_ulid(),
            postback: req.postback.clone(),
            postback_revision: req.postback_revision,
            since_ms: req.since_ms,
            until_ms: req.until_ms,
            requested_by: req.requested_by.clone(),
            requested_at_ms: now_ms,
            reason: req.reason.clone(),
            state: State::Running,
            read: 0,
            undecodable: 0,
            matched: 0,
            sent: 0,
            partitions: 0,
            partitions_done: 0,
            started_from: "offsets_for_times",
            finished_at_ms: None,
            error: None,
        };
        let shared = Arc::new(Mutex::new(status.clone()));
        {
            let mut all = lock(&self.all);
            all.push_back(Arc::clone(&shared));
            // Bounded: the oldest finished ones go first.
            while all.len() > KEEP_FINISHED {
                match all.iter().position(|s| lock(s).state != State::Running) {
                    Some(i) => drop(all.remove(i)),
                    None => break,
                }
            }
        }
        tracing::info!(backfill = %status.id, postback = %req.postback, since_ms = req.since_ms,
            by = %req.requested_by, "backfill started");
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let result = this.run(&req, &shared).await;
            let mut st = lock(&shared);
            st.finished_at_ms = Some(s2s_common::now_ms());
            st.state = match result {
                Ok(()) if this.stop.is_cancelled() => State::Stopped,
                Ok(()) => State::Done,
                Err(e) => {
                    st.error = Some(e);
                    State::Failed
                }
            };
            // One backfill, one outcome: a line and a count (delivery counts what each
            // command did: `delivery_commands_total{action="backfill"}`).
            let state = match st.state {
                State::Done => "done",
                State::Failed => "failed",
                State::Stopped | State::Running => "stopped",
            };
            this.metrics.backfills.with_label_values(&[state]).inc();
            tracing::info!(backfill = %st.id, postback = %st.postback, state = ?st.state,
                read = st.read, matched = st.matched, sent = st.sent, error = ?st.error,
                "backfill finished");
        });
        status
    }

    /// The backfills of `postback` this instance knows, oldest first.
    pub fn of(&self, postback: &str) -> Vec<Status> {
        lock(&self.all)
            .iter()
            .map(|s| lock(s).clone())
            .filter(|s| s.postback == postback)
            .collect()
    }

    /// Ends the running backfills (at shutdown).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    async fn run(&self, req: &Request, status: &Arc<Mutex<Status>>) -> Result<(), String> {
        let (tx, mut rx) = mpsc::channel::<Vec<Conversion>>(2);
        let reader = {
            let (kafka, topic) = (self.kafka.clone(), self.conversions_topic.clone());
            let (req, status, stop) = (req.clone(), Arc::clone(status), self.stop.clone());
            tokio::task::spawn_blocking(move || read(&kafka, &topic, &req, &status, &stop, &tx))
        };
        while let Some(batch) = rx.recv().await {
            let now = s2s_common::now_ms();
            let commands: Vec<DeliveryCommand> = batch
                .into_iter()
                .map(|conversion| {
                    DeliveryCommand::new(
                        CommandAction::Backfill,
                        req.postback.clone(),
                        conversion,
                        req.requested_by.clone(),
                        now,
                        req.reason.clone(),
                    )
                })
                .collect();
            let records: Vec<OutRecord<'_>> = commands
                .iter()
                .map(|c| {
                    OutRecord::record(
                        &self.commands_topic,
                        partition_key(&c.conversion.click_id),
                        c,
                    )
                })
                .collect();
            produce_all(&self.producer, &records).await.map_err(|e| {
                format!("the broker did not acknowledge the commands: {e}; run it again")
            })?;
            lock(status).sent += commands.len() as u64;
            self.metrics.backfill_commands.inc_by(commands.len() as u64);
        }
        reader.await.map_err(|e| format!("the reader ended: {e}"))?
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads the conversions topic from `req.since_ms` to its end, sending what the postback
/// wants in batches (blocking: a thread of its own).
fn read(
    kafka: &KafkaConfig,
    topic: &str,
    req: &Request,
    status: &Mutex<Status>,
    stop: &CancellationToken,
    out: &mpsc::Sender<Vec<Conversion>>,
) -> Result<(), String> {
    let mut config =
        kafka.consumer_config(&format!("s2s-backfill-{}", s2s_common::ids::new_ulid()));
    s2s_common::kafka::without_statistics(&mut config).set("enable.partition.eof", "true");
    let consumer: BaseConsumer = config.create().map_err(|e| e.to_string())?;
    let partitions =
        s2s_common::kafka::partitions(&consumer, topic, ASK_WITHIN).map_err(|e| e.to_string())?;
    if partitions.is_empty() {
        return Err(format!("the conversions topic '{topic}' does not exist"));
    }
    let (start, from) = starts(&consumer, topic, &partitions, req.since_ms);
    {
        let mut st = lock(status);
        st.partitions = partitions.len();
        st.started_from = from;
    }
    let mut tpl = TopicPartitionList::new();
    let mut done = 0;
    for (p, offset) in start {
        match offset {
            // No record at or after `since_ms` in this partition.
            Offset::End => done += 1,
            o => tpl
                .add_partition_offset(topic, p, o)
                .map_err(|e| e.to_string())?,
        }
    }
    lock(status).partitions_done = done;
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    let mut batch = Vec::with_capacity(BATCH);
    let wanted = |c: &Conversion| {
        c.attributed_at_ms >= req.since_ms
            && req.until_ms.is_none_or(|u| c.attributed_at_ms < u)
            && req.filter.wants(c)
    };
    while done < partitions.len() && !stop.is_cancelled() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let decoded = contract::decode::<Conversion>(m.payload().unwrap_or_default());
                let mut st = lock(status);
                st.read += 1;
                match decoded {
                    Ok(c) if wanted(&c) => {
                        st.matched += 1;
                        batch.push(c);
                    }
                    Ok(_) => {}
                    Err(_) => st.undecodable += 1,
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {
                done += 1;
                lock(status).partitions_done = done;
            }
            Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::PartitionEOF))) => {}
            Some(Err(e)) => return Err(format!("reading '{topic}': {e}")),
            None => {}
        }
        if batch.len() >= BATCH || (!batch.is_empty() && done == partitions.len()) {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
            if out.blocking_send(full).is_err() {
                return Err("the sender ended".into());
            }
        }
    }
    Ok(())
}

/// Each partition's first offset at or after `since_ms`; the beginning of every
/// partition if the broker cannot say (the read then skips what is older).
fn starts(
    consumer: &BaseConsumer,
    topic: &str,
    partitions: &[i32],
    since_ms: i64,
) -> (Vec<(i32, Offset)>, &'static str) {
    let mut ask = TopicPartitionList::new();
    for p in partitions {
        // A timestamp goes in the offset field of an offsets-for-times request.
        if ask
            .add_partition_offset(topic, *p, Offset::Offset(since_ms))
            .is_err()
        {
            return beginning(partitions);
        }
    }
    match consumer.offsets_for_times(ask, ASK_WITHIN) {
        Ok(answer) => {
            let mut out = Vec::with_capacity(partitions.len());
            for e in answer.elements() {
                match (e.error(), e.offset()) {
                    (Ok(()), o @ (Offset::Offset(_) | Offset::End)) => out.push((e.partition(), o)),
                    _ => return beginning(partitions),
                }
            }
            if out.len() == partitions.len() {
                (out, "offsets_for_times")
            } else {
                beginning(partitions)
            }
        }
        Err(error) => {
            tracing::warn!(topic, %error, "the broker did not answer offsets for times: reading from the beginning");
            beginning(partitions)
        }
    }
}

fn beginning(partitions: &[i32]) -> (Vec<(i32, Offset)>, &'static str) {
    (
        partitions.iter().map(|p| (*p, Offset::Beginning)).collect(),
        "beginning",
    )
}
