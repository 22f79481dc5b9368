//! `s2s-bench attributor-state` and `s2s-bench attributor`, run by `scripts/bench attributor`.
//!
//! - `attributor-state`: clicks go through the attributor's own code (`Joiner::on_click`
//!   into a staged overlay, committed per 1 000 like a processing cycle) into one
//!   partition's store opened with the production defaults. At each checkpoint it flushes
//!   and reports the bytes per click in SST files and the process's resident memory. It
//!   runs in its own process so that the memory figures are the store's alone.
//! - `attributor`: N clicks and N postbacks are written to fresh topics; then a raw loop
//!   (consume both topics in cycles, produce every record to another topic, wait for the
//!   acknowledgements, commit) and the attributor (in process, release build, default
//!   config) each process all 2N records. Both are timed from their first committed cycle
//!   to their last, on the same broker in the same run.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use s2s_attributor::process::Joiner;
use s2s_attributor::store::{Cf, StoreLimits, StoreSet};
use s2s_attributor::AttributorConfig;
use s2s_common::contract::{Click, Postback};
use s2s_common::kafka::KafkaConfig;
use s2s_common::topics::{TopicConfig, TopicsConfig};
use tokio_util::sync::CancellationToken;

/// The attributor's defaults with the service's own environment overrides (e.g.
/// S2S_ATTRIBUTOR__ROCKSDB__BLOCK_CACHE_BYTES, to measure other budgets), at_least_once:
/// the benchmark broker (Tansu) has no transactions.
fn defaults() -> anyhow::Result<AttributorConfig> {
    let mut c: AttributorConfig = s2s_common::config::load(
        s2s_attributor::config::DEFAULT_TOML,
        None,
        s2s_attributor::config::ENV_PREFIX,
    )?;
    c.processing_guarantee = s2s_attributor::config::Guarantee::AtLeastOnce;
    Ok(c)
}

fn random_token(len: usize) -> String {
    (0..len).map(|_| fastrand::alphanumeric()).collect()
}

/// A click as an affiliate network sees them: a ULID, one of 50 offers, one of 5 000
/// affiliates, two sub IDs of typical length, a browser's user agent.
pub(crate) fn realistic_click(ts_ms: i64) -> Click {
    Click {
        offer_id: fastrand::u32(1..=50).to_string(),
        aff_id: fastrand::u32(1..=5000).to_string(),
        subs: [
            ("sub1".to_string(), format!("fb_{}", random_token(12))),
            ("sub2".to_string(), random_token(8)),
        ]
        .into(),
        ip: Some(format!("203.0.113.{}", fastrand::u8(1..255))),
        user_agent: Some(
            "Mozilla/5.0 (Linux; Android 14) AppleWebKit/537.36 Chrome/126.0 Mobile".into(),
        ),
        ts_ms,
        ..s2s_common::fixtures::click(&ulid::Ulid::new().to_string())
    }
}

/// `(VmRSS, VmHWM)` of this process, bytes.
pub fn memory() -> (u64, u64) {
    memory_of("self")
}

/// `(VmRSS, VmHWM)` of process `pid` (`self`: this one), bytes.
pub fn memory_of(pid: &str) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Fills a store to each checkpoint; prints one `state: …` line per checkpoint and writes
/// `clicks bytes_per_click rss_bytes peak_rss_bytes` lines to `out`.
pub fn state(dir: &Path, checkpoints: &[u64], out: &Path) -> anyhow::Result<()> {
    let config = defaults()?;
    let rules = config
        .validate()
        .map_err(|e| anyhow::anyhow!("default config: {e}"))?;
    let limits = StoreLimits {
        block_cache_bytes: config.rocksdb.block_cache_bytes,
        write_buffer_bytes: config.rocksdb.write_buffer_bytes,
        click_retention_ms: i64::MAX,
        conversion_retention_ms: i64::MAX,
    };
    let store = StoreSet::new(dir, limits).open(0)?;
    let joiner = Joiner {
        rules,
        grace_ms: 60_000,
        click_retention_ms: i64::MAX,
        conversion_retention_ms: i64::MAX,
    };
    let mut report = String::new();
    let mut done = 0u64;
    let started = Instant::now();
    for &target in checkpoints {
        while done < target {
            let mut st = store.stage();
            let now = s2s_common::now_ms();
            for _ in 0..1000.min(target - done) {
                joiner.on_click(&mut st, &realistic_click(now), now)?;
                done += 1;
            }
            store.commit(st, None)?;
        }
        store.flush()?;
        let (_, bytes) = store.size(Cf::Clicks)?;
        let (rss, hwm) = memory();
        let per_click = bytes as f64 / done as f64;
        println!(
            "attributor state: {done} clicks, {per_click:.1} bytes/click in SST files, RSS {:.0} MiB (peak {:.0} MiB), {:.0} clicks/s",
            rss as f64 / 1048576.0,
            hwm as f64 / 1048576.0,
            done as f64 / started.elapsed().as_secs_f64()
        );
        report.push_str(&format!("{done} {per_click:.1} {rss} {hwm}\n"));
    }
    std::fs::write(out, report)?;
    Ok(())
}

