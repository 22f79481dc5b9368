//! The runtime's loop: gather, take in, plan, process, publish, commit (see the module
//! documentation of [`super`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::future_producer::Delivery;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{Offset, TopicPartitionList};
use s2s_common::kafka::{produce_all, OutRecord};
use s2s_common::kafka_stats::KafkaStats;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::processor::{Cx, Output, Poison, Processor, View};
use super::{Guarantee, Runtime, RuntimeError, TXN_TIMEOUT};
use crate::input::Positions;
use crate::reach::Outside;
use crate::store::{Family, Staged, Store};

/// How often the gauges are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);

/// The cycle a partition is about to publish, kept in its store until the commit: its
/// input range, its clock and its timer decision. After a crash, the partition's first
/// cycle replays exactly this, so that what it may already have published comes out
/// again identically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub now_ms: i64,
    /// Whether the cycle ran the partition's timers.
    pub timers: bool,
    /// Per input topic: the offset after the last record of the cycle.
    pub ends: BTreeMap<String, i64>,
}

/// What the loop holds for one owned partition between cycles.
struct Part<F: Family> {
    store: Arc<Store<F>>,
    /// Per input topic: the offset after the last record taken in (buffered or processed).
    next: Positions,
    /// Records taken in, not yet processed (held back while a journal is replayed).
    buffer: Vec<OwnedMessage>,
    /// The crashed cycle to replay first, from the store.
    journal: Option<Journal>,
}

/// One partition's share of a cycle.
struct Work<F: Family> {
    partition: i32,
    store: Arc<Store<F>>,
    records: Vec<OwnedMessage>,
    journal: Journal,
}

/// A partition's processed, uncommitted cycle.
struct Done<'w, F: Family> {
    work: &'w Work<F>,
    staged: Staged<'w, F>,
}

enum Gathered<W> {
    Stop,
    Message(OwnedMessage),
    Wake(W),
    Tick,
}

pub(super) struct Loop<'r, F: Family, P: Processor<F>> {
    rt: &'r Runtime<F>,
    processor: P,
    wakes: Option<mpsc::UnboundedReceiver<P::Wake>>,
    parts: BTreeMap<i32, Part<F>>,
    incoming: Vec<OwnedMessage>,
    poison_topic: Option<Arc<str>>,
    gauges_at: Instant,
}

impl<'r, F: Family, P: Processor<F>> Loop<'r, F, P> {
    pub(super) fn new(rt: &'r Runtime<F>, mut processor: P) -> Self {
        let wakes = processor.wake_source();
        Loop {
            rt,
            processor,
            wakes,
            parts: BTreeMap::new(),
            incoming: Vec::new(),
            poison_topic: rt.settings.poison.as_deref().map(Arc::from),
            gauges_at: Instant::now(),
        }
    }

    pub(super) async fn run(&mut self, shutdown: &CancellationToken) -> Result<(), RuntimeError> {
        for input in &self.rt.settings.inputs {
            // Every input's counters start at 0, so that rate() sees the first event.
            self.rt.metrics.consumed.with_label_values(&[input.kind]);
            self.rt.metrics.poison.with_label_values(&[input.kind]);
        }
        loop {
            let stopping = self.gather(shutdown).await?;
            if let Some(failure) = self.rt.ownership.failure() {
                return Err(RuntimeError::Ownership(failure));
            }
            if self.rt.ownership.take_suspect() {
                match self.outside().await {
                    Ok(outside) if outside.is_empty() => {}
                    Ok(outside) => {
                        return Err(RuntimeError::OutOfRange(
                            self.rt.ownership.explain(&outside),
                        ))
                    }
                    Err(e) => tracing::warn!(service = self.rt.settings.service, error = %e,
                        "cannot check the stored input positions against the broker"),
                }
            }
            if stopping {
                self.drain().await?;
            }
            let started = Instant::now();
            self.take_in()?;
            if self.cycle().await? {
                self.rt
                    .metrics
                    .cycle_seconds
                    .observe(started.elapsed().as_secs_f64());
            }
            if stopping {
                return Ok(());
            }
            self.processor.after_cycle()?;
            self.refresh_gauges();
        }
    }

