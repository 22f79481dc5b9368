//! The catalog's management API: list, read, create, change and delete catalog entities
//! (offers, affiliates, postbacks, sources, operators), and read each one's history.
//!
//! Optimistic concurrency over HTTP: a read answers the entity's revision as its `ETag`;
//! a change names the revision it was made against in `If-Match` (a creation says
//! `If-None-Match: *`), and a change against any other revision is refused with 409, so
//! two operators editing one entity cannot overwrite each other unknowingly. Only the
//! elected writer (see [`s2s_catalog::Election`]) changes the catalog; another console
//! instance forwards the change to the writer its catalog names (the writer announces its
//! `advertised_url` when elected), or answers 503 with `Retry-After` when it knows none. A
//! change is answered once this instance has seen it applied, so the next read here shows
//! it. Documents are kept in their canonical form ([`documents::check`]).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use s2s_catalog::documents::{self, Checks, Role};
use s2s_catalog::secrets::{self, SecretKey};
use s2s_catalog::{
    Catalog, Change, Conflict, Election, Entry, Follower, History, Key, Kind, WriteError, Writer,
};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, Operator, Shared};

/// What the catalog's handlers share.
#[derive(Debug)]
pub struct CatalogApi {
    /// What documents are checked against (the pipeline's vocabulary, delivery's rules
    /// for postbacks, ingest's for sources).
    pub checks: Checks,
    /// Seals the secrets of documents (none: documents with a secret to seal are refused;
    /// operators' tokens are hashed and need no key).
    pub secret_key: Option<SecretKey>,
    pub catalog: Arc<Follower<Catalog>>,
    pub history: Follower<History>,
    /// This instance's API as the others reach it (see `ConsoleConfig::advertised_url`).
    pub advertised_url: Option<String>,
    /// Ingest as operators reach it, for a source's postback URL.
    pub ingest_public_url: Option<String>,
    /// Forwards catalog changes to the writer.
    pub client: reqwest::Client,
    pub election: Election,
    pub writer: Writer,
}

/// A change's body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Put {
    /// The entity's whole new document.
    document: Value,
    /// Why, for the history.
    #[serde(default)]
    reason: Option<String>,
}

/// `GET /api/v1/catalog/{kind}`: every entity of a kind.
pub async fn list(
    State(s): State<Shared>,
    Path(kind): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let kind = kind_of(&kind)?;
    let catalog = s.catalog.catalog.catalog();
    let base = s.catalog.ingest_public_url.as_deref();
    let items: Vec<Value> = catalog.list(kind).map(|e| entity(e, base)).collect();
    Ok(Json(json!({ "items": items })))
}

/// `GET /api/v1/catalog/{kind}/{id}`: one entity, its revision as `ETag`.
pub async fn get_one(
    State(s): State<Shared>,
    Path((kind, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let key = key_of(&kind, &id)?;
    let catalog = s.catalog.catalog.catalog();
    let e = catalog.get(&key).ok_or_else(|| missing(&key))?;
    Ok(with_etag(
        StatusCode::OK,
        e.revision,
        entity(e, s.catalog.ingest_public_url.as_deref()),
    ))
}

/// `PUT /api/v1/catalog/{kind}/{id}`: creates (`If-None-Match: *`) or changes
/// (`If-Match: "<revision>"`) an entity.
pub async fn put(
    State(s): State<Shared>,
    Extension(op): Extension<Operator>,
    Path((kind, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Json<Put>, JsonRejection>,
) -> Result<Response, ApiError> {
    op.may(Role::Admin, "changing the catalog")?;
    let key = key_of(&kind, &id)?;
    let Json(put) = body?;
    let forwarded = json!({ "document": put.document, "reason": put.reason });
    if let Some(resp) = forward(&s, &op, &key, Method::PUT, &headers, Some(forwarded)).await {
        return Ok(resp);
    }
    let invalid = |e: s2s_common::pipeline::FieldError| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_document",
            format!("document.{}: {}", e.field, e.message),
        )
    };
    let mut document = documents::check(key.kind(), key.id(), &put.document, &s.catalog.checks)
        .map_err(invalid)?;
    // Secrets are sealed before anything is written (a kept one: the entity's own).
    let current = s.catalog.catalog.catalog();
    let current = current.get(&key).map(|e| &e.stored.document);
    secrets::seal_fields(&key, &mut document, current, s.catalog.secret_key.as_ref())
        .map_err(invalid)?;
    let base = match (if_match(&headers)?, creates(&headers)) {
        (Some(base), false) => Some(base),
        (None, true) => None,
        _ => {
            return Err(ApiError::new(
                StatusCode::PRECONDITION_REQUIRED,
                "precondition_required",
                "say which revision the change is made against: If-Match: \"<revision>\" \
                 (the ETag of your read), or If-None-Match: * to create",
            ))
        }
    };
    let created = base.is_none();
    let written = write(&s, &op, key, base, Some(document), put.reason).await?;
    let e = written.entry.ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the change was applied but the entity is not in the catalog",
        )
    })?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(with_etag(
        status,
        e.revision,
        entity(&e, s.catalog.ingest_public_url.as_deref()),
    ))
}

