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

pub(crate) fn change(key: &str, base: Option<i64>, document: Option<Value>) -> Change {
    Change {
        key: key.parse().expect("key"),
        base,
        document,
        changed_by: "ops-1".into(),
        changed_at_ms: s2s_common::now_ms(),
        reason: Some("test".into()),
    }
}

pub(crate) fn key(s: &str) -> Key {
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

/// A console instance serving the catalog API.
struct ApiConsole {
    url: String,
    running: s2s_tests::RunningService,
}

async fn console(topics: &TopicsConfig, group: &str, state: &std::path::Path) -> ApiConsole {
    console_with(topics, group, state, false).await
}

/// A console instance; `advertised`: on a port chosen first, announced as its URL when it
/// is elected writer (the others forward changes to it).
async fn console_with(
    topics: &TopicsConfig,
    group: &str,
    state: &std::path::Path,
    advertised: bool,
) -> ApiConsole {
    let mut config = s2s_tests::console_config(topics, state);
    config.group_id = group.to_string();
    if advertised {
        // A free port, taken again at once by the console.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        config.listen = addr;
        config.advertised_url = Some(format!("http://{addr}"));
    }
    let console = s2s_console::Console::bind(config)
        .await
        .expect("the console starts");
    let url = format!("http://{}", console.local_addr().expect("addr"));
    let admin = console.admin_addr().expect("admin");
    ApiConsole {
        url,
        running: s2s_tests::Running::spawn(admin, |stop| console.run(stop)),
    }
}

/// A console's answer to `GET {url}` as operator "tester".
pub(crate) async fn console_get(url: String) -> Value {
    s2s_tests::http()
        .get(url)
        .bearer_auth(s2s_tests::CONSOLE_TOKEN)
        .send()
        .await
        .expect("answer")
        .json()
        .await
        .expect("JSON")
}

/// The catalog part of a console's `/api/v1/status`.
async fn status(c: &ApiConsole) -> Value {
    console_get(format!("{}/api/v1/status", c.url)).await["catalog"].clone()
}

/// Waits until the service whose admin listener is `admin` applies catalog `revision`.
pub(crate) async fn applied(admin: std::net::SocketAddr, service: &str, revision: i64) {
    let gauge = format!("{service}_catalog_revision");
    poll_until(
        &format!("{service} applies revision {revision}"),
        WAIT,
        || async {
            let r = s2s_tests::metric(admin, &gauge).await?;
            (r >= revision as f64).then_some(())
        },
    )
    .await;
}

/// One request to the catalog API as operator "tester"; the status, ETag and body.
async fn call(
    c: &ApiConsole,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Option<String>, Value) {
    let mut req = s2s_tests::http()
        .request(method, format!("{}/api/v1/catalog/{path}", c.url))
        .bearer_auth(s2s_tests::CONSOLE_TOKEN);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("answer");
    let status = resp.status().as_u16();
    let etag = resp
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let retry = resp.headers().get("retry-after").is_some();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if status == 503 {
        assert!(retry, "a 503 says when to retry: {body}");
    }
    (status, etag, body)
}

/// The management API on two console instances: one writes, the other answers 503 until
/// it does and shows each change within a second; `ETag` / `If-Match` with 409 on a stale
/// revision (two changes racing on one revision: exactly one wins); the history; the
/// catalog topic holds only the accepted changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_changes_the_catalog_through_one_writer_with_revisions() {
    use reqwest::Method;
    let topics = provisioned().await;
    let group = s2s_tests::unique("console");
    let (sa, sb) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let a = console(&topics, &group, sa.path()).await;
    let b = console(&topics, &group, sb.path()).await;
    let create = json!({ "document": { "name": "Alpha", "status": "active" }, "reason": "new" });
    // Both take part and exactly one writes: the group is settled (a member joining later
    // would move the partition, and with it the writer).
    let (writer, other) = poll_until("a writer elected among both", WAIT, || async {
        let (sa, sb) = (status(&a).await, status(&b).await);
        let both = sa["candidate"] == true && sb["candidate"] == true;
        match (both, sa["writer"] == true, sb["writer"] == true) {
            (true, true, false) => Some((&a, &b)),
            (true, false, true) => Some((&b, &a)),
            _ => None,
        }
    })
    .await;
    let (status_code, etag, body) = call(
        writer,
        Method::PUT,
        "affiliate/a1",
        &[("if-none-match", "*")],
        Some(create.clone()),
    )
    .await;
    assert_eq!(status_code, 201, "{body}");
    let etag = etag.expect("an ETag");
    let (status, _, body) = call(
        other,
        Method::PUT,
        "affiliate/a2",
        &[("if-none-match", "*")],
        Some(create.clone()),
    )
    .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (503, &json!("not_the_writer"))
    );
    let seen = poll_until(
        "the other instance shows the change",
        Duration::from_secs(1),
        || async {
            let (status, e, body) = call(other, Method::GET, "affiliate/a1", &[], None).await;
            (status == 200).then_some((e, body))
        },
    )
    .await;
    assert_eq!(seen.0.as_deref(), Some(etag.as_str()));
    assert_eq!(seen.1["document"]["name"], "Alpha");
    assert_eq!(seen.1["changed_by"], "tester");

    // Preconditions.
    let change = |name: &str| json!({ "document": { "name": name, "status": "paused" }, "reason": "review" });
    let (status, _, _) = call(writer, Method::PUT, "affiliate/a1", &[], Some(change("x"))).await;
    assert_eq!(status, 428);
    let (status, _, body) = call(
        writer,
        Method::PUT,
        "affiliate/a1",
        &[("if-none-match", "*")],
        Some(change("x")),
    )
    .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("conflict")),
        "{body}"
    );
    let (status, _, _) = call(writer, Method::DELETE, "affiliate/a1", &[], None).await;
    assert_eq!(status, 428);

    // Two changes racing on one revision: exactly one wins.
    let stale = [("if-match", etag.as_str())];
    let (first, second) = tokio::join!(
        call(
            writer,
            Method::PUT,
            "affiliate/a1",
            &stale,
            Some(change("one"))
        ),
        call(
            writer,
            Method::PUT,
            "affiliate/a1",
            &stale,
            Some(change("two"))
        ),
    );
    let mut statuses = [first.0, second.0];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 409], "{first:?} {second:?}");
    let winner = if first.0 == 200 { first } else { second };
    let current = winner.1.expect("an ETag");
    assert_ne!(current, etag);

    let (status, _, _) = call(
        writer,
        Method::DELETE,
        "affiliate/a1",
        &[("if-match", &etag)],
        None,
    )
    .await;
    assert_eq!(status, 409, "a delete against a stale revision");
    let (status, _, deleted) = call(
        writer,
        Method::DELETE,
        "affiliate/a1",
        &[("if-match", &current)],
        None,
    )
    .await;
    assert_eq!(status, 200, "{deleted}");
    let (status, _, _) = call(writer, Method::GET, "affiliate/a1", &[], None).await;
    assert_eq!(status, 404);

    let (_, _, history) = call(writer, Method::GET, "affiliate/a1/history", &[], None).await;
    let changes = history["changes"].as_array().expect("changes");
    let trail: Vec<(&str, &str)> = changes
        .iter()
        .map(|c| {
            (
                c["changed_by"].as_str().unwrap_or_default(),
                c["reason"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        trail,
        [("tester", "new"), ("tester", "review"), ("tester", "-")]
    );
    assert_eq!(changes[1]["document"]["name"], winner.2["document"]["name"]);
    assert!(
        changes[2].get("document").is_none(),
        "a delete has no document"
    );

    // Documents are checked as the services check their config: 422 naming the field.
    let offer = |url: &str| json!({ "document": { "url": url, "payouts": { "ftd": "50.00" } } });
    let create = [("if-none-match", "*")];
    let (status, _, body) = call(
        writer,
        Method::PUT,
        "offer/o1",
        &create,
        Some(offer("https://o.example/?c={clickid}")),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("document.url: unknown macro {clickid}")),
        "{body}"
    );
    let (status, _, body) = call(
        writer,
        Method::PUT,
        "affiliate/a9",
        &create,
        Some(json!({ "document": { "name": "Nine", "status": "gone" } })),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    let (status, _, body) = call(
        writer,
        Method::PUT,
        "offer/o1",
        &create,
        Some(offer("https://o.example/?c={click_id}")),
    )
    .await;
    assert_eq!(status, 201, "{body}");

    // Counted where answered, and the writer says it is one.
    let writer_metrics = s2s_tests::metric(
        writer.running.admin,
        "console_catalog_changes_total{kind=\"affiliate\",result=\"conflict\"}",
    )
    .await;
    assert_eq!(writer_metrics, Some(3.0), "one create, two stale changes");
    assert_eq!(
        s2s_tests::metric(writer.running.admin, "console_catalog_writer").await,
        Some(1.0)
    );
    assert_eq!(
        s2s_tests::metric(
            other.running.admin,
            "console_catalog_changes_total{kind=\"affiliate\",result=\"not_the_writer\"}"
        )
        .await,
        Some(1.0)
    );

    // Secrets are write-only: accepted, never shown back.
    let (status, _, body) = call(
        writer,
        Method::PUT,
        "source/s1",
        &create,
        Some(json!({ "document": { "auth": "token", "token": "s3cret-s3cret-s3cret" } })),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert!(!body.to_string().contains("s3cret"), "{body}");
    assert_eq!(body["document"]["token"], json!({ "set": true }));

    // Unauthenticated: refused.
    let resp = s2s_tests::http()
        .get(format!("{}/api/v1/catalog/affiliate", writer.url))
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.status().as_u16(), 401);

    // The topic holds the four accepted changes and nothing else.
    let raw = TopicReader::new(&topics.catalog)
        .read_raw_until("the accepted changes", WAIT, |seen| {
            seen.iter().any(|m| m.key() == Some(b"offer/o1".as_slice()))
        })
        .await;
    assert_eq!(raw.len(), 4, "no refused change was appended");
    a.running.stop().await;
    b.running.stop().await;
}

/// Offers changed through the console apply to every running service without a restart:
/// an imported new offer redirects at ingest; a changed payout prices the next conversion
/// at the attributor, which records the catalog revision it priced with; a narrowed
/// window rejects the next late conversion (`outside_window`). The import is
/// the CLI's (`console catalog import`): a second run changes nothing, and the export
/// imports as unchanged. A new instance has the whole catalog before it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_apply_catalog_changes_live() {
    use s2s_catalog::file::{CatalogFile, Imported};
    use s2s_common::contract::Conversion;
    use s2s_console::cli::{self, Api};
    use s2s_tests::Pipeline;

    let p = Pipeline::with_console().await;
    let api = Api {
        url: p.console_url(),
        token: s2s_tests::CONSOLE_TOKEN.to_string(),
    };
    let vocabulary =
        s2s_console::catalog_checks(&s2s_tests::pipeline(&p.topics).postbacks).expect("checks");
    let offer_2 = s2s_common::pipeline::OfferConfig {
        url: "https://two.example/?c={click_id}".into(),
        ..Default::default()
    };
    let mut offer_1 = s2s_tests::offer_1();
    offer_1
        .payouts
        .insert("ftd".into(), rust_decimal::Decimal::new(7500, 2));
    let file = CatalogFile {
        offers: [("1".to_string(), offer_1), ("2".to_string(), offer_2)].into(),
        ..Default::default()
    };
    let before = s2s_tests::http()
        .get(p.ingest_url("/click?offer_id=2&aff_id=7"))
        .send()
        .await
        .expect("answer");
    assert_eq!(before.status(), 404, "offer 2 is not in the catalog yet");

    // The console is elected writer shortly after it starts: the CLI retries its 503s.
    let imported = cli::import(&api, &file, &vocabulary, Some("spring promo"), false)
        .await
        .expect("imported");
    assert_eq!(
        imported,
        Imported {
            created: 1,
            updated: 1,
            unchanged: 0
        }
    );
    let imported_at = Instant::now();
    let redirect = poll_until("ingest redirects the new offer", WAIT, || async {
        let r = s2s_tests::http()
            .get(p.ingest_url("/click?offer_id=2&aff_id=7"))
            .send()
            .await
            .ok()?;
        (r.status() == 302).then(|| r.headers()["location"].to_str().unwrap_or("").to_string())
    })
    .await;
    println!(
        "offer 2 redirecting at ingest {:?} after the import returned",
        imported_at.elapsed()
    );
    assert!(
        redirect.starts_with("https://two.example/?c="),
        "{redirect}"
    );

    // The attributor prices the next FTD on offer 1 with the new payout.
    let offer_1 = console_get(format!("{}/api/v1/catalog/offer/1", api.url)).await;
    let revision = offer_1["revision"].as_i64().expect("a revision");
    applied(p.attributor_admin, "attributor", revision).await;
    let click_id = p.click("offer_id=1&aff_id=42").await;
    let resp = s2s_tests::http()
        .get(p.ingest_url(&format!(
            "/postback?click_id={click_id}&event=ftd&txn_id=t1"
        )))
        .send()
        .await
        .expect("postback");
    assert_eq!(resp.status(), 200);
    let conversions = TopicReader::new(&p.topics.conversions)
        .read_until::<Conversion>("the FTD's conversion", WAIT, |cs| {
            cs.iter().any(|c| c.click_id == click_id)
        })
        .await;
    let c = conversions
        .iter()
        .find(|c| c.click_id == click_id)
        .expect("found");
    assert_eq!(c.payout.to_string(), "75.00", "the changed payout");
    assert!(
        c.catalog_revision >= Some(revision),
        "priced with the catalog as of the change or later: {:?} vs {revision}",
        c.catalog_revision
    );

    // A shorter window applies to the next postback: an FTD whose operator says it came
    // 3 minutes after its click is outside a 1-minute window.
    let mut narrower = offer_1["document"].clone();
    narrower["window"] = json!("1m");
    let (status, changed) = put_entity(&api.url, "offer/1", Some(revision), narrower).await;
    assert_eq!(status, 200, "{changed}");
    let narrowed = changed["revision"].as_i64().expect("a revision");
    applied(p.attributor_admin, "attributor", narrowed).await;
    let late = p.click("offer_id=1&aff_id=42").await;
    let event_ms = s2s_common::now_ms() + 3 * 60_000;
    let resp = s2s_tests::http()
        .get(p.ingest_url(&format!(
            "/postback?click_id={late}&event=ftd&txn_id=t3&event_time={event_ms}"
        )))
        .send()
        .await
        .expect("postback");
    assert_eq!(resp.status(), 200);
    let r = rejection_of(&p.topics, &late).await;
    assert_eq!(
        r.reason,
        s2s_common::contract::RejectReason::OutsideWindow,
        "{r:?}"
    );
    assert!(r.catalog_revision >= Some(narrowed), "{r:?}");
    // Back as the file has it (the import below finds it unchanged).
    let (status, restored) = put_entity(
        &api.url,
        "offer/1",
        Some(narrowed),
        offer_1["document"].clone(),
    )
    .await;
    assert_eq!(status, 200, "{restored}");

    // Affiliate 42 blocked live: ingest issues no click ID for it, the attributor rejects
    // the new conversion of a click issued before the block.
    let earlier = p.click("offer_id=1&aff_id=42").await;
    let resp = s2s_tests::http()
        .put(format!("{}/api/v1/catalog/affiliate/42", api.url))
        .bearer_auth(&api.token)
        .header("If-None-Match", "*")
        .json(&json!({ "document": { "name": "Acme", "status": "blocked" }, "reason": "fraud" }))
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.status(), 201);
    let blocked: Value = resp.json().await.expect("JSON");
    let blocked_at = blocked["revision"].as_i64().expect("a revision");
    let refused: Value = poll_until("ingest refuses affiliate 42's clicks", WAIT, || async {
        let r = s2s_tests::http()
            .get(p.ingest_url("/click?offer_id=1&aff_id=42"))
            .send()
            .await
            .ok()?;
        if r.status() != 403 {
            return None;
        }
        r.json().await.ok()
    })
    .await;
    assert_eq!(refused["error"]["code"], "affiliate_blocked", "{refused}");
    assert!(
        s2s_tests::metric(
            p.ingest_admin,
            "ingest_clicks_not_issued_total{reason=\"affiliate_blocked\"}"
        )
        .await
            >= Some(1.0)
    );
    applied(p.attributor_admin, "attributor", blocked_at).await;
    let resp = s2s_tests::http()
        .get(p.ingest_url(&format!("/postback?click_id={earlier}&event=ftd&txn_id=t2")))
        .send()
        .await
        .expect("postback");
    assert_eq!(resp.status(), 200);
    let r = rejection_of(&p.topics, &earlier).await;
    assert_eq!(
        r.reason,
        s2s_common::contract::RejectReason::AffiliateBlocked
    );
    assert!(r.catalog_revision >= Some(blocked_at), "{r:?}");

    // Import is idempotent, and the export imports as unchanged.
    let again = cli::import(&api, &file, &vocabulary, None, false)
        .await
        .expect("imported");
    assert_eq!(again.unchanged, 2, "{again:?}");
    let exported = CatalogFile::parse(&cli::export(&api).await.expect("exported")).expect("TOML");
    let round = cli::import(&api, &exported, &vocabulary, None, true)
        .await
        .expect("planned");
    assert_eq!(
        round,
        Imported {
            created: 0,
            updated: 0,
            unchanged: 3
        },
        "offers 1 and 2, affiliate 42"
    );
    assert_eq!(
        exported.affiliates.get("42").map(|a| a.status),
        Some(s2s_catalog::documents::AffiliateStatus::Blocked)
    );

    // A new ingest instance builds the same catalog from the topic before it serves: at
    // once, no waiting, it redirects offer 2 and refuses affiliate 42.
    let fresh = s2s_tests::IngestHandle::start(s2s_tests::ingest_config(&p.topics)).await;
    let status = |query: &'static str| {
        let url = fresh.url(query);
        async move {
            s2s_tests::http()
                .get(url)
                .send()
                .await
                .expect("answer")
                .status()
        }
    };
    assert_eq!(status("/click?offer_id=2&aff_id=7").await, 302);
    assert_eq!(status("/click?offer_id=1&aff_id=42").await, 403);
    fresh.stop().await;
    p.stop().await;
}

