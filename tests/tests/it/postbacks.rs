//! A postback's tools in the console: the backfill (a postback created after the fact is
//! sent the conversions it would have been sent since a given time, once, however often
//! the backfill runs) and the Test button (a sample conversion through its real template
//! and signing, shown exactly as sent, written nowhere).

use std::time::Duration;

use s2s_tests::{poll_until, Pipeline, TestEndpoint};
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
    let p = Pipeline::with_console().await;
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

/// The Test button: the endpoint gets the sample exactly as the answer shows it (URL,
/// headers, the signature the secret makes), marked as a test; nothing is written to the
/// pipeline; an endpoint that does not answer is a 200 that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_button_sends_the_real_request_and_shows_it() {
    let endpoint = TestEndpoint::start(&[202]).await;
    let p = Pipeline::with_console().await;
    let api = p.console_url();
    let (status, created) = put_entity(
        &api,
        "postback/signed",
        None,
        json!({ "url": endpoint.url("/pb?c={click_id}&p={payout}&e={event}"), "aff_id": "42",
            "events": ["deposit"], "secret": "whsec_c2VjcmV0LXNpZ25pbmcta2V5LTEyMzQ1Njc4OTA=" }),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let test = |id: &'static str| {
        let url = format!("{api}/api/v1/catalog/postback/{id}/test");
        async move {
            let resp = s2s_tests::http()
                .post(url)
                .bearer_auth(s2s_tests::CONSOLE_TOKEN)
                .send()
                .await
                .expect("answer");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.expect("JSON"))
        }
    };
    let (status, shown) = test("signed").await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["test"], true);
    assert_eq!(shown["response"]["status"], 202, "{shown}");
    let got = endpoint.received();
    assert_eq!(got.len(), 1, "one test request");
    let got = &got[0];
    let click_id = got.param("c").expect("c");
    assert!(click_id.starts_with("test_"), "{got:?}");
    assert_eq!(
        got.param("e"),
        Some("deposit"),
        "an event the postback wants"
    );
    assert_eq!(
        shown["request"]["url"].as_str(),
        Some(
            endpoint
                .url(&format!("/pb?c={click_id}&p=50.00&e=deposit"))
                .as_str()
        ),
        "the URL as sent"
    );
    assert_eq!(got.header("s2s-test"), Some("1"));
    for (name, value) in shown["request"]["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .filter_map(|h| Some((h[0].as_str()?, h[1].as_str()?)))
    {
        assert_eq!(got.header(name), Some(value), "header {name} as shown");
    }
    assert!(
        got.header("webhook-signature")
            .is_some_and(|s| s.starts_with("v1,")),
        "signed with the postback's secret"
    );
    assert!(
        !shown.to_string().contains("c2VjcmV0LXNpZ25pbmcta2V5"),
        "the secret is not shown"
    );
    let listed = console_get(format!("{api}/api/v1/conversions")).await;
    assert_eq!(listed["items"], json!([]), "not a conversion: {listed}");

    let (status, created) = put_entity(
        &api,
        "postback/down",
        None,
        json!({ "url": "http://127.0.0.1:9/pb?c={click_id}", "timeout": "2s" }),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let (status, shown) = test("down").await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["response"], Value::Null);
    assert!(
        shown["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{shown}"
    );
    let (status, _) = test("nobody").await;
    assert_eq!(status, 404);
}
