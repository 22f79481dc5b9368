//! What the broker under test supports, printed rather than asserted (Tansu and Apache
//! Kafka differ, and both are legitimate targets). Run by hand:
//!
//!     S2S_TEST_BROKERS=host:port cargo test --workspace --test it -- --ignored --nocapture broker_probe::
//!
//! Probes: transactions (init/begin/send/commit), a compacted topic's config, the latest
//! offset from ListOffsets against the high watermark seen by a consumer, and a consumer
//! group handing partitions over when a member leaves.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use s2s_tests::{brokers, unique};

fn config() -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers());
    c
}

async fn create(name: &str, partitions: i32, cfg: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> = config().create().expect("admin");
    let t = cfg.iter().fold(
        NewTopic::new(name, partitions, TopicReplication::Fixed(1)),
        |t, (k, v)| t.set(k, v),
    );
    let r = admin.create_topics([&t], &AdminOptions::new()).await;
    println!("create {name}: {r:?}");
}

#[tokio::test]
#[ignore = "a probe of the broker's features; run by hand with --ignored --nocapture"]
async fn probe_broker_features() {
    // Transactions.
    let topic = unique("probe-txn");
    create(&topic, 1, &[]).await;
    let p: ThreadedProducer<DefaultProducerContext> = config()
        .set("transactional.id", unique("probe"))
        .create()
        .expect("producer");
    let t = Duration::from_secs(10);
    let init = p.init_transactions(t);
    println!("transactions: init_transactions -> {init:?}");
    if init.is_ok() {
        println!("transactions: begin -> {:?}", p.begin_transaction());
        let _ = p.send(BaseRecord::to(&topic).key("k").payload("v"));
        println!("transactions: commit -> {:?}", p.commit_transaction(t));
    }

    // Compacted topic: accepted, and reported back?
    let compacted = unique("probe-compact");
    create(&compacted, 1, &[("cleanup.policy", "compact")]).await;
    let admin: AdminClient<DefaultClientContext> = config().create().expect("admin");
    let described = admin
        .describe_configs(
            [&ResourceSpecifier::Topic(&compacted)],
            &AdminOptions::new(),
        )
        .await;
    let policy = described.ok().and_then(|v| {
        v.into_iter()
            .next()?
            .ok()?
            .get("cleanup.policy")
            .and_then(|e| e.value.clone())
    });
    println!("compaction: cleanup.policy as described back: {policy:?}");

    // ListOffsets (latest) against the high watermark.
    let wm_topic = unique("probe-wm");
    create(&wm_topic, 1, &[]).await;
    let prod: ThreadedProducer<DefaultProducerContext> = config().create().expect("producer");
    for i in 0..100 {
        let _ = prod.send(BaseRecord::to(&wm_topic).key(&format!("{i}")).payload("x"));
    }
    let _ = prod.flush(t);
    let c: BaseConsumer = config()
        .set("group.id", unique("probe"))
        .create()
        .expect("consumer");
    println!(
        "list offsets: fetch_watermarks after 100 records -> {:?}",
        c.fetch_watermarks(&wm_topic, 0, t)
    );

    // Group hand-over: two members, one leaves; how long until the other owns everything?
    let g_topic = unique("probe-group");
    create(&g_topic, 4, &[]).await;
    let group = unique("probe-group");
    let member = || -> BaseConsumer {
        let c: BaseConsumer = config()
            .set("group.id", &group)
            .set("partition.assignment.strategy", "range")
            .set("session.timeout.ms", "6000")
            .create()
            .expect("consumer");
        c.subscribe(&[&g_topic]).expect("subscribe");
        c
    };
    let (a, b) = (member(), member());
    let owned = |c: &BaseConsumer| c.assignment().map(|t| t.count()).unwrap_or(0);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) && owned(&a) + owned(&b) < 4 {
        a.poll(Duration::from_millis(50));
        b.poll(Duration::from_millis(50));
    }
    println!(
        "group: after {:?}, member a owns {}, member b owns {}",
        start.elapsed(),
        owned(&a),
        owned(&b)
    );
    drop(b);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) && owned(&a) < 4 {
        a.poll(Duration::from_millis(50));
    }
    println!(
        "group: {:?} after b left, a owns {} of 4 partitions",
        start.elapsed(),
        owned(&a)
    );
}
