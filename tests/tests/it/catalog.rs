//! The catalog on the real broker: a compacted topic as the store of record, read to its
//! end at start-up, followed live; changes checked against their base revision before
//! they are appended, so the topic holds only accepted changes; every accepted change in
//! the audit topic; one writer elected at a time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::Message;
use s2s_catalog::{
    AuditRecord, Catalog, Change, Conflict, Election, Follower, Key, Kind, WriteError, Writer,
};
use s2s_common::topics::TopicsConfig;
use s2s_tests::{kafka, poll_until, topics, TopicReader};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

async fn provisioned() -> TopicsConfig {
    let topics = topics(1);
    s2s_common::kafka::ensure_topics(&kafka(), &topics, WAIT)
        .await
        .expect("topics");
    topics
}

async fn follower(topics: &TopicsConfig, shutdown: &CancellationToken) -> Arc<Follower> {
    Arc::new(
        Follower::start(&kafka(), &topics.catalog.name, WAIT, shutdown)
            .await
            .expect("the catalog read to its end"),
    )
}

fn change(key: &str, base: Option<i64>, document: Option<Value>) -> Change {
    Change {
        key: key.parse().expect("key"),
        base,
        document,
        changed_by: "ops-1".into(),
        changed_at_ms: s2s_common::now_ms(),
        reason: Some("test".into()),
    }
}

