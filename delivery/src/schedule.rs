//! Delivery's durable schedule: its state schema on the shared partition stores of
//! [`s2s_state`], and the in-memory ready queues that feed the dispatcher from it.
//!
//! **Why a RocksDB schedule and not retry topics.** Retry topics (one per delay) hold a
//! retry durably too, but dedup ("this delivery was already done or is scheduled") needs
//! per-delivery state anyway, Retry-After and jitter break the FIFO order a delay topic
//! relies on, and a dead endpoint's backlog would sit in front of healthy ones in a shared
//! topic. A per-partition store with a changelog gives all three: jobs by ID (dedup), a
//! due index per endpoint (a slow or dead endpoint has its own queue, never in front of
//! another's), and scale-out by partition with restore on rebalance, like the attributor.
//!
//! Column families (one store per conversions partition):
//! - `jobs` (logged): `delivery_id` → [`Job`] JSON. Pending, delivered and dead-lettered
//!   deliveries; finished ones stay `finished_retention` long for dedup, then a tombstone
//!   removes them from the store and the changelog alike.
//! - `due` (index): `[endpoint][0][due ms, 8 bytes BE][delivery_id]` of pending jobs:
//!   each endpoint's queue in due order.
//! - `pending` (index): `[endpoint][0][created ms, 8 bytes BE][delivery_id]` of pending
//!   jobs: queue depth and the age of the oldest per endpoint.
//! - `expiry` (index): `[finished ms, 8 bytes BE][delivery_id]` of finished jobs, read in
//!   order to expire them: never a full scan.
//! - `meta`: input offsets and the changelog position.
//!
//! Indexes are not logged: a restore rebuilds them from the jobs ([`Family::reindex`]), so
//! the changelog carries one record per job change.

use std::collections::{BTreeMap, BTreeSet};

use s2s_state::{Family, Staged, StoreError};

use crate::job::Job;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cf {
    Jobs,
    Due,
    Pending,
    Expiry,
    Meta,
}

impl Family for Cf {
    const ALL: &'static [Cf] = &[Cf::Jobs, Cf::Due, Cf::Pending, Cf::Expiry, Cf::Meta];
    const META: Cf = Cf::Meta;
    const REINDEX: bool = true;

    fn id(self) -> u8 {
        match self {
            Cf::Jobs => 1,
            Cf::Due => 2,
            Cf::Pending => 3,
            Cf::Expiry => 4,
            Cf::Meta => 5,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Cf::Jobs => "jobs",
            Cf::Due => "due",
            Cf::Pending => "pending",
            Cf::Expiry => "expiry",
            Cf::Meta => "meta",
        }
    }

    fn logged(self) -> bool {
        matches!(self, Cf::Jobs | Cf::Meta)
    }

    fn reindex(
        st: &mut Staged<'_, Cf>,
        cf: Cf,
        _key: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        if cf != Cf::Jobs {
            return Ok(());
        }
        let old = old.map(decode).transpose()?;
        let new = new.map(decode).transpose()?;
        index(st, old.as_ref(), new.as_ref());
        Ok(())
    }
}

pub type Store = s2s_state::Store<Cf>;
pub type StoreSet = s2s_state::StoreSet<Cf>;
pub type Stage<'s> = Staged<'s, Cf>;

/// `[endpoint][0]`: every key of an endpoint's queue starts with it. Endpoint names are
/// `[A-Za-z0-9._-]+` (checked at start-up), so no name is a prefix of another's key.
pub fn endpoint_prefix(endpoint: &str) -> Vec<u8> {
    [endpoint.as_bytes(), b"\0"].concat()
}

fn timed_key(prefix: &[u8], ts_ms: i64, id: &str) -> Vec<u8> {
    [prefix, &ts_ms.to_be_bytes(), id.as_bytes()].concat()
}

/// The job's key in its endpoint's due queue.
pub fn due_key(job: &Job) -> Vec<u8> {
    timed_key(
        &endpoint_prefix(&job.endpoint),
        job.due_ms,
        &job.delivery_id,
    )
}

