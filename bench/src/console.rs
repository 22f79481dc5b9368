//! The console benchmark (`scripts/bench console`), two parts, both in this process:
//!
//! 1. **Read-model ingest.** The records of N clicks (each: the click, its FTD postback,
//!    the conversion, a failed and a delivered delivery attempt — five records on five
//!    topics, 6 partitions each) on the broker; then, on the same broker one after the
//!    other, a raw consumer (subscribe, read every record, touch its payload: no decoding,
//!    no state, no commit — the limit) and the console's own worker (decode, apply to the
//!    RocksDB read model, commit state and offsets together), each in its own consumer
//!    group. Rates are taken over the records after the first 10 %, so that group join
//!    and start-up do not count.
//! 2. **Story lookup at scale.** S records (S/5 clicks' worth, 10M by default) written into
//!    the read model's stores with the worker's own apply code (no Kafka: loading 10M
//!    records through the broker would measure the broker), then the real console started
//!    on those stores, and the story of random known click IDs asked over HTTP one request
//!    at a time: p50, p99. The stores are spread over the partitions round-robin; a story
//!    lookup reads every store the instance owns, so placement does not change its cost.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rust_decimal::Decimal;
use s2s_common::contract::{self, AttemptOutcome, Click, Conversion, DeliveryAttempt, Postback};
use s2s_common::fixtures;
use s2s_common::kafka::KafkaConfig;
use s2s_common::topics::TopicsConfig;
use s2s_console::model::{apply, Input};
use s2s_console::schema::StoreSet;
use s2s_console::ConsoleConfig;
use tokio_util::sync::CancellationToken;

use crate::attributor::{metric_sum, produce_all, realistic_click, scrape};

const PARTITIONS: i32 = 6;
const TOKEN: &str = "bench-operator-token-0123456789";

/// The five records of one click's story, encoded as published.
struct Story {
    click: Click,
    postback: Postback,
    conversion: Conversion,
    failed: DeliveryAttempt,
    delivered: DeliveryAttempt,
}

fn story(now: i64) -> Story {
    let click = realistic_click(now - 3_600_000);
    let id = &click.click_id;
    let postback = Postback {
        txn_id: Some(format!("T-{}", ulid::Ulid::new())),
        amount: Some(Decimal::new(10_000, 2)),
        currency: Some("EUR".into()),
        source: Some("casino-a".into()),
        ts_ms: now,
        ..fixtures::postback(&ulid::Ulid::new().to_string(), id)
    };
    let conversion = Conversion {
        outcome_id: format!("o-{}", ulid::Ulid::new()),
        postback_id: postback.postback_id.clone(),
        offer_id: click.offer_id.clone(),
        aff_id: click.aff_id.clone(),
        subs: click.subs.clone(),
        txn_id: postback.txn_id.clone(),
        amount: postback.amount,
        currency: postback.currency.clone(),
        click_ts_ms: click.ts_ms,
        event_ts_ms: now,
        received_ts_ms: now,
        attributed_at_ms: now + 3,
        ..fixtures::conversion(&format!("cv-{}", ulid::Ulid::new()), id)
    };
    let endpoint = format!("aff-{}", click.aff_id);
    let attempt = |n: u32, outcome: AttemptOutcome| DeliveryAttempt {
        url: format!("https://tracker.example/pb?cid={id}&payout=50.00"),
        latency_ms: 40,
        ts_ms: now + 10 + i64::from(n) * 5_000,
        next_attempt_at_ms: (outcome != AttemptOutcome::Delivered).then_some(now + 5_010),
        ..fixtures::attempt(&conversion, &endpoint, n, outcome)
    };
    let failed = attempt(1, AttemptOutcome::Retryable);
    let delivered = attempt(2, AttemptOutcome::Delivered);
    Story {
        click,
        postback,
        conversion,
        failed,
        delivered,
    }
}

