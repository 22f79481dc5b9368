//! The attributor on the real broker, fed directly with click and postback records (so that
//! the tests control event times and can write records ingest would never accept).
//! Every postback must yield exactly one outcome; undecodable records go to the poison
//! topic; a restart resumes from the offsets stored with the state; a SIGKILL mid-stream
//! loses nothing and a replay repeats outcomes identically.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use rdkafka::message::Message;
use s2s_catalog::file::CatalogFile;
use s2s_common::contract::{encode, Click, Postback};
use s2s_common::fixtures::{self, outcome_id};
use s2s_common::ids::derived;
use s2s_common::topics::TopicsConfig;
use s2s_tests::{
    attributor_config, header, metric, poll_until, topics, ChildService, RawProducer,
    RunningService, TopicReader,
};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

/// (postback ID, click, event, txn_id, status, expected outcome)
type Case<'a> = (&'a str, &'a str, &'a str, Option<&'a str>, &'a str, &'a str);

/// Fresh topics with `partitions` each, created on the broker.
async fn provisioned(partitions: i32) -> TopicsConfig {
    let topics = topics(partitions);
    s2s_common::kafka::ensure_topics(&s2s_tests::kafka(), &topics, WAIT)
        .await
        .expect("topics");
    topics
}

fn click(id: &str, offer: &str, ts_ms: i64) -> Vec<u8> {
    encode(&Click {
        offer_id: offer.into(),
        ts_ms,
        ..fixtures::click(id)
    })
}

fn postback(
    id: &str,
    click: &str,
    event: &str,
    txn: Option<&str>,
    status: &str,
    ts: i64,
) -> Vec<u8> {
    encode(&Postback {
        event: event.into(),
        txn_id: txn.map(str::to_string),
        status: status.into(),
        ts_ms: ts,
        ..fixtures::postback(id, click)
    })
}

/// Reads conversions and rejections until every outcome ID in `want` is there; returns
/// every record read, keyed by outcome ID (repeats kept).
async fn outcomes(topics: &TopicsConfig, want: &BTreeSet<String>) -> BTreeMap<String, Vec<Value>> {
    let reader = TopicReader::all_of(&[&topics.conversions, &topics.rejections]);
    let read: Vec<Value> = reader
        .read_until("an outcome for every postback", WAIT, |seen: &[Value]| {
            let ids: BTreeSet<&str> = seen
                .iter()
                .filter_map(|v| v["outcome_id"].as_str())
                .collect();
            want.iter().all(|id| ids.contains(id.as_str()))
        })
        .await;
    let mut all: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for v in read {
        let id = v["outcome_id"].as_str().unwrap_or_default().to_string();
        all.entry(id).or_default().push(v);
    }
    all
}

