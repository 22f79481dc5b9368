//! The overload benchmark (`scripts/bench overload`): what ingest does beyond capacity.
//!
//! Ingest (the release binary, a child process with its default limits) on the broker:
//!
//! 1. **Capacity**: postbacks as fast as ingest answers them (closed loop, 512
//!    connections), the same measure as `scripts/bench ingest`.
//! 2. **Half capacity**: an open loop at half that rate; the p99 of the answers,
//!    measured from each request's scheduled send (no coordinated omission).
//! 3. **Twice capacity**, with `idle` more connections held open alongside — half of
//!    them silent, half sending a header byte a second (slowloris), each reopened when
//!    ingest cuts it off: an open loop at twice the capacity over more connections than
//!    ingest admits requests in flight. Reported: the share answered 503, the p99 of the
//!    admitted (2xx) answers and of the 503s, and ingest's peak RSS.
//! 4. **The broker holds exactly the acknowledged records**: every request of phases 2
//!    and 3 carries its own click ID; the postbacks topic is read back and each
//!    acknowledged one must be there, and none that was refused.
//!
//! The last line's ratio is the half-capacity p99 ÷ the admitted p99 at twice capacity
//! (goal ≥ 0.33: admitted requests keep their latency within 3×).
//!
//! Regimes. On the real broker (`--brokers`, Tansu here) ingest's capacity is the
//! machine's CPU, which the generator shares: on a small machine twice the capacity
//! cannot be generated beside it. With `--mock-broker-rtt` ingest writes to librdkafka's
//! mock broker, in this process, which acknowledges after that round trip: capacity is
//! then ingest's bound on requests in flight over the broker's latency — a slow or
//! distant broker, the overload a production ingest meets first — and leaves the CPU to
//! generate twice it. Same checks, read back from the mock. With `--ingest-cpu-quota`
//! ingest runs under a CPU limit (a cgroup, as in a container): its own CPU is the
//! capacity and the generator has the rest of the machine to offer twice it; the line
//! `ingest CPU per answer` then says what a 503 costs against an admitted request.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use s2s_common::kafka::KafkaConfig;
use s2s_common::topics::TopicsConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::e2e::{free_port, Service};
use crate::load::connect_all;

#[derive(Debug, Clone, clap::Args)]
pub struct Sizes {
    /// The CPUs ingest runs on (taskset's list, e.g. "1"); `scripts/bench` keeps this
    /// process — the generator, and the mock broker if there is one — on others
    /// (BENCH_GENERATOR_CPUS). Tansu is not pinned.
    #[arg(long)]
    pub ingest_cpus: Option<String>,
    /// Ingest's CPU quota, in CPUs ("0.3"): a cgroup of its own with that CFS bandwidth
    /// limit (a container's CPU limit), so that its CPU is the limit and the generator
    /// keeps the rest of the machine. Needs root and a writable cgroup filesystem.
    #[arg(long)]
    pub ingest_cpu_quota: Option<f64>,
    /// Connections of the closed loop that measures capacity.
    #[arg(long, default_value_t = 512)]
    pub capacity_connections: usize,
    #[arg(long, default_value_t = 10)]
    pub capacity_seconds: u64,
    /// Open-loop connections: more than ingest's max_requests_in_flight (512).
    #[arg(long, default_value_t = 3000)]
    pub connections: usize,
    /// Seconds of each open loop.
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// Idle and slow connections held during the overload.
    #[arg(long, default_value_t = 5000)]
    pub idle: usize,
    /// Peak RSS goal, MiB.
    #[arg(long, default_value_t = 256.0)]
    pub rss_goal_mib: f64,
    #[arg(long, default_value_t = 0.33)]
    pub goal: f64,
    /// Instead of `--brokers`, a mock broker in this process that acknowledges after this
    /// round trip ("20ms"): capacity bound by the broker's latency, not by the CPU.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub mock_broker_rtt: Option<Duration>,
}

