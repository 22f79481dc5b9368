//! Benchmark tools, run by `scripts/bench`:
//! - `noop`: a hyper HTTP/1.1 server that answers every request with a small JSON body and
//!   does nothing else — the ceiling any HTTP service on this machine can reach;
//! - `compare`: drives the same requests at a baseline and at a subject with the same load
//!   generator in one run, prints both and their ratio, then measures the subject's latency
//!   at half its maximum rate, and the baseline's at the same rate (the tail that the
//!   machine, the kernel and the generator add without the subject's work); with
//!   `--subject-admin`, also the subject's own latency histograms over its open-loop
//!   phase (see `server_side.rs`);
//! - `attributor-state`, `attributor`: the attributor benchmark (see `attributor.rs`);
//! - `delivery`: the delivery benchmark (see `delivery.rs`);
//! - `e2e`: the whole pipeline, end to end (see `e2e.rs`);
//! - `overload`: ingest at twice its capacity with thousands of idle connections held
//!   (see `overload.rs`);
//! - `http-fuzz`: a million generated and mangled requests at ingest, every answer and
//!   the topics checked (see `http_fuzz.rs`; run by `scripts/fuzz --http`);
//! - `catalog`: the catalog's start-up read, memory, ingest's CPU per click on a big
//!   catalog and the time from an API change to applied in every service (see `catalog.rs`).
//!
//! The load generator keeps `--connections` HTTP/1.1 keep-alive connections busy (closed
//! loop) for the throughput figure. For latency it sends at a fixed rate (open loop) and
//! measures from each request's scheduled send time, so a stall counts against the
//! server instead of silently lowering the rate (no coordinated omission).

