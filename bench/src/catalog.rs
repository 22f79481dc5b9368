//! The catalog benchmark: a catalog of `affiliates` affiliates, `postbacks` postbacks and
//! `offers` offers in its topic (written as an import would: one accepted record each),
//! then
//! - start-up: the time a reader takes to read the topic to its end (each of `rounds`
//!   fresh readers; median and spread), and the resident memory the first one adds, per
//!   entity; each service's time from start to ready on that catalog, and ingest's resident
//!   memory on it against on a catalog of one offer;
//! - the hot path: two ingest processes (release binaries), one on the big catalog and one
//!   on a catalog holding only the offer clicked, take the same clicks
//!   (`/click?offer_id=1&aff_id=aff-{n % affiliates}`: known affiliates in the big one,
//!   unknown — accepted — in the other) in alternating closed-loop rounds; CPU time per
//!   click read from `/proc` (median of the rounds);
//! - live changes: `changes` changes of an affiliate through the console's API (its
//!   release binary, the elected writer), each timed from the API's 2xx until ingest, the
//!   attributor and delivery (release binaries) all report its revision
//!   (`<service>_catalog_revision`, polled every 2 ms).
//!
//! The last line's ratio is ingest's CPU per click with the one-offer catalog ÷ with the
//! big one: goal ≥ 0.95 (the big catalog costs at most 5 % more per request).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use s2s_catalog::{Catalog, Follower, Stored};
use s2s_common::kafka::KafkaConfig;
use s2s_common::topics::TopicsConfig;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::e2e::{free_port, metric_at_least, Service};

/// How long a reader may take to read the catalog to its end.
const READ_WITHIN: Duration = Duration::from_secs(600);
/// How long a service may take to be ready.
const READY_WITHIN: Duration = Duration::from_secs(600);
/// How long a live change may take to reach every service (the goal).
const APPLY_GOAL: Duration = Duration::from_secs(1);
/// CPU per request with the big catalog may be this much of the empty one's, inverted.
const CPU_GOAL: f64 = 0.95;
const TOKEN: &str = "bench-token-0123456789abcdef";

#[derive(Debug, clap::Args)]
pub struct Sizes {
    #[arg(long, default_value_t = 100_000)]
    pub affiliates: usize,
    #[arg(long, default_value_t = 100_000)]
    pub postbacks: usize,
    #[arg(long, default_value_t = 10_000)]
    pub offers: usize,
    /// Fresh readers timed reading the catalog to its end.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Live changes timed from the API's 2xx to applied in every service.
    #[arg(long, default_value_t = 100)]
    pub changes: usize,
    /// Alternating rounds of clicks per ingest, for CPU per click.
    #[arg(long, default_value_t = 5)]
    pub cpu_rounds: usize,
    /// Seconds of each CPU round.
    #[arg(long, default_value_t = 5)]
    pub cpu_seconds: u64,
}

