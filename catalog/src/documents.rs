//! What each kind's document must be. A change is checked before it is accepted, with the
//! rules the services apply to the same settings in their config files, so that the
//! catalog never holds a document a service would refuse.
//!
//! Offers, affiliates and operators are typed here (operators' tokens write-only,
//! [`crate::secrets`]); postbacks and sources are checked with delivery's and ingest's
//! rules, which whoever checks them supplies ([`Checks::with`]: the console, which links
//! both).

use std::sync::Arc;

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

impl Affiliate {
    pub fn check(&self) -> Result<(), FieldError> {
        if self.name.trim().is_empty() {
            return Err(FieldError::new("name", "must not be empty"));
        }
        Ok(())
    }
}

/// A console user: who, with which role, and a token (write-only, kept as its digest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operator {
    pub name: String,
    pub role: Role,
}

/// What an operator may do; each role may do what the ones after it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads.
    Viewer,
    /// Reads and re-fires deliveries.
    Operator,
    /// Everything, and changes the catalog.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// The shortest operator token taken.
pub const MIN_TOKEN_LEN: usize = 16;

/// Checks a document of one kind by ID, returning its canonical form.
pub type KindCheck = Arc<dyn Fn(&str, &Value) -> Result<Value, FieldError> + Send + Sync>;

/// What documents are checked against.
#[derive(Clone)]
pub struct Checks {
    /// The pipeline's events and statuses, and its longest window.
    pub vocabulary: PostbackVocabulary,
    /// The rules of kinds that live with a service: postbacks (delivery's), sources
    /// (ingest's).
    services: Vec<(Kind, KindCheck)>,
}

impl std::fmt::Debug for Checks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kinds: Vec<Kind> = self.services.iter().map(|(k, _)| *k).collect();
        f.debug_struct("Checks")
            .field("vocabulary", &self.vocabulary)
            .field("services", &kinds)
            .finish()
    }
}

impl Checks {
    /// Offers, affiliates and operators; postbacks and sources refused until their
    /// services' rules are given ([`Checks::with`]).
    pub fn new(vocabulary: PostbackVocabulary) -> Self {
        Checks {
            vocabulary,
            services: Vec::new(),
        }
    }

    /// Checks `kind`'s documents with `check` (a service's rules).
    pub fn with(mut self, kind: Kind, check: KindCheck) -> Self {
        self.services.push((kind, check));
        self
    }

    fn service(&self, kind: Kind) -> Option<&KindCheck> {
        self.services
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, c)| c)
    }
}

/// Checks `document` as the document of `kind` `id` and returns it in its one canonical
/// form (defaults filled in, durations and amounts written one way): the form the catalog
/// keeps, so that two documents that mean the same are equal. The error names the field.
pub fn check(kind: Kind, id: &str, document: &Value, checks: &Checks) -> Result<Value, FieldError> {
    if !document.is_object() {
        return Err(FieldError::new("document", "must be a JSON object"));
    }
    match kind {
        Kind::Offer => {
            let o: OfferConfig = typed(document)?;
            o.check(&checks.vocabulary)?;
            canonical(&o)
        }
        Kind::Postback | Kind::Source => match checks.service(kind) {
            Some(check) => check(id, document),
            None => Err(FieldError::new(
                "kind",
                format!("{kind}s are checked with their service's rules, which this tool lacks"),
            )),
        },
        Kind::Affiliate => {
            let a: Affiliate = typed(document)?;
            a.check()?;
            canonical(&a)
        }
        Kind::Operator => {
            let mut fields = document.as_object().cloned().unwrap_or_default();
            let token = fields.remove("token");
            let o: Operator = typed(&Value::Object(fields))?;
            if o.name.trim().is_empty() {
                return Err(FieldError::new("name", "must not be empty"));
            }
            match crate::secrets::written(document, "token")? {
                crate::secrets::Written::Plain(t) if t.chars().count() < MIN_TOKEN_LEN => {
                    return Err(FieldError::new(
                        "token",
                        format!("must have at least {MIN_TOKEN_LEN} characters"),
                    ))
                }
                crate::secrets::Written::Absent => {
                    return Err(FieldError::new(
                        "token",
                        "an operator needs a token (or {\"set\": true} to keep the one set)",
                    ))
                }
                _ => {}
            }
            let mut canonical = canonical(&o)?;
            if let (Some(t), Some(obj)) = (token, canonical.as_object_mut()) {
                obj.insert("token".into(), t);
            }
            Ok(canonical)
        }
    }
}

