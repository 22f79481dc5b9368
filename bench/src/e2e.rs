//! The end-to-end benchmark (`scripts/bench e2e`): ingest, attributor and delivery as
//! release binaries (child processes, so each one's CPU time and memory are its own) on one
//! broker, and a recording affiliate endpoint in this process that notes when each
//! postback arrives.
//!
//! 1. Sustained throughput: N clicks are created first (`POST /v1/clicks`) and taken in by
//!    the attributor; then N postbacks for them are sent as fast as ingest takes them
//!    (closed loop), and the rate is N over the time from the first postback sent to the
//!    last one delivered to the endpoint — all three stages at work, the slowest setting
//!    the pace. CPU (cores) of each service over that time.
//! 2. Latency at half that rate: postbacks sent on a fixed schedule (open loop, each timed
//!    from its scheduled send), p50 and p99 from the send to the affiliate's endpoint;
//!    the ratio of the rate achieved (to the last delivery) to the rate offered says
//!    whether the pipeline keeps up.
//!
//! Peak RSS of each service at the end.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use s2s_common::kafka::KafkaConfig;
use s2s_common::topics::TopicsConfig;

use crate::{client, histogram, HttpClient};

/// When each postback (by number) reached the endpoint.
type Arrivals = Arc<Mutex<HashMap<u64, Instant>>>;

/// A 200 to every request; notes the arrival of `?c=<run>-<n>`.
async fn endpoint(arrivals: Arrivals) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let arrivals = arrivals.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let n = req
                        .uri()
                        .query()
                        .and_then(|q| q.strip_prefix("c="))
                        .and_then(|c| c.rsplit('-').next())
                        .and_then(|n| n.parse::<u64>().ok());
                    if let (Some(n), Ok(mut a)) = (n, arrivals.lock()) {
                        a.entry(n).or_insert_with(Instant::now);
                    }
                    async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// Reads `topics` from their beginning with a consumer of its own, giving each record's
/// payload to `take`, which says how many of the awaited things it held, until
/// `expected` of them came and nothing more for 3 s, or `within` passed. Fails if a
/// partition no longer starts at offset 0: the broker's retention dropped records
/// (librdkafka's mock keeps 5 MB a partition), and what is missing could not be told
/// from what was lost.
pub(crate) fn read_back(
    bootstrap: &str,
    topics: &[&s2s_common::topics::TopicConfig],
    expected: usize,
    within: Duration,
    mut take: impl FnMut(&[u8]) -> usize,
) -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("bench-read-back-{}", ulid::Ulid::new()))
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for t in topics {
        for p in 0..t.partitions {
            let (start, _) = consumer.fetch_watermarks(&t.name, p, Duration::from_secs(10))?;
            if start > 0 {
                anyhow::bail!(
                    "{}[{p}] starts at offset {start}: the broker dropped its oldest records, \
                     so the read-back cannot tell lost from expired (run shorter, or with \
                     more partitions)",
                    t.name
                );
            }
            tpl.add_partition_offset(&t.name, p, rdkafka::Offset::Beginning)?;
        }
    }
    consumer.assign(&tpl)?;
    let (mut found, deadline, mut last) = (0, Instant::now() + within, Instant::now());
    while Instant::now() < deadline && (found < expected || last.elapsed() < Duration::from_secs(3))
    {
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m.context("reading the topics back")?;
        last = Instant::now();
        found += take(m.payload().unwrap_or_default());
    }
    Ok(())
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A service binary as a child process.
pub(crate) struct Service {
    pub(crate) name: &'static str,
    child: tokio::process::Child,
    pid: u32,
}

impl Service {
    pub(crate) fn spawn(
        name: &'static str,
        bin: &Path,
        config: &Path,
        log: &Path,
    ) -> anyhow::Result<Self> {
        Self::spawn_on(name, bin, config, log, None)
    }

    /// As [`Service::spawn`], on the CPUs `cpus` (taskset's list, "1") where given.
    pub(crate) fn spawn_on(
        name: &'static str,
        bin: &Path,
        config: &Path,
        log: &Path,
        cpus: Option<&str>,
    ) -> anyhow::Result<Self> {
        let log = std::fs::File::create(log)?;
        let mut command = match cpus {
            Some(cpus) => {
                let mut c = tokio::process::Command::new("taskset");
                c.arg("-c").arg(cpus).arg(bin);
                c
            }
            None => tokio::process::Command::new(bin),
        };
        let child = command
            .arg("--config")
            .arg(config)
            .env("S2S_PIPELINE", config.with_file_name("pipeline.toml"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().context("pid")?;
        Ok(Service { name, child, pid })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// How it ended, if it has.
    pub(crate) fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("unknown: {e}")),
        }
    }

