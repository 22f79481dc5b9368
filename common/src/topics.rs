//! Topic names, partition counts and the partition key.
//!
//! Every record about a click (the click, its postbacks, their outcomes, delivery attempts)
//! is keyed by the click ID. With the same partition count on `clicks` and `postbacks`
//! (checked at start-up, see [`crate::kafka::ensure_topics`]) and the same partitioner on
//! every producer (`murmur2_random`, the Java client's default, set by
//! [`crate::kafka::KafkaConfig::producer_config`]), a click and all its postbacks land on
//! the same partition number, so one attributor instance sees both sides of the join.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One topic as the pipeline wants it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    /// Topic-level configs applied at creation (`retention.ms`, `min.insync.replicas`, …).
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

/// All the pipeline's topics. Every service knows all of them and provisions them
/// idempotently at start-up, so services can start in any order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    /// Create missing topics at start-up. Set to false where topics are managed elsewhere
    /// (and the service lacks the CreateTopics permission): the services then only check
    /// that the topics exist and that clicks and postbacks are co-partitioned.
    #[serde(default = "yes")]
    pub create: bool,
    pub clicks: TopicConfig,
    pub postbacks: TopicConfig,
    pub conversions: TopicConfig,
    pub rejections: TopicConfig,
    pub delivery_log: TopicConfig,
    pub dead_letter: TopicConfig,
    /// Undecodable input records, set aside so that one bad record never stops the stream.
    pub poison: TopicConfig,
    /// The attributor's state changes (compacted), partition N for input partition N.
    pub changelog: TopicConfig,
}

impl TopicsConfig {
    /// Every topic named `<prefix>.<topic>` with `partitions` partitions and one replica,
    /// the changelog compacted: for tests and benchmarks that need their own topics.
    pub fn named(prefix: &str, partitions: i32) -> Self {
        let t = |name: &str| TopicConfig {
            name: format!("{prefix}.{name}"),
            partitions,
            replication_factor: 1,
            config: BTreeMap::new(),
        };
        TopicsConfig {
            create: true,
            clicks: t("clicks"),
            postbacks: t("postbacks"),
            conversions: t("conversions"),
            rejections: t("rejections"),
            delivery_log: t("delivery-log"),
            dead_letter: t("dead-letter"),
            poison: t("poison"),
            changelog: TopicConfig {
                config: [("cleanup.policy".to_string(), "compact".to_string())].into(),
                ..t("changelog")
            },
        }
    }

    pub fn all(&self) -> [&TopicConfig; 8] {
        [
            &self.clicks,
            &self.postbacks,
            &self.conversions,
            &self.rejections,
            &self.delivery_log,
            &self.dead_letter,
            &self.poison,
            &self.changelog,
        ]
    }

    /// Checks what can be checked without a broker.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::BTreeSet::new();
        for t in self.all() {
            if t.name.trim().is_empty() {
                return Err("topics: every topic needs a non-empty name".into());
            }
            if !seen.insert(t.name.as_str()) {
                return Err(format!(
                    "topics: name '{}' is used twice; each topic needs its own",
                    t.name
                ));
            }
            if t.partitions < 1 || t.replication_factor < 1 {
                return Err(format!(
                    "topics: '{}' needs partitions >= 1 and replication_factor >= 1",
                    t.name
                ));
            }
        }
        if self.clicks.partitions != self.postbacks.partitions {
            return Err(format!(
                "topics: clicks ({}) and postbacks ({}) must have the same partition count \
                 so that a click and its postbacks are joined on the same partition",
                self.clicks.partitions, self.postbacks.partitions
            ));
        }
        if self.changelog.partitions < self.clicks.partitions {
            return Err(format!(
                "topics: changelog ({}) needs at least as many partitions as clicks ({}): \
                 changelog partition N holds the state of input partition N",
                self.changelog.partitions, self.clicks.partitions
            ));
        }
        Ok(())
    }
}

fn yes() -> bool {
    true
}

/// The Kafka message key of every record about a click.
pub fn partition_key(click_id: &str) -> &[u8] {
    click_id.as_bytes()
}
