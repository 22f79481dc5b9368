//! Demo affiliate endpoint for the local run: answers 200 on any path and prints every
//! request it receives, so a click's landing and the affiliate postback are visible; with
//! `--log`, also appends each request as a JSON line for `s2s-proof verify --received`.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Prints every HTTP request it receives and answers 200")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: std::net::SocketAddr,
    /// Append every request here as a JSON line.
    #[arg(long)]
    log: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let endpoint = match &args.log {
        Some(log) => s2s_tests::TestEndpoint::bind_logged(args.listen, log, true).await?,
        None => s2s_tests::TestEndpoint::bind(args.listen, &[], true, None).await?,
    };
    println!("demo-affiliate listening on http://{}", endpoint.addr());
    s2s_common::shutdown::on_signals().cancelled().await;
    Ok(())
}
