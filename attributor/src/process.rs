//! One step of the join against staged state: what a click, a postback or the passing of
//! time does to the store and which outcomes it emits. The decisions themselves are in
//! [`crate::join`]; this module only reads and writes the state they need.

use s2s_common::contract::{self, Click, Postback, RejectReason};

pub use crate::join::Outcome;
use crate::join::{attribute, grace_deadline, reject, Rules};
use crate::store::{Cf, Staged, StoreError};

#[derive(Debug, Clone)]
pub struct Joiner {
    pub rules: Rules,
    pub grace_ms: i64,
}

fn pending_click_key(click_id: &str, postback_id: &str) -> Vec<u8> {
    [click_id.as_bytes(), b"\0", postback_id.as_bytes()].concat()
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

impl Joiner {
    /// Stores the click and attributes any postbacks that were waiting for it.
    pub fn on_click(
        &self,
        st: &mut Staged<'_>,
        click: &Click,
        now_ms: i64,
    ) -> Result<Vec<Outcome>, StoreError> {
        let value = [
            click.ts_ms.to_be_bytes().as_slice(),
            &contract::encode(click),
        ]
        .concat();
        st.put(Cf::Clicks, click.click_id.as_bytes().to_vec(), value);

        let prefix = pending_click_key(&click.click_id, "");
        let mut out = Vec::new();
        for (click_key, due) in st.scan_prefix(Cf::PendingByClick, &prefix)? {
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
            out.push(attribute(&pb, click, &self.rules, now_ms));
        }
        Ok(out)
    }

    /// Attributes or rejects a postback, or holds it until its click arrives.
    pub fn on_postback(
        &self,
        st: &mut Staged<'_>,
        pb: &Postback,
        now_ms: i64,
    ) -> Result<Option<Outcome>, StoreError> {
        match st.get(Cf::Clicks, pb.click_id.as_bytes())? {
            Some(v) => {
                let click: Click = contract::decode(v.get(8..).unwrap_or_default())
                    .map_err(|e| corrupt(Cf::Clicks, e))?;
                Ok(Some(attribute(pb, &click, &self.rules, now_ms)))
            }
            None => {
                let due = grace_deadline(now_ms, self.grace_ms);
                let click_key = pending_click_key(&pb.click_id, &pb.postback_id);
                st.put(
                    Cf::PendingByDue,
                    pending_due_key(due, &click_key),
                    contract::encode(pb),
                );
                st.put(Cf::PendingByClick, click_key, due.to_be_bytes().to_vec());
                Ok(None)
            }
        }
    }

    /// Rejects, as `unknown_click`, up to `limit` held postbacks whose grace period ended.
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
            let detail = format!(
                "no click with ID '{}' arrived within the grace period of {} ms",
                pb.click_id, self.grace_ms
            );
            out.push(Outcome::Rejected(reject(
                &pb,
                RejectReason::UnknownClick,
                detail,
                now_ms,
            )));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, StoreLimits};
    use std::collections::BTreeMap;

    fn store(dir: &std::path::Path) -> Store {
        Store::open(
            dir,
            StoreLimits {
                block_cache_bytes: 8 << 20,
                write_buffer_bytes: 4 << 20,
                click_retention_ms: i64::MAX,
            },
        )
        .expect("open")
    }

    fn joiner() -> Joiner {
        Joiner {
            rules: Rules {
                default_window_ms: 1000,
                default_currency: "USD".into(),
                offers: BTreeMap::new(),
            },
            grace_ms: 100,
        }
    }

    fn click(id: &str, ts: i64) -> Click {
        Click {
            schema_version: 1,
            click_id: id.into(),
            offer_id: "1".into(),
            aff_id: "a".into(),
            subs: Default::default(),
            params: Default::default(),
            ip: None,
            user_agent: None,
            referrer: None,
            ts_ms: ts,
        }
    }

    fn pb(id: &str, click_id: &str, ts: i64) -> Postback {
        Postback {
            schema_version: 1,
            postback_id: id.into(),
            click_id: click_id.into(),
            event: "ftd".into(),
            txn_id: None,
            amount: None,
            currency: None,
            status: "approved".into(),
            source: None,
            params: Default::default(),
            ip: None,
            ts_ms: ts,
        }
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
        let o = j.on_postback(&mut st, &pb("p", "c", 10), 10).expect("ok");
        assert!(matches!(o, Some(Outcome::Attributed(ref c)) if c.click_id == "c"));
    }

    #[test]
    fn postback_before_click_waits_then_joins_across_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        let j = joiner();
        let mut st = s.stage();
        assert_eq!(
            j.on_postback(&mut st, &pb("p", "c", 5), 5).expect("ok"),
            None
        );
        s.commit(st, &BTreeMap::new()).expect("commit");

        let mut st = s.stage();
        assert!(
            j.on_timer(&mut st, 50, 10).expect("ok").is_empty(),
            "not due yet"
        );
        let out = j.on_click(&mut st, &click("c", 0), 60).expect("ok");
        assert!(matches!(out.as_slice(), [Outcome::Attributed(c)] if c.postback_id == "p"));
        assert!(
            j.on_timer(&mut st, 1_000, 10).expect("ok").is_empty(),
            "no longer pending"
        );
        s.commit(st, &BTreeMap::new()).expect("commit");
        assert!(s
            .stage()
            .scan_prefix(Cf::PendingByClick, b"")
            .expect("scan")
            .is_empty());
        assert!(s
            .stage()
            .scan_prefix(Cf::PendingByDue, b"")
            .expect("scan")
            .is_empty());
    }

    #[test]
    fn unknown_click_is_rejected_when_grace_ends_exactly_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        let j = joiner();
        let mut st = s.stage();
        j.on_postback(&mut st, &pb("p1", "nope", 0), 0).expect("ok");
        j.on_postback(&mut st, &pb("p2", "nope", 0), 50)
            .expect("ok");
        let first = j.on_timer(&mut st, 100, 10).expect("ok");
        assert!(matches!(first.as_slice(),
            [Outcome::Rejected(r)] if r.reason == RejectReason::UnknownClick && r.postback.as_ref().map(|p| p.postback_id.as_str()) == Some("p1")));
        assert_eq!(j.on_timer(&mut st, 149, 10).expect("ok"), vec![]);
        assert_eq!(j.on_timer(&mut st, 150, 10).expect("ok").len(), 1);
        assert!(j.on_timer(&mut st, 10_000, 10).expect("ok").is_empty());
    }

    #[test]
    fn late_postback_is_outside_window() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        let j = joiner();
        let mut st = s.stage();
        j.on_click(&mut st, &click("c", 0), 0).expect("ok");
        let o = j
            .on_postback(&mut st, &pb("p", "c", 1001), 1001)
            .expect("ok");
        assert!(matches!(o, Some(Outcome::Rejected(r)) if r.reason == RejectReason::OutsideWindow));
    }
}
