//! The join rule, pure: given a postback, the click it names and the conversions already
//! attributed to that click, decide the one outcome. No Kafka, no RocksDB, no clock: `now`
//! is a parameter, so every rule is unit-tested here.
//!
//! Rules, in the order they are applied to a postback whose click is known:
//! 1. **Identity.** A conversion is identified by (click, event, txn_id). A postback without
//!    `txn_id` has the empty txn_id: a second `ftd` without txn_id on the same click is the
//!    same conversion, so a retried postback is never paid twice. Operators that report
//!    repeatable events (`deposit`, `purchase`) must send a txn_id per transaction.
//! 2. **Same conversion again.** With the status it already has → `duplicate`. With another
//!    status (pending → approved → rejected/reversed, or any other change the operator
//!    reports) → an update: same `conversion_id`, `version` + 1, `previous_status` set. The
//!    window is not applied to updates (a reversal may come months later).
//! 3. **Once per click.** An event configured as once-per-click (`ftd` by default) whose
//!    click already has a conversion of that event under another txn_id → `duplicate`.
//! 4. **Window.** A new conversion needs `0 <= postback.ts - click.ts <= window`; the window
//!    is chosen per offer and event (see [`Rules::window_ms`]). A postback stamped before its
//!    click (clocks of two ingest hosts) counts as distance 0. Later → `outside_window`.
//! 5. **Payout** is the offer's CPA for the event (0 when none is configured) in the offer's
//!    currency. A conversion sooner after its click than the offer's minimum is flagged
//!    `suspicious` (a field, not a drop).
//!
//! A postback whose click is not known yet is held until `postback.ts + grace` and then
//! rejected as `unknown_click` (the store and the timer live in [`crate::process`]).
//!
//! IDs: the outcome ID is derived from the postback ID (one outcome per postback, the same
//! on a replay); the conversion ID from (click, event, txn_id).

use std::collections::{BTreeMap, BTreeSet};

use rust_decimal::Decimal;
use s2s_common::contract::{Click, Conversion, Postback, RejectReason, Rejection, SCHEMA_VERSION};
use s2s_common::ids::derived;

/// What one postback produces.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A new conversion (version 1).
    Attributed(Conversion),
    /// A status change of a conversion already attributed (version > 1).
    Updated(Conversion),
    Rejected(Rejection),
}

impl Outcome {
    /// The Kafka key: the click ID.
    pub fn key(&self) -> &str {
        match self {
            Outcome::Attributed(c) | Outcome::Updated(c) => &c.click_id,
            Outcome::Rejected(r) => r.postback.as_ref().map_or("", |p| p.click_id.as_str()),
        }
    }

