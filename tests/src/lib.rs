//! Harness for the cross-service tests: the broker address, unique topic names, the
//! whole pipeline started in-process on port 0, a recording HTTP endpoint (also the demo
//! affiliate of the local run), topic readers, and polling with a deadline.
//!
//! The broker is a real one: `S2S_TEST_BROKERS` names it (`scripts/test` starts Tansu and
//! sets it). Every test uses its own topics and consumer groups, so tests run in parallel.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use s2s_common::kafka::KafkaConfig;
use s2s_common::pipeline::ServiceConfig;
use s2s_common::topics::{TopicConfig, TopicsConfig};
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod child;
mod pipeline;
pub use child::ChildService;
use pipeline::{map_err, stopped_cleanly};
pub use pipeline::{Pipeline, PipelineOptions};

/// The broker under test, from `S2S_TEST_BROKERS`.
pub fn brokers() -> String {
    std::env::var("S2S_TEST_BROKERS").unwrap_or_else(|_| {
        panic!(
            "S2S_TEST_BROKERS is not set: run the tests with scripts/test, which starts a broker"
        )
    })
}

pub fn kafka() -> KafkaConfig {
    KafkaConfig {
        bootstrap_servers: brokers(),
        properties: Default::default(),
    }
}

/// A name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        ulid::Ulid::new().to_string().to_ascii_lowercase()
    )
}

/// A fresh set of topics, `partitions` each.
pub fn topics(partitions: i32) -> TopicsConfig {
    TopicsConfig::named(&unique("t"), partitions)
}

/// A one-broker librdkafka MockCluster (in this process, on loopback ports other processes
/// can reach too).
pub type Mock = rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>;

/// A MockCluster with a fresh set of topics, `partitions` each, created on it (the mock
/// answers no CreateTopics, so `create` is off, as where an operator manages topics).
pub fn mock_with_topics(partitions: i32) -> (Mock, TopicsConfig) {
    let mock = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    let mut t = topics(partitions);
    t.create = false;
    for topic in t.all() {
        mock.create_topic(&topic.name, topic.partitions, 1)
            .expect("topic on the mock");
    }
    (mock, t)
}

/// Calls `probe` every 50 ms until it returns `Some`, or panics naming `what` once
/// `timeout` has passed.
pub async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll_for(timeout, probe)
        .await
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Calls `probe` every 50 ms until it returns `Some`; `None` once `timeout` has passed
/// (for a caller that explains the failure itself).
pub async fn poll_for<T, F, Fut>(timeout: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // poll
    }
}

pub use s2s_proof::endpoint::{Received, SilentEndpoint, TestEndpoint};

/// Reads a topic from the beginning of every partition, outside any consumer group.
pub struct TopicReader {
    consumer: StreamConsumer,
}

impl std::fmt::Debug for TopicReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TopicReader")
    }
}

impl TopicReader {
    /// Reads `topic` on the test broker.
    pub fn new(topic: &TopicConfig) -> Self {
        Self::on(&brokers(), topic)
    }

    /// Reads all of `topics`, interleaved, on the test broker.
    pub fn all_of(topics: &[&TopicConfig]) -> Self {
        let reader = Self::on(&brokers(), topics[0]);
        let mut tpl = TopicPartitionList::new();
        for t in topics {
            for p in 0..t.partitions {
                tpl.add_partition_offset(&t.name, p, Offset::Beginning)
                    .expect("partition offset");
            }
        }
        reader.consumer.assign(&tpl).expect("assign");
        reader
    }

    /// Reads `topic` on the brokers at `bootstrap` (a MockCluster, say).
    pub fn on(bootstrap: &str, topic: &TopicConfig) -> Self {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .create()
            .expect("reader consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..topic.partitions {
            tpl.add_partition_offset(&topic.name, p, Offset::Beginning)
                .expect("partition offset");
        }
        consumer.assign(&tpl).expect("assign");
        TopicReader { consumer }
    }

    /// Decodes records until `done` accepts what was read so far; panics after `timeout`
    /// naming `what`.
    pub async fn read_until<T: DeserializeOwned>(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&[T]) -> bool,
    ) -> Vec<T> {
        let mut decoded = Vec::new();
        self.read_raw_until(what, timeout, |raw| {
            for m in raw.get(decoded.len()..).unwrap_or_default() {
                let v =
                    serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or_else(|e| {
                        panic!("record on {} is not the expected type: {e}", m.topic())
                    });
                decoded.push(v);
            }
            done(&decoded)
        })
        .await;
        decoded
    }

    /// Reads raw records (headers and all) until `done` accepts them ([`header`] reads
    /// one header).
    pub async fn read_raw_until(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&[OwnedMessage]) -> bool,
    ) -> Vec<OwnedMessage> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        while !done(&seen) {
            seen.push(self.next(what, deadline, seen.len()).await);
        }
        seen
    }

    async fn next(&self, what: &str, deadline: tokio::time::Instant, read: usize) -> OwnedMessage {
        match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
            Err(_) => panic!("timed out waiting for {what}; read {read} records"),
            Ok(Err(e)) => panic!("reading {what}: {e}"),
            Ok(Ok(m)) => m.detach(),
        }
    }
}

