//! A delivery: one conversion (version) to one endpoint, and its life — pending (waiting
//! for its next attempt), delivered, or dead-lettered. Pure state transitions, unit-tested;
//! [`crate::schedule`] stores jobs, [`crate::settle`] applies attempts to them and
//! [`crate::processor`] drives them.
//!
//! - A new job is due at once.
//! - After an attempt: a 2xx delivers it; a retryable failure (network error, timeout,
//!   408, 429, 5xx, or not sent because the endpoint's circuit is open) waits per the retry
//!   policy of the current *round*; a permanent failure (other 4xx, a redirect) or the end
//!   of the schedule dead-letters it.
//! - A re-delivery (an operator's command) starts a new round with a fresh schedule for a
//!   dead-lettered job, fires a pending one now, and leaves a delivered one alone: the
//!   affiliate was paid. Attempt numbers keep counting across rounds.

use std::time::Duration;

use s2s_common::contract::{AttemptOutcome, Conversion, DeadLetterReason};
use serde::{Deserialize, Serialize};

use crate::policy::RetryPolicy;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Pending,
    Delivered,
    DeadLettered,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Stable per (conversion, version, endpoint); the `webhook-id`.
    pub delivery_id: String,
    pub endpoint: String,
    pub conversion: Conversion,
    pub state: JobState,
    /// Attempts made, over all rounds.
    pub attempts: u32,
    /// Attempts made before the current round began.
    pub round_start: u32,
    /// When the delivery was first scheduled.
    pub created_ms: i64,
    /// When the next attempt is due (pending jobs).
    pub due_ms: i64,
    /// When it was delivered or dead-lettered.
    pub finished_ms: Option<i64>,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
}

/// How one attempt ended, as the job needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempted {
    pub outcome: AttemptOutcome,
    pub status: Option<u16>,
    pub error: Option<String>,
    /// The endpoint's `Retry-After`, parsed.
    pub retry_after: Option<Duration>,
}

/// What an attempt led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Delivered,
    Retry { due_ms: i64 },
    DeadLettered,
}

/// Why a delivery whose last attempt ended `outcome` was dead-lettered: its endpoint was
/// removed (`unconfigured`), the answer was permanent, or the schedule ran out.
pub fn dead_letter_reason(outcome: AttemptOutcome, unconfigured: bool) -> DeadLetterReason {
    match (unconfigured, outcome) {
        (true, _) => DeadLetterReason::PostbackRemoved,
        (false, AttemptOutcome::Permanent) => DeadLetterReason::PermanentFailure,
        (false, _) => DeadLetterReason::AttemptsExhausted,
    }
}

/// What a re-delivery did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redelivered {
    /// A dead-lettered job is pending again, with a fresh schedule.
    Rearmed,
    /// A pending job is due now instead of later.
    FiredNow,
    /// Already delivered: nothing to do.
    AlreadyDelivered,
}

impl Redelivered {
    pub fn as_str(self) -> &'static str {
        match self {
            Redelivered::Rearmed => "rearmed",
            Redelivered::FiredNow => "fired_now",
            Redelivered::AlreadyDelivered => "already_delivered",
        }
    }
}

impl Job {
    /// A delivery scheduled at `now_ms`, due at once.
    pub fn new(delivery_id: String, endpoint: String, conversion: Conversion, now_ms: i64) -> Self {
        Job {
            delivery_id,
            endpoint,
            conversion,
            state: JobState::Pending,
            attempts: 0,
            round_start: 0,
            created_ms: now_ms,
            due_ms: now_ms,
            finished_ms: None,
            last_status: None,
            last_error: None,
        }
    }

    pub fn is_pending(&self) -> bool {
        self.state == JobState::Pending
    }

    /// The number the next attempt gets (1-based, counting across rounds).
    pub fn next_attempt(&self) -> u32 {
        self.attempts.saturating_add(1)
    }

    /// Applies the result of attempt [`Job::next_attempt`] at `now_ms`; `rand01` is the
    /// jitter's uniform draw.
    pub fn settle(
        &mut self,
        a: &Attempted,
        policy: &RetryPolicy,
        now_ms: i64,
        rand01: f64,
    ) -> Next {
        self.attempts = self.next_attempt();
        self.last_status = a.status;
        self.last_error = a.error.clone();
        let next = match a.outcome {
            AttemptOutcome::Delivered => Next::Delivered,
            AttemptOutcome::Permanent => Next::DeadLettered,
            AttemptOutcome::Retryable => {
                let in_round = self.attempts - self.round_start.min(self.attempts);
                match policy.delay(in_round.saturating_add(1), a.retry_after, rand01) {
                    Some(d) => Next::Retry {
                        due_ms: now_ms
                            .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
                    },
                    None => Next::DeadLettered,
                }
            }
        };
        match next {
            Next::Delivered => self.finish(JobState::Delivered, now_ms),
            Next::DeadLettered => self.finish(JobState::DeadLettered, now_ms),
            Next::Retry { due_ms } => self.due_ms = due_ms,
        }
        next
    }

    fn finish(&mut self, state: JobState, now_ms: i64) {
        self.state = state;
        self.finished_ms = Some(now_ms);
    }

