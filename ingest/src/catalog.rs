//! What ingest takes from the catalog: each offer's redirect template, each affiliate's
//! status and each source (an operator's integration: auth, aliases, allow-list, rate
//! limit), compiled once per catalog change (see [`s2s_catalog::Live`]), so that a
//! request looks them up in ready maps. A source's token or HMAC secret is sealed in the
//! catalog ([`s2s_catalog::secrets`]) and opened here with the catalog's key.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use s2s_catalog::documents::{typed, Affiliate, AffiliateStatus, KindCheck};
use s2s_catalog::secrets::{self, SecretKey, Written};
use s2s_catalog::{view, Catalog, Key, Kind};
use s2s_common::pipeline::FieldError;
use serde_json::Value;

use crate::config::{compile_source, SourceConfig};
use crate::source::Source;
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
    /// The catalog's sources (the config file's come first: see `App::source`), each
    /// with the revision it was compiled from: an unchanged source is kept as it is (its
    /// rate limiter's state too) when something else in the catalog changes.
    sources: BTreeMap<String, (i64, Arc<Source>)>,
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
            sources: BTreeMap::new(),
            unknown_affiliates: UnknownAffiliates::Accept,
            revision: -1,
        }
    }

    /// The catalog's source `name`.
    pub fn source(&self, name: &str) -> Option<Arc<Source>> {
        self.sources.get(name).map(|(_, s)| Arc::clone(s))
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
    settings: &Settings,
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
    let sources = view::compile_each(
        catalog,
        Kind::Source,
        "ingest",
        |id| previous.and_then(|p| p.sources.get(id)).cloned(),
        |id, doc| {
            if settings.file_sources.contains(id) {
                return Err(format!(
                    "ingest's config file has a source named '{id}' too; that one is used"
                ));
            }
            let key = Key::new(Kind::Source, id).map_err(|e| e.to_string())?;
            let revision = catalog.get(&key).map_or(-1, |e| e.revision);
            let unchanged = previous
                .and_then(|p| p.sources.get(id))
                .filter(|(r, _)| *r == revision);
            if let Some(same) = unchanged {
                return Ok(same.clone());
            }
            let mut c = source_config(doc).map_err(|e| e.to_string())?;
            let open = |field| {
                secrets::open_field(&key, doc, field, settings.secret_key.as_ref())
                    .map_err(|e| e.to_string())
            };
            c.token = open("token")?;
            c.hmac_secret = open("hmac_secret")?;
            Ok((revision, Arc::new(compile_source(id, &c)?)))
        },
    )
    .into_iter()
    .collect();
    IngestCatalog {
        offers,
        paused_offers,
        affiliates,
        sources,
        unknown_affiliates: settings.unknown_affiliates,
        revision: view::revision(catalog),
    }
}

/// What compiling the catalog takes from ingest's config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub unknown_affiliates: UnknownAffiliates,
    /// Opens sources' secrets.
    pub secret_key: Option<SecretKey>,
    /// The config file's sources: a catalog source of the same name is ignored.
    pub file_sources: BTreeSet<String>,
}

/// A source document without its secrets, as a `[sources.<id>]` section.
fn source_config(doc: &Value) -> Result<SourceConfig, FieldError> {
    let mut fields = doc.as_object().cloned().unwrap_or_default();
    fields.remove("token");
    fields.remove("hmac_secret");
    serde_json::from_value(Value::Object(fields))
        .map_err(|e| FieldError::new("document", e.to_string()))
}

