//! Delivery configuration (see `deploy/config/delivery.toml`, embedded as the default).

use std::net::SocketAddr;
use std::path::Path;

use s2s_common::kafka::KafkaConfig;
use s2s_common::template::Template;
use s2s_common::topics::TopicsConfig;
use serde::Deserialize;

use crate::endpoint::{Endpoint, MACROS};
use crate::policy::RetryPolicy;
use std::time::Duration;

pub const DEFAULT_TOML: &str = include_str!("../../deploy/config/delivery.toml");
pub const ENV_PREFIX: &str = "S2S_DELIVERY__";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    pub admin_listen: SocketAddr,
    pub group_id: String,
    pub request_timeout_ms: u64,
    pub retry_schedule_ms: Vec<u64>,
    /// Spread of each retry wait, a fraction in [0, 1).
    pub retry_jitter: f64,
    /// Longest wait an endpoint's `Retry-After` may ask for.
    pub retry_after_cap_ms: u64,
    pub kafka: KafkaConfig,
    pub topics: TopicsConfig,
    #[serde(default)]
    pub postbacks: Vec<PostbackConfig>,
}

/// One outbound postback.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostbackConfig {
    /// Unique; names the endpoint in metrics, the delivery log and the dead-letter topic.
    pub name: String,
    pub url: String,
    /// Only conversions of this affiliate; absent = global postback.
    pub aff_id: Option<String>,
    /// Only conversions of this offer; absent = any.
    pub offer_id: Option<String>,
    /// Only these events; empty = all.
    #[serde(default)]
    pub events: Vec<String>,
    /// Only these statuses; empty = all.
    #[serde(default)]
    pub statuses: Vec<String>,
}

impl DeliveryConfig {
    pub fn load(file: Option<&Path>) -> Result<Self, s2s_common::config::ConfigError> {
        let mut c: Self = s2s_common::config::load(DEFAULT_TOML, file, ENV_PREFIX)?;
        c.kafka.apply_env_properties(std::env::vars());
        Ok(c)
    }

    /// The retry policy this config describes.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            schedule: self
                .retry_schedule_ms
                .iter()
                .map(|ms| Duration::from_millis(*ms))
                .collect(),
            jitter: self.retry_jitter,
            retry_after_cap: Duration::from_millis(self.retry_after_cap_ms),
        }
    }

    /// Checks the config and compiles the endpoints; the error names the key to fix.
    pub fn validate(&self) -> Result<Vec<Endpoint>, String> {
        self.kafka.validate().map_err(|e| e.to_string())?;
        self.topics.validate()?;
        if self.group_id.trim().is_empty() {
            return Err("group_id must not be empty".into());
        }
        if self.request_timeout_ms == 0 {
            return Err("request_timeout_ms must be > 0".into());
        }
        if !(0.0..1.0).contains(&self.retry_jitter) {
            return Err(format!(
                "retry_jitter = {} must be in [0, 1)",
                self.retry_jitter
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        self.postbacks
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if p.name.trim().is_empty() || !names.insert(p.name.clone()) {
                    return Err(format!("postbacks[{i}].name must be non-empty and unique"));
                }
                if !(p.url.starts_with("http://") || p.url.starts_with("https://")) {
                    return Err(format!(
                        "postbacks[{i}].url must start with http:// or https://"
                    ));
                }
                let url = Template::parse(&p.url, MACROS)
                    .map_err(|e| format!("postbacks[{i}].url: {e}"))?;
                Ok(Endpoint {
                    name: p.name.clone(),
                    url,
                    aff_id: p.aff_id.clone(),
                    offer_id: p.offer_id.clone(),
                    events: p.events.clone(),
                    statuses: p.statuses.clone(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        let c: DeliveryConfig =
            s2s_common::config::load(DEFAULT_TOML, None, "S2S_TEST_UNUSED__").expect("parses");
        assert!(
            c.validate().expect("valid").is_empty(),
            "no demo postback in defaults"
        );
        let local: DeliveryConfig = s2s_common::config::load(
            DEFAULT_TOML,
            Some(Path::new("../deploy/local/delivery.toml")),
            "S2S_TEST_UNUSED__",
        )
        .expect("the local-run overlay parses");
        assert_eq!(local.validate().expect("valid").len(), 1);
    }

    #[test]
    fn unknown_macro_fails_at_start_up() {
        let mut c: DeliveryConfig =
            s2s_common::config::load(DEFAULT_TOML, None, "S2S_TEST_UNUSED__").expect("parses");
        c.postbacks.push(PostbackConfig {
            name: "a".into(),
            url: "https://aff/pb?c={clickid}".into(),
            aff_id: None,
            offer_id: None,
            events: vec![],
            statuses: vec![],
        });
        let e = c.validate().err().unwrap_or_default();
        assert!(
            e.contains("postbacks[0].url") && e.contains("{clickid}"),
            "{e}"
        );
    }
}
