//! The entities' history: every accepted change as the audit topic keeps it, by entity.
//! Compaction keeps only an entity's latest document in the catalog topic; the audit
//! topic (not compacted) keeps every change, who made it, when and why.

use std::collections::BTreeMap;

use crate::follower::Materialized;
use crate::record::{AuditRecord, Key};

/// Every change of every entity, oldest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    by_key: BTreeMap<String, Vec<AuditRecord>>,
    next: i64,
}

impl History {
    /// The changes of `key`, oldest first (also those from before a delete and re-create).
    pub fn of(&self, key: &Key) -> &[AuditRecord] {
        self.by_key.get(&key.to_string()).map_or(&[], Vec::as_slice)
    }

    pub fn push(&mut self, offset: i64, record: AuditRecord) {
        if offset < self.next {
            return;
        }
        self.next = offset + 1;
        self.by_key
            .entry(record.key.clone())
            .or_default()
            .push(record);
    }
}

impl Materialized for History {
    fn apply_record(
        &mut self,
        topic: &str,
        offset: i64,
        _key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) {
        match value.map(serde_json::from_slice::<AuditRecord>) {
            Some(Ok(record)) => self.push(offset, record),
            other => {
                tracing::error!(topic, offset, error = ?other.map(|r| r.err().map(|e| e.to_string())),
                    "an audit record that is not one; passed over");
                self.next = self.next.max(offset + 1);
            }
        }
    }

    fn next_offset(&self) -> i64 {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, revision: i64) -> AuditRecord {
        AuditRecord {
            key: key.into(),
            revision,
            previous: None,
            document: None,
            changed_by: "ops".into(),
            changed_at_ms: 1,
            reason: None,
        }
    }

    #[test]
    fn changes_are_kept_per_entity_in_order_and_once() {
        let mut h = History::default();
        h.apply_record(
            "t",
            0,
            None,
            Some(&serde_json::to_vec(&record("offer/1", 10)).expect("json")),
        );
        h.apply_record("t", 1, None, Some(b"not json"));
        h.apply_record(
            "t",
            2,
            None,
            Some(&serde_json::to_vec(&record("offer/1", 12)).expect("json")),
        );
        h.push(2, record("offer/1", 99));
        let key: Key = "offer/1".parse().expect("key");
        let revisions: Vec<i64> = h.of(&key).iter().map(|r| r.revision).collect();
        assert_eq!(revisions, [10, 12]);
        assert_eq!(h.next_offset(), 3);
        assert!(h.of(&"offer/2".parse().expect("key")).is_empty());
    }
}
