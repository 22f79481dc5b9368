//! The public HTTP routes: `GET /click`, `GET|POST /postback`.
//!
//! Each handler decodes parameters, builds the record (see [`crate::records`]), publishes
//! it and answers only after the broker acknowledged it. Every request ends in exactly
//! one place, [`App::finish`], which counts and logs its outcome.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, MatchedPath, RawQuery, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use s2s_common::contract::encode;
use s2s_common::ids::new_ulid;
use s2s_common::template::Template;
use s2s_common::topics::partition_key;
use s2s_common::{contract, now_ms};
use tower_http::limit::RequestBodyLimitLayer;

use crate::config::PostbackRules;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::params::{parse_json_object, parse_urlencoded, Pairs};
use crate::publish::{PublishError, Publisher};
use crate::records::{build_click, build_postback, RequestMeta};

#[derive(Debug)]
pub struct App {
    pub publisher: Publisher,
    pub offers: BTreeMap<String, Template>,
    pub rules: PostbackRules,
    pub clicks_topic: String,
    pub postbacks_topic: String,
    pub metrics: Metrics,
}

pub fn router(app: Arc<App>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/click", get(click))
        .route("/postback", get(postback_get).post(postback_post))
        .layer(axum::middleware::from_fn_with_state(app.clone(), observe))
        .layer(RequestBodyLimitLayer::new(max_body_bytes))
        .with_state(app)
}

/// Counts every request by route and status and times it.
async fn observe(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| match p.as_str() {
            "/click" => "/click",
            "/postback" => "/postback",
            _ => "other",
        });
    let started = Instant::now();
    let resp = next.run(req).await;
    app.metrics
        .request_seconds
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
    app.metrics
        .requests
        .with_label_values(&[route, resp.status().as_str()])
        .inc();
    resp
}

impl App {
    /// Publishes `payload` keyed by click ID and maps a failure to 503.
    async fn publish(
        &self,
        kind: &str,
        topic: &str,
        click_id: &str,
        payload: &[u8],
    ) -> Result<(), ApiError> {
        self.publisher
            .send(kind, topic, partition_key(click_id), payload)
            .await
            .map_err(|e| match e {
                PublishError::QueueFull => {
                    ApiError::unavailable("ingest is overloaded (producer queue full); retry later")
                }
                other => ApiError::unavailable(format!("event not stored, retry later: {other}")),
            })
    }

    /// The one place a request's outcome is counted and logged.
    fn finish<T>(&self, kind: &'static str, result: Result<T, ApiError>) -> Result<T, ApiError> {
        let outcome = match &result {
            Ok(_) => "accepted",
            Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => {
                tracing::warn!(kind, error = %e.message, "record not stored");
                "unavailable"
            }
            Err(e) => {
                tracing::debug!(kind, code = e.code, error = %e.message, "request rejected");
                "invalid"
            }
        };
        self.metrics
            .records
            .with_label_values(&[kind, outcome])
            .inc();
        result
    }
}

fn meta(peer: SocketAddr, headers: &HeaderMap) -> RequestMeta {
    let h = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(1024).collect::<String>())
    };
    RequestMeta {
        ip: Some(peer.ip().to_string()),
        user_agent: h(header::USER_AGENT),
        referrer: h(header::REFERER),
    }
}

async fn click(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let result = async {
        let pairs = parse_urlencoded(query.unwrap_or_default().as_bytes())?;
        let (click, location) = build_click(
            pairs,
            &app.offers,
            meta(peer, &headers),
            new_ulid(),
            now_ms(),
        )?;
        app.publish("click", &app.clicks_topic, &click.click_id, &encode(&click))
            .await?;
        Ok(location)
    }
    .await;
    let location = app.finish("click", result)?;
    Ok((StatusCode::FOUND, [(header::LOCATION, location)]).into_response())
}

async fn postback_get(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = parse_urlencoded(query.unwrap_or_default().as_bytes());
    accept_postback(&app, pairs, meta(peer, &headers)).await
}

async fn postback_post(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let pairs = (|| {
        let mut pairs = parse_urlencoded(query.unwrap_or_default().as_bytes())?;
        let body_pairs = match content_type.as_str() {
            _ if body.is_empty() => Pairs::new(),
            "application/json" => parse_json_object(&body)?,
            "application/x-www-form-urlencoded" | "" => parse_urlencoded(&body)?,
            other => {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    format!(
                        "Content-Type '{other}' is not supported; use \
                         application/x-www-form-urlencoded or application/json"
                    ),
                ))
            }
        };
        // Body fields win over query parameters of the same name.
        pairs.retain(|(n, _)| !body_pairs.iter().any(|(b, _)| b == n));
        pairs.extend(body_pairs);
        Ok(pairs)
    })();
    accept_postback(&app, pairs, meta(peer, &headers)).await
}

async fn accept_postback(
    app: &App,
    pairs: Result<Pairs, ApiError>,
    meta: RequestMeta,
) -> Result<Response, ApiError> {
    let result = async {
        let pb: contract::Postback =
            build_postback(pairs?, &app.rules, meta, new_ulid(), now_ms())?;
        app.publish("postback", &app.postbacks_topic, &pb.click_id, &encode(&pb))
            .await?;
        Ok(pb)
    }
    .await;
    let pb = app.finish("postback", result)?;
    Ok(Json(serde_json::json!({
        "status": "accepted",
        "postback_id": pb.postback_id,
        "click_id": pb.click_id,
    }))
    .into_response())
}