fn pending_key(job: &Job) -> Vec<u8> {
    timed_key(
        &endpoint_prefix(&job.endpoint),
        job.created_ms,
        &job.delivery_id,
    )
}

fn expiry_key(finished_ms: i64, id: &str) -> Vec<u8> {
    timed_key(&[], finished_ms, id)
}

/// `(endpoint, ms, delivery_id)` of a `due` or `pending` key.
pub fn parse_queue_key(key: &[u8]) -> Option<(&str, i64, &str)> {
    let sep = key.iter().position(|b| *b == 0)?;
    let endpoint = std::str::from_utf8(&key[..sep]).ok()?;
    let rest = &key[sep + 1..];
    let ms = i64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    let id = std::str::from_utf8(rest.get(8..)?).ok()?;
    Some((endpoint, ms, id))
}

fn decode(v: &[u8]) -> Result<Job, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::corrupt(Cf::Jobs, e))
}

/// The job `id` as staged.
pub fn load(st: &Stage<'_>, id: &str) -> Result<Option<Job>, StoreError> {
    st.get(Cf::Jobs, id.as_bytes())?
        .map(|v| decode(&v))
        .transpose()
}

/// The job `id` as committed.
pub fn load_committed(store: &Store, id: &str) -> Result<Option<Job>, StoreError> {
    store
        .get(Cf::Jobs, id.as_bytes())?
        .map(|v| decode(&v))
        .transpose()
}

/// Stages `new` in place of `old` (`None`: a new job / a removed one) with its index
/// entries; returns the change of the endpoint's pending count (-1, 0, +1).
pub fn write(st: &mut Stage<'_>, old: Option<&Job>, new: Option<&Job>) -> i64 {
    match new {
        Some(job) => st.put(
            Cf::Jobs,
            job.delivery_id.as_bytes().to_vec(),
            serde_json::to_vec(job).unwrap_or_default(),
        ),
        None => {
            if let Some(job) = old {
                st.delete(Cf::Jobs, job.delivery_id.as_bytes().to_vec());
            }
        }
    }
    index(st, old, new);
    i64::from(new.is_some_and(Job::is_pending)) - i64::from(old.is_some_and(Job::is_pending))
}

/// Stages the index entries that change from `old` to `new`.
fn index(st: &mut Stage<'_>, old: Option<&Job>, new: Option<&Job>) {
    let entries = |j: &Job| -> Vec<(Cf, Vec<u8>)> {
        if j.is_pending() {
            vec![(Cf::Due, due_key(j)), (Cf::Pending, pending_key(j))]
        } else {
            j.finished_ms
                .map(|f| (Cf::Expiry, expiry_key(f, &j.delivery_id)))
                .into_iter()
                .collect()
        }
    };
    let before = old.map(entries).unwrap_or_default();
    let after = new.map(entries).unwrap_or_default();
    for e in &before {
        if !after.contains(e) {
            st.delete(e.0, e.1.clone());
        }
    }
    for e in after {
        if !before.contains(&e) {
            st.put(e.0, e.1, Vec::new());
        }
    }
}

/// Finished jobs that finished before `before_ms`, oldest first, at most `limit`.
pub fn expired(store: &Store, before_ms: i64, limit: usize) -> Result<Vec<String>, StoreError> {
    let end = before_ms.to_be_bytes();
    Ok(store
        .scan(Cf::Expiry, &[], |k| k < end.as_slice(), limit)?
        .into_iter()
        .filter_map(|(k, _)| {
            k.get(8..)
                .map(|id| String::from_utf8_lossy(id).into_owned())
        })
        .collect())
}

/// The endpoints that have pending jobs in this store (one seek per endpoint).
pub fn endpoints_with_pending(store: &Store) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    let mut from = Vec::new();
    while let Some((k, _)) = store.scan(Cf::Pending, &from, |_| true, 1)?.pop() {
        let Some((endpoint, _, _)) = parse_queue_key(&k) else {
            return Err(StoreError::corrupt(Cf::Pending, "key without endpoint"));
        };
        from = [endpoint.as_bytes(), &[1]].concat();
        out.push(endpoint.to_string());
    }
    Ok(out)
}