/// The document as its type: serde's message names the field ("unknown field `x`",
/// "missing field `url`", …).
pub fn typed<T: serde::de::DeserializeOwned>(document: &Value) -> Result<T, FieldError> {
    T::deserialize(document).map_err(|e| FieldError::new("document", e.to_string()))
}

fn canonical<T: Serialize>(document: &T) -> Result<Value, FieldError> {
    serde_json::to_value(document).map_err(|e| FieldError::new("document", e.to_string()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn vocabulary() -> Checks {
        Checks::new(s2s_common::pipeline::PipelineConfig::defaults().postbacks)
    }

    #[test]
    fn an_offer_is_checked_like_the_pipeline_checks_one() {
        let ok = json!({ "url": "https://o.example/?c={click_id}&a={aff_id}",
            "payouts": { "ftd": "50.00" }, "window": "30d" });
        let canonical = check(Kind::Offer, "1", &ok, &vocabulary()).expect("valid");
        let same = json!({ "url": "https://o.example/?c={click_id}&a={aff_id}",
            "payouts": { "ftd": "50.00" }, "window": "720h" });
        assert_eq!(
            check(Kind::Offer, "1", &same, &vocabulary()),
            Ok(canonical.clone()),
            "one meaning, one form"
        );
        let e = check(
            Kind::Offer,
            "1",
            &json!({ "url": "https://o.example/?c={clickid}" }),
            &vocabulary(),
        )
        .expect_err("unknown macro");
        assert_eq!(e.field, "url");
        assert!(e.message.contains("{clickid}"), "{e}");
        let e = check(
            Kind::Offer,
            "1",
            &json!({ "url": "https://o.example/", "payouts": { "signup": "1" } }),
            &vocabulary(),
        )
        .expect_err("unknown event");
        assert_eq!(e.field, "payouts.signup");
        let e = check(
            Kind::Offer,
            "1",
            &json!({ "url": "https://o.example/", "colour": "red" }),
            &vocabulary(),
        )
        .expect_err("unknown field");
        assert!(e.message.contains("colour"), "{e}");
        let e = check(Kind::Offer, "1", &json!({ "window": "1d" }), &vocabulary())
            .expect_err("missing url");
        assert!(e.message.contains("url"), "{e}");
    }

    #[test]
    fn an_affiliate_has_a_name_and_a_known_status() {
        let v = vocabulary();
        assert_eq!(
            check(Kind::Affiliate, "a", &json!({ "name": "Acme" }), &v),
            Ok(json!({ "name": "Acme", "status": "active" }))
        );
        assert!(check(
            Kind::Affiliate,
            "a",
            &json!({ "name": "Acme", "status": "blocked" }),
            &v
        )
        .is_ok());
        assert!(check(
            Kind::Affiliate,
            "a",
            &json!({ "name": "Acme", "status": "gone" }),
            &v
        )
        .is_err());
        assert_eq!(
            check(Kind::Affiliate, "a", &json!({ "name": " " }), &v).map_err(|e| e.field),
            Err("name".to_string())
        );
        assert!(
            check(Kind::Postback, "p", &json!([1]), &v).is_err(),
            "an object"
        );
        let e = check(
            Kind::Source,
            "s",
            &json!({ "auth": "token", "token": "s3cret" }),
            &v,
        )
        .expect_err("without ingest's rules");
        assert_eq!(e.field, "kind");
    }

    #[test]
    fn an_operator_has_a_name_a_role_and_a_token() {
        let v = vocabulary();
        let ok = json!({ "name": "Val", "role": "viewer", "token": "0123456789abcdef" });
        let canonical = check(Kind::Operator, "val", &ok, &v).expect("valid");
        assert_eq!(canonical, ok, "the token stays for the console to hash");
        let field = |doc: Value| {
            check(Kind::Operator, "val", &doc, &v)
                .expect_err("refused")
                .field
        };
        assert_eq!(
            field(json!({ "name": "Val", "role": "viewer", "token": "short" })),
            "token"
        );
        assert_eq!(field(json!({ "name": "Val", "role": "viewer" })), "token");
        assert_eq!(
            field(json!({ "name": "Val", "role": "root", "token": "0123456789abcdef" })),
            "document"
        );
        assert_eq!(
            field(json!({ "name": " ", "role": "admin", "token": "0123456789abcdef" })),
            "name"
        );
        assert!(check(
            Kind::Operator,
            "val",
            &json!({ "name": "Val", "role": "admin", "token": { "set": true } }),
            &v
        )
        .is_ok());
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
    }
}
