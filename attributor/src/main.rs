//! `attributor` binary (joins postbacks to clicks): parse flags and config, start logging, run until
//! SIGINT/SIGTERM.

use anyhow::Context;
use s2s_common::config::ServiceArgs;
use s2s_common::pipeline::ServiceConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = ServiceArgs::from_command_line();
    if args.print_default_config {
        print!("{}", s2s_attributor::config::DEFAULT_TOML);
        return Ok(());
    }
    s2s_common::telemetry::init();
    // Process-wide: the stores' memory budget is the process's (see the module).
    s2s_state::memory::bound_heap_retention();
    let config =
        s2s_attributor::AttributorConfig::load(args.config.as_deref(), args.pipeline.as_deref())
            .context("loading config")?;
    s2s_attributor::run(config, s2s_common::shutdown::on_signals())
        .await
        .context("attributor failed")
}
