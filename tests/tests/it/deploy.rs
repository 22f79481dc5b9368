//! Checks of deploy/prometheus and deploy/grafana that run without Docker: promtool on the
//! alert rules (syntax and unit tests) and the Prometheus config; promtool on the live
//! `/metrics` of each running service; every metric the rules and the dashboard name is
//! one the services export. scripts/test installs promtool (Debian's `prometheus`
//! package). The Kubernetes manifests: `k8s.rs`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use s2s_tests::{poll_until, Pipeline, PipelineOptions, TestEndpoint};
use yaml_rust2::{Yaml, YamlLoader};

pub(crate) fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn promtool(args: &[&str], stdin: Option<&str>, dir: &Path) -> String {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "promtool: {e}; scripts/test installs it (Debian package prometheus), or \
                 install it yourself"
            )
        });
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write to promtool");
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().expect("promtool ran");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn promtool_checks_and_tests_the_rules_and_the_config() {
    let dir = deploy().join("prometheus");
    let out = promtool(&["check", "rules", "rules.yml"], None, &dir);
    assert!(out.contains("SUCCESS: 17 rules found"), "{out}");
    promtool(&["test", "rules", "rules_test.yml"], None, &dir);
    promtool(&["check", "config", "prometheus.yml"], None, &dir);
}

/// Every alert has a promtool test that shows it firing and one that shows it quiet, and a
/// runbook: a section of docs/runbooks.md.
#[test]
fn every_alert_is_tested_both_ways_and_has_a_runbook() {
    let rules = yaml(&deploy().join("prometheus/rules.yml"));
    let tests = yaml(&deploy().join("prometheus/rules_test.yml"));
    let runbooks = std::fs::read_to_string(deploy().join("../docs/runbooks.md")).expect("runbooks");
    let sections: BTreeSet<String> = runbooks
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|h| h.trim().to_ascii_lowercase())
        .collect();
    let mut alerts = BTreeSet::new();
    for group in rules[0]["groups"].as_vec().expect("groups") {
        for rule in group["rules"].as_vec().expect("rules") {
            let alert = rule["alert"].as_str().expect("alerting rules only");
            alerts.insert(alert.to_string());
            let url = rule["annotations"]["runbook_url"]
                .as_str()
                .unwrap_or_else(|| panic!("{alert}: no runbook_url"));
            let anchor = url
                .strip_prefix("docs/runbooks.md#")
                .unwrap_or_else(|| panic!("{alert}: runbook_url {url} is not in docs/runbooks.md"));
            assert_eq!(
                anchor,
                alert.to_ascii_lowercase(),
                "{alert}: its own section"
            );
            assert!(
                sections.contains(anchor),
                "{alert}: no section ## {alert} in docs/runbooks.md"
            );
        }
    }
    let (mut fires, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for test in tests[0]["tests"].as_vec().expect("tests") {
        for t in test["alert_rule_test"].as_vec().into_iter().flatten() {
            let name = t["alertname"].as_str().expect("alertname").to_string();
            if t["exp_alerts"].as_vec().is_some_and(|a| !a.is_empty()) {
                fires.insert(name);
            } else {
                quiet.insert(name);
            }
        }
    }
    assert_eq!(fires, alerts, "alerts shown firing");
    assert_eq!(quiet, alerts, "alerts shown staying quiet");
}

/// deploy/k8s/prometheusrule.yaml is rules.yml as a PrometheusRule (the Prometheus
/// Operator's form): the same groups, generated. `S2S_REGENERATE=1` rewrites it.
#[test]
fn the_prometheusrule_is_generated_from_the_rules() {
    let rules = std::fs::read_to_string(deploy().join("prometheus/rules.yml")).expect("rules");
    let groups = rules
        .find("\ngroups:\n")
        .map(|i| &rules[i + 1..])
        .expect("a groups: key");
    let mut want = String::from(
        "# Generated from deploy/prometheus/rules.yml (S2S_REGENERATE=1 cargo test --workspace \
         --test it -- deploy::the_prometheusrule): edit that file, not this one.\n\
         apiVersion: monitoring.coreos.com/v1\n\
         kind: PrometheusRule\n\
         metadata:\n  name: s2s-postback\n\
         spec:\n",
    );
    for line in groups.lines() {
        if line.is_empty() {
            want.push('\n');
        } else {
            want.push_str("  ");
            want.push_str(line);
            want.push('\n');
        }
    }
    let path = deploy().join("k8s/prometheusrule.yaml");
    if std::env::var_os("S2S_REGENERATE").is_some() {
        std::fs::write(&path, &want).expect("write");
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "{} differs from deploy/prometheus/rules.yml: regenerate it with S2S_REGENERATE=1 \
         cargo test --workspace --test it -- deploy::the_prometheusrule",
        path.display()
    );
    let parsed = yaml(&path);
    assert_eq!(
        parsed[0]["spec"]["groups"],
        yaml(&deploy().join("prometheus/rules.yml"))[0]["groups"]
    );
}

