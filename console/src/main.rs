//! `console` binary: runs the reporting console (read model, API, web page; default), or
//! `console catalog import FILE` / `console catalog export` against a running one. Parses
//! flags and config, starts logging, hands over.

use anyhow::Context;
use clap::{Parser, Subcommand};
use s2s_common::config::ServiceArgs;
use s2s_common::pipeline::{PipelineConfig, ServiceConfig};
use s2s_console::cli::{self, Api};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "The reporting console and the catalog's management API"
)]
struct Cli {
    #[command(flatten)]
    service: ServiceArgs,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The catalog (offers, affiliates, postbacks) as a file, through a running console's
    /// API.
    Catalog {
        #[command(subcommand)]
        cmd: CatalogCmd,
        /// The console's API.
        #[arg(long, env = "S2S_CONSOLE_URL", default_value = "http://127.0.0.1:8081")]
        url: String,
        /// An operator token (recorded as who made each change).
        #[arg(long, env = "S2S_CONSOLE_TOKEN", hide_env_values = true)]
        token: String,
    },
}

#[derive(Debug, Subcommand)]
enum CatalogCmd {
    /// Creates and updates the file's entities (entities it does not name are left
    /// alone); checked first with the pipeline's rules (--pipeline).
    Import {
        file: std::path::PathBuf,
        /// Recorded in each changed entity's history.
        #[arg(long)]
        reason: Option<String>,
        /// Print what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Prints the catalog's offers, affiliates and postbacks in the import format.
    Export,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Cli::parse();
    if args.service.print_default_config {
        print!("{}", s2s_console::config::DEFAULT_TOML);
        return Ok(());
    }
    s2s_common::telemetry::init();
    if let Some(Cmd::Catalog { cmd, url, token }) = args.cmd {
        let api = Api {
            url: url.trim_end_matches('/').to_string(),
            token,
        };
        return match cmd {
            CatalogCmd::Import {
                file,
                reason,
                dry_run,
            } => {
                let pipeline = PipelineConfig::load(args.service.pipeline.as_deref())
                    .context("loading the pipeline config")?;
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                let parsed = s2s_catalog::file::CatalogFile::parse(&text)
                    .with_context(|| format!("{}", file.display()))?;
                let checks = s2s_console::catalog_checks(&pipeline.postbacks)?;
                let done = cli::import(&api, &parsed, &checks, reason.as_deref(), dry_run)
                    .await
                    .with_context(|| format!("importing {}", file.display()))?;
                eprintln!(
                    "{}: {} created, {} updated, {} unchanged",
                    file.display(),
                    done.created,
                    done.updated,
                    done.unchanged
                );
                Ok(())
            }
            CatalogCmd::Export => {
                print!("{}", cli::export(&api).await.context("exporting")?);
                Ok(())
            }
        };
    }
    // Process-wide: the stores' memory budget is the process's (see the module).
    s2s_state::memory::bound_heap_retention();
    let config = s2s_console::ConsoleConfig::load(
        args.service.config.as_deref(),
        args.service.pipeline.as_deref(),
    )
    .context("loading config")?;
    s2s_console::run(config, s2s_common::shutdown::on_signals())
        .await
        .context("console failed")
}
