//! Request parameters: strict `application/x-www-form-urlencoded` decoding (query strings
//! and form bodies) and flat JSON objects, both into ordered `(name, value)` pairs.
//!
//! Why not `form_urlencoded::parse`: it replaces invalid UTF-8 with U+FFFD and keeps a
//! malformed escape (`%G1`) as it is, which would store a corrupted click ID or sub ID
//! without telling anyone. Here bad UTF-8, malformed escapes, too many parameters and
//! over-long names or values are rejected with a clear error instead.
//!
//! Ambiguous input is refused, not guessed: a field read twice — given twice, or as
//! itself and through an alias, in a query, a form or a JSON object alike — is a 400
//! `duplicate_parameter` naming it ([`take`]). JSON objects keep every member for that
//! ([`Loose`]): `serde_json::Value` would keep the last of a name silently.

use axum::http::StatusCode;
use percent_encoding::percent_decode;

use crate::error::ApiError;

pub const MAX_PARAMS: usize = 64;
pub const MAX_NAME_LEN: usize = 64;
pub const MAX_VALUE_LEN: usize = 2048;

pub type Pairs = Vec<(String, String)>;

/// Decodes `a=1&b=x+y&c=%C3%A9`. Empty segments are skipped.
pub fn parse_urlencoded(input: &[u8]) -> Result<Pairs, ApiError> {
    let mut pairs = Vec::new();
    for segment in input.split(|b| *b == b'&').filter(|s| !s.is_empty()) {
        let (name, value) = match segment.iter().position(|b| *b == b'=') {
            Some(i) => (&segment[..i], &segment[i + 1..]),
            None => (segment, &b""[..]),
        };
        let name = decode_component(name)?;
        let value = decode_component(value).map_err(|e| e.field(name.clone()))?;
        push_checked(&mut pairs, name, value)?;
    }
    Ok(pairs)
}

/// A flat JSON object: string, number and boolean values; `null` means absent.
pub fn parse_json_object(body: &[u8]) -> Result<Pairs, ApiError> {
    let value: Loose = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("body is not valid JSON: {e}"),
        )
    })?;
    flatten_json_object(value)
}

/// A JSON value whose objects keep every member in order, a name given twice included.
#[derive(Debug, Clone, PartialEq)]
pub enum Loose {
    Object(Vec<(String, Member)>),
    Array(Vec<Loose>),
    Other(serde_json::Value),
}

/// An object member's value as sent: a string's text, a number's exact value as text
/// (never through a float: `12345678901234567.89` stays that; see [`plain_number`]),
/// `true`/`false`, null, or something nested.
#[derive(Debug, Clone, PartialEq)]
pub enum Member {
    Text(String),
    Null,
    Nested,
}

impl Member {
    fn of(raw: &serde_json::value::RawValue) -> Result<Self, serde_json::Error> {
        let text = raw.get();
        Ok(match text.as_bytes().first() {
            Some(b'"') => Member::Text(serde_json::from_str(text)?),
            Some(b'{' | b'[') => Member::Nested,
            Some(b'n') => Member::Null,
            _ if text.contains(['e', 'E']) => Member::Text(plain_number(text)),
            _ => Member::Text(text.to_string()),
        })
    }
}

/// A JSON number in exponent form (`1e3`, `5e-08`, as JavaScript writes very large and
/// very small ones) as the plain decimal of its exact value (`1000`, `0.00000005`),
/// computed in decimal, never through a float. One beyond 28 significant digits stays
/// as written, and a field that wants a decimal refuses it.
fn plain_number(literal: &str) -> String {
    match rust_decimal::Decimal::from_scientific(literal) {
        Ok(d) => d.to_string(),
        Err(_) => literal.to_string(),
    }
}

impl<'de> serde::Deserialize<'de> for Loose {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Loose;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Loose, A::Error> {
                let mut members = Vec::new();
                while let Some((name, raw)) =
                    m.next_entry::<String, Box<serde_json::value::RawValue>>()?
                {
                    let member = Member::of(&raw).map_err(serde::de::Error::custom)?;
                    members.push((name, member));
                }
                Ok(Loose::Object(members))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut s: A) -> Result<Loose, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = s.next_element::<Loose>()? {
                    items.push(item);
                }
                Ok(Loose::Array(items))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Loose, E> {
                Ok(Loose::Other(v.into()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Loose, E> {
                Ok(Loose::Other(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Loose, E> {
                Ok(Loose::Other(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Loose, E> {
                Ok(Loose::Other(v.into()))
            }
            fn visit_str<E>(self, v: &str) -> Result<Loose, E> {
                Ok(Loose::Other(v.into()))
            }
            fn visit_unit<E>(self) -> Result<Loose, E> {
                Ok(Loose::Other(serde_json::Value::Null))
            }
        }
        d.deserialize_any(V)
    }
}

/// The pairs of one flat JSON object.
pub fn flatten_json_object(value: Loose) -> Result<Pairs, ApiError> {
    let Loose::Object(members) = value else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "each record must be a JSON object",
        ));
    };
    let mut pairs = Vec::new();
    for (name, v) in members {
        let value = match v {
            Member::Null => continue,
            Member::Text(s) => s,
            Member::Nested => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_json",
                    format!("field '{name}' must be a string, number or boolean"),
                )
                .field(name))
            }
        };
        push_checked(&mut pairs, name, value)?;
    }
    Ok(pairs)
}

fn decode_component(raw: &[u8]) -> Result<String, ApiError> {
    // Every `%` starts an escape of two hex digits: `%G1` or a trailing `%` is refused,
    // not kept as it is.
    let malformed = raw.iter().enumerate().any(|(i, b)| {
        *b == b'%'
            && !(raw.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && raw.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    });
    if malformed {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_percent_encoding",
            "a '%' must be followed by two hexadecimal digits (%20); encode a literal '%' as %25",
        ));
    }
    let plus_as_space: Vec<u8> = raw
        .iter()
        .map(|b| if *b == b'+' { b' ' } else { *b })
        .collect();
    percent_decode(&plus_as_space)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_utf8",
                "a parameter is not valid UTF-8 after percent-decoding",
            )
        })
}

