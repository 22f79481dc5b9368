//! `console catalog import FILE` and `console catalog export`: the catalog file format
//! ([`s2s_catalog::file`]) through a running console's management API, so that an import
//! is checked and written by the elected writer like any other change, and recorded in
//! each entity's history under the importing operator's name.
//!
//! An import plans its changes against the catalog as the API lists it: new entities are
//! created (`If-None-Match: *`), changed ones updated against the revision read
//! (`If-Match`), equal ones left alone, so running it twice changes nothing the second
//! time; entities the file does not name are left alone too.

use std::collections::BTreeMap;

use reqwest::StatusCode;
use s2s_catalog::documents::Checks;
use s2s_catalog::file::{plan, CatalogFile, FileError, Imported, Step};
use s2s_catalog::{Key, Kind};
use serde_json::{json, Value};

/// Where the console's API is and who calls it.
#[derive(Debug, Clone)]
pub struct Api {
    /// `http://host:port` of a console (any instance: a non-writer answers 503 and the
    /// change is retried).
    pub url: String,
    /// An operator token.
    pub token: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    File(#[from] FileError),
    #[error("calling the console at {url}: {error}")]
    Http { url: String, error: reqwest::Error },
    #[error("{what}: the console answered {status}: {body}")]
    Refused {
        what: String,
        status: StatusCode,
        body: String,
    },
    #[error("{0} of the file's changes were refused (each is listed above)")]
    Partly(usize),
}

/// How many times a change answered 503 (`not_the_writer` during an election) is tried.
const ATTEMPTS: u32 = 30;

impl Api {
    fn client(&self) -> reqwest::Client {
        reqwest::Client::new()
    }

    async fn call(
        &self,
        what: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, Value), CliError> {
        let resp = request
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|error| CliError::Http {
                url: self.url.clone(),
                error,
            })?;
        let status = resp.status();
        let body = resp.text().await.map_err(|error| CliError::Http {
            url: self.url.clone(),
            error,
        })?;
        if !status.is_success() {
            return Err(CliError::Refused {
                what: what.to_string(),
                status,
                body,
            });
        }
        let value = serde_json::from_str(&body).unwrap_or(Value::Null);
        Ok((status, value))
    }

    /// Every entity of `kind`: `(revision, document)` by key.
    async fn list(&self, kind: Kind) -> Result<BTreeMap<Key, (i64, Value)>, CliError> {
        let url = format!("{}/api/v1/catalog/{kind}", self.url);
        let (_, body) = self
            .call(&format!("listing {kind}s"), self.client().get(url))
            .await?;
        let mut out = BTreeMap::new();
        for item in body["items"].as_array().into_iter().flatten() {
            let id = item["id"].as_str().unwrap_or_default();
            if let (Ok(key), Some(revision)) = (Key::new(kind, id), item["revision"].as_i64()) {
                out.insert(key, (revision, item["document"].clone()));
            }
        }
        Ok(out)
    }

    /// One change, retried while the console answers 503 (an election, or the broker).
    async fn put(
        &self,
        key: &Key,
        base: Option<i64>,
        document: &Value,
        reason: Option<&str>,
    ) -> Result<i64, CliError> {
        let url = format!("{}/api/v1/catalog/{}/{}", self.url, key.kind(), key.id());
        let mut attempt = 0;
        loop {
            attempt += 1;
            let body = json!({ "document": document, "reason": reason }).to_string();
            let mut req = self
                .client()
                .put(&url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
            req = match base {
                Some(b) => req.header("If-Match", format!("\"{b}\"")),
                None => req.header("If-None-Match", "*"),
            };
            match self.call(&key.to_string(), req).await {
                Ok((_, body)) => return Ok(body["revision"].as_i64().unwrap_or(-1)),
                Err(CliError::Refused { status, .. })
                    if status == StatusCode::SERVICE_UNAVAILABLE && attempt < ATTEMPTS =>
                {
                    // Retry-After is 1 s on every 503 the console gives.
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Imports `file` (checked with `checks` first, as the console will check it);
/// prints a line per change to stderr. `dry_run`: plans and prints, changes nothing.
pub async fn import(
    api: &Api,
    file: &CatalogFile,
    checks: &Checks,
    reason: Option<&str>,
    dry_run: bool,
) -> Result<Imported, CliError> {
    let entities = file.entities(checks)?;
    let mut current = BTreeMap::new();
    for kind in [Kind::Offer, Kind::Affiliate, Kind::Postback] {
        if entities.iter().any(|e| e.key.kind() == kind) {
            current.extend(api.list(kind).await?);
        }
    }
    let mut done = Imported::default();
    let mut refused = 0;
    for step in plan(entities, |k| current.get(k).map(|(r, d)| (*r, d))) {
        if let Step::Unchanged { key } = &step {
            done.unchanged += 1;
            eprintln!("unchanged {key}");
            continue;
        }
        let Some((key, base, document)) = step.change() else {
            continue;
        };
        let verb = if base.is_some() { "updated" } else { "created" };
        if dry_run {
            eprintln!("would have {verb} {key}");
            continue;
        }
        match api.put(&key, base, &document, reason).await {
            Ok(revision) => {
                eprintln!("{verb} {key} (revision {revision})");
                if base.is_some() {
                    done.updated += 1;
                } else {
                    done.created += 1;
                }
            }
            Err(e @ CliError::Refused { .. }) => {
                eprintln!("refused {key}: {e}");
                refused += 1;
            }
            Err(e) => return Err(e),
        }
    }
    if refused > 0 {
        return Err(CliError::Partly(refused));
    }
    Ok(done)
}

/// The catalog's offers, affiliates and postbacks as a catalog file.
pub async fn export(api: &Api) -> Result<String, CliError> {
    let mut all = BTreeMap::new();
    for kind in [Kind::Offer, Kind::Affiliate, Kind::Postback] {
        all.extend(api.list(kind).await?);
    }
    let file = CatalogFile::from_documents(all.iter().map(|(k, (_, d))| (k, d)))?;
    Ok(file.to_toml()?)
}
