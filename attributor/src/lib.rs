//! Attributor: the stateful core. It joins postbacks to clicks by click ID in windowed
//! RocksDB stores (one per input partition) and publishes attributed conversions, status
//! updates and reason-coded rejections. It runs on the stream runtime
//! ([`s2s_state::runtime`]), which owns the consumer, the stores, the commit sequence and
//! the processing guarantee; this crate holds the rules ([`join`]), how they read and write
//! the state ([`process`]), and the processor below that applies them per partition:
//!
//! - a click is registered, a postback joined to its click (or held for it up to the grace
//!   period), a status update applied to its conversion;
//! - timers: postbacks whose grace period ended are released as `unknown_click`, pending
//!   conversions whose hold ended are approved — but only once the partition's clicks are
//!   caught up, so that a backlog after downtime is read before anything is declared
//!   `unknown_click`;
//! - offers (windows, payouts, policies) come from the catalog, live ([`catalog`]);
//! - every decision depends on the records, the cycle's clock and the catalog's offers,
//!   so a crashed cycle replayed by the runtime publishes the same outcomes with the same
//!   IDs, priced alike unless an offer changed in between (each outcome records the
//!   catalog revision it was decided with); consumers deduplicate by `outcome_id`.
//!
//! Undecodable input (bad JSON, unknown schema version) is copied byte for byte to the
//! poison topic, with the reason and its origin in headers; it never stops the stream.

pub mod catalog;
pub mod config;
pub mod join;
pub mod metrics;
pub mod process;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Message, OwnedMessage};
use s2s_common::contract::{self, Click, PayoutRule, Postback};
use s2s_common::kafka::ensure_topics;
use s2s_common::topics::partition_key;
use s2s_state::runtime::{Cx, Input, Output, Processor, Runtime, RuntimeError, Settings, View};
use tokio_util::sync::CancellationToken;

pub use config::{AttributorConfig, Guarantee};
use join::Rules;
use process::{Joiner, Outcome};
use store::{Cf, StoreLimits};

/// Upper bound of grace-period expiries handled per partition and cycle, to keep cycles
/// short.
const TIMER_BATCH: usize = 10_000;

/// A started attributor: topics provisioned, clients created, admin bound.
#[derive(Debug)]
pub struct Attributor {
    runtime: Runtime<Cf>,
    processor: Attribution,
}

impl Attributor {
    /// Validates the config, provisions topics, reads the catalog to its end (and
    /// follows it until `shutdown`) and binds the runtime.
    pub async fn bind(
        config: AttributorConfig,
        shutdown: &CancellationToken,
    ) -> Result<Self, RuntimeError> {
        let base = config.validate().map_err(RuntimeError::Config)?;
        ensure_topics(
            &config.pipeline.kafka,
            &config.pipeline.topics,
            Duration::from_secs(30),
        )
        .await?;
        let topics = &config.pipeline.topics;
        let rules = base.clone();
        let click_retention_ms = config.click_retention_ms(&rules);
        let conversion_retention_ms = config.conversion_retention_ms();
        let runtime = Runtime::bind(Settings {
            service: "attributor",
            kafka: config.pipeline.kafka.clone(),
            group_id: config.group_id.clone(),
            inputs: vec![
                Input {
                    topic: topics.clicks.name.clone(),
                    kind: "click",
                },
                Input {
                    topic: topics.postbacks.name.clone(),
                    kind: "postback",
                },
            ],
            state_dir: config.state_dir.clone(),
            limits: StoreLimits {
                block_cache_bytes: config.rocksdb.block_cache_bytes,
                write_buffer_bytes: config.rocksdb.write_buffer_bytes,
                click_retention_ms,
                conversion_retention_ms,
            }
            .into(),
            changelog: Some(topics.changelog.name.clone()),
            poison: Some(topics.poison.name.clone()),
            guarantee: config.processing_guarantee,
            transactional_id: config.transactional_id().map_err(RuntimeError::Config)?,
            commit_interval: config.commit_interval,
            max_batch: config.max_batch,
            admin_listen: config.admin_listen,
        })
        .await?;
        let metrics = metrics::Metrics::new(runtime.registry())?;
        let compile_config = config.clone();
        let catalog = s2s_catalog::Live::follow(
            &config.pipeline.kafka,
            &topics.catalog.name,
            "attributor",
            runtime.registry(),
            shutdown,
            move |c, previous| catalog::compile(&compile_config, &base, c, previous),
        )
        .await
        .map_err(|e| RuntimeError::Config(e.to_string()))?;
        let processor = Attribution {
            joiner: Joiner {
                click_retention_ms,
                conversion_retention_ms,
                rules: Rules::clone(&catalog.current()),
                grace_ms: config::ms(config.grace_period),
            },
            catalog,
            clicks: topics.clicks.name.clone(),
            conversions: Arc::from(topics.conversions.name.as_str()),
            rejections: Arc::from(topics.rejections.name.as_str()),
            metrics,
        };
        Ok(Attributor { runtime, processor })
    }

    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.runtime.admin_addr()
    }

    /// Runs cycles until `shutdown`; the cycle in progress is completed and committed.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RuntimeError> {
        self.runtime.run(self.processor, shutdown).await
    }
}