/// Publishes raw records, keyed, and waits for each acknowledgement.
pub struct RawProducer {
    producer: rdkafka::producer::FutureProducer,
}

impl std::fmt::Debug for RawProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawProducer")
    }
}

impl RawProducer {
    pub fn new() -> Self {
        RawProducer {
            producer: kafka().producer_config().create().expect("producer"),
        }
    }

    /// Sends one record and waits until the broker acknowledged it.
    pub async fn send(&self, topic: &str, key: &str, payload: &[u8]) {
        let record = rdkafka::producer::FutureRecord::to(topic)
            .key(key)
            .payload(payload);
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
    }
}

impl Default for RawProducer {
    fn default() -> Self {
        Self::new()
    }
}

/// The attributor's defaults pointed at the test broker and `topics`, admin on port 0, with
/// its state in `state_dir`.
pub fn attributor_config(
    topics: &TopicsConfig,
    state_dir: &std::path::Path,
) -> s2s_attributor::AttributorConfig {
    let ac: s2s_attributor::AttributorConfig = s2s_common::config::load(
        s2s_attributor::config::DEFAULT_TOML,
        None,
        "S2S_TEST_NONE__",
    )
    .expect("attributor defaults");
    let mut ac = ac.with_pipeline(pipeline(topics));
    ac.admin_listen = any_port();
    ac.group_id = unique("attributor");
    ac.state_dir = state_dir.to_path_buf();
    // Tansu has no transactions; exactly_once is tested on MockCluster.
    ac.processing_guarantee = s2s_attributor::config::Guarantee::AtLeastOnce;
    ac.rocksdb.block_cache_bytes = 16 << 20;
    ac.rocksdb.write_buffer_bytes = 8 << 20;
    ac
}

/// A service running in this process until [`Running::stop`].
pub struct Running<E> {
    pub admin: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<Result<(), E>>,
}

impl<E> std::fmt::Debug for Running<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("admin", &self.admin)
            .finish()
    }
}

impl<E: std::fmt::Debug + Send + 'static> Running<E> {
    /// Runs `run` (a bound service's `run`) on a task, stopped by [`Running::stop`].
    pub fn spawn<F>(admin: SocketAddr, run: impl FnOnce(CancellationToken) -> F) -> Self
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
    {
        Self::spawn_with(admin, CancellationToken::new(), run)
    }

    /// [`Running::spawn`] with the token the service was bound with.
    pub fn spawn_with<F>(
        admin: SocketAddr,
        stop: CancellationToken,
        run: impl FnOnce(CancellationToken) -> F,
    ) -> Self
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
    {
        let task = tokio::spawn(run(stop.clone()));
        Running { admin, stop, task }
    }

    /// Stops it and checks that it stopped cleanly.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the service stops within 30 s")
            .expect("join")
            .expect("the service stops cleanly");
    }

    /// Waits until it stops on its own, which must be with an error.
    pub async fn failure(self, timeout: Duration) -> E {
        tokio::time::timeout(timeout, self.task)
            .await
            .expect("the service stops on its own")
            .expect("join")
            .expect_err("the service stops with an error")
    }

    /// A series from its `/metrics` (`name{labels}` exactly as shown), 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        metric(self.admin, series).await.unwrap_or(0.0)
    }
}

/// A stateful service on the stream runtime, running in this process.
pub type RunningService = Running<s2s_state::RuntimeError>;

impl RunningService {
    pub async fn attributor(config: s2s_attributor::AttributorConfig) -> Self {
        let stop = CancellationToken::new();
        let attributor = s2s_attributor::Attributor::bind(config, &stop)
            .await
            .expect("the attributor starts");
        let admin = attributor.admin_addr().expect("admin address");
        Running::spawn_with(admin, stop, |stop| attributor.run(stop))
    }

    pub async fn delivery(config: s2s_delivery::DeliveryConfig) -> Self {
        let stop = CancellationToken::new();
        let delivery = s2s_delivery::Delivery::bind(config, &stop)
            .await
            .expect("delivery starts");
        let admin = delivery.admin_addr().expect("admin address");
        Running::spawn_with(admin, stop, |stop| delivery.run(stop))
    }
}

