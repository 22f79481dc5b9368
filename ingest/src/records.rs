//! Turning validated request parameters into wire records: pure functions, no I/O, so
//! every rule (required fields, allowed values, money and currency formats, sub IDs,
//! redirect macros) is unit-tested here.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::str::FromStr;

use axum::http::StatusCode;
use rust_decimal::Decimal;
use s2s_common::contract::{Click, Params, Postback, SCHEMA_VERSION, SUB_ID_KEYS};
use s2s_common::template::{Encoding, Template};

use crate::config::PostbackRules;
use crate::error::ApiError;
use crate::params::{take_non_empty, Pairs};

/// What the HTTP layer knows about the caller.
#[derive(Debug, Clone, Default)]
pub struct RequestMeta {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub referrer: Option<String>,
}

/// Longest click ID accepted (operators may send IDs minted by other trackers).
pub const MAX_CLICK_ID_LEN: usize = 128;

/// The offer's redirect template, or 404 `unknown_offer`.
fn known_offer<'o>(
    offers: &'o BTreeMap<String, Template>,
    offer_id: &str,
) -> Result<&'o Template, ApiError> {
    offers.get(offer_id).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_offer",
            format!("offer '{offer_id}' is not configured"),
        )
        .field("offer_id")
    })
}

/// A click from `/click` parameters, and the offer URL to redirect to.
pub fn build_click(
    mut pairs: Pairs,
    offers: &BTreeMap<String, Template>,
    meta: RequestMeta,
    click_id: String,
    now_ms: i64,
) -> Result<(Click, String), ApiError> {
    let offer_id = take_non_empty(&mut pairs, "offer_id")?.ok_or(ApiError::missing("offer_id"))?;
    let template = known_offer(offers, &offer_id)?;
    let click = click_record(pairs, offer_id, click_id, meta, now_ms)?;
    let location = template.render(|m| click_macro(&click, m), Encoding::UrlComponent);
    Ok((click, location))
}

/// A click whose ID the operator minted (`POST /v1/clicks`), for a configured offer.
/// Optional fields `ip`, `user_agent`, `referrer` describe the visitor; `ts_ms` is when
/// the click happened (default: now; at most 5 minutes in the future).
pub fn build_operator_click(
    mut pairs: Pairs,
    offers: &BTreeMap<String, Template>,
    now_ms: i64,
) -> Result<Click, ApiError> {
    let click_id = valid_click_id(take_non_empty(&mut pairs, "click_id")?)?;
    let offer_id = take_non_empty(&mut pairs, "offer_id")?.ok_or(ApiError::missing("offer_id"))?;
    known_offer(offers, &offer_id)?;
    let meta = RequestMeta {
        ip: take_non_empty(&mut pairs, "ip")?,
        user_agent: take_non_empty(&mut pairs, "user_agent")?,
        referrer: take_non_empty(&mut pairs, "referrer")?,
    };
    let ts = match take_non_empty(&mut pairs, "ts_ms")? {
        None => now_ms,
        Some(raw) => match raw.parse::<i64>() {
            Ok(ts) if ts > 0 && ts <= now_ms + 300_000 => ts,
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_value",
                    "ts_ms must be milliseconds since the Unix epoch, not in the future",
                )
                .field("ts_ms"))
            }
        },
    };
    click_record(pairs, offer_id, click_id, meta, ts)
}

fn click_record(
    mut pairs: Pairs,
    offer_id: String,
    click_id: String,
    meta: RequestMeta,
    ts_ms: i64,
) -> Result<Click, ApiError> {
    let aff_id = take_non_empty(&mut pairs, "aff_id")?.ok_or(ApiError::missing("aff_id"))?;
    if aff_id.len() > 64
        || !aff_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_value",
            "aff_id must be 1 to 64 characters of A-Z, a-z, 0-9, '-', '_' or '.'",
        )
        .field("aff_id"));
    }
    let mut subs = Params::new();
    for key in SUB_ID_KEYS {
        if let Some(v) = take_non_empty(&mut pairs, key)? {
            subs.insert(key.to_string(), v);
        }
    }
    Ok(Click {
        schema_version: SCHEMA_VERSION,
        click_id,
        offer_id,
        aff_id,
        subs,
        params: pairs.into_iter().collect(),
        ip: meta.ip,
        user_agent: meta.user_agent,
        referrer: meta.referrer,
        ts_ms,
    })
}

