//! The read model's schema: one RocksDB per input partition (all the consumed topics are
//! keyed by click ID and co-partitioned, so everything about a click is in one store),
//! on the shared stores of [`s2s_state`]. No changelog: the read model is derived from
//! the topics alone, so a partition new to an instance is rebuilt by reading them.
//!
//! Column families:
//! - `clicks`: click ID → the click record as published.
//! - `story`: `[click ID][0][kind][id]` → the record as published: every postback,
//!   outcome, delivery attempt, dead letter and command about the click. Keyed by ID, so a
//!   replayed record (at-least-once upstream) lands on itself; a click's story is one
//!   prefix read.
//! - `conversions`: `[event ts][conversion ID][0][version]` → [`ConversionRow`], and
//!   `conversions_by_aff`: `[aff][0][event ts][conversion ID][0][version]` → the same:
//!   time-ordered lists (the event time comes from the postback, so a replay does not add
//!   a row).
//! - `rejections`: `[reason][0][postback ts][outcome ID]` → [`RejectionRow`].
//! - `deliveries`: delivery ID → [`DeliveryRow`] (where it is now), and
//!   `deliveries_by_endpoint`: `[endpoint][0][updated ts][delivery ID]` → () (one entry per
//!   delivery: the old one goes when it moves).
//! - `dead_letters`: `[dead-lettered ts][delivery ID]` → (), and `dead_by_endpoint`:
//!   `[endpoint][0][ts][delivery ID]` → (): the deliveries dead-lettered now (a re-fire
//!   takes them out).
//! - `endpoints`: endpoint → [`EndpointRow`]: counts and the last error.
//! - `totals`: `[h|d][bucket start ts][aff][0][offer][0][event]` → [`Totals`].
//! - `meta`: input offsets.
//! - `uncounted`: `[click ID][0][conversion ID][0][version][attempt ID]` → attempt ts: a
//!   delivered attempt read before its conversion, which the totals count under; the
//!   conversion counts it on arrival and removes the entry (so the family stays near empty).
//! - `refusals`: `[refused ts][refusal ID]` → the refusal as published, and
//!   `refusals_by_source`: `[source][0][refused ts][refusal ID]` → the same: what ingest
//!   refused, newest first (the refusals topic is keyed by source, not click ID).
//!
//! Retention ([`Retention`]): values of every family but `endpoints` and `meta` begin with
//! their write time (8 bytes, [`s2s_state::stamped`]), which the stores' compaction
//! filter compares with `retention` (`totals_retention` for `totals`); the
//! readers strip it ([`decode`]).

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use s2s_state::{Family, StoreError};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cf {
    Clicks,
    Story,
    Conversions,
    ConversionsByAff,
    Rejections,
    Deliveries,
    DeliveriesByEndpoint,
    DeadLetters,
    DeadByEndpoint,
    Endpoints,
    Totals,
    Meta,
    Uncounted,
    Refusals,
    RefusalsBySource,
}

impl Family for Cf {
    const ALL: &'static [Cf] = &[
        Cf::Clicks,
        Cf::Story,
        Cf::Conversions,
        Cf::ConversionsByAff,
        Cf::Rejections,
        Cf::Deliveries,
        Cf::DeliveriesByEndpoint,
        Cf::DeadLetters,
        Cf::DeadByEndpoint,
        Cf::Endpoints,
        Cf::Totals,
        Cf::Meta,
        Cf::Uncounted,
        Cf::Refusals,
        Cf::RefusalsBySource,
    ];
    const META: Cf = Cf::Meta;

    fn id(self) -> u8 {
        self as u8 + 1
    }

    fn name(self) -> &'static str {
        match self {
            Cf::Clicks => "clicks",
            Cf::Story => "story",
            Cf::Conversions => "conversions",
            Cf::ConversionsByAff => "conversions_by_aff",
            Cf::Rejections => "rejections",
            Cf::Deliveries => "deliveries",
            Cf::DeliveriesByEndpoint => "deliveries_by_endpoint",
            Cf::DeadLetters => "dead_letters",
            Cf::DeadByEndpoint => "dead_by_endpoint",
            Cf::Endpoints => "endpoints",
            Cf::Totals => "totals",
            Cf::Meta => "meta",
            Cf::Uncounted => "uncounted",
            Cf::Refusals => "refusals",
            Cf::RefusalsBySource => "refusals_by_source",
        }
    }
}

