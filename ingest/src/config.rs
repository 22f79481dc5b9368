//! Ingest configuration: the file format (see `deploy/config/ingest.toml`, embedded as the
//! default) and its validation into ready-to-use parts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use std::time::Duration;

use s2s_common::config::duration;
pub use s2s_common::pipeline::{OfferConfig, PipelineConfig, ServiceConfig};

use crate::source::{Auth, ProxyTrust, Secret, Source};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The built-in default, also the documented reference.
pub const DEFAULT_TOML: &str = include_str!("../../deploy/config/ingest.toml");
/// Environment variables overriding the config: `S2S_INGEST__MAX_BODY_BYTES`.
pub const ENV_PREFIX: &str = "S2S_INGEST__";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    #[serde(with = "duration")]
    pub produce_timeout: Duration,
    pub max_body_bytes: usize,
    /// How long a request's body may take to arrive once its headers have; a slower
    /// client gets 408 and its connection is closed.
    #[serde(with = "duration")]
    pub body_read_timeout: Duration,
    /// How long a connection may take, once ready for a request (opened, or its last
    /// answer sent), to send that request's headers; also the keep-alive idle timeout.
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    /// Public connections open at most; one more is answered 503 and closed.
    pub max_connections: usize,
    /// Requests being handled at most; one more is answered 503 `overloaded` at once.
    pub max_requests_in_flight: usize,
    /// Refusal events published per second at most for each (source, reason).
    pub refusal_events_per_second: u32,
    /// HMAC signatures remembered at most (each is accepted once within its source's
    /// `max_skew`); beyond, signed requests get 503 until older ones expire.
    pub max_replay_entries: usize,
    pub postback: PostbackRules,
    #[serde(default)]
    pub sources: BTreeMap<String, SourceConfig>,
    #[serde(default)]
    pub trusted_proxies: TrustedProxiesConfig,
    pub pixel: PixelConfig,
    #[serde(default)]
    pub click: ClickConfig,
    /// From the pipeline config ([`IngestConfig::with_pipeline`]): Kafka, topics,
    /// and the events and statuses a postback may carry.
    #[serde(skip, default = "PipelineConfig::defaults")]
    pub pipeline: PipelineConfig,
}

/// `GET /click`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClickConfig {
    /// Where a click that gets no click ID goes (a paused offer's, a paused or blocked
    /// affiliate's, or an unknown one's where the pipeline refuses those); `None`: 403
    /// with the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_url: Option<String>,
    /// Clicks per second one client address may make on average (an IPv6 client: its
    /// /64), a second's worth at once; more get 429. Absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_client: Option<u32>,
}

impl ClickConfig {
    fn validate(&self) -> Result<(), String> {
        if self.rate_limit_per_client == Some(0) {
            return Err("click.rate_limit_per_client must be > 0 (remove it for no limit)".into());
        }
        if let Some(u) = &self.fallback_url {
            let uri: axum::http::Uri = u
                .parse()
                .map_err(|e| format!("click.fallback_url '{u}' is not a URL: {e}"))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err(format!(
                    "click.fallback_url '{u}' must be an absolute http(s) URL"
                ));
            }
        }
        Ok(())
    }
}

/// `GET /pixel` and `GET /iframe`, and the click cookie.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PixelConfig {
    pub enabled: bool,
    /// The cookie `/click` sets with the click ID; `None`: no cookie.
    pub cookie: Option<String>,
    pub cookie_domain: Option<String>,
    #[serde(with = "s2s_common::config::duration")]
    pub cookie_max_age: std::time::Duration,
}

