//! The attributor's RocksDB state: clicks by click ID, postbacks waiting for their click,
//! and the input offsets the state reflects.
//!
//! Column families:
//! - `clicks`: `click_id` → `[click ts, 8 bytes BE][click JSON]`. A compaction filter drops
//!   clicks older than the longest attribution window (plus the grace period) as RocksDB
//!   compacts, so expiry costs no scan and no delete traffic.
//! - `pending_by_due`: `[due ms, 8 bytes BE][click_id][0][postback_id]` → postback JSON;
//!   ordered by deadline, so the timer reads only what is due.
//! - `pending_by_click`: `[click_id][0][postback_id]` → `[due ms, 8 bytes BE]`; found by
//!   prefix when the click arrives.
//! - `meta`: committed input offsets, `offset/<topic>/<partition>` → next offset.
//!
//! Writes of one processing cycle are staged in a [`Staged`] overlay (reads see them) and
//! applied with the offsets in one atomic `WriteBatch` by [`Store::commit`], after the
//! cycle's outputs were acknowledged by the broker. Memory is bounded by one shared LRU
//! block cache and a write-buffer manager charged to it.

use std::collections::BTreeMap;
use std::path::Path;

use rocksdb::compaction_filter::Decision;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch,
    WriteBufferManager, DB,
};

/// Key-value pairs in key order.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cf {
    Clicks,
    PendingByDue,
    PendingByClick,
    Meta,
}

impl Cf {
    pub const ALL: [Cf; 4] = [Cf::Clicks, Cf::PendingByDue, Cf::PendingByClick, Cf::Meta];

    pub fn name(self) -> &'static str {
        match self {
            Cf::Clicks => "clicks",
            Cf::PendingByDue => "pending_by_due",
            Cf::PendingByClick => "pending_by_click",
            Cf::Meta => "meta",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("column family {0} missing")]
    MissingCf(&'static str),
    #[error("corrupt state in {cf}: {detail}")]
    Corrupt { cf: &'static str, detail: String },
}

/// Memory limits of the store.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    pub block_cache_bytes: usize,
    pub write_buffer_bytes: usize,
    /// Clicks older than this are dropped at compaction.
    pub click_retention_ms: i64,
}

#[derive(Debug)]
pub struct Store {
    db: DB,
}

/// Whether a stored click value is past retention at `now_ms`.
pub fn click_expired(value: &[u8], now_ms: i64, retention_ms: i64) -> bool {
    match value.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
        Some(ts) => i64::from_be_bytes(ts).saturating_add(retention_ms) < now_ms,
        None => false,
    }
}

impl Store {
    pub fn open(path: &Path, limits: StoreLimits) -> Result<Self, StoreError> {
        let cache = Cache::new_lru_cache(limits.block_cache_bytes);
        let wbm = WriteBufferManager::new_write_buffer_manager_with_cache(
            limits.write_buffer_bytes,
            true,
            cache.clone(),
        );
        let cf_opts = |cf: Cf| {
            let mut o = Options::default();
            let mut table = BlockBasedOptions::default();
            table.set_block_cache(&cache);
            table.set_bloom_filter(10.0, false);
            table.set_cache_index_and_filter_blocks(true);
            o.set_block_based_table_factory(&table);
            o.set_write_buffer_manager(&wbm);
            o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            if cf == Cf::Clicks {
                let retention = limits.click_retention_ms;
                o.set_compaction_filter("click_retention", move |_lvl, _k, v: &[u8]| {
                    if click_expired(v, s2s_common::now_ms(), retention) {
                        Decision::Remove
                    } else {
                        Decision::Keep
                    }
                });
                // Compact files at least daily so that expired clicks go even when idle.
                o.set_periodic_compaction_seconds(24 * 3600);
            }
            ColumnFamilyDescriptor::new(cf.name(), o)
        };
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_write_buffer_manager(&wbm);
        let db = DB::open_cf_descriptors(&db_opts, path, Cf::ALL.map(cf_opts))?;
        Ok(Store { db })
    }

    fn cf(&self, cf: Cf) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db
            .cf_handle(cf.name())
            .ok_or(StoreError::MissingCf(cf.name()))
    }

    pub fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(cf)?, key)?)
    }

    /// Entries from `from` on, while `keep(key)` holds, at most `limit`.
    fn scan(
        &self,
        cf: Cf,
        from: &[u8],
        keep: impl Fn(&[u8]) -> bool,
        limit: usize,
    ) -> Result<Entries, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(cf)?, IteratorMode::From(from, Direction::Forward))
        {
            let (k, v) = item?;
            if !keep(&k) || out.len() >= limit {
                break;
            }
            out.push((k.into_vec(), v.into_vec()));
        }
        Ok(out)
    }

    /// A write overlay for one processing cycle.
    pub fn stage(&self) -> Staged<'_> {
        Staged {
            store: self,
            writes: BTreeMap::new(),
        }
    }

    /// Applies a cycle's writes and the offsets they reflect in one atomic batch.
    pub fn commit(
        &self,
        staged: Staged<'_>,
        offsets: &BTreeMap<(String, i32), i64>,
    ) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for ((cf, key), value) in staged.writes {
            match value {
                Some(v) => batch.put_cf(self.cf(cf)?, key, v),
                None => batch.delete_cf(self.cf(cf)?, key),
            }
        }
        let meta = self.cf(Cf::Meta)?;
        for ((topic, partition), next) in offsets {
            batch.put_cf(meta, offset_key(topic, *partition), next.to_be_bytes());
        }
        self.db.write(batch)?;
        Ok(())
    }

    /// The next offset to read of a partition, as of the last commit.
    pub fn offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
        self.get(Cf::Meta, &offset_key(topic, partition))?
            .map(|v| {
                <[u8; 8]>::try_from(v.as_slice())
                    .map(i64::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt {
                        cf: "meta",
                        detail: "offset is not 8 bytes".into(),
                    })
            })
            .transpose()
    }

    /// RocksDB's estimate of the number of keys in a column family (cheap, for gauges).
    pub fn estimate_keys(&self, cf: Cf) -> Result<u64, StoreError> {
        Ok(self
            .db
            .property_int_value_cf(self.cf(cf)?, "rocksdb.estimate-num-keys")?
            .unwrap_or(0))
    }

    /// Compacts a column family now (tests and operators; normal expiry needs no call).
    pub fn compact(&self, cf: Cf) -> Result<(), StoreError> {
        self.db
            .compact_range_cf(self.cf(cf)?, None::<&[u8]>, None::<&[u8]>);
        Ok(())
    }
}

