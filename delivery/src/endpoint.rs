//! Outbound postbacks: which conversions an endpoint wants, the request it gets for one
//! (method, URL, headers, body, signature), and how an attempt's result is classified.
//! Pure functions, unit-tested.

use std::borrow::Cow;
use std::time::Duration;

use s2s_common::contract::Conversion;
use s2s_common::template::{Encoding, Template};

use crate::signing::{sign, Secret};

/// Macros an affiliate postback (URL, body, header values) may use.
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
    "amount_currency",
    "payout",
    "payout_delta",
    "currency",
    "status",
    "previous_status",
    "version",
    "suspicious",
    "conversion_id",
    "timestamp",
    "event_time",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    Get,
    Post,
    Put,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
        }
    }
}

/// How a body template's values are encoded, and the content type it is sent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyFormat {
    /// Values JSON-escaped inside the template's strings; `application/json`.
    Json,
    /// Values URL-encoded; `application/x-www-form-urlencoded`.
    Form,
}

impl BodyFormat {
    fn encoding(self) -> Encoding {
        match self {
            BodyFormat::Json => Encoding::JsonString,
            BodyFormat::Form => Encoding::UrlComponent,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            BodyFormat::Json => "application/json",
            BodyFormat::Form => "application/x-www-form-urlencoded",
        }
    }
}

/// Which conversions an endpoint fires for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only this affiliate's conversions; `None`: a global postback.
    pub aff_id: Option<String>,
    pub offer_id: Option<String>,
    /// Empty: every event.
    pub events: Vec<String>,
    /// New conversions (version 1) with these statuses; empty: any.
    pub statuses: Vec<String>,
    /// Whether status updates (version > 1) are sent at all.
    pub send_updates: bool,
    /// Updates to these statuses; empty: any.
    pub update_statuses: Vec<String>,
    /// Whether conversions flagged `suspicious` are left out.
    pub exclude_suspicious: bool,
}

impl Filter {
    pub fn wants(&self, c: &Conversion) -> bool {
        let status_ok = if c.version <= 1 {
            self.statuses.is_empty() || self.statuses.contains(&c.status)
        } else {
            self.send_updates
                && (self.update_statuses.is_empty() || self.update_statuses.contains(&c.status))
        };
        self.aff_id.as_ref().is_none_or(|a| *a == c.aff_id)
            && self.offer_id.as_ref().is_none_or(|o| *o == c.offer_id)
            && (self.events.is_empty() || self.events.contains(&c.event))
            && !(self.exclude_suspicious && c.suspicious)
            && status_ok
    }
}

/// One configured outbound postback, compiled at start-up.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Unique; names the endpoint in metrics, the delivery log and the dead-letter topic.
    pub name: String,
    pub method: Method,
    pub url: Template,
    pub body: Option<(Template, BodyFormat)>,
    /// Header name → value template (values inserted as they are).
    pub headers: Vec<(String, Template)>,
    pub filter: Filter,
    /// Requests to this endpoint in flight at most.
    pub max_in_flight: usize,
    pub timeout: Duration,
    /// Signs each request per Standard Webhooks when set.
    pub secret: Option<Secret>,
    /// `false` (a postback disabled in the catalog): no new deliveries, and its pending
    /// ones wait.
    pub enabled: bool,
}

/// A request ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Endpoint {
    /// The request for `c`, attempt sent at `now_s` (Unix seconds): the rendered URL, body
    /// and headers, `webhook-id` always, and the Standard Webhooks timestamp and signature
    /// when a secret is set.
    pub fn request(&self, c: &Conversion, delivery_id: &str, now_s: i64) -> Request {
        let value = |m: &str| macro_value(c, m);
        let url = self.url.render(value, Encoding::UrlComponent);
        let mut headers: Vec<(String, String)> = Vec::with_capacity(self.headers.len() + 4);
        let mut body = Vec::new();
        if let Some((template, format)) = &self.body {
            body = template.render(value, format.encoding()).into_bytes();
            headers.push(("content-type".into(), format.content_type().into()));
        }
        for (name, template) in &self.headers {
            let v = template.render(value, Encoding::Raw);
            match headers
                .iter_mut()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
            {
                Some(existing) => existing.1 = v,
                None => headers.push((name.clone(), v)),
            }
        }
        headers.push(("webhook-id".into(), delivery_id.to_string()));
        if let Some(secret) = &self.secret {
            headers.push(("webhook-timestamp".into(), now_s.to_string()));
            headers.push((
                "webhook-signature".into(),
                sign(secret, delivery_id, now_s, &body),
            ));
        }
        Request {
            method: self.method,
            url,
            headers,
            body,
        }
    }
}

