//! `ingest` binary (HTTP edge for clicks and postbacks): parse flags and config, start logging, run until
//! SIGINT/SIGTERM.

use anyhow::Context;
use s2s_common::config::ServiceArgs;
use s2s_common::pipeline::ServiceConfig;

#[global_allocator]
static ALLOCATOR: s2s_ingest::Allocator = s2s_ingest::Allocator;

fn main() -> anyhow::Result<()> {
    let args = ServiceArgs::from_command_line();
    if args.print_default_config {
        print!("{}", s2s_ingest::config::DEFAULT_TOML);
        return Ok(());
    }
    s2s_common::telemetry::init();
    let config = s2s_ingest::IngestConfig::load(args.config.as_deref(), args.pipeline.as_deref())
        .context("loading config")?;
    s2s_ingest::runtime()
        .context("starting the runtime")?
        .block_on(async { s2s_ingest::run(config, s2s_common::shutdown::on_signals()).await })
        .context("ingest failed")
}