impl Story {
    /// `(topic, key, payload)` for each record, in the order they happen.
    fn records(&self, t: &TopicsConfig) -> [(String, String, Vec<u8>); 5] {
        let key = self.click.click_id.clone();
        [
            (
                t.clicks.name.clone(),
                key.clone(),
                contract::encode(&self.click),
            ),
            (
                t.postbacks.name.clone(),
                key.clone(),
                contract::encode(&self.postback),
            ),
            (
                t.conversions.name.clone(),
                key.clone(),
                contract::encode(&self.conversion),
            ),
            (
                t.delivery_log.name.clone(),
                key.clone(),
                contract::encode(&self.failed),
            ),
            (
                t.delivery_log.name.clone(),
                key,
                contract::encode(&self.delivered),
            ),
        ]
    }
}

/// The console's defaults with this run's topics, state, group and an operator.
fn console_config(
    kafka: &KafkaConfig,
    topics: &TopicsConfig,
    state: &Path,
) -> anyhow::Result<ConsoleConfig> {
    let mut c: ConsoleConfig =
        // The defaults, with the service's own environment overrides (e.g.
        // S2S_CONSOLE__ROCKSDB__WRITE_BUFFER_BYTES), to measure other settings.
        s2s_common::config::load(
            s2s_console::config::DEFAULT_TOML,
            None,
            s2s_console::config::ENV_PREFIX,
        )?;
    c.listen = "127.0.0.1:0".parse()?;
    c.admin_listen = "127.0.0.1:0".parse()?;
    c.group_id = format!("bench-console-{}", ulid::Ulid::new());
    c.state_dir = state.to_path_buf();
    c.pipeline.kafka = kafka.clone();
    c.pipeline.topics = topics.clone();
    c.operators.insert("bench".into(), TOKEN.into());
    Ok(c)
}

/// When a count passed 10 % of `total` and when it reached `total`: the rate between.
struct Span {
    at_tenth: Option<(Instant, u64)>,
}

impl Span {
    fn new() -> Self {
        Span { at_tenth: None }
    }

    fn observe(&mut self, done: u64, total: u64) {
        if self.at_tenth.is_none() && done * 10 >= total {
            self.at_tenth = Some((Instant::now(), done));
        }
    }

    fn rate(&self, total: u64) -> anyhow::Result<f64> {
        let (t, n) = self.at_tenth.context("never passed 10 %")?;
        Ok((total - n) as f64 / t.elapsed().as_secs_f64().max(0.001))
    }
}

/// The limit: read every record of `topics`, touch its payload, nothing else.
async fn raw_consume(kafka: &KafkaConfig, topics: &[&str], total: u64) -> anyhow::Result<f64> {
    let consumer: StreamConsumer = kafka
        .consumer_config(&format!("bench-raw-{}", ulid::Ulid::new()))
        .create()?;
    consumer.subscribe(topics)?;
    let (mut done, mut bytes) = (0u64, 0usize);
    let mut span = Span::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while done < total {
        let m = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .context("the raw consumer read too little in 600 s")??;
        bytes += m.payload().map_or(0, <[u8]>::len);
        done += 1;
        span.observe(done, total);
    }
    std::hint::black_box(bytes);
    span.rate(total)
}

/// The console's worker over the same records: until it has applied and committed all.
async fn console_ingest(config: ConsoleConfig, total: u64) -> anyhow::Result<f64> {
    let console = s2s_console::Console::bind(config).await?;
    let admin = console.admin_addr()?;
    let stop = CancellationToken::new();
    let task = tokio::spawn(console.run(stop.clone()));
    let mut span = Span::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let consumed = metric_sum(&scrape(admin).await?, "stream_records_consumed_total") as u64;
        span.observe(consumed, total);
        if consumed >= total {
            break;
        }
        if Instant::now() > deadline {
            bail!("the console applied {consumed} of {total} records in 600 s");
        }
        if task.is_finished() {
            bail!("the console stopped early: {:?}", task.await?);
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // poll: sampling interval
    }
    let rate = span.rate(total)?;
    stop.cancel();
    task.await??;
    Ok(rate)
}