pub(crate) fn yaml(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Metric names (`ingest_…`, `attributor_…`, `delivery_…`, `console_…`, `stream_…`) in
/// a PromQL expression.
fn names_in(expr: &str, into: &mut BTreeSet<String>) {
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
            continue;
        }
        if ["ingest_", "attributor_", "delivery_", "console_", "stream_"]
            .iter()
            .any(|p| word.starts_with(p))
        {
            into.insert(std::mem::take(&mut word));
        }
        word.clear();
    }
}

/// Every metric name the alert rules and the Grafana dashboard use.
fn referenced_metrics() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let rules = yaml(&deploy().join("prometheus/rules.yml"));
    for group in rules[0]["groups"].as_vec().expect("groups") {
        for rule in group["rules"].as_vec().expect("rules") {
            names_in(rule["expr"].as_str().expect("expr"), &mut names);
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy().join("grafana/dashboards/s2s-pipeline.json"))
            .expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    let mut exprs = 0;
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(variables, ["datasource", "namespace", "job", "instance"]);
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            let mut here = BTreeSet::new();
            names_in(expr, &mut here);
            // Every series the panel reads is filtered by the dashboard's variables.
            let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
            for name in &here {
                for (at, _) in expr.match_indices(name.as_str()) {
                    let rest = &expr[at + name.len()..];
                    let before = expr[..at].chars().next_back();
                    if before.is_some_and(ident) || rest.chars().next().is_some_and(ident) {
                        continue; // part of another name
                    }
                    let block = rest
                        .strip_prefix('{')
                        .and_then(|r| r.split_once('}'))
                        .map(|(b, _)| b)
                        .unwrap_or_default();
                    assert!(
                        block.ends_with(
                            "namespace=~\"$namespace\",job=~\"$job\",instance=~\"$instance\""
                        ),
                        "{expr}: {name} is not filtered by the dashboard's variables"
                    );
                }
            }
            names.extend(here);
            exprs += 1;
        }
    }
    assert!(exprs > 30, "the dashboard has its queries ({exprs})");
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_metrics_pass_promtool_and_have_every_name_the_rules_and_dashboard_use() {
    // Traffic that moves every stage: a delivered conversion after one retry, a dead
    // letter, a rejected postback, a refused request.
    let flaky = TestEndpoint::start(&[503]).await;
    let gone = TestEndpoint::start(&[404]).await;
    let p = Pipeline::start(PipelineOptions {
        postbacks: vec![
            ("flaky".into(), flaky.url("/pb?c={click_id}")),
            ("gone".into(), gone.url("/pb?c={click_id}")),
        ],
        console: true,
        ..Default::default()
    })
    .await;
    let http = s2s_tests::http();
    let click_id = p.click("offer_id=1&aff_id=3").await;
    for query in [
        format!("click_id={click_id}&event=ftd"),
        "click_id=never-clicked&event=ftd".to_string(),
    ] {
        let r = http
            .get(p.ingest_url(&format!("/postback?{query}")))
            .send()
            .await
            .expect("postback");
        assert_eq!(r.status(), 200);
    }
    let bad = http
        .get(p.ingest_url("/postback?event=ftd"))
        .send()
        .await
        .expect("bad postback");
    assert_eq!(bad.status(), 400);

    let admins = [
        ("ingest", p.ingest_admin),
        ("attributor", p.attributor_admin),
        ("delivery", p.delivery_admin),
        ("console", p.console_admin()),
    ];
    let scrape = |addr: std::net::SocketAddr| async move {
        reqwest::get(format!("http://{addr}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()
    };
    let referenced = referenced_metrics();
    let pages = || async {
        let mut pages = Vec::new();
        for (name, addr) in admins {
            pages.push((name, scrape(addr).await?));
        }
        Some(pages)
    };
    // Wait until the traffic has gone through every stage, then (the gauges are refreshed
    // once a second) for the referenced names to show up; name those that never do.
    poll_until(
        "the traffic through every stage",
        Duration::from_secs(60),
        || async {
            let done = gone.received().len() == 1
                && flaky.received().len() == 2
                && s2s_tests::metric(
                    p.delivery_admin,
                    "delivery_dead_lettered_total{endpoint=\"gone\",reason=\"permanent_failure\"}",
                )
                .await
                    == Some(1.0);
            done.then_some(())
        },
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (pages, missing) = loop {
        let pages = pages().await.expect("scrapes");
        let exported = exported_names(&pages);
        let missing: Vec<&String> = referenced
            .iter()
            .filter(|n| !exported.contains(family(n, &exported)))
            .collect();
        if missing.is_empty() || std::time::Instant::now() > deadline {
            break (pages, missing);
        }
        tokio::time::sleep(Duration::from_millis(200)).await; // poll: gauges refresh each second
    };
    assert!(
        missing.is_empty(),
        "used by the rules or the dashboard, exported by no service: {missing:?}"
    );
    for (service, page) in &pages {
        let out = promtool(&["check", "metrics"], Some(page), &deploy());
        assert!(
            out.trim().is_empty(),
            "promtool check metrics on {service}:\n{out}"
        );
    }
    p.stop().await;
}

/// The family a sample name belongs to: `x_bucket`, `x_sum`, `x_count` of histogram `x`.
fn family<'a>(name: &'a str, exported: &BTreeSet<String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if exported.contains(base) {
                return base;
            }
        }
    }
    name
}

