//! The verifier: reads every output topic (read_committed) and what the affiliate
//! endpoints received, and checks the pipeline's promises against the load generator's
//! ledger:
//!
//! 1. every postback ingest accepted has an outcome (nothing lost), and only one: a repeat
//!    is allowed only as a replay of the same outcome — same `outcome_id`, same decision
//!    and fields, only processing timestamps may differ (counted as replays); anything
//!    else is a violation;
//! 2. every postback got the decision the plan says (attributed, update, or the rejection
//!    reason). Postbacks are grouped by their natural key (click, event, txn_id, status):
//!    each expected decision appears exactly once in the group, and the only others are
//!    `duplicate` rejections of attempts that may have been stored twice (a retried 503
//!    or lost answer, counted by the load generator);
//! 3. every attributed conversion and update reached each endpoint configured for it
//!    (by `webhook-id`) or the dead-letter topic;
//! 4. nothing was set aside as undecodable (the poison topic stays empty);
//! 5. the money: a conversion belongs to the affiliate the click was first registered to;
//!    a conflicting registration got exactly one `click_conflict` rejection; a new
//!    conversion carries the operator's `event_time`; each version's `payout_delta` is its
//!    change against the previous version, and a rejected or reversed conversion pays
//!    nothing (the pipeline's default lifecycle); a pixel's conversion says so (`trust`).
//!
//! [`check`] is pure; [`Watcher`] reads the topics incrementally.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use s2s_common::contract::{self, Conversion, DeadLetter, RejectReason, Rejection};
use s2s_common::kafka::KafkaConfig;
use s2s_common::topics::TopicsConfig;
use s2s_delivery::endpoint::Endpoint;

use crate::load::Entry;
use crate::plan::Expect;

/// An outcome as read from the conversions or rejections topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub outcome_id: String,
    pub postback_id: String,
    /// (click, event, txn_id, status) of the postback.
    pub key: (String, String, String, String),
    pub decision: Expect,
    /// The record with processing timestamps blanked, to compare replays.
    pub identity: String,
    /// For conversions: (conversion_id, version).
    pub conversion: Option<Box<Conversion>>,
}

impl Outcome {
    pub fn from_conversion(c: &Conversion) -> Self {
        let mut blank = c.clone();
        blank.attributed_at_ms = 0;
        Outcome {
            outcome_id: c.outcome_id.clone(),
            postback_id: c.postback_id.clone(),
            key: (
                c.click_id.clone(),
                c.event.clone(),
                c.txn_id.clone().unwrap_or_default(),
                c.status.clone(),
            ),
            decision: if c.version <= 1 {
                Expect::Attributed
            } else {
                Expect::Updated { version: c.version }
            },
            identity: String::from_utf8_lossy(&contract::encode(&blank)).into_owned(),
            conversion: Some(Box::new(c.clone())),
        }
    }

    pub fn from_rejection(r: &Rejection) -> Self {
        let mut blank = r.clone();
        blank.rejected_at_ms = 0;
        let pb = r
            .postback
            .clone()
            .unwrap_or_else(|| s2s_common::contract::Postback {
                schema_version: 1,
                postback_id: String::new(),
                click_id: String::new(),
                event: String::new(),
                txn_id: None,
                amount: None,
                currency: None,
                status: String::new(),
                source: None,
                params: Default::default(),
                ip: None,
                ts_ms: 0,
                event_time_ms: None,
                trust: Default::default(),
            });
        Outcome {
            outcome_id: r.outcome_id.clone(),
            postback_id: pb.postback_id.clone(),
            key: (
                pb.click_id.clone(),
                pb.event.clone(),
                pb.txn_id.clone().unwrap_or_default(),
                pb.status.clone(),
            ),
            decision: Expect::Rejected { reason: r.reason },
            identity: String::from_utf8_lossy(&contract::encode(&blank)).into_owned(),
            conversion: None,
        }
    }
}

/// Everything read from the topics and the endpoints so far.
#[derive(Debug, Default, Clone)]
pub struct Observed {
    pub outcomes: Vec<Outcome>,
    /// Delivery IDs on the dead-letter topic.
    pub dead_lettered: BTreeSet<String>,
    /// `webhook-id` → requests the endpoints received with it.
    pub received: HashMap<String, usize>,
    /// Records set aside as undecodable (the load generator sends none).
    pub poison: usize,
    /// `click_conflict` rejections: (outcome ID, click ID, the record without its
    /// processing time).
    pub click_conflicts: Vec<(String, String, String)>,
}

