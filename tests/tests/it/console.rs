//! The reporting console on the real broker: a scenario through the HTTP edge (a click and
//! its FTD delivered to one endpoint and dead-lettered at another; a postback for a click
//! that never came), then the console's API must tell the exact story of each, and a
//! re-fire of the dead-lettered delivery — once its endpoint is healthy — must succeed
//! and show in the story. The same through the web page in headless Chromium, with a
//! screenshot of every page.

use std::time::Duration;

use s2s_tests::{
    http, poll_for, poll_until, Pipeline, PipelineOptions, TestEndpoint, CONSOLE_TOKEN,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// One scenario at a time: each runs a whole pipeline (and one a browser) on two cores.
pub(crate) static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The pipeline with the console, two endpoints (`ok`, and `flaky`, down until told
/// otherwise), a delivered-and-dead-lettered click and a rejected postback.
struct Scenario {
    p: Pipeline,
    flaky: TestEndpoint,
    _ok: TestEndpoint,
    click_id: String,
    unknown_click: String,
}

async fn scenario() -> Scenario {
    let ok = TestEndpoint::start(&[]).await;
    let flaky = TestEndpoint::start(&[]).await;
    flaky.set_status(500);
    let p = Pipeline::start(PipelineOptions {
        postbacks: vec![
            ("ok".into(), ok.url("/pb?c={click_id}")),
            ("flaky".into(), flaky.url("/pb?c={click_id}")),
        ],
        console: true,
        ..Default::default()
    })
    .await;
    let client = http();
    let click_id = p.click("offer_id=1&aff_id=42&sub1=spring").await;
    let unknown_click = s2s_tests::unique("never-clicked");
    for q in [
        format!("click_id={click_id}&event=ftd&txn_id=T1&amount=100&currency=EUR"),
        format!("click_id={unknown_click}&event=ftd&txn_id=T2"),
    ] {
        let r = client
            .get(p.ingest_url(&format!("/postback?{q}")))
            .send()
            .await
            .expect("postback");
        assert_eq!(r.status(), 200);
    }
    // A postback ingest refuses (an event it does not know), with a secret in it.
    let r = client
        .get(p.ingest_url(&format!(
            "/postback?click_id={click_id}&event=sale&token=hunter2&sub1=a"
        )))
        .send()
        .await
        .expect("postback");
    assert_eq!(r.status(), 422);
    Scenario {
        p,
        flaky,
        _ok: ok,
        click_id,
        unknown_click,
    }
}

async fn api(p: &Pipeline, path: &str) -> (u16, Value) {
    let r = http()
        .get(format!("{}{path}", p.console_url()))
        .bearer_auth(CONSOLE_TOKEN)
        .send()
        .await
        .expect("console answers");
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// The click's story once `done` accepts it.
async fn story(s: &Scenario, click: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    poll_until(what, WAIT, || async {
        let (status, body) = api(&s.p, &format!("/api/v1/clicks/{click}")).await;
        (status == 200 && done(&body)).then_some(body)
    })
    .await
}

fn kinds(story: &Value) -> Vec<String> {
    story["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["kind"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn delivery<'a>(story: &'a Value, endpoint: &str) -> &'a Value {
    story["deliveries"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["endpoint"] == endpoint))
        .unwrap_or(&Value::Null)
}

/// The scenario's deliveries settled and every record of them read: the dead letter and
/// the attempts come on two topics, so the story may show the dead letter before the
/// attempt that led to it.
fn dead_lettered(st: &Value) -> bool {
    delivery(st, "flaky")["state"] == "dead_lettered"
        && delivery(st, "ok")["state"] == "delivered"
        && kinds(st).iter().filter(|k| *k == "attempt").count() >= 4
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_tells_each_story_and_refires_a_dead_letter() {
    let _serial = SERIAL.lock().await;
    let s = scenario().await;

    // The delivered and dead-lettered click: everything, in order.
    let st = story(
        &s,
        &s.click_id,
        "the click's deliveries settled",
        dead_lettered,
    )
    .await;
    let k = kinds(&st);
    assert_eq!(k.iter().filter(|k| *k == "postback").count(), 1);
    assert_eq!(k.iter().filter(|k| *k == "conversion").count(), 1);
    assert_eq!(
        k.iter().filter(|k| *k == "attempt").count(),
        4,
        "ok once, flaky three times"
    );
    assert_eq!(k.iter().filter(|k| *k == "dead_letter").count(), 1);
    assert_eq!(k[0], "postback", "in time order: {k:?}");
    assert_eq!(k.last().map(String::as_str), Some("dead_letter"), "{k:?}");
    assert_eq!(st["click"]["aff_id"], "42");
    assert_eq!(st["click"]["subs"]["sub1"], "spring");
    let conversion = st["entries"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["kind"] == "conversion"))
        .expect("conversion");
    assert_eq!(conversion["record"]["payout"], "50.00");
    let flaky = delivery(&st, "flaky");
    assert_eq!(
        (flaky["attempts"].as_u64(), flaky["last_status"].as_u64()),
        (Some(3), Some(500))
    );
    assert_eq!(delivery(&st, "ok")["attempts"], 1);

    // The read model says it is up to date, for every partition.
    let partitions = s.p.topics.clicks.partitions;
    let status = poll_until("the read model up to date", WAIT, || async {
        let (code, st) = api(&s.p, "/api/v1/status").await;
        (code == 200 && st["records_behind"] == 0).then_some(st)
    })
    .await;
    assert_eq!(
        status["partitions"].as_array().map(Vec::len),
        usize::try_from(partitions).ok(),
        "{status}"
    );

    // The rejected postback.
    let st2 = story(&s, &s.unknown_click, "the rejection", |st| {
        kinds(st).contains(&"rejection".to_string())
    })
    .await;
    assert_eq!(kinds(&st2), ["postback", "rejection"]);
    let rejection = &st2["entries"][1]["record"];
    assert_eq!(rejection["reason"], "unknown_click");
    assert!(st2["click"].is_null(), "no click was ever seen");

    // Lists and the failures view.
    let (_, dead) = api(&s.p, "/api/v1/dead-letters?endpoint=flaky").await;
    let flaky_id = flaky["delivery_id"]
        .as_str()
        .expect("delivery id")
        .to_string();
    assert_eq!(dead["items"][0]["delivery_id"], flaky_id.as_str());
    let (_, eps) = api(&s.p, "/api/v1/endpoints").await;
    let flaky_ep = eps
        .as_array()
        .and_then(|e| e.iter().find(|e| e["endpoint"] == "flaky"))
        .expect("flaky");
    assert_eq!(
        (
            flaky_ep["dead_lettered"].as_u64(),
            flaky_ep["failed_attempts"].as_u64()
        ),
        (Some(1), Some(3))
    );
    assert!(
        flaky_ep["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("500"),
        "{flaky_ep}"
    );
    // The refused postback, as the operator's engineer sees it: why, and what was sent,
    // without the secret.
    let refused = poll_until("the refused postback", WAIT, || async {
        let (code, page) = api(&s.p, "/api/v1/refusals?source=default").await;
        (code == 200 && page["items"].as_array().is_some_and(|i| !i.is_empty())).then_some(page)
    })
    .await;
    let r = &refused["items"][0];
    assert_eq!(
        (&r["status"], &r["reason"], &r["field"], &r["source"]),
        (
            &Value::from(422),
            &Value::from("unknown_value"),
            &Value::from("event"),
            &Value::from("default")
        ),
        "{r}"
    );
    assert_eq!(r["params"]["event"], "sale");
    assert_eq!(r["params"]["token"], "[redacted]", "{r}");
    assert!(!r.to_string().contains("hunter2"), "{r}");
    assert_eq!(
        s2s_tests::metric(
            s.p.ingest_admin,
            "ingest_refusals_total{reason=\"unknown_value\"}"
        )
        .await,
        Some(1.0)
    );
    let (_, other) = api(&s.p, "/api/v1/refusals?source=default&reason=unauthorized").await;
    assert_eq!(other["items"].as_array().map(Vec::len), Some(0));
    let (_, rejections) = api(&s.p, "/api/v1/rejections?reason=unknown_click").await;
    assert_eq!(rejections["items"][0]["click_id"], s.unknown_click.as_str());
    let (_, convs) = api(&s.p, "/api/v1/conversions?aff_id=42").await;
    assert_eq!(convs["items"].as_array().map(Vec::len), Some(1));
    let (_, totals) = api(&s.p, "/api/v1/totals?by=aff").await;
    let row = totals
        .as_array()
        .and_then(|t| t.iter().find(|r| r["aff_id"] == "42"))
        .expect("affiliate 42");
    assert_eq!(
        (row["clicks"].as_u64(), row["conversions"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(row["conversion_rate"].as_f64(), Some(1.0));

    // The affiliate fixed its endpoint; the operator re-fires the dead letter.
    s.flaky.set_status(200);
    let refire = format!("/api/v1/deliveries/{flaky_id}/refire");
    let (status, r) = post(
        &s.p,
        &refire,
        serde_json::json!({"reason": "endpoint fixed"}),
    )
    .await;
    assert_eq!(status, 202, "{r}");
    // The command and the attempt it led to come on two topics: wait for both.
    let st = story(&s, &s.click_id, "the re-fired delivery delivered", |st| {
        delivery(st, "flaky")["state"] == "delivered" && kinds(st).contains(&"command".into())
    })
    .await;
    let cmd = st["entries"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["kind"] == "command"))
        .expect("the command in the story");
    assert_eq!(cmd["record"]["requested_by"], "tester");
    assert_eq!(cmd["record"]["reason"], "endpoint fixed");
    let last_attempt = st["entries"]
        .as_array()
        .and_then(|e| e.iter().rev().find(|e| e["kind"] == "attempt"))
        .expect("the new attempt");
    assert_eq!(
        (
            last_attempt["record"]["attempt"].as_u64(),
            last_attempt["record"]["outcome"].as_str()
        ),
        (Some(4), Some("delivered"))
    );
    let ids: std::collections::BTreeSet<String> = s
        .flaky
        .received()
        .iter()
        .filter_map(|r| r.header("webhook-id").map(str::to_string))
        .collect();
    assert_eq!(
        ids.into_iter().collect::<Vec<_>>(),
        std::slice::from_ref(&flaky_id),
        "the same webhook-id"
    );
    let (_, dead) = api(&s.p, "/api/v1/dead-letters").await;
    assert!(
        dead["items"].as_array().is_some_and(Vec::is_empty),
        "no dead letters left: {dead}"
    );
    // A delivered delivery is not re-fired again.
    let (status, r) = post(&s.p, &refire, serde_json::json!({})).await;
    assert_eq!(status, 409, "{r}");
    s.p.stop().await;
}

async fn post(s: &Pipeline, path: &str, body: Value) -> (u16, Value) {
    let r = http()
        .post(format!("{}{path}", s.console_url()))
        .bearer_auth(CONSOLE_TOKEN)
        .json(&body)
        .send()
        .await
        .expect("console answers");
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Bulk re-fire: every dead letter of one endpoint in a time range, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_refire_takes_an_endpoints_dead_letters_in_a_range() {
    let _serial = SERIAL.lock().await;
    let down = TestEndpoint::start(&[]).await;
    down.set_status(503);
    let p = Pipeline::start(PipelineOptions {
        postbacks: vec![("down".into(), down.url("/pb?c={click_id}"))],
        console: true,
        ..Default::default()
    })
    .await;
    let client = http();
    let mut clicks = Vec::new();
    for i in 0..3 {
        let click = s2s_tests::unique("bulk");
        let r = client
            .post(p.ingest_url("/v1/clicks"))
            .json(&serde_json::json!({"click_id": click, "offer_id": "1", "aff_id": "42"}))
            .send()
            .await
            .expect("click");
        assert_eq!(r.status(), 200);
        let r = client
            .get(p.ingest_url(&format!("/postback?click_id={click}&event=ftd&txn_id=B{i}")))
            .send()
            .await
            .expect("postback");
        assert_eq!(r.status(), 200);
        clicks.push(click);
    }
    let last = std::sync::Mutex::new(Value::Null);
    let Some(dead) = poll_for(WAIT, || async {
        let (_, v) = api(&p, "/api/v1/dead-letters?endpoint=down").await;
        let items = v["items"].as_array().cloned();
        *last.lock().expect("lock") = v;
        items.filter(|items| items.len() == 3)
    })
    .await
    else {
        let counters = p.counters().await;
        panic!(
            "timed out after {WAIT:?} waiting for three dead letters; the console listed {}; \
             the pipeline counted:\n{counters}",
            last.lock().expect("lock")
        );
    };
    // Pages: two, then the last one, newest first, no row twice.
    let (_, first) = api(&p, "/api/v1/dead-letters?endpoint=down&limit=2").await;
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a second page")
        .to_string();
    let (_, second) = api(
        &p,
        &format!("/api/v1/dead-letters?endpoint=down&limit=2&cursor={cursor}"),
    )
    .await;
    assert!(second["next_cursor"].is_null(), "the last page: {second}");
    let paged: Vec<&Value> = first["items"]
        .as_array()
        .into_iter()
        .chain(second["items"].as_array())
        .flatten()
        .collect();
    assert_eq!(
        paged.iter().map(|d| &d["delivery_id"]).collect::<Vec<_>>(),
        dead.iter().map(|d| &d["delivery_id"]).collect::<Vec<_>>(),
        "the pages are the whole list, in its order"
    );
    let times: Vec<i64> = dead
        .iter()
        .filter_map(|d| d["dead_at_ms"].as_i64())
        .collect();
    let (first, last) = (
        times.iter().min().copied().expect("times"),
        times.iter().max().copied().expect("times"),
    );

    // Nothing matches: a range that ends before the first, another endpoint.
    let (status, r) = post(
        &p,
        "/api/v1/dead-letters/refire",
        serde_json::json!({"endpoint": "down", "to": first}),
    )
    .await;
    assert_eq!((status, r["sent"].as_u64()), (202, Some(0)), "{r}");
    let (status, r) = post(
        &p,
        "/api/v1/dead-letters/refire",
        serde_json::json!({"endpoint": "elsewhere"}),
    )
    .await;
    assert_eq!((status, r["sent"].as_u64()), (202, Some(0)), "{r}");
    let (status, r) = post(&p, "/api/v1/dead-letters/refire", serde_json::json!({})).await;
    assert_eq!(status, 422, "the endpoint is required: {r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("endpoint")),
        "{r}"
    );

    // The endpoint is back: every dead letter in the range goes again, once each.
    down.set_status(200);
    let (status, r) = post(
        &p,
        "/api/v1/dead-letters/refire",
        serde_json::json!({"endpoint": "down", "from": first, "to": last + 1, "reason": "fixed"}),
    )
    .await;
    assert_eq!(
        (
            status,
            r["sent"].as_u64(),
            r["requested_by"].as_str(),
            r["more"].as_bool()
        ),
        (202, Some(3), Some("tester"), Some(false)),
        "{r}"
    );
    for click in &clicks {
        // The command and the attempt it led to come on two topics: wait for both.
        let st = poll_until("the re-fired delivery delivered", WAIT, || async {
            let (_, st) = api(&p, &format!("/api/v1/clicks/{click}")).await;
            (st["deliveries"][0]["state"] == "delivered" && kinds(&st).contains(&"command".into()))
                .then_some(st)
        })
        .await;
        let commands: Vec<&Value> = st["entries"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["kind"] == "command")
            .collect();
        assert_eq!(commands.len(), 1, "{st}");
        assert_eq!(commands[0]["record"]["requested_by"], "tester");
        assert_eq!(commands[0]["record"]["reason"], "fixed");
    }
    poll_until("the dead-letter queue empty", WAIT, || async {
        let (_, v) = api(&p, "/api/v1/dead-letters?endpoint=down").await;
        v["items"].as_array()?.is_empty().then_some(())
    })
    .await;
    let delivered = down
        .received()
        .iter()
        .filter_map(|r| r.header("webhook-id").map(str::to_string))
        .collect::<std::collections::BTreeSet<_>>();
    assert_eq!(delivered.len(), 3, "one stable id per delivery");
    p.stop().await;
}

/// chromedriver on a free port, for as long as it is held.
pub(crate) struct Driver {
    child: tokio::process::Child,
    port: u16,
    /// The browser's profile, removed with the driver.
    profile: tempfile::TempDir,
}

impl Driver {
    pub(crate) async fn start() -> Self {
        for (bin, pkg) in [
            ("/usr/bin/chromium", "chromium"),
            ("/usr/bin/chromedriver", "chromium-driver"),
        ] {
            assert!(
                std::path::Path::new(bin).exists(),
                "{bin} is missing: scripts/test installs Debian's {pkg}"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = tokio::process::Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver");
        poll_until("chromedriver listening", WAIT, || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        Driver {
            child,
            port,
            profile: tempfile::tempdir().expect("profile dir"),
        }
    }

    /// A headless Chromium session.
    pub(crate) async fn browser(&self) -> fantoccini::Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--window-size=1280,1000",
                    format!("--user-data-dir={}", self.profile.path().display()),
                ],
            }),
        );
        fantoccini::ClientBuilder::native()
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a browser session")
    }
}

/// Where the screenshots go (kept after the run: the test's artifacts).
fn artifacts() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    std::fs::create_dir_all(&dir).expect("artifact dir");
    dir
}

/// Waits for an element; on timeout saves a screenshot and fails with the page's text, so
/// a failure in CI says what the page showed instead.
pub(crate) async fn wait_for(
    c: &fantoccini::Client,
    css: &str,
    what: &str,
) -> fantoccini::elements::Element {
    match c.wait().for_element(fantoccini::Locator::Css(css)).await {
        Ok(e) => e,
        Err(err) => {
            screenshot(c, "failure").await;
            let text = match c.find(fantoccini::Locator::Css("body")).await {
                Ok(body) => body.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            panic!("{what} ({css}): {err}; the page said:\n{text}");
        }
    }
}

pub(crate) async fn screenshot(c: &fantoccini::Client, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    let path = artifacts().join(format!("{name}.png"));
    std::fs::write(&path, png).expect("write screenshot");
    println!("screenshot: {}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_page_shows_the_story_and_refires_from_a_button() {
    let _serial = SERIAL.lock().await;
    use fantoccini::Locator;
    let s = scenario().await;
    story(
        &s,
        &s.click_id,
        "the click's deliveries settled",
        dead_lettered,
    )
    .await;
    let mut driver = Driver::start().await;
    let c = driver.browser().await;
    let base = s.p.console_url();

    // The live page, once the token is given: the feed connects, conversions list.
    c.goto(&format!("{base}/#live"))
        .await
        .expect("open the page");
    c.find(Locator::Id("token"))
        .await
        .expect("token field")
        .send_keys(CONSOLE_TOKEN)
        .await
        .expect("type");
    c.find(Locator::Id("save-token"))
        .await
        .expect("button")
        .click()
        .await
        .expect("click");
    wait_for(&c, "#conversions tbody tr", "a conversion listed").await;
    for (id, text) in [
        ("feed-state", "live"),
        ("freshness", "read model: up to date"),
    ] {
        poll_until(&format!("#{id} says {text:?}"), WAIT, || async {
            let shown = c.find(Locator::Id(id)).await.ok()?.text().await.ok()?;
            (shown == text).then_some(())
        })
        .await;
    }
    screenshot(&c, "live").await;

    // Search the click: its story, with the dead-lettered delivery.
    c.goto(&format!("{base}/#click")).await.expect("click page");
    c.find(Locator::Id("click-input"))
        .await
        .expect("input")
        .send_keys(&s.click_id)
        .await
        .expect("type");
    c.find(Locator::Id("click-search"))
        .await
        .expect("button")
        .click()
        .await
        .expect("search");
    let dead_row = wait_for(
        &c,
        "#story-deliveries tr[data-state='dead_lettered']",
        "the dead-lettered delivery shown",
    )
    .await;
    let row_text = dead_row.text().await.expect("text");
    assert!(
        row_text.contains("flaky") && row_text.contains("500"),
        "{row_text}"
    );
    let timeline = c
        .find_all(Locator::Css("#story-entries tbody tr"))
        .await
        .expect("timeline rows");
    assert_eq!(
        timeline.len(),
        7,
        "postback, conversion, four attempts, dead letter"
    );
    screenshot(&c, "click-story").await;

    // The failures and totals pages.
    c.goto(&format!("{base}/#failures"))
        .await
        .expect("failures page");
    wait_for(&c, "#dead-letters tbody tr", "a dead letter listed").await;
    let endpoints = c
        .find(Locator::Css("#endpoints tbody"))
        .await
        .expect("endpoints")
        .text()
        .await
        .expect("text");
    assert!(
        endpoints.contains("flaky") && endpoints.contains("HTTP 500"),
        "{endpoints}"
    );
    screenshot(&c, "failures").await;
    c.goto(&format!("{base}/#totals"))
        .await
        .expect("totals page");
    wait_for(&c, "#totals-table tbody tr", "totals shown").await;
    wait_for(&c, "#totals-chart rect", "a bar in the chart").await;
    screenshot(&c, "totals").await;

    // The affiliate fixed its endpoint: re-fire from the story page, see the new attempt.
    s.flaky.set_status(200);
    c.goto(&format!("{base}/#click/{}", s.click_id))
        .await
        .expect("story page");
    // The story shown before is still in the page until the lookup re-renders it: a
    // button found then goes stale. Press one that is there when clicked.
    let refire = "#story-deliveries tr[data-state='dead_lettered'] button.refire";
    wait_for(&c, refire, "the re-fire button").await;
    poll_until("the re-fire button pressed", WAIT, || async {
        c.find(Locator::Css(refire)).await.ok()?.click().await.ok()
    })
    .await;
    let timeline = poll_until("the new attempt on the page", WAIT, || async {
        c.find(Locator::Id("click-search"))
            .await
            .ok()?
            .click()
            .await
            .ok()?;
        let delivered = c
            .find_all(Locator::Css("#story-deliveries tr[data-state='delivered']"))
            .await
            .ok()?;
        let commands = c
            .find_all(Locator::Css("#story-entries tr[data-kind='command']"))
            .await
            .ok()?;
        let timeline = c
            .find(Locator::Css("#story-entries tbody"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (delivered.len() == 2 && commands.len() == 1 && timeline.contains("attempt 4"))
            .then_some(timeline)
    })
    .await;
    assert!(timeline.contains("asked by tester"), "{timeline}");
    assert!(timeline.contains("attempt 4: delivered"), "{timeline}");
    screenshot(&c, "after-refire").await;
    // The live feed, connected all along, showed the new attempt as it happened.
    c.goto(&format!("{base}/#live")).await.expect("live page");
    let line = wait_for(
        &c,
        "#feed li.feed-attempt",
        "the new attempt in the live feed",
    )
    .await;
    let line = line.text().await.expect("text");
    assert!(line.contains(&s.click_id), "{line}");
    screenshot(&c, "live-after-refire").await;
    c.close().await.expect("close the browser");
    let _ = driver.child.start_kill();
    s.p.stop().await;
}
