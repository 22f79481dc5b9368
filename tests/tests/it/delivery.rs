//! Delivery on the real broker: conversions written straight to the conversions topic, a
//! delivery worker (in process, or the real binary as a child process for the crash test)
//! and test endpoints on port 0 that succeed, fail N times then succeed, time out, refuse
//! (4xx), ask to slow down (429 + Retry-After), or never answer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::Mac;
use s2s_common::contract::{
    encode, AttemptOutcome, Conversion, DeadLetter, DeadLetterReason, DeliveryAttempt,
};
use s2s_common::fixtures;
use s2s_common::topics::TopicsConfig;
use s2s_delivery::config::PostbackConfig;
use s2s_delivery::endpoint::Method;
use s2s_tests::{
    delivery_config, poll_until, topics, unique, ChildService, RawProducer, RunningService,
    SilentEndpoint, TestEndpoint, TopicReader,
};

const WAIT: Duration = Duration::from_secs(30);

/// A fresh conversion (unique IDs) of affiliate `aff`, attributed now.
fn conversion(aff: &str) -> Conversion {
    let now = s2s_common::now_ms();
    Conversion {
        outcome_id: unique("o"),
        aff_id: aff.into(),
        subs: [("sub1".to_string(), "spring sale".to_string())].into(),
        click_ts_ms: now - 60_000,
        event_ts_ms: now,
        received_ts_ms: now,
        attributed_at_ms: now,
        ..fixtures::conversion(&unique("cv"), &unique("click"))
    }
}

async fn publish(topics: &TopicsConfig, conversions: &[Conversion]) {
    let producer = RawProducer::new();
    for c in conversions {
        producer
            .send(&topics.conversions.name, &c.click_id, &encode(c))
            .await;
    }
}

fn global(name: &str, url: String) -> (String, String) {
    (name.to_string(), url)
}

