//! The delivery loop. One task owns the partitions' stores and runs cycles; HTTP attempts
//! run as their own tasks and report back over a channel, so no endpoint — slow, failing
//! or dead — ever holds up another or the input.
//!
//! A cycle:
//! 1. gathers input (conversions, operator commands) and attempt reports for up to
//!    `commit_interval_ms` (or `max_batch` of them); reports free their request slot and
//!    trigger dispatch at once;
//! 2. per partition, against a staged overlay of its store: schedules each new delivery
//!    (conversion version × matching endpoint) unless its ID is known (a replay upstream:
//!    counted as a duplicate, not sent twice); applies commands; settles each attempt
//!    (delivered, retry at a due time, or dead-lettered); forgets finished deliveries past
//!    `finished_retention`;
//! 3. publishes the delivery-log records (every attempt), dead letters and poison records,
//!    and waits for their acknowledgement; then the changed jobs to the changelog, and
//!    waits again;
//! 4. writes the staged state with the input offsets and the changelog position in one
//!    atomic RocksDB batch; commits the offsets to the group (for monitoring; an owner
//!    starts at the offsets in its store).
//!
//! Dispatch takes due jobs from each endpoint's queue ([`crate::schedule::Queue`]) while
//! the endpoint and the instance have request slots, through the endpoint's circuit
//! breaker, only from committed state: a delivery is attempted only once it is durably
//! scheduled, and stays due in the store until its attempt's result is committed.
//!
//! Hence: an input offset is committed only when its deliveries are durably scheduled (or
//! done); a crash re-sends at most the attempts in flight or not yet committed, with the
//! same `webhook-id` — at-least-once towards HTTP endpoints, deduplicable by that ID. The
//! delivery log may then show such an attempt twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use s2s_common::contract::{
    self, AttemptOutcome, CommandAction, Conversion, DeadLetter, DeadLetterReason, DeliveryAttempt,
    DeliveryCommand, SCHEMA_VERSION,
};
use s2s_common::kafka::{produce_all, OutRecord};
use s2s_common::topics::partition_key;
use s2s_state::Positions;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::circuit::{Admit, Circuit, State};
use crate::endpoint::{classify, delivery_id, status_class, Endpoint};
use crate::job::{dead_letter_reason, Attempted, Job, Next};
use crate::schedule::{self, Cf, PendingDeltas, Queue, Stage, Store};
use crate::sender::{Failure, Sent};
use crate::{Delivery, DeliveryError};

/// Finished deliveries forgotten per partition and sweep, to keep cycles short.
const EXPIRY_BATCH: usize = 1_000;
/// How often gauges are refreshed and expired deliveries swept.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// The longest an idle worker sleeps before looking at its queues again.
const IDLE_TICK: Duration = Duration::from_millis(250);

/// The result of one attempt, made or not.
#[derive(Debug)]
struct Report {
    partition: i32,
    generation: u64,
    /// The due key the attempt was taken from.
    key: Vec<u8>,
    delivery_id: String,
    endpoint: String,
    attempt: u32,
    probe: bool,
    url: String,
    sent: Sent,
    at_ms: i64,
}

/// What the worker holds for one owned partition.
struct Part {
    store: Arc<Store>,
    /// Distinguishes this ownership of the partition from an earlier one, whose reports
    /// are void.
    generation: u64,
    /// Per input topic: the offset after the last record taken in.
    next: Positions,
    buffer: Vec<OwnedMessage>,
    reports: Vec<Report>,
    queues: BTreeMap<String, Queue>,
    /// Pending deliveries per endpoint.
    pending: BTreeMap<String, i64>,
}

/// Something to count and log once the cycle that caused it is committed.
enum Event {
    Consumed(&'static str),
    Scheduled(String),
    Duplicate(String),
    Attempt {
        endpoint: String,
        outcome: AttemptOutcome,
        class: &'static str,
        latency: Option<Duration>,
    },
    Retry(String),
    Delivered {
        attributed_at_ms: i64,
        at_ms: i64,
    },
    DeadLettered(Box<DeadLetter>),
    Command {
        command: Box<DeliveryCommand>,
        result: &'static str,
    },
    Poison {
        kind: &'static str,
        topic: String,
        partition: i32,
        offset: i64,
        reason: String,
    },
    Expired,
}

pub(crate) struct Worker<'a> {
    d: &'a Delivery,
    by_name: HashMap<&'a str, usize>,
    circuits: Vec<Circuit>,
    in_flight: Vec<usize>,
    in_flight_total: usize,
    parts: BTreeMap<i32, Part>,
    incoming: Vec<OwnedMessage>,
    generation: u64,
    /// Turns the partition dispatch starts at.
    round: usize,
    tx: mpsc::UnboundedSender<Report>,
    rx: mpsc::UnboundedReceiver<Report>,
    housekeeping_at: Instant,
    swept_at: Instant,
    /// Set by a failure inside dispatch (a store read), which must stop the service.
    failure: Option<DeliveryError>,
}

