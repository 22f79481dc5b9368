//! Delivery as a processor of the stream runtime ([`s2s_state::runtime`]). Per partition,
//! against the staged overlay of its store, a cycle:
//! - schedules each new delivery (conversion version × matching endpoint) unless its ID is
//!   known (a replay upstream: counted as a duplicate, not sent twice);
//! - applies operator commands (re-delivery);
//! - settles each attempt reported back ([`crate::settle`]): delivered, retry at a due
//!   time, or dead-lettered, with its delivery-log record;
//! - forgets finished deliveries past `finished_retention` (once a second).
//!
//! The runtime publishes the delivery log and dead letters, logs the changed jobs to the
//! changelog, and commits state and offsets atomically. Then, from committed state only,
//! due jobs are dispatched ([`crate::dispatch`]) while their endpoint and the instance have
//! request slots: a delivery is attempted only once it is durably scheduled, and stays due
//! in the store until its attempt's result is committed.
//!
//! Hence: an input offset is committed only when its deliveries are durably scheduled (or
//! done); a crash re-sends at most the attempts in flight or not yet committed, with the
//! same `webhook-id` — at-least-once towards HTTP endpoints, deduplicable by that ID. The
//! delivery log may then show such an attempt twice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::{Message, OwnedMessage};
use s2s_common::contract::{self, CommandAction, Conversion, DeadLetterReason, DeliveryCommand};
use s2s_common::topics::partition_key;
use s2s_state::runtime::{Cx, Output, Processor, RuntimeError};
use tokio::sync::mpsc;

use s2s_catalog::Live;

use crate::catalog::DeliveryCatalog;
use crate::dispatch::{Dispatcher, Report};
use crate::endpoint::Endpoint;
use crate::events::{self, Event};
use crate::job::Job;
use crate::metrics::Metrics;
use crate::policy::RetryPolicy;
use crate::schedule::{self, Cf, PendingDeltas, Queue, Store};
use crate::settle::{is_current, settle};

mod dispatching;
use dispatching::queue_of;

/// Finished deliveries forgotten per partition and sweep, to keep cycles short.
const EXPIRY_BATCH: usize = 1_000;
/// How often gauges are refreshed and expired deliveries swept.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// The longest an idle worker sleeps before looking at its queues again.
const IDLE_TICK: Duration = Duration::from_millis(250);

/// What the processor holds for one owned partition.
struct Part {
    store: Arc<Store>,
    /// Distinguishes this ownership of the partition from an earlier one, whose reports
    /// are void.
    generation: u64,
    reports: Vec<Report>,
    queues: BTreeMap<String, Queue>,
    /// Pending deliveries per endpoint.
    pending: BTreeMap<String, i64>,
}

/// What a cycle did, for [`Processor::committed`].
#[derive(Debug)]
pub enum Done {
    Event(Event),
    /// A partition's committed writes to its due index, keys to put back in its queues,
    /// and the change of its pending counts.
    Partition {
        partition: i32,
        due: Vec<(Vec<u8>, bool)>,
        put_back: Vec<Vec<u8>>,
        deltas: PendingDeltas,
    },
}

/// The settings the processor needs.
#[derive(Debug, Clone)]
pub struct Rules {
    pub policy: RetryPolicy,
    pub finished_retention_ms: i64,
    pub shutdown_grace: Duration,
    pub conversions: String,
    pub delivery_log: Arc<str>,
    pub dead_letter: Arc<str>,
}

/// The catalog's postbacks, live, beside the config file's.
#[derive(Debug)]
pub struct LivePostbacks {
    pub catalog: Live<DeliveryCatalog>,
    /// The config file's endpoints, always there.
    pub file: Vec<Arc<Endpoint>>,
}

