//! The real router, driven in-process:
//! - the OpenAPI document and the router agree: every documented (path, method) is routed,
//!   every other method on a documented path gets 405, and the router has no route the
//!   document lacks;
//! - random requests (property test) never panic, and publish exactly one record when
//!   answered 2xx/302 and none otherwise — checked with the high watermark of one-partition
//!   topics on librdkafka's MockCluster.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode};
use s2s_common::kafka_stats::KafkaStats;
use s2s_common::pipeline::ServiceConfig;
use s2s_common::template::Template;
use s2s_ingest::api::{router, App, OPENAPI, ROUTES};
use s2s_ingest::catalog::IngestCatalog;
use s2s_ingest::config::{AuthKind, IngestConfig, SourceConfig};
use tower::ServiceExt;

const TOKEN: &str = "tok-0123456789abcdef";
const CLICKS: &str = "prop-clicks";
const POSTBACKS: &str = "prop-postbacks";

/// An app whose producer talks to `bootstrap` (never contacted unless a request is valid).
fn app_on(bootstrap: &str) -> Arc<App> {
    let mut pipeline = s2s_ingest::config::PipelineConfig::defaults();
    pipeline.kafka.bootstrap_servers = bootstrap.to_string();
    let mut config: IngestConfig =
        s2s_common::config::load(s2s_ingest::config::DEFAULT_TOML, None, "S2S_TEST_NONE__")
            .expect("defaults");
    config = config.with_pipeline(pipeline);
    config.max_body_bytes = 2048;
    config.pixel.enabled = true;
    config
        .sources
        .insert("default".into(), SourceConfig::new(AuthKind::None));
    config.sources.insert(
        "acme".into(),
        SourceConfig {
            token: Some(TOKEN.into()),
            aliases: [("cid", "click_id"), ("goal", "event"), ("sum", "amount")]
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            ..SourceConfig::new(AuthKind::Token)
        },
    );
    let compiled = config.validate().expect("valid");
    let registry = prometheus::Registry::new();
    let metrics = s2s_ingest::metrics::Metrics::new(&registry).expect("metrics");
    let stats = KafkaStats::new(&registry, "ingest", Default::default()).expect("stats");
    // Never connected: creating a producer does not contact the broker.
    let producer: rdkafka::producer::FutureProducer<KafkaStats> = config
        .pipeline
        .kafka
        .producer_config()
        .create_with_context(stats)
        .expect("producer");
    let publisher = s2s_ingest::publish::Publisher::new(producer, metrics.produce_seconds.clone());
    let refusals = s2s_ingest::refusals::Refusals::new(
        publisher.clone(),
        "refusals".into(),
        std::num::NonZeroU32::MIN,
        compiled.sources.keys().cloned().collect(),
        &registry,
    )
    .expect("refusals");
    Arc::new(App {
        publisher,
        refusals,
        catalog: s2s_catalog::Live::fixed(IngestCatalog::of_offers(
            [(
                "1".to_string(),
                Template::parse(
                    "https://offer.example/?c={click_id}",
                    &s2s_common::pipeline::offer_macros(),
                )
                .expect("a template"),
            )]
            .into(),
        )),
        rules: config.postback.clone(),
        sources: compiled.sources,
        proxies: compiled.proxies,
        clicks_topic: CLICKS.into(),
        postbacks_topic: POSTBACKS.into(),
        max_body_bytes: config.max_body_bytes,
        body_read_timeout: config.body_read_timeout,
        metrics,
        pixel: config.pixel.clone(),
        click: config.click.clone(),
        replays: s2s_ingest::replay::Replays::new(config.max_replay_entries),
        click_limit: None,
        openapi: s2s_ingest::api::openapi_for(&config.postback),
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

    let app = router(app_on("127.0.0.1:9"));
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

mod random_requests {
    use super::*;
    use proptest::prelude::*;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::mocking::MockCluster;
    use rdkafka::ClientConfig;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Parameter names worth trying: canonical, aliases, reserved, and noise.
    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("click_id".to_string()),
            Just("cid".to_string()),
            Just("event".to_string()),
            Just("goal".to_string()),
            Just("amount".to_string()),
            Just("sum".to_string()),
            Just("currency".to_string()),
            Just("status".to_string()),
            Just("txn_id".to_string()),
            Just("token".to_string()),
            Just("offer_id".to_string()),
            Just("aff_id".to_string()),
            Just("sub1".to_string()),
            "[a-z_]{0,8}",
        ]
    }

    /// Values: plausible ones, edge cases, and arbitrary text.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("ftd".to_string()),
            Just("registration".to_string()),
            Just("approved".to_string()),
            Just("1".to_string()),
            Just("12.50".to_string()),
            Just("-3".to_string()),
            Just("NaN".to_string()),
            Just("1e400".to_string()),
            Just("EUR".to_string()),
            Just(TOKEN.to_string()),
            Just(String::new()),
            Just("%FF".to_string()),
            ".{0,40}",
            "[A-Za-z0-9]{1,12}",
        ]
    }

    fn encode(s: &str) -> String {
        // Keep some raw escapes ("%FF") as sent by broken clients; encode the rest.
        if s == "%FF" {
            return s.to_string();
        }
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    }

    #[derive(Debug, Clone)]
    struct Req {
        method: Method,
        path: String,
        query: Vec<(String, String)>,
        content_type: Option<&'static str>,
        body: Vec<u8>,
    }

    fn request() -> impl Strategy<Value = Req> {
        let path = prop_oneof![
            Just("/click".to_string()),
            Just("/click".to_string()),
            Just("/postback".to_string()),
            Just("/postback".to_string()),
            Just("/postback/acme".to_string()),
            Just("/postback/other".to_string()),
            Just("/v1/postbacks".to_string()),
            Just("/v1/clicks/acme".to_string()),
            Just("/pixel".to_string()),
            "/[a-z/]{0,12}",
        ];
        let ct = prop_oneof![
            Just(None),
            Just(Some("application/json")),
            Just(Some("application/x-www-form-urlencoded")),
            Just(Some("application/x-ndjson")),
            Just(Some("text/plain")),
        ];
        let pairs = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        };
        // Valid starting points, which the random extra pairs then may or may not spoil.
        let base = prop_oneof![
            1 => Just(Vec::new()),
            2 => Just(pairs(&[("click_id", "c1"), ("event", "ftd")])),
            2 => Just(pairs(&[("offer_id", "1"), ("aff_id", "a1")])),
            2 => Just(pairs(&[("cid", "c2"), ("goal", "registration"), ("token", TOKEN)])),
        ];
        let body = prop_oneof![
            Just(Vec::new()),
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::vec((name(), value()), 0..6).prop_map(|kv| {
                serde_json::Value::Object(
                    kv.into_iter()
                        .map(|(k, v)| (k, serde_json::Value::String(v)))
                        .collect(),
                )
                .to_string()
                .into_bytes()
            }),
            (name(), value()).prop_map(|(k, v)| {
                serde_json::json!([
                    {"click_id": "b1", "event": "ftd", "offer_id": "1", "aff_id": "x"},
                    {"click_id": "b2", "event": "deposit", "offer_id": "1", "aff_id": "y", k: v},
                ])
                .to_string()
                .into_bytes()
            }),
        ];
        (
            prop_oneof![3 => Just(Method::GET), 2 => Just(Method::POST), 1 => Just(Method::PUT)],
            path,
            (base, proptest::collection::vec((name(), value()), 0..3)),
            ct,
            body,
        )
            .prop_map(|(method, path, (mut query, extra), content_type, body)| {
                query.extend(extra);
                Req {
                    method,
                    path,
                    query,
                    content_type,
                    body,
                }
            })
    }

    fn high_watermark(c: &BaseConsumer, topic: &str) -> i64 {
        c.fetch_watermarks(topic, 0, Duration::from_secs(5))
            .expect("watermarks")
            .1
    }

    #[test]
    fn random_requests_never_panic_and_publish_only_when_accepted() {
        let mock = MockCluster::new(1).expect("mock cluster");
        for t in [CLICKS, POSTBACKS] {
            mock.create_topic(t, 1, 1).expect("topic");
        }
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        // The producer's delivery reports are served by a task on this runtime.
        let _in_runtime = rt.enter();
        let app = router(app_on(&mock.bootstrap_servers()));
        let watcher: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .create()
            .expect("consumer");
        let config = ProptestConfig {
            cases: 600,
            ..ProptestConfig::default()
        };
        let (accepted_cases, rejected_cases) = (AtomicUsize::new(0), AtomicUsize::new(0));
        proptest!(config, |(req in request())| {
            let before = high_watermark(&watcher, CLICKS) + high_watermark(&watcher, POSTBACKS);
            let query = req.query.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect::<Vec<_>>().join("&");
            let mut builder = Request::builder().method(req.method.clone()).uri(format!("{}?{query}", req.path));
            if let Some(ct) = req.content_type {
                builder = builder.header("content-type", ct);
            }
            let mut http_req = builder.body(Body::from(req.body.clone())).expect("request");
            http_req.extensions_mut().insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
            let resp = rt.block_on(app.clone().oneshot(http_req)).expect("response");
            let status = resp.status();
            let stored = resp.headers().contains_key("x-postback-id");
            let body = rt.block_on(axum::body::to_bytes(resp.into_body(), 1 << 20)).expect("body");
            let after = high_watermark(&watcher, CLICKS) + high_watermark(&watcher, POSTBACKS);
            prop_assert!(!status.is_server_error() || status == StatusCode::SERVICE_UNAVAILABLE, "{status} for {req:?}");
            let published = after - before;
            if published > 0 { &accepted_cases } else { &rejected_cases }.fetch_add(1, Ordering::Relaxed);
            if req.path.starts_with("/v1/") {
                // A batch publishes exactly the records it reports as accepted.
                let accepted = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["accepted"].as_i64())
                    .unwrap_or(0);
                prop_assert_eq!(published, accepted, "{} {:?}", status, req);
            } else if req.path == "/pixel" && req.method == Method::GET {
                // Always a GIF; stored when it names the postback.
                prop_assert_eq!(status, StatusCode::OK);
                prop_assert_eq!(published, i64::from(stored), "{:?}", req);
            } else {
                let ok = status.is_success() || status == StatusCode::FOUND;
                prop_assert_eq!(published, i64::from(ok), "{} {:?}", status, req);
            }
            if !(status.is_success() || status == StatusCode::FOUND) {
                let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON error body");
                prop_assert!(v["error"]["code"].is_string() || v["results"].is_array(), "{v}");
            }
        });
        let (a, r) = (accepted_cases.into_inner(), rejected_cases.into_inner());
        eprintln!("random requests: {a} published, {r} refused");
        assert!(
            a >= 10 && r >= 10,
            "the generator must exercise both sides: {a} published, {r} not"
        );
    }
}
