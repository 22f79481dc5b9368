//! Chaos: the whole pipeline as child processes (the real binaries) on a real broker, a
//! realistic mix of stories from the load generator, faults injected while it runs, and
//! the verifier's verdict at the end: every postback that got a 2xx has exactly one
//! outcome (repeats only as identical replays) with the right decision, and every
//! conversion reached its endpoint (or, where said, the dead-letter topic).
//!
//! Scenarios: the broker restarted during ingest; the attributor killed with SIGKILL
//! repeatedly; delivery killed repeatedly; an affiliate endpoint down for a while; two
//! attributor instances, one killed. Short by default (part of `scripts/test`); longer
//! with `scripts/chaos --long` (S2S_CHAOS_SCALE multiplies stories and faults).
//! The scenarios run one at a time: each is a small cluster of its own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use s2s_common::topics::TopicsConfig;
use s2s_proof::load::{self, Progress};
use s2s_proof::plan::{plan, Mix};
use s2s_proof::verify::{self, Report};
use s2s_tests::{
    brokers, mock_with_topics, poll_until, topics, unique, ChildService as Service, TestEndpoint,
};

/// One scenario at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The attributor's grace period for a postback that came before its click, and how much
/// later than its postback the load generator sends such a click (well inside it).
const GRACE_MS: u64 = 4_000;
const LATE_BY_MS: i64 = 2_000;

/// S2S_CHAOS_KEEP: keep each scenario's directory (configs, logs, state) for a look.
fn keep() -> bool {
    std::env::var_os("S2S_CHAOS_KEEP").is_some()
}

