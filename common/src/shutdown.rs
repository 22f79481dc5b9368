//! The shutdown signal: a [`CancellationToken`] passed into every `run`, never a global.
//!
//! `main` creates it with [`on_signals`]; tests create a plain token and cancel it. Each
//! task that owns work in flight watches the token, finishes or hands back that work, and
//! returns; `run` returns when all of them have.

pub use tokio_util::sync::CancellationToken;

/// A token cancelled on SIGINT (Ctrl-C) or SIGTERM (Kubernetes, systemd).
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received; finishing work in flight");
        t.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
