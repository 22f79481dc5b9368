//! What an attempt's result means, and when to try again. Pure functions (the random draw
//! is a parameter), unit-tested here.
//!
//! - [`outcome`]: delivered (2xx), retryable (no answer, 408, 429, 5xx, or not sent because
//!   the circuit is open) or permanent (any other answer; a request that cannot be built;
//!   an endpoint no longer configured) — the one place that decides what is retried.
//! - [`circuit_health`]: what an attempt tells the endpoint's circuit breaker — the one
//!   place that decides what trips it. An answer the affiliate's server chose (2xx, 4xx)
//!   is health; a timeout, a refused connection or a 5xx is not; an attempt not made says
//!   nothing.
//! - Attempt `n + 1` waits `schedule[n - 1]`, spread by ± `jitter` (a fraction) so that
//!   endpoints recovering from an outage are not hit by every retry at the same instant.
//! - A `Retry-After` answer (delay-seconds or HTTP-date) is honoured when it asks for more
//!   than the schedule would wait, up to `retry_after_cap`, so a misbehaving endpoint cannot
//!   park a delivery for days.
//! - When the schedule is exhausted there is no next attempt: the delivery is dead-lettered.

use std::time::{Duration, SystemTime};

use s2s_common::contract::AttemptOutcome;

use crate::sender::{Failure, Sent};

/// What one attempt's result means for its delivery.
pub fn outcome(sent: &Sent) -> AttemptOutcome {
    match (sent.status, sent.failure) {
        (Some(200..=299), _) => AttemptOutcome::Delivered,
        (Some(408 | 429 | 500..=599), _) => AttemptOutcome::Retryable,
        (Some(_), _) => AttemptOutcome::Permanent,
        (None, Some(Failure::InvalidRequest | Failure::Unconfigured)) => AttemptOutcome::Permanent,
        (None, _) => AttemptOutcome::Retryable,
    }
}

/// What one attempt tells its endpoint's circuit: `Some(healthy)`, or `None` for an
/// attempt that was not made (the circuit was open, the request could not be built).
pub fn circuit_health(sent: &Sent) -> Option<bool> {
    match (sent.status, sent.failure) {
        (Some(_), _) => Some(outcome(sent) != AttemptOutcome::Retryable),
        (None, Some(Failure::Timeout | Failure::Connect | Failure::Network)) => Some(false),
        (None, _) => None,
    }
}

/// A bounded metric label for how an attempt ended: the status class (`2xx`, `4xx`, …), or
/// without an answer what happened instead (`timeout`, `connect_error`, …).
pub fn status_class(sent: &Sent) -> &'static str {
    match (sent.status, sent.failure) {
        (Some(100..=199), _) => "1xx",
        (Some(200..=299), _) => "2xx",
        (Some(300..=399), _) => "3xx",
        (Some(400..=499), _) => "4xx",
        (Some(_), _) => "5xx",
        (None, Some(f)) => f.label(),
        (None, None) => "network_error",
    }
}

/// Whether the request went out (its latency means something).
pub fn was_sent(sent: &Sent) -> bool {
    !matches!(
        sent.failure,
        Some(Failure::CircuitOpen | Failure::Unconfigured | Failure::InvalidRequest)
    )
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Wait before attempt 2, 3, …; the number of attempts is one more than its length.
    pub schedule: Vec<Duration>,
    /// Fraction in [0, 1): each wait is drawn from `base × (1 ± jitter)`.
    pub jitter: f64,
    /// Longest wait a `Retry-After` can ask for.
    pub retry_after_cap: Duration,
}

impl RetryPolicy {
    /// The wait before attempt `next_attempt` (2-based), or `None` when attempts are
    /// exhausted. `rand01` is a uniform draw from [0, 1).
    pub fn delay(
        &self,
        next_attempt: u32,
        retry_after: Option<Duration>,
        rand01: f64,
    ) -> Option<Duration> {
        let index = usize::try_from(next_attempt.checked_sub(2)?).ok()?;
        let base = *self.schedule.get(index)?;
        let spread = 1.0 - self.jitter + 2.0 * self.jitter * rand01.clamp(0.0, 1.0);
        let jittered = base.mul_f64(spread.max(0.0));
        Some(match retry_after {
            Some(asked) => jittered.max(asked.min(self.retry_after_cap)),
            None => jittered,
        })
    }

    /// How many attempts a delivery gets at most.
    pub fn max_attempts(&self) -> u32 {
        u32::try_from(self.schedule.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1)
    }
}

