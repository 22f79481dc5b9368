//! `POST /api/v1/catalog/postback/{id}/test`: the postback's Test button. A sample
//! conversion it wants goes through its real templates and signing
//! ([`s2s_delivery::sample`]) to its URL, marked as a test and written to no topic (not
//! a conversion, not counted, not paid); the answer shows the exact request and what the
//! endpoint answered. Sent from the console instance asked, with the postback's own
//! timeout (delivery's default where it sets none), following no redirect, as delivery
//! sends.

use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use s2s_catalog::documents::Role;
use s2s_common::pipeline::ServiceConfig as _;
use s2s_delivery::config::DeliveryConfig;
use s2s_delivery::sample;
use serde_json::{json, Value};

use super::catalog::{key_of, missing};
use super::{ApiError, Operator, Shared};

/// The endpoint's answer body is shown up to this size.
const BODY_SHOWN: usize = 16 * 1024;

pub async fn test(
    State(s): State<Shared>,
    Extension(op): Extension<Operator>,
    Path((kind, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    op.may(Role::Operator, "testing a postback")?;
    let key = key_of(&kind, &id)?;
    if key.kind() != s2s_catalog::Kind::Postback {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "only postbacks are tested",
        ));
    }
    let catalog = s.catalog.catalog.catalog();
    let entry = catalog.get(&key).ok_or_else(|| missing(&key))?;
    let unusable = |e: String| {
        ApiError::new(
            StatusCode::CONFLICT,
            "postback_unusable",
            format!("the postback cannot be sent to: {e}"),
        )
    };
    let defaults = DeliveryConfig::defaults().map_err(|e| unusable(e.to_string()))?;
    let endpoint = s2s_delivery::catalog::endpoint(
        &defaults,
        s.catalog.secret_key.as_ref(),
        &id,
        &entry.stored.document,
    )
    .map_err(unusable)?;
    let now = s2s_common::now_ms();
    let conversion = sample::conversion(&endpoint.filter, &s2s_common::ids::new_ulid(), now);
    let request = sample::request(&endpoint, &conversion, now);
    let shown_request = json!({
        "method": request.method.as_str(),
        "url": request.url,
        "headers": request.headers,
        "body": String::from_utf8_lossy(&request.body),
    });
    let started = Instant::now();
    let answer = send(&endpoint, request).await;
    let took_ms = started.elapsed().as_millis();
    // One test, one outcome: a line and a count.
    let result = if answer.is_ok() {
        "answered"
    } else {
        "no_answer"
    };
    s.metrics.postback_tests.with_label_values(&[result]).inc();
    tracing::info!(postback = %id, by = %op.name, result, status = ?answer.as_ref().ok().map(|a| a.0),
        took_ms, "postback tested");
    let (response, error) = match answer {
        Ok((status, headers, body, truncated)) => (
            json!({ "status": status, "headers": headers, "body": body, "truncated": truncated }),
            Value::Null,
        ),
        Err(e) => (Value::Null, json!(e)),
    };
    Ok(Json(json!({
        "test": true,
        "postback": id,
        "postback_revision": entry.revision,
        "conversion": conversion,
        "request": shown_request,
        "response": response,
        "error": error,
        "duration_ms": took_ms,
    })))
}

type Answer = (u16, Vec<(String, String)>, String, bool);

/// Sends the request as delivery would (its timeout, no redirects); the answer's status,
/// headers and the start of its body.
async fn send(
    endpoint: &s2s_delivery::endpoint::Endpoint,
    request: s2s_delivery::endpoint::Request,
) -> Result<Answer, String> {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(endpoint.timeout)
        .build()
        .map_err(|e| format!("http client: {e}"))?;
    let method = reqwest::Method::from_bytes(request.method.as_str().as_bytes())
        .map_err(|e| e.to_string())?;
    let mut req = client.request(method, &request.url);
    for (name, value) in &request.headers {
        req = req.header(name.as_str(), value.as_str());
    }
    if !request.body.is_empty() {
        req = req.body(request.body);
    }
    let mut resp = req.send().await.map_err(|e| describe(&e))?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let mut body = Vec::new();
    let mut truncated = false;
    while let Some(chunk) = resp.chunk().await.map_err(|e| describe(&e))? {
        let room = BODY_SHOWN - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            truncated = true;
            break;
        }
        body.extend_from_slice(&chunk);
    }
    Ok((
        status,
        headers,
        String::from_utf8_lossy(&body).into_owned(),
        truncated,
    ))
}

/// A transport error with its causes (reqwest's own message is often just "error sending
/// request").
fn describe(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    if e.is_timeout() {
        out.push_str(" (timed out)");
    }
    out
}
