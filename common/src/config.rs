//! Configuration loading: the service's commented default TOML (embedded in the binary,
//! the same file as `deploy/config/<service>.toml`), then an optional file given on the
//! command line, then environment variables `S2S_<SERVICE>__<SECTION>__<KEY>` (double
//! underscore separates levels), then `S2S_KAFKA_PROP_*` librdkafka properties.

use std::path::Path;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;

/// The flags every service binary takes.
#[derive(Debug, clap::Parser)]
#[command(version)]
pub struct ServiceArgs {
    /// Config file layered over the built-in defaults (deploy/config/<service>.toml).
    #[arg(long, env = "S2S_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// Print the built-in default config (the commented reference) and exit.
    #[arg(long)]
    pub print_default_config: bool,
}

impl ServiceArgs {
    /// Parses the command line (exits with usage on error, as CLIs do).
    pub fn from_command_line() -> Self {
        <Self as clap::Parser>::parse()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    Missing(String),
    #[error("invalid configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
}

/// Layers defaults, file and environment for the service whose env prefix is
/// `env_prefix` (for example `S2S_INGEST__`).
pub fn load<T: DeserializeOwned>(
    default_toml: &str,
    file: Option<&Path>,
    env_prefix: &str,
) -> Result<T, ConfigError> {
    let mut fig = Figment::from(Toml::string(default_toml));
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::Missing(path.display().to_string()));
        }
        fig = fig.merge(Toml::file(path));
    }
    fig = fig.merge(Env::prefixed(env_prefix).split("__"));
    fig.extract().map_err(|e| ConfigError::Invalid(Box::new(e)))
}

/// `#[serde(deserialize_with = "s2s_common::config::duration")]`: a humantime duration
/// string such as `"5m"` or `"14d"`.
pub fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
    let raw = <String as serde::Deserialize>::deserialize(d)?;
    humantime::parse_duration(&raw).map_err(|e| {
        serde::de::Error::custom(format!(
            "{raw:?} is not a duration such as \"5m\" or \"14d\": {e}"
        ))
    })
}