/// The verdict.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub postbacks: usize,
    pub outcomes: usize,
    /// Identical repeats of an outcome (at-least-once replays).
    pub replays: usize,
    /// Outcomes of postbacks the ledger does not know: attempts that were stored although
    /// their answer said otherwise or never came (allowed, checked through their key).
    pub untracked: usize,
    pub deliveries_expected: usize,
    pub delivered: usize,
    pub dead_lettered: usize,
    /// Requests an endpoint got more than once for one delivery (at-least-once).
    pub repeated_requests: usize,
    /// Postbacks without an outcome, deliveries neither received nor dead-lettered: may
    /// still come; violations once the wait is over.
    pub missing: Vec<String>,
    pub violations: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.missing.is_empty() && self.violations.is_empty()
    }

    pub fn summary(&self) -> String {
        format!(
            "{} postbacks, {} outcomes ({} replays, {} of untracked attempts); {} deliveries expected: {} delivered ({} repeated requests), {} dead-lettered; {} missing, {} violations",
            self.postbacks,
            self.outcomes,
            self.replays,
            self.untracked,
            self.deliveries_expected,
            self.delivered,
            self.repeated_requests,
            self.dead_lettered,
            self.missing.len(),
            self.violations.len()
        )
    }
}

/// Checks `observed` against the `ledger` and the configured `endpoints`.
pub fn check(ledger: &[Entry], observed: &Observed, endpoints: &[Endpoint]) -> Report {
    let mut r = Report {
        postbacks: ledger.len(),
        ..Report::default()
    };
    if observed.poison > 0 {
        r.violations.push(format!(
            "{} records on the poison topic: input the services could not decode",
            observed.poison
        ));
    }
    // 1. One outcome per postback, repeats identical.
    let mut by_postback: BTreeMap<&str, Vec<&Outcome>> = BTreeMap::new();
    for o in &observed.outcomes {
        by_postback.entry(&o.postback_id).or_default().push(o);
    }
    let mut distinct: BTreeMap<&str, &Outcome> = BTreeMap::new();
    for (pb, os) in &by_postback {
        let first = os[0];
        for o in &os[1..] {
            if o.outcome_id != first.outcome_id || o.identity != first.identity {
                r.violations.push(format!(
                    "postback {pb} has two different outcomes: {} and {}",
                    first.identity, o.identity
                ));
            } else {
                r.replays += 1;
            }
        }
        distinct.insert(pb, first);
    }
    r.outcomes = distinct.len();
    let tracked: BTreeSet<&str> = ledger.iter().map(|e| e.postback_id.as_str()).collect();
    r.untracked = distinct.keys().filter(|pb| !tracked.contains(*pb)).count();
    for e in ledger {
        if !distinct.contains_key(e.postback_id.as_str()) {
            r.missing.push(format!(
                "postback {} (story {}, {:?}) has no outcome",
                e.postback_id, e.story, e.expect
            ));
        }
    }
    // 2. The decisions, per natural key.
    type Key = (String, String, String, String);
    let mut expected: BTreeMap<Key, (Vec<Expect>, u32)> = BTreeMap::new();
    for e in ledger {
        let k = (
            e.click_id.clone(),
            e.event.clone(),
            e.txn_id.clone(),
            e.status.clone(),
        );
        let slot = expected.entry(k).or_default();
        slot.0.push(e.expect);
        slot.1 += e.ambiguous;
    }
    let mut got: BTreeMap<&Key, Vec<Expect>> = BTreeMap::new();
    for o in distinct.values() {
        got.entry(&o.key).or_default().push(o.decision);
    }
    let duplicate = Expect::Rejected {
        reason: RejectReason::Duplicate,
    };
    for (key, (want, ambiguous)) in &expected {
        let have = got.get(key).cloned().unwrap_or_default();
        if have.len() < want.len() {
            continue; // reported as missing above
        }
        for w in want.iter().filter(|w| **w != duplicate) {
            let n = have.iter().filter(|h| *h == w).count();
            if n != 1 {
                r.violations
                    .push(format!("{key:?}: expected {w:?} once, got {have:?}"));
            }
        }
        let want_dups = want.iter().filter(|w| **w == duplicate).count();
        let dups = have.iter().filter(|h| **h == duplicate).count();
        let others = have
            .iter()
            .filter(|h| **h != duplicate && !want.contains(h))
            .count();
        if others > 0 || dups < want_dups || dups > want_dups + *ambiguous as usize {
            r.violations.push(format!(
                "{key:?}: expected {want:?} (+ up to {ambiguous} duplicates of retried attempts), got {have:?}"
            ));
        }
    }
    check_money(ledger, observed, &distinct, &mut r);
    // 3. Deliveries of every conversion version.
    for o in distinct.values() {
        let Some(c) = &o.conversion else { continue };
        for ep in endpoints.iter().filter(|e| e.filter.wants(c)) {
            r.deliveries_expected += 1;
            let id = c.delivery_id(&ep.name);
            match observed.received.get(&id) {
                Some(n) if *n > 0 => {
                    r.delivered += 1;
                    r.repeated_requests += n - 1;
                }
                _ if observed.dead_lettered.contains(&id) => r.dead_lettered += 1,
                _ => r.missing.push(format!(
                    "conversion {} v{} not delivered to {} (delivery {id})",
                    c.conversion_id, c.version, ep.name
                )),
            }
        }
    }
    r
}

