//! The public HTTP routes.
//!
//! | route | what |
//! |---|---|
//! | `GET /click` | issue a click ID, publish the click, 302 to the offer |
//! | `GET, POST /postback[/{source}]` | one postback: query string, form or JSON body |
//! | `POST /v1/postbacks[/{source}]` | a batch of postbacks: JSON object, array or NDJSON |
//! | `POST /v1/clicks[/{source}]` | a batch of clicks whose IDs the operator minted |
//! | `GET /pixel`, `GET /iframe` | a postback from a browser (`[pixel]`): always a 1×1 GIF / an empty page |
//! | `GET /openapi.json` | the OpenAPI document of all this (`ingest/openapi.json`) |
//!
//! Every request is answered only after its records were acknowledged by the broker.
//! Batches answer 200 when every record was accepted, 207 when some were rejected (each
//! result says why), and 503 with `Retry-After` when any could not be stored — the
//! results then say which, so the client resends only those. Every record's outcome is
//! counted in one place, [`App::count`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, MatchedPath, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::future::join_all;
use s2s_catalog::Live;
use s2s_common::contract::{Click, Postback, WireRecord};
use s2s_common::ids::new_ulid;
use s2s_common::now_ms;
use s2s_common::topics::partition_key;
use serde::Serialize;

use crate::batch::parse_batch;
use crate::catalog::{IngestCatalog, NotIssued};
use crate::config::{ClickConfig, PixelConfig, PostbackRules};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::params::{parse_json_object, parse_urlencoded, take, Pairs};
use crate::publish::{PublishError, Publisher};
use crate::records::{build_click, build_operator_click, build_postback, RequestMeta};
use crate::refusals::{is_refusal, Origin, Refusals};
use crate::source::{ProxyTrust, Source};

mod browser;
pub use browser::GIF;

/// Largest total size of request headers accepted (431 above).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Longest request URI (path and query string) accepted (414 above).
pub const MAX_URI_BYTES: usize = 16 * 1024;

#[derive(Debug)]
pub struct App {
    pub publisher: Publisher,
    /// Offers, affiliates and sources from the catalog, live.
    pub catalog: Live<IngestCatalog>,
    pub rules: PostbackRules,
    /// By name; always holds `default` (see [`crate::config::Compiled`]).
    pub sources: BTreeMap<String, Arc<Source>>,
    pub proxies: ProxyTrust,
    pub clicks_topic: String,
    pub postbacks_topic: String,
    pub max_body_bytes: usize,
    /// How long a body may take to arrive (408 after).
    pub body_read_timeout: std::time::Duration,
    pub metrics: Metrics,
    pub refusals: Refusals,
    pub pixel: PixelConfig,
    pub click: ClickConfig,
    /// The HMAC signatures accepted, each once.
    pub replays: crate::replay::Replays,
    /// `/click`'s rate per client address (`None`: unlimited).
    pub click_limit: Option<crate::client_limit::ClientLimiter>,
    /// [`OPENAPI`] with this instance's events and statuses ([`openapi_for`]).
    pub openapi: String,
}

/// The OpenAPI document of these routes (`ingest/openapi.json`), with the default
/// pipeline's events and statuses.
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// The document as this instance serves it at `/openapi.json`: `event` and `status`
/// list the events and statuses it accepts (the pipeline's), so that a client or a
/// schema-driven tester reading it knows what is refused with 422.
pub fn openapi_for(rules: &PostbackRules) -> String {
    let Ok(mut doc) = serde_json::from_str::<serde_json::Value>(OPENAPI) else {
        return OPENAPI.to_string();
    };
    let events = serde_json::json!(rules.events);
    // An empty or null status reads as absent: the default status.
    let mut statuses = rules.statuses.clone();
    statuses.push(String::new());
    let statuses = serde_json::json!(statuses);
    let mut statuses_or_null = statuses.clone();
    if let Some(list) = statuses_or_null.as_array_mut() {
        list.push(serde_json::Value::Null);
    }
    let fields = &mut doc["components"]["schemas"]["PostbackFields"]["properties"];
    fields["event"]["enum"] = events.clone();
    fields["status"]["enum"] = statuses_or_null;
    let form = &mut doc["components"]["schemas"]["PostbackForm"]["properties"];
    form["event"]["enum"] = events.clone();
    form["status"]["enum"] = statuses.clone();
    if let Some(paths) = doc["paths"].as_object_mut() {
        for (path, item) in paths.iter_mut() {
            if !path.starts_with("/postback") {
                continue;
            }
            for op in item
                .as_object_mut()
                .into_iter()
                .flat_map(|o| o.values_mut())
            {
                for p in op["parameters"].as_array_mut().into_iter().flatten() {
                    match p["name"].as_str() {
                        Some("event") => p["schema"]["enum"] = events.clone(),
                        Some("status") => p["schema"]["enum"] = statuses.clone(),
                        _ => {}
                    }
                }
            }
        }
    }
    serde_json::to_string_pretty(&doc).unwrap_or_else(|_| OPENAPI.to_string())
}

