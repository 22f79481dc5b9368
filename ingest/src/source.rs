//! Operator integrations ("sources"): who may send postbacks, how they prove it, and how
//! their parameter names map to ours.
//!
//! A request to `/postback/<source>` (or `/v1/postbacks/<source>`) is checked against
//! `[sources.<source>]`; plain `/postback` uses `[sources.default]`, which must exist.
//! Checks, in order: client IP against the allow-list (403), then authentication (401):
//! - `token`: the shared token in `Authorization: Bearer …`, `X-Postback-Token`, or the
//!   `token` query parameter (for operators that can only configure a URL; the parameter
//!   is removed before anything is stored);
//! - `hmac`: `X-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<payload>")>`
//!   with `X-Timestamp: <unix seconds>`, where payload is the body (POST) or the query
//!   string exactly as sent, without the `?` (GET); a timestamp further than
//!   `max_skew_seconds` from now is rejected, so a captured request cannot be replayed
//!   later.
//!
//! Secrets never appear in logs or `Debug` output, and are compared in constant time.
//! The client IP is the TCP peer, unless the peer is a configured trusted proxy: then it is
//! the right-most address in the client-IP header that is not itself a trusted proxy.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use hmac::{Hmac, Mac};
use ipnet::IpNet;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::params::Pairs;
use crate::replay::Signed;

/// A secret: `Debug` shows only that it is set.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(s: &str) -> Self {
        Secret(s.as_bytes().to_vec())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    None,
    Token(Secret),
    Hmac {
        secret: Secret,
        max_skew_seconds: i64,
    },
}

/// Requests per second a source may send (token bucket, burst of one second's worth).
pub type Limiter = Arc<DefaultDirectRateLimiter>;

/// A limiter allowing `per_second` requests per second on average.
pub fn limiter(per_second: NonZeroU32) -> Limiter {
    Arc::new(RateLimiter::direct(Quota::per_second(per_second)))
}

/// One operator integration, validated.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub auth: Auth,
    /// Their parameter name → ours (`clickid` → `click_id`).
    pub aliases: BTreeMap<String, String>,
    /// Their value → ours, per canonical parameter (`event`: `sale` → `ftd`).
    pub values: BTreeMap<String, BTreeMap<String, String>>,
    /// Empty: any address.
    pub allow: Vec<IpNet>,
    /// None: unlimited.
    pub rate_limit: Option<Limiter>,
}

/// Which peers are proxies whose client-IP header is believed.
#[derive(Debug, Clone, Default)]
pub struct ProxyTrust {
    pub header: Option<axum::http::HeaderName>,
    pub proxies: Vec<IpNet>,
}

impl ProxyTrust {
    /// The client's address: the peer, or what trusted proxies say it is.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let trusted = |ip: &IpAddr| self.proxies.iter().any(|n| n.contains(ip));
        let Some(header) = &self.header else {
            return peer;
        };
        if !trusted(&peer) {
            return peer;
        }
        let mut client = peer;
        // Right to left: each hop appended the address it saw.
        for value in headers.get_all(header).iter().rev() {
            let Ok(s) = value.to_str() else { return client };
            for part in s.rsplit(',') {
                match part.trim().parse::<IpAddr>() {
                    Ok(ip) if trusted(&ip) => client = ip,
                    Ok(ip) => return ip,
                    Err(_) => return client,
                }
            }
        }
        client
    }
}

type HmacSha256 = Hmac<Sha256>;

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

