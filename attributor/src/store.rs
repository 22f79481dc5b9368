//! The attributor's RocksDB state, one database per input partition (clicks and postbacks
//! partition N share store N), so a partition's state moves, restores and is dropped as a
//! unit. All the databases share one LRU block cache and one write-buffer manager, so memory
//! stays bounded however many partitions an instance holds.
//!
//! Column families:
//! - `clicks`: `click_id` → `[click ts, 8 bytes BE][click JSON]`.
//! - `conversions`: `[click_id][0][event][0][txn_id]` → `[last change ts, 8 bytes BE]`
//!   `[latest Conversion JSON]`: the dedup keys and the state status updates build on.
//! - `pending_by_due`: `[due ms, 8 bytes BE][click_id][0][offset, 8 bytes BE][postback_id]`
//!   → postback JSON; ordered by deadline, so the timer reads only what is due.
//! - `pending_by_click`: `[click_id][0][offset, 8 bytes BE][postback_id]` → `[due ms]`;
//!   found by prefix when the click arrives, in arrival (offset) order.
//! - `meta`: the input offsets the state reflects (`offset/<topic>`) and the journal of the
//!   cycle in flight (see [`Journal`]).
//!
//! Expiry costs no scan and no delete traffic: a compaction filter drops clicks older than
//! the longest attribution window plus the grace period, and conversions whose last change
//! is older than `conversion_retention`, as RocksDB compacts; periodic compaction makes
//! files older than a day eligible even when nothing else triggers a compaction.
//!
//! Writes of one processing cycle are staged in a [`Staged`] overlay (reads see them) and
//! applied with the offsets in one atomic `WriteBatch` by [`Store::commit`], after the
//! cycle's outputs were acknowledged by the broker.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rocksdb::compaction_filter::Decision;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch,
    WriteBufferManager, DB,
};
use serde::{Deserialize, Serialize};

/// Key-value pairs in key order.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cf {
    Clicks,
    Conversions,
    PendingByDue,
    PendingByClick,
    Meta,
}

impl Cf {
    /// The byte that names the column family in changelog keys.
    pub fn id(self) -> u8 {
        match self {
            Cf::Clicks => 1,
            Cf::Conversions => 2,
            Cf::PendingByDue => 3,
            Cf::PendingByClick => 4,
            Cf::Meta => 5,
        }
    }

    pub fn from_id(id: u8) -> Option<Cf> {
        Cf::ALL.into_iter().find(|cf| cf.id() == id)
    }

    pub const ALL: [Cf; 5] = [
        Cf::Clicks,
        Cf::Conversions,
        Cf::PendingByDue,
        Cf::PendingByClick,
        Cf::Meta,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Cf::Clicks => "clicks",
            Cf::Conversions => "conversions",
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

/// The cycle in flight, written before its outputs are published and removed by the commit
/// that follows their acknowledgement. After a crash in between, the partition's next cycle
/// replays exactly this cycle — the same input records, the same `now`, the same timer
/// decision — so the outputs that may already be on the topics are reproduced identically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub now_ms: i64,
    /// Whether the cycle released postbacks whose grace period ended.
    pub timers: bool,
    /// Per input topic: the offset after the last record of the cycle.
    pub ends: BTreeMap<String, i64>,
}

const JOURNAL_KEY: &[u8] = b"journal";

/// Opens the per-partition stores of one instance, all on one cache and write-buffer budget.
pub struct StoreSet {
    dir: PathBuf,
    limits: StoreLimits,
    cache: Cache,
    wbm: WriteBufferManager,
}

impl std::fmt::Debug for StoreSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSet").field("dir", &self.dir).finish()
    }
}

impl StoreSet {
    pub fn new(dir: &Path, limits: StoreLimits) -> Self {
        let cache = Cache::new_lru_cache(limits.block_cache_bytes);
        // allow_stall = false: with stalling, a write to one partition's store waits for
        // memory that only the *other* stores' flushes can free, and those flush only when
        // written to — by the same, stalled, worker: a deadlock (seen in the benchmark).
        // Without stalling, a store over the budget flushes its memtables instead.
        let wbm = WriteBufferManager::new_write_buffer_manager_with_cache(
            limits.write_buffer_bytes,
            false,
            cache.clone(),
        );
        StoreSet {
            dir: dir.to_path_buf(),
            limits,
            cache,
            wbm,
        }
    }