/// The catalog topic's records up to `offset`, as text: what a reader of the topic sees.
async fn catalog_records_to(topics: &TopicsConfig, offset: i64) -> String {
    TopicReader::new(&topics.catalog)
        .read_raw_until("the catalog's records", WAIT, |ms| {
            ms.iter().any(|m| m.offset() == offset)
        })
        .await
        .iter()
        .map(|m| String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// `PUT /api/v1/catalog/{kind}/{id}` as operator "tester" (`base`: the revision changed,
/// `None`: a creation), tried again while the console answers 503 (its election).
/// The rejection of `click_id`'s postback, once the rejections topic has it.
async fn rejection_of(topics: &TopicsConfig, click_id: &str) -> s2s_common::contract::Rejection {
    TopicReader::new(&topics.rejections)
        .read_until::<s2s_common::contract::Rejection>(
            &format!("the rejection of {click_id}'s postback"),
            WAIT,
            |rs| rs.iter().any(|r| r.click_id() == click_id),
        )
        .await
        .into_iter()
        .find(|r| r.click_id() == click_id)
        .expect("found")
}

pub(crate) async fn put_entity(
    url: &str,
    key: &str,
    base: Option<i64>,
    document: Value,
) -> (u16, Value) {
    let (kind, id) = key.split_once('/').expect("kind/id");
    poll_until(&format!("the console takes {key}"), WAIT, || async {
        let mut req = s2s_tests::http()
            .put(format!("{url}/api/v1/catalog/{kind}/{id}"))
            .bearer_auth(s2s_tests::CONSOLE_TOKEN)
            .json(&json!({ "document": document }));
        req = match base {
            Some(b) => req.header("If-Match", format!("\"{b}\"")),
            None => req.header("If-None-Match", "*"),
        };
        let resp = req.send().await.ok()?;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        (status != 503).then_some((status, body))
    })
    .await
}

/// Postbacks managed in the catalog apply to the running delivery worker without a
/// restart: a new affiliate postback gets the next conversion; with its URL changed, the
/// next goes to the new URL; disabled, the next conversion schedules nothing for it. A
/// signed postback's secret is write-only (never in an answer, the history, an export or
/// the topic), kept across a change that says `{"set": true}`, and signs its deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_follows_the_catalogs_postbacks() {
    use base64::Engine as _;
    use s2s_tests::{Pipeline, TestEndpoint};
    let (first, second) = (
        TestEndpoint::start(&[]).await,
        TestEndpoint::start(&[]).await,
    );
    let p = Pipeline::with_console().await;
    let api = p.console_url();
    let received_by = |e: &TestEndpoint, click_id: &str| {
        e.received().iter().any(|r| r.param("c") == Some(click_id))
    };

    let doc = |url: String, enabled: bool| json!({ "url": url, "aff_id": "42", "events": ["ftd"], "enabled": enabled });
    let (status, created) = put_entity(
        &api,
        "postback/aff-42",
        None,
        doc(first.url("/pb?c={click_id}&p={payout}"), true),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let r1 = created["revision"].as_i64().expect("revision");
    applied(p.delivery_admin, "delivery", r1).await;
    let c1 = p.click("offer_id=1&aff_id=42").await;
    p.ftd(&c1).await;
    poll_until("the new postback's first delivery", WAIT, || async {
        received_by(&first, &c1).then_some(())
    })
    .await;

    let (status, changed) = put_entity(
        &api,
        "postback/aff-42",
        Some(r1),
        doc(second.url("/pb?c={click_id}&p={payout}"), true),
    )
    .await;
    assert_eq!(status, 200, "{changed}");
    let r2 = changed["revision"].as_i64().expect("revision");
    applied(p.delivery_admin, "delivery", r2).await;
    let c2 = p.click("offer_id=1&aff_id=42").await;
    p.ftd(&c2).await;
    poll_until("the delivery to the new URL", WAIT, || async {
        received_by(&second, &c2).then_some(())
    })
    .await;
    assert!(!received_by(&first, &c2), "the old URL got nothing more");

    let (status, disabled) = put_entity(
        &api,
        "postback/aff-42",
        Some(r2),
        doc(second.url("/pb?c={click_id}&p={payout}"), false),
    )
    .await;
    assert_eq!(status, 200, "{disabled}");
    applied(
        p.delivery_admin,
        "delivery",
        disabled["revision"].as_i64().expect("revision"),
    )
    .await;
    let c3 = p.click("offer_id=1&aff_id=42").await;
    p.ftd(&c3).await;
    // Once delivery has committed the third conversion, its scheduling is decided.
    s2s_tests::metric_reaches(
        p.delivery_admin,
        "stream_records_consumed_total{input=\"conversion\",service=\"delivery\"}",
        3.0,
    )
    .await;
    assert_eq!(
        s2s_tests::metric(
            p.delivery_admin,
            "delivery_scheduled_total{endpoint=\"catalog\"}"
        )
        .await,
        Some(2.0),
        "a disabled postback gets no new deliveries"
    );
    assert!(!received_by(&second, &c3));

    // A signed postback: its secret is write-only (never in an answer, the history, an
    // export or the topic) and delivery signs with it.
    const SECRET: &str = "whsec_c2VjcmV0LXNpZ25pbmcta2V5LTEyMzQ1Njc4OTA=";
    let (status, created) = put_entity(
        &api,
        "postback/signed",
        None,
        json!({ "url": first.url("/signed?c={click_id}"), "aff_id": "42",
            "events": ["ftd"], "secret": SECRET }),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["document"]["secret"], json!({ "set": true }));
    let signed_at = created["revision"].as_i64().expect("revision");
    let plain = "c2VjcmV0LXNpZ25pbmcta2V5";
    for path in ["postback/signed", "postback", "postback/signed/history"] {
        let answer = console_get(format!("{api}/api/v1/catalog/{path}")).await;
        assert!(!answer.to_string().contains(plain), "{path}: {answer}");
    }
    let exported = s2s_console::cli::export(&s2s_console::cli::Api {
        url: api.clone(),
        token: s2s_tests::CONSOLE_TOKEN.into(),
    })
    .await
    .expect("export");
    assert!(!exported.contains(plain), "{exported}");
    assert!(exported.contains("set = true"), "{exported}");
    let kept_as = catalog_records_to(&p.topics, signed_at).await;
    assert!(
        !kept_as.contains(plain) && kept_as.contains("sealed"),
        "{kept_as}"
    );
    let (status, kept) = put_entity(
        &api,
        "postback/signed",
        Some(signed_at),
        json!({ "url": first.url("/signed?c={click_id}&v=2"), "aff_id": "42",
            "events": ["ftd"], "secret": { "set": true } }),
    )
    .await;
    assert_eq!(status, 200, "{kept}");
    applied(
        p.delivery_admin,
        "delivery",
        kept["revision"].as_i64().expect("revision"),
    )
    .await;
    let c4 = p.click("offer_id=1&aff_id=42").await;
    p.ftd(&c4).await;
    let got = poll_until("the signed delivery", WAIT, || async {
        first
            .received()
            .into_iter()
            .find(|r| r.path == "/signed" && r.param("c") == Some(c4.as_str()))
    })
    .await;
    assert_eq!(got.param("v"), Some("2"), "the changed URL");
    let id = got.header("webhook-id").expect("webhook-id");
    let ts = got.header("webhook-timestamp").expect("webhook-timestamp");
    let key = base64::engine::general_purpose::STANDARD
        .decode(SECRET.trim_start_matches("whsec_"))
        .expect("key");
    let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(&key).expect("hmac");
    hmac::Mac::update(&mut mac, format!("{id}.{ts}.{}", got.body).as_bytes());
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(hmac::Mac::finalize(mac).into_bytes())
    );
    assert_eq!(
        got.header("webhook-signature"),
        Some(expected.as_str()),
        "signed with the kept secret"
    );

    let (status, refused) = put_entity(
        &api,
        "postback/bad",
        None,
        json!({ "url": "https://aff.example/pb", "secret": "not-whsec-c2VjcmV0c2VjcmV0" }),
    )
    .await;
    assert_eq!(status, 422, "{refused}");
    assert!(
        !refused.to_string().contains("c2VjcmV0c2VjcmV0"),
        "the answer does not echo the secret: {refused}"
    );
    p.stop().await;
}

/// Operators in the catalog: created by an admin, their token write-only and kept as its
/// digest (never in an answer or the topic), signing in with their role once the console
/// applied them; a viewer reads and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_operators_sign_in_with_their_role() {
    let topics = provisioned().await;
    let dir = tempfile::tempdir().expect("dir");
    let c = console(&topics, &s2s_tests::unique("console"), dir.path()).await;
    const TOKEN: &str = "viewer-token-abcdef0123456789";
    let (status, created) = put_entity(
        &c.url,
        "operator/val",
        None,
        json!({ "name": "Val", "role": "viewer", "token": TOKEN }),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["document"]["token"], json!({ "set": true }));
    let as_val = |method: reqwest::Method, path: &str, token: Option<&str>| {
        let mut req = s2s_tests::http().request(method, format!("{}{path}", c.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move { req.send().await.expect("answer").status().as_u16() }
    };
    poll_until("the viewer signs in", WAIT, || async {
        (as_val(
            reqwest::Method::GET,
            "/api/v1/catalog/operator",
            Some(TOKEN),
        )
        .await
            == 200)
            .then_some(())
    })
    .await;
    let listed = console_get(format!("{}/api/v1/catalog/operator", c.url)).await;
    assert!(!listed.to_string().contains(TOKEN), "{listed}");
    assert_eq!(
        as_val(
            reqwest::Method::DELETE,
            "/api/v1/catalog/operator/val",
            Some(TOKEN)
        )
        .await,
        403,
        "a viewer changes nothing"
    );
    assert_eq!(
        as_val(reqwest::Method::GET, "/api/v1/catalog/operator", None).await,
        401
    );
    let revision = created["revision"].as_i64().expect("revision");
    let kept_as = catalog_records_to(&topics, revision).await;
    assert!(
        !kept_as.contains(TOKEN) && kept_as.contains("sha256"),
        "{kept_as}"
    );
    c.running.stop().await;
}

/// A source (an operator's integration) created through the API authenticates and maps
/// its aliases and values (`goal=sale` → `event=ftd`) at ingest without a restart; its token is write-only, sealed in the topic,
/// and a wrong one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_follows_the_catalogs_sources() {
    use s2s_tests::Pipeline;
    let p = Pipeline::with_console().await;
    const TOKEN: &str = "casino-postback-token-0123";
    let (status, created) = put_entity(
        &p.console_url(),
        "source/casino",
        None,
        json!({ "auth": "token", "token": TOKEN, "aliases": { "cid": "click_id", "goal": "event" },
            "values": { "event": { "sale": "ftd" } } }),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["document"]["token"], json!({ "set": true }));
    let revision = created["revision"].as_i64().expect("revision");
    let kept_as = catalog_records_to(&p.topics, revision).await;
    assert!(
        !kept_as.contains(TOKEN) && kept_as.contains("sealed"),
        "{kept_as}"
    );
    applied(p.ingest_admin, "ingest", revision).await;

    let click_id = p.click("offer_id=1&aff_id=42").await;
    let send = |token: &'static str| {
        let url = p.ingest_url(&format!("/postback/casino?cid={click_id}&goal=sale"));
        async move {
            s2s_tests::http()
                .get(url)
                .header("X-Postback-Token", token)
                .send()
                .await
                .expect("answer")
        }
    };
    assert_eq!(send("wrong-token-0123456789").await.status(), 401);
    let ok = send(TOKEN).await;
    assert_eq!(ok.status(), 200);
    let conversions = TopicReader::new(&p.topics.conversions)
        .read_until::<s2s_common::contract::Conversion>("the source's FTD", WAIT, |cs| {
            cs.iter().any(|c| c.click_id == click_id)
        })
        .await;
    assert!(conversions
        .iter()
        .any(|c| c.click_id == click_id && c.event == "ftd"));
    p.stop().await;
}