/// Pending jobs of `endpoint` and when the oldest was created.
pub fn pending_of(store: &Store, endpoint: &str) -> Result<(i64, Option<i64>), StoreError> {
    let prefix = endpoint_prefix(endpoint);
    let mut count = 0i64;
    let mut oldest = None;
    for (k, _) in store.scan(Cf::Pending, &prefix, |k| k.starts_with(&prefix), usize::MAX)? {
        if oldest.is_none() {
            oldest = parse_queue_key(&k).map(|(_, created, _)| created);
        }
        count += 1;
    }
    Ok((count, oldest))
}

/// When the oldest pending job of `endpoint` was created (one seek).
pub fn oldest_pending(store: &Store, endpoint: &str) -> Result<Option<i64>, StoreError> {
    let prefix = endpoint_prefix(endpoint);
    Ok(store
        .scan(Cf::Pending, &prefix, |k| k.starts_with(&prefix), 1)?
        .first()
        .and_then(|(k, _)| parse_queue_key(k).map(|(_, created, _)| created)))
}

/// An endpoint's due jobs in one partition, as the dispatcher sees them: due keys read
/// from the store in order, a batch at a time, into `ready`. Every due key is read once:
/// `cursor` is the last key read, and keys written later behind it (a job due earlier than
/// what was already read) are added to `ready` directly when their write is committed
/// ([`Queue::on_commit`]). `next_due` is when the first key after the cursor is due, so an
/// endpoint with nothing due costs nothing.
#[derive(Debug)]
pub struct Queue {
    prefix: Vec<u8>,
    ready: BTreeSet<Vec<u8>>,
    cursor: Vec<u8>,
    /// `Some(i64::MIN)`: unknown, read to find out; `None`: nothing after the cursor.
    next_due: Option<i64>,
}

impl Queue {
    pub fn new(endpoint: &str) -> Self {
        let prefix = endpoint_prefix(endpoint);
        Queue {
            cursor: prefix.clone(),
            prefix,
            ready: BTreeSet::new(),
            next_due: Some(i64::MIN),
        }
    }

    /// When something not yet read becomes due, if anything (for the idle timer).
    pub fn next_due(&self) -> Option<i64> {
        if self.ready.is_empty() {
            self.next_due
        } else {
            Some(i64::MIN)
        }
    }

    /// Up to `n` due keys, earliest first, reading from the store as needed. The caller
    /// sends them; each stays in the store until its result is committed.
    pub fn take(
        &mut self,
        store: &Store,
        now_ms: i64,
        n: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        if self.ready.len() < n && self.next_due.is_some_and(|d| d <= now_ms) {
            self.read(store, now_ms, n.max(256))?;
        }
        let mut out = Vec::with_capacity(n.min(self.ready.len()));
        while out.len() < n {
            match self.ready.pop_first() {
                Some(k) => out.push(k),
                None => break,
            }
        }
        Ok(out)
    }

    fn read(&mut self, store: &Store, now_ms: i64, limit: usize) -> Result<(), StoreError> {
        let prefix = self.prefix.clone();
        // The scan starts at the cursor, already read: with two more than `limit`, a full
        // scan always reaches an entry beyond what is taken, so the end is never mistaken.
        let entries = store.scan(Cf::Due, &self.cursor, |k| k.starts_with(&prefix), limit + 2)?;
        let mut read = 0;
        self.next_due = None;
        for (k, _) in entries {
            if k == self.cursor {
                continue;
            }
            let due = parse_queue_key(&k)
                .map(|(_, due, _)| due)
                .ok_or_else(|| StoreError::corrupt(Cf::Due, "malformed key"))?;
            if due > now_ms {
                self.next_due = Some(due);
                return Ok(());
            }
            if read == limit {
                self.next_due = Some(i64::MIN);
                return Ok(());
            }
            self.cursor.clone_from(&k);
            self.ready.insert(k);
            read += 1;
        }
        Ok(())
    }

