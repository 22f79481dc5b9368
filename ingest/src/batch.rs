//! Batch bodies for `POST /v1/clicks` and `POST /v1/postbacks`: a JSON object, a JSON
//! array of objects, or NDJSON (one object per line). Each record is parsed on its own, so
//! one bad record is reported without failing the others.

use axum::http::StatusCode;

use crate::error::ApiError;
use crate::params::{flatten_json_object, Loose, Pairs};

/// Most records accepted in one request.
pub const MAX_BATCH_RECORDS: usize = 1000;

/// Splits a batch body into records, each parsed into pairs or an error.
pub fn parse_batch(
    content_type: &str,
    body: &[u8],
) -> Result<Vec<Result<Pairs, ApiError>>, ApiError> {
    let text = std::str::from_utf8(body).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_utf8",
            "body is not valid UTF-8",
        )
    })?;
    let trimmed = text.trim_start();
    let records: Vec<Result<Pairs, ApiError>> = if content_type == "application/x-ndjson"
        || (!trimmed.starts_with('[') && trimmed.trim_end().contains('\n'))
    {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                serde_json::from_str::<Loose>(line)
                    .map_err(|e| invalid_json(&e.to_string()))
                    .and_then(flatten_json_object)
            })
            .collect()
    } else {
        match serde_json::from_str::<Loose>(text).map_err(|e| invalid_json(&e.to_string()))? {
            Loose::Array(items) => items.into_iter().map(flatten_json_object).collect(),
            obj @ Loose::Object(_) => vec![flatten_json_object(obj)],
            _ => {
                return Err(invalid_json(
                    "body must be a JSON object, an array of objects, or NDJSON",
                ))
            }
        }
    };
    if records.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "empty_batch",
            "the batch holds no records",
        ));
    }
    if records.len() > MAX_BATCH_RECORDS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_records",
            format!("at most {MAX_BATCH_RECORDS} records per request"),
        ));
    }
    Ok(records)
}

fn invalid_json(detail: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_json",
        format!("body is not valid JSON: {detail}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_array_and_ndjson() {
        assert_eq!(
            parse_batch("application/json", br#"{"a":"1"}"#)
                .expect("ok")
                .len(),
            1
        );
        let arr = parse_batch("application/json", br#"[{"a":"1"},{"b":2},3]"#).expect("ok");
        assert_eq!(arr.len(), 3);
        assert!(arr[0].is_ok() && arr[1].is_ok());
        assert_eq!(
            arr[2].as_ref().expect_err("not an object").code,
            "invalid_json"
        );
        let nd = parse_batch(
            "application/x-ndjson",
            b"{\"a\":\"1\"}\n\nnot json\n{\"b\":\"2\"}\n",
        )
        .expect("ok");
        assert_eq!(nd.len(), 3);
        assert!(
            nd[1].is_err() && nd[2].is_ok(),
            "a bad line does not spoil the others"
        );
        let sniffed = parse_batch("application/json", b"{\"a\":\"1\"}\n{\"b\":\"2\"}").expect("ok");
        assert_eq!(
            sniffed.len(),
            2,
            "NDJSON recognised without its content type"
        );
    }

    #[test]
    fn limits_and_garbage() {
        assert_eq!(
            parse_batch("application/json", b"[]")
                .expect_err("empty")
                .code,
            "empty_batch"
        );
        assert_eq!(
            parse_batch("application/json", b"\"x\"")
                .expect_err("scalar")
                .code,
            "invalid_json"
        );
        assert_eq!(
            parse_batch("application/json", b"\xff")
                .expect_err("utf8")
                .code,
            "invalid_utf8"
        );
        let many = format!("[{}]", vec!["{}"; MAX_BATCH_RECORDS + 1].join(","));
        let e = parse_batch("application/json", many.as_bytes()).expect_err("too many");
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
    }
}
