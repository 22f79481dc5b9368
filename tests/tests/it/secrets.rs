//! Secrets never reach the logs. The console, ingest and delivery run as child processes
//! (the real binaries) logging JSON at `debug` for every crate of ours; through the API a
//! signed postback, a token source, an operator and a refused change with a bad secret
//! are made; a postback is sent with the wrong token and the right one, a conversion is
//! delivered signed, the postback's Test is pressed, the operator signs in. No log holds
//! any of the secrets, and the API never answered one.

use std::time::Duration;

use s2s_common::contract::Conversion;
use s2s_tests::{poll_until, ChildService, RawProducer, TestEndpoint};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);
const POSTBACK_SECRET: &str = "whsec_bG9nLXNlY3JldC1zaWduaW5nLWtleS0wMTIzNDU2";
const SOURCE_TOKEN: &str = "source-token-never-logged-4242";
const OPERATOR_TOKEN: &str = "operator-token-never-logged-77";
const REFUSED_SECRET: &str = "not-a-whsec-but-secret-9191";
const ADMIN_TOKEN: &str = "admin-token-for-the-secrets-test";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_logs_or_the_answers() {
    let endpoint = TestEndpoint::start(&[]).await;
    let t = s2s_tests::topics(1);
    s2s_common::kafka::ensure_topics(&s2s_tests::kafka(), &t, WAIT)
        .await
        .expect("topics");
    let dir = tempfile::tempdir().expect("dir");
    let path = |name: &str| dir.path().join(name);
    s2s_tests::write_pipeline(
        dir.path(),
        &s2s_tests::child_pipeline(&s2s_tests::brokers(), &t),
    );
    let (ingest_port, console_port) = (free_port(), free_port());

    let mut ingest = s2s_tests::ingest_config(&t);
    ingest.listen = format!("127.0.0.1:{ingest_port}").parse().expect("addr");
    s2s_tests::write_config(&path("ingest.toml"), &ingest);
    let delivery = s2s_tests::delivery_config(&t, &path("delivery-state"), &[]);
    s2s_tests::write_config(&path("delivery.toml"), &delivery);
    let mut console = s2s_tests::console_config(&t, &path("console-state"));
    console.listen = format!("127.0.0.1:{console_port}").parse().expect("addr");
    s2s_tests::write_config(&path("console.toml"), &console);

    let child = |bin: &'static str, name: &str| {
        ChildService::new(bin, path(&format!("{name}.toml")))
            .with_env("RUST_LOG", "debug,rdkafka=info,librdkafka=info,hyper=info,hyper_util=info,h2=info,reqwest=info,tower=info,axum=info")
            .with_env("S2S_CATALOG_KEY", s2s_tests::CATALOG_KEY)
            .with_env("S2S_CONSOLE__OPERATORS__ROOT", ADMIN_TOKEN)
    };
    let mut children = [
        child(env!("CARGO_BIN_EXE_console-under-test"), "console"),
        child(env!("CARGO_BIN_EXE_ingest-under-test"), "ingest"),
        child(env!("CARGO_BIN_EXE_delivery-under-test"), "delivery"),
    ];
    for c in &mut children {
        c.start();
    }
    let api = format!("http://127.0.0.1:{console_port}");
    let ingest_url = format!("http://127.0.0.1:{ingest_port}");
    let mut answers = String::new();
    let call = |method: reqwest::Method, path: &str, token: &str, body: Option<Value>| {
        let mut req = s2s_tests::http()
            .request(method, format!("{api}{path}"))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.header("If-None-Match", "*").json(&b);
        }
        async move {
            let resp = req.send().await.ok()?;
            let status = resp.status().as_u16();
            Some((status, resp.text().await.unwrap_or_default()))
        }
    };
    let put = |key: &'static str, document: Value| {
        let call = &call;
        async move {
            poll_until(&format!("the console takes {key}"), WAIT, || async {
                let (status, body) = call(
                    reqwest::Method::PUT,
                    &format!("/api/v1/catalog/{key}"),
                    ADMIN_TOKEN,
                    Some(json!({ "document": document.clone() })),
                )
                .await?;
                (status != 503).then_some((status, body))
            })
            .await
        }
    };
    for (key, document, want) in [
        (
            "postback/signed",
            json!({ "url": endpoint.url("/pb?c={click_id}"), "aff_id": "42", "events": ["ftd"],
                "secret": POSTBACK_SECRET }),
            201,
        ),
        (
            "source/op",
            json!({ "auth": "token", "token": SOURCE_TOKEN }),
            201,
        ),
        (
            "operator/ann",
            json!({ "name": "Ann", "role": "viewer", "token": OPERATOR_TOKEN }),
            201,
        ),
        (
            "postback/bad",
            json!({ "url": endpoint.url("/bad"), "secret": REFUSED_SECRET }),
            422,
        ),
    ] {
        let (status, body) = put(key, document).await;
        assert_eq!(status, want, "{key}: {body}");
        answers.push_str(&body);
    }

    // Ingest takes the source from the catalog: a wrong token refused, the right one taken.
    let postback = |token: &'static str| {
        let url = format!("{ingest_url}/postback/op?click_id=c-1&event=ftd&token={token}");
        async move {
            s2s_tests::http()
                .get(url)
                .send()
                .await
                .ok()
                .map(|r| r.status().as_u16())
        }
    };
    poll_until("ingest takes the source's token", WAIT, || async {
        (postback(SOURCE_TOKEN).await? == 200).then_some(())
    })
    .await;
    assert_eq!(postback("wrong-token-0000").await, Some(401));

    // Delivery signs with the postback's secret.
    let conversion = Conversion {
        aff_id: "42".into(),
        ..s2s_common::fixtures::conversion("cv-secret", "click-secret")
    };
    RawProducer::new()
        .send(
            &t.conversions.name,
            &conversion.click_id,
            &s2s_common::contract::encode(&conversion),
        )
        .await;
    poll_until("the signed delivery", WAIT, || async {
        endpoint
            .received()
            .iter()
            .any(|r| {
                r.param("c") == Some("click-secret") && r.header("webhook-signature").is_some()
            })
            .then_some(())
    })
    .await;
    let (status, body) = call(
        reqwest::Method::POST,
        "/api/v1/catalog/postback/signed/test",
        ADMIN_TOKEN,
        None,
    )
    .await
    .expect("the test answered");
    assert_eq!(status, 200, "{body}");
    answers.push_str(&body);
    for path in [
        "/api/v1/catalog/postback",
        "/api/v1/catalog/source/op",
        "/api/v1/catalog/operator/ann/history",
        "/api/v1/catalog/postback/signed/history",
    ] {
        let (status, body) = call(reqwest::Method::GET, path, OPERATOR_TOKEN, None)
            .await
            .expect("answer");
        assert_eq!(status, 200, "the operator signs in with its token: {body}");
        answers.push_str(&body);
    }

    for c in &mut children {
        c.kill().await;
    }
    let secrets = [
        POSTBACK_SECRET,
        POSTBACK_SECRET.trim_start_matches("whsec_"),
        SOURCE_TOKEN,
        OPERATOR_TOKEN,
        REFUSED_SECRET,
        ADMIN_TOKEN,
    ];
    for s in &secrets[..5] {
        assert!(!answers.contains(s), "an answer held a secret: {answers}");
    }
    for c in &children {
        let log = std::fs::read_to_string(c.log()).expect("log");
        // Each log holds the events around the secrets: the changes applied, the refusal.
        assert!(
            log.contains("catalog change applied"),
            "{}: the log is there:\n{log}",
            c.log().display()
        );
        assert!(
            !log.contains("Client stats") && !log.contains("catalog reader error"),
            "{}: no statistics or end-of-partition noise",
            c.log().display()
        );
        for s in secrets {
            assert!(
                !log.contains(s),
                "{} holds a secret; the line: {}",
                c.log().display(),
                log.lines().find(|l| l.contains(s)).unwrap_or_default()
            );
        }
    }
    let log = |i: usize| std::fs::read_to_string(children[i].log()).expect("log");
    assert!(
        log(0).contains("catalog changed"),
        "the console logged its changes"
    );
    assert!(
        log(1).contains("invalid token"),
        "ingest logged the refusal (debug)"
    );
}
