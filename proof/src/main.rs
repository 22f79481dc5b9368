//! `s2s-proof`: the load generator, the recording affiliate endpoint and the verifier,
//! for a pipeline that is already running.
//!
//!   s2s-proof endpoint --listen 127.0.0.1:8090 --log received.jsonl
//!   s2s-proof load --ingest http://127.0.0.1:8080 --stories 10000 --ledger ledger.jsonl
//!   s2s-proof verify --config deploy/local/delivery.toml --pipeline deploy/local/pipeline.toml \
//!       --ledger ledger.jsonl --received received.jsonl --wait 120
//!
//! `verify` reads the postbacks from a delivery config and the brokers and topics from the
//! pipeline config (the same layering as the service: defaults, the file, environment)
//! and exits 1 on a violation.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use s2s_common::pipeline::ServiceConfig;
use s2s_proof::load::{self, Ledger, Progress};
use s2s_proof::plan::{plan, Mix};
use s2s_proof::verify;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Load generator, recording endpoint and verifier of the S2S pipeline"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// A recording affiliate endpoint: answers 200, appends each request to --log.
    Endpoint {
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: std::net::SocketAddr,
        #[arg(long)]
        log: PathBuf,
    },
    /// Play a mix of stories through ingest and write what it accepted to --ledger.
    Load {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        ingest: String,
        #[arg(long, default_value_t = 1000)]
        stories: usize,
        /// Shares of all stories.
        #[arg(long, default_value_t = 0.1)]
        out_of_order: f64,
        #[arg(long, default_value_t = 0.05)]
        unknown_click: f64,
        #[arg(long, default_value_t = 0.05)]
        late: f64,
        #[arg(long, default_value_t = 0.05)]
        event_time: f64,
        #[arg(long, default_value_t = 0.05)]
        reversals: f64,
        #[arg(long, default_value_t = 0.05)]
        conflicts: f64,
        /// Needs ingest's [pixel] enabled with a cookie (the local run has it).
        #[arg(long, default_value_t = 0.05)]
        pixel: f64,
        /// Shares of plain and out-of-order stories.
        #[arg(long, default_value_t = 0.2)]
        updates: f64,
        #[arg(long, default_value_t = 0.1)]
        duplicates: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value = "1")]
        offer: String,
        /// The offer's attribution window (days) and how far outside it late clicks are
        /// dated (ms; keep it under the attributor's grace period).
        #[arg(long, default_value_t = 30)]
        window_days: i64,
        #[arg(long, default_value_t = 10_000)]
        late_by_ms: i64,
        /// The offer URL's query parameter that carries the click ID.
        #[arg(long, default_value = "click_id")]
        click_param: String,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Stories started per second (default: as fast as they complete).
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long)]
        ledger: PathBuf,
    },
    /// Check every accepted postback's outcome and every conversion's deliveries.
    Verify {
        /// A delivery config file: the postbacks.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The pipeline config file: brokers, topics.
        #[arg(long, env = "S2S_PIPELINE")]
        pipeline: Option<PathBuf>,
        #[arg(long)]
        ledger: PathBuf,
        /// The recording endpoint's log (several: repeat).
        #[arg(long)]
        received: Vec<PathBuf>,
        /// Seconds to wait for outcomes and deliveries still on their way.
        #[arg(long, default_value_t = 120)]
        wait: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // librdkafka's statistics are logged at info; this tool's output is its own lines.
    s2s_common::telemetry::init_with("warn");
    match Cli::parse().cmd {
        Cmd::Endpoint { listen, log } => {
            let ep = s2s_proof::endpoint::TestEndpoint::bind_logged(listen, &log, false).await?;
            println!(
                "recording endpoint on http://{}, log {}",
                ep.addr(),
                log.display()
            );
            tokio::signal::ctrl_c().await?;
            Ok(())
        }
        Cmd::Load {
            ingest,
            stories,
            out_of_order,
            unknown_click,
            late,
            event_time,
            reversals,
            conflicts,
            pixel,
            updates,
            duplicates,
            seed,
            offer,
            window_days,
            late_by_ms,
            click_param,
            concurrency,
            rate,
            ledger,
        } => {
            let mix = Mix {
                stories,
                out_of_order,
                unknown_click,
                late,
                event_time,
                reversals,
                conflicts,
                pixel,
                updates,
                duplicates,
                seed,
                offer,
                window_ms: window_days * 24 * 3_600_000,
                late_by_ms,
                run: format!("lg-{}", s2s_common::ids::new_ulid().to_lowercase()),
            };
            let opts = load::Options {
                ingest,
                click_param,
                concurrency,
                rate,
                give_up_after: Duration::from_secs(120),
            };
            let progress = Arc::new(Progress::default());
            let watch = progress.clone();
            let total = stories as f64;
            let reporter = tokio::spawn(async move {
                let started = Instant::now();
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await; // progress line once a second
                    let done = (Progress::get(&watch.stories_done)
                        + Progress::get(&watch.stories_failed))
                        as f64;
                    let secs = started.elapsed().as_secs_f64();
                    let rate = done / secs.max(0.001);
                    let eta = if rate > 0.0 {
                        (total - done) / rate
                    } else {
                        f64::INFINITY
                    };
                    eprintln!(
                        "{done:.0}/{total:.0} stories ({rate:.0}/s, ETA {eta:.0} s), {} postbacks accepted, {} retries",
                        Progress::get(&watch.postbacks_accepted),
                        Progress::get(&watch.retries)
                    );
                }
            });
            let result = load::run(plan(&mix), &opts, progress.clone()).await;
            reporter.abort();
            let ledger_data = result?;
            std::fs::File::create(&ledger)?.write_all(ledger_data.to_jsonl().as_bytes())?;
            println!(
                "load: {} stories done, {} abandoned, {} postbacks accepted, {} retries; ledger {}",
                Progress::get(&progress.stories_done),
                Progress::get(&progress.stories_failed),
                Progress::get(&progress.postbacks_accepted),
                Progress::get(&progress.retries),
                ledger.display()
            );
            Ok(())
        }
        Cmd::Verify {
            config,
            pipeline,
            ledger,
            received,
            wait,
        } => {
            let config = s2s_delivery::DeliveryConfig::load(config.as_deref(), pipeline.as_deref())
                .context("loading config")?;
            let endpoints = config.validate().map_err(anyhow::Error::msg)?;
            let ledger = Ledger::from_jsonl(&std::fs::read_to_string(&ledger)?)?.entries();
            let watcher = verify::Watcher::new(&config.pipeline.kafka, &config.pipeline.topics)?;
            let report = verify::until_complete(
                watcher,
                &ledger,
                &endpoints,
                Duration::from_secs(wait),
                || {
                    let all: Vec<_> = received
                        .iter()
                        .flat_map(|p| s2s_proof::endpoint::read_log(p).unwrap_or_default())
                        .collect();
                    s2s_proof::endpoint::by_webhook_id(&all)
                },
            )
            .await?;
            println!("verify: {}", report.summary());
            for line in report.missing.iter().chain(&report.violations).take(50) {
                println!("  {line}");
            }
            if !report.ok() {
                bail!(
                    "{} missing, {} violations",
                    report.missing.len(),
                    report.violations.len()
                );
            }
            Ok(())
        }
    }
}