/// The join as a processor of the runtime.
#[derive(Debug)]
struct Attribution {
    joiner: Joiner,
    /// The rules with the catalog's offers, live: a cycle takes them when it starts.
    catalog: s2s_catalog::Live<Rules>,
    clicks: String,
    conversions: Arc<str>,
    rejections: Arc<str>,
    metrics: metrics::Metrics,
}

impl Attribution {
    /// Takes the catalog's latest rules, if they changed.
    fn refresh(&mut self) {
        if let Some(rules) = self.catalog.current_if_changed() {
            self.joiner.rules = Rules::clone(&rules);
        }
    }

    fn emit(&self, cx: &mut Cx<'_, '_, Cf, Outcome>, outcomes: impl IntoIterator<Item = Outcome>) {
        for mut o in outcomes {
            // A rejection of a postback was decided with the catalog as it is now.
            if let Outcome::Rejected(r) = &mut o {
                if r.postback.is_some() {
                    r.catalog_revision = self.joiner.rules.catalog_revision;
                }
            }
            let key = partition_key(o.key());
            cx.emit(match &o {
                Outcome::Attributed(c) | Outcome::Updated(c) => {
                    Output::record(&self.conversions, key, c)
                }
                Outcome::Rejected(r) => Output::record(&self.rejections, key, r),
            });
            cx.event(o);
        }
    }
}

impl Processor<Cf> for Attribution {
    type Event = Outcome;
    type Wake = ();

    fn process(
        &mut self,
        cx: &mut Cx<'_, '_, Cf, Outcome>,
        records: &[OwnedMessage],
    ) -> Result<(), RuntimeError> {
        self.refresh();
        let now = cx.now_ms;
        for msg in records {
            let payload = msg.payload().unwrap_or_default();
            if msg.topic() == self.clicks {
                match contract::decode::<Click>(payload) {
                    Ok(click) => {
                        let outcomes = self.joiner.on_click(cx.state, &click, now)?;
                        self.emit(cx, outcomes);
                    }
                    Err(e) => cx.poison(msg, "click", e.to_string()),
                }
            } else {
                match contract::decode::<Postback>(payload) {
                    Ok(pb) => {
                        let outcome = self.joiner.on_postback(cx.state, &pb, msg.offset(), now)?;
                        self.emit(cx, outcome);
                    }
                    Err(e) => cx.poison(msg, "postback", e.to_string()),
                }
            }
        }
        Ok(())
    }

    /// Timers wait until the partition's clicks are caught up: a postback's grace ends
    /// only once the clicks it could join are read.
    fn timers_ready(&self, _partition: i32, view: &View<'_>) -> bool {
        view.caught_up(&self.clicks)
    }

    fn tick(&mut self, cx: &mut Cx<'_, '_, Cf, Outcome>) -> Result<(), RuntimeError> {
        self.refresh();
        let outcomes = self.joiner.on_timer(cx.state, cx.now_ms, TIMER_BATCH)?;
        self.emit(cx, outcomes);
        Ok(())
    }

    /// Logs and counts what a committed cycle produced: each event in this one place.
    fn committed(&mut self, outcomes: Vec<Outcome>) {
        let m = &self.metrics;
        let now = s2s_common::now_ms();
        for o in outcomes {
            let (reason, pb_ts) = match &o {
                Outcome::Attributed(c) => {
                    m.click_to_conversion
                        .observe(ms_to_secs(c.event_ts_ms - c.click_ts_ms));
                    if c.suspicious {
                        m.suspicious.inc();
                    }
                    if c.payout_rule != PayoutRule::OfferEvent {
                        tracing::warn!(
                            conversion_id = %c.conversion_id,
                            offer_id = %c.offer_id,
                            event = %c.event,
                            rule = c.payout_rule.as_str(),
                            "conversion priced at 0: no payout configured for it"
                        );
                        m.unpriced
                            .with_label_values(&[c.payout_rule.as_str()])
                            .inc();
                    }
                    ("none", c.received_ts_ms)
                }
                Outcome::Updated(c) => (
                    c.status_reason.map_or("none", |r| r.as_str()),
                    c.received_ts_ms,
                ),
                Outcome::Rejected(r) => (
                    r.reason.as_str(),
                    r.postback.as_ref().map_or(now, |p| p.ts_ms),
                ),
            };
            m.outcomes.with_label_values(&[o.label(), reason]).inc();
            let automatic = matches!(&o, Outcome::Updated(c) if c.status_reason.is_some());
            if !automatic && !matches!(&o, Outcome::Rejected(r) if r.postback.is_none()) {
                m.postback_latency.observe(ms_to_secs(now - pb_ts));
            }
        }
    }
}

fn ms_to_secs(ms: i64) -> f64 {
    ms.max(0) as f64 / 1000.0
}

/// Binds and runs until `shutdown`.
pub async fn run(
    config: AttributorConfig,
    shutdown: CancellationToken,
) -> Result<(), RuntimeError> {
    Attributor::bind(config, &shutdown)
        .await?
        .run(shutdown)
        .await
}
