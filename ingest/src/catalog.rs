//! What ingest takes from the catalog: each offer's redirect template and each
//! affiliate's status, compiled once per catalog change (see [`s2s_catalog::Live`]), so
//! that a click looks them up in ready maps.

use std::collections::{BTreeMap, HashMap, HashSet};

use s2s_catalog::documents::{typed, Affiliate, AffiliateStatus};
use s2s_catalog::{view, Catalog, Kind};
use s2s_common::pipeline::{offer_macros, OfferConfig, OfferStatus, UnknownAffiliates};
use s2s_common::template::Template;

/// Ingest's view of the catalog.
#[derive(Debug, Clone)]
pub struct IngestCatalog {
    /// Redirect templates by offer ID.
    pub offers: BTreeMap<String, Template>,
    /// Offers paused in the catalog.
    pub paused_offers: HashSet<String>,
    /// The status of every affiliate the catalog holds.
    pub affiliates: HashMap<String, AffiliateStatus>,
    /// What a click for an affiliate the catalog does not hold gets.
    pub unknown_affiliates: UnknownAffiliates,
    /// The catalog revision this view is of.
    pub revision: i64,
}

/// Why a click gets no click ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotIssued {
    OfferPaused,
    AffiliateBlocked,
    AffiliatePaused,
    UnknownAffiliate,
}

impl NotIssued {
    pub const ALL: [NotIssued; 4] = [
        NotIssued::OfferPaused,
        NotIssued::AffiliateBlocked,
        NotIssued::AffiliatePaused,
        NotIssued::UnknownAffiliate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NotIssued::OfferPaused => "offer_paused",
            NotIssued::AffiliateBlocked => "affiliate_blocked",
            NotIssued::AffiliatePaused => "affiliate_paused",
            NotIssued::UnknownAffiliate => "unknown_affiliate",
        }
    }
}

impl IngestCatalog {
    /// A view of `offers` alone, any affiliate accepted (tests and benchmarks).
    pub fn of_offers(offers: BTreeMap<String, Template>) -> Self {
        IngestCatalog {
            offers,
            paused_offers: HashSet::new(),
            affiliates: HashMap::new(),
            unknown_affiliates: UnknownAffiliates::Accept,
            revision: -1,
        }
    }

    /// Whether a click of `offer_id` for `aff_id` gets a click ID; why not, if it does
    /// not.
    pub fn refuses_click(&self, offer_id: &str, aff_id: &str) -> Option<NotIssued> {
        if self.paused_offers.contains(offer_id) {
            return Some(NotIssued::OfferPaused);
        }
        match self.affiliates.get(aff_id) {
            Some(AffiliateStatus::Active) => None,
            Some(AffiliateStatus::Paused) => Some(NotIssued::AffiliatePaused),
            Some(AffiliateStatus::Blocked) => Some(NotIssued::AffiliateBlocked),
            None => match self.unknown_affiliates {
                UnknownAffiliates::Accept => None,
                UnknownAffiliates::Refuse => Some(NotIssued::UnknownAffiliate),
            },
        }
    }
}

