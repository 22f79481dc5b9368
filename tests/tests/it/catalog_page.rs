//! The console's catalog pages in headless Chromium (chromedriver, driven with
//! `fantoccini`): an affiliate and its postback created in the page, a click and its FTD
//! through ingest delivered to the postback's URL, a bad template refused next to its
//! field, the URL changed in the page and the next conversion delivered to the new one,
//! the postback's Test button and its history — no restart anywhere.

use std::time::Duration;

use fantoccini::{Client, Locator};
use s2s_tests::{poll_until, Pipeline, TestEndpoint, CONSOLE_TOKEN};
use serde_json::Value;

use crate::catalog::{applied, console_get};
use crate::console::{screenshot, wait_for, Driver, SERIAL};

const WAIT: Duration = Duration::from_secs(60);

/// Types `text` into the input with this ID, replacing what it held.
async fn fill(c: &Client, id: &str, text: &str) {
    let input = c.find(Locator::Id(id)).await.expect(id);
    input.clear().await.expect("clear");
    input.send_keys(text).await.expect("type");
}

async fn press(c: &Client, id: &str) {
    c.find(Locator::Id(id))
        .await
        .expect(id)
        .click()
        .await
        .expect("click");
}

/// Saves the form and waits for the page to say so; the entity's revision (from the API).
async fn save(c: &Client, api: &str, key: &str, after: Option<i64>) -> i64 {
    press(c, "entity-save").await;
    wait_for(c, "#entity-message.ok", &format!("{key} saved")).await;
    poll_until(&format!("{key} past revision {after:?}"), WAIT, || async {
        let e: Value = console_get(format!("{api}/api/v1/catalog/{key}")).await;
        let r = e["revision"].as_i64()?;
        (after.is_none_or(|a| r > a)).then_some(r)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_affiliate_and_its_postback_managed_in_the_page() {
    let _serial = SERIAL.lock().await;
    let (first, second) = (
        TestEndpoint::start(&[]).await,
        TestEndpoint::start(&[]).await,
    );
    let p = Pipeline::with_console().await;
    let api = p.console_url();
    let driver = Driver::start().await;
    let c = driver.browser().await;

    c.goto(&format!("{api}/#catalog/affiliate"))
        .await
        .expect("open the page");
    fill(&c, "token", CONSOLE_TOKEN).await;
    press(&c, "save-token").await;

    // A new affiliate.
    wait_for(&c, "#catalog-new", "the New button").await;
    press(&c, "catalog-new").await;
    wait_for(&c, "#field-name", "the affiliate form").await;
    fill(&c, "entity-id", "77").await;
    fill(&c, "field-name", "Partner 77").await;
    fill(&c, "entity-reason", "new partner").await;
    save(&c, &api, "affiliate/77", None).await;
    screenshot(&c, "catalog-affiliate").await;

    // Its postback: a bad template is refused next to its field, then fixed.
    c.goto(&format!("{api}/#catalog/postback/new"))
        .await
        .expect("new postback");
    wait_for(&c, "#field-url", "the postback form").await;
    fill(&c, "entity-id", "aff-77").await;
    fill(&c, "field-url", &first.url("/pb?c={clickid}")).await;
    fill(&c, "field-aff_id", "77").await;
    fill(&c, "field-events", "ftd").await;
    press(&c, "entity-save").await;
    let refused = wait_for(&c, "#entity-form .field-error", "the field's error").await;
    let why = refused.text().await.expect("text");
    assert!(why.contains("clickid"), "{why}");
    let marked = c
        .find(Locator::Css("#field-url.invalid"))
        .await
        .expect("the URL field is marked");
    assert!(marked.is_displayed().await.expect("shown"));
    screenshot(&c, "catalog-postback-invalid").await;
    fill(&c, "field-url", &first.url("/pb?c={click_id}&p={payout}")).await;
    let r1 = save(&c, &api, "postback/aff-77", None).await;
    applied(p.delivery_admin, "delivery", r1).await;

    let c1 = p.click("offer_id=1&aff_id=77").await;
    p.ftd(&c1).await;
    poll_until(
        "the FTD delivered to the postback made in the page",
        WAIT,
        || async {
            first
                .received()
                .iter()
                .any(|r| r.param("c") == Some(c1.as_str()))
                .then_some(())
        },
    )
    .await;

    // The URL changed in the page: the next conversion goes to the new one.
    wait_for(&c, "#postback-tools:not([hidden])", "the postback's tools").await;
    fill(&c, "field-url", &second.url("/pb?c={click_id}&p={payout}")).await;
    fill(&c, "entity-reason", "moved").await;
    let r2 = save(&c, &api, "postback/aff-77", Some(r1)).await;
    applied(p.delivery_admin, "delivery", r2).await;
    let c2 = p.click("offer_id=1&aff_id=77").await;
    p.ftd(&c2).await;
    poll_until("the next FTD delivered to the new URL", WAIT, || async {
        second
            .received()
            .iter()
            .any(|r| r.param("c") == Some(c2.as_str()))
            .then_some(())
    })
    .await;
    assert!(
        !first
            .received()
            .iter()
            .any(|r| r.param("c") == Some(c2.as_str())),
        "the old URL got nothing more"
    );

    // Test button: the exact request and the endpoint's answer, shown in the page.
    press(&c, "postback-test").await;
    let shown = wait_for(
        &c,
        "#postback-test-result[data-status='200']",
        "the test's answer",
    )
    .await
    .text()
    .await
    .expect("text");
    assert!(
        shown.contains("s2s-test: 1") && shown.contains("HTTP 200"),
        "{shown}"
    );
    assert!(
        second
            .received()
            .iter()
            .any(|r| r.header("s2s-test") == Some("1")),
        "the test reached the endpoint"
    );
    // The history: created, then moved.
    let rows = poll_until("the history of two changes", WAIT, || async {
        let rows = c
            .find_all(Locator::Css("#entity-history tbody tr"))
            .await
            .ok()?;
        (rows.len() == 2).then_some(rows)
    })
    .await;
    let newest = rows[0].text().await.expect("text");
    assert!(
        newest.contains("moved") && newest.contains("tester"),
        "{newest}"
    );
    screenshot(&c, "catalog-postback").await;

    // The list shows both postbacks' summaries.
    c.goto(&format!("{api}/#catalog/postback"))
        .await
        .expect("the list");
    let row = wait_for(
        &c,
        "#catalog-list tr[data-id='aff-77']",
        "the postback listed",
    )
    .await
    .text()
    .await
    .expect("text");
    assert!(
        row.contains("affiliate 77") && row.contains("enabled"),
        "{row}"
    );
    let _ = c.close().await;
    p.stop().await;
}