pub async fn run(brokers: &str, bins: &Path, dir: &Path, sizes: Sizes) -> anyhow::Result<()> {
    let kafka = KafkaConfig {
        bootstrap_servers: brokers.to_string(),
        properties: Default::default(),
    };
    let name = format!("bench-{}", ulid::Ulid::new().to_string().to_lowercase());
    let big = TopicsConfig::named(&name, 1);
    let small = TopicsConfig::named(&format!("{name}-small"), 1);
    for t in [&big, &small] {
        s2s_common::kafka::ensure_topics(&kafka, t, Duration::from_secs(30)).await?;
    }
    let entities = sizes.affiliates + sizes.postbacks + sizes.offers;
    let loaded = Instant::now();
    fill(&kafka, &big.catalog.name, &sizes).await?;
    let one_offer = Sizes {
        affiliates: 0,
        postbacks: 0,
        offers: 2,
        ..sizes
    };
    fill(&kafka, &small.catalog.name, &one_offer).await?;
    println!(
        "catalog: {entities} entities written in {:.1} s",
        loaded.elapsed().as_secs_f64()
    );

    // 1. A reader's start-up and memory.
    let shutdown = CancellationToken::new();
    let mut reads = Vec::new();
    // The first reader's growth of the process: later ones reuse what the allocator kept.
    let mut per_entity = None;
    for _ in 0..sizes.rounds {
        let before = crate::attributor::memory().0;
        let started = Instant::now();
        let f = Follower::<Catalog>::start(&kafka, &big.catalog.name, READ_WITHIN, &shutdown)
            .await
            .context("reading the catalog")?;
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
    shutdown.cancel();
    let (read_median, read_min, read_max) = spread(&mut reads);
    let mem = per_entity.unwrap_or_default();
    println!(
        "catalog: a reader reads it to its end in {read_median:.2} s (median of {}; {read_min:.2} – {read_max:.2} s) \
         and holds {mem:.0} bytes of resident memory per entity",
        sizes.rounds
    );

    // 2. The services on it.
    let on_big = Stack::new(brokers, &big, &dir.join("big"))?;
    let on_small = Stack::new(brokers, &small, &dir.join("small"))?;
    let ingest_small = on_small.start(bins, "ingest").await?;
    let ingest = on_big.start(bins, "ingest").await?;
    let attributor = on_big.start(bins, "attributor").await?;
    let delivery = on_big.start(bins, "delivery").await?;
    let console = on_big.start(bins, "console").await?;
    for s in [&ingest_small, &ingest, &attributor, &delivery, &console] {
        println!(
            "catalog: {} ({} catalog) ready {:.2} s after its start, {:.0} MiB resident",
            s.service.name,
            if std::ptr::eq(s, &ingest_small) {
                "one-offer"
            } else {
                "big"
            },
            s.ready_after.as_secs_f64(),
            s.rss_mib()
        );
    }
    let ingest_per_entity =
        (ingest.rss_mib() - ingest_small.rss_mib()) * 1024.0 * 1024.0 / entities as f64;
    println!(
        "catalog: ingest holds {ingest_per_entity:.0} bytes per entity (resident, big − one-offer)"
    );

    // 3. The hot path: CPU per click, alternating rounds.
    let path = format!(
        "/click?offer_id=1&aff_id=aff-{{n%{}}}",
        sizes.affiliates.max(1)
    );
    let (mut cpu_small, mut cpu_big) = (Vec::new(), Vec::new());
    for _ in 0..sizes.cpu_rounds {
        for (s, out) in [(&ingest_small, &mut cpu_small), (&ingest, &mut cpu_big)] {
            let before = s.service.cpu();
            let run =
                crate::load::closed_loop(&s.base, &path, 4, Duration::from_secs(sizes.cpu_seconds))
                    .await?;
            if run.errors > 0 || run.ok == 0 {
                bail!(
                    "{}: {} clicks answered, {} failed",
                    s.base,
                    run.ok,
                    run.errors
                );
            }
            out.push((s.service.cpu() - before) / run.ok as f64 * 1e6);
        }
    }
    let (small_us, small_min, small_max) = spread(&mut cpu_small);
    let (big_us, big_min, big_max) = spread(&mut cpu_big);
    println!(
        "catalog: ingest CPU per click {big_us:.1} µs with the big catalog ({big_min:.1} – {big_max:.1}), \
         {small_us:.1} µs with one offer ({small_min:.1} – {small_max:.1}); median of {} rounds of {} s",
        sizes.cpu_rounds, sizes.cpu_seconds
    );

    // 4. Changes through the API, applied in every service.
    let client = reqwest::Client::new();
    let admins = [&ingest, &attributor, &delivery];
    let mut latencies = Vec::with_capacity(sizes.changes);
    let mut each: Vec<Vec<f64>> = vec![Vec::with_capacity(sizes.changes); admins.len()];
    let mut base: Option<i64> = None;
    for i in 0..sizes.changes {
        let doc = json!({ "document": { "name": format!("Live {i}"), "status": "active" } });
        let revision = put(&client, &console.base, "affiliate/bench-live", base, &doc).await?;
        let answered = Instant::now();
        let mut waiting: Vec<usize> = (0..admins.len()).collect();
        while !waiting.is_empty() {
            let mut still = Vec::with_capacity(waiting.len());
            for i in waiting {
                if admins[i].revision(&client).await? < revision {
                    still.push(i);
                } else {
                    each[i].push(answered.elapsed().as_secs_f64());
                }
            }
            waiting = still;
            if answered.elapsed() > READY_WITHIN {
                bail!("revision {revision} not applied everywhere");
            }
            if !waiting.is_empty() {
                tokio::time::sleep(Duration::from_millis(2)).await; // the poll's resolution
            }
        }
        latencies.push(answered.elapsed().as_secs_f64());
        base = Some(revision);
    }
    latencies.sort_by(f64::total_cmp);
    let q = |p: f64| {
        latencies[((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1]
    };
    let (p50, p99) = (q(0.5), q(0.99));
    for (s, mut l) in admins.iter().zip(each) {
        l.sort_by(f64::total_cmp);
        let at = |p: f64| l[((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1] * 1e3;
        println!(
            "catalog: API 2xx → applied in {}: p50 {:.0} ms p99 {:.0} ms",
            s.service.name,
            at(0.5),
            at(0.99)
        );
    }
    println!(
        "catalog: API 2xx → applied in ingest, attributor and delivery p50 {:.0} ms p99 {:.0} ms \
         ({} changes; goal p99 ≤ {} ms: {})",
        p50 * 1e3,
        p99 * 1e3,
        sizes.changes,
        APPLY_GOAL.as_millis(),
        if p99 <= APPLY_GOAL.as_secs_f64() {
            "met"
        } else {
            "missed"
        }
    );
    drop((ingest_small, ingest, attributor, delivery, console));
    let ratio = small_us / big_us;
    println!(
        "catalog: {entities} entities; reader start-up {read_median:.2} s, {mem:.0} B/entity; \
         2xx → applied p99 {:.0} ms; ingest CPU per click {big_us:.1} µs big vs {small_us:.1} µs one-offer \
         ratio {ratio:.2} (goal >= {CPU_GOAL})",
        p99 * 1e3
    );
    Ok(())
}

/// One catalog's pipeline: its topics, its config directory.
struct Stack {
    dir: PathBuf,
}

/// A service of a [`Stack`], ready.
struct Running {
    service: Service,
    /// Its API (ingest, console).
    base: String,
    admin: String,
    ready_after: Duration,
}

impl Running {
    fn rss_mib(&self) -> f64 {
        crate::attributor::memory_of(&self.service.pid().to_string()).0 as f64 / (1024.0 * 1024.0)
    }

    /// The catalog revision it applies.
    async fn revision(&self, client: &reqwest::Client) -> anyhow::Result<i64> {
        let page = client
            .get(format!("{}/metrics", self.admin))
            .send()
            .await?
            .text()
            .await?;
        let gauge = format!("{}_catalog_revision ", self.service.name);
        Ok(page
            .lines()
            .find_map(|l| l.strip_prefix(&gauge))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(-1, |v| v as i64))
    }
}

impl Stack {
    fn new(brokers: &str, topics: &TopicsConfig, dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut pipeline = s2s_common::pipeline::PipelineConfig::defaults();
        pipeline.kafka.bootstrap_servers = brokers.to_string();
        // fetch.wait.max.ms = 20: Tansu answers a fetch when the wait ends rather than when
        // records arrive (see `e2e.rs`).
        for (k, v) in [("linger.ms", "2"), ("fetch.wait.max.ms", "20")] {
            pipeline.kafka.properties.insert(k.into(), v.into());
        }
        pipeline.topics = topics.clone();
        std::fs::write(dir.join("pipeline.toml"), pipeline.to_toml())?;
        Ok(Stack {
            dir: dir.to_path_buf(),
        })
    }

    async fn start(&self, bins: &Path, name: &'static str) -> anyhow::Result<Running> {
        let (listen, admin) = (free_port()?, free_port()?);
        let state = self.dir.join(format!("{name}-state"));
        let group = format!("{}-{name}", ulid::Ulid::new().to_string().to_lowercase());
        let config = match name {
            "ingest" => format!(
                "listen = \"127.0.0.1:{listen}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
                 [sources.default]\nauth = \"none\"\n\
                 [click]\nrate_limit_per_client = 1000000\n"
            ),
            "attributor" => format!(
                "admin_listen = \"127.0.0.1:{admin}\"\ngroup_id = \"{group}\"\nstate_dir = \"{}\"\n\
                 processing_guarantee = \"at_least_once\"\n",
                state.display()
            ),
            "delivery" => format!(
                "admin_listen = \"127.0.0.1:{admin}\"\ngroup_id = \"{group}\"\nstate_dir = \"{}\"\n",
                state.display()
            ),
            "console" => format!(
                "listen = \"127.0.0.1:{listen}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
                 group_id = \"{group}\"\nstate_dir = \"{}\"\ncatalog_guarantee = \"at_least_once\"\n[operators]\nbench = \"{TOKEN}\"\n",
                state.display()
            ),
            other => bail!("no service {other}"),
        };
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::write(&path, config)?;
        let started = Instant::now();
        let service = Service::spawn(
            name,
            &bins.join(name),
            &path,
            &self.dir.join(format!("{name}.log")),
        )?;
        let admin = format!("http://127.0.0.1:{admin}");
        metric_at_least(
            &admin,
            &format!("{name}_catalog_revision"),
            0.0,
            READY_WITHIN,
        )
        .await
        .with_context(|| {
            format!(
                "{name} did not read the catalog; see {}",
                self.dir.display()
            )
        })?;
        ready(&admin, READY_WITHIN).await?;
        Ok(Running {
            service,
            base: format!("http://127.0.0.1:{listen}"),
            admin,
            ready_after: started.elapsed(),
        })
    }
}

/// Polls `/readyz` until it answers 200.
pub(crate) async fn ready(admin: &str, within: Duration) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + within;
    loop {
        let ok = client
            .get(format!("{admin}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{admin}/readyz not ready within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await; // the poll's resolution
    }
}

/// A change through the console's API (retried while a writer is elected); its revision.
async fn put(
    client: &reqwest::Client,
    console: &str,
    key: &str,
    base: Option<i64>,
    body: &serde_json::Value,
) -> anyhow::Result<i64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut req = client
            .put(format!("{console}/api/v1/catalog/{key}"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body.to_string());
        req = match base {
            Some(b) => req.header("if-match", format!("\"{b}\"")),
            None => req.header("if-none-match", "*"),
        };
        let resp = req.send().await?;
        let status = resp.status();
        let answer: serde_json::Value = resp.json().await.unwrap_or_default();
        if status.is_success() {
            return answer["revision"]
                .as_i64()
                .context("no revision in the answer");
        }
        if status.as_u16() != 503 || Instant::now() > deadline {
            bail!("{key}: the console answered {status}: {answer}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // Retry-After, shortened
    }
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