    /// Opens (creating if needed) the store of input partition `partition`.
    pub fn open(&self, partition: i32) -> Result<Store, StoreError> {
        Store::open_with(
            &self.dir.join(format!("partition-{partition}")),
            self.limits,
            &self.cache,
            &self.wbm,
        )
    }
}

#[derive(Debug)]
pub struct Store {
    db: DB,
}

/// Whether a value prefixed with an 8-byte BE timestamp is past retention at `now_ms`.
pub fn expired(value: &[u8], now_ms: i64, retention_ms: i64) -> bool {
    match value.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
        Some(ts) => i64::from_be_bytes(ts).saturating_add(retention_ms) < now_ms,
        None => false,
    }
}

/// `[ts, 8 bytes BE][body]`: how clicks and conversions are stored, so that the compaction
/// filter can expire them without parsing.
pub fn stamped(ts_ms: i64, body: &[u8]) -> Vec<u8> {
    [ts_ms.to_be_bytes().as_slice(), body].concat()
}

/// The body of a [`stamped`] value.
pub fn unstamped(value: &[u8]) -> &[u8] {
    value.get(8..).unwrap_or_default()
}

impl Store {
    /// Opens one store with its own cache (tests and tools).
    pub fn open(path: &Path, limits: StoreLimits) -> Result<Self, StoreError> {
        let set = StoreSet::new(path, limits);
        Self::open_with(path, limits, &set.cache, &set.wbm)
    }

    fn open_with(
        path: &Path,
        limits: StoreLimits,
        cache: &Cache,
        wbm: &WriteBufferManager,
    ) -> Result<Self, StoreError> {
        let cf_opts = |cf: Cf| {
            let mut o = Options::default();
            let mut table = BlockBasedOptions::default();
            table.set_block_cache(cache);
            table.set_bloom_filter(10.0, false);
            table.set_cache_index_and_filter_blocks(true);
            o.set_block_based_table_factory(&table);
            o.set_write_buffer_manager(wbm);
            o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            let retention = match cf {
                Cf::Clicks => Some(limits.click_retention_ms),
                Cf::Conversions => Some(limits.conversion_retention_ms),
                _ => None,
            };
            if let Some(retention) = retention {
                o.set_compaction_filter("retention", move |_lvl, _k, v: &[u8]| {
                    if expired(v, s2s_common::now_ms(), retention) {
                        Decision::Remove
                    } else {
                        Decision::Keep
                    }
                });
                o.set_periodic_compaction_seconds(24 * 3600);
            }
            ColumnFamilyDescriptor::new(cf.name(), o)
        };
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_write_buffer_manager(wbm);
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

    /// Applies a cycle's writes (input offsets included, see [`Staged::set_offset`]) and
    /// the changelog position they were logged up to, in one atomic batch, and closes the
    /// cycle's journal.
    pub fn commit(
        &self,
        staged: Staged<'_>,
        changelog: Option<(&str, i64)>,
    ) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for ((cf, key), value) in staged.writes {
            match value {
                Some(v) => batch.put_cf(self.cf(cf)?, key, v),
                None => batch.delete_cf(self.cf(cf)?, key),
            }
        }
        let meta = self.cf(Cf::Meta)?;
        if let Some((topic, next)) = changelog {
            batch.put_cf(meta, offset_key(topic), next.to_be_bytes());
        }
        batch.delete_cf(meta, JOURNAL_KEY);
        self.db.write(batch)?;
        Ok(())
    }

