//! The attributor against librdkafka's MockCluster, which can fail requests on command and
//! accepts transactions. It writes no commit/abort markers (aborted records stay visible
//! there) and it answers TxnOffsetCommit without storing the offsets (librdkafka 2.12.1
//! `rd_kafka_mock_handle_TxnOffsetCommit`), so these tests check what the service
//! committed — the offsets in its store, written only after the transaction committed,
//! its transaction counters, its own verdict — not a read_committed reader's view or the
//! group's offsets.
//!
//! - at_least_once: a publish that fails after the cycle's journal was written stops the
//!   service without committing; the restarted instance replays exactly that cycle.
//! - exactly_once: outputs, changelog and input offsets commit in one transaction; a
//!   failure inside the transaction aborts it and commits nothing; transient EndTxn errors
//!   are retried; a second instance with the same transactional.id fences the first.

use std::time::Duration;

use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use s2s_attributor::store::{Store, StoreLimits};
use s2s_attributor::{AttributorConfig, Guarantee};
use s2s_common::contract::{encode, Click, Postback};
use s2s_common::fixtures;
use s2s_common::topics::TopicsConfig;
use s2s_tests::{attributor_config, metric, poll_until, topics, Mock, RunningService, TopicReader};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// A one-broker mock with the pipeline's topics (one partition each) created on it.
fn mock() -> (Mock, TopicsConfig) {
    s2s_tests::mock_with_topics(1)
}

fn config_on(mock: &Mock, topics: &TopicsConfig, state: &std::path::Path) -> AttributorConfig {
    let mut config = attributor_config(topics, state);
    config.pipeline.kafka.bootstrap_servers = mock.bootstrap_servers();
    config
        .pipeline
        .kafka
        .properties
        .insert("message.timeout.ms".into(), "3000".into());
    config
}

fn exactly_once(mut config: AttributorConfig, transactional_id: &str) -> AttributorConfig {
    config.processing_guarantee = Guarantee::ExactlyOnce;
    config.transactional_id = Some(transactional_id.to_string());
    config
}

/// Writes one record with a plain producer.
async fn send_record(mock: &Mock, topic: &str, key: &str, payload: Vec<u8>) {
    let mut kafka = s2s_tests::kafka();
    kafka.bootstrap_servers = mock.bootstrap_servers();
    let producer: rdkafka::producer::FutureProducer =
        kafka.producer_config().create().expect("producer");
    producer
        .send(
            rdkafka::producer::FutureRecord::to(topic)
                .key(key)
                .payload(&payload),
            WAIT,
        )
        .await
        .expect("input stored");
}

/// A click on offer 1 now.
fn click(click_id: &str) -> Vec<u8> {
    encode(&Click {
        ts_ms: s2s_common::now_ms(),
        ..fixtures::click(click_id)
    })
}

/// Its approved FTD, now.
fn ftd(click_id: &str, postback_id: &str) -> Vec<u8> {
    encode(&Postback {
        ts_ms: s2s_common::now_ms(),
        ..fixtures::postback(postback_id, click_id)
    })
}

/// Writes a click and its FTD postback (`postback_id`).
async fn send_pair(mock: &Mock, topics: &TopicsConfig, click_id: &str, postback_id: &str) {
    send_record(mock, &topics.clicks.name, click_id, click(click_id)).await;
    send_record(
        mock,
        &topics.postbacks.name,
        click_id,
        ftd(click_id, postback_id),
    )
    .await;
}

fn open_store(state: &std::path::Path) -> Store {
    Store::open(
        &state.join("partition-0"),
        StoreLimits {
            block_cache_bytes: 8 << 20,
            write_buffer_bytes: 4 << 20,
            click_retention_ms: i64::MAX,
            conversion_retention_ms: i64::MAX,
        },
    )
    .expect("open the store")
}

/// The postbacks offset committed in the store (only while no service holds it open).
fn stored_offset(state: &std::path::Path, topics: &TopicsConfig) -> Option<i64> {
    open_store(state)
        .offset(&topics.postbacks.name)
        .expect("stored offset")
}