/// Every route with its methods: the single list the router and the OpenAPI check use.
pub const ROUTES: [(&str, &[&str]); 10] = [
    ("/click", &["GET"]),
    ("/postback", &["GET", "POST"]),
    ("/postback/{source}", &["GET", "POST"]),
    ("/v1/postbacks", &["POST"]),
    ("/v1/postbacks/{source}", &["POST"]),
    ("/v1/clicks", &["POST"]),
    ("/v1/clicks/{source}", &["POST"]),
    ("/openapi.json", &["GET"]),
    ("/pixel", &["GET"]),
    ("/iframe", &["GET"]),
];

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route(ROUTES[0].0, get(click))
        .route(ROUTES[1].0, get(postback).post(postback))
        .route(ROUTES[2].0, get(postback).post(postback))
        .route(ROUTES[3].0, post(postback_batch))
        .route(ROUTES[4].0, post(postback_batch))
        .route(ROUTES[5].0, post(click_batch))
        .route(ROUTES[6].0, post(click_batch))
        .route(
            ROUTES[7].0,
            get(|State(app): State<Arc<App>>| async move {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    app.openapi.clone(),
                )
            }),
        )
        .route(ROUTES[8].0, get(browser::pixel))
        .route(ROUTES[9].0, get(browser::iframe))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(axum::middleware::from_fn_with_state(app.clone(), observe))
        .with_state(app)
}

/// Bounds URI and header size, then counts every request by route and status and times it.
async fn observe(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .and_then(|p| ROUTES.iter().find(|(r, _)| *r == p.as_str()))
        .map_or("unmatched", |(r, _)| *r);
    let started = Instant::now();
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len())
        .sum();
    let uri_bytes = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    let resp = if uri_bytes > MAX_URI_BYTES {
        ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("the request's URI exceeds {MAX_URI_BYTES} bytes"),
        )
        .into_response()
    } else if header_bytes > MAX_HEADER_BYTES {
        ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("request headers exceed {MAX_HEADER_BYTES} bytes"),
        )
        .into_response()
    } else {
        next.run(req).await
    };
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

/// A record ingest publishes (its kind, `WireRecord::KIND`, labels its metrics).
trait Record: WireRecord {
    /// The topic this kind of record goes to.
    fn topic(app: &App) -> &str;
    fn click_id(&self) -> &str;
    /// The ID reported back to the caller.
    fn id(&self) -> &str;
}

impl Record for Click {
    fn topic(app: &App) -> &str {
        &app.clicks_topic
    }
    fn click_id(&self) -> &str {
        &self.click_id
    }
    fn id(&self) -> &str {
        &self.click_id
    }
}

impl Record for Postback {
    fn topic(app: &App) -> &str {
        &app.postbacks_topic
    }
    fn click_id(&self) -> &str {
        &self.click_id
    }
    fn id(&self) -> &str {
        &self.postback_id
    }
}

/// What an admitted request carries on.
struct Admitted {
    source: Arc<Source>,
    meta: RequestMeta,
    pairs: Pairs,
    body: Bytes,
    /// A signed request's signature, reserved: released if the request stores nothing.
    signed: Option<crate::replay::Signed>,
}