fn bench_topics(partitions: i32) -> TopicsConfig {
    let run = format!("bench-{}", ulid::Ulid::new().to_string().to_lowercase());
    TopicsConfig::named(&run, partitions)
}

/// Produces every record, at most 50 000 in flight.
pub(crate) async fn produce_all(
    producer: &FutureProducer,
    records: impl Iterator<Item = (String, String, Vec<u8>)>,
) -> anyhow::Result<()> {
    let mut in_flight = VecDeque::new();
    for (topic, key, payload) in records {
        let record = FutureRecord::to(&topic).key(&key).payload(&payload);
        // 50 000 in flight stays below librdkafka's queue limit (100 000 messages).
        in_flight.push_back(producer.send_result(record).map_err(|(e, _)| e)?);
        if in_flight.len() >= 50_000 {
            if let Some(f) = in_flight.pop_front() {
                acked(f.await)?;
            }
        }
    }
    for f in in_flight {
        acked(f.await)?;
    }
    Ok(())
}

fn acked(
    r: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
) -> anyhow::Result<()> {
    match r {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e.into()),
        Err(_) => bail!("delivery report dropped"),
    }
}

/// The raw loop: consume both inputs in cycles of up to `max_batch` records or
/// `commit_interval_ms` (the attributor's defaults), produce each record to `out`, wait,
/// commit. Returns the seconds from the first committed cycle to the one that completed
/// `total` records.
async fn raw_loop(
    kafka: &KafkaConfig,
    topics: &TopicsConfig,
    out: &str,
    total: u64,
) -> anyhow::Result<f64> {
    let defaults = defaults()?;
    let interval = defaults.commit_interval;
    let consumer: StreamConsumer = kafka
        .consumer_config(&format!("bench-raw-{}", ulid::Ulid::new()))
        .create()?;
    consumer.subscribe(&[&topics.clicks.name, &topics.postbacks.name])?;
    let producer: FutureProducer = kafka.producer_config().create()?;
    let mut done = 0u64;
    let mut first: Option<(Instant, u64)> = None;
    while done < total {
        let deadline = tokio::time::Instant::now() + interval;
        let mut batch = Vec::new();
        while batch.len() < defaults.max_batch {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(m) => batch.push(m?.detach()),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let mut acks = Vec::with_capacity(batch.len());
        for m in &batch {
            let record = FutureRecord::to(out)
                .key(m.key().unwrap_or_default())
                .payload(m.payload().unwrap_or_default());
            // Enqueued at once (like the attributor), acknowledged below.
            acks.push(producer.send_result(record).map_err(|(e, _)| e)?);
        }
        for a in acks {
            acked(a.await)?;
        }
        let mut offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for m in &batch {
            offsets.insert((m.topic().to_string(), m.partition()), m.offset() + 1);
        }
        let mut tpl = rdkafka::TopicPartitionList::new();
        for ((t, p), o) in offsets {
            tpl.add_partition_offset(&t, p, rdkafka::Offset::Offset(o))?;
        }
        consumer.commit(&tpl, CommitMode::Async)?;
        done += batch.len() as u64;
        first.get_or_insert((Instant::now(), done));
    }
    let (t0, _) = first.context("nothing consumed")?;
    Ok(t0.elapsed().as_secs_f64())
}

/// Sums every series of `name` on a Prometheus text page.
pub(crate) fn metric_sum(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

pub(crate) async fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let url = format!("http://{addr}/metrics");
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let resp = client.get(url.parse()?).await?;
    let body = http_body_util::BodyExt::collect(resp.into_body()).await?;
    Ok(String::from_utf8_lossy(&body.to_bytes()).into_owned())
}

/// The attributor over the same inputs; seconds from its first committed cycle until
/// every input record is committed.
async fn attributor_loop(
    kafka: &KafkaConfig,
    topics: &TopicsConfig,
    state: PathBuf,
    total: u64,
) -> anyhow::Result<f64> {
    let mut config = defaults()?;
    config.pipeline.kafka = kafka.clone();
    config.pipeline.topics = topics.clone();
    config.state_dir = state;
    config.admin_listen = "127.0.0.1:0".parse()?;
    config.group_id = format!("bench-attributor-{}", ulid::Ulid::new());
    let stop = CancellationToken::new();
    let attributor = s2s_attributor::Attributor::bind(config, &stop).await?;
    let admin = attributor.admin_addr()?;
    let task = tokio::spawn(attributor.run(stop.clone()));
    let mut first: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let page = scrape(admin).await?;
        let consumed = metric_sum(&page, "stream_records_consumed_total");
        if consumed > 0.0 {
            first.get_or_insert_with(Instant::now);
        }
        if consumed >= total as f64 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the attributor took in {consumed} of {total} records in 600 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // poll
    }
    let secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    stop.cancel();
    task.await??;
    Ok(secs)
}