/// Metric families on the pages (`# TYPE <name> …`).
fn exported_names(pages: &[(&str, String)]) -> BTreeSet<String> {
    pages
        .iter()
        .flat_map(|(_, page)| page.lines())
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The apache/kafka image skips its packaged server.properties once any `KAFKA_*`
/// variable is set, so the log directory must be named, and be on a named volume.
#[test]
fn compose_keeps_the_brokers_log_on_its_volume() {
    let compose = yaml(&deploy().join("compose/compose.yaml"));
    let kafka = &compose[0]["services"]["kafka"];
    let dirs = kafka["environment"]["KAFKA_LOG_DIRS"]
        .as_str()
        .expect("kafka sets KAFKA_LOG_DIRS");
    let volumes: Vec<(&str, &str)> = kafka["volumes"]
        .as_vec()
        .expect("kafka has volumes")
        .iter()
        .filter_map(|v| v.as_str()?.split_once(':'))
        .collect();
    for dir in dirs.split(',') {
        let (volume, _) = volumes
            .iter()
            .find(|(_, target)| dir == *target || dir.starts_with(&format!("{target}/")))
            .unwrap_or_else(|| panic!("log dir {dir} is on no volume of {volumes:?}"));
        assert!(
            !compose[0]["volumes"][*volume].is_badvalue(),
            "{volume} is a named volume"
        );
    }
}

/// Compose runs the services with `topics.create = false`: kafka-init must create every
/// topic of the pipeline, with its partition count and its cleanup and retention.
#[test]
fn compose_creates_every_topic_the_pipeline_names() {
    let compose = yaml(&deploy().join("compose/compose.yaml"));
    let script = compose[0]["services"]["kafka-init"]["command"][0]
        .as_str()
        .expect("kafka-init's script");
    let pipeline =
        s2s_common::pipeline::PipelineConfig::from_file(&deploy().join("compose/pipeline.toml"))
            .expect("compose pipeline");
    assert!(!pipeline.topics.create);
    // One line (or loop) per topic: `--topic s2s.x` directly, or `s2s.$$t` over a list.
    let lines: Vec<String> = script
        .replace("\\\n", " ")
        .lines()
        .map(str::to_string)
        .collect();
    for topic in pipeline.topics.all() {
        let suffix = topic
            .name
            .strip_prefix("s2s.")
            .unwrap_or_else(|| panic!("{} is named s2s.*", topic.name));
        let direct = lines
            .iter()
            .find(|l| l.contains(&format!("--topic {} ", topic.name)));
        let looped = lines.iter().position(|l| {
            l.trim_start().starts_with("for t in ")
                && l.split_whitespace()
                    .any(|w| w.trim_end_matches(';') == suffix)
        });
        let command = match (direct, looped) {
            (Some(l), _) => l.clone(),
            (None, Some(i)) => lines.get(i + 1).cloned().unwrap_or_default(),
            (None, None) => panic!("kafka-init does not create {}", topic.name),
        };
        assert!(
            command.contains(&format!("--partitions {} ", topic.partitions)),
            "{}: {command}",
            topic.name
        );
        for (k, v) in &topic.config {
            assert!(
                command.contains(&format!("--config {k}={v}")),
                "{}: {k}={v} in {command}",
                topic.name
            );
        }
    }
}

/// The catalog files of the deployments import: they parse and pass the API's checks.
#[test]
fn the_deployments_catalog_files_are_valid() {
    let vocabulary =
        s2s_console::catalog_checks(&s2s_common::pipeline::PipelineConfig::defaults().postbacks)
            .expect("checks");
    for path in [
        "config/catalog.toml",
        "local/catalog.toml",
        "compose/catalog.toml",
        "k8s/config/catalog.toml",
    ] {
        let text = std::fs::read_to_string(deploy().join(path)).expect("catalog file");
        let file = s2s_catalog::file::CatalogFile::parse(&text)
            .unwrap_or_else(|e| panic!("deploy/{path}: {e}"));
        let entities = file
            .entities(&vocabulary)
            .unwrap_or_else(|e| panic!("deploy/{path}: {e}"));
        if path != "config/catalog.toml" {
            assert!(
                entities.iter().any(|e| e.key.to_string() == "offer/1"),
                "deploy/{path} has the demo offer"
            );
        }
    }
}

/// The image: base images pinned by version, OCI labels, a HEALTHCHECK, and the demo
/// affiliate endpoint only in the `demo` target. (No Docker engine here: the file is
/// checked, not built; deploy/README.md says so.)
#[test]
fn the_dockerfile_pins_its_bases_and_keeps_the_demo_out_of_production() {
    let text = std::fs::read_to_string(deploy().join("docker/Dockerfile")).expect("Dockerfile");
    let arg = |name: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("ARG {name}=")))
            .unwrap_or_else(|| panic!("ARG {name}"))
            .to_string()
    };
    let version = |image: &str| -> Vec<u32> {
        let tag = image.split_once(':').map(|(_, t)| t).unwrap_or_default();
        tag.split('-')
            .next()
            .unwrap_or_default()
            .split('.')
            .map(|n| {
                n.parse()
                    .unwrap_or_else(|_| panic!("{image}: not a version tag"))
            })
            .collect()
    };
    assert_eq!(version(&arg("RUST_IMAGE")).len(), 3, "rust:X.Y.Z-…");
    assert!(version(&arg("RUNTIME_IMAGE")).len() >= 2, "debian:X.Y-slim");
    let stages: Vec<(&str, &str)> = text
        .split("\nFROM ")
        .skip(1)
        .map(|s| {
            let name = s.lines().next().unwrap_or_default();
            (name.rsplit(' ').next().unwrap_or_default(), s)
        })
        .collect();
    let stage = |n: &str| {
        stages
            .iter()
            .find(|(name, _)| *name == n)
            .map(|(_, body)| *body)
            .unwrap_or_else(|| panic!("stage {n}"))
    };
    let runtime = stage("runtime");
    for label in ["title", "description", "licenses", "version", "revision"] {
        assert!(
            runtime.contains(&format!("org.opencontainers.image.{label}=")),
            "label {label}"
        );
    }
    assert!(runtime.contains("HEALTHCHECK"), "a HEALTHCHECK");
    assert!(
        !runtime.contains("/demo/"),
        "the production image holds no demo"
    );
    assert!(stage("demo").contains("COPY --from=build /demo/"));
    let compose = yaml(&deploy().join("compose/compose.yaml"));
    assert_eq!(
        compose[0]["services"]["demo-affiliate"]["build"]["target"].as_str(),
        Some("demo")
    );
}
