//! Identifiers: fresh ones for new inputs (ULID: unique, URL-safe, time-sortable) and
//! deterministic ones for outcomes, so that a replay after a crash reproduces the same ID
//! and any consumer can deduplicate.

use sha2::{Digest, Sha256};

/// A new ULID, 26 characters of Crockford base32.
pub fn new_ulid() -> String {
    ulid::Ulid::new().to_string()
}

/// A deterministic 128-bit ID (32 hex characters) from a domain tag and parts.
///
/// Parts are length-prefixed, so `("ab", "c")` and `("a", "bc")` differ.
pub fn derived(domain: &str, parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in std::iter::once(&domain).chain(parts) {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_unambiguous() {
        assert_eq!(derived("x", &["ab", "c"]), derived("x", &["ab", "c"]));
        assert_ne!(derived("x", &["ab", "c"]), derived("x", &["a", "bc"]));
        assert_ne!(derived("x", &["a"]), derived("y", &["a"]));
        assert_eq!(derived("x", &["a"]).len(), 32);
    }

    #[test]
    fn ulids_sort_by_time_and_are_url_safe() {
        let a = new_ulid();
        let b = new_ulid();
        assert_eq!(a.len(), 26);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }
}
