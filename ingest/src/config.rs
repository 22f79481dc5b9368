//! Ingest configuration: the file format (see `deploy/config/ingest.toml`, embedded as the
//! default) and its validation into ready-to-use parts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use s2s_common::contract::SUB_ID_KEYS;
use s2s_common::kafka::KafkaConfig;
use s2s_common::template::Template;
use s2s_common::topics::TopicsConfig;
use serde::Deserialize;

/// The built-in default, also the documented reference.
pub const DEFAULT_TOML: &str = include_str!("../../deploy/config/ingest.toml");
/// Environment variables overriding the config: `S2S_INGEST__KAFKA__BOOTSTRAP_SERVERS`.
pub const ENV_PREFIX: &str = "S2S_INGEST__";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub produce_timeout_ms: u64,
    pub max_body_bytes: usize,
    pub kafka: KafkaConfig,
    pub topics: TopicsConfig,
    pub postback: PostbackRules,
    #[serde(default)]
    pub offers: BTreeMap<String, OfferConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostbackRules {
    pub events: Vec<String>,
    pub statuses: Vec<String>,
    pub default_status: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfferConfig {
    /// Redirect target with macros.
    pub url: String,
}

/// Macros an offer URL may use.
pub fn offer_macros() -> Vec<&'static str> {
    let mut m = vec!["click_id", "aff_id", "offer_id"];
    m.extend(SUB_ID_KEYS);
    m
}

impl IngestConfig {
    /// Defaults, then `file`, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, s2s_common::config::ConfigError> {
        let mut c: Self = s2s_common::config::load(DEFAULT_TOML, file, ENV_PREFIX)?;
        c.kafka.apply_env_properties(std::env::vars());
        Ok(c)
    }

    /// Checks everything that can be checked before touching the network and compiles
    /// the offer templates. The error says which key to fix.
    pub fn validate(&self) -> Result<BTreeMap<String, Template>, String> {
        self.kafka.validate().map_err(|e| e.to_string())?;
        self.topics.validate()?;
        if self.produce_timeout_ms == 0 {
            return Err("produce_timeout_ms must be > 0".into());
        }
        if self.max_body_bytes == 0 {
            return Err("max_body_bytes must be > 0".into());
        }
        let p = &self.postback;
        if p.events.is_empty() || p.statuses.is_empty() {
            return Err("postback.events and postback.statuses must not be empty".into());
        }
        if !p.statuses.contains(&p.default_status) {
            return Err(format!(
                "postback.default_status '{}' is not one of postback.statuses {:?}",
                p.default_status, p.statuses
            ));
        }
        let known = offer_macros();
        self.offers
            .iter()
            .map(|(id, o)| {
                Template::parse(&o.url, &known)
                    .map(|t| (id.clone(), t))
                    .map_err(|e| format!("offers.{id}.url: {e}"))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        let c: IngestConfig =
            s2s_common::config::load(DEFAULT_TOML, None, "S2S_TEST_UNUSED__").expect("parses");
        let offers = c.validate().expect("valid");
        assert!(offers.contains_key("1"));
    }

    #[test]
    fn bad_offer_macro_names_the_key() {
        let mut c: IngestConfig =
            s2s_common::config::load(DEFAULT_TOML, None, "S2S_TEST_UNUSED__").expect("parses");
        c.offers.insert(
            "9".into(),
            OfferConfig {
                url: "https://o/?c={clickid}".into(),
            },
        );
        let err = c.validate().err().unwrap_or_default();
        assert!(
            err.starts_with("offers.9.url") && err.contains("{clickid}"),
            "{err}"
        );
    }
}