mod attributor;
mod catalog;
mod cgroup;
mod console;
mod delivery;
mod e2e;
mod http_fuzz;
mod load;
mod overload;
mod server_side;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use http_body_util::{Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[derive(Debug, Parser)]
#[command(about = "Benchmark tools of the S2S postback pipeline")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve 200 with a small JSON body on every request.
    Noop {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Compare a subject with a baseline under the same load.
    Compare {
        /// Name printed in the final line (`NAME: ...`).
        #[arg(long)]
        name: String,
        /// Base URL of the baseline (e.g. the no-op server).
        #[arg(long)]
        baseline: String,
        /// Base URL of the subject (e.g. ingest).
        #[arg(long)]
        subject: String,
        /// Path and query; `{n}` becomes a unique number per request.
        #[arg(
            long,
            default_value = "/postback?click_id=bench-{n}&event=ftd&amount=10"
        )]
        path: String,
        /// Keep-alive connections. The maximum rate is only measured once the subject's
        /// CPU is the limit: with one request in flight per connection the closed loop
        /// runs at connections ÷ latency, and ingest's latency includes the producer's
        /// `linger.ms` and the broker's round trip (with 256 the machine was 9 – 19% idle).
        #[arg(long, default_value_t = 512)]
        connections: usize,
        /// Seconds of each closed-loop run (and of the open-loop run).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Closed-loop rounds, each a baseline run then a subject run: this machine's speed
        /// drifts over a minute, and alternating keeps the drift out of the ratio.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Goal for subject/baseline.
        #[arg(long, default_value_t = 0.5)]
        goal: f64,
        /// Goal for p99 at half the maximum rate, milliseconds.
        #[arg(long, default_value_t = 10.0)]
        p99_goal_ms: f64,
        /// Requests/s of the open-loop phase instead of half the subject's closed-loop
        /// rate: for head-to-head runs of two builds or settings at the same load. The
        /// p99 goal is then not judged.
        #[arg(long)]
        open_rate: Option<f64>,
        /// The subject's admin address (host:port): its own latency histograms are read
        /// at the start, and before and after its open-loop phase, and printed for that
        /// phase (next to the client's figures) and for the whole run.
        #[arg(long)]
        subject_admin: Option<SocketAddr>,
        /// A histogram series to read there, `name{label="value"}`; repeatable. The first
        /// (by default ingest's request time) goes into the summary line; the default
        /// second is the wait for the broker's acknowledgement within it.
        #[arg(
            long,
            default_values = [
                r#"ingest_http_request_duration_seconds{route="/postback"}"#,
                r#"ingest_produce_duration_seconds{kind="postback"}"#,
            ]
        )]
        subject_histogram: Vec<String>,
    },
    /// Fill one attributor store with clicks; report bytes per click and memory at each
    /// checkpoint.
    AttributorState {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long, value_delimiter = ',', default_value = "1000000,10000000")]
        clicks: Vec<u64>,
        /// Where to write the checkpoints for `attributor --state`.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// The attributor's throughput against a raw consume-and-produce loop.
    Attributor {
        #[arg(long)]
        brokers: String,
        #[arg(long, default_value_t = 100_000)]
        clicks: u64,
        #[arg(long, default_value_t = 6)]
        partitions: i32,
        #[arg(long)]
        dir: std::path::PathBuf,
        /// The checkpoints `attributor-state` wrote.
        #[arg(long)]
        state: std::path::PathBuf,
        #[arg(long, default_value_t = 0.5)]
        goal: f64,
    },
    /// Delivery throughput to loopback endpoints, and with one endpoint dead.
    Delivery {
        #[arg(long)]
        brokers: String,
        /// The release `delivery` binary.
        #[arg(long)]
        delivery: std::path::PathBuf,
        #[arg(long)]
        dir: std::path::PathBuf,
        /// Conversions per phase; each goes to both endpoints.
        #[arg(long, default_value_t = 50_000)]
        conversions: usize,
        #[arg(long, default_value_t = 6)]
        partitions: i32,
        #[arg(long, default_value_t = 10_000.0)]
        per_core_goal: f64,
        #[arg(long, default_value_t = 0.95)]
        goal: f64,
    },
    /// The console: read-model ingest against a raw consumer, and click-story lookups
    /// with millions of records loaded.
    Console {
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        dir: std::path::PathBuf,
        /// Clicks whose stories (five records each) go through Kafka for the ingest part.
        #[arg(long, default_value_t = 40_000)]
        clicks: u64,
        /// Records in the read model for the lookup part.
        #[arg(long, default_value_t = 10_000_000)]
        story_records: u64,
        #[arg(long, default_value_t = 20_000)]
        lookups: usize,
        /// Goal for read-model ingest / raw consume.
        #[arg(long, default_value_t = 0.5)]
        goal: f64,
        /// Goal for the story lookup's p99, milliseconds.
        #[arg(long, default_value_t = 10.0)]
        p99_goal_ms: f64,
    },
    /// Ingest beyond capacity (see `overload.rs`).
    Overload {
        #[command(flatten)]
        services: Services,
        #[command(flatten)]
        sizes: overload::Sizes,
    },
    /// Requests made from ingest's OpenAPI document, mutated and mangled, against the
    /// release ingest: no 5xx besides 503, no crash, the broker holds exactly what was
    /// acknowledged (see `http_fuzz.rs`).
    HttpFuzz {
        #[command(flatten)]
        services: Services,
        #[command(flatten)]
        options: http_fuzz::Options,
    },
    /// The catalog: start-up, memory per entity, ingest's CPU per click, API → applied.
    Catalog {
        #[command(flatten)]
        services: Services,
        #[command(flatten)]
        sizes: catalog::Sizes,
    },
    /// The whole pipeline: sustained postbacks/s, latency at half that rate.
    E2e {
        #[command(flatten)]
        services: Services,
        /// Postbacks of the throughput phase.
        #[arg(long, default_value_t = 100_000)]
        postbacks: u64,
        /// Seconds of the latency phase.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        #[arg(long, default_value_t = 0.95)]
        goal: f64,
    },
}