/// A `Retry-After` value as a wait from `now`: delay-seconds (`120`) or an HTTP-date
/// (`Wed, 21 Oct 2015 07:28:00 GMT`; a date in the past means no wait). Anything else is
/// ignored (`None`).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(status: u16) -> Sent {
        Sent::answered(status, Duration::from_millis(3))
    }

    #[test]
    fn outcome_of_answers_and_failures() {
        assert_eq!(outcome(&answered(204)), AttemptOutcome::Delivered);
        for s in [408, 429, 500, 503] {
            assert_eq!(outcome(&answered(s)), AttemptOutcome::Retryable, "{s}");
        }
        for s in [301, 400, 404, 410] {
            assert_eq!(outcome(&answered(s)), AttemptOutcome::Permanent, "{s}");
        }
        for f in [
            Failure::Timeout,
            Failure::Connect,
            Failure::Network,
            Failure::CircuitOpen,
        ] {
            let sent = Sent::not_sent(f, String::new());
            assert_eq!(outcome(&sent), AttemptOutcome::Retryable, "{f:?}");
        }
        for f in [Failure::InvalidRequest, Failure::Unconfigured] {
            let sent = Sent::not_sent(f, String::new());
            assert_eq!(outcome(&sent), AttemptOutcome::Permanent, "{f:?}");
        }
    }

    #[test]
    fn what_trips_a_circuit() {
        assert_eq!(circuit_health(&answered(200)), Some(true));
        assert_eq!(
            circuit_health(&answered(404)),
            Some(true),
            "the server answered"
        );
        assert_eq!(circuit_health(&answered(503)), Some(false));
        assert_eq!(circuit_health(&answered(429)), Some(false));
        for f in [Failure::Timeout, Failure::Connect, Failure::Network] {
            assert_eq!(
                circuit_health(&Sent::not_sent(f, String::new())),
                Some(false)
            );
        }
        for f in [
            Failure::CircuitOpen,
            Failure::InvalidRequest,
            Failure::Unconfigured,
        ] {
            let sent = Sent::not_sent(f, String::new());
            assert_eq!(circuit_health(&sent), None, "{f:?}: not made");
            assert!(!was_sent(&sent));
        }
        assert!(was_sent(&Sent::not_sent(Failure::Timeout, String::new())));
    }

    #[test]
    fn status_classes_are_bounded_labels() {
        assert_eq!(status_class(&answered(302)), "3xx");
        assert_eq!(status_class(&answered(503)), "5xx");
        assert_eq!(status_class(&answered(999)), "5xx");
        assert_eq!(
            status_class(&Sent::not_sent(Failure::Timeout, String::new())),
            "timeout"
        );
    }

    fn policy(jitter: f64) -> RetryPolicy {
        RetryPolicy {
            schedule: vec![Duration::from_secs(5), Duration::from_secs(300)],
            jitter,
            retry_after_cap: Duration::from_secs(600),
        }
    }

    #[test]
    fn schedule_without_jitter_and_exhaustion() {
        let p = policy(0.0);
        assert_eq!(p.delay(1, None, 0.5), None, "attempt 1 is not a retry");
        assert_eq!(p.delay(2, None, 0.9), Some(Duration::from_secs(5)));
        assert_eq!(p.delay(3, None, 0.1), Some(Duration::from_secs(300)));
        assert_eq!(p.delay(4, None, 0.5), None, "exhausted: dead-letter");
        assert_eq!(p.max_attempts(), 3);
    }

    #[test]
    fn jitter_stays_within_its_bounds() {
        let p = policy(0.2);
        let lo = p.delay(2, None, 0.0).expect("delay");
        let hi = p.delay(2, None, 0.999_999).expect("delay");
        assert_eq!(lo, Duration::from_secs(4));
        assert!(
            hi <= Duration::from_secs(6) && hi > Duration::from_millis(5999),
            "{hi:?}"
        );
        for i in 0..100 {
            let d = p.delay(3, None, f64::from(i) / 100.0).expect("delay");
            assert!(
                d >= Duration::from_secs(240) && d <= Duration::from_secs(360),
                "{d:?}"
            );
        }
        assert_eq!(p.delay(2, None, 7.0), p.delay(2, None, 1.0), "draw clamped");
    }

    #[test]
    fn retry_after_extends_the_wait_up_to_the_cap() {
        let p = policy(0.0);
        assert_eq!(
            p.delay(2, Some(Duration::from_secs(60)), 0.5),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            p.delay(2, Some(Duration::from_secs(1)), 0.5),
            Some(Duration::from_secs(5)),
            "never sooner than the schedule"
        );
        assert_eq!(
            p.delay(2, Some(Duration::from_secs(86_400)), 0.5),
            Some(Duration::from_secs(600)),
            "capped"
        );
        assert_eq!(
            p.delay(4, Some(Duration::from_secs(1)), 0.5),
            None,
            "no attempts left"
        );
    }

    #[test]
    fn parses_both_retry_after_forms() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").expect("date");
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:30:30 GMT", now),
            Some(Duration::from_secs(150))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }
}