/// The throughput comparison, then the summary line with the state figures from `state`.
pub async fn throughput(
    brokers: String,
    clicks: u64,
    partitions: i32,
    dir: &Path,
    state: &Path,
    goal: f64,
) -> anyhow::Result<()> {
    let kafka = KafkaConfig {
        bootstrap_servers: brokers,
        properties: [("linger.ms".to_string(), "2".to_string())].into(),
    };
    let topics = bench_topics(partitions);
    s2s_common::kafka::ensure_topics(&kafka, &topics, Duration::from_secs(30)).await?;
    let raw_out = topics.conversions.name.replace("conversions", "raw-out");
    s2s_common::kafka::ensure_topics(
        &kafka,
        &TopicsConfig {
            conversions: TopicConfig {
                name: raw_out.clone(),
                ..topics.conversions.clone()
            },
            ..topics.clone()
        },
        Duration::from_secs(30),
    )
    .await?;

    let producer: FutureProducer = kafka.producer_config().create()?;
    let now = s2s_common::now_ms();
    let inputs: Vec<Click> = (0..clicks).map(|_| realistic_click(now)).collect();
    let started = Instant::now();
    let records = inputs.iter().enumerate().flat_map(|(i, c)| {
        let postback = Postback {
            event: if i % 3 == 0 { "ftd" } else { "registration" }.into(),
            txn_id: Some(format!("t{i}")),
            amount: Some(rust_decimal::Decimal::new(2_500, 2)),
            currency: Some("USD".into()),
            source: Some("bench".into()),
            ip: None,
            ts_ms: now,
            ..s2s_common::fixtures::postback(&ulid::Ulid::new().to_string(), &c.click_id)
        };
        [
            (
                topics.clicks.name.clone(),
                c.click_id.clone(),
                s2s_common::contract::encode(c),
            ),
            (
                topics.postbacks.name.clone(),
                c.click_id.clone(),
                s2s_common::contract::encode(&postback),
            ),
        ]
    });
    produce_all(&producer, records).await?;
    let total = clicks * 2;
    println!(
        "attributor inputs: {clicks} clicks + {clicks} postbacks on {partitions} partitions, written in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let raw_secs = raw_loop(&kafka, &topics, &raw_out, total).await?;
    let raw_rate = total as f64 / raw_secs;
    println!("attributor baseline (raw consume-produce loop): {total} records in {raw_secs:.2} s = {raw_rate:.0} records/s");
    let att_secs = attributor_loop(&kafka, &topics, dir.join("attributor"), total).await?;
    let att_rate = total as f64 / att_secs;
    println!("attributor subject: {total} records ({clicks} joins) in {att_secs:.2} s = {att_rate:.0} records/s");

    let report = std::fs::read_to_string(state).context("the attributor-state results")?;
    // clicks, bytes per click, RSS, peak RSS
    let points: Vec<(u64, f64, u64, u64)> = report
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
            ))
        })
        .collect();
    let (Some(low), Some(high)) = (points.first(), points.last()) else {
        bail!("no state checkpoints in {}", state.display());
    };
    let mib = |b: u64| b as f64 / 1048576.0;
    let ratio = att_rate / raw_rate;
    // Flat: the peak resident memory at the last checkpoint within 20% of the first.
    let flat = high.3 as f64 <= low.3 as f64 * 1.2;
    let met = ratio >= goal && high.1 <= 100.0 && flat;
    println!(
        "attributor: {att_rate:.0} records/s joined (raw loop {raw_rate:.0}/s), {:.1} bytes/click at {} clicks, peak RSS {:.0} MiB at {} -> {:.0} MiB at {} clicks ratio {ratio:.2} (goal >= {goal}, <= 100 bytes/click, peak RSS within 20%: {})",
        high.1,
        high.0,
        mib(low.3),
        low.0,
        mib(high.3),
        high.0,
        if met { "met" } else { "NOT met" }
    );
    Ok(())
}