    /// Applies changelog records read from `changelog` up to offset `next` - 1, in one
    /// atomic batch. A restored store's journal is stale (another instance moved the
    /// partition on), so it is dropped.
    pub fn restore(
        &self,
        records: &[(Vec<u8>, Option<Vec<u8>>)],
        changelog: &str,
        next: i64,
    ) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for (key, value) in records {
            let (cf, key) = decode_changelog_key(key)?;
            match value {
                Some(v) => batch.put_cf(self.cf(cf)?, key, v),
                None => batch.delete_cf(self.cf(cf)?, key),
            }
        }
        let meta = self.cf(Cf::Meta)?;
        batch.put_cf(meta, offset_key(changelog), next.to_be_bytes());
        batch.delete_cf(meta, JOURNAL_KEY);
        self.db.write(batch)?;
        Ok(())
    }

    /// The next offset to read of this partition of `topic`, as of the last commit.
    pub fn offset(&self, topic: &str) -> Result<Option<i64>, StoreError> {
        self.get(Cf::Meta, &offset_key(topic))?
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

    /// Records the cycle about to publish its outputs (see [`Journal`]).
    pub fn begin(&self, journal: &Journal) -> Result<(), StoreError> {
        let value = serde_json::to_vec(journal).map_err(|e| StoreError::Corrupt {
            cf: "meta",
            detail: e.to_string(),
        })?;
        self.db.put_cf(self.cf(Cf::Meta)?, JOURNAL_KEY, value)?;
        Ok(())
    }

    /// The cycle that was in flight when the process stopped, if any.
    pub fn journal(&self) -> Result<Option<Journal>, StoreError> {
        self.get(Cf::Meta, JOURNAL_KEY)?
            .map(|v| {
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                    cf: "meta",
                    detail: format!("journal: {e}"),
                })
            })
            .transpose()
    }

    /// RocksDB's estimate of the keys in a column family and its bytes (SST files plus
    /// memtables): cheap, for gauges.
    pub fn size(&self, cf: Cf) -> Result<(u64, u64), StoreError> {
        let h = self.cf(cf)?;
        let int = |name: &str| -> Result<u64, StoreError> {
            Ok(self.db.property_int_value_cf(h, name)?.unwrap_or(0))
        };
        Ok((
            int("rocksdb.estimate-num-keys")?,
            int("rocksdb.total-sst-files-size")? + int("rocksdb.cur-size-all-mem-tables")?,
        ))
    }

    /// Writes every memtable to SST files (benchmarks measure the state on disk).
    pub fn flush(&self) -> Result<(), StoreError> {
        for cf in Cf::ALL {
            self.db.flush_cf(self.cf(cf)?)?;
        }
        Ok(())
    }

    /// Compacts a column family now (tests and operators; normal expiry needs no call).
    pub fn compact(&self, cf: Cf) -> Result<(), StoreError> {
        self.db
            .compact_range_cf(self.cf(cf)?, None::<&[u8]>, None::<&[u8]>);
        Ok(())
    }
}

fn offset_key(topic: &str) -> Vec<u8> {
    format!("offset/{topic}").into_bytes()
}

/// `[cf id][key]`: the key of a state change on the changelog topic.
pub fn changelog_key(cf: Cf, key: &[u8]) -> Vec<u8> {
    [&[cf.id()], key].concat()
}