/// How long a family's entries are kept once last written ([`crate::config`]:
/// `retention`, `totals_retention`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Clicks, stories, lists, deliveries: the history operators look into.
    History,
    /// Hourly and daily totals: small, kept longer.
    Totals,
    /// Endpoints (one row each) and the input offsets.
    Kept,
}

impl Cf {
    pub fn retention(self) -> Retention {
        match self {
            Cf::Totals => Retention::Totals,
            Cf::Endpoints | Cf::Meta => Retention::Kept,
            _ => Retention::History,
        }
    }

    /// Values of families that expire carry their write time first ([`s2s_state::stamped`]),
    /// which the compaction filter reads.
    fn expires(self) -> bool {
        self.retention() != Retention::Kept
    }
}

/// The retention of each family that expires, for the stores' compaction filters.
pub fn retention_ms(history_ms: i64, totals_ms: i64) -> Vec<(Cf, i64)> {
    Cf::ALL
        .iter()
        .filter_map(|cf| match cf.retention() {
            Retention::History => Some((*cf, history_ms)),
            Retention::Totals => Some((*cf, totals_ms)),
            Retention::Kept => None,
        })
        .collect()
}

pub type Store = s2s_state::Store<Cf>;
pub type StoreSet = s2s_state::StoreSet<Cf>;
pub type Stage<'s> = s2s_state::Staged<'s, Cf>;

/// What a story entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Postback,
    Conversion,
    Rejection,
    Attempt,
    DeadLetter,
    Command,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Postback,
        Kind::Conversion,
        Kind::Rejection,
        Kind::Attempt,
        Kind::DeadLetter,
        Kind::Command,
    ];

    fn byte(self) -> u8 {
        self as u8 + 1
    }

    fn from_byte(b: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.byte() == b)
    }
}

/// `[s][0]`: a prefix no other value of the same field extends.
pub fn prefix(s: &str) -> Vec<u8> {
    [s.as_bytes(), b"\0"].concat()
}

pub fn story_key(click_id: &str, kind: Kind, id: &str) -> Vec<u8> {
    [prefix(click_id).as_slice(), &[kind.byte()], id.as_bytes()].concat()
}

/// The kind of a story key (after the click's prefix).
pub fn story_kind(key: &[u8], click_prefix_len: usize) -> Option<Kind> {
    key.get(click_prefix_len).copied().and_then(Kind::from_byte)
}

pub fn timed(prefix: &[u8], ts_ms: i64, id: &[u8]) -> Vec<u8> {
    [prefix, &ts_ms.to_be_bytes(), id].concat()
}

/// The timestamp of a [`timed`] key with a prefix of `prefix_len` bytes.
pub fn timed_ts(key: &[u8], prefix_len: usize) -> Option<i64> {
    key.get(prefix_len..prefix_len + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(i64::from_be_bytes)
}

pub fn conversion_id_key(conversion_id: &str, version: u32) -> Vec<u8> {
    [prefix(conversion_id).as_slice(), &version.to_be_bytes()].concat()
}

/// A conversion in the lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversionRow {
    pub conversion_id: String,
    pub version: u32,
    pub click_id: String,
    pub aff_id: String,
    pub offer_id: String,
    pub event: String,
    pub status: String,
    pub payout: Decimal,
    pub currency: String,
    pub suspicious: bool,
    pub event_ts_ms: i64,
}

/// A rejection in the lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectionRow {
    pub outcome_id: String,
    pub reason: String,
    pub detail: String,
    pub click_id: String,
    pub postback_id: String,
    pub event: String,
    pub ts_ms: i64,
}

/// Where a delivery is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    Delivered,
    /// The last attempt failed; another is scheduled.
    Retrying,
    /// The last attempt failed for good; a dead letter follows.
    Failed,
    DeadLettered,
    /// An operator asked for it again; the next attempt is due.
    Refired,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Delivered => "delivered",
            DeliveryState::Retrying => "retrying",
            DeliveryState::Failed => "failed",
            DeliveryState::DeadLettered => "dead_lettered",
            DeliveryState::Refired => "refired",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRow {
    pub delivery_id: String,
    pub click_id: String,
    pub conversion_id: String,
    pub version: u32,
    pub endpoint: String,
    pub state: DeliveryState,
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub next_attempt_at_ms: Option<i64>,
    /// When it last changed: the time of its entry in `deliveries_by_endpoint`.
    pub updated_ms: i64,
    /// When it was dead-lettered, while it is.
    pub dead_at_ms: Option<i64>,
}

