//! Input positions the broker does not have. A partition starts at the input offsets stored
//! with its state; a stored offset outside the broker's log stops the service instead of
//! being moved silently to one end of the log. Two stories lead there, with different
//! fixes:
//!
//! - the position is **beyond the log's end**: the topics were re-created or the broker
//!   lost its data, and the state belongs to a log that is gone;
//! - the position is **before the log's start**: retention deleted records this service
//!   had not read yet (it was stopped for longer than `retention.ms`); they are lost to it.
//!
//! How a broker says so differs. Apache Kafka answers a fetch outside the log with
//! `OFFSET_OUT_OF_RANGE`, which the runtime's consumer (`auto.offset.reset = error`)
//! reports without its partition. Tansu 0.6.0 answers a fetch beyond the end with no
//! records and the log's true end (its ListOffsets answer for the end is wrong): the fetch
//! position stays above the high watermark that librdkafka's statistics report
//! ([`beyond_end`]). Either way [`probe`] then asks the broker about each stored position,
//! one at a time, with a fresh reader (whose statistics hold nothing stale): a record or
//! the end of the log means the broker has it.

use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::statistics::Partition;
use rdkafka::{Offset, TopicPartitionList};
use s2s_common::kafka::KafkaConfig;

use crate::ownership::ReaderContext;

/// How long one position's fetch may take to answer.
const PROBE_WAIT: Duration = Duration::from_secs(10);

/// The statistics interval of a one-off reader: how soon it sees a fetch's answer.
pub(crate) const READER_STATISTICS_MS: &str = "100";

/// The log's extent `(start, end)` as the partition's last fetch answered it, when the
/// fetch position is beyond its end. A fetch can only move the position up to the end it
/// answers, so this holds only for a position that was set there: a stored one.
pub(crate) fn beyond_end(p: &Partition) -> Option<(i64, i64)> {
    (p.fetch_state == "active" && p.hi_offset >= 0 && p.next_offset > p.hi_offset)
        .then_some((p.lo_offset, p.hi_offset))
}

/// An input offset stored with a partition's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// A stored position the broker answered "out of range" for, with the log's extent as the
/// broker reports it (`None`: unknown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outside {
    pub stored: Stored,
    pub extent: Option<(i64, i64)>,
}

impl Outside {
    /// Before the log's start: retention deleted what was not read yet.
    fn expired(&self) -> bool {
        matches!(self.extent, Some((low, _)) if self.stored.offset < low)
    }
}

/// Asks the broker about each of `positions` (blocking); returns those it does not have.
pub fn probe(
    kafka: &KafkaConfig,
    group_id: &str,
    positions: &[Stored],
) -> Result<Vec<Outside>, KafkaError> {
    let mut config = kafka.consumer_config(&format!("{group_id}.probe"));
    config
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "error")
        .set("statistics.interval.ms", READER_STATISTICS_MS);
    let consumer: BaseConsumer<ReaderContext> =
        config.create_with_context(ReaderContext::default())?;
    let mut outside = Vec::new();
    for s in positions {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&s.topic, s.partition, Offset::Offset(s.offset))?;
        consumer.assign(&tpl)?;
        let deadline = Instant::now() + PROBE_WAIT;
        let found = loop {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(_)) | Some(Err(KafkaError::PartitionEOF(_))) => break None,
                Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset))) => {
                    let extent = consumer
                        .fetch_watermarks(&s.topic, s.partition, Duration::from_secs(5))
                        .ok();
                    break Some(extent);
                }
                _ => {}
            }
            if let Some(extent) = consumer.context().beyond_end(&s.topic, s.partition) {
                break Some(Some(extent));
            }
            if Instant::now() >= deadline {
                break None;
            }
        };
        if let Some(extent) = found {
            outside.push(Outside {
                stored: s.clone(),
                extent,
            });
        }
        consumer.unassign()?;
    }
    Ok(outside)
}

