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
    /// Operator commands to the delivery worker (re-deliver), keyed by click ID;
    /// co-partitioned with `conversions`.
    pub delivery_commands: TopicConfig,
    /// The delivery worker's state changes (its schedule and the deliveries it has done),
    /// partition N for conversions partition N.
    pub delivery_changelog: TopicConfig,
    /// Postbacks and batch records ingest refused (4xx), keyed by source, for the console.
    pub refusals: TopicConfig,
    /// The control plane's store of record (compacted, one partition): every catalog
    /// entity's current document keyed `<kind>/<id>`, a tombstone for a deleted one.
    pub catalog: TopicConfig,
    /// Every accepted catalog change, kept (not compacted): the entities' history.
    pub catalog_audit: TopicConfig,
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
            delivery_commands: t("delivery-commands"),
            delivery_changelog: TopicConfig {
                config: [("cleanup.policy".to_string(), "compact".to_string())].into(),
                ..t("delivery-changelog")
            },
            refusals: t("refusals"),
            catalog: TopicConfig {
                partitions: 1,
                config: [("cleanup.policy".to_string(), "compact".to_string())].into(),
                ..t("catalog")
            },
            catalog_audit: TopicConfig {
                partitions: 1,
                ..t("catalog-audit")
            },
        }
    }

    /// Every topic with its key in the `[topics]` config section.
    pub fn by_key(&self) -> [(&'static str, &TopicConfig); 13] {
        [
            ("clicks", &self.clicks),
            ("postbacks", &self.postbacks),
            ("conversions", &self.conversions),
            ("rejections", &self.rejections),
            ("delivery_log", &self.delivery_log),
            ("dead_letter", &self.dead_letter),
            ("poison", &self.poison),
            ("changelog", &self.changelog),
            ("delivery_commands", &self.delivery_commands),
            ("delivery_changelog", &self.delivery_changelog),
            ("refusals", &self.refusals),
            ("catalog", &self.catalog),
            ("catalog_audit", &self.catalog_audit),
        ]
    }

    /// The `[topics]` section of a config file naming these topics (for services that
    /// tests and benchmarks run as child processes).
    pub fn to_toml(&self) -> String {
        let mut toml = format!("[topics]\ncreate = {}\n", self.create);
        for (key, t) in self.by_key() {
            toml.push_str(&format!(
                "[topics.{key}]\nname = \"{}\"\npartitions = {}\nreplication_factor = {}\n",
                t.name, t.partitions, t.replication_factor
            ));
            for (k, v) in &t.config {
                toml.push_str(&format!("config.\"{k}\" = \"{v}\"\n"));
            }
        }
        toml
    }

    pub fn all(&self) -> [&TopicConfig; 13] {
        self.by_key().map(|(_, t)| t)
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
        if self.delivery_commands.partitions != self.conversions.partitions {
            return Err(format!(
                "topics: delivery_commands ({}) and conversions ({}) must have the same \
                 partition count so that a command reaches the owner of its conversion",
                self.delivery_commands.partitions, self.conversions.partitions
            ));
        }
        if self.delivery_changelog.partitions < self.conversions.partitions {
            return Err(format!(
                "topics: delivery_changelog ({}) needs at least as many partitions as \
                 conversions ({}): its partition N holds the state of conversions partition N",
                self.delivery_changelog.partitions, self.conversions.partitions
            ));
        }
        for (key, t) in [
            ("catalog", &self.catalog),
            ("catalog_audit", &self.catalog_audit),
        ] {
            if t.partitions != 1 {
                return Err(format!(
                    "topics: {key} ({}) must have exactly 1 partition: the catalog's changes \
                     are totally ordered, and their offsets are the entities' revisions",
                    t.partitions
                ));
            }
        }
        if self
            .catalog
            .config
            .get("cleanup.policy")
            .map(String::as_str)
            != Some("compact")
        {
            return Err(
                "topics: catalog needs config = { \"cleanup.policy\" = \"compact\" }: it keeps \
                 every entity's latest document for as long as the entity exists"
                    .into(),
            );
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

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::{Format, Toml};

    #[test]
    fn to_toml_round_trips() {
        let t = TopicsConfig::named("x", 3);
        let parsed: TopicsConfig = figment::Figment::from(Toml::string(&t.to_toml()))
            .extract_inner("topics")
            .expect("parses");
        assert_eq!(parsed, t);
    }

    #[test]
    fn delivery_topics_must_follow_conversions() {
        let mut t = TopicsConfig::named("x", 3);
        assert_eq!(t.validate(), Ok(()));
        t.delivery_commands.partitions = 2;
        let e = t.validate().expect_err("commands not co-partitioned");
        assert!(e.contains("delivery_commands"), "{e}");
        t.delivery_commands.partitions = 3;
        t.delivery_changelog.partitions = 2;
        let e = t.validate().expect_err("changelog too small");
        assert!(e.contains("delivery_changelog"), "{e}");
    }
}
