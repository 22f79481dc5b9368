//! The catalog as a file: the import and export format (`console catalog import FILE`,
//! `console catalog export`), a TOML table per kind and an entity per sub-table —
//! `[offers.<id>]`, `[affiliates.<id>]`, `[postbacks.<id>]` — the documents as the API
//! takes them
//! (`deploy/config/catalog.toml` documents every field).
//!
//! An import is a [`plan`] of changes against the catalog as it is: what the file has and
//! the catalog does not is created, what differs is changed against the revision read,
//! what is equal is left alone (an import run twice changes nothing the second time), and
//! what the catalog has and the file does not is left alone too (deleting is the API's).

use std::collections::BTreeMap;

use s2s_common::pipeline::{FieldError, OfferConfig};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::documents::{self, Affiliate, Checks};
use crate::record::{Key, KeyError, Kind};

/// A catalog file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogFile {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub offers: BTreeMap<String, OfferConfig>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub affiliates: BTreeMap<String, Affiliate>,
    /// Checked with delivery's rules ([`Checks::with`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub postbacks: BTreeMap<String, toml::Table>,
    /// Checked with ingest's rules ([`Checks::with`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sources: BTreeMap<String, toml::Table>,
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    #[error("{section}.{id}: {error}")]
    Key {
        section: &'static str,
        id: String,
        error: KeyError,
    },
    #[error("{section}.{id}.{}: {}", .error.field, .error.message)]
    Document {
        section: &'static str,
        id: String,
        error: FieldError,
    },
    #[error("{key}: its document in the catalog is not a {kind}'s: {error}")]
    Stored {
        key: String,
        kind: Kind,
        error: FieldError,
    },
    #[error("writing TOML: {0}")]
    Write(#[from] toml::ser::Error),
}

/// One entity of a file, checked, in the canonical form the catalog keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct FileEntity {
    pub key: Key,
    pub document: Value,
}

impl CatalogFile {
    pub fn parse(text: &str) -> Result<Self, FileError> {
        Ok(toml::from_str(text)?)
    }

    /// Every entity, checked as the API checks a change.
    pub fn entities(&self, checks: &Checks) -> Result<Vec<FileEntity>, FileError> {
        fn one<T: Serialize>(
            section: &'static str,
            kind: Kind,
            id: &str,
            doc: &T,
            checks: &Checks,
        ) -> Result<FileEntity, FileError> {
            let key = Key::new(kind, id).map_err(|error| FileError::Key {
                section,
                id: id.to_string(),
                error,
            })?;
            let document = serde_json::to_value(doc)
                .map_err(|e| FieldError::new("document", e.to_string()))
                .and_then(|v| documents::check(kind, id, &v, checks))
                .map_err(|error| FileError::Document {
                    section,
                    id: id.to_string(),
                    error,
                })?;
            Ok(FileEntity { key, document })
        }
        let offers = self
            .offers
            .iter()
            .map(|(id, o)| one("offers", Kind::Offer, id, o, checks));
        let affiliates = self
            .affiliates
            .iter()
            .map(|(id, a)| one("affiliates", Kind::Affiliate, id, a, checks));
        let postbacks = self
            .postbacks
            .iter()
            .map(|(id, p)| one("postbacks", Kind::Postback, id, p, checks));
        let sources = self
            .sources
            .iter()
            .map(|(id, p)| one("sources", Kind::Source, id, p, checks));
        offers
            .chain(affiliates)
            .chain(postbacks)
            .chain(sources)
            .collect()
    }