/// 5. Who is paid, when it happened, what each version pays, and refused registrations.
fn check_money(
    ledger: &[Entry],
    observed: &Observed,
    distinct: &BTreeMap<&str, &Outcome>,
    r: &mut Report,
) {
    let entries: HashMap<&str, &Entry> =
        ledger.iter().map(|e| (e.postback_id.as_str(), e)).collect();
    let mut versions: BTreeMap<&str, BTreeMap<u32, &Conversion>> = BTreeMap::new();
    for (pb, o) in distinct {
        let Some(c) = &o.conversion else { continue };
        versions
            .entry(c.conversion_id.as_str())
            .or_default()
            .insert(c.version, c);
        let Some(e) = entries.get(pb) else { continue };
        if let Some(aff) = e.aff.as_ref().filter(|a| **a != c.aff_id) {
            r.violations.push(format!(
                "conversion {} of click {} went to affiliate {}, the click is registered to {aff}",
                c.conversion_id, c.click_id, c.aff_id
            ));
        }
        if e.pixel && c.trust != s2s_common::contract::Trust::Pixel {
            r.violations.push(format!(
                "conversion {} came through the pixel but says trust {}",
                c.conversion_id,
                c.trust.as_str()
            ));
        }
        if let Some(t) = e
            .event_time_ms
            .filter(|t| c.version == 1 && *t != c.event_ts_ms)
        {
            r.violations.push(format!(
                "conversion {} has event time {}, the operator said {t}",
                c.conversion_id, c.event_ts_ms
            ));
        }
    }
    for (id, vs) in &versions {
        let mut before = rust_decimal::Decimal::ZERO;
        for (n, (v, c)) in vs.iter().enumerate() {
            if usize::try_from(*v).ok() != Some(n + 1) {
                break; // an earlier version is still on its way
            }
            if c.payout_delta != c.payout - before {
                r.violations.push(format!(
                    "conversion {id} v{v}: payout {} after {before}, but payout_delta {}",
                    c.payout, c.payout_delta
                ));
            }
            if ["rejected", "reversed"].contains(&c.status.as_str()) && !c.payout.is_zero() {
                r.violations.push(format!(
                    "conversion {id} v{v} is {} and still pays {}",
                    c.status, c.payout
                ));
            }
            before = c.payout;
        }
    }
    let mut conflicts: BTreeMap<&str, BTreeMap<&str, &str>> = BTreeMap::new();
    for (outcome, click, identity) in &observed.click_conflicts {
        let seen = conflicts.entry(click.as_str()).or_default();
        match seen.get(outcome.as_str()) {
            Some(first) if first != identity => r.violations.push(format!(
                "click_conflict {outcome} of click {click} read twice with different contents"
            )),
            Some(_) => r.replays += 1,
            None => {
                seen.insert(outcome, identity);
            }
        }
    }
    let expected: BTreeSet<&str> = ledger
        .iter()
        .filter(|e| e.click_conflict)
        .map(|e| e.click_id.as_str())
        .collect();
    for click in &expected {
        match conflicts.get(click).map_or(0, BTreeMap::len) {
            0 => r.missing.push(format!(
                "the conflicting registration of click {click} has no click_conflict rejection"
            )),
            1 => {}
            n => r.violations.push(format!(
                "click {click}: one conflicting registration, {n} click_conflict rejections"
            )),
        }
    }
    for click in conflicts.keys().filter(|c| !expected.contains(*c)) {
        r.violations.push(format!(
            "click {click} got a click_conflict rejection, but no conflicting registration was sent"
        ));
    }
}

