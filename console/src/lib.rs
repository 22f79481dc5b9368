//! The reporting console: operators watch conversions and postback deliveries live, look
//! up the whole story of a click, see what fails and why, and re-fire failed deliveries —
//! from a web page or its JSON API.
//!
//! **Why a service of its own.** It reads every topic of the pipeline (clicks, postbacks,
//! outcomes, delivery attempts, dead letters, commands), keeps a read model sized by the
//! history operators want to look at, and answers people, not the flow: none of which
//! belongs in a stage of the pipeline, whose state and failures it must not share. It
//! scales like the rest: a consumer group over the partitions, one RocksDB store per
//! partition ([`schema`]), each instance answering for the partitions it owns.
//!
//! - [`model`]: how each record changes the read model (idempotent);
//! - [`query`]: the story of a click (one prefix read), lists with cursor pagination,
//!   totals per hour or day;
//! - [`api`]: the page, the API, the live feed, re-fire (a command to the delivery
//!   worker, never a second HTTP sender);
//! - [`backfill`]: a postback sent the conversions it would have been sent since a time
//!   (commands to the delivery worker too);
//! - [`reader`]: the read model as a processor of the stream runtime
//!   ([`s2s_state::runtime`]), which commits it with the input offsets atomically.

pub mod api;
pub mod backfill;
pub mod cli;
pub mod config;
pub mod metrics;
pub mod model;
pub mod query;
pub mod reader;
pub mod schema;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use s2s_catalog::{Election, Follower, Writer};
use s2s_common::kafka::ensure_topics;
use s2s_state::runtime::{Input, Runtime, RuntimeError, Settings};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::ConsoleConfig;

/// How long a catalog change may take to come back through this instance's readers (the
/// catalog's and the history's).
pub(crate) const CATALOG_APPLY_WITHIN: Duration = Duration::from_secs(10);
use schema::Cf;

/// A started console: topics checked, stores ready, API and admin listeners bound.
#[derive(Debug)]
pub struct Console {
    runtime: Runtime<Cf>,
    reader: reader::Reader,
    api: Arc<api::ApiState>,
    listener: TcpListener,
}

impl Console {
    pub async fn bind(config: ConsoleConfig) -> Result<Self, RuntimeError> {
        config.validate().map_err(RuntimeError::Config)?;
        let counts = ensure_topics(
            &config.pipeline.kafka,
            &config.pipeline.topics,
            Duration::from_secs(30),
        )
        .await?;
        let inputs = inputs(&config);
        let n = |t: &String| counts.get(t).copied().unwrap_or_default();
        let first = &inputs[0].topic;
        if let Some(odd) = inputs.iter().map(|i| &i.topic).find(|t| n(t) != n(first)) {
            return Err(RuntimeError::Config(format!(
                "topic '{odd}' has {} partitions and '{first}' has {}: the console keeps \
                 everything about a click in one store, so every topic it reads needs the same \
                 partition count (they are all keyed by click ID); set topics.*.partitions alike",
                n(odd),
                n(first)
            )));
        }
        let runtime = Runtime::bind(Settings {
            service: "console",
            kafka: config.pipeline.kafka.clone(),
            group_id: config.group_id.clone(),
            inputs: inputs.clone(),
            state_dir: config.state_dir.clone(),
            limits: config.limits(),
            changelog: None,
            poison: None,
            guarantee: s2s_state::Guarantee::AtLeastOnce,
            transactional_id: None,
            commit_interval: config.commit_interval,
            max_batch: config.max_batch,
            admin_listen: config.admin_listen,
        })
        .await?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|error| RuntimeError::Listen {
                    addr: config.listen,
                    error,
                })?;
        let metrics = metrics::Metrics::new(runtime.registry())?;
        let catalog = catalog_api(&config).await?;
        // Ends with the catalog's follower, which the API holds.
        let catalog_operators = s2s_catalog::Live::spawn_on(
            catalog.catalog.changes(),
            "console",
            runtime.registry(),
            &CancellationToken::new(),
            api::catalog_operators,
        )
        .map_err(|e| RuntimeError::Config(e.to_string()))?;
        let reader = reader::Reader::new(&config.pipeline.topics);
        let backfills = Arc::new(backfill::Backfills::new(
            config.pipeline.kafka.clone(),
            config.pipeline.topics.conversions.name.clone(),
            config.pipeline.topics.delivery_commands.name.clone(),
            runtime.producer().clone(),
            metrics.clone(),
        ));
        let api = Arc::new(api::ApiState {
            ownership: runtime.ownership().clone(),
            producer: runtime.producer().clone(),
            commands_topic: config.pipeline.topics.delivery_commands.name.clone(),
            inputs: inputs.into_iter().map(|i| i.topic).collect(),
            operators: config.operators.clone().into_iter().collect(),
            catalog_operators,
            metrics,
            feed: reader.feed(),
            catalog,
            backfills,
        });
        Ok(Console {
            runtime,
            reader,
            api,
            listener,
        })
    }

    /// Where the API and the page are served.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.runtime.admin_addr()
    }

    /// Serves and keeps the read model current until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RuntimeError> {
        tracing::info!(addr = ?self.listener.local_addr().ok(), "console serving");
        let app = api::router(self.api.clone());
        let stop = shutdown.clone();
        let listener = self.listener;
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        });
        let writer_gauge = tokio::spawn({
            let mut standing = self.api.catalog.election.subscribe();
            let gauge = self.api.metrics.catalog_writer.clone();
            let stop = shutdown.clone();
            let api = self.api.clone();
            async move {
                loop {
                    let since = *standing.borrow_and_update();
                    gauge.set(i64::from(since.is_some()));
                    // Elected: say where this instance answers, for the others to forward to.
                    if let (Some(since), Some(url)) = (since, api.catalog.advertised_url.as_deref())
                    {
                        match api.catalog.writer.announce(url, since).await {
                            Ok(offset) => tracing::info!(url, offset, "catalog writer announced"),
                            Err(error) => tracing::warn!(url, %error,
                                "catalog writer not announced: the others answer changes 503"),
                        }
                    }
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        changed = standing.changed() => if changed.is_err() { break },
                    }
                }
            }
        });
        let result = self.runtime.run(self.reader, shutdown.clone()).await;
        self.api.backfills.stop();
        let _ = writer_gauge.await;
        shutdown.cancel();
        let _ = server.await;
        result
    }
}