/// How late the generator may itself be (a request sent after its scheduled time, its
/// connection free) before its figures are flagged as the machine's.
const GENERATOR_LATE: Duration = Duration::from_millis(100);

/// One request's answer: its number, status (0: no answer), µs from its scheduled send.
struct Answer {
    n: u64,
    status: u16,
    us: u64,
}

/// What one open-loop phase saw.
struct Phase {
    offered: u64,
    elapsed: Duration,
    /// Latency of 2xx answers, µs from the scheduled send.
    admitted: Histogram<u64>,
    /// Latency of 503 answers.
    refused: Histogram<u64>,
    other: u64,
    errors: u64,
    /// Request numbers answered 2xx, and answered otherwise (or not at all).
    acked: Vec<u64>,
    not_acked: Vec<u64>,
    /// The generator's own lateness, worst, µs.
    max_lag_us: u64,
}

impl Phase {
    fn new() -> anyhow::Result<Self> {
        Ok(Phase {
            offered: 0,
            elapsed: Duration::ZERO,
            admitted: crate::histogram()?,
            refused: crate::histogram()?,
            other: 0,
            errors: 0,
            acked: Vec::new(),
            not_acked: Vec::new(),
            max_lag_us: 0,
        })
    }

    fn record(&mut self, a: Answer) {
        self.offered += 1;
        match a.status {
            200..=299 => {
                self.admitted.saturating_record(a.us);
                self.acked.push(a.n);
                return;
            }
            503 => self.refused.saturating_record(a.us),
            0 => self.errors += 1,
            _ => self.other += 1,
        }
        self.not_acked.push(a.n);
    }

    fn p99_ms(h: &Histogram<u64>) -> f64 {
        h.value_at_quantile(0.99) as f64 / 1000.0
    }

    fn refused_share(&self) -> f64 {
        self.refused.len() as f64 / self.offered.max(1) as f64
    }
}

/// Ingest's own latency histogram of `/postback` (admitted requests only: a shed one
/// never reaches the router).
const SERVER_SIDE: &str = "ingest_http_request_duration_seconds{route=\"/postback\"}";

async fn server_side(admin: std::net::SocketAddr) -> anyhow::Result<crate::server_side::Buckets> {
    crate::server_side::buckets(&crate::attributor::scrape(admin).await?, SERVER_SIDE)
}

/// The upper bound (ms) of the bucket that holds the p99 of what was observed since
/// `before`.
fn server_p99_ms(
    before: &crate::server_side::Buckets,
    after: &crate::server_side::Buckets,
) -> anyhow::Result<f64> {
    let since = after.since(before)?;
    Ok(since
        .quantile_bucket(0.99)
        .map_or(f64::NAN, |(_, hi)| hi * 1000.0))
}

fn path(prefix: &str, n: u64) -> String {
    format!("/postback?click_id={prefix}{n}&event=ftd&amount=10")
}

