//! A postback created after the fact, backfilled: the conversions it would have been sent
//! since a given time are delivered to it, once, however often the backfill runs.

use std::time::Duration;

use s2s_tests::{poll_until, Pipeline, PipelineOptions, TestEndpoint};
use serde_json::{json, Value};

use crate::catalog::{applied, console_get, put_entity};

const WAIT: Duration = Duration::from_secs(30);

/// Starts a backfill of `postback`; the status and the answer's body.
async fn backfill(api: &str, postback: &str, body: Value) -> (u16, Option<String>, Value) {
    let resp = s2s_tests::http()
        .post(format!(
            "{api}/api/v1/catalog/postback/{postback}/backfills"
        ))
        .bearer_auth(s2s_tests::CONSOLE_TOKEN)
        .json(&body)
        .send()
        .await
        .expect("answer");
    let status = resp.status().as_u16();
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (status, location, resp.json().await.unwrap_or(Value::Null))
}

/// Polls a backfill until it has finished; its last status.
async fn finished(api: &str, location: &str) -> Value {
    poll_until("the backfill finishes", WAIT, || async {
        let st = console_get(format!("{api}{location}")).await;
        (st["state"] != "running").then_some(st)
    })
    .await
}

/// Conversions made before a postback existed reach it when it is created with a
/// backfill, only those its filter wants and no older than asked; a second backfill
/// sends nothing twice; a disabled postback and a bad time are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_postback_is_backfilled_once() {
    let endpoint = TestEndpoint::start(&[]).await;
    let p = Pipeline::start(PipelineOptions {
        console: true,
        ..Default::default()
    })
    .await;
    let api = p.console_url();
    // Before the postback exists: two FTDs of affiliate 42, one of 43.
    let (a, b, other) = (
        p.click("offer_id=1&aff_id=42").await,
        p.click("offer_id=1&aff_id=42").await,
        p.click("offer_id=1&aff_id=43").await,
    );
    for c in [&a, &b, &other] {
        p.ftd(c).await;
    }
    s2s_tests::metric_reaches(
        p.delivery_admin,
        "stream_records_consumed_total{input=\"conversion\",service=\"delivery\"}",
        3.0,
    )
    .await;

    let (status, created) = put_entity(
        &api,
        "postback/late",
        None,
        json!({ "url": endpoint.url("/late?c={click_id}&p={payout}"), "aff_id": "42",
            "events": ["ftd"] }),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    applied(
        p.delivery_admin,
        "delivery",
        created["revision"].as_i64().expect("revision"),
    )
    .await;
    assert!(
        endpoint.received().is_empty(),
        "nothing before the backfill"
    );

    let (status, location, started) = backfill(
        &api,
        "late",
        json!({ "since": "1h", "reason": "new endpoint" }),
    )
    .await;
    assert_eq!(status, 202, "{started}");
    assert_eq!(started["state"], "running");
    let location = location.expect("Location");
    let done = finished(&api, &location).await;
    println!("backfill: {done}");
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["matched"], 2, "affiliate 42's FTDs: {done}");
    assert_eq!(done["sent"], 2, "{done}");
    assert_eq!(done["requested_by"], "tester");
    let got = poll_until("both backfilled deliveries", WAIT, || async {
        let r = endpoint.received();
        (r.len() >= 2).then_some(r)
    })
    .await;
    let mut clicks: Vec<&str> = got.iter().filter_map(|r| r.param("c")).collect();
    clicks.sort_unstable();
    let mut want = vec![a.as_str(), b.as_str()];
    want.sort_unstable();
    assert_eq!(clicks, want, "only affiliate 42's conversions");

    // Again: every delivery exists, nothing is sent twice.
    let (status, location, _) = backfill(&api, "late", json!({ "since": "1h" })).await;
    assert_eq!(status, 202);
    let again = finished(&api, &location.expect("Location")).await;
    assert_eq!(again["sent"], 2, "{again}");
    poll_until(
        "delivery applies the second backfill's commands",
        WAIT,
        || async {
            let n = s2s_tests::metric(
                p.delivery_admin,
                "delivery_commands_total{action=\"backfill\",result=\"exists\"}",
            )
            .await?;
            (n >= 2.0).then_some(())
        },
    )
    .await;
    assert_eq!(
        s2s_tests::metric(
            p.delivery_admin,
            "delivery_commands_total{action=\"backfill\",result=\"created\"}"
        )
        .await,
        Some(2.0)
    );
    assert_eq!(endpoint.received().len(), 2, "no delivery sent twice");
    let listed = console_get(format!("{api}/api/v1/catalog/postback/late/backfills")).await;
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );

    // A time after everything: nothing matched.
    let (_, location, _) = backfill(&api, "late", json!({ "since": "2999-01-01T00:00:00Z" })).await;
    let none = finished(&api, &location.expect("Location")).await;
    assert_eq!(
        (none["state"].clone(), none["matched"].clone()),
        (json!("done"), json!(0)),
        "{none}"
    );

    let (status, _, refused) = backfill(&api, "late", json!({ "since": "yesterday" })).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (422, Some("invalid_time")),
        "{refused}"
    );
    let (status, _, refused) = backfill(&api, "nobody", json!({ "since": "1h" })).await;
    assert_eq!(status, 404, "{refused}");
    let (status, off) = put_entity(
        &api,
        "postback/off",
        None,
        json!({ "url": endpoint.url("/off"), "enabled": false }),
    )
    .await;
    assert_eq!(status, 201, "{off}");
    let (status, _, refused) = backfill(&api, "off", json!({ "since": "1h" })).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (409, Some("postback_disabled")),
        "{refused}"
    );
}
