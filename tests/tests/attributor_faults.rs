//! The attributor against librdkafka's MockCluster, which can fail requests on command. A
//! publish that fails after the cycle's journal was written stops the service without
//! committing; the restarted instance replays exactly that cycle — the same records and
//! the same `now` — so the outcome carries the processing time of the failed attempt.

use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use s2s_attributor::store::{Store, StoreLimits};
use s2s_tests::{attributor_config, topics, TopicReader};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_publish_commits_nothing_and_the_journal_replays_the_cycle() {
    let mock: MockCluster<'static, DefaultProducerContext> =
        MockCluster::new(1).expect("mock cluster");
    let mut topics = topics(1);
    topics.create = false;
    for t in topics.all() {
        mock.create_topic(&t.name, t.partitions, 1).expect("topic");
    }
    let state = tempfile::tempdir().expect("tempdir");
    let mut config = attributor_config(&topics, state.path());
    config.kafka.bootstrap_servers = mock.bootstrap_servers();
    config
        .kafka
        .properties
        .insert("message.timeout.ms".into(), "3000".into());

    // A click and its postback, stored before anything fails.
    let mut producer_config = config.kafka.clone();
    producer_config.properties.clear();
    let producer: rdkafka::producer::FutureProducer = producer_config
        .producer_config()
        .create()
        .expect("producer");
    let now = s2s_common::now_ms();
    let records = [
        (
            &topics.clicks.name,
            json!({"schema_version": 1, "click_id": "m1", "offer_id": "1",
            "aff_id": "42", "ip": null, "user_agent": null, "referrer": null, "ts_ms": now}),
        ),
        (
            &topics.postbacks.name,
            json!({"schema_version": 1, "postback_id": "mp1",
            "click_id": "m1", "event": "ftd", "txn_id": null, "amount": null, "currency": null,
            "status": "approved", "source": null, "ip": null, "ts_ms": now}),
        ),
    ];
    for (topic, v) in &records {
        let payload = v.to_string();
        producer
            .send(
                rdkafka::producer::FutureRecord::to(topic)
                    .key("m1")
                    .payload(&payload),
                WAIT,
            )
            .await
            .expect("input stored");
    }

    // Every produce request from now on fails permanently.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE; 200],
    );
    let failing = s2s_attributor::Attributor::bind(config.clone())
        .await
        .expect("starts");
    let result = tokio::time::timeout(WAIT, failing.run(CancellationToken::new()))
        .await
        .expect("stops on its own");
    let err = result.expect_err("a failed publish stops the service");
    assert!(
        err.to_string().contains("publishing outcomes failed"),
        "{err}"
    );

    // Nothing was committed; the journal of the failed cycle is there.
    let journal = {
        let store = Store::open(
            &state.path().join("partition-0"),
            StoreLimits {
                block_cache_bytes: 8 << 20,
                write_buffer_bytes: 4 << 20,
                click_retention_ms: i64::MAX,
                conversion_retention_ms: i64::MAX,
            },
        )
        .expect("open the store");
        assert_eq!(store.offset(&topics.postbacks.name).expect("offset"), None);
        store
            .journal()
            .expect("read")
            .expect("journal of the failed cycle")
    };
    assert_eq!(journal.ends.get(&topics.postbacks.name), Some(&1));

    mock.clear_request_errors(RDKafkaApiKey::Produce);
    let restarted_at = s2s_common::now_ms();
    assert!(restarted_at > journal.now_ms);
    // A new group, so the restart does not wait for the mock to expire the failed
    // member's session; where to start comes from the store either way.
    config.group_id = s2s_tests::unique("attributor");
    let again = s2s_attributor::Attributor::bind(config)
        .await
        .expect("restarts");
    let stop = CancellationToken::new();
    let task = tokio::spawn(again.run(stop.clone()));
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
    stop.cancel();
    task.await.expect("join").expect("stops cleanly");
}