impl App {
    /// Publishes a record keyed by click ID; a failure is a 503.
    async fn publish<R: Record>(&self, record: &R) -> Result<(), ApiError> {
        self.publisher
            .send(R::topic(self), partition_key(record.click_id()), record)
            .await
            .map_err(|e| match e {
                PublishError::QueueFull => {
                    ApiError::unavailable("ingest is overloaded (producer queue full); retry later")
                }
                other => ApiError::unavailable(format!("event not stored, retry later: {other}")),
            })
    }

    /// The one place a record's outcome is counted and logged.
    fn count<T>(&self, kind: &'static str, result: &Result<T, ApiError>) {
        let outcome = match result {
            Ok(_) => "accepted",
            Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => {
                tracing::warn!(kind, error = %e.message, "record not stored");
                "unavailable"
            }
            Err(e) => {
                tracing::debug!(kind, code = e.code, error = %e.message, "record rejected");
                "invalid"
            }
        };
        self.metrics
            .records
            .with_label_values(&[kind, outcome])
            .inc();
    }

    /// A click that gets no click ID: to the fallback URL, or 403 with the reason.
    /// Counted here, once; nothing was stored.
    fn not_issued(&self, why: NotIssued, click: &Click) -> Result<Response, ApiError> {
        self.metrics
            .clicks_not_issued
            .with_label_values(&[why.as_str()])
            .inc();
        tracing::debug!(offer_id = %click.offer_id, aff_id = %click.aff_id,
            reason = why.as_str(), "click not issued");
        match &self.click.fallback_url {
            Some(url) => Ok((StatusCode::FOUND, [(header::LOCATION, url.clone())]).into_response()),
            None => Err(not_issued_error(why, click)),
        }
    }

    /// Publishes the refusal event of a record answered `err`, if it is one (a 4xx).
    fn refused(&self, kind: &'static str, origin: &Origin<'_>, pairs: &Pairs, err: &ApiError) {
        if is_refusal(err) {
            self.refusals.record(kind, origin, pairs, err);
        }
    }

    /// Where a request came from, for its refusal events.
    fn origin<'a>(
        &self,
        source: Option<&'a str>,
        peer: SocketAddr,
        parts: &'a Parts,
    ) -> Origin<'a> {
        Origin {
            source: source.unwrap_or("default"),
            client_ip: Some(
                self.proxies
                    .client_ip(peer.ip(), &parts.headers)
                    .to_string(),
            ),
            path: parts.uri.path(),
        }
    }

    /// The source `name`: the config file's, else the catalog's.
    fn source(&self, name: &str) -> Option<Arc<Source>> {
        self.sources
            .get(name)
            .cloned()
            .or_else(|| self.catalog.current().source(name))
    }

    /// Source lookup (404), IP allow-list (403), rate limit (429), body size (413), query
    /// parsing, and authentication (401) over the body (POST) or the raw query (GET).
    async fn admit(
        &self,
        source: Option<String>,
        peer: SocketAddr,
        parts: &Parts,
        body: Body,
    ) -> Result<Admitted, ApiError> {
        let headers = &parts.headers;
        let name = source.as_deref().unwrap_or("default");
        let source = self.source(name).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_source",
                format!("source '{name}' is not configured"),
            )
        })?;
        let ip = self.proxies.client_ip(peer.ip(), headers);
        source.check_ip(ip)?;
        source.check_rate()?;
        let body = tokio::time::timeout(
            self.body_read_timeout,
            axum::body::to_bytes(body, self.max_body_bytes),
        )
        .await
        .map_err(|_| {
            // Answered with the body unread: hyper closes the connection after it.
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within {:?}",
                    self.body_read_timeout
                ),
            )
        })?
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body exceeds {} bytes", self.max_body_bytes),
            )
        })?;
        let query = parts.uri.query().unwrap_or_default();
        let mut pairs = parse_urlencoded(query.as_bytes())?;
        // `token` is reserved for authentication and never stored.
        let token = take(&mut pairs, "token")?;
        let payload = if parts.method == Method::POST {
            &body[..]
        } else {
            query.as_bytes()
        };
        let now_s = now_ms() / 1000;
        let signed = source.authenticate(headers, token.as_deref(), payload, now_s)?;
        if let Some(s) = signed {
            self.replays.first_use(s, now_s)?;
        }
        Ok(Admitted {
            source,
            meta: request_meta(ip, headers),
            pairs,
            body,
            signed,
        })
    }
}

