//! Kafka client settings and topic provisioning.
//!
//! The pipeline's guarantees depend on a few client properties (idempotence, `acks=all`,
//! manual offset commits, the partitioner, the range assignor). They are set here, in one
//! place, and a user's pass-through property that would weaken them is refused at start-up
//! rather than silently applied or silently ignored.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::future_producer::Delivery;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use serde::{Deserialize, Serialize};

use crate::contract::WireRecord;
use crate::topics::{TopicConfig, TopicsConfig};

/// Environment variables with this prefix become librdkafka properties in every service:
/// `S2S_KAFKA_PROP_SASL_PASSWORD=…` sets `sasl.password`. Meant for secrets.
pub const ENV_PROPERTY_PREFIX: &str = "S2S_KAFKA_PROP_";

/// Properties the pipeline owns, with the value it sets and why.
const OWNED: [(&str, &str, &str); 5] = [
    (
        "enable.idempotence",
        "true",
        "producers must not duplicate or reorder on retry",
    ),
    (
        "acks",
        "all",
        "a record is acknowledged only once all in-sync replicas have it",
    ),
    (
        "partitioner",
        "murmur2_random",
        "co-partitioning with Java producers",
    ),
    (
        "enable.auto.commit",
        "false",
        "offsets are committed only after the work is durable",
    ),
    (
        "isolation.level",
        "read_committed",
        "consumers never see aborted records",
    ),
];

/// librdkafka properties that only producers read (column C/P = P of librdkafka 2.12.1's
/// CONFIGURATION.md). Consumers and admin clients are not given them: a client given
/// another kind's property logs a CONFWARN at every start.
const PRODUCER_ONLY: &[&str] = &[
    "transactional.id",
    "transaction.timeout.ms",
    "enable.idempotence",
    "enable.gapless.guarantee",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "queue.buffering.max.ms",
    "linger.ms",
    "message.send.max.retries",
    "retries",
    "queue.buffering.backpressure.threshold",
    "compression.codec",
    "compression.type",
    "compression.level",
    "batch.num.messages",
    "batch.size",
    "delivery.report.only.error",
    "sticky.partitioning.linger.ms",
    "request.required.acks",
    "acks",
    "request.timeout.ms",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "queuing.strategy",
    "produce.offset.report",
    "partitioner",
];

/// librdkafka properties that only consumers read (C/P = C), kept from producers and
/// admin clients for the same reason.
const CONSUMER_ONLY: &[&str] = &[
    "group.id",
    "group.instance.id",
    "partition.assignment.strategy",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "group.protocol.type",
    "group.protocol",
    "group.remote.assignor",
    "coordinator.query.interval.ms",
    "max.poll.interval.ms",
    "enable.auto.commit",
    "auto.commit.interval.ms",
    "auto.commit.enable",
    "enable.auto.offset.store",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "fetch.wait.max.ms",
    "fetch.queue.backoff.ms",
    "fetch.message.max.bytes",
    "max.partition.fetch.bytes",
    "fetch.max.bytes",
    "fetch.min.bytes",
    "fetch.error.backoff.ms",
    "offset.store.method",
    "offset.store.path",
    "offset.store.sync.interval.ms",
    "isolation.level",
    "enable.partition.eof",
    "check.crcs",
    "auto.offset.reset",
    "consume.callback.max.messages",
];

