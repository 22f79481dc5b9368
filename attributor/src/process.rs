//! One step of the join against staged state: what a click, a postback or the passing of
//! time does to the store and which outcomes it emits. The decisions themselves are in
//! [`crate::join`]; this module only reads and writes the state they need.
//!
//! Expiry is a rule here, not an accident of compaction: a click older than
//! `click_retention` (the longest window, plus how late a conversion may be reported with
//! its `event_time`, plus grace) and a conversion unchanged for
//! `conversion_retention` are treated as gone, judged against the time of the record that
//! looks them up (so a replay decides alike), whether or not RocksDB dropped them yet.

use s2s_common::contract::{self, Click, Conversion, Params, Postback, SCHEMA_VERSION};
use s2s_state::store::expired;
use serde::{Deserialize, Serialize};

pub use crate::join::Outcome;
use crate::join::{
    auto_approve, conversion_key, decide_new, decide_update, event_prefix, grace_deadline,
    hold_deadline, judge_click, unknown_click, ClickDecision, Rules,
};
use crate::store::{stamped, unstamped, Cf, Staged, StoreError};

#[derive(Debug, Clone)]
pub struct Joiner {
    pub rules: Rules,
    pub grace_ms: i64,
    /// Clicks older than this (at the time of the record that looks them up) are gone.
    pub click_retention_ms: i64,
    /// Conversions unchanged for this long are gone.
    pub conversion_retention_ms: i64,
}

/// `[click_id][0][event][0][txn_id]`: a conversion's key.
fn conversion_store_key(click_id: &str, event: &str, txn_id: Option<&str>) -> Vec<u8> {
    [
        click_prefix(click_id).as_slice(),
        &conversion_key(event, txn_id),
    ]
    .concat()
}

fn hold_key(due_ms: i64, conversion_key: &[u8]) -> Vec<u8> {
    [due_ms.to_be_bytes().as_slice(), conversion_key].concat()
}

/// `[click_id][0]`: every per-click key starts with it, so no click ID is a prefix of another.
fn click_prefix(click_id: &str) -> Vec<u8> {
    [click_id.as_bytes(), b"\0"].concat()
}

fn pending_click_key(click_id: &str, offset: i64, postback_id: &str) -> Vec<u8> {
    [
        click_prefix(click_id).as_slice(),
        &offset.to_be_bytes(),
        postback_id.as_bytes(),
    ]
    .concat()
}

fn pending_due_key(due_ms: i64, click_key: &[u8]) -> Vec<u8> {
    [due_ms.to_be_bytes().as_slice(), click_key].concat()
}

fn corrupt(cf: Cf, detail: impl ToString) -> StoreError {
    StoreError::Corrupt {
        cf: cf.name(),
        detail: detail.to_string(),
    }
}

/// What the store keeps of a click: only what attribution and conversions need (the click
/// ID is the key, the time is the value's stamp; IP, user agent and the other parameters
/// stay on the clicks topic), in JSON with one-letter names — state grows with every click
/// in the window, so every byte here counts once per click.
#[derive(Debug, Serialize, Deserialize)]
struct StoredClick {
    #[serde(rename = "o")]
    offer_id: String,
    #[serde(rename = "a")]
    aff_id: String,
    #[serde(rename = "s", default, skip_serializing_if = "Params::is_empty")]
    subs: Params,
}

fn encode_click(click: &Click) -> Vec<u8> {
    let stored = StoredClick {
        offer_id: click.offer_id.clone(),
        aff_id: click.aff_id.clone(),
        subs: click.subs.clone(),
    };
    stamped(
        click.ts_ms,
        &serde_json::to_vec(&stored).unwrap_or_default(),
    )
}

fn decode_click(click_id: &str, value: &[u8]) -> Result<Click, StoreError> {
    let ts = value
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(i64::from_be_bytes)
        .ok_or_else(|| corrupt(Cf::Clicks, "value shorter than its timestamp"))?;
    let stored: StoredClick =
        serde_json::from_slice(unstamped(value)).map_err(|e| corrupt(Cf::Clicks, e))?;
    Ok(Click {
        schema_version: SCHEMA_VERSION,
        click_id: click_id.to_string(),
        offer_id: stored.offer_id,
        aff_id: stored.aff_id,
        subs: stored.subs,
        params: Params::new(),
        ip: None,
        user_agent: None,
        referrer: None,
        ts_ms: ts,
    })
}