/// Writes `clicks` stories into the read model at `dir` as the worker would; returns the
/// click IDs and the records per second it took.
fn fill(config: &ConsoleConfig, clicks: u64) -> anyhow::Result<(Vec<String>, f64)> {
    let set = StoreSet::new(&config.state_dir, config.limits());
    let stores = (0..PARTITIONS)
        .map(|p| set.open(p))
        .collect::<Result<Vec<_>, _>>()?;
    let now = s2s_common::now_ms();
    let mut ids = Vec::with_capacity(clicks as usize);
    let started = Instant::now();
    // One commit per 1 000 clicks (5 000 records), as the worker's default max_batch.
    const PER_COMMIT: u64 = 1_000;
    let mut done = 0u64;
    let mut reported = Instant::now();
    while done < clicks {
        let n = PER_COMMIT.min(clicks - done);
        let p = (done / PER_COMMIT) as usize % stores.len();
        let batch: Vec<Story> = (0..n).map(|_| story(now)).collect();
        let raw: Vec<[Vec<u8>; 5]> = batch
            .iter()
            .map(|s| {
                [
                    contract::encode(&s.click),
                    contract::encode(&s.postback),
                    contract::encode(&s.conversion),
                    contract::encode(&s.failed),
                    contract::encode(&s.delivered),
                ]
            })
            .collect();
        let mut st = stores[p].stage();
        for (s, r) in batch.into_iter().zip(&raw) {
            ids.push(s.click.click_id.clone());
            for input in [
                Input::Click(&r[0], Box::new(s.click)),
                Input::Postback(&r[1], Box::new(s.postback)),
                Input::Conversion(&r[2], Box::new(s.conversion)),
                Input::Attempt(&r[3], Box::new(s.failed)),
                Input::Attempt(&r[4], Box::new(s.delivered)),
            ] {
                apply(&mut st, &input)?;
            }
        }
        stores[p].commit(st, None)?;
        done += n;
        if reported.elapsed() >= Duration::from_secs(10) {
            reported = Instant::now();
            let rate = (done * 5) as f64 / started.elapsed().as_secs_f64();
            let eta = (clicks - done) as f64 * 5.0 / rate;
            eprintln!(
                "console bench: {} of {} records written ({rate:.0}/s, ETA {eta:.0} s)",
                done * 5,
                clicks * 5
            );
        }
    }
    for s in &stores {
        s.flush()?;
    }
    let rate = (clicks * 5) as f64 / started.elapsed().as_secs_f64();
    Ok((ids, rate))
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            _ => e.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

type Http = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Empty<Bytes>,
>;

async fn lookup(http: &Http, base: &str, click: &str) -> anyhow::Result<(u16, usize)> {
    let req = Request::get(format!("{base}/api/v1/clicks/{click}"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Empty::new())?;
    let resp = http.request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body.len()))
}

