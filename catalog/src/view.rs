//! A service's own view of the catalog, kept live: what it needs (ingest: the offers'
//! URL templates, the affiliates' statuses, the sources; the attributor: the offers'
//! rules and the blocked affiliates; delivery: the postbacks; the console: the
//! operators),
//! compiled from each catalog the [`Follower`] publishes, so that the hot path reads a
//! ready structure through one `Arc` and never parses a document.
//!
//! `compile` is given the view it replaces: a document the service cannot take (the
//! catalog checks documents with the pipeline's rules, but a service may have rules of
//! its own) keeps its last accepted version there, and the service says so.
//!
//! Compiling runs on a thread of its own, never on the service's async workers: a big
//! catalog takes a while to compile, and requests must not wait behind it.

use std::sync::Arc;

use prometheus::{IntGauge, Registry};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::follower::{Follower, FollowerError, READY_WITHIN};
use crate::record::Kind;

/// A view of type `T`, replaced as a whole at each catalog change.
#[derive(Debug)]
pub struct Live<T> {
    rx: watch::Receiver<Arc<T>>,
}

impl<T> Clone for Live<T> {
    fn clone(&self) -> Self {
        Live {
            rx: self.rx.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("reading the catalog: {0}")]
    Follower(#[from] FollowerError),
    #[error("the catalog's metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("starting the catalog's compiling thread: {0}")]
    Thread(std::io::Error),
}

impl<T: Send + Sync + 'static> Live<T> {
    /// Reads the catalog `topic` to its end (within [`READY_WITHIN`]) and follows it
    /// until `shutdown`, compiling each catalog ([`Live::spawn`]): how a service starts
    /// its view.
    pub async fn follow(
        kafka: &s2s_common::kafka::KafkaConfig,
        topic: &str,
        service: &str,
        registry: &Registry,
        shutdown: &CancellationToken,
        compile: impl FnMut(&Catalog, Option<&T>) -> T + Send + 'static,
    ) -> Result<Self, LiveError> {
        let follower = Follower::start(kafka, topic, READY_WITHIN, shutdown).await?;
        Self::spawn(follower, service, registry, shutdown, compile)
    }

    /// Compiles the follower's catalog now (so the view is whole from the start) and
    /// again at each change, until `shutdown`. `service` names the gauge
    /// `<service>_catalog_revision`: the revision of the last change applied.
    pub fn spawn(
        follower: Follower,
        service: &str,
        registry: &Registry,
        shutdown: &CancellationToken,
        compile: impl FnMut(&Catalog, Option<&T>) -> T + Send + 'static,
    ) -> Result<Self, LiveError> {
        let changes = follower.changes();
        Self::start(
            changes,
            Some(follower),
            service,
            registry,
            shutdown,
            compile,
        )
    }

    /// [`Live::spawn`] over the catalogs of a follower its caller keeps (and shares).
    pub fn spawn_on(
        changes: watch::Receiver<Arc<Catalog>>,
        service: &str,
        registry: &Registry,
        shutdown: &CancellationToken,
        compile: impl FnMut(&Catalog, Option<&T>) -> T + Send + 'static,
    ) -> Result<Self, LiveError> {
        Self::start(changes, None, service, registry, shutdown, compile)
    }

    fn start(
        mut changes: watch::Receiver<Arc<Catalog>>,
        follower: Option<Follower>,
        service: &str,
        registry: &Registry,
        shutdown: &CancellationToken,
        mut compile: impl FnMut(&Catalog, Option<&T>) -> T + Send + 'static,
    ) -> Result<Self, LiveError> {
        let gauge = IntGauge::new(
            format!("{service}_catalog_revision"),
            "The revision of the last catalog change this instance applied (-1: none)",
        )?;
        registry.register(Box::new(gauge.clone()))?;
        let catalog = changes.borrow_and_update().clone();
        gauge.set(revision(&catalog));
        let (tx, rx) = watch::channel(Arc::new(compile(&catalog, None)));
        let shutdown = shutdown.clone();
        let service = service.to_string();
        std::thread::Builder::new()
            .name(format!("{service}-catalog"))
            .spawn(move || {
                // A follower of its own reads for as long as this thread holds it.
                let _follower = follower;
                loop {
                    let go_on = futures::executor::block_on(async {
                        tokio::select! {
                            () = shutdown.cancelled() => false,
                            changed = changes.changed() => changed.is_ok(),
                        }
                    });
                    if !go_on {
                        break;
                    }
                    let catalog = changes.borrow_and_update().clone();
                    let previous = tx.borrow().clone();
                    tx.send_replace(Arc::new(compile(&catalog, Some(&previous))));
                    gauge.set(revision(&catalog));
                    tracing::info!(service = %service, revision = revision(&catalog),
                        "catalog change applied");
                }
            })
            .map_err(LiveError::Thread)?;
        Ok(Live { rx })
    }
}

impl<T> Live<T> {
    /// A view that never changes (tests, tools without a broker).
    pub fn fixed(view: T) -> Self {
        let (_, rx) = watch::channel(Arc::new(view));
        Live { rx }
    }

