//! The admin HTTP server every service runs: `/metrics` (Prometheus text format),
//! `/healthz` (the process is alive) and `/readyz` (it can do its job now).
//!
//! It listens on its own address, apart from ingest's public listener, so that metrics and
//! probes are never exposed to the internet by accident.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Readiness: set by the service (for example while a broker connection is up), and
/// switched off for good by [`Health::drain`] when shutdown begins, so that load balancers
/// stop sending traffic while requests in flight finish.
#[derive(Debug, Clone, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
    draining: Arc<AtomicBool>,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Not ready from now on, whatever `set_ready` says later.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.draining.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct AdminState {
    registry: Registry,
    health: Health,
}

/// A registry for one service, with the process collector (CPU, memory, file descriptors).
pub fn new_registry() -> Registry {
    let registry = Registry::new();
    #[cfg(target_os = "linux")]
    {
        let pc = prometheus::process_collector::ProcessCollector::for_self();
        if let Err(e) = registry.register(Box::new(pc)) {
            tracing::warn!(error = %e, "process metrics unavailable");
        }
    }
    registry
}

/// The admin routes, for services that mount them on a listener of their own.
pub fn router(registry: Registry, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AdminState { registry, health })
}

/// A service's admin endpoint: its bound listener, metrics registry and readiness flag.
#[derive(Debug)]
pub struct Admin {
    listener: TcpListener,
    pub registry: Registry,
    pub health: Health,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds `addr` (port 0 picks a free port) and reports which address it got.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

impl Admin {
    /// Binds the admin listener, with a fresh registry (see [`new_registry`]).
    pub async fn bind(addr: SocketAddr) -> Result<Self, BindError> {
        Ok(Admin {
            listener: bind(addr).await?,
            registry: new_registry(),
            health: Health::default(),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves the admin routes in a task until `shutdown` is cancelled.
    pub fn spawn(self, shutdown: CancellationToken) -> JoinHandle<std::io::Result<()>> {
        let app = router(self.registry, self.health);
        tokio::spawn(async move {
            axum::serve(self.listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        })
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&s.registry.gather(), &mut buf) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
            buf,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("encoding metrics failed: {e}\n").into_bytes(),
        ),
    }
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    if s.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
