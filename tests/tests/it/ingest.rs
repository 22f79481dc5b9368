//! Ingest over real HTTP on the real broker: every route, every error class, sources
//! (aliases, token, HMAC, allow-list) and batches. Topics have one partition here, so a
//! marker record sent last proves that nothing else was published before it.

use std::time::Duration;

use reqwest::StatusCode;
use s2s_common::contract::{Click, Postback, Trust};
use s2s_ingest::config::{AuthKind, SourceConfig};
use s2s_ingest::source::sign;
use s2s_tests::{http, ingest_config, topics, IngestHandle, TopicReader};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "tok-0123456789abcdef";
const HMAC_KEY: &str = "hmac-0123456789abcdef";

/// A JSON POST to `url` signed with `key` at `ts` over `body`, as an HMAC source sends it.
fn signed_post(
    c: &reqwest::Client,
    url: String,
    key: &str,
    ts: i64,
    body: &'static str,
) -> reqwest::RequestBuilder {
    c.post(url)
        .header("content-type", "application/json")
        .header("x-timestamp", ts.to_string())
        .header("x-signature", sign(key, ts, body.as_bytes()))
        .body(body)
}

fn source(auth: AuthKind, allow: &[&str]) -> SourceConfig {
    SourceConfig {
        token: Some(TOKEN.into()),
        hmac_secret: Some(HMAC_KEY.into()),
        aliases: [
            ("clickid", "click_id"),
            ("goal", "event"),
            ("payout", "amount"),
            ("txid", "txn_id"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect(),
        allow_ips: allow.iter().map(|s| s.to_string()).collect(),
        ..SourceConfig::new(auth)
    }
}

async fn start() -> (IngestHandle, s2s_common::topics::TopicsConfig) {
    let topics = topics(1);
    s2s_tests::seed_catalog(&topics, &s2s_tests::catalog_with_offer_1()).await;
    let mut c = ingest_config(&topics);
    c.max_body_bytes = 4096;
    c.sources
        .insert("acme".into(), source(AuthKind::Token, &[]));
    c.sources
        .insert("signed".into(), source(AuthKind::Hmac, &[]));
    c.sources
        .insert("walled".into(), source(AuthKind::None, &["192.0.2.0/24"]));
    let mut throttled = source(AuthKind::None, &[]);
    throttled.rate_limit_per_second = Some(1);
    c.sources.insert("throttled".into(), throttled);
    (IngestHandle::start(c).await, topics)
}

async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("a JSON error body");
    (status, body["error"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_class_is_json_and_publishes_nothing() {
    let (ingest, topics) = start().await;
    let c = http();
    let get = |p: &str| c.get(ingest.url(p)).send();
    let cases: Vec<(reqwest::Response, u16, &str)> = vec![
        (get("/nope").await.expect("req"), 404, "not_found"),
        (
            c.delete(ingest.url("/postback")).send().await.expect("req"),
            405,
            "method_not_allowed",
        ),
        (
            get("/click?offer_id=1").await.expect("req"),
            400,
            "missing_field",
        ),
        (
            get("/click?offer_id=2&aff_id=1").await.expect("req"),
            404,
            "unknown_offer",
        ),
        (
            get("/postback?click_id=c&event=ftd&amount=1e999")
                .await
                .expect("req"),
            400,
            "invalid_amount",
        ),
        (
            get("/postback?click_id=c&event=ftd&currency=EURO")
                .await
                .expect("req"),
            400,
            "invalid_currency",
        ),
        (
            get("/postback?click_id=c&event=refund").await.expect("req"),
            422,
            "unknown_value",
        ),
        (
            get("/postback/ghost?click_id=c&event=ftd")
                .await
                .expect("req"),
            404,
            "unknown_source",
        ),
        (
            get("/postback/acme?clickid=c&goal=ftd").await.expect("req"),
            401,
            "unauthorized",
        ),
        (
            get("/postback/acme?clickid=c&goal=ftd&token=wrong-token-xxxxxxx")
                .await
                .expect("req"),
            401,
            "unauthorized",
        ),
        (
            get("/postback/walled?click_id=c&event=ftd")
                .await
                .expect("req"),
            403,
            "forbidden",
        ),
        // The first request to "throttled" uses its one-per-second allowance (and is
        // refused for its unknown event, publishing nothing); the second gets 429.
        (
            get("/postback/throttled?click_id=c&event=refund")
                .await
                .expect("req"),
            422,
            "unknown_value",
        ),
        (
            get("/postback/throttled?click_id=c&event=refund")
                .await
                .expect("req"),
            429,
            "rate_limited",
        ),
        (
            c.post(ingest.url("/postback"))
                .header("content-type", "text/csv")
                .body("a,b")
                .send()
                .await
                .expect("req"),
            415,
            "unsupported_media_type",
        ),
        (
            c.post(ingest.url("/postback"))
                .header("content-type", "application/json")
                .body(vec![b' '; 5000])
                .send()
                .await
                .expect("req"),
            413,
            "body_too_large",
        ),
        (
            c.get(ingest.url("/postback?click_id=c&event=ftd"))
                .header("x-big", "x".repeat(17 * 1024))
                .send()
                .await
                .expect("req"),
            431,
            "headers_too_large",
        ),
        (
            get(&format!(
                "/postback?click_id=c&event=ftd&sub1={}",
                "x".repeat(17 * 1024)
            ))
            .await
            .expect("req"),
            414,
            "uri_too_long",
        ),
        (
            c.post(ingest.url("/v1/postbacks"))
                .header("content-type", "application/json")
                .body("[]")
                .send()
                .await
                .expect("req"),
            400,
            "empty_batch",
        ),
    ];
    for (resp, status, code) in cases {
        let (got_status, err) = error_of(resp).await;
        assert_eq!(
            (got_status, err["code"].as_str()),
            (status, Some(code)),
            "{err}"
        );
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
    }

    // Heads that never reach the router: hyper refuses them, with the same error body.
    let long_uri = format!(
        "GET /postback?click_id=c&event=ftd&sub1={} HTTP/1.1\r\nHost: i\r\n\r\n",
        "x".repeat(70_000)
    );
    let many_headers = format!(
        "GET /postback?click_id=c&event=ftd HTTP/1.1\r\n{}\r\n",
        "x-a: b\r\n".repeat(101)
    );
    for (raw, status, code) in [
        (
            b"GET /postback?click_id=c\x01&event=ftd HTTP/1.1\r\nHost: i\r\n\r\n".to_vec(),
            "400",
            "bad_request",
        ),
        (long_uri.into_bytes(), "431", "headers_too_large"),
        (many_headers.into_bytes(), "431", "headers_too_large"),
    ] {
        let answer = raw_exchange(ingest.addr, &raw).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{answer}"
        );
        let body: Value = answer
            .split_once("\r\n\r\n")
            .and_then(|(_, b)| serde_json::from_str(b).ok())
            .unwrap_or_else(|| panic!("a JSON body: {answer}"));
        assert_eq!(body["error"]["code"], code, "{answer}");
    }

    // Every refused record is counted once, batches included; the 431 is refused before
    // any handler and the unrouted requests (404, 405) carry no record.
    let metrics = c
        .get(format!("http://{}/metrics", ingest.admin))
        .send()
        .await
        .expect("req")
        .text()
        .await
        .expect("text");
    for line in [
        "ingest_records_total{kind=\"postback\",outcome=\"invalid\"} 12",
        "ingest_records_total{kind=\"click\",outcome=\"invalid\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }

    // The marker goes last; with one partition, anything a rejected request had published
    // would come before it.
    let marker = c
        .get(ingest.url("/postback?click_id=marker&event=ftd"))
        .send()
        .await
        .expect("req");
    assert_eq!(marker.status(), StatusCode::OK);
    let seen = TopicReader::new(&topics.postbacks)
        .read_until::<Postback>("the marker", WAIT, |p| {
            p.iter().any(|p| p.click_id == "marker")
        })
        .await;
    assert_eq!(
        seen.len(),
        1,
        "rejected requests published nothing: {seen:?}"
    );
    let clicks = TopicReader::new(&topics.clicks);
    let ok = c
        .get(ingest.url("/click?offer_id=1&aff_id=m"))
        .send()
        .await
        .expect("req");
    assert_eq!(ok.status(), StatusCode::FOUND);
    assert_eq!(
        clicks
            .read_until::<Click>("the marker click", WAIT, |c| !c.is_empty())
            .await
            .len(),
        1
    );
    ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_map_aliases_and_authenticate() {
    let (ingest, topics) = start().await;
    let c = http();
    // Token in the query: aliases applied, the token is not stored.
    let r = c
        .get(ingest.url(&format!(
            "/postback/acme?clickid=C1&goal=ftd&payout=25.5&txid=T9&token={TOKEN}&extra=x"
        )))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), StatusCode::OK);
    // Token in a header.
    let r = c
        .get(ingest.url("/postback/acme?clickid=C2&goal=registration"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), StatusCode::OK);
    // HMAC over the body, and a replay from an hour ago.
    let body = r#"{"clickid":"C3","goal":"deposit","amount":"10"}"#;
    let now = s2s_common::now_ms() / 1000;
    for (ts, expect) in [
        (now, StatusCode::OK),
        (now - 3600, StatusCode::UNAUTHORIZED),
    ] {
        let r = signed_post(&c, ingest.url("/postback/signed"), HMAC_KEY, ts, body)
            .send()
            .await
            .expect("req");
        assert_eq!(r.status(), expect);
    }
    // The same signed request again, within its clock skew: a signature is taken once.
    let r = signed_post(&c, ingest.url("/postback/signed"), HMAC_KEY, now, body)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let refused: Value = r.json().await.expect("JSON");
    assert_eq!(refused["error"]["code"], "replayed", "{refused}");
    // A forged signature.
    let r = signed_post(
        &c,
        ingest.url("/postback/signed"),
        "another-key-0123456",
        now,
        body,
    )
    .send()
    .await
    .expect("req");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A signed POST is signed over its body: a query parameter beside it is not covered,
    // and refused (the signature stays unused: the request stored nothing).
    let unsigned = signed_post(
        &c,
        ingest.url("/postback/signed?amount=999"),
        HMAC_KEY,
        now - 1,
        body,
    );
    // A field both in the query string and in the body is given twice.
    let twice = c
        .post(ingest.url("/postback/acme?goal=ftd"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("clickid=C6&goal=registration");
    // A batch's fields are in its records: a query parameter beside `token` would apply
    // to none of them, and is refused with the whole batch, signed or not.
    let batch = r#"[{"clickid":"C7","goal":"purchase"}]"#;
    let signed_batch = signed_post(
        &c,
        ingest.url("/v1/postbacks/signed?goal=ftd"),
        HMAC_KEY,
        now - 2,
        batch,
    );
    let click_batch = c
        .post(ingest.url(&format!("/v1/clicks/acme?token={TOKEN}&offer_id=1")))
        .header("content-type", "application/json")
        .body(r#"{"click_id":"OP-8","offer_id":"1","aff_id":"z"}"#);
    for (req, code, field) in [
        (unsigned, "unsigned_parameter", "amount"),
        (twice, "duplicate_parameter", "goal"),
        (signed_batch, "unexpected_parameter", "goal"),
        (click_batch, "unexpected_parameter", "offer_id"),
    ] {
        let (status, e) = error_of(req.send().await.expect("req")).await;
        assert_eq!(
            (status, e["code"].as_str(), e["field"].as_str()),
            (400, Some(code), Some(field)),
            "{e}"
        );
    }

    // HMAC on a GET covers the query string exactly as sent.
    let query = "clickid=C5&goal=ftd";
    let r = c
        .get(ingest.url(&format!("/postback/signed?{query}")))
        .header("x-timestamp", now.to_string())
        .header("x-signature", sign(HMAC_KEY, now, query.as_bytes()))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), StatusCode::OK);
    // A signed batch to a source, and a token-authenticated click batch to a source.
    let batch = r#"[{"clickid":"C4","goal":"purchase"}]"#;
    let r = signed_post(&c, ingest.url("/v1/postbacks/signed"), HMAC_KEY, now, batch)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), StatusCode::OK);
    let r = c
        .post(ingest.url("/v1/clicks/acme"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(r#"{"click_id":"OP-9","offer_id":"1","aff_id":"z"}"#)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), StatusCode::OK);
    let r = c
        .post(ingest.url("/v1/clicks/acme"))
        .header("content-type", "application/json")
        .body(r#"{"click_id":"OP-10","offer_id":"1","aff_id":"z"}"#)
        .send()
        .await
        .expect("req");
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "batches authenticate too"
    );
    let doc: Value = c
        .get(ingest.url("/openapi.json"))
        .send()
        .await
        .expect("req")
        .json()
        .await
        .expect("json");
    assert_eq!(doc["openapi"], "3.1.0");

    let seen = TopicReader::new(&topics.postbacks)
        .read_until::<Postback>("five postbacks", WAIT, |p| p.len() >= 5)
        .await;
    let clicks = TopicReader::new(&topics.clicks)
        .read_until::<Click>("the click batch", WAIT, |c| !c.is_empty())
        .await;
    assert_eq!((clicks.len(), clicks[0].click_id.as_str()), (1, "OP-9"));
    let by = |id: &str| {
        seen.iter()
            .find(|p| p.click_id == id)
            .unwrap_or_else(|| panic!("{id}"))
    };
    let c1 = by("C1");
    assert_eq!(
        (c1.event.as_str(), c1.txn_id.as_deref()),
        ("ftd", Some("T9"))
    );
    assert_eq!(c1.amount.map(|a| a.to_string()).as_deref(), Some("25.5"));
    assert_eq!(c1.source.as_deref(), Some("acme"));
    assert_eq!(c1.params.get("extra").map(String::as_str), Some("x"));
    assert!(
        !c1.params.contains_key("token"),
        "the token is never stored"
    );
    assert_eq!(by("C2").event, "registration");
    assert_eq!(
        (by("C3").event.as_str(), by("C3").source.as_deref()),
        ("deposit", Some("signed"))
    );
    assert_eq!(
        (by("C4").event.as_str(), by("C4").source.as_deref()),
        ("purchase", Some("signed"))
    );
    assert_eq!(by("C5").source.as_deref(), Some("signed"));
    // One partition: a record from the replayed, forged, unsigned or ambiguous requests
    // (sent before C4 and C5, and OP-9) would have taken one of these places.
    assert_eq!(seen.len(), 5, "the refused requests published nothing");
    ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_report_each_record() {
    let (ingest, topics) = start().await;
    let c = http();
    let body = r#"[{"click_id":"B1","event":"ftd","amount":5},
                   {"click_id":"B2","event":"nope"},
                   {"click_id":"B3","event":"deposit","currency":"usd"}]"#;
    let r = c
        .post(ingest.url("/v1/postbacks"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status().as_u16(), 207, "some records were rejected");
    let v: Value = r.json().await.expect("json");
    assert_eq!(
        (v["accepted"].as_u64(), v["rejected"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(v["results"][1]["status"], "rejected");
    assert_eq!(v["results"][1]["error"]["field"], "event");
    let ids: Vec<String> = [0, 2]
        .iter()
        .map(|i| {
            v["results"][*i]["id"]
                .as_str()
                .expect("accepted id")
                .to_string()
        })
        .collect();

    let ndjson = "{\"click_id\":\"OP-1\",\"offer_id\":\"1\",\"aff_id\":\"a1\",\"sub1\":\"s\"}\n\
                  {\"click_id\":\"OP-3\",\"offer_id\":\"9\",\"aff_id\":\"a3\"}\n\
                  {\"click_id\":\"OP-2\",\"offer_id\":\"1\",\"aff_id\":\"a2\",\"ts_ms\":1700000000000}\n";
    let r = c
        .post(ingest.url("/v1/clicks"))
        .header("content-type", "application/x-ndjson")
        .body(ndjson)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), StatusCode::MULTI_STATUS);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["results"][0]["id"], "OP-1");
    assert_eq!(
        (
            &v["results"][1]["status"],
            &v["results"][1]["error"]["code"],
            &v["results"][1]["error"]["field"]
        ),
        (
            &json!("rejected"),
            &json!("unknown_offer"),
            &json!("offer_id")
        ),
        "a registered click's offer is checked like /click's: {v}"
    );

    let pbs = TopicReader::new(&topics.postbacks)
        .read_until::<Postback>("two postbacks", WAIT, |p| p.len() >= 2)
        .await;
    let got: Vec<&str> = pbs.iter().map(|p| p.postback_id.as_str()).collect();
    assert_eq!(got, ids.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(pbs[1].currency.as_deref(), Some("USD"));
    let clicks = TopicReader::new(&topics.clicks)
        .read_until::<Click>("two clicks", WAIT, |c| c.len() >= 2)
        .await;
    assert_eq!(clicks[0].subs.get("sub1").map(String::as_str), Some("s"));
    assert_eq!(
        (clicks[1].click_id.as_str(), clicks[1].ts_ms),
        ("OP-2", 1_700_000_000_000)
    );
    ingest.stop().await;
}

/// The pixel and the iframe: always their image or page, the click ID from the cookie the
/// click redirect set, stored with trust "pixel" after the broker acknowledged; off, they
/// store nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pixel_conversions_come_from_the_click_cookie_and_are_marked() {
    let topics = topics(1);
    s2s_tests::seed_catalog(&topics, &s2s_tests::catalog_with_offer_1()).await;
    let off = IngestHandle::start(ingest_config(&topics)).await;
    let c = http();
    let r = c
        .get(off.url("/pixel?click_id=c1&event=ftd"))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers().get("x-postback-id").is_none(),
        "off: not stored"
    );
    assert_eq!(
        r.bytes().await.expect("body").get(..6),
        Some(&b"GIF89a"[..]),
        "a GIF all the same"
    );
    off.stop().await;

    let mut config = ingest_config(&topics);
    config.pixel.enabled = true;
    config.pixel.cookie = Some("s2s_click".into());
    let on = IngestHandle::start(config).await;
    let r = c
        .get(on.url("/click?offer_id=1&aff_id=42"))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), StatusCode::FOUND);
    let set_cookie = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("the click cookie")
        .to_string();
    let click_id = set_cookie
        .strip_prefix("s2s_click=")
        .and_then(|v| v.split(';').next())
        .expect("s2s_click=<id>")
        .to_string();
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("Max-Age=2592000"),
        "{set_cookie}"
    );
    let r = c
        .get(on.url("/pixel?event=ftd&txn_id=P1&amount=10&currency=EUR&token=t"))
        .header("cookie", format!("other=1; s2s_click={click_id}"))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("image/gif")
    );
    let pixel_id = r
        .headers()
        .get("x-postback-id")
        .and_then(|v| v.to_str().ok())
        .expect("stored")
        .to_string();
    let r = c
        .get(on.url(&format!(
            "/iframe?click_id={click_id}&event=deposit&txn_id=P2"
        )))
        .send()
        .await
        .expect("req");
    assert!(r.headers().get("x-postback-id").is_some());
    assert!(r.text().await.expect("page").contains("<!doctype html>"));
    // Refused (unknown event), and still a GIF.
    let r = c
        .get(on.url(&format!("/pixel?click_id={click_id}&event=sale")))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("x-postback-id").is_none());
    let pbs = TopicReader::new(&topics.postbacks)
        .read_until::<Postback>("two pixel postbacks", WAIT, |p| p.len() >= 2)
        .await;
    assert_eq!(pbs[0].postback_id, pixel_id);
    assert_eq!(
        (pbs[0].click_id.as_str(), pbs[0].trust, pbs[1].trust),
        (click_id.as_str(), Trust::Pixel, Trust::Pixel)
    );
    assert!(!pbs[0].params.contains_key("token"), "never stored");
    assert_eq!(
        s2s_tests::metric(
            on.admin,
            "ingest_records_total{kind=\"pixel\",outcome=\"invalid\"}"
        )
        .await,
        Some(1.0)
    );
    on.stop().await;
}

