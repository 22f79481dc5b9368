//! The console's HTTP side: the web page (static files, no build step), the JSON API
//! (documented in `console/openapi.json`), the live feed (server-sent events), and
//! re-fire. Every `/api/` route needs `Authorization: Bearer <operator token>`; the
//! operator's name is recorded with each re-fire. Re-fire does not send anything itself:
//! it publishes a `redeliver` command to the delivery-commands topic, keyed by click ID,
//! and the delivery worker that owns the delivery sends it again with its stable
//! `webhook-id`; the new attempts then show in the click's story.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rdkafka::producer::FutureProducer;
use s2s_catalog::documents::Role;
use s2s_common::kafka_stats::KafkaStats;
use s2s_state::Ownership;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tokio::sync::broadcast;

use crate::metrics::Metrics;
use crate::model::LiveEvent;
use crate::query::{ConversionFilter, GroupBy, QueryError, Reader, Window};
use crate::schema::{Cf, Granularity};

mod backfill;
pub mod catalog;
mod postback_test;
mod refire;

pub const OPENAPI: &str = include_str!("../../openapi.json");
pub const INDEX_HTML: &str = include_str!("../../web/index.html");
pub const APP_JS: &str = include_str!("../../web/app.js");
pub const STYLE_CSS: &str = include_str!("../../web/style.css");

/// Every route and its methods; the OpenAPI document lists the same (a test checks).
pub const ROUTES: [(&str, &[&str]); 23] = [
    ("/", &["GET"]),
    ("/app.js", &["GET"]),
    ("/style.css", &["GET"]),
    ("/openapi.json", &["GET"]),
    ("/api/v1/clicks/{click_id}", &["GET"]),
    ("/api/v1/conversions", &["GET"]),
    ("/api/v1/rejections", &["GET"]),
    ("/api/v1/deliveries", &["GET"]),
    ("/api/v1/deliveries/{delivery_id}", &["GET"]),
    ("/api/v1/deliveries/{delivery_id}/refire", &["POST"]),
    ("/api/v1/dead-letters", &["GET"]),
    ("/api/v1/dead-letters/refire", &["POST"]),
    ("/api/v1/endpoints", &["GET"]),
    ("/api/v1/totals", &["GET"]),
    ("/api/v1/feed", &["GET"]),
    ("/api/v1/status", &["GET"]),
    ("/api/v1/refusals", &["GET"]),
    ("/api/v1/catalog/{kind}", &["GET"]),
    ("/api/v1/catalog/{kind}/{id}", &["GET", "PUT", "DELETE"]),
    ("/api/v1/catalog/{kind}/{id}/history", &["GET"]),
    ("/api/v1/catalog/{kind}/{id}/backfills", &["GET", "POST"]),
    (
        "/api/v1/catalog/{kind}/{id}/backfills/{backfill_id}",
        &["GET"],
    ),
    ("/api/v1/catalog/{kind}/{id}/test", &["POST"]),
];

/// Re-fired in one bulk request at most.
const MAX_BULK: usize = 10_000;

/// What the handlers share.
pub struct ApiState {
    pub ownership: Arc<Ownership<Cf>>,
    pub producer: FutureProducer<KafkaStats>,
    pub commands_topic: String,
    /// The topics the read model is built from (for its freshness).
    pub inputs: Vec<String>,
    /// The config file's operators, (name, token): admins, so that a console always has
    /// one (the catalog's operators come and go with it).
    pub operators: Vec<(String, String)>,
    /// The catalog's operators by the digest of their token, live.
    pub catalog_operators: s2s_catalog::Live<CatalogOperators>,
    pub metrics: Metrics,
    pub feed: broadcast::Sender<LiveEvent>,
    pub catalog: catalog::CatalogApi,
    pub backfills: Arc<crate::backfill::Backfills>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("operators", &self.operators.len())
            .finish()
    }
}

type Shared = Arc<ApiState>;

/// An API error: `{"error":{"code","message"}}` with its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Seconds, for `Retry-After`.
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(s));
        }
        resp
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::BadCursor => {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_cursor", e.to_string())
            }
            QueryError::Store(e) => {
                tracing::error!(error = %e, "reading the read model failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "reading the read model failed",
                )
            }
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError::new(e.status(), "bad_body", e.body_text())
    }
}

/// The catalog's operators: the digest of each token → (operator ID, role).
pub type CatalogOperators = std::collections::HashMap<String, (String, Role)>;

