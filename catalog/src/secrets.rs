//! Secrets in catalog documents: write-only through the API, sealed (or hashed) in the
//! topic.
//!
//! A secret field (a postback's signing `secret`) is written through the API as a string
//! and read back as `{"set": true}`, never as its value; a change that sends `{"set":
//! true}` keeps the value the entity has (so a document read, edited and written back
//! keeps its secret). In the catalog and audit topics the field holds `{"sealed":
//! "<base64 of nonce ‖ ciphertext>"}`: XChaCha20-Poly1305 (RustCrypto's
//! `chacha20poly1305`) with a 256-bit key from the environment (`S2S_CATALOG_KEY`,
//! base64), a random 192-bit nonce per seal, and `<kind>/<id>#<field>` as associated
//! data, so a sealed value copied to another entity or field does not open. The console
//! seals; the services that use a secret open it with the same key.
//!
//! A secret nobody needs back — an operator's API `token` — is kept as
//! `{"sha256": "<hex>"}` instead: the console compares the digest of the token a request
//! presents. Tokens are random and at least 16 characters, so a fast digest is enough
//! (a password would need a slow one).

use std::fmt;

use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use s2s_common::pipeline::FieldError;
use serde_json::{json, Map, Value};

use crate::record::{Key, Kind};

/// The environment variable holding the catalog's key.
pub const KEY_ENV: &str = s2s_common::pipeline::CATALOG_KEY_ENV;

const NONCE_LEN: usize = 24;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("{KEY_ENV} must be 32 bytes in base64 (e.g. the output of `openssl rand -base64 32`)")]
    BadKey,
    #[error("the catalog holds a secret for {0}, but {KEY_ENV} is not set here")]
    NoKey(String),
    #[error(
        "the sealed secret of {0} does not open with this {KEY_ENV} (another key, or altered)"
    )]
    DoesNotOpen(String),
}

/// The catalog's key. Its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct SecretKey(XChaCha20Poly1305);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(…)")
    }
}

impl SecretKey {
    /// The key from `value`: 32 bytes, base64.
    pub fn from_base64(value: &str) -> Result<Self, SecretError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(value.trim())
            .map_err(|_| SecretError::BadKey)?;
        let cipher = XChaCha20Poly1305::new_from_slice(&bytes).map_err(|_| SecretError::BadKey)?;
        Ok(SecretKey(cipher))
    }

    /// The pipeline's key (from [`KEY_ENV`]), if it is set.
    pub fn of(
        pipeline: &s2s_common::pipeline::PipelineConfig,
    ) -> Result<Option<Self>, SecretError> {
        pipeline
            .catalog_key
            .as_ref()
            .map(|k| Self::from_base64(&k.0))
            .transpose()
    }

    /// `plaintext` sealed for `field` of entity `key`.
    pub fn seal(&self, key: &Key, field: &str, plaintext: &str) -> Value {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let aad = associated(key, field);
        // Encryption fails only for messages beyond the cipher's limit (256 GiB).
        let sealed = match self.0.encrypt(
            &nonce,
            Payload {
                msg: plaintext.as_bytes(),
                aad: aad.as_bytes(),
            },
        ) {
            Ok(ct) => [nonce.as_slice(), &ct].concat(),
            Err(_) => Vec::new(),
        };
        json!({ "sealed": base64::engine::general_purpose::STANDARD.encode(sealed) })
    }

    /// The plaintext of `sealed` (`{"sealed": …}`), sealed for `field` of `key`.
    pub fn open(&self, key: &Key, field: &str, sealed: &Value) -> Result<String, SecretError> {
        let what = format!("{key}#{field}");
        let bytes = sealed
            .get("sealed")
            .and_then(Value::as_str)
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
            .filter(|b| b.len() > NONCE_LEN)
            .ok_or_else(|| SecretError::DoesNotOpen(what.clone()))?;
        let (nonce, ct) = bytes.split_at(NONCE_LEN);
        let aad = associated(key, field);
        let plain = self
            .0
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| SecretError::DoesNotOpen(what.clone()))?;
        String::from_utf8(plain).map_err(|_| SecretError::DoesNotOpen(what))
    }
}

fn associated(key: &Key, field: &str) -> String {
    format!("{key}#{field}")
}

/// How a secret field is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keeping {
    /// Sealed under the catalog's key: a service opens it to use it.
    Sealed,
    /// Its SHA-256 digest: compared, never used.
    Hashed,
}