enum Gathered {
    Stop,
    Report(Report),
    Message(OwnedMessage),
    Tick,
}

impl<'a> Worker<'a> {
    pub(crate) fn new(d: &'a Delivery) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let circuit = d.config.circuit();
        Worker {
            by_name: d
                .endpoints
                .iter()
                .enumerate()
                .map(|(i, e)| (e.name.as_str(), i))
                .collect(),
            circuits: d.endpoints.iter().map(|_| Circuit::new(circuit)).collect(),
            in_flight: vec![0; d.endpoints.len()],
            in_flight_total: 0,
            parts: BTreeMap::new(),
            incoming: Vec::new(),
            generation: 0,
            round: 0,
            tx,
            rx,
            housekeeping_at: Instant::now(),
            swept_at: Instant::now(),
            failure: None,
            d,
        }
    }

    pub(crate) async fn run(&mut self, shutdown: &CancellationToken) -> Result<(), DeliveryError> {
        let m = &self.d.metrics;
        for ep in self.d.endpoints.iter() {
            set_circuit_gauge(m, &ep.name, State::Closed);
            // Counters of every configured endpoint start at 0, so that rate() sees the
            // first event and dashboards show a zero rather than no data.
            for counter in [&m.scheduled, &m.duplicates, &m.retries] {
                counter.with_label_values(&[&ep.name]);
            }
            for reason in DeadLetterReason::ALL {
                m.dead_lettered
                    .with_label_values(&[&ep.name, reason.as_str()]);
            }
        }
        for kind in ["conversion", "command"] {
            m.consumed.with_label_values(&[kind]);
            m.poison.with_label_values(&[kind]);
        }
        loop {
            let stopping = self.gather(shutdown).await;
            if let Some(failure) = self.d.ownership.failure() {
                return Err(DeliveryError::Ownership(failure));
            }
            if let Some(e) = self.failure.take() {
                return Err(e);
            }
            if stopping {
                return self.drain().await;
            }
            self.take_in()?;
            let started = Instant::now();
            if self.cycle().await? {
                self.d
                    .metrics
                    .cycle_seconds
                    .observe(started.elapsed().as_secs_f64());
            }
            self.dispatch(None);
            self.refresh_gauges();
        }
    }