/// A client that sends its headers and then stalls its body gets 408 `body_timeout` once
/// `body_read_timeout` has passed, and its connection is closed; nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_cut_off() {
    let topics = topics(1);
    s2s_tests::seed_catalog(&topics, &s2s_tests::catalog_with_offer_1()).await;
    let mut c = ingest_config(&topics);
    c.body_read_timeout = Duration::from_millis(300);
    let ingest = IngestHandle::start(c).await;
    // The answer, then the end of the connection, within a deadline.
    let text = raw_exchange(
        ingest.addr,
        b"POST /postback HTTP/1.1\r\nHost: ingest\r\n\
          Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\n\
          click_id=",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"body_timeout\""), "{text}");
    let marker = TopicReader::new(&topics.postbacks);
    let r = s2s_tests::http()
        .get(ingest.url("/postback?click_id=after&event=ftd"))
        .send()
        .await
        .expect("a later postback");
    assert_eq!(r.status(), StatusCode::OK);
    let seen = marker
        .read_until::<Postback>("the later postback", WAIT, |p| !p.is_empty())
        .await;
    assert_eq!(
        seen.iter().map(|p| p.click_id.as_str()).collect::<Vec<_>>(),
        ["after"],
        "the cut-off request stored nothing"
    );
    ingest.stop().await;
}

