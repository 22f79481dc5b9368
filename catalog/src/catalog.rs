//! The materialized catalog and the rule every change must pass.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::record::{Change, Entry, Key, Kind, Stored};

/// Every entity as of a position in the catalog topic.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Catalog {
    /// Each entry behind an `Arc`: the follower publishes a copy of the catalog at each
    /// change, which then copies pointers, not documents.
    entries: BTreeMap<Key, Arc<Entry>>,
    /// The offset after the last record applied (0 before any).
    next: i64,
    /// Where the last elected writer said it answers (its record keyed [`WRITER_KEY`]).
    writer: Option<Announcement>,
}

/// The key of the record an elected writer appends to say where it answers; not an
/// entity's (entity keys are `<kind>/<id>`), kept by compaction like one.
pub const WRITER_KEY: &str = "_writer";

/// An elected writer's announcement: the base URL of its API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Announcement {
    pub url: String,
    pub at_ms: i64,
}

/// Why a change was refused: it was not made against the entity's current revision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    #[error("{key} exists (revision {revision}); change it with its revision")]
    Exists { key: String, revision: i64 },
    #[error("{key} does not exist")]
    Missing { key: String },
    #[error("{key} is at revision {current}, not {base}: read it again and redo the change")]
    Stale {
        key: String,
        base: i64,
        current: i64,
    },
}

impl Catalog {
    /// Applies the record at `offset` (`None`: a tombstone). Records are applied in
    /// offset order; one at or below an applied offset is ignored.
    pub fn apply(&mut self, key: Key, offset: i64, value: Option<Stored>) {
        if offset < self.next {
            return;
        }
        self.next = offset + 1;
        match value {
            Some(stored) => {
                self.entries.insert(
                    key.clone(),
                    Arc::new(Entry {
                        key,
                        revision: offset,
                        stored,
                    }),
                );
            }
            None => {
                self.entries.remove(&key);
            }
        }
    }

    /// Applies the writer's announcement at `offset`.
    pub fn announce(&mut self, offset: i64, announcement: Announcement) {
        if offset < self.next {
            return;
        }
        self.next = offset + 1;
        self.writer = Some(announcement);
    }

    /// Where the last elected writer said it answers.
    pub fn writer(&self) -> Option<&Announcement> {
        self.writer.as_ref()
    }

    /// Moves the position past `offset` without a change (a record that is not an
    /// entity's, or a transaction marker's offset).
    pub fn skip(&mut self, offset: i64) {
        self.next = self.next.max(offset + 1);
    }

    /// The offset after the last record applied.
    pub fn next_offset(&self) -> i64 {
        self.next
    }

    pub fn get(&self, key: &Key) -> Option<&Entry> {
        self.entries.get(key).map(Arc::as_ref)
    }

    /// The entities of `kind`, by ID.
    pub fn list(&self, kind: Kind) -> impl Iterator<Item = &Entry> {
        self.entries
            .values()
            .map(Arc::as_ref)
            .filter(move |e| e.key.kind() == kind)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `change` may be made: a creation of an entity that does not exist, an
    /// update or delete against the entity's current revision. Returns the revision it
    /// replaces.
    pub fn check(&self, change: &Change) -> Result<Option<i64>, Conflict> {
        let key = change.key.to_string();
        let current = self.get(&change.key).map(|e| e.revision);
        match (change.base, current) {
            (None, None) if change.document.is_some() => Ok(None),
            (None, None) => Err(Conflict::Missing { key }),
            (None, Some(revision)) => Err(Conflict::Exists { key, revision }),
            (Some(_), None) => Err(Conflict::Missing { key }),
            (Some(base), Some(current)) if base != current => {
                Err(Conflict::Stale { key, base, current })
            }
            (Some(_), Some(current)) => Ok(Some(current)),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn key(id: &str) -> Key {
        Key::new(Kind::Affiliate, id).expect("key")
    }

    fn stored(name: &str) -> Stored {
        Stored {
            document: json!({ "name": name }),
            changed_by: "ops".into(),
            changed_at_ms: 1,
            reason: None,
        }
    }

    fn change(id: &str, base: Option<i64>, document: Option<&str>) -> Change {
        Change {
            key: key(id),
            base,
            document: document.map(|n| json!({ "name": n })),
            changed_by: "ops".into(),
            changed_at_ms: 2,
            reason: None,
        }
    }

    #[test]
    fn the_revision_is_the_offset_and_a_tombstone_deletes() {
        let mut c = Catalog::default();
        c.apply(key("a"), 0, Some(stored("A")));
        c.apply(key("b"), 1, Some(stored("B")));
        c.apply(key("a"), 2, Some(stored("A2")));
        assert_eq!(c.get(&key("a")).map(|e| e.revision), Some(2));
        assert_eq!(c.get(&key("a")).map(|e| &e.stored), Some(&stored("A2")));
        c.apply(key("b"), 3, None);
        assert_eq!(c.get(&key("b")), None);
        assert_eq!((c.len(), c.next_offset()), (1, 4));
        c.apply(key("a"), 1, None);
        assert!(
            c.get(&key("a")).is_some(),
            "an offset applied before is ignored"
        );
        c.skip(9);
        assert_eq!(c.next_offset(), 10);
    }

    #[test]
    fn a_change_must_be_made_against_the_current_revision() {
        let mut c = Catalog::default();
        assert_eq!(c.check(&change("a", None, Some("A"))), Ok(None));
        assert!(matches!(
            c.check(&change("a", None, None)),
            Err(Conflict::Missing { .. })
        ));
        assert!(matches!(
            c.check(&change("a", Some(0), Some("A"))),
            Err(Conflict::Missing { .. })
        ));
        c.apply(key("a"), 5, Some(stored("A")));
        assert_eq!(
            c.check(&change("a", None, Some("A"))),
            Err(Conflict::Exists {
                key: "affiliate/a".into(),
                revision: 5
            })
        );
        assert_eq!(
            c.check(&change("a", Some(4), Some("A"))),
            Err(Conflict::Stale {
                key: "affiliate/a".into(),
                base: 4,
                current: 5
            })
        );
        assert_eq!(c.check(&change("a", Some(5), Some("A2"))), Ok(Some(5)));
        assert_eq!(c.check(&change("a", Some(5), None)), Ok(Some(5)));
    }

    #[test]
    fn a_delete_and_re_create_never_reuses_a_revision() {
        let mut c = Catalog::default();
        c.apply(key("a"), 0, Some(stored("A")));
        c.apply(key("a"), 1, None);
        c.apply(key("a"), 2, Some(stored("A again")));
        assert!(
            matches!(
                c.check(&change("a", Some(0), Some("stale"))),
                Err(Conflict::Stale { .. })
            ),
            "an If-Match from before the delete does not match"
        );
    }

    #[test]
    fn a_kind_lists_only_its_own() {
        let mut c = Catalog::default();
        c.apply(key("a"), 0, Some(stored("A")));
        c.apply(
            Key::new(Kind::Offer, "a").expect("key"),
            1,
            Some(stored("O")),
        );
        assert_eq!(c.list(Kind::Affiliate).count(), 1);
        assert_eq!(c.list(Kind::Offer).count(), 1);
        assert_eq!(c.list(Kind::Source).count(), 0);
    }
}
