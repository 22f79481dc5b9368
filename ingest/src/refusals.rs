//! Refusal events: every 4xx answer to a postback or a batch record is published to the
//! refusals topic, so that the screen an operator's engineer opens when "my postbacks
//! don't arrive" (the console's refusals list) shows why, newest first, per source.
//!
//! - Nothing secret leaves: parameters whose names say token, secret, password,
//!   signature, key or auth are replaced by `[redacted]`; headers are never copied.
//! - Everything is bounded: at most [`MAX_PARAMS`] parameters of [`MAX_VALUE`] characters,
//!   the path and the message likewise.
//! - A flood cannot fill the broker: per (source, reason) at most the configured rate is
//!   published; the rest is counted (`ingest_refusal_events_dropped_total{why}`), as are
//!   events the broker did not take.
//! - A refusal is answered at once: its event is published in the background, at most
//!   once (it is diagnostics, not money; the refused request itself stored nothing).
//!
//! `ingest_refusals_total{reason}` counts every refusal, published or not.

use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use prometheus::{IntCounterVec, Opts, Registry};
use s2s_common::contract::{Params, Refusal, SCHEMA_VERSION};

use crate::error::ApiError;
use crate::params::Pairs;
use crate::publish::Publisher;

/// Parameters kept per refusal at most.
pub const MAX_PARAMS: usize = 32;
/// Characters kept of a value, a path or a message.
pub const MAX_VALUE: usize = 256;

/// Words in a parameter name that mark it secret.
const SECRET_WORDS: [&str; 11] = [
    "token",
    "secret",
    "password",
    "passwd",
    "signature",
    "sig",
    "hmac",
    "key",
    "apikey",
    "auth",
    "authorization",
];

/// Where a refused request came from.
#[derive(Debug, Clone)]
pub struct Origin<'a> {
    pub source: &'a str,
    pub client_ip: Option<String>,
    pub path: &'a str,
}

fn bounded(s: &str) -> String {
    s.chars().take(MAX_VALUE).collect()
}

fn secret(name: &str) -> bool {
    name.to_ascii_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .any(|word| SECRET_WORDS.contains(&word))
}

/// `pairs` as they may be shown: secrets redacted, at most [`MAX_PARAMS`], each bounded.
/// The first value of a repeated name is kept.
pub fn shown(pairs: &Pairs) -> Params {
    let mut out = Params::new();
    for (name, value) in pairs {
        if out.len() >= MAX_PARAMS {
            break;
        }
        let value = if secret(name) {
            "[redacted]".to_string()
        } else {
            bounded(value)
        };
        out.entry(bounded(name)).or_insert(value);
    }
    out
}

/// The refusal event of `err`, answered to a `kind` record from `origin`.
pub fn refusal(
    kind: &str,
    origin: &Origin<'_>,
    pairs: &Pairs,
    err: &ApiError,
    refusal_id: String,
    now_ms: i64,
) -> Refusal {
    Refusal {
        schema_version: SCHEMA_VERSION,
        refusal_id,
        kind: kind.to_string(),
        source: bounded(origin.source),
        status: err.status.as_u16(),
        reason: err.code.to_string(),
        field: err.field.as_deref().map(bounded),
        message: bounded(&err.message),
        client_ip: origin.client_ip.clone(),
        path: bounded(origin.path),
        params: shown(pairs),
        ts_ms: now_ms,
    }
}

/// Whether an answer is a refusal: a 4xx other than 405 (no such method, no record).
pub fn is_refusal(err: &ApiError) -> bool {
    err.status.is_client_error() && err.status.as_u16() != 405
}

/// Publishes refusal events, rate-limited per (source, reason).
pub struct Refusals {
    publisher: Publisher,
    topic: String,
    limiter: DefaultKeyedRateLimiter<(String, &'static str)>,
    /// Configured sources: others share one limiter key, so the limiter's keys stay
    /// bounded (configured sources × error codes) whatever names requests make up.
    sources: Vec<String>,
    /// `ingest_refusals_total{reason}`.
    refusals: IntCounterVec,
    /// `ingest_refusal_events_dropped_total{why}`: rate_limited, not_stored.
    dropped: IntCounterVec,
}

impl std::fmt::Debug for Refusals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refusals")
            .field("topic", &self.topic)
            .finish()
    }
}