    /// User + system CPU seconds so far.
    pub(crate) fn cpu(&self) -> f64 {
        crate::delivery::cpu_seconds(self.pid)
    }

    /// Peak resident memory (VmHWM), MiB.
    pub(crate) fn peak_rss_mib(&self) -> f64 {
        crate::attributor::memory_of(&self.pid.to_string()).1 as f64 / (1024.0 * 1024.0)
    }
}

async fn get(client: &HttpClient, uri: String) -> anyhow::Result<u16> {
    let resp = client
        .request(Request::get(uri).body(Empty::new()).context("request")?)
        .await
        .context("send")?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await.context("body")?;
    Ok(status)
}

type PostClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

/// Creates clicks `from..to` through `POST /v1/clicks` (NDJSON, 400 a request, under
/// ingest's default body limit of 64 KiB; 8 requests at a time).
async fn clicks(ingest: &str, run: &str, from: u64, to: u64) -> anyhow::Result<()> {
    let http: PostClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let url = format!("{ingest}/v1/clicks");
    let starts: Vec<u64> = (from..to).step_by(400).collect();
    for chunk in starts.chunks(8) {
        let sent = futures::future::join_all(chunk.iter().map(|&n| {
            let body: String = (n..(n + 400).min(to))
                .map(|i| {
                    format!(
                        "{{\"click_id\":\"{run}-{i}\",\"offer_id\":\"1\",\"aff_id\":\"{}\",\"sub1\":\"bench\"}}\n",
                        i % 300
                    )
                })
                .collect();
            let (http, url) = (&http, &url);
            async move {
                let req = Request::post(url.as_str())
                    .header("content-type", "application/x-ndjson")
                    .body(Full::new(Bytes::from(body)))
                    .context("request")?;
                let resp = http.request(req).await.context("send")?;
                let status = resp.status().as_u16();
                resp.into_body().collect().await.context("body")?;
                anyhow::Ok(status)
            }
        }))
        .await;
        for s in sent {
            let status = s?;
            if status != 200 {
                bail!("creating clicks: ingest answered {status}");
            }
        }
    }
    Ok(())
}

/// Polls `admin`'s /metrics until `series` reaches `at_least`.
pub(crate) async fn metric_at_least(
    admin: &str,
    series: &str,
    at_least: f64,
    within: Duration,
) -> anyhow::Result<()> {
    let client = client(1);
    let deadline = Instant::now() + within;
    loop {
        let resp = client
            .request(Request::get(format!("{admin}/metrics")).body(Empty::new())?)
            .await;
        if let Ok(resp) = resp {
            let page =
                String::from_utf8_lossy(&resp.into_body().collect().await?.to_bytes()).into_owned();
            let v = page.lines().find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|v| v.trim().parse::<f64>().ok())
            });
            if v.is_some_and(|v| v >= at_least) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{series} did not reach {at_least} within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await; // poll
    }
}

