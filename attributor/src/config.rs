//! Attributor configuration (see `deploy/config/attributor.toml`, embedded as the default).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use std::time::Duration;

use s2s_common::config::duration;
use s2s_common::pipeline::is_currency_code;
pub use s2s_common::pipeline::{OfferConfig, PipelineConfig, ServiceConfig, TooFastConfig};
use serde::{Deserialize, Serialize};

use crate::join::{Lifecycle, OfferRules, Rules, TooFast, APPROVED, PENDING};
pub use s2s_state::{Guarantee, RocksConfig};

pub const DEFAULT_TOML: &str = include_str!("../../deploy/config/attributor.toml");
pub const ENV_PREFIX: &str = "S2S_ATTRIBUTOR__";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AttributorConfig {
    pub admin_listen: SocketAddr,
    pub group_id: String,
    pub processing_guarantee: Guarantee,
    /// `transactional.id` of this instance under exactly_once; default
    /// `<group_id>-<$HOSTNAME>`.
    #[serde(default)]
    pub transactional_id: Option<String>,
    pub state_dir: PathBuf,
    #[serde(with = "duration")]
    pub commit_interval: Duration,
    pub max_batch: usize,
    #[serde(with = "duration")]
    pub grace_period: Duration,
    #[serde(with = "duration")]
    pub default_window: Duration,
    /// Windows per event type, for offers that do not set their own.
    #[serde(default, with = "duration::map")]
    pub event_windows: BTreeMap<String, Duration>,
    /// Events that count at most once per click.
    pub once_per_click_events: Vec<String>,
    /// How long a conversion is kept for dedup and status updates after its last change.
    #[serde(with = "duration")]
    pub conversion_retention: Duration,
    pub default_currency: String,
    /// Allowed status changes: status → the statuses it may change to.
    pub status_transitions: BTreeMap<String, Vec<String>>,
    /// Statuses in which a conversion pays nothing (payout 0, the delta takes it back).
    pub unpaid_statuses: Vec<String>,
    pub rocksdb: RocksConfig,
    /// From the pipeline config ([`AttributorConfig::with_pipeline`]).
    #[serde(skip, default = "PipelineConfig::defaults")]
    pub pipeline: PipelineConfig,
}

impl From<TooFastConfig> for TooFast {
    fn from(c: TooFastConfig) -> Self {
        match c {
            TooFastConfig::Flag => TooFast::Flag,
            TooFastConfig::Hold => TooFast::Hold,
            TooFastConfig::Reject => TooFast::Reject,
        }
    }
}

impl AttributorConfig {
    /// The `transactional.id` to use: none under at_least_once; under exactly_once the
    /// configured one, else `<group_id>-<$HOSTNAME>` (a StatefulSet pod's stable name).
    pub fn transactional_id(&self) -> Result<Option<String>, String> {
        self.transactional_id_on(std::env::var("HOSTNAME").ok())
    }

    fn transactional_id_on(&self, hostname: Option<String>) -> Result<Option<String>, String> {
        if self.processing_guarantee == Guarantee::AtLeastOnce {
            return Ok(None);
        }
        if let Some(id) = &self.transactional_id {
            return match id.trim().is_empty() {
                true => Err("transactional_id must not be empty".into()),
                false => Ok(Some(id.clone())),
            };
        }
        match hostname {
            Some(host) if !host.trim().is_empty() => Ok(Some(format!("{}-{host}", self.group_id))),
            _ => Err(
                "processing_guarantee = \"exactly_once\" needs a transactional_id that is \
                 unique per instance and stable across its restarts: set transactional_id, or \
                 HOSTNAME (a StatefulSet pod name) to derive one"
                    .into(),
            ),
        }
    }

    /// Checks the config and builds the join rules; the error names the key to fix.
    pub fn validate(&self) -> Result<Rules, String> {
        self.pipeline.validate()?;
        self.transactional_id()?;
        if self
            .pipeline
            .kafka
            .properties
            .contains_key("transactional.id")
        {
            return Err(
                "kafka.properties must not set transactional.id: the attributor sets \
                        it from transactional_id under exactly_once"
                    .into(),
            );
        }
        if self.group_id.trim().is_empty() {
            return Err("group_id must not be empty".into());
        }
        if self.commit_interval.is_zero() || self.max_batch == 0 {
            return Err("commit_interval and max_batch must be > 0".into());
        }
        if self.default_window.is_zero() {
            return Err("default_window must be > 0".into());
        }
        if let Some((event, _)) = self.event_windows.iter().find(|(_, w)| w.is_zero()) {
            return Err(format!("event_windows.{event} must be > 0"));
        }
        if self.conversion_retention < self.default_window {
            return Err(format!(
                "conversion_retention ({}) must be at least default_window ({}): conversions \
                 must outlive the window in which duplicates can arrive",
                duration::format(self.conversion_retention),
                duration::format(self.default_window)
            ));
        }
        self.rocksdb.validate()?;
        if !is_currency_code(&self.default_currency) {
            return Err(format!(
                "default_currency '{}' must be a three-letter upper-case ISO 4217 code",
                self.default_currency
            ));
        }
        let lifecycle = self.lifecycle()?;
        Ok(Rules {
            default_window_ms: ms(self.default_window),
            event_windows_ms: windows_ms(&self.event_windows),
            default_currency: self.default_currency.clone(),
            offers: BTreeMap::new(),
            blocked_affiliates: Default::default(),
            catalog_revision: None,
            once_per_click: self.once_per_click_events.iter().cloned().collect(),
            lifecycle,
        })
    }

