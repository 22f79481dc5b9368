//! Example records of every type in the wire contract, for tests, benchmarks and checks:
//! the one place that builds them, so that a field added to the contract is added here
//! once. Each record is complete and valid, and the records agree with each other (the
//! conversion is the click's, the attempt and the dead letter are the conversion's).
//! A test changes what it is about with struct update syntax:
//!
//! ```
//! use s2s_common::{contract::Click, fixtures};
//! let click = Click { offer_id: "7".into(), ..fixtures::click("c1") };
//! assert_eq!((click.aff_id.as_str(), click.offer_id.as_str()), ("42", "7"));
//! ```

use rust_decimal::Decimal;

use crate::contract::{
    AttemptOutcome, Click, CommandAction, Conversion, DeadLetter, DeadLetterReason,
    DeliveryAttempt, DeliveryCommand, Params, PayoutRule, Postback, Refusal, RejectReason,
    Rejection, Trust, SCHEMA_VERSION,
};
use crate::ids::derived;

/// When the example click happened (2023-11-14T22:13:20Z); the other records follow it.
pub const T0_MS: i64 = 1_700_000_000_000;

/// The example postback arrives a minute after its click.
pub const POSTBACK_AFTER_MS: i64 = 60_000;

/// A click on offer `1` by affiliate `42` with `sub1=spring`, at [`T0_MS`].
pub fn click(click_id: &str) -> Click {
    Click {
        schema_version: SCHEMA_VERSION,
        click_id: click_id.into(),
        offer_id: "1".into(),
        aff_id: "42".into(),
        subs: [("sub1".to_string(), "spring".to_string())].into(),
        params: Params::new(),
        ip: Some("203.0.113.9".into()),
        user_agent: Some("Mozilla/5.0 (X11; Linux x86_64)".into()),
        referrer: None,
        ts_ms: T0_MS,
    }
}

/// An approved FTD for `click_id`, server to server, without amount or transaction ID,
/// received [`POSTBACK_AFTER_MS`] after the example click.
pub fn postback(postback_id: &str, click_id: &str) -> Postback {
    Postback {
        schema_version: SCHEMA_VERSION,
        postback_id: postback_id.into(),
        click_id: click_id.into(),
        event: "ftd".into(),
        txn_id: None,
        amount: None,
        currency: None,
        status: "approved".into(),
        source: None,
        params: Params::new(),
        ip: Some("198.51.100.7".into()),
        ts_ms: T0_MS + POSTBACK_AFTER_MS,
        event_time_ms: None,
        trust: Trust::S2s,
    }
}

/// The outcome ID the attributor derives from a postback.
pub fn outcome_id(postback_id: &str) -> String {
    derived("outcome", &[postback_id])
}

/// Version 1 of the conversion of the example click `click_id`: an approved FTD of
/// 100.00 EUR paying the affiliate the offer's 50.00 USD. Its postback is
/// `pb-{conversion_id}`.
pub fn conversion(conversion_id: &str, click_id: &str) -> Conversion {
    let postback_id = format!("pb-{conversion_id}");
    let received = T0_MS + POSTBACK_AFTER_MS;
    Conversion {
        schema_version: SCHEMA_VERSION,
        conversion_id: conversion_id.into(),
        version: 1,
        outcome_id: outcome_id(&postback_id),
        postback_id,
        click_id: click_id.into(),
        offer_id: "1".into(),
        aff_id: "42".into(),
        subs: [("sub1".to_string(), "spring".to_string())].into(),
        event: "ftd".into(),
        txn_id: Some(format!("T-{conversion_id}")),
        status: "approved".into(),
        amount: Some(Decimal::new(10_000, 2)),
        currency: Some("EUR".into()),
        payout: Decimal::new(5_000, 2),
        payout_currency: "USD".into(),
        payout_delta: Decimal::new(5_000, 2),
        priced_payout: Decimal::new(5_000, 2),
        payout_rule: PayoutRule::default(),
        click_ts_ms: T0_MS,
        event_ts_ms: received,
        received_ts_ms: received,
        attributed_at_ms: received + 10,
        previous_status: None,
        status_reason: None,
        trust: Trust::S2s,
        suspicious: false,
        catalog_revision: Some(3),
    }
}

/// The rejection of `postback` for `reason`, decided 10 ms after it was received.
pub fn rejection(postback: Postback, reason: RejectReason) -> Rejection {
    Rejection {
        schema_version: SCHEMA_VERSION,
        outcome_id: outcome_id(&postback.postback_id),
        reason,
        detail: format!("rejected: {}", reason.as_str()),
        rejected_at_ms: postback.ts_ms + 10,
        postback: Some(postback),
        click: None,
        catalog_revision: Some(3),
    }
}