fn push_checked(pairs: &mut Pairs, name: String, value: String) -> Result<(), ApiError> {
    if pairs.len() >= MAX_PARAMS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "too_many_parameters",
            format!("at most {MAX_PARAMS} parameters are accepted"),
        ));
    }
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_parameter_name",
            format!("parameter names must be 1 to {MAX_NAME_LEN} bytes"),
        ));
    }
    if value.len() > MAX_VALUE_LEN {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "value_too_long",
            format!("parameter '{name}' is longer than {MAX_VALUE_LEN} bytes"),
        )
        .field(name));
    }
    pairs.push((name, value));
    Ok(())
}

/// Removes and returns the value of `name`; a name given more than once (itself twice,
/// or itself and an alias of it) is refused, naming it.
pub fn take(pairs: &mut Pairs, name: &str) -> Result<Option<String>, ApiError> {
    let mut found = pairs.iter().enumerate().filter(|(_, (n, _))| n == name);
    let Some((first, _)) = found.next() else {
        return Ok(None);
    };
    if found.next().is_some() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "duplicate_parameter",
            format!(
                "'{name}' is given more than once (twice, or as itself and an alias): \
                 give it once"
            ),
        )
        .field(name.to_string()));
    }
    Ok(Some(pairs.remove(first).1))
}

/// Like [`take`], but an empty value counts as absent.
pub fn take_non_empty(pairs: &mut Pairs, name: &str) -> Result<Option<String>, ApiError> {
    Ok(take(pairs, name)?.filter(|v| !v.trim().is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_plus_percent_and_keeps_order() {
        let p = parse_urlencoded(b"b=x+y&a=%C3%A9&&c&d=").expect("valid");
        let expect: Pairs = vec![
            ("b".into(), "x y".into()),
            ("a".into(), "é".into()),
            ("c".into(), String::new()),
            ("d".into(), String::new()),
        ];
        assert_eq!(p, expect);
    }

    #[test]
    fn rejects_bad_utf8_naming_the_field() {
        let e = parse_urlencoded(b"click_id=%FF%FE").expect_err("error");
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("invalid_utf8", Some("click_id"))
        );
    }

    #[test]
    fn bounds_count_and_length() {
        let many = (0..=MAX_PARAMS)
            .map(|i| format!("p{i}=1"))
            .collect::<Vec<_>>();
        let e = parse_urlencoded(many.join("&").as_bytes()).expect_err("error");
        assert_eq!(e.code, "too_many_parameters");
        let long = format!("sub1={}", "x".repeat(MAX_VALUE_LEN + 1));
        let e = parse_urlencoded(long.as_bytes()).expect_err("error");
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("value_too_long", Some("sub1"))
        );
    }

    #[test]
    fn json_objects_flatten_scalars_only() {
        let p = parse_json_object(br#"{"click_id":"c1","amount":12.5,"x":null,"ok":true}"#)
            .expect("valid");
        assert_eq!(p.len(), 3);
        assert!(p.contains(&("amount".into(), "12.5".into())));
        // Numbers as written, never through a float (which would round the first two).
        let p = parse_json_object(
            br#"{"amount":12345678901234567.89,"click_id":123456789012345678901234,"z":-0.0,
                 "t":1e3,"u":5E-08,"v":2.5e+1,"w":4.6923498242834516e-99}"#,
        )
        .expect("valid");
        assert_eq!(
            p,
            [
                ("amount", "12345678901234567.89"),
                ("click_id", "123456789012345678901234"),
                ("z", "-0.0"),
                // Exponent forms: their exact value, or as written when beyond a decimal.
                ("t", "1000"),
                ("u", "0.00000005"),
                ("v", "25"),
                ("w", "4.6923498242834516e-99"),
            ]
            .map(|(n, v)| (n.to_string(), v.to_string()))
        );
        let e = parse_json_object(br#"{"a":{"b":1}}"#).expect_err("error");
        assert_eq!(e.field.as_deref(), Some("a"));
        assert!(parse_json_object(b"[1]").is_err());
    }

    #[test]
    fn a_field_given_twice_is_refused_naming_it() {
        let mut p = parse_urlencoded(b"a=1&b=2&a=3").expect("valid");
        let e = take(&mut p, "a").expect_err("ambiguous");
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("duplicate_parameter", Some("a"))
        );
        assert_eq!(take(&mut p, "b").expect("once"), Some("2".into()));
        assert_eq!(take(&mut p, "c").expect("absent"), None);
        assert_eq!(
            take_non_empty(&mut parse_urlencoded(b"a=").expect("v"), "a").expect("once"),
            None
        );
        let mut j = parse_json_object(br#"{"click_id":"a","click_id":"b"}"#).expect("JSON");
        let e = take(&mut j, "click_id").expect_err("a JSON object's duplicate too");
        assert_eq!(e.code, "duplicate_parameter");
    }

    #[test]
    fn malformed_escapes_are_refused() {
        for bad in [
            &b"click_id=%G1"[..],
            b"click_id=ab%",
            b"click_id=%4",
            b"c%zz=1",
        ] {
            let e = parse_urlencoded(bad).expect_err("malformed");
            assert_eq!(
                e.code,
                "invalid_percent_encoding",
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse_urlencoded(b"v=100%25").expect("a literal %"),
            vec![("v".to_string(), "100%".to_string())]
        );
    }
}
