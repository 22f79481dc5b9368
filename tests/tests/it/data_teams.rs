//! The data teams' consumer example (`examples/consume_conversions.py`, Python with
//! confluent-kafka, as the README shows it) against the real broker: it reads
//! `read_committed`, routes on the `s2s-kind` header, validates each conversion against
//! `schemas/conversion.schema.json`, skips what is invalid, and keeps the latest version
//! of each conversion. scripts/test installs its Python packages.

use std::path::Path;
use std::time::Duration;

use rust_decimal::Decimal;
use s2s_common::contract::{Conversion, RejectReason};
use s2s_common::fixtures;
use s2s_common::kafka::{produce_all, OutRecord};
use s2s_common::topics::partition_key;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_example_keeps_the_latest_valid_version_of_each_conversion() {
    let topic = s2s_tests::unique("conversions");
    s2s_tests::create_topic(&topic, 2).await;
    let first = fixtures::conversion("cv-1", "c1");
    let reversed = Conversion {
        version: 2,
        status: "reversed".into(),
        previous_status: Some("approved".into()),
        payout: Decimal::ZERO,
        payout_delta: Decimal::new(-5_000, 2),
        outcome_id: fixtures::outcome_id("pb-reversal"),
        postback_id: "pb-reversal".into(),
        ..first.clone()
    };
    let other = fixtures::conversion("cv-2", "c2");
    let rejection = fixtures::rejection(fixtures::postback("pb-3", "c3"), RejectReason::Duplicate);
    // A conversion's headers on a payload its schema refuses (money as a float).
    let mut invalid = OutRecord::record(&topic, b"c4", &fixtures::conversion("cv-4", "c4"));
    invalid.payload =
        Some(br#"{"schema_version":1,"conversion_id":"cv-4","version":1,"payout":12.5}"#.to_vec());
    let records = vec![
        OutRecord::record(&topic, partition_key("c1"), &first),
        OutRecord::record(&topic, partition_key("c1"), &reversed),
        OutRecord::record(&topic, partition_key("c2"), &other),
        OutRecord::record(&topic, partition_key("c3"), &rejection),
        invalid,
    ];
    let producer: rdkafka::producer::FutureProducer = s2s_tests::kafka()
        .producer_config()
        .create()
        .expect("producer");
    produce_all(&producer, &records).await.expect("stored");

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/consume_conversions.py");
    let run = tokio::process::Command::new("python3")
        .arg(&script)
        .args([
            "--brokers",
            &s2s_tests::brokers(),
            "--topic",
            &topic,
            "--until-end",
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the example reaches the end of the topic within 60 s")
        .expect("python3 runs (scripts/test installs confluent-kafka and jsonschema)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let latest: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON conversion per line"))
        .collect();
    let summary: Vec<(&str, u64, &str)> = latest
        .iter()
        .map(|c| {
            (
                c["conversion_id"].as_str().unwrap_or_default(),
                c["version"].as_u64().unwrap_or_default(),
                c["status"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(summary, [("cv-1", 2, "reversed"), ("cv-2", 1, "approved")]);
    assert_eq!(latest[0]["payout_delta"], "-50.00");
    assert!(
        stderr.contains("5 records, 2 conversions, 1 invalid, 1 not conversions"),
        "{stderr}"
    );
    assert!(stderr.contains("invalid record at"), "{stderr}");
}
