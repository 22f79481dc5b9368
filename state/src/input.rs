//! Where a partition's input stands: per input topic, the offset after the last record
//! taken in. It starts at the offsets stored with the partition's state; a record below
//! it was taken in already (a rebalance or a restart fetches again from the stored
//! offsets) and is skipped, so that every record is applied to the state once.

use std::collections::BTreeMap;

use crate::store::{Family, Store, StoreError};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Positions(BTreeMap<String, i64>);

impl Positions {
    /// The positions stored with a partition's state, for each of `topics`.
    pub fn load<F: Family>(store: &Store<F>, topics: &[&str]) -> Result<Self, StoreError> {
        let mut next = BTreeMap::new();
        for topic in topics {
            if let Some(o) = store.offset(topic)? {
                next.insert(topic.to_string(), o);
            }
        }
        Ok(Positions(next))
    }

    /// Takes in record `offset` of `topic` if it is new (moving the position past it);
    /// `false` for a record taken in already.
    pub fn admit(&mut self, topic: &str, offset: i64) -> bool {
        let next = match self.0.get_mut(topic) {
            Some(n) => n,
            None => self.0.entry(topic.to_string()).or_insert(0),
        };
        if offset < *next {
            return false;
        }
        *next = offset + 1;
        true
    }

    /// The offset after the last record of `topic` taken in (0 before any).
    pub fn next(&self, topic: &str) -> i64 {
        self.0.get(topic).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_taken_in_once_in_order() {
        let mut p = Positions::default();
        assert_eq!(p.next("t"), 0);
        assert!(p.admit("t", 0));
        assert!(
            p.admit("t", 5),
            "gaps are fine (compacted or transactional topics)"
        );
        assert!(!p.admit("t", 3), "behind the position: taken in already");
        assert!(!p.admit("t", 5));
        assert_eq!((p.next("t"), p.next("u")), (6, 0));
        assert!(p.admit("u", 0));
    }
}