fn decode_conversion(v: &[u8]) -> Result<Conversion, StoreError> {
    contract::decode(unstamped(v)).map_err(|e| corrupt(Cf::Conversions, e))
}

impl Joiner {
    /// The click registered under `click_id`, unless it expired by `at_ms`.
    fn live_click(
        &self,
        st: &Staged<'_>,
        click_id: &str,
        at_ms: i64,
    ) -> Result<Option<Click>, StoreError> {
        match st.get(Cf::Clicks, click_id.as_bytes())? {
            Some(v) if !expired(&v, at_ms, self.click_retention_ms) => {
                decode_click(click_id, &v).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// The latest version of the conversion stored at `key`, unless it expired by `at_ms`.
    fn live_conversion(
        &self,
        st: &Staged<'_>,
        key: &[u8],
        at_ms: i64,
    ) -> Result<Option<Conversion>, StoreError> {
        match st.get(Cf::Conversions, key)? {
            Some(v) if !expired(&v, at_ms, self.conversion_retention_ms) => {
                decode_conversion(&v).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Stores a click registration and decides, in arrival order, the postbacks that were
    /// waiting for it. The first registration of an ID wins: the same again changes
    /// nothing, a conflicting one is rejected as `click_conflict`.
    pub fn on_click(
        &self,
        st: &mut Staged<'_>,
        click: &Click,
        now_ms: i64,
    ) -> Result<Vec<Outcome>, StoreError> {
        let stored = self.live_click(st, &click.click_id, click.ts_ms)?;
        match judge_click(stored.as_ref(), click, now_ms) {
            ClickDecision::New => {}
            ClickDecision::Replay => return Ok(Vec::new()),
            ClickDecision::Conflict(r) => return Ok(vec![Outcome::Rejected(*r)]),
        }
        st.put(
            Cf::Clicks,
            click.click_id.as_bytes().to_vec(),
            encode_click(click),
        );
        let mut out = Vec::new();
        for (click_key, due) in
            st.scan_prefix(Cf::PendingByClick, &click_prefix(&click.click_id))?
        {
            let due = <[u8; 8]>::try_from(due.as_slice())
                .map(i64::from_be_bytes)
                .map_err(|_| corrupt(Cf::PendingByClick, "due is not 8 bytes"))?;
            let due_key = pending_due_key(due, &click_key);
            let pb = st
                .get(Cf::PendingByDue, &due_key)?
                .ok_or_else(|| corrupt(Cf::PendingByDue, "index entry without postback"))?;
            let pb: Postback = contract::decode(&pb).map_err(|e| corrupt(Cf::PendingByDue, e))?;
            st.delete(Cf::PendingByDue, due_key);
            st.delete(Cf::PendingByClick, click_key);
            out.push(self.judge(st, &pb, Some(click), now_ms)?);
        }
        Ok(out)
    }

    /// Decides a postback read at `offset` of its partition, or holds it until its click
    /// arrives. A change of a conversion that exists is decided at once, with or without
    /// its click (which may have expired long ago). A postback is also held while earlier
    /// postbacks of its click are held, so that a click's postbacks are decided in arrival
    /// order.
    pub fn on_postback(
        &self,
        st: &mut Staged<'_>,
        pb: &Postback,
        offset: i64,
        now_ms: i64,
    ) -> Result<Option<Outcome>, StoreError> {
        let prefix = click_prefix(&pb.click_id);
        if st
            .scan_prefix_limit(Cf::PendingByClick, &prefix, 1)?
            .is_empty()
        {
            let click = self.live_click(st, &pb.click_id, pb.ts_ms)?;
            let key = conversion_store_key(&pb.click_id, &pb.event, pb.txn_id.as_deref());
            if click.is_some() || self.live_conversion(st, &key, pb.ts_ms)?.is_some() {
                return Ok(Some(self.judge(st, pb, click.as_ref(), now_ms)?));
            }
        }
        let due = grace_deadline(pb.ts_ms, self.grace_ms);
        let click_key = pending_click_key(&pb.click_id, offset, &pb.postback_id);
        st.put(
            Cf::PendingByDue,
            pending_due_key(due, &click_key),
            contract::encode(pb),
        );
        st.put(Cf::PendingByClick, click_key, due.to_be_bytes().to_vec());
        Ok(None)
    }

    /// Applies the join rules with what the store knows of the click's conversions, and
    /// stores the conversion an outcome creates or updates. Without the click only a change
    /// of an existing conversion can be decided; anything else is `unknown_click`.
    fn judge(
        &self,
        st: &mut Staged<'_>,
        pb: &Postback,
        click: Option<&Click>,
        now_ms: i64,
    ) -> Result<Outcome, StoreError> {
        let key = conversion_store_key(&pb.click_id, &pb.event, pb.txn_id.as_deref());
        if let Some(prev) = self.live_conversion(st, &key, pb.ts_ms)? {
            let outcome = decide_update(pb, &prev, &self.rules, now_ms);
            self.store_conversion(st, &outcome, key, pb.ts_ms);
            return Ok(outcome);
        }
        let Some(click) = click else {
            return Ok(Outcome::Rejected(unknown_click(pb, self.grace_ms, now_ms)));
        };
        // Other conversions of the event matter only for once-per-click events, and then
        // one is enough: never read a click's whole history of repeatable events.
        let same_event = if self.rules.once_per_click.contains(&pb.event) {
            let event_prefix = [
                click_prefix(&pb.click_id).as_slice(),
                &event_prefix(&pb.event),
            ]
            .concat();
            match st
                .scan_prefix_limit(Cf::Conversions, &event_prefix, 2)?
                .into_iter()
                .find(|(k, v)| *k != key && !expired(v, pb.ts_ms, self.conversion_retention_ms))
            {
                Some((_, v)) => Some(decode_conversion(&v)?),
                None => None,
            }
        } else {
            None
        };
        let outcome = decide_new(pb, click, same_event.as_ref(), &self.rules, now_ms);
        self.store_conversion(st, &outcome, key, pb.ts_ms);
        Ok(outcome)
    }

    /// Stores the conversion `outcome` carries (stamped `changed_ms`, from which its
    /// retention counts) and, when it waits for a hold, the hold's timer.
    fn store_conversion(
        &self,
        st: &mut Staged<'_>,
        outcome: &Outcome,
        key: Vec<u8>,
        changed_ms: i64,
    ) {
        let Some(c) = outcome.conversion() else {
            return;
        };
        if let Some(due) = hold_deadline(c, &self.rules) {
            st.put(
                Cf::HoldsByDue,
                hold_key(due, &key),
                c.version.to_be_bytes().to_vec(),
            );
        }
        st.put(
            Cf::Conversions,
            key,
            stamped(changed_ms, &contract::encode(c)),
        );
    }

    /// The timers due by `now_ms`, up to `limit` of each kind, earliest first: held
    /// postbacks whose grace period ended (a change of a conversion that exists is decided;
    /// anything else is rejected as `unknown_click`), then holds that ended (the conversion
    /// is approved if it is still the version that waited).
    pub fn on_timer(
        &self,
        st: &mut Staged<'_>,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<Outcome>, StoreError> {
        let end = now_ms.saturating_add(1).to_be_bytes();
        let mut out = Vec::new();
        for (due_key, pb) in st.scan_below(Cf::PendingByDue, &end, limit)? {
            let pb: Postback = contract::decode(&pb).map_err(|e| corrupt(Cf::PendingByDue, e))?;
            st.delete(
                Cf::PendingByClick,
                due_key.get(8..).unwrap_or_default().to_vec(),
            );
            st.delete(Cf::PendingByDue, due_key);
            out.push(self.judge(st, &pb, None, now_ms)?);
        }
        for (hold, version) in st.scan_below(Cf::HoldsByDue, &end, limit)? {
            st.delete(Cf::HoldsByDue, hold.clone());
            let (Some(due), Some(key)) = (hold.get(..8), hold.get(8..)) else {
                return Err(corrupt(Cf::HoldsByDue, "key shorter than its deadline"));
            };
            let due = <[u8; 8]>::try_from(due)
                .map(i64::from_be_bytes)
                .map_err(|_| corrupt(Cf::HoldsByDue, "bad deadline"))?;
            let version = <[u8; 4]>::try_from(version.as_slice())
                .map(u32::from_be_bytes)
                .map_err(|_| corrupt(Cf::HoldsByDue, "version is not 4 bytes"))?;
            let Some(prev) = self.live_conversion(st, key, due)? else {
                continue;
            };
            if prev.version != version {
                continue;
            }
            if let Some(next) = auto_approve(&prev, &self.rules, now_ms) {
                let outcome = Outcome::Updated(next);
                self.store_conversion(st, &outcome, key.to_vec(), due);
                out.push(outcome);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, StoreLimits};
    use s2s_common::contract::RejectReason;
    use s2s_common::fixtures;
    use std::collections::BTreeMap;

    fn store(dir: &std::path::Path) -> Store {
        Store::open(
            dir,
            StoreLimits {
                block_cache_bytes: 8 << 20,
                write_buffer_bytes: 4 << 20,
                click_retention_ms: i64::MAX,
                conversion_retention_ms: i64::MAX,
            },
        )
        .expect("open")
    }

    fn joiner() -> Joiner {
        Joiner {
            rules: Rules {
                default_window_ms: 1000,
                event_windows_ms: BTreeMap::new(),
                default_currency: "USD".into(),
                offers: BTreeMap::new(),
                blocked_affiliates: Default::default(),
                catalog_revision: None,
                once_per_click: ["ftd".to_string()].into(),
                lifecycle: Default::default(),
            },
            grace_ms: 100,
            click_retention_ms: 1100,
            conversion_retention_ms: 10_000,
        }
    }

    fn click(id: &str, ts: i64) -> Click {
        Click {
            aff_id: "a".into(),
            ts_ms: ts,
            ..fixtures::click(id)
        }
    }

    fn pb(id: &str, click_id: &str, ts: i64) -> Postback {
        Postback {
            ts_ms: ts,
            ..fixtures::postback(id, click_id)
        }
    }

    fn status(mut p: Postback, s: &str) -> Postback {
        p.status = s.into();
        p
    }

    fn label(o: &Outcome) -> String {
        match o {
            Outcome::Rejected(r) => format!("rejected:{}", r.reason.as_str()),
            Outcome::Attributed(c) | Outcome::Updated(c) => {
                format!("{}:v{}:{}", o.label(), c.version, c.status)
            }
        }
    }

    #[test]
    fn stored_clicks_keep_what_attribution_needs_in_few_bytes() {
        let mut c = click("01JD5ZQ0000000000000000000", 1_700_000_000_000);
        c.subs = [("sub1".to_string(), "fb_campaign_123".to_string())].into();
        c.ip = Some("203.0.113.9".into());
        c.user_agent = Some("Mozilla/5.0 (X11; Linux x86_64)".into());
        let value = encode_click(&c);
        let back = decode_click(&c.click_id, &value).expect("decodes");
        assert_eq!(
            (
                back.offer_id.as_str(),
                back.aff_id.as_str(),
                &back.subs,
                back.ts_ms
            ),
            (c.offer_id.as_str(), c.aff_id.as_str(), &c.subs, c.ts_ms)
        );
        assert_eq!(back.ip, None, "not kept: not needed to attribute");
        let full = contract::encode(&c).len();
        assert!(
            value.len() * 3 < full,
            "{} bytes kept of {full}",
            value.len()
        );
        assert!(decode_click("x", b"short").is_err());
    }

    #[test]
    fn click_then_postback_attributes_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        let mut st = s.stage();
        let j = joiner();
        assert!(j
            .on_click(&mut st, &click("c", 0), 0)
            .expect("ok")
            .is_empty());
        let o = j
            .on_postback(&mut st, &pb("p", "c", 10), 0, 10)
            .expect("ok");
        assert!(matches!(o, Some(Outcome::Attributed(ref c)) if c.click_id == "c"));
    }

    #[test]
    fn postback_before_click_waits_then_joins_across_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        let j = joiner();
        let mut st = s.stage();
        assert_eq!(
            j.on_postback(&mut st, &pb("p", "c", 5), 0, 5).expect("ok"),
            None
        );
        s.commit(st, None).expect("commit");

        let mut st = s.stage();
        assert!(
            j.on_timer(&mut st, 104, 10).expect("ok").is_empty(),
            "due at 105"
        );
        let out = j.on_click(&mut st, &click("c", 0), 60).expect("ok");
        assert!(matches!(out.as_slice(), [Outcome::Attributed(c)] if c.postback_id == "p"));
        assert!(
            j.on_timer(&mut st, 1_000, 10).expect("ok").is_empty(),
            "no longer pending"
        );
        s.commit(st, None).expect("commit");
        for cf in [Cf::PendingByClick, Cf::PendingByDue] {
            assert!(s.stage().scan_prefix(cf, b"").expect("scan").is_empty());
        }
    }

    #[test]
    fn held_postbacks_of_a_click_are_decided_in_arrival_order() {
        // pending at offset 3, approved at 7, approved again at 9, reversed at 12, all before
        // the click. The postback IDs sort the other way, so only the offsets give the order.
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        let j = joiner();
        let mut st = s.stage();
        let arrivals = [
            (3, status(pb("z", "c", 10), "pending")),
            (7, status(pb("y", "c", 11), "approved")),
            (9, status(pb("x", "c", 12), "approved")),
            (12, status(pb("w", "c", 13), "reversed")),
        ];
        for (offset, p) in &arrivals {
            assert_eq!(j.on_postback(&mut st, p, *offset, 20).expect("ok"), None);
        }
        let out = j.on_click(&mut st, &click("c", 0), 30).expect("ok");
        let labels: Vec<_> = out.iter().map(label).collect();
        assert_eq!(
            labels,
            [
                "attributed:v1:pending",
                "updated:v2:approved",
                "rejected:duplicate",
                "updated:v3:reversed"
            ]
        );
        let ids: Vec<_> = out
            .iter()
            .filter_map(|o| o.conversion())
            .map(|c| c.conversion_id.clone())
            .collect();
        assert!(
            ids.windows(2).all(|w| w[0] == w[1]),
            "one conversion: {ids:?}"
        );
    }

    #[test]
    fn dedup_and_updates_survive_a_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        let j = joiner();
        let mut st = s.stage();
        j.on_click(&mut st, &click("c", 0), 0).expect("ok");
        let first = j
            .on_postback(&mut st, &status(pb("p1", "c", 1), "pending"), 0, 1)
            .expect("ok");
        assert_eq!(
            first.as_ref().map(label).as_deref(),
            Some("attributed:v1:pending")
        );
        s.commit(st, None).expect("commit");

        let mut st = s.stage();
        let again = j
            .on_postback(&mut st, &status(pb("p2", "c", 2), "pending"), 1, 2)
            .expect("ok");
        assert_eq!(
            again.as_ref().map(label).as_deref(),
            Some("rejected:duplicate")
        );
        let mut other_txn = pb("p3", "c", 3);
        other_txn.txn_id = Some("t2".into());
        let second_ftd = j.on_postback(&mut st, &other_txn, 2, 3).expect("ok");
        assert!(
            matches!(&second_ftd, Some(Outcome::Rejected(r)) if r.reason == RejectReason::Duplicate && r.detail.contains("once per click")),
            "{second_ftd:?}"
        );
        let approved = j.on_postback(&mut st, &pb("p4", "c", 4), 3, 4).expect("ok");
        assert_eq!(
            approved.as_ref().map(label).as_deref(),
            Some("updated:v2:approved")
        );
        let mut deposit = pb("p5", "c", 5);
        deposit.event = "deposit".into();
        let dep = j.on_postback(&mut st, &deposit, 4, 5).expect("ok");
        assert_eq!(
            dep.as_ref().map(label).as_deref(),
            Some("attributed:v1:approved"),
            "other event"
        );
    }

    #[test]
    fn unknown_click_is_rejected_when_grace_ends_exactly_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        let j = joiner();
        let mut st = s.stage();
        j.on_postback(&mut st, &pb("p1", "nope", 0), 0, 0)
            .expect("ok");
        j.on_postback(&mut st, &pb("p2", "nope", 50), 1, 50)
            .expect("ok");
        let first = j.on_timer(&mut st, 100, 10).expect("ok");
        assert!(matches!(first.as_slice(),
            [Outcome::Rejected(r)] if r.reason == RejectReason::UnknownClick && r.postback.as_ref().map(|p| p.postback_id.as_str()) == Some("p1")));
        assert_eq!(j.on_timer(&mut st, 149, 10).expect("ok"), vec![]);
        assert_eq!(j.on_timer(&mut st, 150, 10).expect("ok").len(), 1);
        assert!(j.on_timer(&mut st, 10_000, 10).expect("ok").is_empty());
    }

    #[test]
    fn deadline_comes_from_the_record_so_a_replay_decides_alike() {
        // Processed late (now = 10 000) the deadline is still ts + grace = 105.
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        let j = joiner();
        let mut st = s.stage();
        j.on_postback(&mut st, &pb("p", "gone", 5), 0, 10_000)
            .expect("ok");
        assert_eq!(j.on_timer(&mut st, 105, 10).expect("ok").len(), 1);
    }

    #[test]
    fn late_postback_is_outside_window() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        let j = joiner();
        let mut st = s.stage();
        j.on_click(&mut st, &click("c", 0), 0).expect("ok");
        let o = j
            .on_postback(&mut st, &pb("p", "c", 1001), 0, 1001)
            .expect("ok");
        assert!(matches!(o, Some(Outcome::Rejected(r)) if r.reason == RejectReason::OutsideWindow));
    }

    const DAY: i64 = 86_400_000;

    /// Production-like retention: a 30-day window, 60 s grace, conversions kept 90 days.
    fn month_joiner() -> Joiner {
        let mut j = joiner();
        j.rules.default_window_ms = 30 * DAY;
        j.grace_ms = 60_000;
        j.click_retention_ms = 30 * DAY + 60_000;
        j.conversion_retention_ms = 90 * DAY;
        j
    }

    #[test]
    fn a_reversal_45_days_after_an_ftd_updates_it_after_its_click_expired() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = month_joiner();
        let s = Store::open(
            dir.path(),
            StoreLimits {
                block_cache_bytes: 8 << 20,
                write_buffer_bytes: 4 << 20,
                click_retention_ms: j.click_retention_ms,
                conversion_retention_ms: j.conversion_retention_ms,
            },
        )
        .expect("open");
        let now = s2s_common::now_ms();
        let t0 = now - 46 * DAY;
        let mut st = s.stage();
        j.on_click(&mut st, &click("c", t0), t0).expect("ok");
        let ftd = j
            .on_postback(&mut st, &pb("ftd", "c", t0 + DAY), 0, t0 + DAY)
            .expect("ok");
        assert_eq!(
            ftd.as_ref().map(label).as_deref(),
            Some("attributed:v1:approved")
        );
        s.commit(st, None).expect("commit");
        // The click is past its retention and compaction drops it, as it would in 45 days.
        for cf in Cf::ALL {
            s.compact(*cf).expect("compact");
        }
        assert!(
            s.get(Cf::Clicks, b"c").expect("get").is_none(),
            "click expired"
        );

        let mut st = s.stage();
        let reversal = status(pb("rev", "c", now), "reversed");
        let v2 = j.on_postback(&mut st, &reversal, 1, now).expect("ok");
        assert_eq!(
            v2.as_ref().map(label).as_deref(),
            Some("updated:v2:reversed")
        );
        let v2 = v2
            .and_then(|o| o.conversion().cloned())
            .expect("a conversion");
        let v1 = ftd
            .and_then(|o| o.conversion().cloned())
            .expect("a conversion");
        assert_eq!(v2.conversion_id, v1.conversion_id);
        assert_eq!((v2.payout, v2.payout_delta), (v1.payout, -v1.payout));
        // A new conversion on the expired click still has nothing to join.
        let mut dep = pb("dep", "c", now);
        dep.event = "deposit".into();
        assert_eq!(
            j.on_postback(&mut st, &dep, 2, now).expect("ok"),
            None,
            "held"
        );
        let out = j.on_timer(&mut st, now + 60_000, 10).expect("ok");
        assert_eq!(
            out.iter().map(label).collect::<Vec<_>>(),
            ["rejected:unknown_click"]
        );
    }

    #[test]
    fn expiry_is_judged_by_the_rule_before_compaction_drops_anything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        let j = joiner(); // clicks kept 1 100 ms, conversions 10 000 ms
        let mut st = s.stage();
        j.on_click(&mut st, &click("c", 0), 0).expect("ok");
        // 1 101 ms after the click: gone, though still in the store.
        let late = pb("p", "c", 1_101);
        assert_eq!(j.on_postback(&mut st, &late, 0, 1_101).expect("ok"), None);
        // A re-registration of the expired ID is a new click, not a conflict.
        let mut other = click("c", 2_000);
        other.aff_id = "b".into();
        let out = j.on_click(&mut st, &other, 2_000).expect("ok");
        assert_eq!(
            out.iter().map(label).collect::<Vec<_>>(),
            ["attributed:v1:approved"],
            "the held postback joins the new click"
        );
    }

    #[test]
    fn a_conflicting_click_registration_is_refused_and_the_first_stays() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        let j = joiner();
        let mut st = s.stage();
        assert!(j
            .on_click(&mut st, &click("c", 0), 0)
            .expect("ok")
            .is_empty());
        assert!(
            j.on_click(&mut st, &click("c", 5), 5)
                .expect("ok")
                .is_empty(),
            "an identical replay is a no-op"
        );
        let mut thief = click("c", 6);
        thief.aff_id = "thief".into();
        let out = j.on_click(&mut st, &thief, 6).expect("ok");
        assert!(
            matches!(out.as_slice(), [Outcome::Rejected(r)] if r.reason == RejectReason::ClickConflict && r.click.as_ref().map(|c| c.aff_id.as_str()) == Some("thief")),
            "{out:?}"
        );
        s.commit(st, None).expect("commit");
        let mut st = s.stage();
        let o = j
            .on_postback(&mut st, &pb("p", "c", 10), 0, 10)
            .expect("ok");
        assert!(
            matches!(&o, Some(Outcome::Attributed(c)) if c.aff_id == "a" && c.click_ts_ms == 0),
            "attributed to the first registration: {o:?}"
        );
    }