    /// `attributed`, `updated` or `rejected`: the `outcome` metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Attributed(_) => "attributed",
            Outcome::Updated(_) => "updated",
            Outcome::Rejected(_) => "rejected",
        }
    }

    /// The conversion to store as the latest version, if this outcome is one.
    pub fn conversion(&self) -> Option<&Conversion> {
        match self {
            Outcome::Attributed(c) | Outcome::Updated(c) => Some(c),
            Outcome::Rejected(_) => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct OfferRules {
    pub currency: String,
    /// The offer's window for every event, unless `event_windows_ms` names the event.
    pub window_ms: Option<i64>,
    pub event_windows_ms: BTreeMap<String, i64>,
    pub payouts: BTreeMap<String, Decimal>,
    /// Conversions sooner than this after their click are flagged `suspicious`.
    pub min_click_to_conversion_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub default_window_ms: i64,
    /// Windows per event type for every offer that does not set its own.
    pub event_windows_ms: BTreeMap<String, i64>,
    pub default_currency: String,
    pub offers: BTreeMap<String, OfferRules>,
    /// Events that count at most once per click (`ftd`).
    pub once_per_click: BTreeSet<String>,
}

impl Rules {
    /// The attribution window of an event of an offer, most specific first: the offer's
    /// window for the event, the offer's window, the global window for the event, the
    /// default.
    pub fn window_ms(&self, offer_id: &str, event: &str) -> i64 {
        let offer = self.offers.get(offer_id);
        offer
            .and_then(|o| o.event_windows_ms.get(event).copied())
            .or_else(|| offer.and_then(|o| o.window_ms))
            .or_else(|| self.event_windows_ms.get(event).copied())
            .unwrap_or(self.default_window_ms)
    }

    /// The longest window anywhere: how long a click must be kept.
    pub fn max_window_ms(&self) -> i64 {
        self.offers
            .values()
            .flat_map(|o| {
                o.window_ms
                    .into_iter()
                    .chain(o.event_windows_ms.values().copied())
            })
            .chain(self.event_windows_ms.values().copied())
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

/// When a postback stamped `ts_ms` (by ingest) stops waiting for its click. Derived from the
/// record, not from processing time, so a replay computes the same deadline.
pub fn grace_deadline(ts_ms: i64, grace_ms: i64) -> i64 {
    ts_ms.saturating_add(grace_ms)
}

/// The outcome ID of whatever a postback produces.
pub fn outcome_id(postback_id: &str) -> String {
    derived("outcome", &[postback_id])
}

/// The identity of a conversion within its click: `event \0 txn_id` (empty txn_id when the
/// postback has none). Events sort together, so all conversions of an event share the
/// prefix [`event_prefix`].
pub fn conversion_key(event: &str, txn_id: Option<&str>) -> Vec<u8> {
    [
        event_prefix(event).as_slice(),
        txn_id.unwrap_or("").as_bytes(),
    ]
    .concat()
}

/// The prefix of every [`conversion_key`] of `event`.
pub fn event_prefix(event: &str) -> Vec<u8> {
    [event.as_bytes(), b"\0"].concat()
}

/// What the store knows about a click's earlier conversions, as far as a postback needs it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Known<'a> {
    /// The latest version of the conversion with this postback's identity.
    pub same: Option<&'a Conversion>,
    /// Another conversion of the same event on this click (other txn_id), if any.
    pub same_event: Option<&'a Conversion>,
}

/// Decides the outcome of a postback whose click is known.
pub fn decide(
    pb: &Postback,
    click: &Click,
    known: Known<'_>,
    rules: &Rules,
    now_ms: i64,
) -> Outcome {
    if let Some(prev) = known.same {
        if prev.status == pb.status {
            return Outcome::Rejected(reject(
                pb,
                RejectReason::Duplicate,
                format!(
                    "conversion {} ({} on click {}) already has status '{}' (version {})",
                    prev.conversion_id, prev.event, prev.click_id, prev.status, prev.version
                ),
                now_ms,
            ));
        }
        return Outcome::Updated(Conversion {
            version: prev.version.saturating_add(1),
            outcome_id: outcome_id(&pb.postback_id),
            postback_id: pb.postback_id.clone(),
            status: pb.status.clone(),
            previous_status: Some(prev.status.clone()),
            amount: pb.amount.or(prev.amount),
            currency: pb.currency.clone().or_else(|| prev.currency.clone()),
            event_ts_ms: pb.ts_ms,
            attributed_at_ms: now_ms,
            ..prev.clone()
        });
    }
    if let Some(other) = known
        .same_event
        .filter(|_| rules.once_per_click.contains(&pb.event))
    {
        return Outcome::Rejected(reject(
            pb,
            RejectReason::Duplicate,
            format!(
                "'{}' counts once per click; click {} already has conversion {} (txn_id {})",
                pb.event,
                pb.click_id,
                other.conversion_id,
                other.txn_id.as_deref().unwrap_or("none")
            ),
            now_ms,
        ));
    }
    let window = rules.window_ms(&click.offer_id, &pb.event);
    if !in_window(click.ts_ms, pb.ts_ms, window) {
        let days = (pb.ts_ms - click.ts_ms) as f64 / 86_400_000.0;
        return Outcome::Rejected(reject(
            pb,
            RejectReason::OutsideWindow,
            format!(
                "postback came {days:.2} days after its click; offer {} allows {:.2} days for '{}'",
                click.offer_id,
                window as f64 / 86_400_000.0,
                pb.event
            ),
            now_ms,
        ));
    }
    let (payout, payout_currency) = rules.payout(&click.offer_id, &pb.event);
    let suspicious = rules
        .offers
        .get(&click.offer_id)
        .and_then(|o| o.min_click_to_conversion_ms)
        .is_some_and(|min| pb.ts_ms.saturating_sub(click.ts_ms) < min);
    let identity = pb.txn_id.as_deref().unwrap_or("");
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
        previous_status: None,
        suspicious,
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

/// The `unknown_click` rejection of a postback whose grace period ended.
pub fn unknown_click(pb: &Postback, grace_ms: i64, now_ms: i64) -> Rejection {
    reject(
        pb,
        RejectReason::UnknownClick,
        format!(
            "no click with ID '{}' arrived within the grace period of {grace_ms} ms",
            pb.click_id
        ),
        now_ms,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use s2s_common::contract::Params;

    const DAY: i64 = 86_400_000;

    trait Expect {
        fn attributed(self) -> Conversion;
        fn updated(self) -> Conversion;
        fn rejected(self) -> Rejection;
    }

    impl Expect for Outcome {
        fn attributed(self) -> Conversion {
            match self {
                Outcome::Attributed(c) => c,
                other => panic!("expected a new conversion, got {other:?}"),
            }
        }
        fn updated(self) -> Conversion {
            match self {
                Outcome::Updated(c) => c,
                other => panic!("expected an update, got {other:?}"),
            }
        }
        fn rejected(self) -> Rejection {
            match self {
                Outcome::Rejected(r) => r,
                other => panic!("expected a rejection, got {other:?}"),
            }
        }
    }

    fn rules() -> Rules {
        Rules {
            default_window_ms: 30 * DAY,
            event_windows_ms: [("registration".to_string(), 2 * DAY)].into(),
            default_currency: "USD".into(),
            offers: [(
                "7".to_string(),
                OfferRules {
                    currency: "EUR".into(),
                    window_ms: Some(7 * DAY),
                    event_windows_ms: [("deposit".to_string(), 60 * DAY)].into(),
                    payouts: [("ftd".to_string(), Decimal::new(5000, 2))].into(),
                    min_click_to_conversion_ms: Some(10_000),
                },
            )]
            .into(),
            once_per_click: ["ftd".to_string()].into(),
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
            postback_id: format!("pb-{event}-{ts}-{}", txn.unwrap_or("")),
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

    fn with_status(mut p: Postback, status: &str) -> Postback {
        p.status = status.into();
        p.postback_id = format!("{}-{status}", p.postback_id);
        p
    }

    fn new(p: &Postback, c: &Click) -> Outcome {
        decide(p, c, Known::default(), &rules(), 99)
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
        assert_eq!(grace_deadline(1_000, 500), 1_500);
    }

    #[test]
    fn window_is_chosen_most_specific_first() {
        let r = rules();
        assert_eq!(r.window_ms("7", "deposit"), 60 * DAY, "offer and event");
        assert_eq!(r.window_ms("7", "registration"), 7 * DAY, "offer");
        assert_eq!(r.window_ms("other", "registration"), 2 * DAY, "event");
        assert_eq!(r.window_ms("other", "ftd"), 30 * DAY, "default");
        assert_eq!(r.max_window_ms(), 60 * DAY);
    }

    #[test]
    fn window_edge_is_inclusive_per_offer_and_event() {
        new(&pb("ftd", 7 * DAY, None), &click("7", 0)).attributed();
        let r = new(&pb("ftd", 7 * DAY + 1, None), &click("7", 0)).rejected();
        assert_eq!(r.reason, RejectReason::OutsideWindow);
        assert!(r.detail.contains("7.00 days for 'ftd'"), "{}", r.detail);
        new(&pb("deposit", 59 * DAY, Some("t")), &click("7", 0)).attributed();
        new(&pb("ftd", 8 * DAY, None), &click("other", 0)).attributed();
        let reg = new(&pb("registration", 3 * DAY, None), &click("other", 0)).rejected();
        assert_eq!(reg.reason, RejectReason::OutsideWindow);
    }

    #[test]
    fn attributes_with_offer_payout_and_flags_fast_conversions() {
        let c = new(&pb("ftd", 3 * DAY, Some("t1")), &click("7", 0)).attributed();
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
        assert!(!c.suspicious);
        assert_eq!(c.previous_status, None);

        assert!(
            new(&pb("ftd", 9_999, None), &click("7", 0))
                .attributed()
                .suspicious
        );
        assert!(
            !new(&pb("ftd", 10_000, None), &click("7", 0))
                .attributed()
                .suspicious
        );
        assert!(
            !new(&pb("ftd", 1, None), &click("other", 0))
                .attributed()
                .suspicious,
            "no minimum configured"
        );
    }

    #[test]
    fn unconfigured_payout_is_zero_in_default_currency() {
        let c = new(&pb("registration", 1, None), &click("other", 0)).attributed();
        assert_eq!(
            (c.payout, c.payout_currency.as_str()),
            (Decimal::ZERO, "USD")
        );
    }

    #[test]
    fn same_conversion_same_status_is_duplicate() {
        let first = new(&pb("deposit", 5, Some("t1")), &click("7", 0)).attributed();
        let again = pb("deposit", 6, Some("t1"));
        let known = Known {
            same: Some(&first),
            same_event: Some(&first),
        };
        let r = decide(&again, &click("7", 0), known, &rules(), 100).rejected();
        assert_eq!(r.reason, RejectReason::Duplicate);
        assert!(r.detail.contains(&first.conversion_id), "{}", r.detail);
        assert_eq!(r.outcome_id, outcome_id(&again.postback_id));
    }

    #[test]
    fn status_change_updates_the_same_conversion_with_the_next_version() {
        let mut p1 = pb("ftd", 5, Some("t1"));
        p1.status = "pending".into();
        p1.amount = Some(Decimal::new(100, 0));
        let v1 = new(&p1, &click("7", 0)).attributed();
        let p2 = with_status(pb("ftd", 40 * DAY, Some("t1")), "approved");
        let known = Known {
            same: Some(&v1),
            same_event: Some(&v1),
        };
        let v2 = decide(&p2, &click("7", 0), known, &rules(), 200).updated();
        assert_eq!(v2.conversion_id, v1.conversion_id);
        assert_eq!((v2.version, v2.status.as_str()), (2, "approved"));
        assert_eq!(v2.previous_status.as_deref(), Some("pending"));
        assert_eq!(v2.outcome_id, outcome_id(&p2.postback_id));
        assert_eq!(
            v2.amount,
            Some(Decimal::new(100, 0)),
            "kept when not reported again"
        );
        assert_eq!((v2.payout, v2.click_ts_ms), (v1.payout, v1.click_ts_ms));
        assert_eq!(v2.event_ts_ms, 40 * DAY, "no window check for updates");

        let p3 = with_status(pb("ftd", 41 * DAY, Some("t1")), "reversed");
        let known = Known {
            same: Some(&v2),
            same_event: Some(&v2),
        };
        let v3 = decide(&p3, &click("7", 0), known, &rules(), 300).updated();
        assert_eq!(
            (v3.version, v3.previous_status.as_deref()),
            (3, Some("approved"))
        );
    }

    #[test]
    fn once_per_click_events_reject_a_second_transaction() {
        let first = new(&pb("ftd", 5, Some("t1")), &click("7", 0)).attributed();
        let known = Known {
            same: None,
            same_event: Some(&first),
        };
        let r = decide(
            &pb("ftd", 6, Some("t2")),
            &click("7", 0),
            known,
            &rules(),
            1,
        )
        .rejected();
        assert_eq!(r.reason, RejectReason::Duplicate);
        assert!(r.detail.contains("once per click"), "{}", r.detail);
        // A repeatable event with another txn_id is a new conversion.
        let d1 = new(&pb("deposit", 5, Some("t1")), &click("7", 0)).attributed();
        let known = Known {
            same: None,
            same_event: Some(&d1),
        };
        let d2 = decide(
            &pb("deposit", 6, Some("t2")),
            &click("7", 0),
            known,
            &rules(),
            1,
        )
        .attributed();
        assert_ne!(d1.conversion_id, d2.conversion_id);
    }

    #[test]
    fn without_txn_id_the_identity_is_click_and_event() {
        assert_eq!(conversion_key("ftd", None), conversion_key("ftd", Some("")));
        assert_ne!(
            conversion_key("ftd", None),
            conversion_key("ftd", Some("t"))
        );
        assert!(conversion_key("ftd", Some("t")).starts_with(&event_prefix("ftd")));
        assert!(!conversion_key("ftdx", None).starts_with(&event_prefix("ftd")));
        let a = new(&pb("registration", 1, None), &click("7", 0)).attributed();
        let mut retry = pb("registration", 2, None);
        retry.postback_id = "retry".into();
        let b = new(&retry, &click("7", 0)).attributed();
        assert_eq!(
            a.conversion_id, b.conversion_id,
            "a retried postback is the same conversion"
        );
    }

    #[test]
    fn ids_are_deterministic() {
        let p = pb("ftd", 1, Some("t1"));
        let a = decide(&p, &click("7", 0), Known::default(), &rules(), 1).attributed();
        let b = decide(&p, &click("7", 0), Known::default(), &rules(), 2).attributed();
        assert_eq!(
            (a.outcome_id.clone(), a.conversion_id.clone()),
            (b.outcome_id, b.conversion_id)
        );
        let r = unknown_click(&p, 5, 5);
        assert_eq!(r.outcome_id, a.outcome_id, "one outcome ID per postback");
        assert_eq!(r.reason, RejectReason::UnknownClick);
    }
}
