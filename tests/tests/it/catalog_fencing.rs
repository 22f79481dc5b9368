//! The catalog writer under `catalog_guarantee = "exactly_once"`, on librdkafka's
//! MockCluster (Tansu has no transactions): changes are appended in transactions and
//! applied; when the broker answers a writer's commit as fenced (a newly elected writer
//! initialised the same `transactional.id`), that writer refuses the change and every
//! later one of its term without starting a producer of its own again (which would fence
//! the writer elected since), and the elected one keeps writing.
//!
//! Not verified here: the fencing itself and what `read_committed` readers skip of an
//! aborted transaction are the broker's part (KIP-98). The mock neither bumps a
//! transactional ID's epoch on a second `init_transactions` (a deposed writer's commit
//! succeeded there) nor writes transaction markers, so the fenced answer is injected.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use s2s_catalog::{Follower, WriteError, Writer};
use s2s_common::kafka::KafkaConfig;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::catalog::{change, key};

const WAIT: Duration = Duration::from_secs(30);

/// A transactional catalog writer with `transactional_id` over `follower`.
fn writer(
    kafka: &KafkaConfig,
    transactional_id: &str,
    topics: &s2s_common::topics::TopicsConfig,
    follower: &Arc<Follower>,
) -> Writer {
    Writer::transactional(
        kafka,
        transactional_id,
        &topics.catalog.name,
        &topics.catalog_audit.name,
        Arc::clone(follower),
        WAIT,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newly_elected_writer_fences_the_deposed_one() {
    let (mock, topics) = s2s_tests::mock_with_topics(1);
    let kafka = KafkaConfig {
        bootstrap_servers: mock.bootstrap_servers(),
        properties: Default::default(),
    };
    let stop = CancellationToken::new();
    let follower = Arc::new(
        Follower::start(&kafka, &topics.catalog.name, WAIT, &stop)
            .await
            .expect("the catalog read to its end"),
    );
    let writer = || writer(&kafka, "s2s-console.catalog-writer", &topics, &follower);
    let (deposed, elected) = (writer(), writer());
    let doc = || Some(json!({ "name": "Acme", "status": "active" }));

    let first_term = Instant::now();
    let w = deposed
        .write(change("affiliate/a1", None, doc()), first_term)
        .await
        .expect("the first writer writes");
    assert!(follower.catalog().get(&key("affiliate/a1")).is_some());
    assert!(w.audit_offset >= 0);

    let second_term = Instant::now();
    elected
        .write(change("affiliate/a2", None, doc()), second_term)
        .await
        .expect("the newly elected writer writes");

    // The broker fences the deposed writer's next commit.
    mock.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
    );
    let refused = deposed
        .write(change("affiliate/a3", None, doc()), first_term)
        .await
        .expect_err("the deposed writer is fenced");
    assert!(matches!(refused, WriteError::Fenced), "{refused}");
    let again = deposed
        .write(change("affiliate/a3", None, doc()), first_term)
        .await
        .expect_err("and stays fenced in its term");
    assert!(matches!(again, WriteError::Fenced), "{again}");

    elected
        .write(change("affiliate/a4", None, doc()), second_term)
        .await
        .expect("the elected writer was not fenced back");
    assert!(follower.catalog().get(&key("affiliate/a4")).is_some());
    stop.cancel();
}

/// The fencing itself, on a broker that has it. Run by hand against Apache Kafka:
/// `S2S_TEST_TXN_BROKERS=host:9092 cargo test --workspace --test it -- --ignored catalog_fencing::`.
/// The newly elected writer's `init_transactions` fences the deposed one: its next change
/// is refused as fenced, and a reader of the catalog from its start (`read_committed`)
/// never sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker with transactional.id fencing (Apache Kafka): S2S_TEST_TXN_BROKERS"]
async fn on_apache_kafka_a_deposed_writers_change_never_reaches_a_reader() {
    let brokers = std::env::var("S2S_TEST_TXN_BROKERS")
        .expect("S2S_TEST_TXN_BROKERS names an Apache Kafka with transactions");
    let mut kafka = s2s_tests::kafka();
    kafka.bootstrap_servers = brokers;
    let topics = s2s_tests::topics(1);
    s2s_common::kafka::ensure_topics(&kafka, &topics, WAIT)
        .await
        .expect("topics");
    let stop = CancellationToken::new();
    let follower = Arc::new(
        Follower::start(&kafka, &topics.catalog.name, WAIT, &stop)
            .await
            .expect("the catalog read to its end"),
    );
    let id = s2s_tests::unique("catalog-writer");
    let writer = || writer(&kafka, &id, &topics, &follower);
    let (deposed, elected) = (writer(), writer());
    let doc = || Some(json!({ "name": "Acme", "status": "active" }));
    let first_term = Instant::now();
    deposed
        .write(change("affiliate/a1", None, doc()), first_term)
        .await
        .expect("the first writer writes");
    elected
        .write(change("affiliate/a2", None, doc()), Instant::now())
        .await
        .expect("the newly elected writer writes");
    let refused = deposed
        .write(change("affiliate/a3", None, doc()), first_term)
        .await
        .expect_err("the deposed writer is fenced by the broker");
    assert!(matches!(refused, WriteError::Fenced), "{refused}");
    let fresh = Follower::<s2s_catalog::Catalog>::start(&kafka, &topics.catalog.name, WAIT, &stop)
        .await
        .expect("a reader from scratch");
    let seen = fresh.catalog();
    assert!(seen.get(&key("affiliate/a2")).is_some());
    assert!(
        seen.get(&key("affiliate/a3")).is_none(),
        "the fenced change is not in the catalog as read"
    );
    stop.cancel();
}
