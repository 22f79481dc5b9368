//! Ingest: the HTTP edge of the pipeline.
//!
//! It gives each click a unique ID and redirects to the offer, accepts operators'
//! postbacks, and publishes both to Kafka keyed by click ID. A request gets its 2xx (or
//! 302) only after the broker acknowledged the record; a broker that is down or a full
//! producer queue gets a 503 with `Retry-After`, never a silent drop. `/readyz` is ready
//! only while the producer has a broker connection (see `s2s_common::kafka_stats`).

pub mod api;
pub mod batch;
pub mod catalog;
pub mod client_limit;
pub mod config;
pub mod error;
pub mod metrics;
pub mod params;
pub mod publish;
pub mod records;
pub mod refusals;
pub mod replay;
pub mod serve;
pub mod source;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::FutureProducer;
use s2s_common::kafka::{ensure_topics, KafkaSetupError};
use s2s_common::kafka_stats::KafkaStats;
use s2s_common::ops::{self, Admin};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::IngestConfig;

/// The `ingest` binary's allocator. glibc's malloc spent much of the request threads'
/// time waiting on arena locks: librdkafka frees every message on its own threads, and
/// hyper's buffers move between workers. mimalloc frees across threads without those
/// locks; its `override` feature also serves librdkafka's `malloc` (measured in
/// `bench/RESULTS.md`).
pub use mimalloc::MiMalloc as Allocator;

/// How often (in tasks run) a worker of ingest's runtime takes a task from the runtime's
/// shared queue rather than its own.
///
/// The broker's acknowledgements complete requests from librdkafka's thread, outside the
/// runtime, so the requests they wake wait in the shared queue; the connections whose
/// bytes arrived wait in each worker's own. Tokio's default takes from the shared queue
/// about every 200 µs of work while the worker's own queue is not empty — at most ~5 000
/// completions a second per worker. Beyond capacity, when every connection has a
/// request to read (most of them to be refused), that bound, not the broker, set
/// ingest's throughput: admitted requests waited behind the excess, holding their slot
/// of `max_requests_in_flight`, and admitted throughput fell to about a tenth of
/// capacity (bench/RESULTS.md, 2026-12-04). Every other task from the shared queue
/// finishes admitted work before reading more.
pub const GLOBAL_QUEUE_INTERVAL: u32 = 2;

