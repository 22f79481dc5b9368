//! The console's router against its OpenAPI document, and its authentication: every
//! documented route answers its documented methods and refuses the others with a JSON
//! 405; every `/api/` route refuses a request without a valid operator token.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use s2s_console::api::{router, ApiState, OPENAPI, ROUTES};
use s2s_console::schema::StoreSet;
use s2s_state::{Limits, Ownership};
use tower::ServiceExt;

const TOKEN: &str = "operator-token-0123456789";
/// Catalog operators: a viewer and an operator.
const VIEWER: &str = "viewer-token-0123456789";
const OPERATOR: &str = "refirer-token-0123456789";

fn app(dir: &std::path::Path) -> axum::Router {
    let registry = prometheus::Registry::new();
    let metrics = s2s_console::metrics::Metrics::new(&registry).expect("metrics");
    let stores = StoreSet::new(
        dir,
        Limits {
            block_cache_bytes: 1 << 20,
            write_buffer_bytes: 1 << 20,
            retention_ms: vec![],
        },
    );
    let kafka = s2s_common::kafka::KafkaConfig {
        bootstrap_servers: "127.0.0.1:9".into(),
        properties: Default::default(),
    };
    let stats = s2s_common::kafka_stats::KafkaStats::new(
        &registry,
        "test",
        s2s_common::ops::Health::default(),
    )
    .expect("stats");
    let producer: rdkafka::producer::FutureProducer<_> = kafka
        .producer_config()
        .create_with_context(stats)
        .expect("producer");
    let backfills = Arc::new(s2s_console::backfill::Backfills::new(
        kafka.clone(),
        "conversions".into(),
        "commands".into(),
        producer.clone(),
        metrics.clone(),
    ));
    let state = ApiState {
        ownership: Arc::new(Ownership::new(stores, vec![], None)),
        producer,
        commands_topic: "commands".into(),
        inputs: vec!["clicks".into()],
        operators: vec![("alice".into(), TOKEN.into())],
        catalog_operators: s2s_catalog::Live::fixed(
            [
                (VIEWER, "val", s2s_catalog::documents::Role::Viewer),
                (OPERATOR, "otto", s2s_catalog::documents::Role::Operator),
            ]
            .into_iter()
            .map(|(token, name, role)| {
                (
                    s2s_catalog::secrets::digest(token),
                    (name.to_string(), role),
                )
            })
            .collect(),
        ),
        metrics,
        feed: tokio::sync::broadcast::channel(4).0,
        catalog: catalog_api(&kafka),
        backfills,
    };
    router(Arc::new(state))
}

/// The catalog API without a broker: an empty catalog, never elected writer.
fn catalog_api(kafka: &s2s_common::kafka::KafkaConfig) -> s2s_console::api::catalog::CatalogApi {
    let stop = tokio_util::sync::CancellationToken::new();
    let catalog = Arc::new(s2s_catalog::Follower::fixed(s2s_catalog::Catalog::default()));
    s2s_console::api::catalog::CatalogApi {
        checks: s2s_console::catalog_checks(
            &s2s_common::pipeline::PipelineConfig::defaults().postbacks,
        )
        .expect("checks"),
        secret_key: None,
        advertised_url: None,
        ingest_public_url: None,
        client: reqwest::Client::new(),
        history: s2s_catalog::Follower::fixed(s2s_catalog::History::default()),
        election: s2s_catalog::Election::join(kafka, "g", "catalog", &stop).expect("candidate"),
        writer: s2s_catalog::Writer::new(
            kafka,
            "catalog",
            "audit",
            Arc::clone(&catalog),
            std::time::Duration::from_secs(1),
        )
        .expect("writer"),
        catalog,
    }
}

async fn call(
    app: &axum::Router,
    method: Method,
    uri: &str,
    token: Option<&str>,
) -> (StatusCode, String) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{}"))
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("response");
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_openapi_document_and_the_router_agree() {
    let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("the document is JSON");
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .expect("operations")
                .keys()
                .map(move |m| (path.clone(), m.to_uppercase()))
        })
        .collect();
    let routes: BTreeSet<(String, String)> = ROUTES
        .iter()
        .flat_map(|(p, ms)| ms.iter().map(|m| (p.to_string(), m.to_string())))
        .collect();
    assert_eq!(documented, routes, "openapi.json and api::ROUTES differ");

    let dir = tempfile::tempdir().expect("dir");
    let app = app(dir.path());
    for (path, methods) in ROUTES {
        let concrete = path
            .replace("{click_id}", "c1")
            .replace("{delivery_id}", "d1")
            .replace("{kind}", "offer")
            .replace("{id}", "o1");
        if path == "/api/v1/feed" {
            continue; // a stream that never ends; its auth is checked below
        }
        for method in [Method::GET, Method::POST, Method::PUT, Method::DELETE] {
            let (status, body) = call(&app, method.clone(), &concrete, Some(TOKEN)).await;
            if methods.contains(&method.as_str()) {
                assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
                assert!(
                    !status.is_server_error(),
                    "{method} {path}: {status} {body}"
                );
            } else {
                assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
                assert!(body.contains("method_not_allowed"), "{body}");
            }
        }
    }
}