/// A click ID: 1 to [`MAX_CLICK_ID_LEN`] characters, no spaces or control characters.
fn valid_click_id(raw: Option<String>) -> Result<String, ApiError> {
    let click_id = raw.ok_or(ApiError::missing("click_id"))?;
    if click_id.len() > MAX_CLICK_ID_LEN
        || click_id
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_value",
            format!("click_id must be 1 to {MAX_CLICK_ID_LEN} characters without spaces"),
        )
        .field("click_id"));
    }
    Ok(click_id)
}

fn click_macro<'a>(click: &'a Click, name: &str) -> Option<Cow<'a, str>> {
    let v = match name {
        "click_id" => &click.click_id,
        "aff_id" => &click.aff_id,
        "offer_id" => &click.offer_id,
        sub => click.subs.get(sub)?,
    };
    Some(Cow::Borrowed(v.as_str()))
}

/// A postback from its parameters (query string, form or JSON body).
pub fn build_postback(
    mut pairs: Pairs,
    rules: &PostbackRules,
    source: Option<&str>,
    meta: RequestMeta,
    postback_id: String,
    now_ms: i64,
) -> Result<Postback, ApiError> {
    let click_id = valid_click_id(take_non_empty(&mut pairs, "click_id")?)?;
    let event = take_non_empty(&mut pairs, "event")?.ok_or(ApiError::missing("event"))?;
    let event = one_of("event", event, &rules.events)?;
    let status = match take_non_empty(&mut pairs, "status")? {
        Some(s) => one_of("status", s, &rules.statuses)?,
        None => rules.default_status.clone(),
    };
    let txn_id = take_non_empty(&mut pairs, "txn_id")?;
    let amount = take_non_empty(&mut pairs, "amount")?
        .map(|a| parse_amount(&a))
        .transpose()?;
    let currency = take_non_empty(&mut pairs, "currency")?
        .map(|c| parse_currency(&c))
        .transpose()?;
    let event_time_ms = take_non_empty(&mut pairs, "event_time")?
        .map(|t| parse_event_time(&t, rules, now_ms))
        .transpose()?;
    Ok(Postback {
        schema_version: SCHEMA_VERSION,
        postback_id,
        click_id,
        event,
        txn_id,
        amount,
        currency,
        status,
        source: source.map(str::to_string),
        params: pairs.into_iter().collect(),
        ip: meta.ip,
        ts_ms: now_ms,
        event_time_ms,
        trust: Default::default(),
    })
}

/// Digits of an `event_time` in epoch milliseconds at most (the year 318 857): more is
/// no time, and the document's grammar says so.
const MAX_EPOCH_MS_DIGITS: usize = 16;

/// An operator's `event_time`: epoch milliseconds (1 to 16 digits) or RFC 3339 (any
/// offset), at most `max_event_time_skew` after `now_ms` and `max_event_time_age` before it.
pub fn parse_event_time(raw: &str, rules: &PostbackRules, now_ms: i64) -> Result<i64, ApiError> {
    let raw = raw.trim();
    let digits = !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit());
    let ms = if digits && raw.len() <= MAX_EPOCH_MS_DIGITS {
        raw.parse::<i64>().ok()
    } else if digits {
        None
    } else {
        time::OffsetDateTime::parse(raw, &time::format_description::well_known::Rfc3339)
            .ok()
            .and_then(|t| i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok())
    };
    let Some(ms) = ms else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_event_time",
            "event_time must be milliseconds since the Unix epoch or an RFC 3339 time such \
             as 2026-12-02T10:15:00+01:00",
        )
        .field("event_time"));
    };
    let to_ms = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let skew = to_ms(rules.max_event_time_skew);
    let age = to_ms(rules.max_event_time_age);
    let out_of_range = |detail: String| {
        Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "event_time_out_of_range",
            detail,
        )
        .field("event_time"))
    };
    if ms > now_ms.saturating_add(skew) {
        return out_of_range(format!(
            "event_time {raw} lies {} s in the future; at most {} s are allowed",
            (ms - now_ms) / 1000,
            skew / 1000
        ));
    }
    if ms < now_ms.saturating_sub(age) {
        return out_of_range(format!(
            "event_time {raw} lies {} s in the past; at most {} s (the longest attribution \
             window) are allowed",
            now_ms.saturating_sub(ms) / 1000,
            age / 1000
        ));
    }
    Ok(ms)
}

