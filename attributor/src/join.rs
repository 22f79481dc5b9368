//! The join rules, pure: given a postback, the click it names and the conversions already
//! attributed to that click, decide the one outcome. No Kafka, no RocksDB, no clock: `now`
//! is a parameter, so every rule is unit-tested here.
//!
//! A postback either changes a conversion that exists or creates one.
//!
//! **Identity.** A conversion is identified by (click, event, txn_id). A postback without
//! `txn_id` has the empty txn_id: a second `ftd` without txn_id on the same click is the
//! same conversion, so a retried postback is never paid twice. Operators that report
//! repeatable events (`deposit`, `purchase`) must send a txn_id per transaction.
//!
//! **Changes of a conversion that exists** ([`decide_update`]). They need the conversion,
//! not the click: a reversal is found as long as the conversion is kept
//! (`conversion_retention`), long after the click expired.
//! 1. With the status it already has → `duplicate`.
//! 2. A change the [`Lifecycle`]'s transition table does not allow → `invalid_transition`,
//!    naming from and to.
//! 3. Else a new version: same `conversion_id`, `version` + 1, `previous_status` set. The
//!    window is not applied (a reversal may come months later). The payout follows the
//!    status: `priced_payout` while it pays, 0 in a status that pays nothing (rejected,
//!    reversed); `payout_delta` is the change, so summing deltas gives the balance.
//!
//! **New conversions** ([`decide_new`]), needing the click:
//! 1. **Once per click.** An event configured as once-per-click (`ftd` by default) whose
//!    click already has a conversion of that event under another txn_id → `duplicate`.
//! 2. **Window.** `0 <= event time - click.ts <= window`, the event time being the
//!    operator's `event_time` if it gave one, else when ingest received the postback; the
//!    window is chosen per offer and event (see [`Rules::window_ms`]). An event stamped
//!    before its click (two hosts' clocks) counts as distance 0. Later → `outside_window`.
//! 3. **Too fast.** Sooner after its click than the offer's minimum: flagged `suspicious`,
//!    and per the offer's [`TooFast`] kept as reported, held `pending` (never approved
//!    automatically), or rejected `too_fast`.
//! 4. **Price** ([`Rules::price`]): the offer's payout for the event in the offer's
//!    currency; 0 with the reason on the record (`payout_rule`) when the offer names none
//!    or the offer is unknown.
//!
//! **Holds** ([`hold_deadline`], [`auto_approve`]): a `pending` conversion of an offer with
//! a hold becomes `approved` when the hold ends, unless it changed in the meantime.
//!
//! **Clicks** ([`judge_click`]): the first registration of a click ID wins; the same again
//! changes nothing; another affiliate, offer or sub IDs → `click_conflict`.
//!
//! A postback whose click is not known yet is held until `postback.ts + grace` and then
//! rejected as `unknown_click` (the store and the timer live in [`crate::process`]).
//!
//! IDs: the outcome ID is derived from the postback ID (one outcome per postback, the same
//! on a replay), from the conversion and version for an automatic approval, and from the
//! click record for a click conflict; the conversion ID from (click, event, txn_id).

use std::collections::{BTreeMap, BTreeSet};

use rust_decimal::Decimal;
use s2s_common::contract::{
    Click, Conversion, PayoutRule, Postback, RejectReason, Rejection, StatusReason, Trust,
    SCHEMA_VERSION,
};
use s2s_common::ids::derived;

/// The status a conversion waits in for a decision.
pub const PENDING: &str = "pending";
/// The status a hold ends in.
pub const APPROVED: &str = "approved";

/// What one postback (or the passing of time, or a click registration) produces.
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
            Outcome::Rejected(r) => r.click_id(),
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

/// What an offer does with a conversion sooner after its click than its minimum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TooFast {
    /// Flag it `suspicious`, keep the status the operator reported.
    #[default]
    Flag,
    /// Flag it and hold it `pending` (reason `suspicious`) until the operator decides; a
    /// hold never approves it.
    Hold,
    /// Reject it as `too_fast`.
    Reject,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct OfferRules {
    pub currency: String,
    /// The offer's window for every event, unless `event_windows_ms` names the event.
    pub window_ms: Option<i64>,
    pub event_windows_ms: BTreeMap<String, i64>,
    pub payouts: BTreeMap<String, Decimal>,
    /// Conversions sooner than this after their click are suspicious.
    pub min_click_to_conversion_ms: Option<i64>,
    pub too_fast: TooFast,
    /// A `pending` conversion is approved this long after the postback that made it
    /// pending, unless it changed in the meantime.
    pub hold_ms: Option<i64>,
    /// Postbacks that came through the pixel or iframe (a browser) are rejected as
    /// `pixel_not_allowed`: for offers that pay on the operator's server's word only.
    pub refuse_pixel: bool,
}

