//! The attributor's state schema, on the shared partition stores of [`s2s_state`]: one
//! RocksDB per input partition (clicks and postbacks partition N share store N), all on one
//! block cache and write-buffer budget, changes logged to the changelog topic.
//!
//! Column families:
//! - `clicks`: `click_id` → `[click ts, 8 bytes BE][click JSON]`.
//! - `conversions`: `[click_id][0][event][0][txn_id]` → `[last change ts, 8 bytes BE]`
//!   `[latest Conversion JSON]`: the dedup keys and the state status updates build on.
//! - `pending_by_due`: `[due ms, 8 bytes BE][click_id][0][offset, 8 bytes BE][postback_id]`
//!   → postback JSON; ordered by deadline, so the timer reads only what is due.
//! - `pending_by_click`: `[click_id][0][offset, 8 bytes BE][postback_id]` → `[due ms]`;
//!   found by prefix when the click arrives, in arrival (offset) order.
//! - `holds_by_due`: `[due ms, 8 bytes BE][click_id][0][event][0][txn_id]` → `[version, 4
//!   bytes BE]`: pending conversions waiting for their offer's hold to end; an entry whose
//!   conversion has moved past that version by then is dropped.
//! - `meta`: the input offsets the state reflects (`offset/<topic>`) and the journal of the
//!   cycle in flight (see [`s2s_state::runtime::Journal`]).
//!
//! Expiry: clicks older than the longest attribution window plus the latest allowed report
//! of an `event_time` plus the grace period, and
//! conversions whose last change is older than `conversion_retention`, are dropped by the
//! compaction filter (see [`s2s_state::store`]). Until compaction drops them, the join
//! treats them as gone by the same rule ([`crate::process`]), so what it decides does not
//! depend on when RocksDB compacted.

use s2s_state::{Family, Limits};

pub use s2s_state::{stamped, unstamped, Entries, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cf {
    Clicks,
    Conversions,
    PendingByDue,
    PendingByClick,
    HoldsByDue,
    Meta,
}

impl Family for Cf {
    const ALL: &'static [Cf] = &[
        Cf::Clicks,
        Cf::Conversions,
        Cf::PendingByDue,
        Cf::PendingByClick,
        Cf::HoldsByDue,
        Cf::Meta,
    ];
    const META: Cf = Cf::Meta;

    fn id(self) -> u8 {
        match self {
            Cf::Clicks => 1,
            Cf::Conversions => 2,
            Cf::PendingByDue => 3,
            Cf::PendingByClick => 4,
            Cf::Meta => 5,
            Cf::HoldsByDue => 6,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Cf::Clicks => "clicks",
            Cf::Conversions => "conversions",
            Cf::PendingByDue => "pending_by_due",
            Cf::PendingByClick => "pending_by_click",
            Cf::HoldsByDue => "holds_by_due",
            Cf::Meta => "meta",
        }
    }
}

impl Cf {
    pub const ALL: &'static [Cf] = <Cf as Family>::ALL;

    pub fn name(self) -> &'static str {
        Family::name(self)
    }
}

pub type Store = s2s_state::Store<Cf>;
pub type StoreSet = s2s_state::StoreSet<Cf>;
pub type Staged<'s> = s2s_state::Staged<'s, Cf>;

/// Memory limits and retention of the stores.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    pub block_cache_bytes: usize,
    pub write_buffer_bytes: usize,
    /// Clicks older than this are dropped at compaction.
    pub click_retention_ms: i64,
    /// Conversions not changed for this long are dropped at compaction.
    pub conversion_retention_ms: i64,
}

impl From<StoreLimits> for Limits<Cf> {
    fn from(l: StoreLimits) -> Self {
        Limits {
            block_cache_bytes: l.block_cache_bytes,
            write_buffer_bytes: l.write_buffer_bytes,
            retention_ms: vec![
                (Cf::Clicks, l.click_retention_ms),
                (Cf::Conversions, l.conversion_retention_ms),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clicks_and_conversions_expire_by_their_own_retention() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(
            dir.path(),
            StoreLimits {
                block_cache_bytes: 8 << 20,
                write_buffer_bytes: 4 << 20,
                click_retention_ms: 60_000,
                conversion_retention_ms: 600_000,
            },
        )
        .expect("open");
        let now = s2s_common::now_ms();
        let mut st = store.stage();
        for cf in [Cf::Clicks, Cf::Conversions, Cf::PendingByClick] {
            st.put(cf, b"old".to_vec(), stamped(now - 120_000, b"{}"));
        }
        store.commit(st, None).expect("commit");
        for cf in Cf::ALL {
            store.compact(*cf).expect("compact");
        }
        let kept = |cf| store.get(cf, b"old").expect("get").is_some();
        assert!(!kept(Cf::Clicks), "past the click retention");
        assert!(kept(Cf::Conversions), "within the conversion retention");
        assert!(kept(Cf::PendingByClick), "pending postbacks do not expire");
    }

    use s2s_state::runtime::Journal;

    #[test]
    fn journal_round_trips_and_commit_closes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(
            dir.path(),
            StoreLimits {
                block_cache_bytes: 8 << 20,
                write_buffer_bytes: 4 << 20,
                click_retention_ms: i64::MAX,
                conversion_retention_ms: i64::MAX,
            },
        )
        .expect("open");
        let journal = Journal {
            now_ms: 5,
            timers: true,
            ends: [("t".to_string(), 42)].into(),
        };
        store.begin(&journal).expect("begin");
        assert_eq!(store.journal::<Journal>().expect("journal"), Some(journal));
        store.commit(store.stage(), None).expect("commit");
        assert_eq!(store.journal::<Journal>().expect("journal"), None);
    }
}
