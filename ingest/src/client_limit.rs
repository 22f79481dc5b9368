//! A maximum request rate per client address (on `/click`): a token bucket per address,
//! a second's worth of burst; over it, 429 with `Retry-After`. An IPv6 client is keyed by
//! its /64 (one host can take a whole /64; counting each address apart would let it
//! rotate past the limit). Memory stays bounded: every few thousand checks the buckets
//! of addresses that have been quiet long enough to be full again are dropped.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::StatusCode;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::ApiError;

/// Checks between two sweeps of quiet addresses.
const SWEEP_EVERY: u64 = 4096;

#[derive(Debug)]
pub struct ClientLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    checks: AtomicU64,
}

impl ClientLimiter {
    /// `per_second` requests per second per client on average.
    pub fn new(per_second: NonZeroU32) -> Self {
        ClientLimiter {
            limiter: RateLimiter::keyed(Quota::per_second(per_second)),
            checks: AtomicU64::new(0),
        }
    }

    /// 429 when `ip` is over its rate.
    pub fn check(&self, ip: IpAddr) -> Result<(), ApiError> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&client_key(ip))
            .map_err(|_| ApiError {
                retry_after_s: Some(1),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    "too many requests from this address; retry later",
                )
            })
    }

    /// Addresses with a bucket now.
    pub fn tracked(&self) -> usize {
        self.limiter.len()
    }
}

/// The address a limit applies to: an IPv4 address (also when mapped into IPv6), or an
/// IPv6 address's /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn each_client_has_its_own_bucket() {
        let l = ClientLimiter::new(NonZeroU32::new(2).expect("2"));
        assert!(l.check(ip("192.0.2.1")).is_ok());
        assert!(l.check(ip("192.0.2.1")).is_ok());
        let e = l.check(ip("192.0.2.1")).expect_err("over");
        assert_eq!(
            (e.status, e.code, e.retry_after_s),
            (StatusCode::TOO_MANY_REQUESTS, "rate_limited", Some(1))
        );
        assert!(
            l.check(ip("192.0.2.2")).is_ok(),
            "another client is not held back"
        );
    }

    #[test]
    fn an_ipv6_client_is_its_64() {
        assert_eq!(client_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(client_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        let l = ClientLimiter::new(NonZeroU32::new(1).expect("1"));
        assert!(l.check(ip("2001:db8:1:2::1")).is_ok());
        assert!(
            l.check(ip("2001:db8:1:2::ffff")).is_err(),
            "rotating within the /64 does not help"
        );
        assert!(l.check(ip("2001:db8:1:3::1")).is_ok());
    }

    #[test]
    fn quiet_clients_are_forgotten() {
        let l = ClientLimiter::new(NonZeroU32::new(1_000_000).expect("n"));
        for i in 0..SWEEP_EVERY {
            let [a, b] = u16::try_from(i).unwrap_or(0).to_be_bytes();
            assert!(l.check(IpAddr::from([10, 0, a, b])).is_ok());
        }
        // At a million a second a bucket is full again a microsecond after its use: the
        // sweep at the 4096th check dropped all but the few used within that microsecond.
        assert!(l.tracked() < 100, "{}", l.tracked());
    }
}