/// `DELETE /api/v1/catalog/{kind}/{id}` with `If-Match: "<revision>"`.
pub async fn delete(
    State(s): State<Shared>,
    Extension(op): Extension<Operator>,
    Path((kind, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    op.may(Role::Admin, "changing the catalog")?;
    let key = key_of(&kind, &id)?;
    if let Some(resp) = forward(&s, &op, &key, Method::DELETE, &headers, None).await {
        return Ok(resp);
    }
    let Some(base) = if_match(&headers)? else {
        return Err(ApiError::new(
            StatusCode::PRECONDITION_REQUIRED,
            "precondition_required",
            "say which revision you delete: If-Match: \"<revision>\" (the ETag of your read)",
        ));
    };
    let written = write(&s, &op, key.clone(), Some(base), None, None).await?;
    Ok(Json(json!({
        "kind": key.kind(),
        "id": key.id(),
        "deleted": true,
        "revision": written.revision,
    }))
    .into_response())
}

/// `GET /api/v1/catalog/{kind}/{id}/history`: every change, oldest first.
pub async fn history(
    State(s): State<Shared>,
    Path((kind, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let key = key_of(&kind, &id)?;
    let history = s.catalog.history.catalog();
    let changes: Vec<s2s_catalog::AuditRecord> = history
        .of(&key)
        .iter()
        .map(|r| s2s_catalog::AuditRecord {
            document: r.document.as_ref().map(|d| secrets::redact(key.kind(), d)),
            ..r.clone()
        })
        .collect();
    Ok(Json(
        json!({ "kind": key.kind(), "id": key.id(), "changes": changes }),
    ))
}

async fn write(
    s: &Shared,
    op: &Operator,
    key: Key,
    base: Option<i64>,
    document: Option<Value>,
    reason: Option<String>,
) -> Result<s2s_catalog::Written, ApiError> {
    let kind = key.kind().as_str();
    let key_text = key.to_string();
    // One change, one outcome: one counter and one log line, here.
    let count = |result: &str| {
        s.metrics
            .catalog_changes
            .with_label_values(&[kind, result])
            .inc();
    };
    let Some(since) = s.catalog.election.leader_since() else {
        count("not_the_writer");
        tracing::info!(key = %key_text, by = %op.name, result = "not_the_writer", "catalog change refused");
        return Err(not_the_writer());
    };
    let change = Change {
        key,
        base,
        document,
        changed_by: op.name.clone(),
        changed_at_ms: s2s_common::now_ms(),
        reason,
    };
    match s.catalog.writer.write(change, since).await {
        Ok(written) => {
            // Answered once the history here shows the change too.
            if let Err(e) = s
                .catalog
                .history
                .reached(written.audit_offset + 1, crate::CATALOG_APPLY_WITHIN)
                .await
            {
                tracing::warn!(key = %key_text, error = %e, "the change's history record not seen yet");
            }
            count("accepted");
            tracing::info!(key = %key_text, revision = written.revision, by = %op.name,
                result = "accepted", "catalog changed");
            Ok(written)
        }
        Err(WriteError::Conflict(c)) => {
            count("conflict");
            tracing::info!(key = %key_text, by = %op.name, result = "conflict", conflict = %c,
                "catalog change refused");
            Err(match c {
                Conflict::Missing { key } => missing(&key),
                c => ApiError::new(StatusCode::CONFLICT, "conflict", c.to_string()),
            })
        }
        Err(e) => {
            count("failed");
            tracing::error!(key = %key_text, by = %op.name, result = "failed", error = %e,
                "catalog change failed");
            Err(match e {
                WriteError::Append { .. }
                | WriteError::Behind(_)
                | WriteError::Transaction(_)
                | WriteError::Fenced => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "catalog_unavailable",
                    e.to_string(),
                )
                .with_retry_after(1),
                _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
            })
        }
    }
}

/// Marks a change forwarded by another console instance: it is not forwarded again.
const FORWARDED: &str = "s2s-forwarded-by";

/// A change made on an instance that does not write the catalog, sent on to the one that
/// announced it does ([`s2s_catalog::Announcement`]) with the same credentials and
/// preconditions, and its answer returned as it is. `None`: this instance writes, or
/// there is nowhere (else) to forward to — the change goes on here (and is answered 503
/// if this instance is not the writer). One hop at most.
async fn forward(
    s: &Shared,
    op: &Operator,
    key: &Key,
    method: Method,
    headers: &HeaderMap,
    body: Option<Value>,
) -> Option<Response> {
    let path = format!("/api/v1/catalog/{}/{}", key.kind(), key.id());
    let (writer, answer) = to_writer(s, &path, method, headers, body).await?;
    // One change, one outcome here: forwarded (the writer counts and logs the change).
    s.metrics
        .catalog_changes
        .with_label_values(&[key.kind().as_str(), "forwarded"])
        .inc();
    Some(match answer {
        Ok(resp) => {
            tracing::info!(key = %key, by = %op.name, writer = %writer,
                status = resp.status().as_u16(), result = "forwarded", "catalog change forwarded");
            resp
        }
        Err(error) => {
            tracing::warn!(key = %key, by = %op.name, writer = %writer, %error,
                result = "forwarded", "the catalog's writer did not answer");
            writer_silent(&error)
        }
    })
}

/// A request this instance leaves to the catalog's writer, sent there (`path` on its
/// advertised URL) with the caller's credentials and preconditions; the writer and its
/// answer as it is. `None`: this instance is the writer, or knows of no other, or the
/// request was already forwarded once.
pub(super) async fn to_writer(
    s: &Shared,
    path: &str,
    method: Method,
    headers: &HeaderMap,
    body: Option<Value>,
) -> Option<(String, Result<Response, reqwest::Error>)> {
    if s.catalog.election.is_leader() || headers.contains_key(FORWARDED) {
        return None;
    }
    let writer = s.catalog.catalog.catalog().writer()?.url.clone();
    if Some(&writer) == s.catalog.advertised_url.as_ref() {
        return None;
    }
    let mut req = s
        .catalog
        .client
        .request(method, format!("{writer}{path}"))
        .header(
            FORWARDED,
            s.catalog.advertised_url.as_deref().unwrap_or("console"),
        );
    for name in [
        header::AUTHORIZATION,
        header::IF_MATCH,
        header::IF_NONE_MATCH,
    ] {
        if let Some(v) = headers.get(&name) {
            req = req.header(name, v.clone());
        }
    }
    if let Some(b) = body {
        req = req
            .header(header::CONTENT_TYPE, "application/json")
            .body(b.to_string());
    }
    let answer = async {
        let resp = req.send().await?;
        let status = resp.status();
        let kept: Vec<_> = [header::ETAG, header::RETRY_AFTER, header::LOCATION]
            .into_iter()
            .filter_map(|h| resp.headers().get(&h).cloned().map(|v| (h, v)))
            .collect();
        let body = resp.bytes().await?;
        let mut out = (status, body).into_response();
        let h = out.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for (name, value) in kept {
            h.insert(name, value);
        }
        Ok(out)
    }
    .await;
    Some((writer, answer))
}

/// The answer when the writer a request was forwarded to did not answer.
pub(super) fn writer_silent(error: &reqwest::Error) -> Response {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_the_writer",
        format!("this instance does not write the catalog, and the writer it knows did not answer: {error}"),
    )
    .with_retry_after(1)
    .into_response()
}

fn not_the_writer() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_the_writer",
        "this console instance does not write the catalog now (another one does, or one is \
         being elected): try again",
    )
    .with_retry_after(1)
}

