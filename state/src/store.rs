//! A partition's RocksDB store: one database per input partition, so that a partition's
//! state moves, restores and is dropped as a unit. All the databases of an instance share
//! one LRU block cache (index and filter blocks included) and one write-buffer manager
//! charged to it, so memory stays bounded however many partitions an instance holds and
//! however large the state grows.
//!
//! A service names its column families with a [`Family`] type. Writes of one processing
//! cycle are staged in a [`Staged`] overlay (reads see them) and applied with the input
//! offsets they reflect in one atomic `WriteBatch` by [`Store::commit`], after the cycle's
//! outputs were acknowledged by the broker. The staged writes of *logged* families are also
//! the cycle's changelog records ([`Staged::changelog`]); unlogged families are indexes,
//! rebuilt from the logged ones by [`Family::reindex`] when a store is restored.
//!
//! Expiry costs no scan and no delete traffic: a family with a retention keeps values
//! prefixed with an 8-byte timestamp ([`stamped`]); a compaction filter drops those past
//! retention as RocksDB compacts, and periodic compaction makes files older than a day
//! eligible even when nothing else triggers a compaction.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rocksdb::compaction_filter::Decision;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch,
    WriteBufferManager, DB,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Key-value pairs in key order.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// The column families of one kind of store.
pub trait Family: Copy + Ord + std::fmt::Debug + Send + Sync + 'static {
    /// Every family, [`Family::META`] among them.
    const ALL: &'static [Self];
    /// Where input offsets, the changelog position and the journal live.
    const META: Self;
    /// Whether [`Family::reindex`] needs the value a restored record replaces.
    const REINDEX: bool = false;

    /// The byte that names the family in changelog keys; unique per family.
    fn id(self) -> u8;
    fn name(self) -> &'static str;
    /// Whether writes to this family go to the changelog. An unlogged family is an index
    /// that [`Family::reindex`] rebuilds from the logged ones.
    fn logged(self) -> bool {
        true
    }
    /// Called by a restore for every applied changelog record (`new` = `None` for a
    /// tombstone; `old` is the value it replaces when [`Family::REINDEX`] is set): stages
    /// the index entries that follow from it.
    fn reindex(
        _st: &mut Staged<'_, Self>,
        _cf: Self,
        _key: &[u8],
        _old: Option<&[u8]>,
        _new: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        Ok(())
    }
    fn from_id(id: u8) -> Option<Self> {
        Self::ALL.iter().copied().find(|cf| cf.id() == id)
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

impl StoreError {
    pub fn corrupt(cf: impl Family, detail: impl ToString) -> Self {
        StoreError::Corrupt {
            cf: cf.name(),
            detail: detail.to_string(),
        }
    }
}

/// The `[rocksdb]` section of a stateful service's config.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RocksConfig {
    /// One LRU cache for data, index and filter blocks of every partition's store.
    pub block_cache_bytes: usize,
    /// Memtables of all stores together, charged to the cache.
    pub write_buffer_bytes: usize,
}

impl RocksConfig {
    /// These limits, for families that never expire.
    pub fn limits<F>(&self) -> Limits<F> {
        Limits {
            block_cache_bytes: self.block_cache_bytes,
            write_buffer_bytes: self.write_buffer_bytes,
            retention_ms: Vec::new(),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.block_cache_bytes < 1 << 20 || self.write_buffer_bytes < 1 << 20 {
            return Err(
                "rocksdb.block_cache_bytes and rocksdb.write_buffer_bytes must be >= 1 MiB".into(),
            );
        }
        Ok(())
    }
}

/// Memory limits of a set of stores, and the retention of families that expire.
#[derive(Debug, Clone)]
pub struct Limits<F> {
    pub block_cache_bytes: usize,
    pub write_buffer_bytes: usize,
    /// Families whose [`stamped`] values are dropped at compaction once older than this.
    pub retention_ms: Vec<(F, i64)>,
}

const JOURNAL_KEY: &[u8] = b"journal";

/// Opens the per-partition stores of one instance, all on one cache and write-buffer budget.
pub struct StoreSet<F: Family> {
    dir: PathBuf,
    limits: Limits<F>,
    cache: Cache,
    wbm: WriteBufferManager,
}

impl<F: Family> std::fmt::Debug for StoreSet<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSet").field("dir", &self.dir).finish()
    }
}

