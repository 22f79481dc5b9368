//! Postbacks from the catalog (`postback/<id>`): the document is a `[[postbacks]]` entry
//! without its `name` (the ID is the name) and `secret_env`, plus `enabled`. Its signing
//! `secret` is write-only through the API and sealed in the catalog
//! ([`s2s_catalog::secrets`]): this service opens it with the catalog's key.
//!
//! [`check`] is the catalog's rule for these documents (the console applies it before a
//! change is accepted); [`compile`] turns the catalog's postbacks into endpoints each
//! time the catalog changes. A postback changed in the catalog keeps its name, so its
//! pending deliveries go to its new URL at their next attempt; a disabled one gets no
//! new deliveries and holds its pending ones until it is enabled again; a deleted one's
//! pending deliveries are dead-lettered (`postback_removed`).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use s2s_catalog::documents::KindCheck;
use s2s_catalog::secrets::{self, SecretKey, Written};
use s2s_catalog::{view, Catalog, Key, Kind};
use s2s_common::config::ConfigError;
use s2s_common::pipeline::{FieldError, ServiceConfig};
use serde_json::Value;

use crate::config::{DeliveryConfig, PostbackConfig};
use crate::endpoint::Endpoint;
use crate::signing::Secret;

/// The catalog's postbacks as delivery's endpoints.
#[derive(Debug, Clone, Default)]
pub struct DeliveryCatalog {
    pub endpoints: Vec<Arc<Endpoint>>,
    /// The catalog revision each endpoint was compiled from (aligned with `endpoints`).
    pub revisions: Vec<i64>,
    pub revision: i64,
}

/// The postback document `document` of ID `id` as a `[[postbacks]]` entry, and whether
/// it is enabled.
pub fn document(id: &str, document: &Value) -> Result<(PostbackConfig, bool), FieldError> {
    let Some(fields) = document.as_object() else {
        return Err(FieldError::new("document", "must be a JSON object"));
    };
    let mut fields = fields.clone();
    for (field, why) in [
        ("name", "a catalog postback's name is its ID"),
        (
            "secret_env",
            "a catalog postback's signing secret is its `secret` (write-only, kept sealed)",
        ),
    ] {
        if fields.contains_key(field) {
            return Err(FieldError::new(field, why));
        }
    }
    // The secret is checked on its own (a new value, or one kept sealed).
    fields.remove("secret");
    let enabled = match fields.remove("enabled") {
        None => true,
        Some(Value::Bool(b)) => b,
        Some(_) => return Err(FieldError::new("enabled", "must be true or false")),
    };
    fields.insert("name".into(), Value::String(id.to_string()));
    let config: PostbackConfig = serde_json::from_value(Value::Object(fields))
        .map_err(|e| FieldError::new("document", e.to_string()))?;
    Ok((config, enabled))
}

/// Checks a postback document with the rules `[[postbacks]]` entries follow (URL, method,
/// body, headers, filters), against `config`'s defaults; returns its canonical form.
pub fn check_with(config: &DeliveryConfig, id: &str, doc: &Value) -> Result<Value, FieldError> {
    let (p, enabled) = document(id, doc)?;
    config.compile_postback(&p).map_err(field_error)?;
    let secret = doc.get("secret").filter(|v| !v.is_null()).cloned();
    if let Written::Plain(plain) = secrets::written(doc, "secret")? {
        // The error says what is wrong with it, never what it is.
        Secret::parse(plain).map_err(|e| FieldError::new("secret", e.to_string()))?;
    }
    let mut canonical =
        serde_json::to_value(&p).map_err(|e| FieldError::new("document", e.to_string()))?;
    if let Some(fields) = canonical.as_object_mut() {
        fields.remove("name");
        fields.retain(|_, v| !v.is_null());
        fields.insert("enabled".into(), Value::Bool(enabled));
        if let Some(secret) = secret {
            fields.insert("secret".into(), secret);
        }
    }
    Ok(canonical)
}

/// [`check_with`] delivery's defaults: the catalog's rule for postback documents.
pub fn check(id: &str, doc: &Value) -> Result<Value, FieldError> {
    let config =
        DeliveryConfig::defaults().map_err(|e| FieldError::new("document", e.to_string()))?;
    check_with(&config, id, doc)
}

/// The catalog's rule for postback documents, for [`s2s_catalog::documents::Checks`].
pub fn postback_check() -> Result<KindCheck, ConfigError> {
    let config = DeliveryConfig::defaults()?;
    Ok(Arc::new(move |id: &str, doc: &Value| {
        check_with(&config, id, doc)
    }))
}

/// `url: must start with …` → field `url`; an error without a field prefix → `document`.
fn field_error(e: String) -> FieldError {
    match e.split_once(": ") {
        Some((field, message)) if !field.contains(' ') => FieldError::new(field, message),
        _ => FieldError::new("document", e),
    }
}