/// Who sent a request: client address, user agent and referrer (each bounded).
fn request_meta(ip: std::net::IpAddr, headers: &HeaderMap) -> RequestMeta {
    let h = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(1024).collect::<String>())
    };
    RequestMeta {
        ip: Some(ip.to_string()),
        user_agent: h(header::USER_AGENT),
        referrer: h(header::REFERER),
    }
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The 403 of a click that gets no click ID, naming the field that decided it.
fn not_issued_error(why: NotIssued, click: &Click) -> ApiError {
    let (field, what) = match why {
        NotIssued::OfferPaused => ("offer_id", format!("offer '{}'", click.offer_id)),
        _ => ("aff_id", format!("affiliate '{}'", click.aff_id)),
    };
    ApiError::new(
        StatusCode::FORBIDDEN,
        why.as_str(),
        format!("{what} gets no clicks ({})", why.as_str().replace('_', " ")),
    )
    .field(field)
}

/// A POST of a signed source is signed over its body: what its query string says is
/// not covered, so it is refused rather than stored unsigned.
fn unsigned_parameter(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "unsigned_parameter",
        format!(
            "'{name}' is in the query string of a signed POST, whose signature covers only \
             its body: send it in the body"
        ),
    )
    .field(name.to_string())
}

/// A batch's fields are in its records: a query parameter (other than `token`) would
/// apply to none of them, so it is refused rather than ignored.
fn not_in_batch(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "unexpected_parameter",
        format!(
            "'{name}' is in the query string of a batch, whose fields are in its records: \
             put it in each record"
        ),
    )
    .field(name.to_string())
}

fn given_twice(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "duplicate_parameter",
        format!("'{name}' is given both in the query string and in the body: give it once"),
    )
    .field(name.to_string())
}

fn unsupported(ct: &str, supported: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!("Content-Type '{ct}' is not supported; use {supported}"),
    )
}

async fn click(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, _) = req.into_parts();
    let headers = &parts.headers;
    let result = async {
        let ip = app.proxies.client_ip(peer.ip(), headers);
        if let Some(limit) = &app.click_limit {
            limit.check(ip)?;
        }
        let pairs = parse_urlencoded(parts.uri.query().unwrap_or_default().as_bytes())?;
        let meta = request_meta(ip, headers);
        let catalog = app.catalog.current();
        let (click, location) = build_click(pairs, &catalog.offers, meta, new_ulid(), now_ms())?;
        if let Some(why) = catalog.refuses_click(&click.offer_id, &click.aff_id) {
            return Ok(Err((why, click)));
        }
        app.publish(&click).await?;
        Ok(Ok((location, app.pixel.set_cookie(&click.click_id))))
    }
    .await;
    let issued = match result {
        Ok(Err((why, click))) => return app.not_issued(why, &click),
        Ok(Ok(issued)) => Ok(issued),
        Err(e) => Err(e),
    };
    app.count("click", &issued);
    let (location, cookie) = issued?;
    let mut resp = (StatusCode::FOUND, [(header::LOCATION, location)]).into_response();
    if let Some(c) = cookie.and_then(|c| header::HeaderValue::try_from(c).ok()) {
        resp.headers_mut().insert(header::SET_COOKIE, c);
    }
    Ok(resp)
}

