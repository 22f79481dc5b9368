//! A circuit breaker per endpoint, so that a dead endpoint is not hammered and does not
//! hold request slots: after `failure_threshold` consecutive failed attempts (network
//! error, timeout, 408, 429, 5xx) it opens; while open, due deliveries to it are not sent
//! (each counts as a failed attempt, `circuit_open`, and follows the retry schedule, so
//! dead-lettering stays bounded); after `open_for` it lets one probe through (half-open).
//! A healthy probe closes it; a failed one reopens it for twice as long, up to
//! `max_open_for`. Any answer that is not a failure (a 2xx, a 4xx) counts as healthy: the
//! endpoint is up, even if it refuses the request.
//!
//! Pure: time is a parameter. One breaker per endpoint and instance (not shared between
//! instances: each learns on its own, within a few attempts).

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitConfig {
    pub failure_threshold: u32,
    pub open_for: Duration,
    pub max_open_for: Duration,
}

/// The state, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub const ALL: [State; 3] = [State::Closed, State::Open, State::HalfOpen];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

/// Whether an attempt may be sent now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Send,
    /// Send it as the half-open probe; report its result with `probe = true`.
    Probe,
    /// Do not send: the circuit is open (or its probe is in flight).
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant, open_for: Duration },
    HalfOpen { probing: bool, open_for: Duration },
}

#[derive(Debug, Clone)]
pub struct Circuit {
    config: CircuitConfig,
    inner: Inner,
}

impl Circuit {
    pub fn new(config: CircuitConfig) -> Self {
        Circuit {
            config,
            inner: Inner::Closed { failures: 0 },
        }
    }

    pub fn state(&self) -> State {
        match self.inner {
            Inner::Closed { .. } => State::Closed,
            Inner::Open { .. } => State::Open,
            Inner::HalfOpen { .. } => State::HalfOpen,
        }
    }

    /// Asks to send one attempt at `now`.
    pub fn admit(&mut self, now: Instant) -> Admit {
        match self.inner {
            Inner::Closed { .. } => Admit::Send,
            Inner::Open { until, open_for } if now >= until => {
                self.inner = Inner::HalfOpen {
                    probing: true,
                    open_for,
                };
                Admit::Probe
            }
            Inner::Open { .. } => Admit::Reject,
            Inner::HalfOpen {
                probing: false,
                open_for,
            } => {
                self.inner = Inner::HalfOpen {
                    probing: true,
                    open_for,
                };
                Admit::Probe
            }
            Inner::HalfOpen { probing: true, .. } => Admit::Reject,
        }
    }

    /// Reports how a sent attempt ended (`healthy` per
    /// [`crate::policy::circuit_health`]); `probe` if [`Circuit::admit`] made it the probe.
    pub fn record(&mut self, now: Instant, probe: bool, healthy: bool) {
        let base = self.config.open_for;
        self.inner = match (self.inner, probe, healthy) {
            (Inner::Closed { .. }, _, true) => Inner::Closed { failures: 0 },
            (Inner::Closed { failures }, _, false) => {
                let failures = failures.saturating_add(1);
                if failures >= self.config.failure_threshold {
                    Inner::Open {
                        until: now + base,
                        open_for: base,
                    }
                } else {
                    Inner::Closed { failures }
                }
            }
            // An answer to a request sent before the circuit opened says the endpoint
            // is up again; a failure from then changes nothing.
            (Inner::Open { .. }, _, true) | (Inner::HalfOpen { .. }, _, true) => {
                Inner::Closed { failures: 0 }
            }
            (Inner::HalfOpen { open_for, .. }, true, false) => {
                let open_for = open_for.saturating_mul(2).min(self.config.max_open_for);
                Inner::Open {
                    until: now + open_for,
                    open_for,
                }
            }
            (inner @ (Inner::Open { .. } | Inner::HalfOpen { .. }), _, false) => inner,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn circuit() -> Circuit {
        Circuit::new(CircuitConfig {
            failure_threshold: 3,
            open_for: Duration::from_secs(10),
            max_open_for: Duration::from_secs(25),
        })
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let t = Instant::now();
        let mut c = circuit();
        c.record(t, false, false);
        c.record(t, false, false);
        c.record(t, false, true);
        c.record(t, false, false);
        c.record(t, false, false);
        assert_eq!(c.state(), State::Closed, "a success resets the count");
        assert_eq!(c.admit(t), Admit::Send);
        c.record(t, false, false);
        assert_eq!(c.state(), State::Open);
        assert_eq!(c.admit(t + Duration::from_secs(9)), Admit::Reject);
    }

    #[test]
    fn half_opens_with_one_probe_and_closes_on_health() {
        let t = Instant::now();
        let mut c = circuit();
        for _ in 0..3 {
            c.record(t, false, false);
        }
        let later = t + Duration::from_secs(10);
        assert_eq!(c.admit(later), Admit::Probe);
        assert_eq!(c.state(), State::HalfOpen);
        assert_eq!(c.admit(later), Admit::Reject, "one probe at a time");
        c.record(later, true, true);
        assert_eq!(c.state(), State::Closed);
        assert_eq!(c.admit(later), Admit::Send);
    }

    #[test]
    fn a_failed_probe_reopens_for_longer_up_to_the_cap() {
        let t = Instant::now();
        let mut c = circuit();
        for _ in 0..3 {
            c.record(t, false, false);
        }
        let mut now = t + Duration::from_secs(10);
        for expected in [20, 25, 25] {
            assert_eq!(c.admit(now), Admit::Probe);
            c.record(now, true, false);
            assert_eq!(c.state(), State::Open);
            let wait = Duration::from_secs(expected);
            assert_eq!(
                c.admit(now + wait - Duration::from_millis(1)),
                Admit::Reject
            );
            now += wait;
        }
        assert_eq!(c.admit(now), Admit::Probe);
        c.record(now, true, true);
        for _ in 0..3 {
            c.record(now, false, false);
        }
        assert_eq!(
            c.admit(now + Duration::from_secs(10)),
            Admit::Probe,
            "closing resets the open period to its base"
        );
    }

    #[test]
    fn late_answers_of_requests_sent_before_opening() {
        let t = Instant::now();
        let mut c = circuit();
        for _ in 0..3 {
            c.record(t, false, false);
        }
        c.record(t, false, false);
        assert_eq!(c.state(), State::Open, "a late failure changes nothing");
        c.record(t, false, true);
        assert_eq!(c.state(), State::Closed, "a late success closes it");
    }
}
