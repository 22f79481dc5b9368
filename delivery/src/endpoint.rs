//! Outbound postbacks: which conversions an endpoint wants, the URL it gets, and how an
//! attempt's result is classified. Pure functions, unit-tested.

use std::borrow::Cow;

use s2s_common::contract::{AttemptOutcome, Conversion};
use s2s_common::ids::derived;
use s2s_common::template::{Encoding, Template};

/// Macros an affiliate postback URL may use.
pub const MACROS: &[&str] = &[
    "click_id",
    "aff_id",
    "offer_id",
    "sub1",
    "sub2",
    "sub3",
    "sub4",
    "sub5",
    "sub6",
    "sub7",
    "sub8",
    "sub9",
    "sub10",
    "event",
    "txn_id",
    "amount",
    "payout",
    "currency",
    "status",
    "conversion_id",
    "timestamp",
];

#[derive(Debug, Clone)]
pub struct Endpoint {
    pub name: String,
    pub url: Template,
    pub aff_id: Option<String>,
    pub offer_id: Option<String>,
    pub events: Vec<String>,
    pub statuses: Vec<String>,
}

impl Endpoint {
    /// Whether this endpoint fires for `c`.
    pub fn wants(&self, c: &Conversion) -> bool {
        self.aff_id.as_ref().is_none_or(|a| *a == c.aff_id)
            && self.offer_id.as_ref().is_none_or(|o| *o == c.offer_id)
            && (self.events.is_empty() || self.events.contains(&c.event))
            && (self.statuses.is_empty() || self.statuses.contains(&c.status))
    }

    /// The URL for `c`, every value URL-encoded.
    pub fn url_for(&self, c: &Conversion) -> String {
        self.url
            .render(|m| macro_value(c, m), Encoding::UrlComponent)
    }

    /// Stable per (conversion, version, endpoint): the idempotency key the affiliate sees
    /// on every attempt, including re-sends after a crash.
    pub fn delivery_id(&self, c: &Conversion) -> String {
        derived(
            "delivery",
            &[&c.conversion_id, &c.version.to_string(), &self.name],
        )
    }
}

fn macro_value<'a>(c: &'a Conversion, name: &str) -> Option<Cow<'a, str>> {
    let b = |s: &'a String| Some(Cow::Borrowed(s.as_str()));
    match name {
        "click_id" => b(&c.click_id),
        "aff_id" => b(&c.aff_id),
        "offer_id" => b(&c.offer_id),
        "event" => b(&c.event),
        "txn_id" => c.txn_id.as_ref().and_then(b),
        "amount" => c.amount.map(|a| Cow::Owned(a.to_string())),
        "payout" => Some(Cow::Owned(c.payout.to_string())),
        "currency" => b(&c.payout_currency),
        "status" => b(&c.status),
        "conversion_id" => b(&c.conversion_id),
        "timestamp" => Some(Cow::Owned((c.event_ts_ms / 1000).to_string())),
        sub => c.subs.get(sub).and_then(b),
    }
}

/// Success is a 2xx. Network errors and timeouts (`None`), 408, 429 and 5xx are worth a
/// retry; anything else (other 4xx, redirects, which are not followed) is not.
pub fn classify(status: Option<u16>) -> AttemptOutcome {
    match status {
        Some(200..=299) => AttemptOutcome::Delivered,
        None | Some(408) | Some(429) | Some(500..=599) => AttemptOutcome::Retryable,
        Some(_) => AttemptOutcome::Permanent,
    }
}

/// `2xx`, `4xx`, … or `error` for no response: a bounded metric label.
pub fn status_class(status: Option<u16>) -> &'static str {
    match status {
        Some(100..=199) => "1xx",
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::Decimal;

    fn conv() -> Conversion {
        Conversion {
            schema_version: 1,
            conversion_id: "cv".into(),
            version: 1,
            outcome_id: "o".into(),
            postback_id: "p".into(),
            click_id: "c 1".into(),
            offer_id: "7".into(),
            aff_id: "42".into(),
            subs: [("sub1".to_string(), "a&b".to_string())].into(),
            event: "ftd".into(),
            txn_id: None,
            status: "approved".into(),
            amount: Some(Decimal::new(1999, 2)),
            currency: Some("EUR".into()),
            payout: Decimal::new(5000, 2),
            payout_currency: "USD".into(),
            click_ts_ms: 0,
            event_ts_ms: 1_700_000_000_123,
            attributed_at_ms: 0,
            previous_status: None,
            suspicious: false,
        }
    }

    fn endpoint(url: &str) -> Endpoint {
        Endpoint {
            name: "e".into(),
            url: Template::parse(url, MACROS).expect("valid"),
            aff_id: None,
            offer_id: None,
            events: vec![],
            statuses: vec![],
        }
    }

    #[test]
    fn renders_every_macro_encoded() {
        let e = endpoint("https://a/pb?c={click_id}&p={payout}&cur={currency}&s={sub1}&t={txn_id}&ts={timestamp}&amt={amount}&s9={sub9}");
        assert_eq!(
            e.url_for(&conv()),
            "https://a/pb?c=c%201&p=50.00&cur=USD&s=a%26b&t=&ts=1700000000&amt=19.99&s9="
        );
    }

    #[test]
    fn filters() {
        let mut e = endpoint("https://a/");
        assert!(e.wants(&conv()), "global postback fires for everything");
        e.aff_id = Some("43".into());
        assert!(!e.wants(&conv()));
        e.aff_id = Some("42".into());
        e.events = vec!["registration".into()];
        assert!(!e.wants(&conv()));
        e.events = vec!["ftd".into()];
        e.statuses = vec!["approved".into()];
        assert!(e.wants(&conv()));
    }

    #[test]
    fn classification_and_schedule() {
        assert_eq!(classify(Some(204)), AttemptOutcome::Delivered);
        for s in [None, Some(408), Some(429), Some(500), Some(503)] {
            assert_eq!(classify(s), AttemptOutcome::Retryable, "{s:?}");
        }
        for s in [Some(301), Some(302), Some(400), Some(404)] {
            assert_eq!(classify(s), AttemptOutcome::Permanent, "{s:?}");
        }
        assert_eq!(
            (status_class(Some(302)), status_class(None)),
            ("3xx", "error")
        );
    }

    #[test]
    fn delivery_id_is_stable_per_conversion_version_and_endpoint() {
        let e = endpoint("https://a/");
        let mut c = conv();
        let first = e.delivery_id(&c);
        assert_eq!(first, e.delivery_id(&c));
        c.version = 2;
        assert_ne!(first, e.delivery_id(&c));
    }
}
