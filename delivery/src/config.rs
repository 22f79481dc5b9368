//! Delivery configuration (see `deploy/config/delivery.toml`, embedded as the default).
//! [`DeliveryConfig::validate`] compiles the postbacks into [`Endpoint`]s at start-up, so
//! an unknown macro, a body template that is not JSON, a bad header or secret stops the
//! start with a message that names the key, instead of failing at send time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use s2s_common::config::duration;
use s2s_common::contract::Conversion;
pub use s2s_common::pipeline::{PipelineConfig, ServiceConfig};
use s2s_common::template::Template;
use s2s_state::RocksConfig;
use serde::{Deserialize, Serialize};

use crate::circuit::CircuitConfig;
use crate::endpoint::{BodyFormat, Endpoint, Filter, Method, MACROS};
use crate::policy::RetryPolicy;
use crate::signing::Secret;

pub const DEFAULT_TOML: &str = include_str!("../../deploy/config/delivery.toml");
pub const ENV_PREFIX: &str = "S2S_DELIVERY__";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    pub admin_listen: SocketAddr,
    pub group_id: String,
    pub state_dir: PathBuf,
    #[serde(with = "duration")]
    pub commit_interval: Duration,
    pub max_batch: usize,
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    #[serde(with = "duration::list")]
    pub retry_schedule: Vec<Duration>,
    /// Spread of each retry wait, a fraction in [0, 1).
    pub retry_jitter: f64,
    /// Longest wait an endpoint's `Retry-After` may ask for.
    #[serde(with = "duration")]
    pub retry_after_cap: Duration,
    /// Requests in flight at most, all endpoints together.
    pub max_in_flight: usize,
    /// Requests in flight at most per endpoint, unless the postback sets its own.
    pub endpoint_max_in_flight: usize,
    /// How long delivered and dead-lettered deliveries are remembered, so that a
    /// conversion replayed upstream is not delivered twice.
    #[serde(with = "duration")]
    pub finished_retention: Duration,
    /// At shutdown, how long requests in flight may take to finish.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    pub circuit: CircuitSection,
    pub rocksdb: RocksConfig,
    #[serde(default)]
    pub postbacks: Vec<PostbackConfig>,
    /// From the pipeline config ([`DeliveryConfig::with_pipeline`]).
    #[serde(skip, default = "PipelineConfig::defaults")]
    pub pipeline: PipelineConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitSection {
    pub failure_threshold: u32,
    #[serde(with = "duration")]
    pub open_for: Duration,
    #[serde(with = "duration")]
    pub max_open_for: Duration,
}

/// One outbound postback.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PostbackConfig {
    /// Unique, `[A-Za-z0-9._-]`; names the endpoint in metrics, the delivery log and the
    /// dead-letter topic.
    pub name: String,
    pub url: String,
    #[serde(default)]
    pub method: Option<Method>,
    /// Body template (POST and PUT).
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub body_format: Option<BodyFormat>,
    /// Header name → value template.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Only conversions of this affiliate; absent = global postback.
    pub aff_id: Option<String>,
    /// Only conversions of this offer; absent = any.
    pub offer_id: Option<String>,
    /// Only these events; empty = all.
    #[serde(default)]
    pub events: Vec<String>,
    /// New conversions with these statuses; empty = all.
    #[serde(default)]
    pub statuses: Vec<String>,
    /// Whether status updates of a conversion (version 2, 3, …) are sent too.
    #[serde(default)]
    pub send_updates: bool,
    /// Updates to these statuses; empty = all.
    #[serde(default)]
    pub update_statuses: Vec<String>,
    /// Leave out conversions flagged `suspicious`.
    #[serde(default)]
    pub exclude_suspicious: bool,
    pub max_in_flight: Option<usize>,
    #[serde(default, with = "duration::option")]
    pub timeout: Option<Duration>,
    /// Standard Webhooks signing secret (`whsec_…`), or the name of an environment
    /// variable holding it in `secret_env` (keeps it out of config files).
    #[serde(default, skip_serializing)]
    pub secret: Option<String>,
    pub secret_env: Option<String>,
}