/// Where a benchmark that runs the services as processes finds the broker and the
/// binaries, and keeps its files.
#[derive(Debug, clap::Args)]
struct Services {
    #[arg(long)]
    brokers: String,
    /// Where the service binaries are (`scripts/bench` builds release ones).
    #[arg(long)]
    bins: std::path::PathBuf,
    /// Configs, state, logs and whatever the run keeps.
    #[arg(long)]
    dir: std::path::PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // As the services' binaries do: the stores' memory budget is the process's.
    s2s_state::memory::bound_heap_retention();
    match Args::parse().cmd {
        Cmd::Noop { listen } => noop(listen).await,
        Cmd::AttributorState { dir, clicks, out } => attributor::state(&dir, &clicks, &out),
        Cmd::Attributor {
            brokers,
            clicks,
            partitions,
            dir,
            state,
            goal,
        } => attributor::throughput(brokers, clicks, partitions, &dir, &state, goal).await,
        Cmd::Delivery {
            brokers,
            delivery,
            dir,
            conversions,
            partitions,
            per_core_goal,
            goal,
        } => {
            delivery::run(
                brokers,
                &delivery,
                &dir,
                conversions,
                partitions,
                per_core_goal,
                goal,
            )
            .await
        }
        Cmd::Console {
            brokers,
            dir,
            clicks,
            story_records,
            lookups,
            goal,
            p99_goal_ms,
        } => {
            console::run(
                brokers,
                &dir,
                clicks,
                story_records,
                lookups,
                goal,
                p99_goal_ms,
            )
            .await
        }
        Cmd::E2e {
            services: s,
            postbacks,
            seconds,
            connections,
            goal,
        } => {
            e2e::run(
                s.brokers,
                &s.bins,
                &s.dir,
                postbacks,
                seconds,
                connections,
                goal,
            )
            .await
        }
        Cmd::HttpFuzz {
            services: s,
            options,
        } => http_fuzz::run(&s.brokers, &s.bins, &s.dir, options).await,
        Cmd::Overload { services: s, sizes } => {
            overload::run(&s.brokers, &s.bins, &s.dir, sizes).await
        }
        Cmd::Catalog { services: s, sizes } => {
            catalog::run(&s.brokers, &s.bins, &s.dir, sizes).await
        }
        Cmd::Compare {
            name,
            baseline,
            subject,
            path,
            connections,
            seconds,
            rounds,
            goal,
            p99_goal_ms,
            open_rate,
            subject_admin,
            subject_histogram,
        } => {
            if let Some(r) = open_rate {
                anyhow::ensure!(
                    r.is_finite() && r >= 1.0,
                    "--open-rate must be at least 1 request per second, got {r}"
                );
            }
            let d = Duration::from_secs(seconds);
            // Before any request, so that the whole run's slow answers can be counted.
            let watch = match subject_admin {
                Some(a) => Some(server_side::Watch::start(a, subject_histogram).await?),
                None => None,
            };
            // Warm both up (connections, caches, the broker's first batches).
            load::closed_loop(&baseline, &path, connections, Duration::from_secs(2)).await?;
            load::closed_loop(&subject, &path, connections, Duration::from_secs(2)).await?;
            let (mut base, mut subj) = (Run::empty(false)?, Run::empty(false)?);
            for round in 1..=rounds.max(1) {
                let b = load::closed_loop(&baseline, &path, connections, d).await?;
                println!(
                    "{name} round {round} baseline (no-op hyper): {}",
                    b.describe()
                );
                let s = load::closed_loop(&subject, &path, connections, d).await?;
                println!(
                    "{name} round {round} subject: {} (ratio {:.2})",
                    s.describe(),
                    s.rate() / b.rate()
                );
                base.absorb(b)?;
                subj.absorb(s)?;
            }
            println!(
                "{name} baseline (no-op hyper), all rounds: {}",
                base.describe()
            );
            println!("{name} subject, all rounds: {}", subj.describe());
            let (rate, which) = match open_rate {
                Some(r) => (r, "fixed by --open-rate"),
                None => (subj.rate() / 2.0, "half its maximum"),
            };
            let before = match &watch {
                Some(w) => Some((w, w.now().await?)),
                None => None,
            };
            let lat = load::open_loop(&subject, &path, rate, connections, d).await?;
            println!(
                "{name} subject at {rate:.0} req/s ({which}): {}",
                lat.describe()
            );
            // The subject's own view of the same requests, from its handler's start to its
            // answer: without the generator, the kernel and the wait for a worker to pick
            // a request up, but with every wait inside the handler (for ingest, the
            // broker's acknowledgement, whose threads share the same cores).
            let own = match before {
                Some((w, before)) => w.report(&name, &before).await?,
                None => String::new(),
            };
            // The same schedule against the no-op server: the tail that the machine, the
            // kernel and the generator add on their own at this rate.
            let floor = load::open_loop(&baseline, &path, rate, connections, d).await?;
            println!(
                "{name} baseline (no-op hyper) at {rate:.0} req/s: {}",
                floor.describe()
            );
            let ratio = subj.rate() / base.rate();
            let verdict = match (ratio >= goal, open_rate.is_some()) {
                (true, true) => "ratio met, p99 not judged at a fixed rate",
                (false, true) => "ratio NOT met, p99 not judged at a fixed rate",
                (true, false) if lat.p99_ms() <= p99_goal_ms => "met",
                _ => "NOT met",
            };
            println!(
                "{name}: {:.0} accepted/s (no-op hyper {:.0} req/s), p50 {:.2} ms p99 {:.2} ms at {:.0}/s ({own}no-op hyper p99 {:.2} ms), errors {} ratio {:.2} (goal >= {goal}, p99 <= {p99_goal_ms} ms: {verdict})",
                subj.rate(), base.rate(), lat.p50_ms(), lat.p99_ms(), rate, floor.p99_ms(), subj.errors + lat.errors, ratio
            );
            Ok(())
        }
    }
}