impl<F: Family> StoreSet<F> {
    /// The process should also bound its allocator's retention
    /// ([`crate::memory::bound_heap_retention`], in `main`), without which freed memory
    /// stays resident and the budget is not the process's budget.
    pub fn new(dir: &Path, limits: impl Into<Limits<F>>) -> Self {
        let limits = limits.into();
        let cache = Cache::new_lru_cache(limits.block_cache_bytes);
        // allow_stall = false: with stalling, a write to one partition's store waits for
        // memory that only the *other* stores' flushes can free, and those flush only when
        // written to — by the same, stalled, worker: a deadlock (seen in a benchmark).
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

    /// The directory holding the stores (`partition-N` each).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Opens (creating if needed) the store of input partition `partition`.
    pub fn open(&self, partition: i32) -> Result<Store<F>, StoreError> {
        Store::open_with(
            &self.dir.join(format!("partition-{partition}")),
            &self.limits,
            &self.cache,
            &self.wbm,
        )
    }
}

#[derive(Debug)]
pub struct Store<F: Family> {
    db: DB,
    _family: std::marker::PhantomData<F>,
}

/// Whether a value prefixed with an 8-byte BE timestamp is past retention at `now_ms`.
pub fn expired(value: &[u8], now_ms: i64, retention_ms: i64) -> bool {
    match stamp(value) {
        Some(ts) => ts.saturating_add(retention_ms) < now_ms,
        None => false,
    }
}

/// `[ts, 8 bytes BE][body]`: how values of expiring families are stored, so that the
/// compaction filter can expire them without parsing.
pub fn stamped(ts_ms: i64, body: &[u8]) -> Vec<u8> {
    [ts_ms.to_be_bytes().as_slice(), body].concat()
}

/// The timestamp of a [`stamped`] value.
pub fn stamp(value: &[u8]) -> Option<i64> {
    value
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(i64::from_be_bytes)
}

/// The body of a [`stamped`] value.
pub fn unstamped(value: &[u8]) -> &[u8] {
    value.get(8..).unwrap_or_default()
}

impl<F: Family> Store<F> {
    /// Opens one store with its own cache (tests and tools).
    pub fn open(path: &Path, limits: impl Into<Limits<F>>) -> Result<Self, StoreError> {
        let set = StoreSet::new(path, limits);
        Self::open_with(path, &set.limits, &set.cache, &set.wbm)
    }

    fn open_with(
        path: &Path,
        limits: &Limits<F>,
        cache: &Cache,
        wbm: &WriteBufferManager,
    ) -> Result<Self, StoreError> {
        let cf_opts = |cf: F| {
            let mut o = Options::default();
            let mut table = BlockBasedOptions::default();
            table.set_block_cache(cache);
            table.set_bloom_filter(10.0, false);
            table.set_cache_index_and_filter_blocks(true);
            o.set_block_based_table_factory(&table);
            o.set_write_buffer_manager(wbm);
            o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            let retention = limits
                .retention_ms
                .iter()
                .find(|(f, _)| *f == cf)
                .map(|(_, r)| *r);
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
        let db = DB::open_cf_descriptors(&db_opts, path, F::ALL.iter().map(|cf| cf_opts(*cf)))?;
        Ok(Store {
            db,
            _family: std::marker::PhantomData,
        })
    }

    fn cf(&self, cf: F) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db
            .cf_handle(cf.name())
            .ok_or(StoreError::MissingCf(cf.name()))
    }