#[tokio::test]
async fn every_rule_on_the_real_broker() {
    let topics = topics(3);
    let state = tempfile::tempdir().expect("tempdir");
    let mut config = attributor_config(&topics, state.path());
    config.grace_period = Duration::from_secs(1);
    let offer_7 = s2s_attributor::config::OfferConfig {
        url: "https://offer.example/?c={click_id}".into(),
        currency: Some("USD".into()),
        window: Some(Duration::from_secs(86_400)),
        payouts: [("ftd".to_string(), rust_decimal::Decimal::new(5000, 2))].into(),
        min_click_to_conversion: Some(Duration::from_secs(60)),
        ..Default::default()
    };
    s2s_tests::seed_catalog(
        &topics,
        &CatalogFile {
            offers: [("7".to_string(), offer_7)].into(),
            ..Default::default()
        },
    )
    .await;
    let running = RunningService::attributor(config).await;
    let admin = running.admin;

    let now = s2s_common::now_ms();
    let (hour, day) = (3_600_000, 86_400_000);
    let p = RawProducer::new();
    let (clicks, pbs) = (&topics.clicks.name, &topics.postbacks.name);
    p.send(clicks, "c1", &click("c1", "7", now - hour)).await;
    p.send(clicks, "c2", &click("c2", "7", now - 3 * day)).await;
    p.send(clicks, "c3", &click("c3", "7", now - 1_000)).await;
    // (postback ID, click, event, txn, status) → expected outcome
    let cases: [Case; 10] = [
        (
            "p1",
            "c1",
            "ftd",
            Some("t1"),
            "pending",
            "attributed v1 pending",
        ),
        (
            "p2",
            "c1",
            "ftd",
            Some("t1"),
            "pending",
            "rejected duplicate",
        ),
        (
            "p3",
            "c1",
            "ftd",
            Some("t1"),
            "approved",
            "updated v2 approved",
        ),
        (
            "p4",
            "c1",
            "ftd",
            Some("t2"),
            "approved",
            "rejected duplicate",
        ),
        (
            "p5",
            "c1",
            "deposit",
            Some("d1"),
            "approved",
            "attributed v1 approved",
        ),
        (
            "p6",
            "c1",
            "deposit",
            Some("d2"),
            "approved",
            "attributed v1 approved",
        ),
        (
            "p7",
            "c2",
            "ftd",
            None,
            "approved",
            "rejected outside_window",
        ),
        (
            "p8",
            "c3",
            "ftd",
            None,
            "approved",
            "attributed v1 approved suspicious",
        ),
        (
            "p9",
            "nobody",
            "ftd",
            None,
            "approved",
            "rejected unknown_click",
        ),
        (
            "p10",
            "c4",
            "ftd",
            None,
            "approved",
            "attributed v1 approved",
        ),
    ];
    for (id, c, event, txn, status, _) in &cases {
        p.send(pbs, c, &postback(id, c, event, *txn, status, now))
            .await;
    }
    // c4's click comes after its postback, within the grace period.
    p.send(clicks, "c4", &click("c4", "7", now - hour)).await;
    // Poison: not JSON, and a schema version from the future.
    p.send(pbs, "x", b"not json").await;
    let future = String::from_utf8_lossy(&click("y", "7", now))
        .replace("\"schema_version\":1", "\"schema_version\":9");
    p.send(clicks, "y", future.as_bytes()).await;

    let want: BTreeSet<String> = cases.iter().map(|c| outcome_id(c.0)).collect();
    let all = outcomes(&topics, &want).await;
    for (id, _, _, _, _, expected) in &cases {
        let records = &all[&outcome_id(id)];
        assert_eq!(
            records.len(),
            1,
            "{id}: exactly one outcome, got {records:?}"
        );
        let r = &records[0];
        let got = match r["reason"].as_str() {
            Some(reason) => format!("rejected {reason}"),
            None => format!(
                "{} v{} {}{}",
                if r["version"] == 1 {
                    "attributed"
                } else {
                    "updated"
                },
                r["version"],
                r["status"].as_str().unwrap_or_default(),
                if r["suspicious"] == true {
                    " suspicious"
                } else {
                    ""
                }
            ),
        };
        assert_eq!(&got, expected, "{id}: {r}");
    }
    assert_eq!(
        all.len(),
        cases.len(),
        "no outcome for anything else: {:?}",
        all.keys()
    );
    let p1 = &all[&outcome_id("p1")][0];
    let p3 = &all[&outcome_id("p3")][0];
    assert_eq!(
        p1["conversion_id"], p3["conversion_id"],
        "an update keeps the conversion ID"
    );
    assert_eq!(p1["payout"], "50.00");

    // Every outcome carries headers a consumer can route on without decoding it.
    for (topic, kind) in [
        (&topics.conversions, "conversion"),
        (&topics.rejections, "rejection"),
    ] {
        let raw = TopicReader::new(topic)
            .read_raw_until("outcomes, with their headers", WAIT, |r| !r.is_empty())
            .await;
        for m in &raw {
            let v: Value = serde_json::from_slice(m.payload().unwrap_or_default()).expect("JSON");
            assert_eq!(header(m, "s2s-schema-version").as_deref(), Some("1"));
            assert_eq!(header(m, "s2s-kind").as_deref(), Some(kind));
            assert_eq!(
                header(m, "s2s-outcome-id").as_deref(),
                v["outcome_id"].as_str()
            );
        }
    }

    let poison = TopicReader::new(&topics.poison)
        .read_raw_until("two poison records", WAIT, |r| r.len() >= 2)
        .await;
    let mut reasons: Vec<(String, String)> = poison
        .iter()
        .map(|m| {
            let h = |name: &str| header(m, name).unwrap_or_default();
            (h("s2s-source-topic"), h("s2s-poison-reason"))
        })
        .collect();
    reasons.sort();
    assert!(
        reasons
            .iter()
            .any(|(t, r)| t == pbs && r.contains("not valid JSON")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|(t, r)| t == clicks && r.contains("schema_version 9")),
        "{reasons:?}"
    );
    assert!(
        poison.iter().any(|m| m.payload() == Some(&b"not json"[..])),
        "kept byte for byte"
    );
    assert_eq!(
        metric(
            admin,
            "stream_poison_records_total{input=\"postback\",service=\"attributor\"}"
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(admin, "attributor_suspicious_conversions_total").await,
        Some(1.0)
    );

    running.stop().await;
}

#[tokio::test]
async fn restart_resumes_from_offsets_stored_with_the_state() {
    let topics = provisioned(2).await;
    let state = tempfile::tempdir().expect("tempdir");
    let (clicks, pbs) = (&topics.clicks.name, &topics.postbacks.name);
    let p = RawProducer::new();
    let now = s2s_common::now_ms();
    p.send(clicks, "r1", &click("r1", "1", now)).await;
    p.send(
        pbs,
        "r1",
        &postback("q1", "r1", "ftd", None, "approved", now),
    )
    .await;

    let running = RunningService::attributor(attributor_config(&topics, state.path())).await;
    outcomes(&topics, &[outcome_id("q1")].into()).await;
    running.stop().await;

    // Same state, another consumer group: the group has no offsets, so only the offsets in
    // the store can keep the instance from reading everything again.
    let running = RunningService::attributor(attributor_config(&topics, state.path())).await;
    let admin = running.admin;
    p.send(
        pbs,
        "r1",
        &postback("q2", "r1", "registration", None, "approved", now),
    )
    .await;
    let all = outcomes(&topics, &[outcome_id("q1"), outcome_id("q2")].into()).await;
    assert_eq!(
        all[&outcome_id("q1")].len(),
        1,
        "q1 was not processed again"
    );
    assert_eq!(
        all[&outcome_id("q2")][0]["version"],
        1,
        "attributed with the stored click"
    );
    let series = |kind: &str| {
        format!("stream_records_consumed_total{{input=\"{kind}\",service=\"attributor\"}}")
    };
    assert_eq!(
        metric(admin, &series("postback")).await,
        Some(1.0),
        "only the new postback"
    );
    assert_eq!(
        metric(admin, &series("click")).await,
        Some(0.0),
        "the click was not read again"
    );
    running.stop().await;
}

/// Writes a position for `topic` into partition 0's store under `state`.
fn store_position(state: &Path, topic: &str, offset: i64) {
    s2s_attributor::store::Store::open(
        &state.join("partition-0"),
        s2s_attributor::store::StoreLimits {
            block_cache_bytes: 8 << 20,
            write_buffer_bytes: 4 << 20,
            click_retention_ms: i64::MAX,
            conversion_retention_ms: i64::MAX,
        },
    )
    .expect("open the store")
    .restore(&[], topic, offset)
    .expect("a position the broker never had");
}

/// A store restored from the changelog further than the broker's log goes stops the
/// service at start-up with the store and the fix: Tansu answers a fetch there with
/// nothing, so waiting would never end. (Apache Kafka's "out of range": attributor_faults.)
#[tokio::test]
async fn a_changelog_position_beyond_the_log_is_named_on_the_real_broker() {
    let topics = provisioned(1).await;
    let state = tempfile::tempdir().expect("tempdir");
    RawProducer::new()
        .send(&topics.changelog.name, "k", b"{}")
        .await;
    store_position(state.path(), &topics.changelog.name, 500);
    let err = RunningService::attributor(attributor_config(&topics, state.path()))
        .await
        .failure(WAIT)
        .await
        .to_string();
    crate::attributor_faults::names_the_store_ahead_of_the_changelog(&err, state.path());
    assert!(
        err.contains(&format!(
            "its fetch answers offsets 0..1 for {} partition 0",
            topics.changelog.name
        )),
        "{err}"
    );
}

/// A store whose input position is beyond the broker's log (the topics were re-created, or
/// the broker lost its data) stops the service at start-up with the position, the log's
/// extent and the fix, instead of waiting at the position forever (Tansu answers such a
/// fetch with nothing) or moving silently to one end of a different log; the fix it names
/// works. (A position before the log's start, on the MockCluster: attributor_faults.)
#[tokio::test]
async fn an_input_position_the_broker_does_not_have_is_named_with_the_fix() {
    let topics = provisioned(1).await;
    let state = tempfile::tempdir().expect("tempdir");
    let (clicks, pbs) = (&topics.clicks.name, &topics.postbacks.name);
    let p = RawProducer::new();
    let now = s2s_common::now_ms();
    for id in ["x1", "x2", "x3"] {
        p.send(clicks, id, &click(id, "1", now)).await;
    }
    store_position(state.path(), clicks, 500);

    let err = RunningService::attributor(attributor_config(&topics, state.path()))
        .await
        .failure(WAIT)
        .await;
    assert!(
        matches!(err, s2s_state::RuntimeError::OutOfRange(_)),
        "{err}"
    );
    let (err, dir) = (err.to_string(), state.path().display().to_string());
    assert!(
        err.contains(&format!(
            "{clicks} partition 0 at offset 500 (beyond the log; the broker reports offsets 0.."
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "delete {dir} and empty its changelog topic {}",
            topics.changelog.name
        )),
        "{err}"
    );
    assert!(
        !err.contains(pbs.as_str()),
        "postbacks had no stored position: {err}"
    );

    // The fix the error names: without the state, it is rebuilt from the broker.
    std::fs::remove_dir_all(state.path().join("partition-0")).expect("delete the state");
    let running = RunningService::attributor(attributor_config(&topics, state.path())).await;
    p.send(
        pbs,
        "x3",
        &postback("y3", "x3", "ftd", None, "approved", now),
    )
    .await;
    let got = outcomes(&topics, &[outcome_id("y3")].into()).await;
    assert_eq!(got[&outcome_id("y3")][0]["click_id"], "x3", "{got:?}");
    running.stop().await;
}

/// The child's config, written to `state/attributor.toml`; its pipeline config beside
/// it, where [`ChildService`] points it.
fn child_config(topics: &TopicsConfig, state: &Path) -> std::path::PathBuf {
    s2s_tests::write_pipeline(
        state,
        &s2s_tests::child_pipeline(&s2s_tests::brokers(), topics),
    );
    let mut c = attributor_config(topics, &state.join("state"));
    c.grace_period = Duration::from_secs(2);
    c.commit_interval = Duration::from_millis(50);
    c.max_batch = 200;
    let path = state.join("attributor.toml");
    s2s_tests::write_config(&path, &c);
    path
}

#[tokio::test]
async fn sigkill_mid_stream_loses_nothing_and_replays_identically() {
    const N: usize = 600;
    let topics = topics(3);
    let state = tempfile::tempdir().expect("tempdir");
    let config = child_config(&topics, state.path());

    s2s_common::kafka::ensure_topics(&s2s_tests::kafka(), &topics, WAIT)
        .await
        .expect("topics");

    // The stream: N clicks, each with an FTD; every 10th FTD comes before its click,
    // every 7th postback names a click that never comes. Each record is stamped when it is
    // sent, as ingest would stamp it.
    let mut expected: BTreeMap<String, &'static str> = BTreeMap::new();
    // (is a click, key, click ID or postback ID, target click of a postback)
    let mut records: Vec<(bool, String, String)> = Vec::new();
    for i in 0..N {
        let (c, pb) = (format!("k{i}"), format!("kp{i}"));
        let (target, outcome) = if i % 7 == 0 {
            (format!("u{i}"), "unknown_click")
        } else {
            (c.clone(), "attributed")
        };
        expected.insert(outcome_id(&pb), outcome);
        let post = (false, target, pb);
        let clk = (true, c.clone(), c);
        if i % 10 == 0 {
            records.extend([post, clk]);
        } else {
            records.extend([clk, post]);
        }
    }
    let (clicks, pbs) = (topics.clicks.name.clone(), topics.postbacks.name.clone());
    let feeder = tokio::spawn(async move {
        let p = RawProducer::new();
        for (is_click, key, id) in records {
            let now = s2s_common::now_ms();
            if is_click {
                p.send(&clicks, &key, &click(&id, "1", now)).await;
            } else {
                let payload = postback(&id, &key, "ftd", None, "approved", now);
                p.send(&pbs, &key, &payload).await;
            }
        }
    });

    let (log_first, log_second) = (
        state.path().join("first.log"),
        state.path().join("second.log"),
    );
    let bin = env!("CARGO_BIN_EXE_attributor-under-test");
    let mut first = ChildService::new(bin, config.clone()).with_log(log_first);
    first.start();
    let reader = TopicReader::all_of(&[&topics.conversions, &topics.rejections]);
    reader
        .read_until("the first outcomes", WAIT, |seen: &[Value]| {
            seen.len() >= N / 4
        })
        .await;
    first.kill().await;
    let mut second = ChildService::new(bin, config.clone())
        .with_log(log_second)
        .group_per_start("attributor");
    second.start();
    feeder.await.expect("all records produced");

    let want: BTreeSet<String> = expected.keys().cloned().collect();
    let all = outcomes(&topics, &want).await;
    second.kill().await;

    let mut repeats = 0;
    for (id, records) in &all {
        let Some(decision) = expected.get(id) else {
            panic!("an outcome no postback asked for: {records:?}");
        };
        let strip = |v: &Value| {
            let mut v = v.clone();
            if let Some(o) = v.as_object_mut() {
                o.remove("attributed_at_ms");
                o.remove("rejected_at_ms");
            }
            v
        };
        let first = strip(&records[0]);
        for r in &records[1..] {
            assert_eq!(strip(r), first, "a replay of {id} must repeat the outcome");
            repeats += 1;
        }
        let got = first["reason"].as_str().unwrap_or("attributed");
        assert_eq!(got, *decision, "{id}: {first}");
    }
    assert_eq!(all.len(), N, "one outcome ID per postback");

    // The restart used its local store: at most the one cycle whose changelog records were
    // acknowledged before the kill but were not yet in the store is read back (a cycle
    // holds at most max_batch = 200 records, a click or a conversion each, plus two
    // offsets), never the whole state (about 1 200 records).
    assert!(
        !second.events("partition assigned").is_empty(),
        "the restart's log was captured"
    );
    let restored: u64 = second
        .events("partition state restored from the changelog")
        .iter()
        .filter_map(|f| f["records"].as_u64())
        .sum();
    assert!(
        restored <= 202,
        "restored {restored} records from the changelog"
    );
    println!(
        "sigkill test: {N} postbacks, {} outcome IDs, {repeats} replayed repeats, \
         {restored} changelog records restored",
        all.len()
    );
}

/// Runs an attributor on `state` under a new consumer group.
async fn start(topics: &TopicsConfig, state: &Path) -> RunningService {
    RunningService::attributor(attributor_config(topics, state)).await
}

#[tokio::test]
async fn a_partition_moved_to_another_instance_is_restored_from_the_changelog() {
    let topics = provisioned(2).await;
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let (clicks, pbs) = (&topics.clicks.name, &topics.postbacks.name);
    let p = RawProducer::new();
    let now = s2s_common::now_ms();
    let restored = "stream_restored_records_total{service=\"attributor\"}";
    let consumed = "stream_records_consumed_total{input=\"postback\",service=\"attributor\"}";

    // Instance A sees the click and an FTD.
    let running = start(&topics, dir_a.path()).await;
    let admin = running.admin;
    p.send(clicks, "m1", &click("m1", "1", now)).await;
    p.send(
        pbs,
        "m1",
        &postback("f1", "m1", "ftd", Some("t1"), "approved", now),
    )
    .await;
    outcomes(&topics, &[outcome_id("f1")].into()).await;
    assert_eq!(
        metric(admin, restored).await,
        Some(0.0),
        "a new changelog has nothing"
    );
    running.stop().await;

    // Instance B, with no local state, owns the partitions now: it must know the click, the
    // conversion (for dedup) and where A stopped reading.
    let running = start(&topics, dir_b.path()).await;
    let admin = running.admin;
    p.send(
        pbs,
        "m1",
        &postback("f2", "m1", "ftd", Some("t1"), "approved", now),
    )
    .await;
    p.send(
        pbs,
        "m1",
        &postback("r1", "m1", "registration", None, "approved", now),
    )
    .await;
    let all = outcomes(&topics, &[outcome_id("f2"), outcome_id("r1")].into()).await;
    assert_eq!(
        all[&outcome_id("f2")][0]["reason"],
        "duplicate",
        "dedup state restored"
    );
    assert_eq!(all[&outcome_id("r1")][0]["version"], 1, "click restored");
    assert_eq!(all[&outcome_id("f1")].len(), 1, "f1 not processed again");
    assert_eq!(
        metric(admin, consumed).await,
        Some(2.0),
        "input offsets restored"
    );
    let full = metric(admin, restored).await.unwrap_or(0.0);
    assert!(full >= 3.0, "click, conversion, offsets: {full}");
    running.stop().await;

    // B again on its own, current store: nothing to restore.
    let running = start(&topics, dir_b.path()).await;
    let admin = running.admin;
    p.send(
        pbs,
        "m1",
        &postback("d1", "m1", "deposit", Some("x"), "approved", now),
    )
    .await;
    outcomes(&topics, &[outcome_id("d1")].into()).await;
    assert_eq!(
        metric(admin, restored).await,
        Some(0.0),
        "the local store was current"
    );
    running.stop().await;

    // A again, on its stale store: it reads only what B wrote since, and knows r1.
    let running = start(&topics, dir_a.path()).await;
    let admin = running.admin;
    p.send(
        pbs,
        "m1",
        &postback("r2", "m1", "registration", None, "approved", now),
    )
    .await;
    let all = outcomes(&topics, &[outcome_id("r2")].into()).await;
    assert_eq!(
        all[&outcome_id("r2")][0]["reason"],
        "duplicate",
        "B's conversion restored"
    );
    let delta = metric(admin, restored).await.unwrap_or(0.0);
    assert!(delta >= 1.0, "{delta}");
    assert_eq!(
        metric(admin, consumed).await,
        Some(1.0),
        "A resumed where B stopped"
    );
    running.stop().await;
}

/// Click IDs, one per key, that cover every partition of a `partitions`-partition topic.
fn spread_clicks(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

#[tokio::test]
async fn two_instances_share_the_partitions_and_a_rebalance_restores_state() {
    let topics = provisioned(4).await;
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let group = s2s_tests::unique("attributor");
    let start_in_group = |dir: &Path| {
        let mut c = attributor_config(&topics, dir);
        c.group_id = group.clone();
        c.pipeline
            .kafka
            .properties
            .insert("session.timeout.ms".into(), "6000".into());
        c.pipeline
            .kafka
            .properties
            .insert("heartbeat.interval.ms".into(), "500".into());
        RunningService::attributor(c)
    };
    let (clicks, pbs) = (&topics.clicks.name, &topics.postbacks.name);
    let p = RawProducer::new();
    let now = s2s_common::now_ms();
    let ids = spread_clicks("g", 40);
    let owned = "stream_partitions_owned{service=\"attributor\"}";

    // A alone owns all four partitions and sees every click.
    let a = start_in_group(dir_a.path()).await;
    let admin_a = a.admin;
    for c in &ids {
        p.send(clicks, c, &click(c, "1", now)).await;
    }
    let clicks_seen = "stream_records_consumed_total{input=\"click\",service=\"attributor\"}";
    s2s_tests::poll_until("A to take in every click", WAIT, || async {
        (metric(admin_a, clicks_seen).await == Some(ids.len() as f64)).then_some(())
    })
    .await;

    // B joins: the group splits the partitions, B rebuilds its share from the changelog.
    let b = start_in_group(dir_b.path()).await;
    let admin_b = b.admin;
    s2s_tests::poll_until("a 2/2 split", WAIT, || async {
        let (a, b) = (metric(admin_a, owned).await, metric(admin_b, owned).await);
        (a == Some(2.0) && b == Some(2.0)).then_some(())
    })
    .await;
    for c in &ids {
        let id = format!("{c}-ftd");
        p.send(pbs, c, &postback(&id, c, "ftd", None, "approved", now))
            .await;
    }
    let want: BTreeSet<String> = ids
        .iter()
        .map(|c| outcome_id(&format!("{c}-ftd")))
        .collect();
    let all = outcomes(&topics, &want).await;
    for id in &want {
        assert_eq!(all[id].len(), 1, "one outcome: {:?}", all[id]);
        assert_eq!(
            all[id][0]["version"], 1,
            "attributed, click known: {}",
            all[id][0]
        );
    }
    let restored_b = metric(
        admin_b,
        "stream_restored_records_total{service=\"attributor\"}",
    )
    .await;
    assert!(
        restored_b.unwrap_or(0.0) >= 1.0,
        "B restored: {restored_b:?}"
    );
    let ftd = "attributor_outcomes_total{outcome=\"attributed\",reason=\"none\"}";
    let (by_a, by_b) = (metric(admin_a, ftd).await, metric(admin_b, ftd).await);
    assert!(
        by_a > Some(0.0) && by_b > Some(0.0),
        "both worked: {by_a:?} {by_b:?}"
    );

    // B leaves: A owns everything again and catches up on B's changes to its share.
    b.stop().await;
    s2s_tests::poll_until("A to own all partitions again", WAIT, || async {
        (metric(admin_a, owned).await == Some(4.0)).then_some(())
    })
    .await;
    for c in &ids {
        let id = format!("{c}-ftd-again");
        p.send(pbs, c, &postback(&id, c, "ftd", None, "approved", now))
            .await;
    }
    let want: BTreeSet<String> = ids
        .iter()
        .map(|c| outcome_id(&format!("{c}-ftd-again")))
        .collect();
    let all = outcomes(&topics, &want).await;
    for id in &want {
        assert_eq!(all[id].len(), 1);
        assert_eq!(
            all[id][0]["reason"], "duplicate",
            "B's conversions known to A: {}",
            all[id][0]
        );
    }
    a.stop().await;
}

fn postback_at(id: &str, click: &str, status: &str, ts: i64, event_time: Option<i64>) -> Vec<u8> {
    encode(&Postback {
        status: status.into(),
        ts_ms: ts,
        event_time_ms: event_time,
        ..fixtures::postback(id, click)
    })
}

/// The rules money depends on, on the real broker: a late reversal after the click
/// expired, conflicting click registrations, the transition table, payouts that follow the
/// status, the operator's event time, too-fast policies, holds and unpriced offers.
#[tokio::test]
async fn money_rules_on_the_real_broker() {
    use s2s_attributor::config::{OfferConfig, TooFastConfig};
    let topics = topics(2);
    let state = tempfile::tempdir().expect("tempdir");
    let mut config = attributor_config(&topics, state.path());
    config.grace_period = Duration::from_secs(1);
    // Clicks kept 30 days + 1 day + 1 s: the 46-day-old click below is gone.
    config.pipeline.postbacks.max_event_time_age = Duration::from_secs(86_400);
    let fifty = rust_decimal::Decimal::new(5000, 2);
    let offer = |hold: Option<Duration>, too_fast: TooFastConfig, min: Option<u64>| OfferConfig {
        url: "https://offer.example/?c={click_id}".into(),
        currency: Some("EUR".into()),
        payouts: [("ftd".to_string(), fifty)].into(),
        hold,
        on_too_fast: too_fast,
        min_click_to_conversion: min.map(Duration::from_secs),
        ..Default::default()
    };
    let offers = [
        (
            "7",
            offer(Some(Duration::from_secs(1)), TooFastConfig::Flag, None),
        ),
        ("8", offer(None, TooFastConfig::Reject, Some(60))),
        (
            "9",
            offer(Some(Duration::from_secs(1)), TooFastConfig::Hold, Some(60)),
        ),
    ];
    s2s_tests::seed_catalog(
        &topics,
        &CatalogFile {
            offers: offers
                .into_iter()
                .map(|(id, o)| (id.to_string(), o))
                .collect(),
            ..Default::default()
        },
    )
    .await;
    let running = RunningService::attributor(config).await;
    let admin = running.admin;

    let now = s2s_common::now_ms();
    let day = 86_400_000;
    let p = RawProducer::new();
    let (clicks, pbs) = (&topics.clicks.name, &topics.postbacks.name);
    // Clicks without sub IDs: the conflict's outcome ID below derives from them.
    let on = |id: &str, offer: &str, aff: &str, ts: i64| {
        encode(&Click {
            offer_id: offer.into(),
            aff_id: aff.into(),
            subs: Default::default(),
            ts_ms: ts,
            ..fixtures::click(id)
        })
    };
    // A 30-day-window FTD, reversed 45 days later.
    p.send(clicks, "late", &on("late", "7", "42", now - 46 * day))
        .await;
    p.send(
        pbs,
        "late",
        &postback_at("late-ftd", "late", "approved", now - 45 * day, None),
    )
    .await;
    p.send(
        pbs,
        "late",
        &postback_at("late-rev", "late", "reversed", now, None),
    )
    .await;
    // A click registered twice with another affiliate: the first stays.
    p.send(clicks, "reg", &on("reg", "7", "42", now - day))
        .await;
    p.send(clicks, "reg", &on("reg", "7", "42", now - day))
        .await;
    p.send(clicks, "reg", &on("reg", "7", "thief", now - day))
        .await;
    p.send(
        pbs,
        "reg",
        &postback_at("reg-ftd", "reg", "approved", now, None),
    )
    .await;
    // approved → pending is not in the table; approved → rejected neither.
    p.send(clicks, "tt", &on("tt", "7", "42", now - day)).await;
    p.send(pbs, "tt", &postback_at("tt-1", "tt", "approved", now, None))
        .await;
    p.send(pbs, "tt", &postback_at("tt-2", "tt", "pending", now, None))
        .await;
    // Happened 29.5 days after its click, reported 30.5 days after it.
    p.send(clicks, "et", &on("et", "7", "42", now - 30 * day - day / 2))
        .await;
    p.send(
        pbs,
        "et",
        &postback_at("et-1", "et", "approved", now, Some(now - day)),
    )
    .await;
    p.send(clicks, "nt", &on("nt", "7", "42", now - 30 * day - day / 2))
        .await;
    p.send(pbs, "nt", &postback_at("nt-1", "nt", "approved", now, None))
        .await;
    // Too fast: rejected on offer 8, held on offer 9 (and never approved by its hold).
    p.send(clicks, "f8", &on("f8", "8", "42", now - 1_000))
        .await;
    p.send(pbs, "f8", &postback_at("f8-1", "f8", "approved", now, None))
        .await;
    p.send(clicks, "f9", &on("f9", "9", "42", now - 1_000))
        .await;
    p.send(pbs, "f9", &postback_at("f9-1", "f9", "approved", now, None))
        .await;
    // Pending on offer 7 (hold 1 s): approved by the timer.
    p.send(clicks, "hd", &on("hd", "7", "42", now - day)).await;
    p.send(
        pbs,
        "hd",
        &postback_at("hd-1", "hd", "pending", now - 10_000, None),
    )
    .await;
    // An offer the attributor does not know.
    p.send(clicks, "un", &on("un", "nope", "42", now - day))
        .await;
    p.send(pbs, "un", &postback_at("un-1", "un", "approved", now, None))
        .await;

    let conversion = |click: &str| derived("conversion", &[click, "ftd", ""]);
    let held = derived("outcome", &["hold", &conversion("hd"), "1"]);
    let mut want: BTreeSet<String> = [
        "late-ftd", "late-rev", "reg-ftd", "tt-1", "tt-2", "et-1", "nt-1", "f8-1", "f9-1", "hd-1",
        "un-1",
    ]
    .iter()
    .map(|id| outcome_id(id))
    .collect();
    want.insert(held.clone());
    let day_ago = (now - day).to_string();
    want.insert(derived(
        "click-conflict",
        &["reg", "thief", "7", "", &day_ago],
    ));
    let all = outcomes(&topics, &want).await;
    let one = |id: &str| {
        let records = &all[id];
        assert_eq!(records.len(), 1, "{id}: one outcome, got {records:?}");
        records[0].clone()
    };
    let by_pb = |pb: &str| one(&outcome_id(pb));

    let (ftd, rev) = (by_pb("late-ftd"), by_pb("late-rev"));
    assert_eq!(rev["conversion_id"], ftd["conversion_id"], "{rev}");
    assert_eq!(
        (&rev["version"], &rev["status"], &rev["previous_status"]),
        (&json!(2), &json!("reversed"), &json!("approved")),
        "{rev}"
    );
    assert_eq!(
        (&ftd["payout"], &rev["payout"], &rev["payout_delta"]),
        (&json!("50.00"), &json!("0"), &json!("-50.00")),
        "a reversal pays nothing and takes the payout back"
    );

    let reg = by_pb("reg-ftd");
    assert_eq!(reg["aff_id"], "42", "the first registration stays: {reg}");
    let conflicts: Vec<&Value> = all
        .values()
        .flatten()
        .filter(|r| r["reason"] == "click_conflict")
        .collect();
    assert_eq!(
        conflicts.len(),
        1,
        "the identical replay is no conflict: {conflicts:?}"
    );
    assert_eq!(conflicts[0]["click"]["aff_id"], "thief");

    let tt = by_pb("tt-2");
    assert_eq!(tt["reason"], "invalid_transition", "{tt}");
    assert!(
        tt["detail"]
            .as_str()
            .is_some_and(|d| d.contains("from 'approved' to 'pending'")),
        "{tt}"
    );

    let et = by_pb("et-1");
    assert_eq!(
        (&et["version"], &et["event_ts_ms"], &et["received_ts_ms"]),
        (&json!(1), &json!(now - day), &json!(now)),
        "judged on the operator's event time: {et}"
    );
    assert_eq!(by_pb("nt-1")["reason"], "outside_window");

    assert_eq!(by_pb("f8-1")["reason"], "too_fast");
    let f9 = by_pb("f9-1");
    assert_eq!(
        (&f9["status"], &f9["status_reason"], &f9["suspicious"]),
        (&json!("pending"), &json!("suspicious"), &json!(true)),
        "{f9}"
    );

    let approved = one(&held);
    assert_eq!(
        (
            &approved["version"],
            &approved["status"],
            &approved["status_reason"]
        ),
        (&json!(2), &json!("approved"), &json!("hold_ended")),
        "{approved}"
    );
    assert_eq!(approved["conversion_id"], json!(conversion("hd")));

    let un = by_pb("un-1");
    assert_eq!(
        (&un["payout"], &un["payout_rule"], &un["payout_currency"]),
        (&json!("0"), &json!("unknown_offer"), &json!("USD")),
        "{un}"
    );
    // Counted once the cycle that published them is committed.
    for series in [
        "attributor_unpriced_conversions_total{rule=\"unknown_offer\"}",
        "attributor_outcomes_total{outcome=\"updated\",reason=\"hold_ended\"}",
        "attributor_outcomes_total{outcome=\"rejected\",reason=\"click_conflict\"}",
        "attributor_outcomes_total{outcome=\"rejected\",reason=\"too_fast\"}",
        "attributor_outcomes_total{outcome=\"rejected\",reason=\"invalid_transition\"}",
    ] {
        poll_until(series, WAIT, || async {
            (metric(admin, series).await == Some(1.0)).then_some(())
        })
        .await;
    }
    running.stop().await;
}
