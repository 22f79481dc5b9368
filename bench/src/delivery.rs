//! The delivery benchmark (`scripts/bench delivery`). Two phases, each with its own topics,
//! group and state, the release `delivery` binary as a child process (so that its CPU time
//! is its own) and N conversions already on the conversions topic:
//! 1. two healthy loopback endpoints (no-op hyper servers in this process), every
//!    conversion to both: deliveries per second, and per CPU second of the delivery
//!    process (the "per core" figure);
//! 2. the same with the second endpoint dead (it accepts connections and never answers):
//!    the healthy endpoint's deliveries per second, as a ratio to its rate in phase 1.
//!
//! Rates are timed at the endpoints, from the first delivery to the last, so the worker's
//! start-up (group join, topic checks) does not count.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::producer::FutureProducer;
use s2s_common::contract::Conversion;
use s2s_common::kafka::KafkaConfig;
use s2s_common::topics::TopicsConfig;

use crate::attributor::produce_all;

/// What one phase measured.
struct Phase {
    /// Deliveries to the healthy endpoint `a`, per second.
    a_rate: f64,
    /// Deliveries to every healthy endpoint, per second.
    total_rate: f64,
    /// Deliveries to healthy endpoints per CPU second of the delivery process.
    per_cpu_second: f64,
    /// CPU cores the delivery process used on average.
    cores: f64,
}

/// Conversion `i` of 500 affiliates' traffic: two sub IDs, an FTD paying 50.00 USD.
fn conversion(i: usize, now: i64) -> Conversion {
    let id = format!("{:026}", i);
    Conversion {
        outcome_id: format!("o-{id}"),
        postback_id: format!("pb-{id}"),
        offer_id: "17".into(),
        aff_id: format!("{}", i % 500),
        subs: [
            ("sub1".to_string(), "campaign-spring".to_string()),
            ("sub2".to_string(), format!("creative-{}", i % 40)),
        ]
        .into(),
        txn_id: Some(format!("T{i}")),
        click_ts_ms: now - 3_600_000,
        event_ts_ms: now,
        received_ts_ms: now,
        attributed_at_ms: now,
        ..s2s_common::fixtures::conversion(&format!("cv-{id}"), &ulid::Ulid::new().to_string())
    }
}

/// A no-op HTTP endpoint counting the requests it answered.
async fn counting_endpoint() -> anyhow::Result<(SocketAddr, Arc<AtomicU64>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let count = Arc::new(AtomicU64::new(0));
    tokio::spawn(crate::serve(listener, Some(count.clone())));
    Ok((addr, count))
}

/// A dead endpoint: accepts connections, never answers.
async fn dead_endpoint() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    Ok(addr)
}

/// User plus system CPU seconds of process `pid` so far.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