/// A client that sends half a request head and stops, and a keep-alive connection left
/// idle after its answer, are both closed once `header_read_timeout` has passed, and
/// counted; a request in time is served as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_idle_connections_are_cut_off() {
    use tokio::io::AsyncWriteExt;
    let topics = topics(1);
    s2s_tests::seed_catalog(&topics, &s2s_tests::catalog_with_offer_1()).await;
    let mut c = ingest_config(&topics);
    c.header_read_timeout = Duration::from_millis(300);
    let ingest = IngestHandle::start(c).await;
    let mut slow = tokio::net::TcpStream::connect(ingest.addr)
        .await
        .expect("connect");
    slow.write_all(b"GET /postback?click_id=slow&event=ftd HTTP/1.1\r\nHost: ingest\r\n")
        .await
        .expect("half a head");
    let rest = read_to_close(&mut slow).await;
    assert!(!rest.contains("200"), "never answered as a request: {rest}");
    s2s_tests::metric_reaches(
        ingest.admin,
        "ingest_connections_closed_total{reason=\"header_timeout\"}",
        1.0,
    )
    .await;

    let marker = TopicReader::new(&topics.postbacks);
    let answer = raw_exchange(
        ingest.addr,
        b"GET /postback?click_id=in-time&event=ftd HTTP/1.1\r\nHost: ingest\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    s2s_tests::metric_reaches(
        ingest.admin,
        "ingest_connections_closed_total{reason=\"header_timeout\"}",
        2.0,
    )
    .await;
    let seen = marker
        .read_until::<Postback>("the request in time", WAIT, |p| !p.is_empty())
        .await;
    assert_eq!(
        seen.iter().map(|p| p.click_id.as_str()).collect::<Vec<_>>(),
        ["in-time"],
        "the cut-off head stored nothing"
    );
    ingest.stop().await;
}

