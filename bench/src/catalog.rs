//! The catalog benchmark: a catalog of `affiliates` affiliates, `postbacks` postbacks and
//! `offers` offers in its topic (written as an import would: one accepted record each),
//! then
//! - start-up: the time a reader takes to read the topic to its end (each of `rounds`
//!   fresh readers; median and spread), and the resident memory the first one adds, per
//!   entity (the reader's working catalog and the one it publishes);
//! - live changes: `changes` changes made through a writer while two more readers
//!   follow; the time from the start of each write to the change applied in all three
//!   (p50, p99).
//!
//! The last line's ratio is the goal (1 s) ÷ that p99: goal ≥ 1.
//!
//! Not measured yet (issue 22's next parts): the lookup cost on each service's hot path,
//! which needs the services to read the catalog.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use s2s_catalog::{Catalog, Change, Follower, Stored, Writer};
use s2s_common::kafka::KafkaConfig;
use s2s_common::topics::TopicsConfig;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// How long a reader may take to read the catalog to its end.
const READ_WITHIN: Duration = Duration::from_secs(600);

/// How long a live change may take to reach every reader (the goal).
const APPLY_GOAL: Duration = Duration::from_secs(1);

pub struct Sizes {
    pub affiliates: usize,
    pub postbacks: usize,
    pub offers: usize,
    pub rounds: usize,
    pub changes: usize,
}

pub async fn run(brokers: &str, sizes: Sizes) -> anyhow::Result<()> {
    let kafka = KafkaConfig {
        bootstrap_servers: brokers.to_string(),
        properties: Default::default(),
    };
    let topics = TopicsConfig::named(&format!("bench-{}", ulid::Ulid::new()), 1);
    s2s_common::kafka::ensure_topics(&kafka, &topics, Duration::from_secs(30)).await?;
    let entities = sizes.affiliates + sizes.postbacks + sizes.offers;
    let loaded = Instant::now();
    fill(&kafka, &topics.catalog.name, &sizes).await?;
    println!(
        "catalog: {entities} entities written in {:.1} s",
        loaded.elapsed().as_secs_f64()
    );

    let shutdown = CancellationToken::new();
    let reader = || -> _ {
        Follower::<Catalog>::start(&kafka, &topics.catalog.name, READ_WITHIN, &shutdown)
    };
    let mut reads = Vec::new();
    // The first reader's growth of the process: later ones reuse what the allocator kept.
    let mut per_entity = None;
    for _ in 0..sizes.rounds {
        let before = crate::attributor::memory().0;
        let started = Instant::now();
        let f = reader().await.context("reading the catalog")?;
        reads.push(started.elapsed().as_secs_f64());
        anyhow::ensure!(
            f.catalog().len() == entities,
            "read {} entities",
            f.catalog().len()
        );
        let after = crate::attributor::memory().0;
        per_entity.get_or_insert(after.saturating_sub(before) as f64 / entities as f64);
        drop(f);
    }
    let (read_median, read_min, read_max) = spread(&mut reads);
    let mem_median = per_entity.unwrap_or_default();
    println!(
        "catalog: read to its end in {read_median:.2} s (median of {}; {read_min:.2} – {read_max:.2} s); \
         {mem_median:.0} bytes of resident memory per entity",
        sizes.rounds
    );

    let writer_side = Arc::new(reader().await?);
    let others = [reader().await?, reader().await?];
    let writer = Writer::new(
        &kafka,
        &topics.catalog.name,
        &topics.catalog_audit.name,
        Arc::clone(&writer_side),
        Duration::from_secs(60),
    )?;
    let since = Instant::now();
    let mut latencies = Vec::new();
    let mut base = None;
    for i in 0..sizes.changes {
        let started = Instant::now();
        let written = writer
            .write(
                Change {
                    key: "affiliate/bench-live".parse()?,
                    base,
                    document: Some(json!({ "name": format!("Live {i}"), "status": "active" })),
                    changed_by: "bench".into(),
                    changed_at_ms: s2s_common::now_ms(),
                    reason: None,
                },
                since,
            )
            .await?;
        for f in &others {
            f.reached(written.revision + 1, Duration::from_secs(60))
                .await?;
        }
        latencies.push(started.elapsed().as_secs_f64());
        base = Some(written.revision);
    }
    latencies.sort_by(f64::total_cmp);
    let q = |p: f64| {
        latencies[((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1]
    };
    let (p50, p99) = (q(0.5), q(0.99));
    shutdown.cancel();
    println!(
        "catalog: {entities} entities; read to its end {read_median:.2} s; {mem_median:.0} B/entity; \
         write → applied in 3 readers p50 {:.0} ms p99 {:.0} ms ({} changes) ratio {:.2} (goal >= 1)",
        p50 * 1e3,
        p99 * 1e3,
        sizes.changes,
        APPLY_GOAL.as_secs_f64() / p99
    );
    Ok(())
}

/// Writes the catalog as an import would: one record per entity.
async fn fill(kafka: &KafkaConfig, topic: &str, sizes: &Sizes) -> anyhow::Result<()> {
    let producer: FutureProducer = kafka.producer_config().create()?;
    let stored = |document: serde_json::Value| Stored {
        document,
        changed_by: "import".into(),
        changed_at_ms: s2s_common::now_ms(),
        reason: None,
    };
    let mut records = Vec::with_capacity(sizes.affiliates + sizes.postbacks + sizes.offers);
    for i in 0..sizes.affiliates {
        records.push((
            format!("affiliate/aff-{i}"),
            stored(json!({ "name": format!("Affiliate {i}"), "status": "active" })),
        ));
    }
    for i in 0..sizes.postbacks {
        records.push((
            format!("postback/pb-{i}"),
            stored(json!({
                "url": format!("https://aff-{i}.example/postback?click_id={{click_id}}&payout={{payout}}"),
                "aff_id": format!("aff-{i}"),
                "events": ["ftd"],
            })),
        ));
    }
    for i in 0..sizes.offers {
        records.push((
            format!("offer/{i}"),
            stored(json!({
                "url": format!("https://offer-{i}.example/land?click_id={{click_id}}&aff={{aff_id}}"),
                "currency": "USD",
                "window": "30d",
                "payouts": { "registration": "2.00", "ftd": "50.00" },
            })),
        ));
    }
    for chunk in records.chunks(10_000) {
        let sends = chunk.iter().map(|(key, value)| {
            let payload = serde_json::to_vec(value).unwrap_or_default();
            let producer = producer.clone();
            let key = key.clone();
            async move {
                producer
                    .send(
                        FutureRecord::to(topic).key(&key).payload(&payload),
                        Timeout::Never,
                    )
                    .await
                    .map(|_| ())
                    .map_err(|(e, _)| e)
            }
        });
        for r in futures::future::join_all(sends).await {
            r?;
        }
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}

/// `(median, min, max)`.
fn spread(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    match v {
        [] => (0.0, 0.0, 0.0),
        _ => (v[v.len() / 2], v[0], v[v.len() - 1]),
    }
}