/// Compiles `catalog`. An offer whose URL template does not compile, or an affiliate
/// whose document is not one, keeps its version from `previous`, or is left out, with an
/// error in the log ([`view::compile_each`]).
pub fn compile(
    catalog: &Catalog,
    previous: Option<&IngestCatalog>,
    unknown_affiliates: UnknownAffiliates,
) -> IngestCatalog {
    let macros = offer_macros();
    let offers = view::compile_each(
        catalog,
        Kind::Offer,
        "ingest",
        |id| {
            let p = previous?;
            let status = match p.paused_offers.contains(id) {
                true => OfferStatus::Paused,
                false => OfferStatus::Active,
            };
            Some((p.offers.get(id)?.clone(), status))
        },
        |_, doc| {
            let o = typed::<OfferConfig>(doc).map_err(|e| e.to_string())?;
            let t = Template::parse(&o.url, &macros).map_err(|e| e.to_string())?;
            Ok((t, o.status))
        },
    );
    let paused_offers = offers
        .iter()
        .filter(|(_, (_, status))| *status == OfferStatus::Paused)
        .map(|(id, _)| id.clone())
        .collect();
    let offers = offers.into_iter().map(|(id, (t, _))| (id, t)).collect();
    let affiliates = view::compile_each(
        catalog,
        Kind::Affiliate,
        "ingest",
        |id| previous.and_then(|p| p.affiliates.get(id)).copied(),
        |_, doc| {
            typed::<Affiliate>(doc)
                .map(|a| a.status)
                .map_err(|e| e.to_string())
        },
    )
    .into_iter()
    .collect();
    IngestCatalog {
        offers,
        paused_offers,
        affiliates,
        unknown_affiliates,
        revision: view::revision(catalog),
    }
}

#[cfg(test)]
mod tests {
    use s2s_catalog::{Key, Stored};
    use serde_json::json;

    use super::*;

    fn stored(document: serde_json::Value) -> Option<Stored> {
        Some(Stored::new(document, "t", 0))
    }

    #[test]
    fn offers_compile_and_an_unusable_one_keeps_its_last_version() {
        let key = || Key::new(Kind::Offer, "1").expect("key");
        let mut c = Catalog::default();
        c.apply(
            key(),
            0,
            stored(json!({ "url": "https://a.example/?c={click_id}" })),
        );
        c.apply(
            Key::new(Kind::Affiliate, "x").expect("key"),
            1,
            stored(json!({ "name": "X" })),
        );
        let accept = UnknownAffiliates::Accept;
        let first = compile(&c, None, accept);
        assert_eq!(first.revision, 1);
        assert_eq!(first.offers.len(), 1);
        c.apply(
            key(),
            2,
            stored(json!({ "url": "https://b.example/?c={nope}" })),
        );
        let second = compile(&c, Some(&first), accept);
        assert_eq!(second.revision, 2);
        assert_eq!(second.offers.get("1"), first.offers.get("1"), "kept");
        assert!(
            compile(&c, None, accept).offers.is_empty(),
            "nothing to keep"
        );
        c.apply(key(), 3, None);
        assert!(
            compile(&c, Some(&second), accept).offers.is_empty(),
            "deleted"
        );
    }

    #[test]
    fn paused_blocked_and_unknown_affiliates_get_no_click_id() {
        let mut c = Catalog::default();
        for (offset, (id, status)) in [("a", "active"), ("p", "paused"), ("b", "blocked")]
            .into_iter()
            .enumerate()
        {
            c.apply(
                Key::new(Kind::Affiliate, id).expect("key"),
                offset as i64,
                stored(json!({ "name": id, "status": status })),
            );
        }
        let accept = compile(&c, None, UnknownAffiliates::Accept);
        assert_eq!(accept.refuses_click("1", "a"), None);
        assert_eq!(
            accept.refuses_click("1", "p"),
            Some(NotIssued::AffiliatePaused)
        );
        assert_eq!(
            accept.refuses_click("1", "b"),
            Some(NotIssued::AffiliateBlocked)
        );
        assert_eq!(accept.refuses_click("1", "zz"), None);
        let refuse = compile(&c, None, UnknownAffiliates::Refuse);
        assert_eq!(
            refuse.refuses_click("1", "zz"),
            Some(NotIssued::UnknownAffiliate)
        );
        assert_eq!(refuse.refuses_click("1", "a"), None);

        c.apply(
            Key::new(Kind::Offer, "1").expect("key"),
            3,
            stored(json!({ "url": "https://o.example/", "status": "paused" })),
        );
        assert_eq!(
            compile(&c, None, UnknownAffiliates::Accept).refuses_click("1", "a"),
            Some(NotIssued::OfferPaused),
            "a paused offer's clicks, whoever the affiliate"
        );
    }
}