/// What to tell the operator: which positions, what happened, what to do. `dir`: the
/// service's state directory; `changelog`: its changelog topic, if it has one (which
/// would restore the same positions into a deleted store).
pub fn explain(dir: &Path, changelog: Option<&str>, outside: &[Outside]) -> String {
    let dir = dir.display();
    if outside.is_empty() {
        return format!(
            "the broker answered \"offset out of range\" for an input position stored in \
             {dir}, but every stored position checks in range on a second look (a leader \
             change that truncated the log?); starting again resumes from the stored \
             positions"
        );
    }
    let list: Vec<String> = outside
        .iter()
        .map(|o| {
            let s = &o.stored;
            let extent = match o.extent {
                Some((low, high)) => format!("the broker reports offsets {low}..{high}"),
                None => "the broker's offsets are unknown".into(),
            };
            let story = if o.expired() {
                "before the log's start"
            } else {
                "beyond the log"
            };
            format!(
                "{} partition {} at offset {} ({story}; {extent})",
                s.topic, s.partition, s.offset
            )
        })
        .collect();
    let mut text = format!(
        "the state in {dir} holds input positions the broker does not have: {}.",
        list.join(", ")
    );
    if outside.iter().any(|o| !o.expired()) {
        let also = changelog.map_or(String::new(), |t| {
            format!(
                " and empty its changelog topic {t} (delete and re-create it: it would \
                 restore the same positions)"
            )
        });
        text.push_str(&format!(
            " Beyond the log: the topics were re-created or the broker lost its data, so \
             this state belongs to a log that is gone. If that was on purpose (a new or \
             reset environment), stop every instance of this service, delete {dir}{also}, \
             and start again: the state is rebuilt from the broker. Otherwise restore the \
             broker's data first: the store may be the only copy of this state."
        ));
    }
    if outside.iter().any(Outside::expired) {
        text.push_str(
            " Before the log's start: retention deleted records this service had not read \
             (it was stopped for longer than the topic's retention.ms); they are lost to \
             it. To go on from the oldest record the broker holds, start it once with the \
             librdkafka property auto.offset.reset = earliest \
             (S2S_KAFKA_PROP_AUTO_OFFSET_RESET=earliest), then remove it; keep retention \
             above the longest outage you plan for.",
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outside(offset: i64, extent: Option<(i64, i64)>) -> Outside {
        Outside {
            stored: Stored {
                topic: "clicks".into(),
                partition: 2,
                offset,
            },
            extent,
        }
    }

    #[test]
    fn a_position_beyond_the_log_names_the_store_the_changelog_and_the_fix() {
        let text = explain(
            Path::new("/var/lib/s2s"),
            Some("attributor-changelog"),
            &[outside(500, Some((0, 12)))],
        );
        assert!(
            text.contains("clicks partition 2 at offset 500 (beyond the log; the broker reports offsets 0..12)"),
            "{text}"
        );
        assert!(
            text.contains("delete /var/lib/s2s and empty its changelog topic attributor-changelog"),
            "{text}"
        );
        assert!(!text.contains("auto.offset.reset"), "{text}");
    }

    #[test]
    fn a_position_before_the_log_start_says_what_is_lost_and_how_to_go_on() {
        let text = explain(Path::new("/s"), None, &[outside(3, Some((40, 90)))]);
        assert!(
            text.contains("at offset 3 (before the log's start"),
            "{text}"
        );
        assert!(
            text.contains("S2S_KAFKA_PROP_AUTO_OFFSET_RESET=earliest"),
            "{text}"
        );
        assert!(!text.contains("delete /s"), "{text}");
    }

    #[test]
    fn an_unknown_extent_is_taken_as_beyond_the_log_without_a_changelog_to_empty() {
        let text = explain(Path::new("/s"), None, &[outside(3, None)]);
        assert!(text.contains("the broker's offsets are unknown"), "{text}");
        assert!(text.contains("delete /s, and start again"), "{text}");
    }

    #[test]
    fn only_an_active_fetch_above_a_known_end_is_beyond_it() {
        let p = |state: &str, next, hi| Partition {
            fetch_state: state.into(),
            next_offset: next,
            lo_offset: 0,
            hi_offset: hi,
            ..Partition::default()
        };
        assert_eq!(beyond_end(&p("active", 500, 3)), Some((0, 3)));
        assert_eq!(beyond_end(&p("active", 3, 3)), None, "at the end");
        assert_eq!(beyond_end(&p("active", 2, 3)), None);
        assert_eq!(beyond_end(&p("active", 500, -1001)), None, "no answer yet");
        assert_eq!(beyond_end(&p("active", 500, -1)), None, "an error's answer");
        assert_eq!(beyond_end(&p("none", 500, 3)), None, "not fetched");
    }

    #[test]
    fn nothing_outside_on_a_second_look_is_said() {
        let text = explain(Path::new("/s"), None, &[]);
        assert!(
            text.contains("every stored position checks in range"),
            "{text}"
        );
    }
}