/// The status lifecycle: which changes are allowed, and which statuses pay nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lifecycle {
    /// From → the statuses a conversion in it may change to.
    pub transitions: BTreeMap<String, BTreeSet<String>>,
    /// Statuses in which a conversion pays nothing.
    pub unpaid: BTreeSet<String>,
}

impl Default for Lifecycle {
    /// `pending → approved | rejected`, `approved → reversed`, `rejected → approved`;
    /// `rejected` and `reversed` pay nothing.
    fn default() -> Self {
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        Lifecycle {
            transitions: [
                (PENDING.to_string(), set(&[APPROVED, "rejected"])),
                (APPROVED.to_string(), set(&["reversed"])),
                ("rejected".to_string(), set(&[APPROVED])),
            ]
            .into(),
            unpaid: set(&["rejected", "reversed"]),
        }
    }
}

impl Lifecycle {
    pub fn allows(&self, from: &str, to: &str) -> bool {
        self.transitions.get(from).is_some_and(|t| t.contains(to))
    }

    pub fn pays(&self, status: &str) -> bool {
        !self.unpaid.contains(status)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub default_window_ms: i64,
    /// Windows per event type for every offer that does not set its own.
    pub event_windows_ms: BTreeMap<String, i64>,
    pub default_currency: String,
    pub offers: BTreeMap<String, OfferRules>,
    /// Affiliates the catalog has blocked: their new conversions are rejected.
    pub blocked_affiliates: BTreeSet<String>,
    /// The revision of the catalog the offers are from (`None`: an empty catalog).
    pub catalog_revision: Option<i64>,
    /// Events that count at most once per click (`ftd`).
    pub once_per_click: BTreeSet<String>,
    pub lifecycle: Lifecycle,
}

/// A conversion's price: what it earns while its status pays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Price {
    pub amount: Decimal,
    pub currency: String,
    pub rule: PayoutRule,
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

    /// The offer's payout for the event; 0 with the reason when there is none.
    pub fn price(&self, offer_id: &str, event: &str) -> Price {
        match self.offers.get(offer_id) {
            Some(o) => match o.payouts.get(event) {
                Some(p) => Price {
                    amount: *p,
                    currency: o.currency.clone(),
                    rule: PayoutRule::OfferEvent,
                },
                None => Price {
                    amount: Decimal::ZERO,
                    currency: o.currency.clone(),
                    rule: PayoutRule::NoPayoutForEvent,
                },
            },
            None => Price {
                amount: Decimal::ZERO,
                currency: self.default_currency.clone(),
                rule: PayoutRule::UnknownOffer,
            },
        }
    }