pub struct Deliveries {
    rules: Rules,
    dispatcher: Dispatcher,
    metrics: Metrics,
    postbacks: Option<LivePostbacks>,
    parts: BTreeMap<i32, Part>,
    /// The `endpoint` labels of the endpoints (see [`Metrics::endpoint_label`]).
    labels: Vec<String>,
    generation: u64,
    /// Turns the partition dispatch starts at.
    round: usize,
    swept_at: Instant,
}

impl std::fmt::Debug for Deliveries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliveries")
            .field("partitions", &self.parts.len())
            .field("dispatcher", &self.dispatcher)
            .finish()
    }
}

impl Deliveries {
    pub fn new(rules: Rules, dispatcher: Dispatcher, metrics: Metrics) -> Self {
        let labels = zero_counters(&metrics, dispatcher.endpoints());
        Deliveries {
            rules,
            dispatcher,
            metrics,
            postbacks: None,
            parts: BTreeMap::new(),
            labels,
            generation: 0,
            round: 0,
            swept_at: Instant::now(),
        }
    }

    /// Follows the catalog's postbacks: each catalog change replaces the endpoints (the
    /// config file's, then the catalog's).
    pub fn with_postbacks(mut self, postbacks: LivePostbacks) -> Self {
        let catalog = postbacks.catalog.current();
        self.postbacks = Some(postbacks);
        self.apply_postbacks(&catalog);
        self
    }

    /// Takes the catalog's latest postbacks, if they changed.
    fn refresh(&mut self) {
        let changed = self
            .postbacks
            .as_mut()
            .and_then(|live| live.catalog.current_if_changed());
        if let Some(catalog) = changed {
            self.apply_postbacks(&catalog);
        }
    }

    fn apply_postbacks(&mut self, catalog: &DeliveryCatalog) {
        let Some(live) = self.postbacks.as_ref() else {
            return;
        };
        let endpoints: Vec<Arc<Endpoint>> = live
            .file
            .iter()
            .cloned()
            .chain(catalog.endpoints.iter().cloned())
            .collect();
        self.labels = zero_counters(&self.metrics, &endpoints);
        tracing::info!(
            revision = catalog.revision,
            endpoints = endpoints.len(),
            "delivery endpoints from the catalog applied"
        );
        self.dispatcher.set_endpoints(endpoints);
    }

    /// Applies one input record: a conversion schedules its deliveries, a command is
    /// carried out, anything undecodable is set aside.
    fn apply_input(
        &self,
        cx: &mut Cx<'_, '_, Cf, Done>,
        msg: &OwnedMessage,
        deltas: &mut PendingDeltas,
    ) -> Result<(), RuntimeError> {
        let payload = msg.payload().unwrap_or_default();
        let now = cx.now_ms;
        if msg.topic() == self.rules.conversions {
            let c = match contract::decode::<Conversion>(payload) {
                Ok(c) => c,
                Err(e) => {
                    cx.poison(msg, "conversion", e.to_string());
                    return Ok(());
                }
            };
            for ep in self
                .dispatcher
                .endpoints()
                .iter()
                .filter(|e| e.enabled && e.filter.wants(&c))
            {
                if !schedule_new(cx, &ep.name, &c, deltas)? {
                    cx.event(Done::Event(Event::Duplicate(ep.name.clone())));
                }
            }
            return Ok(());
        }
        let cmd = match contract::decode::<DeliveryCommand>(payload) {
            Ok(c) => c,
            Err(e) => {
                cx.poison(msg, "command", e.to_string());
                return Ok(());
            }
        };
        let result = match cmd.action {
            CommandAction::Redeliver if self.dispatcher.index(&cmd.endpoint).is_none() => {
                "unknown_endpoint"
            }
            CommandAction::Redeliver => {
                let id = cmd.conversion.delivery_id(&cmd.endpoint);
                let (old, new, result) = match schedule::load(cx.state, &id)? {
                    None => (
                        None,
                        Job::new(id, cmd.endpoint.clone(), cmd.conversion.clone(), now),
                        "created",
                    ),
                    Some(old) => {
                        let mut new = old.clone();
                        let r = new.redeliver(now);
                        (Some(old), new, r.as_str())
                    }
                };
                if old.as_ref() != Some(&new) {
                    *deltas.entry(cmd.endpoint.clone()).or_insert(0) +=
                        schedule::write(cx.state, old.as_ref(), Some(&new));
                }
                result
            }
            CommandAction::Backfill => {
                let endpoint = self
                    .dispatcher
                    .index(&cmd.endpoint)
                    .map(|i| &self.dispatcher.endpoints()[i]);
                match endpoint {
                    None => "unknown_endpoint",
                    Some(ep) if !ep.enabled => "disabled",
                    Some(ep) if !ep.filter.wants(&cmd.conversion) => "not_wanted",
                    Some(ep) => match schedule_new(cx, &ep.name, &cmd.conversion, deltas)? {
                        true => "created",
                        false => "exists",
                    },
                }
            }
        };
        cx.event(Done::Event(Event::Command {
            command: Box::new(cmd),
            result,
        }));
        Ok(())
    }