    /// An offer's rules: its document checked again with the pipeline's rules (the
    /// catalog checked it already) and with the attributor's own (a hold must end in
    /// approval and end before conversions are dropped). The error names the key.
    pub fn offer_rules(
        &self,
        id: &str,
        o: &OfferConfig,
        lifecycle: &Lifecycle,
    ) -> Result<OfferRules, String> {
        o.check(&self.pipeline.postbacks)
            .map_err(|e| format!("offers.{id}.{}: {}", e.field, e.message))?;
        let hold_ms = match o.hold {
            None => None,
            Some(hold) => Some(self.hold_ms(id, hold, lifecycle)?),
        };
        Ok(OfferRules {
            currency: o
                .currency
                .clone()
                .unwrap_or_else(|| self.default_currency.clone()),
            window_ms: o.window.map(ms),
            event_windows_ms: windows_ms(&o.event_windows),
            payouts: o.payouts.clone(),
            min_click_to_conversion_ms: o.min_click_to_conversion.map(ms),
            too_fast: o.on_too_fast.into(),
            hold_ms,
            refuse_pixel: o.accept_pixel == Some(false),
        })
    }

    /// The status lifecycle from `status_transitions` and `unpaid_statuses`.
    fn lifecycle(&self) -> Result<Lifecycle, String> {
        let mut transitions = BTreeMap::new();
        for (from, tos) in &self.status_transitions {
            if from.trim().is_empty() || tos.iter().any(|t| t.trim().is_empty()) {
                return Err(format!(
                    "status_transitions.{from} names an empty status; statuses are the ones \
                     ingest accepts (postback_rules.statuses)"
                ));
            }
            if tos.contains(from) {
                return Err(format!(
                    "status_transitions.{from} lists '{from}' itself: the same status again \
                     is a duplicate, not a change"
                ));
            }
            transitions.insert(from.clone(), tos.iter().cloned().collect());
        }
        if let Some(s) = self.unpaid_statuses.iter().find(|s| s.trim().is_empty()) {
            return Err(format!("unpaid_statuses has an empty status: {s:?}"));
        }
        Ok(Lifecycle {
            transitions,
            unpaid: self.unpaid_statuses.iter().cloned().collect(),
        })
    }

    /// An offer's hold in ms, checked: a duration, allowed to end in approval, and shorter
    /// than conversions are kept.
    fn hold_ms(&self, id: &str, hold: Duration, lifecycle: &Lifecycle) -> Result<i64, String> {
        let hold_ms = ms(hold);
        if !lifecycle.allows(PENDING, APPROVED) {
            return Err(format!(
                "offers.{id}.hold needs status_transitions.{PENDING} to allow '{APPROVED}': a \
                 hold ends in approval"
            ));
        }
        if hold >= self.conversion_retention {
            return Err(format!(
                "offers.{id}.hold ({}) must be shorter than conversion_retention ({}): the \
                 conversion must still be kept when its hold ends",
                duration::format(hold),
                duration::format(self.conversion_retention)
            ));
        }
        Ok(hold_ms)
    }

    /// How long a click is kept (and looked up): the longest window any offer may have
    /// (`postbacks.max_window`; this config's own windows when longer), plus how late a
    /// conversion inside it may be reported, plus the grace period. Fixed at start-up, so
    /// that an offer changed live cannot make clicks already dropped matter again.
    pub fn click_retention_ms(&self, rules: &Rules) -> i64 {
        rules
            .max_window_ms()
            .max(ms(self.pipeline.postbacks.max_window))
            .saturating_add(ms(self.pipeline.postbacks.max_event_time_age))
            .saturating_add(ms(self.grace_period))
    }

    /// How long conversions are kept after their last change.
    pub fn conversion_retention_ms(&self) -> i64 {
        ms(self.conversion_retention)
    }
}

fn windows_ms(w: &BTreeMap<String, Duration>) -> BTreeMap<String, i64> {
    w.iter().map(|(e, d)| (e.clone(), ms(*d))).collect()
}