async fn postback(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    source: Option<Path<String>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let source = source.map(|p| p.0);
    // The body as read, for a refusal's parameters (only looked at on a refusal).
    let mut read_body = Bytes::new();
    let mut signed = None;
    let result = async {
        let a = app.admit(source.clone(), peer, &parts, body).await?;
        read_body = a.body.clone();
        signed = a.signed;
        let mut pairs = a.pairs;
        if let (Some(_), Some((name, _))) = (a.signed, pairs.first()) {
            if parts.method == Method::POST {
                return Err(unsigned_parameter(name));
            }
        }
        if parts.method == Method::POST && !a.body.is_empty() {
            let ct = content_type(&parts.headers);
            let body_pairs = match ct.as_str() {
                "application/json" => parse_json_object(&a.body)?,
                "application/x-www-form-urlencoded" | "" => parse_urlencoded(&a.body)?,
                other => {
                    return Err(unsupported(
                        other,
                        "application/x-www-form-urlencoded or application/json",
                    ))
                }
            };
            // A name in both the query string and the body is given twice: refused, as
            // within either, rather than settled by a precedence the sender may not know.
            if let Some((name, _)) = pairs
                .iter()
                .find(|(n, _)| body_pairs.iter().any(|(b, _)| b == n))
            {
                return Err(given_twice(name));
            }
            pairs.extend(body_pairs);
        }
        a.source.apply_aliases(&mut pairs);
        let pb = build_postback(
            pairs,
            &app.rules,
            Some(&a.source.name),
            a.meta,
            new_ulid(),
            now_ms(),
        )?;
        app.publish(&pb).await?;
        Ok(pb)
    }
    .await;
    app.count("postback", &result);
    if let (Err(_), Some(s)) = (&result, signed) {
        // Nothing stored: the operator's retry with the same signature is taken.
        app.replays.release(s);
    }
    if let Err(e) = &result {
        let mut pairs =
            parse_urlencoded(parts.uri.query().unwrap_or_default().as_bytes()).unwrap_or_default();
        if !read_body.is_empty() {
            let body = match content_type(&parts.headers).as_str() {
                "application/json" => parse_json_object(&read_body),
                _ => parse_urlencoded(&read_body),
            };
            pairs.extend(body.unwrap_or_default());
        }
        app.refused(
            "postback",
            &app.origin(source.as_deref(), peer, &parts),
            &pairs,
            e,
        );
    }
    let pb = result?;
    Ok(Json(Accepted {
        status: "accepted",
        postback_id: &pb.postback_id,
        click_id: &pb.click_id,
    })
    .into_response())
}

/// The answer to an accepted postback.
#[derive(Serialize)]
struct Accepted<'a> {
    status: &'static str,
    postback_id: &'a str,
    click_id: &'a str,
}

async fn postback_batch(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    source: Option<Path<String>>,
    req: Request,
) -> Result<Response, ApiError> {
    run_batch::<Postback>(&app, (source.map(|p| p.0), peer, req), |a, mut pairs| {
        a.source.apply_aliases(&mut pairs);
        build_postback(
            pairs,
            &app.rules,
            Some(&a.source.name),
            a.meta.clone(),
            new_ulid(),
            now_ms(),
        )
    })
    .await
}

async fn click_batch(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    source: Option<Path<String>>,
    req: Request,
) -> Result<Response, ApiError> {
    run_batch::<Click>(&app, (source.map(|p| p.0), peer, req), |_, pairs| {
        let catalog = app.catalog.current();
        let click = build_operator_click(pairs, &catalog.offers, now_ms())?;
        match catalog.refuses_click(&click.offer_id, &click.aff_id) {
            None => Ok(click),
            Some(why) => Err(not_issued_error(why, &click)),
        }
    })
    .await
}

#[derive(Serialize)]
struct ItemResult {
    index: usize,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<serde_json::Value>,
}