    /// Stages the result of one attempt; a report that no longer matches its job (the job
    /// moved on meanwhile) is void.
    fn apply_report(
        &self,
        cx: &mut Cx<'_, '_, Cf, Done>,
        r: &Report,
        deltas: &mut PendingDeltas,
        put_back: &mut Vec<Vec<u8>>,
    ) -> Result<(), RuntimeError> {
        let Some(result) = &r.result else {
            return Ok(());
        };
        let old = match schedule::load(cx.state, &r.delivery_id)? {
            Some(j) if is_current(&j, result) => j,
            other => {
                if let Some(j) = other.filter(|j| j.is_pending() && schedule::due_key(j) == r.key) {
                    put_back.push(schedule::due_key(&j));
                }
                tracing::debug!(delivery_id = %r.delivery_id, attempt = result.attempt, "void attempt report: the delivery moved on");
                return Ok(());
            }
        };
        let s = settle(&old, result, &self.rules.policy, cx.now_ms, fastrand::f64());
        *deltas.entry(s.job.endpoint.clone()).or_insert(0) +=
            schedule::write(cx.state, Some(&old), Some(&s.job));
        let key = partition_key(&s.job.conversion.click_id);
        cx.emit(Output::record(&self.rules.delivery_log, key, &s.attempt));
        if let Some(dl) = &s.dead_letter {
            cx.emit(Output::record(&self.rules.dead_letter, key, dl));
        }
        for e in s.events {
            cx.event(Done::Event(e));
        }
        Ok(())
    }
}

impl Processor<Cf> for Deliveries {
    type Event = Done;
    type Wake = Report;

    fn opened(&mut self, partition: i32, store: &Arc<Store>) -> Result<(), RuntimeError> {
        self.generation += 1;
        let mut names: Vec<String> = self
            .dispatcher
            .endpoints()
            .iter()
            .map(|e| e.name.clone())
            .collect();
        for name in schedule::endpoints_with_pending(store)? {
            if !names.contains(&name) {
                tracing::warn!(endpoint = %name, "pending deliveries for an endpoint that is no longer configured; they will be dead-lettered");
                names.push(name);
            }
        }
        let mut queues = BTreeMap::new();
        let mut pending = BTreeMap::new();
        for name in names {
            let (count, _) = schedule::pending_of(store, &name)?;
            pending.insert(name.clone(), count);
            queues.insert(name.clone(), Queue::new(&name));
        }
        self.parts.insert(
            partition,
            Part {
                store: Arc::clone(store),
                generation: self.generation,
                reports: Vec::new(),
                queues,
                pending,
            },
        );
        Ok(())
    }

    fn closed(&mut self, partition: i32) {
        self.parts.remove(&partition);
    }