fn offset_key(topic: &str, partition: i32) -> Vec<u8> {
    format!("offset/{topic}/{partition}").into_bytes()
}

/// Staged writes over the store: reads see them, nothing is durable until
/// [`Store::commit`].
#[derive(Debug)]
pub struct Staged<'s> {
    store: &'s Store,
    writes: BTreeMap<(Cf, Vec<u8>), Option<Vec<u8>>>,
}

impl Staged<'_> {
    /// Whether nothing was staged.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    pub fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.writes.get(&(cf, key.to_vec())) {
            Some(v) => Ok(v.clone()),
            None => self.store.get(cf, key),
        }
    }

    pub fn put(&mut self, cf: Cf, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert((cf, key), Some(value));
    }

    pub fn delete(&mut self, cf: Cf, key: Vec<u8>) {
        self.writes.insert((cf, key), None);
    }

    /// Entries whose key starts with `prefix`, staged writes applied.
    pub fn scan_prefix(&self, cf: Cf, prefix: &[u8]) -> Result<Entries, StoreError> {
        self.merged(cf, prefix, |k| k.starts_with(prefix), usize::MAX)
    }

    /// Up to `limit` entries with keys below `end`, staged writes applied.
    pub fn scan_below(&self, cf: Cf, end: &[u8], limit: usize) -> Result<Entries, StoreError> {
        self.merged(cf, &[], |k| k < end, limit)
    }

    fn merged(
        &self,
        cf: Cf,
        from: &[u8],
        keep: impl Fn(&[u8]) -> bool,
        limit: usize,
    ) -> Result<Entries, StoreError> {
        let mut view: BTreeMap<Vec<u8>, Vec<u8>> = self
            .store
            .scan(cf, from, &keep, limit)?
            .into_iter()
            .collect();
        for ((_, key), value) in self
            .writes
            .range((cf, from.to_vec())..)
            .take_while(|((c, k), _)| *c == cf && keep(k))
        {
            match value {
                Some(v) => view.insert(key.clone(), v.clone()),
                None => view.remove(key),
            };
        }
        Ok(view.into_iter().take(limit).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, retention_ms: i64) -> Store {
        Store::open(
            dir,
            StoreLimits {
                block_cache_bytes: 8 << 20,
                write_buffer_bytes: 4 << 20,
                click_retention_ms: retention_ms,
            },
        )
        .expect("open")
    }

    #[test]
    fn staged_reads_see_writes_and_commit_is_atomic_with_offsets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), i64::MAX);
        let mut st = store.stage();
        st.put(Cf::PendingByClick, b"c1\0a".to_vec(), b"1".to_vec());
        st.put(Cf::PendingByClick, b"c1\0b".to_vec(), b"2".to_vec());
        st.put(Cf::PendingByClick, b"c2\0a".to_vec(), b"3".to_vec());
        assert_eq!(
            st.scan_prefix(Cf::PendingByClick, b"c1\0")
                .expect("scan")
                .len(),
            2
        );
        assert_eq!(store.get(Cf::PendingByClick, b"c1\0a").expect("get"), None);
        let offsets = [(("t".to_string(), 3), 42_i64)].into();
        store.commit(st, &offsets).expect("commit");
        assert_eq!(store.offset("t", 3).expect("offset"), Some(42));

        let mut st = store.stage();
        st.delete(Cf::PendingByClick, b"c1\0a".to_vec());
        st.put(Cf::PendingByClick, b"c0\0z".to_vec(), b"0".to_vec());
        let below = st.scan_below(Cf::PendingByClick, b"c2", 10).expect("scan");
        let keys: Vec<_> = below.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(keys, [&b"c0\0z"[..], &b"c1\0b"[..]]);
        assert_eq!(
            st.scan_below(Cf::PendingByClick, b"c2", 1)
                .expect("scan")
                .len(),
            1
        );
        drop(st);
        assert!(
            store
                .get(Cf::PendingByClick, b"c1\0a")
                .expect("get")
                .is_some(),
            "dropped stage writes nothing"
        );
    }

    #[test]
    fn expired_clicks_vanish_at_compaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), 60_000);
        let now = s2s_common::now_ms();
        let mut st = store.stage();
        let old = [(now - 120_000).to_be_bytes().as_slice(), b"{}"].concat();
        let fresh = [now.to_be_bytes().as_slice(), b"{}"].concat();
        st.put(Cf::Clicks, b"old".to_vec(), old);
        st.put(Cf::Clicks, b"fresh".to_vec(), fresh);
        store.commit(st, &BTreeMap::new()).expect("commit");
        store.compact(Cf::Clicks).expect("compact");
        assert_eq!(store.get(Cf::Clicks, b"old").expect("get"), None);
        assert!(store.get(Cf::Clicks, b"fresh").expect("get").is_some());
        assert!(
            !click_expired(b"short", now, 0),
            "malformed values are kept"
        );
    }
}