/// Delivery's defaults pointed at the test broker and `topics`, admin on port 0, state in
/// `state_dir`, short retries (50 ms, 50 ms), and `postbacks` as global GET postbacks
/// `(name, url template)`.
pub fn delivery_config(
    topics: &TopicsConfig,
    state_dir: &std::path::Path,
    postbacks: &[(String, String)],
) -> s2s_delivery::DeliveryConfig {
    let mut dc: s2s_delivery::DeliveryConfig =
        s2s_common::config::load(s2s_delivery::config::DEFAULT_TOML, None, "S2S_TEST_NONE__")
            .expect("delivery defaults");
    dc = dc.with_pipeline(pipeline(topics));
    dc.admin_listen = any_port();
    dc.group_id = unique("delivery");
    dc.state_dir = state_dir.to_path_buf();
    dc.request_timeout = Duration::from_secs(2);
    dc.retry_schedule = vec![Duration::from_millis(50); 2];
    dc.commit_interval = Duration::from_millis(20);
    dc.rocksdb.block_cache_bytes = 16 << 20;
    dc.rocksdb.write_buffer_bytes = 8 << 20;
    dc.postbacks = postbacks
        .iter()
        .map(|(name, url)| s2s_delivery::config::PostbackConfig {
            name: name.clone(),
            url: url.clone(),
            ..Default::default()
        })
        .collect();
    dc
}

/// Reads a counter or gauge from a Prometheus text page (`name{labels}` exactly as shown).
pub async fn metric(admin: SocketAddr, series: &str) -> Option<f64> {
    let body = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    body.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

/// Polls `series` on `admin` until it reaches `at_least` (within 30 s).
pub async fn metric_reaches(admin: SocketAddr, series: &str, at_least: f64) {
    poll_until(
        &format!("{series} reaches {at_least}"),
        Duration::from_secs(30),
        || async { (metric(admin, series).await? >= at_least).then_some(()) },
    )
    .await;
}

/// Creates a topic directly (for tests that need a topic the services did not create).
pub async fn create_topic(name: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<_> = kafka().admin_config().create().expect("admin");
    let t = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let r = admin
        .create_topics([&t], &AdminOptions::new())
        .await
        .expect("create topics");
    assert!(r.iter().all(|x| x.is_ok()), "create {name}: {r:?}");
}

/// The console operator token of the test pipeline.
pub const CONSOLE_TOKEN: &str = "tester-token-0123456789";

/// The console's defaults pointed at the test broker and `topics`, on port 0, operator
/// "tester", state in `state_dir`, short cycles.
pub fn console_config(
    topics: &TopicsConfig,
    state_dir: &std::path::Path,
) -> s2s_console::ConsoleConfig {
    let mut c: s2s_console::ConsoleConfig =
        s2s_common::config::load(s2s_console::config::DEFAULT_TOML, None, "S2S_TEST_NONE__")
            .expect("console defaults");
    c = c.with_pipeline(pipeline(topics));
    c.listen = any_port();
    c.admin_listen = any_port();
    c.group_id = unique("console");
    // Tansu has no transactions.
    c.catalog_guarantee = s2s_state::Guarantee::AtLeastOnce;
    c.state_dir = state_dir.to_path_buf();
    c.commit_interval = Duration::from_millis(50);
    c.operators = [("tester".to_string(), CONSOLE_TOKEN.to_string())].into();
    c.rocksdb.block_cache_bytes = 16 << 20;
    c.rocksdb.write_buffer_bytes = 8 << 20;
    c
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// Offer 1 as the tests know it: redirecting to
/// `https://offer.example/land?cid={click_id}&aff={aff_id}`, paying USD 50.00 per `ftd`
/// and 2.00 per `registration`.
pub fn offer_1() -> s2s_common::pipeline::OfferConfig {
    s2s_common::pipeline::OfferConfig {
        url: "https://offer.example/land?cid={click_id}&aff={aff_id}".into(),
        currency: Some("USD".into()),
        payouts: [("ftd", 5000), ("registration", 200)]
            .into_iter()
            .map(|(e, cents)| (e.to_string(), rust_decimal::Decimal::new(cents, 2)))
            .collect(),
        ..Default::default()
    }
}

/// Writes `file`'s entities into the catalog of `topics` (creating the topics first), as
/// `console catalog import` would through a console: for tests that run services without
/// one. Nothing else may write the catalog meanwhile (there is no election here).
pub async fn seed_catalog(topics: &TopicsConfig, file: &s2s_catalog::file::CatalogFile) {
    seed_catalog_on(&kafka(), topics, file).await;
}

/// [`seed_catalog`] on the broker `kafka` (a MockCluster).
pub async fn seed_catalog_on(
    kafka: &KafkaConfig,
    topics: &TopicsConfig,
    file: &s2s_catalog::file::CatalogFile,
) {
    let mut p = pipeline(topics);
    p.kafka = kafka.clone();
    s2s_common::kafka::ensure_topics(&p.kafka, topics, Duration::from_secs(30))
        .await
        .expect("topics");
    let checks = s2s_console::catalog_checks(&p.postbacks).expect("checks");
    let key = s2s_catalog::secrets::SecretKey::of(&p).expect("the tests' key");
    s2s_catalog::file::import_unelected(&p.kafka, topics, &checks, key.as_ref(), file, "test-seed")
        .await
        .expect("the catalog is seeded");
}

/// The catalog of most tests: offer 1 ([`offer_1`]).
pub fn catalog_with_offer_1() -> s2s_catalog::file::CatalogFile {
    s2s_catalog::file::CatalogFile {
        offers: [("1".to_string(), offer_1())].into(),
        ..Default::default()
    }
}

/// Ingest's defaults pointed at the test broker and `topics`, on port 0, and the plain
/// routes open (`[sources.default] auth = "none"`). Offers come from the catalog: seed it
/// ([`seed_catalog`]) before ingest starts, or change it while it runs.
pub fn ingest_config(topics: &TopicsConfig) -> s2s_ingest::IngestConfig {
    let mut c: s2s_ingest::IngestConfig =
        s2s_common::config::load(s2s_ingest::config::DEFAULT_TOML, None, "S2S_TEST_NONE__")
            .expect("ingest defaults");
    c = c.with_pipeline(pipeline(topics));
    c.listen = any_port();
    c.admin_listen = any_port();
    c.sources.insert(
        "default".into(),
        s2s_ingest::config::SourceConfig::new(s2s_ingest::config::AuthKind::None),
    );
    // The tests click from one address at load-test rates: no per-client limit to speak
    // of (written out, so that child processes, whose files layer over the default of 50,
    // get it too).
    c.click.rate_limit_per_client = Some(1_000_000);
    c
}

/// The pipeline config of child processes: the test broker (`brokers`), `topics`, and a
/// short group session so that a killed member's partitions move on quickly.
pub fn child_pipeline(
    brokers: &str,
    topics: &TopicsConfig,
) -> s2s_common::pipeline::PipelineConfig {
    let mut p = s2s_common::pipeline::PipelineConfig::defaults();
    p.kafka.bootstrap_servers = brokers.to_string();
    p.topics = topics.clone();
    for (k, v) in [
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "1000"),
    ] {
        p.kafka.properties.insert(k.into(), v.into());
    }
    p
}

/// Writes `p` to `dir/pipeline.toml`, where child processes started with
/// `S2S_PIPELINE` pointing at it find it; returns the path.
pub fn write_pipeline(
    dir: &std::path::Path,
    p: &s2s_common::pipeline::PipelineConfig,
) -> std::path::PathBuf {
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, p.to_toml()).expect("pipeline config");
    path
}