fn key(s: &str) -> Key {
    s.parse().expect("key")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_accepted_changes_reach_the_topic_and_every_reader_builds_the_same_catalog() {
    let topics = provisioned().await;
    let shutdown = CancellationToken::new();
    let since = Instant::now();
    let a = follower(&topics, &shutdown).await;
    assert!(a.catalog().is_empty(), "an empty topic is read to its end");
    let w = Writer::new(
        &kafka(),
        &topics.catalog.name,
        &topics.catalog_audit.name,
        Arc::clone(&a),
        WAIT,
    )
    .expect("writer");

    let doc = |name: &str| json!({ "name": name, "status": "active" });
    let created = w
        .write(change("affiliate/a1", None, Some(doc("Alpha"))), since)
        .await
        .expect("created");
    let r1 = created.revision;
    assert_eq!(
        created.entry.as_ref().map(|e| &e.stored.document),
        Some(&doc("Alpha")),
        "the write returns what the catalog now holds"
    );
    let r2 = w
        .write(
            change("affiliate/a1", Some(r1), Some(doc("Alpha 2"))),
            since,
        )
        .await
        .expect("updated")
        .revision;
    assert!(r2 > r1);

    let mut accepted = vec![r1, r2];
    let refused = [
        change("affiliate/a1", Some(r1), Some(doc("stale"))),
        change("affiliate/a1", None, Some(doc("again"))),
        change("affiliate/nobody", Some(r2), None),
    ];
    for c in refused {
        match w.write(c.clone(), since).await {
            Err(WriteError::Conflict(Conflict::Stale { current, .. })) => assert_eq!(current, r2),
            Err(WriteError::Conflict(Conflict::Exists { revision, .. })) => {
                assert_eq!(revision, r2)
            }
            Err(WriteError::Conflict(Conflict::Missing { .. })) => {}
            other => panic!("{c:?} was not refused: {other:?}"),
        }
    }
    let deleted = w
        .write(change("affiliate/a1", Some(r2), None), since)
        .await
        .expect("deleted");
    assert_eq!(deleted.entry, None);
    accepted.push(deleted.revision);
    let offer = w
        .write(
            change(
                "offer/o1",
                None,
                Some(json!({ "url": "https://o.example/?c={click_id}" })),
            ),
            since,
        )
        .await
        .expect("created");
    accepted.push(offer.revision);
    assert_eq!(a.catalog().get(&key("affiliate/a1")), None);
    assert_eq!(a.catalog().list(Kind::Offer).count(), 1);

    // The topic holds exactly the accepted changes, in order.
    let raw = TopicReader::new(&topics.catalog)
        .read_raw_until("the accepted changes", WAIT, |seen| {
            seen.iter().any(|m| m.offset() == offer.revision)
        })
        .await;
    let offsets: Vec<i64> = raw.iter().map(|m| m.offset()).collect();
    assert_eq!(offsets, accepted, "no refused change was appended");
    assert!(
        raw[2].payload().is_none(),
        "a delete is a tombstone: {:?}",
        raw[2].payload()
    );

    // A reader from scratch builds the same catalog as the writer's.
    let b = follower(&topics, &shutdown).await;
    assert_eq!(*b.catalog(), *a.catalog());

    // Every accepted change has its audit record: revision, the one it replaced, who, why.
    let audit: Vec<AuditRecord> = TopicReader::new(&topics.catalog_audit)
        .read_until(
            "one audit record per change",
            WAIT,
            |seen: &[AuditRecord]| seen.len() >= accepted.len(),
        )
        .await;
    let trail: Vec<(i64, Option<i64>, bool)> = audit
        .iter()
        .map(|r| (r.revision, r.previous, r.document.is_some()))
        .collect();
    assert_eq!(
        trail,
        [
            (r1, None, true),
            (r2, Some(r1), true),
            (deleted.revision, Some(r2), false),
            (offer.revision, None, true)
        ]
    );
    assert!(audit
        .iter()
        .all(|r| r.changed_by == "ops-1" && r.reason.as_deref() == Some("test")));
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_reaches_every_follower_within_a_second() {
    let topics = provisioned().await;
    let shutdown = CancellationToken::new();
    let since = Instant::now();
    let writer_side = follower(&topics, &shutdown).await;
    let w = Writer::new(
        &kafka(),
        &topics.catalog.name,
        &topics.catalog_audit.name,
        writer_side,
        WAIT,
    )
    .expect("writer");
    let others = [
        follower(&topics, &shutdown).await,
        follower(&topics, &shutdown).await,
    ];
    let mut worst = Duration::ZERO;
    let mut base = None;
    for i in 0..5 {
        let started = Instant::now();
        let written = w
            .write(
                change(
                    "postback/p1",
                    base,
                    Some(json!({ "url": format!("https://a.example/{i}") })),
                ),
                since,
            )
            .await
            .expect("written");
        for f in &others {
            let c: Arc<Catalog> = f
                .reached(written.revision + 1, Duration::from_secs(1))
                .await
                .expect("applied within 1 s of the write");
            assert_eq!(
                c.get(&key("postback/p1")).map(|e| e.revision),
                Some(written.revision)
            );
        }
        worst = worst.max(started.elapsed());
        base = Some(written.revision);
    }
    println!("worst time from a write's start to applied by every follower: {worst:?}");
    shutdown.cancel();
}

/// One writer at a time: of two candidates exactly one is elected; when it leaves, the
/// other takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_candidate_is_the_writer_and_another_takes_over_when_it_leaves() {
    let topics = provisioned().await;
    let group = s2s_tests::unique("catalog-writer");
    let shutdown = CancellationToken::new();
    let join =
        || Election::join(&kafka(), &group, &topics.catalog.name, &shutdown).expect("joined");
    let (a, b) = (join(), join());
    let leaders = |a: &Election, b: &Election| [a.is_leader(), b.is_leader()];
    let first = poll_until("a writer elected", WAIT, || async {
        match leaders(&a, &b) {
            [true, false] => Some(0),
            [false, true] => Some(1),
            _ => None,
        }
    })
    .await;
    let (gone, stays) = if first == 0 { (a, b) } else { (b, a) };
    assert!(gone.leader_since().is_some() && stays.leader_since().is_none());
    drop(gone);
    poll_until("the other candidate elected", WAIT, || async {
        stays.is_leader().then_some(())
    })
    .await;
    shutdown.cancel();
}