/// The `ingest` binary's runtime: tokio's multi-threaded one, one worker per CPU, with
/// [`GLOBAL_QUEUE_INTERVAL`].
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .global_queue_interval(GLOBAL_QUEUE_INTERVAL)
        .build()
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Kafka(#[from] KafkaSetupError),
    #[error(transparent)]
    Bind(#[from] ops::BindError),
    #[error("server: {0}")]
    Serve(#[from] std::io::Error),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("kafka producer: {0}")]
    Producer(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Catalog(#[from] s2s_catalog::LiveError),
}

/// A started ingest: topics provisioned, producer connected, listeners bound.
#[derive(Debug)]
pub struct Ingest {
    app: Arc<App>,
    produce_timeout: Duration,
    listener: TcpListener,
    limits: serve::Limits,
    serve_metrics: serve::ServeMetrics,
    admin: Admin,
}

use api::App;

impl Ingest {
    /// Validates the config, provisions topics, reads the catalog to its end (and follows
    /// it until `shutdown`), creates the producer and binds both listeners (port 0 picks
    /// a free port; see [`Ingest::local_addr`]).
    pub async fn bind(
        config: IngestConfig,
        shutdown: &CancellationToken,
    ) -> Result<Self, IngestError> {
        let compiled = config.validate().map_err(IngestError::Config)?;
        serve::ensure_descriptors(config.max_connections).map_err(IngestError::Config)?;
        let produce_timeout = config.produce_timeout;
        ensure_topics(
            &config.pipeline.kafka,
            &config.pipeline.topics,
            Duration::from_secs(30),
        )
        .await?;

        let admin = Admin::bind(config.admin_listen).await?;
        let metrics = metrics::Metrics::new(&admin.registry)?;
        let serve_metrics = serve::ServeMetrics::new(&admin.registry)?;
        let settings = catalog::Settings {
            unknown_affiliates: config.pipeline.affiliates.unknown,
            secret_key: s2s_catalog::secrets::SecretKey::of(&config.pipeline)
                .map_err(|e| IngestError::Config(e.to_string()))?,
            file_sources: compiled.sources.keys().cloned().collect(),
        };
        let catalog = s2s_catalog::Live::follow(
            &config.pipeline.kafka,
            &config.pipeline.topics.catalog.name,
            "ingest",
            &admin.registry,
            shutdown,
            move |c, previous| catalog::compile(c, previous, &settings),
        )
        .await?;
        let open: Vec<&String> = compiled
            .sources
            .iter()
            .filter(|(_, s)| s.auth == source::Auth::None)
            .map(|(name, _)| name)
            .collect();
        for name in &open {
            tracing::warn!(
                source = %name,
                "source {name} has auth = \"none\": anyone who can reach ingest may post \
                 conversions through it, and they create payouts"
            );
        }
        metrics
            .unauthenticated_sources
            .set(i64::try_from(open.len()).unwrap_or(i64::MAX));
        let stats = KafkaStats::new(&admin.registry, "ingest", admin.health.clone())?;
        let producer: FutureProducer<KafkaStats> = config
            .pipeline
            .kafka
            .producer_config()
            .set(
                "message.timeout.ms",
                produce_timeout.as_millis().to_string(),
            )
            .create_with_context(stats)?;
        let publisher = publish::Publisher::new(producer, metrics.produce_seconds.clone());
        let refusals = refusals::Refusals::new(
            publisher.clone(),
            config.pipeline.topics.refusals.name.clone(),
            NonZeroU32::new(config.refusal_events_per_second).unwrap_or(NonZeroU32::MIN),
            compiled.sources.keys().cloned().collect(),
            &admin.registry,
        )?;
        let app = Arc::new(App {
            publisher,
            refusals,
            catalog,
            sources: compiled.sources,
            proxies: compiled.proxies,
            max_body_bytes: config.max_body_bytes,
            body_read_timeout: config.body_read_timeout,
            pixel: config.pixel.clone(),
            click: config.click.clone(),
            rules: config.postback.clone(),
            openapi: api::openapi_for(&config.postback),
            clicks_topic: config.pipeline.topics.clicks.name.clone(),
            postbacks_topic: config.pipeline.topics.postbacks.name.clone(),
            metrics,
            replays: replay::Replays::new(config.max_replay_entries),
            click_limit: config
                .click
                .rate_limit_per_client
                .and_then(NonZeroU32::new)
                .map(client_limit::ClientLimiter::new),
        });
        Ok(Ingest {
            app,
            produce_timeout,
            listener: ops::bind(config.listen).await?,
            limits: serve::Limits {
                max_connections: config.max_connections,
                max_requests_in_flight: config.max_requests_in_flight,
                header_read_timeout: config.header_read_timeout,
                shutdown_grace: produce_timeout + Duration::from_secs(1),
            },
            serve_metrics,
            admin,
        })
    }

    /// The public listener's address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The admin listener's address (`/metrics`, `/healthz`, `/readyz`).
    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// Serves until `shutdown`: then stops accepting, finishes requests in flight and
    /// flushes the producer.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), IngestError> {
        let addr = self.local_addr()?;
        tracing::info!(%addr, admin = %self.admin_addr()?, "ingest listening");
        let health = self.admin.health.clone();
        let admin = self.admin.spawn(shutdown.clone());
        let public = api::router(self.app.clone());
        let draining = {
            let (health, shutdown) = (health.clone(), shutdown.clone());
            async move {
                shutdown.cancelled().await;
                health.drain();
            }
        };
        let ((), ()) = tokio::join!(
            serve::serve(
                self.listener,
                public,
                self.limits,
                self.serve_metrics,
                shutdown.clone()
            ),
            draining
        );
        if let Err(e) = self.app.publisher.flush(self.produce_timeout) {
            tracing::warn!(error = %e, "producer flush at shutdown incomplete");
        }
        shutdown.cancel();
        if let Ok(Err(e)) = admin.await {
            tracing::warn!(error = %e, "admin server error");
        }
        tracing::info!("ingest stopped");
        Ok(())
    }
}

/// Binds and serves until `shutdown`.
pub async fn run(config: IngestConfig, shutdown: CancellationToken) -> Result<(), IngestError> {
    Ingest::bind(config, &shutdown).await?.run(shutdown).await
}