fn kind_of(kind: &str) -> Result<Kind, ApiError> {
    kind.parse::<Kind>()
        .map_err(|e| ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string()))
}

pub(super) fn key_of(kind: &str, id: &str) -> Result<Key, ApiError> {
    Key::new(kind_of(kind)?, id).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_id",
            e.to_string(),
        )
    })
}

pub(super) fn missing(key: &impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("{key} does not exist"),
    )
}

/// `If-Match: "<revision>"` (quoted or not).
fn if_match(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .map(|s| s.trim().trim_start_matches("W/").trim_matches('"'))
        .and_then(|s| s.parse::<i64>().ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_precondition",
                "If-Match must be one revision, as the ETag of a read gives it: \"42\"",
            )
        })
}

/// `If-None-Match: *`: a creation.
fn creates(headers: &HeaderMap) -> bool {
    headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes().trim_ascii() == b"*")
}

/// An entity as the API shows it; a source with how its operator calls it (the exact
/// postback URL with their parameter names, on `ingest_public_url`).
fn entity(e: &Entry, ingest_public_url: Option<&str>) -> Value {
    let mut v = json!({
        "kind": e.key.kind(),
        "id": e.key.id(),
        "revision": e.revision,
        "document": secrets::redact(e.key.kind(), &e.stored.document),
        "changed_by": e.stored.changed_by,
        "changed_at_ms": e.stored.changed_at_ms,
        "reason": e.stored.reason,
    });
    if e.key.kind() == Kind::Source {
        v["call"] = json!(s2s_ingest::catalog::source_call(
            e.key.id(),
            &e.stored.document,
            ingest_public_url
        ));
    }
    v
}

fn with_etag(status: StatusCode, revision: i64, body: Value) -> Response {
    let mut resp = (status, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{revision}\"")) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}