impl PostbackConfig {
    /// Which conversions it fires for.
    pub fn filter(&self) -> Filter {
        Filter {
            aff_id: self.aff_id.clone(),
            offer_id: self.offer_id.clone(),
            events: self.events.clone(),
            statuses: self.statuses.clone(),
            send_updates: self.send_updates,
            update_statuses: self.update_statuses.clone(),
            exclude_suspicious: self.exclude_suspicious,
        }
    }
}

impl DeliveryConfig {
    /// The retry policy this config describes.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            schedule: self.retry_schedule.clone(),
            jitter: self.retry_jitter,
            retry_after_cap: self.retry_after_cap,
        }
    }

    pub fn circuit(&self) -> CircuitConfig {
        CircuitConfig {
            failure_threshold: self.circuit.failure_threshold,
            open_for: self.circuit.open_for,
            max_open_for: self.circuit.max_open_for,
        }
    }

    pub fn finished_retention_ms(&self) -> i64 {
        i64::try_from(self.finished_retention.as_millis()).unwrap_or(i64::MAX)
    }

    /// Checks the config and compiles the endpoints; the error names the key to fix.
    pub fn validate(&self) -> Result<Vec<Endpoint>, String> {
        self.validate_with_env(|name| std::env::var(name).ok())
    }

    fn validate_with_env(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Vec<Endpoint>, String> {
        self.pipeline.validate()?;
        self.rocksdb.validate()?;
        if self.group_id.trim().is_empty() {
            return Err("group_id must not be empty".into());
        }
        for (key, v) in [
            ("commit_interval", self.commit_interval),
            ("request_timeout", self.request_timeout),
            ("connect_timeout", self.connect_timeout),
            ("finished_retention", self.finished_retention),
            ("circuit.open_for", self.circuit.open_for),
        ] {
            if v.is_zero() {
                return Err(format!("{key} must be > 0"));
            }
        }
        if self.circuit.failure_threshold == 0 {
            return Err("circuit.failure_threshold must be > 0".into());
        }
        if self.max_batch == 0 || self.max_in_flight == 0 || self.endpoint_max_in_flight == 0 {
            return Err("max_batch, max_in_flight and endpoint_max_in_flight must be > 0".into());
        }
        if self.circuit.max_open_for < self.circuit.open_for {
            return Err("circuit.max_open_for must be at least circuit.open_for".into());
        }
        if !(0.0..1.0).contains(&self.retry_jitter) {
            return Err(format!(
                "retry_jitter = {} must be in [0, 1)",
                self.retry_jitter
            ));
        }
        let longest_wait = self
            .retry_schedule
            .iter()
            .max()
            .copied()
            .unwrap_or_default()
            .max(self.retry_after_cap);
        if self.finished_retention < longest_wait {
            return Err(format!(
                "finished_retention ({}) must cover the longest retry wait ({}): a delivery \
                 must be remembered at least as long as its retries can run",
                duration::format(self.finished_retention),
                duration::format(longest_wait)
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        self.postbacks
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if !valid_name(&p.name) || !names.insert(p.name.clone()) {
                    return Err(format!(
                        "postbacks[{i}].name '{}' must be unique, 1 to 64 characters of \
                         A-Z a-z 0-9 . _ -",
                        p.name
                    ));
                }
                self.compile(p, &env)
                    .map_err(|e| format!("postbacks[{i}] ({}): {e}", p.name))
            })
            .collect()
    }

    /// A postback of the catalog (no secret there) as an endpoint, with this config's
    /// defaults; the error names the field.
    pub fn compile_postback(&self, p: &PostbackConfig) -> Result<Endpoint, String> {
        if !valid_name(&p.name) {
            return Err(format!(
                "name: '{}' must be 1 to 64 characters of A-Z a-z 0-9 . _ -",
                p.name
            ));
        }
        self.compile(p, &|_: &str| None)
    }

    fn compile(
        &self,
        p: &PostbackConfig,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<Endpoint, String> {
        if !(p.url.starts_with("http://") || p.url.starts_with("https://")) {
            return Err("url: must start with http:// or https://".into());
        }
        let url = Template::parse(&p.url, MACROS).map_err(|e| format!("url: {e}"))?;
        let method = p.method.unwrap_or(if p.body.is_some() {
            Method::Post
        } else {
            Method::Get
        });
        let body = match (&p.body, method) {
            (Some(_), Method::Get) => {
                return Err("body: needs method POST or PUT".into());
            }
            (Some(b), _) => {
                let format = p.body_format.unwrap_or(BodyFormat::Json);
                let t = Template::parse(b, MACROS).map_err(|e| format!("body: {e}"))?;
                if format == BodyFormat::Json {
                    let sample = t.render(
                        |m| {
                            crate::endpoint::macro_value(&sample_conversion(), m)
                                .map(|v| std::borrow::Cow::Owned(v.into_owned()))
                        },
                        s2s_common::template::Encoding::JsonString,
                    );
                    serde_json::from_str::<serde_json::Value>(&sample).map_err(|e| {
                        format!(
                            "body is not JSON once its macros are filled in ({e}); put string \
                             macros inside quotes: \"{{click_id}}\"; set body_format = \"form\" \
                             for a form body"
                        )
                    })?;
                }
                Some((t, format))
            }
            (None, _) => {
                if p.body_format.is_some() {
                    return Err("body_format: set without a body".into());
                }
                None
            }
        };
        let mut headers = Vec::new();
        for (name, value) in &p.headers {
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(format!("headers: '{name}' is not a valid header name"));
            }
            let lower = name.to_ascii_lowercase();
            if lower.starts_with("webhook-") || ["host", "content-length"].contains(&lower.as_str())
            {
                return Err(format!(
                    "headers: '{name}' is set by the delivery worker and cannot be configured"
                ));
            }
            let t = Template::parse(value, MACROS).map_err(|e| format!("headers.{name}: {e}"))?;
            headers.push((name.clone(), t));
        }
        let secret = match (&p.secret, &p.secret_env) {
            (Some(_), Some(_)) => return Err("set secret or secret_env, not both".into()),
            (Some(s), None) => Some(Secret::parse(s).map_err(|e| format!("secret {e}"))?),
            (None, Some(var)) => {
                let s = env(var).ok_or_else(|| {
                    format!("secret_env: the environment variable {var} is not set")
                })?;
                Some(Secret::parse(&s).map_err(|e| format!("secret in {var} {e}"))?)
            }
            (None, None) => None,
        };
        if p.max_in_flight == Some(0) || p.timeout.is_some_and(|t| t.is_zero()) {
            return Err("max_in_flight and timeout must be > 0".into());
        }
        Ok(Endpoint {
            name: p.name.clone(),
            method,
            url,
            body,
            headers,
            filter: p.filter(),
            max_in_flight: p.max_in_flight.unwrap_or(self.endpoint_max_in_flight),
            timeout: p.timeout.unwrap_or(self.request_timeout),
            secret,
            enabled: true,
        })
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// A conversion whose values need escaping everywhere, to check body templates with.
fn sample_conversion() -> Conversion {
    Conversion {
        aff_id: "4\"2".into(),
        subs: Default::default(),
        txn_id: Some("t\n1".into()),
        ..s2s_common::fixtures::conversion("c\"v\\1", "c\"k")
    }
}

impl ServiceConfig for DeliveryConfig {
    const NAME: &'static str = "delivery";
    const DEFAULT_TOML: &'static str = DEFAULT_TOML;
    const ENV_PREFIX: &'static str = ENV_PREFIX;

    fn with_pipeline(mut self, pipeline: PipelineConfig) -> Self {
        self.pipeline = pipeline;
        self
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn defaults() -> DeliveryConfig {
        <DeliveryConfig as ServiceConfig>::defaults().expect("parses")
    }

    /// A config of `deploy/<dir>/`, its own file and the pipeline's.
    fn deployed(dir: &str) -> DeliveryConfig {
        DeliveryConfig::from_deployment(&Path::new("../deploy").join(dir))
            .unwrap_or_else(|e| panic!("deploy/{dir}: {e}"))
    }

    fn with(p: PostbackConfig) -> Result<Vec<Endpoint>, String> {
        let mut c = defaults();
        c.postbacks.push(p);
        c.validate_with_env(|v| {
            (v == "AFF_SECRET").then(|| "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into())
        })
    }

    fn pb(url: &str) -> PostbackConfig {
        PostbackConfig {
            name: "a".into(),
            url: url.into(),
            ..Default::default()
        }
    }

    #[test]
    fn default_config_is_valid_and_uses_the_svix_schedule() {
        let c = defaults();
        assert!(
            c.validate().expect("valid").is_empty(),
            "no demo postback in defaults"
        );
        let h = |n: u64| Duration::from_secs(n * 3600);
        assert_eq!(
            c.retry_schedule,
            [
                Duration::from_secs(5),
                Duration::from_secs(300),
                Duration::from_secs(1_800),
                h(2),
                h(5),
                h(10),
                h(10)
            ]
        );
        assert_eq!(deployed("local").validate().expect("valid").len(), 1);
    }

    #[test]
    fn deployment_overlays_are_valid() {
        for path in ["compose", "k8s/config"] {
            let c = deployed(path);
            let secret = |v: &str| {
                (v == "ACME_WEBHOOK_SECRET")
                    .then(|| "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into())
            };
            let endpoints = c
                .validate_with_env(secret)
                .unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(endpoints.len(), 1, "{path}");
            assert_eq!(c.state_dir, Path::new("/var/lib/s2s/state"), "{path}");
            assert!(
                !c.pipeline.topics.create,
                "{path}: topics are managed with the cluster"
            );
        }
    }

    #[test]
    fn errors_name_the_key_to_fix() {
        let cases: Vec<(PostbackConfig, &str)> = vec![
            (pb("https://aff/pb?c={clickid}"), "{clickid}"),
            (pb("ftp://aff/pb"), "http://"),
            (
                PostbackConfig {
                    name: "bad name".into(),
                    ..pb("https://a/")
                },
                "name 'bad name'",
            ),
            (
                PostbackConfig {
                    body: Some(r#"{"c":{click_id}}"#.into()),
                    ..pb("https://a/")
                },
                "not JSON",
            ),
            (
                PostbackConfig {
                    body: Some("x".into()),
                    method: Some(Method::Get),
                    ..pb("https://a/")
                },
                "POST or PUT",
            ),
            (
                PostbackConfig {
                    headers: [("webhook-id".to_string(), "x".to_string())].into(),
                    ..pb("https://a/")
                },
                "set by the delivery worker",
            ),
            (
                PostbackConfig {
                    headers: [("bad header".to_string(), "x".to_string())].into(),
                    ..pb("https://a/")
                },
                "not a valid header name",
            ),
            (
                PostbackConfig {
                    secret: Some("whsec_!!".into()),
                    ..pb("https://a/")
                },
                "secret must be whsec_",
            ),
            (
                PostbackConfig {
                    secret_env: Some("MISSING_VAR".into()),
                    ..pb("https://a/")
                },
                "MISSING_VAR is not set",
            ),
        ];
        for (p, expected) in cases {
            let e = with(p).expect_err(expected);
            assert!(e.contains("postbacks[0]") && e.contains(expected), "{e}");
        }
        let mut c = defaults();
        c.finished_retention = Duration::from_secs(60);
        let e = c.validate().expect_err("retention under the longest wait");
        assert!(e.contains("finished_retention (1m)"), "{e}");
    }

    #[test]
    fn a_full_postback_compiles() {
        let eps = with(PostbackConfig {
            body: Some(r#"{"click":"{click_id}","payout":{payout},"n":"{txn_id}"}"#.into()),
            headers: [("X-Key".to_string(), "k-{aff_id}".to_string())].into(),
            secret_env: Some("AFF_SECRET".into()),
            max_in_flight: Some(3),
            timeout: Some(Duration::from_millis(1500)),
            send_updates: true,
            ..pb("https://aff.example/pb?c={click_id}")
        })
        .expect("valid");
        let e = &eps[0];
        assert_eq!(e.method, Method::Post, "a body implies POST");
        assert_eq!(
            (e.max_in_flight, e.timeout),
            (3, Duration::from_millis(1500))
        );
        assert!(e.secret.is_some() && e.filter.send_updates);
    }
}