    /// What `priced` pays in `status`.
    fn payout(&self, priced: Decimal, status: &str) -> Decimal {
        if self.lifecycle.pays(status) {
            priced
        } else {
            Decimal::ZERO
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

/// Decides the outcome of a postback whose click is known: a change of the conversion it
/// names if that exists, else a new one.
pub fn decide(
    pb: &Postback,
    click: &Click,
    known: Known<'_>,
    rules: &Rules,
    now_ms: i64,
) -> Outcome {
    match known.same {
        Some(prev) => decide_update(pb, prev, rules, now_ms),
        None => decide_new(pb, click, known.same_event, rules, now_ms),
    }
}

/// A postback naming a conversion that exists: a duplicate, a transition the lifecycle
/// refuses, or the next version.
pub fn decide_update(pb: &Postback, prev: &Conversion, rules: &Rules, now_ms: i64) -> Outcome {
    if let Some(refused) = pixel_refused(pb, &prev.offer_id, rules, now_ms) {
        return refused;
    }
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
    if !rules.lifecycle.allows(&prev.status, &pb.status) {
        let allowed = rules
            .lifecycle
            .transitions
            .get(&prev.status)
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join(", "))
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| "nothing".into());
        return Outcome::Rejected(reject(
            pb,
            RejectReason::InvalidTransition,
            format!(
                "conversion {} cannot go from '{}' to '{}' (version {}); from '{}' it may go to: {allowed}",
                prev.conversion_id, prev.status, pb.status, prev.version, prev.status
            ),
            now_ms,
        ));
    }
    let mut next = next_version(prev, &pb.status, rules, now_ms);
    next.outcome_id = outcome_id(&pb.postback_id);
    next.postback_id = pb.postback_id.clone();
    next.amount = pb.amount.or(prev.amount);
    next.currency = pb.currency.clone().or_else(|| prev.currency.clone());
    next.received_ts_ms = pb.ts_ms;
    next.trust = pb.trust;
    Outcome::Updated(next)
}

/// `prev` moved to `status`: the next version, its payout following the status.
fn next_version(prev: &Conversion, status: &str, rules: &Rules, now_ms: i64) -> Conversion {
    let payout = rules.payout(prev.priced_payout, status);
    Conversion {
        version: prev.version.saturating_add(1),
        status: status.to_string(),
        previous_status: Some(prev.status.clone()),
        status_reason: None,
        payout,
        payout_delta: payout - prev.payout,
        attributed_at_ms: now_ms,
        ..prev.clone()
    }
}

/// A postback for a conversion that does not exist yet, with its click.
pub fn decide_new(
    pb: &Postback,
    click: &Click,
    same_event: Option<&Conversion>,
    rules: &Rules,
    now_ms: i64,
) -> Outcome {
    if rules.blocked_affiliates.contains(&click.aff_id) {
        return Outcome::Rejected(reject(
            pb,
            RejectReason::AffiliateBlocked,
            format!(
                "affiliate {} is blocked in the catalog: its new conversions are not attributed",
                click.aff_id
            ),
            now_ms,
        ));
    }
    if let Some(refused) = pixel_refused(pb, &click.offer_id, rules, now_ms) {
        return refused;
    }
    if let Some(other) = same_event.filter(|_| rules.once_per_click.contains(&pb.event)) {
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
    let event_ts = pb.event_ts_ms();
    let window = rules.window_ms(&click.offer_id, &pb.event);
    if !in_window(click.ts_ms, event_ts, window) {
        let days = (event_ts - click.ts_ms) as f64 / 86_400_000.0;
        return Outcome::Rejected(reject(
            pb,
            RejectReason::OutsideWindow,
            format!(
                "conversion came {days:.2} days after its click; offer {} allows {:.2} days for '{}'",
                click.offer_id,
                window as f64 / 86_400_000.0,
                pb.event
            ),
            now_ms,
        ));
    }
    let offer = rules.offers.get(&click.offer_id);
    let fast = offer
        .and_then(|o| o.min_click_to_conversion_ms.map(|min| (min, o.too_fast)))
        .filter(|(min, _)| event_ts.saturating_sub(click.ts_ms) < *min);
    let mut status = pb.status.clone();
    let mut status_reason = None;
    match fast {
        Some((min, TooFast::Reject)) => {
            return Outcome::Rejected(reject(
                pb,
                RejectReason::TooFast,
                format!(
                    "conversion came {} ms after its click; offer {} rejects conversions sooner than {min} ms",
                    event_ts.saturating_sub(click.ts_ms),
                    click.offer_id
                ),
                now_ms,
            ))
        }
        Some((_, TooFast::Hold)) if rules.lifecycle.pays(&status) => {
            status = PENDING.to_string();
            status_reason = Some(StatusReason::Suspicious);
        }
        _ => {}
    }
    let price = rules.price(&click.offer_id, &pb.event);
    let payout = rules.payout(price.amount, &status);
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
        status,
        amount: pb.amount,
        currency: pb.currency.clone(),
        payout,
        payout_currency: price.currency,
        payout_delta: payout,
        priced_payout: price.amount,
        payout_rule: price.rule,
        click_ts_ms: click.ts_ms,
        event_ts_ms: event_ts,
        received_ts_ms: pb.ts_ms,
        attributed_at_ms: now_ms,
        previous_status: None,
        status_reason,
        trust: pb.trust,
        suspicious: fast.is_some(),
        catalog_revision: rules.catalog_revision,
    })
}

/// The `pixel_not_allowed` rejection of a browser's postback for an offer that refuses
/// them.
fn pixel_refused(pb: &Postback, offer_id: &str, rules: &Rules, now_ms: i64) -> Option<Outcome> {
    let refuses = rules.offers.get(offer_id).is_some_and(|o| o.refuse_pixel);
    (refuses && pb.trust == Trust::Pixel).then(|| {
        Outcome::Rejected(reject(
            pb,
            RejectReason::PixelNotAllowed,
            format!(
                "offer {offer_id} accepts server-to-server postbacks only; this one came \
                 through the pixel"
            ),
            now_ms,
        ))
    })
}