/// The catalog's postbacks as endpoints. A postback named like one of the config file's
/// (`taken`) is left out, with an error (the file's is the one delivered to); one that
/// does not compile keeps its version from `previous`, or is left out.
pub fn compile(
    config: &DeliveryConfig,
    secret_key: Option<&SecretKey>,
    taken: &BTreeSet<String>,
    catalog: &Catalog,
    previous: Option<&DeliveryCatalog>,
) -> DeliveryCatalog {
    // An unchanged postback keeps its compiled endpoint: a change costs what it changed.
    let before: HashMap<&str, (i64, &Arc<Endpoint>)> = previous
        .map(|p| {
            p.endpoints
                .iter()
                .zip(&p.revisions)
                .map(|(e, r)| (e.name.as_str(), (*r, e)))
                .collect()
        })
        .unwrap_or_default();
    let (mut endpoints, mut revisions) = (Vec::new(), Vec::new());
    for (_, revision, endpoint) in view::compile_changed(
        catalog,
        Kind::Postback,
        "delivery",
        |id, revision| {
            before
                .get(id)
                .filter(|(r, _)| *r == revision)
                .map(|(_, e)| Arc::clone(e))
        },
        |id| before.get(id).map(|(r, e)| (*r, Arc::clone(e))),
        |id, doc| {
            if taken.contains(id) {
                return Err(format!(
                    "delivery's config file has a postback named '{id}' too; that one is used"
                ));
            }
            endpoint(config, secret_key, id, doc).map(Arc::new)
        },
    ) {
        endpoints.push(endpoint);
        revisions.push(revision);
    }
    DeliveryCatalog {
        endpoints,
        revisions,
        revision: view::revision(catalog),
    }
}

/// One catalog postback as the endpoint delivery sends to: its document compiled against
/// `config`'s defaults, its signing secret opened with `secret_key`.
pub fn endpoint(
    config: &DeliveryConfig,
    secret_key: Option<&SecretKey>,
    id: &str,
    doc: &Value,
) -> Result<Endpoint, String> {
    let (p, enabled) = document(id, doc).map_err(|e| e.to_string())?;
    let mut endpoint = config.compile_postback(&p)?;
    endpoint.enabled = enabled;
    let key = Key::new(Kind::Postback, id).map_err(|e| e.to_string())?;
    if let Some(plain) =
        secrets::open_field(&key, doc, "secret", secret_key).map_err(|e| e.to_string())?
    {
        endpoint.secret = Some(Secret::parse(&plain).map_err(|e| format!("secret: {e}"))?);
    }
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use s2s_catalog::{Key, Stored};
    use serde_json::json;

    use super::*;

    #[test]
    fn a_postback_document_is_checked_like_a_postbacks_entry() {
        let ok = json!({ "url": "https://aff.example/pb?c={click_id}&p={payout}",
            "aff_id": "42", "events": ["ftd"] });
        let canonical = check("aff-42", &ok).expect("valid");
        assert_eq!(canonical["enabled"], true);
        assert!(canonical.get("name").is_none(), "the ID is the name");
        assert_eq!(check("aff-42", &canonical), Ok(canonical.clone()), "stable");
        let field = |doc: Value| check("p", &doc).expect_err("refused").field;
        assert_eq!(field(json!({ "url": "ftp://x/" })), "url");
        assert_eq!(field(json!({ "url": "https://x/?c={clickid}" })), "url");
        assert_eq!(
            field(json!({ "url": "https://x/", "secret": "not-whsec" })),
            "secret"
        );
        assert_eq!(
            field(json!({ "url": "https://x/", "secret_env": "X" })),
            "secret_env"
        );
        let kept = check(
            "p",
            &json!({ "url": "https://x/", "secret": { "set": true } }),
        )
        .expect("a kept secret is checked by the console");
        assert_eq!(kept["secret"], json!({ "set": true }));
        assert_eq!(
            field(json!({ "url": "https://x/", "name": "other" })),
            "name"
        );
        assert_eq!(
            field(json!({ "url": "https://x/", "enabled": "yes" })),
            "enabled"
        );
        assert_eq!(
            field(json!({ "url": "https://x/", "colour": 1 })),
            "document"
        );
        assert_eq!(
            field(json!({ "url": "https://x/", "headers": { "webhook-id": "x" } })),
            "headers"
        );
    }

    #[test]
    fn catalog_postbacks_become_endpoints_and_a_file_name_wins() {
        let config = DeliveryConfig::defaults().expect("defaults");
        let mut c = Catalog::default();
        let put = |c: &mut Catalog, id: &str, offset: i64, doc: Value| {
            c.apply(
                Key::new(Kind::Postback, id).expect("key"),
                offset,
                Some(Stored::new(doc, "t", 0)),
            );
        };
        put(
            &mut c,
            "a",
            0,
            json!({ "url": "https://a.example/?c={click_id}" }),
        );
        put(
            &mut c,
            "b",
            1,
            json!({ "url": "https://b.example/", "enabled": false }),
        );
        put(&mut c, "file", 2, json!({ "url": "https://f.example/" }));
        let taken: BTreeSet<String> = ["file".to_string()].into();
        let first = compile(&config, None, &taken, &c, None);
        let names: Vec<(&str, bool)> = first
            .endpoints
            .iter()
            .map(|e| (e.name.as_str(), e.enabled))
            .collect();
        assert_eq!(names, [("a", true), ("b", false)]);
        assert_eq!(first.revision, 2);
        put(
            &mut c,
            "a",
            3,
            json!({ "url": "https://a.example/?c={nope}" }),
        );
        let second = compile(&config, None, &taken, &c, Some(&first));
        assert_eq!(
            second.endpoints[0].url, first.endpoints[0].url,
            "an unusable change keeps the last usable version"
        );
    }
}