/// Reads the conversions, rejections, dead-letter and poison topics from the beginning, a little
/// more at each [`Watcher::poll`], outside any consumer group.
pub struct Watcher {
    consumer: BaseConsumer,
    topics: TopicsConfig,
    observed: Observed,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watcher")
    }
}

impl Watcher {
    pub fn new(kafka: &KafkaConfig, topics: &TopicsConfig) -> Result<Self, KafkaError> {
        let group = format!("s2s-verify-{}", s2s_common::ids::new_ulid());
        let consumer: BaseConsumer = kafka.consumer_config(&group).create()?;
        let mut tpl = TopicPartitionList::new();
        for t in [
            &topics.conversions,
            &topics.rejections,
            &topics.dead_letter,
            &topics.poison,
        ] {
            for p in 0..t.partitions {
                tpl.add_partition_offset(&t.name, p, Offset::Beginning)?;
            }
        }
        consumer.assign(&tpl)?;
        Ok(Watcher {
            consumer,
            topics: topics.clone(),
            observed: Observed::default(),
        })
    }

    /// Reads what arrived, for up to `budget` (blocking).
    pub fn poll(&mut self, budget: Duration) -> Result<&Observed, KafkaError> {
        let deadline = std::time::Instant::now() + budget;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.consumer.poll(left.min(Duration::from_millis(100))) {
                Some(Ok(m)) => take(&self.topics, &mut self.observed, &m),
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                // A broker restarting, a connection lost: librdkafka reconnects and goes
                // on from where it was.
                Some(Err(e)) => tracing::warn!(error = %e, "reading the outputs"),
                None => break,
            }
        }
        Ok(&self.observed)
    }

    /// Sets what the endpoints received (`webhook-id` → requests).
    pub fn set_received(&mut self, received: HashMap<String, usize>) {
        self.observed.received = received;
    }
}

/// Decodes one output record into `observed`.
fn take(topics: &TopicsConfig, observed: &mut Observed, m: &rdkafka::message::BorrowedMessage<'_>) {
    let payload = m.payload().unwrap_or_default();
    let topic = m.topic();
    let bad = |e: &dyn std::fmt::Display| tracing::error!(topic, offset = m.offset(), error = %e, "undecodable output record");
    if topic == topics.conversions.name {
        match contract::decode::<Conversion>(payload) {
            Ok(c) => observed.outcomes.push(Outcome::from_conversion(&c)),
            Err(e) => bad(&e),
        }
    } else if topic == topics.rejections.name {
        match contract::decode::<Rejection>(payload) {
            Ok(rj) if rj.postback.is_none() => {
                let mut blank = rj.clone();
                blank.rejected_at_ms = 0;
                observed.click_conflicts.push((
                    rj.outcome_id.clone(),
                    rj.click_id().to_string(),
                    String::from_utf8_lossy(&contract::encode(&blank)).into_owned(),
                ));
            }
            Ok(rj) => observed.outcomes.push(Outcome::from_rejection(&rj)),
            Err(e) => bad(&e),
        }
    } else if topic == topics.poison.name {
        observed.poison += 1;
    } else {
        match contract::decode::<DeadLetter>(payload) {
            Ok(d) => {
                observed.dead_lettered.insert(d.delivery_id);
            }
            Err(e) => bad(&e),
        }
    }
}