/// `rate` requests per second for `d` over `connections`, request i on connection
/// i mod connections, each timed from its scheduled send (as `load::open_loop`), every
/// answer's status kept by request number.
async fn open_loop(
    base: &str,
    prefix: &str,
    rate: f64,
    connections: usize,
    d: Duration,
) -> anyhow::Result<Phase> {
    let total = (d.as_secs_f64() * rate) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let conns = connect_all(base, connections).await?;
    let mut senders = Vec::with_capacity(connections);
    let mut tasks = Vec::with_capacity(connections);
    for mut conn in conns {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
        senders.push(tx);
        let prefix = prefix.to_string();
        // Raw answers, merged into histograms once at the end: a pair of histograms per
        // connection is ~0.5 MB, which at thousands of connections stalled the generator.
        tasks.push(tokio::spawn(async move {
            let mut answers: Vec<Answer> = Vec::new();
            let mut max_lag_us = 0u64;
            let mut free_at = Instant::now();
            while let Some((n, scheduled)) = rx.recv().await {
                let lag = Instant::now().saturating_duration_since(scheduled.max(free_at));
                max_lag_us = max_lag_us.max(lag.as_micros() as u64);
                // A connection ingest closed (a 503 too_many_connections closes it) is
                // opened again for the next request by `load::Conn`.
                let status = match conn.status(&path(&prefix, n)).await {
                    Ok(s) => s.as_u16(),
                    Err(_) => 0,
                };
                answers.push(Answer {
                    n,
                    status,
                    us: scheduled.elapsed().as_micros() as u64,
                });
                free_at = Instant::now();
            }
            (answers, max_lag_us)
        }));
    }
    let start = Instant::now() + Duration::from_millis(20);
    let dispatcher = crate::load::dispatch(total, interval, start, senders, |i, due| (i, due))?;
    let mut phase = Phase::new()?;
    for t in tasks {
        let (answers, lag) = t.await?;
        phase.max_lag_us = phase.max_lag_us.max(lag);
        for a in answers {
            phase.record(a);
        }
    }
    phase.elapsed = start.elapsed();
    dispatcher
        .join()
        .map_err(|_| anyhow::anyhow!("the dispatcher thread panicked"))?;
    Ok(phase)
}