impl PixelConfig {
    /// The cookie name, if one is set: a token of letters, digits, `_` and `-`.
    fn validate(&self) -> Result<(), String> {
        let token = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        };
        if let Some(name) = self.cookie.as_deref().filter(|n| !token(n)) {
            return Err(format!(
                "pixel.cookie '{name}' must be letters, digits, '_', '-' or '.'"
            ));
        }
        if let Some(d) = self.cookie_domain.as_deref().filter(|d| !token(d)) {
            return Err(format!("pixel.cookie_domain '{d}' is not a domain name"));
        }
        if self.cookie.is_some() && self.cookie_max_age.is_zero() {
            return Err("pixel.cookie_max_age must be longer than 0".into());
        }
        Ok(())
    }

    /// The `Set-Cookie` value that hands `click_id` to later pixels, if a cookie is set.
    pub fn set_cookie(&self, click_id: &str) -> Option<String> {
        let name = self.cookie.as_deref().filter(|_| self.enabled)?;
        let domain = self
            .cookie_domain
            .as_deref()
            .map(|d| format!("; Domain={d}"))
            .unwrap_or_default();
        Some(format!(
            "{name}={click_id}; Max-Age={}; Path=/{domain}; Secure; HttpOnly; SameSite=Lax",
            self.cookie_max_age.as_secs()
        ))
    }
}

/// How an operator integration authenticates. There is no default: a source that
/// accepts anyone says so (`auth = "none"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthKind {
    /// Anyone who can reach ingest may post through this source (a demo, a test).
    None,
    Token,
    Hmac,
}

/// One operator integration (see `ingest/src/source.rs`).
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Required: postbacks create payouts, so leaving a source open is said, not implied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthKind>,
    /// For `auth = "token"`. Write-only: never serialized.
    #[serde(default, skip_serializing)]
    pub token: Option<String>,
    /// For `auth = "hmac"`. Write-only: never serialized.
    #[serde(default, skip_serializing)]
    pub hmac_secret: Option<String>,
    /// For `auth = "hmac"`: how far a request's `X-Timestamp` may be from now.
    #[serde(default = "default_skew", with = "duration")]
    pub max_skew: Duration,
    /// Their parameter name = our canonical name.
    #[serde(default)]
    pub aliases: BTreeMap<String, String>,
    /// Their values of `event` and `status` = ours (`sale` → `ftd`, `1` → `approved`),
    /// applied after the aliases.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub values: BTreeMap<String, BTreeMap<String, String>>,
    /// Addresses or CIDRs allowed to call; empty = any.
    #[serde(default)]
    pub allow_ips: Vec<String>,
    /// Requests per second this source may send (429 above); absent = unlimited.
    pub rate_limit_per_second: Option<u32>,
}

impl std::fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceConfig")
            .field("auth", &self.auth)
            .field("aliases", &self.aliases)
            .field("allow_ips", &self.allow_ips)
            .finish_non_exhaustive()
    }
}

fn default_skew() -> Duration {
    Duration::from_secs(300)
}