    pub fn get(&self, cf: F, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(cf)?, key)?)
    }

    /// Entries from `from` on, while `keep(key)` holds, at most `limit`.
    pub fn scan(
        &self,
        cf: F,
        from: &[u8],
        keep: impl Fn(&[u8]) -> bool,
        limit: usize,
    ) -> Result<Entries, StoreError> {
        self.scan_dir(cf, from, Direction::Forward, keep, limit)
    }

    /// Entries from `from` backwards (`from` itself included if present), while
    /// `keep(key)` holds, at most `limit`: newest first over time-ordered keys.
    pub fn scan_rev(
        &self,
        cf: F,
        from: &[u8],
        keep: impl Fn(&[u8]) -> bool,
        limit: usize,
    ) -> Result<Entries, StoreError> {
        self.scan_dir(cf, from, Direction::Reverse, keep, limit)
    }

    fn scan_dir(
        &self,
        cf: F,
        from: &[u8],
        direction: Direction,
        keep: impl Fn(&[u8]) -> bool,
        limit: usize,
    ) -> Result<Entries, StoreError> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        for item in self
            .db
            .iterator_cf(self.cf(cf)?, IteratorMode::From(from, direction))
        {
            let (k, v) = item?;
            if !keep(&k) {
                break;
            }
            out.push((k.into_vec(), v.into_vec()));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// A write overlay for one processing cycle.
    pub fn stage(&self) -> Staged<'_, F> {
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
        staged: Staged<'_, F>,
        changelog: Option<(&str, i64)>,
    ) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for ((cf, key), value) in staged.writes {
            match value {
                Some(v) => batch.put_cf(self.cf(cf)?, key, v),
                None => batch.delete_cf(self.cf(cf)?, key),
            }
        }
        let meta = self.cf(F::META)?;
        if let Some((topic, next)) = changelog {
            batch.put_cf(meta, offset_key(topic), next.to_be_bytes());
        }
        batch.delete_cf(meta, JOURNAL_KEY);
        self.db.write(batch)?;
        Ok(())
    }

    /// Applies changelog records read from `changelog` up to offset `next` - 1, with the
    /// index entries [`Family::reindex`] derives from them, in one atomic batch. A restored
    /// store's journal is stale (another instance moved the partition on), so it is dropped.
    pub fn restore(
        &self,
        records: &[(Vec<u8>, Option<Vec<u8>>)],
        changelog: &str,
        next: i64,
    ) -> Result<(), StoreError> {
        let mut st = self.stage();
        for (key, value) in records {
            let (cf, key) = decode_changelog_key::<F>(key)?;
            let old = if F::REINDEX { st.get(cf, key)? } else { None };
            match value {
                Some(v) => st.put(cf, key.to_vec(), v.clone()),
                None => st.delete(cf, key.to_vec()),
            }
            F::reindex(&mut st, cf, key, old.as_deref(), value.as_deref())?;
        }
        self.commit(st, Some((changelog, next)))
    }

    /// The next offset to read of this partition of `topic`, as of the last commit.
    pub fn offset(&self, topic: &str) -> Result<Option<i64>, StoreError> {
        self.get(F::META, &offset_key(topic))?
            .map(|v| {
                <[u8; 8]>::try_from(v.as_slice())
                    .map(i64::from_be_bytes)
                    .map_err(|_| StoreError::corrupt(F::META, "offset is not 8 bytes"))
            })
            .transpose()
    }

    /// Records the cycle about to publish its outputs; the next [`Store::commit`] or
    /// [`Store::restore`] removes it. What a journal holds is the service's business.
    pub fn begin<J: Serialize>(&self, journal: &J) -> Result<(), StoreError> {
        let value = serde_json::to_vec(journal).map_err(|e| StoreError::corrupt(F::META, e))?;
        self.db.put_cf(self.cf(F::META)?, JOURNAL_KEY, value)?;
        Ok(())
    }

    /// The cycle that was in flight when the process stopped, if any.
    pub fn journal<J: DeserializeOwned>(&self) -> Result<Option<J>, StoreError> {
        self.get(F::META, JOURNAL_KEY)?
            .map(|v| {
                serde_json::from_slice(&v)
                    .map_err(|e| StoreError::corrupt(F::META, format!("journal: {e}")))
            })
            .transpose()
    }

    /// RocksDB's estimate of the keys in a column family and its bytes (SST files plus
    /// memtables): cheap, for gauges.
    pub fn size(&self, cf: F) -> Result<(u64, u64), StoreError> {
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
        for cf in F::ALL {
            self.db.flush_cf(self.cf(*cf)?)?;
        }
        Ok(())
    }

    /// Compacts a column family now (tests and operators; normal expiry needs no call).
    pub fn compact(&self, cf: F) -> Result<(), StoreError> {
        self.db
            .compact_range_cf(self.cf(cf)?, None::<&[u8]>, None::<&[u8]>);
        Ok(())
    }
}

fn offset_key(topic: &str) -> Vec<u8> {
    format!("offset/{topic}").into_bytes()
}