#[tokio::test]
async fn the_api_needs_an_operator_token_and_the_page_does_not() {
    let dir = tempfile::tempdir().expect("dir");
    let app = app(dir.path());
    for (path, methods) in ROUTES.iter().filter(|(p, _)| p.starts_with("/api/")) {
        let concrete = path
            .replace("{click_id}", "c1")
            .replace("{delivery_id}", "d1")
            .replace("{kind}", "offer")
            .replace("{id}", "o1");
        let method = Method::from_bytes(methods[0].as_bytes()).expect("method");
        for token in [None, Some("wrong-token-0123456789")] {
            let (status, body) = call(&app, method.clone(), &concrete, token).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} with {token:?}");
            assert!(body.contains("\"unauthorized\""), "{body}");
        }
    }
    let (status, body) = call(&app, Method::GET, "/", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("S2S postback console"));
    let (status, body) = call(&app, Method::GET, "/api/v1/clicks/nobody", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("nothing is known of click nobody"), "{body}");
    let (status, body) = call(
        &app,
        Method::GET,
        "/api/v1/conversions?cursor=zz",
        Some(TOKEN),
    )
    .await;
    assert_eq!(
        (status, body.contains("bad_cursor")),
        (StatusCode::BAD_REQUEST, true),
        "{body}"
    );
    let (status, body) = call(&app, Method::GET, "/api/v1/totals?by=planet", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _) = call(
        &app,
        Method::POST,
        "/api/v1/deliveries/none/refire",
        Some(TOKEN),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "re-fire of an unknown delivery"
    );
}

/// Query strings carry only text; the shared window (`from`, `to`, `limit`) must be read
/// as numbers on every list route, and a non-number named in a 400.
#[tokio::test]
async fn every_list_route_reads_its_window_from_the_query_string() {
    let dir = tempfile::tempdir().expect("dir");
    let app = app(dir.path());
    for path in [
        "/api/v1/conversions",
        "/api/v1/rejections",
        "/api/v1/deliveries",
        "/api/v1/dead-letters",
    ] {
        let uri = format!("{path}?from=1000&to=2000&limit=50&aff_id=a1&endpoint=e");
        let (status, body) = call(&app, Method::GET, &uri, Some(TOKEN)).await;
        assert_eq!(status, StatusCode::OK, "{uri}: {body}");
        assert!(body.contains("\"items\":[]"), "{uri}: {body}");
        let (status, body) =
            call(&app, Method::GET, &format!("{path}?limit=ten"), Some(TOKEN)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert!(
            body.contains("\\\"ten\\\" is not a number"),
            "{path}: {body}"
        );
    }
    let (status, body) = call(
        &app,
        Method::GET,
        "/api/v1/totals?from=1000&to=2000&granularity=day",
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Roles: a viewer reads; an operator reads and re-fires; only an admin (the config
/// file's operators, or the catalog's admins) changes the catalog.
#[tokio::test]
async fn every_role_boundary_holds() {
    let dir = tempfile::tempdir().expect("dir");
    let app = app(dir.path());
    let catalog_change = [
        (Method::PUT, "/api/v1/catalog/offer/o1"),
        (Method::DELETE, "/api/v1/catalog/offer/o1"),
    ];
    let refires = [
        (Method::POST, "/api/v1/deliveries/none/refire"),
        (Method::POST, "/api/v1/dead-letters/refire"),
        (Method::POST, "/api/v1/catalog/postback/p1/backfills"),
        (Method::POST, "/api/v1/catalog/postback/p1/test"),
    ];
    for token in [VIEWER, OPERATOR] {
        let (status, body) = call(&app, Method::GET, "/api/v1/catalog/offer", Some(token)).await;
        assert_eq!(status, StatusCode::OK, "{token} reads: {body}");
        for (method, uri) in &catalog_change {
            let (status, body) = call(&app, method.clone(), uri, Some(token)).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{method} {uri} as {token}");
            assert!(body.contains("needs role admin"), "{body}");
        }
    }
    for (method, uri) in &refires {
        let (status, body) = call(&app, method.clone(), uri, Some(VIEWER)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{uri} as a viewer: {body}");
        assert!(body.contains("needs role operator"), "{body}");
        let (status, _) = call(&app, method.clone(), uri, Some(OPERATOR)).await;
        assert_ne!(status, StatusCode::FORBIDDEN, "{uri} as an operator");
    }
    let (status, _) = call(&app, Method::PUT, "/api/v1/catalog/offer/o1", Some(TOKEN)).await;
    assert_ne!(
        status,
        StatusCode::FORBIDDEN,
        "an admin changes the catalog"
    );
}
