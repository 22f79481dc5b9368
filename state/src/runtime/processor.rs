//! What a service implements to run on the [`super::Runtime`].

use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{OwnedHeaders, OwnedMessage};
use tokio::sync::mpsc;

use super::RuntimeError;
use crate::store::{Family, Staged, Store};

/// A record a cycle publishes once it commits (to a topic other than the changelog).
#[derive(Debug)]
pub struct Output {
    pub topic: Arc<str>,
    /// Partitioned by the default partitioner on this key.
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub headers: Option<OwnedHeaders>,
}

impl Output {
    /// A record of the contract, encoded, with its headers (schema version, kind,
    /// outcome ID), partitioned by `key`.
    pub fn record<R: s2s_common::contract::WireRecord>(
        topic: &Arc<str>,
        key: &[u8],
        record: &R,
    ) -> Self {
        Output {
            topic: Arc::clone(topic),
            key: key.to_vec(),
            payload: s2s_common::contract::encode(record),
            headers: Some(s2s_common::kafka::wire_headers(record)),
        }
    }
}

/// An undecodable input record, set aside by the runtime.
#[derive(Debug)]
pub(super) struct Poison {
    pub msg: OwnedMessage,
    pub kind: &'static str,
    pub reason: String,
}

/// One partition's share of a cycle, as the processor sees it: the staged state, the
/// cycle's clock, and where its outputs and events go.
#[derive(Debug)]
pub struct Cx<'c, 's, F: Family, E> {
    pub partition: i32,
    /// The cycle's wall-clock time; the same again when a crashed cycle is replayed.
    pub now_ms: i64,
    pub state: &'c mut Staged<'s, F>,
    pub(super) outputs: &'c mut Vec<Output>,
    pub(super) events: &'c mut Vec<E>,
    pub(super) poison: &'c mut Vec<Poison>,
}

impl<F: Family, E> Cx<'_, '_, F, E> {
    /// Publishes `output` when the cycle commits.
    pub fn emit(&mut self, output: Output) {
        self.outputs.push(output);
    }

    /// Hands `event` to [`Processor::committed`] once the cycle is committed.
    pub fn event(&mut self, event: E) {
        self.events.push(event);
    }

    /// Sets aside an input record that cannot be decoded: copied byte for byte to the
    /// poison topic (where the service has one) with the reason and its origin in
    /// headers, counted and logged once committed. It never stops the stream.
    pub fn poison(&mut self, msg: &OwnedMessage, kind: &'static str, reason: String) {
        self.poison.push(Poison {
            msg: msg.clone(),
            kind,
            reason,
        });
    }

    /// Whether the cycle produced anything so far.
    pub(super) fn produced(&self) -> usize {
        self.outputs.len() + self.events.len() + self.poison.len()
    }
}

/// What a processor may ask about a partition when the runtime plans a cycle.
pub struct View<'v> {
    pub(super) caught_up: &'v dyn Fn(&str) -> bool,
}

impl std::fmt::Debug for View<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View").finish_non_exhaustive()
    }
}

impl View<'_> {
    /// Whether every record of `topic` in this partition that the broker had at the last
    /// statistics report (~1 s) is taken in.
    pub fn caught_up(&self, topic: &str) -> bool {
        (self.caught_up)(topic)
    }
}

/// A service's rules on the runtime. Methods run on the runtime's task, one at a time.
pub trait Processor<F: Family>: Send {
    /// What a cycle hands back to [`Processor::committed`] once it is durable.
    type Event: Send;
    /// What an extra wake-up source ([`Processor::wake_source`]) delivers.
    type Wake: Send + 'static;

    /// A partition was assigned and its store restored: positions, queues, caches.
    fn opened(&mut self, _partition: i32, _store: &Arc<Store<F>>) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// A partition was revoked; its store stays open (a rebalance often gives it back).
    fn closed(&mut self, _partition: i32) {}

    /// Applies one partition's records (in offset order per topic) to its staged state.
    fn process(
        &mut self,
        cx: &mut Cx<'_, '_, F, Self::Event>,
        records: &[OwnedMessage],
    ) -> Result<(), RuntimeError>;

    /// Whether this partition's timers may run this cycle (decided when the cycle is
    /// planned, and replayed as decided).
    fn timers_ready(&self, _partition: i32, _view: &View<'_>) -> bool {
        true
    }

    /// The partition's timers, after its records, when [`Processor::timers_ready`] said so.
    fn tick(&mut self, _cx: &mut Cx<'_, '_, F, Self::Event>) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// The cycle's events, once its state, offsets and outputs are durable: count and log
    /// them here, each in one place, and update what the processor keeps in memory.
    fn committed(&mut self, events: Vec<Self::Event>);

    /// After every cycle, from committed state (delivery dispatches its due jobs here).
    fn after_cycle(&mut self) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// An extra source of wake-ups (delivery's attempt reports), taken once at start.
    fn wake_source(&mut self) -> Option<mpsc::UnboundedReceiver<Self::Wake>> {
        None
    }

    /// A wake-up arrived; `draining` at shutdown, when nothing new may start.
    fn on_wake(&mut self, _wake: Self::Wake, _draining: bool) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// Work the processor holds for the next cycle (it counts towards `max_batch`, and
    /// starts the commit interval like a record).
    fn backlog(&self) -> usize {
        0
    }

    /// Work started and not yet reported back; waited for at shutdown.
    fn in_flight(&self) -> usize {
        0
    }

    /// How long to wait for that at shutdown.
    fn shutdown_grace(&self) -> Duration {
        Duration::ZERO
    }

    /// The longest a cycle may wait when there is no input; `None`: the commit interval.
    fn idle_wait(&self) -> Option<Duration> {
        None
    }

    /// Refreshes the processor's own gauges (called at most once a second).
    fn gauges(&self) {}
}
