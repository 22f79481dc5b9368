//! `delivery` binary: runs the delivery worker (default), or `delivery replay …` to
//! re-deliver dead letters. Parses flags and config, starts logging, hands over.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use s2s_common::config::ServiceArgs;
use s2s_common::pipeline::ServiceConfig;
use s2s_delivery::replay::{self, parse_time, Filter, Options};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Sends attributed conversions to affiliate postback URLs"
)]
struct Cli {
    #[command(flatten)]
    service: ServiceArgs,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Re-deliver dead-lettered deliveries (through the running workers, with their
    /// original webhook-id and a fresh retry schedule).
    Replay {
        /// Only dead letters of this postback (repeatable).
        #[arg(long = "endpoint")]
        endpoints: Vec<String>,
        /// Only dead letters of this affiliate (repeatable).
        #[arg(long = "aff-id")]
        aff_ids: Vec<String>,
        /// Dead-lettered at or after: RFC 3339 (2026-11-25T10:00:00Z) or a duration ago (36h).
        #[arg(long)]
        since: Option<String>,
        /// Dead-lettered before: RFC 3339 or a duration ago.
        #[arg(long)]
        until: Option<String>,
        /// Re-deliver every dead letter in the time range, of every endpoint and affiliate.
        #[arg(long)]
        all: bool,
        /// Read and summarise; send nothing.
        #[arg(long)]
        dry_run: bool,
        /// Recorded with each command.
        #[arg(long, env = "USER", default_value = "unknown")]
        requested_by: String,
        /// Recorded with each command.
        #[arg(long)]
        reason: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.service.print_default_config {
        print!("{}", s2s_delivery::config::DEFAULT_TOML);
        return Ok(());
    }
    s2s_common::telemetry::init();
    // Process-wide: the stores' memory budget is the process's (see the module).
    s2s_state::memory::bound_heap_retention();
    let config = s2s_delivery::DeliveryConfig::load(
        cli.service.config.as_deref(),
        cli.service.pipeline.as_deref(),
    )
    .context("loading config")?;
    match cli.cmd {
        None => s2s_delivery::run(config, s2s_common::shutdown::on_signals())
            .await
            .context("delivery failed"),
        Some(Cmd::Replay {
            endpoints,
            aff_ids,
            since,
            until,
            all,
            dry_run,
            requested_by,
            reason,
        }) => {
            if endpoints.is_empty() && aff_ids.is_empty() && !all {
                bail!("say what to replay: --endpoint NAME and/or --aff-id ID, or --all");
            }
            let now = s2s_common::now_ms();
            let time = |v: Option<String>| v.map(|v| parse_time(&v, now)).transpose();
            let opts = Options {
                filter: Filter {
                    endpoints,
                    aff_ids,
                    since_ms: time(since).map_err(anyhow::Error::msg)?,
                    until_ms: time(until).map_err(anyhow::Error::msg)?,
                },
                dry_run,
                requested_by,
                reason,
            };
            let summary = replay::replay(
                &config.pipeline.kafka,
                &config.pipeline.topics,
                &opts,
                |p| {
                    eprintln!(
                    "read {} dead letters ({:.0}/s), {} matching; {}/{} partitions read to the end",
                    p.read,
                    p.read as f64 / p.elapsed.as_secs_f64().max(0.001),
                    p.matched,
                    p.partitions_done,
                    p.partitions
                );
                },
            )
            .await
            .context("replay failed")?;
            println!(
                "{}: read {} dead letters ({} undecodable), {} matching, {} distinct deliveries; {}",
                if dry_run { "dry run" } else { "replay" },
                summary.read,
                summary.undecodable,
                summary.matched,
                summary.deliveries,
                if dry_run {
                    "nothing sent".to_string()
                } else {
                    format!("{} re-delivery commands sent", summary.sent)
                }
            );
            for (endpoint, n) in &summary.by_endpoint {
                println!("  {endpoint}: {n}");
            }
            if !summary.sample.is_empty() {
                println!("  first delivery IDs: {}", summary.sample.join(", "));
            }
            Ok(())
        }
    }
}