    fn process(
        &mut self,
        cx: &mut Cx<'_, '_, Cf, Done>,
        records: &[OwnedMessage],
    ) -> Result<(), RuntimeError> {
        self.refresh();
        let mut deltas = PendingDeltas::new();
        let mut put_back = Vec::new();
        for msg in records {
            self.apply_input(cx, msg, &mut deltas)?;
        }
        let reports = match self.parts.get_mut(&cx.partition) {
            Some(part) => std::mem::take(&mut part.reports),
            None => Vec::new(),
        };
        for r in &reports {
            self.apply_report(cx, r, &mut deltas, &mut put_back)?;
        }
        let due: Vec<(Vec<u8>, bool)> = cx
            .state
            .writes(Cf::Due)
            .map(|(k, v)| (k.to_vec(), v.is_some()))
            .collect();
        if !due.is_empty() || !put_back.is_empty() || !deltas.is_empty() {
            cx.event(Done::Partition {
                partition: cx.partition,
                due,
                put_back,
                deltas,
            });
        }
        Ok(())
    }

    /// Forgets finished deliveries past their retention, at most once a second.
    fn tick(&mut self, cx: &mut Cx<'_, '_, Cf, Done>) -> Result<(), RuntimeError> {
        let Some(part) = self.parts.get(&cx.partition) else {
            return Ok(());
        };
        let forget_before = cx.now_ms.saturating_sub(self.rules.finished_retention_ms);
        for id in schedule::expired(&part.store, forget_before, EXPIRY_BATCH)? {
            // Still finished: a re-delivery may have revived it meanwhile.
            if let Some(job) = schedule::load(cx.state, &id)?.filter(|j| !j.is_pending()) {
                schedule::write(cx.state, Some(&job), None);
                cx.event(Done::Event(Event::Expired));
            }
        }
        Ok(())
    }

    fn timers_ready(&self, _partition: i32, _view: &s2s_state::runtime::View<'_>) -> bool {
        self.swept_at.elapsed() >= HOUSEKEEPING
    }

    fn committed(&mut self, done: Vec<Done>) {
        let mut counted = Vec::new();
        for d in done {
            match d {
                Done::Event(e) => counted.push(e),
                Done::Partition {
                    partition,
                    due,
                    put_back,
                    deltas,
                } => {
                    let Some(part) = self.parts.get_mut(&partition) else {
                        continue;
                    };
                    for (key, put) in due {
                        if let Some((endpoint, _, _)) = schedule::parse_queue_key(&key) {
                            part.queues
                                .entry(endpoint.to_string())
                                .or_insert_with(|| Queue::new(endpoint))
                                .on_commit(&key, put);
                        }
                    }
                    for key in put_back {
                        if let Some(q) = queue_of(part, &key) {
                            q.put_back(key);
                        }
                    }
                    for (endpoint, delta) in deltas {
                        *part.pending.entry(endpoint).or_insert(0) += delta;
                    }
                }
            }
        }
        events::count(&self.metrics, counted);
    }

    fn after_cycle(&mut self) -> Result<(), RuntimeError> {
        self.refresh();
        if self.swept_at.elapsed() >= HOUSEKEEPING {
            self.swept_at = Instant::now();
        }
        self.dispatch(None)
    }

    fn wake_source(&mut self) -> Option<mpsc::UnboundedReceiver<Report>> {
        self.dispatcher.reports()
    }

    /// A report came back: its slot is free; it feeds the circuit and waits for the next
    /// cycle if its partition is still owned as it was. Then the endpoint's next due
    /// deliveries start, unless the service is stopping.
    fn on_wake(&mut self, r: Report, draining: bool) -> Result<(), RuntimeError> {
        self.dispatcher.on_report(&r);
        let endpoint = self.dispatcher.index(&r.endpoint);
        match self.parts.get_mut(&r.partition) {
            Some(part) if part.generation == r.generation => {
                if r.result.is_none() {
                    tracing::error!(delivery_id = %r.delivery_id, endpoint = %r.endpoint,
                        "attempt panicked; the delivery stays due");
                    self.metrics
                        .attempts_lost
                        .with_label_values(&[self.metrics.endpoint_label(&r.endpoint)])
                        .inc();
                    if let Some(q) = queue_of(part, &r.key) {
                        q.put_back(r.key);
                    }
                } else {
                    part.reports.push(r);
                }
            }
            _ => tracing::debug!(partition = r.partition, delivery_id = %r.delivery_id,
                "report of a partition no longer owned as it was; its new owner attempts again"),
        }
        if draining {
            return Ok(());
        }
        self.dispatch(endpoint)
    }

