//! Starting attempts: request slots, circuits and the report channel. HTTP attempts run as
//! tasks of their own and report back over a channel, so no endpoint — slow, failing or
//! dead — ever holds up another or the input.
//!
//! Slots are semaphores, one per endpoint (`max_in_flight` of the postback) and one for the
//! instance; an attempt's permits move into its task and are released when it ends, however
//! it ends. An attempt that panics reports back without a result: its slot is free and its
//! delivery stays due (the processor puts it back in its queue). Every attempt goes through
//! its endpoint's circuit breaker ([`crate::circuit`]), fed by what the results say
//! ([`crate::policy::circuit_health`]).

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{mpsc, Semaphore};

use crate::circuit::{Admit, Circuit, CircuitConfig, State};
use crate::endpoint::{Endpoint, Request};
use crate::metrics::Metrics;
use crate::sender::{Sender, Sent};
use crate::settle::AttemptResult;

/// Sends one request with a timeout: the HTTP client, or a stand-in in tests.
pub type SendFn = Arc<dyn Fn(Request, Duration) -> BoxFuture<'static, Sent> + Send + Sync>;

/// The HTTP client as a [`SendFn`].
pub fn http(sender: Sender) -> SendFn {
    Arc::new(move |request, timeout| {
        let sender = sender.clone();
        async move { sender.send(&request, timeout).await }.boxed()
    })
}

/// An attempt's report to the processor.
#[derive(Debug, Clone)]
pub struct Report {
    pub partition: i32,
    /// The ownership of the partition the attempt was started under; a report of an
    /// earlier one is void.
    pub generation: u64,
    /// The due key the delivery was taken from.
    pub key: Vec<u8>,
    pub delivery_id: String,
    pub endpoint: String,
    /// A half-open circuit's probe.
    pub probe: bool,
    /// `None`: the attempt did not complete (it panicked); the delivery stays due.
    pub result: Option<AttemptResult>,
}

pub struct Dispatcher {
    /// Shared with the catalog's view they were compiled in: a catalog change copies
    /// pointers, not endpoints.
    endpoints: Vec<Arc<Endpoint>>,
    by_name: HashMap<String, usize>,
    slots: Vec<Arc<Semaphore>>,
    total: Arc<Semaphore>,
    max_total: usize,
    circuits: Vec<Circuit>,
    /// What a new endpoint's circuit starts with.
    circuit: CircuitConfig,
    send: SendFn,
    tx: mpsc::UnboundedSender<Report>,
    rx: Option<mpsc::UnboundedReceiver<Report>>,
    metrics: Metrics,
    /// Circuits per state, by `endpoint` label (a file postback's own: 1 for its state;
    /// `catalog`: how many catalog postbacks are in each), kept as circuits move.
    circuit_counts: BTreeMap<String, [i64; 3]>,
    /// The file postbacks (labelled by their own names), and whether there are catalog
    /// ones: what the in-flight gauges are set for.
    own: Vec<usize>,
    catalog: bool,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("endpoints", &self.endpoints.len())
            .field("in_flight", &self.in_flight_total())
            .finish()
    }
}

impl Dispatcher {
    pub fn new(
        endpoints: Vec<Endpoint>,
        circuit: CircuitConfig,
        max_in_flight: usize,
        send: SendFn,
        metrics: Metrics,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut d = Dispatcher {
            by_name: endpoints
                .iter()
                .enumerate()
                .map(|(i, e)| (e.name.clone(), i))
                .collect(),
            slots: endpoints
                .iter()
                .map(|e| Arc::new(Semaphore::new(e.max_in_flight)))
                .collect(),
            circuits: endpoints.iter().map(|_| Circuit::new(circuit)).collect(),
            circuit,
            total: Arc::new(Semaphore::new(max_in_flight)),
            max_total: max_in_flight,
            endpoints: endpoints.into_iter().map(Arc::new).collect(),
            send,
            tx,
            rx: Some(rx),
            metrics,
            circuit_counts: BTreeMap::new(),
            own: Vec::new(),
            catalog: false,
        };
        d.count_circuits();
        d
    }