/// The catalog's operators, compiled from a catalog (an operator whose document is not
/// one keeps its previous entry, logged).
pub fn catalog_operators(
    catalog: &s2s_catalog::Catalog,
    previous: Option<&CatalogOperators>,
) -> CatalogOperators {
    s2s_catalog::view::compile_each(
        catalog,
        s2s_catalog::Kind::Operator,
        "console",
        |id| {
            previous
                .and_then(|p| p.iter().find(|(_, (who, _))| who == id))
                .map(|(digest, (_, role))| (digest.clone(), *role))
        },
        |_, doc| {
            let role = s2s_catalog::documents::typed::<OperatorRole>(doc)
                .map_err(|e| e.to_string())?
                .role;
            let digest = doc["token"]["sha256"]
                .as_str()
                .ok_or("no token digest")?
                .to_string();
            Ok((digest, role))
        },
    )
    .into_iter()
    .map(|(id, (digest, role))| (digest, (id, role)))
    .collect()
}

/// The role of an operator's document (its other fields are not needed here).
#[derive(Deserialize)]
struct OperatorRole {
    role: Role,
}

/// The operator a request is from, and what they may do.
#[derive(Debug, Clone)]
pub struct Operator {
    pub name: String,
    pub role: Role,
}

impl Operator {
    /// 403 unless the operator's role is at least `needed`.
    pub fn may(&self, needed: Role, what: &str) -> Result<(), ApiError> {
        if self.role >= needed {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "{what} needs role {} or more; operator {} is {}",
                    needed.as_str(),
                    self.name,
                    self.role.as_str()
                ),
            ))
        }
    }
}

pub fn router(state: Shared) -> Router {
    let static_file = |body: &'static str, ct: &'static str| {
        get(move || async move { ([(header::CONTENT_TYPE, ct)], body) })
    };
    Router::new()
        .route(
            ROUTES[0].0,
            static_file(INDEX_HTML, "text/html; charset=utf-8"),
        )
        .route(
            ROUTES[1].0,
            static_file(APP_JS, "text/javascript; charset=utf-8"),
        )
        .route(
            ROUTES[2].0,
            static_file(STYLE_CSS, "text/css; charset=utf-8"),
        )
        .route(ROUTES[3].0, static_file(OPENAPI, "application/json"))
        .route(ROUTES[4].0, get(story))
        .route(ROUTES[5].0, get(conversions))
        .route(ROUTES[6].0, get(rejections))
        .route(ROUTES[7].0, get(deliveries))
        .route(ROUTES[8].0, get(delivery))
        .route(ROUTES[9].0, post(refire::refire_one))
        .route(ROUTES[10].0, get(dead_letters))
        .route(ROUTES[11].0, post(refire::refire_many))
        .route(ROUTES[12].0, get(endpoints))
        .route(ROUTES[13].0, get(totals))
        .route(ROUTES[14].0, get(feed))
        .route(ROUTES[15].0, get(status))
        .route(ROUTES[16].0, get(refusals))
        .route(ROUTES[17].0, get(catalog::list))
        .route(
            ROUTES[18].0,
            get(catalog::get_one)
                .put(catalog::put)
                .delete(catalog::delete),
        )
        .route(ROUTES[19].0, get(catalog::history))
        .route(ROUTES[20].0, get(backfill::list).post(backfill::start))
        .route(ROUTES[21].0, get(backfill::get_one))
        .route(ROUTES[22].0, post(postback_test::test))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(state.clone(), measure))
        .with_state(state)
}

/// Counts and times every request (one place).
async fn measure(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_string(), |m| m.as_str().to_string());
    let started = Instant::now();
    let resp = next.run(req).await;
    s.metrics
        .request_seconds
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    s.metrics
        .requests
        .with_label_values(&[&route, resp.status().as_str()])
        .inc();
    resp
}

/// `/api/` needs an operator's token; the page and the document do not.
async fn authenticate(State(s): State<Shared>, mut req: Request, next: Next) -> Response {
    if !req.uri().path().starts_with("/api/") {
        return next.run(req).await;
    }
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .as_bytes()
        .to_vec();
    // Compare with every configured operator's token in constant time, whichever
    // matches; then look the token's digest up among the catalog's operators.
    let mut who = None;
    for (name, t) in &s.operators {
        if bool::from(t.as_bytes().ct_eq(&token)) {
            who = Some(Operator {
                name: name.clone(),
                role: Role::Admin,
            });
        }
    }
    if who.is_none() && !token.is_empty() {
        let digest = s2s_catalog::secrets::digest(&String::from_utf8_lossy(&token));
        who = s
            .catalog_operators
            .current()
            .get(&digest)
            .map(|(name, role)| Operator {
                name: name.clone(),
                role: *role,
            });
    }
    match who {
        Some(op) => {
            req.extensions_mut().insert(op);
            next.run(req).await
        }
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send an operator token: Authorization: Bearer <token>",
        )
        .into_response(),
    }
}