impl Source {
    /// 429 when the source is over its rate limit.
    pub fn check_rate(&self) -> Result<(), ApiError> {
        match &self.rate_limit {
            Some(l) if l.check().is_err() => Err(ApiError {
                retry_after_s: Some(1),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!("source '{}' is over its rate limit; retry later", self.name),
                )
            }),
            _ => Ok(()),
        }
    }

    /// 403 unless `ip` is allowed.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), ApiError> {
        if self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip)) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("address {ip} is not allowed for source '{}'", self.name),
            ))
        }
    }

    /// 401 unless the request proves it comes from this source. `query_token` is the
    /// `token` query parameter (already removed from the parameters); `payload` is what an
    /// HMAC signature covers. A signed request's signature comes back, to be accepted
    /// once ([`crate::replay`]).
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
        payload: &[u8],
        now_s: i64,
    ) -> Result<Option<Signed>, ApiError> {
        match &self.auth {
            Auth::None => Ok(None),
            Auth::Token(secret) => {
                let given = header(headers, "authorization")
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .or_else(|| header(headers, "x-postback-token"))
                    .or(query_token)
                    .ok_or_else(|| unauthorized("a token is required for this source"))?;
                if bool::from(given.as_bytes().ct_eq(&secret.0)) {
                    Ok(None)
                } else {
                    Err(unauthorized("invalid token"))
                }
            }
            Auth::Hmac {
                secret,
                max_skew_seconds,
            } => {
                let ts_raw = header(headers, "x-timestamp")
                    .ok_or_else(|| unauthorized("X-Timestamp header is required"))?;
                let ts: i64 = ts_raw
                    .parse()
                    .map_err(|_| unauthorized("X-Timestamp must be Unix seconds"))?;
                if (now_s - ts).abs() > *max_skew_seconds {
                    return Err(unauthorized(
                        "X-Timestamp is too far from the current time (replay or clock skew)",
                    ));
                }
                let sig = header(headers, "x-signature")
                    .and_then(|v| v.strip_prefix("sha256="))
                    .and_then(|h| hex::decode(h).ok())
                    .ok_or_else(|| unauthorized("X-Signature: sha256=<hex> is required"))?;
                let mut mac = HmacSha256::new_from_slice(&secret.0)
                    .map_err(|_| unauthorized("source secret unusable"))?;
                mac.update(ts_raw.as_bytes());
                mac.update(b".");
                mac.update(payload);
                mac.verify_slice(&sig)
                    .map_err(|_| unauthorized("signature does not match"))?;
                Ok(Some(Signed::new(&self.name, &sig, ts + max_skew_seconds)))
            }
        }
    }

    /// Renames aliased parameters to their canonical names (an alias and its canonical
    /// name both present read as the name given twice: refused where it is read), then
    /// maps the source's own
    /// values of `event` and `status` to ours. A value the map does not name is kept, and
    /// checked like any other.
    pub fn apply_aliases(&self, pairs: &mut Pairs) {
        let mut tagged: Vec<(bool, (String, String))> = pairs
            .drain(..)
            .map(|(name, value)| match self.aliases.get(&name) {
                Some(canonical) => (true, (canonical.clone(), value)),
                None => (false, (name, value)),
            })
            .collect();
        // Stable: originals before renamed ones, so `take` finds the canonical first.
        tagged.sort_by_key(|(renamed, _)| *renamed);
        pairs.extend(tagged.into_iter().map(|(_, pair)| pair));
        if self.values.is_empty() {
            return;
        }
        for (name, value) in pairs.iter_mut() {
            if let Some(ours) = self
                .values
                .get(name.as_str())
                .and_then(|m| m.get(value.as_str()))
            {
                value.clone_from(ours);
            }
        }
    }
}