/// Holds `count` connections to `addr` open until `stop`: even ones silent, odd ones
/// sending an endless header a byte a second. Each one ingest closes is opened again.
/// Returns how many times one was (re)opened.
fn hold_idle(
    addr: std::net::SocketAddr,
    count: usize,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let opened = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::with_capacity(count);
        for i in 0..count {
            let (stop, opened) = (stop.clone(), opened.clone());
            // Opened one after another, as `connect_all` does, so that the first
            // connects do not all land in the listen backlog at once.
            let first = tokio::net::TcpStream::connect(addr).await.ok();
            tasks.push(tokio::spawn(async move {
                let mut stream = first;
                while !stop.is_cancelled() {
                    let mut s = match stream.take() {
                        Some(s) => s,
                        None => match tokio::net::TcpStream::connect(addr).await {
                            Ok(s) => s,
                            Err(_) => {
                                // Refused while ingest is full: try again shortly.
                                tokio::select! {
                                    () = stop.cancelled() => break,
                                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                                }
                            }
                        },
                    };
                    opened.fetch_add(1, Ordering::Relaxed);
                    let slow = i % 2 == 1;
                    if slow
                        && s.write_all(b"GET /postback HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                            .await
                            .is_err()
                    {
                        continue;
                    }
                    let mut buf = [0u8; 1024];
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => break,
                            read = s.read(&mut buf) => match read {
                                Ok(0) | Err(_) => break, // closed by ingest
                                Ok(_) => {}
                            },
                            () = tokio::time::sleep(Duration::from_secs(1)), if slow => {
                                if s.write_all(b"a").await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        opened.load(Ordering::Relaxed)
    })
}

/// Reads the postbacks topic from the beginning and returns the request numbers of
/// the click IDs starting with each of `prefixes`, once every number of `expected` is
/// there and nothing more arrived for 3 s (or `within` has passed).
fn stored(
    kafka: &KafkaConfig,
    topics: &TopicsConfig,
    prefixes: &[&str],
    expected: usize,
    within: Duration,
) -> anyhow::Result<Vec<HashSet<u64>>> {
    #[derive(serde::Deserialize)]
    struct Id {
        click_id: String,
    }
    let mut found: Vec<HashSet<u64>> = prefixes.iter().map(|_| HashSet::new()).collect();
    let postbacks = [&topics.postbacks];
    crate::e2e::read_back(
        &kafka.bootstrap_servers,
        &postbacks,
        expected,
        within,
        |payload| {
            let Ok(id) = serde_json::from_slice::<Id>(payload) else {
                return 0;
            };
            let mut new = 0;
            for (i, prefix) in prefixes.iter().enumerate() {
                if let Some(n) = id
                    .click_id
                    .strip_prefix(prefix)
                    .and_then(|n| n.parse().ok())
                {
                    new += usize::from(found[i].insert(n));
                }
            }
            new
        },
    )?;
    Ok(found)
}

/// A one-broker mock cluster answering every request after `rtt`, with `topics` on it
/// (it answers no CreateTopics: they are made directly and `create` turned off).
fn mock_broker(
    rtt: Duration,
    topics: &mut TopicsConfig,
) -> anyhow::Result<MockCluster<'static, DefaultProducerContext>> {
    let mock = MockCluster::new(1).context("starting the mock broker")?;
    mock.broker_round_trip_time(1, rtt)
        .context("setting the mock broker's round trip")?;
    topics.create = false;
    for t in topics.all() {
        mock.create_topic(&t.name, t.partitions, 1)
            .with_context(|| format!("topic {} on the mock broker", t.name))?;
    }
    println!(
        "broker: librdkafka's mock, in the generator's process, acknowledging after {}",
        humantime::format_duration(rtt)
    );
    Ok(mock)
}

pub async fn run(brokers: &str, bins: &Path, dir: &Path, sizes: Sizes) -> anyhow::Result<()> {
    // This process holds the open loop's and the idle connections.
    rlimit::increase_nofile_limit((sizes.connections + sizes.idle) as u64 * 2 + 1024)
        .context("raising the open-files limit")?;
    let run = format!("ov-{}", ulid::Ulid::new().to_string().to_lowercase());
    let mut pipeline = s2s_common::pipeline::PipelineConfig::defaults();
    // Six partitions, as ingest's benchmark; on the mock broker, which keeps 5 MB of
    // each, 24, to hold a broker-bound run (the read-back fails if it dropped any).
    let partitions = if sizes.mock_broker_rtt.is_some() {
        24
    } else {
        6
    };
    pipeline.topics = TopicsConfig::named(&run, partitions);
    // Kept until the end: the mock broker lives as long as this value.
    let mock = match sizes.mock_broker_rtt {
        Some(rtt) => Some(mock_broker(rtt, &mut pipeline.topics)?),
        None => None,
    };
    pipeline.kafka.bootstrap_servers = match &mock {
        Some(m) => m.bootstrap_servers(),
        None => brokers.to_string(),
    };
    s2s_common::kafka::ensure_topics(&pipeline.kafka, &pipeline.topics, Duration::from_secs(30))
        .await?;
    let (port, admin) = (free_port()?, free_port()?);
    let extra = std::env::var("BENCH_INGEST_CONFIG").unwrap_or_default();
    std::fs::write(dir.join("pipeline.toml"), pipeline.to_toml())?;
    let config = dir.join("ingest.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n{extra}\n\
             [sources.default]\nauth = \"none\"\n"
        ),
    )?;
    let ingest = Service::spawn_on(
        "ingest",
        &bins.join("ingest"),
        &config,
        &dir.join("ingest.log"),
        sizes.ingest_cpus.as_deref(),
    )?;
    let quota = match sizes.ingest_cpu_quota {
        Some(cpus) => {
            println!("ingest limited to {cpus} CPU (cgroup CPU quota)");
            Some(crate::cgroup::CpuQuota::apply(ingest.pid(), cpus)?)
        }
        None => None,
    };
    crate::catalog::ready(
        &format!("http://127.0.0.1:{admin}"),
        Duration::from_secs(60),
    )
    .await?;
    let base = format!("http://127.0.0.1:{port}");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;

    // Warm-up: the producer's connections, the broker's first batches.
    crate::load::closed_loop(
        &base,
        &format!("/postback?click_id={run}-warm-{{n}}&event=ftd&amount=10"),
        sizes.capacity_connections,
        Duration::from_secs(3),
    )
    .await?;
    let cap_cpu_before = ingest.cpu();
    let cap = crate::load::closed_loop(
        &base,
        &format!("/postback?click_id={run}-cap-{{n}}&event=ftd&amount=10"),
        sizes.capacity_connections,
        Duration::from_secs(sizes.capacity_seconds),
    )
    .await?;
    let capacity = cap.ok as f64 / cap.elapsed.as_secs_f64();
    let per_capacity_us = (ingest.cpu() - cap_cpu_before) / cap.ok.max(1) as f64 * 1e6;
    println!(
        "capacity: {capacity:.0} postbacks/s ({} connections, closed loop, {} s)",
        sizes.capacity_connections, sizes.capacity_seconds
    );

    let d = Duration::from_secs(sizes.seconds);
    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse()?;
    let half_prefix = format!("{run}-half-");
    let before = server_side(admin_addr).await?;
    let cpu_before = ingest.cpu();
    let half = open_loop(&base, &half_prefix, capacity / 2.0, sizes.connections, d).await?;
    let half_cpu = ingest.cpu() - cpu_before;
    let half_server = server_p99_ms(&before, &server_side(admin_addr).await?)?;
    println!(
        "half capacity: {:.0}/s offered over {} connections: {} 2xx p99 {:.2} ms (server-side <= {half_server} ms), {} 503, {} other, {} errors; generator lag max {:.1} ms",
        capacity / 2.0,
        sizes.connections,
        half.admitted.len(),
        Phase::p99_ms(&half.admitted),
        half.refused.len(),
        half.other,
        half.errors,
        half.max_lag_us as f64 / 1000.0
    );

    let stop = CancellationToken::new();
    let idle = hold_idle(addr, sizes.idle, stop.clone());
    crate::e2e::metric_at_least(
        &format!("http://127.0.0.1:{admin}"),
        "ingest_connections",
        sizes.idle as f64 * 0.9,
        Duration::from_secs(60),
    )
    .await
    .context("the idle connections open")?;
    let cpu_before = ingest.cpu();
    let periods_before = quota.as_ref().map(|q| q.periods());
    let over_prefix = format!("{run}-over-");
    let before = server_side(admin_addr).await?;
    let over = open_loop(&base, &over_prefix, capacity * 2.0, sizes.connections, d).await?;
    let over_server = server_p99_ms(&before, &server_side(admin_addr).await?)?;
    let over_cpu = ingest.cpu() - cpu_before;
    let cpu = over_cpu / over.elapsed.as_secs_f64();
    let throttled = quota
        .as_ref()
        .zip(periods_before)
        .map(|(q, (periods, throttled))| {
            let (p, t) = q.periods();
            format!(
                "; held back by its quota in {:.0} % of the periods",
                t.saturating_sub(throttled) as f64 / p.saturating_sub(periods).max(1) as f64
                    * 100.0
            )
        })
        .unwrap_or_default();
    // The schedule's requests over the time to their last answer: below the scheduled
    // rate when requests waited for their connection, i.e. for ingest's previous answer
    // (the generator's own lateness is `max_lag_us`).
    let answered = over.offered as f64 / over.elapsed.as_secs_f64();
    stop.cancel();
    let opened = idle.await?;
    let rss = ingest.peak_rss_mib();
    let admitted_rate = over.admitted.len() as f64 / over.elapsed.as_secs_f64();
    println!(
        "twice capacity: {:.0}/s scheduled ({answered:.0}/s to the last answer) over {} connections, {} idle or slow connections held ({} opened in all): \
         {} 2xx ({admitted_rate:.0}/s) p99 {:.2} ms (server-side <= {over_server} ms); {} 503 ({:.1} %) p99 {:.2} ms; {} other, {} errors; \
         ingest {cpu:.2} cores{throttled}; generator lag max {:.1} ms",
        capacity * 2.0,
        sizes.connections,
        sizes.idle,
        opened,
        over.admitted.len(),
        Phase::p99_ms(&over.admitted),
        over.refused.len(),
        over.refused_share() * 100.0,
        Phase::p99_ms(&over.refused),
        over.other,
        over.errors,
        over.max_lag_us as f64 / 1000.0
    );

    // What an answer costs ingest, from its CPU time (/proc): an admitted one at
    // capacity and at half (more per request at the lower rate), and a 503 at twice — what
    // remains of the phase's CPU after the admitted answers at their half-capacity cost,
    // over the 503s (it carries the idle and slow connections' cost too: at most). When
    // ingest's CPU is the limit, refusing the whole of a twice-capacity load takes
    // 2 x (503 / admitted at capacity) of it: at 1 or more nothing is left to admit with.
    let per_half_us = half_cpu / half.admitted.len().max(1) as f64 * 1e6;
    let refusal = if over.refused.is_empty() {
        "no 503 at twice (see below)".to_string()
    } else {
        let per_refusal_us = (over_cpu - over.admitted.len() as f64 * per_half_us / 1e6)
            / over.refused.len() as f64
            * 1e6;
        let share = per_refusal_us / per_capacity_us;
        // Capacity is ingest's CPU only under the quota (else the broker or the
        // machine's may set it).
        let whole = if quota.is_some() {
            format!(
                "; refusing a whole 2x load would take {:.2}x ingest's CPU",
                2.0 * share
            )
        } else {
            String::new()
        };
        format!(
            "503 {per_refusal_us:.1} us at twice (at most), {share:.2} of an admitted one{whole}"
        )
    };
    println!(
        "ingest CPU per answer: admitted {per_capacity_us:.1} us at capacity, {per_half_us:.1} us at half; {refusal}"
    );

    let acked = half.acked.len() + over.acked.len();
    let found = stored(
        &pipeline.kafka,
        &pipeline.topics,
        &[&half_prefix, &over_prefix],
        acked,
        Duration::from_secs(300),
    )?;
    let mut lost = 0usize;
    let mut extra = 0usize;
    for (phase, found) in [&half, &over].iter().zip(&found) {
        lost += phase.acked.iter().filter(|n| !found.contains(n)).count();
        extra += phase.not_acked.iter().filter(|n| found.contains(n)).count();
    }
    println!(
        "broker: {acked} acknowledged, {lost} of them missing; {} refused or failed, {extra} of them stored",
        half.not_acked.len() + over.not_acked.len()
    );
    drop(ingest);
    drop(quota);
    drop(mock);

    let (half_p99, over_p99) = (Phase::p99_ms(&half.admitted), Phase::p99_ms(&over.admitted));
    let ratio = half_p99 / over_p99.max(0.001);
    let met = ratio >= sizes.goal && rss <= sizes.rss_goal_mib && lost == 0 && extra == 0;
    // The generator shares the machine: when it falls behind its schedule, requests
    // wait in it (their latency counts from their scheduled send), and the client-side
    // figure says something about the machine, not only about ingest.
    let late = Duration::from_micros(over.max_lag_us.max(half.max_lag_us));
    println!(
        "overload: capacity {capacity:.0}/s; at 2x {:.1} % answered 503 (p99 {:.2} ms), \
         admitted p99 {over_p99:.2} ms vs {half_p99:.2} ms at half capacity (server-side <= {over_server} vs <= {half_server} ms); \
         ingest peak RSS {rss:.0} MiB (goal <= {:.0}); {lost} acknowledged lost, {extra} refused stored (goal 0, 0); \
         ratio {ratio:.2} (goal >= {:.2}){}{}",
        over.refused_share() * 100.0,
        Phase::p99_ms(&over.refused),
        sizes.rss_goal_mib,
        sizes.goal,
        if met { "" } else { " NOT MET" },
        if late <= GENERATOR_LATE {
            String::new()
        } else {
            format!(
                " (the generator itself fell up to {late:.0?} behind its schedule: the machine, not only ingest, set the client-side figures)"
            )
        }
    );
    if over.refused.is_empty() {
        bail!("nothing was refused at twice capacity: the overload was not reached");
    }
    Ok(())
}
