//! The OpenAPI document and the real router agree: every documented (path, method) is
//! routed, every other method on a documented path gets 405, and the router has no route
//! the document lacks. Drives the router in-process; no broker needed (no request here
//! gets as far as publishing).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode};
use s2s_common::kafka_stats::KafkaStats;
use s2s_ingest::api::{router, App, OPENAPI, ROUTES};
use s2s_ingest::config::IngestConfig;
use tower::ServiceExt;

fn app() -> Arc<App> {
    let config: IngestConfig =
        s2s_common::config::load(s2s_ingest::config::DEFAULT_TOML, None, "S2S_TEST_NONE__")
            .expect("defaults");
    let compiled = config.validate().expect("valid");
    let registry = prometheus::Registry::new();
    let metrics = s2s_ingest::metrics::Metrics::new(&registry).expect("metrics");
    let stats = KafkaStats::new(&registry, "ingest", Default::default()).expect("stats");
    // Never connected: creating a producer does not contact the broker.
    let producer = config
        .kafka
        .producer_config()
        .create_with_context(stats)
        .expect("producer");
    Arc::new(App {
        publisher: s2s_ingest::publish::Publisher::new(producer, metrics.produce_seconds.clone()),
        offers: compiled.offers,
        rules: config.postback.clone(),
        sources: compiled.sources,
        proxies: compiled.proxies,
        clicks_topic: "c".into(),
        postbacks_topic: "p".into(),
        max_body_bytes: config.max_body_bytes,
        metrics,
    })
}

fn documented() -> BTreeSet<(String, String)> {
    let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
    assert_eq!(doc["openapi"], "3.1.0");
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            out.insert((path.clone(), method.to_ascii_uppercase()));
        }
    }
    out
}

#[tokio::test]
async fn document_and_router_agree() {
    let doc = documented();
    let routes: BTreeSet<(String, String)> = ROUTES
        .iter()
        .flat_map(|(p, ms)| ms.iter().map(|m| (p.to_string(), m.to_string())))
        .collect();
    assert_eq!(doc, routes, "openapi.json and api::ROUTES differ");

    let app = router(app());
    let paths: BTreeSet<&String> = doc.iter().map(|(p, _)| p).collect();
    for path in paths {
        let concrete = path.replace("{source}", "no-such-source");
        for method in [
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::PATCH,
        ] {
            let mut req = Request::builder()
                .method(method.clone())
                .uri(&concrete)
                .body(Body::empty())
                .expect("request");
            req.extensions_mut()
                .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
            let resp = app.clone().oneshot(req).await.expect("response");
            let status = resp.status();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .expect("body");
            let is_documented = doc.contains(&(path.clone(), method.to_string()));
            if is_documented {
                assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
                let text = String::from_utf8_lossy(&body);
                assert!(
                    !text.contains("\"not_found\""),
                    "{method} {path} is not routed: {text}"
                );
            } else {
                assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            }
        }
    }
}