/// One endpoint's record: how its deliveries go, and its last failure.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRow {
    pub endpoint: String,
    pub attempts: u64,
    pub delivered: u64,
    pub failed_attempts: u64,
    pub dead_lettered: u64,
    pub last_attempt_ms: Option<i64>,
    pub last_error: Option<String>,
    pub last_error_status: Option<u16>,
    pub last_error_ms: Option<i64>,
    pub last_error_delivery_id: Option<String>,
}

/// Counts of one bucket of one (affiliate, offer, event). Conversions count under their
/// event time, whatever version changed them later.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub clicks: u64,
    /// Conversions (not versions).
    pub conversions: u64,
    /// Net payout per currency: what the conversions pay in their current status (the sum
    /// of every version's `payout_delta`).
    pub payout: BTreeMap<String, Decimal>,
    /// Per status: the conversions now in it and what they pay, per currency.
    #[serde(default)]
    pub by_status: BTreeMap<String, StatusTotals>,
    pub deliveries_ok: u64,
    pub deliveries_dead: u64,
}

/// The conversions of a bucket that are in one status now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusTotals {
    pub conversions: u64,
    pub payout: BTreeMap<String, Decimal>,
}

impl StatusTotals {
    fn add(&mut self, o: &StatusTotals) {
        self.conversions += o.conversions;
        add_money(&mut self.payout, &o.payout);
    }
}

fn add_money(to: &mut BTreeMap<String, Decimal>, from: &BTreeMap<String, Decimal>) {
    for (c, v) in from {
        *to.entry(c.clone()).or_default() += *v;
    }
}

impl Totals {
    pub fn add(&mut self, o: &Totals) {
        self.clicks += o.clicks;
        self.conversions += o.conversions;
        add_money(&mut self.payout, &o.payout);
        for (status, t) in &o.by_status {
            self.by_status.entry(status.clone()).or_default().add(t);
        }
        self.deliveries_ok += o.deliveries_ok;
        self.deliveries_dead += o.deliveries_dead;
    }

    /// Counts one version of a conversion, read once, in version order: version 1 adds a
    /// conversion; each version moves the conversion (and what it paid) out of its
    /// previous status into its new one.
    pub fn count_version(&mut self, c: &s2s_common::contract::Conversion) {
        let currency = &c.payout_currency;
        if c.version <= 1 {
            self.conversions += 1;
        }
        *self.payout.entry(currency.clone()).or_default() += c.payout_delta;
        if let Some(prev) = &c.previous_status {
            let was = self.by_status.entry(prev.clone()).or_default();
            was.conversions = was.conversions.saturating_sub(1);
            *was.payout.entry(currency.clone()).or_default() -= c.payout - c.payout_delta;
        }
        let now = self.by_status.entry(c.status.clone()).or_default();
        now.conversions += 1;
        *now.payout.entry(currency.clone()).or_default() += c.payout;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    Hour,
    Day,
}

impl Granularity {
    pub const ALL: [Granularity; 2] = [Granularity::Hour, Granularity::Day];

    pub fn millis(self) -> i64 {
        match self {
            Granularity::Hour => 3_600_000,
            Granularity::Day => 86_400_000,
        }
    }

    fn byte(self) -> u8 {
        match self {
            Granularity::Hour => b'h',
            Granularity::Day => b'd',
        }
    }

