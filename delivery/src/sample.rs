//! A postback's test: a sample conversion sent through the endpoint's real templates and
//! signing, marked as a test — IDs that start with `test_`, the `webhook-id` too, and an
//! `s2s-test: 1` header — and written to no topic: not a conversion, not counted, not
//! paid. The console sends it on an operator's request and shows the exact request and
//! the endpoint's answer.

use s2s_common::contract::Conversion;

use crate::endpoint::{Endpoint, Filter, Request};

/// The header that marks a test request.
pub const TEST_HEADER: &str = "s2s-test";

/// A sample conversion the endpoint wants: its affiliate, offer, first event and first
/// status where it names them, sample values where it takes any; `id` makes its IDs
/// (`test_<id>`), `now_ms` its times.
pub fn conversion(filter: &Filter, id: &str, now_ms: i64) -> Conversion {
    let id = format!("test_{id}");
    let base = s2s_common::fixtures::conversion(&id, &id);
    Conversion {
        aff_id: filter.aff_id.clone().unwrap_or(base.aff_id),
        offer_id: filter.offer_id.clone().unwrap_or(base.offer_id),
        event: filter.events.first().cloned().unwrap_or(base.event),
        status: filter.statuses.first().cloned().unwrap_or(base.status),
        postback_id: id.clone(),
        txn_id: Some(id),
        click_ts_ms: now_ms - 60_000,
        event_ts_ms: now_ms,
        received_ts_ms: now_ms,
        attributed_at_ms: now_ms,
        suspicious: false,
        catalog_revision: None,
        ..base
    }
}

/// The test request for `c`: the endpoint's real request (templates, headers, signature
/// at `now_ms`) with a `test_` `webhook-id` and the test header.
pub fn request(endpoint: &Endpoint, c: &Conversion, now_ms: i64) -> Request {
    let webhook_id = format!("test_{}", c.delivery_id(&endpoint.name));
    let mut r = endpoint.request(c, &webhook_id, now_ms.div_euclid(1000));
    r.headers.push((TEST_HEADER.into(), "1".into()));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DeliveryConfig, PostbackConfig};
    use crate::signing::{sign, Secret};
    use s2s_common::pipeline::ServiceConfig as _;

    const SECRET: &str = "whsec_c2VjcmV0LXNpZ25pbmcta2V5LTEyMzQ1Njc4OTA=";

    fn endpoint() -> Endpoint {
        let config = DeliveryConfig::defaults().expect("defaults");
        config
            .compile_postback(&PostbackConfig {
                name: "aff-42".into(),
                url: "https://aff.example/pb?c={click_id}&e={event}&p={payout}&s={status}".into(),
                aff_id: Some("42".into()),
                events: vec!["deposit".into(), "ftd".into()],
                statuses: vec!["pending".into()],
                secret: Some(SECRET.into()),
                ..PostbackConfig::default()
            })
            .expect("compiles")
    }

    #[test]
    fn the_sample_is_one_the_endpoint_wants() {
        let ep = endpoint();
        let c = conversion(&ep.filter, "01J", 1_800_000_000_000);
        assert!(ep.filter.wants(&c), "{c:?}");
        assert_eq!(
            (c.aff_id.as_str(), c.event.as_str(), c.status.as_str()),
            ("42", "deposit", "pending")
        );
        assert!(c.click_id.starts_with("test_") && c.conversion_id.starts_with("test_"));
        let any = conversion(&Filter::default(), "01J", 0);
        assert!(Filter::default().wants(&any));
    }

    #[test]
    fn the_test_request_is_the_real_request_marked_and_signed() {
        let ep = endpoint();
        let now_ms = 1_800_000_000_123;
        let c = conversion(&ep.filter, "01J", now_ms);
        let r = request(&ep, &c, now_ms);
        assert_eq!(
            r.url,
            "https://aff.example/pb?c=test_01J&e=deposit&p=50.00&s=pending"
        );
        let header = |name: &str| {
            r.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(header(TEST_HEADER), Some("1"));
        let id = header("webhook-id").expect("webhook-id");
        assert!(id.starts_with("test_"), "{id}");
        assert_eq!(header("webhook-timestamp"), Some("1800000000"));
        let secret = Secret::parse(SECRET).expect("secret");
        assert_eq!(
            header("webhook-signature"),
            Some(sign(&secret, id, 1_800_000_000, &r.body).as_str()),
            "signed as a delivery is"
        );
    }
}