/// Writes a service's config to `path` as TOML, serialized from its struct (secrets are
/// never serialized: children get them from the environment).
pub fn write_config<C: serde::Serialize>(path: &std::path::Path, config: &C) {
    let toml = toml::to_string(config).expect("a config serializes to TOML");
    std::fs::write(path, toml).expect("config file");
}

/// The pipeline's defaults pointed at the test broker and `topics`, with the catalog key
/// [`CATALOG_KEY`].
pub fn pipeline(topics: &TopicsConfig) -> s2s_common::pipeline::PipelineConfig {
    let mut p = s2s_common::pipeline::PipelineConfig::defaults();
    p.kafka = kafka();
    p.topics = topics.clone();
    p.catalog_key = Some(s2s_common::pipeline::CatalogKey(CATALOG_KEY.into()));
    p
}

/// The tests' catalog key (32 bytes, base64).
pub const CATALOG_KEY: &str = "dGVzdHMtY2F0YWxvZy1rZXktMzItYnl0ZXMtbG9uZyE=";

/// Ingest running in this process until dropped or stopped.
#[derive(Debug)]
pub struct IngestHandle {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), String>>>,
}

impl IngestHandle {
    pub async fn start(config: s2s_ingest::IngestConfig) -> Self {
        let shutdown = CancellationToken::new();
        let ingest = s2s_ingest::Ingest::bind(config, &shutdown)
            .await
            .expect("ingest starts");
        IngestHandle {
            addr: ingest.local_addr().expect("addr"),
            admin: ingest.admin_addr().expect("addr"),
            task: Some(tokio::spawn(map_err(ingest.run(shutdown.clone())))),
            shutdown,
        }
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    /// Stops ingest and checks it stopped cleanly.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            stopped_cleanly(t).await;
        }
    }
}

impl Drop for IngestHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An HTTP client that does not follow redirects (to see the 302).
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// The value of header `name` of a record read raw, as text.
pub fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    use rdkafka::message::Headers;
    m.headers()
        .and_then(|h| h.iter().find(|x| x.key == name))
        .and_then(|x| x.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}
