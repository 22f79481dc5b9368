//! Checks of deploy/ that can run without Docker or a cluster: promtool on the alert rules
//! (syntax and unit tests) and the Prometheus config; promtool on the live `/metrics` of
//! each running service; every metric the rules and the dashboard name is one the services
//! export; and the Kubernetes manifests agree with the services' configs (ports, probes,
//! state volumes, resources, disruption budgets). scripts/test installs promtool (Debian's
//! `prometheus` package).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use s2s_tests::{poll_until, Pipeline, PipelineOptions, TestEndpoint};
use yaml_rust2::{Yaml, YamlLoader};

fn deploy() -> PathBuf {
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
    assert!(out.contains("SUCCESS: 10 rules found"), "{out}");
    promtool(&["test", "rules", "rules_test.yml"], None, &dir);
    promtool(&["check", "config", "prometheus.yml"], None, &dir);
}

fn yaml(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Metric names (`ingest_…`, `attributor_…`, `delivery_…`, `console_…`) in a PromQL
/// expression.
fn names_in(expr: &str, into: &mut BTreeSet<String>) {
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
            continue;
        }
        if ["ingest_", "attributor_", "delivery_", "console_"]
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
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            names_in(target["expr"].as_str().expect("expr"), &mut names);
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

/// What the manifests must agree with in the config a service gets in Kubernetes (its
/// defaults with `k8s/config/<service>.toml`): its admin port, and its state directory.
fn k8s_config(service: &str) -> (u16, Option<String>) {
    let overlay = deploy().join(format!("k8s/config/{service}.toml"));
    let overlay = Some(overlay.as_path());
    let (admin, state): (std::net::SocketAddr, Option<PathBuf>) = match service {
        "ingest" => {
            let c: s2s_ingest::IngestConfig = s2s_common::config::load(
                s2s_ingest::config::DEFAULT_TOML,
                overlay,
                "S2S_TEST_NONE__",
            )
            .expect("ingest config");
            (c.admin_listen, None)
        }
        "attributor" => {
            let c: s2s_attributor::AttributorConfig = s2s_common::config::load(
                s2s_attributor::config::DEFAULT_TOML,
                overlay,
                "S2S_TEST_NONE__",
            )
            .expect("attributor config");
            (c.admin_listen, Some(c.state_dir))
        }
        "console" => {
            let c: s2s_console::ConsoleConfig = s2s_common::config::load(
                s2s_console::config::DEFAULT_TOML,
                overlay,
                "S2S_TEST_NONE__",
            )
            .expect("console config");
            (c.admin_listen, Some(c.state_dir))
        }
        _ => {
            let c: s2s_delivery::DeliveryConfig = s2s_common::config::load(
                s2s_delivery::config::DEFAULT_TOML,
                overlay,
                "S2S_TEST_NONE__",
            )
            .expect("delivery config");
            (c.admin_listen, Some(c.state_dir))
        }
    };
    (admin.port(), state.map(|p| p.display().to_string()))
}

#[test]
fn kubernetes_manifests_agree_with_the_service_configs() {
    let k8s = deploy().join("k8s");
    let kustomization = yaml(&k8s.join("kustomization.yaml"));
    let resources: Vec<&str> = kustomization[0]["resources"]
        .as_vec()
        .expect("resources")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    let mut docs = Vec::new();
    for r in &resources {
        docs.extend(yaml(&k8s.join(r)));
    }
    for file in kustomization[0]["configMapGenerator"][0]["files"]
        .as_vec()
        .expect("configMap files")
    {
        let f = file.as_str().expect("file");
        assert!(k8s.join(f).exists(), "{f} is in the ConfigMap but missing");
    }
    let of_kind = |kind: &str| -> Vec<&Yaml> {
        docs.iter()
            .filter(|d| d["kind"].as_str() == Some(kind))
            .collect()
    };
    let workload = |name: &str| -> &Yaml {
        docs.iter()
            .find(|d| {
                d["metadata"]["name"].as_str() == Some(name)
                    && matches!(d["kind"].as_str(), Some("Deployment" | "StatefulSet"))
            })
            .unwrap_or_else(|| panic!("no workload {name}"))
    };
    assert_eq!(workload("ingest")["kind"].as_str(), Some("Deployment"));
    for service in ["ingest", "attributor", "delivery", "console"] {
        let w = workload(service);
        let (admin_port, state_dir) = k8s_config(service);
        let spec = &w["spec"]["template"]["spec"];
        let c = &spec["containers"][0];
        let args: Vec<&str> = c["args"]
            .as_vec()
            .expect("args")
            .iter()
            .filter_map(Yaml::as_str)
            .collect();
        assert_eq!(
            args,
            [
                service,
                "--config",
                &format!("/etc/s2s/{service}.toml"),
                "--pipeline",
                "/etc/s2s/pipeline.toml"
            ]
        );
        let admin = c["ports"]
            .as_vec()
            .expect("ports")
            .iter()
            .find(|p| p["name"].as_str() == Some("admin"))
            .unwrap_or_else(|| panic!("{service}: no admin port"));
        assert_eq!(
            admin["containerPort"].as_i64(),
            Some(i64::from(admin_port)),
            "{service}: the admin port is the one its config listens on"
        );
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            assert_eq!(
                c[probe]["httpGet"]["path"].as_str(),
                Some(path),
                "{service} {probe}"
            );
            assert_eq!(
                c[probe]["httpGet"]["port"].as_str(),
                Some("admin"),
                "{service} {probe}"
            );
        }
        for kind in ["requests", "limits"] {
            for r in ["cpu", "memory"] {
                assert!(
                    !c["resources"][kind][r].is_badvalue(),
                    "{service}: resources.{kind}.{r}"
                );
            }
        }
        let labels = &w["spec"]["selector"]["matchLabels"];
        let component = labels["app.kubernetes.io/component"].as_str();
        assert_eq!(component, Some(service));
        assert!(
            of_kind("PodDisruptionBudget").iter().any(|pdb| {
                pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"].as_str()
                    == component
            }),
            "{service}: a PodDisruptionBudget"
        );
        if let Some(state_dir) = state_dir {
            assert_eq!(
                w["kind"].as_str(),
                Some("StatefulSet"),
                "{service} keeps state"
            );
            let mount = c["volumeMounts"]
                .as_vec()
                .expect("mounts")
                .iter()
                .find(|m| m["name"].as_str() == Some("state"))
                .unwrap_or_else(|| panic!("{service}: no state mount"));
            assert_eq!(
                mount["mountPath"].as_str(),
                Some(state_dir.as_str()),
                "{service}"
            );
            assert_eq!(
                w["spec"]["volumeClaimTemplates"][0]["metadata"]["name"].as_str(),
                Some("state"),
                "{service}: a persistent volume per pod"
            );
        }
        // Every secret a container reads is in the example Secret.
        let example = yaml(&k8s.join("secret.example.yaml"));
        for env in c["env"].as_vec().into_iter().flatten() {
            if let Some(key) = env["valueFrom"]["secretKeyRef"]["key"].as_str() {
                assert!(
                    !example[0]["stringData"][key].is_badvalue(),
                    "{service} reads {key}, which secret.example.yaml lacks"
                );
            }
        }
    }
}