impl Refusals {
    pub fn new(
        publisher: Publisher,
        topic: String,
        per_second: NonZeroU32,
        sources: Vec<String>,
        registry: &Registry,
    ) -> prometheus::Result<Self> {
        let refusals = IntCounterVec::new(
            Opts::new(
                "ingest_refusals_total",
                "Postbacks and batch records refused with a 4xx, by reason (the error code).",
            ),
            &["reason"],
        )?;
        let dropped = IntCounterVec::new(
            Opts::new(
                "ingest_refusal_events_dropped_total",
                "Refusal events not published: over the rate per source and reason, or not \
                 stored by the broker.",
            ),
            &["why"],
        )?;
        for why in ["rate_limited", "not_stored"] {
            dropped.with_label_values(&[why]);
        }
        registry.register(Box::new(refusals.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        Ok(Refusals {
            publisher,
            topic,
            limiter: RateLimiter::keyed(Quota::per_second(per_second)),
            sources,
            refusals,
            dropped,
        })
    }

    /// Counts `err` and, within the rate, publishes its event in the background.
    pub fn record(&self, kind: &str, origin: &Origin<'_>, pairs: &Pairs, err: &ApiError) {
        self.refusals.with_label_values(&[err.code]).inc();
        let known = self.sources.iter().any(|s| s == origin.source);
        let key = (
            if known { origin.source } else { "?" }.to_string(),
            err.code,
        );
        if self.limiter.check_key(&key).is_err() {
            self.dropped.with_label_values(&["rate_limited"]).inc();
            return;
        }
        let event = refusal(
            kind,
            origin,
            pairs,
            err,
            s2s_common::ids::new_ulid(),
            s2s_common::now_ms(),
        );
        let (publisher, topic, dropped) = (
            self.publisher.clone(),
            self.topic.clone(),
            self.dropped.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = publisher
                .send(&topic, event.source.as_bytes(), &event)
                .await
            {
                tracing::debug!(error = %e, "refusal event not stored");
                dropped.with_label_values(&["not_stored"]).inc();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    fn pairs(v: &[(&str, &str)]) -> Pairs {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn secrets_are_redacted_and_everything_is_bounded() {
        let long = "x".repeat(1000);
        let p = pairs(&[
            ("click_id", "c1"),
            ("token", "s3cret"),
            ("X-Signature", "abc"),
            ("api_key", "k"),
            ("password", "p"),
            ("sub1", &long),
            ("click_id", "second"),
            ("signup", "kept"),
        ]);
        let shown = shown(&p);
        for k in ["token", "X-Signature", "api_key", "password"] {
            assert_eq!(shown.get(k).map(String::as_str), Some("[redacted]"), "{k}");
        }
        assert_eq!(shown.get("click_id").map(String::as_str), Some("c1"));
        assert_eq!(shown.get("signup").map(String::as_str), Some("kept"));
        assert_eq!(shown.get("sub1").map(String::len), Some(MAX_VALUE));
        let many: Pairs = (0..100)
            .map(|i| (format!("p{i}"), "v".to_string()))
            .collect();
        assert_eq!(super::shown(&many).len(), MAX_PARAMS);
    }

    #[test]
    fn a_refusal_says_what_was_wrong_where() {
        let err = ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_value",
            "event 'sale' is not allowed",
        )
        .field("event");
        let origin = Origin {
            source: "acme",
            client_ip: Some("203.0.113.9".into()),
            path: "/postback/acme",
        };
        let r = refusal(
            "postback",
            &origin,
            &pairs(&[("event", "sale"), ("token", "t")]),
            &err,
            "r1".into(),
            5,
        );
        assert_eq!(
            (
                r.status,
                r.reason.as_str(),
                r.field.as_deref(),
                r.source.as_str()
            ),
            (422, "unknown_value", Some("event"), "acme")
        );
        assert_eq!(
            r.params.get("token").map(String::as_str),
            Some("[redacted]")
        );
        assert_eq!((r.path.as_str(), r.ts_ms), ("/postback/acme", 5));
        assert!(is_refusal(&err));
        assert!(!is_refusal(&ApiError::unavailable("later")));
        assert!(!is_refusal(&ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "no"
        )));
    }
}