/// Milliseconds, as the rules count them.
pub fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl ServiceConfig for AttributorConfig {
    const NAME: &'static str = "attributor";
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

    #[test]
    fn exactly_once_needs_a_stable_transactional_id() {
        let mut c: AttributorConfig =
            s2s_common::config::load(DEFAULT_TOML, None, "S2S_TEST_UNUSED__").expect("parses");
        assert_eq!(
            c.processing_guarantee,
            Guarantee::ExactlyOnce,
            "the production default"
        );
        assert_eq!(
            c.transactional_id_on(Some("attributor-2".into())),
            Ok(Some("s2s-attributor-attributor-2".into()))
        );
        let missing = c.transactional_id_on(None).expect_err("no id, no hostname");
        assert!(missing.contains("set transactional_id"), "{missing}");
        c.transactional_id = Some("pod-0".into());
        assert_eq!(c.transactional_id_on(None), Ok(Some("pod-0".into())));
        c.processing_guarantee = Guarantee::AtLeastOnce;
        assert_eq!(c.transactional_id_on(None), Ok(None));
        c.pipeline
            .kafka
            .properties
            .insert("transactional.id".into(), "x".into());
        assert!(c
            .validate()
            .expect_err("owned")
            .contains("transactional.id"));
    }

    fn base() -> AttributorConfig {
        let mut c: AttributorConfig =
            s2s_common::config::load(DEFAULT_TOML, None, "S2S_TEST_UNUSED__").expect("parses");
        c.transactional_id = Some("test-0".into());
        c
    }

    fn parse_offer(toml: &str) -> Result<OfferConfig, String> {
        use figment::providers::{Format, Toml};
        let toml = format!("url = \"https://o.example/?c={{click_id}}\"\n{toml}");
        figment::Figment::from(Toml::string(&toml))
            .extract()
            .map_err(|e| e.to_string())
    }

    fn offer(toml: &str) -> OfferConfig {
        parse_offer(toml).expect("an offer")
    }

    /// A config of `deploy/<dir>/`, its own file and the pipeline's.
    fn deployed(dir: &str) -> AttributorConfig {
        AttributorConfig::from_deployment(&Path::new("../deploy").join(dir))
            .unwrap_or_else(|e| panic!("deploy/{dir}: {e}"))
    }

    #[test]
    fn the_default_lifecycle_is_the_documented_one() {
        let rules = base().validate().expect("valid");
        assert_eq!(rules.lifecycle, Lifecycle::default());
    }

    #[test]
    fn holds_and_too_fast_policies_are_checked_naming_the_key() {
        let c = base();
        let lifecycle = c.validate().expect("valid").lifecycle;
        let o = c
            .offer_rules(
                "9",
                &offer("currency = \"EUR\"\nhold = \"14d\"\non_too_fast = \"hold\"\nmin_click_to_conversion = \"10s\""),
                &lifecycle,
            )
            .expect("valid");
        assert_eq!(o.hold_ms, Some(14 * 86_400_000));
        assert_eq!(o.too_fast, TooFast::Hold);
        assert_eq!(o.currency, "EUR");

        let err = |c: &AttributorConfig, o: &str, l: &Lifecycle| {
            c.offer_rules("9", &offer(o), l).expect_err("invalid")
        };
        let unparsable = parse_offer("hold = \"two weeks\"").expect_err("not a duration");
        assert!(
            unparsable.contains("not a duration such as"),
            "{unparsable}"
        );
        let e = err(&c, "hold = \"120d\"", &lifecycle);
        assert!(e.contains("shorter than conversion_retention"), "{e}");
        let e = err(&c, "on_too_fast = \"reject\"", &lifecycle);
        assert!(
            e.starts_with("offers.9.on_too_fast: needs min_click_to_conversion"),
            "{e}"
        );
        let mut bad = c.clone();
        bad.status_transitions
            .insert("pending".into(), vec!["rejected".into()]);
        let l = bad.validate().expect("valid").lifecycle;
        let e = err(&bad, "hold = \"1d\"", &l);
        assert!(e.contains("a hold ends in approval"), "{e}");
        let mut bad = base();
        bad.status_transitions
            .insert("approved".into(), vec!["approved".into()]);
        let e = bad.validate().expect_err("invalid");
        assert!(e.starts_with("status_transitions.approved"), "{e}");
    }

    #[test]
    fn clicks_are_kept_for_the_longest_window_an_offer_may_have() {
        let mut c = base();
        let rules = c.validate().expect("valid");
        let day = 86_400_000;
        let extra = ms(c.pipeline.postbacks.max_event_time_age) + ms(c.grace_period);
        assert_eq!(c.click_retention_ms(&rules), 30 * day + extra);
        c.pipeline.postbacks.max_window = Duration::from_secs(90 * 86_400);
        assert_eq!(c.click_retention_ms(&rules), 90 * day + extra);
    }

    #[test]
    fn default_config_is_valid() {
        let mut c: AttributorConfig =
            s2s_common::config::load(DEFAULT_TOML, None, "S2S_TEST_UNUSED__").expect("parses");
        c.transactional_id = Some("test-0".into());
        let rules = c.validate().expect("valid");
        assert_eq!(rules.default_window_ms, 30 * 24 * 3600 * 1000);

        deployed("local").validate().expect("valid");
        for path in ["compose", "k8s/config"] {
            let mut c = deployed(path);
            // A StatefulSet pod's name; compose sets transactional_id itself.
            let id = c.transactional_id_on(Some("attributor-0".into()));
            c.transactional_id = id.expect("a transactional id");
            c.validate().unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(c.processing_guarantee, Guarantee::ExactlyOnce, "{path}");
            assert_eq!(c.state_dir, Path::new("/var/lib/s2s/state"), "{path}");
        }
    }
}
