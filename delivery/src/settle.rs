//! Settling one attempt: given the delivery as it is and how its attempt ended, the
//! delivery's next state, its delivery-log record, its dead letter at the end of its
//! attempts, and the events to count. A pure function (time and the jitter's random draw
//! are parameters), unit-tested here; [`crate::processor`] stages what it returns.

use s2s_common::contract::{DeadLetter, DeliveryAttempt, SCHEMA_VERSION};

use crate::events::Event;
use crate::job::{dead_letter_reason, Attempted, Job, Next};
use crate::policy::{self, RetryPolicy};
use crate::sender::{Failure, Sent};

/// How one attempt of a delivery ended (made or not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptResult {
    /// The attempt's number (the job's next attempt when it was taken).
    pub attempt: u32,
    /// The URL it was sent to; empty when nothing could be built.
    pub url: String,
    pub sent: Sent,
    /// When it ended.
    pub at_ms: i64,
}

/// What settling an attempt produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Settled {
    pub job: Job,
    /// The delivery-log record.
    pub attempt: DeliveryAttempt,
    pub dead_letter: Option<DeadLetter>,
    pub events: Vec<Event>,
}

/// Whether `result` is the attempt `job` is waiting for. A result that is not (the job
/// was re-delivered, settled or forgotten meanwhile) is void.
pub fn is_current(job: &Job, result: &AttemptResult) -> bool {
    job.is_pending() && job.next_attempt() == result.attempt
}

