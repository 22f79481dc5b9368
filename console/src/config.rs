//! Console configuration (see `deploy/config/console.toml`, embedded as the default).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use s2s_common::config::duration;
pub use s2s_common::pipeline::{PipelineConfig, ServiceConfig};
use s2s_state::RocksConfig;
use serde::{Deserialize, Serialize};

pub const DEFAULT_TOML: &str = include_str!("../../deploy/config/console.toml");
pub const ENV_PREFIX: &str = "S2S_CONSOLE__";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// The JSON API and the web page.
    pub listen: SocketAddr,
    /// How the other console instances reach this one's API (`http://console-0.console:8081`):
    /// the elected catalog writer announces it, and the others forward catalog changes
    /// there. Unset: this instance, when not the writer, answers them 503 instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertised_url: Option<String>,
    /// Ingest as operators reach it (`https://track.example.com`): a source's page shows
    /// the postback URL to call on it. Unset: the path alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingest_public_url: Option<String>,
    /// The consumer group that elects the catalog's one writer: the same for every
    /// console instance of a pipeline, even where each has a `group_id` of its own.
    /// Default: `<group_id>.catalog-writer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog_writer_group: Option<String>,
    /// `exactly_once`: catalog changes are appended with their audit records in one
    /// transaction under one fixed `transactional.id` (`catalog_transactional_id`), so
    /// a newly elected writer fences a deposed one. `at_least_once`: no transactions
    /// (brokers without them).
    pub catalog_guarantee: s2s_state::Guarantee,
    /// The catalog writer's `transactional.id`, the same for every instance. Default:
    /// the writer group's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog_transactional_id: Option<String>,
    /// /metrics, /healthz, /readyz.
    pub admin_listen: SocketAddr,
    pub group_id: String,
    pub state_dir: PathBuf,
    #[serde(with = "duration")]
    pub commit_interval: Duration,
    pub max_batch: usize,
    /// Clicks, stories, lists and deliveries are dropped this long after last written.
    #[serde(with = "duration")]
    pub retention: Duration,
    /// Hourly and daily totals likewise.
    #[serde(with = "duration")]
    pub totals_retention: Duration,
    /// Operator name → API token. Set tokens through the environment:
    /// `S2S_CONSOLE__OPERATORS__<NAME>=…`.
    #[serde(default, skip_serializing)]
    pub operators: BTreeMap<String, String>,
    pub rocksdb: RocksConfig,
    /// From the pipeline config ([`ConsoleConfig::with_pipeline`]).
    #[serde(skip, default = "PipelineConfig::defaults")]
    pub pipeline: PipelineConfig,
}

impl ConsoleConfig {
    /// The stores' limits, with the retention of the families that expire.
    pub fn limits(&self) -> s2s_state::Limits<crate::schema::Cf> {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        s2s_state::Limits {
            retention_ms: crate::schema::retention_ms(
                ms(self.retention),
                ms(self.totals_retention),
            ),
            ..self.rocksdb.limits()
        }
    }

    /// The consumer group that elects the catalog's writer.
    pub fn catalog_writer_group(&self) -> String {
        self.catalog_writer_group
            .clone()
            .unwrap_or_else(|| format!("{}.catalog-writer", self.group_id))
    }

    /// The catalog writer's `transactional.id` under `exactly_once`.
    pub fn catalog_transactional_id(&self) -> Option<String> {
        (self.catalog_guarantee == s2s_state::Guarantee::ExactlyOnce).then(|| {
            self.catalog_transactional_id
                .clone()
                .unwrap_or_else(|| self.catalog_writer_group())
        })
    }

    /// Checks the config; the error names the key to fix.
    pub fn validate(&self) -> Result<(), String> {
        self.pipeline.validate()?;
        self.rocksdb.validate()?;
        if self.group_id.trim().is_empty() {
            return Err("group_id must not be empty".into());
        }
        if self
            .catalog_transactional_id
            .as_ref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Err(
                "catalog_transactional_id must not be empty (unset it for the default)".into(),
            );
        }
        if self.commit_interval.is_zero() || self.max_batch == 0 {
            return Err("commit_interval and max_batch must be > 0".into());
        }
        if self.retention < Duration::from_secs(3600)
            || self.totals_retention < Duration::from_secs(3600)
        {
            return Err(
                "retention and totals_retention must be at least 1h (the history the read \
                 model keeps)"
                    .into(),
            );
        }
        if let Some(u) = &self.ingest_public_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(format!(
                    "ingest_public_url '{u}' must be an http:// or https:// URL (https://track.example.com)"
                ));
            }
        }
        if let Some(u) = &self.advertised_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) || u.ends_with('/') {
                return Err(format!(
                    "advertised_url '{u}' must be http:// or https://, host and port, without \
                     a trailing slash"
                ));
            }
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

impl ServiceConfig for ConsoleConfig {
    const NAME: &'static str = "console";
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

    /// A config of `deploy/<dir>/`, its own file and the pipeline's.
    fn deployed(dir: &str) -> ConsoleConfig {
        ConsoleConfig::from_deployment(&Path::new("../deploy").join(dir))
            .unwrap_or_else(|e| panic!("deploy/{dir}: {e}"))
    }

    #[test]
    fn defaults_need_an_operator_and_the_local_overlay_has_one() {
        let c: ConsoleConfig = s2s_common::config::load_files(DEFAULT_TOML, None).expect("parses");
        let e = c.validate().expect_err("no operator");
        assert!(e.contains("S2S_CONSOLE__OPERATORS__"), "{e}");
        let local = deployed("local");
        local.validate().expect("valid");
        // Compose and Kubernetes: valid once the environment names an operator, as
        // their compose.yaml and Secret do.
        for overlay in ["compose", "k8s/config"] {
            let mut c = deployed(overlay);
            c.operators
                .insert("alice".into(), "a-token-from-the-secret".into());
            c.validate().unwrap_or_else(|e| panic!("{overlay}: {e}"));
            assert_eq!(c.state_dir, Path::new("/var/lib/s2s/state"), "{overlay}");
            assert!(
                !c.pipeline.topics.create,
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