impl Keeping {
    fn tag(self) -> &'static str {
        match self {
            Keeping::Sealed => "sealed",
            Keeping::Hashed => "sha256",
        }
    }
}

/// The secret fields of a kind's documents.
pub fn fields(kind: Kind) -> &'static [(&'static str, Keeping)] {
    match kind {
        Kind::Postback => &[("secret", Keeping::Sealed)],
        Kind::Operator => &[("token", Keeping::Hashed)],
        Kind::Source => &[("token", Keeping::Sealed), ("hmac_secret", Keeping::Sealed)],
        Kind::Offer | Kind::Affiliate => &[],
    }
}

/// The digest a hashed secret is kept as, hex.
pub fn digest(plain: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(plain.as_bytes()))
}

/// What a change says of a secret field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written<'a> {
    /// A new value.
    Plain(&'a str),
    /// `{"set": true}`: keep the entity's.
    Keep,
    /// `{"sealed": …}` or `{"sha256": …}`: a value as the topic keeps it.
    Kept,
    /// Absent or null: no secret.
    Absent,
}

/// What `document` says of its secret field `field`.
pub fn written<'a>(document: &'a Value, field: &str) -> Result<Written<'a>, FieldError> {
    match document.get(field) {
        None | Some(Value::Null) => Ok(Written::Absent),
        Some(Value::String(s)) => Ok(Written::Plain(s)),
        Some(Value::Object(o)) if o.len() == 1 && o.get("set") == Some(&Value::Bool(true)) => {
            Ok(Written::Keep)
        }
        Some(Value::Object(o))
            if o.len() == 1
                && ["sealed", "sha256"]
                    .iter()
                    .any(|t| o.get(*t).is_some_and(Value::is_string)) =>
        {
            Ok(Written::Kept)
        }
        Some(_) => Err(FieldError::new(
            field,
            "a secret is a string, or {\"set\": true} to keep the one set",
        )),
    }
}

/// Seals (or hashes) the secret fields of `document` (the document of `key`, checked): a
/// new value with `secret_key`, `{"set": true}` replaced by `current`'s kept value. The
/// error names the field; it never holds the secret.
pub fn seal_fields(
    key: &Key,
    document: &mut Value,
    current: Option<&Value>,
    secret_key: Option<&SecretKey>,
) -> Result<(), FieldError> {
    for (field, keeping) in fields(key.kind()) {
        let field = *field;
        let replacement = match written(document, field)? {
            Written::Absent => None,
            Written::Kept => {
                return Err(FieldError::new(
                    field,
                    "a kept value cannot be written: send the secret, or {\"set\": true}",
                ))
            }
            Written::Plain(plain) => Some(match keeping {
                Keeping::Hashed => json!({ "sha256": digest(plain) }),
                Keeping::Sealed => match secret_key {
                    Some(k) => k.seal(key, field, plain),
                    None => {
                        return Err(FieldError::new(
                            field,
                            format!(
                                "the catalog keeps secrets encrypted, and this console has no \
                                 key: set {KEY_ENV}"
                            ),
                        ))
                    }
                },
            }),
            Written::Keep => match current.and_then(|c| c.get(field)) {
                Some(v) if v.get(keeping.tag()).is_some() => Some(v.clone()),
                _ => {
                    return Err(FieldError::new(
                        field,
                        "there is no secret to keep: send one, or leave the field out",
                    ))
                }
            },
        };
        if let (Some(v), Some(fields)) = (replacement, document.as_object_mut()) {
            fields.insert(field.to_string(), v);
        }
    }
    Ok(())
}

/// `document` as the API shows it: each secret field that holds a value as
/// `{"set": true}`.
pub fn redact(kind: Kind, document: &Value) -> Value {
    let mut shown = document.clone();
    if let Some(obj) = shown.as_object_mut() {
        redact_fields(kind, obj);
    }
    shown
}

fn redact_fields(kind: Kind, obj: &mut Map<String, Value>) {
    for (field, _) in fields(kind) {
        if obj.get(*field).is_some_and(|v| !v.is_null()) {
            obj.insert((*field).to_string(), json!({ "set": true }));
        }
    }
}

