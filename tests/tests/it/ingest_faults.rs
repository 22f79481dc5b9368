//! Ingest against librdkafka's MockCluster, which can take its broker down on command:
//! a request that cannot be stored gets a 503 with Retry-After (after the produce timeout,
//! or at once when the producer queue is full), readiness follows the broker, and after
//! recovery requests succeed again. Every postback that got a 200 is on the topic.

use std::time::Duration;

use futures::future::join_all;
use s2s_common::contract::Postback;
use s2s_common::topics::TopicsConfig;
use s2s_tests::{http, ingest_config, poll_until, IngestHandle, Mock, TopicReader};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

async fn status(url: &str) -> u16 {
    match http().get(url).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// Ingest on a one-broker MockCluster, once ready. The mock answers no CreateTopics, so
/// the topics are created on it here, as an operator managing topics elsewhere would.
async fn start_on_mock(
    produce_timeout_ms: u64,
    queue_max_messages: Option<u32>,
) -> (Mock, TopicsConfig, IngestHandle) {
    let (mock, topics) = s2s_tests::mock_with_topics(1);
    let mut c = ingest_config(&topics);
    c.pipeline.kafka.bootstrap_servers = mock.bootstrap_servers();
    c.produce_timeout = Duration::from_millis(produce_timeout_ms);
    if let Some(n) = queue_max_messages {
        c.pipeline
            .kafka
            .properties
            .insert("queue.buffering.max.messages".into(), n.to_string());
    }
    let ingest = IngestHandle::start(c).await;
    let readyz = format!("http://{}/readyz", ingest.admin);
    poll_until("ready while the broker is up", WAIT, || async {
        (status(&readyz).await == 200).then_some(())
    })
    .await;
    (mock, topics, ingest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_gives_503_and_recovery_gives_200() {
    let (mock, topics, ingest) = start_on_mock(1500, Some(2)).await;
    let readyz = format!("http://{}/readyz", ingest.admin);

    let mut accepted = Vec::new();
    let post = |n: usize| {
        http()
            .get(ingest.url(&format!("/postback?click_id=c{n}&event=ftd")))
            .send()
    };
    let r = post(0).await.expect("request");
    assert_eq!(r.status(), 200);
    accepted.push(r.json::<Value>().await.expect("json")["postback_id"].clone());

    mock.broker_down(-1).expect("broker down");
    // Two requests fill the queue and time out; the others are refused at once.
    let answers = join_all((1..=4).map(|n| async move { post(n).await.expect("request") })).await;
    let mut overloaded = 0;
    for r in answers {
        assert_eq!(r.status(), 503);
        assert_eq!(
            r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
            Some("1")
        );
        let err = &r.json::<Value>().await.expect("json")["error"];
        assert_eq!(err["code"], "unavailable");
        if err["message"]
            .as_str()
            .is_some_and(|m| m.contains("queue full"))
        {
            overloaded += 1;
        }
    }
    assert!(overloaded >= 1, "a full producer queue refuses at once");
    poll_until("not ready while the broker is down", WAIT, || async {
        (status(&readyz).await == 503).then_some(())
    })
    .await;

    mock.broker_up(-1).expect("broker up");
    let id = poll_until("a 200 after recovery", WAIT, || async {
        let r = post(99).await.ok()?;
        if r.status() != 200 {
            return None;
        }
        r.json::<Value>()
            .await
            .ok()
            .map(|v| v["postback_id"].clone())
    })
    .await;
    accepted.push(id);
    poll_until("ready again", WAIT, || async {
        (status(&readyz).await == 200).then_some(())
    })
    .await;

    // Nothing acknowledged was lost: every accepted postback is on the topic.
    let seen = TopicReader::on(&mock.bootstrap_servers(), &topics.postbacks)
        .read_until::<Postback>("the accepted postbacks", WAIT, |p| {
            accepted.iter().all(|id| {
                p.iter()
                    .any(|pb| Some(pb.postback_id.as_str()) == id.as_str())
            })
        })
        .await;
    assert!(seen.len() >= accepted.len());
    ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_flight() {
    let (mock, topics, ingest) = start_on_mock(20_000, None).await;

    // With the broker down the request waits for its acknowledgement...
    mock.broker_down(-1).expect("broker down");
    let url = ingest.url("/postback?click_id=inflight&event=ftd");
    let in_flight = tokio::spawn(async move { http().get(url).send().await });
    let metrics = format!("http://{}/metrics", ingest.admin);
    poll_until("the request to reach the producer", WAIT, || async {
        let body = http().get(&metrics).send().await.ok()?.text().await.ok()?;
        body.contains("ingest_kafka_producer_queue_messages 1")
            .then_some(())
    })
    .await;
    // ...shutdown starts while it waits; then the broker comes back.
    let stopping = tokio::spawn(ingest.stop());
    mock.broker_up(-1).expect("broker up");
    let resp = in_flight
        .await
        .expect("task")
        .expect("the in-flight request is answered");
    assert_eq!(resp.status(), 200, "answered after its record was stored");
    stopping.await.expect("ingest stopped cleanly");
    let seen = TopicReader::on(&mock.bootstrap_servers(), &topics.postbacks)
        .read_until::<Postback>("the in-flight postback", WAIT, |p| !p.is_empty())
        .await;
    assert_eq!(seen[0].click_id, "inflight");
}