/// Signs like an operator would: `sha256=<hex>` over `"<timestamp>.<payload>"`.
pub fn sign(secret: &str, timestamp: i64, payload: &[u8]) -> String {
    let mut mac = match HmacSha256::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn source(auth: Auth) -> Source {
        Source {
            name: "acme".into(),
            auth,
            aliases: [("clickid", "click_id"), ("payout", "amount")]
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            values: [(
                "event".to_string(),
                [("sale".to_string(), "ftd".to_string())].into(),
            )]
            .into(),
            allow: vec!["203.0.113.0/24".parse().expect("cidr")],
            rate_limit: None,
        }
    }

    #[test]
    fn rate_limit_refuses_the_excess_with_429() {
        let mut s = source(Auth::None);
        assert!(s.check_rate().is_ok(), "no limit configured");
        s.rate_limit = Some(limiter(NonZeroU32::new(3).expect("non-zero")));
        let results: Vec<bool> = (0..10).map(|_| s.check_rate().is_ok()).collect();
        let allowed = results.iter().filter(|ok| **ok).count();
        assert!(
            (3..=4).contains(&allowed),
            "burst of about one second: {results:?}"
        );
        let e = s.check_rate().expect_err("over the limit");
        assert_eq!(
            (e.status, e.retry_after_s),
            (StatusCode::TOO_MANY_REQUESTS, Some(1))
        );
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    #[test]
    fn allow_list() {
        let s = source(Auth::None);
        assert!(s.check_ip("203.0.113.7".parse().expect("ip")).is_ok());
        let e = s
            .check_ip("198.51.100.1".parse().expect("ip"))
            .expect_err("denied");
        assert_eq!(e.status, StatusCode::FORBIDDEN);
    }

    #[test]
    fn token_from_header_or_query_compared_exactly() {
        let s = source(Auth::Token(Secret::new("s3cret")));
        let h = HeaderMap::new();
        assert!(s
            .authenticate(
                &headers(&[("authorization", "Bearer s3cret")]),
                None,
                b"",
                0
            )
            .is_ok());
        assert!(s
            .authenticate(&headers(&[("x-postback-token", "s3cret")]), None, b"", 0)
            .is_ok());
        assert!(s.authenticate(&h, Some("s3cret"), b"", 0).is_ok());
        for wrong in ["s3cre", "s3cret!", ""] {
            let e = s
                .authenticate(&h, Some(wrong), b"", 0)
                .expect_err("wrong token");
            assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        }
        assert_eq!(
            s.authenticate(&h, None, b"", 0)
                .expect_err("missing")
                .status,
            StatusCode::UNAUTHORIZED
        );
        assert!(
            !format!("{s:?}").contains("s3cret"),
            "secrets stay out of Debug"
        );
    }

    #[test]
    fn hmac_signature_and_skew() {
        let s = source(Auth::Hmac {
            secret: Secret::new("k"),
            max_skew_seconds: 300,
        });
        let body = br#"{"click_id":"c"}"#;
        let sig = sign("k", 1_000, body);
        let ok = headers(&[("x-timestamp", "1000"), ("x-signature", &sig)]);
        assert!(s.authenticate(&ok, None, body, 1_200).is_ok());
        assert!(
            s.authenticate(&ok, None, body, 1_301).is_err(),
            "replay outside the skew"
        );
        assert!(s.authenticate(&ok, None, b"tampered", 1_000).is_err());
        let bad_ts = headers(&[("x-timestamp", "1001"), ("x-signature", &sig)]);
        assert!(
            s.authenticate(&bad_ts, None, body, 1_000).is_err(),
            "timestamp is signed"
        );
        assert!(s
            .authenticate(&headers(&[("x-timestamp", "1000")]), None, body, 1_000)
            .is_err());
    }

    #[test]
    fn aliases_rename_and_a_name_with_its_alias_is_ambiguous() {
        let s = source(Auth::None);
        let take = |p: &mut Pairs, name: &str| crate::params::take(p, name).expect("once");
        let mut p: Pairs = vec![
            ("clickid".into(), "from-alias".into()),
            ("payout".into(), "5".into()),
        ];
        s.apply_aliases(&mut p);
        assert_eq!(take(&mut p, "click_id").as_deref(), Some("from-alias"));
        assert_eq!(take(&mut p, "amount").as_deref(), Some("5"));
        let mut both: Pairs = vec![
            ("clickid".into(), "from-alias".into()),
            ("click_id".into(), "canonical".into()),
        ];
        s.apply_aliases(&mut both);
        let e = crate::params::take(&mut both, "click_id").expect_err("ambiguous");
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("duplicate_parameter", Some("click_id"))
        );

        let mut p: Pairs = vec![
            ("et".into(), "sale".into()),
            ("status".into(), "sale".into()),
        ];
        let mut s = s;
        s.aliases.insert("et".into(), "event".into());
        s.apply_aliases(&mut p);
        assert_eq!(
            take(&mut p, "event").as_deref(),
            Some("ftd"),
            "renamed, then mapped"
        );
        assert_eq!(
            take(&mut p, "status").as_deref(),
            Some("sale"),
            "status has no map here"
        );
    }

    #[test]
    fn client_ip_trusts_only_configured_proxies() {
        let trust = ProxyTrust {
            header: Some(axum::http::HeaderName::from_static("x-forwarded-for")),
            proxies: vec!["10.0.0.0/8".parse().expect("cidr")],
        };
        let h = headers(&[("x-forwarded-for", "198.51.100.9, 203.0.113.5, 10.1.1.1")]);
        let proxy: IpAddr = "10.0.0.2".parse().expect("ip");
        let stranger: IpAddr = "192.0.2.1".parse().expect("ip");
        assert_eq!(
            trust.client_ip(proxy, &h),
            "203.0.113.5".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(
            trust.client_ip(stranger, &h),
            stranger,
            "spoofed header ignored"
        );
        assert_eq!(ProxyTrust::default().client_ip(proxy, &h), proxy);
    }
}