async fn noop(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("noop listening on http://{}", listener.local_addr()?);
    serve(listener, None).await
}

/// Answers every request with 200 and a small JSON body, counting them in `answered`.
async fn serve(
    listener: tokio::net::TcpListener,
    answered: Option<Arc<AtomicU64>>,
) -> anyhow::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let answered = answered.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                if let Some(a) = &answered {
                    a.fetch_add(1, Ordering::Relaxed);
                }
                async {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from_static(br#"{"status":"accepted"}"#)))
                            .unwrap_or_default(),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

struct Run {
    ok: u64,
    errors: u64,
    elapsed: Duration,
    latency_us: Histogram<u64>,
    /// Open loop only: from a request's scheduled send time to when the generator actually
    /// started it. Large values mean the generator, not the server, was late.
    lag_us: Option<Histogram<u64>>,
}

impl Run {
    /// Nothing yet; `with_lag` for an open-loop run.
    fn empty(with_lag: bool) -> anyhow::Result<Self> {
        Ok(Self {
            ok: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            latency_us: histogram()?,
            lag_us: if with_lag { Some(histogram()?) } else { None },
        })
    }
    /// Counts one request's answer (`Ok(true)`: a 2xx), its latency measured from `since`.
    fn record(&mut self, answer: anyhow::Result<bool>, since: std::time::Instant) {
        match answer {
            Ok(true) => {
                self.ok += 1;
                self.latency_us
                    .saturating_record(since.elapsed().as_micros() as u64);
            }
            _ => self.errors += 1,
        }
    }
    /// Adds another run of the same kind: counts, time and latencies.
    fn absorb(&mut self, other: Run) -> anyhow::Result<()> {
        self.ok += other.ok;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.latency_us.add(other.latency_us)?;
        if let (Some(mine), Some(theirs)) = (self.lag_us.as_mut(), other.lag_us) {
            mine.add(theirs)?;
        }
        Ok(())
    }
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
    fn p50_ms(&self) -> f64 {
        self.latency_us.value_at_quantile(0.50) as f64 / 1000.0
    }
    fn p99_ms(&self) -> f64 {
        self.latency_us.value_at_quantile(0.99) as f64 / 1000.0
    }
    fn describe(&self) -> String {
        let lag = self.lag_us.as_ref().map_or(String::new(), |l| {
            format!(
                "; generator lag p99 {:.2} ms, max {:.2} ms",
                l.value_at_quantile(0.99) as f64 / 1000.0,
                l.max() as f64 / 1000.0
            )
        });
        format!(
            "{:.0} ok/s over {:.1} s, {} errors, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms{lag}",
            self.rate(),
            self.elapsed.as_secs_f64(),
            self.errors,
            self.p50_ms(),
            self.p99_ms(),
            self.latency_us.max() as f64 / 1000.0
        )
    }
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

fn client(connections: usize) -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(connections)
        .build_http()
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}
