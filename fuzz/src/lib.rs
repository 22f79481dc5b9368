//! What the fuzz targets share: ingest's default configuration and the record builders
//! every parsed request goes on to, so that a target covers a parser and what reads its
//! output. Each target asserts the properties it can (no panic everywhere; a parse that
//! succeeds gives what the next stage accepts).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use s2s_common::pipeline::{offer_macros, PipelineConfig, ServiceConfig};
use s2s_common::template::Template;
use s2s_ingest::config::{IngestConfig, PostbackRules};
use s2s_ingest::params::Pairs;
use s2s_ingest::records::{build_click, build_operator_click, build_postback, RequestMeta};

/// A fixed "now" (2026-12-01T00:00:00Z), so that runs are repeatable.
pub const NOW_MS: i64 = 1_796_083_200_000;

/// Ingest's config: its defaults, `overlay` (a config file's text) over them, the
/// pipeline's defaults.
pub fn ingest_config(overlay: &str) -> Result<IngestConfig, String> {
    let c: IngestConfig = s2s_common::config::load_str(IngestConfig::DEFAULT_TOML, overlay)
        .map_err(|e| e.to_string())?;
    Ok(c.with_pipeline(PipelineConfig::defaults()))
}

pub fn rules() -> &'static PostbackRules {
    static RULES: OnceLock<PostbackRules> = OnceLock::new();
    RULES.get_or_init(|| {
        ingest_config("")
            .expect("the default config loads")
            .postback
    })
}

fn offers() -> &'static BTreeMap<String, Template> {
    static OFFERS: OnceLock<BTreeMap<String, Template>> = OnceLock::new();
    OFFERS.get_or_init(|| {
        let t = Template::parse(
            "https://op.example/land?cid={click_id}&a={aff_id}&s={sub1}",
            &offer_macros(),
        )
        .expect("a valid offer template");
        [("1".to_string(), t)].into()
    })
}

/// The parameters as a postback and as clicks: whatever they hold, an answer (a record
/// or an error), never a panic; a record built keeps the click ID it was given.
pub fn records(pairs: &Pairs) {
    if let Ok(p) = build_postback(
        pairs.clone(),
        rules(),
        Some("fuzz"),
        meta(),
        "pb".into(),
        NOW_MS,
    ) {
        assert!(!p.click_id.is_empty());
        assert!(pairs
            .iter()
            .any(|(n, v)| n == "click_id" && *v == p.click_id));
    }
    let _ = build_operator_click(pairs.clone(), offers(), NOW_MS);
    if let Ok((click, location)) = build_click(pairs.clone(), offers(), meta(), "c1".into(), NOW_MS)
    {
        assert_eq!(click.click_id, "c1");
        assert!(
            location.starts_with("https://op.example/land?cid=c1&"),
            "{location}"
        );
    }
}

fn meta() -> RequestMeta {
    RequestMeta {
        ip: Some("192.0.2.1".into()),
        user_agent: None,
        referrer: None,
    }
}