    /// An operator's re-delivery at `now_ms`.
    pub fn redeliver(&mut self, now_ms: i64) -> Redelivered {
        match self.state {
            JobState::Delivered => Redelivered::AlreadyDelivered,
            JobState::Pending => {
                self.due_ms = self.due_ms.min(now_ms);
                Redelivered::FiredNow
            }
            JobState::DeadLettered => {
                self.state = JobState::Pending;
                self.round_start = self.attempts;
                self.due_ms = now_ms;
                self.finished_ms = None;
                Redelivered::Rearmed
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dead_letters_say_why() {
        use AttemptOutcome::*;
        assert_eq!(
            dead_letter_reason(Retryable, false),
            DeadLetterReason::AttemptsExhausted
        );
        assert_eq!(
            dead_letter_reason(Permanent, false),
            DeadLetterReason::PermanentFailure
        );
        assert_eq!(
            dead_letter_reason(Permanent, true),
            DeadLetterReason::PostbackRemoved
        );
    }

    use super::*;
    use crate::endpoint::tests::conv;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            schedule: vec![Duration::from_secs(5), Duration::from_secs(300)],
            jitter: 0.0,
            retry_after_cap: Duration::from_secs(3600),
        }
    }

    fn job() -> Job {
        Job::new("d".into(), "e".into(), conv(), 1_000)
    }

    fn attempted(status: Option<u16>) -> Attempted {
        Attempted {
            outcome: match status {
                Some(s) => crate::policy::outcome(&crate::sender::Sent {
                    status: Some(s),
                    failure: None,
                    error: None,
                    retry_after: None,
                    latency: Duration::ZERO,
                }),
                None => AttemptOutcome::Retryable,
            },
            status,
            error: status.is_none().then(|| "connection refused".to_string()),
            retry_after: None,
        }
    }

    #[test]
    fn a_new_job_is_due_at_once_and_a_2xx_delivers_it() {
        let mut j = job();
        assert!(j.is_pending());
        assert_eq!((j.due_ms, j.next_attempt()), (1_000, 1));
        assert_eq!(
            j.settle(&attempted(Some(204)), &policy(), 2_000, 0.5),
            Next::Delivered
        );
        assert_eq!(j.state, JobState::Delivered);
        assert_eq!(
            (j.attempts, j.finished_ms, j.last_status),
            (1, Some(2_000), Some(204))
        );
    }

    #[test]
    fn retryable_failures_follow_the_schedule_then_dead_letter() {
        let mut j = job();
        let p = policy();
        assert_eq!(
            j.settle(&attempted(None), &p, 2_000, 0.5),
            Next::Retry { due_ms: 7_000 }
        );
        assert_eq!(j.last_error.as_deref(), Some("connection refused"));
        assert_eq!(
            j.settle(&attempted(Some(503)), &p, 7_000, 0.5),
            Next::Retry { due_ms: 307_000 }
        );
        assert_eq!(
            j.settle(&attempted(Some(500)), &p, 307_000, 0.5),
            Next::DeadLettered,
            "three attempts: the schedule has two waits"
        );
        assert_eq!(j.state, JobState::DeadLettered);
        assert_eq!((j.attempts, j.last_status), (3, Some(500)));
    }

    #[test]
    fn retry_after_lengthens_the_wait() {
        let mut j = job();
        let a = Attempted {
            retry_after: Some(Duration::from_secs(60)),
            ..attempted(Some(429))
        };
        assert_eq!(
            j.settle(&a, &policy(), 0, 0.5),
            Next::Retry { due_ms: 60_000 }
        );
    }

    #[test]
    fn a_permanent_failure_dead_letters_at_once() {
        let mut j = job();
        assert_eq!(
            j.settle(&attempted(Some(404)), &policy(), 2_000, 0.5),
            Next::DeadLettered
        );
        assert_eq!(j.attempts, 1);
    }

    #[test]
    fn redelivery_rearms_with_a_fresh_round_and_never_repays() {
        let mut j = job();
        let p = policy();
        j.settle(&attempted(Some(404)), &p, 2_000, 0.5);
        assert_eq!(j.redeliver(10_000), Redelivered::Rearmed);
        assert!(j.is_pending());
        assert_eq!(
            (j.due_ms, j.next_attempt(), j.finished_ms),
            (10_000, 2, None)
        );
        // The new round's first retry waits the schedule's first entry again.
        assert_eq!(
            j.settle(&attempted(Some(500)), &p, 10_000, 0.5),
            Next::Retry { due_ms: 15_000 }
        );
        assert_eq!(j.redeliver(12_000), Redelivered::FiredNow);
        assert_eq!(j.due_ms, 12_000);
        assert_eq!(
            j.settle(&attempted(Some(200)), &p, 12_000, 0.5),
            Next::Delivered
        );
        assert_eq!(j.attempts, 3);
        assert_eq!(j.redeliver(20_000), Redelivered::AlreadyDelivered);
        assert_eq!(j.state, JobState::Delivered);
    }

    #[test]
    fn jobs_round_trip_through_json() {
        let j = job();
        let back: Job =
            serde_json::from_slice(&serde_json::to_vec(&j).expect("encode")).expect("decode");
        assert_eq!(back, j);
    }
}
