//! What the catalog topic and its audit topic hold, and what a change asks for.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The kinds of catalog entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Offer,
    Affiliate,
    Postback,
    Source,
    Operator,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Offer,
        Kind::Affiliate,
        Kind::Postback,
        Kind::Source,
        Kind::Operator,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Offer => "offer",
            Kind::Affiliate => "affiliate",
            Kind::Postback => "postback",
            Kind::Source => "source",
            Kind::Operator => "operator",
        }
    }
}

impl FromStr for Kind {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| KeyError::Kind(s.to_string()))
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a key or ID is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("unknown kind '{0}': one of offer, affiliate, postback, source, operator")]
    Kind(String),
    #[error("id '{0}' is not 1 to {MAX_ID} characters of letters, digits, '.', '_' and '-'")]
    Id(String),
    #[error("key '{0}' is not <kind>/<id>")]
    Shape(String),
}

/// The longest ID.
pub const MAX_ID: usize = 128;

/// An entity's identity, `<kind>/<id>` on the topic: the record key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    kind: Kind,
    id: String,
}

impl Key {
    /// `id`: 1 to [`MAX_ID`] of `[A-Za-z0-9._-]` (it appears in URLs, metrics and file
    /// names).
    pub fn new(kind: Kind, id: &str) -> Result<Self, KeyError> {
        let ok = !id.is_empty()
            && id.len() <= MAX_ID
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok {
            return Err(KeyError::Id(id.to_string()));
        }
        Ok(Key {
            kind,
            id: id.to_string(),
        })
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn id(&self) -> &str {
        &self.id
    }
}

impl FromStr for Key {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        let (kind, id) = s
            .split_once('/')
            .ok_or_else(|| KeyError::Shape(s.to_string()))?;
        Key::new(kind.parse()?, id)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.id)
    }
}

/// The value of an entity's record in the catalog topic (a tombstone deletes it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stored {
    /// The entity's whole current document (a JSON object).
    pub document: Value,
    /// Who made the change (an operator's ID, `import`, …).
    pub changed_by: String,
    pub changed_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Stored {
    pub fn new(document: Value, changed_by: &str, changed_at_ms: i64) -> Self {
        Stored {
            document,
            changed_by: changed_by.to_string(),
            changed_at_ms,
            reason: None,
        }
    }
}

/// An entity as the catalog holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: Key,
    /// The offset of its record in the catalog topic.
    pub revision: i64,
    pub stored: Stored,
}

/// A change someone asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub key: Key,
    /// The revision the change was made against; `None`: a creation (the entity must not
    /// exist).
    pub base: Option<i64>,
    /// The new document; `None`: delete the entity.
    pub document: Option<Value>,
    pub changed_by: String,
    pub changed_at_ms: i64,
    pub reason: Option<String>,
}

/// Every accepted change, as the audit topic keeps it (keyed like the catalog).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    pub key: String,
    /// The revision the change created (for a delete: the tombstone's offset).
    pub revision: i64,
    /// The revision it replaced; absent for a creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<i64>,
    /// The new document; absent for a delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<Value>,
    pub changed_by: String,
    pub changed_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_kind_slash_id_with_a_safe_id() {
        let k: Key = "affiliate/aff-7.b_2".parse().expect("a key");
        assert_eq!((k.kind(), k.id()), (Kind::Affiliate, "aff-7.b_2"));
        assert_eq!(k.to_string(), "affiliate/aff-7.b_2");
        assert_eq!(
            "offers/1".parse::<Key>(),
            Err(KeyError::Kind("offers".into()))
        );
        assert_eq!("offer".parse::<Key>(), Err(KeyError::Shape("offer".into())));
        for bad in ["", "a b", "a/b", "ü", &"x".repeat(MAX_ID + 1)] {
            assert!(Key::new(Kind::Offer, bad).is_err(), "{bad:?}");
        }
        assert!(Key::new(Kind::Offer, &"x".repeat(MAX_ID)).is_ok());
    }
}