fn decode_changelog_key(k: &[u8]) -> Result<(Cf, &[u8]), StoreError> {
    k.split_first()
        .and_then(|(id, key)| Some((Cf::from_id(*id)?, key)))
        .ok_or_else(|| StoreError::Corrupt {
            cf: "changelog",
            detail: "record key names no column family".into(),
        })
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

    /// Records that the state now reflects `topic` up to offset `next` - 1.
    pub fn set_offset(&mut self, topic: &str, next: i64) {
        self.put(Cf::Meta, offset_key(topic), next.to_be_bytes().to_vec());
    }

    /// The staged changes as changelog records: `[cf id][key]` → value, `None` deleted.
    pub fn changelog(&self) -> impl Iterator<Item = (Vec<u8>, Option<&[u8]>)> {
        self.writes
            .iter()
            .map(|((cf, key), value)| (changelog_key(*cf, key), value.as_deref()))
    }

    /// Entries whose key starts with `prefix`, staged writes applied.
    pub fn scan_prefix(&self, cf: Cf, prefix: &[u8]) -> Result<Entries, StoreError> {
        self.scan_prefix_limit(cf, prefix, usize::MAX)
    }

    /// The first `limit` entries whose key starts with `prefix`, staged writes applied.
    pub fn scan_prefix_limit(
        &self,
        cf: Cf,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Entries, StoreError> {
        self.merged(cf, prefix, |k| k.starts_with(prefix), limit)
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
        // Deleted keys must not use up the limit: read as many extra as were deleted.
        let deletes = self
            .writes
            .range((cf, from.to_vec())..)
            .take_while(|((c, k), _)| *c == cf && keep(k))
            .filter(|(_, v)| v.is_none())
            .count();
        let mut view: BTreeMap<Vec<u8>, Vec<u8>> = self
            .store
            .scan(cf, from, &keep, limit.saturating_add(deletes))?
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

    pub(crate) fn limits(retention_ms: i64) -> StoreLimits {
        StoreLimits {
            block_cache_bytes: 8 << 20,
            write_buffer_bytes: 4 << 20,
            click_retention_ms: retention_ms,
            conversion_retention_ms: retention_ms,
        }
    }

    #[test]
    fn staged_reads_see_writes_and_commit_is_atomic_with_offsets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), limits(i64::MAX)).expect("open");
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
        let journal = Journal {
            now_ms: 5,
            timers: true,
            ends: [("t".to_string(), 42)].into(),
        };
        store.begin(&journal).expect("begin");
        assert_eq!(store.journal().expect("journal"), Some(journal));
        st.set_offset("t", 42);
        store.commit(st, Some(("log", 9))).expect("commit");
        assert_eq!(store.offset("t").expect("offset"), Some(42));
        assert_eq!(store.offset("log").expect("offset"), Some(9));
        assert_eq!(
            store.journal().expect("journal"),
            None,
            "commit closes the journal"
        );

        let mut st = store.stage();
        st.delete(Cf::PendingByClick, b"c1\0a".to_vec());
        st.put(Cf::PendingByClick, b"c0\0z".to_vec(), b"0".to_vec());
        let below = st.scan_below(Cf::PendingByClick, b"c2", 10).expect("scan");
        let keys: Vec<_> = below.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(keys, [&b"c0\0z"[..], &b"c1\0b"[..]]);
        let one = st.scan_below(Cf::PendingByClick, b"c2", 1).expect("scan");
        assert_eq!(one.len(), 1);
        // A staged delete does not use up the limit.
        let mut st2 = store.stage();
        st2.delete(Cf::PendingByClick, b"c1\0a".to_vec());
        let after_delete = st2.scan_below(Cf::PendingByClick, b"c3", 1).expect("scan");
        assert_eq!(after_delete[0].0, b"c1\0b".to_vec());
        drop(st);
        drop(st2);
        assert!(
            store
                .get(Cf::PendingByClick, b"c1\0a")
                .expect("get")
                .is_some(),
            "dropped stage writes nothing"
        );
    }

    #[test]
    fn expired_clicks_and_conversions_vanish_at_compaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), limits(60_000)).expect("open");
        let now = s2s_common::now_ms();
        let mut st = store.stage();
        for cf in [Cf::Clicks, Cf::Conversions] {
            st.put(cf, b"old".to_vec(), stamped(now - 120_000, b"{}"));
            st.put(cf, b"fresh".to_vec(), stamped(now, b"{}"));
        }
        store.commit(st, None).expect("commit");
        for cf in [Cf::Clicks, Cf::Conversions] {
            store.compact(cf).expect("compact");
            assert_eq!(store.get(cf, b"old").expect("get"), None, "{}", cf.name());
            let fresh = store.get(cf, b"fresh").expect("get").expect("kept");
            assert_eq!(unstamped(&fresh), b"{}");
        }
        assert!(!expired(b"short", now, 0), "malformed values are kept");
        let (keys, bytes) = store.size(Cf::Clicks).expect("size");
        assert!(keys >= 1 && bytes > 0, "{keys} keys, {bytes} bytes");
    }

    #[test]
    fn a_store_over_the_shared_write_budget_does_not_stall_its_writer() {
        // One partition's store holds most of a small shared budget in its memtable; the
        // other is then written by the same thread. With a stalling write-buffer manager
        // that second write waits for memory only the first store's flush could free.
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = StoreLimits {
            block_cache_bytes: 8 << 20,
            write_buffer_bytes: 1 << 20,
            click_retention_ms: i64::MAX,
            conversion_retention_ms: i64::MAX,
        };
        let set = StoreSet::new(dir.path(), limits);
        let (big, other) = (set.open(0).expect("p0"), set.open(1).expect("p1"));
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let write = |store: &Store, n: u32| {
                for chunk in 0..n {
                    let mut st = store.stage();
                    for i in 0..100u32 {
                        st.put(
                            Cf::Clicks,
                            format!("{chunk}-{i}").into_bytes(),
                            vec![7; 100],
                        );
                    }
                    store.commit(st, None).expect("commit");
                }
            };
            write(&big, 80); // ~0.9 MiB of memtable, under the budget
            write(&other, 400); // pushes the total well over it
            let _ = done.send(());
        });
        finished
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("writes finish: no stall across stores sharing the budget");
    }

    #[test]
    fn partitions_have_separate_stores_on_one_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let set = StoreSet::new(dir.path(), limits(i64::MAX));
        let (a, b) = (set.open(0).expect("p0"), set.open(1).expect("p1"));
        let mut st = a.stage();
        st.put(Cf::Clicks, b"c".to_vec(), stamped(1, b"{}"));
        st.set_offset("clicks", 7);
        a.commit(st, None).expect("commit");
        assert!(b.get(Cf::Clicks, b"c").expect("get").is_none());
        assert_eq!(
            (
                a.offset("clicks").expect("o"),
                b.offset("clicks").expect("o")
            ),
            (Some(7), None)
        );
        drop(a);
        let again = set.open(0).expect("reopen");
        assert_eq!(again.offset("clicks").expect("o"), Some(7));
    }
}