#[allow(clippy::too_many_arguments)]
async fn phase(
    name: &str,
    kafka: &KafkaConfig,
    delivery_bin: &Path,
    dir: &Path,
    n: usize,
    partitions: i32,
    dead: bool,
) -> anyhow::Result<Phase> {
    let run = format!("bench-{}", ulid::Ulid::new().to_string().to_lowercase());
    let topics = TopicsConfig::named(&run, partitions);
    s2s_common::kafka::ensure_topics(kafka, &topics, Duration::from_secs(30)).await?;
    let producer: FutureProducer = kafka.producer_config().create()?;
    let now = s2s_common::now_ms();
    let topic = topics.conversions.name.clone();
    produce_all(
        &producer,
        (0..n).map(|i| {
            let c = conversion(i, now);
            (
                topic.clone(),
                c.click_id.clone(),
                s2s_common::contract::encode(&c),
            )
        }),
    )
    .await?;

    let (a_addr, a_count) = counting_endpoint().await?;
    let (b_addr, b_count) = counting_endpoint().await?;
    let b_addr = if dead { dead_endpoint().await? } else { b_addr };
    let state = dir.join(format!("{name}-state"));
    let config = dir.join(format!("{name}.toml"));
    let mut pipeline = s2s_common::pipeline::PipelineConfig::defaults();
    pipeline
        .kafka
        .bootstrap_servers
        .clone_from(&kafka.bootstrap_servers);
    pipeline.topics = topics.clone();
    let pipeline_path = dir.join(format!("{name}-pipeline.toml"));
    std::fs::write(&pipeline_path, pipeline.to_toml())?;
    std::fs::write(
        &config,
        format!(
            "admin_listen = \"127.0.0.1:0\"\ngroup_id = \"{run}\"\nstate_dir = \"{}\"\n\
             request_timeout = \"2s\"\n\
             [[postbacks]]\nname = \"a\"\nurl = \"http://{a_addr}/pb?c={{click_id}}&p={{payout}}&s={{sub1}}\"\n\
             [[postbacks]]\nname = \"b\"\nurl = \"http://{b_addr}/pb?c={{click_id}}&p={{payout}}&s={{sub1}}\"\n",
            state.display(),
        ),
    )?;
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let mut child = tokio::process::Command::new(delivery_bin)
        .arg("--config")
        .arg(&config)
        .arg("--pipeline")
        .arg(&pipeline_path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .context("starting the delivery binary")?;
    let pid = child.id().context("delivery pid")?;

    // Sample the endpoints' counters and the process's CPU time until endpoint a (and b
    // when healthy) got every conversion.
    let n = n as u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first: Option<(Instant, f64, u64)> = None;
    let last = loop {
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "delivery exited early ({status}); see {}/{name}.log",
                dir.display()
            );
        }
        let (a, b) = (
            a_count.load(Ordering::Relaxed),
            b_count.load(Ordering::Relaxed),
        );
        let healthy = if dead { a } else { a + b };
        if first.is_none() && healthy > 0 {
            first = Some((Instant::now(), cpu_seconds(pid), healthy));
        }
        if a >= n && (dead || b >= n) {
            break (Instant::now(), cpu_seconds(pid), healthy);
        }
        if Instant::now() > deadline {
            bail!("{name}: only {a} + {b} of {n} deliveries after 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(10)).await; // poll: sampling interval
    };
    let Some((t0, cpu0, done0)) = first else {
        bail!("{name}: nothing delivered");
    };
    let (t1, cpu1, done1) = last;
    let secs = (t1 - t0).as_secs_f64().max(0.001);
    let cpu = (cpu1 - cpu0).max(0.01);
    let delivered = (done1 - done0) as f64;
    let _ = child.start_kill();
    let _ = child.wait().await;
    Ok(Phase {
        a_rate: n as f64 / secs,
        total_rate: delivered / secs,
        per_cpu_second: delivered / cpu,
        cores: cpu / secs,
    })
}

/// Both phases and the summary line.
pub async fn run(
    brokers: String,
    delivery_bin: &Path,
    dir: &Path,
    conversions: usize,
    partitions: i32,
    per_core_goal: f64,
    ratio_goal: f64,
) -> anyhow::Result<()> {
    let kafka = KafkaConfig {
        bootstrap_servers: brokers,
        properties: [("linger.ms".to_string(), "2".to_string())].into(),
    };
    let healthy = phase(
        "healthy",
        &kafka,
        delivery_bin,
        dir,
        conversions,
        partitions,
        false,
    )
    .await?;
    println!(
        "delivery, two healthy endpoints: {:.0} deliveries/s ({:.0}/s to endpoint a), {:.0} per CPU second of the delivery process ({:.2} cores busy)",
        healthy.total_rate, healthy.a_rate, healthy.per_cpu_second, healthy.cores
    );
    let dead = phase(
        "one-dead",
        &kafka,
        delivery_bin,
        dir,
        conversions,
        partitions,
        true,
    )
    .await?;
    println!(
        "delivery, endpoint b dead (never answers): {:.0} deliveries/s to endpoint a, {:.0} per CPU second ({:.2} cores busy)",
        dead.a_rate, dead.per_cpu_second, dead.cores
    );
    let ratio = dead.a_rate / healthy.a_rate;
    let verdict = if healthy.per_cpu_second >= per_core_goal && ratio >= ratio_goal {
        "met"
    } else {
        "NOT met"
    };
    println!(
        "delivery: {:.0} deliveries/s, {:.0} per core (goal >= {per_core_goal:.0}); healthy endpoint with one dead {:.0}/s vs {:.0}/s ratio {:.2} (goal >= {ratio_goal}: {verdict})",
        healthy.total_rate, healthy.per_cpu_second, dead.a_rate, healthy.a_rate, ratio
    );
    Ok(())
}
