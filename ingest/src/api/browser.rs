//! `GET /pixel` and `GET /iframe`: a postback from a browser, for operators who cannot
//! call `/postback` from their server yet. Always the same answer (a 1×1 GIF, an empty
//! page), whatever happened: a browser can neither retry nor read an error.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use s2s_common::contract::Trust;
use s2s_common::ids::new_ulid;
use s2s_common::now_ms;

use super::{request_meta, App};
use crate::error::ApiError;
use crate::params::{parse_urlencoded, take};
use crate::records::build_postback;

/// A transparent 1×1 GIF.
pub const GIF: &[u8] = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff\x21\xf9\x04\x01\x00\x00\x00\x00\x2c\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02\x44\x01\x00\x3b";

/// What `/iframe` answers.
const EMPTY_PAGE: &str = "<!doctype html><title></title>";

pub(super) async fn pixel(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let postback_id = browser_postback(&app, peer, req).await;
    browser_answer("image/gif", GIF.to_vec(), postback_id)
}

pub(super) async fn iframe(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let postback_id = browser_postback(&app, peer, req).await;
    browser_answer("text/html; charset=utf-8", EMPTY_PAGE.into(), postback_id)
}

/// The same answer whatever happened (a browser can neither retry nor read an error),
/// never cached; `X-Postback-Id` names the postback when it was stored.
fn browser_answer(
    content_type: &'static str,
    body: Vec<u8>,
    postback_id: Option<String>,
) -> Response {
    let mut resp = (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store, no-cache, must-revalidate"),
        ],
        body,
    )
        .into_response();
    if let Some(id) = postback_id.and_then(|id| header::HeaderValue::try_from(id).ok()) {
        resp.headers_mut().insert("x-postback-id", id);
    }
    resp
}

/// The value of cookie `name` in the request's `Cookie` headers. (One name in one header:
/// a cookie crate would bring more than it saves.)
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
}

/// A postback from a browser: `/postback`'s parameters, the click ID from the query or the
/// cookie, `trust = "pixel"`. Stored only when `[pixel]` is enabled; every outcome is
/// counted (kind `pixel`), refusals published like the other routes'. Returns the stored
/// postback's ID.
async fn browser_postback(app: &App, peer: SocketAddr, req: Request) -> Option<String> {
    let (parts, _) = req.into_parts();
    let query = parts.uri.query().unwrap_or_default();
    let ip = app.proxies.client_ip(peer.ip(), &parts.headers);
    let result = async {
        if !app.pixel.enabled {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "pixel_disabled",
                "pixel and iframe conversions are off ([pixel] enabled = false)",
            ));
        }
        let mut pairs = parse_urlencoded(query.as_bytes())?;
        // `token` is never stored, as on the other routes.
        take(&mut pairs, "token")?;
        let from_cookie = app
            .pixel
            .cookie
            .as_deref()
            .and_then(|n| cookie(&parts.headers, n));
        if !pairs.iter().any(|(n, v)| n == "click_id" && !v.is_empty()) {
            if let Some(id) = from_cookie {
                pairs.push(("click_id".into(), id));
            }
        }
        let mut pb = build_postback(
            pairs,
            &app.rules,
            None,
            request_meta(ip, &parts.headers),
            new_ulid(),
            now_ms(),
        )?;
        pb.trust = Trust::Pixel;
        app.publish(&pb).await?;
        Ok(pb.postback_id)
    }
    .await;
    app.count("pixel", &result);
    if let Err(e) = &result {
        let pairs = parse_urlencoded(query.as_bytes()).unwrap_or_default();
        app.refused("pixel", &app.origin(Some("pixel"), peer, &parts), &pairs, e);
    }
    result.ok()
}