    /// At shutdown: no new attempts; waits up to `shutdown_grace_ms` for those in flight,
    /// then commits what came back. Attempts still out are made again after a restart.
    async fn drain(&mut self) -> Result<(), DeliveryError> {
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.d.config.shutdown_grace_ms);
        while self.in_flight_total > 0 {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(r)) => self.on_report(r),
                Ok(None) | Err(_) => break,
            }
        }
        if self.in_flight_total > 0 {
            tracing::warn!(
                in_flight = self.in_flight_total,
                "requests still in flight at shutdown; they are sent again after a restart"
            );
        }
        self.take_in()?;
        self.cycle().await?;
        Ok(())
    }

    /// Collects input and reports until the batch is full, `commit_interval_ms` after the
    /// first of them, or an idle tick; returns whether shutdown was asked for.
    async fn gather(&mut self, shutdown: &CancellationToken) -> bool {
        let interval = Duration::from_millis(self.d.config.commit_interval_ms);
        let idle = tokio::time::Instant::now() + self.idle_wait();
        let mut work_since: Option<tokio::time::Instant> =
            self.has_work().then(tokio::time::Instant::now);
        loop {
            if self.batch_len() >= self.d.config.max_batch {
                return false;
            }
            let deadline = work_since.map_or(idle, |t| t + interval);
            let got = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Gathered::Stop,
                Some(r) = self.rx.recv() => Gathered::Report(r),
                m = self.d.consumer.recv() => match m {
                    Ok(m) => Gathered::Message(m.detach()),
                    Err(e) => {
                        tracing::warn!(error = %e, "consumer error");
                        Gathered::Tick
                    }
                },
                _ = tokio::time::sleep_until(deadline) => Gathered::Tick,
            };
            match got {
                Gathered::Stop => return true,
                Gathered::Tick => return false,
                Gathered::Message(m) => self.incoming.push(m),
                Gathered::Report(r) => {
                    let endpoint = self.by_name.get(r.endpoint.as_str()).copied();
                    self.on_report(r);
                    self.dispatch(endpoint);
                }
            }
            if work_since.is_none() && self.has_work() {
                work_since = Some(tokio::time::Instant::now());
            }
        }
    }

    fn batch_len(&self) -> usize {
        self.incoming.len() + self.parts.values().map(|p| p.reports.len()).sum::<usize>()
    }

    fn has_work(&self) -> bool {
        self.batch_len() > 0
    }

    /// Until the earliest due job of an endpoint with a free request slot, at most
    /// [`IDLE_TICK`].
    fn idle_wait(&self) -> Duration {
        if self.in_flight_total >= self.d.config.max_in_flight {
            // Every slot is taken: a report frees one and wakes the worker.
            return IDLE_TICK;
        }
        let now = s2s_common::now_ms();
        let earliest = self
            .parts
            .values()
            .flat_map(|p| p.queues.iter())
            .filter(|(name, _)| match self.by_name.get(name.as_str()) {
                Some(i) => self.in_flight[*i] < self.d.endpoints[*i].max_in_flight,
                None => true,
            })
            .filter_map(|(_, q)| q.next_due())
            .min();
        match earliest {
            Some(due) => Duration::from_millis(u64::try_from(due.saturating_sub(now)).unwrap_or(0))
                .min(IDLE_TICK),
            None => IDLE_TICK,
        }
    }

    /// A report came back: frees its slot, feeds the circuit, and queues it for the next
    /// cycle if its partition is still owned as it was.
    fn on_report(&mut self, r: Report) {
        if let Some(&i) = self.by_name.get(r.endpoint.as_str()) {
            self.in_flight[i] = self.in_flight[i].saturating_sub(1);
            self.in_flight_total = self.in_flight_total.saturating_sub(1);
            let healthy = match (r.sent.status, r.sent.failure) {
                (Some(s), _) => Some(classify(Some(s)) != AttemptOutcome::Retryable),
                (None, Some(f)) if f.retryable() => Some(false),
                _ => None,
            };
            if let Some(healthy) = healthy {
                let before = self.circuits[i].state();
                self.circuits[i].record(Instant::now(), r.probe, healthy);
                circuit_moved(self.d, i, before, self.circuits[i].state());
            }
        }
        match self.parts.get_mut(&r.partition) {
            Some(part) if part.generation == r.generation => part.reports.push(r),
            _ => tracing::debug!(partition = r.partition, delivery_id = %r.delivery_id,
                "report of a partition no longer owned as it was; its new owner attempts again"),
        }
    }

    /// Brings the partitions in line with the assignment and buffers the new records:
    /// records of partitions not owned are dropped (their new owner reads them), records
    /// at offsets already reflected by the store are skipped.
    fn take_in(&mut self) -> Result<(), DeliveryError> {
        let assigned = self.d.ownership.assigned();
        self.parts
            .retain(|p, _| assigned.iter().any(|(a, _)| a == p));
        for (p, store) in assigned {
            if self.parts.contains_key(&p) {
                continue;
            }
            let part = self.open_part(store)?;
            self.parts.insert(p, part);
        }
        for msg in std::mem::take(&mut self.incoming) {
            let Some(part) = self.parts.get_mut(&msg.partition()) else {
                continue;
            };
            if part.next.admit(msg.topic(), msg.offset()) {
                part.buffer.push(msg);
            }
        }
        Ok(())
    }

    fn open_part(&mut self, store: Arc<Store>) -> Result<Part, DeliveryError> {
        self.generation += 1;
        let topics = &self.d.config.topics;
        let next = Positions::load(
            &store,
            &[&topics.conversions.name, &topics.delivery_commands.name],
        )?;
        let mut names: Vec<String> = self.d.endpoints.iter().map(|e| e.name.clone()).collect();
        for name in schedule::endpoints_with_pending(&store)? {
            if !names.contains(&name) {
                tracing::warn!(endpoint = %name, "pending deliveries for an endpoint that is no longer configured; they will be dead-lettered");
                names.push(name);
            }
        }
        let mut queues = BTreeMap::new();
        let mut pending = BTreeMap::new();
        for name in names {
            let (count, _) = schedule::pending_of(&store, &name)?;
            pending.insert(name.clone(), count);
            queues.insert(name.clone(), Queue::new(&name));
        }
        Ok(Part {
            store,
            generation: self.generation,
            next,
            buffer: Vec::new(),
            reports: Vec::new(),
            queues,
            pending,
        })
    }

    /// Takes due jobs and starts their attempts, while slots last; `only` limits it to one
    /// endpoint (the one whose slot was just freed).
    fn dispatch(&mut self, only: Option<usize>) {
        if self.failure.is_some() {
            return;
        }
        let d: &'a Delivery = self.d;
        let now_ms = s2s_common::now_ms();
        let now = Instant::now();
        let mut partitions: Vec<i32> = self.parts.keys().copied().collect();
        if partitions.is_empty() {
            return;
        }
        // Start at another partition each time, so that free slots go round them all.
        self.round = self.round.wrapping_add(1);
        let start = self.round % partitions.len();
        partitions.rotate_left(start);
        for p in partitions {
            let names: Vec<String> = match (only, self.parts.get(&p)) {
                (_, None) => continue,
                (Some(i), Some(_)) => vec![d.endpoints[i].name.clone()],
                (None, Some(part)) => part.queues.keys().cloned().collect(),
            };
            for name in names {
                let idx = self.by_name.get(name.as_str()).copied();
                let room = match idx {
                    Some(i) => (d.endpoints[i]
                        .max_in_flight
                        .saturating_sub(self.in_flight[i]))
                    .min(d.config.max_in_flight.saturating_sub(self.in_flight_total)),
                    // Not sent anywhere: dead-lettered in the next cycle.
                    None => EXPIRY_BATCH,
                };
                if room == 0 {
                    continue;
                }
                if let Err(e) = self.dispatch_queue(p, &name, idx, room, now_ms, now) {
                    self.failure = Some(e);
                    return;
                }
            }
        }
    }

    fn dispatch_queue(
        &mut self,
        p: i32,
        name: &str,
        idx: Option<usize>,
        room: usize,
        now_ms: i64,
        now: Instant,
    ) -> Result<(), DeliveryError> {
        let Some(part) = self.parts.get_mut(&p) else {
            return Ok(());
        };
        let Some(queue) = part.queues.get_mut(name) else {
            return Ok(());
        };
        let keys = queue.take(&part.store, now_ms, room)?;
        let generation = part.generation;
        for key in keys {
            let Some((_, _, id)) = schedule::parse_queue_key(&key) else {
                continue;
            };
            let job = match schedule::load_committed(&part.store, id)? {
                Some(j) if j.is_pending() && schedule::due_key(&j) == key => j,
                // The index is written with its job in one batch, so this does not happen;
                // if it did, the key is simply not attempted.
                _ => {
                    tracing::error!(
                        partition = p,
                        delivery_id = id,
                        "due entry without a pending job; skipped"
                    );
                    continue;
                }
            };
            let report = |sent: Sent, url: String| Report {
                partition: p,
                generation,
                key: key.clone(),
                delivery_id: job.delivery_id.clone(),
                endpoint: job.endpoint.clone(),
                attempt: job.next_attempt(),
                probe: false,
                url,
                sent,
                at_ms: now_ms,
            };
            let Some(i) = idx else {
                part.reports.push(report(
                    Sent::not_sent(
                        Failure::Unconfigured,
                        format!("no postback named '{name}' is configured"),
                    ),
                    String::new(),
                ));
                continue;
            };
            let ep: &Endpoint = &self.d.endpoints[i];
            let before = self.circuits[i].state();
            let admit = self.circuits[i].admit(now);
            circuit_moved(self.d, i, before, self.circuits[i].state());
            let request = ep.request(&job.conversion, &job.delivery_id, now_ms / 1000);
            if admit == Admit::Reject {
                part.reports.push(report(
                    Sent::not_sent(
                        Failure::CircuitOpen,
                        "not sent: the endpoint's circuit is open".into(),
                    ),
                    request.url,
                ));
                continue;
            }
            let mut r = report(
                Sent::not_sent(Failure::Network, String::new()),
                String::new(),
            );
            r.probe = admit == Admit::Probe;
            self.in_flight[i] += 1;
            self.in_flight_total += 1;
            let (sender, tx, timeout) = (self.d.sender.clone(), self.tx.clone(), ep.timeout);
            tokio::spawn(async move {
                r.sent = sender.send(&request, timeout).await;
                r.url = request.url;
                r.at_ms = s2s_common::now_ms();
                // The worker is gone only when the service stops; the attempt is made
                // again after the restart.
                let _ = tx.send(r);
            });
        }
        Ok(())
    }

    /// One cycle over the buffered input and reports; `false` when there was nothing to do.
    async fn cycle(&mut self) -> Result<bool, DeliveryError> {
        let now = s2s_common::now_ms();
        let mut events = Vec::new();
        let mut outputs: Vec<OutRecord<'_>> = Vec::new();
        let mut work = Vec::new();
        let sweep = self.swept_at.elapsed() >= HOUSEKEEPING;
        if sweep {
            self.swept_at = Instant::now();
        }
        let forget_before = now.saturating_sub(self.d.config.finished_retention_ms());
        for (p, part) in &mut self.parts {
            let expired = if sweep {
                schedule::expired(&part.store, forget_before, EXPIRY_BATCH)?
            } else {
                Vec::new()
            };
            if part.buffer.is_empty() && part.reports.is_empty() && expired.is_empty() {
                continue;
            }
            work.push((
                *p,
                Arc::clone(&part.store),
                std::mem::take(&mut part.buffer),
                std::mem::take(&mut part.reports),
                expired,
            ));
        }
        if work.is_empty() {
            return Ok(false);
        }
        let d = self.d;
        let mut staged: Vec<(i32, Stage<'_>, PendingDeltas, Vec<Vec<u8>>)> = Vec::new();
        for (p, store, records, reports, expired) in &work {
            let mut st = store.stage();
            let mut deltas = PendingDeltas::new();
            let mut put_back = Vec::new();
            for msg in records {
                self.apply_input(&mut st, msg, now, &mut deltas, &mut outputs, &mut events)?;
            }
            for r in reports {
                self.settle(
                    &mut st,
                    r,
                    now,
                    &mut deltas,
                    &mut outputs,
                    &mut events,
                    &mut put_back,
                )?;
            }
            for id in expired {
                // Still finished: a re-delivery may have revived it meanwhile.
                if let Some(job) = schedule::load(&st, id)?.filter(|j| !j.is_pending()) {
                    schedule::write(&mut st, Some(&job), None);
                    events.push(Event::Expired);
                }
            }
            let mut ends: BTreeMap<&str, i64> = BTreeMap::new();
            for m in records {
                let e = ends.entry(m.topic()).or_insert(0);
                *e = (*e).max(m.offset() + 1);
            }
            for (topic, next) in ends {
                st.set_offset(topic, next);
            }
            staged.push((*p, st, deltas, put_back));
        }
        self.publish(&outputs).await?;
        let changelog = &d.config.topics.delivery_changelog.name;
        let changes: Vec<OutRecord<'_>> = staged
            .iter()
            .flat_map(|(p, st, _, _)| {
                st.changelog().map(move |(key, value)| OutRecord {
                    topic: changelog,
                    partition: Some(*p),
                    key,
                    payload: value.map(<[u8]>::to_vec),
                    headers: None,
                })
            })
            .collect();
        let mut logged: BTreeMap<i32, i64> = BTreeMap::new();
        for dl in self.publish(&changes).await? {
            let next = logged.entry(dl.partition).or_insert(0);
            *next = (*next).max(dl.offset + 1);
        }
        let mut offsets = TopicPartitionList::new();
        for (p, st, deltas, put_back) in staged {
            let due: Vec<(Vec<u8>, bool)> = st
                .writes(Cf::Due)
                .map(|(k, v)| (k.to_vec(), v.is_some()))
                .collect();
            let position = logged.get(&p).map(|n| (changelog.as_str(), *n));
            let Some((_, store, records, ..)) = work.iter().find(|(wp, ..)| *wp == p) else {
                continue;
            };
            store.commit(st, position)?;
            for topic in [
                &d.config.topics.conversions.name,
                &d.config.topics.delivery_commands.name,
            ] {
                if records.iter().any(|m| m.topic() == topic.as_str()) {
                    if let Some(next) = store.offset(topic)? {
                        offsets.add_partition_offset(topic, p, Offset::Offset(next))?;
                    }
                }
            }
            if let Some(part) = self.parts.get_mut(&p) {
                for (key, put) in due {
                    if let Some((endpoint, _, _)) = schedule::parse_queue_key(&key) {
                        let queue = part
                            .queues
                            .entry(endpoint.to_string())
                            .or_insert_with(|| Queue::new(endpoint));
                        queue.on_commit(&key, put);
                    }
                }
                for key in put_back {
                    if let Some((endpoint, _, _)) = schedule::parse_queue_key(&key) {
                        if let Some(q) = part.queues.get_mut(endpoint) {
                            q.put_back(key);
                        }
                    }
                }
                for (endpoint, delta) in deltas {
                    *part.pending.entry(endpoint).or_insert(0) += delta;
                }
            }
        }
        if offsets.count() > 0 {
            if let Err(e) = d.consumer.commit(&offsets, CommitMode::Async) {
                tracing::warn!(error = %e, "offset commit to the group failed; the stores hold the offsets");
            }
        }
        self.count(events);
        Ok(true)
    }

    /// Applies one input record: a conversion schedules its deliveries, a command is
    /// carried out, anything undecodable goes to the poison topic.
    fn apply_input<'o>(
        &self,
        st: &mut Stage<'_>,
        msg: &OwnedMessage,
        now: i64,
        deltas: &mut PendingDeltas,
        outputs: &mut Vec<OutRecord<'o>>,
        events: &mut Vec<Event>,
    ) -> Result<(), DeliveryError>
    where
        'a: 'o,
    {
        let d: &'a Delivery = self.d;
        let topics = &d.config.topics;
        let payload = msg.payload().unwrap_or_default();
        let (kind, decoded) = if msg.topic() == topics.conversions.name {
            (
                "conversion",
                contract::decode::<Conversion>(payload).map(|c| Input::Conversion(Box::new(c))),
            )
        } else {
            (
                "command",
                contract::decode::<DeliveryCommand>(payload).map(|c| Input::Command(Box::new(c))),
            )
        };
        events.push(Event::Consumed(kind));
        match decoded {
            Err(e) => {
                let reason = e.to_string();
                outputs.push(OutRecord::poison(&topics.poison.name, msg, &reason));
                events.push(Event::Poison {
                    kind,
                    topic: msg.topic().to_string(),
                    partition: msg.partition(),
                    offset: msg.offset(),
                    reason,
                });
            }
            Ok(Input::Conversion(c)) => {
                for ep in self.d.endpoints.iter().filter(|e| e.filter.wants(&c)) {
                    let id = delivery_id(&c, &ep.name);
                    if schedule::load(st, &id)?.is_some() {
                        events.push(Event::Duplicate(ep.name.clone()));
                        continue;
                    }
                    let job = Job::new(id, ep.name.clone(), (*c).clone(), now);
                    *deltas.entry(ep.name.clone()).or_insert(0) +=
                        schedule::write(st, None, Some(&job));
                    events.push(Event::Scheduled(ep.name.clone()));
                }
            }
            Ok(Input::Command(cmd)) => {
                let result = match cmd.action {
                    CommandAction::Redeliver
                        if !self.by_name.contains_key(cmd.endpoint.as_str()) =>
                    {
                        "unknown_endpoint"
                    }
                    CommandAction::Redeliver => {
                        let id = delivery_id(&cmd.conversion, &cmd.endpoint);
                        let (old, new, result) = match schedule::load(st, &id)? {
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
                                schedule::write(st, old.as_ref(), Some(&new));
                        }
                        result
                    }
                };
                events.push(Event::Command {
                    command: cmd,
                    result,
                });
            }
        }
        Ok(())
    }

    /// Settles one attempt: the job's next state, its delivery-log record and, at the end
    /// of its attempts, its dead letter. A report that no longer matches the job (the job
    /// moved on meanwhile) is void.
    #[allow(clippy::too_many_arguments)]
    fn settle<'o>(
        &self,
        st: &mut Stage<'_>,
        r: &Report,
        now: i64,
        deltas: &mut PendingDeltas,
        outputs: &mut Vec<OutRecord<'o>>,
        events: &mut Vec<Event>,
        put_back: &mut Vec<Vec<u8>>,
    ) -> Result<(), DeliveryError>
    where
        'a: 'o,
    {
        let d: &'a Delivery = self.d;
        let topics = &d.config.topics;
        let old = match schedule::load(st, &r.delivery_id)? {
            Some(j) if j.is_pending() && j.next_attempt() == r.attempt => j,
            other => {
                if let Some(j) = other.filter(|j| j.is_pending() && schedule::due_key(j) == r.key) {
                    put_back.push(schedule::due_key(&j));
                }
                tracing::debug!(delivery_id = %r.delivery_id, attempt = r.attempt, "void attempt report: the delivery moved on");
                return Ok(());
            }
        };
        let outcome = match (r.sent.status, r.sent.failure) {
            (Some(s), _) => classify(Some(s)),
            (None, Some(f)) if !f.retryable() => AttemptOutcome::Permanent,
            _ => AttemptOutcome::Retryable,
        };
        let class = match (r.sent.status, r.sent.failure) {
            (Some(s), _) => status_class(s),
            (None, Some(f)) => f.label(),
            (None, None) => "network_error",
        };
        let mut job = old.clone();
        let next = job.settle(
            &Attempted {
                outcome,
                status: r.sent.status,
                error: r.sent.error.clone(),
                retry_after: r.sent.retry_after,
            },
            &self.d.policy,
            now,
            fastrand::f64(),
        );
        *deltas.entry(job.endpoint.clone()).or_insert(0) +=
            schedule::write(st, Some(&old), Some(&job));
        let c = &job.conversion;
        let attempt = DeliveryAttempt {
            schema_version: SCHEMA_VERSION,
            delivery_id: job.delivery_id.clone(),
            conversion_id: c.conversion_id.clone(),
            conversion_version: c.version,
            click_id: c.click_id.clone(),
            endpoint: job.endpoint.clone(),
            attempt: r.attempt,
            url: r.url.clone(),
            status_code: r.sent.status,
            latency_ms: u64::try_from(r.sent.latency.as_millis()).unwrap_or(u64::MAX),
            outcome,
            error: r.sent.error.clone(),
            ts_ms: r.at_ms,
            next_attempt_at_ms: match next {
                Next::Retry { due_ms } => Some(due_ms),
                _ => None,
            },
        };
        outputs.push(OutRecord::keyed(
            &topics.delivery_log.name,
            partition_key(&c.click_id),
            contract::encode(&attempt),
        ));
        let sent = !matches!(
            r.sent.failure,
            Some(Failure::CircuitOpen | Failure::Unconfigured | Failure::InvalidRequest)
        );
        events.push(Event::Attempt {
            endpoint: job.endpoint.clone(),
            outcome,
            class,
            latency: sent.then_some(r.sent.latency),
        });
        match next {
            Next::Delivered => events.push(Event::Delivered {
                attributed_at_ms: c.attributed_at_ms,
                at_ms: r.at_ms,
            }),
            Next::Retry { .. } => events.push(Event::Retry(job.endpoint.clone())),
            Next::DeadLettered => {
                let dl = DeadLetter {
                    schema_version: SCHEMA_VERSION,
                    delivery_id: job.delivery_id.clone(),
                    endpoint: job.endpoint.clone(),
                    conversion: c.clone(),
                    reason: dead_letter_reason(
                        outcome,
                        r.sent.failure == Some(Failure::Unconfigured),
                    ),
                    attempts: job.attempts,
                    last_status: r.sent.status,
                    last_error: r.sent.error.clone(),
                    dead_lettered_at_ms: now,
                };
                outputs.push(OutRecord::keyed(
                    &topics.dead_letter.name,
                    partition_key(&c.click_id),
                    contract::encode(&dl),
                ));
                events.push(Event::DeadLettered(Box::new(dl)));
            }
        }
        Ok(())
    }

    async fn publish(
        &self,
        records: &[OutRecord<'_>],
    ) -> Result<Vec<rdkafka::producer::future_producer::Delivery>, DeliveryError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        produce_all(&self.d.producer, records)
            .await
            .map_err(|e| DeliveryError::Publish(e.to_string()))
    }

    /// Counts and logs what a committed cycle did: each event in this one place.
    fn count(&self, events: Vec<Event>) {
        let m = &self.d.metrics;
        for e in events {
            match e {
                Event::Consumed(kind) => m.consumed.with_label_values(&[kind]).inc(),
                Event::Scheduled(ep) => m.scheduled.with_label_values(&[&ep]).inc(),
                Event::Duplicate(ep) => {
                    tracing::debug!(endpoint = %ep, "conversion already delivered or scheduled; not sent twice");
                    m.duplicates.with_label_values(&[&ep]).inc();
                }
                Event::Attempt {
                    endpoint,
                    outcome,
                    class,
                    latency,
                } => {
                    m.attempts
                        .with_label_values(&[&endpoint, outcome.as_str(), class])
                        .inc();
                    if let Some(l) = latency {
                        m.attempt_seconds
                            .with_label_values(&[&endpoint])
                            .observe(l.as_secs_f64());
                    }
                }
                Event::Retry(ep) => m.retries.with_label_values(&[&ep]).inc(),
                Event::Delivered {
                    attributed_at_ms,
                    at_ms,
                } => m
                    .end_to_end_seconds
                    .observe((at_ms - attributed_at_ms).max(0) as f64 / 1000.0),
                Event::DeadLettered(dl) => {
                    tracing::warn!(endpoint = %dl.endpoint, delivery_id = %dl.delivery_id,
                        conversion_id = %dl.conversion.conversion_id, attempts = dl.attempts,
                        last_status = ?dl.last_status, last_error = ?dl.last_error,
                        reason = dl.reason.as_str(), "delivery dead-lettered");
                    m.dead_lettered
                        .with_label_values(&[&dl.endpoint, dl.reason.as_str()])
                        .inc();
                }
                Event::Command { command, result } => {
                    tracing::info!(command_id = %command.command_id, action = command.action.as_str(),
                        endpoint = %command.endpoint, conversion_id = %command.conversion.conversion_id,
                        requested_by = %command.requested_by, result, "operator command applied");
                    m.commands
                        .with_label_values(&[command.action.as_str(), result])
                        .inc();
                }
                Event::Poison {
                    kind,
                    topic,
                    partition,
                    offset,
                    reason,
                } => {
                    tracing::warn!(%topic, partition, offset, %reason, "undecodable input record set aside on the poison topic");
                    m.poison.with_label_values(&[kind]).inc();
                }
                Event::Expired => m.expired.inc(),
            }
        }
    }

    /// Refreshes the gauges, at most once a second.
    fn refresh_gauges(&mut self) {
        if self.housekeeping_at.elapsed() < HOUSEKEEPING {
            return;
        }
        self.housekeeping_at = Instant::now();
        let m = &self.d.metrics;
        let now = s2s_common::now_ms();
        let mut pending: BTreeMap<&str, i64> = BTreeMap::new();
        let mut oldest: BTreeMap<&str, i64> = BTreeMap::new();
        for part in self.parts.values() {
            for (ep, n) in &part.pending {
                *pending.entry(ep).or_insert(0) += n;
                if *n > 0 {
                    if let Ok(Some(created)) = schedule::oldest_pending(&part.store, ep) {
                        let o = oldest.entry(ep).or_insert(created);
                        *o = (*o).min(created);
                    }
                }
            }
        }
        for ep in self
            .d
            .endpoints
            .iter()
            .map(|e| e.name.as_str())
            .chain(pending.keys().copied().collect::<Vec<_>>())
        {
            m.pending
                .with_label_values(&[ep])
                .set(pending.get(ep).copied().unwrap_or(0));
            m.oldest_pending_seconds
                .with_label_values(&[ep])
                .set(oldest.get(ep).map_or(0, |c| (now - c).max(0) / 1000));
        }
        for (i, ep) in self.d.endpoints.iter().enumerate() {
            m.in_flight
                .with_label_values(&[&ep.name])
                .set(i64::try_from(self.in_flight[i]).unwrap_or(i64::MAX));
        }
        let topics = &self.d.config.topics;
        m.state.refresh(
            self.parts
                .iter()
                .map(|(p, part)| (*p, &*part.store, &part.next)),
            &self.d.ownership,
            &[&topics.conversions.name, &topics.delivery_commands.name],
        );
    }
}

enum Input {
    Conversion(Box<Conversion>),
    Command(Box<DeliveryCommand>),
}

/// Counts and logs a circuit transition of endpoint `i`, if there was one.
fn circuit_moved(d: &Delivery, i: usize, before: State, after: State) {
    if after == before {
        return;
    }
    let name = &d.endpoints[i].name;
    d.metrics
        .circuit_transitions
        .with_label_values(&[name, after.as_str()])
        .inc();
    set_circuit_gauge(&d.metrics, name, after);
    match after {
        State::Open => {
            tracing::warn!(endpoint = %name, "circuit opened: attempts to this endpoint are held back")
        }
        State::HalfOpen => {
            tracing::info!(endpoint = %name, "circuit half-open: probing the endpoint")
        }
        State::Closed => {
            tracing::info!(endpoint = %name, "circuit closed: the endpoint answers again")
        }
    }
}

fn set_circuit_gauge(m: &crate::metrics::Metrics, name: &str, current: State) {
    for s in State::ALL {
        m.circuit_state
            .with_label_values(&[name, s.as_str()])
            .set(i64::from(s == current));
    }
}