/// The plaintext of `document`'s secret `field`, if it has one.
pub fn open_field(
    key: &Key,
    document: &Value,
    field: &str,
    secret_key: Option<&SecretKey>,
) -> Result<Option<String>, SecretError> {
    match document.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(sealed) => match secret_key {
            Some(k) => k.open(key, field, sealed).map(Some),
            None => Err(SecretError::NoKey(format!("{key}#{field}"))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretKey {
        SecretKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([7u8; 32]))
            .expect("a key")
    }

    fn pb(id: &str) -> Key {
        Key::new(Kind::Postback, id).expect("key")
    }

    #[test]
    fn a_sealed_secret_opens_only_where_it_was_sealed() {
        let k = key();
        let sealed = k.seal(&pb("a"), "secret", "whsec_abc");
        assert!(!sealed.to_string().contains("whsec_abc"));
        assert_eq!(k.open(&pb("a"), "secret", &sealed), Ok("whsec_abc".into()));
        assert_ne!(
            sealed,
            k.seal(&pb("a"), "secret", "whsec_abc"),
            "a fresh nonce each time"
        );
        assert!(
            k.open(&pb("b"), "secret", &sealed).is_err(),
            "another entity"
        );
        assert!(k.open(&pb("a"), "token", &sealed).is_err(), "another field");
        let other =
            SecretKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([8u8; 32]))
                .expect("a key");
        assert!(
            other.open(&pb("a"), "secret", &sealed).is_err(),
            "another key"
        );
        assert_eq!(
            SecretKey::from_base64("c2hvcnQ=").err(),
            Some(SecretError::BadKey)
        );
        assert_eq!(format!("{k:?}"), "SecretKey(…)");
    }

    #[test]
    fn secrets_are_written_as_strings_kept_as_set_and_shown_as_set() {
        let k = key();
        let mut doc = json!({ "url": "https://a/", "secret": "whsec_abc" });
        seal_fields(&pb("a"), &mut doc, None, Some(&k)).expect("sealed");
        assert!(!doc.to_string().contains("whsec_abc"), "{doc}");
        assert_eq!(
            open_field(&pb("a"), &doc, "secret", Some(&k)),
            Ok(Some("whsec_abc".into()))
        );
        assert_eq!(
            redact(Kind::Postback, &doc)["secret"],
            json!({ "set": true })
        );

        let mut again = redact(Kind::Postback, &doc);
        again["url"] = json!("https://b/");
        seal_fields(&pb("a"), &mut again, Some(&doc), Some(&k)).expect("kept");
        assert_eq!(again["secret"], doc["secret"], "the sealed value kept");

        let e = |mut d: Value, current: Option<&Value>, k: Option<&SecretKey>| {
            seal_fields(&pb("a"), &mut d, current, k).expect_err("refused")
        };
        let keep = json!({ "secret": { "set": true } });
        assert!(e(keep.clone(), None, Some(&k))
            .message
            .contains("no secret to keep"));
        let no_key = e(json!({ "secret": "whsec_abc" }), None, None);
        assert!(no_key.message.contains(KEY_ENV), "{no_key}");
        assert!(!no_key.to_string().contains("whsec_abc"));
        assert_eq!(e(json!({ "secret": 5 }), None, Some(&k)).field, "secret");
        assert!(e(doc.clone(), None, Some(&k))
            .message
            .contains("kept value"));
        let mut none = json!({ "url": "https://a/" });
        seal_fields(&pb("a"), &mut none, Some(&doc), Some(&k)).expect("no secret");
        assert!(none.get("secret").is_none(), "left out: removed");
        assert_eq!(
            open_field(&pb("a"), &doc, "secret", None),
            Err(SecretError::NoKey("postback/a#secret".into()))
        );
    }

    #[test]
    fn an_operators_token_is_kept_as_its_digest_without_a_key() {
        let op = Key::new(Kind::Operator, "alice").expect("key");
        let mut doc = json!({ "name": "Alice", "role": "admin", "token": "0123456789abcdef" });
        seal_fields(&op, &mut doc, None, None).expect("hashed");
        assert_eq!(
            doc["token"],
            json!({ "sha256": digest("0123456789abcdef") })
        );
        assert_eq!(
            redact(Kind::Operator, &doc)["token"],
            json!({ "set": true })
        );
        let mut kept = json!({ "name": "Alice", "role": "viewer", "token": { "set": true } });
        seal_fields(&op, &mut kept, Some(&doc), None).expect("kept");
        assert_eq!(kept["token"], doc["token"]);
    }
}
