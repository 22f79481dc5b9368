//! The three services (and optionally the console) running in this process against the
//! test broker, with their own topics, groups and state: [`Pipeline`].

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use s2s_common::pipeline::ServiceConfig;
use s2s_common::topics::TopicsConfig;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    attributor_config, console_config, delivery_config, http, ingest_config, pipeline, topics,
};

/// What a test may change about the pipeline.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub partitions: i32,
    pub grace_period_ms: u64,
    pub retry_schedule_ms: Vec<u64>,
    /// `(name, url template)` of each global postback.
    pub postbacks: Vec<(String, String)>,
    /// Run the reporting console too (operator "tester", token [`crate::CONSOLE_TOKEN`]).
    pub console: bool,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            partitions: 3,
            grace_period_ms: 500,
            retry_schedule_ms: vec![50, 50],
            postbacks: vec![],
            console: false,
        }
    }
}

pub(crate) async fn stopped_cleanly(t: JoinHandle<Result<(), String>>) {
    let r = tokio::time::timeout(Duration::from_secs(30), t)
        .await
        .expect("service stops within 30 s")
        .expect("service task");
    assert_eq!(r, Ok(()), "service stopped with an error");
}

/// Ingest, attributor and delivery running in this process against the test broker,
/// each on its own port 0 listeners, with their own topics and groups.
#[derive(Debug)]
pub struct Pipeline {
    pub topics: TopicsConfig,
    pub ingest: SocketAddr,
    pub ingest_admin: SocketAddr,
    pub attributor_admin: SocketAddr,
    pub delivery_admin: SocketAddr,
    /// The console's API and page, and its admin listener, when asked for.
    pub console: Option<(SocketAddr, SocketAddr)>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<Result<(), String>>>,
    _state: tempfile::TempDir,
}

impl Pipeline {
    /// The pipeline with its console, otherwise as [`PipelineOptions::default`].
    pub async fn with_console() -> Self {
        Self::start(PipelineOptions {
            console: true,
            ..Default::default()
        })
        .await
    }

    pub async fn start(opts: PipelineOptions) -> Self {
        let topics = topics(opts.partitions);
        let state = tempfile::tempdir().expect("state dir");

        // One pipeline for all three, with offer 1 in the catalog.
        let pipeline = pipeline(&topics);
        crate::seed_catalog(&topics, &crate::catalog_with_offer_1()).await;
        let mut ac = attributor_config(&topics, &state.path().join("attributor"))
            .with_pipeline(pipeline.clone());
        ac.grace_period = Duration::from_millis(opts.grace_period_ms);

        let mut dc = delivery_config(&topics, &state.path().join("delivery"), &opts.postbacks)
            .with_pipeline(pipeline.clone());
        dc.retry_schedule = opts
            .retry_schedule_ms
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect();

        let shutdown = CancellationToken::new();
        let ingest =
            s2s_ingest::Ingest::bind(ingest_config(&topics).with_pipeline(pipeline), &shutdown)
                .await
                .expect("ingest starts");
        let attributor = s2s_attributor::Attributor::bind(ac, &shutdown)
            .await
            .expect("attributor starts");
        let delivery = s2s_delivery::Delivery::bind(dc, &shutdown)
            .await
            .expect("delivery starts");
        let mut p = Pipeline {
            topics,
            ingest: ingest.local_addr().expect("addr"),
            ingest_admin: ingest.admin_addr().expect("addr"),
            attributor_admin: attributor.admin_addr().expect("addr"),
            delivery_admin: delivery.admin_addr().expect("addr"),
            console: None,
            tasks: vec![
                tokio::spawn(map_err(ingest.run(shutdown.clone()))),
                tokio::spawn(map_err(attributor.run(shutdown.clone()))),
                tokio::spawn(map_err(delivery.run(shutdown.clone()))),
            ],
            shutdown,
            _state: state,
        };
        if opts.console {
            let config = console_config(&p.topics, &p._state.path().join("console"));
            let console = s2s_console::Console::bind(config)
                .await
                .expect("console starts");
            p.console = Some((
                console.local_addr().expect("addr"),
                console.admin_addr().expect("admin addr"),
            ));
            p.tasks
                .push(tokio::spawn(map_err(console.run(p.shutdown.clone()))));
        }
        p
    }

    pub fn ingest_url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.ingest, path_and_query)
    }

    /// A click through ingest's `GET /click?{query}`; its ID, from the redirect (the test
    /// offer's URL carries it as `cid=`).
    pub async fn click(&self, query: &str) -> String {
        let resp = http()
            .get(self.ingest_url(&format!("/click?{query}")))
            .send()
            .await
            .expect("click");
        assert_eq!(resp.status(), 302, "the click redirects");
        let location = resp.headers()["location"]
            .to_str()
            .expect("location")
            .to_string();
        location
            .split("cid=")
            .nth(1)
            .and_then(|r| r.split('&').next())
            .expect("click id in the redirect")
            .to_string()
    }

    /// An FTD postback for `click_id` through ingest's `GET /postback`, acknowledged.
    pub async fn ftd(&self, click_id: &str) {
        let resp = http()
            .get(self.ingest_url(&format!("/postback?click_id={click_id}&event=ftd")))
            .send()
            .await
            .expect("postback");
        assert_eq!(resp.status(), 200, "the postback is taken");
    }

    /// The console's base URL (the pipeline must have been started with `console`).
    pub fn console_url(&self) -> String {
        format!("http://{}", self.console.expect("the console runs").0)
    }

    /// The console's admin listener (the pipeline must have been started with `console`).
    pub fn console_admin(&self) -> SocketAddr {
        self.console.expect("the console runs").1
    }

    /// Every non-zero counter of every service (`name{labels} value` lines, librdkafka's
    /// statistics left out): what a test prints when a wait times out.
    pub async fn counters(&self) -> String {
        let mut admins = vec![
            ("ingest", self.ingest_admin),
            ("attributor", self.attributor_admin),
            ("delivery", self.delivery_admin),
        ];
        if let Some((_, admin)) = self.console {
            admins.push(("console", admin));
        }
        let mut out = String::new();
        for (service, admin) in admins {
            let body = match reqwest::get(format!("http://{admin}/metrics")).await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(e) => format!("(no metrics: {e})"),
            };
            out.push_str(&format!("{service}:\n"));
            for line in body.lines().filter(|l| !l.starts_with('#')) {
                let Some((series, value)) = line.rsplit_once(' ') else {
                    continue;
                };
                let name = series.split('{').next().unwrap_or_default();
                if name.ends_with("_total")
                    && !name.contains("kafka")
                    && value.parse::<f64>().is_ok_and(|v| v != 0.0)
                {
                    out.push_str(&format!("  {line}\n"));
                }
            }
        }
        out
    }

    /// Stops every service and checks that each stopped cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            stopped_cleanly(t).await;
        }
    }
}

pub(crate) async fn map_err<E: std::fmt::Display>(
    f: impl Future<Output = Result<(), E>>,
) -> Result<(), String> {
    f.await.map_err(|e| e.to_string())
}
