//! Re-delivery of dead letters, once an affiliate has fixed its endpoint: reads the
//! dead-letter topic from its beginning to its end, picks the dead letters that match an
//! endpoint or affiliate and a time range (the latest per delivery), and sends one
//! `redeliver` command per delivery to the delivery-commands topic, keyed by click ID so
//! that it reaches the instance that owns the delivery. That instance re-arms it with a
//! fresh retry schedule and the same `webhook-id`; a delivery that succeeded meanwhile is
//! left alone, so replaying twice never pays twice. The commands topic keeps who asked,
//! when, and why.
//!
//! The CLI (`delivery replay`) prints progress while reading and a summary at the end;
//! `--dry-run` reads and summarises without sending anything.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use s2s_common::contract::{self, CommandAction, DeadLetter, DeliveryCommand};
use s2s_common::kafka::{produce_all, KafkaConfig, OutRecord};
use s2s_common::topics::{partition_key, TopicsConfig};

/// Which dead letters to re-deliver. Empty lists match everything; the CLI insists on at
/// least an endpoint or an affiliate unless `--all` is given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub endpoints: Vec<String>,
    pub aff_ids: Vec<String>,
    /// Dead-lettered at or after (ms since the epoch).
    pub since_ms: Option<i64>,
    /// Dead-lettered before.
    pub until_ms: Option<i64>,
}

impl Filter {
    pub fn matches(&self, dl: &DeadLetter) -> bool {
        (self.endpoints.is_empty() || self.endpoints.contains(&dl.endpoint))
            && (self.aff_ids.is_empty() || self.aff_ids.contains(&dl.conversion.aff_id))
            && self.since_ms.is_none_or(|s| dl.dead_lettered_at_ms >= s)
            && self.until_ms.is_none_or(|u| dl.dead_lettered_at_ms < u)
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub filter: Filter,
    pub dry_run: bool,
    pub requested_by: String,
    pub reason: Option<String>,
}

/// How far the read has come.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub read: u64,
    pub matched: u64,
    pub partitions_done: usize,
    pub partitions: usize,
    pub elapsed: Duration,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Dead-letter records read.
    pub read: u64,
    /// Records that could not be decoded (left alone).
    pub undecodable: u64,
    /// Records that matched the filter.
    pub matched: u64,
    /// Distinct deliveries among them: what is re-delivered.
    pub deliveries: u64,
    /// Commands sent (0 on a dry run).
    pub sent: u64,
    /// Deliveries per endpoint.
    pub by_endpoint: BTreeMap<String, u64>,
    /// The first few delivery IDs, for a look before the real run.
    pub sample: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("the dead-letter topic '{0}' does not exist")]
    NoTopic(String),
    #[error("reading the dead-letter topic failed: {0}")]
    Task(String),
    #[error("sending commands failed after {sent} of {total}: {error}; run again, already re-delivered ones are skipped")]
    Send {
        sent: u64,
        total: u64,
        error: KafkaError,
    },
}

const SAMPLE: usize = 10;
const SEND_BATCH: usize = 1_000;

/// Reads the dead-letter topic to its end and re-delivers what `opts` selects.
pub async fn replay(
    kafka: &KafkaConfig,
    topics: &TopicsConfig,
    opts: &Options,
    mut progress: impl FnMut(&Progress) + Send,
) -> Result<Summary, ReplayError> {
    let topic = topics.dead_letter.name.clone();
    let filter = opts.filter.clone();
    let kafka_config = kafka.clone();
    // The read is blocking (librdkafka polling): off the async threads. Progress is sent
    // back over a channel.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::task::spawn_blocking(move || {
        read(&kafka_config, &topic, &filter, |p| {
            let _ = tx.send(p.clone());
        })
    });
    while let Some(p) = rx.recv().await {
        progress(&p);
    }
    let (mut summary, picked) = reader
        .await
        .map_err(|e| ReplayError::Task(e.to_string()))??;
    summary.deliveries = picked.len() as u64;
    for dl in &picked {
        *summary.by_endpoint.entry(dl.endpoint.clone()).or_insert(0) += 1;
    }
    summary.sample = picked
        .iter()
        .take(SAMPLE)
        .map(|d| d.delivery_id.clone())
        .collect();
    if opts.dry_run || picked.is_empty() {
        return Ok(summary);
    }
    let producer: FutureProducer =
        s2s_common::kafka::without_statistics(&mut kafka.producer_config()).create()?;
    let now = s2s_common::now_ms();
    let commands: Vec<DeliveryCommand> = picked
        .iter()
        .map(|dl| {
            DeliveryCommand::new(
                CommandAction::Redeliver,
                dl.endpoint.clone(),
                dl.conversion.clone(),
                opts.requested_by.clone(),
                now,
                opts.reason.clone(),
            )
        })
        .collect();
    let total = commands.len() as u64;
    for chunk in commands.chunks(SEND_BATCH) {
        let records: Vec<OutRecord<'_>> = chunk
            .iter()
            .map(|cmd| {
                OutRecord::record(
                    &topics.delivery_commands.name,
                    partition_key(&cmd.conversion.click_id),
                    cmd,
                )
            })
            .collect();
        produce_all(&producer, &records)
            .await
            .map_err(|error| ReplayError::Send {
                sent: summary.sent,
                total,
                error,
            })?;
        summary.sent += chunk.len() as u64;
    }
    Ok(summary)
}