    /// Follows a committed write to this endpoint's due keys (`put` or delete).
    pub fn on_commit(&mut self, key: &[u8], put: bool) {
        if !put {
            self.ready.remove(key);
        } else if key <= self.cursor.as_slice() {
            self.ready.insert(key.to_vec());
        } else if let Some((_, due, _)) = parse_queue_key(key) {
            self.next_due = Some(self.next_due.map_or(due, |d| d.min(due)));
        }
    }

    /// Puts a taken key back (its attempt was not made, or its result is void).
    pub fn put_back(&mut self, key: Vec<u8>) {
        if key <= self.cursor {
            self.ready.insert(key);
        } else {
            self.next_due = Some(i64::MIN);
        }
    }
}

/// Per endpoint: the change of its pending count in a cycle.
pub type PendingDeltas = BTreeMap<String, i64>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::tests::conv;
    use s2s_state::Limits;

    fn store(dir: &std::path::Path) -> Store {
        Store::open(
            dir,
            Limits {
                block_cache_bytes: 8 << 20,
                write_buffer_bytes: 4 << 20,
                retention_ms: vec![],
            },
        )
        .expect("open")
    }

    fn job(id: &str, endpoint: &str, due: i64) -> Job {
        let mut j = Job::new(id.into(), endpoint.into(), conv(), due);
        j.due_ms = due;
        j
    }

    fn commit(store: &Store, jobs: &[(Option<&Job>, Option<&Job>)]) -> Vec<(Vec<u8>, bool)> {
        let mut st = store.stage();
        for (old, new) in jobs {
            write(&mut st, *old, *new);
        }
        let due: Vec<_> = st
            .writes(Cf::Due)
            .map(|(k, v)| (k.to_vec(), v.is_some()))
            .collect();
        store.commit(st, None).expect("commit");
        due
    }

    #[test]
    fn keys_sort_by_endpoint_then_time() {
        let a = due_key(&job("x", "ep", 5));
        let b = due_key(&job("a", "ep", 6));
        let other = due_key(&job("a", "ep-2", 1));
        assert!(a < b, "by due time, not by id");
        assert!(!other.starts_with(&endpoint_prefix("ep")));
        assert_eq!(parse_queue_key(&a), Some(("ep", 5, "x")));
    }

    #[test]
    fn indexes_follow_the_job_through_its_life() {
        let dir = tempfile::tempdir().expect("dir");
        let s = store(dir.path());
        let new = job("d1", "ep", 100);
        let mut st = s.stage();
        assert_eq!(write(&mut st, None, Some(&new)), 1);
        s.commit(st, None).expect("commit");
        assert_eq!(pending_of(&s, "ep").expect("pending"), (1, Some(100)));
        assert_eq!(endpoints_with_pending(&s).expect("eps"), ["ep"]);

        let mut retried = new.clone();
        retried.due_ms = 500;
        let mut st = s.stage();
        assert_eq!(write(&mut st, Some(&new), Some(&retried)), 0);
        s.commit(st, None).expect("commit");
        let due = s.scan(Cf::Due, b"", |_| true, 10).expect("scan");
        assert_eq!(due.len(), 1, "the old due entry is gone");
        assert_eq!(parse_queue_key(&due[0].0), Some(("ep", 500, "d1")));

        let mut done = retried.clone();
        done.state = crate::job::JobState::Delivered;
        done.finished_ms = Some(600);
        let mut st = s.stage();
        assert_eq!(write(&mut st, Some(&retried), Some(&done)), -1);
        s.commit(st, None).expect("commit");
        assert_eq!(pending_of(&s, "ep").expect("pending"), (0, None));
        assert!(endpoints_with_pending(&s).expect("eps").is_empty());
        assert_eq!(expired(&s, 600, 10).expect("expired"), Vec::<String>::new());
        assert_eq!(expired(&s, 601, 10).expect("expired"), ["d1"]);

        let mut st = s.stage();
        write(&mut st, Some(&done), None);
        s.commit(st, None).expect("commit");
        assert!(expired(&s, i64::MAX, 10).expect("expired").is_empty());
        assert!(load_committed(&s, "d1").expect("load").is_none());
    }

    #[test]
    fn queues_read_each_due_key_once_and_see_late_writes() {
        let dir = tempfile::tempdir().expect("dir");
        let s = store(dir.path());
        let jobs: Vec<Job> = (0..5)
            .map(|i| job(&format!("d{i}"), "ep", 10 * i))
            .collect();
        commit(
            &s,
            &jobs.iter().map(|j| (None, Some(j))).collect::<Vec<_>>(),
        );
        commit(&s, &[(None, Some(&job("other", "ep2", 0)))]);
        let mut q = Queue::new("ep");
        let took = q.take(&s, 25, 10).expect("take");
        let ids: Vec<_> = took
            .iter()
            .filter_map(|k| parse_queue_key(k).map(|(_, _, id)| id.to_string()))
            .collect();
        assert_eq!(ids, ["d0", "d1", "d2"], "due by 25, in order, ep only");
        assert_eq!(q.next_due(), Some(30));
        assert!(q.take(&s, 25, 10).expect("take").is_empty(), "read once");

        // A job written later but due before the cursor (here: at 5) joins directly.
        let early = job("early", "ep", 5);
        for (k, put) in commit(&s, &[(None, Some(&early))]) {
            q.on_commit(&k, put);
        }
        let took = q.take(&s, 25, 10).expect("take");
        assert_eq!(took, [due_key(&early)]);

        // One due later than the cursor only moves next_due.
        let late = job("late", "ep", 27);
        for (k, put) in commit(&s, &[(None, Some(&late))]) {
            q.on_commit(&k, put);
        }
        assert_eq!(q.next_due(), Some(27));
        let took = q.take(&s, 40, 1).expect("take");
        assert_eq!(took, [due_key(&late)], "at most n, earliest first");
        q.put_back(took[0].clone());
        let took = q.take(&s, 40, 10).expect("take");
        assert_eq!(took.len(), 3, "late (put back), d3 and d4");
        assert_eq!(q.next_due(), None, "nothing left after the cursor");
    }

    #[test]
    fn a_long_queue_is_read_in_batches_to_its_end() {
        let dir = tempfile::tempdir().expect("dir");
        let s = store(dir.path());
        let jobs: Vec<Job> = (0..1000)
            .map(|i| job(&format!("d{i:04}"), "ep", i))
            .collect();
        commit(
            &s,
            &jobs.iter().map(|j| (None, Some(j))).collect::<Vec<_>>(),
        );
        let mut q = Queue::new("ep");
        let mut taken = Vec::new();
        for _ in 0..200 {
            taken.extend(q.take(&s, 10_000, 7).expect("take"));
        }
        assert_eq!(taken.len(), 1000, "every due key, across batch boundaries");
        let mut sorted = taken.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, taken, "in order, each once");
        assert_eq!(q.next_due(), None);
    }

    #[test]
    fn a_restore_rebuilds_the_indexes_from_the_jobs() {
        let (d1, d2) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        let (a, b) = (store(d1.path()), store(d2.path()));
        let first = job("d1", "ep", 100);
        let mut moved = first.clone();
        moved.due_ms = 900;
        let mut log = Vec::new();
        for (old, new) in [(None, Some(&first)), (Some(&first), Some(&moved))] {
            let mut st = a.stage();
            write(&mut st, old, new);
            log.extend(st.changelog().map(|(k, v)| (k, v.map(<[u8]>::to_vec))));
            a.commit(st, None).expect("commit");
        }
        assert_eq!(
            log.len(),
            2,
            "one changelog record per job change, no index records"
        );
        b.restore(&log, "log", 2).expect("restore");
        for cf in [Cf::Jobs, Cf::Due, Cf::Pending, Cf::Expiry] {
            let all = |s: &Store| s.scan(cf, b"", |_| true, 100).expect("scan");
            assert_eq!(all(&a), all(&b), "{}", cf.name());
        }
    }
}