/// When a conversion's hold ends, if this version waits for one: `pending` (not held as
/// suspicious) on an offer with a hold, counted from when ingest received the postback
/// that made it pending.
pub fn hold_deadline(c: &Conversion, rules: &Rules) -> Option<i64> {
    if c.status != PENDING || c.status_reason == Some(StatusReason::Suspicious) {
        return None;
    }
    let hold = rules.offers.get(&c.offer_id)?.hold_ms?;
    Some(c.received_ts_ms.saturating_add(hold))
}

/// The version that approves `prev` when its hold ends, if it still waits for it and the
/// lifecycle allows `pending → approved`.
pub fn auto_approve(prev: &Conversion, rules: &Rules, now_ms: i64) -> Option<Conversion> {
    hold_deadline(prev, rules)?;
    if !rules.lifecycle.allows(&prev.status, APPROVED) {
        return None;
    }
    let mut next = next_version(prev, APPROVED, rules, now_ms);
    let version = prev.version.to_string();
    next.outcome_id = derived("outcome", &["hold", &prev.conversion_id, &version]);
    next.status_reason = Some(StatusReason::HoldEnded);
    Some(next)
}

/// What a click registration does.
#[derive(Debug, Clone, PartialEq)]
pub enum ClickDecision {
    /// The first registration of the ID: store it.
    New,
    /// The ID is registered to the same affiliate, offer and sub IDs: nothing changes.
    Replay,
    /// The ID is registered to someone else: the first registration stays.
    Conflict(Box<Rejection>),
}

/// Judges `incoming` against the click already registered under its ID, if any.
pub fn judge_click(stored: Option<&Click>, incoming: &Click, now_ms: i64) -> ClickDecision {
    let Some(first) = stored else {
        return ClickDecision::New;
    };
    let mut differs = Vec::new();
    if first.aff_id != incoming.aff_id {
        differs.push(format!("aff_id '{}' ≠ '{}'", incoming.aff_id, first.aff_id));
    }
    if first.offer_id != incoming.offer_id {
        differs.push(format!(
            "offer_id '{}' ≠ '{}'",
            incoming.offer_id, first.offer_id
        ));
    }
    if first.subs != incoming.subs {
        differs.push("sub IDs differ".to_string());
    }
    if differs.is_empty() {
        return ClickDecision::Replay;
    }
    let ts = incoming.ts_ms.to_string();
    let subs: Vec<String> = incoming
        .subs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let subs = subs.join("&");
    ClickDecision::Conflict(Box::new(Rejection {
        schema_version: SCHEMA_VERSION,
        outcome_id: derived(
            "click-conflict",
            &[
                &incoming.click_id,
                &incoming.aff_id,
                &incoming.offer_id,
                &subs,
                &ts,
            ],
        ),
        reason: RejectReason::ClickConflict,
        detail: format!(
            "click {} is registered to affiliate {} on offer {}; the registration with {} was refused",
            first.click_id,
            first.aff_id,
            first.offer_id,
            differs.join(", ")
        ),
        postback: None,
        click: Some(incoming.clone()),
        rejected_at_ms: now_ms,
        catalog_revision: None,
    }))
}