#[cfg(test)]
mod changelog_tests {
    use super::*;

    #[test]
    fn a_store_rebuilt_from_the_changelog_equals_the_original() {
        let (d1, d2) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        let limits = super::tests::limits(i64::MAX);
        let (original, rebuilt) = (
            Store::open(d1.path(), limits).expect("open"),
            Store::open(d2.path(), limits).expect("open"),
        );
        let mut log: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        for cycle in 0..3u8 {
            let mut st = original.stage();
            st.put(Cf::Clicks, vec![b'c', cycle], stamped(1, b"{}"));
            st.put(Cf::PendingByClick, b"p".to_vec(), vec![cycle]);
            if cycle == 2 {
                st.delete(Cf::Clicks, vec![b'c', 0]);
            }
            st.set_offset("clicks", i64::from(cycle) + 1);
            log.extend(st.changelog().map(|(k, v)| (k, v.map(<[u8]>::to_vec))));
            original
                .commit(st, Some(("log", log.len() as i64)))
                .expect("commit");
        }
        rebuilt
            .begin(&Journal {
                now_ms: 1,
                timers: false,
                ends: BTreeMap::new(),
            })
            .expect("journal");
        rebuilt
            .restore(&log, "log", log.len() as i64)
            .expect("restore");
        for cf in Cf::ALL {
            let all = |s: &Store| s.stage().scan_prefix(cf, b"").expect("scan");
            assert_eq!(all(&original), all(&rebuilt), "{}", cf.name());
        }
        assert_eq!(rebuilt.offset("clicks").expect("o"), Some(3));
        assert_eq!(
            rebuilt.journal().expect("j"),
            None,
            "a restored store has no journal"
        );
        assert!(matches!(
            rebuilt.restore(&[(vec![99, 1], None)], "log", 1),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