fn scale() -> usize {
    std::env::var("S2S_CHAOS_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// Ingest, attributor(s) and delivery as child processes on one set of topics.
struct Cluster {
    dir: tempfile::TempDir,
    topics: TopicsConfig,
    ingest: Service,
    attributors: Vec<Service>,
    delivery: Service,
}

struct Setup<'a> {
    brokers: String,
    /// Topics made beforehand (and not created by the services), or new ones.
    topics: Option<TopicsConfig>,
    partitions: i32,
    attributors: usize,
    /// `(name, url)` of global postbacks.
    postbacks: Vec<(&'a str, String)>,
    retry_schedule_ms: Vec<u64>,
    /// The attributor's grace period ([`GRACE_MS`] unless a fault can delay a click longer).
    grace_ms: u64,
}

impl Cluster {
    async fn start(s: Setup<'_>) -> Self {
        let dir = tempfile::Builder::new()
            .disable_cleanup(keep())
            .tempdir()
            .expect("dir");
        let topics = s.topics.clone().unwrap_or_else(|| topics(s.partitions));
        let pipeline = s2s_tests::child_pipeline(&s.brokers, &topics);
        let offer_1 = s2s_common::pipeline::OfferConfig {
            url: "https://offer.example/land?click_id={click_id}&aff={aff_id}".into(),
            currency: Some("USD".into()),
            payouts: [("ftd".to_string(), rust_decimal::Decimal::new(5000, 2))].into(),
            ..Default::default()
        };
        s2s_tests::seed_catalog_on(
            &pipeline.kafka,
            &topics,
            &s2s_catalog::file::CatalogFile {
                offers: [("1".to_string(), offer_1)].into(),
                ..Default::default()
            },
        )
        .await;
        s2s_tests::write_pipeline(dir.path(), &pipeline);
        // Each service's config serialized from its struct; the pipeline's beside them.
        let path = |name: &str| dir.path().join(format!("{name}.toml"));
        let mut ingest = s2s_tests::ingest_config(&topics);
        ingest.produce_timeout = Duration::from_secs(2);
        ingest.pixel.enabled = true;
        ingest.pixel.cookie = Some("s2s_click".into());
        s2s_tests::write_config(&path("ingest"), &ingest);
        let group = unique("attributor");
        let attributors = (0..s.attributors)
            .map(|i| {
                let mut a = s2s_tests::attributor_config(
                    &topics,
                    &dir.path().join(format!("attributor-{i}-state")),
                );
                a.group_id.clone_from(&group);
                a.grace_period = Duration::from_millis(s.grace_ms);
                a.commit_interval = Duration::from_millis(50);
                let config = path(&format!("attributor-{i}"));
                s2s_tests::write_config(&config, &a);
                let service = Service::new(env!("CARGO_BIN_EXE_attributor-under-test"), config);
                // A lone instance restarted after SIGKILL joins a new group each time:
                // see `group_per_start`. Two instances share theirs.
                if s.attributors == 1 {
                    service.group_per_start("attributor")
                } else {
                    service
                }
            })
            .collect();
        let postbacks: Vec<(String, String)> = s
            .postbacks
            .iter()
            .map(|(n, u)| (n.to_string(), u.clone()))
            .collect();
        let mut d =
            s2s_tests::delivery_config(&topics, &dir.path().join("delivery-state"), &postbacks);
        for p in &mut d.postbacks {
            p.send_updates = true;
        }
        d.commit_interval = Duration::from_millis(20);
        d.request_timeout = Duration::from_secs(2);
        d.retry_schedule = s
            .retry_schedule_ms
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect();
        d.circuit.failure_threshold = 10;
        d.circuit.open_for = Duration::from_secs(1);
        d.circuit.max_open_for = Duration::from_secs(2);
        s2s_tests::write_config(&path("delivery"), &d);
        let (ingest, delivery) = (path("ingest"), path("delivery"));
        let mut c = Cluster {
            topics,
            ingest: Service::new(env!("CARGO_BIN_EXE_ingest-under-test"), ingest),
            attributors,
            delivery: Service::new(env!("CARGO_BIN_EXE_delivery-under-test"), delivery)
                .group_per_start("delivery"),
            dir,
        };
        c.ingest.start();
        for a in &mut c.attributors {
            a.start();
        }
        c.delivery.start();
        c
    }

    /// Ingest's address, from its log.
    async fn ingest_url(&self) -> String {
        let addr: SocketAddr = poll_until("ingest listening", Duration::from_secs(60), || async {
            self.ingest
                .events("ingest listening")
                .first()
                .and_then(|f| f["addr"].as_str().and_then(|a| a.parse().ok()))
        })
        .await;
        format!("http://{addr}")
    }

    fn mix(&self, stories: usize) -> Mix {
        Mix {
            stories,
            late_by_ms: LATE_BY_MS,
            run: unique("lg"),
            ..Mix::default()
        }
    }

    /// The end of every service's log (on a failure). With S2S_CHAOS_KEEP set, the
    /// cluster's directory (configs, logs, state) is kept.
    fn dump_logs(&self) {
        if keep() {
            println!("--- kept: {}", self.dir.path().display());
        }
        let services = std::iter::once(&self.ingest)
            .chain(&self.attributors)
            .chain(std::iter::once(&self.delivery));
        for s in services {
            let log = std::fs::read_to_string(s.log()).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            println!("--- {} (last 30 lines)", s.log().display());
            for l in &lines[lines.len().saturating_sub(30)..] {
                println!("{l}");
            }
        }
    }

    async fn stop(mut self) {
        self.ingest.kill().await;
        for a in &mut self.attributors {
            a.kill().await;
        }
        self.delivery.kill().await;
    }
}

fn load_options(ingest: String) -> load::Options {
    load::Options {
        ingest,
        click_param: "click_id".into(),
        concurrency: 16,
        rate: None,
        give_up_after: Duration::from_secs(90),
    }
}

/// Verifies the ledger against the topics and the endpoints, waiting up to a minute for
/// outcomes and deliveries on their way.
async fn verdict(
    c: &Cluster,
    brokers: &str,
    ledger: &[load::Entry],
    endpoints: &[&TestEndpoint],
    postbacks: &[(&str, String)],
) -> Report {
    let mut config = s2s_tests::delivery_config(&c.topics, c.dir.path(), &[]);
    config.pipeline.kafka.bootstrap_servers = brokers.to_string();
    config.postbacks = postbacks
        .iter()
        .map(|(n, u)| s2s_delivery::config::PostbackConfig {
            name: n.to_string(),
            url: u.clone(),
            send_updates: true,
            ..Default::default()
        })
        .collect();
    let compiled = config.validate().expect("the postbacks compile");
    let watcher = verify::Watcher::new(&config.pipeline.kafka, &c.topics).expect("watcher");
    let report =
        verify::until_complete(watcher, ledger, &compiled, Duration::from_secs(60), || {
            let mut all = std::collections::HashMap::new();
            for e in endpoints {
                for (id, n) in e.by_webhook_id() {
                    *all.entry(id).or_insert(0) += n;
                }
            }
            all
        })
        .await
        .expect("topics readable");
    for line in report.missing.iter().chain(&report.violations).take(20) {
        println!("  {line}");
    }
    report
}

/// Plays `mix` through ingest with `opts` while `fault` runs alongside; returns the ledger
/// and the progress.
async fn play_with<F: std::future::Future<Output = ()>>(
    opts: load::Options,
    mix: Mix,
    fault: impl FnOnce(Arc<Progress>) -> F,
) -> (Vec<load::Entry>, Arc<Progress>) {
    let progress = Arc::new(Progress::default());
    let (ledger, ()) = tokio::join!(
        load::run(plan(&mix), &opts, progress.clone()),
        fault(progress.clone())
    );
    (ledger.expect("load ran").entries(), progress)
}

/// Waits until `n` postbacks were accepted.
async fn accepted(progress: &Progress, n: u64) {
    poll_until("postbacks accepted", Duration::from_secs(120), || async {
        (Progress::get(&progress.postbacks_accepted) >= n).then_some(())
    })
    .await;
}

fn assert_clean(c: &Cluster, report: &Report, ledger: usize) {
    println!("verdict: {}", report.summary());
    if !report.ok() {
        c.dump_logs();
    }
    assert!(report.ok(), "{}", report.summary());
    assert_eq!(report.postbacks, ledger);
    assert!(report.postbacks > 0 && report.deliveries_expected > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attributor_killed_repeatedly_while_traffic_flows() {
    let _serial = SERIAL.lock().await;
    let ep = TestEndpoint::start(&[]).await;
    let postbacks = [("aff", ep.url("/pb?c={click_id}"))];
    let mut c = Cluster::start(Setup {
        brokers: brokers(),
        topics: None,
        partitions: 3,
        attributors: 1,
        postbacks: postbacks.to_vec(),
        retry_schedule_ms: vec![200, 400, 800],
        grace_ms: GRACE_MS,
    })
    .await;
    let stories = 300 * scale();
    let kills = 3 * scale();
    let (url, mix) = (c.ingest_url().await, c.mix(stories));
    let attributor = &mut c.attributors[0];
    let (ledger, _) = play_with(load_options(url), mix, |progress| {
        let attributor = &mut *attributor;
        async move {
            for k in 1..=kills {
                accepted(&progress, (k * stories / (kills + 1)) as u64).await;
                attributor.kill().await;
                attributor.start();
            }
        }
    })
    .await;
    let report = verdict(&c, &brokers(), &ledger, &[&ep], &postbacks).await;
    assert_clean(&c, &report, ledger.len());
    assert_eq!(report.dead_lettered, 0);
    assert_eq!(c.attributors[0].starts, kills + 1);
    println!(
        "attributor killed {kills} times; {} replayed outcomes",
        report.replays
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_killed_repeatedly_while_traffic_flows() {
    let _serial = SERIAL.lock().await;
    let ep = TestEndpoint::start(&[]).await;
    ep.set_delay(Duration::from_millis(10));
    let postbacks = [("aff", ep.url("/pb?c={click_id}"))];
    let mut c = Cluster::start(Setup {
        brokers: brokers(),
        topics: None,
        partitions: 3,
        attributors: 1,
        postbacks: postbacks.to_vec(),
        retry_schedule_ms: vec![200, 400, 800],
        grace_ms: GRACE_MS,
    })
    .await;
    let stories = 300 * scale();
    let kills = 3 * scale();
    let (url, mix) = (c.ingest_url().await, c.mix(stories));
    let delivery = &mut c.delivery;
    let (ledger, _) = play_with(load_options(url), mix, |progress| {
        let delivery = &mut *delivery;
        async move {
            for k in 1..=kills {
                accepted(&progress, (k * stories / (kills + 1)) as u64).await;
                delivery.kill().await;
                delivery.start();
            }
        }
    })
    .await;
    let report = verdict(&c, &brokers(), &ledger, &[&ep], &postbacks).await;
    assert_clean(&c, &report, ledger.len());
    assert_eq!(report.dead_lettered, 0);
    println!(
        "delivery killed {kills} times; {} requests repeated at the endpoint",
        report.repeated_requests
    );
    assert_eq!(c.delivery.starts, kills + 1);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_down_for_a_while_then_back_gets_everything() {
    let _serial = SERIAL.lock().await;
    let down = TestEndpoint::start(&[]).await;
    down.set_status(503);
    let up = TestEndpoint::start(&[]).await;
    let postbacks = [
        ("down", down.url("/pb?c={click_id}")),
        ("up", up.url("/pb?c={click_id}")),
    ];
    let c = Cluster::start(Setup {
        brokers: brokers(),
        topics: None,
        partitions: 3,
        attributors: 1,
        postbacks: postbacks.to_vec(),
        // 8 attempts over 25 s: longer than the outage.
        retry_schedule_ms: vec![200, 400, 800, 1600, 3200, 6400, 12800],
        grace_ms: GRACE_MS,
    })
    .await;
    let stories = 200 * scale();
    let (url, mix) = (c.ingest_url().await, c.mix(stories));
    let (ledger, _) = play_with(load_options(url), mix, |_| {
        let down = &down;
        async move {
            // Down from the first delivery on, for three seconds.
            poll_until("deliveries refused", Duration::from_secs(60), || async {
                (!down.received().is_empty()).then_some(())
            })
            .await;
            tokio::time::sleep(Duration::from_secs(3)).await; // poll: not a wait, the outage's length
            down.set_status(200);
        }
    })
    .await;
    let report = verdict(&c, &brokers(), &ledger, &[&down, &up], &postbacks).await;
    assert_clean(&c, &report, ledger.len());
    assert_eq!(
        report.dead_lettered, 0,
        "the outage was shorter than the retry schedule"
    );
    let refused = down.received().len() - down.by_webhook_id().len();
    assert!(refused > 0, "the endpoint really was down for a while");
    println!("{refused} requests refused while the endpoint was down");
    c.stop().await;
}

/// On librdkafka's MockCluster: on Tansu 0.6.0 the killed member stayed in the group
/// after its session timed out, and the survivor got only its own partitions back (seen
/// in a run of this test; the broker's group bug noted in the README).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_attributors_one_killed() {
    let _serial = SERIAL.lock().await;
    let (mock, t) = mock_with_topics(4);
    let ep = TestEndpoint::start(&[]).await;
    let postbacks = [("aff", ep.url("/pb?c={click_id}"))];
    let mut c = Cluster::start(Setup {
        brokers: mock.bootstrap_servers(),
        topics: Some(t),
        partitions: 4,
        attributors: 2,
        postbacks: postbacks.to_vec(),
        retry_schedule_ms: vec![200, 400, 800],
        grace_ms: GRACE_MS,
    })
    .await;
    // Both own partitions before the traffic starts.
    poll_until(
        "both attributors own partitions",
        Duration::from_secs(60),
        || async {
            c.attributors
                .iter()
                .all(|a| !a.events("partition assigned").is_empty())
                .then_some(())
        },
    )
    .await;
    let stories = 300 * scale();
    let (url, mix) = (c.ingest_url().await, c.mix(stories));
    let victim = &mut c.attributors[1];
    let (ledger, _) = play_with(load_options(url), mix, |progress| {
        let victim = &mut *victim;
        async move {
            accepted(&progress, (stories / 3) as u64).await;
            victim.kill().await;
        }
    })
    .await;
    let report = verdict(&c, &mock.bootstrap_servers(), &ledger, &[&ep], &postbacks).await;
    assert_clean(&c, &report, ledger.len());
    let owned: std::collections::BTreeSet<i64> = c.attributors[0]
        .events("partition assigned")
        .iter()
        .filter_map(|f| f["partition"].as_i64())
        .collect();
    assert_eq!(
        owned.len(),
        4,
        "the survivor took over the victim's partitions"
    );
    c.stop().await;
}

/// The broker restart runs on librdkafka's MockCluster (in this process, on real loopback
/// ports the child processes connect to): Tansu 0.6.0 restarted on SQLite panics on the
/// first idempotent produce of a producer it knew before (tansu-storage lite.rs
/// `idempotent_message_check`: "more or less than one row"), after which its storage
/// fails every request. The mock keeps its data while a broker is down and refuses
/// connections meanwhile, as a restarting broker does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restarted_during_ingest_loses_nothing_acknowledged() {
    let _serial = SERIAL.lock().await;
    let (mock, t) = mock_with_topics(2);
    let ep = TestEndpoint::start(&[]).await;
    let postbacks = [("aff", ep.url("/pb?c={click_id}"))];
    let c = Cluster::start(Setup {
        brokers: mock.bootstrap_servers(),
        topics: Some(t),
        partitions: 2,
        attributors: 1,
        postbacks: postbacks.to_vec(),
        retry_schedule_ms: vec![500, 1000, 2000, 4000, 8000],
        // A click sent LATE_BY_MS after its postback can be held up by the outage (4 s
        // down, ingest's 2 s produce timeout, the client's retries); past the grace period
        // unknown_click would be the right outcome, not the attribution the plan expects
        // (seen once: the click came 4 s late). So here the grace period outlasts that.
        grace_ms: 15_000,
    })
    .await;
    let stories = 150 * scale();
    let restarts = scale();
    let (url, mix) = (c.ingest_url().await, c.mix(stories));
    // Paced, open loop. Unpaced, the mock takes the whole load in about a second (4.7 –
    // 5.2 s with the 4 s outage): whether any request meets the outage then depends on
    // timing, and a CI run saw no client retry at all. At 15 stories/s the play lasts
    // 10 s a restart and stories keep starting all through each outage.
    let opts = load::Options {
        rate: Some(15.0),
        ..load_options(url)
    };
    let started = std::time::Instant::now();
    let (ledger, progress) = play_with(opts, mix, |progress| {
        let mock = &mock;
        async move {
            for k in 1..=restarts {
                accepted(&progress, (k * stories / (restarts + 1)) as u64).await;
                mock.broker_down(-1).expect("broker down");
                // The outage itself, not a wait: longer than ingest's produce timeout
                // (2 s), so requests in flight get 503.
                tokio::time::sleep(Duration::from_secs(4)).await; // poll: not a wait, the outage's length
                mock.broker_up(-1).expect("broker up");
            }
        }
    })
    .await;
    println!("played in {:.1} s", started.elapsed().as_secs_f64());
    let report = verdict(&c, &mock.bootstrap_servers(), &ledger, &[&ep], &postbacks).await;
    assert_clean(&c, &report, ledger.len());
    let retries = Progress::get(&progress.retries);
    assert!(
        retries > 0,
        "clients saw the outage (503 or no answer) and retried"
    );
    assert_eq!(
        Progress::get(&progress.stories_failed),
        0,
        "every story got through"
    );
    println!("broker down {restarts} times for 4 s; clients retried {retries} requests");
    c.stop().await;
}