/// Attempt number `attempt` to deliver `c` to `endpoint`: a 200 when `outcome` is
/// delivered, else a 503 (retried a minute later when retryable).
pub fn attempt(
    c: &Conversion,
    endpoint: &str,
    attempt: u32,
    outcome: AttemptOutcome,
) -> DeliveryAttempt {
    let ts_ms = c.attributed_at_ms + 100 + i64::from(attempt.saturating_sub(1)) * 60_000;
    let delivered = outcome == AttemptOutcome::Delivered;
    DeliveryAttempt {
        schema_version: SCHEMA_VERSION,
        delivery_id: c.delivery_id(endpoint),
        conversion_id: c.conversion_id.clone(),
        conversion_version: c.version,
        click_id: c.click_id.clone(),
        endpoint: endpoint.into(),
        attempt,
        url: format!("https://affiliate.example/postback?click_id={}", c.click_id),
        status_code: Some(if delivered { 200 } else { 503 }),
        latency_ms: 35,
        outcome,
        error: (!delivered).then(|| "HTTP 503: busy".to_string()),
        ts_ms,
        next_attempt_at_ms: (outcome == AttemptOutcome::Retryable).then_some(ts_ms + 60_000),
    }
}

/// The dead letter of `c`'s delivery to `endpoint` after eight attempts answered 503.
pub fn dead_letter(c: &Conversion, endpoint: &str) -> DeadLetter {
    DeadLetter {
        schema_version: SCHEMA_VERSION,
        delivery_id: c.delivery_id(endpoint),
        endpoint: endpoint.into(),
        conversion: c.clone(),
        reason: DeadLetterReason::AttemptsExhausted,
        attempts: 8,
        last_status: Some(503),
        last_error: Some("HTTP 503: busy".into()),
        dead_lettered_at_ms: c.attributed_at_ms + 86_400_000,
    }
}

/// Operator `alice`'s re-fire of `c`'s delivery to `endpoint`.
pub fn redeliver(c: &Conversion, endpoint: &str, command_id: &str) -> DeliveryCommand {
    DeliveryCommand {
        schema_version: SCHEMA_VERSION,
        command_id: command_id.into(),
        action: CommandAction::Redeliver,
        endpoint: endpoint.into(),
        conversion: c.clone(),
        requested_by: "alice".into(),
        requested_at_ms: c.attributed_at_ms + 90_000_000,
        reason: Some("affiliate fixed their endpoint".into()),
    }
}

/// A postback refused at ingest for a missing `click_id`, from the plain route.
pub fn refusal(refusal_id: &str) -> Refusal {
    Refusal {
        schema_version: SCHEMA_VERSION,
        refusal_id: refusal_id.into(),
        kind: "postback".into(),
        source: "default".into(),
        status: 400,
        reason: "missing_field".into(),
        field: Some("click_id".into()),
        message: "click_id is required".into(),
        client_ip: Some("198.51.100.7".into()),
        path: "/postback".into(),
        params: [("event".to_string(), "ftd".to_string())].into(),
        ts_ms: T0_MS + POSTBACK_AFTER_MS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{decode, encode};

    /// Every example survives the wire, so a test built on one tests a real record.
    #[test]
    fn every_example_round_trips() {
        fn check<T>(record: T)
        where
            T: serde::Serialize
                + serde::de::DeserializeOwned
                + crate::contract::Versioned
                + PartialEq
                + std::fmt::Debug,
        {
            assert_eq!(decode::<T>(&encode(&record)).ok(), Some(record));
        }
        let c = conversion("cv1", "c1");
        check(click("c1"));
        check(postback("pb1", "c1"));
        check(c.clone());
        check(rejection(postback("pb2", "c1"), RejectReason::Duplicate));
        check(attempt(&c, "aff", 1, AttemptOutcome::Retryable));
        check(dead_letter(&c, "aff"));
        check(redeliver(&c, "aff", "cmd1"));
        check(refusal("r1"));
    }

    #[test]
    fn the_examples_agree_with_each_other() {
        let c = conversion("cv1", "c1");
        assert_eq!(c.outcome_id, outcome_id(&c.postback_id));
        assert_eq!(c.click_ts_ms, click("c1").ts_ms);
        assert_eq!(c.event_ts_ms, postback("p", "c1").ts_ms);
        let first = attempt(&c, "aff", 1, AttemptOutcome::Retryable);
        let second = attempt(&c, "aff", 2, AttemptOutcome::Delivered);
        assert_eq!(first.next_attempt_at_ms, Some(second.ts_ms));
        assert_eq!(
            (second.status_code, second.next_attempt_at_ms),
            (Some(200), None)
        );
        assert_eq!(first.delivery_id, dead_letter(&c, "aff").delivery_id);
    }
}
