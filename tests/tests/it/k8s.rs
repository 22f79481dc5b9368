//! deploy/k8s as a cluster gets it: built with `kubectl kustomize` (the ecosystem's own
//! tool, so that what kustomize adds or rewrites is what is checked), then: every manifest
//! against the Kubernetes API's JSON schemas (`kubernetes-validate --strict`); every
//! selector (workload, Service, PodDisruptionBudget, HorizontalPodAutoscaler, PodMonitor)
//! matches the pods it means and no others; the pods pass the "restricted" Pod Security
//! Standard; and the manifests agree with the services' configs (ports, probes, state
//! volumes, resources, secrets). scripts/test provides kubectl and kubernetes-validate.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

use crate::deploy::{deploy, yaml};

const SERVICES: [&str; 4] = ["ingest", "attributor", "delivery", "console"];

/// The output of `kubectl kustomize deploy/k8s`, as text and as documents.
fn build() -> (String, Vec<Yaml>) {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy().join("k8s"))
        .output()
        .unwrap_or_else(|e| panic!("kubectl: {e}; scripts/test says how to get it"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/k8s failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = YamlLoader::load_from_str(&text).expect("kustomize writes YAML");
    (text, docs)
}

fn str_map(y: &Yaml) -> BTreeMap<String, String> {
    y.as_hash()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
        .collect()
}

fn name(d: &Yaml) -> &str {
    d["metadata"]["name"].as_str().unwrap_or_default()
}

fn kind(d: &Yaml) -> &str {
    d["kind"].as_str().unwrap_or_default()
}

/// The workloads' names and their pods' labels.
fn pods(docs: &[Yaml]) -> BTreeMap<String, BTreeMap<String, String>> {
    docs.iter()
        .filter(|d| matches!(kind(d), "Deployment" | "StatefulSet"))
        .map(|d| {
            (
                name(d).to_string(),
                str_map(&d["spec"]["template"]["metadata"]["labels"]),
            )
        })
        .collect()
}

/// The workloads whose pods `selector` (label → value, all must match) selects. An empty
/// selector is a failure here: it would select every pod of the namespace.
fn selected<'a>(
    what: &str,
    selector: &Yaml,
    pods: &'a BTreeMap<String, BTreeMap<String, String>>,
) -> Vec<&'a str> {
    let selector = str_map(selector);
    assert!(!selector.is_empty(), "{what}: an empty selector");
    pods.iter()
        .filter(|(_, labels)| selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
        .map(|(n, _)| n.as_str())
        .collect()
}

#[test]
fn every_selector_matches_the_pods_it_means() {
    let (_, docs) = build();
    let pods = pods(&docs);
    assert_eq!(
        pods.keys().map(String::as_str).collect::<Vec<_>>(),
        ["attributor", "console", "delivery", "ingest"]
    );
    for d in &docs {
        let (k, n) = (kind(d), name(d));
        let what = format!("{k} {n}");
        match k {
            "Deployment" | "StatefulSet" => {
                assert_eq!(
                    selected(&what, &d["spec"]["selector"]["matchLabels"], &pods),
                    [n],
                    "{what}: its selector selects its own pods only"
                );
            }
            "Service" => {
                assert_eq!(
                    selected(&what, &d["spec"]["selector"], &pods),
                    [n],
                    "{what}"
                );
            }
            "PodDisruptionBudget" => {
                assert_eq!(
                    selected(&what, &d["spec"]["selector"]["matchLabels"], &pods),
                    [n],
                    "{what}"
                );
            }
            "HorizontalPodAutoscaler" => {
                let target = &d["spec"]["scaleTargetRef"];
                let w = docs
                    .iter()
                    .find(|w| {
                        kind(w) == target["kind"].as_str().unwrap_or_default()
                            && name(w) == target["name"].as_str().unwrap_or_default()
                    })
                    .unwrap_or_else(|| panic!("{what}: its target is not in the build"));
                assert!(
                    w["spec"]["replicas"].is_badvalue(),
                    "{what}: {} sets replicas, which every apply would reset",
                    name(w)
                );
            }
            "PodMonitor" => {
                let mut all = selected(&what, &d["spec"]["selector"]["matchLabels"], &pods);
                all.sort_unstable();
                assert_eq!(
                    all,
                    ["attributor", "console", "delivery", "ingest"],
                    "{what}"
                );
                for endpoint in d["spec"]["podMetricsEndpoints"]
                    .as_vec()
                    .expect("endpoints")
                {
                    let port = endpoint["port"].as_str().expect("a named port");
                    let workloads = docs.iter().filter(|w| {
                        matches!(kind(w), "Deployment" | "StatefulSet") && all.contains(&name(w))
                    });
                    for w in workloads {
                        let ports = &w["spec"]["template"]["spec"]["containers"][0]["ports"];
                        assert!(
                            ports
                                .as_vec()
                                .into_iter()
                                .flatten()
                                .any(|p| p["name"].as_str() == Some(port)),
                            "{what}: pod {} has no port {port}",
                            name(w)
                        );
                    }
                    // The `job` label comes from a pod label: every pod has it.
                    for r in endpoint["relabelings"].as_vec().into_iter().flatten() {
                        for source in r["sourceLabels"].as_vec().into_iter().flatten() {
                            let source = source.as_str().expect("label name");
                            let Some(label) = source.strip_prefix("__meta_kubernetes_pod_label_")
                            else {
                                continue;
                            };
                            for (w, labels) in &pods {
                                assert!(
                                    labels
                                        .keys()
                                        .any(|l| l.replace(['.', '/', '-'], "_") == label),
                                    "{what}: pod {w} lacks the label behind {source}"
                                );
                            }
                        }
                    }
                }
            }
            _ => {}
        }
        if k != "Namespace" {
            assert_eq!(
                d["metadata"]["namespace"].as_str(),
                Some("s2s-postback"),
                "{what}: in the pipeline's namespace"
            );
        }
    }
}

