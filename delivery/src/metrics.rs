//! Delivery's own Prometheus metrics (the runtime's are `stream_*{service="delivery"}`).
//! Each event is counted in one place: circuit transitions where the breaker is fed,
//! everything else after the cycle that produced the event was committed. The `endpoint`
//! label takes the config file's postback names and `catalog` for every catalog postback
//! ([`Metrics::endpoint_label`]), so it is bounded by the config file.

use std::collections::HashSet;
use std::sync::Arc;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

#[derive(Debug, Clone)]
pub struct Metrics {
    /// `delivery_attempts_total{endpoint, outcome, status_class}`: outcome delivered,
    /// retryable or permanent; status_class `2xx`… or, without an answer, `timeout`,
    /// `connect_error`, `network_error`, `invalid_request`, `circuit_open`, `unconfigured`.
    pub attempts: IntCounterVec,
    /// `delivery_attempt_duration_seconds{endpoint}`: requests actually sent.
    pub attempt_seconds: HistogramVec,
    /// `delivery_scheduled_total{endpoint}`: new deliveries (conversion × endpoint).
    pub scheduled: IntCounterVec,
    /// `delivery_duplicates_total{endpoint}`: a conversion version that reached delivery
    /// again (an upstream replay) and was not delivered twice.
    pub duplicates: IntCounterVec,
    /// `delivery_retries_scheduled_total{endpoint}`.
    pub retries: IntCounterVec,
    /// `delivery_dead_lettered_total{endpoint, reason}`: attempts_exhausted,
    /// permanent_failure, postback_removed.
    pub dead_lettered: IntCounterVec,
    /// `delivery_attributed_to_delivered_seconds`: conversion decided → affiliate's 2xx.
    pub end_to_end_seconds: Histogram,
    /// `delivery_pending_deliveries{endpoint}`: waiting for their first attempt or a retry.
    pub pending: IntGaugeVec,
    /// `delivery_oldest_pending_age_seconds{endpoint}`: age of the oldest pending delivery.
    pub oldest_pending_seconds: IntGaugeVec,
    /// `delivery_in_flight_requests{endpoint}`.
    pub in_flight: IntGaugeVec,
    /// `delivery_circuit_state{endpoint, state}`: 1 for the current state, else 0.
    pub circuit_state: IntGaugeVec,
    /// `delivery_circuit_transitions_total{endpoint, state}`: entries into a state.
    pub circuit_transitions: IntCounterVec,
    /// `delivery_commands_total{action, result}`: operator commands applied.
    pub commands: IntCounterVec,
    /// `delivery_attempts_lost_total{endpoint}`: attempts that did not complete (a panic);
    /// their deliveries stay due.
    pub attempts_lost: IntCounterVec,
    /// `delivery_expired_total`: finished deliveries forgotten after their retention.
    pub expired: IntCounter,
    /// The config file's postbacks, labelled by their own names; see
    /// [`Metrics::endpoint_label`].
    own: Arc<HashSet<String>>,
}

/// The `endpoint` label every catalog postback shares.
pub const CATALOG_ENDPOINTS: &str = "catalog";

impl Metrics {
    /// The `endpoint` label of postback `name`: its own name for a postback of the config
    /// file (a few, fixed at start-up), `catalog` for every catalog postback — there can
    /// be one per affiliate, and a label per postback would make series without bound
    /// (a catalog postback's own figures are in the console's endpoints list). Gauges of
    /// `catalog` add up (pending, in flight, circuits per state) or take the worst (the
    /// oldest pending) over the catalog's postbacks.
    pub fn endpoint_label<'a>(&self, name: &'a str) -> &'a str {
        if self.own.contains(name) {
            name
        } else {
            CATALOG_ENDPOINTS
        }
    }

    /// Metrics whose `endpoint` label names `own` postbacks (the config file's) apart.
    pub fn with_own_endpoints(mut self, own: impl IntoIterator<Item = String>) -> Self {
        self.own = Arc::new(own.into_iter().collect());
        self
    }

    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels)
        };
        let m = Metrics {
            attempts: counter(
                "delivery_attempts_total",
                "Delivery attempts by endpoint, outcome and status class (or failure without an answer).",
                &["endpoint", "outcome", "status_class"],
            )?,
            attempt_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "delivery_attempt_duration_seconds",
                    "Latency of one HTTP attempt, connect to last body byte.",
                )
                .buckets(prometheus::exponential_buckets(0.001, 2.5, 12)?),
                &["endpoint"],
            )?,
            scheduled: counter(
                "delivery_scheduled_total",
                "New deliveries scheduled (conversion version x matching endpoint).",
                &["endpoint"],
            )?,
            duplicates: counter(
                "delivery_duplicates_total",
                "Conversions that reached delivery again and were not delivered twice.",
                &["endpoint"],
            )?,
            retries: counter(
                "delivery_retries_scheduled_total",
                "Retries scheduled after a retryable failure.",
                &["endpoint"],
            )?,
            dead_lettered: counter(
                "delivery_dead_lettered_total",
                "Deliveries sent to the dead-letter topic, by why.",
                &["endpoint", "reason"],
            )?,
            end_to_end_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "delivery_attributed_to_delivered_seconds",
                    "From attribution to the affiliate's 2xx.",
                )
                .buckets(prometheus::exponential_buckets(0.005, 2.0, 24)?),
            )?,
            pending: gauge(
                "delivery_pending_deliveries",
                "Deliveries waiting for their first attempt or a retry.",
                &["endpoint"],
            )?,
            oldest_pending_seconds: gauge(
                "delivery_oldest_pending_age_seconds",
                "Age of the oldest pending delivery.",
                &["endpoint"],
            )?,
            in_flight: gauge(
                "delivery_in_flight_requests",
                "HTTP requests in flight.",
                &["endpoint"],
            )?,
            circuit_state: gauge(
                "delivery_circuit_state",
                "Circuit breaker state per endpoint: 1 for the current state.",
                &["endpoint", "state"],
            )?,
            circuit_transitions: counter(
                "delivery_circuit_transitions_total",
                "Circuit breaker transitions, by the state entered.",
                &["endpoint", "state"],
            )?,
            commands: counter(
                "delivery_commands_total",
                "Operator commands applied, by action and result.",
                &["action", "result"],
            )?,
            attempts_lost: counter(
                "delivery_attempts_lost_total",
                "Attempts that did not complete (a bug: a panic); their deliveries stay due.",
                &["endpoint"],
            )?,
            expired: IntCounter::new(
                "delivery_expired_total",
                "Finished deliveries forgotten after finished_retention.",
            )?,
            own: Arc::default(),
        };
        registry.register(Box::new(m.attempts.clone()))?;
        registry.register(Box::new(m.attempt_seconds.clone()))?;
        registry.register(Box::new(m.scheduled.clone()))?;
        registry.register(Box::new(m.duplicates.clone()))?;
        registry.register(Box::new(m.retries.clone()))?;
        registry.register(Box::new(m.dead_lettered.clone()))?;
        registry.register(Box::new(m.end_to_end_seconds.clone()))?;
        registry.register(Box::new(m.pending.clone()))?;
        registry.register(Box::new(m.oldest_pending_seconds.clone()))?;
        registry.register(Box::new(m.in_flight.clone()))?;
        registry.register(Box::new(m.circuit_state.clone()))?;
        registry.register(Box::new(m.circuit_transitions.clone()))?;
        registry.register(Box::new(m.commands.clone()))?;
        registry.register(Box::new(m.attempts_lost.clone()))?;
        registry.register(Box::new(m.expired.clone()))?;
        Ok(m)
    }
}
