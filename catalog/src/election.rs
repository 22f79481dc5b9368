//! Which instance writes the catalog, elected through Kafka as Schema Registry elects its
//! leader: every candidate joins one consumer group subscribed to the catalog topic (one
//! partition), and the member the group assigns that partition is the writer. A member
//! that leaves (shutdown) or stops heartbeating (crash, `session.timeout.ms`) loses it,
//! and the group gives it to another.
//!
//! The member reads nothing through the group: it pauses the partition once assigned
//! (the [`crate::Follower`] reads the catalog).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::ClientContext;
use s2s_common::kafka::KafkaConfig;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

/// How long one poll of the member waits: its reaction time to a shutdown.
const POLL: Duration = Duration::from_millis(100);

/// This instance's standing in the catalog writers' group.
#[derive(Debug)]
pub struct Election {
    leader: watch::Receiver<Option<Instant>>,
    joined: Arc<AtomicBool>,
    _stop: DropGuard,
}

impl Election {
    /// Joins `group` on `topic`; leaves it when dropped or when `shutdown` is cancelled.
    pub fn join(
        kafka: &KafkaConfig,
        group: &str,
        topic: &str,
        shutdown: &CancellationToken,
    ) -> Result<Self, ElectionError> {
        let (tx, leader) = watch::channel(None);
        let joined = Arc::new(AtomicBool::new(false));
        let consumer: BaseConsumer<Member> =
            s2s_common::kafka::without_statistics(&mut kafka.consumer_config(group))
                .create_with_context(Member {
                    leader: tx,
                    joined: Arc::clone(&joined),
                })?;
        consumer.subscribe(&[topic])?;
        let stop = shutdown.child_token();
        let member_stop = stop.clone();
        std::thread::Builder::new()
            .name("catalog-election".into())
            .spawn(move || {
                while !member_stop.is_cancelled() {
                    // Messages are not read (the partition is paused); errors are logged by
                    // the context and retried by librdkafka.
                    let _ = consumer.poll(POLL);
                }
                // Leaves the group at once, so that another candidate takes over now
                // rather than after the session timeout.
                consumer.unsubscribe();
                consumer.context().leader.send_replace(None);
                consumer.context().joined.store(false, Ordering::Release);
            })
            .map_err(ElectionError::Thread)?;
        Ok(Election {
            leader,
            joined,
            _stop: stop.drop_guard(),
        })
    }

    /// Whether this instance is the writer now.
    pub fn is_leader(&self) -> bool {
        self.leader.borrow().is_some()
    }

    /// Whether the group has given this instance an assignment (the partition or none):
    /// it takes part in the election.
    pub fn joined(&self) -> bool {
        self.joined.load(Ordering::Acquire)
    }

    /// Since when this instance is the writer, if it is.
    pub fn leader_since(&self) -> Option<Instant> {
        *self.leader.borrow()
    }

    /// Every change of standing.
    pub fn subscribe(&self) -> watch::Receiver<Option<Instant>> {
        self.leader.clone()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("starting the election thread: {0}")]
    Thread(std::io::Error),
}

struct Member {
    leader: watch::Sender<Option<Instant>>,
    joined: Arc<AtomicBool>,
}

impl ClientContext for Member {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "catalog election consumer error");
    }
}

impl ConsumerContext for Member {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.joined
            .store(matches!(rebalance, Rebalance::Assign(_)), Ordering::Release);
        match rebalance {
            Rebalance::Assign(tpl) if tpl.count() > 0 => {
                if let Err(e) = consumer.pause(tpl) {
                    tracing::warn!(error = %e, "cannot pause the catalog partition");
                }
                tracing::info!("this instance is the catalog writer");
                self.leader.send_replace(Some(Instant::now()));
            }
            Rebalance::Assign(_) => {
                self.leader.send_replace(None);
            }
            Rebalance::Revoke(_) | Rebalance::Error(_) => {
                if self.leader.borrow().is_some() {
                    tracing::info!("this instance is no longer the catalog writer");
                }
                self.leader.send_replace(None);
            }
        }
    }
}