fn one_of(field: &str, value: String, allowed: &[String]) -> Result<String, ApiError> {
    let lower = value.to_ascii_lowercase();
    if allowed.contains(&lower) {
        Ok(lower)
    } else {
        Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_value",
            format!(
                "{field} '{value}' is not allowed; allowed: {}",
                allowed.join(", ")
            ),
        )
        .field(field))
    }
}

/// A non-negative decimal with at most 8 fractional digits, in one grammar: digits,
/// optionally a `.` and 1 to 8 more digits (`12`, `12.50`). No sign, exponent, leading or
/// trailing `.`, or spaces: `1e3`, `+5`, `.5` and ` 5 ` are refused, not guessed. (A
/// JSON number is its value: `12.5` reads as `12.5`.) Floats are never involved.
pub fn parse_amount(raw: &str) -> Result<Decimal, ApiError> {
    let bad = |msg: &str| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_amount", msg.to_string()).field("amount")
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (unsigned, negative) = match raw.strip_prefix('-') {
        Some(rest) => (rest, true),
        None => (raw, false),
    };
    let plain = match unsigned.split_once('.') {
        Some((int, frac)) => digits(int) && digits(frac),
        None => digits(unsigned),
    };
    if !plain {
        return Err(bad(
            "amount must be a plain decimal: digits, optionally '.' and more digits (12.50); \
             no sign, exponent or spaces",
        ));
    }
    let d = Decimal::from_str(raw).map_err(|_| bad("amount is too large"))?;
    if negative && !d.is_zero() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_amount",
            "amount must not be negative",
        )
        .field("amount"));
    }
    if d.scale() > 8 {
        return Err(bad("amount has more than 8 decimal places"));
    }
    Ok(d.normalize())
}

