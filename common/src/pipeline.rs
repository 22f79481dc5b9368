//! What every service of one pipeline shares: the Kafka connection, the topics, and the
//! events and statuses a postback may carry. One file (`deploy/config/pipeline.toml`,
//! embedded as the default) that every service loads, layered like the services' own
//! files: the defaults, then `--pipeline FILE` (or `S2S_PIPELINE`), then environment
//! variables `S2S_PIPELINE__<SECTION>__<KEY>`, then `S2S_KAFKA_PROP_*` librdkafka
//! properties. A deployment writes only what differs, once.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rust_decimal::Decimal;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;
use crate::kafka::KafkaConfig;
use crate::topics::TopicsConfig;

pub const DEFAULT_TOML: &str = include_str!("../../deploy/config/pipeline.toml");
pub const ENV_PREFIX: &str = "S2S_PIPELINE__";

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub kafka: KafkaConfig,
    pub topics: TopicsConfig,
    pub postbacks: PostbackVocabulary,
    pub affiliates: AffiliatePolicy,
    /// The catalog's key (base64, 32 bytes), which seals the secrets the catalog holds:
    /// from `S2S_CATALOG_KEY` only, never from a file, never serialized or shown.
    #[serde(skip)]
    pub catalog_key: Option<CatalogKey>,
    /// Offers live in the catalog; an `[offers]` section here is refused with a message
    /// that says so (it is the import format of `console catalog import`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offers: Option<toml::Table>,
}

/// What a postback may say, for every service that reads one.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostbackVocabulary {
    /// Allowed values of `event`.
    pub events: Vec<String>,
    /// Allowed values of `status`.
    pub statuses: Vec<String>,
    /// How long after it happened a conversion may still be reported with its
    /// `event_time`: ingest refuses older ones, the attributor keeps clicks this much
    /// longer than the longest window.
    #[serde(with = "crate::config::duration")]
    pub max_event_time_age: Duration,
    /// The longest attribution window an offer may have: the attributor keeps clicks
    /// this long (plus `max_event_time_age` and its grace period), and the catalog
    /// refuses offers with a longer window.
    #[serde(with = "crate::config::duration")]
    pub max_window: Duration,
}

/// The catalog's key as given (see `s2s_catalog::secrets`); its `Debug` shows nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct CatalogKey(pub String);

impl std::fmt::Debug for CatalogKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CatalogKey(…)")
    }
}

/// The environment variable holding the catalog's key.
pub const CATALOG_KEY_ENV: &str = "S2S_CATALOG_KEY";

/// What the pipeline does with affiliates the catalog does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AffiliatePolicy {
    pub unknown: UnknownAffiliates,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownAffiliates {
    /// Any `aff_id` gets clicks (an affiliate needs no entity).
    Accept,
    /// A click for an affiliate ID the catalog does not hold gets no click ID.
    Refuse,
}

/// One offer: its document in the catalog (`offer/<id>`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OfferConfig {
    /// Where `/click` redirects, with macros (`{click_id}`, `{aff_id}`, `{sub1}`…).
    pub url: String,
    /// `paused`: its clicks get no click ID (ingest's `click.fallback_url`, or 403);
    /// conversions of its earlier clicks still count.
    #[serde(default)]
    pub status: OfferStatus,
    /// Currency of its payouts; default: the attributor's `default_currency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// Its attribution window, for events without one of their own below.
    #[serde(
        default,
        with = "crate::config::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub window: Option<Duration>,
    /// Its windows per event type.
    #[serde(
        default,
        with = "crate::config::duration::map",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub event_windows: BTreeMap<String, Duration>,
    /// Payout (CPA) per event type; an event not listed pays 0.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub payouts: BTreeMap<String, Decimal>,
    /// Conversions sooner than this after their click are `suspicious`.
    #[serde(
        default,
        with = "crate::config::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub min_click_to_conversion: Option<Duration>,
    /// What a suspicious conversion gets: flag, hold or reject.
    #[serde(default)]
    pub on_too_fast: TooFastConfig,
    /// Approve a `pending` conversion this long after it became pending, unless it changed
    /// in the meantime.
    #[serde(
        default,
        with = "crate::config::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub hold: Option<Duration>,
    /// Whether postbacks from a browser (pixel, iframe) count; default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept_pixel: Option<bool>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OfferStatus {
    #[default]
    Active,
    Paused,
}

/// The macros an offer's URL may use.
pub fn offer_macros() -> Vec<&'static str> {
    let mut m = vec!["click_id", "aff_id", "offer_id"];
    m.extend(crate::contract::SUB_ID_KEYS);
    m
}