    /// The file of `entities` (documents as the catalog keeps them); kinds without a
    /// section here are left out.
    pub fn from_documents<'a>(
        entities: impl IntoIterator<Item = (&'a Key, &'a Value)>,
    ) -> Result<Self, FileError> {
        fn put<T: serde::de::DeserializeOwned>(
            section: &mut BTreeMap<String, T>,
            key: &Key,
            document: &Value,
        ) -> Result<(), FileError> {
            let typed = documents::typed(document).map_err(|error| FileError::Stored {
                key: key.to_string(),
                kind: key.kind(),
                error,
            })?;
            section.insert(key.id().to_string(), typed);
            Ok(())
        }
        let mut file = CatalogFile::default();
        for (key, document) in entities {
            match key.kind() {
                Kind::Offer => put(&mut file.offers, key, document)?,
                Kind::Affiliate => put(&mut file.affiliates, key, document)?,
                Kind::Postback => put(&mut file.postbacks, key, document)?,
                Kind::Source => put(&mut file.sources, key, document)?,
                Kind::Operator => {}
            }
        }
        Ok(file)
    }

    pub fn to_toml(&self) -> Result<String, FileError> {
        Ok(toml::to_string(self)?)
    }
}

/// What an import did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Imported {
    pub created: usize,
    pub updated: usize,
    pub unchanged: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Follower(#[from] crate::FollowerError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("{key}: {error}")]
    Write {
        key: String,
        error: crate::WriteError,
    },
    #[error("{key}.{}: {}", .error.field, .error.message)]
    Secret { key: String, error: FieldError },
}

/// Imports `file` by writing to the catalog topic itself, without an election: only
/// where nothing else writes the catalog (tests and benchmarks that run services
/// without a console). Everywhere else an import goes through the console's API
/// (`console catalog import`), whose elected writer checks it. Secrets are sealed (or
/// hashed) as the console does, with `secret_key`.
pub async fn import_unelected(
    kafka: &s2s_common::kafka::KafkaConfig,
    topics: &s2s_common::topics::TopicsConfig,
    checks: &Checks,
    secret_key: Option<&crate::secrets::SecretKey>,
    file: &CatalogFile,
    changed_by: &str,
) -> Result<Imported, ImportError> {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    let entities = file.entities(checks)?;
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let follower = Arc::new(
        crate::Follower::start(
            kafka,
            &topics.catalog.name,
            crate::follower::READY_WITHIN,
            &stop,
        )
        .await?,
    );
    let writer = crate::Writer::new(
        kafka,
        &topics.catalog.name,
        &topics.catalog_audit.name,
        Arc::clone(&follower),
        Duration::from_secs(10),
    )?;
    let catalog = follower.catalog();
    let steps = plan(entities, |k| {
        catalog.get(k).map(|e| (e.revision, &e.stored.document))
    });
    let mut done = Imported::default();
    for step in steps {
        let created = matches!(step, Step::Create { .. });
        let Some((key, base, mut document)) = step.change() else {
            done.unchanged += 1;
            continue;
        };
        let current = catalog.get(&key).map(|e| &e.stored.document);
        crate::secrets::seal_fields(&key, &mut document, current, secret_key).map_err(|error| {
            ImportError::Secret {
                key: key.to_string(),
                error,
            }
        })?;
        if created {
            done.created += 1;
        } else {
            done.updated += 1;
        }
        let change = crate::Change {
            key: key.clone(),
            base,
            document: Some(document),
            changed_by: changed_by.to_string(),
            changed_at_ms: s2s_common::now_ms(),
            reason: Some("import".into()),
        };
        writer
            .write(change, Instant::now())
            .await
            .map_err(|error| ImportError::Write {
                key: key.to_string(),
                error,
            })?;
    }
    Ok(done)
}

/// What an import does to one entity.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Create {
        key: Key,
        document: Value,
    },
    Update {
        key: Key,
        base: i64,
        document: Value,
    },
    Unchanged {
        key: Key,
    },
}

impl Step {
    /// The change the step makes — the entity, the revision it is made against (`None`:
    /// a creation) and its document —, or `None` when it leaves the entity alone.
    pub fn change(self) -> Option<(Key, Option<i64>, Value)> {
        match self {
            Step::Create { key, document } => Some((key, None, document)),
            Step::Update {
                key,
                base,
                document,
            } => Some((key, Some(base), document)),
            Step::Unchanged { .. } => None,
        }
    }
}