/// Applies `result` to `job` at `now_ms`; `rand01` is the retry jitter's uniform draw.
/// The caller checks [`is_current`] first.
pub fn settle(
    job: &Job,
    result: &AttemptResult,
    policy: &RetryPolicy,
    now_ms: i64,
    rand01: f64,
) -> Settled {
    let sent = &result.sent;
    let outcome = policy::outcome(sent);
    let mut next_job = job.clone();
    let next = next_job.settle(
        &Attempted {
            outcome,
            status: sent.status,
            error: sent.error.clone(),
            retry_after: sent.retry_after,
        },
        policy,
        now_ms,
        rand01,
    );
    let c = &next_job.conversion;
    let attempt = DeliveryAttempt {
        schema_version: SCHEMA_VERSION,
        delivery_id: next_job.delivery_id.clone(),
        conversion_id: c.conversion_id.clone(),
        conversion_version: c.version,
        click_id: c.click_id.clone(),
        endpoint: next_job.endpoint.clone(),
        attempt: result.attempt,
        url: result.url.clone(),
        status_code: sent.status,
        latency_ms: u64::try_from(sent.latency.as_millis()).unwrap_or(u64::MAX),
        outcome,
        error: sent.error.clone(),
        ts_ms: result.at_ms,
        next_attempt_at_ms: match next {
            Next::Retry { due_ms } => Some(due_ms),
            _ => None,
        },
    };
    let mut events = vec![Event::Attempt {
        endpoint: next_job.endpoint.clone(),
        outcome,
        class: policy::status_class(sent),
        latency: policy::was_sent(sent).then_some(sent.latency),
    }];
    let mut dead_letter = None;
    match next {
        Next::Delivered => events.push(Event::Delivered {
            attributed_at_ms: c.attributed_at_ms,
            at_ms: result.at_ms,
        }),
        Next::Retry { .. } => events.push(Event::Retry(next_job.endpoint.clone())),
        Next::DeadLettered => {
            let dl = DeadLetter {
                schema_version: SCHEMA_VERSION,
                delivery_id: next_job.delivery_id.clone(),
                endpoint: next_job.endpoint.clone(),
                conversion: c.clone(),
                reason: dead_letter_reason(outcome, sent.failure == Some(Failure::Unconfigured)),
                attempts: next_job.attempts,
                last_status: sent.status,
                last_error: sent.error.clone(),
                dead_lettered_at_ms: now_ms,
            };
            events.push(Event::DeadLettered(Box::new(dl.clone())));
            dead_letter = Some(dl);
        }
    }
    Settled {
        job: next_job,
        attempt,
        dead_letter,
        events,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use s2s_common::contract::{AttemptOutcome, DeadLetterReason};

    use super::*;
    use crate::endpoint::tests::conv;
    use crate::job::JobState;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            schedule: vec![Duration::from_secs(5)],
            jitter: 0.0,
            retry_after_cap: Duration::from_secs(60),
        }
    }

    fn job() -> Job {
        Job::new("d1".into(), "aff".into(), conv(), 1_000)
    }

    fn result(attempt: u32, sent: Sent) -> AttemptResult {
        AttemptResult {
            attempt,
            url: "https://aff.example/pb?c=1".into(),
            sent,
            at_ms: 2_000,
        }
    }

    fn answered(status: u16) -> Sent {
        Sent::answered(status, Duration::from_millis(40))
    }

    #[test]
    fn a_2xx_delivers_and_logs_the_attempt() {
        let j = job();
        let r = result(1, answered(204));
        assert!(is_current(&j, &r));
        let s = settle(&j, &r, &policy(), 2_100, 0.5);
        assert_eq!(s.job.state, JobState::Delivered);
        assert_eq!(s.job.finished_ms, Some(2_100));
        assert_eq!(s.dead_letter, None);
        assert_eq!(
            (
                s.attempt.attempt,
                s.attempt.status_code,
                s.attempt.latency_ms
            ),
            (1, Some(204), 40)
        );
        assert_eq!(s.attempt.outcome, AttemptOutcome::Delivered);
        assert_eq!(s.attempt.next_attempt_at_ms, None);
        assert_eq!(s.attempt.ts_ms, 2_000, "when the attempt ended");
        assert_eq!(
            s.events,
            vec![
                Event::Attempt {
                    endpoint: "aff".into(),
                    outcome: AttemptOutcome::Delivered,
                    class: "2xx",
                    latency: Some(Duration::from_millis(40)),
                },
                Event::Delivered {
                    attributed_at_ms: j.conversion.attributed_at_ms,
                    at_ms: 2_000,
                },
            ]
        );
    }

    #[test]
    fn a_timeout_is_retried_then_dead_lettered_when_the_schedule_ends() {
        let j = job();
        let timeout = Sent::not_sent(Failure::Timeout, "timed out".into());
        let s = settle(&j, &result(1, timeout.clone()), &policy(), 2_100, 0.5);
        assert_eq!(s.job.state, JobState::Pending);
        assert_eq!(s.job.due_ms, 7_100, "5 s after settling");
        assert_eq!(s.attempt.next_attempt_at_ms, Some(7_100));
        assert_eq!(s.events[1], Event::Retry("aff".into()));
        let r2 = result(1, timeout.clone());
        assert!(
            !is_current(&s.job, &r2),
            "a report of attempt 1 again is void"
        );
        let s2 = settle(&s.job, &result(2, timeout), &policy(), 8_000, 0.5);
        assert_eq!(s2.job.state, JobState::DeadLettered);
        let dl = s2.dead_letter.expect("dead letter");
        assert_eq!(dl.reason, DeadLetterReason::AttemptsExhausted);
        assert_eq!((dl.attempts, dl.dead_lettered_at_ms), (2, 8_000));
        assert_eq!(s2.events.len(), 2);
        assert!(matches!(&s2.events[1], Event::DeadLettered(d) if **d == dl));
    }

    #[test]
    fn a_permanent_answer_or_a_removed_postback_dead_letters_at_once() {
        let s = settle(&job(), &result(1, answered(404)), &policy(), 2_100, 0.5);
        let dl = s.dead_letter.expect("dead letter");
        assert_eq!(dl.reason, DeadLetterReason::PermanentFailure);
        assert_eq!(dl.last_status, Some(404));
        let gone = Sent::not_sent(Failure::Unconfigured, "no postback named 'aff'".into());
        let s = settle(&job(), &result(1, gone), &policy(), 2_100, 0.5);
        assert_eq!(
            s.dead_letter.map(|d| d.reason),
            Some(DeadLetterReason::PostbackRemoved)
        );
        assert!(
            matches!(
                s.events[0],
                Event::Attempt {
                    latency: None,
                    class: "unconfigured",
                    ..
                }
            ),
            "not sent: no latency, labelled by why"
        );
    }

    #[test]
    fn an_open_circuit_counts_as_a_retryable_attempt_not_sent() {
        let open = Sent::not_sent(Failure::CircuitOpen, "circuit open".into());
        let s = settle(&job(), &result(1, open), &policy(), 2_100, 0.5);
        assert_eq!(s.job.state, JobState::Pending);
        assert_eq!(s.job.attempts, 1);
        assert!(matches!(
            s.events[0],
            Event::Attempt {
                outcome: AttemptOutcome::Retryable,
                class: "circuit_open",
                latency: None,
                ..
            }
        ));
    }

    #[test]
    fn retry_after_and_jitter_come_from_the_policy() {
        let mut sent = answered(429);
        sent.retry_after = Some(Duration::from_secs(30));
        let s = settle(&job(), &result(1, sent), &policy(), 2_000, 0.0);
        assert_eq!(s.job.due_ms, 32_000, "Retry-After beyond the schedule wins");
        let jittered = RetryPolicy {
            jitter: 0.5,
            ..policy()
        };
        let s = settle(&job(), &result(1, answered(503)), &jittered, 2_000, 0.0);
        assert_eq!(s.job.due_ms, 4_500, "5 s × (1 − 0.5)");
    }
}