/// Polls `watcher` (and `received` for the endpoints' side) until the ledger is fully
/// accounted for or `wait` has passed; the final report lists what is still missing.
/// Needs a multi-threaded runtime (the topic reads block).
pub async fn until_complete(
    mut watcher: Watcher,
    ledger: &[Entry],
    endpoints: &[Endpoint],
    wait: Duration,
    received: impl Fn() -> HashMap<String, usize>,
) -> Result<Report, KafkaError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        tokio::task::block_in_place(|| watcher.poll(Duration::from_millis(500)).map(|_| ()))?;
        watcher.set_received(received());
        let report = check(ledger, &watcher.observed, endpoints);
        if report.missing.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(report);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::Decimal;
    use s2s_delivery::endpoint::Filter;

    fn entry(pb: &str, status: &str, expect: Expect, ambiguous: u32) -> Entry {
        Entry {
            story: 1,
            postback_id: pb.into(),
            click_id: "c".into(),
            event: "ftd".into(),
            txn_id: "t".into(),
            status: status.into(),
            expect,
            ambiguous,
            accepted_at_ms: 0,
            aff: None,
            event_time_ms: None,
            click_conflict: false,
            pixel: false,
        }
    }

    fn conversion(pb: &str, version: u32, status: &str, at: i64) -> Outcome {
        Outcome::from_conversion(&Conversion {
            version,
            outcome_id: format!("o-{pb}"),
            postback_id: pb.into(),
            txn_id: Some("t".into()),
            status: status.into(),
            payout_delta: if version == 1 {
                Decimal::new(5000, 2)
            } else {
                Decimal::ZERO
            },
            click_ts_ms: 0,
            event_ts_ms: 0,
            received_ts_ms: 0,
            attributed_at_ms: at,
            ..s2s_common::fixtures::conversion("cv", "c")
        })
    }

    fn rejection(pb: &str, status: &str, reason: RejectReason) -> Outcome {
        let mut o = Outcome::from_rejection(&Rejection {
            outcome_id: format!("o-{pb}"),
            postback: None,
            ..s2s_common::fixtures::rejection(s2s_common::fixtures::postback(pb, "c"), reason)
        });
        o.postback_id = pb.into();
        o.key = ("c".into(), "ftd".into(), "t".into(), status.into());
        o
    }

    fn endpoint() -> Endpoint {
        Endpoint {
            name: "aff".into(),
            method: s2s_delivery::endpoint::Method::Get,
            url: s2s_common::template::Template::parse("http://a/", &[]).expect("t"),
            body: None,
            headers: vec![],
            filter: Filter {
                send_updates: true,
                ..Filter::default()
            },
            max_in_flight: 1,
            timeout: Duration::from_secs(1),
            secret: None,
            enabled: true,
        }
    }

    fn delivered(outcomes: &[Outcome]) -> HashMap<String, usize> {
        outcomes
            .iter()
            .filter_map(|o| o.conversion.as_ref())
            .map(|c| (c.delivery_id("aff"), 1))
            .collect()
    }

    #[test]
    fn a_clean_run_and_identical_replays_pass() {
        let ledger = [
            entry("p1", "pending", Expect::Attributed, 0),
            entry("p2", "approved", Expect::Updated { version: 2 }, 0),
        ];
        let outcomes = vec![
            conversion("p1", 1, "pending", 10),
            conversion("p2", 2, "approved", 20),
            conversion("p1", 1, "pending", 99), // a replay: only the timestamp differs
        ];
        let observed = Observed {
            received: delivered(&outcomes),
            outcomes,
            ..Observed::default()
        };
        let r = check(&ledger, &observed, &[endpoint()]);
        assert!(r.ok(), "{r:?}");
        assert_eq!((r.replays, r.deliveries_expected, r.delivered), (1, 2, 2));
    }

    #[test]
    fn a_different_second_outcome_a_wrong_decision_and_a_loss_are_caught() {
        let ledger = [entry("p1", "approved", Expect::Attributed, 0)];
        let mut other = conversion("p1", 1, "approved", 10);
        other.identity.push('x');
        let observed = Observed {
            outcomes: vec![conversion("p1", 1, "approved", 10), other],
            ..Observed::default()
        };
        let r = check(&ledger, &observed, &[]);
        assert!(r.violations[0].contains("two different outcomes"), "{r:?}");

        let wrong = Observed {
            outcomes: vec![rejection("p1", "approved", RejectReason::UnknownClick)],
            ..Observed::default()
        };
        let r = check(&ledger, &wrong, &[]);
        assert_eq!(r.violations.len(), 2, "{r:?}");

        let r = check(&ledger, &Observed::default(), &[]);
        assert_eq!(r.missing.len(), 1);
        assert!(!r.ok());

        let poisoned = Observed {
            outcomes: vec![conversion("p1", 1, "approved", 10)],
            poison: 2,
            ..Observed::default()
        };
        let r = check(&ledger, &poisoned, &[]);
        assert!(
            r.violations[0].contains("2 records on the poison topic"),
            "{r:?}"
        );
    }

    #[test]
    fn retried_attempts_may_add_duplicates_and_nothing_else() {
        // p1 was answered 503 once and stored anyway (as p0): p0 attributed, p1 duplicate.
        let ledger = [entry("p1", "approved", Expect::Attributed, 1)];
        let outcomes = vec![
            conversion("p0", 1, "approved", 10),
            rejection("p1", "approved", RejectReason::Duplicate),
        ];
        let observed = Observed {
            received: delivered(&outcomes),
            outcomes,
            ..Observed::default()
        };
        let r = check(&ledger, &observed, &[endpoint()]);
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.untracked, 1);
        // Without a retried attempt, the same observations are a violation.
        let strict = [entry("p1", "approved", Expect::Attributed, 0)];
        assert!(!check(&strict, &observed, &[endpoint()]).ok());
    }

    #[test]
    fn deliveries_are_received_or_dead_lettered() {
        let ledger = [entry("p1", "approved", Expect::Attributed, 0)];
        let outcomes = vec![conversion("p1", 1, "approved", 10)];
        let id = outcomes[0]
            .conversion
            .as_ref()
            .expect("c")
            .delivery_id("aff");
        let mut observed = Observed {
            outcomes,
            ..Observed::default()
        };
        let r = check(&ledger, &observed, &[endpoint()]);
        assert_eq!(r.missing.len(), 1, "{r:?}");
        observed.dead_lettered.insert(id.clone());
        let r = check(&ledger, &observed, &[endpoint()]);
        assert!(r.ok() && r.dead_lettered == 1, "{r:?}");
        observed.received.insert(id, 3);
        let r = check(&ledger, &observed, &[endpoint()]);
        assert_eq!((r.delivered, r.repeated_requests), (1, 2));
    }

    #[test]
    fn money_checks_who_is_paid_what_and_refused_registrations() {
        let mut e1 = entry("p1", "approved", Expect::Attributed, 0);
        e1.aff = Some("42".into());
        e1.event_time_ms = Some(0);
        let e2 = entry("p2", "reversed", Expect::Updated { version: 2 }, 0);
        let ledger = vec![e1.clone(), e2];
        let v1 = conversion("p1", 1, "approved", 1);
        let mut v2 = conversion("p2", 2, "reversed", 2);
        let observed = |outcomes: Vec<Outcome>| Observed {
            outcomes,
            ..Observed::default()
        };
        // A reversal that still pays.
        let r = check(&ledger, &observed(vec![v1.clone(), v2.clone()]), &[]);
        assert!(
            r.violations
                .iter()
                .any(|v| v.contains("is reversed and still pays")),
            "{:?}",
            r.violations
        );
        // The right one: payout 0, the delta takes the 50 back.
        if let Some(c) = v2.conversion.as_mut() {
            c.payout = Decimal::ZERO;
            c.payout_delta = Decimal::new(-5000, 2);
        }
        let r = check(&ledger, &observed(vec![v1.clone(), v2.clone()]), &[]);
        assert!(r.ok(), "{r:?}");
        // A delta that does not add up.
        let mut bad = v2.clone();
        if let Some(c) = bad.conversion.as_mut() {
            c.payout_delta = Decimal::ZERO;
        }
        let r = check(&ledger, &observed(vec![v1.clone(), bad]), &[]);
        assert!(
            r.violations.iter().any(|v| v.contains("payout_delta")),
            "{r:?}"
        );
        // Another affiliate, another event time.
        let mut stolen = v1.clone();
        if let Some(c) = stolen.conversion.as_mut() {
            c.aff_id = "43".into();
            c.event_ts_ms = 7;
        }
        let r = check(&ledger, &observed(vec![stolen, v2.clone()]), &[]);
        assert_eq!(r.violations.len(), 2, "{:?}", r.violations);

        // Conflicts: one expected, one rejection (read twice) → fine.
        let mut conflicted = e1;
        conflicted.click_conflict = true;
        let ledger = vec![conflicted];
        let conflict =
            |id: &str, click: &str| (id.to_string(), click.to_string(), format!("{id}{click}"));
        let mut o = observed(vec![v1]);
        let r = check(&ledger, &o, &[]);
        assert_eq!(r.missing.len(), 1, "not read yet: {r:?}");
        o.click_conflicts = vec![conflict("x", "c"), conflict("x", "c")];
        let r = check(&ledger, &o, &[]);
        assert!(r.ok() && r.replays == 1, "{r:?}");
        o.click_conflicts.push(conflict("y", "c"));
        o.click_conflicts.push(conflict("z", "other"));
        let r = check(&ledger, &o, &[]);
        assert_eq!(r.violations.len(), 2, "{:?}", r.violations);
    }
}