impl SourceConfig {
    /// A source with this `auth` and nothing else: no secrets, aliases, allow-list or
    /// limit (`auth = "none"` gives the open source of a demo or a test).
    pub fn new(auth: AuthKind) -> Self {
        SourceConfig {
            auth: Some(auth),
            token: None,
            hmac_secret: None,
            max_skew: default_skew(),
            aliases: BTreeMap::new(),
            values: BTreeMap::new(),
            allow_ips: Vec::new(),
            rate_limit_per_second: None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedProxiesConfig {
    /// Header carrying the client address, e.g. `X-Forwarded-For`.
    pub header: Option<String>,
    /// Peers whose header is believed (addresses or CIDRs).
    #[serde(default)]
    pub cidrs: Vec<String>,
}

/// Canonical postback fields an alias may map to.
pub const CANONICAL_FIELDS: [&str; 7] = [
    "click_id",
    "event",
    "txn_id",
    "amount",
    "currency",
    "status",
    "event_time",
];

fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

/// The validated, ready-to-use parts of the config.
#[derive(Debug)]
pub struct Compiled {
    /// Always holds `default` (the plain routes' source).
    pub sources: BTreeMap<String, Arc<Source>>,
    pub proxies: ProxyTrust,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostbackRules {
    /// From the pipeline's `postbacks.events`.
    #[serde(skip)]
    pub events: Vec<String>,
    /// From the pipeline's `postbacks.statuses`.
    #[serde(skip)]
    pub statuses: Vec<String>,
    pub default_status: String,
    /// How far after its receipt an operator's `event_time` may lie (clock skew).
    #[serde(with = "s2s_common::config::duration")]
    pub max_event_time_skew: Duration,
    /// How far before its receipt an operator's `event_time` may lie: the pipeline's
    /// `postbacks.max_event_time_age`.
    #[serde(skip)]
    pub max_event_time_age: Duration,
}

/// Macros an offer URL may use.
pub use s2s_common::pipeline::offer_macros;

impl IngestConfig {
    /// Checks everything that can be checked before touching the network and compiles
    /// templates, sources and proxy settings. The error says which key to fix.
    pub fn validate(&self) -> Result<Compiled, String> {
        self.pipeline.validate()?;
        if self.produce_timeout.is_zero() {
            return Err("produce_timeout must be > 0".into());
        }
        if self.body_read_timeout.is_zero() {
            return Err("body_read_timeout must be > 0 (\"10s\")".into());
        }
        if self.max_body_bytes == 0 {
            return Err("max_body_bytes must be > 0".into());
        }
        if self.header_read_timeout.is_zero() {
            return Err("header_read_timeout must be > 0 (\"10s\")".into());
        }
        if self.max_connections == 0 {
            return Err("max_connections must be > 0 (10000)".into());
        }
        if self.max_requests_in_flight == 0
            || self.max_requests_in_flight > tokio::sync::Semaphore::MAX_PERMITS
        {
            return Err("max_requests_in_flight must be > 0 (512)".into());
        }
        if self.refusal_events_per_second == 0 {
            return Err("refusal_events_per_second must be > 0".into());
        }
        self.pixel.validate()?;
        self.click.validate()?;
        let p = &self.postback;
        if !p.statuses.contains(&p.default_status) {
            return Err(format!(
                "postback.default_status '{}' is not one of the pipeline's postbacks.statuses {:?}",
                p.default_status, p.statuses
            ));
        }
        if !self.sources.contains_key("default") {
            return Err(NO_DEFAULT_SOURCE.into());
        }
        let sources: BTreeMap<String, Arc<Source>> = self
            .sources
            .iter()
            .map(|(name, c)| compile_source(name, c).map(|s| (name.clone(), Arc::new(s))))
            .collect::<Result<_, _>>()?;
        let tp = &self.trusted_proxies;
        let header = tp
            .header
            .as_deref()
            .map(|h| {
                axum::http::HeaderName::try_from(h)
                    .map_err(|_| format!("trusted_proxies.header '{h}' is not a header name"))
            })
            .transpose()?;
        let proxies = tp
            .cidrs
            .iter()
            .map(|c| {
                parse_net(c).ok_or_else(|| {
                    format!("trusted_proxies.cidrs: '{c}' is not an address or CIDR")
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Compiled {
            sources,
            proxies: ProxyTrust { header, proxies },
        })
    }
}

impl ServiceConfig for IngestConfig {
    const NAME: &'static str = "ingest";
    const DEFAULT_TOML: &'static str = DEFAULT_TOML;
    const ENV_PREFIX: &'static str = ENV_PREFIX;

    /// Also gives the postback rules the pipeline's vocabulary.
    fn with_pipeline(mut self, pipeline: PipelineConfig) -> Self {
        self.postback.events.clone_from(&pipeline.postbacks.events);
        self.postback
            .statuses
            .clone_from(&pipeline.postbacks.statuses);
        self.postback.max_event_time_age = pipeline.postbacks.max_event_time_age;
        self.pipeline = pipeline;
        self
    }
}

/// Why ingest refuses to start without `[sources.default]`.
pub const NO_DEFAULT_SOURCE: &str = "sources.default is not configured: it authenticates \
    the plain routes (/postback, /v1/postbacks, /v1/clicks), whose records create payouts. \
    Add [sources.default] with auth = \"token\" (token from \
    S2S_INGEST__SOURCES__DEFAULT__TOKEN) or auth = \"hmac\"; for a demo that anyone may \
    post to, say auth = \"none\"";

/// The canonical parameters whose values a source may map.
pub const MAPPED_FIELDS: [&str; 2] = ["event", "status"];

pub(crate) fn compile_source(name: &str, c: &SourceConfig) -> Result<Source, String> {
    let key = format!("sources.{name}");
    let Some(kind) = c.auth else {
        return Err(format!(
            "{key}.auth must be set: \"token\", \"hmac\", or \"none\" to accept \
             postbacks (and create payouts) from anyone who can reach ingest"
        ));
    };
    if !name
        .chars()
        .all(|ch| ch.is_ascii_alphanumeric() || "-_".contains(ch))
    {
        return Err(format!(
            "{key}: source names use A-Z, a-z, 0-9, '-' and '_' (they appear in URLs)"
        ));
    }
    let secret = |v: &Option<String>, field: &str| match v.as_deref() {
        Some(s) if s.len() >= 16 => Ok(Secret::new(s)),
        _ => Err(format!(
            "{key}.{field} must be set to at least 16 characters for auth = \"{}\" \
             (env S2S_INGEST__SOURCES__{}__{})",
            match kind {
                AuthKind::Token => "token",
                _ => "hmac",
            },
            name.to_ascii_uppercase(),
            field.to_ascii_uppercase()
        )),
    };
    let auth = match kind {
        AuthKind::None => Auth::None,
        AuthKind::Token => Auth::Token(secret(&c.token, "token")?),
        AuthKind::Hmac => {
            let max_skew_seconds = i64::try_from(c.max_skew.as_secs()).unwrap_or(i64::MAX);
            if max_skew_seconds <= 0 {
                return Err(format!("{key}.max_skew must be at least 1s"));
            }
            Auth::Hmac {
                secret: secret(&c.hmac_secret, "hmac_secret")?,
                max_skew_seconds,
            }
        }
    };
    for (alias, target) in &c.aliases {
        if !CANONICAL_FIELDS.contains(&target.as_str()) {
            return Err(format!(
                "{key}.aliases.{alias} = '{target}': the target must be one of {}",
                CANONICAL_FIELDS.join(", ")
            ));
        }
    }
    let allow = c
        .allow_ips
        .iter()
        .map(|a| {
            parse_net(a).ok_or_else(|| format!("{key}.allow_ips: '{a}' is not an address or CIDR"))
        })
        .collect::<Result<_, _>>()?;
    let rate_limit = match c.rate_limit_per_second {
        None => None,
        Some(n) => Some(crate::source::limiter(
            std::num::NonZeroU32::new(n)
                .ok_or_else(|| format!("{key}.rate_limit_per_second must be > 0"))?,
        )),
    };
    if let Some(field) = c
        .values
        .keys()
        .find(|f| !MAPPED_FIELDS.contains(&f.as_str()))
    {
        return Err(format!(
            "{key}.values.{field}: values are mapped for {MAPPED_FIELDS:?} only"
        ));
    }
    if let Some((field, theirs)) = c.values.iter().find_map(|(f, m)| {
        m.iter()
            .find(|(_, ours)| ours.trim().is_empty())
            .map(|(t, _)| (f, t))
    }) {
        return Err(format!(
            "{key}.values.{field}: '{theirs}' maps to an empty value"
        ));
    }
    Ok(Source {
        name: name.to_string(),
        auth,
        aliases: c.aliases.clone(),
        values: c.values.clone(),
        allow,
        rate_limit,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn the_defaults_refuse_to_leave_the_plain_routes_open_unless_told() {
        let mut c = <IngestConfig as ServiceConfig>::defaults().expect("parses");
        assert_eq!(
            c.validate().expect_err("no default source"),
            NO_DEFAULT_SOURCE
        );
        c.sources.insert(
            "default".into(),
            SourceConfig {
                auth: None,
                ..SourceConfig::new(AuthKind::None)
            },
        );
        let e = c.validate().expect_err("auth unset");
        assert!(e.starts_with("sources.default.auth must be set"), "{e}");

        let c = defaults();
        let compiled = c.validate().expect("valid");
        assert_eq!(
            c.postback.events,
            PipelineConfig::defaults().postbacks.events
        );
        let names: Vec<&String> = compiled.sources.keys().collect();
        assert_eq!(names, ["default"]);
        assert_eq!(compiled.sources["default"].auth, crate::source::Auth::None);

        let local = deployed("local");
        let compiled = local.validate().expect("valid");
        assert_eq!(
            compiled.sources["default"].auth,
            crate::source::Auth::None,
            "the local demo is open, and says so"
        );
    }

    /// The built-in defaults with the default source explicitly open.
    fn defaults() -> IngestConfig {
        let mut c = <IngestConfig as ServiceConfig>::defaults().expect("parses");
        c.sources
            .insert("default".into(), SourceConfig::new(AuthKind::None));
        c
    }

    /// A config of `deploy/<dir>/`, its own file and the pipeline's.
    fn deployed(dir: &str) -> IngestConfig {
        IngestConfig::from_deployment(&Path::new("../deploy").join(dir))
            .unwrap_or_else(|e| panic!("deploy/{dir}: {e}"))
    }

    #[test]
    fn deployment_overlays_are_valid() {
        let compose = deployed("compose");
        compose.validate().expect("valid");
        assert!(
            !compose.pipeline.topics.create,
            "compose creates the topics in kafka-init"
        );
        let mut k8s = deployed("k8s/config");
        assert!(
            k8s.validate().is_err(),
            "the tokens come from the Secret, not the file"
        );
        for s in k8s.sources.values_mut() {
            s.token = Some("a-token-from-the-secret".into());
        }
        let compiled = k8s
            .validate()
            .expect("valid with the tokens from the Secret");
        assert!(compiled.sources.contains_key("acme"));
        assert!(
            compiled
                .sources
                .values()
                .all(|s| s.auth != crate::source::Auth::None),
            "nothing open in the production example"
        );
    }

    #[test]
    fn source_errors_name_the_key() {
        let mut base = defaults();
        base.sources.insert(
            "example".into(),
            SourceConfig {
                auth: Some(AuthKind::Token),
                token: Some("0123456789abcdef".into()),
                aliases: [("clickid".to_string(), "click_id".to_string())].into(),
                allow_ips: vec!["192.0.2.0/24".into(), "198.51.100.7".into()],
                rate_limit_per_second: Some(100),
                ..SourceConfig::new(AuthKind::Token)
            },
        );
        assert_eq!(
            base.validate().expect("valid").sources["example"]
                .allow
                .len(),
            2
        );
        let with = |f: &dyn Fn(&mut SourceConfig)| {
            let mut c = base.clone();
            if let Some(s) = c.sources.get_mut("example") {
                f(s);
            }
            c.validate().expect_err("invalid")
        };
        let e = with(&|s| s.token = Some("short".into()));
        assert!(
            e.contains("sources.example.token")
                && e.contains("S2S_INGEST__SOURCES__EXAMPLE__TOKEN"),
            "{e}"
        );
        let e = with(&|s| {
            s.aliases.insert("foo".into(), "bar".into());
        });
        assert!(e.contains("sources.example.aliases.foo"), "{e}");
        let e = with(&|s| s.allow_ips.push("300.1.1.1".into()));
        assert!(e.contains("allow_ips"), "{e}");
        let e = with(&|s| {
            s.auth = Some(AuthKind::Hmac);
            s.hmac_secret = None;
        });
        assert!(e.contains("sources.example.hmac_secret"), "{e}");
        let e = with(&|s| s.rate_limit_per_second = Some(0));
        assert!(e.contains("sources.example.rate_limit_per_second"), "{e}");
    }
}
