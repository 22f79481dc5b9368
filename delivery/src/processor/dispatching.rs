//! Dispatch from committed state: due deliveries of each endpoint's queue become attempts
//! while the endpoint and the instance have request slots ([`crate::dispatch`]), through
//! the endpoint's circuit; the idle wait until the next due delivery.

use std::time::{Duration, Instant};

use s2s_state::runtime::RuntimeError;

use super::{Deliveries, Part, EXPIRY_BATCH, IDLE_TICK};
use crate::circuit::Admit;
use crate::dispatch::Report;
use crate::schedule::{self, Queue};
use crate::sender::{Failure, Sent};
use crate::settle::AttemptResult;

impl Deliveries {
    /// Takes due jobs and starts their attempts, while slots last; `only` limits it to one
    /// endpoint (the one whose slot was just freed).
    pub(super) fn dispatch(&mut self, only: Option<usize>) -> Result<(), RuntimeError> {
        let mut partitions: Vec<i32> = self.parts.keys().copied().collect();
        if partitions.is_empty() {
            return Ok(());
        }
        // Start at another partition each time, so that free slots go round them all.
        self.round = self.round.wrapping_add(1);
        let start = self.round % partitions.len();
        partitions.rotate_left(start);
        let (now_ms, now) = (s2s_common::now_ms(), Instant::now());
        for p in partitions {
            let names: Vec<String> = match (only, self.parts.get(&p)) {
                (_, None) => continue,
                (Some(i), Some(_)) => vec![self.dispatcher.endpoints()[i].name.clone()],
                (None, Some(part)) => part.queues.keys().cloned().collect(),
            };
            for name in names {
                let idx = self.dispatcher.index(&name);
                let room = match idx {
                    Some(i) => self.dispatcher.room(i),
                    // Not sent anywhere: dead-lettered in the next cycle.
                    None => EXPIRY_BATCH,
                };
                if room > 0 {
                    self.dispatch_queue(p, &name, idx, room, now_ms, now)?;
                }
            }
        }
        Ok(())
    }

    fn dispatch_queue(
        &mut self,
        p: i32,
        name: &str,
        idx: Option<usize>,
        room: usize,
        now_ms: i64,
        now: Instant,
    ) -> Result<(), RuntimeError> {
        let Some(part) = self.parts.get_mut(&p) else {
            return Ok(());
        };
        let Some(queue) = part.queues.get_mut(name) else {
            return Ok(());
        };
        let keys = queue.take(&part.store, now_ms, room)?;
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
            let report = Report {
                partition: p,
                generation: part.generation,
                key,
                delivery_id: job.delivery_id.clone(),
                endpoint: job.endpoint.clone(),
                probe: false,
                result: None,
            };
            let not_sent = |failure, error: String, url: String| AttemptResult {
                attempt: job.next_attempt(),
                url,
                sent: Sent::not_sent(failure, error),
                at_ms: now_ms,
            };
            let Some(i) = idx else {
                let error = format!("no postback named '{name}' is configured");
                part.reports.push(Report {
                    result: Some(not_sent(Failure::Unconfigured, error, String::new())),
                    ..report
                });
                continue;
            };
            let admit = self.dispatcher.admit(i, now);
            let request = self.dispatcher.endpoints()[i].request(
                &job.conversion,
                &job.delivery_id,
                now_ms / 1000,
            );
            if admit == Admit::Reject {
                let error = "not sent: the endpoint's circuit is open".to_string();
                part.reports.push(Report {
                    result: Some(not_sent(Failure::CircuitOpen, error, request.url)),
                    ..report
                });
                continue;
            }
            let report = Report {
                probe: admit == Admit::Probe,
                ..report
            };
            if !self
                .dispatcher
                .start(i, request, job.next_attempt(), report.clone())
            {
                // No slot after all (room was checked): due again at the next dispatch.
                if let Some(q) = queue_of(part, &report.key) {
                    q.put_back(report.key);
                }
            }
        }
        Ok(())
    }

    /// Until the earliest due job of an endpoint with a free request slot, at most
    /// [`IDLE_TICK`].
    pub(super) fn next_due_in(&self) -> Duration {
        if self.dispatcher.full() {
            // Every slot is taken: a report frees one and wakes the processor.
            return IDLE_TICK;
        }
        let now = s2s_common::now_ms();
        let earliest = self
            .parts
            .values()
            .flat_map(|p| p.queues.iter())
            .filter(|(name, _)| match self.dispatcher.index(name) {
                Some(i) => self.dispatcher.room(i) > 0,
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
}

pub(super) fn queue_of<'p>(part: &'p mut Part, key: &[u8]) -> Option<&'p mut Queue> {
    let (endpoint, _, _) = schedule::parse_queue_key(key)?;
    part.queues.get_mut(endpoint)
}
