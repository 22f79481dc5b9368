//! What delivery counts and logs: each event once its cycle is committed, in one place
//! ([`count`]).

use std::time::Duration;

use s2s_common::contract::{AttemptOutcome, DeadLetter, DeliveryCommand};

use crate::metrics::Metrics;

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A new delivery (conversion version × endpoint).
    Scheduled(String),
    /// A conversion version that reached delivery again (an upstream replay).
    Duplicate(String),
    Attempt {
        endpoint: String,
        outcome: AttemptOutcome,
        /// A bounded label: the status class or why there was no answer.
        class: &'static str,
        /// For requests actually sent.
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
    /// A finished delivery forgotten after its retention.
    Expired,
}

/// Counts and logs what a committed cycle did.
pub fn count(m: &Metrics, events: impl IntoIterator<Item = Event>) {
    for e in events {
        match e {
            Event::Scheduled(ep) => m
                .scheduled
                .with_label_values(&[m.endpoint_label(&ep)])
                .inc(),
            Event::Duplicate(ep) => {
                tracing::debug!(endpoint = %ep, "conversion already delivered or scheduled; not sent twice");
                m.duplicates
                    .with_label_values(&[m.endpoint_label(&ep)])
                    .inc();
            }
            Event::Attempt {
                endpoint,
                outcome,
                class,
                latency,
            } => {
                m.attempts
                    .with_label_values(&[m.endpoint_label(&endpoint), outcome.as_str(), class])
                    .inc();
                if let Some(l) = latency {
                    m.attempt_seconds
                        .with_label_values(&[m.endpoint_label(&endpoint)])
                        .observe(l.as_secs_f64());
                }
            }
            Event::Retry(ep) => m.retries.with_label_values(&[m.endpoint_label(&ep)]).inc(),
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
                    .with_label_values(&[m.endpoint_label(&dl.endpoint), dl.reason.as_str()])
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
            Event::Expired => m.expired.inc(),
        }
    }
}