/// <https://kubernetes.io/docs/concepts/security/pod-security-standards/#restricted>
#[test]
fn pods_pass_the_restricted_pod_security_standard() {
    let (_, docs) = build();
    let volume_kinds = [
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    ];
    for w in docs
        .iter()
        .filter(|d| matches!(kind(d), "Deployment" | "StatefulSet"))
    {
        let n = name(w);
        let pod = &w["spec"]["template"]["spec"];
        for host in ["hostNetwork", "hostPID", "hostIPC"] {
            assert_ne!(pod[host].as_bool(), Some(true), "{n}: {host}");
        }
        for v in pod["volumes"].as_vec().into_iter().flatten() {
            let kinds: Vec<&str> = v
                .as_hash()
                .into_iter()
                .flatten()
                .filter_map(|(k, _)| k.as_str())
                .filter(|k| *k != "name")
                .collect();
            assert!(
                kinds.iter().all(|k| volume_kinds.contains(k)),
                "{n}: volume types {kinds:?}"
            );
        }
        let pod_ctx = &pod["securityContext"];
        for c in pod["containers"].as_vec().expect("containers") {
            let ctx = &c["securityContext"];
            let either = |key: &str| -> &Yaml {
                if ctx[key].is_badvalue() {
                    &pod_ctx[key]
                } else {
                    &ctx[key]
                }
            };
            assert_eq!(
                either("runAsNonRoot").as_bool(),
                Some(true),
                "{n}: runAsNonRoot"
            );
            assert_ne!(either("runAsUser").as_i64(), Some(0), "{n}: runAsUser 0");
            assert!(
                matches!(
                    either("seccompProfile")["type"].as_str(),
                    Some("RuntimeDefault" | "Localhost")
                ),
                "{n}: seccompProfile"
            );
            assert_eq!(
                ctx["allowPrivilegeEscalation"].as_bool(),
                Some(false),
                "{n}: allowPrivilegeEscalation"
            );
            assert_ne!(ctx["privileged"].as_bool(), Some(true), "{n}: privileged");
            let drop: Vec<&str> = ctx["capabilities"]["drop"]
                .as_vec()
                .into_iter()
                .flatten()
                .filter_map(Yaml::as_str)
                .collect();
            assert!(drop.contains(&"ALL"), "{n}: capabilities.drop [ALL]");
            for add in ctx["capabilities"]["add"].as_vec().into_iter().flatten() {
                assert_eq!(
                    add.as_str(),
                    Some("NET_BIND_SERVICE"),
                    "{n}: capabilities.add"
                );
            }
        }
    }
}

#[test]
fn the_built_manifests_pass_the_kubernetes_schemas() {
    let (text, docs) = build();
    let dir = tempfile::tempdir().expect("tempdir");
    let file: PathBuf = dir.path().join("built.yaml");
    std::fs::write(&file, text).expect("write");
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| {
            panic!("kubernetes-validate: {e}; scripts/test installs it (scripts/requirements.txt)")
        });
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    // Only the Prometheus Operator's custom resources have no schema there: the selector
    // test checks the PodMonitor, deploy.rs the PrometheusRule.
    for line in report.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            line.contains("kind PodMonitor") || line.contains("kind PrometheusRule"),
            "unexpected: {line}"
        );
    }
    assert!(docs.iter().any(|d| kind(d) == "PodMonitor"));
    assert!(docs.iter().any(|d| kind(d) == "PrometheusRule"));
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
    let files: Vec<&str> = kustomization[0]["configMapGenerator"][0]["files"]
        .as_vec()
        .expect("configMap files")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    for f in &files {
        assert!(k8s.join(f).exists(), "{f} is in the ConfigMap but missing");
    }
    let (_, docs) = build();
    let config_map = docs
        .iter()
        .find(|d| kind(d) == "ConfigMap")
        .expect("the generated ConfigMap");
    for f in &files {
        let key = f.rsplit('/').next().unwrap_or(f);
        assert!(
            config_map["data"][key].as_str().is_some(),
            "{key} in the built ConfigMap"
        );
    }
    let workload = |name: &str| -> &Yaml {
        docs.iter()
            .find(|d| {
                d["metadata"]["name"].as_str() == Some(name)
                    && matches!(d["kind"].as_str(), Some("Deployment" | "StatefulSet"))
            })
            .unwrap_or_else(|| panic!("no workload {name}"))
    };
    assert_eq!(workload("ingest")["kind"].as_str(), Some("Deployment"));
    for service in SERVICES {
        let w = workload(service);
        let (admin_port, state_dir) = k8s_config(service);
        let spec = &w["spec"]["template"]["spec"];
        assert!(
            spec["volumes"].as_vec().into_iter().flatten().any(|v| {
                v["name"].as_str() == Some("config")
                    && v["configMap"]["name"].as_str() == Some(name(config_map))
            }),
            "{service}: mounts the generated ConfigMap"
        );
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
            docs.iter()
                .any(|d| kind(d) == "PodDisruptionBudget" && name(d) == service),
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
