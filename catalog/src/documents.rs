//! What each kind's document must be. A change is checked before it is accepted, with the
//! rules the services apply to the same settings in their config files, so that the
//! catalog never holds a document a service would refuse.
//!
//! Offers and affiliates are typed here. Postbacks, sources and operators are refused
//! until their types move here with write-only, encrypted secrets (issue 22's next parts).

use s2s_common::pipeline::{FieldError, OfferConfig, PostbackVocabulary};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::record::Kind;

/// An affiliate: who owns clicks and earns payouts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Affiliate {
    pub name: String,
    #[serde(default)]
    pub status: AffiliateStatus,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AffiliateStatus {
    #[default]
    Active,
    Paused,
    Blocked,
}

/// Checks `document` as a `kind`'s; the error names the field.
pub fn check(
    kind: Kind,
    document: &Value,
    vocabulary: &PostbackVocabulary,
) -> Result<(), FieldError> {
    if !document.is_object() {
        return Err(FieldError::new("document", "must be a JSON object"));
    }
    match kind {
        Kind::Offer => typed::<OfferConfig>(document)?.check(vocabulary),
        Kind::Affiliate => {
            let a: Affiliate = typed(document)?;
            if a.name.trim().is_empty() {
                return Err(FieldError::new("name", "must not be empty"));
            }
            Ok(())
        }
        // Their documents hold secrets (tokens, signing secrets), which must be write-only
        // and encrypted in the catalog: until their types and that are built, they stay in
        // the services' config files, and the catalog refuses them rather than keep
        // secrets it would show back.
        Kind::Postback | Kind::Source | Kind::Operator => Err(FieldError::new(
            "kind",
            format!(
                "{kind}s are not managed in the catalog yet: they stay in the services' \
                 config files for now"
            ),
        )),
    }
}

fn typed<T: serde::de::DeserializeOwned>(document: &Value) -> Result<T, FieldError> {
    // serde's message names the field: "unknown field `x`", "missing field `url`", …
    T::deserialize(document).map_err(|e| FieldError::new("document", e.to_string()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn vocabulary() -> PostbackVocabulary {
        s2s_common::pipeline::PipelineConfig::defaults().postbacks
    }

    #[test]
    fn an_offer_is_checked_like_the_pipeline_checks_one() {
        let ok = json!({ "url": "https://o.example/?c={click_id}&a={aff_id}",
            "payouts": { "ftd": "50.00" }, "window": "30d" });
        assert_eq!(check(Kind::Offer, &ok, &vocabulary()), Ok(()));
        let e = check(
            Kind::Offer,
            &json!({ "url": "https://o.example/?c={clickid}" }),
            &vocabulary(),
        )
        .expect_err("unknown macro");
        assert_eq!(e.field, "url");
        assert!(e.message.contains("{clickid}"), "{e}");
        let e = check(
            Kind::Offer,
            &json!({ "url": "https://o.example/", "payouts": { "signup": "1" } }),
            &vocabulary(),
        )
        .expect_err("unknown event");
        assert_eq!(e.field, "payouts.signup");
        let e = check(
            Kind::Offer,
            &json!({ "url": "https://o.example/", "colour": "red" }),
            &vocabulary(),
        )
        .expect_err("unknown field");
        assert!(e.message.contains("colour"), "{e}");
        let e =
            check(Kind::Offer, &json!({ "window": "1d" }), &vocabulary()).expect_err("missing url");
        assert!(e.message.contains("url"), "{e}");
    }

    #[test]
    fn an_affiliate_has_a_name_and_a_known_status() {
        let v = vocabulary();
        assert_eq!(
            check(Kind::Affiliate, &json!({ "name": "Acme" }), &v),
            Ok(())
        );
        assert_eq!(
            check(
                Kind::Affiliate,
                &json!({ "name": "Acme", "status": "blocked" }),
                &v
            ),
            Ok(())
        );
        assert!(check(
            Kind::Affiliate,
            &json!({ "name": "Acme", "status": "gone" }),
            &v
        )
        .is_err());
        assert_eq!(
            check(Kind::Affiliate, &json!({ "name": " " }), &v).map_err(|e| e.field),
            Err("name".to_string())
        );
        assert!(check(Kind::Postback, &json!([1]), &v).is_err(), "an object");
        let e = check(
            Kind::Source,
            &json!({ "auth": "token", "token": "s3cret" }),
            &v,
        )
        .expect_err("not in the catalog yet");
        assert_eq!(e.field, "kind");
    }
}