/// A change sent to the instance that does not write the catalog is forwarded to the one
/// that does (it announced its URL when elected) and answered as the writer answers:
/// created, then a stale revision 409; the two instances racing on one revision: exactly
/// one wins, the topic holds no record of the other, a reader from scratch builds the
/// winner's catalog; the other instance shows it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_a_non_writer_is_forwarded_to_the_writer() {
    let topics = provisioned().await;
    let group = s2s_tests::unique("console");
    let (sa, sb) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let a = console_with(&topics, &group, sa.path(), true).await;
    let b = console_with(&topics, &group, sb.path(), true).await;
    // Both take part, one is elected and its announcement reached the other.
    let (writer, other) = poll_until("a writer announced to the other", WAIT, || async {
        let (sa, sb) = (status(&a).await, status(&b).await);
        let announced = |s: &Value| s["writer_url"].as_str().map(str::to_string);
        match (sa["writer"].as_bool(), sb["writer"].as_bool()) {
            (Some(true), Some(false)) if announced(&sb).is_some_and(|u| a.url == u) => {
                Some((&a, &b))
            }
            (Some(false), Some(true)) if announced(&sa).is_some_and(|u| b.url == u) => {
                Some((&b, &a))
            }
            _ => None,
        }
    })
    .await;
    let create = [("If-None-Match", "*")];
    let doc = json!({ "document": { "name": "Fwd", "status": "active" } });
    let (status_code, etag, body) = call(
        other,
        reqwest::Method::PUT,
        "affiliate/fwd",
        &create,
        Some(doc.clone()),
    )
    .await;
    assert_eq!(status_code, 201, "created through the writer: {body}");
    let etag = etag.expect("the writer's ETag");
    let (status_code, _, body) = call(
        other,
        reqwest::Method::PUT,
        "affiliate/fwd",
        &[("If-Match", "\"0\"")],
        Some(doc),
    )
    .await;
    if etag != "\"0\"" {
        assert_eq!(status_code, 409, "the writer's answer, as it is: {body}");
    }

    // The two instances racing on one revision: exactly one change wins, the topic holds
    // no record of the other, and a reader from scratch builds the winner's catalog.
    let base = [("If-Match", etag.as_str())];
    let named = |name: &str| json!({ "document": { "name": name, "status": "active" } });
    let (x, y) = tokio::join!(
        call(
            other,
            reqwest::Method::PUT,
            "affiliate/fwd",
            &base,
            Some(named("via-other"))
        ),
        call(
            writer,
            reqwest::Method::PUT,
            "affiliate/fwd",
            &base,
            Some(named("via-writer"))
        ),
    );
    let mut statuses = [x.0, y.0];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 409], "{x:?} {y:?}");
    let (won, lost, winner) = if x.0 == 200 {
        ("via-other", "via-writer", x)
    } else {
        ("via-writer", "via-other", y)
    };
    let revision: i64 = winner
        .1
        .as_deref()
        .map(|e| e.trim_matches('"'))
        .and_then(|e| e.parse().ok())
        .expect("the winner's ETag");
    let records = catalog_records_to(&topics, revision).await;
    assert!(
        records.contains(won) && !records.contains(lost),
        "{records}"
    );
    let shutdown = CancellationToken::new();
    let fresh = follower(&topics, &shutdown).await;
    let seen = fresh.catalog();
    let entry = seen.get(&key("affiliate/fwd")).expect("the entity");
    assert_eq!(entry.stored.document["name"], won);
    shutdown.cancel();
    let (status_code, _, got) =
        call(writer, reqwest::Method::GET, "affiliate/fwd", &[], None).await;
    assert_eq!(
        (status_code, got["document"]["name"].as_str()),
        (200, Some(won))
    );
    poll_until("the other instance shows it", WAIT, || async {
        let (s, _, _) = call(other, reqwest::Method::GET, "affiliate/fwd", &[], None).await;
        (s == 200).then_some(())
    })
    .await;
    assert!(
        s2s_tests::metric(
            other.running.admin,
            "console_catalog_changes_total{kind=\"affiliate\",result=\"forwarded\"}"
        )
        .await
            >= Some(2.0)
    );
}
