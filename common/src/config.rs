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
    /// The pipeline's config file (Kafka, topics, events, offers), layered over the
    /// built-in defaults (deploy/config/pipeline.toml); the same for every service.
    #[arg(long, env = "S2S_PIPELINE")]
    pub pipeline: Option<std::path::PathBuf>,
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
    files(default_toml, file)?
        .merge(Env::prefixed(env_prefix).split("__"))
        .extract()
        .map_err(|e| ConfigError::Invalid(Box::new(e)))
}

/// The defaults and `file` only, without the environment: for tests of the files in
/// `deploy/`.
pub fn load_files<T: DeserializeOwned>(
    default_toml: &str,
    file: Option<&Path>,
) -> Result<T, ConfigError> {
    files(default_toml, file)?
        .extract()
        .map_err(|e| ConfigError::Invalid(Box::new(e)))
}

/// The defaults and a file's text: what a config file means, without the filesystem
/// or the environment (the config fuzz target).
pub fn load_str<T: DeserializeOwned>(
    default_toml: &str,
    file_text: &str,
) -> Result<T, ConfigError> {
    Figment::from(Toml::string(default_toml))
        .merge(Toml::string(file_text))
        .extract()
        .map_err(|e| ConfigError::Invalid(Box::new(e)))
}

fn files(default_toml: &str, file: Option<&Path>) -> Result<Figment, ConfigError> {
    let mut fig = Figment::from(Toml::string(default_toml));
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::Missing(path.display().to_string()));
        }
        fig = fig.merge(Toml::file(path));
    }
    Ok(fig)
}

/// Durations in config files are humantime strings (`"250ms"`, `"5m"`, `"14d"`):
/// `#[serde(with = "s2s_common::config::duration")]` on a `Duration`, and the submodules
/// for an optional one, a list and a map of them.
pub mod duration {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    fn parse<E: serde::de::Error>(raw: &str) -> Result<Duration, E> {
        humantime::parse_duration(raw).map_err(|e| {
            E::custom(format!(
                "{raw:?} is not a duration such as \"250ms\", \"5m\" or \"14d\": {e}"
            ))
        })
    }

    /// The form a duration is written back in (`"1h 30m"`).
    pub fn format(d: Duration) -> String {
        humantime::format_duration(d).to_string()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        parse(&String::deserialize(d)?)
    }

    pub fn serialize<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*v))
    }

    pub mod option {
        use super::*;

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|raw| parse(&raw))
                .transpose()
        }

        pub fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            v.map(format).serialize(s)
        }
    }

    pub mod list {
        use super::*;

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
            Vec::<String>::deserialize(d)?
                .iter()
                .map(|raw| parse(raw))
                .collect()
        }

        pub fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
            v.iter()
                .map(|d| format(*d))
                .collect::<Vec<_>>()
                .serialize(s)
        }
    }

    pub mod map {
        use super::*;

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<BTreeMap<String, Duration>, D::Error> {
            BTreeMap::<String, String>::deserialize(d)?
                .into_iter()
                .map(|(k, raw)| parse(&raw).map(|v| (k, v)))
                .collect()
        }

        pub fn serialize<S: Serializer>(
            v: &BTreeMap<String, Duration>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            v.iter()
                .map(|(k, d)| (k.clone(), format(*d)))
                .collect::<BTreeMap<_, _>>()
                .serialize(s)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[derive(Debug, PartialEq, serde::Deserialize, serde::Serialize)]
        struct C {
            #[serde(with = "super")]
            one: Duration,
            #[serde(with = "super::option", default)]
            maybe: Option<Duration>,
            #[serde(with = "super::list")]
            list: Vec<Duration>,
            #[serde(with = "super::map")]
            map: BTreeMap<String, Duration>,
        }

        #[test]
        fn humantime_strings_round_trip_and_bad_ones_say_what_is_expected() {
            let c: C = toml::from_str(
                "one = \"250ms\"\nmaybe = \"14d\"\nlist = [\"5s\", \"1h 30m\"]\nmap = { ftd = \"30d\" }",
            )
            .expect("valid");
            assert_eq!(c.one, Duration::from_millis(250));
            assert_eq!(c.maybe, Some(Duration::from_secs(14 * 86_400)));
            assert_eq!(c.list, [Duration::from_secs(5), Duration::from_secs(5_400)]);
            assert_eq!(c.map["ftd"], Duration::from_secs(30 * 86_400));
            let again: C = toml::from_str(&toml::to_string(&c).expect("serialize")).expect("parse");
            assert_eq!(again, c);
            let err = toml::from_str::<C>("one = \"5 parsecs\"\nlist = []\nmap = {}")
                .expect_err("invalid");
            assert!(err.to_string().contains("not a duration such as"), "{err}");
        }
    }
}
