//! Console configuration (see `deploy/config/console.toml`, embedded as the default).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use s2s_common::kafka::KafkaConfig;
use s2s_common::topics::TopicsConfig;
use s2s_state::RocksConfig;
use serde::Deserialize;

pub const DEFAULT_TOML: &str = include_str!("../../deploy/config/console.toml");
pub const ENV_PREFIX: &str = "S2S_CONSOLE__";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// The JSON API and the web page.
    pub listen: SocketAddr,
    /// /metrics, /healthz, /readyz.
    pub admin_listen: SocketAddr,
    pub group_id: String,
    pub state_dir: PathBuf,
    pub commit_interval_ms: u64,
    pub max_batch: usize,
    /// Clicks, stories, lists and deliveries are dropped this long after last written.
    pub retention_days: u32,
    /// Hourly and daily totals likewise.
    pub totals_retention_days: u32,
    /// Operator name → API token. Set tokens through the environment:
    /// `S2S_CONSOLE__OPERATORS__<NAME>=…`.
    #[serde(default)]
    pub operators: BTreeMap<String, String>,
    pub rocksdb: RocksConfig,
    pub kafka: KafkaConfig,
    pub topics: TopicsConfig,
}

impl ConsoleConfig {
    pub fn load(file: Option<&Path>) -> Result<Self, s2s_common::config::ConfigError> {
        let mut c: Self = s2s_common::config::load(DEFAULT_TOML, file, ENV_PREFIX)?;
        c.kafka.apply_env_properties(std::env::vars());
        Ok(c)
    }

    /// The stores' limits, with the retention of the families that expire.
    pub fn limits(&self) -> s2s_state::Limits<crate::schema::Cf> {
        const DAY_MS: i64 = 24 * 3600 * 1000;
        s2s_state::Limits {
            retention_ms: crate::schema::retention_ms(
                i64::from(self.retention_days) * DAY_MS,
                i64::from(self.totals_retention_days) * DAY_MS,
            ),
            ..self.rocksdb.limits()
        }
    }

    /// Checks the config; the error names the key to fix.
    pub fn validate(&self) -> Result<(), String> {
        self.kafka.validate().map_err(|e| e.to_string())?;
        self.topics.validate()?;
        self.rocksdb.validate()?;
        if self.group_id.trim().is_empty() {
            return Err("group_id must not be empty".into());
        }
        if self.commit_interval_ms == 0 || self.max_batch == 0 {
            return Err("commit_interval_ms and max_batch must be > 0".into());
        }
        if self.retention_days == 0 || self.totals_retention_days == 0 {
            return Err(
                "retention_days and totals_retention_days must be at least 1 (days of history \
                 the read model keeps)"
                    .into(),
            );
        }
        if self.operators.is_empty() {
            return Err(
                "operators is empty: the API would refuse everyone. Add one, e.g. \
                 S2S_CONSOLE__OPERATORS__ALICE=<a token of at least 16 characters>"
                    .into(),
            );
        }
        for (name, token) in &self.operators {
            if token.len() < 16 {
                return Err(format!(
                    "operators.{name}: the token must have at least 16 characters"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_an_operator_and_the_local_overlay_has_one() {
        let c: ConsoleConfig =
            s2s_common::config::load(DEFAULT_TOML, None, "S2S_TEST_UNUSED__").expect("parses");
        let e = c.validate().expect_err("no operator");
        assert!(e.contains("S2S_CONSOLE__OPERATORS__"), "{e}");
        let local: ConsoleConfig = s2s_common::config::load(
            DEFAULT_TOML,
            Some(Path::new("../deploy/local/console.toml")),
            "S2S_TEST_UNUSED__",
        )
        .expect("the local-run overlay parses");
        local.validate().expect("valid");
        // Compose and Kubernetes: valid once the environment names an operator, as
        // their compose.yaml and Secret do.
        for overlay in [
            "../deploy/compose/console.toml",
            "../deploy/k8s/config/console.toml",
        ] {
            let mut c: ConsoleConfig = s2s_common::config::load(
                DEFAULT_TOML,
                Some(Path::new(overlay)),
                "S2S_TEST_UNUSED__",
            )
            .unwrap_or_else(|e| panic!("{overlay}: {e}"));
            c.operators
                .insert("alice".into(), "a-token-from-the-secret".into());
            c.validate().unwrap_or_else(|e| panic!("{overlay}: {e}"));
            assert_eq!(c.state_dir, Path::new("/var/lib/s2s/state"), "{overlay}");
            assert!(
                !c.topics.create,
                "{overlay}: topics are made by the cluster's tooling"
            );
        }
        let mut short = local.clone();
        short.operators.insert("bob".into(), "short".into());
        assert!(short
            .validate()
            .expect_err("short token")
            .contains("operators.bob"));
    }
}