/// Over `max_requests_in_flight`, a request is answered 503 `overloaded` with
/// `Retry-After` at once and stores nothing; over `max_connections`, a connection gets
/// 503 `too_many_connections` before its request is read. The requests admitted are
/// served and stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_fast_and_stores_nothing() {
    use tokio::io::AsyncWriteExt;
    let topics = topics(1);
    s2s_tests::seed_catalog(&topics, &s2s_tests::catalog_with_offer_1()).await;
    let mut c = ingest_config(&topics);
    c.max_requests_in_flight = 1;
    c.max_connections = 2;
    let ingest = IngestHandle::start(c).await;
    let marker = TopicReader::new(&topics.postbacks);
    // In flight: a postback whose body has not all arrived yet.
    let mut held = tokio::net::TcpStream::connect(ingest.addr)
        .await
        .expect("connect");
    held.write_all(
        b"POST /postback HTTP/1.1\r\nHost: ingest\r\nConnection: close\r\n\
          Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 23\r\n\r\n\
          click_id=held",
    )
    .await
    .expect("headers and half the body");
    s2s_tests::metric_reaches(ingest.admin, "ingest_connections", 1.0).await;
    // Poll until the held request is in flight: the next one is then shed. The probe
    // lacks its click ID, so that if admitted (the held one not in flight yet) it is
    // refused 400 and stores nothing either.
    let deadline = std::time::Instant::now() + WAIT;
    let shed = loop {
        let r = http()
            .get(ingest.url("/postback?event=ftd"))
            .header("connection", "close")
            .send()
            .await
            .expect("an answer");
        if r.status() == StatusCode::SERVICE_UNAVAILABLE {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never shed: {}",
            r.status()
        );
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        tokio::time::sleep(Duration::from_millis(20)).await; // poll
    };
    assert_eq!(shed.headers()["retry-after"], "1");
    let body: serde_json::Value = shed.json().await.expect("JSON body");
    assert_eq!(body["error"]["code"], "overloaded");
    s2s_tests::metric_reaches(ingest.admin, "ingest_requests_shed_total", 1.0).await;

    // The held connection and one idle one fill max_connections: a third is refused.
    let _idle = tokio::net::TcpStream::connect(ingest.addr)
        .await
        .expect("connect");
    s2s_tests::metric_reaches(ingest.admin, "ingest_connections", 2.0).await;
    let answer = raw_exchange(
        ingest.addr,
        b"GET /postback?click_id=refused&event=ftd HTTP/1.1\r\nHost: ingest\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("\"too_many_connections\""), "{answer}");
    s2s_tests::metric_reaches(ingest.admin, "ingest_connections_refused_total", 1.0).await;

    // The held request completes and is stored; nothing of the refused ones is.
    held.write_all(b"&event=ftd")
        .await
        .expect("the rest of the body");
    let answer = read_to_close(&mut held).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    let seen = marker
        .read_until::<Postback>("the held postback", WAIT, |p| {
            p.iter().any(|p| p.click_id == "held")
        })
        .await;
    assert!(
        seen.iter().all(|p| p.click_id == "held"),
        "only the admitted postback is stored: {:?}",
        seen.iter().map(|p| &p.click_id).collect::<Vec<_>>()
    );
    ingest.stop().await;
}

