//! `POST /api/v1/catalog/postback/{id}/backfills`: sends a postback the conversions it
//! would have been sent since a given time ([`crate::backfill`]); the `GET`s show how far
//! each backfill has come. Backfills run on the catalog's writer, where their progress is
//! kept: another instance forwards these requests there.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use s2s_catalog::documents::Role;
use s2s_catalog::Kind;
use serde::Deserialize;
use serde_json::json;

use super::catalog::{key_of, missing, to_writer, writer_silent};
use super::{ApiError, Operator, Shared};
use crate::backfill::Request;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Body {
    /// Conversions attributed at or after: RFC 3339, or a duration ago (`7d`).
    since: String,
    /// … and before (default: up to the end of the topic).
    #[serde(default)]
    until: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

/// `POST`: starts a backfill; 202 with its status and `Location`.
pub async fn start(
    State(s): State<Shared>,
    Extension(op): Extension<Operator>,
    Path((kind, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Json<Body>, JsonRejection>,
) -> Result<Response, ApiError> {
    op.may(Role::Operator, "backfilling a postback")?;
    let key = postback(&kind, &id)?;
    let Json(body) = body?;
    let path = format!("/api/v1/catalog/postback/{id}/backfills");
    let forwarded = json!({ "since": body.since, "until": body.until, "reason": body.reason });
    if let Some(resp) = forward(&s, &path, Method::POST, &headers, Some(forwarded)).await {
        return Ok(resp);
    }
    let catalog = s.catalog.catalog.catalog();
    let entry = catalog.get(&key).ok_or_else(|| missing(&key))?;
    let (config, enabled) =
        s2s_delivery::catalog::document(&id, &entry.stored.document).map_err(|e| {
            ApiError::new(
                StatusCode::CONFLICT,
                "postback_unusable",
                format!(
                    "the postback's document cannot be used: {}: {}",
                    e.field, e.message
                ),
            )
        })?;
    if !enabled {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "postback_disabled",
            format!("{key} is disabled: enable it first, or nothing would be sent"),
        ));
    }
    let now = s2s_common::now_ms();
    let time = |field: &str, v: &str| {
        s2s_delivery::replay::parse_time(v, now).map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_time",
                format!("{field}: {e}"),
            )
        })
    };
    let since_ms = time("since", &body.since)?;
    let until_ms = body
        .until
        .as_deref()
        .map(|u| time("until", u))
        .transpose()?;
    if until_ms.is_some_and(|u| u <= since_ms) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_time",
            "until: must be after since",
        ));
    }
    let status = s.backfills.start(
        Request {
            postback: id.clone(),
            postback_revision: entry.revision,
            filter: config.filter(),
            since_ms,
            until_ms,
            requested_by: op.name.clone(),
            reason: body.reason,
        },
        now,
    );
    let mut resp = (StatusCode::ACCEPTED, Json(json!(status))).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("{path}/{}", status.id)) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// `GET`: the postback's backfills, oldest first.
pub async fn list(
    State(s): State<Shared>,
    Path((kind, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    postback(&kind, &id)?;
    let path = format!("/api/v1/catalog/postback/{id}/backfills");
    if let Some(resp) = forward(&s, &path, Method::GET, &headers, None).await {
        return Ok(resp);
    }
    Ok(Json(json!({ "items": s.backfills.of(&id) })).into_response())
}

/// `GET …/{backfill_id}`: one backfill.
pub async fn get_one(
    State(s): State<Shared>,
    Path((kind, id, backfill)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    postback(&kind, &id)?;
    let path = format!("/api/v1/catalog/postback/{id}/backfills/{backfill}");
    if let Some(resp) = forward(&s, &path, Method::GET, &headers, None).await {
        return Ok(resp);
    }
    let found = s.backfills.of(&id).into_iter().find(|b| b.id == backfill);
    let status = found.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no backfill {backfill} of postback {id} on this instance"),
        )
    })?;
    Ok(Json(json!(status)).into_response())
}

fn postback(kind: &str, id: &str) -> Result<s2s_catalog::Key, ApiError> {
    let key = key_of(kind, id)?;
    if key.kind() != Kind::Postback {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "only postbacks are backfilled",
        ));
    }
    Ok(key)
}

async fn forward(
    s: &Shared,
    path: &str,
    method: Method,
    headers: &HeaderMap,
    body: Option<serde_json::Value>,
) -> Option<Response> {
    let (writer, answer) = to_writer(s, path, method, headers, body).await?;
    Some(match answer {
        Ok(resp) => resp,
        Err(error) => {
            tracing::warn!(path, writer = %writer, %error, "backfill request not answered by the writer");
            writer_silent(&error)
        }
    })
}