/// The console on the filled stores; `lookups` sequential story requests of random known
/// clicks. Returns (p50 ms, p99 ms, mean bytes per answer).
async fn story_lookups(
    config: ConsoleConfig,
    ids: &[String],
    lookups: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    let console = s2s_console::Console::bind(config).await?;
    let base = format!("http://{}", console.local_addr()?);
    let stop = CancellationToken::new();
    let task = tokio::spawn(console.run(stop.clone()));
    let http: Http =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    // Owned once the group has assigned every partition: one click of each store answers.
    let deadline = Instant::now() + Duration::from_secs(120);
    let probes: Vec<&String> = ids
        .chunks(1_000)
        .take(PARTITIONS as usize)
        .filter_map(|c| c.first())
        .collect();
    loop {
        let mut found = 0;
        for id in &probes {
            if lookup(&http, &base, id).await?.0 == 200 {
                found += 1;
            }
        }
        if found == probes.len() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the console owned the stores of {found} of {} probes after 120 s",
                probes.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // poll: group assignment
    }
    let mut hist = crate::histogram()?;
    let mut bytes = 0usize;
    for _ in 0..lookups {
        let id = &ids[fastrand::usize(..ids.len())];
        let t = Instant::now();
        let (status, n) = lookup(&http, &base, id).await?;
        let micros = t.elapsed().as_micros() as u64;
        if status != 200 {
            bail!("story of {id}: HTTP {status}");
        }
        hist.record(micros.max(1))?;
        bytes += n;
    }
    stop.cancel();
    task.await??;
    Ok((
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        bytes as f64 / lookups as f64,
    ))
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    brokers: String,
    dir: &Path,
    clicks: u64,
    story_records: u64,
    lookups: usize,
    goal: f64,
    p99_goal_ms: f64,
) -> anyhow::Result<()> {
    let kafka = KafkaConfig {
        bootstrap_servers: brokers,
        properties: [("linger.ms".to_string(), "2".to_string())].into(),
    };

    // Part 1: read-model ingest against the raw consume rate.
    let run = format!("bench-{}", ulid::Ulid::new().to_string().to_lowercase());
    let topics = TopicsConfig::named(&run, PARTITIONS);
    s2s_common::kafka::ensure_topics(&kafka, &topics, Duration::from_secs(30)).await?;
    let producer: FutureProducer = kafka.producer_config().create()?;
    let now = s2s_common::now_ms();
    let stories: Vec<Story> = (0..clicks).map(|_| story(now)).collect();
    let total = clicks * 5;
    eprintln!("console bench: producing {total} records ({clicks} clicks' stories)");
    produce_all(&producer, stories.iter().flat_map(|s| s.records(&topics))).await?;
    drop(stories);
    let inputs = [
        topics.clicks.name.as_str(),
        topics.postbacks.name.as_str(),
        topics.conversions.name.as_str(),
        topics.rejections.name.as_str(),
        topics.delivery_log.name.as_str(),
        topics.dead_letter.name.as_str(),
        topics.delivery_commands.name.as_str(),
    ];
    eprintln!("console bench: raw consumer");
    let raw = raw_consume(&kafka, &inputs, total).await?;
    println!("console, raw consume (read and drop, no commit): {raw:.0} records/s");
    eprintln!("console bench: the console's worker");
    let ingest =
        console_ingest(console_config(&kafka, &topics, &dir.join("ingest"))?, total).await?;
    let ingest_bytes = dir_bytes(&dir.join("ingest"));
    println!(
        "console, read model (decode, apply to RocksDB, commit with offsets): {ingest:.0} records/s; \
         {:.0} bytes per record on disk",
        ingest_bytes as f64 / total as f64
    );
    std::fs::remove_dir_all(dir.join("ingest")).ok();

    // Part 2: story lookups with `story_records` loaded.
    let run = format!("bench-{}", ulid::Ulid::new().to_string().to_lowercase());
    let topics = TopicsConfig::named(&run, PARTITIONS);
    s2s_common::kafka::ensure_topics(&kafka, &topics, Duration::from_secs(30)).await?;
    let config = console_config(&kafka, &topics, &dir.join("lookup"))?;
    let story_clicks = story_records / 5;
    eprintln!("console bench: writing {story_records} records into the read model");
    let (ids, fill_rate) = tokio::task::block_in_place(|| fill(&config, story_clicks))?;
    let on_disk = dir_bytes(&dir.join("lookup"));
    println!(
        "console, read model filled with {} records ({story_clicks} click stories) in-process at \
         {fill_rate:.0} records/s; {:.1} GiB on disk ({:.0} bytes per record)",
        story_clicks * 5,
        on_disk as f64 / (1u64 << 30) as f64,
        on_disk as f64 / (story_clicks * 5) as f64
    );
    let (p50, p99, bytes) = story_lookups(config, &ids, lookups).await?;
    println!(
        "console, click story over HTTP with {} records loaded: p50 {p50:.2} ms, p99 {p99:.2} ms \
         ({lookups} lookups of random clicks, one at a time; {bytes:.0} bytes per answer)",
        story_clicks * 5
    );
    std::fs::remove_dir_all(dir.join("lookup")).ok();

    let ratio = ingest / raw;
    let verdict = if ratio >= goal && p99 <= p99_goal_ms {
        "met"
    } else {
        "NOT met"
    };
    println!("console: goals {verdict}");
    println!(
        "console: read model {ingest:.0} records/s vs raw consume {raw:.0} records/s, story p99 \
         {p99:.2} ms at {} records (goal <= {p99_goal_ms} ms) ratio {ratio:.2} (goal >= {goal})",
        story_clicks * 5
    );
    Ok(())
}