/// `[cf id][key]`: the key of a state change on the changelog topic.
pub fn changelog_key<F: Family>(cf: F, key: &[u8]) -> Vec<u8> {
    [&[cf.id()], key].concat()
}

fn decode_changelog_key<F: Family>(k: &[u8]) -> Result<(F, &[u8]), StoreError> {
    k.split_first()
        .and_then(|(id, key)| Some((F::from_id(*id)?, key)))
        .ok_or_else(|| StoreError::Corrupt {
            cf: "changelog",
            detail: "record key names no column family".into(),
        })
}

/// Staged writes over the store: reads see them, nothing is durable until
/// [`Store::commit`].
#[derive(Debug)]
pub struct Staged<'s, F: Family> {
    store: &'s Store<F>,
    writes: BTreeMap<(F, Vec<u8>), Option<Vec<u8>>>,
}

impl<F: Family> Staged<'_, F> {
    /// Whether nothing was staged.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    pub fn get(&self, cf: F, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.writes.get(&(cf, key.to_vec())) {
            Some(v) => Ok(v.clone()),
            None => self.store.get(cf, key),
        }
    }

    pub fn put(&mut self, cf: F, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert((cf, key), Some(value));
    }

    pub fn delete(&mut self, cf: F, key: Vec<u8>) {
        self.writes.insert((cf, key), None);
    }

    /// Records that the state now reflects `topic` up to offset `next` - 1.
    pub fn set_offset(&mut self, topic: &str, next: i64) {
        self.put(F::META, offset_key(topic), next.to_be_bytes().to_vec());
    }

    /// The staged changes of logged families as changelog records: `[cf id][key]` →
    /// value, `None` deleted.
    pub fn changelog(&self) -> impl Iterator<Item = (Vec<u8>, Option<&[u8]>)> {
        self.writes
            .iter()
            .filter(|((cf, _), _)| cf.logged())
            .map(|((cf, key), value)| (changelog_key(*cf, key), value.as_deref()))
    }

    /// The staged writes to `cf`: key → value, `None` deleted.
    pub fn writes(&self, cf: F) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> {
        self.writes
            .range((cf, Vec::new())..)
            .take_while(move |((c, _), _)| *c == cf)
            .map(|((_, k), v)| (k.as_slice(), v.as_deref()))
    }

    /// Entries whose key starts with `prefix`, staged writes applied.
    pub fn scan_prefix(&self, cf: F, prefix: &[u8]) -> Result<Entries, StoreError> {
        self.scan_prefix_limit(cf, prefix, usize::MAX)
    }

    /// The first `limit` entries whose key starts with `prefix`, staged writes applied.
    pub fn scan_prefix_limit(
        &self,
        cf: F,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Entries, StoreError> {
        self.merged(cf, prefix, |k| k.starts_with(prefix), limit)
    }

    /// Up to `limit` entries with keys below `end`, staged writes applied.
    pub fn scan_below(&self, cf: F, end: &[u8], limit: usize) -> Result<Entries, StoreError> {
        self.merged(cf, &[], |k| k < end, limit)
    }

    fn merged(
        &self,
        cf: F,
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

    /// A small schema: `Data` logged, `Index` rebuilt from it (key = the value of `Data`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    enum T {
        Data,
        Index,
        Meta,
    }

    impl Family for T {
        const ALL: &'static [Self] = &[T::Data, T::Index, T::Meta];
        const META: Self = T::Meta;
        const REINDEX: bool = true;
        fn id(self) -> u8 {
            self as u8 + 1
        }
        fn name(self) -> &'static str {
            match self {
                T::Data => "data",
                T::Index => "index",
                T::Meta => "meta",
            }
        }
        fn logged(self) -> bool {
            self != T::Index
        }
        fn reindex(
            st: &mut Staged<'_, Self>,
            cf: Self,
            _key: &[u8],
            old: Option<&[u8]>,
            new: Option<&[u8]>,
        ) -> Result<(), StoreError> {
            if cf == T::Data {
                if let Some(old) = old {
                    st.delete(T::Index, old.to_vec());
                }
                if let Some(new) = new {
                    st.put(T::Index, new.to_vec(), Vec::new());
                }
            }
            Ok(())
        }
    }

    fn limits(retention_ms: i64) -> Limits<T> {
        Limits {
            block_cache_bytes: 8 << 20,
            write_buffer_bytes: 4 << 20,
            retention_ms: vec![(T::Data, retention_ms)],
        }
    }

    #[test]
    fn staged_reads_see_writes_and_commit_is_atomic_with_offsets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), limits(i64::MAX)).expect("open");
        let mut st = store.stage();
        st.put(T::Index, b"c1\0a".to_vec(), b"1".to_vec());
        st.put(T::Index, b"c1\0b".to_vec(), b"2".to_vec());
        st.put(T::Index, b"c2\0a".to_vec(), b"3".to_vec());
        assert_eq!(st.scan_prefix(T::Index, b"c1\0").expect("scan").len(), 2);
        assert_eq!(store.get(T::Index, b"c1\0a").expect("get"), None);
        store.begin(&vec![5u32]).expect("begin");
        assert_eq!(store.journal::<Vec<u32>>().expect("journal"), Some(vec![5]));
        st.set_offset("t", 42);
        store.commit(st, Some(("log", 9))).expect("commit");
        assert_eq!(store.offset("t").expect("offset"), Some(42));
        assert_eq!(store.offset("log").expect("offset"), Some(9));
        assert_eq!(
            store.journal::<Vec<u32>>().expect("journal"),
            None,
            "commit closes the journal"
        );

        let mut st = store.stage();
        st.delete(T::Index, b"c1\0a".to_vec());
        st.put(T::Index, b"c0\0z".to_vec(), b"0".to_vec());
        let below = st.scan_below(T::Index, b"c2", 10).expect("scan");
        let keys: Vec<_> = below.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(keys, [&b"c0\0z"[..], &b"c1\0b"[..]]);
        assert_eq!(st.scan_below(T::Index, b"c2", 1).expect("scan").len(), 1);
        assert_eq!(
            st.writes(T::Index).count(),
            2,
            "the staged writes of one family"
        );
        // A staged delete does not use up the limit.
        let mut st2 = store.stage();
        st2.delete(T::Index, b"c1\0a".to_vec());
        let after_delete = st2.scan_below(T::Index, b"c3", 1).expect("scan");
        assert_eq!(after_delete[0].0, b"c1\0b".to_vec());
        drop(st);
        drop(st2);
        assert!(
            store.get(T::Index, b"c1\0a").expect("get").is_some(),
            "dropped stage writes nothing"
        );
        assert_eq!(
            store.scan(T::Index, b"", |_| true, 2).expect("scan").len(),
            2,
            "scan stops at its limit"
        );
        let back = store
            .scan_rev(T::Index, b"c1\xff", |k| k.starts_with(b"c1"), 10)
            .expect("rev");
        let keys: Vec<&[u8]> = back.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(
            keys,
            [&b"c1\0b"[..], b"c1\0a"],
            "newest first, within the prefix"
        );
    }

    #[test]
    fn expired_values_vanish_at_compaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), limits(60_000)).expect("open");
        let now = s2s_common::now_ms();
        let mut st = store.stage();
        st.put(T::Data, b"old".to_vec(), stamped(now - 120_000, b"{}"));
        st.put(T::Data, b"fresh".to_vec(), stamped(now, b"{}"));
        st.put(T::Index, b"old".to_vec(), stamped(now - 120_000, b"{}"));
        store.commit(st, None).expect("commit");
        for cf in [T::Data, T::Index] {
            store.compact(cf).expect("compact");
        }
        assert_eq!(store.get(T::Data, b"old").expect("get"), None);
        let fresh = store.get(T::Data, b"fresh").expect("get").expect("kept");
        assert_eq!((stamp(&fresh), unstamped(&fresh)), (Some(now), &b"{}"[..]));
        assert!(
            store.get(T::Index, b"old").expect("get").is_some(),
            "a family without retention keeps everything"
        );
        assert!(!expired(b"short", now, 0), "malformed values are kept");
        let (keys, bytes) = store.size(T::Data).expect("size");
        assert!(keys >= 1 && bytes > 0, "{keys} keys, {bytes} bytes");
    }

    #[test]
    fn a_store_over_the_shared_write_budget_does_not_stall_its_writer() {
        // One partition's store holds most of a small shared budget in its memtable; the
        // other is then written by the same thread. With a stalling write-buffer manager
        // that second write waits for memory only the first store's flush could free.
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = Limits {
            block_cache_bytes: 8 << 20,
            write_buffer_bytes: 1 << 20,
            retention_ms: vec![],
        };
        let set: StoreSet<T> = StoreSet::new(dir.path(), limits);
        let (big, other) = (set.open(0).expect("p0"), set.open(1).expect("p1"));
        let (done, finished) = std::sync::mpsc::channel();
        let writer = std::thread::spawn(move || {
            let write = |store: &Store<T>, n: u32| {
                for chunk in 0..n {
                    let mut st = store.stage();
                    for i in 0..100u32 {
                        st.put(T::Data, format!("{chunk}-{i}").into_bytes(), vec![7; 100]);
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
        // The stores close in the writer thread: before the set, the directory and the
        // process go (RocksDB aborts with "pthread lock: Invalid argument" when a
        // database is still closing at exit).
        writer.join().expect("the writer thread");
    }

    #[test]
    fn partitions_have_separate_stores_on_one_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let set: StoreSet<T> = StoreSet::new(dir.path(), limits(i64::MAX));
        let (a, b) = (set.open(0).expect("p0"), set.open(1).expect("p1"));
        let mut st = a.stage();
        st.put(T::Data, b"c".to_vec(), stamped(1, b"{}"));
        st.set_offset("clicks", 7);
        a.commit(st, None).expect("commit");
        assert!(b.get(T::Data, b"c").expect("get").is_none());
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

    #[test]
    fn a_store_rebuilt_from_the_changelog_equals_the_original_indexes_included() {
        let (d1, d2) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        let (original, rebuilt) = (
            Store::open(d1.path(), limits(i64::MAX)).expect("open"),
            Store::open(d2.path(), limits(i64::MAX)).expect("open"),
        );
        let mut log: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        for cycle in 0..3u8 {
            let mut st = original.stage();
            // Data k<cycle> = v<cycle>, indexed; cycle 2 moves k0 to a new value and
            // deletes k1, so the index must drop their old entries.
            let set = |st: &mut Staged<'_, T>, k: Vec<u8>, v: Option<Vec<u8>>| {
                let old = st.get(T::Data, &k).expect("get");
                match &v {
                    Some(v) => st.put(T::Data, k.clone(), v.clone()),
                    None => st.delete(T::Data, k.clone()),
                }
                T::reindex(st, T::Data, &k, old.as_deref(), v.as_deref()).expect("index");
            };
            set(&mut st, vec![b'k', cycle], Some(vec![b'v', cycle]));
            if cycle == 2 {
                set(&mut st, vec![b'k', 0], Some(b"moved".to_vec()));
                set(&mut st, vec![b'k', 1], None);
            }
            st.set_offset("in", i64::from(cycle) + 1);
            assert!(
                st.changelog().all(|(k, _)| k[0] != T::Index.id()),
                "indexes are not logged"
            );
            log.extend(st.changelog().map(|(k, v)| (k, v.map(<[u8]>::to_vec))));
            original
                .commit(st, Some(("log", log.len() as i64)))
                .expect("commit");
        }
        rebuilt.begin(&1u8).expect("journal");
        // In two pieces, as a restore reads it in batches.
        let (first, rest) = log.split_at(3);
        rebuilt.restore(first, "log", 3).expect("restore");
        rebuilt
            .restore(rest, "log", log.len() as i64)
            .expect("restore");
        for cf in [T::Data, T::Index] {
            let all = |s: &Store<T>| s.stage().scan_prefix(cf, b"").expect("scan");
            assert_eq!(all(&original), all(&rebuilt), "{}", cf.name());
        }
        let index = rebuilt.stage().scan_prefix(T::Index, b"").expect("scan");
        let keys: Vec<&[u8]> = index.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(keys, [&b"moved"[..], b"v\x02"]);
        assert_eq!(rebuilt.offset("in").expect("o"), Some(3));
        assert_eq!(
            rebuilt.journal::<u8>().expect("j"),
            None,
            "a restored store has no journal"
        );
        assert!(matches!(
            rebuilt.restore(&[(vec![99, 1], None)], "log", 1),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