/// The catalog's rule for source documents: a `[sources.<id>]` section, its `token` or
/// `hmac_secret` write-only (a string, or `{"set": true}` to keep the one set).
pub fn source_check() -> KindCheck {
    Arc::new(|id: &str, doc: &Value| {
        let mut c = source_config(doc)?;
        // A kept secret stands in as a valid one: the console keeps the sealed value.
        let secret = |field: &str| -> Result<Option<String>, FieldError> {
            Ok(match secrets::written(doc, field)? {
                Written::Plain(s) => Some(s.to_string()),
                Written::Keep | Written::Kept => Some("x".repeat(32)),
                Written::Absent => None,
            })
        };
        c.token = secret("token")?;
        c.hmac_secret = secret("hmac_secret")?;
        compile_source(id, &c).map_err(|e| {
            // "sources.<id>.<field> …": the field, and the message without the secret.
            let prefix = format!("sources.{id}.");
            let rest = e.strip_prefix(&prefix).unwrap_or(&e);
            let field = rest
                .split([' ', ':'])
                .next()
                .filter(|f| !f.is_empty() && !rest.starts_with(':'))
                .unwrap_or("document");
            FieldError::new(field, e.clone())
        })?;
        let mut canonical =
            serde_json::to_value(&c).map_err(|e| FieldError::new("document", e.to_string()))?;
        if let Some(obj) = canonical.as_object_mut() {
            for field in ["token", "hmac_secret"] {
                if let Some(v) = doc.get(field).filter(|v| !v.is_null()) {
                    obj.insert(field.into(), v.clone());
                }
            }
        }
        Ok(canonical)
    })
}

/// How an operator calls a source: the exact postback URL with the operator's own
/// parameter names, and how it proves itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SourceCall {
    /// `{base}/postback/{id}?…`; each canonical field under the operator's name for it
    /// (its alias, else ours) with a `{field}` placeholder for their macro.
    pub postback_url: String,
    /// What else the request needs (the token, the signature headers), for people.
    pub auth: String,
}

/// The call for source `id` with document `doc`, on ingest's public URL `base` (`None`:
/// the path alone).
pub fn source_call(id: &str, doc: &Value, base: Option<&str>) -> SourceCall {
    // Read from the document as it is (its secrets sealed): only the names and the mode.
    let aliases = doc.get("aliases").and_then(Value::as_object);
    let name_of = |field: &str| {
        aliases
            .and_then(|a| a.iter().find(|(_, ours)| ours.as_str() == Some(field)))
            .map_or(field, |(theirs, _)| theirs.as_str())
            .to_string()
    };
    let mut query: Vec<String> = [
        "click_id", "event", "status", "txn_id", "amount", "currency",
    ]
    .iter()
    .map(|f| format!("{}={{{f}}}", encode(&name_of(f))))
    .collect();
    let auth = match doc.get("auth").and_then(Value::as_str) {
        Some("token") => {
            query.push("token={token}".into());
            "the source's token: as the token parameter above, or in Authorization: Bearer \
             <token>, or X-Postback-Token"
                .to_string()
        }
        Some("hmac") => "X-Timestamp: <unix seconds> and X-Signature: sha256=<hex HMAC-SHA256 of \
             \"<timestamp>.<query string as sent>\" (GET) or of the body (POST) with the \
             source's secret>"
            .to_string(),
        _ => "none: anyone who knows the URL can send postbacks".to_string(),
    };
    SourceCall {
        postback_url: format!(
            "{}/postback/{}?{}",
            base.unwrap_or("").trim_end_matches('/'),
            encode(id),
            query.join("&")
        ),
        auth,
    }
}