/// The changes that make the catalog hold `entities`; `current` gives an entity's
/// revision and document in the catalog.
pub fn plan<'a>(
    entities: Vec<FileEntity>,
    current: impl Fn(&Key) -> Option<(i64, &'a Value)>,
) -> Vec<Step> {
    entities
        .into_iter()
        .map(|FileEntity { key, document }| match current(&key) {
            None => Step::Create { key, document },
            Some((_, now)) if *now == document => Step::Unchanged { key },
            Some((base, _)) => Step::Update {
                key,
                base,
                document,
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn vocabulary() -> Checks {
        Checks::new(s2s_common::pipeline::PipelineConfig::defaults().postbacks)
    }

    const FILE: &str = r#"
        [offers.1]
        url = "https://o.example/?c={click_id}"
        currency = "USD"
        window = "30d"
        payouts = { ftd = "50.00" }

        [affiliates.acme]
        name = "Acme"
        status = "blocked"
    "#;

    #[test]
    fn a_file_is_checked_like_the_api_checks_a_change() {
        let file = CatalogFile::parse(FILE).expect("parses");
        let entities = file.entities(&vocabulary()).expect("valid");
        let keys: Vec<String> = entities.iter().map(|e| e.key.to_string()).collect();
        assert_eq!(keys, ["offer/1", "affiliate/acme"]);
        assert_eq!(
            entities[1].document,
            json!({ "name": "Acme", "status": "blocked" })
        );

        let bad = FILE.replace("ftd = ", "signup = ");
        let e = CatalogFile::parse(&bad)
            .expect("parses")
            .entities(&vocabulary())
            .expect_err("unknown event");
        assert!(e.to_string().starts_with("offers.1.payouts.signup:"), "{e}");
        let e = CatalogFile::parse("[offers.\"a b\"]\nurl = \"https://o.example/\"")
            .expect("parses")
            .entities(&vocabulary())
            .expect_err("a bad ID");
        assert!(e.to_string().starts_with("offers.a b:"), "{e}");
        let e = CatalogFile::parse("[offer.1]\nurl = \"https://o.example/\"")
            .expect_err("an unknown section");
        assert!(e.to_string().contains("offer"), "{e}");
    }

    #[test]
    fn an_import_creates_changes_and_leaves_alone() {
        let entities = CatalogFile::parse(FILE)
            .expect("parses")
            .entities(&vocabulary())
            .expect("valid");
        let offer = entities[0].document.clone();
        let other = json!({ "name": "Acme", "status": "active" });
        let catalog: BTreeMap<String, (i64, Value)> = [
            ("offer/1".to_string(), (7, offer)),
            ("affiliate/acme".to_string(), (9, other)),
        ]
        .into();
        let steps = plan(entities.clone(), |k| {
            catalog.get(&k.to_string()).map(|(r, d)| (*r, d))
        });
        assert!(matches!(&steps[0], Step::Unchanged { key } if key.to_string() == "offer/1"));
        assert!(matches!(&steps[1], Step::Update { base: 9, document, .. }
            if document["status"] == "blocked"));
        let steps = plan(entities, |_| None);
        assert!(steps.iter().all(|s| matches!(s, Step::Create { .. })));
    }

    #[test]
    fn an_export_imports_as_unchanged() {
        let entities = CatalogFile::parse(FILE)
            .expect("parses")
            .entities(&vocabulary())
            .expect("valid");
        let exported = CatalogFile::from_documents(entities.iter().map(|e| (&e.key, &e.document)))
            .expect("typed")
            .to_toml()
            .expect("toml");
        let again = CatalogFile::parse(&exported)
            .expect("parses")
            .entities(&vocabulary())
            .expect("valid");
        assert_eq!(again, entities, "{exported}");
    }
}
