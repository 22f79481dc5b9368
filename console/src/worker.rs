//! The read model's consumer loop: takes in records from every topic it reads for up to
//! `commit_interval_ms` (or `max_batch` records), applies them per partition to a staged
//! overlay of the partition's store ([`crate::model`]), and writes the state with the
//! input offsets in one atomic batch — so the read model is exactly as of its last commit
//! after a crash, each record applied once. New events go to the live feed after the
//! commit. Undecodable records are counted, logged with their offset, and skipped (the
//! services that produce them set theirs aside on the poison topic).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use s2s_common::contract;
use s2s_state::Positions;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::model::{apply, Input, LiveEvent};
use crate::schema::Store;
use crate::{Console, ConsoleError};

const GAUGES: Duration = Duration::from_secs(1);

struct Part {
    store: Arc<Store>,
    next: Positions,
    buffer: Vec<OwnedMessage>,
}

pub(crate) async fn run(c: &Console, shutdown: &CancellationToken) -> Result<(), ConsoleError> {
    let interval = Duration::from_millis(c.config.commit_interval_ms);
    let mut parts: BTreeMap<i32, Part> = BTreeMap::new();
    let mut gauges_at = Instant::now();
    loop {
        let (batch, stopping) = gather(c, shutdown, interval).await;
        if let Some(failure) = c.ownership.failure() {
            return Err(ConsoleError::Ownership(failure));
        }
        take_in(c, &mut parts, batch)?;
        let started = Instant::now();
        if cycle(c, &mut parts)? {
            c.metrics
                .cycle_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        if gauges_at.elapsed() >= GAUGES {
            gauges_at = Instant::now();
            let inputs = c.inputs();
            c.metrics.state.refresh(
                parts.iter().map(|(p, part)| (*p, &*part.store, &part.next)),
                &c.ownership,
                &inputs.iter().map(String::as_str).collect::<Vec<_>>(),
            );
        }
        if stopping {
            return Ok(());
        }
    }
}

async fn gather(
    c: &Console,
    shutdown: &CancellationToken,
    interval: Duration,
) -> (Vec<OwnedMessage>, bool) {
    let mut batch = Vec::new();
    let mut deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while batch.len() < c.config.max_batch {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return (batch, true),
            _ = tokio::time::sleep_until(deadline) => break,
            m = c.consumer.recv() => match m {
                Ok(m) => {
                    if batch.is_empty() {
                        deadline = tokio::time::Instant::now() + interval;
                    }
                    batch.push(m.detach());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "consumer error");
                    break;
                }
            },
        }
    }
    (batch, false)
}

fn take_in(
    c: &Console,
    parts: &mut BTreeMap<i32, Part>,
    batch: Vec<OwnedMessage>,
) -> Result<(), ConsoleError> {
    let assigned = c.ownership.assigned();
    parts.retain(|p, _| assigned.iter().any(|(a, _)| a == p));
    let inputs = c.inputs();
    let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    for (p, store) in assigned {
        if let std::collections::btree_map::Entry::Vacant(slot) = parts.entry(p) {
            let next = Positions::load(&store, &inputs)?;
            slot.insert(Part {
                store,
                next,
                buffer: Vec::new(),
            });
        }
    }
    for msg in batch {
        if let Some(part) = parts.get_mut(&msg.partition()) {
            if part.next.admit(msg.topic(), msg.offset()) {
                part.buffer.push(msg);
            }
        }
    }
    Ok(())
}

/// Decodes a record by its topic; `(kind, input)` or the decoding error.
fn decode<'m>(c: &Console, m: &'m OwnedMessage) -> (&'static str, Result<Input<'m>, String>) {
    fn as_input<'m, T: serde::de::DeserializeOwned + contract::Versioned>(
        raw: &'m [u8],
        wrap: fn(&'m [u8], Box<T>) -> Input<'m>,
    ) -> Result<Input<'m>, String> {
        contract::decode(raw)
            .map(|r| wrap(raw, Box::new(r)))
            .map_err(|e| e.to_string())
    }
    let t = &c.config.topics;
    let raw = m.payload().unwrap_or_default();
    let topic = m.topic();
    if topic == t.clicks.name {
        ("click", as_input(raw, Input::Click))
    } else if topic == t.postbacks.name {
        ("postback", as_input(raw, Input::Postback))
    } else if topic == t.conversions.name {
        ("conversion", as_input(raw, Input::Conversion))
    } else if topic == t.rejections.name {
        ("rejection", as_input(raw, Input::Rejection))
    } else if topic == t.delivery_log.name {
        ("attempt", as_input(raw, Input::Attempt))
    } else if topic == t.dead_letter.name {
        ("dead_letter", as_input(raw, Input::DeadLetter))
    } else if topic == t.refusals.name {
        ("refusal", as_input(raw, Input::Refusal))
    } else {
        ("command", as_input(raw, Input::Command))
    }
}

/// Applies and commits what the partitions buffered; `false` if there was nothing.
fn cycle(c: &Console, parts: &mut BTreeMap<i32, Part>) -> Result<bool, ConsoleError> {
    let mut any = false;
    let mut offsets = TopicPartitionList::new();
    let mut live: Vec<LiveEvent> = Vec::new();
    let mut consumed: BTreeMap<&'static str, u64> = BTreeMap::new();
    for (p, part) in parts.iter_mut() {
        if part.buffer.is_empty() {
            continue;
        }
        any = true;
        let records = std::mem::take(&mut part.buffer);
        let mut st = part.store.stage();
        let mut ends: BTreeMap<&str, i64> = BTreeMap::new();
        for m in &records {
            let (kind, input) = decode(c, m);
            match input {
                Ok(input) => {
                    live.extend(apply(&mut st, &input)?);
                    *consumed.entry(kind).or_insert(0) += 1;
                }
                Err(reason) => {
                    tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), %reason, "undecodable record skipped");
                    c.metrics.poison.with_label_values(&[kind]).inc();
                }
            }
            let end = ends.entry(m.topic()).or_insert(0);
            *end = (*end).max(m.offset() + 1);
        }
        for (topic, next) in &ends {
            st.set_offset(topic, *next);
            offsets.add_partition_offset(topic, *p, Offset::Offset(*next))?;
        }
        part.store.commit(st, None)?;
    }
    if offsets.count() > 0 {
        if let Err(e) = c.consumer.commit(&offsets, CommitMode::Async) {
            tracing::warn!(error = %e, "offset commit to the group failed; the stores hold the offsets");
        }
    }
    for (kind, n) in consumed {
        c.metrics.consumed.with_label_values(&[kind]).inc_by(n);
    }
    for e in live {
        // Nobody listening is fine.
        let _ = c.feed.send(e);
    }
    Ok(any)
}

/// The live feed's channel: late subscribers miss what came before, slow ones skip ahead.
pub(crate) fn feed() -> broadcast::Sender<LiveEvent> {
    broadcast::channel(1024).0
}