    /// The start of the bucket `ts_ms` falls in.
    pub fn bucket(self, ts_ms: i64) -> i64 {
        ts_ms - ts_ms.rem_euclid(self.millis())
    }
}

/// `[h|d][bucket][aff][0][offer][0][event]`.
pub fn totals_key(g: Granularity, bucket: i64, aff: &str, offer: &str, event: &str) -> Vec<u8> {
    [
        &[g.byte()][..],
        &bucket.to_be_bytes(),
        &prefix(aff),
        &prefix(offer),
        event.as_bytes(),
    ]
    .concat()
}

/// `(bucket, aff, offer, event)` of a totals key.
pub fn parse_totals_key(key: &[u8]) -> Option<(i64, String, String, String)> {
    let bucket = i64::from_be_bytes(key.get(1..9)?.try_into().ok()?);
    let mut parts = key.get(9..)?.splitn(3, |b| *b == 0);
    let aff = String::from_utf8(parts.next()?.to_vec()).ok()?;
    let offer = String::from_utf8(parts.next()?.to_vec()).ok()?;
    let event = String::from_utf8(parts.next()?.to_vec()).ok()?;
    Some((bucket, aff, offer, event))
}

pub fn totals_range(g: Granularity, from_bucket: i64) -> Vec<u8> {
    [&[g.byte()][..], &from_bucket.to_be_bytes()].concat()
}

/// A stored value of `cf` back to `T` (without its write time, where it has one).
pub fn decode<T: serde::de::DeserializeOwned>(cf: Cf, v: &[u8]) -> Result<T, StoreError> {
    let body = if cf.expires() {
        if v.len() < 8 {
            return Err(StoreError::corrupt(cf, "a value without its write time"));
        }
        s2s_state::unstamped(v)
    } else {
        v
    };
    serde_json::from_slice(body).map_err(|e| StoreError::corrupt(cf, e))
}

/// What is stored for `body` in `cf` written at `now_ms`: stamped where the family expires.
pub fn value(cf: Cf, now_ms: i64, body: &[u8]) -> Vec<u8> {
    if cf.expires() {
        s2s_state::stamped(now_ms, body)
    } else {
        body.to_vec()
    }
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(
        v: u32,
        status: &str,
        prev: Option<&str>,
        payout: i64,
        delta: i64,
    ) -> s2s_common::contract::Conversion {
        s2s_common::contract::Conversion {
            version: v,
            status: status.into(),
            previous_status: prev.map(str::to_string),
            payout: Decimal::from(payout),
            payout_currency: "EUR".into(),
            payout_delta: Decimal::from(delta),
            ..s2s_common::fixtures::conversion("cv", "c")
        }
    }

    #[test]
    fn totals_count_net_payout_by_current_status() {
        let mut t = Totals::default();
        t.count_version(&version(1, "pending", None, 50, 50));
        t.count_version(&version(2, "approved", Some("pending"), 50, 0));
        let mut other = version(1, "approved", None, 20, 20);
        other.conversion_id = "cv2".into();
        t.count_version(&other);
        let eur = |m: &BTreeMap<String, Decimal>| m.get("EUR").copied().unwrap_or_default();
        assert_eq!((t.conversions, eur(&t.payout)), (2, Decimal::new(70, 0)));
        let approved = &t.by_status["approved"];
        assert_eq!(
            (approved.conversions, eur(&approved.payout)),
            (2, Decimal::new(70, 0))
        );
        assert_eq!(
            (
                t.by_status["pending"].conversions,
                eur(&t.by_status["pending"].payout)
            ),
            (0, Decimal::ZERO)
        );
        // A reversal takes the payout back and moves the conversion.
        t.count_version(&version(3, "reversed", Some("approved"), 0, -50));
        assert_eq!((t.conversions, eur(&t.payout)), (2, Decimal::new(20, 0)));
        let reversed = &t.by_status["reversed"];
        assert_eq!(
            (reversed.conversions, eur(&reversed.payout)),
            (1, Decimal::ZERO)
        );
        assert_eq!(
            (
                t.by_status["approved"].conversions,
                eur(&t.by_status["approved"].payout)
            ),
            (1, Decimal::new(20, 0))
        );
        // Buckets add up status by status.
        let mut sum = Totals::default();
        sum.add(&t);
        sum.add(&t);
        assert_eq!(sum.by_status["approved"].conversions, 2);
        assert_eq!(eur(&sum.payout), Decimal::new(40, 0));
    }

    #[test]
    fn buckets_and_totals_keys() {
        assert_eq!(Granularity::Hour.bucket(3_600_000 * 5 + 17), 3_600_000 * 5);
        assert_eq!(Granularity::Day.bucket(86_400_000 + 1), 86_400_000);
        let k = totals_key(Granularity::Day, 86_400_000, "42", "7", "ftd");
        assert_eq!(
            parse_totals_key(&k),
            Some((86_400_000, "42".into(), "7".into(), "ftd".into()))
        );
        assert!(k.starts_with(&totals_range(Granularity::Day, 86_400_000)));
        let clicks = totals_key(Granularity::Day, 0, "42", "7", "");
        assert_eq!(parse_totals_key(&clicks).map(|t| t.3), Some(String::new()));
    }

    #[test]
    fn story_keys_group_by_click_and_say_their_kind() {
        let a = story_key("c1", Kind::Attempt, "d/1");
        let other = story_key("c10", Kind::Postback, "p");
        assert!(a.starts_with(&prefix("c1")) && !other.starts_with(&prefix("c1")));
        assert_eq!(story_kind(&a, prefix("c1").len()), Some(Kind::Attempt));
        let t = timed(b"ep\0", 77, b"id");
        assert_eq!(timed_ts(&t, 3), Some(77));
    }
}