    fn holding_joiner() -> Joiner {
        let mut j = joiner();
        j.rules.offers.insert(
            "1".into(),
            crate::join::OfferRules {
                currency: "USD".into(),
                hold_ms: Some(500),
                ..Default::default()
            },
        );
        j
    }

    #[test]
    fn a_hold_approves_on_the_timer_unless_the_operator_changed_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        let j = holding_joiner();
        let mut st = s.stage();
        j.on_click(&mut st, &click("c", 0), 0).expect("ok");
        j.on_click(&mut st, &click("d", 0), 0).expect("ok");
        j.on_postback(&mut st, &status(pb("p1", "c", 10), "pending"), 0, 10)
            .expect("ok");
        j.on_postback(&mut st, &status(pb("p2", "d", 20), "pending"), 1, 20)
            .expect("ok");
        s.commit(st, None).expect("commit");

        let mut st = s.stage();
        // d is rejected by the operator before its hold ends.
        let r = j
            .on_postback(&mut st, &status(pb("p3", "d", 100), "rejected"), 2, 100)
            .expect("ok");
        assert_eq!(
            r.as_ref().map(label).as_deref(),
            Some("updated:v2:rejected")
        );
        assert!(
            j.on_timer(&mut st, 509, 10).expect("ok").is_empty(),
            "due at 510"
        );
        let out = j.on_timer(&mut st, 520, 10).expect("ok");
        assert_eq!(
            out.iter().map(label).collect::<Vec<_>>(),
            ["updated:v2:approved"]
        );
        assert!(
            matches!(&out[0], Outcome::Updated(c) if c.click_id == "c" && c.status_reason == Some(s2s_common::contract::StatusReason::HoldEnded))
        );
        s.commit(st, None).expect("commit");
        let mut st = s.stage();
        assert!(
            j.on_timer(&mut st, 10_000, 10).expect("ok").is_empty(),
            "once"
        );
        let again = j
            .on_postback(&mut st, &pb("p4", "c", 600), 3, 600)
            .expect("ok");
        assert_eq!(
            again.as_ref().map(label).as_deref(),
            Some("rejected:duplicate"),
            "the stored version is the approved one"
        );
        assert!(
            s.stage()
                .scan_prefix(Cf::HoldsByDue, b"")
                .expect("scan")
                .is_empty(),
            "both timers consumed"
        );
    }

    #[test]
    fn a_held_update_of_an_expired_click_is_decided_when_its_grace_ends() {
        // The click expired; a new event for it is held, and an update behind it waits
        // its turn, then finds its conversion when the timer runs.
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        let j = joiner();
        let mut st = s.stage();
        j.on_click(&mut st, &click("c", 0), 0).expect("ok");
        j.on_postback(&mut st, &status(pb("p1", "c", 10), "pending"), 0, 10)
            .expect("ok");
        let mut dep = pb("p2", "c", 2_000);
        dep.event = "deposit".into();
        assert_eq!(j.on_postback(&mut st, &dep, 1, 2_000).expect("ok"), None);
        let upd = status(pb("p3", "c", 2_001), "approved");
        assert_eq!(
            j.on_postback(&mut st, &upd, 2, 2_001).expect("ok"),
            None,
            "behind the held postback of its click"
        );
        let out = j.on_timer(&mut st, 2_101, 10).expect("ok");
        assert_eq!(
            out.iter().map(label).collect::<Vec<_>>(),
            ["rejected:unknown_click", "updated:v2:approved"]
        );
    }
}