/// What is wrong with a document, and in which field (`payouts.signup`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl OfferConfig {
    /// Checks the offer against the pipeline's vocabulary: its URL template (known
    /// macros only), its currency, its windows (each within `postbacks.max_window`), the
    /// events of its windows and payouts, its payouts (not negative) and its too-fast
    /// policy. The error names the field, relative to the offer.
    pub fn check(&self, vocabulary: &PostbackVocabulary) -> Result<(), FieldError> {
        if self.url.trim().is_empty() {
            return Err(FieldError::new("url", "must not be empty"));
        }
        crate::template::Template::parse(&self.url, &offer_macros())
            .map_err(|e| FieldError::new("url", e.to_string()))?;
        if let Some(c) = self.currency.as_deref().filter(|c| !is_currency_code(c)) {
            return Err(FieldError::new(
                "currency",
                format!("'{c}' is not a three-letter upper-case ISO 4217 code"),
            ));
        }
        let max = vocabulary.max_window;
        let window_ok = |field: String, w: &Duration| {
            if w.is_zero() {
                Err(FieldError::new(field, "must be > 0"))
            } else if *w > max {
                Err(FieldError::new(
                    field,
                    format!(
                        "{} is longer than postbacks.max_window ({}): clicks are not kept \
                         that long",
                        crate::config::duration::format(*w),
                        crate::config::duration::format(max)
                    ),
                ))
            } else {
                Ok(())
            }
        };
        if let Some(w) = &self.window {
            window_ok("window".into(), w)?;
        }
        let events = &vocabulary.events;
        let known = |field: String, event: &String| {
            if events.contains(event) {
                Ok(())
            } else {
                Err(FieldError::new(
                    field,
                    format!("'{event}' is not one of postbacks.events {events:?}"),
                ))
            }
        };
        for (event, w) in &self.event_windows {
            let field = format!("event_windows.{event}");
            known(field.clone(), event)?;
            window_ok(field, w)?;
        }
        for (event, p) in &self.payouts {
            let field = format!("payouts.{event}");
            known(field.clone(), event)?;
            if p.is_sign_negative() {
                return Err(FieldError::new(field, format!("{p} must not be negative")));
            }
        }
        if self.on_too_fast != TooFastConfig::Flag && self.min_click_to_conversion.is_none() {
            return Err(FieldError::new(
                "on_too_fast",
                "needs min_click_to_conversion: without a minimum no conversion is too fast",
            ));
        }
        if self.hold.is_some_and(|h| h.is_zero()) {
            return Err(FieldError::new("hold", "must be longer than 0"));
        }
        Ok(())
    }
}

/// A three-letter upper-case code (ISO 4217's shape).
pub fn is_currency_code(c: &str) -> bool {
    c.len() == 3 && c.chars().all(|ch| ch.is_ascii_uppercase())
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TooFastConfig {
    #[default]
    Flag,
    Hold,
    Reject,
}

impl PipelineConfig {
    /// The defaults, then `file`, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut c: Self = crate::config::load(DEFAULT_TOML, file, ENV_PREFIX)?;
        c.kafka.apply_env_properties(std::env::vars());
        c.catalog_key = std::env::var(CATALOG_KEY_ENV)
            .ok()
            .filter(|k| !k.trim().is_empty())
            .map(CatalogKey);
        Ok(c)
    }

    /// The defaults and `file`, without the environment (tests of the files in
    /// `deploy/`).
    pub fn from_file(file: &Path) -> Result<Self, ConfigError> {
        crate::config::load_files(DEFAULT_TOML, Some(file))
    }

    /// The built-in defaults alone (tests start from them).
    pub fn defaults() -> Self {
        match toml::from_str(DEFAULT_TOML) {
            Ok(c) => c,
            // The default file is part of the binary and tested below.
            Err(e) => unreachable!("deploy/config/pipeline.toml: {e}"),
        }
    }

    /// As a TOML file (child processes in tests and benchmarks get theirs this way).
    pub fn to_toml(&self) -> String {
        match toml::to_string(self) {
            Ok(s) => s,
            // Every field is a string, number, list or table of them.
            Err(e) => unreachable!("a pipeline config is TOML: {e}"),
        }
    }

    /// Checks what every service relies on; the error names the key to fix.
    pub fn validate(&self) -> Result<(), String> {
        self.kafka.validate().map_err(|e| e.to_string())?;
        self.topics.validate()?;
        let p = &self.postbacks;
        if p.events.is_empty() || p.statuses.is_empty() {
            return Err("postbacks.events and postbacks.statuses must not be empty".into());
        }
        if p.max_window.is_zero() {
            return Err("postbacks.max_window must be > 0".into());
        }
        if self.offers.is_some() {
            return Err(
                "offers are kept in the catalog now, not in the pipeline file: move \
                 the [offers] section to a catalog file and import it with `console catalog \
                 import FILE` (see docs/operations.md, \"The catalog\")"
                    .into(),
            );
        }
        Ok(())
    }
}

