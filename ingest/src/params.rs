//! Request parameters: strict `application/x-www-form-urlencoded` decoding (query strings
//! and form bodies) and flat JSON objects, both into ordered `(name, value)` pairs.
//!
//! Why not `form_urlencoded::parse`: it replaces invalid UTF-8 with U+FFFD, which would
//! store a corrupted click ID or sub ID without telling anyone. Here bad UTF-8, too many
//! parameters and over-long names or values are rejected with a clear error instead.

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
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("body is not valid JSON: {e}"),
        )
    })?;
    flatten_json_object(value)
}

/// The pairs of one flat JSON object.
pub fn flatten_json_object(value: serde_json::Value) -> Result<Pairs, ApiError> {
    let serde_json::Value::Object(map) = value else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "each record must be a JSON object",
        ));
    };
    let mut pairs = Vec::new();
    for (name, v) in map {
        let value = match v {
            serde_json::Value::Null => continue,
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            _ => {
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

/// Removes and returns the first value of `name`; later duplicates are dropped.
pub fn take(pairs: &mut Pairs, name: &str) -> Option<String> {
    let first = pairs.iter().position(|(n, _)| n == name)?;
    let (_, v) = pairs.remove(first);
    pairs.retain(|(n, _)| n != name);
    Some(v)
}

/// Like [`take`], but an empty value counts as absent.
pub fn take_non_empty(pairs: &mut Pairs, name: &str) -> Option<String> {
    take(pairs, name).filter(|v| !v.trim().is_empty())
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
        let e = parse_json_object(br#"{"a":{"b":1}}"#).expect_err("error");
        assert_eq!(e.field.as_deref(), Some("a"));
        assert!(parse_json_object(b"[1]").is_err());
    }

    #[test]
    fn take_returns_first_and_drops_duplicates() {
        let mut p = parse_urlencoded(b"a=1&b=2&a=3").expect("valid");
        assert_eq!(take(&mut p, "a").as_deref(), Some("1"));
        assert_eq!(p, vec![("b".to_string(), "2".to_string())]);
        assert_eq!(
            take_non_empty(&mut parse_urlencoded(b"a=").expect("v"), "a"),
            None
        );
    }
}
