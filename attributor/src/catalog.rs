//! What the attributor takes from the catalog: each offer's rules (windows, payouts,
//! policies) and which affiliates are blocked, compiled with the config's own rules into one [`Rules`] per catalog
//! change (see [`s2s_catalog::Live`]). The processor takes the current rules before each
//! partition's batch of a cycle and decides the whole batch with them; a conversion
//! records the revision it was priced with (`catalog_revision`).

use s2s_catalog::documents::{typed, Affiliate, AffiliateStatus};
use s2s_catalog::{view, Catalog, Kind};
use s2s_common::pipeline::OfferConfig;

use crate::config::AttributorConfig;
use crate::join::Rules;

/// `base` (the config's rules, without offers) with the offers and blocked affiliates of
/// `catalog`. An offer the attributor cannot take keeps its version from `previous`, or
/// is left out (its conversions are then priced as of an unknown offer), with an error in
/// the log ([`view::compile_each`]).
pub fn compile(
    config: &AttributorConfig,
    base: &Rules,
    catalog: &Catalog,
    previous: Option<&Rules>,
) -> Rules {
    let mut rules = base.clone();
    rules.offers = view::compile_each(
        catalog,
        Kind::Offer,
        "attributor",
        |id| previous.and_then(|p| p.offers.get(id)).cloned(),
        |id, doc| {
            let o = typed::<OfferConfig>(doc).map_err(|e| format!("offers.{id}: {e}"))?;
            config.offer_rules(id, &o, &base.lifecycle)
        },
    )
    .into_iter()
    .collect();
    let affiliates = view::compile_each(
        catalog,
        Kind::Affiliate,
        "attributor",
        |id| previous.map(|p| p.blocked_affiliates.contains(id)),
        |_, doc| {
            typed::<Affiliate>(doc)
                .map(|a| a.status == AffiliateStatus::Blocked)
                .map_err(|e| e.to_string())
        },
    );
    rules.blocked_affiliates = affiliates
        .into_iter()
        .filter_map(|(id, blocked)| blocked.then_some(id))
        .collect();
    let revision = view::revision(catalog);
    rules.catalog_revision = (revision >= 0).then_some(revision);
    rules
}

#[cfg(test)]
mod tests {
    use s2s_catalog::{Key, Stored};
    use s2s_common::pipeline::ServiceConfig;
    use serde_json::json;

    use super::*;

    fn stored(document: serde_json::Value) -> Option<Stored> {
        Some(Stored::new(document, "t", 0))
    }

    #[test]
    fn offers_come_from_the_catalog_with_the_configs_rules() {
        let mut config = AttributorConfig::defaults().expect("defaults");
        config.transactional_id = Some("t-0".into());
        let base = config.validate().expect("valid");
        let key = || Key::new(Kind::Offer, "7").expect("key");
        let mut c = Catalog::default();
        assert_eq!(compile(&config, &base, &c, None).catalog_revision, None);
        c.apply(
            key(),
            4,
            stored(
                json!({ "url": "https://o.example/", "payouts": { "ftd": "12.50" },
                "currency": "EUR", "window": "7d" }),
            ),
        );
        let first = compile(&config, &base, &c, None);
        assert_eq!(first.catalog_revision, Some(4));
        let price = first.price("7", "ftd");
        assert_eq!(
            (price.amount.to_string(), price.currency.as_str()),
            ("12.50".into(), "EUR")
        );
        assert_eq!(first.window_ms("7", "ftd"), 7 * 86_400_000);

        // A hold longer than conversions are kept: the catalog cannot know the
        // attributor's conversion_retention, the attributor keeps the last good version.
        c.apply(
            key(),
            5,
            stored(json!({ "url": "https://o.example/", "hold": "400d" })),
        );
        let second = compile(&config, &base, &c, Some(&first));
        assert_eq!(second.catalog_revision, Some(5));
        assert_eq!(second.offers.get("7"), first.offers.get("7"));
        assert!(compile(&config, &base, &c, None).offers.is_empty());

        let affiliate = |id: &str| Key::new(Kind::Affiliate, id).expect("key");
        c.apply(
            affiliate("a"),
            6,
            stored(json!({ "name": "A", "status": "blocked" })),
        );
        c.apply(
            affiliate("b"),
            7,
            stored(json!({ "name": "B", "status": "paused" })),
        );
        let third = compile(&config, &base, &c, Some(&second));
        assert_eq!(third.blocked_affiliates, ["a".to_string()].into());
    }
}