/// Which kind of client a configuration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    Producer,
    Consumer,
    Admin,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:port[,host:port…]`.
    pub bootstrap_servers: String,
    /// librdkafka properties passed through unchanged (`security.protocol`, `linger.ms`, …).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error("kafka.bootstrap_servers is empty: set it to host:port of your brokers")]
    NoBootstrap,
    #[error(
        "kafka.properties.\"{key}\" = \"{value}\" is not allowed: the pipeline sets it to \
         \"{owned}\" because {why}; remove it from the config"
    )]
    Owned {
        key: String,
        value: String,
        owned: &'static str,
        why: &'static str,
    },
    #[error(
        "kafka.properties.\"statistics.interval.ms\" = \"0\" turns off the statistics that \
         drive /readyz and the kafka metrics; use a positive interval (default 1000)"
    )]
    StatsOff,
    #[error("kafka client: {0}")]
    Client(#[from] KafkaError),
    #[error("metadata task failed: {0}")]
    Task(String),
    #[error("creating topic '{topic}' failed: {code}")]
    CreateTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("topic '{topic}' did not appear in the broker's metadata within {waited:?}")]
    TopicMissing { topic: String, waited: Duration },
    #[error(
        "topics '{clicks}' ({clicks_n} partitions) and '{postbacks}' ({postbacks_n} partitions) \
         are not co-partitioned: the attributor joins a click and its postbacks only if both \
         land on the same partition number. Give both the same partition count (add partitions \
         to the smaller one with kafka-topics.sh --alter, knowing existing click IDs may then \
         map elsewhere, or recreate both) and set topics.*.partitions to match"
    )]
    NotCopartitioned {
        clicks: String,
        clicks_n: i32,
        postbacks: String,
        postbacks_n: i32,
    },
    #[error(
        "topic '{changelog}' has {changelog_n} partitions but clicks has {clicks_n}: changelog \
         partition N holds the state of input partition N. Add partitions to the changelog \
         (kafka-topics.sh --alter) and set topics.changelog.partitions to match"
    )]
    ChangelogTooSmall {
        changelog: String,
        changelog_n: i32,
        clicks_n: i32,
    },
    #[error(
        "topic '{topic}' has {n} partitions and '{other}' has {other_n}: {why}. Change the \
         partition count (kafka-topics.sh --alter, or recreate the topic) and set \
         topics.*.partitions to match"
    )]
    PartitionMismatch {
        topic: String,
        n: i32,
        other: String,
        other_n: i32,
        why: &'static str,
    },
}

impl KafkaConfig {
    /// Refuses an empty bootstrap list and pass-through properties that would weaken a
    /// guarantee.
    pub fn validate(&self) -> Result<(), KafkaSetupError> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err(KafkaSetupError::NoBootstrap);
        }
        if self
            .properties
            .get("statistics.interval.ms")
            .map(String::as_str)
            == Some("0")
        {
            return Err(KafkaSetupError::StatsOff);
        }
        for (key, value) in &self.properties {
            if let Some((_, owned, why)) = OWNED.iter().find(|(k, _, _)| *k == key.as_str()) {
                if value != owned {
                    return Err(KafkaSetupError::Owned {
                        key: key.clone(),
                        value: value.clone(),
                        owned,
                        why,
                    });
                }
            }
        }
        Ok(())
    }

    /// Adds properties from `S2S_KAFKA_PROP_*` variables (`_` becomes `.`, lower case).
    pub fn apply_env_properties(&mut self, vars: impl IntoIterator<Item = (String, String)>) {
        for (name, value) in vars {
            if let Some(rest) = name.strip_prefix(ENV_PROPERTY_PREFIX) {
                let key = rest.to_ascii_lowercase().replace('_', ".");
                if !key.is_empty() {
                    self.properties.insert(key, value);
                }
            }
        }
    }

    /// The connection and the pass-through properties this kind of client reads.
    fn base(&self, client: Client) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers);
        // Feeds crate::kafka_stats (metrics, readiness); a property may override it.
        c.set("statistics.interval.ms", "1000");
        for (k, v) in &self.properties {
            let producer_only = PRODUCER_ONLY.contains(&k.as_str());
            let consumer_only = CONSUMER_ONLY.contains(&k.as_str());
            let theirs = match client {
                Client::Producer => consumer_only,
                Client::Consumer => producer_only,
                Client::Admin => producer_only || consumer_only,
            };
            if !theirs {
                c.set(k, v);
            }
        }
        c
    }

    /// Idempotent producer with `acks=all` and the Java-compatible partitioner.
    pub fn producer_config(&self) -> ClientConfig {
        let mut c = self.base(Client::Producer);
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random");
        c
    }

    /// Consumer with manual commits, `read_committed`, starting from the earliest record.
    ///
    /// The assignor is `range`: with co-partitioned input topics it gives partition N of
    /// every subscribed topic to the same member, which the attributor's join relies on.
    pub fn consumer_config(&self, group_id: &str) -> ClientConfig {
        let mut c = self.base(Client::Consumer);
        c.set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("partition.assignment.strategy", "range");
        if !self.properties.contains_key("auto.offset.reset") {
            c.set("auto.offset.reset", "earliest");
        }
        c
    }

    pub fn admin_config(&self) -> ClientConfig {
        self.base(Client::Admin)
    }
}

/// Publishes one record and waits for its acknowledgement. When the producer queue is
/// full it waits for room (backpressure) rather than failing.
pub async fn send_and_wait<C: ClientContext + 'static>(
    producer: &FutureProducer<C>,
    topic: &str,
    key: &[u8],
    payload: &[u8],
) -> Result<(), KafkaError> {
    let record = FutureRecord::to(topic).key(key).payload(payload);
    producer
        .send(record, Timeout::Never)
        .await
        .map(|_| ())
        .map_err(|(e, _)| e)
}

/// One record to produce with [`produce_all`].
#[derive(Debug, Clone)]
pub struct OutRecord<'a> {
    pub topic: &'a str,
    /// Set for changelog records (partition N for input partition N); else by key.
    pub partition: Option<i32>,
    pub key: Vec<u8>,
    /// `None`: a tombstone.
    pub payload: Option<Vec<u8>>,
    pub headers: Option<OwnedHeaders>,
}

/// Kafka headers from (name, text value) pairs.
fn owned_headers<'h>(pairs: impl IntoIterator<Item = (&'h str, &'h str)>) -> OwnedHeaders {
    pairs
        .into_iter()
        .fold(OwnedHeaders::new(), |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        })
}

/// The Kafka headers of a record of the contract ([`WireRecord::headers`]).
pub fn wire_headers<R: WireRecord>(record: &R) -> OwnedHeaders {
    let pairs = record.headers();
    owned_headers(pairs.iter().map(|(key, value)| (*key, value.as_str())))
}

impl<'a> OutRecord<'a> {
    /// A record of the contract, encoded, with its headers, partitioned by `key`.
    pub fn record<R: WireRecord>(topic: &'a str, key: &[u8], record: &R) -> Self {
        OutRecord {
            topic,
            partition: None,
            key: key.to_vec(),
            payload: Some(crate::contract::encode(record)),
            headers: Some(wire_headers(record)),
        }
    }

    /// An undecodable input record, copied byte for byte to the poison topic `topic` with
    /// the reason and its origin in headers (`s2s-poison-reason`, `s2s-source-topic`,
    /// `s2s-source-partition`, `s2s-source-offset`), so that one bad record never stops a
    /// stream and is never lost.
    pub fn poison(topic: &'a str, msg: &OwnedMessage, reason: &str) -> Self {
        let partition = msg.partition().to_string();
        let offset = msg.offset().to_string();
        let headers = owned_headers([
            ("s2s-poison-reason", reason),
            ("s2s-source-topic", msg.topic()),
            ("s2s-source-partition", partition.as_str()),
            ("s2s-source-offset", offset.as_str()),
        ]);
        OutRecord {
            topic,
            partition: None,
            key: msg.key().unwrap_or_default().to_vec(),
            payload: Some(msg.payload().unwrap_or_default().to_vec()),
            headers: Some(headers),
        }
    }
}

/// Produces every record and waits for all acknowledgements; the deliveries come back in
/// record order. A full producer queue is backpressure: wait for the oldest record in
/// flight, then try again. The first failure is returned (librdkafka has retried it).
pub async fn produce_all<C: ClientContext + 'static>(
    producer: &FutureProducer<C>,
    records: &[OutRecord<'_>],
) -> Result<Vec<Delivery>, KafkaError> {
    let acknowledged = |r: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >| match r {
        Ok(Ok(d)) => Ok(d),
        Ok(Err((e, _))) => Err(e),
        Err(_) => Err(KafkaError::Canceled),
    };
    let mut in_flight = std::collections::VecDeque::with_capacity(records.len());
    let mut delivered = Vec::with_capacity(records.len());
    for r in records {
        let mut record = FutureRecord::to(r.topic).key(&r.key);
        if let Some(p) = &r.payload {
            record = record.payload(p);
        }
        if let Some(p) = r.partition {
            record = record.partition(p);
        }
        if let Some(h) = &r.headers {
            record = record.headers(h.clone());
        }
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    in_flight.push_back(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    match in_flight.pop_front() {
                        Some(f) => delivered.push(acknowledged(f.await)?),
                        // poll: the queue is full of other producers' records; bounded by
                        // their delivery timeout.
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
    for f in in_flight {
        delivered.push(acknowledged(f.await)?);
    }
    Ok(delivered)
}

/// Creates the pipeline's topics if missing and `topics.create` is on (an existing topic
/// is left as it is), waits until the broker reports them, and checks that clicks and
/// postbacks are co-partitioned. Returns the partition count of each topic, by name.
pub async fn ensure_topics(
    kafka: &KafkaConfig,
    topics: &TopicsConfig,
    timeout: Duration,
) -> Result<BTreeMap<String, i32>, KafkaSetupError> {
    let admin: AdminClient<DefaultClientContext> = kafka.admin_config().create()?;
    let wanted: Vec<&TopicConfig> = topics.all().to_vec();
    if topics.create {
        let new: Vec<NewTopic<'_>> = wanted
            .iter()
            .map(|t| {
                t.config.iter().fold(
                    NewTopic::new(
                        &t.name,
                        t.partitions,
                        TopicReplication::Fixed(t.replication_factor),
                    ),
                    |nt, (k, v)| nt.set(k, v),
                )
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(timeout));
        for result in admin.create_topics(new.iter(), &opts).await? {
            match result {
                Ok(name) => tracing::info!(topic = %name, "created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(KafkaSetupError::CreateTopic { topic, code }),
            }
        }
    }

    let names: Vec<String> = wanted.iter().map(|t| t.name.clone()).collect();
    let counts = tokio::task::spawn_blocking(move || partition_counts(&admin, &names, timeout))
        .await
        .map_err(|e| KafkaSetupError::Task(e.to_string()))??;

    for t in &wanted {
        let actual = counts.get(&t.name).copied().unwrap_or_default();
        if actual != t.partitions {
            tracing::warn!(
                topic = %t.name, configured = t.partitions, actual,
                "topic exists with another partition count than configured; using the broker's"
            );
        }
    }
    let clicks_n = counts.get(&topics.clicks.name).copied().unwrap_or_default();
    let postbacks_n = counts
        .get(&topics.postbacks.name)
        .copied()
        .unwrap_or_default();
    if clicks_n != postbacks_n {
        return Err(KafkaSetupError::NotCopartitioned {
            clicks: topics.clicks.name.clone(),
            clicks_n,
            postbacks: topics.postbacks.name.clone(),
            postbacks_n,
        });
    }
    let changelog_n = counts
        .get(&topics.changelog.name)
        .copied()
        .unwrap_or_default();
    if changelog_n < clicks_n {
        return Err(KafkaSetupError::ChangelogTooSmall {
            changelog: topics.changelog.name.clone(),
            changelog_n,
            clicks_n,
        });
    }
    let n = |t: &TopicConfig| counts.get(&t.name).copied().unwrap_or_default();
    let conversions_n = n(&topics.conversions);
    let mismatch = |t: &TopicConfig, why: &'static str| KafkaSetupError::PartitionMismatch {
        topic: t.name.clone(),
        n: n(t),
        other: topics.conversions.name.clone(),
        other_n: conversions_n,
        why,
    };
    if n(&topics.delivery_commands) != conversions_n {
        return Err(mismatch(
            &topics.delivery_commands,
            "delivery commands must have as many partitions as conversions, so that a \
             command reaches the instance that owns its conversion",
        ));
    }
    if n(&topics.delivery_changelog) < conversions_n {
        return Err(mismatch(
            &topics.delivery_changelog,
            "the delivery changelog needs at least as many partitions as conversions: its \
             partition N holds the state of conversions partition N",
        ));
    }
    Ok(counts)
}

/// For a client whose statistics nobody reads (no [`crate::kafka_stats::KafkaStats`]
/// context): librdkafka computes none, and rdkafka's default context does not log each
/// one (at `info`, a long line per second).
pub fn without_statistics(config: &mut ClientConfig) -> &mut ClientConfig {
    config.set("statistics.interval.ms", "0")
}

/// The partitions of `topic` as the broker's metadata lists them (blocking); none if it
/// does not exist.
pub fn partitions<C: rdkafka::consumer::ConsumerContext>(
    consumer: &rdkafka::consumer::BaseConsumer<C>,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, KafkaError> {
    use rdkafka::consumer::Consumer as _;
    let md = consumer.fetch_metadata(Some(topic), timeout)?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default())
}

/// Polls metadata (blocking) until every topic shows at least one partition.
fn partition_counts(
    admin: &AdminClient<DefaultClientContext>,
    names: &[String],
    timeout: Duration,
) -> Result<BTreeMap<String, i32>, KafkaSetupError> {
    let deadline = std::time::Instant::now() + timeout;
    let mut counts = BTreeMap::new();
    for name in names {
        loop {
            let md = admin.inner().fetch_metadata(Some(name), timeout)?;
            let n = md
                .topics()
                .iter()
                .find(|t| t.name() == name && t.error().is_none())
                .map_or(0, |t| t.partitions().len());
            if n > 0 {
                counts.insert(name.clone(), i32::try_from(n).unwrap_or(i32::MAX));
                break;
            }
            if std::time::Instant::now() >= deadline {
                return Err(KafkaSetupError::TopicMissing {
                    topic: name.clone(),
                    waited: timeout,
                });
            }
            // poll: metadata propagation after CreateTopics; bounded by the deadline above.
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> KafkaConfig {
        KafkaConfig {
            bootstrap_servers: "127.0.0.1:9092".into(),
            properties: BTreeMap::new(),
        }
    }

    /// Each client gets only the properties its kind reads: no CONFWARN at start-up.
    #[test]
    fn each_client_gets_only_its_own_properties() {
        let mut c = cfg();
        for (k, v) in [
            ("linger.ms", "2"),
            ("compression.type", "lz4"),
            ("fetch.min.bytes", "1024"),
            ("security.protocol", "SASL_SSL"),
        ] {
            c.properties.insert(k.into(), v.into());
        }
        let producer = c.producer_config();
        let consumer = c.consumer_config("g");
        let admin = c.admin_config();
        assert_eq!(producer.get("linger.ms"), Some("2"));
        assert_eq!(producer.get("compression.type"), Some("lz4"));
        assert_eq!(producer.get("fetch.min.bytes"), None);
        assert_eq!(consumer.get("linger.ms"), None);
        assert_eq!(consumer.get("compression.type"), None);
        assert_eq!(consumer.get("fetch.min.bytes"), Some("1024"));
        for shared in [&producer, &consumer, &admin] {
            assert_eq!(shared.get("security.protocol"), Some("SASL_SSL"));
        }
        assert_eq!(admin.get("linger.ms"), None);
        assert_eq!(admin.get("fetch.min.bytes"), None);
    }

    #[test]
    fn refuses_properties_that_weaken_guarantees() {
        let mut c = cfg();
        c.properties.insert("acks".into(), "1".into());
        let msg = c
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("acks") && msg.contains("all"), "{msg}");

        let mut ok = cfg();
        ok.properties.insert("acks".into(), "all".into());
        ok.properties.insert("linger.ms".into(), "5".into());
        assert!(ok.validate().is_ok());

        let empty = KafkaConfig {
            bootstrap_servers: " ".into(),
            properties: BTreeMap::new(),
        };
        assert!(matches!(
            empty.validate(),
            Err(KafkaSetupError::NoBootstrap)
        ));
    }

    #[test]
    fn env_properties_map_to_dotted_names() {
        let mut c = cfg();
        c.apply_env_properties([
            (
                "S2S_KAFKA_PROP_SASL_PASSWORD".to_string(),
                "s3cret".to_string(),
            ),
            (
                "S2S_KAFKA_PROP_SECURITY_PROTOCOL".to_string(),
                "SASL_SSL".to_string(),
            ),
            ("OTHER".to_string(), "x".to_string()),
        ]);
        assert_eq!(
            c.properties.get("sasl.password").map(String::as_str),
            Some("s3cret")
        );
        assert_eq!(
            c.properties.get("security.protocol").map(String::as_str),
            Some("SASL_SSL")
        );
        assert_eq!(c.properties.len(), 2);
    }

    #[test]
    fn owned_properties_win_over_pass_through() {
        let c = cfg();
        let p = c.producer_config();
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        assert_eq!(p.get("partitioner"), Some("murmur2_random"));
        let k = c.consumer_config("g");
        assert_eq!(k.get("enable.auto.commit"), Some("false"));
        assert_eq!(k.get("partition.assignment.strategy"), Some("range"));
        assert_eq!(k.get("auto.offset.reset"), Some("earliest"));
    }
}