/// `/click` has a rate per client address: over it, 429 with `Retry-After`, nothing
/// stored; another address is not held back (a trusted proxy's header names it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clicks_are_limited_per_client() {
    let topics = topics(1);
    s2s_tests::seed_catalog(&topics, &s2s_tests::catalog_with_offer_1()).await;
    let mut c = ingest_config(&topics);
    c.click.rate_limit_per_client = Some(2);
    c.trusted_proxies.header = Some("x-forwarded-for".into());
    c.trusted_proxies.cidrs = vec!["127.0.0.1/32".into()];
    let ingest = IngestHandle::start(c).await;
    let click = |client: &'static str| {
        let url = ingest.url(&format!("/click?offer_id=1&aff_id={client}"));
        async move {
            http()
                .get(url)
                .header("x-forwarded-for", client)
                .send()
                .await
                .expect("answer")
        }
    };
    let marker = TopicReader::new(&topics.clicks);
    // The bucket holds a second's worth (2): the third at once is over.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(click("192.0.2.10").await.status().as_u16());
    }
    assert_eq!(&statuses[..2], [302, 302]);
    let over = click("192.0.2.10").await;
    assert_eq!(over.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        over.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let (_, error) = error_of(over).await;
    assert_eq!(error["code"], "rate_limited");
    assert_eq!(click("192.0.2.11").await.status(), StatusCode::FOUND);
    let stored = marker
        .read_until::<Click>("the accepted clicks", WAIT, |c| {
            c.iter().any(|c| c.aff_id == "192.0.2.11")
        })
        .await;
    let from_first = stored.iter().filter(|c| c.aff_id == "192.0.2.10").count();
    let accepted = statuses.iter().filter(|s| **s == 302).count();
    assert_eq!(
        from_first, accepted,
        "one click stored per 302, none for a 429"
    );
    ingest.stop().await;
}

/// Reads what ingest sends until it closes the connection, within 10 s.
async fn read_to_close(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("ingest closes the connection within 10 s")
        .expect("read");
    String::from_utf8_lossy(&answer).into_owned()
}

/// Writes `bytes` on a new connection and reads until ingest closes it.
async fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    read_to_close(&mut stream).await
}