fn attempts_of<'a>(log: &'a [DeliveryAttempt], endpoint: &str) -> Vec<&'a DeliveryAttempt> {
    log.iter().filter(|a| a.endpoint == endpoint).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_behaviour_ends_as_it_should() {
    let ok = TestEndpoint::start(&[]).await;
    let flaky = TestEndpoint::start(&[503, 500]).await;
    let gone = TestEndpoint::start(&[404]).await;
    let busy = TestEndpoint::start_with_retry_after(&[429], "1").await;
    let slow = TestEndpoint::start(&[]).await;
    slow.set_delay(Duration::from_secs(3));
    let hung = SilentEndpoint::start().await;
    let t = topics(2);
    let state = tempfile::tempdir().expect("dir");
    let mut config = delivery_config(
        &t,
        state.path(),
        &[
            global("ok", ok.url("/pb?c={click_id}&p={payout}&s={sub1}")),
            global("flaky", flaky.url("/pb?c={click_id}")),
            global("gone", gone.url("/pb?c={click_id}")),
            global("busy", busy.url("/pb?c={click_id}")),
            global("slow", slow.url("/pb?c={click_id}")),
            global("hung", hung.url("/pb?c={click_id}")),
        ],
    );
    config.request_timeout = Duration::from_secs(1);
    let d = RunningService::delivery(config).await;
    let c = conversion("42");
    publish(&t, std::slice::from_ref(&c)).await;

    // Dead letters: gone at once, slow and hung after three timeouts each.
    let dead = TopicReader::new(&t.dead_letter)
        .read_until::<DeadLetter>("three dead letters", WAIT, |d| d.len() >= 3)
        .await;
    let dead: BTreeMap<&str, &DeadLetter> = dead.iter().map(|d| (d.endpoint.as_str(), d)).collect();
    assert_eq!(
        dead.keys().copied().collect::<Vec<_>>(),
        ["gone", "hung", "slow"]
    );
    assert_eq!(
        (
            dead["gone"].attempts,
            dead["gone"].last_status,
            dead["gone"].reason
        ),
        (1, Some(404), DeadLetterReason::PermanentFailure)
    );
    for name in ["slow", "hung"] {
        let dl = dead[name];
        assert_eq!(
            (dl.attempts, dl.last_status, dl.reason),
            (3, None, DeadLetterReason::AttemptsExhausted),
            "{name}"
        );
        let err = dl.last_error.clone().unwrap_or_default();
        assert!(err.contains("timed out"), "{name}: {err}");
        assert_eq!(dl.conversion, c, "the dead letter carries the conversion");
    }

    // The delivery log: every attempt, in order, per endpoint.
    let log = TopicReader::new(&t.delivery_log)
        .read_until::<DeliveryAttempt>("every attempt", WAIT, |a| a.len() >= 13)
        .await;
    let outcomes = |name: &str| -> Vec<(u32, Option<u16>, AttemptOutcome)> {
        attempts_of(&log, name)
            .iter()
            .map(|a| (a.attempt, a.status_code, a.outcome))
            .collect()
    };
    use AttemptOutcome::*;
    assert_eq!(outcomes("ok"), [(1, Some(200), Delivered)]);
    assert_eq!(
        outcomes("flaky"),
        [
            (1, Some(503), Retryable),
            (2, Some(500), Retryable),
            (3, Some(200), Delivered)
        ]
    );
    assert_eq!(outcomes("gone"), [(1, Some(404), Permanent)]);
    assert_eq!(
        outcomes("busy"),
        [(1, Some(429), Retryable), (2, Some(200), Delivered)]
    );
    assert_eq!(outcomes("slow").len(), 3);
    assert_eq!(outcomes("hung").len(), 3);
    let busy_log = attempts_of(&log, "busy");
    let gap = busy_log[1].ts_ms - busy_log[0].ts_ms;
    assert!(
        gap >= 1000,
        "Retry-After: 1 honoured over the 50 ms schedule, gap {gap} ms"
    );
    assert!(
        busy_log[0].next_attempt_at_ms.is_some() && busy_log[1].next_attempt_at_ms.is_none(),
        "the log says when the retry is due, and nothing once delivered"
    );

    // What the endpoints saw: macros filled in, one stable webhook-id per delivery.
    let r = &ok.received()[0];
    assert_eq!(
        (r.param("c"), r.param("p"), r.param("s")),
        (
            Some(c.click_id.as_str()),
            Some("50.00"),
            Some("spring sale")
        )
    );
    let ids: BTreeSet<String> = flaky
        .received()
        .iter()
        .filter_map(|r| r.header("webhook-id").map(str::to_string))
        .collect();
    assert_eq!(ids.len(), 1, "every attempt carries the same webhook-id");
    assert_eq!(
        ids.first().map(String::as_str),
        Some(c.delivery_id("flaky").as_str())
    );
    assert_eq!(gone.received().len(), 1, "a 404 is not retried");
    assert_eq!(hung.accepted(), 3, "three attempts, each timed out");

    for (series, expected) in [
        ("delivery_attempts_total{endpoint=\"hung\",outcome=\"retryable\",status_class=\"timeout\"}", 3.0),
        ("delivery_attempts_total{endpoint=\"gone\",outcome=\"permanent\",status_class=\"4xx\"}", 1.0),
        ("delivery_retries_scheduled_total{endpoint=\"flaky\"}", 2.0),
        ("delivery_dead_lettered_total{endpoint=\"slow\",reason=\"attempts_exhausted\"}", 1.0),
        ("delivery_scheduled_total{endpoint=\"ok\"}", 1.0),
        ("delivery_attributed_to_delivered_seconds_count", 3.0),
    ] {
        let v = poll_until(series, WAIT, || async {
            let v = d.metric(series).await;
            (v == expected).then_some(v)
        })
        .await;
        assert_eq!(v, expected, "{series}");
    }
    let pending = poll_until("no pending deliveries", WAIT, || async {
        let v = d
            .metric("delivery_pending_deliveries{endpoint=\"flaky\"}")
            .await;
        (v == 0.0).then_some(v)
    })
    .await;
    assert_eq!(pending, 0.0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_endpoint_does_not_hold_up_the_others() {
    const N: usize = 80;
    let ok = TestEndpoint::start(&[]).await;
    let hung = SilentEndpoint::start().await;
    let t = topics(2);
    let state = tempfile::tempdir().expect("dir");
    let mut config = delivery_config(
        &t,
        state.path(),
        &[
            global("ok", ok.url("/pb?c={click_id}")),
            global("hung", hung.url("/pb?c={click_id}")),
        ],
    );
    config.request_timeout = Duration::from_secs(1);
    config.endpoint_max_in_flight = 4;
    config.circuit.failure_threshold = 1_000; // keep the breaker out of this test
    let d = RunningService::delivery(config).await;
    let conversions: Vec<Conversion> = (0..N).map(|_| conversion("7")).collect();
    let started = Instant::now();
    publish(&t, &conversions).await;
    // Served one after another behind the hung endpoint, N deliveries would take at least
    // N / 4 slots × 1 s timeout = 20 s. Side by side, the healthy endpoint is done long
    // before that, while the hung one never has more than its 4 requests in flight.
    let most_in_flight = std::sync::Mutex::new(0.0f64);
    poll_until(
        "the healthy endpoint got every delivery",
        Duration::from_secs(10),
        || {
            let (ok, d, most) = (&ok, &d, &most_in_flight);
            async move {
                let now = d
                    .metric("delivery_in_flight_requests{endpoint=\"hung\"}")
                    .await;
                if let Ok(mut m) = most.lock() {
                    *m = m.max(now);
                }
                (ok.received().len() >= N).then_some(())
            }
        },
    )
    .await;
    let most_in_flight = most_in_flight.lock().map(|m| *m).unwrap_or_default();
    assert_eq!(ok.received().len(), N);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        most_in_flight <= 4.0,
        "hung endpoint had {most_in_flight} in flight"
    );
    assert!(hung.accepted() <= 4 * (started.elapsed().as_secs() as usize + 2));
    // The gauges are refreshed once a second.
    poll_until(
        "the hung endpoint's deliveries waiting their turn",
        WAIT,
        || async {
            let pending = d
                .metric("delivery_pending_deliveries{endpoint=\"hung\"}")
                .await;
            (pending > 0.0).then_some(())
        },
    )
    .await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_opens_holds_back_and_closes_again() {
    let down = TestEndpoint::start(&[]).await;
    down.set_status(503);
    let t = topics(1);
    let state = tempfile::tempdir().expect("dir");
    let mut config = delivery_config(&t, state.path(), &[global("down", down.url("/pb"))]);
    config.retry_schedule = vec![Duration::from_millis(100); 3];
    config.circuit.failure_threshold = 3;
    config.circuit.open_for = Duration::from_secs(1);
    config.circuit.max_open_for = Duration::from_secs(1);
    config.endpoint_max_in_flight = 1; // failures arrive one by one: exactly 3 open it
    let d = RunningService::delivery(config).await;
    publish(&t, &(0..5).map(|_| conversion("1")).collect::<Vec<_>>()).await;

    let dead = TopicReader::new(&t.dead_letter)
        .read_until::<DeadLetter>("five dead letters", WAIT, |d| d.len() >= 5)
        .await;
    let log = TopicReader::new(&t.delivery_log)
        .read_until::<DeliveryAttempt>("twenty attempts", WAIT, |a| a.len() >= 20)
        .await;
    let held_back = log
        .iter()
        .filter(|a| a.error.as_deref() == Some("not sent: the endpoint's circuit is open"))
        .count();
    let sent = down.received().len();
    assert_eq!(
        sent + held_back,
        20,
        "every attempt was either sent or held back"
    );
    assert!(
        sent < 10,
        "the open circuit kept most attempts off the endpoint, {sent} of 20 were sent"
    );
    assert!(dead.iter().all(|dl| dl.attempts == 4));
    assert_eq!(
        d.metric("delivery_circuit_transitions_total{endpoint=\"down\",state=\"open\"}")
            .await,
        1.0,
        "opened once; nothing was sent while open, so it never half-opened"
    );
    assert_eq!(
        d.metric("delivery_circuit_state{endpoint=\"down\",state=\"open\"}")
            .await,
        1.0
    );

    // The endpoint comes back; after the open period one probe gets through and closes
    // the circuit. New conversions keep coming until one is delivered.
    down.set_status(200);
    let producer = RawProducer::new();
    poll_until("a delivery through the closed circuit", WAIT, || {
        let (t, producer, d) = (&t, &producer, &d);
        async move {
            let c = conversion("1");
            producer
                .send(&t.conversions.name, &c.click_id, &encode(&c))
                .await;
            let closed = d
                .metric("delivery_circuit_transitions_total{endpoint=\"down\",state=\"closed\"}")
                .await;
            (closed >= 1.0).then_some(())
        }
    })
    .await;
    assert_eq!(
        d.metric("delivery_circuit_transitions_total{endpoint=\"down\",state=\"half_open\"}")
            .await,
        1.0
    );
    assert!(
        down.received().len() > sent,
        "the probe and what followed were sent"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_bodies_headers_and_standard_webhooks_signatures() {
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let json = TestEndpoint::start(&[]).await;
    let form = TestEndpoint::start(&[]).await;
    let t = topics(1);
    let state = tempfile::tempdir().expect("dir");
    let mut config = delivery_config(&t, state.path(), &[]);
    config.postbacks = vec![
        PostbackConfig {
            name: "json".into(),
            url: json.url("/hook"),
            body: Some(
                r#"{"click":"{click_id}","sub1":"{sub1}","payout":{payout},"event":"{event}"}"#
                    .into(),
            ),
            headers: [("X-Affiliate".to_string(), "aff-{aff_id}".to_string())].into(),
            secret: Some(SECRET.into()),
            aff_id: Some("42".into()),
            ..Default::default()
        },
        PostbackConfig {
            name: "form".into(),
            url: form.url("/hook"),
            method: Some(Method::Put),
            body: Some("cid={click_id}&s={sub1}".into()),
            body_format: Some(s2s_delivery::endpoint::BodyFormat::Form),
            aff_id: Some("42".into()),
            ..Default::default()
        },
    ];
    let d = RunningService::delivery(config).await;
    let mine = conversion("42");
    let other = conversion("43");
    publish(&t, &[other, mine.clone()]).await;
    poll_until("both bodies", WAIT, || async {
        (json.received().len() == 1 && form.received().len() == 1).then_some(())
    })
    .await;

    let r = &json.received()[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-affiliate"), Some("aff-42"));
    let body: serde_json::Value = serde_json::from_str(&r.body).expect("JSON body");
    assert_eq!(body["click"], mine.click_id.as_str());
    assert_eq!(body["sub1"], "spring sale");
    assert_eq!(body["payout"], serde_json::json!(50.0));
    // Verify the signature the way an affiliate's Standard Webhooks library does.
    let id = r.header("webhook-id").expect("webhook-id");
    let ts = r.header("webhook-timestamp").expect("webhook-timestamp");
    let key = base64::engine::general_purpose::STANDARD
        .decode(SECRET.trim_start_matches("whsec_"))
        .expect("key");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).expect("hmac");
    mac.update(format!("{id}.{ts}.{}", r.body).as_bytes());
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    assert_eq!(r.header("webhook-signature"), Some(expected.as_str()));
    let age = s2s_common::now_ms() / 1000 - ts.parse::<i64>().expect("seconds");
    assert!((0..30).contains(&age), "timestamp is now: {age} s");

    let f = &form.received()[0];
    assert_eq!(f.method, "PUT");
    assert_eq!(
        f.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    let fields: BTreeMap<String, String> = form_urlencoded::parse(f.body.as_bytes())
        .into_owned()
        .collect();
    assert_eq!(fields.get("s").map(String::as_str), Some("spring sale"));
    assert!(
        f.header("webhook-signature").is_none(),
        "no secret, no signature"
    );
    // The other affiliate's conversion went to neither.
    assert_eq!(
        d.metric("delivery_scheduled_total{endpoint=\"json\"}")
            .await,
        1.0
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_are_not_delivered_twice_and_updates_go_where_asked() {
    let plain = TestEndpoint::start(&[]).await;
    let updates = TestEndpoint::start(&[]).await;
    let t = topics(2);
    let state = tempfile::tempdir().expect("dir");
    let mut config = delivery_config(
        &t,
        state.path(),
        &[global("plain", plain.url("/pb?s={status}"))],
    );
    config.postbacks.push(PostbackConfig {
        name: "updates".into(),
        url: updates.url("/pb?s={status}&v={conversion_id}"),
        aff_id: Some("9".into()),
        send_updates: true,
        update_statuses: vec!["reversed".into()],
        ..Default::default()
    });
    let d = RunningService::delivery(config).await;
    let c = conversion("9");
    // The attributor replays after a crash: the same outcome twice.
    publish(&t, &[c.clone(), c.clone()]).await;
    poll_until("two duplicates counted", WAIT, || async {
        let dup = d
            .metric("delivery_duplicates_total{endpoint=\"plain\"}")
            .await
            + d.metric("delivery_duplicates_total{endpoint=\"updates\"}")
                .await;
        (dup == 2.0).then_some(())
    })
    .await;
    // Status updates: to pending (not asked for by anyone), then reversed.
    let mut pending = c.clone();
    pending.version = 2;
    pending.status = "pending".into();
    let mut reversed = c.clone();
    reversed.version = 3;
    reversed.status = "reversed".into();
    publish(&t, &[pending, reversed.clone(), reversed]).await;
    poll_until("the reversal delivered", WAIT, || async {
        (updates.received().len() == 2).then_some(())
    })
    .await;
    let marker = conversion("10");
    publish(&t, std::slice::from_ref(&marker)).await;
    poll_until("the marker delivered", WAIT, || async {
        (plain.received().len() == 2).then_some(())
    })
    .await;
    let statuses = |e: &TestEndpoint| -> Vec<String> {
        e.received()
            .iter()
            .filter_map(|r| r.param("s").map(str::to_string))
            .collect()
    };
    assert_eq!(
        statuses(&plain),
        ["approved", "approved"],
        "one per conversion, no updates"
    );
    assert_eq!(statuses(&updates), ["approved", "reversed"]);
    let ids: BTreeSet<String> = updates
        .received()
        .iter()
        .filter_map(|r| r.header("webhook-id").map(str::to_string))
        .collect();
    assert_eq!(ids.len(), 2, "an update is a delivery of its own");
    assert_eq!(
        d.metric("delivery_duplicates_total{endpoint=\"updates\"}")
            .await,
        2.0
    );
    d.stop().await;
}

/// The config of the binary run as a child process, written to `path`; its pipeline
/// config beside it, where [`ChildService`] points it.
fn write_child_config(
    path: &Path,
    topics: &TopicsConfig,
    state: &Path,
    group: &str,
    postbacks: &[(&str, String)],
) {
    let dir = path.parent().expect("a config directory");
    s2s_tests::write_pipeline(
        dir,
        &s2s_tests::child_pipeline(&s2s_tests::brokers(), topics),
    );
    let owned: Vec<(String, String)> = postbacks
        .iter()
        .map(|(n, u)| (n.to_string(), u.clone()))
        .collect();
    let mut c = delivery_config(topics, state, &owned);
    c.group_id = group.to_string();
    c.commit_interval = Duration::from_millis(20);
    c.max_batch = 50;
    c.endpoint_max_in_flight = 8;
    c.retry_schedule = vec![Duration::from_millis(200); 2];
    c.request_timeout = Duration::from_secs(2);
    s2s_tests::write_config(path, &c);
}

/// Runs `delivery replay …` and returns what it printed on stdout.
async fn replay_cli(config: &Path, args: &[&str]) -> String {
    let out = ChildService::command(env!("CARGO_BIN_EXE_delivery-under-test"), config)
        .arg("replay")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .expect("run replay");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "replay failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_redelivered_by_replay_once() {
    let broken = TestEndpoint::start(&[]).await;
    broken.set_status(500);
    let fine = TestEndpoint::start(&[404]).await;
    let t = topics(2);
    let state = tempfile::tempdir().expect("dir");
    let group = unique("delivery");
    let postbacks = [
        ("broken", broken.url("/pb?c={click_id}")),
        ("fine", fine.url("/pb")),
    ];
    let config_path = state.path().join("delivery.toml");
    write_child_config(
        &config_path,
        &t,
        &state.path().join("state"),
        &group,
        &postbacks,
    );
    let mut config = delivery_config(&t, &state.path().join("state"), &[]);
    config.group_id = group;
    config.postbacks = postbacks
        .iter()
        .map(|(n, u)| PostbackConfig {
            name: n.to_string(),
            url: u.clone(),
            ..Default::default()
        })
        .collect();
    let d = RunningService::delivery(config).await;
    let conversions: Vec<Conversion> = (0..3).map(|_| conversion("5")).collect();
    publish(&t, &conversions).await;
    let dead_reader = TopicReader::new(&t.dead_letter);
    dead_reader
        .read_until::<DeadLetter>("four dead letters", WAIT, |d| d.len() >= 4)
        .await;
    assert_eq!(broken.received().len(), 9, "three attempts each");

    // A dry run reads and counts, and sends nothing.
    let dry = replay_cli(
        &config_path,
        &["--endpoint", "broken", "--since", "1h", "--dry-run"],
    )
    .await;
    assert!(
        dry.contains("dry run: read 4 dead letters (0 undecodable), 3 matching, 3 distinct deliveries; nothing sent"),
        "{dry}"
    );
    assert!(dry.contains("broken: 3"), "{dry}");

    // The affiliate fixes its endpoint; the operator replays its dead letters.
    broken.set_status(200);
    let out = replay_cli(
        &config_path,
        &[
            "--endpoint",
            "broken",
            "--requested-by",
            "ops@example",
            "--reason",
            "endpoint fixed",
        ],
    )
    .await;
    assert!(out.contains("3 re-delivery commands sent"), "{out}");
    poll_until("three re-deliveries", WAIT, || async {
        (broken.received().len() == 12).then_some(())
    })
    .await;
    let by_id: BTreeMap<String, usize> =
        broken.received().iter().fold(BTreeMap::new(), |mut m, r| {
            *m.entry(r.header("webhook-id").unwrap_or_default().to_string())
                .or_insert(0) += 1;
            m
        });
    assert_eq!(by_id.len(), 3, "the same webhook-id as the failed attempts");
    assert!(by_id.values().all(|n| *n == 4));
    let log = TopicReader::new(&t.delivery_log)
        .read_until::<DeliveryAttempt>("the new attempts", WAIT, |a| {
            a.iter()
                .filter(|x| x.endpoint == "broken" && x.outcome == AttemptOutcome::Delivered)
                .count()
                >= 3
        })
        .await;
    let redelivered: Vec<u32> = log
        .iter()
        .filter(|a| a.endpoint == "broken" && a.outcome == AttemptOutcome::Delivered)
        .map(|a| a.attempt)
        .collect();
    assert_eq!(
        redelivered,
        [4, 4, 4],
        "attempt numbers go on from the dead letter"
    );

    // Replaying again pays nobody twice: the deliveries are done.
    let again = replay_cli(&config_path, &["--endpoint", "broken"]).await;
    assert!(again.contains("3 re-delivery commands sent"), "{again}");
    poll_until("the second replay applied", WAIT, || async {
        let v = d
            .metric("delivery_commands_total{action=\"redeliver\",result=\"already_delivered\"}")
            .await;
        (v == 3.0).then_some(())
    })
    .await;
    assert_eq!(
        d.metric("delivery_commands_total{action=\"redeliver\",result=\"rearmed\"}")
            .await,
        3.0
    );
    assert_eq!(broken.received().len(), 12);
    assert_eq!(
        fine.received().len(),
        3,
        "one 404 (dead-lettered, not replayed: another endpoint) and two deliveries"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_loses_no_delivery() {
    const N: usize = 300;
    let ep = TestEndpoint::start(&[]).await;
    ep.set_delay(Duration::from_millis(20));
    let t = topics(3);
    let state = tempfile::tempdir().expect("dir");
    let config = state.path().join("delivery.toml");
    write_child_config(
        &config,
        &t,
        &state.path().join("state"),
        &unique("delivery"),
        &[("aff", ep.url("/pb?c={click_id}"))],
    );
    let bin = env!("CARGO_BIN_EXE_delivery-under-test");
    let mut first = ChildService::new(bin, config.clone()).with_log(state.path().join("first.log"));
    first.start();
    let conversions: Vec<Conversion> = (0..N).map(|_| conversion("3")).collect();
    let producer = RawProducer::new();
    for (i, c) in conversions.iter().enumerate() {
        producer
            .send(&t.conversions.name, &c.click_id, &encode(c))
            .await;
        if i == N / 3 {
            poll_until("a first share delivered", WAIT, || async {
                (ep.received().len() >= N / 4).then_some(())
            })
            .await;
            first.kill().await;
        }
    }
    let at_kill = ep.received().len();
    let mut second = ChildService::new(bin, config.clone())
        .with_log(state.path().join("second.log"))
        .group_per_start("delivery");
    second.start();
    poll_until(
        "every conversion delivered",
        Duration::from_secs(60),
        || async {
            let ids: BTreeSet<String> = ep
                .received()
                .iter()
                .filter_map(|r| r.param("c").map(str::to_string))
                .collect();
            (ids.len() >= N).then_some(())
        },
    )
    .await;
    let received = ep.received();
    let mut per_click: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &received {
        *per_click
            .entry(r.param("c").unwrap_or_default())
            .or_insert(0) += 1;
    }
    for c in &conversions {
        assert!(
            per_click.contains_key(c.click_id.as_str()),
            "{} lost",
            c.click_id
        );
    }
    let repeats = received.len() - N;
    // Sent again: at most the attempts whose results were not committed at the kill —
    // the cycle being committed (max_batch, 50) and those in flight (8 per endpoint).
    assert!(repeats <= 58, "{repeats} repeated requests");
    second.kill().await;
    let restored: u64 = second
        .events("partition state restored from the changelog")
        .iter()
        .filter_map(|f| f["records"].as_u64())
        .sum();
    // The store is committed after the cycle's changelog records are acknowledged, so a
    // kill in between leaves at most that one cycle to read back: max_batch (50) job
    // changes and two offsets. Restoring the state would read back every job change,
    // at least two per delivery made before the kill.
    assert!(
        !std::fs::read_to_string(second.log())
            .unwrap_or_default()
            .is_empty(),
        "the restart's log was captured"
    );
    assert!(
        restored <= 52,
        "restored {restored} records from the changelog"
    );
    let no_dead = TopicReader::new(&t.dead_letter);
    let producer = RawProducer::new();
    producer.send(&t.dead_letter.name, "marker", b"{}").await;
    let dead = no_dead
        .read_raw_until("the marker", WAIT, |m| !m.is_empty())
        .await;
    assert_eq!(dead.len(), 1, "nothing dead-lettered, only the marker");
    println!(
        "killed after {at_kill} of {N} requests; {repeats} repeated after the restart; \
         {restored} changelog records restored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instance_takes_over_pending_retries_from_the_changelog() {
    let down = TestEndpoint::start(&[]).await;
    down.set_status(503);
    let retired = TestEndpoint::start(&[]).await;
    retired.set_status(503);
    let t = topics(2);
    let (state_a, state_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let group = unique("delivery");
    let mut a = delivery_config(
        &t,
        state_a.path(),
        &[
            global("down", down.url("/pb?c={click_id}")),
            global("retired", retired.url("/pb")),
        ],
    );
    a.group_id = group.clone();
    a.retry_schedule = vec![Duration::from_secs(3); 2];
    let instance_a = RunningService::delivery(a.clone()).await;
    let conversions: Vec<Conversion> = (0..10).map(|_| conversion("8")).collect();
    publish(&t, &conversions).await;
    TopicReader::new(&t.delivery_log)
        .read_until::<DeliveryAttempt>("the first attempts", WAIT, |x| x.len() >= 20)
        .await;
    poll_until("the first attempts committed", WAIT, || async {
        let v = instance_a
            .metric("delivery_retries_scheduled_total{endpoint=\"down\"}")
            .await;
        (v == 10.0).then_some(())
    })
    .await;
    instance_a.stop().await;

    // B: another disk, the same group, and "retired" no longer configured.
    down.set_status(200);
    let mut b = a;
    b.state_dir = state_b.path().to_path_buf();
    b.admin_listen = "127.0.0.1:0".parse().expect("addr");
    b.postbacks.retain(|p| p.name == "down");
    let instance_b = RunningService::delivery(b).await;
    poll_until("B delivers what A scheduled", WAIT, || async {
        (down.received().len() == 20).then_some(())
    })
    .await;
    let dead = TopicReader::new(&t.dead_letter)
        .read_until::<DeadLetter>("retired's dead letters", WAIT, |d| d.len() >= 10)
        .await;
    assert!(dead.iter().all(|d| d.endpoint == "retired"
        && d.reason == DeadLetterReason::PostbackRemoved
        && d.attempts == 2
        && d.last_error
            .as_deref()
            .is_some_and(|e| e.contains("no postback named 'retired'"))));
    assert!(
        instance_b
            .metric("stream_restored_records_total{service=\"delivery\"}")
            .await
            >= 20.0
    );
    let ids: BTreeMap<String, usize> = down.received().iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.header("webhook-id").unwrap_or_default().to_string())
            .or_insert(0) += 1;
        m
    });
    assert_eq!(ids.len(), 10);
    assert!(
        ids.values().all(|n| *n == 2),
        "one failed attempt by A, one delivery by B: {ids:?}"
    );
    assert_eq!(
        retired.received().len(),
        10,
        "B sent nothing to the retired endpoint"
    );
    instance_b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_conversions_are_set_aside_and_the_stream_goes_on() {
    let ep = TestEndpoint::start(&[]).await;
    let t = topics(1);
    let state = tempfile::tempdir().expect("dir");
    let d = RunningService::delivery(delivery_config(
        &t,
        state.path(),
        &[global("aff", ep.url("/pb"))],
    ))
    .await;
    let producer = RawProducer::new();
    producer.send(&t.conversions.name, "k", b"{not json").await;
    let good = conversion("1");
    publish(&t, std::slice::from_ref(&good)).await;
    poll_until("the good conversion delivered", WAIT, || async {
        (ep.received().len() == 1).then_some(())
    })
    .await;
    let poison = TopicReader::new(&t.poison)
        .read_raw_until("the poison record", WAIT, |m| !m.is_empty())
        .await;
    use rdkafka::message::{Headers, Message};
    assert_eq!(
        poison[0].payload(),
        Some(&b"{not json"[..]),
        "kept byte for byte"
    );
    let headers = poison[0].headers().expect("headers");
    let source = headers
        .iter()
        .find(|h| h.key == "s2s-source-topic")
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned());
    assert_eq!(source.as_deref(), Some(t.conversions.name.as_str()));
    assert_eq!(
        d.metric("stream_poison_records_total{input=\"conversion\",service=\"delivery\"}")
            .await,
        1.0
    );
    d.stop().await;
}
