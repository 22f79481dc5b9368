//! End-to-end: real broker, real HTTP, real RocksDB, the three services in-process.

use std::time::Duration;

use rdkafka::producer::FutureProducer;
use s2s_common::contract::{
    encode, AttemptOutcome, Click, Conversion, DeadLetter, DeliveryAttempt, RejectReason, Rejection,
};
use s2s_common::kafka::send_and_wait;
use s2s_tests::{http, poll_until, Pipeline, PipelineOptions, TestEndpoint, TopicReader};

const WAIT: Duration = Duration::from_secs(30);

/// Clicks through `/click` and returns the click ID from the redirect.
async fn click(p: &Pipeline, query: &str) -> String {
    let resp = http()
        .get(p.ingest_url(&format!("/click?{query}")))
        .send()
        .await
        .expect("click request");
    assert_eq!(resp.status(), 302, "click answers with a redirect");
    let location = resp
        .headers()
        .get("location")
        .and_then(|l| l.to_str().ok())
        .expect("Location header")
        .to_string();
    let url = reqwest::Url::parse(&location).expect("absolute Location");
    assert_eq!(url.host_str(), Some("offer.example"));
    url.query_pairs()
        .find(|(k, _)| k == "cid")
        .map(|(_, v)| v.into_owned())
        .expect("click ID in the redirect")
}

async fn postback(p: &Pipeline, query: &str) -> serde_json::Value {
    let resp = http()
        .get(p.ingest_url(&format!("/postback?{query}")))
        .send()
        .await
        .expect("postback request");
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("JSON answer")
}