/// A three-letter ISO 4217 code, returned upper case.
pub fn parse_currency(raw: &str) -> Result<String, ApiError> {
    let c = raw.trim().to_ascii_uppercase();
    if c.len() == 3 && c.chars().all(|ch| ch.is_ascii_uppercase()) {
        Ok(c)
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_currency",
            "currency must be a three-letter ISO 4217 code such as EUR",
        )
        .field("currency"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::offer_macros;
    use crate::params::parse_urlencoded;

    fn offers() -> BTreeMap<String, Template> {
        let t = Template::parse(
            "https://op.example/land?cid={click_id}&a={aff_id}&s={sub2}",
            &offer_macros(),
        )
        .expect("valid");
        [("7".to_string(), t)].into()
    }

    fn rules() -> PostbackRules {
        PostbackRules {
            events: vec!["registration".into(), "ftd".into()],
            statuses: vec!["pending".into(), "approved".into()],
            default_status: "approved".into(),
            max_event_time_skew: std::time::Duration::from_secs(300),
            max_event_time_age: std::time::Duration::from_secs(30 * 86_400),
        }
    }

    fn q(s: &str) -> Pairs {
        parse_urlencoded(s.as_bytes()).expect("valid query")
    }

    #[test]
    fn click_keeps_subs_and_extras_and_renders_location() {
        let (c, loc) = build_click(
            q("offer_id=7&aff_id=42&sub2=a b&utm_source=x"),
            &offers(),
            RequestMeta::default(),
            "01CLICK".into(),
            5,
        )
        .expect("valid click");
        assert_eq!(loc, "https://op.example/land?cid=01CLICK&a=42&s=a%20b");
        assert_eq!(c.subs.get("sub2").map(String::as_str), Some("a b"));
        assert_eq!(c.params.get("utm_source").map(String::as_str), Some("x"));
        assert_eq!(c.ts_ms, 5);
    }

    #[test]
    fn click_errors() {
        let e = |s: &str| {
            build_click(q(s), &offers(), RequestMeta::default(), "c".into(), 0).expect_err("error")
        };
        assert_eq!(e("aff_id=1").code, "missing_field");
        let unknown = e("offer_id=8&aff_id=1");
        assert_eq!(
            (unknown.status, unknown.code),
            (StatusCode::NOT_FOUND, "unknown_offer")
        );
        assert_eq!(e("offer_id=7").field.as_deref(), Some("aff_id"));
        assert_eq!(e("offer_id=7&aff_id=a%20b").code, "invalid_value");
    }

    #[test]
    fn postback_normalises_and_defaults() {
        let pb = build_postback(
            q("click_id=c1&event=FTD&amount=12.50&currency=eur&txn_id=t1&foo=bar"),
            &rules(),
            Some("acme"),
            RequestMeta::default(),
            "p1".into(),
            9,
        )
        .expect("valid");
        assert_eq!(pb.event, "ftd");
        assert_eq!(pb.status, "approved");
        assert_eq!(pb.amount, Some(Decimal::new(125, 1)));
        assert_eq!(pb.currency.as_deref(), Some("EUR"));
        assert_eq!(pb.params.get("foo").map(String::as_str), Some("bar"));
        assert_eq!(pb.source.as_deref(), Some("acme"));
    }

    #[test]
    fn operator_clicks_need_their_id_and_a_sane_time() {
        let c = build_operator_click(
            q("click_id=op-1&offer_id=7&aff_id=3&ts_ms=1000&ip=192.0.2.1&x=y"),
            &offers(),
            5_000,
        )
        .expect("valid");
        assert_eq!(
            (c.click_id.as_str(), c.ts_ms, c.ip.as_deref()),
            ("op-1", 1000, Some("192.0.2.1"))
        );
        assert_eq!(c.params.get("x").map(String::as_str), Some("y"));
        let e = |s: &str| build_operator_click(q(s), &offers(), 5_000).expect_err("error");
        assert_eq!(e("offer_id=7&aff_id=3").field.as_deref(), Some("click_id"));
        assert_eq!(e("click_id=a&aff_id=3").field.as_deref(), Some("offer_id"));
        let unknown = e("click_id=a&offer_id=9&aff_id=3");
        assert_eq!(
            (unknown.status, unknown.code, unknown.field.as_deref()),
            (StatusCode::NOT_FOUND, "unknown_offer", Some("offer_id")),
            "checked against the known offers like /click"
        );
        assert_eq!(
            e("click_id=a&offer_id=7&aff_id=3&ts_ms=999999999")
                .field
                .as_deref(),
            Some("ts_ms")
        );
        assert_eq!(
            e("click_id=a&offer_id=7&aff_id=3&ts_ms=-1")
                .field
                .as_deref(),
            Some("ts_ms")
        );
    }

    #[test]
    fn event_time_is_epoch_ms_or_rfc3339_within_skew_and_age() {
        let now = 1_764_670_500_000; // 2025-12-02T10:15:00Z
        let t = |s: &str| parse_event_time(s, &rules(), now);
        assert_eq!(t("1764670500000").ok(), Some(now));
        assert_eq!(t("2025-12-02T10:15:00Z").ok(), Some(now));
        assert_eq!(t("2025-12-02T11:15:00+01:00").ok(), Some(now), "offsets");
        assert_eq!(t("2025-12-02T10:14:59.250Z").ok(), Some(now - 750));
        assert_eq!(
            t("2025-12-02T10:20:00Z").ok(),
            Some(now + 300_000),
            "skew edge"
        );
        let e = |s: &str| t(s).expect_err("refused");
        let future = e("2025-12-02T10:20:01Z");
        assert_eq!(
            (future.status, future.code, future.field.as_deref()),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                "event_time_out_of_range",
                Some("event_time")
            )
        );
        assert!(future.message.contains("future"), "{}", future.message);
        assert_eq!(
            t(&(now - 30 * 86_400_000).to_string()).ok(),
            Some(now - 30 * 86_400_000)
        );
        let old = e(&(now - 30 * 86_400_000 - 1).to_string());
        assert!(old.message.contains("in the past"), "{}", old.message);
        let seconds = e("1764670500");
        assert_eq!(
            seconds.code, "event_time_out_of_range",
            "epoch seconds read as ms: 1970"
        );
        // 17 digits are no epoch milliseconds (the grammar stops at 16), whatever the window.
        for bad in [
            "yesterday",
            "2025-12-02",
            "-5",
            "2025-12-02T10:15:00",
            "10000000000000000",
            "2025-06-31T10:15:00Z",
        ] {
            let b = e(bad);
            assert_eq!(
                (b.status, b.code, b.field.as_deref()),
                (
                    StatusCode::BAD_REQUEST,
                    "invalid_event_time",
                    Some("event_time")
                ),
                "{bad}"
            );
        }
        let pb = build_postback(
            q("click_id=c&event=ftd&event_time=2025-12-02T10:00:00Z"),
            &rules(),
            None,
            RequestMeta::default(),
            "p".into(),
            now,
        )
        .expect("valid");
        assert_eq!((pb.event_time_ms, pb.ts_ms), (Some(now - 900_000), now));
        assert!(!pb.params.contains_key("event_time"));
    }

    #[test]
    fn postback_errors_name_field_and_allowed_values() {
        let e = |s: &str| {
            build_postback(q(s), &rules(), None, RequestMeta::default(), "p".into(), 0)
                .expect_err("error")
        };
        let unknown = e("click_id=c&event=sale");
        assert_eq!(unknown.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            unknown.message.contains("registration, ftd"),
            "{}",
            unknown.message
        );
        assert_eq!(
            e("click_id=c&event=ftd&status=paid").field.as_deref(),
            Some("status")
        );
        assert_eq!(e("event=ftd").code, "missing_field");
        assert_eq!(e("click_id=c&event=ftd&amount=abc").code, "invalid_amount");
        assert_eq!(e("click_id=c&event=ftd&amount=NaN").code, "invalid_amount");
        // One decimal grammar: no exponent, sign, bare point or spaces.
        for amount in [
            "1e3", "%2B5", ".5", "5.", "%205%20", "1.2.3", "0x10", "1_000",
        ] {
            let err = e(&format!("click_id=c&event=ftd&amount={amount}"));
            assert_eq!(
                (err.code, err.status),
                ("invalid_amount", StatusCode::BAD_REQUEST),
                "{amount}"
            );
        }
        for (amount, value) in [
            ("12", "12"),
            ("12.50", "12.5"),
            ("0.00000001", "0.00000001"),
        ] {
            let pb = build_postback(
                q(&format!("click_id=c1&event=ftd&amount={amount}")),
                &rules(),
                None,
                RequestMeta::default(),
                "p".into(),
                0,
            )
            .expect("a plain decimal");
            assert_eq!(pb.amount.map(|a| a.to_string()).as_deref(), Some(value));
        }
        // A field given twice, or with its alias, is ambiguous.
        let dup = e("click_id=c&event=ftd&amount=1&amount=2");
        assert_eq!(
            (dup.code, dup.field.as_deref()),
            ("duplicate_parameter", Some("amount"))
        );
        assert_eq!(
            e("click_id=c&event=ftd&amount=-1").status,
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            e("click_id=c&event=ftd&currency=EURO").code,
            "invalid_currency"
        );
        assert_eq!(
            e("click_id=a%20b&event=ftd").field.as_deref(),
            Some("click_id")
        );
    }
}