/// A rejection of `pb` for `reason`.
pub fn reject(pb: &Postback, reason: RejectReason, detail: String, now_ms: i64) -> Rejection {
    Rejection {
        schema_version: SCHEMA_VERSION,
        outcome_id: outcome_id(&pb.postback_id),
        reason,
        detail,
        postback: Some(pb.clone()),
        click: None,
        rejected_at_ms: now_ms,
        catalog_revision: None,
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
    use s2s_common::fixtures;

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
                    too_fast: TooFast::Flag,
                    hold_ms: None,
                    refuse_pixel: false,
                },
            )]
            .into(),
            blocked_affiliates: ["666".to_string()].into(),
            catalog_revision: Some(11),
            once_per_click: ["ftd".to_string()].into(),
            lifecycle: Lifecycle::default(),
        }
    }

    fn click(offer: &str, ts: i64) -> Click {
        Click {
            offer_id: offer.into(),
            subs: [("sub1".to_string(), "s".to_string())].into(),
            ts_ms: ts,
            ..fixtures::click("c1")
        }
    }

    fn pb(event: &str, ts: i64, txn: Option<&str>) -> Postback {
        Postback {
            event: event.into(),
            txn_id: txn.map(str::to_string),
            ts_ms: ts,
            ..fixtures::postback(&format!("pb-{event}-{ts}-{}", txn.unwrap_or("")), "c1")
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
        assert_eq!(
            v2.payout_delta,
            Decimal::ZERO,
            "pending and approved both pay"
        );
        assert_eq!(
            (v2.event_ts_ms, v2.received_ts_ms),
            (5, 40 * DAY),
            "no window check for updates; the event time stays the conversion's"
        );

        let p3 = with_status(pb("ftd", 41 * DAY, Some("t1")), "reversed");
        // approved → reversed is allowed by the default table.
        let known = Known {
            same: Some(&v2),
            same_event: Some(&v2),
        };
        let v3 = decide(&p3, &click("7", 0), known, &rules(), 300).updated();
        assert_eq!(
            (v3.version, v3.previous_status.as_deref()),
            (3, Some("approved"))
        );
        assert_eq!(
            (v3.payout, v3.payout_delta, v3.priced_payout),
            (Decimal::ZERO, Decimal::new(-5000, 2), Decimal::new(5000, 2)),
            "a reversed conversion pays nothing; the delta takes the payout back"
        );
    }

    fn updated_to(prev: &Conversion, status: &str, ts: i64) -> Outcome {
        let mut p = with_status(pb(&prev.event, ts, prev.txn_id.as_deref()), status);
        p.postback_id = format!("{}-{status}-{ts}", prev.conversion_id);
        decide_update(&p, prev, &rules(), ts)
    }

    #[test]
    fn payout_follows_the_status_and_deltas_sum_to_the_balance() {
        let mut p = pb("ftd", 5, None);
        p.status = "pending".into();
        let v1 = new(&p, &click("7", 0)).attributed();
        assert_eq!((v1.payout, v1.payout_delta), (dec(50), dec(50)));
        let v2 = updated_to(&v1, "rejected", 10).updated();
        assert_eq!((v2.payout, v2.payout_delta), (dec(0), dec(-50)));
        let v3 = updated_to(&v2, "approved", 20).updated();
        assert_eq!(
            (v3.payout, v3.payout_delta),
            (dec(50), dec(50)),
            "re-approval restores the price"
        );
        let v4 = updated_to(&v3, "reversed", 30).updated();
        let sum: Decimal = [&v1, &v2, &v3, &v4].iter().map(|c| c.payout_delta).sum();
        assert_eq!(sum, v4.payout, "summed deltas are the current payout");
        assert_eq!(v4.version, 4);
        // A first postback in an unpaid status is attributed at 0.
        let mut r = pb("registration", 5, None);
        r.status = "rejected".into();
        let c = new(&r, &click("7", 0)).attributed();
        assert_eq!((c.payout, c.payout_delta), (dec(0), dec(0)));
    }

    fn dec(n: i64) -> Decimal {
        Decimal::new(n, 0)
    }

    #[test]
    fn transitions_outside_the_table_are_rejected_naming_from_and_to() {
        let v1 = new(&pb("ftd", 5, None), &click("7", 0)).attributed();
        assert_eq!(v1.status, "approved");
        let r = updated_to(&v1, "pending", 10).rejected();
        assert_eq!(r.reason, RejectReason::InvalidTransition);
        assert!(
            r.detail.contains("from 'approved' to 'pending'") && r.detail.contains("reversed"),
            "{}",
            r.detail
        );
        let v2 = updated_to(&v1, "reversed", 10).updated();
        let r = updated_to(&v2, "approved", 20).rejected();
        assert_eq!(r.reason, RejectReason::InvalidTransition);
        assert!(r.detail.contains("may go to: nothing"), "{}", r.detail);
        // A table of the operator's own.
        let mut rules = rules();
        rules.lifecycle.transitions.insert(
            "reversed".into(),
            ["approved".to_string()].into_iter().collect(),
        );
        let p = with_status(pb("ftd", 30, None), "approved");
        assert_eq!(decide_update(&p, &v2, &rules, 30).updated().version, 3);
    }

    #[test]
    fn price_names_its_rule() {
        let r = rules();
        assert_eq!(
            r.price("7", "ftd"),
            Price {
                amount: dec(50),
                currency: "EUR".into(),
                rule: PayoutRule::OfferEvent
            }
        );
        assert_eq!(
            r.price("7", "registration").rule,
            PayoutRule::NoPayoutForEvent
        );
        assert_eq!(r.price("7", "registration").currency, "EUR");
        let c = new(&pb("ftd", 5, None), &click("nope", 0)).attributed();
        assert_eq!(
            (c.payout, c.payout_rule, c.payout_currency.as_str()),
            (dec(0), PayoutRule::UnknownOffer, "USD")
        );
    }

    #[test]
    fn the_window_is_judged_on_the_operators_event_time() {
        // Received on day 9, happened on day 6: inside offer 7's 7-day window.
        let mut p = pb("ftd", 9 * DAY, None);
        p.event_time_ms = Some(6 * DAY);
        let c = new(&p, &click("7", 0)).attributed();
        assert_eq!((c.event_ts_ms, c.received_ts_ms), (6 * DAY, 9 * DAY));
        p.event_time_ms = Some(7 * DAY + 1);
        assert_eq!(
            new(&p, &click("7", 0)).rejected().reason,
            RejectReason::OutsideWindow
        );
        // Without it, the received time.
        p.event_time_ms = None;
        assert_eq!(
            new(&p, &click("7", 0)).rejected().reason,
            RejectReason::OutsideWindow
        );
    }

    fn too_fast_rules(policy: TooFast, hold: Option<i64>) -> Rules {
        let mut r = rules();
        if let Some(o) = r.offers.get_mut("7") {
            o.too_fast = policy;
            o.hold_ms = hold;
        }
        r
    }

    #[test]
    fn too_fast_conversions_are_flagged_held_or_rejected_per_offer() {
        let fast = pb("ftd", 9_999, None);
        let slow = pb("ftd", 10_000, None);
        let c = decide_new(
            &fast,
            &click("7", 0),
            None,
            &too_fast_rules(TooFast::Flag, None),
            1,
        )
        .attributed();
        assert!(c.suspicious);
        assert_eq!((c.status.as_str(), c.status_reason), ("approved", None));

        let held = too_fast_rules(TooFast::Hold, Some(DAY));
        let c = decide_new(&fast, &click("7", 0), None, &held, 1).attributed();
        assert!(c.suspicious);
        assert_eq!(
            (c.status.as_str(), c.status_reason),
            ("pending", Some(StatusReason::Suspicious))
        );
        assert_eq!(c.payout, dec(50), "pending still carries its payout");
        assert_eq!(hold_deadline(&c, &held), None, "a hold never approves it");
        assert_eq!(auto_approve(&c, &held, 2 * DAY), None);
        let c = decide_new(&slow, &click("7", 0), None, &held, 1).attributed();
        assert_eq!((c.status.as_str(), c.suspicious), ("approved", false));

        let rejecting = too_fast_rules(TooFast::Reject, None);
        let r = decide_new(&fast, &click("7", 0), None, &rejecting, 1).rejected();
        assert_eq!(r.reason, RejectReason::TooFast);
        assert!(r.detail.contains("9999 ms"), "{}", r.detail);
        decide_new(&slow, &click("7", 0), None, &rejecting, 1).attributed();
    }

    #[test]
    fn a_hold_approves_a_pending_conversion_that_did_not_change() {
        let rules = too_fast_rules(TooFast::Flag, Some(14 * DAY));
        let mut p = pb("ftd", DAY, None);
        p.status = "pending".into();
        let v1 = decide_new(&p, &click("7", 0), None, &rules, DAY).attributed();
        assert_eq!(hold_deadline(&v1, &rules), Some(15 * DAY), "from receipt");
        let v2 = auto_approve(&v1, &rules, 15 * DAY).expect("approved");
        assert_eq!(
            (
                v2.version,
                v2.status.as_str(),
                v2.previous_status.as_deref()
            ),
            (2, "approved", Some("pending"))
        );
        assert_eq!(v2.status_reason, Some(StatusReason::HoldEnded));
        assert_eq!(
            v2.outcome_id,
            auto_approve(&v1, &rules, 99).expect("same").outcome_id
        );
        assert_ne!(v2.outcome_id, v1.outcome_id);
        assert_eq!(
            hold_deadline(&v2, &rules),
            None,
            "approved waits for nothing"
        );
        // Not pending, or no hold on the offer: nothing to approve.
        let approved =
            decide_new(&pb("ftd", DAY, None), &click("7", 0), None, &rules, 1).attributed();
        assert_eq!(auto_approve(&approved, &rules, 99 * DAY), None);
        assert_eq!(hold_deadline(&v1, &self::rules()), None);
        // A table without pending → approved never approves automatically.
        let mut strict = rules.clone();
        strict.lifecycle.transitions.remove("pending");
        assert_eq!(auto_approve(&v1, &strict, 15 * DAY), None);
    }

    #[test]
    fn a_blocked_affiliates_new_conversions_are_rejected_and_its_old_ones_still_change() {
        let rules = rules();
        let mut theirs = click("7", 0);
        theirs.aff_id = "666".into();
        let r = decide_new(&pb("ftd", 5, None), &theirs, None, &rules, 1).rejected();
        assert_eq!(r.reason, RejectReason::AffiliateBlocked);
        assert!(r.detail.contains("666"), "{}", r.detail);
        // Attributed before the block: a reversal still applies.
        let mut before = rules.clone();
        before.blocked_affiliates.clear();
        let v1 = decide_new(&pb("ftd", 5, None), &theirs, None, &before, 1).attributed();
        assert_eq!(
            v1.catalog_revision,
            Some(11),
            "priced with the catalog's revision"
        );
        let rev = with_status(pb("ftd", 9, None), "reversed");
        let v2 = decide_update(&rev, &v1, &rules, 9).updated();
        assert_eq!((v2.version, v2.payout), (2, Decimal::ZERO));
    }

    #[test]
    fn an_offer_can_refuse_pixel_conversions() {
        let mut p = pb("ftd", 5, None);
        p.trust = Trust::Pixel;
        let c = new(&p, &click("7", 0)).attributed();
        assert_eq!(c.trust, Trust::Pixel, "accepted and marked by default");
        let mut strict = rules();
        if let Some(o) = strict.offers.get_mut("7") {
            o.refuse_pixel = true;
        }
        let r = decide_new(&p, &click("7", 0), None, &strict, 1).rejected();
        assert_eq!(r.reason, RejectReason::PixelNotAllowed);
        assert!(r.detail.contains("offer 7"), "{}", r.detail);
        // A pixel cannot change a conversion of such an offer either; s2s still can.
        let v1 = decide_new(&pb("ftd", 5, None), &click("7", 0), None, &strict, 1).attributed();
        let mut rev = with_status(pb("ftd", 9, None), "reversed");
        rev.trust = Trust::Pixel;
        assert_eq!(
            decide_update(&rev, &v1, &strict, 9).rejected().reason,
            RejectReason::PixelNotAllowed
        );
        rev.trust = Trust::S2s;
        assert_eq!(decide_update(&rev, &v1, &strict, 9).updated().version, 2);
        // Offers the attributor does not know take them (nothing to refuse by).
        assert_eq!(
            decide_new(&p, &click("nope", 0), None, &strict, 1)
                .attributed()
                .trust,
            Trust::Pixel
        );
    }

    #[test]
    fn the_first_click_registration_wins() {
        let first = click("7", 0);
        assert_eq!(judge_click(None, &first, 1), ClickDecision::New);
        let mut again = click("7", 50);
        again.ip = Some("198.51.100.1".into());
        assert_eq!(
            judge_click(Some(&first), &again, 1),
            ClickDecision::Replay,
            "same owner: a replay, whatever the time or the visitor"
        );
        for change in [
            |c: &mut Click| c.aff_id = "43".into(),
            |c: &mut Click| c.offer_id = "8".into(),
            |c: &mut Click| {
                c.subs.insert("sub2".into(), "x".into());
            },
        ] {
            let mut other = click("7", 0);
            change(&mut other);
            let ClickDecision::Conflict(r) = judge_click(Some(&first), &other, 7) else {
                panic!("expected a conflict for {other:?}");
            };
            assert_eq!(r.reason, RejectReason::ClickConflict);
            assert_eq!(r.click.as_ref(), Some(&other));
            assert_eq!((r.click_id(), r.rejected_at_ms), ("c1", 7));
            assert!(
                r.detail.contains("registered to affiliate 42"),
                "{}",
                r.detail
            );
            let ClickDecision::Conflict(again) = judge_click(Some(&first), &other, 8) else {
                panic!("a conflict again");
            };
            assert_eq!(again.outcome_id, r.outcome_id, "deterministic");
        }
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