/// A service's own config, which takes the pipeline's: how every service loads both.
pub trait ServiceConfig: DeserializeOwned {
    /// The service's name, as in `deploy/<dir>/<name>.toml`.
    const NAME: &'static str;
    /// Its commented default file (`deploy/config/<name>.toml`), embedded.
    const DEFAULT_TOML: &'static str;
    /// Its environment prefix, `S2S_<NAME>__`.
    const ENV_PREFIX: &'static str;

    /// Takes the pipeline's settings (Kafka, topics, vocabulary, offers).
    fn with_pipeline(self, pipeline: PipelineConfig) -> Self;

    /// The defaults, then `file`, then the environment; and the pipeline config from
    /// `pipeline` (see [`PipelineConfig::load`]).
    fn load(file: Option<&Path>, pipeline: Option<&Path>) -> Result<Self, ConfigError> {
        let c: Self = crate::config::load(Self::DEFAULT_TOML, file, Self::ENV_PREFIX)?;
        Ok(c.with_pipeline(PipelineConfig::load(pipeline)?))
    }

    /// The files of a deployment directory, `<dir>/<name>.toml` and `<dir>/pipeline.toml`,
    /// each over its defaults, without the environment: for tests of `deploy/`.
    fn from_deployment(dir: &Path) -> Result<Self, ConfigError> {
        let own = dir.join(format!("{}.toml", Self::NAME));
        let c: Self = crate::config::load_files(Self::DEFAULT_TOML, Some(&own))?;
        Ok(c.with_pipeline(PipelineConfig::from_file(&dir.join("pipeline.toml"))?))
    }

    /// The built-in defaults of both, without the environment: for tests.
    fn defaults() -> Result<Self, ConfigError> {
        let c: Self = crate::config::load_files(Self::DEFAULT_TOML, None)?;
        Ok(c.with_pipeline(PipelineConfig::defaults()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_file_is_valid_and_round_trips() {
        let c = PipelineConfig::defaults();
        c.validate().expect("valid");
        assert_eq!(
            c.postbacks.max_event_time_age,
            Duration::from_secs(30 * 86_400)
        );
        let again: PipelineConfig =
            toml::from_str(&toml::to_string(&c).expect("serialize")).expect("parse");
        assert_eq!(again, c);
    }

    #[test]
    fn offers_are_checked_against_the_vocabulary() {
        let v = PipelineConfig::defaults().postbacks;
        let ok = OfferConfig {
            url: "https://o.example/?c={click_id}".into(),
            payouts: [("ftd".to_string(), Decimal::ONE)].into(),
            ..OfferConfig::default()
        };
        assert_eq!(ok.check(&v), Ok(()));
        let field = |o: OfferConfig| o.check(&v).map_err(|e| (e.field, e.message));
        let with = |f: &dyn Fn(&mut OfferConfig)| {
            let mut o = ok.clone();
            f(&mut o);
            field(o).expect_err("refused")
        };
        let e = with(&|o| o.payouts = [("signup".to_string(), Decimal::ONE)].into());
        assert_eq!(e.0, "payouts.signup");
        let e = with(&|o| o.payouts = [("ftd".to_string(), -Decimal::ONE)].into());
        assert_eq!(e.0, "payouts.ftd");
        let e = with(&|o| o.url = "https://o.example/?c={clickid}".into());
        assert!(e.0 == "url" && e.1.contains("{clickid}"), "{e:?}");
        assert_eq!(with(&|o| o.url.clear()).0, "url");
        assert_eq!(with(&|o| o.currency = Some("usd".into())).0, "currency");
        let e = with(&|o| o.window = Some(v.max_window + Duration::from_secs(1)));
        assert!(e.0 == "window" && e.1.contains("max_window"), "{e:?}");
        let e = with(&|o| {
            o.event_windows = [("ftd".to_string(), v.max_window * 2)].into();
        });
        assert_eq!(e.0, "event_windows.ftd");
        assert_eq!(
            with(&|o| o.on_too_fast = TooFastConfig::Hold).0,
            "on_too_fast"
        );
        assert_eq!(with(&|o| o.hold = Some(Duration::ZERO)).0, "hold");
    }

    #[test]
    fn offers_in_the_pipeline_file_are_refused_with_where_they_went() {
        let mut c = PipelineConfig::defaults();
        c.offers = Some(toml::Table::new());
        let err = c.validate().expect_err("offers moved");
        assert!(err.contains("catalog import"), "{err}");
    }
}