    /// Counts every circuit by label and state again, and sets the gauges (after the
    /// endpoints changed).
    fn count_circuits(&mut self) {
        let mut counts: BTreeMap<String, [i64; 3]> = BTreeMap::new();
        self.own.clear();
        self.catalog = false;
        for (i, (ep, c)) in self.endpoints.iter().zip(&self.circuits).enumerate() {
            let label = self.metrics.endpoint_label(&ep.name);
            if label == crate::metrics::CATALOG_ENDPOINTS {
                self.catalog = true;
            } else {
                self.own.push(i);
            }
            counts.entry(label.to_string()).or_default()[state_index(c.state())] += 1;
        }
        // A label no endpoint has any more shows none in every state.
        for old in self.circuit_counts.keys() {
            counts.entry(old.clone()).or_default();
        }
        for (label, n) in &counts {
            set_circuit_gauges(&self.metrics, label, n);
        }
        self.circuit_counts = counts;
    }

    /// Replaces the endpoints (a catalog change). An endpoint that keeps its name keeps
    /// its circuit, and its request slots unless its `max_in_flight` changed (attempts in
    /// flight then hold the old slots until they end); a new one starts closed.
    pub fn set_endpoints(&mut self, endpoints: Vec<Arc<Endpoint>>) {
        let mut slots = Vec::with_capacity(endpoints.len());
        let mut circuits = Vec::with_capacity(endpoints.len());
        for ep in &endpoints {
            match self.index(&ep.name) {
                Some(i) => {
                    circuits.push(self.circuits[i].clone());
                    slots.push(if self.endpoints[i].max_in_flight == ep.max_in_flight {
                        Arc::clone(&self.slots[i])
                    } else {
                        Arc::new(Semaphore::new(ep.max_in_flight))
                    });
                }
                None => {
                    circuits.push(Circuit::new(self.circuit));
                    slots.push(Arc::new(Semaphore::new(ep.max_in_flight)));
                }
            }
        }
        self.by_name = endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        self.slots = slots;
        self.circuits = circuits;
        self.endpoints = endpoints;
        self.count_circuits();
    }