/// Runs a read on the owned stores off the async threads.
async fn read<T: Send + 'static>(
    s: &Shared,
    f: impl FnOnce(&Reader<'_>) -> Result<T, QueryError> + Send + 'static,
) -> Result<T, ApiError> {
    let ownership = s.ownership.clone();
    tokio::task::spawn_blocking(move || {
        let stores: Vec<_> = ownership.assigned().into_iter().map(|(_, s)| s).collect();
        f(&Reader::new(&stores))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
    .map_err(ApiError::from)
}

async fn story(
    State(s): State<Shared>,
    Path(click_id): Path<String>,
) -> Result<Response, ApiError> {
    let id = click_id.clone();
    match read(&s, move |r| r.story(&id)).await? {
        Some(story) => Ok(Json(story).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("nothing is known of click {click_id}"),
        )),
    }
}

#[derive(Debug, Deserialize)]
struct ConversionsQuery {
    #[serde(flatten)]
    window: Window,
    #[serde(flatten)]
    filter: ConversionFilter,
}

async fn conversions(
    State(s): State<Shared>,
    q: Result<Query<ConversionsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q?;
    Ok(Json(read(&s, move |r| r.conversions(&q.filter, &q.window)).await?).into_response())
}

#[derive(Debug, Deserialize)]
struct RefusalsQuery {
    #[serde(flatten)]
    window: Window,
    source: Option<String>,
    reason: Option<String>,
}

/// What ingest refused, newest first, of one source or all, of one reason or any.
async fn refusals(
    State(s): State<Shared>,
    q: Result<Query<RefusalsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q?;
    Ok(Json(
        read(&s, move |r| {
            r.refusals(q.source.as_deref(), q.reason.as_deref(), &q.window)
        })
        .await?,
    )
    .into_response())
}

#[derive(Debug, Deserialize)]
struct RejectionsQuery {
    #[serde(flatten)]
    window: Window,
    reason: Option<String>,
}

async fn rejections(
    State(s): State<Shared>,
    q: Result<Query<RejectionsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q?;
    if let Some(r) = &q.reason {
        if !s2s_common::contract::RejectReason::ALL
            .iter()
            .any(|x| x.as_str() == r)
        {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_query",
                format!(
                    "reason must be one of {}",
                    s2s_common::contract::RejectReason::ALL
                        .iter()
                        .map(|r| r.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    Ok(
        Json(read(&s, move |r| r.rejections(q.reason.as_deref(), &q.window)).await?)
            .into_response(),
    )
}

#[derive(Debug, Deserialize)]
struct DeliveriesQuery {
    #[serde(flatten)]
    window: Window,
    endpoint: Option<String>,
    state: Option<String>,
}

async fn deliveries(
    State(s): State<Shared>,
    q: Result<Query<DeliveriesQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q?;
    Ok(Json(
        read(&s, move |r| {
            r.deliveries(q.endpoint.as_deref(), q.state.as_deref(), &q.window)
        })
        .await?,
    )
    .into_response())
}

async fn delivery(State(s): State<Shared>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let key = id.clone();
    match read(&s, move |r| r.delivery(&key)).await? {
        Some(d) => Ok(Json(d).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no delivery {id}"),
        )),
    }
}

#[derive(Debug, Deserialize)]
struct DeadQuery {
    #[serde(flatten)]
    window: Window,
    endpoint: Option<String>,
}

async fn dead_letters(
    State(s): State<Shared>,
    q: Result<Query<DeadQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q?;
    Ok(Json(
        read(&s, move |r| {
            r.dead_letters(q.endpoint.as_deref(), &q.window)
        })
        .await?,
    )
    .into_response())
}

/// How fresh this instance's read model is: the partitions it answers for, and how many
/// records of its input topics it has not applied yet (`null`: not known yet, until the
/// consumer's first statistics report the partitions' high watermarks).
#[derive(Debug, serde::Serialize)]
struct Freshness {
    partitions: Vec<i32>,
    records_behind: Option<i64>,
    by_topic: std::collections::BTreeMap<String, Option<i64>>,
    catalog: CatalogStatus,
}

/// This instance's view of the catalog.
#[derive(Debug, serde::Serialize)]
struct CatalogStatus {
    /// Whether this instance writes the catalog now.
    writer: bool,
    /// Whether it takes part in the writer's election.
    candidate: bool,
    entities: usize,
    /// The offset after the last catalog record applied here.
    next_revision: i64,
    /// Where the elected writer said it answers (the others forward changes there).
    #[serde(skip_serializing_if = "Option::is_none")]
    writer_url: Option<String>,
}

async fn status(State(s): State<Shared>) -> Result<Response, ApiError> {
    let (ownership, inputs) = (s.ownership.clone(), s.inputs.clone());
    let read = s.catalog.catalog.catalog();
    let catalog = CatalogStatus {
        writer: s.catalog.election.is_leader(),
        candidate: s.catalog.election.joined(),
        entities: read.len(),
        next_revision: read.next_offset(),
        writer_url: read.writer().map(|w| w.url.clone()),
    };
    let freshness = tokio::task::spawn_blocking(move || {
        let assigned = ownership.assigned();
        let mut by_topic = std::collections::BTreeMap::new();
        for topic in &inputs {
            let mut behind = Some(0i64);
            for (p, store) in &assigned {
                let next = store.offset(topic)?.unwrap_or(0);
                behind = match (behind, ownership.high_watermark(topic, *p)) {
                    (Some(sum), Some(high)) => Some(sum + (high - next).max(0)),
                    _ => None,
                };
            }
            by_topic.insert(topic.clone(), behind);
        }
        let records_behind = by_topic
            .values()
            .try_fold(0i64, |sum, b| b.map(|b| sum + b));
        Ok::<_, s2s_state::StoreError>(Freshness {
            partitions: assigned.iter().map(|(p, _)| *p).collect(),
            records_behind,
            by_topic,
            catalog,
        })
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
    .map_err(|e| ApiError::from(QueryError::from(e)))?;
    Ok(Json(freshness).into_response())
}

async fn endpoints(State(s): State<Shared>) -> Result<Response, ApiError> {
    Ok(Json(read(&s, |r| r.endpoints()).await?).into_response())
}

#[derive(Debug, Deserialize)]
struct TotalsQuery {
    granularity: Option<Granularity>,
    from: Option<i64>,
    to: Option<i64>,
    /// Comma-separated: aff, offer, event.
    by: Option<String>,
    aff_id: Option<String>,
}

async fn totals(
    State(s): State<Shared>,
    q: Result<Query<TotalsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q?;
    let mut by = GroupBy::default();
    for part in
        q.by.as_deref()
            .unwrap_or_default()
            .split(',')
            .filter(|p| !p.is_empty())
    {
        match part.trim() {
            "aff" => by.aff = true,
            "offer" => by.offer = true,
            "event" => by.event = true,
            other => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_query",
                    format!("by: '{other}' is not one of aff, offer, event"),
                ))
            }
        }
    }
    let g = q.granularity.unwrap_or(Granularity::Hour);
    let to = q.to.unwrap_or_else(|| s2s_common::now_ms() + 1);
    let from = q.from.unwrap_or(to - 86_400_000);
    Ok(
        Json(read(&s, move |r| r.totals(g, from, to, by, q.aff_id.as_deref())).await?)
            .into_response(),
    )
}

/// Server-sent events: one `data:` line of JSON per new conversion, rejection, attempt,
/// dead letter or command, as the read model commits them.
async fn feed(
    State(s): State<Shared>,
    _headers: HeaderMap,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    struct Subscription {
        rx: broadcast::Receiver<LiveEvent>,
        gauge: prometheus::IntGauge,
    }
    impl Drop for Subscription {
        fn drop(&mut self) {
            self.gauge.dec();
        }
    }
    s.metrics.feed_subscribers.inc();
    let sub = Subscription {
        rx: s.feed.subscribe(),
        gauge: s.metrics.feed_subscribers.clone(),
    };
    let stream = futures::stream::unfold(sub, |mut sub| async move {
        let data = match sub.rx.recv().await {
            Ok(e) => serde_json::to_string(&e).unwrap_or_default(),
            // A slow reader skips ahead, and is told how much it missed.
            Err(broadcast::error::RecvError::Lagged(n)) => {
                format!("{{\"kind\":\"lagged\",\"missed\":{n}}}")
            }
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(Event::default().data(data)), sub))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