    fn backlog(&self) -> usize {
        self.parts.values().map(|p| p.reports.len()).sum()
    }

    fn in_flight(&self) -> usize {
        self.dispatcher.in_flight_total()
    }

    fn shutdown_grace(&self) -> Duration {
        self.rules.shutdown_grace
    }

    fn idle_wait(&self) -> Option<Duration> {
        Some(self.next_due_in())
    }

    fn gauges(&self) {
        let m = &self.metrics;
        let now = s2s_common::now_ms();
        // By label: a file postback's own, or `catalog` for all of the catalog's (their
        // pending deliveries add up, the oldest is the oldest of them all).
        let mut pending: BTreeMap<&str, i64> = BTreeMap::new();
        let mut oldest: BTreeMap<&str, i64> = BTreeMap::new();
        for part in self.parts.values() {
            for (ep, n) in &part.pending {
                let label = m.endpoint_label(ep);
                *pending.entry(label).or_insert(0) += n;
                if *n > 0 {
                    if let Ok(Some(created)) = schedule::oldest_pending(&part.store, ep) {
                        let o = oldest.entry(label).or_insert(created);
                        *o = (*o).min(created);
                    }
                }
            }
        }
        let mut labels: BTreeSet<&str> = pending.keys().copied().collect();
        labels.extend(self.labels.iter().map(String::as_str));
        for label in labels {
            m.pending
                .with_label_values(&[label])
                .set(pending.get(label).copied().unwrap_or(0));
            m.oldest_pending_seconds
                .with_label_values(&[label])
                .set(oldest.get(label).map_or(0, |c| (now - c).max(0) / 1000));
        }
        self.dispatcher.gauges();
    }
}

/// Schedules the delivery of `c` to `endpoint` unless it exists in any state; whether it
/// was scheduled.
fn schedule_new(
    cx: &mut Cx<'_, '_, Cf, Done>,
    endpoint: &str,
    c: &Conversion,
    deltas: &mut PendingDeltas,
) -> Result<bool, RuntimeError> {
    let id = c.delivery_id(endpoint);
    if schedule::load(cx.state, &id)?.is_some() {
        return Ok(false);
    }
    let job = Job::new(id, endpoint.to_string(), c.clone(), cx.now_ms);
    *deltas.entry(endpoint.to_string()).or_insert(0) += schedule::write(cx.state, None, Some(&job));
    cx.event(Done::Event(Event::Scheduled(endpoint.to_string())));
    Ok(true)
}

/// Counters of every endpoint start at 0, so that rate() sees the first event and
/// dashboards show a zero rather than no data.
/// Returns the endpoints' labels.
fn zero_counters(metrics: &Metrics, endpoints: &[Arc<Endpoint>]) -> Vec<String> {
    let labels: BTreeSet<&str> = endpoints
        .iter()
        .map(|ep| metrics.endpoint_label(&ep.name))
        .collect();
    for label in &labels {
        let label = *label;
        for counter in [&metrics.scheduled, &metrics.duplicates, &metrics.retries] {
            counter.with_label_values(&[label]);
        }
        for reason in DeadLetterReason::ALL {
            metrics
                .dead_lettered
                .with_label_values(&[label, reason.as_str()]);
        }
    }
    labels.into_iter().map(str::to_string).collect()
}
