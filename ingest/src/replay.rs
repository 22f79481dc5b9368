//! An HMAC signature is accepted once. A signed request is valid for `max_skew` around its
//! `X-Timestamp`; inside that window the same bytes could be sent again and again. Each
//! accepted signature is remembered until its window ends, and a second use is refused
//! (401 `replayed`).
//!
//! A signature is reserved when its request is authenticated and released if nothing of
//! the request was stored (a refused record, the broker not acknowledging): the operator's
//! retry of a failed request, with the same signature, is taken; one that was stored is
//! not taken twice. Memory is bounded: at `capacity` signatures not yet expired, new
//! signed requests are refused with 503 and `Retry-After` (fail closed) rather than
//! accepted unchecked.
//!
//! Per instance: each ingest instance remembers what it accepted. A replay sent to
//! another instance within the window is accepted there once — the accepted risk,
//! documented in docs/operations.md: an attacker who captured a signed request can have
//! it stored at most once per instance, within `max_skew`, and every copy carries the
//! same `txn_id`, which the attributor's duplicate rule takes once.

use std::collections::{BTreeSet, HashSet};
use std::sync::Mutex;

use axum::http::StatusCode;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// A signature as remembered: SHA-256 of the source's name and the signature bytes.
pub type Fingerprint = [u8; 32];

/// A signed request's claim to be new: what to remember and until when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signed {
    pub fingerprint: Fingerprint,
    /// Unix seconds after which the signature is refused as too old anyway.
    pub expires_s: i64,
}

impl Signed {
    pub fn new(source: &str, signature: &[u8], expires_s: i64) -> Self {
        let mut h = Sha256::new();
        h.update(source.as_bytes());
        h.update([0]);
        h.update(signature);
        Signed {
            fingerprint: h.finalize().into(),
            expires_s,
        }
    }
}

/// The signatures accepted and not yet expired.
#[derive(Debug)]
pub struct Replays {
    seen: Mutex<Seen>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Seen {
    fingerprints: HashSet<Fingerprint>,
    by_expiry: BTreeSet<(i64, Fingerprint)>,
}

impl Replays {
    pub fn new(capacity: usize) -> Self {
        Replays {
            seen: Mutex::new(Seen::default()),
            capacity: capacity.max(1),
        }
    }

    /// Reserves `s` at `now_s`: 401 `replayed` if it was accepted before, 503 when the
    /// memory is full.
    pub fn first_use(&self, s: Signed, now_s: i64) -> Result<(), ApiError> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(&(expires, f)) = seen.by_expiry.first() {
            if expires > now_s {
                break;
            }
            seen.by_expiry.pop_first();
            seen.fingerprints.remove(&f);
        }
        if seen.fingerprints.contains(&s.fingerprint) {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "replayed",
                "this signature was already used: sign each request anew (a new X-Timestamp)",
            ));
        }
        if seen.fingerprints.len() >= self.capacity {
            return Err(ApiError {
                retry_after_s: Some(1),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "replay_memory_full",
                    "too many signed requests within the allowed clock skew to check them \
                     for replays; retry shortly",
                )
            });
        }
        seen.fingerprints.insert(s.fingerprint);
        seen.by_expiry.insert((s.expires_s, s.fingerprint));
        Ok(())
    }

    /// Forgets `s` (its request stored nothing: a retry with it is welcome).
    pub fn release(&self, s: Signed) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.fingerprints.remove(&s.fingerprint);
        seen.by_expiry.remove(&(s.expires_s, s.fingerprint));
    }

    /// Signatures remembered now.
    pub fn len(&self) -> usize {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fingerprints
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_is_accepted_once_until_it_expires() {
        let r = Replays::new(10);
        let s = Signed::new("acme", b"sig-1", 100);
        assert_eq!(r.first_use(s, 50), Ok(()));
        let again = r.first_use(s, 60).expect_err("replayed");
        assert_eq!(
            (again.status, again.code),
            (StatusCode::UNAUTHORIZED, "replayed")
        );
        // The same bytes for another source are another signature.
        assert_eq!(r.first_use(Signed::new("other", b"sig-1", 100), 60), Ok(()));
        // Once expired (the timestamp check refuses it then anyway) it is forgotten.
        assert_eq!(r.first_use(Signed::new("x", b"y", 200), 101), Ok(()));
        assert_eq!(r.len(), 1, "both expired entries purged");
    }

    #[test]
    fn a_released_signature_may_be_used_again() {
        let r = Replays::new(10);
        let s = Signed::new("acme", b"sig", 100);
        r.first_use(s, 0).expect("first");
        r.release(s);
        assert_eq!(
            r.first_use(s, 1),
            Ok(()),
            "the retry of a request that stored nothing"
        );
        assert!(r.first_use(s, 2).is_err());
    }

    #[test]
    fn memory_is_bounded_and_fails_closed() {
        let r = Replays::new(2);
        r.first_use(Signed::new("a", b"1", 100), 0).expect("1");
        r.first_use(Signed::new("a", b"2", 100), 0).expect("2");
        let full = r
            .first_use(Signed::new("a", b"3", 100), 0)
            .expect_err("full");
        assert_eq!(
            (full.status, full.code, full.retry_after_s),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "replay_memory_full",
                Some(1)
            )
        );
        assert_eq!(
            r.first_use(Signed::new("a", b"3", 200), 100),
            Ok(()),
            "room once expired"
        );
    }
}
