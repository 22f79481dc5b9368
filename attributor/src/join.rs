//! The join rule, pure: given a postback and the click it names (if any), decide the
//! outcome. No Kafka, no RocksDB, no clock: `now` is a parameter, so every rule is
//! unit-tested here.
//!
//! Rules of this slice:
//! - The click is known: the postback is attributed if `0 <= postback.ts - click.ts <=
//!   window` (window per offer, else the default). A postback stamped before its click
//!   (clocks of two ingest hosts) counts as distance 0. Later than the window:
//!   `outside_window`.
//! - The click is not known yet: the postback is held until `ts + grace`, then rejected
//!   as `unknown_click` unless the click arrived meanwhile.
//! - Payout is the offer's CPA for the event (0 when none is configured), in the offer's
//!   currency.
//!
//! Outcome IDs are derived from the postback ID, so a replay yields the same ID. The
//! conversion ID is derived from (click, event, txn_id) — or the postback ID when there is
//! no txn_id — so status updates of one conversion can share it.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use s2s_common::contract::{Click, Conversion, Postback, RejectReason, Rejection, SCHEMA_VERSION};
use s2s_common::ids::derived;

/// What one postback produces.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Attributed(Conversion),
    Rejected(Rejection),
}

impl Outcome {
    /// The Kafka key: the click ID when known.
    pub fn key(&self) -> &str {
        match self {
            Outcome::Attributed(c) => &c.click_id,
            Outcome::Rejected(r) => r.postback.as_ref().map_or("", |p| p.click_id.as_str()),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct OfferRules {
    pub currency: String,
    pub window_ms: Option<i64>,
    pub payouts: BTreeMap<String, Decimal>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub default_window_ms: i64,
    pub default_currency: String,
    pub offers: BTreeMap<String, OfferRules>,
}

impl Rules {
    /// The attribution window of an offer.
    pub fn window_ms(&self, offer_id: &str) -> i64 {
        self.offers
            .get(offer_id)
            .and_then(|o| o.window_ms)
            .unwrap_or(self.default_window_ms)
    }

    /// The longest window of any offer: how long a click must be kept.
    pub fn max_window_ms(&self) -> i64 {
        self.offers
            .values()
            .filter_map(|o| o.window_ms)
            .fold(self.default_window_ms, i64::max)
    }

    fn payout(&self, offer_id: &str, event: &str) -> (Decimal, String) {
        match self.offers.get(offer_id) {
            Some(o) => (
                o.payouts.get(event).copied().unwrap_or(Decimal::ZERO),
                o.currency.clone(),
            ),
            None => (Decimal::ZERO, self.default_currency.clone()),
        }
    }
}

/// Whether `event_ts` falls inside the window opened by a click at `click_ts`.
pub fn in_window(click_ts: i64, event_ts: i64, window_ms: i64) -> bool {
    event_ts.saturating_sub(click_ts).max(0) <= window_ms
}

/// When a postback that arrived at `now` without its click gives up waiting.
pub fn grace_deadline(now_ms: i64, grace_ms: i64) -> i64 {
    now_ms.saturating_add(grace_ms)
}

/// The outcome ID of whatever a postback produces.
pub fn outcome_id(postback_id: &str) -> String {
    derived("outcome", &[postback_id])
}

/// Joins a postback with its click.
pub fn attribute(pb: &Postback, click: &Click, rules: &Rules, now_ms: i64) -> Outcome {
    let window = rules.window_ms(&click.offer_id);
    if !in_window(click.ts_ms, pb.ts_ms, window) {
        let days = (pb.ts_ms - click.ts_ms) as f64 / 86_400_000.0;
        return Outcome::Rejected(reject(
            pb,
            RejectReason::OutsideWindow,
            format!(
                "postback came {days:.2} days after its click; offer {} allows {:.2} days",
                click.offer_id,
                window as f64 / 86_400_000.0
            ),
            now_ms,
        ));
    }
    let (payout, payout_currency) = rules.payout(&click.offer_id, &pb.event);
    let identity = pb.txn_id.as_deref().unwrap_or(&pb.postback_id);
    Outcome::Attributed(Conversion {
        schema_version: SCHEMA_VERSION,
        conversion_id: derived("conversion", &[&pb.click_id, &pb.event, identity]),
        version: 1,
        outcome_id: outcome_id(&pb.postback_id),
        postback_id: pb.postback_id.clone(),
        click_id: pb.click_id.clone(),
        offer_id: click.offer_id.clone(),
        aff_id: click.aff_id.clone(),
        subs: click.subs.clone(),
        event: pb.event.clone(),
        txn_id: pb.txn_id.clone(),
        status: pb.status.clone(),
        amount: pb.amount,
        currency: pb.currency.clone(),
        payout,
        payout_currency,
        click_ts_ms: click.ts_ms,
        event_ts_ms: pb.ts_ms,
        attributed_at_ms: now_ms,
    })
}

/// A rejection of `pb` for `reason`.
pub fn reject(pb: &Postback, reason: RejectReason, detail: String, now_ms: i64) -> Rejection {
    Rejection {
        schema_version: SCHEMA_VERSION,
        outcome_id: outcome_id(&pb.postback_id),
        reason,
        detail,
        postback: Some(pb.clone()),
        rejected_at_ms: now_ms,
    }
}

/// A rejection of an input that could not be decoded, identified by where it was read.
pub fn reject_malformed(
    topic: &str,
    partition: i32,
    offset: i64,
    raw: &[u8],
    error: &str,
    now_ms: i64,
) -> Rejection {
    let position = format!("{topic}/{partition}/{offset}");
    Rejection {
        schema_version: SCHEMA_VERSION,
        outcome_id: derived("malformed", &[&position]),
        reason: RejectReason::MalformedRecord,
        detail: format!(
            "{position}: {error}; payload: {}",
            String::from_utf8_lossy(raw)
        ),
        postback: None,
        rejected_at_ms: now_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use s2s_common::contract::Params;

    const DAY: i64 = 86_400_000;

    trait Expect {
        fn attributed(self) -> Conversion;
        fn rejected(self) -> Rejection;
    }

    impl Expect for Outcome {
        fn attributed(self) -> Conversion {
            match self {
                Outcome::Attributed(c) => c,
                Outcome::Rejected(r) => panic!("expected a conversion, got {r:?}"),
            }
        }
        fn rejected(self) -> Rejection {
            match self {
                Outcome::Rejected(r) => r,
                Outcome::Attributed(c) => panic!("expected a rejection, got {c:?}"),
            }
        }
    }

    fn rules() -> Rules {
        Rules {
            default_window_ms: 30 * DAY,
            default_currency: "USD".into(),
            offers: [(
                "7".to_string(),
                OfferRules {
                    currency: "EUR".into(),
                    window_ms: Some(7 * DAY),
                    payouts: [("ftd".to_string(), Decimal::new(5000, 2))].into(),
                },
            )]
            .into(),
        }
    }

    fn click(offer: &str, ts: i64) -> Click {
        Click {
            schema_version: 1,
            click_id: "c1".into(),
            offer_id: offer.into(),
            aff_id: "42".into(),
            subs: [("sub1".to_string(), "s".to_string())].into(),
            params: Params::new(),
            ip: None,
            user_agent: None,
            referrer: None,
            ts_ms: ts,
        }
    }

    fn pb(event: &str, ts: i64, txn: Option<&str>) -> Postback {
        Postback {
            schema_version: 1,
            postback_id: format!("pb-{event}-{ts}"),
            click_id: "c1".into(),
            event: event.into(),
            txn_id: txn.map(str::to_string),
            amount: None,
            currency: None,
            status: "approved".into(),
            source: None,
            params: Params::new(),
            ip: None,
            ts_ms: ts,
        }
    }

    #[test]
    fn window_edges() {
        assert!(in_window(0, 0, 10));
        assert!(in_window(0, 10, 10));
        assert!(!in_window(0, 11, 10));
        assert!(
            in_window(100, 50, 10),
            "postback stamped before its click counts as 0"
        );
        assert!(!in_window(i64::MIN, i64::MAX, 10), "no overflow");
        assert_eq!(grace_deadline(i64::MAX - 1, 10), i64::MAX);
    }

    #[test]
    fn attributes_inside_window_with_offer_payout() {
        let c = attribute(
            &pb("ftd", 3 * DAY, Some("t1")),
            &click("7", 0),
            &rules(),
            99,
        )
        .attributed();
        assert_eq!(
            (c.payout, c.payout_currency.as_str()),
            (Decimal::new(5000, 2), "EUR")
        );
        assert_eq!((c.aff_id.as_str(), c.offer_id.as_str()), ("42", "7"));
        assert_eq!(c.subs.get("sub1").map(String::as_str), Some("s"));
        assert_eq!(
            (c.version, c.attributed_at_ms, c.event_ts_ms),
            (1, 99, 3 * DAY)
        );
    }

    #[test]
    fn offer_window_overrides_default() {
        let r = attribute(&pb("ftd", 8 * DAY, None), &click("7", 0), &rules(), 0).rejected();
        assert_eq!(r.reason, RejectReason::OutsideWindow);
        assert!(r.detail.contains("7.00 days"), "{}", r.detail);
        attribute(&pb("ftd", 8 * DAY, None), &click("other", 0), &rules(), 0).attributed();
        assert_eq!(rules().max_window_ms(), 30 * DAY);
    }

    #[test]
    fn unconfigured_payout_is_zero_in_default_currency() {
        let c = attribute(
            &pb("registration", 1, None),
            &click("other", 0),
            &rules(),
            0,
        )
        .attributed();
        assert_eq!(
            (c.payout, c.payout_currency.as_str()),
            (Decimal::ZERO, "USD")
        );
    }

    #[test]
    fn ids_are_deterministic() {
        let p = pb("ftd", 1, Some("t1"));
        let a = attribute(&p, &click("7", 0), &rules(), 1).attributed();
        let b = attribute(&p, &click("7", 0), &rules(), 2).attributed();
        assert_eq!(
            (a.outcome_id.clone(), a.conversion_id.clone()),
            (b.outcome_id, b.conversion_id)
        );
        let mut other = p.clone();
        other.postback_id = "another".into();
        let c = attribute(&other, &click("7", 0), &rules(), 1).attributed();
        assert_eq!(
            c.conversion_id, a.conversion_id,
            "same click, event and txn_id"
        );
        assert_ne!(c.outcome_id, a.outcome_id, "another input");
        let r = reject(&p, RejectReason::UnknownClick, String::new(), 5);
        assert_eq!(r.outcome_id, a.outcome_id, "one outcome per postback");
    }
}