/// Admits a batch request, validates every record, publishes the valid ones
/// concurrently, and reports each. A refused request (source, address, limit, auth, body,
/// content type, unparseable batch) counts as one invalid record.
async fn run_batch<R: Record>(
    app: &App,
    (source, peer, req): (Option<String>, SocketAddr, Request),
    build: impl Fn(&Admitted, Pairs) -> Result<R, ApiError>,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let origin = app.origin(source.as_deref(), peer, &parts);
    let mut reserved = None;
    let admitted = async {
        // The batch routes take POST only (405 otherwise), so authentication is over the body.
        let a = app.admit(source.clone(), peer, &parts, body).await?;
        reserved = a.signed;
        if let Some((name, _)) = a.pairs.first() {
            return Err(not_in_batch(name));
        }
        let ct = content_type(&parts.headers);
        if !matches!(
            ct.as_str(),
            "application/json" | "application/x-ndjson" | ""
        ) {
            return Err(unsupported(&ct, "application/json or application/x-ndjson"));
        }
        let records = parse_batch(&ct, &a.body)?;
        Ok((a, records))
    }
    .await;
    if let Err(e) = &admitted {
        app.count(R::KIND, &admitted);
        if let Some(s) = reserved {
            app.replays.release(s);
        }
        let query = parse_urlencoded(parts.uri.query().unwrap_or_default().as_bytes());
        app.refused(R::KIND, &origin, &query.unwrap_or_default(), e);
    }
    let (a, records) = admitted?;
    let built: Vec<Result<R, ApiError>> = records
        .into_iter()
        .map(|r| r.and_then(|pairs| build(&a, pairs)))
        .collect();
    let published = join_all(built.iter().map(|r| async move {
        match r {
            Ok(record) => app.publish(record).await.map(|()| record.id().to_string()),
            Err(e) => Err(e.clone()),
        }
    }))
    .await;
    if published.iter().any(|r| r.as_ref().is_err_and(is_refusal)) {
        // The records' own fields, parsed again: only when some were refused.
        let again = parse_batch(&content_type(&parts.headers), &a.body).unwrap_or_default();
        for (i, r) in published.iter().enumerate() {
            if let Err(e) = r {
                let pairs = again.get(i).and_then(|p| p.as_ref().ok());
                app.refused(R::KIND, &origin, pairs.unwrap_or(&Vec::new()), e);
            }
        }
    }
    let (mut rejected, mut unavailable) = (0, 0);
    let results: Vec<ItemResult> = published
        .into_iter()
        .enumerate()
        .map(|(index, r)| {
            app.count(R::KIND, &r);
            match r {
                Ok(id) => ItemResult {
                    index,
                    status: "accepted",
                    id: Some(id),
                    error: None,
                },
                Err(e) => {
                    let status = if e.status == StatusCode::SERVICE_UNAVAILABLE {
                        unavailable += 1;
                        "unavailable"
                    } else {
                        rejected += 1;
                        "rejected"
                    };
                    ItemResult {
                        index,
                        status,
                        id: None,
                        error: Some(e.body()),
                    }
                }
            }
        })
        .collect();
    let status = if unavailable > 0 {
        StatusCode::SERVICE_UNAVAILABLE
    } else if rejected > 0 {
        StatusCode::MULTI_STATUS
    } else {
        StatusCode::OK
    };
    let accepted = results.len() - rejected - unavailable;
    if let (0, Some(s)) = (accepted, a.signed) {
        // Nothing stored: the batch may be sent again with the same signature.
        app.replays.release(s);
    }
    let mut resp = (
        status,
        Json(serde_json::json!({
            "accepted": accepted,
            "rejected": rejected,
            "unavailable": unavailable,
            "results": results,
        })),
    )
        .into_response();
    if unavailable > 0 {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(1));
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_document_lists_this_instances_vocabulary() {
        let rules = PostbackRules {
            events: vec!["signup".into(), "sale".into()],
            statuses: vec!["ok".into()],
            default_status: "ok".into(),
            max_event_time_skew: std::time::Duration::from_secs(300),
            max_event_time_age: std::time::Duration::from_secs(86_400),
        };
        let doc: serde_json::Value =
            serde_json::from_str(&openapi_for(&rules)).expect("a JSON document");
        let schemas = &doc["components"]["schemas"];
        assert_eq!(
            schemas["PostbackFields"]["properties"]["event"]["enum"],
            serde_json::json!(["signup", "sale"])
        );
        assert_eq!(
            schemas["PostbackFields"]["properties"]["status"]["enum"],
            serde_json::json!(["ok", "", null])
        );
        assert_eq!(
            schemas["PostbackForm"]["properties"]["status"]["enum"],
            serde_json::json!(["ok", ""])
        );
        let get = &doc["paths"]["/postback"]["get"]["parameters"];
        let event = get
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == "event"))
            .expect("an event parameter");
        assert_eq!(
            event["schema"]["enum"],
            serde_json::json!(["signup", "sale"])
        );
        // Everything else as checked in.
        let file: serde_json::Value = serde_json::from_str(OPENAPI).expect("JSON");
        assert_eq!(doc["paths"]["/click"], file["paths"]["/click"]);
    }
}