/// Reads every partition of `topic` from the beginning to its end (partition EOF), keeping
/// the latest matching dead letter per delivery, in the order they were dead-lettered.
fn read(
    kafka: &KafkaConfig,
    topic: &str,
    filter: &Filter,
    mut progress: impl FnMut(&Progress),
) -> Result<(Summary, Vec<DeadLetter>), ReplayError> {
    let mut config = kafka.consumer_config(&format!("s2s-replay-{}", s2s_common::ids::new_ulid()));
    s2s_common::kafka::without_statistics(&mut config).set("enable.partition.eof", "true");
    let consumer: BaseConsumer = config.create()?;
    let partitions = s2s_common::kafka::partitions(&consumer, topic, Duration::from_secs(30))?;
    if partitions.is_empty() {
        return Err(ReplayError::NoTopic(topic.to_string()));
    }
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let started = Instant::now();
    let mut summary = Summary::default();
    let mut latest: BTreeMap<String, DeadLetter> = BTreeMap::new();
    let mut done: BTreeSet<i32> = BTreeSet::new();
    let mut reported = Instant::now();
    let mut report = |summary: &Summary, done: usize, force: bool| {
        if force || reported.elapsed() >= Duration::from_secs(1) {
            reported = Instant::now();
            progress(&Progress {
                read: summary.read,
                matched: summary.matched,
                partitions_done: done,
                partitions: partitions.len(),
                elapsed: started.elapsed(),
            });
        }
    };
    while done.len() < partitions.len() {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                summary.read += 1;
                match contract::decode::<DeadLetter>(m.payload().unwrap_or_default()) {
                    Ok(dl) if filter.matches(&dl) => {
                        summary.matched += 1;
                        let keep = latest
                            .get(&dl.delivery_id)
                            .is_none_or(|old| old.dead_lettered_at_ms <= dl.dead_lettered_at_ms);
                        if keep {
                            latest.insert(dl.delivery_id.clone(), dl);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        summary.undecodable += 1;
                        tracing::warn!(partition = m.partition(), offset = m.offset(), error = %e,
                            "undecodable dead-letter record skipped");
                    }
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                done.insert(p);
            }
            Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::PartitionEOF))) => {}
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
        report(&summary, done.len(), false);
    }
    report(&summary, done.len(), true);
    let mut picked: Vec<DeadLetter> = latest.into_values().collect();
    picked.sort_by_key(|d| d.dead_lettered_at_ms);
    Ok((summary, picked))
}

/// A time given on the command line: RFC 3339 (`2026-11-25T10:00:00Z`), or a duration
/// before `now_ms` (`36h`, `2d 4h`).
pub fn parse_time(value: &str, now_ms: i64) -> Result<i64, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(value) {
        let ms = t
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| format!("'{value}' is before 1970"))?
            .as_millis();
        return i64::try_from(ms).map_err(|_| format!("'{value}' is too far away"));
    }
    let ago = humantime::parse_duration(value).map_err(|_| {
        format!(
            "'{value}' is neither an RFC 3339 time (2026-11-25T10:00:00Z) nor a duration ago (36h)"
        )
    })?;
    Ok(now_ms.saturating_sub(i64::try_from(ago.as_millis()).unwrap_or(i64::MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use s2s_common::contract::Conversion;
    use s2s_common::fixtures;

    fn dl(endpoint: &str, aff: &str, at: i64) -> DeadLetter {
        let c = Conversion {
            aff_id: aff.into(),
            ..fixtures::conversion("cv", "c1")
        };
        DeadLetter {
            dead_lettered_at_ms: at,
            ..fixtures::dead_letter(&c, endpoint)
        }
    }

    #[test]
    fn filters_by_endpoint_affiliate_and_half_open_time_range() {
        let all = Filter::default();
        assert!(all.matches(&dl("a", "1", 5)));
        let f = Filter {
            endpoints: vec!["a".into()],
            since_ms: Some(10),
            until_ms: Some(20),
            ..Filter::default()
        };
        assert!(f.matches(&dl("a", "1", 10)), "since is inclusive");
        assert!(!f.matches(&dl("a", "1", 20)), "until is exclusive");
        assert!(!f.matches(&dl("b", "1", 15)));
        let by_aff = Filter {
            aff_ids: vec!["42".into()],
            ..Filter::default()
        };
        assert!(by_aff.matches(&dl("x", "42", 0)));
        assert!(!by_aff.matches(&dl("x", "43", 0)));
    }

    #[test]
    fn times_are_rfc3339_or_a_duration_ago() {
        assert_eq!(parse_time("1970-01-01T00:00:01Z", 0), Ok(1000));
        assert_eq!(parse_time("2h", 10_000_000), Ok(10_000_000 - 7_200_000));
        let e = parse_time("yesterday", 0).expect_err("not a time");
        assert!(e.contains("RFC 3339"), "{e}");
    }
}