/// A mock, a state directory and an exactly_once config for them.
fn exactly_once_on_mock() -> (Mock, TopicsConfig, tempfile::TempDir, AttributorConfig) {
    let (mock, topics) = mock();
    let state = tempfile::tempdir().expect("tempdir");
    let config = exactly_once(
        config_on(&mock, &topics, state.path()),
        &s2s_tests::unique("tx"),
    );
    (mock, topics, state, config)
}

/// Waits until the service reports `n` committed transactions.
async fn committed(admin: std::net::SocketAddr, n: f64) {
    poll_until("committed transactions", WAIT, || async {
        let got = metric(
            admin,
            "stream_transactions_total{result=\"committed\",service=\"attributor\"}",
        )
        .await;
        (got >= Some(n)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_publish_commits_nothing_and_the_journal_replays_the_cycle() {
    let (mock, topics) = mock();
    let state = tempfile::tempdir().expect("tempdir");
    let mut config = config_on(&mock, &topics, state.path());
    // First the click alone, processed and committed, so that the failing cycle below
    // holds exactly the postback (a cycle with no outputs writes no journal).
    let running = RunningService::attributor(config.clone()).await;
    let admin = running.admin;
    send_record(&mock, &topics.clicks.name, "m1", click("m1")).await;
    poll_until("the click committed", WAIT, || async {
        let n = metric(
            admin,
            "stream_records_consumed_total{input=\"click\",service=\"attributor\"}",
        )
        .await;
        (n == Some(1.0)).then_some(())
    })
    .await;
    running.stop().await;
    send_record(&mock, &topics.postbacks.name, "m1", ftd("m1", "mp1")).await;
    // Each start below joins a new group: the mock is slow to hand a departed member's
    // partitions to a newcomer, and the store decides where reading starts anyway.
    config.group_id = s2s_tests::unique("attributor");

    // Every produce request from now on fails permanently.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE; 200],
    );
    let err = RunningService::attributor(config.clone())
        .await
        .failure(WAIT)
        .await;
    assert!(
        matches!(err, s2s_state::RuntimeError::Publish(_)),
        "stopped because publishing failed: {err}"
    );

    // Nothing was committed; the journal of the failed cycle is there.
    let journal = {
        let store = open_store(state.path());
        assert_eq!(store.offset(&topics.postbacks.name).expect("offset"), None);
        store
            .journal::<s2s_state::runtime::Journal>()
            .expect("read")
            .expect("journal of the failed cycle")
    };
    assert_eq!(journal.ends.get(&topics.postbacks.name), Some(&1));

    mock.clear_request_errors(RDKafkaApiKey::Produce);
    let restarted_at = s2s_common::now_ms();
    assert!(restarted_at > journal.now_ms);
    config.group_id = s2s_tests::unique("attributor");
    let running = RunningService::attributor(config).await;
    let out: Vec<Value> = TopicReader::on(&mock.bootstrap_servers(), &topics.conversions)
        .read_until("the replayed conversion", WAIT, |seen: &[Value]| {
            !seen.is_empty()
        })
        .await;
    assert_eq!(out[0]["postback_id"], "mp1");
    assert_eq!(
        out[0]["attributed_at_ms"], journal.now_ms,
        "the replay used the failed cycle's time, not the restart's"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_commits_outputs_changelog_and_offsets_in_one_transaction() {
    let (mock, topics, state, config) = exactly_once_on_mock();
    let running = RunningService::attributor(config.clone()).await;
    let admin = running.admin;
    send_pair(&mock, &topics, "e1", "ep1").await;

    let out: Vec<Value> = TopicReader::on(&mock.bootstrap_servers(), &topics.conversions)
        .read_until("the conversion", WAIT, |seen: &[Value]| !seen.is_empty())
        .await;
    assert_eq!(out[0]["postback_id"], "ep1");
    let changelog: Vec<_> = TopicReader::on(&mock.bootstrap_servers(), &topics.changelog)
        .read_raw_until("changelog records", WAIT, |seen| seen.len() >= 2)
        .await;
    assert!(
        changelog.len() >= 2,
        "state changes logged in the transaction"
    );
    committed(admin, 1.0).await;
    running.stop().await;
    assert_eq!(stored_offset(state.path(), &topics), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_inside_the_transaction_aborts_it_and_commits_nothing() {
    let (mock, topics, state, config) = exactly_once_on_mock();
    send_pair(&mock, &topics, "a1", "ap1").await;
    // Adding the output partitions to the transaction is refused: an abortable error.
    mock.request_errors(
        RDKafkaApiKey::AddPartitionsToTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 50],
    );
    let err = RunningService::attributor(config.clone())
        .await
        .failure(WAIT)
        .await;
    assert!(err.to_string().contains("failed"), "{err}");
    assert_eq!(stored_offset(state.path(), &topics), None);

    mock.clear_request_errors(RDKafkaApiKey::AddPartitionsToTxn);
    let mut config = config;
    config.group_id = s2s_tests::unique("attributor");
    let running = RunningService::attributor(config.clone()).await;
    let admin = running.admin;
    committed(admin, 1.0).await;
    running.stop().await;
    assert_eq!(stored_offset(state.path(), &topics), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_end_txn_errors_are_retried_and_the_cycle_commits() {
    let (mock, topics, state, config) = exactly_once_on_mock();
    let running = RunningService::attributor(config.clone()).await;
    let admin = running.admin;
    mock.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE; 2],
    );
    send_pair(&mock, &topics, "t1", "tp1").await;
    committed(admin, 1.0).await;
    let aborted = metric(
        admin,
        "stream_transactions_total{result=\"aborted\",service=\"attributor\"}",
    )
    .await;
    assert_eq!(aborted, Some(0.0), "nothing aborted");
    running.stop().await;
    assert_eq!(stored_offset(state.path(), &topics), Some(1));
}

/// Fencing needs a broker that bumps the epoch of a transactional.id on InitProducerId.
/// MockCluster (librdkafka 2.12.1) hands out a new producer ID per InitProducerId instead
/// (`rd_kafka_mock_handle_InitProducerId`), so there the first instance keeps committing:
/// measured, see the README. Run this by hand against Apache Kafka:
/// `S2S_TEST_TXN_BROKERS=host:9092 cargo test --workspace --test it -- --ignored attributor_faults::`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker with transactional.id fencing (Apache Kafka): S2S_TEST_TXN_BROKERS"]
async fn a_second_instance_with_the_same_transactional_id_fences_the_first() {
    let brokers = std::env::var("S2S_TEST_TXN_BROKERS")
        .expect("S2S_TEST_TXN_BROKERS names an Apache Kafka with transactions");
    let topics = topics(1);
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let on_kafka = |dir: &std::path::Path| {
        let mut c = attributor_config(&topics, dir);
        c.pipeline.kafka.bootstrap_servers = brokers.clone();
        c
    };
    let id = s2s_tests::unique("tx");
    let zombie = RunningService::attributor(exactly_once(on_kafka(dir_a.path()), &id)).await;
    let producer: rdkafka::producer::FutureProducer = {
        let mut k = s2s_tests::kafka();
        k.bootstrap_servers = brokers.clone();
        k.producer_config().create().expect("producer")
    };
    let send = |click_id: &'static str, postback_id: &'static str| {
        let records = [
            (topics.clicks.name.clone(), click(click_id)),
            (topics.postbacks.name.clone(), ftd(click_id, postback_id)),
        ];
        let producer = producer.clone();
        async move {
            for (topic, payload) in records {
                producer
                    .send(
                        rdkafka::producer::FutureRecord::to(&topic)
                            .key(click_id)
                            .payload(&payload),
                        WAIT,
                    )
                    .await
                    .expect("input stored");
            }
        }
    };
    send("z1", "zp1").await;
    let reader = TopicReader::on(&brokers, &topics.conversions);
    reader
        .read_until("A's first conversion", WAIT, |seen: &[Value]| {
            !seen.is_empty()
        })
        .await;

    // B takes over the transactional.id (its own group, so both read the next input).
    let successor = RunningService::attributor(exactly_once(on_kafka(dir_b.path()), &id)).await;
    send("z2", "zp2").await;

    let err = zombie.failure(WAIT).await;
    assert!(err.to_string().to_lowercase().contains("fenced"), "{err}");
    successor.stop().await;
}

/// A store that has read the changelog further than the broker's log goes (the topics
/// were re-created, or the broker lost its data) stops the service at start-up with an
/// error that names the store and the fix, instead of waiting for records that never come
/// or silently restoring from the beginning of a different log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_ahead_of_the_brokers_changelog_is_named_at_start_up() {
    let (mock, topics) = mock();
    let state = tempfile::tempdir().expect("tempdir");
    open_store(state.path())
        .restore(&[], &topics.changelog.name, 500)
        .expect("a changelog position the broker never had");
    let err = RunningService::attributor(config_on(&mock, &topics, state.path()))
        .await
        .failure(WAIT)
        .await
        .to_string();
    names_the_store_ahead_of_the_changelog(&err, state.path());
}

/// The error names partition 0's store under `state`, the position 500 and the fix.
pub(crate) fn names_the_store_ahead_of_the_changelog(err: &str, state: &std::path::Path) {
    let dir = state.display().to_string();
    assert!(
        err.contains(&format!("{dir}/partition-0"))
            && err.contains("up to offset 500")
            && err.contains("does not have")
            && err.contains(&format!("delete {dir}")),
        "{err}"
    );
}

/// A stored input position before the log's start (retention deleted records the service
/// had not read: here the mock's 5 MiB per-partition log limit drops the oldest) stops the
/// service with what is lost and how to go on; Apache Kafka's way of saying it, "offset
/// out of range", is what the mock answers. `auto.offset.reset = earliest`, set for one
/// start as the error says, goes on from the oldest record the broker holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_position_before_the_log_start_says_what_is_lost_and_how_to_go_on() {
    let (mock, topics) = mock();
    let clicks = topics.clicks.name.clone();
    let mut kafka = s2s_tests::kafka();
    kafka.bootstrap_servers = mock.bootstrap_servers();
    let producer: rdkafka::producer::FutureProducer =
        kafka.producer_config().create().expect("producer");
    let junk = vec![b'x'; 100 << 10];
    for i in 0..60 {
        let key = format!("j{i}");
        producer
            .send(
                rdkafka::producer::FutureRecord::to(&clicks)
                    .key(&key)
                    .payload(&junk),
                WAIT,
            )
            .await
            .expect("stored");
    }
    let state = tempfile::tempdir().expect("tempdir");
    open_store(state.path())
        .restore(&[], &clicks, 1)
        .expect("a clicks position the broker has deleted since");

    let err = RunningService::attributor(config_on(&mock, &topics, state.path()))
        .await
        .failure(WAIT)
        .await;
    assert!(
        matches!(err, s2s_state::RuntimeError::OutOfRange(_)),
        "{err}"
    );
    let err = err.to_string();
    assert!(
        err.contains(&format!(
            "{clicks} partition 0 at offset 1 (before the log's start; the broker reports \
             offsets "
        )) && err.contains("..60)"),
        "{err}"
    );
    assert!(
        err.contains("S2S_KAFKA_PROP_AUTO_OFFSET_RESET=earliest")
            && !err.contains(&format!("delete {}", state.path().display())),
        "{err}"
    );

    let mut earliest = config_on(&mock, &topics, state.path());
    earliest
        .pipeline
        .kafka
        .properties
        .insert("auto.offset.reset".into(), "earliest".into());
    let running = RunningService::attributor(earliest).await;
    send_pair(&mock, &topics, "e1", "ep1").await;
    let out: Vec<Value> = TopicReader::on(&mock.bootstrap_servers(), &topics.conversions)
        .read_until(
            "the conversion after the reset",
            WAIT,
            |seen: &[Value]| !seen.is_empty(),
        )
        .await;
    assert_eq!(out[0]["postback_id"], "ep1");
    running.stop().await;
}