    /// At shutdown: waits up to the processor's grace for its work in flight.
    async fn drain(&mut self) -> Result<(), RuntimeError> {
        let deadline = tokio::time::Instant::now() + self.processor.shutdown_grace();
        while self.processor.in_flight() > 0 {
            let Some(rx) = self.wakes.as_mut() else {
                break;
            };
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(w)) => self.processor.on_wake(w, true)?,
                Ok(None) | Err(_) => break,
            }
        }
        if self.processor.in_flight() > 0 {
            tracing::warn!(
                service = self.rt.settings.service,
                in_flight = self.processor.in_flight(),
                "work still in flight at shutdown; it is done again after a restart"
            );
        }
        Ok(())
    }

    /// Collects input and wake-ups until the batch is full, `commit_interval` after the
    /// first piece of work (but no later than the longer of the idle wait and the commit
    /// interval from the start, so that a busy stream still cycles at that pace), or,
    /// without work, the idle wait; returns whether shutdown was asked for.
    async fn gather(&mut self, shutdown: &CancellationToken) -> Result<bool, RuntimeError> {
        let s = &self.rt.settings;
        let start = tokio::time::Instant::now();
        let idle = self.processor.idle_wait().unwrap_or(s.commit_interval);
        let latest = start + idle.max(s.commit_interval);
        let mut work_since = (self.processor.backlog() > 0).then_some(start);
        loop {
            if self.incoming.len() + self.processor.backlog() >= s.max_batch {
                return Ok(false);
            }
            let deadline = match work_since {
                None => start + idle,
                Some(t) => (t + s.commit_interval).min(latest),
            };
            let got = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Gathered::Stop,
                _ = tokio::time::sleep_until(deadline) => Gathered::Tick,
                Some(w) = recv(&mut self.wakes) => Gathered::Wake(w),
                m = self.rt.consumer.recv() => match m {
                    Ok(m) => Gathered::Message(m.detach()),
                    Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset)) => {
                        return Err(self.out_of_range().await);
                    }
                    Err(e) => {
                        tracing::warn!(service = s.service, error = %e, "consumer error");
                        Gathered::Tick
                    }
                },
            };
            match got {
                Gathered::Stop => return Ok(true),
                Gathered::Tick => return Ok(false),
                Gathered::Message(m) => self.incoming.push(m),
                Gathered::Wake(w) => self.processor.on_wake(w, false)?,
            }
            if work_since.is_none() && (!self.incoming.is_empty() || self.processor.backlog() > 0) {
                work_since = Some(tokio::time::Instant::now());
            }
        }
    }

    /// Brings the partitions in line with the assignment and buffers the new records:
    /// records of partitions not owned are dropped (their new owner reads them), records
    /// at offsets already taken in (a rebalance re-fetches from the stored offsets) are
    /// skipped.
    fn take_in(&mut self) -> Result<(), RuntimeError> {
        let assigned = self.rt.ownership.assigned();
        let revoked: Vec<i32> = self
            .parts
            .keys()
            .copied()
            .filter(|p| !assigned.iter().any(|(a, _)| a == p))
            .collect();
        for p in revoked {
            self.parts.remove(&p);
            self.processor.closed(p);
        }
        for (p, store) in assigned {
            if self.parts.contains_key(&p) {
                continue;
            }
            let topics: Vec<&str> = self.inputs().collect();
            let next = Positions::load(&store, &topics)?;
            let journal = store.journal::<Journal>()?;
            if let Some(j) = &journal {
                tracing::info!(service = self.rt.settings.service, partition = p, ends = ?j.ends,
                    "replaying the cycle that was in flight");
            }
            self.processor.opened(p, &store)?;
            self.parts.insert(
                p,
                Part {
                    store,
                    next,
                    buffer: Vec::new(),
                    journal,
                },
            );
        }
        for msg in std::mem::take(&mut self.incoming) {
            let Some(part) = self.parts.get_mut(&msg.partition()) else {
                continue;
            };
            if part.next.admit(msg.topic(), msg.offset()) {
                part.buffer.push(msg);
            }
        }
        Ok(())
    }

    /// The stored input positions the broker does not have, asked off the async threads.
    async fn outside(&self) -> Result<Vec<Outside>, String> {
        let ownership = Arc::clone(&self.rt.ownership);
        let (kafka, group) = (
            self.rt.settings.kafka.clone(),
            self.rt.settings.group_id.clone(),
        );
        tokio::task::spawn_blocking(move || ownership.outside(&kafka, &group))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// The error that stops the service when the broker answered "out of range" for an
    /// input position: its fetcher for that partition has stopped. A partition whose
    /// store could not be opened or restored is handed to the consumer without a start
    /// offset, which ends here too: that failure is the one to report.
    async fn out_of_range(&self) -> RuntimeError {
        if let Some(failure) = self.rt.ownership.failure() {
            return RuntimeError::Ownership(failure);
        }
        RuntimeError::OutOfRange(match self.outside().await {
            Ok(outside) => self.rt.ownership.explain(&outside),
            Err(e) => format!(
                "the broker answered \"offset out of range\" for an input position stored \
                 in {}, and asking it which one failed: {e}",
                self.rt.settings.state_dir.display()
            ),
        })
    }

    fn inputs(&self) -> impl Iterator<Item = &str> {
        self.rt.settings.inputs.iter().map(|i| i.topic.as_str())
    }

    fn kind(&self, topic: &str) -> &'static str {
        self.rt
            .settings
            .inputs
            .iter()
            .find(|i| i.topic == topic)
            .map_or("unknown", |i| i.kind)
    }

    /// Picks each partition's work for this cycle: the journal's range when one is being
    /// replayed (once all of it is buffered), else everything buffered.
    fn plan(&mut self, now_ms: i64) -> Vec<Work<F>> {
        let ownership = &self.rt.ownership;
        let mut work = Vec::new();
        for (&p, part) in self.parts.iter_mut() {
            let (records, journal) = match part.journal.take() {
                Some(j) => {
                    let complete = j.ends.iter().all(|(t, end)| part.next.next(t) >= *end);
                    if !complete {
                        part.journal = Some(j);
                        continue;
                    }
                    let (take, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut part.buffer)
                        .into_iter()
                        .partition(|m| j.ends.get(m.topic()).is_some_and(|end| m.offset() < *end));
                    part.buffer = keep;
                    (take, j)
                }
                None => {
                    let next = &part.next;
                    let caught_up = |topic: &str| {
                        ownership
                            .high_watermark(topic, p)
                            .is_some_and(|high| next.next(topic) >= high)
                    };
                    let timers = self.processor.timers_ready(
                        p,
                        &View {
                            caught_up: &caught_up,
                        },
                    );
                    let records = std::mem::take(&mut part.buffer);
                    let mut ends = BTreeMap::new();
                    for m in &records {
                        ends.insert(m.topic().to_string(), m.offset() + 1);
                    }
                    (
                        records,
                        Journal {
                            now_ms,
                            timers,
                            ends,
                        },
                    )
                }
            };
            work.push(Work {
                partition: p,
                store: Arc::clone(&part.store),
                records,
                journal,
            });
        }
        work
    }

    /// One cycle over the buffered records and the due timers; `false` when there was
    /// nothing to commit.
    async fn cycle(&mut self) -> Result<bool, RuntimeError> {
        let works = self.plan(s2s_common::now_ms());
        let guarantee = self.rt.settings.guarantee;
        let mut done: Vec<Done<'_, F>> = Vec::new();
        let mut outputs: Vec<Output> = Vec::new();
        let mut events: Vec<P::Event> = Vec::new();
        let mut poison: Vec<Poison> = Vec::new();
        for w in &works {
            let mut staged = w.store.stage();
            let outputs_before = outputs.len();
            let mut cx = Cx {
                partition: w.partition,
                now_ms: w.journal.now_ms,
                state: &mut staged,
                outputs: &mut outputs,
                events: &mut events,
                poison: &mut poison,
            };
            let before = cx.produced();
            self.processor.process(&mut cx, &w.records)?;
            if w.journal.timers {
                self.processor.tick(&mut cx)?;
            }
            let produced = cx.produced() > before;
            if w.records.is_empty() && staged.is_empty() && !produced {
                continue;
            }
            for (topic, next) in &w.journal.ends {
                staged.set_offset(topic, *next);
            }
            let published = outputs.len() > outputs_before
                || poison.iter().any(|p| p.msg.partition() == w.partition);
            if published && guarantee == Guarantee::AtLeastOnce {
                // Outputs will be visible before the commit: record what produced them.
                // (Under exactly_once they stay invisible until the transaction commits, and
                // a committed cycle the store missed comes back from the changelog.)
                w.store.begin(&w.journal)?;
            }
            done.push(Done { work: w, staged });
        }
        if done.is_empty() {
            return Ok(false);
        }
        let topics: Vec<Arc<str>> = outputs.iter().map(|o| Arc::clone(&o.topic)).collect();
        let mut records: Vec<OutRecord<'_>> = outputs
            .into_iter()
            .zip(&topics)
            .map(|(o, topic)| OutRecord {
                topic,
                partition: None,
                key: o.key,
                payload: Some(o.payload),
                headers: o.headers,
            })
            .collect();
        if let Some(topic) = &self.poison_topic {
            records.extend(
                poison
                    .iter()
                    .map(|p| OutRecord::poison(topic, &p.msg, &p.reason)),
            );
        }
        let changes: Vec<OutRecord<'_>> = match &self.rt.settings.changelog {
            None => Vec::new(),
            Some(changelog) => done
                .iter()
                .flat_map(|d| {
                    d.staged.changelog().map(|(key, value)| OutRecord {
                        topic: changelog,
                        partition: Some(d.work.partition),
                        key,
                        payload: value.map(<[u8]>::to_vec),
                        headers: None,
                    })
                })
                .collect(),
        };
        let mut offsets = TopicPartitionList::new();
        for d in &done {
            for (topic, next) in &d.work.journal.ends {
                offsets.add_partition_offset(topic, d.work.partition, Offset::Offset(*next))?;
            }
        }
        let changelog_deliveries = match guarantee {
            Guarantee::AtLeastOnce => {
                // Outputs first, then the changelog: the changelog only ever holds cycles
                // whose outputs are all acknowledged, so a store rebuilt from it never skips
                // an output.
                self.produce(&records).await?;
                self.produce(&changes).await?
            }
            Guarantee::ExactlyOnce => {
                let result = self.transaction(records, changes, &offsets).await;
                let label = if result.is_ok() {
                    "committed"
                } else {
                    "aborted"
                };
                self.rt
                    .metrics
                    .transactions
                    .with_label_values(&[label])
                    .inc();
                result?
            }
        };
        let mut logged: BTreeMap<i32, i64> = BTreeMap::new();
        for d in changelog_deliveries {
            let next = logged.entry(d.partition).or_insert(0);
            *next = (*next).max(d.offset + 1);
        }
        let mut consumed: BTreeMap<&'static str, u64> = BTreeMap::new();
        for d in done {
            let position = match &self.rt.settings.changelog {
                Some(c) => logged.get(&d.work.partition).map(|n| (c.as_str(), *n)),
                None => None,
            };
            d.work.store.commit(d.staged, position)?;
            for m in &d.work.records {
                *consumed.entry(self.kind(m.topic())).or_insert(0) += 1;
            }
        }
        if guarantee == Guarantee::AtLeastOnce && offsets.count() > 0 {
            // Async: the offsets are already durable in the stores.
            if let Err(e) = self.rt.consumer.commit(&offsets, CommitMode::Async) {
                tracing::warn!(service = self.rt.settings.service, error = %e,
                    "offset commit to the group failed; the stores hold the offsets");
            }
        }
        let m = &self.rt.metrics;
        for (kind, n) in consumed {
            m.consumed.with_label_values(&[kind]).inc_by(n);
        }
        for p in poison {
            tracing::warn!(service = self.rt.settings.service, topic = p.msg.topic(),
                partition = p.msg.partition(), offset = p.msg.offset(), reason = %p.reason,
                set_aside = self.poison_topic.is_some(), "undecodable input record");
            m.poison.with_label_values(&[p.kind]).inc();
        }
        self.processor.committed(events);
        Ok(true)
    }

    /// One transaction: outputs, changelog records and input offsets, committed together
    /// or aborted together. Returns the changelog deliveries. On any failure the
    /// transaction is aborted and the error returned (the service stops; on restart the
    /// cycle is read again from the offsets in the store).
    async fn transaction(
        &self,
        mut records: Vec<OutRecord<'_>>,
        changes: Vec<OutRecord<'_>>,
        offsets: &TopicPartitionList,
    ) -> Result<Vec<Delivery>, RuntimeError> {
        let producer = &self.rt.producer;
        blocking(producer, |p| p.begin_transaction()).await?;
        let inner = async {
            // One batch: inside a transaction the order of outputs and changelog records
            // does not matter, both become visible at the commit. Deliveries come back in
            // record order, so the changelog's are the tail.
            let first_change = records.len();
            records.extend(changes);
            let mut deliveries = self.produce(&records).await?;
            let deliveries = deliveries.split_off(first_change.min(deliveries.len()));
            let group =
                self.rt.consumer.group_metadata().ok_or_else(|| {
                    RuntimeError::Transaction("no consumer group metadata".into())
                })?;
            let offsets = offsets.clone();
            blocking(producer, move |p| {
                p.send_offsets_to_transaction(&offsets, &group, TXN_TIMEOUT)
            })
            .await?;
            blocking(producer, |p| p.commit_transaction(TXN_TIMEOUT)).await?;
            Ok(deliveries)
        };
        match inner.await {
            Ok(d) => Ok(d),
            Err(e) => {
                if let Err(abort) = blocking(producer, |p| p.abort_transaction(TXN_TIMEOUT)).await {
                    tracing::error!(service = self.rt.settings.service, error = %abort,
                        "aborting the transaction failed");
                }
                Err(e)
            }
        }
    }

    /// Produces every record and waits for all acknowledgements (see
    /// [`s2s_common::kafka::produce_all`]).
    async fn produce(&self, records: &[OutRecord<'_>]) -> Result<Vec<Delivery>, RuntimeError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        produce_all(&self.rt.producer, records)
            .await
            .map_err(|e| RuntimeError::Publish(e.to_string()))
    }

    /// State size per column family, consumer lag, and the processor's gauges.
    fn refresh_gauges(&mut self) {
        if self.gauges_at.elapsed() < GAUGE_INTERVAL {
            return;
        }
        self.gauges_at = Instant::now();
        let topics: Vec<&str> = self.inputs().collect();
        self.rt.metrics.refresh(
            self.parts
                .iter()
                .map(|(p, part)| (*p, &*part.store, &part.next)),
            &self.rt.ownership,
            &topics,
        );
        self.processor.gauges();
    }
}

/// The next wake-up, or never when there is no source (or it is closed).
async fn recv<W>(rx: &mut Option<mpsc::UnboundedReceiver<W>>) -> Option<W> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Runs a blocking producer call (the transactional API) off the async worker threads.
pub(super) async fn blocking<T: Send + 'static>(
    producer: &FutureProducer<KafkaStats>,
    call: impl FnOnce(&FutureProducer<KafkaStats>) -> rdkafka::error::KafkaResult<T> + Send + 'static,
) -> Result<T, RuntimeError> {
    let producer = producer.clone();
    tokio::task::spawn_blocking(move || call(&producer))
        .await
        .map_err(|e| RuntimeError::Transaction(e.to_string()))?
        .map_err(|e| RuntimeError::Transaction(e.to_string()))
}