/// The value of macro `name` for `c` (`None`: empty). Money as decimal strings; the
/// payout's currency is `{currency}`, the operator's amount's `{amount_currency}`;
/// `{suspicious}` is 1 or 0; `{timestamp}` is the event time in Unix seconds, `{event_time}`
/// the same in RFC 3339 (UTC, milliseconds).
pub fn macro_value<'a>(c: &'a Conversion, name: &str) -> Option<Cow<'a, str>> {
    let b = |s: &'a String| Some(Cow::Borrowed(s.as_str()));
    let owned = |s: String| Some(Cow::Owned(s));
    match name {
        "click_id" => b(&c.click_id),
        "aff_id" => b(&c.aff_id),
        "offer_id" => b(&c.offer_id),
        "event" => b(&c.event),
        "txn_id" => c.txn_id.as_ref().and_then(b),
        "amount" => c.amount.and_then(|a| owned(a.to_string())),
        "amount_currency" => c.currency.as_ref().and_then(b),
        "payout" => owned(c.payout.to_string()),
        "payout_delta" => owned(c.payout_delta.to_string()),
        "currency" => b(&c.payout_currency),
        "status" => b(&c.status),
        "previous_status" => c.previous_status.as_ref().and_then(b),
        "version" => owned(c.version.to_string()),
        "suspicious" => Some(Cow::Borrowed(if c.suspicious { "1" } else { "0" })),
        "conversion_id" => b(&c.conversion_id),
        "timestamp" => owned(c.event_ts_ms.div_euclid(1000).to_string()),
        "event_time" => {
            let ms = u64::try_from(c.event_ts_ms).ok()?;
            let t = std::time::UNIX_EPOCH.checked_add(Duration::from_millis(ms))?;
            owned(humantime::format_rfc3339_millis(t).to_string())
        }
        sub => c.subs.get(sub).and_then(b),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rust_decimal::Decimal;

    /// The example conversion with values that need escaping and a fixed event time.
    pub(crate) fn conv() -> Conversion {
        Conversion {
            outcome_id: "o".into(),
            postback_id: "p".into(),
            offer_id: "7".into(),
            subs: [("sub1".to_string(), "a&b\"".to_string())].into(),
            txn_id: None,
            amount: Some(Decimal::new(1999, 2)),
            click_ts_ms: 0,
            event_ts_ms: 1_700_000_000_123,
            received_ts_ms: 1_700_000_000_123,
            attributed_at_ms: 0,
            ..s2s_common::fixtures::conversion("cv", "c 1")
        }
    }

    pub(crate) fn endpoint(url: &str) -> Endpoint {
        Endpoint {
            name: "e".into(),
            method: Method::Get,
            url: Template::parse(url, MACROS).expect("valid"),
            body: None,
            headers: vec![],
            filter: Filter::default(),
            max_in_flight: 4,
            timeout: Duration::from_secs(1),
            secret: None,
            enabled: true,
        }
    }

    #[test]
    fn renders_every_macro_url_encoded() {
        let e = endpoint("https://a/pb?c={click_id}&p={payout}&cur={currency}&s={sub1}&t={txn_id}&ts={timestamp}&amt={amount}&s9={sub9}&cv={conversion_id}&st={status}&ev={event}&o={offer_id}&a={aff_id}");
        let r = e.request(&conv(), "d1", 5);
        assert_eq!(
            r.url,
            "https://a/pb?c=c%201&p=50.00&cur=USD&s=a%26b%22&t=&ts=1700000000&amt=19.99&s9=&cv=cv&st=approved&ev=ftd&o=7&a=42"
        );
        assert_eq!(r.method, Method::Get);
        assert!(r.body.is_empty());
        assert_eq!(r.headers, [("webhook-id".to_string(), "d1".to_string())]);
    }

    #[test]
    fn json_and_form_bodies_escape_for_where_they_land() {
        let mut e = endpoint("https://a/pb");
        e.method = Method::Post;
        e.body = Some((
            Template::parse(
                r#"{"click":"{click_id}","sub1":"{sub1}","payout":{payout}}"#,
                MACROS,
            )
            .expect("valid"),
            BodyFormat::Json,
        ));
        let r = e.request(&conv(), "d1", 5);
        let body: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
        assert_eq!(body["sub1"], "a&b\"");
        assert_eq!(body["payout"], serde_json::json!(50.0));
        assert!(r
            .headers
            .contains(&("content-type".into(), "application/json".into())));

        e.body = Some((
            Template::parse("cid={click_id}&s={sub1}", MACROS).expect("valid"),
            BodyFormat::Form,
        ));
        let r = e.request(&conv(), "d1", 5);
        assert_eq!(String::from_utf8_lossy(&r.body), "cid=c%201&s=a%26b%22");
        let parsed: Vec<(String, String)> = form_urlencoded::parse(&r.body).into_owned().collect();
        assert_eq!(parsed[1], ("s".into(), "a&b\"".into()));
        assert!(r.headers.contains(&(
            "content-type".into(),
            "application/x-www-form-urlencoded".into()
        )));
    }

    #[test]
    fn headers_are_rendered_and_may_override_the_content_type() {
        let mut e = endpoint("https://a/pb");
        e.body = Some((
            Template::parse("{}", MACROS).expect("valid"),
            BodyFormat::Json,
        ));
        e.headers = vec![
            (
                "X-Affiliate".into(),
                Template::parse("{aff_id}", MACROS).expect("valid"),
            ),
            (
                "Content-Type".into(),
                Template::parse("application/vnd.x+json", MACROS).expect("valid"),
            ),
        ];
        let r = e.request(&conv(), "d1", 5);
        assert!(r.headers.contains(&("X-Affiliate".into(), "42".into())));
        let ct: Vec<_> = r
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("content-type"))
            .collect();
        assert_eq!(ct.len(), 1);
        assert_eq!(ct[0].1, "application/vnd.x+json");
    }

    #[test]
    fn signed_requests_carry_standard_webhooks_headers() {
        let mut e = endpoint("https://a/pb");
        e.method = Method::Post;
        e.body = Some((
            Template::parse(r#"{"c":"{click_id}"}"#, MACROS).expect("valid"),
            BodyFormat::Json,
        ));
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
        e.secret = Some(secret.clone());
        let r = e.request(&conv(), "d1", 1_700_000_000);
        let h = |n: &str| {
            r.headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(h("webhook-id").as_deref(), Some("d1"));
        assert_eq!(h("webhook-timestamp").as_deref(), Some("1700000000"));
        assert_eq!(
            h("webhook-signature"),
            Some(sign(&secret, "d1", 1_700_000_000, &r.body)),
            "over id, timestamp and the exact body sent"
        );
    }

    #[test]
    fn filters_new_conversions_and_updates() {
        let mut f = Filter::default();
        let mut c = conv();
        assert!(
            f.wants(&c),
            "global postback fires for every new conversion"
        );
        f.aff_id = Some("43".into());
        assert!(!f.wants(&c));
        f.aff_id = Some("42".into());
        f.events = vec!["registration".into()];
        assert!(!f.wants(&c));
        f.events = vec!["ftd".into()];
        f.statuses = vec!["approved".into()];
        assert!(f.wants(&c));
        f.offer_id = Some("8".into());
        assert!(!f.wants(&c));
        f.offer_id = None;

        c.version = 2;
        c.status = "reversed".into();
        assert!(!f.wants(&c), "updates only when asked for");
        f.send_updates = true;
        assert!(f.wants(&c), "any update status when none are listed");
        f.update_statuses = vec!["approved".into()];
        assert!(!f.wants(&c));
        f.update_statuses.push("reversed".into());
        assert!(f.wants(&c));

        c.suspicious = true;
        assert!(f.wants(&c), "suspicious conversions go out unless excluded");
        f.exclude_suspicious = true;
        assert!(!f.wants(&c));
        c.suspicious = false;
        assert!(f.wants(&c));
    }

    #[test]
    fn lifecycle_macros_name_version_status_delta_and_times() {
        let e = endpoint("https://a/pb?v={version}&st={status}&was={previous_status}&d={payout_delta}&sus={suspicious}&et={event_time}&amt={amount}+{amount_currency}&p={payout}+{currency}");
        let mut c = conv();
        assert_eq!(
            e.request(&c, "d", 5).url,
            "https://a/pb?v=1&st=approved&was=&d=50.00&sus=0&et=2023-11-14T22%3A13%3A20.123Z&amt=19.99+EUR&p=50.00+USD"
        );
        c.version = 2;
        c.status = "reversed".into();
        c.previous_status = Some("approved".into());
        c.payout = Decimal::ZERO;
        c.payout_delta = Decimal::new(-5000, 2);
        c.suspicious = true;
        c.currency = None;
        assert_eq!(
            e.request(&c, "d", 5).url,
            "https://a/pb?v=2&st=reversed&was=approved&d=-50.00&sus=1&et=2023-11-14T22%3A13%3A20.123Z&amt=19.99+&p=0+USD"
        );
        c.event_ts_ms = -1;
        assert_eq!(macro_value(&c, "event_time"), None, "before 1970: empty");
        assert_eq!(macro_value(&c, "timestamp").as_deref(), Some("-1"));
    }
}