/// Waits until `n` arrivals at the endpoint, returns the latest arrival.
async fn delivered(arrivals: &Arrivals, n: usize, within: Duration) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + within;
    loop {
        let (count, last) = {
            let a = arrivals.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            (a.len(), a.values().max().copied())
        };
        if count >= n {
            return last.context("arrivals");
        }
        if Instant::now() > deadline {
            bail!("only {count} of {n} postbacks delivered within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // poll
    }
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    brokers: String,
    bins: &Path,
    dir: &Path,
    postbacks: u64,
    latency_seconds: u64,
    connections: usize,
    goal: f64,
) -> anyhow::Result<()> {
    let kafka = KafkaConfig {
        bootstrap_servers: brokers.clone(),
        properties: [("linger.ms".to_string(), "2".to_string())].into(),
    };
    let run = format!("e2e-{}", ulid::Ulid::new().to_string().to_lowercase());
    let topics = TopicsConfig::named(&run, 6);
    s2s_common::kafka::ensure_topics(&kafka, &topics, Duration::from_secs(30)).await?;
    let arrivals: Arrivals = Arc::default();
    let affiliate = endpoint(arrivals.clone()).await?;
    let (ingest_port, admin) = (free_port()?, [free_port()?, free_port()?, free_port()?]);
    // fetch.wait.max.ms = 20: on Tansu the latency followed the consumers' maximum fetch
    // wait (p50 989 ms with librdkafka's default of 500 ms, 233 ms with 20 ms, same code):
    // Tansu seems to answer a fetch when that wait ends rather than when records arrive.
    // Apache Kafka answers as soon as records arrive, so production configs keep the
    // default.
    let mut pipeline = s2s_common::pipeline::PipelineConfig::defaults();
    pipeline.kafka.bootstrap_servers = brokers.to_string();
    for (k, v) in [
        ("linger.ms", "2"),
        ("compression.type", "lz4"),
        ("fetch.wait.max.ms", "20"),
    ] {
        pipeline.kafka.properties.insert(k.into(), v.into());
    }
    pipeline.topics = topics.clone();
    let offer_1 = s2s_common::pipeline::OfferConfig {
        url: format!("http://{affiliate}/landing?c={{click_id}}"),
        currency: Some("USD".into()),
        payouts: [("ftd".to_string(), rust_decimal::Decimal::new(5000, 2))].into(),
        ..Default::default()
    };
    s2s_common::kafka::ensure_topics(&pipeline.kafka, &topics, Duration::from_secs(30)).await?;
    s2s_catalog::file::import_unelected(
        &pipeline.kafka,
        &topics,
        &s2s_catalog::documents::Checks::new(pipeline.postbacks.clone()),
        None,
        &s2s_catalog::file::CatalogFile {
            offers: [("1".to_string(), offer_1)].into(),
            ..Default::default()
        },
        "bench",
    )
    .await?;
    let write = |name: &str, body: String| -> anyhow::Result<PathBuf> {
        let p = dir.join(format!("{name}.toml"));
        std::fs::write(&p, body)?;
        Ok(p)
    };
    // Every service finds it through S2S_PIPELINE ([`Service::spawn`]).
    write("pipeline", pipeline.to_toml())?;
    let configs = [
        write(
            "ingest",
            format!(
                "listen = \"127.0.0.1:{ingest_port}\"\nadmin_listen = \"127.0.0.1:{}\"\n\
                 [sources.default]\nauth = \"none\"\n",
                admin[0]
            ),
        )?,
        write(
            "attributor",
            format!(
                "admin_listen = \"127.0.0.1:{}\"\ngroup_id = \"{run}-a\"\nstate_dir = \"{}\"\n\
                 processing_guarantee = \"at_least_once\"\n",
                admin[1],
                dir.join("attributor-state").display()
            ),
        )?,
        write(
            "delivery",
            format!(
                "admin_listen = \"127.0.0.1:{}\"\ngroup_id = \"{run}-d\"\nstate_dir = \"{}\"\n\
                 [[postbacks]]\nname = \"aff\"\nurl = \"http://{affiliate}/pb?c={{click_id}}\"\n",
                admin[2],
                dir.join("delivery-state").display()
            ),
        )?,
    ];
    let services = [
        Service::spawn(
            "ingest",
            &bins.join("ingest"),
            &configs[0],
            &dir.join("ingest.log"),
        )?,
        Service::spawn(
            "attributor",
            &bins.join("attributor"),
            &configs[1],
            &dir.join("attributor.log"),
        )?,
        Service::spawn(
            "delivery",
            &bins.join("delivery"),
            &configs[2],
            &dir.join("delivery.log"),
        )?,
    ];
    let admin_url = |i: usize| format!("http://127.0.0.1:{}", admin[i]);
    for (i, s) in services.iter().enumerate() {
        let up = format!("{}_kafka_brokers_up", s.name);
        metric_at_least(&admin_url(i), &up, 1.0, Duration::from_secs(60)).await?;
    }
    let ingest = format!("http://127.0.0.1:{ingest_port}");
    let clicks_taken = "stream_records_consumed_total{input=\"click\",service=\"attributor\"}";

    // 1. Sustained throughput.
    clicks(&ingest, &run, 0, postbacks).await?;
    metric_at_least(
        &admin_url(1),
        clicks_taken,
        postbacks as f64,
        Duration::from_secs(300),
    )
    .await?;
    let http = client(connections);
    let next = AtomicU64::new(0);
    let cpu0: Vec<f64> = services.iter().map(Service::cpu).collect();
    let started = Instant::now();
    let refused = AtomicU64::new(0);
    futures::future::join_all((0..connections).map(|_| async {
        loop {
            let n = next.fetch_add(1, Ordering::Relaxed);
            if n >= postbacks {
                break;
            }
            let uri =
                format!("{ingest}/postback?click_id={run}-{n}&event=ftd&txn_id=T{n}&amount=10");
            loop {
                match get(&http, uri.clone()).await {
                    Ok(200) => break,
                    _ => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }))
    .await;
    let accepted_in = started.elapsed();
    let last = delivered(&arrivals, postbacks as usize, Duration::from_secs(600)).await?;
    let span = (last - started).as_secs_f64();
    let cpu1: Vec<f64> = services.iter().map(Service::cpu).collect();
    let rate = postbacks as f64 / span;
    println!(
        "e2e sustained: {postbacks} postbacks accepted in {:.1} s ({:.0}/s, {} refused and resent), all delivered after {span:.1} s: {rate:.0} postbacks/s through all three stages",
        accepted_in.as_secs_f64(),
        postbacks as f64 / accepted_in.as_secs_f64(),
        refused.load(Ordering::Relaxed)
    );
    for (i, s) in services.iter().enumerate() {
        println!(
            "e2e sustained: {} used {:.2} cores",
            s.name,
            (cpu1[i] - cpu0[i]) / span
        );
    }

    // 2. Latency at half that rate, open loop.
    let half = rate / 2.0;
    let count = (half * latency_seconds as f64) as u64;
    let (from, to) = (postbacks, postbacks + count);
    clicks(&ingest, &run, from, to).await?;
    metric_at_least(
        &admin_url(1),
        clicks_taken,
        to as f64,
        Duration::from_secs(300),
    )
    .await?;
    let start = Instant::now() + Duration::from_millis(200);
    let sends = futures::future::join_all((0..count).map(|i| {
        let http = &http;
        let ingest = &ingest;
        let run = &run;
        async move {
            let at = start + Duration::from_secs_f64(i as f64 / half);
            tokio::time::sleep_until(at.into()).await;
            let n = from + i;
            let uri =
                format!("{ingest}/postback?click_id={run}-{n}&event=ftd&txn_id=T{n}&amount=10");
            let ok = matches!(get(http, uri).await, Ok(200));
            (n, at, ok)
        }
    }))
    .await;
    let last = delivered(&arrivals, to as usize, Duration::from_secs(300)).await?;
    let mut lat = histogram()?;
    let a = arrivals
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let mut failed = 0;
    for (n, at, ok) in &sends {
        if !ok {
            failed += 1;
        }
        if let Some(t) = a.get(n) {
            lat.record(
                u64::try_from(t.saturating_duration_since(*at).as_micros()).unwrap_or(u64::MAX),
            )?;
        }
    }
    let achieved = count as f64 / (last - start).as_secs_f64();
    let ratio = achieved / half;
    let (p50, p99) = (
        lat.value_at_quantile(0.5) as f64 / 1000.0,
        lat.value_at_quantile(0.99) as f64 / 1000.0,
    );
    println!(
        "e2e at half rate: {count} postbacks offered at {half:.0}/s over {latency_seconds} s ({failed} not accepted at first try), postback → delivered p50 {p50:.1} ms, p99 {p99:.1} ms, max {:.1} ms",
        lat.max() as f64 / 1000.0
    );
    let mut usage = Vec::new();
    for s in &services {
        usage.push(format!("{} peak RSS {:.0} MiB", s.name, s.peak_rss_mib()));
    }
    println!("e2e memory: {}", usage.join(", "));
    let verdict = if ratio >= goal { "met" } else { "NOT met" };
    println!(
        "e2e: {rate:.0} postbacks/s sustained through ingest, attributor and delivery; at {half:.0}/s p50 {p50:.1} ms p99 {p99:.1} ms postback → delivered; achieved/offered at half rate ratio {ratio:.2} (goal >= {goal}: {verdict})"
    );
    for mut s in services {
        let _ = s.child.start_kill();
        let _ = s.child.wait().await;
    }
    Ok(())
}