/// The catalog read to its end, its history, this instance's candidacy as its writer.
async fn catalog_api(config: &ConsoleConfig) -> Result<api::catalog::CatalogApi, RuntimeError> {
    let (kafka, topics) = (&config.pipeline.kafka, &config.pipeline.topics);
    let stop = CancellationToken::new();
    let catalog = Arc::new(
        Follower::start(
            kafka,
            &topics.catalog.name,
            s2s_catalog::follower::READY_WITHIN,
            &stop,
        )
        .await
        .map_err(|e| RuntimeError::Config(e.to_string()))?,
    );
    let history = Follower::start(
        kafka,
        &topics.catalog_audit.name,
        s2s_catalog::follower::READY_WITHIN,
        &stop,
    )
    .await
    .map_err(|e| RuntimeError::Config(e.to_string()))?;
    let election = Election::join(
        kafka,
        &config.catalog_writer_group(),
        &topics.catalog.name,
        &stop,
    )
    .map_err(|e| RuntimeError::Config(e.to_string()))?;
    let (catalog_topic, audit_topic) = (&topics.catalog.name, &topics.catalog_audit.name);
    let writer = match config.catalog_transactional_id() {
        Some(id) => Writer::transactional(
            kafka,
            &id,
            catalog_topic,
            audit_topic,
            Arc::clone(&catalog),
            CATALOG_APPLY_WITHIN,
        ),
        None => Writer::new(
            kafka,
            catalog_topic,
            audit_topic,
            Arc::clone(&catalog),
            CATALOG_APPLY_WITHIN,
        )?,
    };
    Ok(api::catalog::CatalogApi {
        checks: catalog_checks(&config.pipeline.postbacks)?,
        secret_key: s2s_catalog::secrets::SecretKey::of(&config.pipeline)
            .map_err(|e| RuntimeError::Config(e.to_string()))?,
        catalog,
        history,
        advertised_url: config.advertised_url.clone(),
        ingest_public_url: config.ingest_public_url.clone(),
        client: reqwest::Client::builder()
            .timeout(CATALOG_APPLY_WITHIN + Duration::from_secs(5))
            .build()
            .map_err(|e| RuntimeError::Config(format!("http client: {e}")))?,
        election,
        writer,
    })
}

/// The topics the console reads, all keyed by click ID.
fn inputs(c: &ConsoleConfig) -> Vec<Input> {
    let t = &c.pipeline.topics;
    [
        (&t.clicks, "click"),
        (&t.postbacks, "postback"),
        (&t.conversions, "conversion"),
        (&t.rejections, "rejection"),
        (&t.delivery_log, "attempt"),
        (&t.dead_letter, "dead_letter"),
        (&t.delivery_commands, "command"),
        (&t.refusals, "refusal"),
    ]
    .into_iter()
    .map(|(t, kind)| Input {
        topic: t.name.clone(),
        kind,
    })
    .collect()
}

/// Binds and runs until `shutdown`.
pub async fn run(config: ConsoleConfig, shutdown: CancellationToken) -> Result<(), RuntimeError> {
    Console::bind(config).await?.run(shutdown).await
}

/// The rules catalog documents are checked with: the pipeline's vocabulary, delivery's
/// rules for postbacks and ingest's for sources.
pub fn catalog_checks(
    vocabulary: &s2s_common::pipeline::PostbackVocabulary,
) -> Result<s2s_catalog::documents::Checks, RuntimeError> {
    let postbacks = s2s_delivery::catalog::postback_check()
        .map_err(|e| RuntimeError::Config(format!("delivery's defaults: {e}")))?;
    Ok(s2s_catalog::documents::Checks::new(vocabulary.clone())
        .with(s2s_catalog::Kind::Postback, postbacks)
        .with(
            s2s_catalog::Kind::Source,
            s2s_ingest::catalog::source_check(),
        ))
}