async fn get_text(url: String) -> (u16, String) {
    let r = http().get(url).send().await.expect("request");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn click_postback_conversion_delivery() {
    let affiliate = TestEndpoint::start(&[]).await;
    let p = Pipeline::start(PipelineOptions {
        postbacks: vec![(
            "aff".into(),
            affiliate.url("/pb?cid={click_id}&payout={payout}&cur={currency}&s1={sub1}&ev={event}"),
        )],
        ..Default::default()
    })
    .await;

    let click_id = click(&p, "offer_id=1&aff_id=42&sub1=spring%20sale").await;
    assert_eq!(click_id.len(), 26, "a ULID: {click_id}");
    let answer = postback(
        &p,
        &format!("click_id={click_id}&event=ftd&txn_id=T-1&amount=100.00&currency=eur"),
    )
    .await;
    assert_eq!(answer["status"], "accepted");
    assert_eq!(answer["click_id"], click_id.as_str());

    let conversions = TopicReader::new(&p.topics.conversions)
        .read_until::<Conversion>("the conversion", WAIT, |cs| {
            cs.iter().any(|c| c.click_id == click_id)
        })
        .await;
    let c = conversions
        .iter()
        .find(|c| c.click_id == click_id)
        .expect("found above");
    assert_eq!(
        (c.aff_id.as_str(), c.offer_id.as_str(), c.event.as_str()),
        ("42", "1", "ftd")
    );
    assert_eq!(c.payout.to_string(), "50.00");
    assert_eq!(c.payout_currency, "USD");
    assert_eq!(c.amount.map(|a| a.to_string()).as_deref(), Some("100"));
    assert_eq!(c.currency.as_deref(), Some("EUR"));
    assert_eq!(c.subs.get("sub1").map(String::as_str), Some("spring sale"));
    assert_eq!(Some(c.postback_id.as_str()), answer["postback_id"].as_str());

    let got = poll_until("the affiliate postback", WAIT, || async {
        affiliate
            .received()
            .into_iter()
            .find(|r| r.param("cid") == Some(click_id.as_str()))
    })
    .await;
    assert_eq!(got.path, "/pb");
    assert_eq!(got.param("payout"), Some("50.00"));
    assert_eq!(got.param("cur"), Some("USD"));
    assert_eq!(got.param("s1"), Some("spring sale"));
    assert_eq!(got.param("ev"), Some("ftd"));
    assert!(got.header("webhook-id").is_some_and(|id| id.len() == 32));

    let log = TopicReader::new(&p.topics.delivery_log)
        .read_until::<DeliveryAttempt>("the delivery log entry", WAIT, |a| !a.is_empty())
        .await;
    assert_eq!(
        (log[0].outcome, log[0].status_code, log[0].attempt),
        (AttemptOutcome::Delivered, Some(200), 1)
    );
    assert_eq!(log[0].conversion_id, c.conversion_id);

    // Every service exports its metrics and health.
    for (admin, metric) in [
        (p.ingest_admin, "ingest_records_total{kind=\"postback\",outcome=\"accepted\"} 1"),
        (p.ingest_admin, "ingest_kafka_producer_queue_messages"),
        (p.attributor_admin, "attributor_outcomes_total{outcome=\"attributed\",reason=\"none\"} 1"),
        (p.delivery_admin, "delivery_attempts_total{endpoint=\"aff\",outcome=\"delivered\",status_class=\"2xx\"} 1"),
    ] {
        let (status, body) = get_text(format!("http://{admin}/metrics")).await;
        assert_eq!(status, 200);
        assert!(body.contains(metric), "{metric} missing from:\n{body}");
        assert_eq!(get_text(format!("http://{admin}/healthz")).await.0, 200);
        // Ready once librdkafka's statistics report a broker connection (every second).
        poll_until("ready", WAIT, || async {
            (get_text(format!("http://{admin}/readyz")).await.0 == 200).then_some(())
        })
        .await;
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postback_for_unknown_click_is_rejected_after_grace() {
    let p = Pipeline::start(PipelineOptions::default()).await;
    let answer = postback(&p, "click_id=never-issued-1&event=registration").await;
    let postback_id = answer["postback_id"]
        .as_str()
        .expect("postback_id")
        .to_string();

    let rejections = TopicReader::new(&p.topics.rejections)
        .read_until::<Rejection>("the rejection", WAIT, |r| !r.is_empty())
        .await;
    assert_eq!(rejections.len(), 1);
    let r = &rejections[0];
    assert_eq!(r.reason, RejectReason::UnknownClick);
    let pb = r.postback.as_ref().expect("the postback is kept");
    assert_eq!(
        (pb.postback_id.as_str(), pb.click_id.as_str()),
        (postback_id.as_str(), "never-issued-1")
    );
    assert!(r.detail.contains("grace period"), "{}", r.detail);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postback_before_its_click_is_held_and_attributed() {
    // Clicks and postbacks travel on two topics, so a postback can be consumed before its
    // click. The attributor must hold it for the grace period and join when the click comes.
    let p = Pipeline::start(PipelineOptions {
        grace_period_ms: 30_000,
        ..Default::default()
    })
    .await;
    let click_id = s2s_tests::unique("late-click");
    postback(&p, &format!("click_id={click_id}&event=registration")).await;
    // Wait until the attributor has consumed (and is holding) the postback...
    let metrics = format!("http://{}/metrics", p.attributor_admin);
    poll_until("the attributor to consume the postback", WAIT, || async {
        let (_, body) = get_text(metrics.clone()).await;
        body.contains("stream_records_consumed_total{input=\"postback\",service=\"attributor\"} 1")
            .then_some(())
    })
    .await;
    // ...then publish the click, as another ingest instance would.
    let click = Click {
        aff_id: "7".into(),
        subs: Default::default(),
        ts_ms: s2s_common::now_ms(),
        ..s2s_common::fixtures::click(&click_id)
    };
    let producer: FutureProducer = s2s_tests::kafka()
        .producer_config()
        .create()
        .expect("producer");
    send_and_wait(
        &producer,
        &p.topics.clicks.name,
        click_id.as_bytes(),
        &encode(&click),
    )
    .await
    .expect("click published");

    let conversions = TopicReader::new(&p.topics.conversions)
        .read_until::<Conversion>("the conversion", WAIT, |cs| !cs.is_empty())
        .await;
    assert_eq!(conversions[0].click_id, click_id);
    assert_eq!(conversions[0].payout.to_string(), "2.00");
    assert_eq!(conversions[0].aff_id, "7");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_endpoints_are_retried_or_dead_lettered() {
    let flaky = TestEndpoint::start(&[503]).await;
    let broken = TestEndpoint::start(&[500, 502, 504]).await;
    let gone = TestEndpoint::start(&[404]).await;
    let p = Pipeline::start(PipelineOptions {
        retry_schedule_ms: vec![50, 50],
        postbacks: vec![
            ("flaky".into(), flaky.url("/pb?c={click_id}")),
            ("broken".into(), broken.url("/pb?c={click_id}")),
            ("gone".into(), gone.url("/pb?c={click_id}")),
        ],
        ..Default::default()
    })
    .await;
    let click_id = click(&p, "offer_id=1&aff_id=9").await;
    postback(&p, &format!("click_id={click_id}&event=ftd")).await;

    let dead = TopicReader::new(&p.topics.dead_letter)
        .read_until::<DeadLetter>("two dead letters", WAIT, |d| d.len() >= 2)
        .await;
    let by = |name: &str| {
        dead.iter()
            .find(|d| d.endpoint == name)
            .unwrap_or_else(|| panic!("{name} dead-lettered"))
    };
    assert_eq!(
        (by("broken").attempts, by("broken").last_status),
        (3, Some(504))
    );
    assert_eq!(
        (by("gone").attempts, by("gone").last_status),
        (1, Some(404)),
        "404 is not retried"
    );
    assert_eq!(by("gone").conversion.click_id, click_id);

    let log = TopicReader::new(&p.topics.delivery_log)
        .read_until::<DeliveryAttempt>("six attempts", WAIT, |a| a.len() >= 6)
        .await;
    let flaky_attempts: Vec<_> = log
        .iter()
        .filter(|a| a.endpoint == "flaky")
        .map(|a| (a.attempt, a.outcome))
        .collect();
    assert_eq!(
        flaky_attempts,
        [
            (1, AttemptOutcome::Retryable),
            (2, AttemptOutcome::Delivered)
        ]
    );
    assert_eq!(flaky.received().len(), 2);
    assert_eq!(broken.received().len(), 3);
    assert_eq!(gone.received().len(), 1);
    let ids: std::collections::BTreeSet<_> = broken
        .received()
        .iter()
        .filter_map(|r| r.header("webhook-id").map(str::to_string))
        .collect();
    assert_eq!(
        ids.len(),
        1,
        "every attempt carries the same idempotency key"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_errors() {
    let p = Pipeline::start(PipelineOptions::default()).await;
    let cases = [
        ("/click?offer_id=1", 400, "missing_field", Some("aff_id")),
        (
            "/click?offer_id=404&aff_id=1",
            404,
            "unknown_offer",
            Some("offer_id"),
        ),
        (
            "/postback?click_id=c&event=sale",
            422,
            "unknown_value",
            Some("event"),
        ),
        (
            "/postback?click_id=c&event=ftd&amount=-5",
            422,
            "invalid_amount",
            Some("amount"),
        ),
        (
            "/postback?click_id=%FF&event=ftd",
            400,
            "invalid_utf8",
            Some("click_id"),
        ),
        (
            "/postback?event=ftd",
            400,
            "missing_field",
            Some("click_id"),
        ),
    ];
    for (path, status, code, field) in cases {
        let resp = http()
            .get(p.ingest_url(path))
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status().as_u16(), status, "{path}");
        let body: serde_json::Value = resp.json().await.expect("JSON error body");
        assert_eq!(body["error"]["code"], code, "{path}");
        assert_eq!(body["error"]["field"].as_str(), field, "{path}");
        assert!(body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    let resp = http()
        .post(p.ingest_url("/postback"))
        .header("content-type", "text/plain")
        .body("click_id=c")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 415);
    let resp = http()
        .post(p.ingest_url("/postback"))
        .header("content-type", "application/json")
        .body(r#"{"click_id":"c-json","event":"deposit","amount":12.5}"#)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200, "JSON postbacks are accepted");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_refuses_topics_that_are_not_co_partitioned() {
    let topics = s2s_tests::topics(3);
    s2s_tests::create_topic(&topics.postbacks.name, 2).await;
    let c = s2s_tests::ingest_config(&topics);
    let err = s2s_ingest::Ingest::bind(c, &tokio_util::sync::CancellationToken::new())
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("not co-partitioned") && err.contains("(2 partitions)"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    // The schedule alone would retry after ~50 ms; the endpoint asks for 2 s.
    let busy = TestEndpoint::start_with_retry_after(&[429], "2").await;
    let p = Pipeline::start(PipelineOptions {
        retry_schedule_ms: vec![50],
        postbacks: vec![("busy".into(), busy.url("/pb?c={click_id}"))],
        ..Default::default()
    })
    .await;
    let click_id = click(&p, "offer_id=1&aff_id=5").await;
    postback(&p, &format!("click_id={click_id}&event=ftd")).await;
    let log = TopicReader::new(&p.topics.delivery_log)
        .read_until::<DeliveryAttempt>("two attempts", WAIT, |a| a.len() >= 2)
        .await;
    assert_eq!(
        (log[0].status_code, log[0].outcome),
        (Some(429), AttemptOutcome::Retryable)
    );
    assert_eq!(
        (log[1].attempt, log[1].outcome),
        (2, AttemptOutcome::Delivered)
    );
    let gap_ms = log[1].ts_ms - log[0].ts_ms;
    assert!(
        gap_ms >= 2000,
        "second attempt only {gap_ms} ms after the first"
    );
    assert!(gap_ms < 10_000, "waited far longer than asked: {gap_ms} ms");
    p.stop().await;
}