    /// The reports of every attempt started; taken once.
    pub fn reports(&mut self) -> Option<mpsc::UnboundedReceiver<Report>> {
        self.rx.take()
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    pub fn index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// Attempts endpoint `i` may start now (none while it is disabled).
    pub fn room(&self, i: usize) -> usize {
        if !self.endpoints[i].enabled {
            return 0;
        }
        self.slots[i]
            .available_permits()
            .min(self.total.available_permits())
    }

    /// Whether every slot of the instance is taken.
    pub fn full(&self) -> bool {
        self.total.available_permits() == 0
    }

    pub fn in_flight(&self, i: usize) -> usize {
        self.endpoints[i]
            .max_in_flight
            .saturating_sub(self.slots[i].available_permits())
    }

    pub fn in_flight_total(&self) -> usize {
        self.max_total
            .saturating_sub(self.total.available_permits())
    }

    /// Asks endpoint `i`'s circuit whether an attempt may go out now.
    pub fn admit(&mut self, i: usize, now: Instant) -> Admit {
        let before = self.circuits[i].state();
        let admit = self.circuits[i].admit(now);
        self.circuit_moved(i, before);
        admit
    }

    /// Starts `request` to endpoint `i` as a task holding a slot; its report comes back
    /// on [`Dispatcher::reports`] with the result filled in. `false` when no slot is free.
    pub fn start(&self, i: usize, request: Request, attempt: u32, mut report: Report) -> bool {
        let Ok(slot) = Arc::clone(&self.slots[i]).try_acquire_owned() else {
            return false;
        };
        let Ok(total) = Arc::clone(&self.total).try_acquire_owned() else {
            return false;
        };
        let (send, tx, timeout) = (
            Arc::clone(&self.send),
            self.tx.clone(),
            self.endpoints[i].timeout,
        );
        tokio::spawn(async move {
            let url = request.url.clone();
            let sent = AssertUnwindSafe(send(request, timeout))
                .catch_unwind()
                .await;
            report.result = sent.ok().map(|sent| AttemptResult {
                attempt,
                url,
                sent,
                at_ms: s2s_common::now_ms(),
            });
            // The slots are free before the report arrives, so that the processor can start
            // the next attempt at once.
            drop((slot, total));
            // The processor is gone only when the service stops; the attempt is made again
            // after the restart.
            let _ = tx.send(report);
        });
        true
    }

    /// Feeds a report to its endpoint's circuit.
    pub fn on_report(&mut self, r: &Report) {
        let Some(i) = self.index(&r.endpoint) else {
            return;
        };
        let Some(healthy) = r
            .result
            .as_ref()
            .and_then(|res| crate::policy::circuit_health(&res.sent))
        else {
            return;
        };
        let before = self.circuits[i].state();
        self.circuits[i].record(Instant::now(), r.probe, healthy);
        self.circuit_moved(i, before);
    }

    /// Sets the in-flight gauges: each file postback's own, and the catalog's postbacks'
    /// together (what the instance has in flight less the file postbacks').
    pub fn gauges(&self) {
        let mut own = 0;
        for &i in &self.own {
            let n = self.in_flight(i);
            own += n;
            self.metrics
                .in_flight
                .with_label_values(&[&self.endpoints[i].name])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        if self.catalog {
            let n = self.in_flight_total().saturating_sub(own);
            self.metrics
                .in_flight
                .with_label_values(&[crate::metrics::CATALOG_ENDPOINTS])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Counts and logs a circuit transition of endpoint `i`, if there was one.
    fn circuit_moved(&mut self, i: usize, before: State) {
        let after = self.circuits[i].state();
        if after == before {
            return;
        }
        let name = &self.endpoints[i].name;
        let label = self.metrics.endpoint_label(name);
        self.metrics
            .circuit_transitions
            .with_label_values(&[label, after.as_str()])
            .inc();
        if let Some(n) = self.circuit_counts.get_mut(label) {
            n[state_index(before)] -= 1;
            n[state_index(after)] += 1;
            set_circuit_gauges(&self.metrics, label, n);
        }
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
}

/// `delivery_circuit_state{endpoint=label}`: how many of the label's circuits are in
/// each state.
fn set_circuit_gauges(m: &Metrics, label: &str, counts: &[i64; 3]) {
    for s in State::ALL {
        m.circuit_state
            .with_label_values(&[label, s.as_str()])
            .set(counts[state_index(s)]);
    }
}

fn state_index(s: State) -> usize {
    State::ALL.iter().position(|x| *x == s).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::endpoint::tests::{conv, endpoint};

    fn report() -> Report {
        Report {
            partition: 0,
            generation: 1,
            key: b"due".to_vec(),
            delivery_id: "d1".into(),
            endpoint: "e".into(),
            probe: false,
            result: None,
        }
    }

    fn dispatcher(send: SendFn) -> Dispatcher {
        let mut ep = endpoint("https://aff.example/pb?c={click_id}");
        ep.max_in_flight = 1;
        let circuit = CircuitConfig {
            failure_threshold: 5,
            open_for: Duration::from_secs(30),
            max_open_for: Duration::from_secs(300),
        };
        let metrics = Metrics::new(&prometheus::Registry::new()).expect("metrics");
        Dispatcher::new(vec![ep], circuit, 8, send, metrics)
    }

    #[tokio::test]
    async fn a_panicking_attempt_frees_its_slot_and_reports_no_result() {
        let calls = Arc::new(AtomicU32::new(0));
        let seen = Arc::clone(&calls);
        let send: SendFn = Arc::new(move |_request, _timeout| {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    panic!("a bug in the attempt");
                }
                Sent {
                    status: Some(200),
                    failure: None,
                    error: None,
                    retry_after: None,
                    latency: Duration::from_millis(1),
                }
            }
            .boxed()
        });
        let mut d = dispatcher(send);
        let mut reports = d.reports().expect("reports");
        let request = d.endpoints()[0].request(&conv(), "d1", 0);
        assert!(d.start(0, request.clone(), 1, report()));
        assert_eq!(d.room(0), 0, "the endpoint's one slot is taken");
        assert!(
            !d.start(0, request.clone(), 1, report()),
            "no second attempt while it is"
        );
        let r = tokio::time::timeout(Duration::from_secs(10), reports.recv())
            .await
            .expect("a report within 10 s")
            .expect("report");
        assert_eq!(r.result, None, "the attempt did not complete");
        assert_eq!(r.key, b"due", "the report names the due key to put back");
        assert_eq!((d.room(0), d.in_flight_total()), (1, 0), "its slot is free");
        d.on_report(&r);
        assert_eq!(
            d.circuits[0].state(),
            State::Closed,
            "a panic says nothing about the endpoint"
        );
        assert!(d.start(0, request, 1, report()), "the next attempt starts");
        let r = tokio::time::timeout(Duration::from_secs(10), reports.recv())
            .await
            .expect("a report within 10 s")
            .expect("report");
        let result = r.result.expect("a result");
        assert_eq!((result.attempt, result.sent.status), (1, Some(200)));
        assert_eq!(result.url, "https://aff.example/pb?c=c%201");
    }

    #[tokio::test]
    async fn failures_trip_the_circuit_and_answers_close_it() {
        let send: SendFn = Arc::new(|_r, _t| {
            async { Sent::not_sent(crate::sender::Failure::Network, String::new()) }.boxed()
        });
        let mut d = dispatcher(send);
        let failed = |status: Option<u16>| Report {
            result: Some(AttemptResult {
                attempt: 1,
                url: String::new(),
                sent: Sent {
                    status,
                    failure: status.is_none().then_some(crate::sender::Failure::Timeout),
                    error: None,
                    retry_after: None,
                    latency: Duration::ZERO,
                },
                at_ms: 0,
            }),
            ..report()
        };
        for _ in 0..5 {
            d.on_report(&failed(Some(503)));
        }
        assert_eq!(d.circuits[0].state(), State::Open, "five 503s open it");
        assert_eq!(d.admit(0, Instant::now()), Admit::Reject);
        let mut fresh = dispatcher(Arc::new(|_r, _t| {
            async { Sent::not_sent(crate::sender::Failure::Network, String::new()) }.boxed()
        }));
        for _ in 0..4 {
            fresh.on_report(&failed(None));
        }
        fresh.on_report(&failed(Some(404)));
        assert_eq!(
            fresh.circuits[0].state(),
            State::Closed,
            "a 404 is the server's answer: the count starts again"
        );
    }

    #[test]
    fn new_endpoints_keep_the_circuit_of_a_name_and_a_disabled_one_has_no_room() {
        let send: SendFn = Arc::new(|_r, _t| {
            async { Sent::not_sent(crate::sender::Failure::Network, String::new()) }.boxed()
        });
        let mut d = dispatcher(send);
        for _ in 0..5 {
            d.on_report(&Report {
                result: Some(AttemptResult {
                    attempt: 1,
                    url: String::new(),
                    sent: Sent::not_sent(crate::sender::Failure::Network, String::new()),
                    at_ms: 0,
                }),
                ..report()
            });
        }
        assert_eq!(d.circuits[0].state(), State::Open);
        let mut moved = endpoint("https://new.example/pb");
        moved.max_in_flight = 1;
        let mut added = endpoint("https://other.example/");
        added.name = "other".into();
        added.enabled = false;
        d.set_endpoints(vec![Arc::new(added), Arc::new(moved)]);
        assert_eq!((d.index("other"), d.index("e")), (Some(0), Some(1)));
        assert_eq!(
            d.circuits[1].state(),
            State::Open,
            "e keeps its open circuit"
        );
        assert_eq!(
            d.circuits[0].state(),
            State::Closed,
            "a new one starts closed"
        );
        assert_eq!(d.room(0), 0, "a disabled endpoint starts nothing");
        assert_eq!(d.room(1), 1);
        let request = d.endpoints()[1].request(&conv(), "d1", 0);
        assert_eq!(request.url, "https://new.example/pb", "its new URL");
        d.set_endpoints(vec![]);
        assert_eq!(
            d.index("e"),
            None,
            "removed: its deliveries are dead-lettered"
        );
    }
}