/// A query-string component, percent-encoded.
fn encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use s2s_catalog::{Key, Stored};
    use serde_json::json;

    use super::*;

    fn settings(unknown_affiliates: UnknownAffiliates) -> Settings {
        Settings {
            unknown_affiliates,
            secret_key: None,
            file_sources: BTreeSet::new(),
        }
    }

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
        let accept = settings(UnknownAffiliates::Accept);
        let first = compile(&c, None, &accept);
        assert_eq!(first.revision, 1);
        assert_eq!(first.offers.len(), 1);
        c.apply(
            key(),
            2,
            stored(json!({ "url": "https://b.example/?c={nope}" })),
        );
        let second = compile(&c, Some(&first), &accept);
        assert_eq!(second.revision, 2);
        assert_eq!(second.offers.get("1"), first.offers.get("1"), "kept");
        assert!(
            compile(&c, None, &accept).offers.is_empty(),
            "nothing to keep"
        );
        c.apply(key(), 3, None);
        assert!(
            compile(&c, Some(&second), &accept).offers.is_empty(),
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
        let accept = compile(&c, None, &settings(UnknownAffiliates::Accept));
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
        let refuse = compile(&c, None, &settings(UnknownAffiliates::Refuse));
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
            compile(&c, None, &settings(UnknownAffiliates::Accept)).refuses_click("1", "a"),
            Some(NotIssued::OfferPaused),
            "a paused offer's clicks, whoever the affiliate"
        );
    }

    #[test]
    fn a_source_is_checked_like_a_config_section_and_opens_its_sealed_token() {
        let check = source_check();
        let doc = json!({ "auth": "token", "token": "0123456789abcdef-token",
            "aliases": { "cid": "click_id" } });
        let canonical = check("acme", &doc).expect("valid");
        assert_eq!(
            canonical["token"], doc["token"],
            "sealed by the console next"
        );
        let field = |d: Value| check("acme", &d).expect_err("refused").field;
        assert_eq!(field(json!({ "auth": "token", "token": "short" })), "token");
        assert_eq!(field(json!({ "token": "0123456789abcdef-token" })), "auth");
        assert_eq!(
            field(json!({ "auth": "none", "values": { "txn_id": { "a": "b" } } })),
            "values.txn_id"
        );
        assert!(
            !check("acme", &json!({ "auth": "token", "token": "short-secret" }))
                .expect_err("refused")
                .to_string()
                .contains("short-secret"),
            "the error never holds the secret"
        );
        assert!(check(
            "acme",
            &json!({ "auth": "token", "token": { "set": true } })
        )
        .is_ok());

        let key =
            SecretKey::from_base64("dGVzdHMtY2F0YWxvZy1rZXktMzItYnl0ZXMtbG9uZyE=").expect("key");
        let source_key = Key::new(Kind::Source, "acme").expect("key");
        let mut sealed = canonical.clone();
        secrets::seal_fields(&source_key, &mut sealed, None, Some(&key)).expect("sealed");
        let mut c = Catalog::default();
        c.apply(source_key, 0, stored(sealed));
        let with_key = Settings {
            secret_key: Some(key),
            ..settings(UnknownAffiliates::Accept)
        };
        let compiled = compile(&c, None, &with_key);
        let acme = compiled.source("acme").expect("compiled");
        assert_eq!(
            acme.auth,
            crate::source::Auth::Token(crate::source::Secret::new("0123456789abcdef-token"))
        );
        let again = compile(&c, Some(&compiled), &with_key);
        assert!(
            Arc::ptr_eq(&acme, &again.source("acme").expect("kept")),
            "unchanged: the same source, rate limiter and all"
        );
        assert!(
            compile(&c, None, &settings(UnknownAffiliates::Accept))
                .sources
                .is_empty(),
            "without the key the token cannot be opened"
        );
    }

    #[test]
    fn a_sources_call_uses_its_own_parameter_names() {
        let doc = json!({ "auth": "token", "token": { "sealed": "x" },
            "aliases": { "cid": "click_id", "goal": "event" } });
        let call = source_call("acme", &doc, Some("https://track.example/"));
        assert_eq!(
            call.postback_url,
            "https://track.example/postback/acme?cid={click_id}&goal={event}&status={status}\
             &txn_id={txn_id}&amount={amount}&currency={currency}&token={token}"
        );
        assert!(call.auth.contains("Bearer"), "{}", call.auth);
        let open = source_call("plain", &json!({ "auth": "none" }), None);
        assert!(open
            .postback_url
            .starts_with("/postback/plain?click_id={click_id}&event="));
        assert!(open.auth.starts_with("none"));
        let hmac = source_call("s", &json!({ "auth": "hmac" }), None);
        assert!(
            !hmac.postback_url.contains("token"),
            "{}",
            hmac.postback_url
        );
        assert!(hmac.auth.contains("X-Signature"));
    }
}