    /// The view now: cheap (a read lock held for one `Arc` clone).
    pub fn current(&self) -> Arc<T> {
        Arc::clone(&self.rx.borrow())
    }

    /// Whether the view changed since the last [`Live::current_if_changed`].
    pub fn current_if_changed(&mut self) -> Option<Arc<T>> {
        if self.rx.has_changed().unwrap_or(false) {
            Some(Arc::clone(&self.rx.borrow_and_update()))
        } else {
            None
        }
    }
}

/// Every entity of `kind` in `catalog`, compiled by `compile`, as `(id, value)`. An entity
/// `compile` refuses (the catalog checks documents with the pipeline's rules, so only a
/// record written around the API, or a rule of the service's own, can be refused) keeps
/// the value `previous` gives for its ID, or is left out; `service` names who refused it
/// in the error logged.
pub fn compile_each<V>(
    catalog: &Catalog,
    kind: Kind,
    service: &str,
    previous: impl Fn(&str) -> Option<V>,
    compile: impl FnMut(&str, &serde_json::Value) -> Result<V, String>,
) -> Vec<(String, V)> {
    compile_changed(
        catalog,
        kind,
        service,
        |_, _| None,
        |id| previous(id).map(|v| (0, v)),
        compile,
    )
    .into_iter()
    .map(|(id, _, v)| (id, v))
    .collect()
}

/// Like [`compile_each`], for a view that remembers each value's revision: `unchanged`
/// gives the value an entity's ID had at the given revision, if the view has it, and that
/// value is kept without compiling the entity again — a change costs the entities it
/// changed, not the whole kind. A refused entity keeps what `previous` gives (its value
/// and the revision it was compiled from). Returns `(id, revision, value)`.
pub fn compile_changed<V>(
    catalog: &Catalog,
    kind: Kind,
    service: &str,
    unchanged: impl Fn(&str, i64) -> Option<V>,
    previous: impl Fn(&str) -> Option<(i64, V)>,
    mut compile: impl FnMut(&str, &serde_json::Value) -> Result<V, String>,
) -> Vec<(String, i64, V)> {
    let mut out = Vec::new();
    for e in catalog.list(kind) {
        let id = e.key.id();
        if let Some(v) = unchanged(id, e.revision) {
            out.push((id.to_string(), e.revision, v));
            continue;
        }
        match compile(id, &e.stored.document) {
            Ok(v) => out.push((id.to_string(), e.revision, v)),
            Err(error) => {
                let kept = previous(id);
                tracing::error!(key = %e.key, revision = e.revision, %error, service,
                    kept_previous = kept.is_some(),
                    "a catalog entity this service cannot use: its last usable version is kept");
                if let Some((revision, v)) = kept {
                    out.push((id.to_string(), revision, v));
                }
            }
        }
    }
    out
}

/// The revision of a catalog: the offset of the last change applied (-1 before any).
pub fn revision(catalog: &Catalog) -> i64 {
    catalog.next_offset() - 1
}
